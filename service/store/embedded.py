"""The embedded store: SQLite in WAL mode with synchronous=FULL, artifacts as files.

One writer thread owns the write connection, so a batch of commands is one
transaction and one fsync; readers use their own connections on a small pool
(WAL lets them read while the writer commits).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from jobwire.v1 import artifact_pb2, event_pb2, job_pb2, log_pb2

from ..domain import events
from ..domain.errors import Code, DomainError, StorageUnavailable
from ..domain.records import Applied, Change, Claim, JobCommand, JobRecord, Policy
from .port import CHUNK_SIZE, JobQuery

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
  id TEXT PRIMARY KEY,
  kind INTEGER NOT NULL,
  state INTEGER NOT NULL,
  create_ns INTEGER NOT NULL,
  seq INTEGER NOT NULL,
  lease_expire_ns INTEGER,
  labels TEXT NOT NULL,
  token_hash BLOB NOT NULL,
  keys TEXT NOT NULL,
  snapshot BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs(kind, state, create_ns, id);
CREATE INDEX IF NOT EXISTS jobs_order ON jobs(create_ns, id);
CREATE INDEX IF NOT EXISTS jobs_lease ON jobs(lease_expire_ns) WHERE lease_expire_ns IS NOT NULL;
CREATE TABLE IF NOT EXISTS events (
  job_id TEXT NOT NULL,
  seq INTEGER NOT NULL,
  event BLOB NOT NULL,
  PRIMARY KEY (job_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS logs (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  job_id TEXT NOT NULL,
  level INTEGER NOT NULL,
  time_ns INTEGER NOT NULL,
  entry BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS logs_job ON logs(job_id, time_ns, id);
CREATE INDEX IF NOT EXISTS logs_time ON logs(time_ns, id);
CREATE TABLE IF NOT EXISTS artifacts (
  job_id TEXT NOT NULL,
  name TEXT NOT NULL,
  meta BLOB NOT NULL,
  path TEXT NOT NULL,
  PRIMARY KEY (job_id, name)
) WITHOUT ROWID;
"""


class EmbeddedStore:
    def __init__(self, data_dir: Path, policy: Policy) -> None:
        self.policy = policy
        self._dir = Path(data_dir)
        self._db_path = self._dir / "jobwire.sqlite3"
        self._artifacts = self._dir / "artifacts"
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="jobwire-sqlite-writer")
        self._readers = ThreadPoolExecutor(2, thread_name_prefix="jobwire-sqlite-reader")
        self._checkpointer = ThreadPoolExecutor(1, thread_name_prefix="jobwire-sqlite-checkpoint")
        self._checkpoints: asyncio.Task[None] | None = None
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        self._dir.mkdir(parents=True, exist_ok=True)
        (self._artifacts / ".tmp").mkdir(parents=True, exist_ok=True)
        await self._write(lambda c: c.executescript(_SCHEMA))
        self._checkpoints = asyncio.get_running_loop().create_task(
            self._checkpoint_forever(), name="sqlite-checkpoint"
        )

    async def _checkpoint_forever(self, interval: float = 0.25) -> None:
        """Copies the WAL into the database off the writer thread (PASSIVE: never blocks
        a commit), so no commit pays for a checkpoint; durability is the WAL fsync."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval)
            # Busy or closing: the next round retries.
            with contextlib.suppress(sqlite3.Error, RuntimeError):
                await loop.run_in_executor(
                    self._checkpointer,
                    lambda: self._connection().execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall(),
                )

    async def close(self) -> None:
        def close_all() -> None:
            with self._lock:
                for conn in self._connections:
                    conn.close()
                self._connections.clear()

        if self._checkpoints is not None:
            self._checkpoints.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checkpoints
        self._writer.shutdown(wait=True)
        self._readers.shutdown(wait=True)
        self._checkpointer.shutdown(wait=True)
        close_all()

    async def ping(self) -> None:
        await self._read(lambda c: c.execute("SELECT 1").fetchone())

    # -- jobs --------------------------------------------------------------

    async def create(self, record: JobRecord) -> None:
        def insert(conn: sqlite3.Connection) -> None:
            try:
                with conn:
                    _insert_job(conn, record)
            except sqlite3.IntegrityError:
                raise DomainError(
                    Code.ALREADY_EXISTS, f"job {record.job.id!r} already exists"
                ) from None

        await self._write(insert)

    async def get(self, job_id: str) -> JobRecord | None:
        return await self._read(lambda c: _load(c, job_id))

    async def list_jobs(self, query: JobQuery) -> list[job_pb2.Job]:
        where: list[str] = []
        args: list[Any] = []
        if query.states:
            where.append(f"state IN ({','.join('?' * len(query.states))})")
            args.extend(query.states)
        if query.kind:
            where.append("kind = ?")
            args.append(query.kind)
        for key, value in sorted(query.labels.items()):
            where.append("json_extract(labels, ?) = ?")
            args.extend(['$."' + key.replace('"', '\\"') + '"', value])
        if query.after is not None:
            where.append("(create_ns, id) > (?, ?)")
            args.extend(query.after)
        sql = "SELECT snapshot FROM jobs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY create_ns, id LIMIT ?"
        args.append(query.limit)

        def run(conn: sqlite3.Connection) -> list[job_pb2.Job]:
            return [job_pb2.Job.FromString(row[0]) for row in conn.execute(sql, args)]

        return await self._read(run)

    async def apply(self, commands: Sequence[JobCommand]) -> list[Change | DomainError]:
        return await self._write(lambda c: self._apply_batch(c, commands))

    async def claim(self, kind: int, worker_id: str, lease_ns: int) -> Applied | None:
        def run(conn: sqlite3.Connection) -> Applied | None:
            row = conn.execute(
                "SELECT id FROM jobs WHERE kind = ? AND state = ? ORDER BY create_ns, id LIMIT 1",
                (kind, job_pb2.JOB_STATE_QUEUED),
            ).fetchone()
            if row is None:
                return None
            (result,) = self._apply_batch(conn, [JobCommand(row[0], Claim(worker_id, lease_ns))])
            if isinstance(result, DomainError):
                raise result
            assert isinstance(result, Applied)
            return result

        # Claims run on the single writer thread, so two claimers never see the
        # same QUEUED row.
        return await self._write(run)

    async def expired_leases(self, now_ns: int, limit: int) -> list[str]:
        def run(conn: sqlite3.Connection) -> list[str]:
            rows = conn.execute(
                "SELECT id FROM jobs WHERE lease_expire_ns IS NOT NULL AND lease_expire_ns <= ?"
                " AND state = ? LIMIT ?",
                (now_ns, job_pb2.JOB_STATE_RUNNING, limit),
            )
            return [r[0] for r in rows]

        return await self._read(run)

    async def events_after(self, job_id: str, sequence: int) -> list[event_pb2.JobEvent]:
        def run(conn: sqlite3.Connection) -> list[event_pb2.JobEvent]:
            rows = conn.execute(
                "SELECT event FROM events WHERE job_id = ? AND seq > ? ORDER BY seq",
                (job_id, sequence),
            )
            return [event_pb2.JobEvent.FromString(r[0]) for r in rows]

        return await self._read(run)

    async def queue_depths(self) -> dict[int, int]:
        def run(conn: sqlite3.Connection) -> dict[int, int]:
            rows = conn.execute(
                "SELECT kind, COUNT(*) FROM jobs WHERE state = ? GROUP BY kind",
                (job_pb2.JOB_STATE_QUEUED,),
            )
            return {int(k): int(n) for k, n in rows}

        return await self._read(run)

    # -- logs --------------------------------------------------------------

    async def write_log(self, entry: log_pb2.LogEntry) -> None:
        blob = entry.SerializeToString()
        args = (entry.job_id, entry.level, entry.time.ToNanoseconds(), blob)

        def insert(conn: sqlite3.Connection) -> None:
            with conn:
                conn.execute(
                    "INSERT INTO logs (job_id, level, time_ns, entry) VALUES (?, ?, ?, ?)", args
                )

        await self._write(insert)

    async def list_logs(self, job_id: str, level: int, limit: int) -> list[log_pb2.LogEntry]:
        where: list[str] = []
        args: list[Any] = []
        if job_id:
            where.append("job_id = ?")
            args.append(job_id)
        if level:
            where.append("level = ?")
            args.append(level)
        sql = "SELECT entry FROM logs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY time_ns DESC, id DESC LIMIT ?"
        args.append(limit)

        def run(conn: sqlite3.Connection) -> list[log_pb2.LogEntry]:
            return [log_pb2.LogEntry.FromString(r[0]) for r in conn.execute(sql, args)]

        return await self._read(run)

    # -- artifacts ---------------------------------------------------------

    async def put_artifact(
        self, artifact: artifact_pb2.Artifact, chunks: AsyncIterator[bytes]
    ) -> artifact_pb2.Artifact:
        tmp = self._artifacts / ".tmp" / uuid.uuid4().hex
        digest = hashlib.sha256()
        size = 0
        loop = asyncio.get_running_loop()
        handle = await loop.run_in_executor(None, lambda: open(tmp, "wb"))  # noqa: SIM115
        try:
            async for chunk in chunks:
                digest.update(chunk)
                size += len(chunk)
                await loop.run_in_executor(None, handle.write, chunk)
            await loop.run_in_executor(None, _fsync_close, handle)
        except BaseException:
            handle.close()
            tmp.unlink(missing_ok=True)
            raise
        meta = artifact_pb2.Artifact()
        meta.CopyFrom(artifact)
        meta.size_bytes = size
        meta.sha256 = digest.hexdigest()
        meta.create_time.FromNanoseconds(time.time_ns())
        final = self._artifacts / hashlib.sha256(artifact.job_id.encode()).hexdigest()[:32]
        target = final / f"{artifact.name}.{uuid.uuid4().hex[:8]}"

        def commit(conn: sqlite3.Connection) -> None:
            final.mkdir(exist_ok=True)
            os.replace(tmp, target)
            row = conn.execute(
                "SELECT path FROM artifacts WHERE job_id = ? AND name = ?",
                (artifact.job_id, artifact.name),
            ).fetchone()
            with conn:
                conn.execute(
                    "INSERT OR REPLACE INTO artifacts (job_id, name, meta, path) VALUES (?,?,?,?)",
                    (artifact.job_id, artifact.name, meta.SerializeToString(), str(target)),
                )
            if row is not None:
                Path(row[0]).unlink(missing_ok=True)

        await self._write(commit)
        return meta

    async def open_artifact(
        self, job_id: str, name: str
    ) -> tuple[artifact_pb2.Artifact, AsyncIterator[bytes]] | None:
        row = await self._read(
            lambda c: c.execute(
                "SELECT meta, path FROM artifacts WHERE job_id = ? AND name = ?", (job_id, name)
            ).fetchone()
        )
        if row is None:
            return None
        meta = artifact_pb2.Artifact.FromString(row[0])
        handle = open(row[1], "rb")  # noqa: ASYNC230, SIM115 - opening is not blocking I/O of note

        async def content() -> AsyncIterator[bytes]:
            loop = asyncio.get_running_loop()
            try:
                while chunk := await loop.run_in_executor(None, handle.read, CHUNK_SIZE):
                    yield chunk
            finally:
                handle.close()

        return meta, content()

    async def list_artifacts(self, job_id: str) -> list[artifact_pb2.Artifact]:
        def run(conn: sqlite3.Connection) -> list[artifact_pb2.Artifact]:
            rows = conn.execute(
                "SELECT meta FROM artifacts WHERE job_id = ? ORDER BY name", (job_id,)
            )
            return [artifact_pb2.Artifact.FromString(r[0]) for r in rows]

        return await self._read(run)

    # -- internals ---------------------------------------------------------

    def _apply_batch(
        self, conn: sqlite3.Connection, commands: Sequence[JobCommand]
    ) -> list[Change | DomainError]:
        now_ns = time.time_ns()
        seen: dict[str, JobRecord | None] = {}
        results: list[Change | DomainError] = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            for cmd in commands:
                record = seen[cmd.job_id] if cmd.job_id in seen else _load(conn, cmd.job_id)
                try:
                    change = events.apply(record, cmd.job_id, cmd.command, now_ns, self.policy)
                except DomainError as err:
                    results.append(err)
                    seen[cmd.job_id] = record
                    continue
                if isinstance(change, Applied):
                    _store_change(conn, change, self.policy.retention)
                    seen[cmd.job_id] = change.record
                results.append(change)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return results

    def _connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self._db_path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit is on disk (WAL fsync'd) before we acknowledge it.
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA busy_timeout=5000")
            # Checkpoints run on their own thread (see _checkpoint_forever), not in commits.
            conn.execute("PRAGMA wal_autocheckpoint=0")
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self._run(self._writer, fn)

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self._run(self._readers, fn)

    async def _run(self, pool: ThreadPoolExecutor, fn: Callable[[sqlite3.Connection], T]) -> T:
        def call() -> T:
            return fn(self._connection())

        try:
            return await asyncio.get_running_loop().run_in_executor(pool, call)
        except sqlite3.OperationalError as err:
            raise StorageUnavailable(f"embedded store: {err}") from err
        except RuntimeError as err:  # executor shut down
            raise StorageUnavailable(f"embedded store is closed: {err}") from err


def _fsync_close(handle: Any) -> None:
    handle.flush()
    os.fsync(handle.fileno())
    handle.close()


def _load(conn: sqlite3.Connection, job_id: str) -> JobRecord | None:
    row = conn.execute(
        "SELECT snapshot, token_hash, keys FROM jobs WHERE id = ?", (job_id,)
    ).fetchone()
    if row is None:
        return None
    return JobRecord(
        job=job_pb2.Job.FromString(row[0]), token_hash=row[1], recent_keys=tuple(json.loads(row[2]))
    )


def _row(record: JobRecord) -> tuple[Any, ...]:
    job = record.job
    lease = job.lease_expire_time.ToNanoseconds() if job.HasField("lease_expire_time") else None
    return (
        job.kind,
        job.state,
        job.create_time.ToNanoseconds(),
        job.sequence,
        lease,
        json.dumps(dict(job.labels), sort_keys=True),
        record.token_hash,
        json.dumps(record.recent_keys),
        job.SerializeToString(),
        job.id,
    )


def _insert_job(conn: sqlite3.Connection, record: JobRecord) -> None:
    conn.execute(
        "INSERT INTO jobs (kind, state, create_ns, seq, lease_expire_ns, labels, token_hash,"
        " keys, snapshot, id) VALUES (?,?,?,?,?,?,?,?,?,?)",
        _row(record),
    )


def _store_change(conn: sqlite3.Connection, change: Applied, retention: int) -> None:
    if change.created:
        _insert_job(conn, change.record)
    else:
        conn.execute(
            "UPDATE jobs SET kind=?, state=?, create_ns=?, seq=?, lease_expire_ns=?, labels=?,"
            " token_hash=?, keys=?, snapshot=? WHERE id=?",
            _row(change.record),
        )
    event = change.event
    conn.execute(
        "INSERT INTO events (job_id, seq, event) VALUES (?, ?, ?)",
        (event.job_id, event.sequence, event.SerializeToString()),
    )
    if event.sequence > retention:
        conn.execute(
            "DELETE FROM events WHERE job_id = ? AND seq <= ?",
            (event.job_id, event.sequence - retention),
        )
