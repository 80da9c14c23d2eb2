"""Sequence numbers never jump silently: gap messages and coalesced ranges (both stores)."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from jobwire.v1 import event_pb2, job_pb2, job_service_pb2, job_service_pb2_grpc
from service import metrics
from tests.conftest import ServiceHandle, make_policy, open_test_store, start_service
from tests.helpers import completed, create, progress, read, read_all

RETENTION = 16  # the `service` fixture's event_retention


async def _report_many(service: ServiceHandle, job_id: str, count: int, start: int = 1) -> None:
    for i in range(start, start + count):
        await service.stub.ReportEvent(progress(job_id, i % 100, key=f"{job_id}-{i}"))


async def test_resume_below_the_retention_floor_gets_a_gap_then_a_consistent_view(
    service: ServiceHandle,
) -> None:
    await create(service.stub, job_id="old")
    await _report_many(service, "old", 30)
    before = metrics.STREAM_GAPS.labels("WatchJob")._value.get()
    call = service.stub.WatchJob(job_service_pb2.WatchJobRequest(id="old", from_sequence=3))
    snapshot = (await read(call)).snapshot
    assert snapshot.sequence == 30
    gap = (await read(call)).gap  # right after the snapshot: events 4..14 are gone
    oldest = 30 - RETENTION + 1
    assert (gap.job_id, gap.requested_sequence, gap.oldest_available_sequence) == (
        "old",
        3,
        oldest,
    )
    replayed = [(await read(call)).event for _ in range(RETENTION)]
    assert [e.sequence for e in replayed] == list(range(oldest, 31))  # no jump after the gap
    assert replayed[-1].progress == snapshot.progress  # the replay ends where the snapshot is
    await service.stub.ReportEvent(progress("old", 99, key="live"))
    await service.stub.ReportEvent(completed("old"))
    rest = await read_all(call)
    assert [(i.WhichOneof("item"), i.event.sequence) for i in rest] == [
        ("event", 31),
        ("event", 32),
    ]
    assert rest[-1].event.state == job_pb2.JOB_STATE_SUCCEEDED
    assert metrics.STREAM_GAPS.labels("WatchJob")._value.get() == before + 1

    # Resuming from inside the retained window: no gap.
    inside = await read_all(
        service.stub.WatchJob(job_service_pb2.WatchJobRequest(id="old", from_sequence=25))
    )
    assert [i.WhichOneof("item") for i in inside] == ["snapshot"] + ["event"] * 7
    assert [i.event.sequence for i in inside[1:]] == list(range(26, 33))


async def test_list_job_events_says_where_the_retained_events_start(
    service: ServiceHandle,
) -> None:
    await create(service.stub, job_id="lst")
    await _report_many(service, "lst", 20)
    page = await service.stub.ListJobEvents(
        job_service_pb2.ListJobEventsRequest(job_id="lst", from_sequence=2)
    )
    assert page.HasField("gap")
    assert (page.gap.requested_sequence, page.gap.oldest_available_sequence) == (2, 5)
    assert [e.sequence for e in page.events] == list(range(5, 21))
    for from_sequence in (4, 10, 20):
        page = await service.stub.ListJobEvents(
            job_service_pb2.ListJobEventsRequest(job_id="lst", from_sequence=from_sequence)
        )
        assert not page.HasField("gap"), from_sequence
        assert [e.sequence for e in page.events] == list(range(from_sequence + 1, 21))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await service.stub.ListJobEvents(
            job_service_pb2.ListJobEventsRequest(job_id="lst", from_sequence=-1)
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "from_sequence" in (err.value.details() or "")


async def test_list_job_events_stays_under_the_message_limit(
    store_kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A video worker may report 64 KiB messages; the 64 events a job keeps by default
    were then 4.2 MiB, past gRPC's default 4 MiB (and any retention above 120 past the
    8 MiB of jobwire's own clients): ListJobEvents failed with RESOURCE_EXHAUSTED, the
    job's dashboard page and Secretary poll with it. It now answers the newest events
    that fit in 3 MiB, with a gap saying where they start, as for events no longer kept."""
    policy = dataclasses.replace(make_policy(), retention=64)
    handle = await start_service(await open_test_store(store_kind, tmp_path, request, policy))
    try:
        await create(handle.stub, job_id="long")
        for i in range(64):
            await handle.stub.ReportEvent(progress("long", i, key=f"k{i}", message="m" * 65536))
        page = await handle.stub.ListJobEvents(job_service_pb2.ListJobEventsRequest(job_id="long"))
        assert page.ByteSize() <= 3 * 1024 * 1024
        first = page.events[0].sequence
        assert [e.sequence for e in page.events] == list(range(first, 65)) and first > 1
        assert (page.gap.requested_sequence, page.gap.oldest_available_sequence) == (0, first)
        small = await handle.stub.ListJobEvents(
            job_service_pb2.ListJobEventsRequest(job_id="long", from_sequence=60)
        )
        assert [e.sequence for e in small.events] == [61, 62, 63, 64]
        assert not small.HasField("gap")
    finally:
        await handle.close()


async def test_a_resume_past_the_jobs_last_sequence_is_told_where_the_job_is(
    service: ServiceHandle,
) -> None:
    """A from_sequence past the job's newest (a client that followed another database, or
    the service restored from an older backup) got the snapshot and then nothing: every
    new event up to that sequence, the terminal one too, was dropped as already seen. It
    now gets the snapshot, then a gap going back (oldest_available_sequence <=
    requested_sequence: what follows starts right after the snapshot), then every event."""
    await create(service.stub, job_id="ahead")
    await _report_many(service, "ahead", 3)
    call = service.stub.WatchJob(job_service_pb2.WatchJobRequest(id="ahead", from_sequence=10))
    assert (await read(call)).snapshot.sequence == 3
    gap = (await read(call)).gap
    assert (gap.job_id, gap.requested_sequence, gap.oldest_available_sequence) == ("ahead", 10, 4)
    await service.stub.ReportEvent(progress("ahead", 50, key="ahead-live"))
    await service.stub.ReportEvent(completed("ahead"))
    rest = await read_all(call)
    assert [(i.WhichOneof("item"), i.event.sequence) for i in rest] == [("event", 4), ("event", 5)]

    page = await service.stub.ListJobEvents(
        job_service_pb2.ListJobEventsRequest(job_id="ahead", from_sequence=9)
    )
    assert (page.gap.requested_sequence, page.gap.oldest_available_sequence) == (9, 6)
    assert list(page.events) == []
    # A finished job: the snapshot and the gap, then the stream ends.
    done = await read_all(
        service.stub.WatchJob(job_service_pb2.WatchJobRequest(id="ahead", from_sequence=7))
    )
    assert [i.WhichOneof("item") for i in done] == ["snapshot", "gap"]
    assert (done[1].gap.requested_sequence, done[1].gap.oldest_available_sequence) == (7, 6)


@pytest.fixture
async def tiny_buffer_service(
    store_kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[ServiceHandle]:
    """A service whose watchers buffer 4 events: a watcher that does not read is slow."""
    store = await open_test_store(store_kind, tmp_path, request, make_policy())
    handle = await start_service(store, watch_buffer=4, event_retention=16)
    yield handle
    await handle.close()


async def test_a_slow_watchers_coalesced_events_name_what_they_cover(
    tiny_buffer_service: ServiceHandle,
) -> None:
    service = tiny_buffer_service
    await create(service.stub, job_id="slow")
    call = service.stub.WatchJob(job_service_pb2.WatchJobRequest(id="slow"))
    assert (await read(call)).HasField("snapshot")
    before = metrics.COALESCED_DELIVERIES.labels("WatchJob")._value.get()
    # The watcher reads nothing while 600 large progress events are committed: far
    # more than its 4-event buffer and the transport's flow-control window hold.
    big = "x" * 4000
    total = 600
    for start in range(1, total + 1, 100):
        requests = [
            progress("slow", i % 100, key=f"s{i}", message=big) for i in range(start, start + 100)
        ]
        await service.stub.BatchReportEvents(
            job_service_pb2.BatchReportEventsRequest(requests=requests)
        )
    await service.stub.ReportEvent(completed("slow"))
    items = await read_all(call)
    delivered = [i.event for i in items]
    assert all(i.WhichOneof("item") == "event" for i in items)
    assert delivered[-1].type == event_pb2.EVENT_TYPE_COMPLETED
    assert delivered[-1].coalesced_from_sequence == 0  # a terminal event is never coalesced
    # Every sequence 1..total+1 is accounted for exactly once: delivered, or named by
    # the coalesced event that stands for it.
    covered: list[int] = []
    for event in delivered:
        start = event.coalesced_from_sequence or event.sequence
        assert start <= event.sequence
        if event.coalesced_from_sequence:
            assert event.type == event_pb2.EVENT_TYPE_PROGRESS
        covered += range(start, event.sequence + 1)
    assert covered == list(range(1, total + 2))
    coalesced = [e for e in delivered if e.coalesced_from_sequence]
    assert coalesced, "the watcher was never slow enough to coalesce"
    assert len(delivered) < total + 1
    after = metrics.COALESCED_DELIVERIES.labels("WatchJob")._value.get()
    assert after - before == len(coalesced)
    # A reconnect from the last sequence replays the retained events, uncoalesced.
    replay = await read_all(
        service.stub.WatchJob(job_service_pb2.WatchJobRequest(id="slow", from_sequence=total - 3))
    )
    assert [i.event.sequence for i in replay[1:]] == list(range(total - 2, total + 2))
    assert not any(i.event.coalesced_from_sequence for i in replay[1:])


async def test_a_job_s_first_event_says_when_it_was_created_even_coalesced(
    store_kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """`job_create_time` is on a job's first event only, and on the coalesced event that
    stands for it: a firehose watcher that fell behind (no log to catch up from) still
    learns when a job it meets there was created (the dashboard shows it)."""
    policy = make_policy()
    policy.firehose_retention_ns = 0
    store = await open_test_store(store_kind, tmp_path, request, policy)
    service = await start_service(store, watch_buffer=4)
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(service.close)
        await create(service.stub, job_id="busy")
        # Without BDP probes the client's receive window stays at 64 KiB: a watcher that
        # reads nothing holds the service's writes after a few large events.
        channel = grpc.aio.insecure_channel(service.target, options=[("grpc.http2.bdp_probe", 0)])
        stack.push_async_callback(channel.close)
        watcher = job_service_pb2_grpc.JobServiceStub(channel)
        call = watcher.WatchJobs(job_service_pb2.WatchJobsRequest())
        assert ("jobwire-live", "1") in list(await call.initial_metadata())
        big = "x" * 4000  # the watcher reads nothing meanwhile: it falls behind
        for start in range(1, 601, 100):
            requests = [
                progress("busy", i % 100, key=f"b{i}", message=big)
                for i in range(start, start + 100)
            ]
            await service.stub.BatchReportEvents(
                job_service_pb2.BatchReportEventsRequest(requests=requests)
            )
        await create(service.stub, job_id="late")
        requests = [progress("late", i, key=f"l{i}") for i in range(1, 6)]
        await service.stub.BatchReportEvents(
            job_service_pb2.BatchReportEventsRequest(requests=requests)
        )
        await service.stub.ReportEvent(completed("late"))
        late: list[event_pb2.JobEvent] = []
        while not late or late[-1].type != event_pb2.EVENT_TYPE_COMPLETED:
            event = (await read(call)).event
            if event.job_id == "late":
                late.append(event)
        call.cancel()
        job = await service.stub.GetJob(job_service_pb2.GetJobRequest(id="late"))
        assert late[0].coalesced_from_sequence == 1, "the watcher was not slow enough"
        assert late[0].job_create_time == job.create_time
        assert not any(e.HasField("job_create_time") for e in late[1:])
        stored = await service.stub.ListJobEvents(
            job_service_pb2.ListJobEventsRequest(job_id="late")
        )
        assert stored.events[0].job_create_time == job.create_time
        assert not any(e.HasField("job_create_time") for e in stored.events[1:])


async def test_a_watcher_that_cannot_heal_from_the_ring_is_told_so(mongo_uri: str) -> None:
    """Across replicas: feed entries lost while more than a ring's worth of events is
    committed. The watcher on B cannot heal; its stream ends with ABORTED and the
    reconnect gets a fresh snapshot, then the gap."""
    import uuid

    from service.store.mongo import MongoStore

    database = f"g_{uuid.uuid4().hex[:12]}"
    replicas = [
        await start_service(
            MongoStore(mongo_uri, policy=make_policy(), database=database),
            event_feed=True,
            watch_resync_seconds=0.3,
        )
        for _ in range(2)
    ]
    a, b = replicas
    try:
        await create(a.stub, job_id="far")
        call = b.stub.WatchJob(job_service_pb2.WatchJobRequest(id="far"))
        assert (await read(call)).HasField("snapshot")
        await a.stub.ReportEvent(progress("far", 1, key="far-1"))
        assert (await read(call)).event.sequence == 1
        relay = a.running.jobs.relay
        assert relay is not None
        send = relay.send
        relay.send = lambda events: None  # type: ignore[method-assign]  # entries lost
        # Sequences 2..21 in one call (one commit): reported one by one, a resync of B
        # between them (0.3 s, under load) healed from a ring that still reached back.
        requests = [progress("far", i, key=f"far-{i}") for i in range(2, RETENTION + 6)]
        await a.stub.BatchReportEvents(job_service_pb2.BatchReportEventsRequest(requests=requests))
        relay.send = send  # type: ignore[method-assign]
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await read(call)
        assert err.value.code() == grpc.StatusCode.ABORTED
        resumed = b.stub.WatchJob(job_service_pb2.WatchJobRequest(id="far", from_sequence=1))
        assert (await read(resumed)).snapshot.sequence == RETENTION + 5
        gap = (await read(resumed)).gap
        assert (gap.requested_sequence, gap.oldest_available_sequence) == (1, 6)
        assert (await read(resumed)).event.sequence == 6
        resumed.cancel()
    finally:
        await b.close()
        await a.close()
