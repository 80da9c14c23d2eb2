"""Resumable watching: one job (`JobWatch`) and the firehose of all jobs (`JobsWatch`).

Both reconnect when the stream drops (service restart, lost connection, ABORTED
because the watcher fell behind, or RESOURCE_EXHAUSTED with a `retry-after-ms` hint
from a node at its watch-stream limit, which sets the least wait) with exponential
backoff and jitter, and resume where they stopped, so the caller sees every event
once, in order:

- `JobWatch` yields the job's snapshot (a `Job`) first, then each `JobEvent` in
  sequence order, and ends after the terminal event. It resumes from the last
  sequence it yielded and drops anything at or below it. A jump in the sequence
  numbers is never passed over silently: the missing events are fetched from the
  job's retained history (ListJobEvents); a coalesced progress event is filled in the
  same way unless `every_event=False` (then it is yielded as is and its
  `coalesced_from_sequence` says which sequences it stands for). When history is no
  longer retained, a `StreamGap` is yielded in its place (after a fresh `Job`
  snapshot when the gap was found on reconnecting), never a silent skip. If the job's
  history went back (the service restored from an older backup: its newest sequence is
  below the last one yielded), a fresh `Job` and a `StreamGap` with
  `oldest_available_sequence <= requested_sequence` are yielded, and the watch follows
  the job from the snapshot on. A job deleted and made again under its id while the
  watch was away (its snapshot's create time is not the one watched, `.created`)
  raises `NotFound`, as a deletion alone does: the new job's events are no
  continuation of the old one's.
- `JobsWatch` yields the `JobEvent`s of every matching job, and a `JobDeletion` when
  such a job is deleted (`DeleteJob`, the service's retention), resuming after the last
  `position` the service gave (`.position`, also for resuming in a later process).
  A `StreamGap` says that events were lost: the resume point was older than the
  service's window, or the service gives no positions (then the events sent while
  disconnected cannot be replayed). `.live` is set once the service has the stream
  live (or, resumed from a position, sent its first message): every event committed
  after that reaches this watch. A stream started with `after=""` gets its first
  position then, in the service's headers, so one that drops before its first event
  resumes from there, losing nothing (a service with its firehose log off gives none:
  a `StreamGap` then says events may be lost).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import grpc

from jobwire.v1 import event_pb2, job_pb2, job_service_pb2

from .errors import (
    ClientConfigError,
    DeadlineExceeded,
    JobwireError,
    NotFound,
    Unavailable,
    translate,
)
from .retry import Backoff, Sleep, say_if_closed

if TYPE_CHECKING:
    from jobwire.v1.job_service_pb2_grpc import JobServiceAsyncStub

TERMINAL = frozenset(
    {job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_FAILED, job_pb2.JOB_STATE_CANCELLED}
)
# A stream that ends with one of these is resumed; any other code is the caller's error.
RESUMABLE = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED, grpc.StatusCode.CANCELLED}
)
RETRY_AFTER_KEY = "retry-after-ms"
_DEDUPE = 65_536  # (job id, sequence, time) a JobsWatch remembers to drop repeats

WatchItem = job_pb2.Job | event_pb2.JobEvent | event_pb2.StreamGap
# What a JobsWatch yields.
JobsWatchItem = event_pb2.JobEvent | event_pb2.JobDeletion | event_pb2.StreamGap
ListEvents = Callable[[str, int], Awaitable[job_service_pb2.ListJobEventsResponse]]
# Told why the stream is down and how many seconds until the next attempt.
OnRetry = Callable[[JobwireError, float], None]
# Told that a stream is back after OnRetry said it was down (no item need come with it).
OnReconnect = Callable[[], None]


class _Reconnector:
    """Backoff between attempts; gives up after `give_up_after` seconds without a message."""

    def __init__(
        self,
        backoff: Backoff,
        give_up_after: float | None,
        on_retry: OnRetry | None = None,
        sleep: Sleep = asyncio.sleep,
        on_reconnect: OnReconnect | None = None,
    ) -> None:
        if give_up_after is not None and (
            isinstance(give_up_after, bool)
            or not isinstance(give_up_after, int | float)  # "10" failed a bare `<=`
            or not 0 <= give_up_after < math.inf
        ):
            raise ClientConfigError(
                f"give_up_after must be a finite number of seconds >= 0, got {give_up_after!r}"
            )
        self._backoff = backoff
        self._give_up_after = give_up_after
        self._on_retry = on_retry
        self._on_reconnect = on_reconnect
        self._sleep = sleep
        self._failures = 0
        self._since: float | None = None

    def healthy(self) -> None:
        """The service answered. After a wait, `on_reconnect` says so: a quiet job's watch
        gets no item on reconnecting, and what on_retry put on a screen stayed there."""
        if self._since is not None and self._on_reconnect is not None:
            self._on_reconnect()
        self._failures = 0
        self._since = None

    async def wait(self, cause: JobwireError, hint: float | None = None) -> None:
        """Sleeps before the next attempt: the backoff, or the service's hint when longer;
        never past `give_up_after` (the wait is cut to the time left, and a hint longer
        than that gives up at once)."""
        now = time.monotonic()
        if self._since is None:
            self._since = now
        delay = max(self._backoff.delay(self._failures), hint or 0.0)
        if self._give_up_after is not None:
            left = self._give_up_after - (now - self._since)
            if left <= 0 or (hint or 0.0) > left:
                if isinstance(cause, Unavailable):
                    raise cause
                # What give_up_after promises: a refusal (RESOURCE_EXHAUSTED, ABORTED)
                # came out as itself, which code catching Unavailable missed.
                raise Unavailable(
                    cause.code,
                    f"gave up reconnecting after {self._give_up_after} s: {cause.message}",
                ) from cause
            delay = min(delay, left)
        if self._on_retry is not None:
            self._on_retry(cause, delay)
        await self._sleep(delay)
        self._failures += 1


def resumable(err: grpc.aio.AioRpcError) -> tuple[bool, float | None]:
    """Whether a stream that failed with `err` is resumed, and the service's wait hint.

    A node at its watch-stream limit refuses with RESOURCE_EXHAUSTED and says when to
    come back (`retry-after-ms`, service/admission.py); that refusal is resumed too.
    """
    if err.code() in RESUMABLE:
        return True, None
    if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
        for key, value in err.trailing_metadata() or ():
            if key == RETRY_AFTER_KEY:
                try:
                    return True, max(0.0, float(value) / 1000)
                except (TypeError, ValueError):
                    break
    return False, None


class JobWatch:
    """`async for item in client.watch_job(job_id)`: see the module docstring."""

    def __init__(
        self,
        stub: Callable[[], JobServiceAsyncStub],
        list_events: ListEvents,
        job_id: str,
        from_sequence: int,
        *,
        every_event: bool,
        backoff: Backoff,
        give_up_after: float | None,
        on_retry: OnRetry | None = None,
        sleep: Sleep = asyncio.sleep,
        on_reconnect: OnReconnect | None = None,
        created: datetime | None = None,
    ) -> None:
        self.job_id = job_id
        # The last sequence yielded (or passed over by a gap), set before the yield.
        self.last_sequence = from_sequence
        # The watched job's create time: given, or from its first snapshot. A resume
        # (`from_sequence`) names no job, only an id, which a deleted job's successor
        # may hold; the snapshot sent first on every connect tells them apart.
        self.created = created
        self._stub = stub
        self._list_events = list_events
        self._every_event = every_event
        self._reconnect = _Reconnector(backoff, give_up_after, on_retry, sleep, on_reconnect)

    def __aiter__(self) -> AsyncGenerator[WatchItem, None]:
        return self._run()

    async def _run(self) -> AsyncGenerator[WatchItem, None]:
        first = True
        while True:
            request = job_service_pb2.WatchJobRequest(
                id=self.job_id, from_sequence=self.last_sequence
            )
            call: Any = self._stub().WatchJob(request)
            snapshot: job_pb2.Job | None = None
            rewind: event_pb2.StreamGap | None = None
            cause: JobwireError = Unavailable(grpc.StatusCode.UNAVAILABLE, "watch stream ended")
            hint: float | None = None
            try:
                async for item in call:
                    self._reconnect.healthy()
                    which = item.WhichOneof("item")
                    if which == "snapshot":
                        self._same_job(item.snapshot)
                        snapshot = item.snapshot
                        if first:
                            first = False
                            yield snapshot
                            snapshot = None  # already given to the caller
                        job = item.snapshot
                        if job.sequence < self.last_sequence:
                            # The job's history ends before what was yielded (a restored
                            # backup, another database): say so and follow it from here.
                            if snapshot is not None:
                                yield snapshot
                                snapshot = None
                            rewind = self._rewind(job.sequence)
                            yield rewind
                        if job.state in TERMINAL and job.sequence <= self.last_sequence:
                            return
                    elif which == "gap":
                        if rewind is not None and item.gap.requested_sequence == (
                            rewind.requested_sequence
                        ):
                            rewind = None  # the service's word for the rewind just yielded
                            continue
                        if snapshot is not None:  # the view is rebuilt from a fresh snapshot
                            yield snapshot
                            snapshot = None
                        self.last_sequence = max(
                            self.last_sequence, item.gap.oldest_available_sequence - 1
                        )
                        yield item.gap
                    elif which == "event":
                        async for out in self._accept(item.event):
                            yield out
                        if (
                            item.event.state in TERMINAL
                            and self.last_sequence >= item.event.sequence
                        ):
                            return
            except grpc.aio.AioRpcError as err:
                again, hint = resumable(err)
                if not again:
                    raise translate(err) from None
                cause = translate(err)
            except (Unavailable, DeadlineExceeded) as err:
                cause = err  # filling a jump failed or was slow: resume by reconnecting
            except asyncio.CancelledError:
                say_if_closed(self._stub)
                raise
            finally:
                call.cancel()
            await self._reconnect.wait(cause, hint)

    def _same_job(self, job: job_pb2.Job) -> None:
        """Raises NotFound when `job` (a snapshot) is not the job watched but one made
        under its id after that one was deleted: its events, numbered from 1 again,
        were taken for the rest of the old job's."""
        if not job.HasField("create_time"):
            return  # nothing to compare (a service that does not say)
        created = job.create_time.ToDatetime(tzinfo=UTC)
        if self.created is None:
            self.created = created
        elif created != self.created:
            raise NotFound(
                grpc.StatusCode.NOT_FOUND,
                f"job {self.job_id!r} is not the job this watch followed: it was created"
                f" {created.isoformat()}, the watched one {self.created.isoformat()} (deleted"
                " and made again under its id, or another database); the watched job's"
                f" events after {self.last_sequence} are gone: watch the job afresh to"
                " follow the new one",
            )

    def _rewind(self, newest: int) -> event_pb2.StreamGap:
        """The gap (going back) when the job's newest sequence is below the last yielded."""
        gap = event_pb2.StreamGap(
            job_id=self.job_id,
            requested_sequence=self.last_sequence,
            oldest_available_sequence=newest + 1,
        )
        self.last_sequence = newest
        return gap

    async def _accept(self, event: event_pb2.JobEvent) -> AsyncGenerator[WatchItem, None]:
        """`event` after the ones missing before it; nothing when already seen."""
        expected = self.last_sequence + 1
        if event.sequence < expected:
            return  # a duplicate (replayed after a reconnect)
        announced = 0 < event.coalesced_from_sequence <= expected
        if event.sequence > expected and (self._every_event or not announced):
            async for missing in self._fill(event.sequence):
                yield missing
        if event.coalesced_from_sequence:
            # The range it stands for, minus what was already given one by one.
            start = max(event.coalesced_from_sequence, self.last_sequence + 1)
            event = _copy(event)
            event.coalesced_from_sequence = start if start < event.sequence else 0
        self.last_sequence = event.sequence
        yield event

    async def _fill(self, before: int) -> AsyncGenerator[WatchItem, None]:
        """The retained events between the last one yielded and `before`, a page at a
        time (a long history does not fit in one answer)."""
        while True:
            reply = await self._list_events(self.job_id, self.last_sequence)
            wanted = [e for e in reply.events if self.last_sequence < e.sequence < before]
            oldest = wanted[0].sequence if wanted else before
            if reply.HasField("gap") or oldest > self.last_sequence + 1:
                gap = event_pb2.StreamGap(
                    job_id=self.job_id,
                    requested_sequence=self.last_sequence,
                    oldest_available_sequence=oldest,
                )
                self.last_sequence = oldest - 1
                yield gap
            for event in wanted:
                if event.sequence == self.last_sequence + 1:
                    self.last_sequence = event.sequence
                    yield event
            if not (reply.more and wanted and self.last_sequence < before - 1):
                return


class JobsWatch:
    """`async for item in client.watch_jobs(...)`: see the module docstring."""

    def __init__(
        self,
        stub: Callable[[], JobServiceAsyncStub],
        kind: int,
        states: Sequence[int],
        after: str,
        *,
        backoff: Backoff,
        give_up_after: float | None,
        on_retry: OnRetry | None = None,
        sleep: Sleep = asyncio.sleep,
        on_reconnect: OnReconnect | None = None,
    ) -> None:
        self.position = after  # the last position the service gave; "" before the first
        self._stub = stub
        self._kind = kind
        self._states = list(states)
        self._reconnect = _Reconnector(backoff, give_up_after, on_retry, sleep, on_reconnect)
        self._delivered: OrderedDict[tuple[str, int, int], None] = OrderedDict()
        # Set when the service says the stream is live (its headers, or a message), and
        # stays set: a later stream without a position to resume from has lost events.
        self.live = asyncio.Event()

    def __aiter__(self) -> AsyncGenerator[JobsWatchItem, None]:
        return self._run()

    async def _run(self) -> AsyncGenerator[JobsWatchItem, None]:
        while True:
            request = job_service_pb2.WatchJobsRequest(
                kind=self._kind,  # type: ignore[arg-type]
                states=self._states,  # type: ignore[arg-type]
                after=self.position,
            )
            call: Any = self._stub().WatchJobs(request)
            cause: JobwireError = Unavailable(grpc.StatusCode.UNAVAILABLE, "watch stream ended")
            hint: float | None = None
            # Live before and no position to resume from: what came meanwhile is lost,
            # even when no event had arrived yet.
            blind = self.live.is_set() and not self.position
            # The service sends its headers as soon as the stream is live, before any
            # event: a quiet stream has reached it then (give_up_after must not run on).
            headers = asyncio.ensure_future(self._headers(call))
            try:
                async for reply in call:
                    self._reconnect.healthy()
                    self.live.set()  # (a resumed stream's headers come with its replay)
                    if blind:
                        # The service gave no position to resume from: what it sent while
                        # we were away is lost, and the caller must know.
                        yield event_pb2.StreamGap()
                        blind = False
                    if reply.HasField("gap"):
                        yield reply.gap
                    if reply.position:
                        self.position = reply.position
                    if reply.HasField("deleted"):
                        yield reply.deleted
                    if not reply.HasField("event"):
                        continue
                    event = reply.event
                    if not reply.position:
                        # No positions (the service's log is off): drop a repeat here. With
                        # them the service sends nothing twice, and a (job, sequence) seen
                        # before is a new event after a restore from an older backup.
                        # With its time: a job made again under a deleted job's id
                        # numbers its events from 1 again, and those are no repeats.
                        key = (event.job_id, event.sequence, event.create_time.ToNanoseconds())
                        if key in self._delivered:
                            continue
                        self._delivered[key] = None
                        if len(self._delivered) > _DEDUPE:
                            self._delivered.popitem(last=False)
                    yield event
            except grpc.aio.AioRpcError as err:
                again, hint = resumable(err)
                if not again:
                    raise translate(err) from None
                cause = translate(err)
            except asyncio.CancelledError:
                say_if_closed(self._stub)
                raise
            finally:
                headers.cancel()
                call.cancel()
            await self._reconnect.wait(cause, hint)

    async def _headers(self, call: Any) -> None:
        """The service sends its headers when the stream is live, with a position to
        resume from when there is none yet (it came before any event)."""
        with contextlib.suppress(grpc.aio.AioRpcError):
            metadata = dict(list(await call.initial_metadata() or ()))
            if metadata.get("jobwire-live") == "1":
                self._reconnect.healthy()
                if not self.position:
                    self.position = str(metadata.get("jobwire-position", ""))
                self.live.set()


def _copy(event: event_pb2.JobEvent) -> event_pb2.JobEvent:
    out = event_pb2.JobEvent()
    out.CopyFrom(event)
    return out
