"""Stopping the processes an operator runs: SIGTERM to `jobwire bridge` while a
callback is in flight, and what `jobwire run` says when one of its children dies."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from jobwire.v1 import job_pb2, job_service_pb2
from service.store.embedded import EmbeddedStore
from tests.bridge_harness import BATCH_SECRET
from tests.bridge_process import BridgeProcess, cli_bridge_process
from tests.conftest import ServiceHandle, make_policy, start_service
from tests.grpc_proxy import FaultProxy
from tests.helpers import WAIT, create, until


@pytest.fixture
async def gated(tmp_path: Path) -> AsyncIterator[tuple[ServiceHandle, FaultProxy]]:
    """The service, and a proxy in front of it that can hold calls in flight."""
    handle = await start_service(EmbeddedStore(tmp_path / "data", make_policy()))
    proxy = await FaultProxy(handle.target).start()
    yield handle, proxy
    proxy.gate.set()
    await proxy.close()
    await handle.close()


async def _callback_in_flight(
    bridge: BridgeProcess, handle: ServiceHandle, proxy: FaultProxy, job_id: str
) -> asyncio.Task[tuple[int, str]]:
    """A batch callback posted while the proxy holds the bridge's call to the service;
    returns once the call waits at the proxy."""
    await create(handle.stub, job_pb2.JOB_KIND_BATCH, job_id)
    proxy.gate.clear()
    body = {
        "jobId": job_id,
        "status": "success",
        "outputKey": "o/x",
        "callbackSecret": BATCH_SECRET,
    }

    async def post() -> tuple[int, str]:
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"{bridge.url}/api/batch-callback", json=body) as reply,
        ):
            return reply.status, await reply.text()

    task = asyncio.create_task(post())
    await until(lambda: proxy.waiting >= 1)
    return task


async def _refused(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        return True
    writer.close()
    return False


async def test_sigterm_lets_the_bridge_finish_a_callback_in_flight(
    gated: tuple[ServiceHandle, FaultProxy], tmp_path: Path
) -> None:
    """A rolling deploy sends the bridge SIGTERM while a worker's callback waits for
    its commit: the bridge refuses new connections at once, answers the callback (200,
    committed) and exits 0 saying so. It used to die on the spot (no SIGTERM handler):
    the worker saw a reset connection for a callback that may well have committed."""
    handle, proxy = gated
    async with cli_bridge_process(proxy.target, tmp_path) as bridge:
        task = await _callback_in_flight(bridge, handle, proxy, "drain-1")
        assert bridge.proc.pid is not None
        bridge.proc.send_signal(signal.SIGTERM)
        await until(lambda: "bridge stopping" in bridge.log())
        assert await _refused(bridge.port)  # no new work while draining
        proxy.gate.set()
        status, text = await asyncio.wait_for(task, WAIT)
        assert status == 200, text
        assert await asyncio.wait_for(bridge.proc.wait(), WAIT) == 0, bridge.log()
    job = await handle.stub.GetJob(job_service_pb2.GetJobRequest(id="drain-1"))
    assert job.state == job_pb2.JOB_STATE_SUCCEEDED
    last = bridge.log().strip().splitlines()[-1]
    assert "bridge stopped" in last, bridge.log()
    assert "Traceback" not in bridge.log()


async def test_a_callback_still_in_flight_after_the_grace_gets_no_answer_at_all(
    gated: tuple[ServiceHandle, FaultProxy], tmp_path: Path
) -> None:
    """Past JOBWIRE_SHUTDOWN_GRACE_SECONDS the bridge closes the connection of a
    callback it could not finish without answering it: never a 500, never a 2xx for
    an event that was not committed; the worker retries it elsewhere."""
    handle, proxy = gated
    env = {"JOBWIRE_SHUTDOWN_GRACE_SECONDS": "0.2"}
    async with cli_bridge_process(proxy.target, tmp_path, **env) as bridge:
        task = await _callback_in_flight(bridge, handle, proxy, "drain-2")
        bridge.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(bridge.proc.wait(), WAIT) == 0, bridge.log()
        with pytest.raises(aiohttp.ClientError):
            await asyncio.wait_for(task, WAIT)
    job = await handle.stub.GetJob(job_service_pb2.GetJobRequest(id="drain-2"))
    assert job.state == job_pb2.JOB_STATE_QUEUED
    assert "Traceback" not in bridge.log() and " 500 " not in bridge.log(), bridge.log()
