"""A burst of watch streams: each gets its snapshot or an explicit RESOURCE_EXHAUSTED
with a retry hint; none is dropped with a bare CANCELLED (README "Watchers")."""

from __future__ import annotations

import asyncio
import collections
from typing import Any

import grpc
import pytest

from jobwire.v1 import job_service_pb2, job_service_pb2_grpc
from service.store.port import Store
from tests.conftest import ServiceHandle, start_service
from tests.helpers import WAIT, create, progress, read

PER_CONNECTION = 100


async def first_outcome(call: Any) -> str:
    """ "snapshot", or the status code that ended the stream before one."""
    try:
        item = await read(call, 6 * WAIT)
    except grpc.aio.AioRpcError as exc:
        return exc.code().name
    return "snapshot" if item is not grpc.aio.EOF and item.HasField("snapshot") else repr(item)


def retry_hint_ms(exc: grpc.aio.AioRpcError) -> int:
    return int(dict(exc.trailing_metadata() or ())["retry-after-ms"])


@pytest.fixture
async def limited(store: Store) -> Any:
    handle = await start_service(store, max_watchers=1000)
    yield handle
    await handle.close()


async def test_burst_beyond_the_limit_is_refused_explicitly(limited: ServiceHandle) -> None:
    # 1,200 opens at once, more than gRPC core's default backlog of 1,000 unaccepted
    # calls (past which it cancels calls at random without a word).
    job = (await create(limited.stub)).job
    own = [("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.insecure_channel(limited.target, options=own) for _ in range(12)]
    try:
        stubs = [job_service_pb2_grpc.JobServiceStub(ch) for ch in channels]
        calls = [
            stubs[i // PER_CONNECTION].WatchJob(job_service_pb2.WatchJobRequest(id=job.id))
            for i in range(1200)
        ]
        outcomes = await asyncio.gather(*(first_outcome(c) for c in calls))
        assert collections.Counter(outcomes) == {"snapshot": 1000, "RESOURCE_EXHAUSTED": 200}

        refused = [c for c, o in zip(calls, outcomes, strict=True) if o != "snapshot"]
        exc = await _error(refused[0])
        assert "JOBWIRE_MAX_WATCHERS" in (exc.details() or "")
        hints = [retry_hint_ms(await _error(c)) for c in refused]
        assert all(1000 <= h < 2000 for h in hints), hints
        assert len(set(hints)) > 1  # jittered: refused watchers do not return together

        # The admitted ones are live; once some leave, a refused watcher gets in.
        await limited.stub.ReportEvent(progress(job.id, 10, key="p1"))
        admitted = [c for c, o in zip(calls, outcomes, strict=True) if o == "snapshot"]
        events = await asyncio.gather(*(read(c, 6 * WAIT) for c in admitted[:50]))
        assert {e.event.idempotency_key for e in events} == {"p1"}
        for c in admitted[:10]:
            c.cancel()
        assert await _open_when_admitted(stubs[0], job.id) == "snapshot"
    finally:
        for ch in channels:
            await ch.close()


async def test_watch_jobs_counts_against_the_same_limit(store: Store) -> None:
    handle = await start_service(store, max_watchers=2)
    try:
        job = (await create(handle.stub)).job
        firehoses = [handle.stub.WatchJobs(job_service_pb2.WatchJobsRequest()) for _ in range(2)]

        async def keep_reporting() -> None:  # until both streams are surely subscribed
            for i in range(1000):
                await handle.stub.ReportEvent(progress(job.id, i % 100, key=f"p{i}"))
                await asyncio.sleep(0.1)  # the probes' pace, not a synchronisation

        reporter = asyncio.create_task(keep_reporting())
        try:
            for call in firehoses:  # both admitted: they see events
                assert (await read(call)).HasField("event")
        finally:
            reporter.cancel()
        third = handle.stub.WatchJobs(job_service_pb2.WatchJobsRequest())
        assert (await _error(third)).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        watch = handle.stub.WatchJob(job_service_pb2.WatchJobRequest(id=job.id))
        assert await first_outcome(watch) == "RESOURCE_EXHAUSTED"
    finally:
        await handle.close()


async def _error(call: Any) -> grpc.aio.AioRpcError:
    try:
        await read(call)
    except grpc.aio.AioRpcError as exc:
        return exc
    raise AssertionError("the stream was not refused")


async def _open_when_admitted(stub: Any, job_id: str) -> str:
    """Opens a watch, retrying after each refusal's hint, until admitted (or WAIT*6)."""
    async with asyncio.timeout(6 * WAIT):
        while True:
            call = stub.WatchJob(job_service_pb2.WatchJobRequest(id=job_id))
            outcome = await first_outcome(call)
            if outcome != "RESOURCE_EXHAUSTED":
                call.cancel()
                return outcome
            # The client honours the refusal's retry hint: a pace, not a synchronisation.
            await asyncio.sleep(retry_hint_ms(await _error(call)) / 1000)


async def test_firehose_routes_each_event_to_exactly_the_matching_subscriptions() -> None:
    # Fanout indexes WatchJobs subscriptions by (kind, state); every combination of
    # filter and event must reach exactly those whose filter matches it.
    from jobwire.v1 import event_pb2, job_pb2
    from service.fanout import Fanout

    kinds = [job_pb2.JOB_KIND_UNSPECIFIED, job_pb2.JOB_KIND_VIDEO, job_pb2.JOB_KIND_BATCH]
    state_sets: list[tuple[job_pb2.JobState.ValueType, ...]] = [
        (),
        (job_pb2.JOB_STATE_RUNNING,),
        (job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_FAILED),
    ]
    fanout = Fanout(capacity=64)
    subs = [fanout.subscribe(kind=k, states=s) for k in kinds for s in state_sets]
    gone = fanout.subscribe(kind=job_pb2.JOB_KIND_VIDEO)
    fanout.unsubscribe(gone)
    events = [
        event_pb2.JobEvent(job_id=f"j{k}-{st}", kind=k, state=st, sequence=1)
        for k in kinds[1:]
        for st in (job_pb2.JOB_STATE_RUNNING, job_pb2.JOB_STATE_SUCCEEDED)
    ]
    fanout.publish(events)
    for sub in subs:
        want = [e.job_id for e in events if sub.matches(e)]
        got = [e.job_id for e, _ in await sub.next_batch()] if sub.pending() else []
        assert got == want, (sub.kind, sorted(sub.states))
    assert gone.pending() == 0
    assert fanout.watchers == len(subs)


async def test_anchored_firehose_streams_get_only_matching_events_with_the_watermark() -> None:
    # With an anchored origin a lossless (cursor-keeping) subscription receives only the
    # events its filter matches, each with the contiguous publish watermark; without an
    # anchor it receives every event (its cursor must see them all).
    from jobwire.v1 import event_pb2, job_pb2
    from service.fanout import Fanout

    video, batch = job_pb2.JOB_KIND_VIDEO, job_pb2.JOB_KIND_BATCH
    running = job_pb2.JOB_STATE_RUNNING

    def ev(n: int, kind: job_pb2.JobKind.ValueType) -> event_pb2.JobEvent:
        return event_pb2.JobEvent(job_id=f"j{n}", kind=kind, state=running, sequence=1)

    fanout = Fanout(capacity=64)
    unanchored = fanout.subscribe(kind=video, lossless=True)
    fanout.publish([ev(1, batch), ev(2, video)], [("x", 1), ("x", 2)])
    assert [(e.job_id, w) for (e, _), w in await unanchored.next_marked_batch()] == [
        ("j1", 0),
        ("j2", 0),
    ]

    fanout.anchor("db", 10)
    routed = fanout.subscribe(kind=video, lossless=True)
    # 11 and 13 published, 12 late: the watermark stays at 11 until 12 arrives.
    fanout.publish([ev(11, batch), ev(13, video)], [("db", 11), ("db", 13)])
    fanout.publish([ev(12, video), ev(14, batch), ev(15, video)], [("db", n) for n in (12, 14, 15)])
    got = [(e.job_id, pos, w) for (e, pos), w in await routed.next_marked_batch()]
    assert got == [("j13", ("db", 13), 11), ("j12", ("db", 12), 13), ("j15", ("db", 15), 15)]


async def test_watchers_opened_during_a_stream_of_events_miss_nothing(
    service: ServiceHandle,
) -> None:
    # Watchers opened together share one snapshot read (service/watch_reads.py).
    # Opened in waves of 50 while events are being committed, every watcher sees the
    # sequences after its snapshot contiguously, up to the last event.
    job = (await create(service.stub)).job
    own = [("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.insecure_channel(service.target, options=own) for _ in range(3)]
    events = 60
    final = job.sequence + events

    async def watcher(stub: Any) -> list[int]:
        call = stub.WatchJob(job_service_pb2.WatchJobRequest(id=job.id))
        first = await read(call, 6 * WAIT)
        seen = [first.snapshot.sequence]
        while max(seen) < final:
            item = await read(call, 6 * WAIT)
            if item.HasField("event"):
                seen.append(item.event.sequence)
        call.cancel()
        return seen

    async def reporter() -> None:
        for i in range(events):
            await service.stub.ReportEvent(progress(job.id, i, key=f"p{i}"))

    try:
        stubs = [job_service_pb2_grpc.JobServiceStub(ch) for ch in channels]
        reporting = asyncio.create_task(reporter())
        waves = []
        for wave in range(6):
            waves += [asyncio.create_task(watcher(stubs[i % 3])) for i in range(50)]
            await asyncio.sleep(0.01 * wave)  # load spread over time, not a sync point
        await reporting
        for seen in await asyncio.gather(*waves):
            snapshot, replayed = seen[0], seen[1:]
            live = [s for s in replayed if s > snapshot]
            assert live == list(range(snapshot + 1, final + 1)), seen
    finally:
        for ch in channels:
            await ch.close()


async def test_a_watcher_subscribing_after_the_feed_broke_is_ended_not_left_waiting() -> None:
    # A watch worker ends its watchers when its feed from the service breaks (events
    # published meanwhile never reach it). A WatchJob that passed the feed check just
    # before the break subscribed after close_all(): it stayed open, and a terminal
    # event in the outage never came. Until the feed reopens, a new subscription ends
    # at once (UNAVAILABLE: the client resumes from its last sequence).
    from jobwire.v1 import event_pb2
    from service.fanout import Fanout, SubscriptionClosed

    fanout = Fanout(capacity=4)
    fanout.close_all()  # the feed broke
    late = fanout.subscribe(job_id="j")
    with pytest.raises(SubscriptionClosed) as closed:
        await asyncio.wait_for(late.next_batch(), WAIT)
    assert closed.value.shutting_down
    fanout.reopen()  # the feed is open again
    sub = fanout.subscribe(job_id="j")
    fanout.publish([event_pb2.JobEvent(job_id="j", sequence=1)])
    assert [e.sequence for e, _ in await asyncio.wait_for(sub.next_batch(), WAIT)] == [1]
