"""The bridge's deadline counts from each callback's arrival: behind batches already
in flight to a service that does not answer, a callback still fails within the
deadline (then 503), not after a multiple of it."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import pytest

from http_bridge.coalescer import Coalescer
from http_bridge.errors import RpcFailed
from jobwire.v1 import job_service_pb2 as svc
from jobwire.v1 import job_service_pb2_grpc
from tests.helpers import until

DEADLINE = 1.0


class Frozen(job_service_pb2_grpc.JobServiceServicer):
    """A JobService that accepts a batch and never answers (a frozen process)."""

    def __init__(self) -> None:
        self.batches = 0  # batches received

    async def BatchReportEvents(self, request: Any, context: Any) -> Any:
        self.batches += 1
        await asyncio.Event().wait()


async def test_queued_callbacks_fail_within_their_own_deadline() -> None:
    server = grpc.aio.server()
    frozen = Frozen()  # type: ignore[abstract]  # only BatchReportEvents is called
    job_service_pb2_grpc.add_JobServiceServicer_to_server(frozen, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    coalescer = Coalescer(job_service_pb2_grpc.JobServiceStub(channel), timeout=DEADLINE)
    try:

        async def report(n: int) -> float:
            started = time.monotonic()
            with pytest.raises(RpcFailed) as failed:
                await coalescer.report(svc.ReportEventRequest(job_id=f"j{n}"))
            assert failed.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert failed.value.status == 503
            return time.monotonic() - started

        # Two batches go out and hang (the coalescer's two RPCs in flight)...
        first = [asyncio.create_task(report(0))]
        await until(lambda: frozen.batches == 1)  # the first batch is at the service...
        first.append(asyncio.create_task(report(1)))
        await until(lambda: frozen.batches == 2)  # ...and the second one
        # ...and these queue behind them.
        queued = await asyncio.gather(*(report(n) for n in range(2, 8)))
        waited = [*await asyncio.gather(*first), *queued]
        assert max(waited) < DEADLINE * 1.6, waited  # not about 2 x DEADLINE
    finally:
        await coalescer.close()
        await channel.close()
        await server.stop(0)
