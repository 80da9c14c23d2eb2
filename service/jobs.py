"""The use cases behind JobService: validation, storage, group commit, fan-out.

Nothing here knows gRPC: it takes and returns protobuf messages and raises
DomainError, which the servicer turns into a status.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import json
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING

from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message

from jobwire.v1 import artifact_pb2, event_pb2, job_pb2, job_service_pb2, log_pb2

from .committer import Committer, settle_in_doubt
from .domain import events, tokens, validation
from .domain.errors import Code, DomainError, invalid, not_found
from .domain.records import (
    TERMINAL_STATES,
    Applied,
    Cancel,
    Deleted,
    ExpireLease,
    FailFromLog,
    JobCommand,
    JobRecord,
    Policy,
    Report,
    Stall,
    Unchanged,
)
from .fanout import Fanout, Item, Subscription, SubscriptionClosed
from .firehose import Firehose, Gap, Live
from .job_locks import KeyedLocks
from .metrics import (
    COALESCED_DELIVERIES,
    EVENTS_APPLIED,
    JOBS_DELETED,
    JOBS_STALL_FAILED,
    JOBS_STALLED,
    STREAM_GAPS,
)
from .store.port import JobQuery, Store
from .tasks import outlasting_cancel
from .watch_reads import SharedReads

if TYPE_CHECKING:
    from .feed import FeedRelay

log = logging.getLogger("jobwire.jobs")

MAX_PAGE_SIZE = 1000
MAX_PAGE_BYTES = 3 * 1024 * 1024  # a ListJobs or ListJobEvents answer: under gRPC's 4 MiB
MAX_BATCH = 1000
MAX_LOG_LIMIT = 1000
# (job id, sequence) pairs a WatchJobs stream remembers, to drop repeated events.
WATCH_JOBS_DEDUPE = 65_536
_DELETED = event_pb2.EVENT_TYPE_DELETED

# Where each kind of worker calls back, relative to JOBWIRE_PUBLIC_URL.
_CALLBACK_PATHS = {
    job_pb2.JOB_KIND_BATCH: "/api/batch-callback",
    job_pb2.JOB_KIND_VIDEO: "/api/report",
    job_pb2.JOB_KIND_TRANSCODE: "/api/transcode-callback",
    job_pb2.JOB_KIND_EXTRACTION: "/api/external/jobs/{id}",
}

WatchItem = job_pb2.Job | event_pb2.JobEvent | event_pb2.StreamGap
# A WatchJobs stream yields (event, position) pairs, or a gap announcement, and a
# Live once, when it is subscribed to the live fan-out.
FirehoseItem = tuple[event_pb2.JobEvent, str] | event_pb2.StreamGap | Live


class Jobs:
    def __init__(self, store: Store, fanout: Fanout, policy: Policy, public_url: str = "") -> None:
        self.store = store
        self.fanout = fanout
        self.policy = policy
        self._public_url = public_url
        self._committer = Committer(store, self._published)
        self._watch_reads = SharedReads(store)  # watchers opened together read once
        # Set by the server when the store carries events between replicas (feed.py).
        self.relay: FeedRelay | None = None
        # Set with the relay, and in a watch worker of a service that has one: a live
        # event may then be lost on its way here, so watchers heal gaps from the job's
        # ring and re-read it after this long without an event. 0: every event is
        # published in this process (or fed to it in order), none to heal.
        self.resync_seconds = 0.0
        self.firehose = Firehose(store, fanout)
        self.stall_sweep_seconds = 1.0
        # A completion naming artifacts and an artifact's replacement, one at a time
        # per job: each checks the other's side, then writes (job_locks.py).
        self._artifact_locks = KeyedLocks()
        # A keyed WriteLog's look-up, job failure and write, one at a time per (job, key).
        self._log_keys = KeyedLocks()

    async def start(self) -> None:
        origin = self.store.single_writer_origin
        if origin and self.store.policy.firehose_retention_ns > 0:
            # Every later entry of the log is published here, in this process: the
            # fan-out's watermark is exact, so WatchJobs streams can be routed by filter.
            bounds = await self.store.log_bounds(0)
            self.fanout.anchor(origin, bounds.get(origin, (0, 0))[1])
        self._committer.start()

    async def close(self) -> None:
        await self._committer.close()

    def _published(self, applied: list[Applied]) -> None:
        if not applied:
            return
        EVENTS_APPLIED.inc(len(applied))
        self._publish(applied)

    def _publish(self, entries: Sequence[Applied | Deleted]) -> None:
        """Firehose entries to this process's streams and, through the relay, to the
        other replicas'."""
        events = [e.event for e in entries]
        positions = [e.position for e in entries]
        self.fanout.publish(events, positions)
        if self.relay is not None:
            self.relay.send(zip(events, positions, strict=True))

    async def _delete_and_publish(self, job_ids: list[str]) -> list[Deleted]:
        deleted = await self.store.delete_jobs(job_ids)
        self.publish_deleted(deleted)
        return deleted

    def publish_deleted(self, deleted: list[Deleted]) -> None:
        """Publishes deletions (DeleteJob, the retention sweep) as their firehose entries:
        WatchJobs streams here and, through the relay, on other replicas get them."""
        if deleted:
            self._publish(deleted)

    # -- jobs --------------------------------------------------------------

    async def create(
        self, request: job_service_pb2.CreateJobRequest
    ) -> job_service_pb2.CreateJobResponse:
        job_id = request.job_id or request.job.id or str(uuid.uuid4())
        # Named as the caller gave it (a bad job.id was reported as job_id).
        validation.new_job_id(job_id, "job_id" if request.job_id else "job.id")
        validation.kind(request.job.kind, "job.kind")
        validation.labels(request.job.labels)
        if request.job.kind == job_pb2.JOB_KIND_VIDEO:
            # The video worker is handed the url from GET /api/pending; without one it
            # was given {"videoUrl": ""}, a job it could only fail.
            validation.video(request.job.video)
        elif request.job.HasField("video"):
            raise invalid("job.video is only for JOB_KIND_VIDEO jobs")
        validation.deadlines(request.job)
        chosen = request.callback_token
        if chosen:
            validation.chosen_token(chosen)
        record, token = events.new_record(
            job_id, request.job.kind, time.time_ns(), request.job, self.policy, chosen
        )
        try:
            await self.store.create(record)
        except DomainError as err:
            # A retry after a lost reply: the job it made comes back, as it is now.
            if err.code is not Code.ALREADY_EXISTS or not chosen:
                raise
            existing = await self.store.get(job_id)
            if (
                existing is None
                or existing.job.kind != request.job.kind
                or not tokens.matches(chosen, existing.token_hash)
            ):
                raise
            record = existing
        return job_service_pb2.CreateJobResponse(
            job=record.job, callback_token=token, callback_url=self._callback_url(record.job)
        )

    async def get(self, job_id: str, token: str = "") -> job_pb2.Job:
        return (await self._record(job_id, token, "id")).job

    async def list_jobs(
        self, request: job_service_pb2.ListJobsRequest
    ) -> job_service_pb2.ListJobsResponse:
        limit = validation.bounded(request.page_size, "page_size", 50, MAX_PAGE_SIZE)
        validation.states(list(request.states))
        validation.optional_kind(request.kind)
        validation.labels(request.labels, "labels filter")
        newest_first = request.newest_first
        filters = _filters(request)
        after = (
            _decode_page_token(request.page_token, newest_first, filters)
            if request.page_token
            else None
        )
        query = JobQuery(
            states=tuple(request.states),
            kind=request.kind,
            labels=dict(request.labels),
            limit=limit + 1,
            after=after,
            newest_first=newest_first,
        )
        jobs = await self.store.list_jobs(query)
        # Also cut by size: a page of jobs with workers' 64 KiB messages went past
        # gRPC's 4 MiB and failed (RESOURCE_EXHAUSTED) for everyone reading that page.
        count = _fitting(jobs[:limit])
        response = job_service_pb2.ListJobsResponse(jobs=jobs[:count])
        if len(jobs) > count:
            last = jobs[count - 1]
            response.next_page_token = _encode_page_token(
                last.create_time.ToNanoseconds(), last.id, newest_first, filters
            )
        return response

    async def cancel(self, job_id: str, reason: str) -> job_pb2.Job:
        validation.job_id(job_id, "id")
        change = await self._one(JobCommand(job_id, Cancel(validation.message(reason, "reason"))))
        return change.record.job if isinstance(change, Applied) else change.job

    async def delete(self, job_id: str) -> job_service_pb2.DeleteJobResponse:
        """Deletes an ended job with its events, logs and artifacts (DeleteJob)."""
        validation.job_id(job_id, "id")
        record = await self.store.get(job_id)
        if record is None:
            raise not_found(job_id)
        if not record.terminal:
            state = _state_name(record.job.state)
            raise DomainError(
                Code.FAILED_PRECONDITION,
                f"job {job_id!r} has not ended ({state}): only an ended job is deleted;"
                " cancel it first",
            )
        # The store deletes it only as an ended job: terminal states are final, so
        # nothing can have moved it back since the read.
        # Published even when the call is cancelled meanwhile: a deletion committed and
        # never published would reach no live stream (its firehose entry a hole there).
        deleted = await outlasting_cancel(self._delete_and_publish([job_id]))
        if not deleted:
            raise not_found(job_id)  # deleted meanwhile (retention, another call)
        JOBS_DELETED.labels("rpc").inc()
        log.info("job %s deleted (DeleteJob)", job_id)
        return job_service_pb2.DeleteJobResponse()

    async def claim(
        self, kind: int, worker_id: str, lease: Duration
    ) -> job_service_pb2.ClaimJobResponse:
        validation.kind(kind)
        validation.well_formed(lease, "lease_duration")
        lease_ns = lease.ToNanoseconds()
        if lease_ns < 0:
            raise invalid("lease_duration must not be negative")
        if lease_ns > validation.MAX_DEADLINE_NS:  # its expiry must stay a valid Timestamp
            raise invalid("lease_duration must be at most 366 days")
        if len(worker_id) > 256:
            raise invalid("worker_id must be at most 256 characters")
        # The write and its publication in a task the caller's cancel (a client gone, a
        # deadline) does not reach: a claim written but never published was missing
        # from every stream, and held the firehose's publish watermark below it.
        lease_ns = lease_ns or self.policy.lease_ns
        applied = await outlasting_cancel(self._claim(kind, worker_id, lease_ns))
        if applied is None:
            return job_service_pb2.ClaimJobResponse()
        return job_service_pb2.ClaimJobResponse(job=applied.record.job)

    async def _claim(self, kind: int, worker_id: str, lease_ns: int) -> Applied | None:
        applied = await self.store.claim(kind, worker_id, lease_ns)
        if applied is not None:
            self._published([applied])
        return applied

    # -- events ------------------------------------------------------------

    async def report(
        self, request: job_service_pb2.ReportEventRequest
    ) -> job_service_pb2.ReportEventResponse:
        events.validate_report(request)
        if not _names_artifacts(request):
            return _response(await self._one(JobCommand(request.job_id, Report(request))))
        # The check and the write in one step: an upload that replaced a named artifact
        # between them left the job's result naming content it did not have.
        async with self._artifact_locks.hold([request.job_id]):
            await self._artifacts_as_named(request)
            outcome = await self._one(JobCommand(request.job_id, Report(request)))
        return _response(outcome)

    async def _artifacts_as_named(self, request: job_service_pb2.ReportEventRequest) -> None:
        """A result names its artifacts by content (sha256): one whose stored artifact
        has other content now (two different finals racing, the other's upload last)
        would describe a file the job does not have. It was applied anyway."""
        stored = {a.name: a.sha256 for a in await self.store.list_artifacts(request.job_id)}
        for named in request.completed.artifacts:
            sha = stored.get(named.name)
            if sha is not None and named.sha256 and sha != named.sha256:
                raise DomainError(
                    Code.FAILED_PRECONDITION,
                    f"artifact {named.name!r} of job {request.job_id!r} has other content"
                    f" (sha256 {sha[:12]}…) than the result names ({named.sha256[:12]}…):"
                    " it was replaced after this upload",
                )

    async def report_batch(
        self, requests: Sequence[job_service_pb2.ReportEventRequest]
    ) -> job_service_pb2.BatchReportEventsResponse:
        if len(requests) > MAX_BATCH:
            raise invalid(f"requests must hold at most {MAX_BATCH} events")
        # One reply whose results are filled in place: no response and result message
        # per event built and then copied into it (twice).
        reply = job_service_pb2.BatchReportEventsResponse()
        results = reply.results
        commands: list[JobCommand] = []
        positions: list[int] = []
        # As in `report`: the artifact checks and the commit, one step per job.
        naming = [r.job_id for r in requests if _names_artifacts(r)]
        async with self._artifact_locks.hold(naming):
            for i, request in enumerate(requests):
                result = results.add()
                try:
                    events.validate_report(request)
                    if _names_artifacts(request):
                        await self._artifacts_as_named(request)
                except DomainError as err:
                    # Each result is its event's: its place is the result's own. A
                    # "requests[i]: " here reached the bridge's workers in their 400s.
                    result.code = err.code
                    result.message = err.message
                    continue
                commands.append(JobCommand(request.job_id, Report(request)))
                positions.append(i)
            outcomes = await self._committer.submit(commands) if commands else []
        for i, outcome in zip(positions, outcomes, strict=True):
            result = results[i]
            if isinstance(outcome, DomainError):
                result.code = outcome.code
                result.message = outcome.message
            else:
                _fill_response(result.response, outcome)
        return reply

    async def list_events(
        self, job_id: str, from_sequence: int, token: str = "", page_size: int = 0
    ) -> job_service_pb2.ListJobEventsResponse:
        if from_sequence < 0:
            raise invalid("from_sequence must not be negative")
        page_size = validation.bounded(page_size, "page_size", 0, MAX_PAGE_SIZE)
        validation.job_id(job_id)
        found, retained = await self.store.get_with_events(job_id, from_sequence) or (None, [])
        record = _allowed(job_id, found, token)
        more = False
        if page_size:
            # The oldest first, as many as asked for and fit: the caller pages on.
            page = retained[:page_size]
            page = page[: _fitting(page)]
            more = len(page) < len(retained)
            retained = page
        else:
            # The newest that fit under gRPC's message limit (a worker's 64 KiB messages:
            # 64 events were past 4 MiB, RESOURCE_EXHAUSTED); the gap says where they start.
            retained = retained[len(retained) - _fitting(retained[::-1]) :]
        response = job_service_pb2.ListJobEventsResponse(events=retained, more=more)
        gap = _replay_gap(job_id, from_sequence, record.job.sequence, retained)
        if gap is not None:
            STREAM_GAPS.labels("ListJobEvents").inc()
            response.gap.CopyFrom(gap)
        return response

    async def expire_leases(self, limit: int = 500) -> int:
        """Requeues (or fails) RUNNING jobs whose lease lapsed. Returns how many changed."""
        ids = await self.store.expired_leases(time.time_ns(), limit)
        if not ids:
            return 0
        command = ExpireLease(self.policy.max_attempts)
        outcomes = await self._committer.submit([JobCommand(i, command) for i in ids])
        return sum(isinstance(o, Applied) for o in outcomes)

    async def mark_stalls(self, limit: int = 500) -> int:
        """Appends STALLED to RUNNING jobs past their progress deadline, and fails those
        past `stall_fail_after`. Every replica sweeps; the store's conditional update
        lets exactly one of them change each job (the others find it changed, and the
        Stall command is then a no-op). Returns how many this replica changed."""
        ids = await self.store.stalled_jobs(time.time_ns(), limit)
        if not ids:
            return 0
        outcomes = await self._committer.submit([JobCommand(i, Stall()) for i in ids])
        changed = [o for o in outcomes if isinstance(o, Applied)]
        for outcome in changed:
            if outcome.event.type == event_pb2.EVENT_TYPE_STALLED:
                JOBS_STALLED.inc()
            else:
                JOBS_STALL_FAILED.inc()
        return len(changed)

    async def _settle_in_doubt(self) -> int:
        """Publishes writes of a lost answer that landed, for jobs nobody writes again."""
        late = await settle_in_doubt(self.store)
        self._published(late)
        return len(late)

    async def sweep_leases_forever(self, interval: float) -> None:
        """Expired leases every `interval` seconds; progress deadlines every
        `stall_sweep_seconds` (one query of the jobs each time)."""
        stalls_at = 0.0
        failing: set[str] = set()  # logged once per outage, not once per tick
        task = asyncio.current_task()
        # Cancelled, it stops, also when a library swallowed the cancel mid-call (PyMongo
        # can): else it would go on sweeping a closed store, failing every tick.
        while task is None or not task.cancelling():
            sweeps = [("lease", self.expire_leases), ("in-doubt", self._settle_in_doubt)]
            if time.monotonic() >= stalls_at:
                stalls_at = time.monotonic() + self.stall_sweep_seconds
                sweeps.append(("stall", self.mark_stalls))
            for name, sweep in sweeps:
                try:
                    await sweep()
                except DomainError as err:
                    if name not in failing:
                        log.warning("%s sweep failed, retrying: %s", name, err.message)
                    failing.add(name)
                except Exception:  # a store error it does not classify must not end the sweeps
                    if task is not None and task.cancelling():
                        return  # stopped: the error is the closed store's
                    if name not in failing:
                        log.exception("%s sweep failed, retrying", name)
                    failing.add(name)
                else:
                    if name in failing:
                        failing.discard(name)
                        log.info("%s sweep resumed", name)
            await asyncio.sleep(interval)

    # -- logs --------------------------------------------------------------

    async def write_log(
        self, entry: log_pb2.LogEntry, token: str = "", kind: int = 0, key: str = ""
    ) -> job_service_pb2.WriteLogResponse:
        """Stores a line; with `key`, a repeat of (job id, key) stores nothing and is
        answered with the line stored first (`duplicate`). An ERROR line of a repeat
        fails nothing: its key was stored, so the line it repeats was handled."""
        if key:
            validation.idempotency_key(key)
        validation.log_level(entry.level, "entry.level")
        validation.optional_kind(kind)
        if not entry.message:
            raise invalid("entry.message is required")
        validation.message(entry.message, "entry.message")
        if entry.HasField("time"):
            validation.timestamp(entry.time, "entry.time")
        stored = log_pb2.LogEntry()
        stored.CopyFrom(entry)
        stored.job_id = entry.job_id or validation.UNKNOWN_JOB
        if stored.job_id != validation.UNKNOWN_JOB:
            validation.job_id(stored.job_id, "entry.job_id")
        now = time.time_ns()
        stored.record_time.FromNanoseconds(now)
        if not entry.HasField("time"):
            stored.time.FromNanoseconds(now)
        record = None
        if token or stored.job_id != validation.UNKNOWN_JOB:
            record = await self.store.get(stored.job_id)
            if token:
                if record is None:
                    raise not_found(stored.job_id)
                events.check_token(record, token)
        # Which kind's ListLogs shows the line (the video worker's lists only videos'):
        # its job's, or for a line of no job the writer's.
        stored.kind = record.job.kind if record is not None else job_pb2.JobKind.ValueType(kind)
        fails = (
            stored.level == log_pb2.LOG_LEVEL_ERROR
            and record is not None
            and not record.terminal
            and (not kind or record.job.kind == kind)  # WriteLogRequest.kind
        )
        if not key:
            return await self._write_log(stored, record, fails, key)
        async with self._log_keys.hold([f"{stored.job_id}\x00{key}"]):
            # Before the job is failed: an ERROR line under a key already stored (a
            # worker numbering its keys anew after a restart) failed the job with its
            # message, was answered as a duplicate and was stored nowhere. Any other
            # line's repeat is found by the store's write itself.
            earlier = await self.store.keyed_log(stored.job_id, key) if fails else None
            if earlier is not None:
                return job_service_pb2.WriteLogResponse(entry=earlier, duplicate=True)
            return await self._write_log(stored, record, fails, key)

    async def _write_log(
        self, stored: log_pb2.LogEntry, record: JobRecord | None, fails: bool, key: str
    ) -> job_service_pb2.WriteLogResponse:
        """`write_log` once the line is checked and not known under its key; `fails`:
        it is an ERROR line that fails its job."""
        failed = False
        if fails:
            # Keyed by the line's content, so a retried line fails the job once.
            digest = hashlib.sha256(stored.SerializeToString(deterministic=True)).hexdigest()
            command = FailFromLog(stored, f"log:{digest}")
            change = await self._one(JobCommand(stored.job_id, command))
            failed = isinstance(change, Applied)
        earlier = await self.store.write_log(stored, of_no_job=record is None, key=key)
        if earlier is not None:
            return job_service_pb2.WriteLogResponse(entry=earlier, duplicate=True)
        return job_service_pb2.WriteLogResponse(entry=stored, job_failed=failed)

    async def list_logs(self, request: job_service_pb2.ListLogsRequest) -> list[log_pb2.LogEntry]:
        limit = validation.bounded(request.limit, "limit", 50, MAX_LOG_LIMIT)
        validation.log_level(request.level, allow_unspecified=True)
        validation.optional_kind(request.kind)
        if request.job_id and request.job_id != validation.UNKNOWN_JOB:
            validation.job_id(request.job_id)
        if request.callback_token:
            await self._record(request.job_id, request.callback_token)
        entries = await self.store.list_logs(request.job_id, request.level, limit, request.kind)
        return entries[: _fitting(entries)]  # 1,000 lines of 64 KiB: past gRPC's 4 MiB

    # -- artifacts ---------------------------------------------------------

    async def upload_artifact(
        self, header: job_service_pb2.ArtifactHeader, chunks: AsyncIterator[bytes]
    ) -> artifact_pb2.Artifact:
        validation.artifact_name(header.name)
        validation.content_type(header.content_type)
        await self._record(header.job_id, header.callback_token, "header.job_id")
        meta = artifact_pb2.Artifact(
            job_id=header.job_id,
            name=header.name,
            content_type=header.content_type or "application/octet-stream",
        )

        async def not_final(stored: artifact_pb2.Artifact) -> None:
            """A job that has ended keeps the artifacts its result lists: two final
            reports racing (a large upload still running when a small one completed
            the job) replaced them after the fact. The same content again (a retry
            that overlapped the original, of the same type) and new names are still
            taken."""
            record = await self.store.get(header.job_id)
            if record is None or record.job.state not in TERMINAL_STATES:
                return
            # The content type too: the same bytes as another type changed what a
            # download of the final artifact says it is.
            same = (stored.sha256, stored.size_bytes, stored.content_type)
            listed = await self.store.list_artifacts(header.job_id)
            if any(
                a.name == header.name and (a.sha256, a.size_bytes, a.content_type) != same
                for a in listed
            ):
                state = _state_name(record.job.state)
                raise DomainError(
                    Code.FAILED_PRECONDITION,
                    f"job {header.job_id!r} has ended ({state}): its artifact"
                    f" {header.name!r} is final",
                )

        async with contextlib.AsyncExitStack() as held:

            async def checked(stored: artifact_pb2.Artifact) -> None:
                # Held from this check until the artifact is stored: a completion
                # applied in between (its own check passed on the artifact then
                # stored) had its result contradicted by this upload.
                await held.enter_async_context(self._artifact_locks.hold([header.job_id]))
                await not_final(stored)

            return await self.store.put_artifact(meta, chunks, checked)

    async def open_artifact(
        self, job_id: str, name: str, token: str = ""
    ) -> tuple[artifact_pb2.Artifact, AsyncIterator[bytes]]:
        validation.artifact_name(name)
        await self._record(job_id, token)
        found = await self.store.open_artifact(job_id, name)
        if found is None:
            raise DomainError(Code.NOT_FOUND, f"artifact {name!r} of job {job_id!r} not found")
        return found

    async def list_artifacts(self, job_id: str, token: str = "") -> list[artifact_pb2.Artifact]:
        await self._record(job_id, token)
        return await self.store.list_artifacts(job_id)

    # -- watching ----------------------------------------------------------

    async def watch_job(
        self, job_id: str, from_sequence: int, peer: str = ""
    ) -> AsyncIterator[WatchItem]:
        """Snapshot, retained events after `from_sequence`, live events; ends at terminal.
        Sequence numbers never jump silently: a gap message says where the replay (or
        a heal from the ring) had to start, a coalesced event says what it stands for.
        `peer`: the client's address (`context.peer()`), to batch writes per connection."""
        validation.job_id(job_id, "id")
        if from_sequence < 0:
            raise invalid("from_sequence must not be negative")
        # Subscribe before reading, so nothing committed in between is missed;
        # the sequence check below drops what both paths deliver.
        sub = self.fanout.subscribe(job_id=job_id, peer=peer)
        try:
            record, retained = await self._watch_reads.read(job_id)
            if record is None:
                raise not_found(job_id)
            yield record.job
            last = from_sequence
            replay = [event for event in retained if event.sequence > last]
            gap = _replay_gap(job_id, last, record.job.sequence, replay)
            if gap is not None:
                STREAM_GAPS.labels("WatchJob").inc()
                yield gap
                # Past the job's newest (another database, a restored backup): the
                # snapshot is the view; what follows starts right after it.
                last = min(last, record.job.sequence)
            if record.terminal and last >= record.job.sequence:
                return
            for event in replay:
                yield event
                last = event.sequence
                if event.state in TERMINAL_STATES:
                    return
            while True:
                batch = [event for event, _ in await self._next_batch(sub)]
                # A deletion is no event of the job's history: the job's end came before
                # it, and ended the stream, unless that was lost between replicas.
                gone = any(
                    e.type == _DELETED and e.job_create_time == record.job.create_time
                    for e in batch
                )
                batch = [e for e in batch if e.type != _DELETED]
                if _gap(batch, last) and (batch or self.resync_seconds):
                    # A resync tick, or a jump nothing accounts for: heal from the ring.
                    now = await self.store.get_with_events(job_id, last)
                    if now is None or now[0].job.create_time != record.job.create_time:
                        # Its end was never seen here (a lost feed entry) and the job
                        # was deleted since: there is nothing more to wait for (the
                        # stream went on resyncing for ever). A job made again under
                        # its id is another job, with sequences of its own.
                        raise DomainError(
                            Code.NOT_FOUND, f"job {job_id!r} was deleted while watched"
                        )
                    ring = now[1]
                    if ring and ring[0].sequence > last + 1:
                        # The ring no longer reaches back: end the stream, so that the
                        # client reconnects and gets a fresh snapshot, then the gap.
                        raise SubscriptionClosed(
                            "watcher fell too far behind; reconnect with your last sequence",
                            shutting_down=False,
                        )
                    newest = ring[-1].sequence if ring else last
                    batch = ring + [e for e in batch if e.sequence > newest]
                for event in batch:
                    if event.sequence <= last:
                        continue
                    if event.coalesced_from_sequence:
                        event = _coalesced_after(event, last)
                        COALESCED_DELIVERIES.labels("WatchJob").inc()
                    yield event
                    last = event.sequence
                    if event.state in TERMINAL_STATES:
                        return
                if gone:
                    raise DomainError(Code.NOT_FOUND, f"job {job_id!r} was deleted while watched")
        finally:
            self.fanout.unsubscribe(sub)

    async def _next_batch(self, sub: Subscription) -> list[Item]:
        """The next live events; [] after `resync_seconds` of silence when replicas
        share a feed (an entry lost between replicas is then found in the ring)."""
        if not self.resync_seconds:
            return await sub.next_batch()
        try:
            async with asyncio.timeout(self.resync_seconds):
                return await sub.next_batch()
        except TimeoutError:
            return []

    async def watch_jobs(
        self, kind: int, states: Sequence[int], after: str = ""
    ) -> AsyncIterator[FirehoseItem]:
        """Every job's events, filtered; with the firehose log, each with its position,
        resumable from one (service/firehose.py)."""
        validation.optional_kind(kind)
        validation.states(list(states))
        if self.store.policy.firehose_retention_ns > 0:
            async for item in self.firehose.watch(kind, states, after):
                if isinstance(item, Gap):
                    STREAM_GAPS.labels("WatchJobs").inc()
                    yield event_pb2.StreamGap(
                        requested_position=item.requested, oldest_available_position=item.oldest
                    )
                else:
                    yield item
            return
        if after:
            raise DomainError(
                Code.FAILED_PRECONDITION,
                "after: the service keeps no firehose log (JOBWIRE_FIREHOSE_RETENTION is off"
                " or 0), so WatchJobs cannot resume; leave after empty",
            )
        sub = self.fanout.subscribe(kind=kind, states=states)
        # With replicas sharing a feed an event may arrive twice (the feed re-opened
        # after an outage): drop a (job id, sequence) already delivered. Events of one
        # job reported through different replicas a few ms apart may arrive out of
        # sequence order here; none is dropped for it (each carries its sequence). The
        # event's time is in the key: a job made again under a deleted job's id numbers
        # its events from 1 again, and those are no repeats (they were dropped).
        delivered: OrderedDict[tuple[str, int, int], None] = OrderedDict()
        try:
            yield Live()
            while True:
                for event, _ in await sub.next_batch():
                    key = (event.job_id, event.sequence, event.create_time.ToNanoseconds())
                    if key in delivered:
                        continue
                    delivered[key] = None
                    if len(delivered) > WATCH_JOBS_DEDUPE:
                        delivered.popitem(last=False)
                    if event.coalesced_from_sequence:
                        COALESCED_DELIVERIES.labels("WatchJobs").inc()
                    yield event, ""
        finally:
            self.fanout.unsubscribe(sub)

    # -- helpers -----------------------------------------------------------

    async def _record(self, job_id: str, token: str, field: str = "job_id") -> JobRecord:
        """`field`: the request's name for the id (GetJobRequest.id), for its errors."""
        validation.job_id(job_id, field)
        return _allowed(job_id, await self.store.get(job_id), token)

    async def _one(self, command: JobCommand) -> Applied | Unchanged:
        (outcome,) = await self._committer.submit([command])
        if isinstance(outcome, DomainError):
            raise outcome
        return outcome

    def _callback_url(self, job: job_pb2.Job) -> str:
        path = _CALLBACK_PATHS.get(job.kind)
        if not self._public_url or path is None:
            return ""
        return self._public_url + path.format(id=job.id)


def _state_name(state: job_pb2.JobState.ValueType) -> str:
    return job_pb2.JobState.Name(state).removeprefix("JOB_STATE_")


def _names_artifacts(request: job_service_pb2.ReportEventRequest) -> bool:
    return request.HasField("completed") and bool(request.completed.artifacts)


def _fitting(messages: Sequence[Message]) -> int:
    """How many of `messages`, from the first, one answer can carry (MAX_PAGE_BYTES);
    at least one."""
    size = 0
    for count, message in enumerate(messages):
        size += message.ByteSize() + 8  # the field's tag and length
        if count and size > MAX_PAGE_BYTES:
            return count
    return len(messages)


def _gap(batch: list[event_pb2.JobEvent], last: int) -> bool:
    """True when the batch is empty (a resync tick) or skips a sequence after `last`
    that no coalesced event accounts for."""
    if not batch:
        return True
    expected = last
    for event in batch:
        if event.sequence <= expected:
            continue
        start = event.coalesced_from_sequence or event.sequence
        if start > expected + 1:
            return True
        expected = event.sequence
    return False


def _allowed(job_id: str, record: JobRecord | None, token: str) -> JobRecord:
    """The job a caller with `token` may read: NOT_FOUND, UNAUTHENTICATED otherwise."""
    if record is None:
        raise not_found(job_id)
    events.check_token(record, token)
    return record


def _replay_gap(
    job_id: str, after: int, newest: int, replay: Sequence[event_pb2.JobEvent]
) -> event_pb2.StreamGap | None:
    """The gap when the retained events after `after` do not start at `after + 1`; or
    when `after` is past the job's newest sequence: the client's history is not this
    job's (another database, a restored backup), and a gap going back says what follows
    starts at `newest + 1` rather than every event up to `after` being dropped."""
    if after > newest:
        return _stream_gap(job_id, after, newest + 1)
    if after == newest:
        return None
    oldest = replay[0].sequence if replay else newest + 1
    if oldest <= after + 1:
        return None
    return _stream_gap(job_id, after, oldest)


def _stream_gap(job_id: str, after: int, oldest: int) -> event_pb2.StreamGap:
    return event_pb2.StreamGap(
        job_id=job_id, requested_sequence=after, oldest_available_sequence=oldest
    )


def _coalesced_after(event: event_pb2.JobEvent, last: int) -> event_pb2.JobEvent:
    """A coalesced event names only the sequences this stream has not delivered."""
    if event.coalesced_from_sequence > last:
        return event
    trimmed = event_pb2.JobEvent()
    trimmed.CopyFrom(event)
    trimmed.coalesced_from_sequence = last + 1 if event.sequence > last + 1 else 0
    trimmed.ClearField("job_create_time")  # the job's first event was delivered already
    return trimmed


def _fill_response(
    response: job_service_pb2.ReportEventResponse, outcome: Applied | Unchanged
) -> None:
    """What a report did to its job, written into a response (a batch's is its own)."""
    job = outcome.record.job if isinstance(outcome, Applied) else outcome.job
    response.job_id = job.id
    response.sequence = job.sequence
    response.state = job.state
    if not isinstance(outcome, Applied):
        response.duplicate = True


def _response(outcome: Applied | Unchanged) -> job_service_pb2.ReportEventResponse:
    response = job_service_pb2.ReportEventResponse()
    _fill_response(response, outcome)
    return response


def _filters(request: job_service_pb2.ListJobsRequest) -> str:
    """The listing's filters, as its page tokens carry them: a token used with other
    filters went on from its place in another listing, its pages skipping or
    repeating jobs (a client that sent its filters only with the first page got
    every state after it)."""
    canonical = json.dumps(
        # A set: a state given twice is the same listing (it was "other filters").
        [sorted(set(request.states)), request.kind, sorted(request.labels.items())]
    ).encode()
    return "f:" + hashlib.sha256(canonical).hexdigest()[:16]


def _encode_page_token(
    create_ns: int, job_id: str, newest_first: bool = False, filters: str = ""
) -> str:
    body: list[int | str] = [create_ns, job_id]
    if newest_first:
        body.append("newest")
    if filters:
        body.append(filters)
    return base64.urlsafe_b64encode(json.dumps(body).encode()).decode()


def _decode_page_token(
    token: str, newest_first: bool = False, filters: str = ""
) -> tuple[int, str]:
    try:
        create_ns, job_id, *rest = json.loads(base64.urlsafe_b64decode(token.encode()))
        # JSON true/false are ints to Python: SQLite took true as 1, MongoDB as no number.
        if type(create_ns) is not int or not isinstance(job_id, str):
            raise ValueError
        if not -(2**63) <= create_ns < 2**63:  # forged: no store's 64-bit column holds it
            raise ValueError
        order = rest[:1] == ["newest"]
        # Tokens handed out before they carried their filters have none: still taken.
        given = rest[order:]
        if given and not (len(given) == 1 and str(given[0]).startswith("f:")):
            raise ValueError
    # RecursionError: forged JSON nested deeper than the parser goes (it was UNKNOWN).
    except (ValueError, TypeError, binascii.Error, RecursionError):
        raise invalid("page_token is invalid; pass next_page_token unchanged") from None
    if order != newest_first:
        raise invalid(
            "page_token is from a listing in the other order: pass newest_first as in"
            " the call that returned it"
        )
    if given and given[0] != filters:
        raise invalid(
            "page_token is from a listing with other filters: pass states, kind and labels"
            " as in the call that returned it"
        )
    return create_ns, job_id
