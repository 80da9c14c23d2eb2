"""What keeps the ingest path cheap, asserted as behaviour (never as timing)."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from jobwire.v1 import job_pb2, job_service_pb2
from service.config import Settings
from service.domain import events
from service.domain.records import Applied, JobCommand, JobRecord, Policy, Report, Unchanged
from service.store import embedded
from service.store.embedded import EmbeddedStore
from service.store.factory import open_store


async def _create(store: EmbeddedStore, ids: list[str]) -> None:
    for job_id in ids:
        record, _ = events.new_record(job_id, job_pb2.JOB_KIND_GENERIC, time.time_ns())
        await store.create(record)


async def _stored_keys(store: EmbeddedStore, job_id: str) -> tuple[str, ...]:
    """A job's keys as `apply` reads them on a cache miss (`get` carries none)."""
    record = await store.get(job_id)
    assert record is not None
    async with store._write_lock:
        conn = store._writer_connection()
        keys = embedded._recent_keys(conn, {job_id: record.job.sequence}, store.policy.retention)
    return keys[job_id]


def _report(job_id: str, key: str, percent: float) -> JobCommand:
    request = job_service_pb2.ReportEventRequest(
        job_id=job_id, idempotency_key=key, progress=job_pb2.Progress(percent=percent)
    )
    return JobCommand(job_id, Report(request))


def _wal_restarts(wal: Path) -> int:
    """The WAL header's checkpoint sequence: SQLite counts each start-over of the WAL
    in it, written by the first commit after the restart."""
    with wal.open("rb") as f:
        return int.from_bytes(f.read(16)[12:16], "big")


async def _write_until_wal_restarts(store: EmbeddedStore, ids: list[str], wal: Path) -> int:
    """Reports on `ids` until a commit starts the WAL over; the number of reports."""
    first = _wal_restarts(wal)
    n = 0
    async with asyncio.timeout(60):
        while _wal_restarts(wal) == first:  # the checkpointer runs every 0.25 s
            outcomes = await store.apply([_report(j, f"k{n}-{j}", n % 100) for j in ids])
            assert all(isinstance(o, Applied) for o in outcomes)
            n += 1
            await asyncio.sleep(0.02)  # a pause between writes; polled (60 s timeout)
    return n


async def test_wal_restart_keeps_the_writers_record_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The WAL is started over past its limit on the write connection itself: the
    record cache (and SQLite's page cache) survive it, and what was written stays."""
    monkeypatch.setattr(embedded, "WAL_RESTART_BYTES", 64 * 1024)
    store = EmbeddedStore(tmp_path / "data", Policy(retention=8))
    await store.start()
    try:
        ids = [f"j{i}" for i in range(20)]
        await _create(store, ids)
        conn = store._writer_connection()
        n = await _write_until_wal_restarts(store, ids, tmp_path / "data" / "jobwire.sqlite3-wal")
        async with store._write_lock:
            assert store._records.check(conn), "the WAL restart dropped the record cache"
        for job_id in ids:
            stored = await store.get(job_id)
            assert stored is not None and stored.job.sequence == n
        # A retried event is still recognised after the restart.
        (again,) = await store.apply([_report("j0", f"k{n - 1}-j0", 1)])
        assert not isinstance(again, Applied)
    finally:
        await store.close()


async def test_wal_is_started_over_in_its_file_and_cut_back_to_its_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past its limit the WAL starts over at the beginning of the file it has: the
    commits after that overwrite blocks the file system already holds. (It was cut to
    0 bytes, so every commit extended the file again, and ext4 allocated, zeroed and
    journalled each block: a tenth of the service's CPU under load.) The file stays
    bounded: the first commit after the restart cuts it back to WAL_FILE_BYTES."""
    limit = 256 * 1024
    monkeypatch.setattr(embedded, "WAL_RESTART_BYTES", limit)
    monkeypatch.setattr(embedded, "WAL_FILE_BYTES", limit)
    store = EmbeddedStore(tmp_path / "data", Policy(retention=8))
    await store.start()
    try:
        ids = [f"j{i}" for i in range(4)]  # a commit of a few pages, far below the limit
        await _create(store, ids)
        wal = tmp_path / "data" / "jobwire.sqlite3-wal"
        n = 0
        while os.stat(wal).st_size <= limit:
            await store.apply([_report(j, f"grow{n}-{j}", n % 100) for j in ids])
            n += 1
        await _write_until_wal_restarts(store, ids, wal)
        # The file was past `limit` when the WAL started over; the commit that started
        # it over wrote its few pages at the file's start and cut the rest.
        assert os.stat(wal).st_size == limit
    finally:
        await store.close()


def test_bridge_callback_metrics_expose_what_prometheus_objects_would() -> None:
    """The bridge counts callbacks in plain numbers; the scrape shows exactly what
    prometheus_client's Counter and Histogram fed the same values show."""
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

    from http_bridge import metrics
    from http_bridge.shared_counts import BUCKETS, Slabs

    reference = CollectorRegistry()
    counter = Counter(
        "jobwire_bridge_callbacks", "Answered worker callbacks by contract and HTTP status",
        ["contract", "status"], registry=reference,
    )  # fmt: skip
    histogram = Histogram(
        "jobwire_bridge_request_duration_seconds", "Latency of worker callbacks by contract",
        ["contract"], buckets=BUCKETS, registry=reference,
    )  # fmt: skip
    ours = CollectorRegistry()
    slabs = Slabs()
    ours.register(metrics._BridgeCollector(slabs))
    # Bounds themselves, between them, beyond the last, zero.
    for contract, status, seconds in [
        ("aws_batch", 200, 0.001), ("aws_batch", 200, 0.0011), ("aws_batch", 409, 0.0025),
        ("aws_batch", 200, 0.0), ("secretary", 503, 30.0), ("secretary", 503, 31.5),
        ("aws_batch", 200, 0.7),
    ]:  # fmt: skip
        metrics._record(contract, status, seconds, slabs)
        counter.labels(contract, str(status)).inc()
        histogram.labels(contract).observe(seconds)

    def lines(registry: CollectorRegistry) -> list[str]:
        text = generate_latest(registry).decode()
        families = ("jobwire_bridge_callbacks", "jobwire_bridge_request_duration_seconds")

        def named(line: str) -> str:  # "# HELP name ...", "# TYPE name ...", "name{...} v"
            return line.split(" ")[2] if line.startswith("#") else line

        return [
            line
            for line in text.splitlines()
            if "_created" not in line and named(line).startswith(families)
        ]

    assert lines(ours) == lines(reference)
    created = [line for line in generate_latest(ours).decode().splitlines() if "_created{" in line]
    assert len(created) == 5  # three counter children, two histogram children


async def test_indexed_columns_follow_every_event(tmp_path: Path) -> None:
    """Events that leave state, lease and stall deadline alone update a job's row
    without naming those columns; whatever the mix, every stored row agrees with its
    snapshot, and the queue, lease and stall lookups find what they should."""
    store = EmbeddedStore(tmp_path / "data", Policy(retention=8))
    await store.start()
    try:
        plain, leased, watched = "plain", "leased", "watched"
        for job_id in (plain, leased, watched):
            template = job_pb2.Job()
            if job_id == watched:  # a progress deadline: stall_ns moves with each event
                template.progress_deadline.FromNanoseconds(60 * 10**9)
            record, _ = events.new_record(
                job_id, job_pb2.JOB_KIND_GENERIC, time.time_ns(), template
            )
            await store.create(record)
        claimed = await store.claim(job_pb2.JOB_KIND_GENERIC, "w1", 30 * 10**9)
        assert claimed is not None and claimed.record.job.id == plain  # oldest first
        # `plain` is leased now; release it by completing `leased` later.
        for n in range(12):
            batch = [_report(j, f"k{n}-{j}", n) for j in (plain, leased, watched)]
            if n == 5:
                batch.append(_report(leased, f"k{n}-again", 50))  # two in one batch
            outcomes = await store.apply(batch)
            assert all(isinstance(o, Applied) for o in outcomes)
        done = job_service_pb2.ReportEventRequest(
            job_id=leased, idempotency_key="done", completed=job_pb2.Result(message="ok")
        )
        await store.apply([JobCommand(leased, Report(done))])
        await store.apply([_report(plain, "after", 99), _report(watched, "after", 99)])

        def rows() -> list[tuple[Any, ...]]:
            conn = store._writer_connection()
            return conn.execute(
                "SELECT id, state, seq, lease_expire_ns, stall_ns, snapshot FROM jobs"
            ).fetchall()

        async with store._write_lock:
            stored = rows()
        assert len(stored) == 3
        for name, state, seq, lease, stall, snapshot in stored:
            job = job_pb2.Job.FromString(snapshot)
            # _update_row: (state, seq, lease, stall, snapshot, id) from the snapshot
            expected = embedded._update_row(JobRecord(job=job))
            assert (state, seq, lease, stall) == expected[:4], name
        by_id = {r[0]: r for r in stored}
        assert by_id[leased][1] == job_pb2.JOB_STATE_SUCCEEDED
        assert by_id[plain][3] is not None  # its lease, renewed by each event
        assert by_id[watched][4] is not None  # its stall deadline
        # The lookups that use those indexes see the stored values.
        far = time.time_ns() + 10**15
        assert await store.expired_leases(far, 10) == [plain]
        assert await store.stalled_jobs(far, 10) == [watched]
    finally:
        await store.close()


async def test_event_rows_are_pruned_in_steps_and_never_shown_past_the_retention(
    tmp_path: Path,
) -> None:
    store = EmbeddedStore(tmp_path / "data", Policy(retention=8))
    await store.start()
    try:
        record, _ = events.new_record("j", job_pb2.JOB_KIND_GENERIC, time.time_ns())
        await store.create(record)
        most = 0
        for n in range(1, 201):
            # One event per batch, and now and then several in one batch.
            batch = [_report("j", f"k{n}-{i}", 1) for i in range(1 if n % 7 else 5)]
            await store.apply(batch)
            newest = (await store.get("j")).job.sequence  # type: ignore[union-attr]
            async with store._write_lock:
                rows = (
                    store._writer_connection()
                    .execute("SELECT COUNT(*) FROM events WHERE job_id = 'j'")
                    .fetchone()[0]
                )
            most = max(most, rows)
            assert rows <= 8 + embedded.PRUNE_STEP - 1 + 4  # plus a batch's extra events
            kept = await store.events_after("j", 0)
            assert [e.sequence for e in kept] == list(range(max(1, newest - 7), newest + 1))
            tail = await store.events_after("j", newest - 3)
            assert [e.sequence for e in tail] == list(range(max(1, newest - 2), newest + 1))
            assert await store.events_after("j", newest) == []
        assert most > 8  # rows did wait for their step
    finally:
        await store.close()


@pytest.mark.parametrize("keys_on_row", [True, False], ids=["keys-on-row", "keys-in-events"])
async def test_recent_keys_live_with_their_events_across_restarts_and_old_rows(
    tmp_path: Path, keys_on_row: bool
) -> None:
    """A job's idempotency keys are stored with its events, not rewritten on its row
    with each event: after a restart a retried event is still a duplicate, also when
    its rows were written before events.key: the keys the job's row held then become
    its job_keys (keys-on-row), or each key is read from its event (keys-in-events)."""
    data = tmp_path / "data"
    policy = Policy(retention=8)

    async def apply(keys: list[str]) -> list[object]:
        store = EmbeddedStore(data, policy)
        await store.start()
        try:
            return list(await store.apply([_report("j", key, 1) for key in keys]))
        finally:
            await store.close()

    store = EmbeddedStore(data, policy)
    await store.start()
    await _create(store, ["j"])
    await store.close()
    assert all(isinstance(o, Applied) for o in await apply([f"old{i}" for i in range(6)]))
    with sqlite3.connect(data / "jobwire.sqlite3") as conn:  # back to the older schema
        conn.execute("ALTER TABLE events DROP COLUMN key")
        conn.execute("DROP TABLE job_keys")
        if keys_on_row:  # as the row was written then (a JSON array: the oldest form)
            keys = json.dumps([f"old{i}" for i in range(6)])
            conn.execute("UPDATE jobs SET keys = ? WHERE id = 'j'", (keys,))
    conn.close()
    # old0, old1 and new0 are retained (8 events); a key past the retention is not.
    assert all(isinstance(o, Applied) for o in await apply(["new0", "new1"]))
    outcomes = await apply(["old2", "old5", "new1", "fresh"])
    assert [type(o) for o in outcomes] == [Unchanged, Unchanged, Unchanged, Applied]
    (gone,) = await apply(["old0"])  # events 1 (old0) and 2 (old1) left the window
    assert isinstance(gone, Applied)
    store = EmbeddedStore(data, policy)
    await store.start()
    try:
        assert await _stored_keys(store, "j") == (
            "old2",
            "old3",
            "old4",
            "old5",
            "new0",
            "new1",
            "fresh",
            "old0",
        )
        async with store._write_lock:
            conn = store._writer_connection()
            (keys_bytes,) = conn.execute("SELECT length(keys) FROM jobs WHERE id = 'j'").fetchone()
            nulls = conn.execute("SELECT COUNT(*) FROM events WHERE key IS NULL").fetchone()[0]
        assert keys_bytes == 0  # the row holds no keys
        if keys_on_row:  # copied when the database was opened
            assert conn.execute("SELECT seq FROM job_keys").fetchall() == [(6,)]
        assert nulls == 5  # old1..old5, read through their events (old0's row was pruned)
    finally:
        await store.close()


async def test_jobs_the_cache_lets_go_keep_their_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More jobs than the writer's cache holds (JOBWIRE_EMBEDDED_CACHE_JOBS): each job
    pushed out keeps its keys in job_keys, and on its next event they come back from
    there and from its later events. Duplicates are still recognised, and keys past the
    retention are not."""
    monkeypatch.setenv("JOBWIRE_EMBEDDED_CACHE_JOBS", "4")  # 10 jobs in turn: every
    monkeypatch.setenv("JOBWIRE_EVENT_RETENTION", "8")  # batch pushes jobs out
    monkeypatch.setenv("JOBWIRE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("MONGODB_URI", raising=False)
    store = open_store(Settings.from_env())
    assert isinstance(store, EmbeddedStore)
    await store.start()
    try:
        ids = [f"j{i}" for i in range(10)]
        await _create(store, ids)
        for n in range(12):  # 12 events per job, three jobs per batch
            for start in range(0, 10, 3):
                batch = [_report(j, f"{j}-k{n}", n) for j in ids[start : start + 3]]
                assert all(isinstance(o, Applied) for o in await store.apply(batch))
        async with store._write_lock:
            conn = store._writer_connection()
            kept = dict(conn.execute("SELECT job_id, seq FROM job_keys").fetchall())
        assert len(kept) >= 6 and all(0 < seq <= 12 for seq in kept.values())
        for job_id in ids:
            # k4..k11 are the 8 retained; k3 fell out of the window.
            retained = await store.apply([_report(job_id, f"{job_id}-k{n}", 1) for n in (4, 11)])
            assert [type(o) for o in retained] == [Unchanged, Unchanged], job_id
            (gone,) = await store.apply([_report(job_id, f"{job_id}-k3", 1)])
            assert isinstance(gone, Applied), job_id
            expected = tuple(f"{job_id}-k{n}" for n in (*range(5, 12), 3))
            assert await _stored_keys(store, job_id) == expected
    finally:
        await store.close()
    with sqlite3.connect(tmp_path / "data" / "jobwire.sqlite3") as conn:
        assert conn.execute("SELECT COUNT(*) FROM job_keys").fetchone()[0] >= 6
    conn.close()
