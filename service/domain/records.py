"""What the store keeps per job, and the commands that change it."""

from __future__ import annotations

from dataclasses import dataclass, field

from jobwire.v1 import event_pb2, job_pb2, job_service_pb2, log_pb2

TERMINAL_STATES = frozenset(
    {job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_FAILED, job_pb2.JOB_STATE_CANCELLED}
)


@dataclass(slots=True)
class JobRecord:
    """A job as stored: the snapshot plus what only the service may see."""

    job: job_pb2.Job
    token_hash: bytes = b""
    # Idempotency keys of the retained events, oldest first; bounded by the
    # retention so that a job document never grows with its event count. An event
    # without a key may hold a "" (it counts towards the retention, as its event does).
    recent_keys: tuple[str, ...] = ()

    @property
    def terminal(self) -> bool:
        return self.job.state in TERMINAL_STATES


@dataclass(frozen=True, slots=True)
class Report:
    """A worker reported progress, success or failure (ReportEvent)."""

    request: job_service_pb2.ReportEventRequest


@dataclass(frozen=True, slots=True)
class Claim:
    """A worker takes a QUEUED job (ClaimJob)."""

    worker_id: str
    lease_ns: int


@dataclass(frozen=True, slots=True)
class ExpireLease:
    """A claim lapsed: requeue the job, or fail it past the attempt limit."""

    max_attempts: int


@dataclass(frozen=True, slots=True)
class Stall:
    """The progress sweep found a RUNNING job past a deadline: mark it STALLED, or
    fail it past `stall_fail_after`. A no-op when a later event arrived meanwhile."""


@dataclass(frozen=True, slots=True)
class Cancel:
    reason: str


@dataclass(frozen=True, slots=True)
class FailFromLog:
    """An ERROR log line fails a QUEUED or RUNNING job."""

    entry: log_pb2.LogEntry
    idempotency_key: str


Command = Report | Claim | ExpireLease | Cancel | FailFromLog | Stall

# Where an event sits in the firehose log: (origin, n). Each origin (a store
# process) numbers its entries 1, 2, 3, ... in the order it writes them.
LogPosition = tuple[str, int]


@dataclass(frozen=True, slots=True)
class JobCommand:
    """One command addressed to one job: the unit a store applies atomically."""

    job_id: str
    command: Command


@dataclass(frozen=True, slots=True)
class Applied:
    """The command changed the job: store `record`, publish `event`."""

    record: JobRecord
    event: event_pb2.JobEvent
    created: bool = False
    # Set by a store that keeps the firehose log, once the entry is written.
    position: LogPosition | None = None


@dataclass(frozen=True, slots=True)
class Deleted:
    """A job the store deleted: `event` (EVENT_TYPE_DELETED, events.deletion) is its
    firehose entry, written with the deletion; publish it as an applied event."""

    event: event_pb2.JobEvent
    position: LogPosition | None = None

    @property
    def job_id(self) -> str:
        return self.event.job_id


@dataclass(frozen=True, slots=True)
class Unchanged:
    """Nothing to write: a repeated idempotency key, or a no-op command."""

    job: job_pb2.Job
    duplicate: bool = True


Change = Applied | Unchanged


@dataclass(slots=True)
class Policy:
    """Tunables of the domain rules."""

    # Events (and their idempotency keys) kept per job for replay and dedup.
    retention: int = 64
    # Default claim lease when ClaimJob names none.
    lease_ns: int = 60 * 1_000_000_000
    # Claims after which an expired lease fails the job instead of requeueing.
    max_attempts: int = 3
    # How long the firehose log keeps events (JOBWIRE_FIREHOSE_RETENTION); 0: no log.
    firehose_retention_ns: int = 24 * 3600 * 1_000_000_000
    # Default progress deadline / stall failure per job kind (0 or absent: off).
    progress_deadline_ns: dict[int, int] = field(default_factory=dict)
    stall_fail_after_ns: dict[int, int] = field(default_factory=dict)
