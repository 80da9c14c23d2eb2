"""The storage port: everything the service needs from a database, nothing more.

Adapters (embedded SQLite, MongoDB) implement `Store`. The rules they share:
- `apply` writes each command's outcome as one atomic step: the job snapshot, its
  sequence number, its bounded ring of retained events and idempotency keys. A
  batch is one commit (SQLite transaction / one unordered bulk write), yet each
  command gets its own outcome.
- A method returns only once its write is durable (SQLite synchronous=FULL,
  MongoDB w=majority by default); an unreachable store raises StorageUnavailable.
- Adapters call `service.domain.events.apply` for every change and know nothing of
  gRPC or HTTP.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from jobwire.v1 import artifact_pb2, event_pb2, job_pb2, log_pb2

from ..domain.errors import DomainError
from ..domain.records import (
    Applied,
    Change,
    Deleted,
    JobCommand,
    JobRecord,
    LogPosition,
    Policy,
)

# Artifacts are moved in chunks of this size: small enough for one gRPC message
# (4 MiB limit), large enough to keep per-chunk overhead low.
CHUNK_SIZE = 1024 * 1024


@dataclass(frozen=True, slots=True)
class JobQuery:
    """A page of ListJobs, ordered by (create_time, id) ascending, or descending when
    `newest_first`."""

    states: tuple[int, ...] = ()
    kind: int = job_pb2.JOB_KIND_UNSPECIFIED
    labels: dict[str, str] = field(default_factory=dict)
    limit: int = 50
    # Exclusive cursor: (create_time in ns, id) of the last job of the previous page.
    after: tuple[int, str] | None = None
    newest_first: bool = False


@dataclass(frozen=True, slots=True)
class LogEntry:
    """One event in the firehose log: entry `n` of `origin`, written at `time_ns`."""

    origin: str
    n: int
    time_ns: int
    event: event_pb2.JobEvent


# A listing stops reading rows once they add up to this (ListLogs answers at most
# 3 MiB): 1,000 log lines of 256 KiB were 256 MB read for one answer, and on FerretDB
# a reply past its 48 MB message limit.
LIST_READ_BYTES = 4 * 1024 * 1024


class Store(Protocol):
    """An async job store. Each method is one round trip where the database allows."""

    policy: Policy
    # The firehose log's origin when this process writes every entry of it (the
    # embedded store: its watermark is exact, fanout.anchor); "" when other processes
    # write to the log too (MongoDB replicas).
    single_writer_origin: str
    # Committed events whose firehose log entry could not be written, since start
    # (MongoDB appends them after the commit; the embedded store in the same
    # transaction, so 0 there). A gauge (service/metrics.py).
    log_failures: int

    async def start(self) -> None:
        """Connects, creates tables or indexes idempotently; a second call on a started
        store does nothing more."""

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raises StorageUnavailable when the store cannot serve."""

    async def settle_in_doubt(self) -> list[Applied]:
        """The events of earlier writes whose answer was lost (a connection reset after
        sending them) and that did land, now in the firehose log, for the caller to
        publish: their callbacks' retries were acknowledged as duplicates. No I/O
        unless such writes exist; a store whose writes cannot be in doubt returns []."""

    async def create(self, record: JobRecord) -> None:
        """Inserts a new job. Raises ALREADY_EXISTS when its id is taken."""

    async def get(self, job_id: str) -> JobRecord | None:
        """The job and its token hash, for reads and token checks. `recent_keys` is
        left empty: only `apply` needs them, and they cost a read of their own (a job's
        whole ring of retained events on MongoDB)."""

    async def list_jobs(self, query: JobQuery) -> list[job_pb2.Job]:
        """Up to `query.limit` jobs after `query.after`."""

    async def apply(self, commands: Sequence[JobCommand]) -> list[Change | DomainError]:
        """Applies each command to its job atomically; one commit for the batch."""

    async def claim(self, kind: int, worker_id: str, lease_ns: int) -> Applied | None:
        """Atomically moves the oldest QUEUED job of `kind` to RUNNING with a lease."""

    async def expired_leases(self, now_ns: int, limit: int) -> list[str]:
        """Ids of RUNNING jobs whose lease lapsed before `now_ns`."""

    async def stalled_jobs(self, now_ns: int, limit: int) -> list[str]:
        """Ids of RUNNING jobs whose progress deadline (or stall failure) is due."""

    async def events_after(self, job_id: str, sequence: int) -> list[event_pb2.JobEvent]:
        """Retained events of a job with a sequence number above `sequence`, ascending."""

    async def get_with_events(
        self, job_id: str, sequence: int
    ) -> tuple[JobRecord, list[event_pb2.JobEvent]] | None:
        """`get` and `events_after(sequence)` in one read, from one snapshot of the job
        (the events end at the record's sequence); None when there is no such job."""

    # The firehose log (when `policy.firehose_retention_ns` > 0): every applied event,
    # written with its job's change (embedded: same transaction; MongoDB: same group
    # commit, right after the job updates), numbered 1, 2, 3, ... per origin (a store
    # process) in write order; `Applied.position` says where. Entries older than the
    # retention are skipped by the reads below and deleted eventually.

    async def log_bounds(self, since_ns: int) -> dict[str, tuple[int, int]]:
        """Per origin with entries: (oldest n written after `since_ns`, newest n);
        oldest is newest + 1 when all of the origin's entries are older."""

    async def log_after(self, origin: str, n: int, since_ns: int, limit: int) -> list[LogEntry]:
        """Up to `limit` entries of `origin` numbered above `n` and written after
        `since_ns`, ascending; fewer (at least one) when they are large, so only an
        empty list says there are no more."""

    async def write_log(
        self, entry: log_pb2.LogEntry, of_no_job: bool = False, key: str = ""
    ) -> log_pb2.LogEntry | None:
        """Stores a line; `of_no_job` when the caller found no job of its id (an
        `UNKNOWN` line, a video id, a deleted job's): nothing deletes such a line with
        a job, so `delete_jobless_logs` ages it out by its record time. The store asks
        again as it writes: a job deleted or made since decides, not `of_no_job`. With
        `key`, a line stored before under (entry.job_id, key) is returned and nothing
        is written; None when this one was stored."""

    async def keyed_log(self, job_id: str, key: str) -> log_pb2.LogEntry | None:
        """The line stored under (`job_id`, `key`) by `write_log`, if any."""

    async def list_logs(
        self, job_id: str, level: int, limit: int, kind: int = 0
    ) -> list[log_pb2.LogEntry]:
        """Newest first (by time, then arrival); `job_id` "" means every job, `kind` 0
        every kind (LogEntry.kind). Fewer than `limit` (at least one) once the lines
        read add up to LIST_READ_BYTES: an answer holds 3 MiB at most anyway."""

    async def put_artifact(
        self,
        artifact: artifact_pb2.Artifact,
        chunks: AsyncIterator[bytes],
        before_commit: Callable[[artifact_pb2.Artifact], Awaitable[None]] | None = None,
    ) -> artifact_pb2.Artifact:
        """Streams chunks to storage, replacing a same-named artifact; fills size and sha256.
        `before_commit` gets the artifact (its size and sha256 filled) once the content is
        stored, before it is visible: what it raises stores nothing (an upload can take
        minutes; the job may end meanwhile)."""

    async def open_artifact(
        self, job_id: str, name: str
    ) -> tuple[artifact_pb2.Artifact, AsyncIterator[bytes]] | None:
        """The artifact's metadata and an iterator over its content in CHUNK_SIZE pieces."""

    async def list_artifacts(self, job_id: str) -> list[artifact_pb2.Artifact]: ...

    # Deleting (DeleteJob, JOBWIRE_JOB_RETENTION: service/retention.py). Readers see a
    # job whole or not at all: the job and its events vanish in one step, before its
    # artifacts and log lines; a deletion cut short (a crash) is finished by
    # `finish_deletions`, so no artifact's bytes outlive their job.

    async def ended_jobs(self, before_ns: int, limit: int) -> list[str]:
        """Ids of up to `limit` jobs that ended (SUCCEEDED, FAILED, CANCELLED) before
        `before_ns`, the longest ended first."""

    async def delete_jobs(self, job_ids: Sequence[str]) -> list[Deleted]:
        """Deletes those of `job_ids` that have ended, with their retained events, log
        lines and artifacts (their content too); the jobs it deleted, each with its
        firehose entry (EVENT_TYPE_DELETED) and where that is in the log, for the caller
        to publish. The entry is written in the step that removes the job (embedded: the
        same transaction; MongoDB: kept in the deletion's mark until it is appended), so
        there is no deletion without its entry and no entry without the deletion. A job
        that has not ended, or is not there, is left alone."""

    async def finish_deletions(self) -> int:
        """Completes deletions cut short (artifact content, log lines of jobs already
        gone); how many jobs' remains it removed."""

    async def delete_jobless_logs(self, before_ns: int, limit: int) -> int:
        """Deletes up to `limit` log lines of no job received before `before_ns` (and
        `UNKNOWN` lines from before `write_log`'s `of_no_job`, timed before it), the
        oldest first; how many."""

    async def queue_depths(self) -> dict[int, int]:
        """Number of QUEUED jobs per kind (for metrics)."""

    def event_feed(self, max_docs: int = 0) -> EventFeed | None:
        """A feed shared with the other service processes on this database (see
        EventFeed), holding at most `max_docs` entries (0: the store's default); None
        when the store serves one process only (the embedded store)."""


class FeedUnsupported(Exception):
    """The database cannot hold an event feed (e.g. no capped collections)."""


class EventFeed(Protocol):
    """An optional capability of a store shared by several service processes.

    Every replica appends the events it applied and tails everybody's, so a watcher
    on one replica sees progress reported through another (service/feed.py). The
    job's ring of retained events stays the source of truth: a feed entry may be
    lost (a crash between the job update and the append) and watchers heal from
    the ring, so appending needs no stronger durability than the feed can give.
    A single-process store (embedded) has none.
    """

    async def open(self) -> None:
        """Creates the feed idempotently. Raises FeedUnsupported or StorageUnavailable."""

    async def append(
        self,
        origin: str,
        events: Sequence[event_pb2.JobEvent],
        positions: Sequence[LogPosition | None] = (),
    ) -> None:
        """One write for the whole batch, in the given order; `positions[i]` is the
        firehose position of `events[i]`, carried to the other replicas."""

    def tail(self) -> AsyncIterator[list[tuple[str, event_pb2.JobEvent, LogPosition | None]]]:
        """Batches of (origin, event, position) appended after the first call, in feed order.

        Raises StorageUnavailable when the database goes away; calling `tail()`
        again resumes after the last entry delivered (possibly repeating a few).
        """

    async def close(self) -> None: ...
