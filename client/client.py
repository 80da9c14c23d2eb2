"""`Client`: the asyncio client of the jobwire service.

Every unary call has a default deadline (`timeout`, overridable per call), which
covers the call's retries and their backoff too. Calls that are safe to repeat
(reads; event reports, whose idempotency key makes a repeat an acknowledged
duplicate; creates, under a token the client chose; uploads from a path or bytes,
which replace the same artifact) are retried on UNAVAILABLE and CANCELLED with
backoff (see retry.py); the rest are not. Failures raise `JobwireError` subclasses
(see errors.py).
"""

from __future__ import annotations

import asyncio
import os
import reprlib
import secrets
import uuid
from asyncio import FIRST_COMPLETED
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
    Sequence,
)
from datetime import datetime, timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Any, NoReturn, TypeAlias, TypeVar

import grpc
from google.protobuf import duration_pb2, struct_pb2

from jobwire.v1 import (
    artifact_pb2,
    event_pb2,
    job_pb2,
    job_service_pb2,
    job_service_pb2_grpc,
    log_pb2,
)

from .artifacts import CHUNK, MAX_CHUNK, ArtifactStream, Source, replayable, upload
from .channel import (
    TLS,
    check_options,
    check_token,
    open_channel,
    reconnect_wait,
    token_from_env,
)
from .errors import ArgumentError, ArgumentTypeError, ClientConfigError
from .retry import Backoff, RetryPolicy, call_with_retry, positive_seconds, say_if_closed
from .watch import JobsWatch, JobWatch, OnReconnect, OnRetry

if TYPE_CHECKING:
    from jobwire.v1.job_service_pb2_grpc import JobServiceAsyncStub

Kind: TypeAlias = "job_pb2.JobKind.ValueType | str"
State: TypeAlias = "job_pb2.JobState.ValueType | str"
Level: TypeAlias = "log_pb2.LogLevel.ValueType | str"
Seconds: TypeAlias = float | timedelta

R = TypeVar("R")

DEFAULT_TARGET = "127.0.0.1:50051"
CLOSED = "this jobwire Client is closed"  # the UsageError of any call once it is
DEFAULT_RETRY = RetryPolicy()
WATCH_BACKOFF = Backoff(initial=0.2, maximum=5.0)
EVENTS_PAGE = 500  # ListJobEvents page_size when paging through a history (at most 1000)


class Client:
    """`async with Client("host:50051", token=..., tls=TLS(ca=...)) as client: ...`

    `tls=None` speaks plaintext; `tls=True` trusts the system roots; a `TLS` names
    the CA, a client certificate for mTLS and the expected server name. `token` is
    sent as `authorization: Bearer` on every call. `Client.from_env()` reads the
    same JOBWIRE_* variables as the `jobwire` CLI.

    The channel is opened on first use, in the event loop that uses it, so a client
    may be made before that loop runs (e.g. at import time); one client serves one
    event loop.

    Raises: the service's refusals as `JobwireError` subclasses (`NotFound`,
    `FailedPrecondition`, `Unauthenticated`, ...; `Unavailable` once the retries of a
    call safe to repeat are spent, `DeadlineExceeded` when its `timeout` passed);
    `InvalidArgument` (also a ValueError, or a TypeError for a wrong type) for an
    argument refused before anything is sent; `ClientConfigError` for unusable
    settings, here or for a call's `timeout`; `grpc.aio.UsageError` once the client is
    closed or when used from another event loop. Never a raw `grpc.aio.AioRpcError`.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        token: str | None = None,
        tls: TLS | bool | None = None,
        timeout: float = 10.0,
        retry: RetryPolicy = DEFAULT_RETRY,
        watch_backoff: Backoff = WATCH_BACKOFF,
        options: Sequence[tuple[str, Any]] = (),
        request_id: Callable[[], str] | None = None,
    ) -> None:
        self.target = check_target(target)
        self.timeout = positive_seconds("Client timeout", timeout)
        check_token(token)  # at construction, not at the first call
        # Checked here: a wrong one (retry=3) failed only when a call needed a retry,
        # with an AttributeError, in the middle of an outage.
        if not isinstance(retry, RetryPolicy):
            raise ClientConfigError(
                f"retry must be a RetryPolicy (RetryPolicy(attempts=1): no retries), got {retry!r}"
            )
        if not isinstance(watch_backoff, Backoff):
            raise ClientConfigError(f"watch_backoff must be a Backoff, got {watch_backoff!r}")
        self.retry = retry
        self.watch_backoff = watch_backoff
        options = check_options(options)
        tls_settings = TLS() if tls is True else (tls or None)
        if tls_settings is not None:
            tls_settings.credentials()  # unreadable TLS files fail here, not at first use

        def open_now() -> grpc.aio.Channel:
            return open_channel(
                target, tls=tls_settings, token=token, options=options, request_id=request_id
            )

        self._open = open_now
        self._ready_budget = reconnect_wait(options)
        # Set by close(): ends the waits of retries and watches (_pause, _ready).
        self._closing = asyncio.Event()
        # grpc.aio binds a channel to the event loop current when it is made: a channel
        # made before asyncio.run() failed every call with "attached to a different loop".
        self._channel: grpc.aio.Channel | None = None
        self._channel_stub: JobServiceAsyncStub | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    @classmethod
    def from_env(
        cls, target: str | None = None, env: Mapping[str, str] | None = None, **kwargs: Any
    ) -> Client:
        """A client configured like the CLI: JOBWIRE_SERVICE_TARGET, JOBWIRE_SERVICE_TLS_*,
        JOBWIRE_GRPC_TOKEN."""
        env = os.environ if env is None else env
        return cls(
            target or env.get("JOBWIRE_SERVICE_TARGET", DEFAULT_TARGET),
            token=token_from_env(env),
            tls=TLS.from_env(env),
            **kwargs,
        )

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the channel (cancelling its calls and watches); closing again is a no-op."""
        self._closed = True
        self._closing.set()
        if self._channel is not None:
            await self._channel.close()

    @property
    def stub(self) -> JobServiceAsyncStub:
        """The raw generated stub on the same channel, for what the client does not wrap."""
        return self._stub

    @property
    def _stub(self) -> JobServiceAsyncStub:
        """The stub, opening the channel in the running event loop on first use."""
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None  # grpc.aio picks the loop itself, as it did before
        if self._closed:
            raise grpc.aio.UsageError(CLOSED)
        if self._channel_stub is None:
            self._channel = self._open()
            self._channel_stub = job_service_pb2_grpc.JobServiceStub(self._channel)
            self._loop = loop
        elif loop is not None and self._loop is not None and loop is not self._loop:
            raise grpc.aio.UsageError(
                "this jobwire Client was opened in another event loop; make one per loop"
            )
        return self._channel_stub

    # -- jobs ----------------------------------------------------------------

    async def create_job(
        self,
        kind: Kind,
        *,
        job_id: str = "",
        labels: Mapping[str, str] | None = None,
        video: job_pb2.Video | None = None,
        progress_deadline: Seconds | None = None,
        stall_fail_after: Seconds | None = None,
        timeout: float | None = None,
    ) -> job_service_pb2.CreateJobResponse:
        """Creates a QUEUED job; the response carries its one-time callback token.

        A VIDEO job needs `video` with its `url` (the service answers InvalidArgument
        without one); `video` on a job of another kind is refused too.

        Retried like the other calls: the id (a random one unless `job_id` is given)
        and the callback token are chosen here, so a retry after a lost reply gets
        the job the first attempt made, with the same token, not ALREADY_EXISTS.
        """
        _texts(job_id=job_id)
        job = job_pb2.Job(kind=kind_value(kind), labels=_labels(labels), video=video)
        if progress_deadline is not None:
            job.progress_deadline.CopyFrom(_duration(progress_deadline, "progress_deadline"))
        if stall_fail_after is not None:
            job.stall_fail_after.CopyFrom(_duration(stall_fail_after, "stall_fail_after"))
        request = job_service_pb2.CreateJobRequest(
            job=job,
            job_id=job_id or str(uuid.uuid4()),
            callback_token=secrets.token_urlsafe(32),
        )
        return await self._unary(self._stub.CreateJob, request, timeout)

    async def get_job(self, job_id: str, *, timeout: float | None = None) -> job_pb2.Job:
        """The job as it is now; `NotFound` when there is none."""
        _texts(job_id=job_id)
        request = job_service_pb2.GetJobRequest(id=job_id)
        return await self._unary(self._stub.GetJob, request, timeout)

    async def list_jobs(
        self,
        *,
        states: Iterable[State] = (),
        kind: Kind = job_pb2.JOB_KIND_UNSPECIFIED,
        labels: Mapping[str, str] | None = None,
        page_size: int = 100,
        newest_first: bool = False,
        timeout: float | None = None,
    ) -> AsyncIterator[job_pb2.Job]:
        """Every matching job, oldest first (or newest first), fetching page after page
        as it is iterated."""
        # Taken once: a generator was used up by the first page, and the later pages
        # went out unfiltered (the service takes a page token with other filters).
        states = _states(states)
        labels = dict(labels) if labels else None
        token = ""
        while True:
            page = await self.list_jobs_page(
                states=states,
                kind=kind,
                labels=labels,
                page_size=page_size,
                page_token=token,
                newest_first=newest_first,
                timeout=timeout,
            )
            for job in page.jobs:
                yield job
            token = page.next_page_token
            if not token:
                return

    async def list_jobs_page(
        self,
        *,
        states: Iterable[State] = (),
        kind: Kind = job_pb2.JOB_KIND_UNSPECIFIED,
        labels: Mapping[str, str] | None = None,
        page_size: int = 50,
        page_token: str = "",
        newest_first: bool = False,
        timeout: float | None = None,
    ) -> job_service_pb2.ListJobsResponse:
        """One page of ListJobs (`list_jobs` iterates them all); a `page_token` goes
        with the order that gave it."""
        _ints(page_size=page_size)
        _texts(page_token=page_token)
        request = job_service_pb2.ListJobsRequest(
            page_size=page_size,
            page_token=page_token,
            states=_states(states),
            kind=kind_value(kind),
            labels=_labels(labels),
            newest_first=newest_first,
        )
        return await self._unary(self._stub.ListJobs, request, timeout)

    async def cancel_job(
        self, job_id: str, reason: str = "", *, timeout: float | None = None
    ) -> job_pb2.Job:
        """Cancels a job that has not ended. Not retried (a repeat of an applied cancel
        would report FAILED_PRECONDITION)."""
        _texts(job_id=job_id, reason=reason)
        request = job_service_pb2.CancelJobRequest(id=job_id, reason=reason)
        return await self._unary(self._stub.CancelJob, request, timeout, retry=False)

    async def delete_job(self, job_id: str, *, timeout: float | None = None) -> None:
        """Deletes a job that has ended, with its events, log lines and artifacts;
        `FailedPrecondition` while it has not, `NotFound` when there is none. Not retried (a
        repeat of an applied delete would report NOT_FOUND)."""
        _texts(job_id=job_id)
        request = job_service_pb2.DeleteJobRequest(id=job_id)
        await self._unary(self._stub.DeleteJob, request, timeout, retry=False)

    async def claim_job(
        self,
        kind: Kind,
        *,
        worker_id: str = "",
        lease: Seconds | None = None,
        timeout: float | None = None,
    ) -> job_pb2.Job | None:
        """The oldest QUEUED job of `kind`, now RUNNING and leased to you; None when
        nothing is queued. Not retried (a repeat could claim a second job)."""
        _texts(worker_id=worker_id)
        request = job_service_pb2.ClaimJobRequest(kind=kind_value(kind), worker_id=worker_id)
        if lease is not None:
            request.lease_duration.CopyFrom(_duration(lease, "lease"))
        reply = await self._unary(self._stub.ClaimJob, request, timeout, retry=False)
        return reply.job if reply.HasField("job") else None

    # -- events --------------------------------------------------------------

    async def report_progress(
        self,
        job_id: str,
        percent: float | None = None,
        *,
        phase: str = "",
        message: str = "",
        media_time: Seconds | None = None,
        media_duration: Seconds | None = None,
        idempotency_key: str | None = None,
        callback_token: str = "",
        event_time: datetime | None = None,
        timeout: float | None = None,
    ) -> job_service_pb2.ReportEventResponse:
        """Reports progress. A key is generated when not given and kept across the
        client's retries, so a retried report is applied once. Without `percent` the
        job keeps its percent (or takes media_time / media_duration when both are known);
        it was reset to 0 by a report of a message alone."""
        _texts(phase=phase, message=message)
        # Any number protobuf takes (a Decimal, a Fraction, numpy's), not a str.
        if percent is not None and (
            isinstance(percent, str | bytes) or not hasattr(type(percent), "__float__")
        ):
            _wrong("percent", "a number (or None)", percent)
        progress = job_pb2.Progress(percent=percent or 0.0, phase=phase, message=message)
        if media_time is not None:
            progress.media_time.CopyFrom(_duration(media_time, "media_time"))
        if media_duration is not None:
            progress.media_duration.CopyFrom(_duration(media_duration, "media_duration"))
        request = self._event(job_id, idempotency_key, callback_token, event_time)
        request.progress.CopyFrom(progress)
        request.percent_not_given = percent is None
        return await self.report_event(request, timeout=timeout)

    async def complete(
        self,
        job_id: str,
        result: job_pb2.Result | None = None,
        *,
        message: str = "",
        output_key: str = "",
        output_uri: str = "",
        metadata: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
        callback_token: str = "",
        event_time: datetime | None = None,
        timeout: float | None = None,
    ) -> job_service_pb2.ReportEventResponse:
        """Reports success (SUCCEEDED), with `result` or the fields given here."""
        _texts(message=message, output_key=output_key, output_uri=output_uri)
        if result is not None and not isinstance(result, job_pb2.Result):
            _wrong("result", "a jobwire.v1.job_pb2.Result", result)
        request = self._event(job_id, idempotency_key, callback_token, event_time)
        if result is not None:
            request.completed.CopyFrom(result)
        else:
            request.completed.SetInParent()
        if message:
            request.completed.message = message
        if output_key:
            request.completed.output_key = output_key
        if output_uri:
            request.completed.output_uri = output_uri
        if metadata:
            request.completed.metadata.CopyFrom(_struct(metadata, "metadata"))
        return await self.report_event(request, timeout=timeout)

    async def fail(
        self,
        job_id: str,
        code: str,
        message: str = "",
        *,
        details: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
        callback_token: str = "",
        event_time: datetime | None = None,
        timeout: float | None = None,
    ) -> job_service_pb2.ReportEventResponse:
        """Reports failure (FAILED) with a machine-readable `code`."""
        _texts(code=code, message=message)
        request = self._event(job_id, idempotency_key, callback_token, event_time)
        request.failed.code = code
        request.failed.message = message
        if details:
            request.failed.details.CopyFrom(_struct(details, "details"))
        else:
            request.failed.SetInParent()
        return await self.report_event(request, timeout=timeout)

    async def report_event(
        self, request: job_service_pb2.ReportEventRequest, *, timeout: float | None = None
    ) -> job_service_pb2.ReportEventResponse:
        """Sends a ReportEventRequest as built; retried (it needs an idempotency key: one
        is generated for this call when it has none, the caller's request left as it is)."""
        if not request.idempotency_key:
            # On a copy: written into the caller's request, the key went with its next
            # report too, which the service answered `duplicate` without applying it.
            keyed = job_service_pb2.ReportEventRequest()
            keyed.CopyFrom(request)
            keyed.idempotency_key = new_idempotency_key()
            request = keyed
        return await self._unary(self._stub.ReportEvent, request, timeout)

    def _event(
        self, job_id: str, key: str | None, token: str, when: datetime | None
    ) -> job_service_pb2.ReportEventRequest:
        _texts(job_id=job_id, callback_token=token)
        if key is not None:
            _texts(idempotency_key=key)
        request = job_service_pb2.ReportEventRequest(
            job_id=job_id, idempotency_key=key or new_idempotency_key(), callback_token=token
        )
        if when is not None:
            request.event_time.FromDatetime(_datetime(when, "event_time"))
        return request

    async def list_job_events(
        self,
        job_id: str,
        from_sequence: int = 0,
        *,
        page_size: int = 0,
        timeout: float | None = None,
    ) -> job_service_pb2.ListJobEventsResponse:
        """The job's retained events after `from_sequence` (and a `gap` when older ones
        are gone). `page_size` 0: all that fit in one answer (the newest when they do
        not); 1-1000: at most that many, oldest first, and `more` when others follow."""
        _texts(job_id=job_id)
        _ints(from_sequence=from_sequence, page_size=page_size)
        request = job_service_pb2.ListJobEventsRequest(
            job_id=job_id, from_sequence=from_sequence, page_size=page_size
        )
        return await self._unary(self._stub.ListJobEvents, request, timeout)

    async def job_events(
        self,
        job_id: str,
        from_sequence: int = 0,
        *,
        page_size: int = EVENTS_PAGE,
        timeout: float | None = None,
    ) -> AsyncIterator[event_pb2.JobEvent | event_pb2.StreamGap]:
        """Every retained event after `from_sequence`, oldest first, page by page
        (however long the history); a `StreamGap` first when the oldest retained one
        is past `from_sequence + 1`, or before any events that were pruned between
        two pages. Each page is one call, retried like the others."""
        after = from_sequence
        while True:
            reply = await self.list_job_events(job_id, after, page_size=page_size, timeout=timeout)
            if reply.HasField("gap"):
                yield reply.gap
            for event in reply.events:
                yield event
            if not reply.more or not reply.events:
                return
            after = reply.events[-1].sequence

    # -- logs ----------------------------------------------------------------

    async def write_log(
        self,
        message: str,
        *,
        level: Level = log_pb2.LOG_LEVEL_INFO,
        job_id: str = "",
        time: datetime | None = None,
        callback_token: str = "",
        idempotency_key: str | None = None,
        timeout: float | None = None,
    ) -> job_service_pb2.WriteLogResponse:
        """Stores a log line (an ERROR line fails a running job). Retried like an event
        report: the idempotency key (generated when not given) makes a repeat after a
        lost reply `duplicate`, so the line is stored once."""
        _texts(message=message, job_id=job_id, callback_token=callback_token)
        if idempotency_key is not None:
            _texts(idempotency_key=idempotency_key)
        entry = log_pb2.LogEntry(job_id=job_id, level=level_value(level), message=message)
        if time is not None:
            entry.time.FromDatetime(_datetime(time, "time"))
        request = job_service_pb2.WriteLogRequest(
            entry=entry,
            callback_token=callback_token,
            # "" is a key not given, as for reports: sent keyless, a retry stored it twice.
            idempotency_key=idempotency_key or new_idempotency_key(),
        )
        return await self._unary(self._stub.WriteLog, request, timeout)

    async def list_logs(
        self,
        *,
        job_id: str = "",
        level: Level = log_pb2.LOG_LEVEL_UNSPECIFIED,
        limit: int = 50,
        callback_token: str = "",
        timeout: float | None = None,
    ) -> list[log_pb2.LogEntry]:
        """Log lines, newest first."""
        _texts(job_id=job_id, callback_token=callback_token)
        _ints(limit=limit)
        request = job_service_pb2.ListLogsRequest(
            job_id=job_id, level=level_value(level), limit=limit, callback_token=callback_token
        )
        reply = await self._unary(self._stub.ListLogs, request, timeout)
        return list(reply.entries)

    # -- artifacts -----------------------------------------------------------

    async def upload_artifact(
        self,
        job_id: str,
        name: str,
        source: Source,
        *,
        content_type: str = "application/octet-stream",
        callback_token: str = "",
        chunk_size: int = CHUNK,
        timeout: float | None = 300.0,
        size: int | None = None,
    ) -> artifact_pb2.Artifact:
        """Stores `source` (a path, bytes or an async iterator of chunks) as the job's
        artifact `name`, replacing one of that name. Retried when the source can be
        read again (a path or bytes), since a repeat replaces the same artifact.

        The upload declares its size (that of the bytes or of the file when opened;
        `size` for an iterator, when known), so an upload cut off by a cancel or a lost
        connection is refused by the service and never replaces the stored artifact.
        An iterator of unknown size has no such guard."""
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
            raise ArgumentError(f"size must be a byte count (0 or more), got {size!r}")
        if isinstance(chunk_size, bool) or not 0 < chunk_size <= MAX_CHUNK:
            # A negative size sent no data at all: an empty artifact replaced the stored one.
            raise ArgumentError(
                f"chunk_size must be 1 to {MAX_CHUNK} bytes (the service takes messages of"
                f" up to 4 MiB), got {chunk_size!r}"
            )
        _texts(job_id=job_id, name=name, content_type=content_type, callback_token=callback_token)
        if not (replayable(source) or isinstance(source, AsyncIterable)):
            # bytearray, a list of chunks: 'async for' refused it deep in the upload
            _wrong("source", "a path, bytes or an async iterator of bytes", source)
        header = job_service_pb2.ArtifactHeader(
            job_id=job_id, name=name, content_type=content_type, callback_token=callback_token
        )

        async def attempt(left: float | None) -> artifact_pb2.Artifact:
            return await upload(self._stub.UploadArtifact, header, source, chunk_size, left, size)

        if timeout is not None:
            positive_seconds("timeout", timeout)
        policy = self.retry if replayable(source) else None
        try:
            return await call_with_retry(
                attempt, policy, timeout, self._ready, self._ready_budget, self._pause
            )
        except asyncio.CancelledError:
            say_if_closed(lambda: self._stub)
            raise

    def read_artifact(
        self,
        job_id: str,
        name: str,
        *,
        callback_token: str = "",
        timeout: float | None = 300.0,
    ) -> ArtifactStream:
        """`async for chunk in client.read_artifact(...)` or
        `await client.read_artifact(...).save(path)`. `timeout` bounds each read as a
        whole (its repeats, their backoff and the wait for a reconnect included), from
        the start of the iteration or of `save`."""
        if timeout is not None:
            positive_seconds("timeout", timeout)
        _texts(job_id=job_id, name=name, callback_token=callback_token)
        request = job_service_pb2.ReadArtifactRequest(
            job_id=job_id, name=name, callback_token=callback_token
        )
        return ArtifactStream(
            lambda left: self._stub.ReadArtifact(request, timeout=left),
            self.retry,
            lambda: self._stub,
            self._pause,
            self._ready,
            self._ready_budget,
            timeout,
        )

    async def list_artifacts(
        self, job_id: str, *, callback_token: str = "", timeout: float | None = None
    ) -> list[artifact_pb2.Artifact]:
        """The metadata of the job's artifacts (the newest of each name), by name."""
        _texts(job_id=job_id, callback_token=callback_token)
        request = job_service_pb2.ListArtifactsRequest(job_id=job_id, callback_token=callback_token)
        reply = await self._unary(self._stub.ListArtifacts, request, timeout)
        return list(reply.artifacts)

    # -- watching ------------------------------------------------------------

    def watch_job(
        self,
        job_id: str,
        from_sequence: int = 0,
        *,
        every_event: bool = True,
        give_up_after: float | None = None,
        on_retry: OnRetry | None = None,
        on_reconnect: OnReconnect | None = None,
        created: datetime | None = None,
    ) -> JobWatch:
        """The job's snapshot, then its events in order; ends after the terminal event.

        Survives restarts and dropped connections (see watch.py for gaps and coalesced
        progress). `give_up_after`: raise Unavailable after this many seconds without
        reaching the service (default: keep trying). `on_retry(error, delay)` is called
        before each wait to reconnect, e.g. to say so on a screen, and `on_reconnect()`
        once the service answers again (a quiet job yields nothing then).

        To resume a watch in a later process, pass its `.last_sequence` and `.created`
        (the watched job's create time): a job made again under the id after the watched
        one was deleted then raises NotFound instead of passing for its continuation.
        """
        _texts(job_id=job_id)
        _ints(from_sequence=from_sequence)
        if created is not None:
            _datetime(created, "created")
        return JobWatch(
            lambda: self._stub,
            lambda job, after: self.list_job_events(job, after, page_size=EVENTS_PAGE),
            job_id,
            from_sequence,
            every_event=every_event,
            backoff=self.watch_backoff,
            give_up_after=give_up_after,
            on_retry=on_retry,
            sleep=self._pause,
            on_reconnect=on_reconnect,
            created=created,
        )

    def watch_jobs(
        self,
        *,
        kind: Kind = job_pb2.JOB_KIND_UNSPECIFIED,
        states: Iterable[State] = (),
        after: str = "",
        give_up_after: float | None = None,
        on_retry: OnRetry | None = None,
        on_reconnect: OnReconnect | None = None,
    ) -> JobsWatch:
        """Events of every job of `kind` whose state after the event is one of `states`
        (any when not given), and a `JobDeletion` for such a job deleted (of `kind`, that
        had ended in one of `states`). Never ends on its own; `after` resumes from a
        `.position`.
        `on_retry` and `on_reconnect` as for `watch_job`."""
        _texts(after=after)  # protobuf's bare TypeError came at the first iteration
        return JobsWatch(
            lambda: self._stub,
            kind_value(kind),
            _states(states),
            after,
            backoff=self.watch_backoff,
            give_up_after=give_up_after,
            on_retry=on_retry,
            sleep=self._pause,
            on_reconnect=on_reconnect,
        )

    # -- plumbing ------------------------------------------------------------

    async def _pause(self, seconds: float) -> None:
        """The backoff of a retry or a watch, ended by close(): a closed client's call
        slept on (up to 5 s, or a full node's retry-after hint) and then raised grpc's
        'Channel is closed.'. Raises UsageError once the client is closed."""
        await self._until_closed(None, seconds)

    async def _ready(self, seconds: float) -> bool:
        """Whether the channel connected within `seconds` (before a retry, or before the
        one attempt of a call that is not repeated). Raises UsageError once the client is
        closed: closing the channel does not end a wait for its state."""
        channel = self._channel
        if channel is None or seconds <= 0 or self._closed:
            return False
        if channel.get_state() == grpc.ChannelConnectivity.READY:
            return True  # the usual case before a call that is not repeated: no task
        return await self._until_closed(channel.channel_ready(), seconds)

    async def _until_closed(self, work: Awaitable[None] | None, seconds: float) -> bool:
        """Waits up to `seconds` for `work` (None: just waits), ended at once by close();
        whether `work` finished. Raises UsageError once the client is closed."""
        if self._closed:
            raise grpc.aio.UsageError(CLOSED)
        closing = asyncio.ensure_future(self._closing.wait())
        waits = {closing} if work is None else {closing, asyncio.ensure_future(work)}
        try:
            done, _ = await asyncio.wait(waits, timeout=seconds, return_when=FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        if self._closed:
            raise grpc.aio.UsageError(CLOSED)
        return bool(done - {closing})

    async def _unary(
        self,
        method: Callable[..., Awaitable[R]],
        request: Any,
        timeout: float | None,
        *,
        retry: bool = True,
    ) -> R:
        async def attempt(left: float | None) -> R:
            return await method(request, timeout=left)

        deadline = self.timeout if timeout is None else positive_seconds("timeout", timeout)
        try:
            policy = self.retry if retry else None
            return await call_with_retry(
                attempt, policy, deadline, self._ready, self._ready_budget, self._pause
            )
        except asyncio.CancelledError:
            say_if_closed(lambda: self._stub)
            raise


def check_target(target: str) -> str:
    """`target` when gRPC would dial what it says. gRPC reads a port past 65535 modulo
    65536 (127.0.0.1:99999 dialled port 34463: another service, perhaps) and takes
    "https://host" for a host name that never resolves."""
    if not target:
        raise ClientConfigError("target must be host:port, got ''")
    try:
        target.encode("utf-8")
    except UnicodeEncodeError:
        # A byte that is not UTF-8 (os.environ's surrogate escape): gRPC's channel
        # raised encoding it, a traceback at start.
        raise ClientConfigError(f"target must be UTF-8 text, got {target!r}") from None
    # A tab or line break within never resolves; gRPC takes one at the end (a secret
    # file's trailing newline), so that one still passes.
    if not target.rstrip(" \t\r\n").isprintable():
        raise ClientConfigError(f"target must hold no control characters, got {target!r}")
    if target.startswith(("http://", "https://")):
        raise ClientConfigError(f"target is host:port, not a URL: got {target!r}")
    plain = target.removeprefix("dns:///").removeprefix("ipv4:").removeprefix("ipv6:")
    host, sep, port = plain.rpartition(":")
    if sep and host and "/" not in plain and port.isdigit() and not 0 < int(port) <= 65535:
        raise ClientConfigError(f"target port must be 1-65535, got {target!r}")
    return target


def new_idempotency_key() -> str:
    """A fresh random key, as the client makes for a report or log line sent without one."""
    return uuid.uuid4().hex


def kind_value(kind: Kind) -> job_pb2.JobKind.ValueType:
    """A JobKind from its value or its name ("VIDEO" or "JOB_KIND_VIDEO")."""
    return job_pb2.JobKind.ValueType(_enum_value(job_pb2.JobKind, kind, "JOB_KIND_", "kind"))


def state_value(state: State) -> job_pb2.JobState.ValueType:
    return job_pb2.JobState.ValueType(_enum_value(job_pb2.JobState, state, "JOB_STATE_", "states"))


def level_value(level: Level) -> log_pb2.LogLevel.ValueType:
    return log_pb2.LogLevel.ValueType(_enum_value(log_pb2.LogLevel, level, "LOG_LEVEL_", "level"))


def _states(states: Iterable[State]) -> list[job_pb2.JobState.ValueType]:
    """Each state's value. A str alone is refused by name: as an iterable of letters,
    states="RUNNING" was refused for its 'R', which named no mistake."""
    if isinstance(states, str | bytes):
        _wrong("states", f"a list of states, e.g. [{states!r}]", states)
    return [state_value(s) for s in states]


def _enum_value(enum: Any, value: int | str, prefix: str, argument: str) -> int:
    """`value`, or the value a short or full name stands for; an unknown name is
    ArgumentError naming `argument` and the names it takes (protobuf's own ValueError
    named neither)."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        _wrong(argument, f"a name or a {enum.DESCRIPTOR.name} value", value)
    if not isinstance(value, str):
        return value
    upper = value.upper()
    try:
        return int(enum.Value(upper if upper.startswith(prefix) else prefix + upper))
    except ValueError:
        names = [v.name.removeprefix(prefix) for v in enum.DESCRIPTOR.values if v.number]
        raise ArgumentError(
            f"{argument} must be one of {', '.join(names)} (or the {enum.DESCRIPTOR.name} value),"
            f" got {value!r}"
        ) from None


def _wrong(name: str, takes: str, value: object) -> NoReturn:
    raise ArgumentTypeError(f"{name} must be {takes}, got {reprlib.repr(value)}")


def _texts(**values: object) -> None:
    """ArgumentTypeError naming the first of `values` that is not a str (or UTF-8
    bytes, which protobuf takes for a string field too)."""
    for name, value in values.items():
        if not isinstance(value, str | bytes):
            _wrong(name, "a str", value)


def _ints(**values: object) -> None:
    """ArgumentTypeError naming the first of `values` that is not an int."""
    for name, value in values.items():
        # Anything with __index__ (numpy's integers), as protobuf takes, but not a bool.
        if isinstance(value, bool) or not hasattr(type(value), "__index__"):
            _wrong(name, "an int", value)


def _labels(labels: Mapping[str, str] | None) -> dict[str, str]:
    """`labels` as a dict; ArgumentTypeError unless every key and value is a str
    (protobuf's TypeError for {"n": 1} named nothing)."""
    try:
        out = dict(labels or {})
    except (TypeError, ValueError):
        _wrong("labels", "a mapping of str to str", labels)
    if not all(isinstance(k, str | bytes) and isinstance(v, str | bytes) for k, v in out.items()):
        _wrong("labels", "a mapping of str to str", labels)
    return out


def _datetime(value: datetime, name: str) -> datetime:
    if not isinstance(value, datetime):  # protobuf raised AttributeError for a str
        _wrong(name, "a datetime", value)
    if value.utcoffset() is None:
        # protobuf takes a naive datetime as UTC: datetime.now() (local time) was
        # stored hours off, unsaid.
        raise ArgumentError(
            f"{name} must be timezone-aware (e.g. datetime.now(UTC)): a naive one would be"
            f" taken as UTC, got {value!r}"
        )
    return value


def _struct(value: Mapping[str, Any], name: str) -> struct_pb2.Struct:
    """`value` as a Struct; ArgumentError naming `name` when it holds what JSON cannot
    (protobuf's own ValueError, "Unexpected type", named neither, e.g. for a datetime)."""
    out = struct_pb2.Struct()
    try:
        out.update(dict(value))
    except (ValueError, TypeError):
        raise ArgumentError(
            f"{name} must hold JSON values only (str, int, float, bool, None, lists, and"
            f" dicts with str keys), got {reprlib.repr(value)}"
        ) from None
    return out


def _duration(value: Seconds, name: str) -> duration_pb2.Duration:
    out = duration_pb2.Duration()
    try:
        if isinstance(value, timedelta):
            out.FromTimedelta(value)
        else:
            out.FromNanoseconds(round(value * 1e9))
    except (ValueError, OverflowError, TypeError):
        # protobuf's own words name no argument ("cannot convert float NaN to integer")
        # A string ("15m", as the JOBWIRE_* variables take) is refused too: the parser
        # of that syntax is the service's, beyond the client's wall.
        raise ArgumentError(
            f"{name} must be a finite number of seconds or a timedelta, got {value!r}"
        ) from None
    return out
