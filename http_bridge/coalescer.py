"""Gathers concurrent ReportEvent calls into BatchReportEvents RPCs.

Whatever arrived while the previous batch was in flight goes out as the next batch
(up to `max_batch`), so the service can make many callbacks durable with one commit.
Each caller still gets its own outcome, and only after its own event is durable.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING

import grpc

from jobwire.v1 import job_service_pb2 as svc

from . import tracing
from .errors import RpcFailed, from_rpc_error, status_code_of
from .metrics import REQUEST_ID

if TYPE_CHECKING:
    from jobwire.v1.job_service_pb2_grpc import JobServiceAsyncStub

log = logging.getLogger(__name__)

# An event, its caller's future, the callback's request id (X-Request-ID) and the
# event's size in bytes.
_Waiter = tuple[svc.ReportEventRequest, "asyncio.Future[svc.ReportEventResponse]", str, int]

# The service's own limit for one event (service/domain/validation.py): the handlers
# answer 413 past it rather than send what can never be applied.
MAX_EVENT_BYTES = 1024 * 1024
# A batch ends before this many bytes of events: the service takes messages of up to
# 4 MiB, and one batch over it failed every callback in it (RESOURCE_EXHAUSTED, a 429).
MAX_BATCH_BYTES = 3 * 1024 * 1024


class Coalescer:
    def __init__(
        self,
        stub: JobServiceAsyncStub,
        *,
        max_batch: int = 256,
        # Two: one batch being committed, the next one queued behind it at the service;
        # whatever arrives meanwhile waits here and goes out as one bigger batch. More
        # RPCs in flight only split the same events into more calls (each costs both
        # processes a few hundred microseconds) without committing any sooner.
        max_in_flight: int = 2,
        timeout: float = 30.0,
    ) -> None:
        self._stub = stub
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._timeout = timeout
        self._pending: list[_Waiter] = []
        self._senders: set[asyncio.Task[None]] = set()
        # Callers' deadlines in arrival order (one timeout for all: the earliest is
        # first), watched by one timer instead of a call_later per event.
        self._deadlines: deque[tuple[float, asyncio.Future[svc.ReportEventResponse]]] = deque()
        self._deadline_timer: asyncio.TimerHandle | None = None

    async def report(
        self, request: svc.ReportEventRequest, size: int = 0
    ) -> svc.ReportEventResponse:
        """Applies one event (`size`: its ByteSize, at most MAX_EVENT_BYTES); raises
        RpcFailed with the event's own status when refused."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[svc.ReportEventResponse] = loop.create_future()
        self._pending.append((request, future, REQUEST_ID.get(), size or request.ByteSize()))
        tracing.note_waiter(future)  # the callback's trace, when tracing is on
        if len(self._senders) < self._max_in_flight:
            self._senders.add(asyncio.create_task(self._send_loop()))
        # The deadline counts from the caller's arrival, queueing behind batches in
        # flight included: a frozen service gets the worker a 503 within `timeout`,
        # not a multiple of it. The event may still be applied later (idempotently).
        deadlines = self._deadlines
        while deadlines and deadlines[0][1].done():
            deadlines.popleft()
        deadlines.append((loop.time() + self._timeout, future))
        if self._deadline_timer is None:
            self._deadline_timer = loop.call_at(deadlines[0][0], self._expire_due, loop)
        return await future

    def _expire_due(self, loop: asyncio.AbstractEventLoop) -> None:
        """Fails the callers whose deadline passed; re-arms for the next one."""
        self._deadline_timer = None
        now = loop.time()
        deadlines = self._deadlines
        while deadlines and (deadlines[0][1].done() or deadlines[0][0] <= now):
            _expire(deadlines.popleft()[1])
        if deadlines:
            self._deadline_timer = loop.call_at(deadlines[0][0], self._expire_due, loop)

    async def _send_loop(self) -> None:
        try:
            while self._pending:
                count = _fitting(self._pending, self._max_batch)
                batch = self._pending[:count]
                del self._pending[:count]
                await self._send(batch)
        finally:
            # No await between the empty check and this: a caller arriving now sees
            # a free slot and starts a sender, so no event is ever stranded.
            task = asyncio.current_task()
            if task is not None:
                self._senders.discard(task)

    async def _send(self, batch: list[_Waiter]) -> None:
        try:
            # Inside the try: an event protobuf refuses to copy (e.g. a Struct nested too
            # deeply) must fail its waiters, not strand them.
            request = svc.BatchReportEventsRequest(requests=[w[0] for w in batch])
            # A sender runs in the context of the callback that started it, possibly long
            # gone: the call (its x-request-id, the log lines about it) is the first
            # callback's of this batch, as its trace is (tracing.batch_context).
            REQUEST_ID.set(batch[0][2])
            with tracing.batch_context([w[1] for w in batch]):
                response = await self._stub.BatchReportEvents(request, timeout=self._timeout)
        except grpc.aio.AioRpcError as exc:
            for _, future, _, _ in batch:
                if not future.done():
                    future.set_exception(from_rpc_error(exc))
            return
        except BaseException as exc:
            # Never strand a caller: whatever broke the send breaks every waiter of it.
            for _, future, _, _ in batch:
                if not future.done():
                    future.set_exception(RpcFailed(grpc.StatusCode.UNKNOWN, repr(exc)))
            if isinstance(exc, asyncio.CancelledError):
                raise
            log.exception("BatchReportEvents failed unexpectedly")
            return
        if len(response.results) != len(batch):
            log.error("BatchReportEvents: %d results, %d events", len(response.results), len(batch))
        for index, (_, future, _, _) in enumerate(batch):
            if future.done():
                continue  # the HTTP request went away; its event is applied anyway
            if index >= len(response.results):
                future.set_exception(RpcFailed(grpc.StatusCode.INTERNAL, "no result for event"))
                continue
            result = response.results[index]
            if result.code == 0:
                future.set_result(result.response)
            else:
                future.set_exception(RpcFailed(status_code_of(result.code), result.message))

    async def close(self) -> None:
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None
        for task in list(self._senders):
            task.cancel()
        await asyncio.gather(*self._senders, return_exceptions=True)


def _fitting(pending: list[_Waiter], most: int) -> int:
    """How many of the first waiters go in the next batch: at most `most`, and under
    MAX_BATCH_BYTES (the first always goes, alone if it must)."""
    total = 0
    for count, waiter in enumerate(pending[:most]):
        total += waiter[3]
        if total > MAX_BATCH_BYTES and count:
            return count
    return min(len(pending), most)


def _expire(future: asyncio.Future[svc.ReportEventResponse]) -> None:
    if not future.done():
        future.set_exception(
            RpcFailed(grpc.StatusCode.DEADLINE_EXCEEDED, "the service did not answer in time")
        )
