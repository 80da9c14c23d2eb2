"""The service process as operators meet it: health, reflection, SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from jobwire.v1 import job_pb2, job_service_pb2, job_service_pb2_grpc
from service.store.embedded import EmbeddedStore
from tests.conftest import ServiceHandle, make_policy
from tests.helpers import WAIT, create, free_port, progress, read, read_all


async def test_health_is_serving(grpc_service: ServiceHandle) -> None:
    stub = health_pb2_grpc.HealthStub(grpc_service.channel)
    for name in ("", "jobwire.v1.JobService"):
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=name))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_lists_the_services(grpc_service: ServiceHandle) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(grpc_service.channel)

    async def ask() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    call = stub.ServerReflectionInfo(ask())
    reply = await asyncio.wait_for(call.read(), WAIT)
    names = {s.name for s in reply.list_services_response.service}
    assert {"jobwire.v1.JobService", "grpc.health.v1.Health"} <= names
    call.cancel()


async def test_sigterm_finishes_in_flight_work_and_ends_streams(tmp_path: Path) -> None:
    port = free_port()
    env = dict(
        os.environ,
        JOBWIRE_GRPC_ADDR=f"127.0.0.1:{port}",
        JOBWIRE_DATA_DIR=str(tmp_path),
        JOBWIRE_METRICS_ADDR="127.0.0.1:0",
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli", "serve", env=env, stderr=asyncio.subprocess.PIPE
    )
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        await asyncio.wait_for(channel.channel_ready(), WAIT)
        stub = job_service_pb2_grpc.JobServiceStub(channel)
        await create(stub, job_pb2.JOB_KIND_GENERIC, "t")
        watch = stub.WatchJob(job_service_pb2.WatchJobRequest(id="t"))
        assert (await read(watch)).HasField("snapshot")
        await stub.ReportEvent(progress("t", 10))
        assert (await read(watch)).event.sequence == 1
        proc.send_signal(signal.SIGTERM)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await read_all(watch)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert await asyncio.wait_for(proc.wait(), WAIT) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
        await channel.close()
    # What was acknowledged before the signal is on disk.
    store = EmbeddedStore(tmp_path, make_policy())
    await store.start()
    record = await store.get("t")
    await store.close()
    assert record is not None and record.job.sequence == 1
