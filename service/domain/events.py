"""Event application: the state machine, idempotency and leases, as pure functions.

A store loads a job's record, calls `apply`, and writes the returned record and
event in one atomic step (or retries when the job changed underneath it).
"""

from __future__ import annotations

from jobwire.v1 import event_pb2, job_pb2, job_service_pb2

from . import tokens, validation
from .errors import Code, DomainError, invalid, not_found
from .records import (
    TERMINAL_STATES,
    Applied,
    Cancel,
    Change,
    Claim,
    Command,
    ExpireLease,
    FailFromLog,
    JobRecord,
    Policy,
    Report,
    Stall,
    Unchanged,
)

_S = job_pb2


def validate_report(request: job_service_pb2.ReportEventRequest) -> None:
    """Checks a report before any storage is touched."""
    if request.create_kind:  # may create the job
        validation.new_job_id(request.job_id)
    else:
        validation.job_id(request.job_id)
    validation.idempotency_key(request.idempotency_key)
    validation.optional_kind(request.create_kind, "create_kind")
    validation.optional_kind(request.kind, "kind")
    if request.kind and request.create_kind and request.kind != request.create_kind:
        raise invalid("kind and create_kind must be the same kind")
    if request.create_kind == _S.JOB_KIND_VIDEO:
        # A video job needs job.video.url, which a report cannot carry: only CreateJob
        # makes one.
        raise invalid("create_kind must not be JOB_KIND_VIDEO: a video job needs job.video.url")
    payload = request.WhichOneof("payload")
    if payload is None:
        raise invalid("one of progress, completed or failed is required")
    # Each submessage read once: every `request.progress` builds (and drops) a new
    # Python wrapper around it, per event of every batch.
    if payload == "progress":
        progress = request.progress
        validation.percent(progress.percent)
        validation.message(progress.message, "progress.message")
        # Unset, each is 0: valid.
        validation.media_duration(progress.media_time, "progress.media_time")
        validation.media_duration(progress.media_duration, "progress.media_duration")
        validation.timestamp(progress.report_time, "progress.report_time")
    elif payload == "completed":
        completed = request.completed
        validation.media_duration(completed.media_duration, "completed.media_duration")
        validation.media_duration(completed.processing_time, "completed.processing_time")
        validation.finite_numbers(completed.metadata, "completed.metadata")
    elif payload == "failed":
        failed = request.failed
        validation.message(failed.message, "failed.message")
        validation.finite_numbers(failed.details, "failed.details")
    if request.HasField("event_time"):
        validation.timestamp(request.event_time, "event_time")
    if len(request.process_id) > 256:
        raise invalid("process_id must be at most 256 characters")
    validation.event_size(request.ByteSize())


def new_record(
    job_id: str,
    kind: job_pb2.JobKind.ValueType,
    now_ns: int,
    template: job_pb2.Job | None = None,
    policy: Policy | None = None,
    token: str = "",
) -> tuple[JobRecord, str]:
    """A QUEUED job and its one-time callback token (`token` when the caller chose
    one, else a fresh one)."""
    job = _queued(job_id, kind, now_ns, policy)
    job.has_callback_token = True
    if template is not None:
        job.labels.update(template.labels)
        if template.HasField("video"):
            job.video.CopyFrom(template.video)
        for name in ("progress_deadline", "stall_fail_after"):
            if template.HasField(name):
                getattr(job, name).CopyFrom(getattr(template, name))
    token, token_hash = (token, tokens.digest(token)) if token else tokens.issue()
    return JobRecord(job=job, token_hash=token_hash), token


def _queued(
    job_id: str, kind: job_pb2.JobKind.ValueType, now_ns: int, policy: Policy | None = None
) -> job_pb2.Job:
    job = job_pb2.Job(id=job_id, kind=kind, state=_S.JOB_STATE_QUEUED)
    job.create_time.FromNanoseconds(now_ns)
    job.update_time.FromNanoseconds(now_ns)
    if policy is not None:
        # Per-kind defaults (JOBWIRE_PROGRESS_DEADLINE_<KIND>, ..._STALL_FAIL_AFTER_<KIND>).
        if deadline := policy.progress_deadline_ns.get(kind, 0):
            job.progress_deadline.FromNanoseconds(deadline)
        if fail_after := policy.stall_fail_after_ns.get(kind, 0):
            job.stall_fail_after.FromNanoseconds(fail_after)
    return job


def stall_due_ns(job: job_pb2.Job) -> int | None:
    """When the progress sweep must next look at a RUNNING job (None: never): its
    progress deadline until it is stalled, then its stall failure deadline."""
    if job.state != _S.JOB_STATE_RUNNING:
        return None
    deadline = 0 if job.stalled else job.progress_deadline.ToNanoseconds()
    if not deadline:
        deadline = job.stall_fail_after.ToNanoseconds()
    if deadline <= 0:
        return None
    return _last_sign_of_life(job) + deadline


def end_ns(job: job_pb2.Job) -> int | None:
    """When an ended job ended (None while it has not): what JOBWIRE_JOB_RETENTION
    counts from. Its update time for a job stored without an end time."""
    if job.state not in TERMINAL_STATES:
        return None
    stamp = job.end_time if job.HasField("end_time") else job.update_time
    return stamp.ToNanoseconds()


def deletion(job: job_pb2.Job, now_ns: int) -> event_pb2.JobEvent:
    """The firehose entry of the job's deletion (WatchJobsResponse.deleted): its kind
    and end state route it like the job's terminal event; its `job_create_time` tells
    the deleted job from one made again under its id; `create_time` is the deletion's."""
    event = event_pb2.JobEvent(
        job_id=job.id,
        kind=job.kind,
        sequence=job.sequence,
        type=event_pb2.EVENT_TYPE_DELETED,
        state=job.state,
    )
    event.create_time.FromNanoseconds(now_ns)
    event.job_create_time.CopyFrom(job.create_time)
    return event


def _last_sign_of_life(job: job_pb2.Job) -> int:
    if job.HasField("last_event_time"):
        return job.last_event_time.ToNanoseconds()
    if job.HasField("start_time"):
        return job.start_time.ToNanoseconds()
    return job.update_time.ToNanoseconds()


def check_token(record: JobRecord, token: str) -> None:
    """Raises UNAUTHENTICATED unless `token` is the job's callback token."""
    if token and not tokens.matches(token, record.token_hash):
        raise DomainError(
            Code.UNAUTHENTICATED, f"callback token does not match job {record.job.id!r}"
        )


def apply(
    record: JobRecord | None, job_id: str, command: Command, now_ns: int, policy: Policy
) -> Change:
    """The one place where a job changes. Never mutates `record`."""
    created = False
    if record is None:
        if isinstance(command, Report) and command.request.create_kind:
            # Announced only by its outcome (AuroraCloud): no worker holds a token.
            record = JobRecord(job=_queued(job_id, command.request.create_kind, now_ns, policy))
            created = True
        else:
            raise not_found(job_id)
    elif isinstance(command, Report):
        if command.request.kind and record.job.kind != command.request.kind:
            # Another contract's job: as unknown to this caller as a missing one.
            raise not_found(job_id)
        check_token(record, command.request.callback_token)

    key = _key_of(command)
    # Trimmed: a record stored under a larger retention holds more keys than it keeps.
    if (
        key
        and key in record.recent_keys[-policy.retention :]
        and not _renewal_due(record.job, command, now_ns)
    ):
        return Unchanged(record.job)

    job = job_pb2.Job()
    job.CopyFrom(record.job)
    event = event_pb2.JobEvent(job_id=job.id, kind=job.kind, idempotency_key=key)

    match command:
        case Report(request=request):
            _report(job, event, request, now_ns, policy.lease_ns)
        case Claim(worker_id=worker_id, lease_ns=lease_ns):
            if job.state != _S.JOB_STATE_QUEUED:
                raise _precondition(job, "only a QUEUED job can be claimed")
            job.state = _S.JOB_STATE_RUNNING
            job.worker_id = worker_id
            job.attempts += 1
            job.lease_duration.FromNanoseconds(lease_ns)
            job.lease_expire_time.FromNanoseconds(now_ns + lease_ns)
            _started(job, now_ns)
            _alive(job, now_ns)
            event.type = event_pb2.EVENT_TYPE_CLAIMED
        case ExpireLease(max_attempts=max_attempts):
            if job.state != _S.JOB_STATE_RUNNING or not _lease_expired(job, now_ns):
                return Unchanged(record.job, duplicate=False)
            lease_ns = job.lease_duration.ToNanoseconds()
            _release(job)
            if job.attempts >= max_attempts:
                job.state = _S.JOB_STATE_FAILED
                job.error.code = "LEASE_EXPIRED"
                job.error.message = f"lease expired after {job.attempts} attempt(s)"
                job.end_time.FromNanoseconds(now_ns)
                event.type = event_pb2.EVENT_TYPE_FAILED
                event.error.CopyFrom(job.error)
            else:
                job.state = _S.JOB_STATE_QUEUED
                # Kept for the worker that went quiet: its late progress takes the
                # claim back for as long (see _report).
                job.lease_duration.FromNanoseconds(lease_ns)
                event.type = event_pb2.EVENT_TYPE_REQUEUED
        case Cancel(reason=reason):
            if record.terminal:
                raise _precondition(job, "a terminal state is final")
            _release(job)
            job.state = _S.JOB_STATE_CANCELLED
            job.error.code = "CANCELLED"
            job.error.message = reason or "cancelled"
            job.end_time.FromNanoseconds(now_ns)
            event.type = event_pb2.EVENT_TYPE_CANCELLED
            event.error.CopyFrom(job.error)
        case Stall():
            due = stall_due_ns(job)
            if due is None or due > now_ns:
                return Unchanged(record.job, duplicate=False)
            if not job.stalled and job.progress_deadline.ToNanoseconds() > 0:
                job.stalled = True
                event.type = event_pb2.EVENT_TYPE_STALLED
            else:
                quiet_s = (now_ns - _last_sign_of_life(job)) / 1e9
                _release(job)
                job.state = _S.JOB_STATE_FAILED
                job.error.code = "STALLED"
                job.error.message = f"no event for {quiet_s:.0f}s (stall_fail_after)"
                job.end_time.FromNanoseconds(now_ns)
                event.type = event_pb2.EVENT_TYPE_FAILED
                event.error.CopyFrom(job.error)
        case FailFromLog(entry=entry):
            if record.terminal:
                return Unchanged(record.job, duplicate=False)
            _release(job)
            job.state = _S.JOB_STATE_FAILED
            job.error.code = "ERROR_LOG"
            job.error.message = entry.message
            job.end_time.FromNanoseconds(now_ns)
            event.type = event_pb2.EVENT_TYPE_FAILED
            event.error.CopyFrom(job.error)

    job.sequence += 1
    job.update_time.FromNanoseconds(now_ns)
    event.sequence = job.sequence
    event.state = job.state
    event.worker_id = job.worker_id
    event.create_time.FromNanoseconds(now_ns)
    if job.sequence == 1:
        event.job_create_time.CopyFrom(job.create_time)
    if event.type == event_pb2.EVENT_TYPE_PROGRESS:
        event.progress.CopyFrom(job.progress)
    # One entry per retained event, "" for one without a key (a claim, requeue, cancel
    # or stall), so a key is forgotten exactly when its event is no longer retained.
    keys = (*record.recent_keys, key)[-policy.retention :]
    new = JobRecord(job=job, token_hash=record.token_hash, recent_keys=keys)
    return Applied(record=new, event=event, created=created)


def _report(
    job: job_pb2.Job,
    event: event_pb2.JobEvent,
    request: job_service_pb2.ReportEventRequest,
    now_ns: int,
    lease_ns: int,
) -> None:
    if job.state in (_S.JOB_STATE_SUCCEEDED, _S.JOB_STATE_FAILED, _S.JOB_STATE_CANCELLED):
        raise _precondition(job, "a terminal state is final")
    if request.process_id:
        job.process_id = request.process_id
    _alive(job, now_ns)
    payload = request.WhichOneof("payload")
    if payload == "progress":
        if request.percent_not_given or request.keep_media_times:
            _keep_unset(job.progress, request.progress, request.percent_not_given)
        else:
            job.progress.CopyFrom(request.progress)
        if request.HasField("event_time"):
            job.progress.report_time.CopyFrom(request.event_time)
        if job.state == _S.JOB_STATE_QUEUED and job.HasField("lease_duration"):
            # Requeued when its lease lapsed, yet its worker is still at it: it holds
            # the claim again. Without a lease the job would stay RUNNING for good
            # if that worker then went silent, never handed out again nor failed.
            job.lease_expire_time.FromNanoseconds(now_ns)  # renewed just below
        elif job.state == _S.JOB_STATE_QUEUED and job.kind == job_pb2.JOB_KIND_VIDEO:
            # A video is handed out by claims only (the pull worker's contract): one
            # reported on without a claim is held by its reporter from now on, on the
            # default lease. It stayed RUNNING with no lease, never handed out again
            # nor failed, once that worker went silent.
            job.lease_duration.FromNanoseconds(lease_ns)
            job.lease_expire_time.FromNanoseconds(now_ns)  # renewed just below
        job.state = _S.JOB_STATE_RUNNING
        _started(job, now_ns)
        if job.HasField("lease_expire_time"):
            # Every event from the worker renews its claim.
            job.lease_expire_time.FromNanoseconds(now_ns + job.lease_duration.ToNanoseconds())
        event.type = event_pb2.EVENT_TYPE_PROGRESS
    elif payload == "completed":
        _release(job)
        job.state = _S.JOB_STATE_SUCCEEDED
        job.result.CopyFrom(request.completed)
        job.progress.percent = 100.0
        job.end_time.FromNanoseconds(now_ns)
        event.type = event_pb2.EVENT_TYPE_COMPLETED
        event.result.CopyFrom(request.completed)
    else:
        _release(job)
        job.state = _S.JOB_STATE_FAILED
        job.error.CopyFrom(request.failed)
        job.end_time.FromNanoseconds(now_ns)
        event.type = event_pb2.EVENT_TYPE_FAILED
        event.error.CopyFrom(request.failed)


def _keep_unset(
    progress: job_pb2.Progress, report: job_pb2.Progress, percent_not_given: bool
) -> None:
    """`report` over the job's `progress`, for a worker whose media times are each
    optional: a media time the report leaves unset stays. When it did not say its
    percent either, the percent follows the media times when the report brings one
    and both are then known, else stays."""
    previous = job_pb2.Progress()
    previous.CopyFrom(progress)
    progress.CopyFrom(report)
    given_time, given_total = report.HasField("media_time"), report.HasField("media_duration")
    if not given_time and previous.HasField("media_time"):
        progress.media_time.CopyFrom(previous.media_time)
    if not given_total and previous.HasField("media_duration"):
        progress.media_duration.CopyFrom(previous.media_duration)
    if not percent_not_given:
        return
    # Kept unless the media times give one (a length of 0, not known yet, gives none).
    progress.percent = previous.percent
    total = progress.media_duration.ToNanoseconds()
    if (given_time or given_total) and progress.HasField("media_time") and total > 0:
        progress.percent = min(100.0, progress.media_time.ToNanoseconds() / total * 100)


def _renewal_due(job: job_pb2.Job, command: Command, now_ns: int) -> bool:
    """Whether a progress report seen before is the worker's sign of life, not a retry.

    A verbatim repeat is a retry, applied once. But a worker whose download stalls
    repeats the same body (no timestamp, the same percent), and as a duplicate it
    renewed nothing: its claim lapsed and the video went to another worker. So once
    the claim or the progress deadline is half gone (or the claim has lapsed), the
    repeat is applied and renews them. A retry comes long before that: the first
    attempt, if it landed, renewed both."""
    if not isinstance(command, Report) or not command.request.HasField("progress"):
        return False
    if job.state == _S.JOB_STATE_QUEUED:
        return job.HasField("lease_duration")  # requeued: the worker takes it back
    if job.state != _S.JOB_STATE_RUNNING:
        return False
    if job.HasField("lease_expire_time"):
        left = job.lease_expire_time.ToNanoseconds() - now_ns
        if left <= job.lease_duration.ToNanoseconds() // 2:
            return True
    deadline = job.progress_deadline.ToNanoseconds()
    return deadline > 0 and now_ns - job.last_event_time.ToNanoseconds() >= deadline // 2


def _key_of(command: Command) -> str:
    if isinstance(command, Report):
        return command.request.idempotency_key
    if isinstance(command, FailFromLog):
        return command.idempotency_key
    return ""


def _started(job: job_pb2.Job, now_ns: int) -> None:
    if not job.HasField("start_time"):
        job.start_time.FromNanoseconds(now_ns)


def _alive(job: job_pb2.Job, now_ns: int) -> None:
    """A sign of life from the worker: restarts the progress deadline, clears a stall."""
    job.last_event_time.FromNanoseconds(now_ns)
    job.stalled = False


def _release(job: job_pb2.Job) -> None:
    job.ClearField("lease_expire_time")
    job.ClearField("lease_duration")
    job.worker_id = ""
    job.stalled = False


def _lease_expired(job: job_pb2.Job, now_ns: int) -> bool:
    return job.HasField("lease_expire_time") and job.lease_expire_time.ToNanoseconds() <= now_ns


def _precondition(job: job_pb2.Job, rule: str) -> DomainError:
    state = job_pb2.JobState.Name(job.state)
    return DomainError(Code.FAILED_PRECONDITION, f"job {job.id!r} is {state}: {rule}")
