"""ListJobEvents by pages (`page_size`, `more`): a retained history too big for one
answer (64 events of 64 KiB are 4.2 MiB, one answer holds 3) can be read whole, oldest
first; the client library's `job_events` and its watch's fill page through it, and so
does a watch worker replaying a job to its watchers. Real service, both stores."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import grpc
import pytest

from jobwire.client import Client
from jobwire.client.watch import JobWatch
from jobwire.v1 import event_pb2, job_pb2, job_service_pb2, job_service_pb2_grpc
from tests.conftest import ServiceHandle, make_policy, open_test_store, start_service
from tests.helpers import create, progress, read
from tests.test_client import FAST, QUICK_WATCH
from tests.test_watch_workers import (
    AUTH,
    CONNECTIONS,
    TOKEN,
    WORKERS,
    own_connections,
    until_serving,
    workers_up,
)

BIG = "m" * 65536  # the longest progress message a worker may send
ANSWER_BYTES = 3 * 1024 * 1024
GENERIC = job_pb2.Job(kind=job_pb2.JOB_KIND_GENERIC)


async def big_history(
    store_kind: str, tmp_path: Path, request: pytest.FixtureRequest, **settings: object
) -> ServiceHandle:
    """A service whose job "long" holds 64 retained events of 64 KiB (sequences 1-64)."""
    policy = dataclasses.replace(make_policy(), retention=64)
    store = await open_test_store(store_kind, tmp_path, request, policy)
    handle = await start_service(store, **settings)
    metadata = AUTH if settings.get("grpc_token") else None
    await handle.stub.CreateJob(
        job_service_pb2.CreateJobRequest(job=GENERIC, job_id="long"), metadata=metadata
    )
    for i in range(64):
        await handle.stub.ReportEvent(
            progress("long", i, key=f"k{i}", message=BIG), metadata=metadata
        )
    return handle


async def page(
    handle: ServiceHandle, after: int, size: int, job_id: str = "long"
) -> job_service_pb2.ListJobEventsResponse:
    return await handle.stub.ListJobEvents(
        job_service_pb2.ListJobEventsRequest(job_id=job_id, from_sequence=after, page_size=size)
    )


async def test_pages_read_a_history_too_big_for_one_answer(
    store_kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    handle = await big_history(store_kind, tmp_path, request)
    try:
        # Without page_size: as before, the newest that fit and a gap before them.
        whole = await handle.stub.ListJobEvents(job_service_pb2.ListJobEventsRequest(job_id="long"))
        assert whole.events[0].sequence > 1 and whole.HasField("gap") and not whole.more

        seen: list[int] = []
        after, answers = 0, 0
        while True:
            reply = await page(handle, after, 1000)
            answers += 1
            assert reply.ByteSize() <= ANSWER_BYTES
            assert not reply.HasField("gap")
            seen += [e.sequence for e in reply.events]
            assert all(e.progress.message == BIG for e in reply.events)
            if not reply.more:
                break
            after = reply.events[-1].sequence
        assert seen == list(range(1, 65)) and answers == 2

        first = await page(handle, 0, 10)
        assert [e.sequence for e in first.events] == list(range(1, 11)) and first.more
        last = await page(handle, 60, 10)
        assert [e.sequence for e in last.events] == [61, 62, 63, 64] and not last.more
        past = await page(handle, 64, 10)
        assert list(past.events) == [] and not past.more and not past.HasField("gap")
    finally:
        await handle.close()


async def test_a_page_after_pruned_events_starts_with_the_gap(service: ServiceHandle) -> None:
    """The service fixture keeps 16 events: a page from 0 says where they start."""
    await create(service.stub, job_id="pruned")
    for i in range(40):
        await service.stub.ReportEvent(progress("pruned", i, key=f"p{i}"))
    reply = await page(service, 0, 5, "pruned")
    assert (reply.gap.requested_sequence, reply.gap.oldest_available_sequence) == (0, 25)
    assert [e.sequence for e in reply.events] == [25, 26, 27, 28, 29] and reply.more


@pytest.mark.parametrize("size", [-1, 1001])
async def test_a_page_size_out_of_range_is_refused_by_name(
    service: ServiceHandle, size: int
) -> None:
    await create(service.stub, job_id="bounds")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await page(service, 0, size, "bounds")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_size" in (err.value.details() or "")


async def test_client_job_events_and_a_watch_fill_page_through(
    store_kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    handle = await big_history(store_kind, tmp_path, request)
    try:
        async with Client(handle.target, retry=FAST, watch_backoff=QUICK_WATCH) as client:
            items = [item async for item in client.job_events("long")]
            assert all(isinstance(i, event_pb2.JobEvent) for i in items)
            assert [i.sequence for i in items] == list(range(1, 65))  # type: ignore[union-attr]
            tail = [item async for item in client.job_events("long", 50, page_size=4)]
            assert [i.sequence for i in tail] == list(range(51, 65))  # type: ignore[union-attr]

            # What a watch fills in when an event arrives past the ones it has seen
            # (a coalesced progress with every_event=True): every one of them.
            watch = client.watch_job("long", every_event=True)
            assert isinstance(watch, JobWatch)
            filled = [item async for item in watch._fill(65)]
            assert [getattr(i, "sequence", None) for i in filled] == list(range(1, 65))
    finally:
        await handle.close()


async def test_a_watch_worker_replays_a_history_too_big_for_one_answer(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A watch worker reads a job's retained events from the service with ListJobEvents:
    before pages it got the newest 3 MiB and told its watchers that older ones were
    gone. Every stream, on whichever process, now replays all 64."""
    handle = await big_history(
        "embedded", tmp_path, request, watch_workers=WORKERS, grpc_token=TOKEN
    )
    try:
        await workers_up(handle)
        async with own_connections(handle, CONNECTIONS) as channels:
            stubs = [job_service_pb2_grpc.JobServiceStub(ch) for ch in channels]
            await until_serving(stubs, "long")
            for stub in stubs:
                call = stub.WatchJob(job_service_pb2.WatchJobRequest(id="long"), metadata=AUTH)
                try:
                    assert (await read(call)).snapshot.sequence == 64
                    replay = [(await read(call)) for _ in range(64)]
                    assert [r.WhichOneof("item") for r in replay] == ["event"] * 64
                    assert [r.event.sequence for r in replay] == list(range(1, 65))
                finally:
                    call.cancel()
    finally:
        await handle.close()


class _PrunesAfterTheFirstPage:
    """The real stub; right after the first ListJobEvents page, 20 more events arrive
    and push the rest of that page's successors out of the 16 retained."""

    def __init__(self, stub: job_service_pb2_grpc.JobServiceAsyncStub, job_id: str) -> None:
        self._stub = stub
        self._job_id = job_id
        self.pages = 0

    async def ListJobEvents(  # the stub's method name
        self, request: job_service_pb2.ListJobEventsRequest, **kwargs: Any
    ) -> job_service_pb2.ListJobEventsResponse:
        reply: job_service_pb2.ListJobEventsResponse = await self._stub.ListJobEvents(
            request, **kwargs
        )
        self.pages += 1
        if self.pages == 1:
            for i in range(20):
                await self._stub.ReportEvent(progress(self._job_id, 50 + i, key=f"late{i}"))
        return reply


async def test_a_watch_workers_read_stays_contiguous_when_pages_straddle_a_prune(
    service: ServiceHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Events pruned between two pages: the worker's read keeps the contiguous newer
    part (its caller then announces the gap), never older events, a hole and newer."""
    from service import watch_worker

    await create(service.stub, job_id="straddle")
    for i in range(16):
        await service.stub.ReportEvent(progress("straddle", i, key=f"s{i}"))
    monkeypatch.setattr(watch_worker, "EVENTS_PAGE", 4)
    stub = _PrunesAfterTheFirstPage(service.stub, "straddle")
    events = await watch_worker.PrimaryReads(stub, ()).events_after("straddle", 0)
    assert stub.pages > 2
    assert [e.sequence for e in events] == list(range(21, 37))


class _WritesAfterGetJob:
    """The real stub; two events arrive right after each GetJob answer."""

    def __init__(self, stub: job_service_pb2_grpc.JobServiceAsyncStub, job_id: str) -> None:
        self._stub = stub
        self._job_id = job_id
        self.ListJobEvents = stub.ListJobEvents
        self.writes = 0

    async def GetJob(  # the stub's method name
        self, request: job_service_pb2.GetJobRequest, **kwargs: Any
    ) -> Any:
        reply = await self._stub.GetJob(request, **kwargs)
        for _ in range(2):
            self.writes += 1
            await self._stub.ReportEvent(progress(self._job_id, 80, key=f"between{self.writes}"))
        return reply


async def test_a_watch_workers_job_and_events_end_at_the_same_sequence(
    service: ServiceHandle,
) -> None:
    """The worker reads a job and its events with two calls: events written between
    them are left out (they come live), as the stores' one-snapshot read has it."""
    from service import watch_worker

    await create(service.stub, job_id="between")
    for i in range(3):
        await service.stub.ReportEvent(progress("between", i, key=f"b{i}"))
    stub = _WritesAfterGetJob(service.stub, "between")
    found = await watch_worker.PrimaryReads(stub, ()).get_with_events("between", 0)
    assert found is not None and stub.writes == 2
    record, events = found
    assert record.job.sequence == 3
    assert [e.sequence for e in events] == [1, 2, 3]
