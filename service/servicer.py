"""The gRPC servicer: reads like the proto, delegates every call to `Jobs`."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from functools import wraps
from typing import Any, ParamSpec, TypeVar

import grpc

from jobwire.v1 import artifact_pb2, event_pb2, job_pb2, job_service_pb2, job_service_pb2_grpc

from .admission import DEFAULT_MAX_WATCHERS, WatchAdmission
from .decoding import require_parsed, tolerant
from .domain.errors import Code, DomainError
from .fanout import SubscriptionClosed
from .firehose import MAX_HEADER_POSITION, Live
from .jobs import Jobs
from .metrics import count_domain_error

SERVICE = job_service_pb2.DESCRIPTOR.services_by_name["JobService"]
P = ParamSpec("P")
R = TypeVar("R")
Context = grpc.aio.ServicerContext[Any, Any]


def _status(err: DomainError) -> grpc.StatusCode:
    code: grpc.StatusCode = getattr(grpc.StatusCode, err.code.name)
    return code


def unary(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Turns a DomainError into the matching status, with its message."""

    @wraps(fn)
    async def call(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            require_parsed(args[1])  # service/decoding.py
            return await fn(*args, **kwargs)
        except DomainError as err:
            count_domain_error(err)  # the store failing feeds JobwireStorageUnavailable
            context: Any = args[-1]
            await context.abort(_status(err), err.message)
            raise AssertionError("unreachable") from None

    return call


async def _end_stream(context: Any, err: DomainError | SubscriptionClosed) -> None:
    """The status a stream ends with: the rule broken, or why its subscription closed
    (UNAVAILABLE on shutdown, ABORTED for a watcher that fell behind: both resumable)."""
    if isinstance(err, DomainError):
        count_domain_error(err)
        await context.abort(_status(err), err.message)
    else:
        code = grpc.StatusCode.UNAVAILABLE if err.shutting_down else grpc.StatusCode.ABORTED
        await context.abort(code, str(err))


def streaming(fn: Callable[P, AsyncIterator[R]]) -> Callable[P, AsyncIterator[R]]:
    @wraps(fn)
    async def call(*args: P.args, **kwargs: P.kwargs) -> AsyncIterator[R]:
        context: Any = args[-1]
        try:
            require_parsed(args[1])  # service/decoding.py
            async for item in fn(*args, **kwargs):
                yield item
        except (DomainError, SubscriptionClosed) as err:
            await _end_stream(context, err)

    return call


def watch_stream(fn: Callable[P, AsyncIterator[R]]) -> Callable[P, AsyncIterator[R]]:
    """A watch stream counts against the node's limit while it is open; past it, the
    stream is refused with RESOURCE_EXHAUSTED and a retry hint (service/admission.py).
    It ends with the status of a DomainError or of its closed subscription, as
    `streaming` does. One generator layer for both: a layer costs every message of a
    fan-out, once per watcher."""

    @wraps(fn)
    async def call(*args: P.args, **kwargs: P.kwargs) -> AsyncIterator[R]:
        admission: WatchAdmission = args[0]._admission  # type: ignore[attr-defined]
        context: Any = args[-1]
        if not admission.enter():
            details, trailing = admission.refusal()
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, details, trailing)
        try:
            require_parsed(args[1])  # service/decoding.py: once per stream, not per message
            async for item in fn(*args, **kwargs):
                yield item
        except (DomainError, SubscriptionClosed) as err:
            await _end_stream(context, err)
        finally:
            admission.leave()

    return call


def _deletion(event: event_pb2.JobEvent) -> event_pb2.JobDeletion:
    """A deletion's firehose entry as the client sees it (events.deletion)."""
    return event_pb2.JobDeletion(
        job_id=event.job_id,
        kind=event.kind,
        state=event.state,
        sequence=event.sequence,
        job_create_time=event.job_create_time,
        delete_time=event.create_time,
    )


def _live_metadata(position: str) -> tuple[tuple[str, str], ...]:
    """A WatchJobs stream's headers when it went live with nothing sent yet."""
    if position and len(position) <= MAX_HEADER_POSITION:
        return (("jobwire-live", "1"), ("jobwire-position", position))
    return (("jobwire-live", "1"),)


_WATCH_CACHE: dict[int, tuple[event_pb2.JobEvent | job_pb2.Job, bytes]] = {}
_WATCH_CACHE_SIZE = 4096


def _watch_bytes(item: event_pb2.JobEvent | job_pb2.Job) -> bytes:
    """The serialised WatchJobResponse of an event or snapshot, shared by all watchers.

    Keyed by the object (the fan-out hands the same event object to every
    subscription, and watchers opened together share one snapshot read); the entry
    keeps the object alive, so its id is not reused.
    """
    cached = _WATCH_CACHE.get(id(item))
    if cached is not None and cached[0] is item:
        return cached[1]
    if isinstance(item, job_pb2.Job):
        response = job_service_pb2.WatchJobResponse(snapshot=item)
    else:
        response = job_service_pb2.WatchJobResponse(event=item)
    data = response.SerializeToString()
    if len(_WATCH_CACHE) >= _WATCH_CACHE_SIZE:
        del _WATCH_CACHE[next(iter(_WATCH_CACHE))]
    _WATCH_CACHE[id(item)] = (item, data)
    return data


def serialize_response(message: Any) -> bytes:
    """Response serializer that passes pre-serialised bytes through (see WatchJob)."""
    if isinstance(message, bytes):
        return message
    data: bytes = message.SerializeToString()
    return data


def add_to_server(servicer: JobServicer, server: grpc.aio.Server) -> None:
    """Registers the servicer like the generated function, except that WatchJob's
    responses may be pre-serialised bytes, and a request protobuf cannot parse is
    INVALID_ARGUMENT (service/decoding.py)."""

    class _Registrar:
        def add_generic_rpc_handlers(self, handlers: Any) -> None:
            pass  # added below, from the same (patched) table

        def add_registered_method_handlers(self, service: str, handlers: Any) -> None:
            table = dict(handlers)
            watch = table["WatchJob"]
            table["WatchJob"] = grpc.unary_stream_rpc_method_handler(
                watch.unary_stream,
                request_deserializer=watch.request_deserializer,
                response_serializer=serialize_response,
            )
            for name, handler in table.items():
                type_name = SERVICE.methods_by_name[name].input_type.full_name
                table[name] = tolerant(handler, type_name)
            server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, table),))
            server.add_registered_method_handlers(service, table)

    # The generated function only calls these two methods on its `server`.
    job_service_pb2_grpc.add_JobServiceServicer_to_server(servicer, _Registrar())  # type: ignore[arg-type]


class JobServicer(job_service_pb2_grpc.JobServiceServicer):
    def __init__(self, jobs: Jobs, admission: WatchAdmission | None = None) -> None:
        self._jobs = jobs
        self._admission = admission or WatchAdmission(DEFAULT_MAX_WATCHERS)

    @unary
    async def CreateJob(
        self, request: job_service_pb2.CreateJobRequest, context: Context
    ) -> job_service_pb2.CreateJobResponse:
        return await self._jobs.create(request)

    @unary
    async def GetJob(self, request: job_service_pb2.GetJobRequest, context: Context) -> job_pb2.Job:
        return await self._jobs.get(request.id, request.callback_token)

    @unary
    async def ListJobs(
        self, request: job_service_pb2.ListJobsRequest, context: Context
    ) -> job_service_pb2.ListJobsResponse:
        return await self._jobs.list_jobs(request)

    @unary
    async def CancelJob(
        self, request: job_service_pb2.CancelJobRequest, context: Context
    ) -> job_pb2.Job:
        return await self._jobs.cancel(request.id, request.reason)

    @unary
    async def DeleteJob(
        self, request: job_service_pb2.DeleteJobRequest, context: Context
    ) -> job_service_pb2.DeleteJobResponse:
        return await self._jobs.delete(request.id)

    @unary
    async def ClaimJob(
        self, request: job_service_pb2.ClaimJobRequest, context: Context
    ) -> job_service_pb2.ClaimJobResponse:
        return await self._jobs.claim(request.kind, request.worker_id, request.lease_duration)

    @unary
    async def ReportEvent(
        self, request: job_service_pb2.ReportEventRequest, context: Context
    ) -> job_service_pb2.ReportEventResponse:
        return await self._jobs.report(request)

    @unary
    async def BatchReportEvents(
        self, request: job_service_pb2.BatchReportEventsRequest, context: Context
    ) -> job_service_pb2.BatchReportEventsResponse:
        return await self._jobs.report_batch(request.requests)

    @unary
    async def WriteLog(
        self, request: job_service_pb2.WriteLogRequest, context: Context
    ) -> job_service_pb2.WriteLogResponse:
        return await self._jobs.write_log(
            request.entry, request.callback_token, request.kind, request.idempotency_key
        )

    @unary
    async def ListLogs(
        self, request: job_service_pb2.ListLogsRequest, context: Context
    ) -> job_service_pb2.ListLogsResponse:
        return job_service_pb2.ListLogsResponse(entries=await self._jobs.list_logs(request))

    @unary
    async def UploadArtifact(
        self,
        request_iterator: AsyncIterator[job_service_pb2.UploadArtifactRequest],
        context: Context,
    ) -> artifact_pb2.Artifact:
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("part") != "header":
            raise DomainError(
                Code.INVALID_ARGUMENT, "the first UploadArtifactRequest must carry the header"
            )

        header = first.header
        declared = header.size if header.HasField("size") else None
        if declared is not None and declared < 0:
            raise DomainError(
                Code.INVALID_ARGUMENT, f"header.size must not be negative: {declared}"
            )

        async def chunks() -> AsyncIterator[bytes]:
            received = 0
            async for part in request_iterator:
                which = part.WhichOneof("part")
                if which == "header":
                    raise DomainError(
                        Code.INVALID_ARGUMENT, "only the first message may carry a header"
                    )
                if which != "data":
                    # A message with neither part was refused as if it carried a header.
                    raise DomainError(
                        Code.INVALID_ARGUMENT,
                        "every UploadArtifactRequest after the header must carry data",
                    )
                received += len(part.data)
                if declared is not None and received > declared:
                    raise DomainError(
                        Code.INVALID_ARGUMENT,
                        f"the upload carried more than the {declared} bytes its header declared",
                    )
                yield part.data
            # grpc.aio ends the request stream the same way when the client cancels or
            # the connection drops: only the declared size tells a cut-off upload from
            # a finished one. Raising here, before the store commits, stores nothing.
            if declared is not None and received != declared:
                raise DomainError(
                    Code.INVALID_ARGUMENT,
                    f"the upload ended after {received} of the {declared} bytes its header"
                    " declared (cancelled or cut off); nothing was stored",
                )

        return await self._jobs.upload_artifact(header, chunks())

    @streaming
    async def ReadArtifact(
        self, request: job_service_pb2.ReadArtifactRequest, context: Context
    ) -> AsyncIterator[job_service_pb2.ReadArtifactResponse]:
        meta, content = await self._jobs.open_artifact(
            request.job_id, request.name, request.callback_token
        )
        yield job_service_pb2.ReadArtifactResponse(artifact=meta)
        async for chunk in content:
            yield job_service_pb2.ReadArtifactResponse(data=chunk)

    @unary
    async def ListArtifacts(
        self, request: job_service_pb2.ListArtifactsRequest, context: Context
    ) -> job_service_pb2.ListArtifactsResponse:
        artifacts = await self._jobs.list_artifacts(request.job_id, request.callback_token)
        return job_service_pb2.ListArtifactsResponse(artifacts=artifacts)

    @unary
    async def ListJobEvents(
        self, request: job_service_pb2.ListJobEventsRequest, context: Context
    ) -> job_service_pb2.ListJobEventsResponse:
        return await self._jobs.list_events(
            request.job_id, request.from_sequence, request.callback_token, request.page_size
        )

    @watch_stream
    async def WatchJob(  # type: ignore[override]  # may yield pre-serialised bytes
        self, request: job_service_pb2.WatchJobRequest, context: Context
    ) -> AsyncIterator[job_service_pb2.WatchJobResponse | bytes]:
        async for item in self._jobs.watch_job(request.id, request.from_sequence, context.peer()):
            if isinstance(item, job_pb2.Job):
                yield _watch_bytes(item)  # shared by the watchers opened with it
            elif isinstance(item, event_pb2.StreamGap):
                yield job_service_pb2.WatchJobResponse(gap=item)
            else:
                # One live event goes to every watcher of its job: serialise it once.
                yield _watch_bytes(item)

    @watch_stream
    async def WatchJobs(
        self, request: job_service_pb2.WatchJobsRequest, context: Context
    ) -> AsyncIterator[job_service_pb2.WatchJobsResponse]:
        sent = False
        async for item in self._jobs.watch_jobs(request.kind, request.states, request.after):
            if isinstance(item, Live):
                if not sent:
                    # Headers now, not with the first event: the client knows it is live.
                    await context.send_initial_metadata(_live_metadata(item.position))
                continue
            sent = True
            if isinstance(item, event_pb2.StreamGap):
                response = job_service_pb2.WatchJobsResponse(gap=item)
            else:
                event, position = item
                if event.type == event_pb2.EVENT_TYPE_DELETED:
                    response = job_service_pb2.WatchJobsResponse(
                        deleted=_deletion(event), position=position
                    )
                else:
                    response = job_service_pb2.WatchJobsResponse(event=event, position=position)
            response.send_time.GetCurrentTime()
            yield response
