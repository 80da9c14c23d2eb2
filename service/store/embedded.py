"""The embedded store: SQLite in WAL mode with synchronous=FULL, artifacts as files.

One writer thread owns the write connection, so a batch of commands is one
transaction and one fsync; readers use their own connections on a small pool
(WAL lets them read while the writer commits).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import itertools
import json
import logging
import os
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from jobwire.v1 import artifact_pb2, event_pb2, job_pb2, log_pb2

from ..domain import events, validation
from ..domain.errors import Code, DomainError, StorageUnavailable
from ..domain.records import (
    TERMINAL_STATES,
    Applied,
    Change,
    Claim,
    Deleted,
    JobCommand,
    JobRecord,
    Policy,
)
from ..tasks import outlasting_cancel
from .port import CHUNK_SIZE, LIST_READ_BYTES, JobQuery, LogEntry

log = logging.getLogger("jobwire.store.embedded")

# The embedded store is one writer: its firehose log has a single origin.
ORIGIN = "db"
# Firehose rows older than the retention are deleted at most once a second, this many
# at a time (inside a commit; four times the 5,000/s the bench reaches, so a backlog
# shrinks even under full load, and no commit deletes more than a few ms' worth).
PRUNE_EVERY_NS = 10**9
# WAL in use past which a checkpoint starts it over (see _checkpoint_forever), and the
# size its file is cut back to after a restart: the file is reused, not regrown, and
# under full load it grows past the restart size by up to a checkpoint interval's writes
# (about 20 MB at 8,000 events/s).
WAL_RESTART_BYTES = 16 * 2**20
WAL_FILE_BYTES = 64 * 2**20
WAL_FRAME_HEADER = 24  # bytes before each page in the WAL
PRUNE_ROWS = 20_000
# A job keeps at most retention + PRUNE_STEP - 1 event rows between prunes (see _stage).
PRUNE_STEP = 32
_ENDED = tuple(sorted(TERMINAL_STATES))

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
  -- Unused since the keys moved to events.key and job_keys: "" (a row from before is
  -- emptied once its keys are copied to job_keys, see _migrate).
  keys TEXT NOT NULL,
  snapshot BLOB NOT NULL,
  stall_ns INTEGER,
  -- When the job ended (NULL while it has not): JOBWIRE_JOB_RETENTION counts from it.
  end_ns INTEGER
);
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs(kind, state, create_ns, id);
CREATE INDEX IF NOT EXISTS jobs_order ON jobs(create_ns, id);
CREATE INDEX IF NOT EXISTS jobs_lease ON jobs(lease_expire_ns) WHERE lease_expire_ns IS NOT NULL;
-- A job's retained events. `key` is the event's idempotency key ("" for none), so a
-- job's recent keys are read without decoding its events; NULL in a row written
-- before the column, whose key is then read from the event itself.
CREATE TABLE IF NOT EXISTS events (
  job_id TEXT NOT NULL,
  seq INTEGER NOT NULL,
  event BLOB NOT NULL,
  key TEXT,
  PRIMARY KEY (job_id, seq)
) WITHOUT ROWID;
-- A job's recent keys as of event `seq` (_encode_keys), written when the writer's cache
-- lets the job go: reloading it then reads these and the keys of its later events,
-- not every retained row. Missing or old (a crash, a restart): the events make up
-- the rest.
CREATE TABLE IF NOT EXISTS job_keys (
  job_id TEXT PRIMARY KEY,
  seq INTEGER NOT NULL,
  keys BLOB NOT NULL
) WITHOUT ROWID;
-- The firehose log: every event in commit order (n), written in the event's
-- transaction; pruned by age (JOBWIRE_FIREHOSE_RETENTION). AUTOINCREMENT keeps
-- n growing even when every row has been pruned.
CREATE TABLE IF NOT EXISTS firehose (
  n INTEGER PRIMARY KEY AUTOINCREMENT,
  time_ns INTEGER NOT NULL,
  event BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS logs (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  job_id TEXT NOT NULL,
  level INTEGER NOT NULL,
  time_ns INTEGER NOT NULL,
  entry BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS logs_job ON logs(job_id, time_ns, id);
CREATE INDEX IF NOT EXISTS logs_time ON logs(time_ns, id);
-- Settings the stored data depends on (the event retention it was written with).
CREATE TABLE IF NOT EXISTS meta (
  name TEXT PRIMARY KEY,
  value INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS artifacts (
  job_id TEXT NOT NULL,
  name TEXT NOT NULL,
  meta BLOB NOT NULL,
  path TEXT NOT NULL,
  PRIMARY KEY (job_id, name)
) WITHOUT ROWID;
-- Files of deleted artifacts (a deleted job's), written in the transaction that
-- deletes their rows and removed once the files are: a crash in between leaves no
-- file for ever (finish_deletions).
CREATE TABLE IF NOT EXISTS artifact_trash (
  path TEXT PRIMARY KEY
) WITHOUT ROWID;
"""


# Reads of an artifact's row before its file is found (each replaced meanwhile).
_OPEN_ATTEMPTS = 5


class EmbeddedStore:
    # This process writes every entry of the firehose log's one origin (fanout.anchor).
    single_writer_origin = ORIGIN
    log_failures = 0  # the firehose entry is written in the event's own transaction

    def __init__(self, data_dir: Path, policy: Policy, cache_jobs: int = 2048) -> None:
        """`cache_jobs`: jobs the writer keeps in memory (JOBWIRE_EMBEDDED_CACHE_JOBS)."""
        self.policy = policy
        self._dir = Path(data_dir)
        self._db_path = self._dir / "jobwire.sqlite3"
        self._lock_fd: int | None = None
        self._artifacts = self._dir / "artifacts"
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="jobwire-sqlite-writer")
        self._readers = ThreadPoolExecutor(2, thread_name_prefix="jobwire-sqlite-reader")
        self._checkpointer = ThreadPoolExecutor(1, thread_name_prefix="jobwire-sqlite-checkpoint")
        self._checkpoints: asyncio.Task[None] | None = None
        self._local = threading.local()
        self._records = _RecordCache(cache_jobs)
        self._write_lock = asyncio.Lock()
        self._wconn: sqlite3.Connection | None = None
        self._closed = False
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        # Last firehose n written (None: read it from the database on next use).
        self._log_n: int | None = None
        self._pruned_ns = 0

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        if self._lock_fd is not None:
            return  # started already (a service handed a started store): the lock is ours
        try:
            # Made private: the database and artifacts/ are every job's payload, logs
            # and outputs, which the service hands out only to a token's holder (a new
            # ./data was 0755, its files 0644: readable by every local user). A directory
            # the operator made keeps its mode (the image's 0750).
            self._dir.parent.mkdir(parents=True, exist_ok=True)
            if self._dir.exists() and not self._dir.is_dir():
                # Said as the problem it is: mkdir's "[Errno 17] File exists" read as if
                # a directory already there were the fault.
                raise StorageUnavailable(
                    f"embedded store: cannot use the data directory {self._dir}:"
                    " it is a file, not a directory"
                )
            self._dir.mkdir(mode=0o700, exist_ok=True)
            (self._artifacts / ".tmp").mkdir(parents=True, exist_ok=True)
            self._lock_fd = _lock_data_dir(self._dir)
            # Uploads a crash cut off: nothing else can be uploading into a locked dir.
            for partial in (self._artifacts / ".tmp").iterdir():
                if partial.is_file():
                    partial.unlink(missing_ok=True)
        except OSError as err:
            self._unlock()
            raise StorageUnavailable(
                f"embedded store: cannot use the data directory {self._dir}: {err}"
            ) from err
        try:
            await self._write(_migrate)
            await self._write(lambda conn: _settle_retention(conn, self.policy.retention))
            await self._write(_number_log_from_the_clock)
            await self.finish_deletions()
        except BaseException:
            self._unlock()
            raise
        self._checkpoints = asyncio.get_running_loop().create_task(
            self._checkpoint_forever(), name="sqlite-checkpoint"
        )

    async def _checkpoint_forever(self, interval: float = 0.25) -> None:
        """Copies the WAL into the database off the writer thread (PASSIVE: never blocks
        a commit), so no commit pays for a checkpoint; durability is the WAL fsync."""
        loop = asyncio.get_running_loop()

        def checkpoint() -> int:
            """A PASSIVE checkpoint; the bytes of WAL in use (the file may be larger)."""
            conn = self._connection()
            _, frames, _ = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            (page_size,) = conn.execute("PRAGMA page_size").fetchone()
            return int(frames) * (int(page_size) + WAL_FRAME_HEADER)

        while True:
            await asyncio.sleep(interval)
            # Busy, disk full or closing: the next round retries.
            with contextlib.suppress(sqlite3.Error, RuntimeError, OSError, StorageUnavailable):
                if await loop.run_in_executor(self._checkpointer, checkpoint) < WAL_RESTART_BYTES:
                    continue
                # Under a steady stream of commits a PASSIVE checkpoint never reaches the
                # WAL's end, so SQLite never starts the WAL over and the file grows without
                # bound (measured: 2.7 MB per 2,000 events, until the disk is full). Past
                # the limit: RESTART, holding the write lock so that commits wait on the
                # loop (not in SQLite's busy handler, which would block the loop). Not
                # TRUNCATE: each commit after it appended to a file cut to 0 bytes, and
                # ext4 allocated, zeroed and journalled its blocks (10% of the service's
                # CPU under load, most of it memset); now the commits overwrite the file
                # in place, and journal_size_limit cuts it back to the limit. On the
                # write connection itself: a WAL reset by another connection makes the
                # writer drop its page cache and bumps its data_version, which dropped
                # the record cache too (every job re-read and re-decoded, twice a second
                # under load); its own reset does neither.
                await self._write(_restart_wal)

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
        async with self._write_lock:
            self._closed = True
        self._writer.shutdown(wait=True)
        self._readers.shutdown(wait=True)
        self._checkpointer.shutdown(wait=True)
        close_all()
        self._unlock()

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the data directory's lock
            self._lock_fd = None

    async def ping(self) -> None:
        await self._read(lambda c: c.execute("SELECT 1").fetchone())

    async def settle_in_doubt(self) -> list[Applied]:
        return []  # a commit's outcome is known: it ran in this process

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
            where.append(f"state IN ({_marks(query.states)})")
            args.extend(query.states)
        if query.kind:
            where.append("kind = ?")
            args.append(query.kind)
        for key, value in sorted(query.labels.items()):
            # By key, not a JSON path built from it: a path cannot quote every key
            # (a '"' or '\\'), and non-ASCII keys are stored escaped, so they missed.
            where.append("EXISTS (SELECT 1 FROM json_each(labels) WHERE key = ? AND value = ?)")
            args.extend([key, value])
        if query.after is not None:
            where.append(f"(create_ns, id) {'<' if query.newest_first else '>'} (?, ?)")
            args.extend(query.after)
        sql = "SELECT snapshot FROM jobs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        # The same indexes serve both orders (SQLite walks them backwards).
        order = " DESC" if query.newest_first else ""
        sql += f" ORDER BY create_ns{order}, id{order} LIMIT ?"
        args.append(query.limit)

        def run(conn: sqlite3.Connection) -> list[job_pb2.Job]:
            return [job_pb2.Job.FromString(row[0]) for row in conn.execute(sql, args)]

        return await self._read(run)

    async def apply(self, commands: Sequence[JobCommand]) -> list[Change | DomainError]:
        # The statements run right here on the event loop (microseconds per event, all
        # in cache); only COMMIT - the WAL write and fsync - goes to the writer thread.
        # A round trip to a thread per batch costs milliseconds of GIL hand-offs while
        # the loop is busy; one per commit is the least that keeps fsync off the loop.
        async with self._write_lock:
            conn = self._writer_connection()
            try:
                results, entries = self._stage(conn, commands)
            except sqlite3.DatabaseError as err:
                raise self._failed(err) from err
            if entries is not None:
                try:
                    await self._in_writer(lambda: conn.execute("COMMIT"))
                except BaseException:
                    self._abort(conn)
                    raise
                self._records.committed(conn, entries)
            return results

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

    async def stalled_jobs(self, now_ns: int, limit: int) -> list[str]:
        def run(conn: sqlite3.Connection) -> list[str]:
            rows = conn.execute(
                "SELECT id FROM jobs WHERE stall_ns IS NOT NULL AND stall_ns <= ?"
                " AND state = ? LIMIT ?",
                (now_ns, job_pb2.JOB_STATE_RUNNING, limit),
            )
            return [r[0] for r in rows]

        return await self._read(run)

    async def log_bounds(self, since_ns: int) -> dict[str, tuple[int, int]]:
        def run(conn: sqlite3.Connection) -> dict[str, tuple[int, int]]:
            # sqlite_sequence remembers the last n even when every row was pruned.
            row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'firehose'").fetchone()
            if row is None:
                return {}
            newest = int(row[0])
            # Rows are in time order: the first one inside the window.
            oldest = conn.execute(
                "SELECT n FROM firehose WHERE time_ns > ? ORDER BY n LIMIT 1", (since_ns,)
            ).fetchone()
            return {ORIGIN: (int(oldest[0]) if oldest else int(newest) + 1, int(newest))}

        return await self._read(run)

    async def log_after(self, origin: str, n: int, since_ns: int, limit: int) -> list[LogEntry]:
        if origin != ORIGIN:
            return []

        def run(conn: sqlite3.Connection) -> list[LogEntry]:
            rows = conn.execute(
                "SELECT n, time_ns, event FROM firehose WHERE n > ? AND time_ns > ?"
                " ORDER BY n LIMIT ?",
                (n, since_ns, limit),
            )
            return [
                LogEntry(ORIGIN, int(k), int(t), event_pb2.JobEvent.FromString(e))
                for k, t, e in rows
            ]

        return await self._read(run)

    async def events_after(self, job_id: str, sequence: int) -> list[event_pb2.JobEvent]:
        retention = self.policy.retention
        return await self._read(lambda c: _events_after(c, job_id, sequence, retention))

    async def get_with_events(
        self, job_id: str, sequence: int
    ) -> tuple[JobRecord, list[event_pb2.JobEvent]] | None:
        retention = self.policy.retention

        def run(conn: sqlite3.Connection) -> tuple[JobRecord, list[event_pb2.JobEvent]] | None:
            conn.execute("BEGIN")  # the row and its events from one snapshot
            try:
                record = _load(conn, job_id)
                if record is None:
                    return None
                return record, _events_after(conn, job_id, sequence, retention)
            finally:
                conn.execute("COMMIT")

        return await self._read(run)

    async def queue_depths(self) -> dict[int, int]:
        def run(conn: sqlite3.Connection) -> dict[int, int]:
            rows = conn.execute(
                "SELECT kind, COUNT(*) FROM jobs WHERE state = ? GROUP BY kind",
                (job_pb2.JOB_STATE_QUEUED,),
            )
            return {int(k): int(n) for k, n in rows}

        return await self._read(run)

    def event_feed(self, max_docs: int = 0) -> None:
        return None  # one process owns the file: its watchers hear it directly

    # -- logs --------------------------------------------------------------

    async def write_log(
        self, entry: log_pb2.LogEntry, of_no_job: bool = False, key: str = ""
    ) -> log_pb2.LogEntry | None:
        blob = entry.SerializeToString()
        received = entry.record_time.ToNanoseconds()
        job_id = entry.job_id
        args = (job_id, entry.level, entry.kind, entry.time.ToNanoseconds())
        # Whether the job is there is asked again in the write (`of_no_job` is what the
        # caller read): one deleted since took its lines already, and nothing else would
        # take this one; one made since (CreateJob with that id, an AuroraCloud outcome)
        # owns it, and its line must not age out while it runs.
        no_job = "CASE WHEN NOT EXISTS (SELECT 1 FROM jobs WHERE id = ?) THEN ? END"

        def insert(conn: sqlite3.Connection) -> log_pb2.LogEntry | None:
            with conn:  # one writer: the look-up and the insert are one step
                if key:
                    row = conn.execute(
                        "SELECT entry FROM logs WHERE job_id = ? AND key = ?", (job_id, key)
                    ).fetchone()
                    if row is not None:
                        return log_pb2.LogEntry.FromString(row[0])
                conn.execute(
                    "INSERT INTO logs (job_id, level, kind, time_ns, no_job_ns, key, entry)"
                    f" VALUES (?, ?, ?, ?, {no_job}, ?, ?)",
                    (*args, job_id, received, key or None, blob),
                )
            return None

        return await self._write(insert)

    async def keyed_log(self, job_id: str, key: str) -> log_pb2.LogEntry | None:
        def run(conn: sqlite3.Connection) -> log_pb2.LogEntry | None:
            row = conn.execute(
                "SELECT entry FROM logs WHERE job_id = ? AND key = ?", (job_id, key)
            ).fetchone()
            return None if row is None else log_pb2.LogEntry.FromString(row[0])

        return await self._read(run)

    async def list_logs(
        self, job_id: str, level: int, limit: int, kind: int = 0
    ) -> list[log_pb2.LogEntry]:
        where: list[str] = []
        args: list[Any] = []
        if job_id:
            where.append("job_id = ?")
            args.append(job_id)
        if kind:
            where.append("kind = ?")
            args.append(kind)
        if level:
            where.append("level = ?")
            args.append(level)
        sql = "SELECT entry FROM logs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY time_ns DESC, id DESC LIMIT ?"
        args.append(limit)

        def run(conn: sqlite3.Connection) -> list[log_pb2.LogEntry]:
            entries: list[log_pb2.LogEntry] = []
            size = 0
            for (entry,) in conn.execute(sql, args):
                entries.append(log_pb2.LogEntry.FromString(entry))
                size += len(entry)
                if size >= LIST_READ_BYTES:
                    break
            return entries

        return await self._read(run)

    # -- artifacts ---------------------------------------------------------

    async def put_artifact(
        self,
        artifact: artifact_pb2.Artifact,
        chunks: AsyncIterator[bytes],
        before_commit: Callable[[artifact_pb2.Artifact], Awaitable[None]] | None = None,
    ) -> artifact_pb2.Artifact:
        tmp = self._artifacts / ".tmp" / uuid.uuid4().hex
        digest = hashlib.sha256()
        size = 0
        loop = asyncio.get_running_loop()
        opening = loop.run_in_executor(None, lambda: open(tmp, "wb"))  # noqa: SIM115
        try:
            handle = await asyncio.shield(opening)
        except OSError as err:
            raise self._failed(err) from err
        except asyncio.CancelledError:
            # The thread opens the file all the same: its handle stayed open until the
            # garbage collector came, and the file in .tmp until the next start.
            opening.add_done_callback(lambda opened: _discard_upload(opened, tmp))
            raise
        try:
            async for chunk in chunks:
                digest.update(chunk)
                size += len(chunk)
                await loop.run_in_executor(None, handle.write, chunk)
            await loop.run_in_executor(None, _fsync_close, handle)
            meta = artifact_pb2.Artifact()
            meta.CopyFrom(artifact)
            meta.size_bytes = size
            meta.sha256 = digest.hexdigest()
            if before_commit is not None:
                await before_commit(meta)
        except BaseException as err:
            with contextlib.suppress(OSError):  # a full disk fails the close's flush too
                handle.close()
            tmp.unlink(missing_ok=True)
            if isinstance(err, OSError):
                raise self._failed(err) from err
            raise
        meta.create_time.FromNanoseconds(time.time_ns())
        final = self._artifacts / hashlib.sha256(artifact.job_id.encode()).hexdigest()[:32]
        # The name (up to 255 characters) shortened: a file name may have 255 bytes,
        # and the row, not the file name, says which artifact a file holds.
        target = final / f"{artifact.name[:200]}.{uuid.uuid4().hex[:8]}"

        def commit(conn: sqlite3.Connection) -> None:
            # On the writer, as deletions are: a job deleted during the upload gets no
            # artifact (its file would outlive it, unseen).
            job = conn.execute("SELECT 1 FROM jobs WHERE id = ?", (artifact.job_id,)).fetchone()
            if job is None:
                tmp.unlink(missing_ok=True)
                raise DomainError(Code.NOT_FOUND, f"job {artifact.job_id!r} not found")
            created = not final.exists()
            final.mkdir(exist_ok=True)
            try:
                os.replace(tmp, target)
                # The file's data was fsync'd; its name (and a new job directory) is
                # durable only once the directory is: else a crash after the row's
                # commit could leave an acknowledged artifact without its file.
                _fsync_dir(final)
                if created:
                    _fsync_dir(self._artifacts)
            except OSError:
                tmp.unlink(missing_ok=True)
                raise
            row = conn.execute(
                "SELECT path FROM artifacts WHERE job_id = ? AND name = ?",
                (artifact.job_id, artifact.name),
            ).fetchone()
            with conn:
                conn.execute(
                    "INSERT OR REPLACE INTO artifacts (job_id, name, meta, path) VALUES (?,?,?,?)",
                    (artifact.job_id, artifact.name, meta.SerializeToString(), _stored(target)),
                )
            if row is not None:
                self._artifact_file(row[0]).unlink(missing_ok=True)

        await self._write(commit)
        return meta

    async def open_artifact(
        self, job_id: str, name: str
    ) -> tuple[artifact_pb2.Artifact, AsyncIterator[bytes]] | None:
        def lookup(c: sqlite3.Connection) -> tuple[bytes, str] | None:
            found: tuple[bytes, str] | None = c.execute(
                "SELECT meta, path FROM artifacts WHERE job_id = ? AND name = ?", (job_id, name)
            ).fetchone()
            return found

        # A replacement (or the job's deletion) committed between the row's read and the
        # open removes the file the row named: read the row again. Only a row that names
        # the same missing file twice is storage trouble (a restore without its
        # artifacts/ directory); it was UNAVAILABLE for a read racing an upload.
        path, missing = "", None
        for _ in range(_OPEN_ATTEMPTS):
            row = await self._read(lookup)
            if row is None:
                return None
            if missing is not None and row[1] == path:
                raise self._failed(missing) from missing
            path = row[1]
            try:
                handle = open(self._artifact_file(path), "rb")  # noqa: ASYNC230, SIM115 - not blocking I/O of note
            except FileNotFoundError as err:
                missing = err
                continue
            except OSError as err:
                raise self._failed(err) from err
            break
        else:
            raise DomainError(
                Code.ABORTED, f"artifact {name!r} of job {job_id!r} was replaced; read it again"
            )
        meta = artifact_pb2.Artifact.FromString(row[0])

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

    # -- deleting ----------------------------------------------------------

    async def ended_jobs(self, before_ns: int, limit: int) -> list[str]:
        def run(conn: sqlite3.Connection) -> list[str]:
            rows = conn.execute(
                "SELECT id FROM jobs WHERE end_ns IS NOT NULL AND end_ns < ?"
                " ORDER BY end_ns LIMIT ?",
                (before_ns, limit),
            )
            return [r[0] for r in rows]

        return await self._read(run)

    async def delete_jobs(self, job_ids: Sequence[str]) -> list[Deleted]:
        ids = list(dict.fromkeys(job_ids))

        def run(conn: sqlite3.Connection) -> tuple[list[Deleted], list[str]]:
            # One transaction: the job, its events, keys, log lines and artifact rows go
            # together with the deletion's firehose entry (no deletion without its
            # entry, none without the deletion), and its files are listed in
            # artifact_trash, then removed.
            now_ns = time.time_ns()
            marks: list[event_pb2.JobEvent] = []
            files: list[str] = []
            conn.execute("BEGIN IMMEDIATE")
            try:
                for start in range(0, len(ids), _LOAD_CHUNK):
                    chunk = ids[start : start + _LOAD_CHUNK]
                    rows = conn.execute(
                        f"DELETE FROM jobs WHERE id IN ({_marks(chunk)})"
                        f" AND state IN ({_marks(_ENDED)}) RETURNING id, snapshot",
                        [*chunk, *_ENDED],
                    ).fetchall()
                    if not rows:
                        continue
                    gone = [r[0] for r in rows]
                    marks += [events.deletion(job_pb2.Job.FromString(r[1]), now_ns) for r in rows]
                    where = f"job_id IN ({_marks(gone)})"
                    for table in ("events", "job_keys", "logs"):
                        conn.execute(f"DELETE FROM {table} WHERE {where}", gone)
                    paths = conn.execute(
                        f"DELETE FROM artifacts WHERE {where} RETURNING path", gone
                    ).fetchall()
                    conn.executemany(
                        "INSERT OR IGNORE INTO artifact_trash (path) VALUES (?)", paths
                    )
                    files += [p[0] for p in paths]
                deleted = [Deleted(mark) for mark in marks]
                if marks and self.policy.firehose_retention_ns > 0:
                    self._log_n = None  # read the counter in this transaction
                    blobs = [(m.job_id, 0, m.SerializeToString(), "") for m in marks]
                    log_rows = self._log_rows(conn, now_ns, blobs)
                    conn.executemany(
                        "INSERT INTO firehose (n, time_ns, event) VALUES (?, ?, ?)", log_rows
                    )
                    deleted = [
                        Deleted(m, (ORIGIN, n))
                        for m, (n, _, _) in zip(marks, log_rows, strict=True)
                    ]
                conn.execute("COMMIT")
            except BaseException:
                self._abort(conn)
                raise
            return deleted, files

        async with self._write_lock:
            conn = self._writer_connection()
            deleted, files = await self._in_writer(lambda: run(conn))
            # Our own commit leaves data_version as it was: the cache must forget them.
            self._records.forget([d.job_id for d in deleted])
            if files:
                try:
                    await self._in_writer(lambda: self._empty_trash(conn, files))
                except StorageUnavailable as err:  # the jobs are gone: their files go later
                    log.warning("deleted artifacts' files remain until the next sweep: %s", err)
        return deleted

    async def finish_deletions(self) -> int:
        def run(conn: sqlite3.Connection) -> int:
            files = [r[0] for r in conn.execute("SELECT path FROM artifact_trash")]
            return self._empty_trash(conn, files) if files else 0

        return await self._write(run)

    def _empty_trash(self, conn: sqlite3.Connection, files: list[str]) -> int:
        """Removes the files (and their job's directory once empty), durably, then their
        trash rows. Returns how many."""
        dirs: set[Path] = set()
        for stored in files:
            file = self._artifact_file(stored)
            file.unlink(missing_ok=True)
            dirs.add(file.parent)
        for directory in dirs:
            try:
                directory.rmdir()  # fails, as it should, while another artifact is in it
            except FileNotFoundError:
                pass
            except OSError:
                _fsync_dir(directory)
        if dirs:
            _fsync_dir(self._artifacts)
        for start in range(0, len(files), _LOAD_CHUNK):
            chunk = files[start : start + _LOAD_CHUNK]
            with conn:
                conn.execute(f"DELETE FROM artifact_trash WHERE path IN ({_marks(chunk)})", chunk)
        return len(files)

    async def delete_jobless_logs(self, before_ns: int, limit: int) -> int:
        def run(conn: sqlite3.Connection) -> int:
            with conn:
                deleted = conn.execute(
                    "DELETE FROM logs WHERE id IN (SELECT id FROM logs WHERE no_job_ns < ?"
                    " ORDER BY no_job_ns, id LIMIT ?)",
                    (before_ns, limit),
                ).rowcount
                # UNKNOWN lines from before no_job_ns, by their own time, as they were.
                return (
                    deleted
                    + conn.execute(
                        "DELETE FROM logs WHERE id IN (SELECT id FROM logs WHERE job_id = ?"
                        " AND time_ns < ? AND no_job_ns IS NULL ORDER BY time_ns, id LIMIT ?)",
                        (validation.UNKNOWN_JOB, before_ns, limit - deleted),
                    ).rowcount
                )

        return await self._write(run)

    # -- internals ---------------------------------------------------------

    def _apply_batch(
        self, conn: sqlite3.Connection, commands: Sequence[JobCommand]
    ) -> list[Change | DomainError]:
        """Applies the commands in one transaction (see `_stage`) and commits it."""
        results, entries = self._stage(conn, commands)
        if entries is not None:
            try:
                conn.execute("COMMIT")
            except BaseException:
                self._abort(conn)
                raise
            self._records.committed(conn, entries)
        return results

    def _abort(self, conn: sqlite3.Connection) -> None:
        self._records.clear()
        self._log_n = None
        with contextlib.suppress(sqlite3.Error):  # a failed COMMIT may have rolled back
            conn.execute("ROLLBACK")

    def _stage(
        self, conn: sqlite3.Connection, commands: Sequence[JobCommand]
    ) -> tuple[list[Change | DomainError], dict[str, _Entry] | None]:
        """Applies the commands in one transaction, left open for the caller to commit
        (entries is None when nothing changed, and then no transaction is open): each
        job is read once and written once (its final state), events are inserted
        together and pruned once per job."""
        now_ns = time.time_ns()
        cache = self._records
        if not cache.check(conn):
            self._log_n = None  # another connection wrote: re-read the log counter
        before = cache.load(conn, {cmd.job_id for cmd in commands}, self.policy.retention)
        seen: dict[str, JobRecord | None] = {j: e[0] if e else None for j, e in before.items()}
        results: list[Change | DomainError] = []
        changed: dict[str, JobRecord] = {}
        new_events: list[tuple[str, int, bytes, str]] = []
        log_at: list[int] = []  # indices in `results` of the Applied changes
        for cmd in commands:
            try:
                change = events.apply(
                    seen[cmd.job_id], cmd.job_id, cmd.command, now_ns, self.policy
                )
            except DomainError as err:
                results.append(err)
                continue
            if isinstance(change, Applied):
                event = change.event
                seen[cmd.job_id] = changed[cmd.job_id] = change.record
                # The key ("" too: one per retained event, records.py) is stored with
                # its event, not on the job: a job row holding its 64 keys was ~2 KiB,
                # a page rewritten per event (measured: 12 us of the service's 65 per
                # event, in-process batches of 100 over 1,000 jobs).
                new_events.append(
                    (event.job_id, event.sequence, event.SerializeToString(), event.idempotency_key)
                )
                log_at.append(len(results))
            results.append(change)
        if not changed:
            return results, None
        inserts: list[tuple[Any, ...]] = []
        updates: list[tuple[Any, ...]] = []
        moves: list[tuple[Any, ...]] = []
        entries: dict[str, _Entry] = {}
        for job_id, record in changed.items():
            old = before[job_id]
            if old is None:
                row = _row(record)
                inserts.append(row)
                indexed: _Indexed = (row[1], row[4], row[5])
            else:
                row = _update_row(record)
                indexed = (row[0], row[2], row[3])
                # An UPDATE that names an indexed column rewrites its index entries even
                # when the value stays (5.3 against 3.3 us a row): the usual progress
                # event leaves state, lease and stall deadline as they are.
                if indexed == old[1]:
                    updates.append((row[1], row[5], job_id))
                else:
                    moves.append(row)
            entries[job_id] = (record, indexed)
        retention = self.policy.retention
        # Jobs this commit pushes out of the cache keep their keys in job_keys: the
        # next load then reads one row and the keys of later events (10 us against
        # 40 per job, reading every retained row). Only in the commit that lets them go.
        kept = [
            (job_id, record.job.sequence, _encode_keys(record.recent_keys[-retention:]))
            for job_id, record in cache.leaving(entries)
        ]
        last: dict[str, int] = {}
        for job_id, seq, _, _ in new_events:
            last[job_id] = seq
        # A job's events past the retention are deleted in steps of PRUNE_STEP, not one
        # DELETE per event (1.65 against 0.32 us per event, sqlite3 executemany over
        # 100 random jobs); readers never see more than the retention (events_after).
        prune = [
            (j, seq - retention)
            for j, seq in last.items()
            if _prune_step(seq, retention) > _prune_step(_sequence(before[j]), retention)
        ]
        log_rows: list[tuple[int, int, bytes]] = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            if inserts:
                conn.executemany(_INSERT_JOB, inserts)
            if moves:
                conn.executemany(
                    "UPDATE jobs SET state=?, seq=?, lease_expire_ns=?, stall_ns=?, end_ns=?,"
                    " snapshot=? WHERE id=?",
                    moves,
                )
            if updates:
                conn.executemany("UPDATE jobs SET seq=?, snapshot=? WHERE id=?", updates)
            conn.executemany(
                "INSERT INTO events (job_id, seq, event, key) VALUES (?, ?, ?, ?)", new_events
            )
            if kept:
                conn.executemany(
                    "INSERT OR REPLACE INTO job_keys (job_id, seq, keys) VALUES (?, ?, ?)", kept
                )
            if prune:
                conn.executemany("DELETE FROM events WHERE job_id = ? AND seq <= ?", prune)
            if self.policy.firehose_retention_ns > 0:
                log_rows = self._log_rows(conn, now_ns, new_events)
                conn.executemany(
                    "INSERT INTO firehose (n, time_ns, event) VALUES (?, ?, ?)", log_rows
                )
                self._prune_log(conn, now_ns)
        except BaseException:
            self._abort(conn)
            raise
        for i, (n, _, _) in zip(log_at, log_rows, strict=False):
            applied = results[i]
            assert isinstance(applied, Applied)
            # The constructor, not dataclasses.replace (several times slower, per event).
            results[i] = Applied(applied.record, applied.event, applied.created, (ORIGIN, n))
        return results, entries

    def _log_rows(
        self, conn: sqlite3.Connection, now_ns: int, new_events: list[tuple[str, int, bytes, str]]
    ) -> list[tuple[int, int, bytes]]:
        """Numbers the batch's events in the log, in commit order."""
        n = self._log_n
        if n is None:
            row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'firehose'").fetchone()
            n = int(row[0]) if row else 0
        rows = [(n + i + 1, now_ns, blob) for i, (_, _, blob, _) in enumerate(new_events)]
        self._log_n = n + len(rows)
        return rows

    def _prune_log(self, conn: sqlite3.Connection, now_ns: int) -> None:
        if now_ns - self._pruned_ns < PRUNE_EVERY_NS:
            return
        self._pruned_ns = now_ns
        cutoff = now_ns - self.policy.firehose_retention_ns
        # Entries are numbered in commit order, so the oldest comes first: while it is
        # not expired, skip the DELETE, whose search for expired rows (time_ns has no
        # index) would read the whole log every second, slower as the log grows.
        oldest = conn.execute("SELECT time_ns FROM firehose ORDER BY n LIMIT 1").fetchone()
        if oldest is None or oldest[0] >= cutoff:
            return
        conn.execute(
            "DELETE FROM firehose WHERE n IN"
            " (SELECT n FROM firehose WHERE time_ns < ? ORDER BY n LIMIT ?)",
            (cutoff, PRUNE_ROWS),
        )

    def _connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._open()
        return conn

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self._db_path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk (WAL fsync'd) before we acknowledge it.
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=5000")
        # Checkpoints run on their own thread (see _checkpoint_forever), not in commits.
        conn.execute("PRAGMA wal_autocheckpoint=0")
        # A WAL started over keeps its file (cut back to WAL_FILE_BYTES by the first
        # commit after the restart): commits overwrite blocks allocated and cached.
        conn.execute(f"PRAGMA journal_size_limit={WAL_FILE_BYTES}")
        with self._lock:
            self._connections.append(conn)
        return conn

    def _writer_connection(self) -> sqlite3.Connection:
        """The one write connection. `_write_lock` serialises its users: the loop
        (`apply`) and the writer thread (everything else, and each COMMIT of apply)."""
        if self._closed:
            raise StorageUnavailable("embedded store is closed")
        if self._wconn is None:
            try:
                self._wconn = self._open()
            except (sqlite3.DatabaseError, OSError) as err:  # e.g. "file is not a database"
                raise self._failed(err) from err
        return self._wconn

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        async with self._write_lock:
            conn = self._writer_connection()
            return await self._in_writer(lambda: fn(conn))

    async def _in_writer(self, call: Callable[[], T]) -> T:
        """Runs `call` on the writer thread; returns only once it is over, even when
        cancelled, so the connection is never used by two threads at once."""
        try:
            future = asyncio.get_running_loop().run_in_executor(self._writer, call)
        except RuntimeError as err:  # executor shut down
            raise StorageUnavailable(f"embedded store is closed: {err}") from err
        try:
            return await outlasting_cancel(future)
        except (sqlite3.DatabaseError, OSError) as err:
            raise self._failed(err) from err

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self._run(self._readers, fn)

    async def _run(self, pool: ThreadPoolExecutor, fn: Callable[[sqlite3.Connection], T]) -> T:
        def call() -> T:
            return fn(self._connection())

        try:
            return await asyncio.get_running_loop().run_in_executor(pool, call)
        except (sqlite3.DatabaseError, OSError) as err:
            raise self._failed(err) from err
        except RuntimeError as err:  # executor shut down
            raise StorageUnavailable(f"embedded store is closed: {err}") from err

    def _artifact_file(self, stored: str) -> Path:
        """An artifact's file in this data directory. Rows hold `<job hash>/<file>`;
        older ones the absolute path where the directory was then: only its last two
        parts count, so a data directory restored or mounted elsewhere keeps them."""
        path = Path(stored)
        return self._artifacts / path.parent.name / path.name

    def _failed(self, err: sqlite3.DatabaseError | OSError) -> StorageUnavailable:
        """UNAVAILABLE naming the file and the problem (disk full, read-only, corrupt),
        never an UNKNOWN with the driver's exception for the client."""
        if isinstance(err, OSError):
            return StorageUnavailable(f"embedded store in {self._dir}: {err}")
        name = getattr(err, "sqlite_errorname", "")
        hint = ""
        if name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")):
            hint = " (restore the data directory from a backup: README 'Backups')"
        elif name.startswith("SQLITE_IOERR") and _disk_full(self._dir):
            # SQLite says "disk I/O error" when it cannot even create its -wal/-shm file.
            hint = " (its file system is full)"
        return StorageUnavailable(f"embedded store {self._db_path}: {err}{hint}")


def _disk_full(path: Path) -> bool:
    try:
        return shutil.disk_usage(path).free < 64 * 1024
    except OSError:
        return False


def _stored(file: Path) -> str:
    """How a row names an artifact's file: relative to the artifacts directory."""
    return f"{file.parent.name}/{file.name}"


def _lock_data_dir(data_dir: Path) -> int:
    """An exclusive lock on the data directory, held while the store is open: a second
    service on the same directory would be a second writer, whose commits the first
    one's watchers, claims and firehose numbering know nothing of."""
    fd = os.open(data_dir / "jobwire.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        if err.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        raise StorageUnavailable(
            f"embedded store: the data directory {data_dir} is in use by another jobwire"
            f" service (pid {holder}); the embedded store serves one process"
            " (use MONGODB_URI for several replicas)"
        ) from None
    with contextlib.suppress(OSError):  # the pid only informs; a full disk may refuse it
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _marks(values: Collection[object]) -> str:
    return ",".join("?" * len(values))


def _prune_step(sequence: int, retention: int) -> int:
    """The prune step of a job whose newest event is `sequence` (-1: nothing to prune)."""
    return (sequence - retention) // PRUNE_STEP if sequence > retention else -1


def _sequence(entry: _Entry | None) -> int:
    return entry[0].job.sequence if entry is not None else 0


def _restart_wal(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchall()


def _discard_upload(opened: asyncio.Future[Any], tmp: Path) -> None:
    """Closes and removes an upload's temporary file whose upload was cancelled while
    it was being opened."""
    if not opened.cancelled() and opened.exception() is None:
        with contextlib.suppress(OSError):
            opened.result().close()
    tmp.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_close(handle: Any) -> None:
    handle.flush()
    os.fsync(handle.fileno())
    handle.close()


def _load(conn: sqlite3.Connection, job_id: str) -> JobRecord | None:
    """The job without its keys (Store.get)."""
    row = conn.execute("SELECT snapshot, token_hash FROM jobs WHERE id = ?", (job_id,)).fetchone()
    return None if row is None else JobRecord(job_pb2.Job.FromString(row[0]), row[1])


def _events_after(
    conn: sqlite3.Connection, job_id: str, sequence: int, retention: int
) -> list[event_pb2.JobEvent]:
    rows = conn.execute(
        "SELECT seq, event FROM events WHERE job_id = ? AND seq > ? ORDER BY seq",
        (job_id, sequence),
    ).fetchall()
    # The newest row is the job's sequence; rows past the retention that wait for
    # their (stepped) prune are not shown.
    oldest = rows[-1][0] - retention if rows else 0
    return [event_pb2.JobEvent.FromString(r[1]) for r in rows if r[0] > oldest]


def _recent_keys(
    conn: sqlite3.Connection, sequences: dict[str, int], retention: int
) -> dict[str, tuple[str, ...]]:
    """The idempotency keys of each job's retained events, oldest first, by the jobs'
    current sequences (at most 500 jobs: SQLite's limit on parameters): its job_keys
    row, then the keys of the events after it in the window."""
    found: dict[str, list[str]] = {job_id: [] for job_id in sequences}
    # Past this, per job: the window's start, or its job_keys row when newer.
    low = {job_id: seq - retention for job_id, seq in sequences.items()}
    for job_id, seq, value in conn.execute(
        f"SELECT job_id, seq, keys FROM job_keys WHERE job_id IN ({_marks(low)})",
        list(sequences),
    ):
        keys = _decode_keys(value)
        # `keys` are those of events seq - len + 1 .. seq.
        found[job_id] = list(keys[max(0, low[job_id] - (seq - len(keys))) :])
        low[job_id] = max(low[job_id], seq)
    # One range of the primary key per job. The event itself only for a row from
    # before events.key (NULL there).
    for job_id, key, event in conn.execute(
        f"WITH w(id, low) AS (VALUES {','.join(['(?, ?)'] * len(low))})"
        " SELECT e.job_id, e.key, CASE WHEN e.key IS NULL THEN e.event END"
        " FROM w JOIN events e ON e.job_id = w.id AND e.seq > w.low ORDER BY e.job_id, e.seq",
        [x for pair in low.items() for x in pair],
    ):
        found[job_id].append(
            key if key is not None else event_pb2.JobEvent.FromString(event).idempotency_key
        )
    return {job_id: tuple(keys) for job_id, keys in found.items()}


_LOAD_CHUNK = 500
# The stored state, lease_expire_ns and stall_ns of a job: its indexed columns.
_Indexed = tuple[int, "int | None", "int | None"]
# A cached job: its record and its indexed columns.
_Entry = tuple[JobRecord, _Indexed]


class _RecordCache:
    """The writer's copy of recently written jobs with their recent keys, so a job
    that keeps reporting is not re-read.

    Only the write connection's user uses it (under the write lock). Callers get the
    same JobRecord objects and must not mutate them (the domain never does). It is
    dropped when a transaction rolls back and
    when another connection (another process) committed since our last commit
    (`PRAGMA data_version`), so it never disagrees with the database.
    """

    def __init__(self, size: int = 2048) -> None:
        self._size = size
        self._entries: dict[str, _Entry] = {}
        self._version: int | None = None

    def clear(self) -> None:
        self._entries.clear()
        self._version = None

    def forget(self, job_ids: Sequence[str]) -> None:
        """Deleted jobs: a report for one must find it gone, not cached."""
        for job_id in job_ids:
            self._entries.pop(job_id, None)

    def _dropped(self, written: dict[str, _Entry]) -> list[str]:
        """The least recently written jobs past the size once `written` is in: the
        others first, in the order they were written, then `written`'s own."""
        if len(self._entries) + len(written) <= self._size:
            return []  # the usual batch, with room to spare: nothing to count
        extra = len(self._entries) + sum(j not in self._entries for j in written) - self._size
        older = (j for j in self._entries if j not in written)
        return list(itertools.islice(itertools.chain(older, written), max(extra, 0)))

    def check(self, conn: sqlite3.Connection) -> bool:
        """False (and the cache dropped) when another connection committed."""
        version = conn.execute("PRAGMA data_version").fetchone()[0]
        if version != self._version:
            self._entries.clear()
            self._version = version
            return False
        return True

    def load(
        self, conn: sqlite3.Connection, job_ids: set[str], retention: int
    ) -> dict[str, _Entry | None]:
        entries = self._entries
        found: dict[str, _Entry | None] = {}
        missing: list[str] = []
        for job_id in job_ids:
            entry = entries.get(job_id)
            if entry is None:
                missing.append(job_id)
                found[job_id] = None
            else:
                found[job_id] = entry
        for start in range(0, len(missing), _LOAD_CHUNK):
            chunk = missing[start : start + _LOAD_CHUNK]
            jobs = {
                job_id: (job_pb2.Job.FromString(snapshot), token_hash, (state, lease, stall))
                for job_id, snapshot, token_hash, state, lease, stall in conn.execute(
                    "SELECT id, snapshot, token_hash, state, lease_expire_ns, stall_ns"
                    f" FROM jobs WHERE id IN ({_marks(chunk)})",
                    chunk,
                )
            }
            if not jobs:
                continue
            keys = _recent_keys(conn, {j: job[0].sequence for j, job in jobs.items()}, retention)
            for job_id, (job, token_hash, indexed) in jobs.items():
                record = JobRecord(job=job, token_hash=token_hash, recent_keys=keys[job_id])
                found[job_id] = (record, indexed)
        return found

    def leaving(self, written: dict[str, _Entry]) -> list[tuple[str, JobRecord]]:
        """The jobs `committed(written)` will drop, each with its newest record."""
        return [
            (job_id, (written.get(job_id) or self._entries[job_id])[0])
            for job_id in self._dropped(written)
        ]

    def committed(self, conn: sqlite3.Connection, written: dict[str, _Entry]) -> None:
        entries = self._entries
        dropped = self._dropped(written)
        for job_id, entry in written.items():
            entries.pop(job_id, None)
            entries[job_id] = entry  # most recent last
        for job_id in dropped:
            del entries[job_id]
        # Our own commits leave data_version unchanged for this connection.
        self._version = conn.execute("PRAGMA data_version").fetchone()[0]


# job_keys.keys: "\x1e" + the keys joined by "\x1f", or a JSON array when a key holds
# either character. Job rows from before job_keys (copied into it by _migrate) may
# also hold keys of the form PREFIX + 64 lowercase hex digits with one PREFIX packed as
# b"\x01" + PREFIX + b"\x00" + the digests' raw bytes.
_KEYS_MARK = "\x1e"
_KEYS_SEP = "\x1f"
_HEX = 64


def _encode_keys(keys: Sequence[str]) -> str:
    # Written only when the cache lets a job go: cheap to build (2-3 us for 64 keys)
    # matters more than small (the packed form took ~35 us to build and read back).
    if not keys:
        return ""  # so that _KEYS_MARK alone is the one key ""
    joined = _KEYS_SEP.join(keys)
    if joined.count(_KEYS_SEP) != len(keys) - 1 or _KEYS_MARK in joined:
        return json.dumps(list(keys))
    return _KEYS_MARK + joined


def _decode_keys(value: str | bytes) -> tuple[str, ...]:
    if isinstance(value, bytes):
        end = value.index(0, 1)
        prefix = value[1:end].decode()
        digits = value[end + 1 :].hex()
        return tuple([prefix + digits[i : i + _HEX] for i in range(0, len(digits), _HEX)])
    if not value:
        return ()
    if value.startswith(_KEYS_MARK):
        return tuple(value[1:].split(_KEYS_SEP))
    return tuple(json.loads(value))


def _row(record: JobRecord) -> tuple[Any, ...]:
    job = record.job
    lease = job.lease_expire_time.ToNanoseconds() if job.HasField("lease_expire_time") else None
    return (
        job.kind,
        job.state,
        job.create_time.ToNanoseconds(),
        job.sequence,
        lease,
        events.stall_due_ns(job),
        events.end_ns(job),
        json.dumps(dict(job.labels), sort_keys=True),
        record.token_hash,
        "",  # keys: held by events.key
        job.SerializeToString(),
        job.id,
    )


def _update_row(record: JobRecord) -> tuple[Any, ...]:
    """What an event can change: kind, creation time, labels and token never do."""
    job = record.job
    lease = job.lease_expire_time.ToNanoseconds() if job.HasField("lease_expire_time") else None
    return (
        job.state,
        job.sequence,
        lease,
        events.stall_due_ns(job),
        events.end_ns(job),
        job.SerializeToString(),
        job.id,
    )


_INSERT_JOB = (
    "INSERT INTO jobs (kind, state, create_ns, seq, lease_expire_ns, stall_ns, end_ns,"
    " labels, token_hash, keys, snapshot, id) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)"
)


def _migrate(conn: sqlite3.Connection) -> None:
    """Creates the schema; adds what later versions added to an older database."""
    conn.executescript(_SCHEMA)
    columns = {row[1] for row in conn.execute("PRAGMA table_info(jobs)")}
    if "stall_ns" not in columns:
        conn.execute("ALTER TABLE jobs ADD COLUMN stall_ns INTEGER")
    conn.execute(
        "CREATE INDEX IF NOT EXISTS jobs_stall ON jobs(stall_ns) WHERE stall_ns IS NOT NULL"
    )
    if "end_ns" not in columns:
        _add_end_times(conn)
    conn.execute("CREATE INDEX IF NOT EXISTS jobs_ended ON jobs(end_ns) WHERE end_ns IS NOT NULL")
    if "key" not in {row[1] for row in conn.execute("PRAGMA table_info(events)")}:
        # The keys a job row held (as of its last event) become its job_keys, and the
        # row sheds them (once, here: the writes of events never name the column).
        with _immediate(conn):
            conn.execute("ALTER TABLE events ADD COLUMN key TEXT")
            conn.execute(
                "INSERT OR IGNORE INTO job_keys (job_id, seq, keys)"
                " SELECT id, seq, keys FROM jobs WHERE keys NOT IN ('', char(30))"
            )
            conn.execute("UPDATE jobs SET keys = '' WHERE keys != ''")
    if "kind" not in {row[1] for row in conn.execute("PRAGMA table_info(logs)")}:
        # LogEntry.kind: older lines take their job's kind (a line of no job: none).
        conn.execute("ALTER TABLE logs ADD COLUMN kind INTEGER NOT NULL DEFAULT 0")
        conn.execute(
            "UPDATE logs SET kind = COALESCE("
            "(SELECT kind FROM jobs WHERE jobs.id = logs.job_id), 0)"
        )
    conn.execute("CREATE INDEX IF NOT EXISTS logs_kind ON logs(kind, time_ns, id)")
    log_columns = {row[1] for row in conn.execute("PRAGMA table_info(logs)")}
    if "no_job_ns" not in log_columns:
        _add_no_job_times(conn)
    if "key" not in log_columns:
        conn.execute("ALTER TABLE logs ADD COLUMN key TEXT")  # WriteLog's idempotency key
    conn.execute(
        "CREATE UNIQUE INDEX IF NOT EXISTS logs_key ON logs(job_id, key) WHERE key IS NOT NULL"
    )
    conn.execute(
        "CREATE INDEX IF NOT EXISTS logs_no_job ON logs(no_job_ns, id) WHERE no_job_ns IS NOT NULL"
    )


def _add_no_job_times(conn: sqlite3.Connection) -> None:
    """logs.no_job_ns: the lines already there under an id that names no job (other
    than UNKNOWN, which ages by its own time) age out counted from now."""
    with _immediate(conn):
        conn.execute("ALTER TABLE logs ADD COLUMN no_job_ns INTEGER")
        conn.execute(
            "UPDATE logs SET no_job_ns = ? WHERE job_id != ?"
            " AND NOT EXISTS (SELECT 1 FROM jobs WHERE jobs.id = logs.job_id)",
            (time.time_ns(), validation.UNKNOWN_JOB),
        )


def _add_end_times(conn: sqlite3.Connection) -> None:
    """jobs.end_ns, filled for the jobs that ended before it existed (from their
    snapshots, once), so that JOBWIRE_JOB_RETENTION sees them too."""
    with _immediate(conn):
        conn.execute("ALTER TABLE jobs ADD COLUMN end_ns INTEGER")
        ended = conn.execute(
            f"SELECT id, snapshot FROM jobs WHERE state IN ({_marks(_ENDED)})",
            _ENDED,
        )
        conn.executemany(
            "UPDATE jobs SET end_ns = ? WHERE id = ?",
            [(events.end_ns(job_pb2.Job.FromString(blob)), job_id) for job_id, blob in ended],
        )


@contextlib.contextmanager
def _immediate(conn: sqlite3.Connection) -> Iterator[None]:
    """One write transaction on an autocommit connection, taken at once (BEGIN
    IMMEDIATE: no other writer can slip in between its read and its writes)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _number_log_from_the_clock(conn: sqlite3.Connection) -> None:
    """Each start numbers its firehose entries above the clock in µs (past the last
    number when that is higher). The log's one origin has the same name in every
    database, so a database restored from an older backup would number its new entries
    as the ones a consumer's position already covers and they would be skipped; a start
    after the restore numbers them above any number given out before it (a process
    writes far fewer than a million entries a second). Positions keep working: a jump
    in the numbers is no gap (nothing was written in between)."""
    base = time.time_ns() // 1000
    row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'firehose'").fetchone()
    if row is None:
        conn.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('firehose', ?)", (base,))
    elif int(row[0]) < base:
        conn.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'firehose'", (base,))


def _settle_retention(conn: sqlite3.Connection, retention: int) -> None:
    """Events are deleted in steps (see _stage): up to PRUNE_STEP - 1 rows per job
    older than the retention wait for their delete, unseen. When the retention was
    raised since they were written, they would come back into view (and their keys
    would not count as duplicates): delete them first, exactly at the old retention.
    A database from before this table is taken to have the current retention."""
    row = conn.execute("SELECT value FROM meta WHERE name = 'retention'").fetchone()
    if row is not None and row[0] == retention:
        return
    with _immediate(conn):
        if row is not None and row[0] < retention:
            conn.execute(
                "DELETE FROM events WHERE seq <= (SELECT seq FROM jobs WHERE jobs.id ="
                " events.job_id) - ?",
                (row[0],),
            )
        conn.execute(
            "INSERT OR REPLACE INTO meta (name, value) VALUES ('retention', ?)", (retention,)
        )


def _insert_job(conn: sqlite3.Connection, record: JobRecord) -> None:
    conn.execute(_INSERT_JOB, _row(record))
