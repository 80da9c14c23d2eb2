"""Idle watch streams survive the client's keepalive pings. gRPC's server default
allows one ping per 5 minutes without data and answers more with GOAWAY
`too_many_pings`: every idle `WatchJob` of jobwire.client (which pings every 30 s) was
cut after about 2 minutes (pings at 30 s and 60 s, then throttled to one a minute: the
third strike). `JOBWIRE_GRPC_MIN_PING_SECONDS` (default 20) is the allowance; here
both sides are scaled down so that the strikes come within seconds."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from jobwire.client.channel import DEFAULT_OPTIONS
from jobwire.v1 import job_service_pb2, job_service_pb2_grpc
from service.config import Settings
from service.store.embedded import EmbeddedStore
from tests.conftest import ServiceHandle, make_policy, start_service
from tests.helpers import create, progress

CLIENT_PING_MS = 1_000
IDLE_SECONDS = 8.0  # several pings: gRPC's GOAWAY comes on the third ping strike


@pytest.fixture
async def channel_to() -> AsyncIterator[object]:
    channels: list[grpc.aio.Channel] = []

    def make(target: str) -> job_service_pb2_grpc.JobServiceStub:
        options = [o for o in DEFAULT_OPTIONS if o[0] != "grpc.keepalive_time_ms"]
        # Every ping sent: by default gRPC throttles a client's pings after two without
        # data to one a minute, which would make the strikes take minutes.
        fast = [
            ("grpc.keepalive_time_ms", CLIENT_PING_MS),
            ("grpc.http2.max_pings_without_data", 0),
        ]
        channel = grpc.aio.insecure_channel(target, options=[*options, *fast])
        channels.append(channel)
        return job_service_pb2_grpc.JobServiceStub(channel)

    yield make
    for channel in channels:
        await channel.close()


async def _service(tmp_path: Path, min_ping_seconds: float) -> ServiceHandle:
    store = EmbeddedStore(tmp_path / "d", make_policy())
    return await start_service(store, min_ping_seconds=min_ping_seconds)


async def test_an_idle_watch_outlives_the_clients_pings(tmp_path: Path, channel_to: object) -> None:
    handle = await _service(tmp_path, min_ping_seconds=CLIENT_PING_MS / 2000)
    try:
        await create(handle.stub, job_id="idle")
        stub = channel_to(handle.target)  # type: ignore[operator]
        call = stub.WatchJob(job_service_pb2.WatchJobRequest(id="idle"))
        first = await asyncio.wait_for(call.read(), 10)
        assert first.WhichOneof("item") == "snapshot"
        nothing = asyncio.ensure_future(call.read())
        # Idle time is what is under test: the client pings meanwhile.
        done, _ = await asyncio.wait({nothing}, timeout=IDLE_SECONDS)
        assert not done, f"the idle stream ended: {nothing.exception() or nothing.result()}"
        await handle.stub.ReportEvent(progress("idle", 50))
        event = await asyncio.wait_for(nothing, 10)
        assert event.event.progress.percent == 50
        call.cancel()
    finally:
        await handle.close()


async def test_with_grpcs_default_allowance_the_idle_watch_is_cut(
    tmp_path: Path, channel_to: object
) -> None:
    """The control: the same client against gRPC's default (300 s) is told GOAWAY."""
    handle = await _service(tmp_path, min_ping_seconds=300)
    try:
        await create(handle.stub, job_id="cut")
        stub = channel_to(handle.target)  # type: ignore[operator]
        call = stub.WatchJob(job_service_pb2.WatchJobRequest(id="cut"))
        assert (await asyncio.wait_for(call.read(), 10)).WhichOneof("item") == "snapshot"
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await asyncio.wait_for(call.read(), 4 * IDLE_SECONDS)
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "ping" in (ended.value.details() or "").lower()
    finally:
        await handle.close()


def test_the_default_allows_jobwire_clients_pings() -> None:
    keepalive_ms = dict(DEFAULT_OPTIONS)["grpc.keepalive_time_ms"]
    assert Settings().min_ping_seconds * 1000 < keepalive_ms
