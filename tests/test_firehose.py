"""The resumable firehose: WatchJobs positions, resume exactly once, filters, gaps.

Both stores; the cross-replica case runs two services on one MongoDB database.
"""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from jobwire.v1 import event_pb2, job_pb2, job_service_pb2
from service import metrics
from service.domain.records import Policy
from service.firehose import Cursor
from service.store.mongo import MongoStore
from tests.conftest import ServiceHandle, make_policy, open_test_store, start_service
from tests.helpers import completed, create, progress, read, until

PAUSE = 2.0  # seconds the consumer stays away (see test docstring)


async def _go_live(service: ServiceHandle, call: Any) -> job_service_pb2.WatchJobsResponse:
    """Waits for the stream's live headers, then finishes one probe job: its event is
    the stream's first message."""
    headers = dict(list(await asyncio.wait_for(call.initial_metadata(), 10)))
    assert headers.get("jobwire-live") == "1"
    job_id = f"probe-{uuid.uuid4().hex[:8]}"
    await create(service.stub, job_pb2.JOB_KIND_BATCH, job_id)
    await service.stub.ReportEvent(completed(job_id))
    result: job_service_pb2.WatchJobsResponse = await read(call)
    assert result.event.job_id == job_id
    return result


async def _until(call: Any, done: Any) -> list[job_service_pb2.WatchJobsResponse]:
    """Messages until `done(received)` holds."""
    received: list[job_service_pb2.WatchJobsResponse] = []
    while not done(received):
        received.append(await read(call))
    return received


async def _traffic(service: ServiceHandle, tag: str, jobs: int = 4, steps: int = 5) -> None:
    """Callbacks of batch and video jobs, interleaved; each job ends COMPLETED."""
    ids = [
        (f"{tag}-{k}", job_pb2.JOB_KIND_BATCH if k % 2 else job_pb2.JOB_KIND_VIDEO)
        for k in range(jobs)
    ]
    for job_id, kind in ids:
        await create(service.stub, kind, job_id)
    for step in range(1, steps + 1):
        await asyncio.gather(
            *(service.stub.ReportEvent(progress(j, step * 10, key=f"{j}-{step}")) for j, _ in ids)
        )
    for job_id, _ in ids:
        await service.stub.ReportEvent(completed(job_id))


def _batch_request(after: str = "", **kw: Any) -> job_service_pb2.WatchJobsRequest:
    return job_service_pb2.WatchJobsRequest(kind=job_pb2.JOB_KIND_BATCH, after=after, **kw)


async def test_consumer_resumes_from_its_last_position_and_gets_everything_once(
    service: ServiceHandle,
) -> None:
    """A consumer stops while callbacks flow, and resumes from its last position.

    The issue's scenario stops it for 30 s; what matters is that events are committed
    while it is away and that its position is inside the retention window (24 h), not
    how long it is away, so a 2 s pause with callbacks flowing through it proves the same.
    """
    call = service.stub.WatchJobs(_batch_request())
    first = await _go_live(service, call)
    assert first.position and first.event.kind == job_pb2.JOB_KIND_BATCH
    await _traffic(service, "before")
    seen = await _until(
        call, lambda r: any(m.event.job_id == "before-3" and m.event.sequence == 6 for m in r)
    )
    last = seen[-1].position
    call.cancel()  # the consumer stops

    away = asyncio.ensure_future(_traffic(service, "away"))
    await asyncio.sleep(PAUSE)  # the consumer stays away: the time under test
    await away
    await _traffic(service, "later", jobs=2, steps=1)

    resumed = service.stub.WatchJobs(_batch_request(after=last))
    got = await _until(
        resumed, lambda r: any(m.event.job_id == "later-1" and m.event.sequence == 2 for m in r)
    )
    assert not any(m.HasField("gap") for m in got)
    pairs = [(m.event.job_id, m.event.sequence) for m in got]
    assert len(pairs) == len(set(pairs)), "an event was delivered twice"
    assert all(m.event.kind == job_pb2.JOB_KIND_BATCH for m in got)  # the filter still applies
    assert not [p for p in pairs if p[0].startswith("before")]  # all before `last` was seen
    # Every batch event committed while it was away, each once, in each job's order.
    for job_id in ("away-1", "away-3"):
        assert [s for j, s in pairs if j == job_id] == list(range(1, 7)), job_id
    assert [s for j, s in pairs if j == "later-1"] == [1, 2]
    assert all(m.position for m in got)
    assert len({m.position for m in got}) == len(got)
    resumed.cancel()


async def test_position_zero_replays_the_window_and_a_bad_position_is_refused(
    service: ServiceHandle,
) -> None:
    await _traffic(service, "w", jobs=2, steps=2)
    call = service.stub.WatchJobs(job_service_pb2.WatchJobsRequest(after="0"))
    got = await _until(call, lambda r: len(r) == 6)  # 2 jobs x (2 progress + 1 completed)
    # In commit order: each step's two callbacks are sent together, so within a step
    # either job may commit first; steps (and so sequences) never interleave.
    pairs = [(m.event.job_id, m.event.sequence) for m in got[:6]]
    assert [sorted(pairs[k : k + 2]) for k in (0, 2, 4)] == [
        [("w-0", 1), ("w-1", 1)],
        [("w-0", 2), ("w-1", 2)],
        [("w-0", 3), ("w-1", 3)],
    ]
    call.cancel()
    # 10 KiB of `[` was UNKNOWN (a RecursionError logged at ERROR); so was a number
    # JSON cannot write but Python reads, `Infinity` (or 1e400), where a count belongs
    # (an OverflowError), and a fraction or `true` was taken as one.
    forged = [
        b'{"d":{"db":Infinity}}',
        b'{"d":{},"t":1e400}',
        b'{"d":{},"x":{"db":[-Infinity]}}',
        b'{"d":{"db":1.5}}',
        b'{"d":{"db":true}}',
    ]
    for bad in (
        "nonsense",
        "v1.!!!",
        "v1.e30",
        "v1." + "W1tb" * 3000,
        *("v1." + base64.urlsafe_b64encode(body).decode() for body in forged),
    ):
        bad_call = service.stub.WatchJobs(job_service_pb2.WatchJobsRequest(after=bad))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await read(bad_call)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
        assert "after" in (err.value.details() or "")


@pytest.fixture
async def short_window(
    store_kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[ServiceHandle]:
    """A service whose firehose keeps 1 s of events."""
    policy = make_policy()
    policy.firehose_retention_ns = 1_000_000_000
    store = await open_test_store(store_kind, tmp_path, request, policy)
    handle = await start_service(store, event_retention=16)
    yield handle
    await handle.close()


async def test_resume_older_than_the_window_gets_a_gap_then_what_is_retained(
    short_window: ServiceHandle,
) -> None:
    service = short_window
    call = service.stub.WatchJobs(job_service_pb2.WatchJobsRequest(after="0"))
    await _traffic(service, "old", jobs=1, steps=1)
    old = await _until(call, lambda r: len(r) == 2)
    call.cancel()
    await _traffic(service, "expired", jobs=1, steps=1)
    await asyncio.sleep(1.5)  # both jobs' events leave the 1 s window
    before = metrics.STREAM_GAPS.labels("WatchJobs")._value.get()
    await _traffic(service, "new", jobs=1, steps=1)
    resumed = service.stub.WatchJobs(job_service_pb2.WatchJobsRequest(after=old[0].position))
    first = await read(resumed)
    assert first.HasField("gap") and not first.HasField("event")
    assert first.gap.requested_position == old[0].position
    assert first.gap.oldest_available_position
    rest = await _until(resumed, lambda r: len(r) == 2)
    assert [(m.event.job_id, m.event.sequence) for m in rest] == [("new-0", 1), ("new-0", 2)]
    assert metrics.STREAM_GAPS.labels("WatchJobs")._value.get() == before + 1
    resumed.cancel()
    # From the announced oldest position: the same events, no gap.
    again = service.stub.WatchJobs(
        job_service_pb2.WatchJobsRequest(after=first.gap.oldest_available_position)
    )
    assert [
        (m.event.job_id, m.event.sequence) for m in await _until(again, lambda r: len(r) == 2)
    ] == [
        ("new-0", 1),
        ("new-0", 2),
    ]
    again.cancel()


async def test_a_position_from_another_database_loses_no_event(
    store_kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A consumer's position from one service, used on another database (a new or
    replaced one, a restore): the embedded store's log has one origin whatever the
    database, so a position past the log's end covered the new database's entries
    and every event up to it was skipped without a word. Each start now numbers the
    log's entries from the clock, so a position from another database covers none of
    them; a position past an origin's end gets a gap, then the retained window."""
    first = await start_service(
        await open_test_store(store_kind, tmp_path / "a", request, make_policy())
    )
    try:
        await _traffic(first, "a", jobs=3, steps=3)
        call = first.stub.WatchJobs(job_service_pb2.WatchJobsRequest(after="0"))
        old = await _until(call, lambda r: len(r) == 12)  # 3 jobs x (3 progress + completed)
        call.cancel()
    finally:
        await first.close()
    other = await start_service(
        await open_test_store(store_kind, tmp_path / "b", request, make_policy())
    )
    try:
        await _traffic(other, "b", jobs=1, steps=1)  # 2 entries, fewer than the position's 12
        resumed = other.stub.WatchJobs(job_service_pb2.WatchJobsRequest(after=old[-1].position))
        reader = asyncio.ensure_future(
            _until(resumed, lambda r: sum(m.event.job_id == "c-0" for m in r) == 3)
        )
        await _traffic(other, "c", jobs=1, steps=2)
        got = await reader
        events = [(m.event.job_id, m.event.sequence) for m in got if m.HasField("event")]
        assert events == [("b-0", 1), ("b-0", 2), ("c-0", 1), ("c-0", 2), ("c-0", 3)]
        if store_kind == "embedded":  # one origin: none of the position's entries is here
            assert got[0].HasField("gap") and not got[0].HasField("event")
            assert got[0].gap.requested_position == old[-1].position
        resumed.cancel()
        # A position past the end of an origin this log has (a clock stepped back
        # between a backup's start and the position): a gap, then the retained window.
        bounds = await other.running.store.log_bounds(0)
        ahead = Cursor(done={o: newest + 1000 for o, (_, newest) in bounds.items()}).encode()
        past = other.stub.WatchJobs(job_service_pb2.WatchJobsRequest(after=ahead))
        got = await _until(past, lambda r: sum(m.event.job_id == "c-0" for m in r) == 3)
        assert got[0].HasField("gap") and got[0].gap.requested_position == ahead
        assert [(m.event.job_id, m.event.sequence) for m in got[1:]] == events
        past.cancel()
    finally:
        await other.close()


async def test_a_consumer_resumes_across_a_service_restart_exactly_once(
    store_kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The position of a consumer stopped before a restart, used after it: what was
    committed before and after the restart, each once, no gap (the embedded log's
    numbers jump at a start: no gap either)."""
    database = f"r_{uuid.uuid4().hex[:12]}"

    async def start() -> ServiceHandle:
        store = await open_test_store(store_kind, tmp_path, request, make_policy(), database)
        return await start_service(store)

    service = await start()
    try:
        await _traffic(service, "p", jobs=1, steps=1)
        call = service.stub.WatchJobs(job_service_pb2.WatchJobsRequest(after="0"))
        first = await _until(call, lambda r: len(r) == 2)
        call.cancel()
        await _traffic(service, "q", jobs=1, steps=1)  # after the position, before the stop
    finally:
        await service.close()
    service = await start()
    try:
        await _traffic(service, "s", jobs=1, steps=1)
        resumed = service.stub.WatchJobs(job_service_pb2.WatchJobsRequest(after=first[-1].position))
        got = await _until(resumed, lambda r: len(r) == 4)
        assert [(m.event.job_id, m.event.sequence) for m in got] == [
            ("q-0", 1),
            ("q-0", 2),
            ("s-0", 1),
            ("s-0", 2),
        ]
        assert not any(m.HasField("gap") for m in got)
        late = asyncio.ensure_future(read(resumed, timeout=0.5))
        await asyncio.wait({late})
        assert isinstance(late.exception(), TimeoutError)  # nothing more: none twice
        resumed.cancel()
    finally:
        await service.close()


async def test_firehose_off_keeps_live_watching_and_refuses_to_resume(
    store_kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    policy: Policy = make_policy()
    policy.firehose_retention_ns = 0
    store = await open_test_store(store_kind, tmp_path, request, policy)
    service = await start_service(store)
    try:
        call = service.stub.WatchJobs(_batch_request())
        first = await _go_live(service, call)
        assert first.event.job_id and not first.position
        call.cancel()
        refused = service.stub.WatchJobs(_batch_request(after="0"))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await read(refused)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "JOBWIRE_FIREHOSE_RETENTION" in (err.value.details() or "")
    finally:
        await service.close()


async def _live_then_event(service: ServiceHandle, request: Any) -> str:
    """The stream's headers arrive before any event, saying it is live; an event
    committed right after them reaches it (no probes needed). Returns its position."""
    call = service.stub.WatchJobs(request)
    metadata = dict(list(await asyncio.wait_for(call.initial_metadata(), 5)))
    assert metadata.get("jobwire-live") == "1"
    live_position = str(metadata.get("jobwire-position", ""))
    if live_position:
        # A resume point from before the first event: a stream reopened from it gets
        # the event below too (what a consumer dropped before its first event needs).
        assert live_position.startswith("v1.")
        again = service.stub.WatchJobs(
            job_service_pb2.WatchJobsRequest(kind=request.kind, after=live_position)
        )
    job_id = f"after-live-{uuid.uuid4().hex[:8]}"
    await create(service.stub, job_pb2.JOB_KIND_BATCH, job_id)
    await service.stub.ReportEvent(progress(job_id, 10, key="first"))
    got = await asyncio.wait_for(_until(call, lambda r: bool(r)), 5)
    assert (got[0].event.job_id, got[0].event.sequence) == (job_id, 1)
    call.cancel()
    if live_position:
        (replayed,) = await asyncio.wait_for(_until(again, lambda r: bool(r)), 5)
        assert replayed.event == got[0].event
        again.cancel()
    return got[0].position


async def test_a_stream_says_when_it_is_live(
    store_kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """With the firehose log and without it: a client that waits for the headers
    misses nothing committed after them (the dashboard's jobs pages rely on it)."""
    for retention_ns in (None, 0):
        policy: Policy = make_policy()
        if retention_ns is not None:
            policy.firehose_retention_ns = retention_ns
        store = await open_test_store(store_kind, tmp_path / str(retention_ns), request, policy)
        service = await start_service(store)
        try:
            call = service.stub.WatchJobs(_batch_request())
            headers = dict(list(await asyncio.wait_for(call.initial_metadata(), 5)))
            call.cancel()
            # A resume point where there is a log to resume from, none without.
            assert bool(headers.get("jobwire-position")) == (retention_ns is None)
            await _live_then_event(service, _batch_request())
        finally:
            await service.close()


async def test_a_resumed_stream_replays_before_its_headers_say_live(service: ServiceHandle) -> None:
    """Resumed with nothing to replay, the headers come when live, as for a new stream;
    with something to replay, they come with the first replayed event."""
    call = service.stub.WatchJobs(_batch_request())
    await asyncio.wait_for(call.initial_metadata(), 5)
    job_id = f"resume-{uuid.uuid4().hex[:8]}"
    await create(service.stub, job_pb2.JOB_KIND_BATCH, job_id)
    await service.stub.ReportEvent(progress(job_id, 10, key="first"))
    (first,) = await _until(call, lambda r: bool(r))
    call.cancel()
    position = await _live_then_event(service, _batch_request(after=first.position))
    await service.stub.ReportEvent(progress(job_id, 50, key="replayed"))
    replaying = service.stub.WatchJobs(_batch_request(after=position))
    assert ("jobwire-live", "1") not in list(await replaying.initial_metadata())
    (again,) = await _until(replaying, lambda r: bool(r))
    assert (again.event.job_id, again.event.sequence) == (job_id, 2)
    replaying.cancel()


async def test_two_replicas_resume_on_the_other_exactly_once(mongo_uri: str) -> None:
    """Callbacks through replicas A and B; a consumer of A stops, and resumes on B."""
    database = f"f_{uuid.uuid4().hex[:12]}"
    a = await start_service(
        MongoStore(mongo_uri, policy=make_policy(), database=database), event_feed=True
    )
    b = await start_service(
        MongoStore(mongo_uri, policy=make_policy(), database=database), event_feed=True
    )
    try:
        call = a.stub.WatchJobs(job_service_pb2.WatchJobsRequest())
        await _go_live(a, call)
        await create(a.stub, job_pb2.JOB_KIND_VIDEO, "x")
        for i in range(1, 7):
            await (a.stub if i % 2 else b.stub).ReportEvent(progress("x", i, key=f"x{i}"))
        seen = await _until(
            call,
            lambda r: (
                sorted(m.event.sequence for m in r if m.event.job_id == "x") == list(range(1, 7))
            ),
        )
        last = seen[-1].position
        call.cancel()
        for i in range(7, 13):
            await (a.stub if i % 2 else b.stub).ReportEvent(progress("x", i, key=f"x{i}"))
        await b.stub.ReportEvent(completed("x"))
        resumed = b.stub.WatchJobs(job_service_pb2.WatchJobsRequest(after=last))
        got = await _until(
            resumed,
            lambda r: any(
                m.event.type == event_pb2.EVENT_TYPE_COMPLETED and m.event.job_id == "x" for m in r
            ),
        )
        # Drain what may still be in flight, then check: each of 7..13 once, nothing older.
        extra = asyncio.ensure_future(read(resumed, timeout=1.0))
        await asyncio.wait({extra}, timeout=1.0)
        if extra.done() and not extra.exception():
            got.append(extra.result())
        extra.cancel()
        sequences = [m.event.sequence for m in got if m.event.job_id == "x"]
        assert sorted(sequences) == list(range(7, 14)), sequences
        resumed.cancel()
    finally:
        await b.close()
        await a.close()


async def test_log_entries_are_numbered_in_commit_order(service: ServiceHandle) -> None:
    store = service.running.store
    start = time.time_ns() - 60 * 10**9
    await _traffic(service, "n", jobs=2, steps=2)
    bounds = await store.log_bounds(start)
    assert len(bounds) == 1
    ((origin, (oldest, newest)),) = bounds.items()
    entries = await store.log_after(origin, oldest - 1, start, 1000)
    assert [e.n for e in entries] == list(range(oldest, newest + 1))
    per_job: dict[str, list[int]] = {}
    for entry in entries:
        per_job.setdefault(entry.event.job_id, []).append(entry.event.sequence)
    assert per_job == {"n-0": [1, 2, 3], "n-1": [1, 2, 3]}


@pytest.fixture
async def tiny_buffer(
    store_kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[ServiceHandle]:
    store = await open_test_store(store_kind, tmp_path, request, make_policy())
    handle = await start_service(store, watch_buffer=4)
    yield handle
    await handle.close()


async def test_a_slow_consumer_is_caught_up_from_the_log_not_coalesced(
    tiny_buffer: ServiceHandle,
) -> None:
    """Its buffer holds 16 events; 400 large ones are committed while it reads none."""
    service = tiny_buffer
    await create(service.stub, job_id="flood")
    call = service.stub.WatchJobs(job_service_pb2.WatchJobsRequest(after="0"))
    # Subscribed before the flood: else the stream starts behind and reads it all from
    # the log at once, and never has to catch up (the test raced this under load).
    await until(lambda: service.running.jobs.fanout.watchers == 1)
    big = "y" * 4000
    total = 400
    for start in range(1, total + 1, 100):
        requests = [
            progress("flood", i % 100, key=f"f{i}", message=big) for i in range(start, start + 100)
        ]
        await service.stub.BatchReportEvents(
            job_service_pb2.BatchReportEventsRequest(requests=requests)
        )
    await service.stub.ReportEvent(completed("flood"))
    got = await _until(call, lambda r: bool(r) and r[-1].event.sequence == total + 1)
    assert [m.event.sequence for m in got] == list(range(1, total + 2))  # each once, in order
    assert not any(m.event.coalesced_from_sequence for m in got)
    assert service.running.jobs.firehose.catch_ups >= 1  # it did fall behind
    call.cancel()


@pytest.mark.parametrize("traffic", [False, True])
async def test_an_event_whose_feed_entry_was_lost_reaches_the_other_replicas_stream(
    mongo_uri: str, traffic: bool
) -> None:
    """A's feed append of a job's terminal event is lost (a crash between the commit and
    the append, a failed append): B's live WatchJobs stream finds it in the log after
    JOBWIRE_WATCH_RESYNC_SECONDS of silence, or of an entry missing below those it has
    while other events keep coming, as WatchJob finds it in the ring. It was not
    delivered (a consumer waiting for the job's end waited for ever)."""
    database = f"f_{uuid.uuid4().hex[:12]}"
    a, b = [
        await start_service(
            MongoStore(mongo_uri, policy=make_policy(), database=database),
            event_feed=True,
            watch_resync_seconds=0.5,
        )
        for _ in range(2)
    ]
    try:
        ended = [job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_FAILED]
        call = b.stub.WatchJobs(job_service_pb2.WatchJobsRequest(states=ended))
        await _go_live(a, call)
        await create(a.stub, job_pb2.JOB_KIND_VIDEO, "quiet")
        await create(a.stub, job_pb2.JOB_KIND_VIDEO, "busy")
        relay = a.running.jobs.relay
        assert relay is not None
        send = relay.send
        relay.send = lambda events: None  # type: ignore[method-assign]  # entries lost
        await a.stub.ReportEvent(completed("quiet"))
        relay.send = send  # type: ignore[method-assign]
        first = asyncio.ensure_future(read(call, timeout=5))
        # Progress of another job every 0.1 s (filtered out here, but each moves the
        # stream on): never 0.5 s of silence, the lost entry missing below them.
        for step in range(40 if traffic else 0):
            if first.done():
                break
            await a.stub.ReportEvent(progress("busy", step, key=f"busy-{step}"))
            await asyncio.wait({first}, timeout=0.1)  # pacing: one event at a time
        assert first.done() or not traffic, "not found while other events kept coming"
        event = (await first).event
        assert (event.job_id, event.type) == ("quiet", event_pb2.EVENT_TYPE_COMPLETED)
        call.cancel()
    finally:
        await b.close()
        await a.close()
