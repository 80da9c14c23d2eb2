"""The bridge across a service restart. Its channel backs off between connection
attempts, and gRPC fails a call at once meanwhile: the first callbacks after the
service was back were answered 503 (a CI failure of the Secretary example's restart
test). A call now waits for the channel to reconnect, about one backoff at most
(http_bridge/channel_ready.py)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest

from http_bridge import grpc_client
from jobwire.v1 import job_pb2, job_service_pb2
from service.store.embedded import EmbeddedStore
from tests.bridge_harness import TEST_CONFIG, VIDEO_AUTH, create_job, running_bridge
from tests.conftest import make_policy, start_service

# A backoff of 2.4-3.6 s (gRPC's 20 % jitter): well past the service's restart.
SLOW_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 3000),
    ("grpc.max_reconnect_backoff_ms", 3000),
]


async def test_a_callback_just_after_the_service_is_back_is_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        grpc_client, "CHANNEL_OPTIONS", [*grpc_client.CHANNEL_OPTIONS, *SLOW_RECONNECT]
    )
    data = tmp_path / "data"
    service = await start_service(EmbeddedStore(data, make_policy()))
    port = service.running.port
    config = dataclasses.replace(TEST_CONFIG, service_target=service.target)
    async with running_bridge(config) as bridge:
        made = await create_job(service.stub, job_pb2.JOB_KIND_EXTRACTION, "sec-back")
        path = "/api/external/jobs/sec-back"
        auth = {"Authorization": f"Bearer {made.callback_token}"}

        async def report(percent: int) -> int:
            body = {"phase": "extract_text", "progress": percent}
            return (await bridge.post(path, body, headers=auth))[0]

        assert await report(10) == 200
        await service.close()
        # Readiness is not held: it tries to connect, is refused, and the channel backs off.
        assert (await bridge.get("/readyz"))[0] == 503
        service = await start_service(
            EmbeddedStore(data, make_policy()), grpc_addr=f"127.0.0.1:{port}"
        )
        try:
            assert await report(20) == 200  # it was 503: the channel was backing off
            job = await service.stub.GetJob(job_service_pb2.GetJobRequest(id="sec-back"))
            assert job.progress.percent == 20
        finally:
            await service.close()
        # Away for good: 503 after about one backoff (3.6 s + 0.5), not the 30 s deadline.
        began = time.monotonic()
        assert await report(30) == 503
        assert time.monotonic() - began < 8


async def test_the_reconnect_wait_counts_within_the_call_s_deadline(tmp_path: Path) -> None:
    """JOBWIRE_RPC_TIMEOUT_SECONDS is each call's deadline, the bridge's own waiting
    included (README): the reconnect wait is part of it, not added before it. A call to
    a service gone away took the whole wait (1.7 s) past a 0.3 s deadline."""
    service = await start_service(EmbeddedStore(tmp_path / "data", make_policy()))
    config = dataclasses.replace(
        TEST_CONFIG, service_target=service.target, rpc_timeout_seconds=0.3
    )
    async with running_bridge(config) as bridge:
        assert (await bridge.get("/api/pending", headers=VIDEO_AUTH))[0] == 204
        await service.close()
        for _ in range(3):  # away: the channel backs off and reconnects meanwhile
            began = time.monotonic()
            assert (await bridge.get("/api/pending", headers=VIDEO_AUTH))[0] == 503
            assert time.monotonic() - began < 0.3 + 0.5
