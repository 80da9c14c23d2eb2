"""Calls from the client library, the bridge and the dashboard spread over every
address the service target resolves to (a headless Service's replicas)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from http_bridge.grpc_client import CHANNEL_OPTIONS
from http_bridge.service_channel import service_channel
from jobwire.client import Client
from jobwire.v1 import job_pb2, job_service_pb2, job_service_pb2_grpc
from service.store.embedded import EmbeddedStore
from tests.conftest import ServiceHandle, make_policy, start_service


@pytest.fixture
async def replicas(tmp_path: Path) -> AsyncIterator[list[ServiceHandle]]:
    """Two services, each holding job "lb" labelled with its own name."""
    handles = []
    for name in ("a", "b"):
        handle = await start_service(EmbeddedStore(tmp_path / name, make_policy()))
        handles.append(handle)
        job = job_pb2.Job(kind=job_pb2.JOB_KIND_GENERIC, labels={"replica": name})
        await handle.stub.CreateJob(job_service_pb2.CreateJobRequest(job=job, job_id="lb"))
    yield handles
    for handle in handles:
        await handle.close()


def _target(replicas: list[ServiceHandle]) -> str:
    """One target that resolves to both, as DNS does for a headless Service."""
    return "ipv4:" + ",".join(h.target for h in replicas)


async def test_the_bridge_and_dashboard_channel_spreads_calls(
    replicas: list[ServiceHandle],
) -> None:
    """gRPC's default policy, pick_first, sent every call to the first address: one
    service replica took all of a bridge's (or dashboard's) calls."""
    channel = service_channel(_target(replicas), CHANNEL_OPTIONS, env={})
    try:
        stub = job_service_pb2_grpc.JobServiceStub(channel)
        seen = set()
        for _ in range(20):
            job = await stub.GetJob(job_service_pb2.GetJobRequest(id="lb"))
            seen.add(job.labels["replica"])
        assert seen == {"a", "b"}
    finally:
        await channel.close()


async def test_the_client_library_spreads_calls(replicas: list[ServiceHandle]) -> None:
    async with Client(_target(replicas)) as client:
        seen = {(await client.get_job("lb")).labels["replica"] for _ in range(20)}
    assert seen == {"a", "b"}
