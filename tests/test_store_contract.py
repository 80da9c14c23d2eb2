"""The storage port's contract, run unchanged against every adapter."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from jobwire.v1 import job_pb2, job_service_pb2, log_pb2
from service.domain import events
from service.domain.errors import Code, DomainError
from service.domain.records import Applied, Claim, JobCommand, Policy, Report, Unchanged
from service.store.port import JobQuery, Store
from tests.conftest import open_test_store


def _report(job_id: str, key: str, percent: float = 1.0) -> JobCommand:
    return JobCommand(
        job_id,
        Report(
            job_service_pb2.ReportEventRequest(
                job_id=job_id, idempotency_key=key, progress=job_pb2.Progress(percent=percent)
            )
        ),
    )


async def _new(
    store: Store, job_id: str, kind: job_pb2.JobKind.ValueType = job_pb2.JOB_KIND_GENERIC
) -> None:
    record, _ = events.new_record(job_id, kind, time.time_ns())
    await store.create(record)


async def test_create_get_and_duplicate(store: Store) -> None:
    record, token = events.new_record("a", job_pb2.JOB_KIND_BATCH, time.time_ns())
    await store.create(record)
    got = await store.get("a")
    assert got is not None and got.job == record.job and got.token_hash == record.token_hash
    assert token.encode() not in got.token_hash
    try:
        await store.create(record)
    except DomainError as err:
        assert err.code == Code.ALREADY_EXISTS
    else:
        raise AssertionError("expected ALREADY_EXISTS")
    assert await store.get("b") is None


async def test_batch_chains_commands_of_one_job_in_order(store: Store) -> None:
    await _new(store, "j")
    outcomes = await store.apply(
        [_report("j", "1", 10), _report("missing", "x"), _report("j", "2", 20), _report("j", "1")]
    )
    assert isinstance(outcomes[0], Applied) and outcomes[0].event.sequence == 1
    assert isinstance(outcomes[1], DomainError) and outcomes[1].code == Code.NOT_FOUND
    assert isinstance(outcomes[2], Applied) and outcomes[2].event.sequence == 2
    assert isinstance(outcomes[3], Unchanged) and outcomes[3].duplicate
    stored = await store.get("j")
    assert stored is not None and stored.job.sequence == 2 and stored.job.progress.percent == 20


async def test_ten_thousand_events_keep_a_bounded_record(store: Store) -> None:
    await _new(store, "busy")
    retention = store.policy.retention
    for start in range(0, 10_000, 500):
        outcomes = await store.apply([_report("busy", f"k{i}") for i in range(start, start + 500)])
        assert all(isinstance(o, Applied) for o in outcomes)
    record = await store.get("busy")
    assert record is not None and record.job.sequence == 10_000
    assert record.recent_keys == ()  # a read carries no keys: only apply needs them
    kept = await store.events_after("busy", 0)
    assert [e.sequence for e in kept] == list(range(10_001 - retention, 10_001))
    tail = await store.events_after("busy", 9_995)
    assert [e.sequence for e in tail] == [9_996, 9_997, 9_998, 9_999, 10_000]
    # The window's keys, oldest and newest, are duplicates; the one just before it
    # fell out with its event and is applied again, as is one from long ago.
    oldest, before = f"k{10_000 - retention}", f"k{10_000 - retention - 1}"
    dups = await store.apply([_report("busy", oldest), _report("busy", "k9999")])
    assert [type(o) for o in dups] == [Unchanged, Unchanged]
    (fresh, gone) = await store.apply([_report("busy", before), _report("busy", "k0")])
    assert isinstance(fresh, Applied) and isinstance(gone, Applied)


async def test_concurrent_claims_hand_out_each_job_once(store: Store) -> None:
    for i in range(60):
        await _new(store, f"v{i:02d}", job_pb2.JOB_KIND_VIDEO)

    async def worker(n: int) -> list[str]:
        got = []
        while (claim := await store.claim(job_pb2.JOB_KIND_VIDEO, f"w{n}", 10**10)) is not None:
            assert claim.event.type and claim.record.job.state == job_pb2.JOB_STATE_RUNNING
            got.append(claim.record.job.id)
        return got

    results = await asyncio.gather(*(worker(n) for n in range(8)))
    claimed = [i for r in results for i in r]
    assert sorted(claimed) == [f"v{i:02d}" for i in range(60)]
    assert await store.queue_depths() == {}


async def test_expired_leases_are_found(store: Store) -> None:
    await _new(store, "x", job_pb2.JOB_KIND_VIDEO)
    await _new(store, "y", job_pb2.JOB_KIND_VIDEO)
    assert await store.queue_depths() == {job_pb2.JOB_KIND_VIDEO: 2}
    await store.apply([JobCommand("x", Claim("w", 1))])  # 1 ns lease: lapses at once
    await store.apply([JobCommand("y", Claim("w", 10**12))])
    assert await store.expired_leases(time.time_ns(), 10) == ["x"]


async def test_list_jobs_filters_and_cursor(store: Store) -> None:
    for i in range(5):
        record, _ = events.new_record(f"l{i}", job_pb2.JOB_KIND_BATCH, 1_000 + i)
        record.job.labels["n"] = str(i % 2)
        await store.create(record)
    page = await store.list_jobs(JobQuery(limit=2))
    assert [j.id for j in page] == ["l0", "l1"]
    rest = await store.list_jobs(JobQuery(limit=10, after=(1_001, "l1")))
    assert [j.id for j in rest] == ["l2", "l3", "l4"]
    odd = await store.list_jobs(JobQuery(labels={"n": "1"}))
    assert [j.id for j in odd] == ["l1", "l3"]
    none = await store.list_jobs(JobQuery(kind=job_pb2.JOB_KIND_VIDEO))
    assert none == []
    # Newest first: the same jobs backwards, the cursor counting down.
    newest = await store.list_jobs(JobQuery(limit=2, newest_first=True))
    assert [j.id for j in newest] == ["l4", "l3"]
    older = await store.list_jobs(JobQuery(limit=10, after=(1_003, "l3"), newest_first=True))
    assert [j.id for j in older] == ["l2", "l1", "l0"]
    odd_newest = await store.list_jobs(JobQuery(labels={"n": "1"}, newest_first=True))
    assert [j.id for j in odd_newest] == ["l3", "l1"]


async def test_newest_first_breaks_create_time_ties_by_id_backwards(store: Store) -> None:
    """Jobs one batch created share a create time: newest first is exactly the reverse
    of oldest first, ties included, and pages by the cursor lose or repeat none."""
    for job_id in ("t-b", "t-a", "t-c"):
        record, _ = events.new_record(job_id, job_pb2.JOB_KIND_BATCH, 5_000)
        await store.create(record)
    record, _ = events.new_record("t-0", job_pb2.JOB_KIND_BATCH, 4_000)
    await store.create(record)
    oldest = [j.id for j in await store.list_jobs(JobQuery())]
    assert oldest == ["t-0", "t-a", "t-b", "t-c"]
    paged: list[str] = []
    after: tuple[int, str] | None = None
    while True:
        page = await store.list_jobs(JobQuery(limit=1, after=after, newest_first=True))
        if not page:
            break
        paged.append(page[0].id)
        after = (page[0].create_time.ToNanoseconds(), page[0].id)
    assert paged == oldest[::-1]


@pytest.mark.parametrize("key", ["größe", 'say "hi"', "back\\slash", "a.b", "[0]", "$"])
async def test_list_jobs_by_a_label_with_any_printable_key(store: Store, key: str) -> None:
    """The embedded store matched labels with a JSON path built from the key: a key
    with a quote or backslash, or any non-ASCII key (stored escaped), never matched."""
    for i, value in enumerate(["v", "w"]):
        record, _ = events.new_record(f"k{i}", job_pb2.JOB_KIND_BATCH, 1_000 + i)
        record.job.labels[key] = value
        record.job.labels["other"] = "v"
        await store.create(record)
    found = await store.list_jobs(JobQuery(labels={key: "v"}))
    assert [j.id for j in found] == ["k0"]
    both = await store.list_jobs(JobQuery(labels={key: "w", "other": "v"}))
    assert [j.id for j in both] == ["k1"]


async def test_logs_order_filter_limit(store: Store) -> None:
    levels = [log_pb2.LOG_LEVEL_DEBUG, log_pb2.LOG_LEVEL_INFO, log_pb2.LOG_LEVEL_ERROR]
    for i, level in enumerate([levels[0], levels[1], levels[2], levels[1]]):
        entry = log_pb2.LogEntry(job_id="j" if i < 3 else "k", level=level, message=str(i))
        entry.time.FromSeconds(100 + (i % 3))
        await store.write_log(entry)
    assert [e.message for e in await store.list_logs("j", 0, 50)] == ["2", "1", "0"]
    assert [e.message for e in await store.list_logs("", 2, 50)] == ["1", "3"]
    assert [e.message for e in await store.list_logs("", 0, 2)] == ["2", "1"]


async def test_a_line_whose_job_is_gone_as_it_is_stored_ages_out(store: Store) -> None:
    """The caller read the job, then it was deleted (its lines with it) before the line
    was stored: the store finds no job as it writes, and the line ages out like any of
    no job. It stayed for ever: no deletion would take it."""
    await _new(store, "there")
    for job_id in ("there", "deleted-meanwhile"):
        entry = log_pb2.LogEntry(job_id=job_id, level=log_pb2.LOG_LEVEL_INFO, message=job_id)
        entry.record_time.FromNanoseconds(time.time_ns())
        await store.write_log(entry, of_no_job=False)  # both had a job when read
    assert await store.delete_jobless_logs(time.time_ns() + 1, 100) == 1
    assert [e.message for e in await store.list_logs("", 0, 50)] == ["there"]


async def test_a_log_line_with_a_key_is_stored_once(store: Store) -> None:
    """WriteLog's idempotency key: per job id; a line without one is always stored."""

    def line(job_id: str, message: str) -> log_pb2.LogEntry:
        entry = log_pb2.LogEntry(job_id=job_id, level=log_pb2.LOG_LEVEL_INFO, message=message)
        entry.record_time.FromNanoseconds(time.time_ns())
        return entry

    assert await store.write_log(line("a", "first"), key="k") is None
    earlier = await store.write_log(line("a", "again"), key="k")
    assert earlier is not None and earlier.message == "first"
    assert await store.write_log(line("b", "other job"), key="k") is None
    for _ in range(2):
        assert await store.write_log(line("a", "no key")) is None
    messages = sorted(e.message for e in await store.list_logs("", 0, 50))
    assert messages == ["first", "no key", "no key", "other job"]


async def test_a_line_whose_job_appears_as_it_is_stored_is_not_of_no_job(store: Store) -> None:
    """The mirror of the above: the caller found no job, then one of that id was made
    (CreateJob with that id, an AuroraCloud outcome) before the line was stored. The
    line is that job's: it was aged out as of no job, the job still RUNNING or QUEUED."""
    await _new(store, "appeared")
    entry = log_pb2.LogEntry(job_id="appeared", level=log_pb2.LOG_LEVEL_INFO, message="mine")
    entry.record_time.FromNanoseconds(time.time_ns())
    await store.write_log(entry, of_no_job=True)  # no job when read
    assert await store.delete_jobless_logs(time.time_ns() + 1, 100) == 0
    assert [e.message for e in await store.list_logs("appeared", 0, 50)] == ["mine"]


async def test_artifacts_stream_and_replace(store: Store) -> None:
    from jobwire.v1 import artifact_pb2

    async def chunks(parts: list[bytes]) -> AsyncIterator[bytes]:
        for p in parts:
            yield p

    await _new(store, "a")  # an artifact belongs to a job
    meta = artifact_pb2.Artifact(job_id="a", name="t.md", content_type="text/markdown")
    stored = await store.put_artifact(meta, chunks([b"hello ", b"world"]))
    assert stored.size_bytes == 11
    found = await store.open_artifact("a", "t.md")
    assert found is not None
    assert b"".join([c async for c in found[1]]) == b"hello world"
    await store.put_artifact(meta, chunks([b"v2"]))
    found = await store.open_artifact("a", "t.md")
    assert found is not None and found[0].size_bytes == 2
    assert b"".join([c async for c in found[1]]) == b"v2"
    assert [a.name for a in await store.list_artifacts("a")] == ["t.md"]
    assert await store.open_artifact("a", "missing") is None


async def test_jobs_created_by_one_batch_share_its_time(store: Store) -> None:
    """A batch is one commit at one time: jobs it creates (create_kind) share their
    create time, so ListJobs and ClaimJob order them by id on every store. MongoDB
    read the clock per command, so they came out in request order there."""

    def announce(job_id: str) -> JobCommand:
        request = job_service_pb2.ReportEventRequest(
            job_id=job_id,
            idempotency_key="k",
            create_kind=job_pb2.JOB_KIND_TRANSCODE,
            progress=job_pb2.Progress(percent=5),
        )
        return JobCommand(job_id, Report(request))

    outcomes = await store.apply([announce(i) for i in ["z", "m", "a"]])
    assert all(isinstance(o, Applied) and o.created for o in outcomes)
    jobs = await store.list_jobs(JobQuery())
    assert [j.id for j in jobs] == ["a", "m", "z"]
    assert len({j.create_time.ToNanoseconds() for j in jobs}) == 1


async def test_artifact_with_the_longest_name(store: Store) -> None:
    """Names may have 255 characters (validation.artifact_name). The embedded store
    named its file after the artifact plus a suffix, past the file system's limit of
    255 bytes a name: the upload failed (UNKNOWN, "File name too long")."""
    from jobwire.v1 import artifact_pb2

    async def chunks() -> AsyncIterator[bytes]:
        yield b"long"

    name = "n" * 255
    await _new(store, "a")
    stored = await store.put_artifact(artifact_pb2.Artifact(job_id="a", name=name), chunks())
    assert stored.size_bytes == 4
    found = await store.open_artifact("a", name)
    assert found is not None
    assert b"".join([c async for c in found[1]]) == b"long"
    assert [a.name for a in await store.list_artifacts("a")] == [name]


@pytest.mark.parametrize("before, after", [(4, 8), (8, 5)])
async def test_a_changed_retention_keeps_the_retained_events_and_keys(
    store_kind: str, tmp_path: Path, request: pytest.FixtureRequest, before: int, after: int
) -> None:
    """JOBWIRE_EVENT_RETENTION changed between two runs: a job keeps (replays and
    de-duplicates) the events the old run kept, at most the new retention of them,
    then grows to the new retention. MongoDB wrote the next event to slot `seq %
    retention` of a ring laid out for the old retention, over an event inside the
    window (a raised retention kept fewer events than before); the embedded store
    replayed events the old run had dropped but not yet deleted (it deletes in steps)
    and, after a lowered one, still took keys past it for duplicates."""
    database = f"t_{uuid.uuid4().hex[:12]}"
    old = await open_test_store(store_kind, tmp_path, request, Policy(retention=before), database)
    await old.start()
    await _new(old, "r")
    for i in range(1, 41):  # one commit each, as events usually come
        await old.apply([_report("r", f"k{i}")])
    await old.close()
    store = await open_test_store(store_kind, tmp_path, request, Policy(retention=after), database)
    await store.start()
    try:
        window = min(before, after)
        kept = [e.sequence for e in await store.events_after("r", 0)]
        assert kept == list(range(41 - window, 41))
        retried = await store.apply([_report("r", f"k{s}") for s in kept])
        assert all(isinstance(o, Unchanged) for o in retried)
        (gone,) = await store.apply([_report("r", f"k{40 - window}")])  # its event is gone
        assert isinstance(gone, Applied) and gone.event.sequence == 41
        kept = [e.sequence for e in await store.events_after("r", 0)]
        assert kept == list(range(41 - min(window, after - 1), 42))
    finally:
        await store.close()


async def test_a_second_start_of_a_started_store_is_harmless(store: Store) -> None:
    """A service handed a store its caller already started (tests, embedders) starts
    it again: that must not refuse the store's own data directory lock."""
    await store.start()
    await _new(store, "twice")
    got = await store.get("twice")
    assert got is not None and got.job.id == "twice"


async def test_a_job_and_its_events_in_one_read(store: Store) -> None:
    """get_with_events is get plus events_after in one read (ListJobEvents, a WatchJob
    open): None for an unknown job, the retained window only, no keys, and the events
    end at the job's own sequence even while events are being written."""
    await _new(store, "r")
    assert await store.get_with_events("missing", 0) is None
    assert await store.get_with_events("r", 0) == (await store.get("r"), [])
    retention = store.policy.retention
    await store.apply([_report("r", f"k{i}", 1) for i in range(retention + 4)])
    found = await store.get_with_events("r", retention + 1)
    assert found is not None
    record, retained = found
    assert record.job.sequence == retention + 4 and record.recent_keys == ()
    assert [e.sequence for e in retained] == [retention + 2, retention + 3, retention + 4]
    assert retained == await store.events_after("r", retention + 1)
    found = await store.get_with_events("r", 0)
    assert found is not None and [e.sequence for e in found[1]] == list(range(5, retention + 5))

    writing = asyncio.Event()

    async def write() -> None:
        for i in range(60):
            await store.apply([_report("r", f"w{i}", 2)])
            writing.set()

    writer = asyncio.create_task(write())
    await asyncio.wait_for(writing.wait(), 30)
    reads = 0
    while not writer.done():
        found = await store.get_with_events("r", 0)
        assert found is not None
        record, retained = found
        assert retained[-1].sequence == record.job.sequence, reads
        reads += 1
    await writer
    assert reads > 0
