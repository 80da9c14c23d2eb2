"""No silent death: progress deadlines, STALLED, the stall failure (both stores)."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from jobwire.v1 import event_pb2, job_pb2, job_service_pb2
from service.config import Settings
from service.store.mongo import MongoStore
from tests.conftest import ServiceHandle, make_policy, start_service
from tests.helpers import WAIT, progress, read, until

STALLED = event_pb2.EVENT_TYPE_STALLED


def _seconds(value: float) -> Duration:
    d = Duration()
    d.FromNanoseconds(int(value * 1e9))
    return d


async def _create(
    service: ServiceHandle, job_id: str, deadline: float = 0.0, fail_after: float = 0.0
) -> job_pb2.Job:
    job = job_pb2.Job(kind=job_pb2.JOB_KIND_BATCH)
    if deadline:
        job.progress_deadline.CopyFrom(_seconds(deadline))
    if fail_after:
        job.stall_fail_after.CopyFrom(_seconds(fail_after))
    reply = await service.stub.CreateJob(job_service_pb2.CreateJobRequest(job=job, job_id=job_id))
    return reply.job


async def _next_event(call: Any, timeout: float = WAIT) -> event_pb2.JobEvent:
    item = await read(call, timeout)
    assert item.WhichOneof("item") == "event", item
    event: event_pb2.JobEvent = item.event
    return event


def _fast_sweeps(*services: ServiceHandle) -> None:
    for service in services:
        service.running.jobs.stall_sweep_seconds = 0.05


class _Sweeps:
    """A service's stall sweeps (Jobs.mark_stalls calls) that completed, by the clock
    time each began: a check that nothing happens waits for sweeps, not for time."""

    def __init__(self, service: ServiceHandle) -> None:
        self.began: list[int] = []
        jobs = service.running.jobs
        sweep = jobs.mark_stalls

        async def counted(limit: int = 500) -> int:
            began = time.time_ns()
            changed = await sweep(limit)
            self.began.append(began)
            return changed

        jobs.mark_stalls = counted  # type: ignore[method-assign]

    def since(self, ns: int) -> int:
        """How many began at or after `ns` (time.time_ns())."""
        return sum(began >= ns for began in self.began)


async def test_deadline_passes_stalled_appears_and_a_late_callback_clears_it(
    service: ServiceHandle,
) -> None:
    _fast_sweeps(service)
    sweeps = _Sweeps(service)
    created = await _create(service, "quiet", deadline=0.5)
    assert created.progress_deadline.ToNanoseconds() == 500_000_000
    await service.stub.ReportEvent(progress("quiet", 10))
    call = service.stub.WatchJob(job_service_pb2.WatchJobRequest(id="quiet", from_sequence=1))
    assert (await read(call)).snapshot.stalled is False
    stalled = await _next_event(call)
    assert (stalled.type, stalled.sequence, stalled.state) == (
        STALLED,
        2,
        job_pb2.JOB_STATE_RUNNING,
    )
    job = await service.stub.GetJob(job_service_pb2.GetJobRequest(id="quiet"))
    assert job.stalled and job.state == job_pb2.JOB_STATE_RUNNING
    # Once per stall: more sweeps go by, no second STALLED (a negative check).
    now = time.time_ns()
    await until(lambda: sweeps.since(now) >= 10)
    events = await service.stub.ListJobEvents(job_service_pb2.ListJobEventsRequest(job_id="quiet"))
    assert [e.type for e in events.events].count(STALLED) == 1
    # The worker comes back: its callback clears the stall and restarts the deadline.
    await service.stub.ReportEvent(progress("quiet", 20))
    back = await _next_event(call)
    assert back.type == event_pb2.EVENT_TYPE_PROGRESS and back.sequence == 3
    job = await service.stub.GetJob(job_service_pb2.GetJobRequest(id="quiet"))
    assert not job.stalled
    assert job.last_event_time.ToNanoseconds() >= back.create_time.ToNanoseconds()
    again = await _next_event(call)  # silent again: a new stall, a new event
    assert (again.type, again.sequence) == (STALLED, 4)
    call.cancel()


async def test_second_deadline_fails_the_job_with_stalled(service: ServiceHandle) -> None:
    _fast_sweeps(service)
    await _create(service, "dead", deadline=0.3, fail_after=0.9)
    await service.stub.ReportEvent(progress("dead", 5))
    call = service.stub.WatchJob(job_service_pb2.WatchJobRequest(id="dead", from_sequence=1))
    assert (await read(call)).HasField("snapshot")
    assert (await _next_event(call)).type == STALLED
    failed = await _next_event(call)
    assert failed.type == event_pb2.EVENT_TYPE_FAILED
    assert failed.error.code == "STALLED"
    assert await read(call) is grpc.aio.EOF  # terminal: the stream ends
    job = await service.stub.GetJob(job_service_pb2.GetJobRequest(id="dead"))
    assert job.state == job_pb2.JOB_STATE_FAILED and not job.stalled
    # A callback after the failure is refused: the terminal state is final.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await service.stub.ReportEvent(progress("dead", 6, key="late"))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_no_deadline_no_stall_and_queued_jobs_never_stall(service: ServiceHandle) -> None:
    _fast_sweeps(service)
    sweeps = _Sweeps(service)
    await _create(service, "free")
    await service.stub.ReportEvent(progress("free", 10))
    await _create(service, "waiting", deadline=0.2)  # QUEUED: nobody works on it yet
    # A negative check: sweeps go by once a 0.2 s deadline would have passed, no STALLED.
    past_the_deadline = time.time_ns() + 200_000_000
    await until(lambda: sweeps.since(past_the_deadline) >= 10)
    for job_id in ("free", "waiting"):
        events = await service.stub.ListJobEvents(
            job_service_pb2.ListJobEventsRequest(job_id=job_id)
        )
        assert STALLED not in [e.type for e in events.events], job_id


@pytest.mark.parametrize(
    ("deadline", "fail_after", "words"),
    [
        (-1.0, 0.0, "progress_deadline must be a positive duration"),
        (0.0, -2.0, "stall_fail_after must be a positive duration"),
        (10.0, 5.0, "must be longer than job.progress_deadline"),
        (400 * 86400.0, 0.0, "at most 366 days"),
    ],
)
async def test_bad_deadlines_are_refused_naming_the_field(
    service: ServiceHandle, deadline: float, fail_after: float, words: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _create(service, "bad", deadline=deadline, fail_after=fail_after)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in (err.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await service.stub.GetJob(job_service_pb2.GetJobRequest(id="bad"))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND  # nothing written


def test_per_kind_defaults_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOBWIRE_PROGRESS_DEADLINE_BATCH", "15m")
    monkeypatch.setenv("JOBWIRE_STALL_FAIL_AFTER_BATCH", "2h")
    monkeypatch.setenv("JOBWIRE_PROGRESS_DEADLINE_EXTRACTION", "90")
    monkeypatch.setenv("JOBWIRE_FIREHOSE_RETENTION", "6h")
    policy = Settings.from_env().policy()
    assert policy.progress_deadline_ns == {
        job_pb2.JOB_KIND_BATCH: 900 * 10**9,
        job_pb2.JOB_KIND_EXTRACTION: 90 * 10**9,
    }
    assert policy.stall_fail_after_ns == {job_pb2.JOB_KIND_BATCH: 7200 * 10**9}
    assert policy.firehose_retention_ns == 6 * 3600 * 10**9
    assert Settings().policy().progress_deadline_ns == {}  # off unless set
    monkeypatch.setenv("JOBWIRE_PROGRESS_DEADLINE_VIDEO", "soon")
    with pytest.raises(SystemExit, match="JOBWIRE_PROGRESS_DEADLINE_VIDEO"):
        Settings.from_env()


async def test_kind_default_applies_unless_the_job_sets_its_own(
    store_kind: str, tmp_path: Any, request: pytest.FixtureRequest
) -> None:
    from tests.conftest import open_test_store

    policy = make_policy()
    policy.progress_deadline_ns = {job_pb2.JOB_KIND_BATCH: 30 * 10**9}
    store = await open_test_store(store_kind, tmp_path, request, policy)
    service = await start_service(store)
    try:
        default = await _create(service, "d")
        assert default.progress_deadline.ToNanoseconds() == 30 * 10**9
        own = await _create(service, "o", deadline=5.0)
        assert own.progress_deadline.ToNanoseconds() == 5 * 10**9
    finally:
        await service.close()


async def test_two_replicas_exactly_one_stalled_event(mongo_uri: str) -> None:
    """Both replicas sweep every 50 ms; the conditional update lets exactly one append."""
    database = f"s_{uuid.uuid4().hex[:12]}"
    a = await start_service(
        MongoStore(mongo_uri, policy=make_policy(), database=database),
        event_feed=True,
        lease_sweep_seconds=0.05,
    )
    b = await start_service(
        MongoStore(mongo_uri, policy=make_policy(), database=database),
        event_feed=True,
        lease_sweep_seconds=0.05,
    )
    try:
        _fast_sweeps(a, b)
        sweeps = [_Sweeps(a), _Sweeps(b)]
        ids = [f"j{i}" for i in range(5)]
        for job_id in ids:
            await _create(a, job_id, deadline=0.5)
            await b.stub.ReportEvent(progress(job_id, 1))
        call = b.stub.WatchJobs(job_service_pb2.WatchJobsRequest(after="0"))
        stalls: list[str] = []
        while len(stalls) < len(ids):
            item = await read(call)
            if item.event.type == STALLED:
                stalls.append(item.event.job_id)
        # A negative check: 20 more sweeps on each replica append no second STALLED.
        now = time.time_ns()
        await until(lambda: all(s.since(now) >= 20 for s in sweeps))
        for job_id in ids:
            events = await a.stub.ListJobEvents(job_service_pb2.ListJobEventsRequest(job_id=job_id))
            assert [e.type for e in events.events] == [event_pb2.EVENT_TYPE_PROGRESS, STALLED]
        assert sorted(stalls) == ids
        # A late callback through the other replica clears it.
        await a.stub.ReportEvent(progress("j0", 50))
        job = await b.stub.GetJob(job_service_pb2.GetJobRequest(id="j0"))
        assert not job.stalled and job.sequence == 3
        call.cancel()
    finally:
        await b.close()
        await a.close()


async def test_a_repeated_progress_is_a_sign_of_life_once_half_the_deadline_is_gone(
    service: ServiceHandle,
) -> None:
    """A worker repeating the same progress (the same body, so the same key) is retrying
    while its progress deadline is fresh, and alive once half of it is gone: before, the
    repeat was a duplicate for ever and the job stalled while its worker kept reporting."""
    await _create(service, "repeats", deadline=1.0)
    same = progress("repeats", 40, key="the-same-body")
    assert (await service.stub.ReportEvent(same)).sequence == 1
    again = await service.stub.ReportEvent(same)
    assert again.duplicate and again.sequence == 1
    first = await service.stub.GetJob(job_service_pb2.GetJobRequest(id="repeats"))
    half = first.last_event_time.ToNanoseconds() + 500_000_000
    await asyncio.sleep(max(0.0, (half - time.time_ns()) / 1e9) + 0.02)  # the time under test
    renewed = await service.stub.ReportEvent(same)
    assert not renewed.duplicate and renewed.sequence == 2
    job = await service.stub.GetJob(job_service_pb2.GetJobRequest(id="repeats"))
    assert job.last_event_time.ToNanoseconds() > first.last_event_time.ToNanoseconds()
    assert not job.stalled


async def test_the_sweeper_stops_when_a_sweep_swallows_its_cancel(
    service: ServiceHandle, caplog: pytest.LogCaptureFixture
) -> None:
    """A sweep cancelled inside a driver call may not end with CancelledError: PyMongo
    can swallow it and fail on the store being closed. The sweeper, which survives any
    store error, then swept a closed store for ever (ERROR each tick, seen in CI)."""
    entered = asyncio.Event()

    async def swallows_its_cancel(limit: int = 0) -> int:
        entered.set()
        with contextlib.suppress(asyncio.CancelledError):  # what the driver did with it
            await asyncio.sleep(3600)  # a driver call that hangs until cancelled
        raise RuntimeError("MongoStore.start() was not called")

    service.running.jobs.expire_leases = swallows_its_cancel  # type: ignore[method-assign]
    await asyncio.wait_for(entered.wait(), WAIT)
    sweeper = service.running.sweeper
    sweeper.cancel()
    await asyncio.wait_for(asyncio.wait([sweeper]), WAIT)
    assert sweeper.done()
    assert not [r for r in caplog.records if "sweep failed" in r.getMessage()]
