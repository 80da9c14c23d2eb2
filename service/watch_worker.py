"""A watch worker process (service/watch_workers.py says why and how it is fed).

    jobwire watch-worker   (started by the service; JOBWIRE_WATCH_WORKERS)

It binds the service's port with SO_REUSEPORT and answers every JobService call that
reaches it: WatchJob from its own fan-out, with the same code as the service
(Jobs.watch_job over reads from the primary); every other call is passed through to
the primary unchanged (bytes, metadata, deadline, status and trailers).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import grpc

from jobwire.v1 import event_pb2, job_service_pb2, job_service_pb2_grpc

from .admission import WatchAdmission, server_options
from .config import Settings
from .decoding import tolerant
from .domain.errors import StorageUnavailable
from .domain.records import JobRecord
from .fanout import Fanout
from .grpc_handlers import Handler, replace_behavior
from .jobs import MAX_PAGE_SIZE, Jobs
from .security import TokenAuthInterceptor
from .server import add_health_and_reflection, corker_for, listen, set_health, tls_credentials
from .servicer import SERVICE, JobServicer, serialize_response
from .store.port import Store
from .watch_workers import FEED_METHOD, PARENT_ENV, PRIMARY_ENV, RESYNC_ENV

log = logging.getLogger("jobwire.watch_worker")

WATCH_JOB = f"/{SERVICE.full_name}/WatchJob"
READ_TIMEOUT_S = 10.0
EVENTS_PAGE = MAX_PAGE_SIZE  # ListJobEvents page_size: the service's maximum
FEED_RETRY_S = (0.05, 2.0)  # first and longest pause between feed reconnections
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_NOT_FORWARDED = ("user-agent", "content-type", "te", "host")


class PrimaryReads:
    """What Jobs.watch_job reads from the store, read from the primary instead."""

    def __init__(self, stub: Any, metadata: tuple[tuple[str, str], ...]) -> None:
        self._stub = stub
        self._metadata = metadata

    async def get(self, job_id: str) -> JobRecord | None:
        request = job_service_pb2.GetJobRequest(id=job_id)
        try:
            job = await self._stub.GetJob(request, metadata=self._metadata, timeout=READ_TIMEOUT_S)
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise StorageUnavailable(f"reading job {job_id!r}: {err.details()}") from None
        return JobRecord(job=job)

    async def events_after(self, job_id: str, sequence: int) -> list[event_pb2.JobEvent]:
        # Page by page, oldest first: one answer holds at most ~3 MiB, and a history
        # past that would otherwise come back as its newest part and a false gap.
        events: list[event_pb2.JobEvent] = []
        while True:
            request = job_service_pb2.ListJobEventsRequest(
                job_id=job_id, from_sequence=sequence, page_size=EVENTS_PAGE
            )
            try:
                response = await self._stub.ListJobEvents(
                    request, metadata=self._metadata, timeout=READ_TIMEOUT_S
                )
            except grpc.aio.AioRpcError as err:
                raise StorageUnavailable(f"reading events of {job_id!r}: {err.details()}") from None
            if response.HasField("gap") and events:
                events.clear()  # pruned between two pages: keep a contiguous tail
            events.extend(response.events)
            if not response.more or not response.events:
                return events
            sequence = response.events[-1].sequence

    async def get_with_events(
        self, job_id: str, sequence: int
    ) -> tuple[JobRecord, list[event_pb2.JobEvent]] | None:
        # Two calls to the primary (no RPC returns both). Events that landed between
        # them are left out, as one snapshot would (they reach the stream live: it
        # subscribed before reading), so the events end at the job's own sequence.
        record = await self.get(job_id)
        if record is None:
            return None
        events = await self.events_after(job_id, sequence)
        newest = record.job.sequence
        return record, [e for e in events if e.sequence <= newest]


class Feed:
    """The primary's events, republished to this process's fan-out."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        fanout: Fanout,
        metadata: Any,
        on_change: Callable[[bool], None],
    ) -> None:
        self._call: Any = channel.unary_stream(FEED_METHOD)
        self._fanout = fanout
        self._metadata = metadata
        self._on_change = on_change  # called with True (feed open) or False (lost)
        self.ready = False

    async def run(self) -> None:
        pause = FEED_RETRY_S[0]
        while True:
            call = self._call(b"", metadata=self._metadata)
            try:
                async for data in call:
                    if not data:  # subscribed at the primary
                        self._fanout.reopen()
                        self.ready = True
                        self._on_change(True)
                        pause = FEED_RETRY_S[0]
                        continue
                    batch = job_service_pb2.ListJobEventsResponse.FromString(data)
                    self._fanout.publish(batch.events)
            except grpc.aio.AioRpcError as err:
                log.warning("feed from the service broke (%s); reconnecting", err.code().name)
            finally:
                call.cancel()
            # Events published while no feed was open never reach this process: every
            # watcher here resumes from its last sequence (UNAVAILABLE), none misses one.
            if self.ready:
                self.ready = False
                self._fanout.close_all()
                self._on_change(False)
            await asyncio.sleep(pause)
            pause = min(pause * 2, FEED_RETRY_S[1])


def _forwarded(context: Any) -> list[tuple[str, Any]]:
    return [
        (key, value)
        for key, value in context.invocation_metadata() or ()
        if not key.startswith((":", "grpc-")) and key not in _NOT_FORWARDED
    ]


async def _relay_error(context: Any, err: grpc.aio.AioRpcError) -> None:
    await context.abort(err.code(), err.details() or "", err.trailing_metadata() or ())


def _pass_through(channel: grpc.aio.Channel, method: Any) -> Handler:
    """A handler that forwards one method's calls to the primary, bytes unchanged."""
    path = f"/{SERVICE.full_name}/{method.name}"
    if method.client_streaming:
        stream_unary: Any = channel.stream_unary(path)

        async def upload(requests: AsyncIterator[bytes], context: Any) -> Any:
            call = stream_unary(
                requests, metadata=_forwarded(context), timeout=context.time_remaining()
            )
            try:
                return await call
            except grpc.aio.AioRpcError as err:
                await _relay_error(context, err)

        return grpc.stream_unary_rpc_method_handler(upload)
    if method.server_streaming:
        unary_stream: Any = channel.unary_stream(path)

        async def stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
            call = unary_stream(
                request, metadata=_forwarded(context), timeout=context.time_remaining()
            )
            try:
                # The service's headers when they come, not with the first message:
                # WatchJobs says in them that it is live, before any event.
                headers = await call.initial_metadata()
                if headers:
                    await context.send_initial_metadata(tuple(headers))
                async for item in call:
                    yield item
            except grpc.aio.AioRpcError as err:
                await _relay_error(context, err)
            finally:
                call.cancel()

        return grpc.unary_stream_rpc_method_handler(stream)
    unary_unary: Any = channel.unary_unary(path)

    async def unary(request: bytes, context: Any) -> Any:
        call = unary_unary(request, metadata=_forwarded(context), timeout=context.time_remaining())
        try:
            return await call
        except grpc.aio.AioRpcError as err:
            await _relay_error(context, err)

    return grpc.unary_unary_rpc_method_handler(unary)


class _FeedGate(grpc.aio.ServerInterceptor):
    """Refuses WatchJob with UNAVAILABLE while the feed is not open (the client library
    retries): checked once per call, like the token, not on every message."""

    def __init__(self, feed: Feed) -> None:
        self._feed = feed

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None or self._feed.ready or handler_call_details.method != WATCH_JOB:
            return handler
        return replace_behavior(handler, lambda _kind, _behavior: _not_ready)


async def _not_ready(request: Any, context: Any) -> AsyncIterator[Any]:
    await context.abort(
        grpc.StatusCode.UNAVAILABLE, "this watch worker is connecting to the service; retry"
    )
    yield  # pragma: no cover - abort raises


async def serve_worker(settings: Settings, primary: str) -> None:
    metadata: tuple[tuple[str, str], ...] = ()
    if settings.grpc_token:
        metadata = (("authorization", f"Bearer {settings.grpc_token}"),)
    channel = grpc.aio.insecure_channel(primary)
    stub = job_service_pb2_grpc.JobServiceStub(channel)
    fanout = Fanout(settings.watch_buffer)
    # Only Jobs.watch_job is used: it needs get_with_events().
    jobs = Jobs(cast(Store, PrimaryReads(stub, metadata)), fanout, settings.policy())
    # As the service's watchers do: an event lost between replicas (the service never
    # published it, so it was never fed here) is found in the job's ring.
    jobs.resync_seconds = float(os.environ.get(RESYNC_ENV) or 0)
    loop = asyncio.get_running_loop()
    health_updates: set[asyncio.Task[None]] = set()  # referenced until done

    def on_feed(up: bool) -> None:
        task = loop.create_task(set_health(health_servicer, up))
        health_updates.add(task)
        task.add_done_callback(health_updates.discard)

    feed = Feed(channel, fanout, metadata, on_feed)
    servicer = JobServicer(jobs, WatchAdmission(settings.max_watchers))

    table = {m.name: _pass_through(channel, m) for m in SERVICE.methods if m.name != "WatchJob"}
    # The one method parsed here (the rest pass through as bytes): a request protobuf
    # refuses is INVALID_ARGUMENT, as on the service (service/decoding.py).
    table["WatchJob"] = tolerant(
        grpc.unary_stream_rpc_method_handler(
            servicer.WatchJob,
            request_deserializer=job_service_pb2.WatchJobRequest.FromString,
            response_serializer=serialize_response,
        ),
        job_service_pb2.WatchJobRequest.DESCRIPTOR.full_name,
    )
    interceptors: list[grpc.aio.ServerInterceptor] = [_FeedGate(feed)]
    if settings.grpc_token:
        interceptors.insert(0, TokenAuthInterceptor(settings.grpc_token))
    options = [
        ("grpc.so_reuseport", 1),
        *server_options(settings.max_watchers, settings.min_ping_seconds),
    ]
    server = grpc.aio.server(options=options, interceptors=interceptors)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE.full_name, table),)
    )
    health_servicer = add_health_and_reflection(server)
    fanout.corker = corker_for(settings, listen(server, settings, tls_credentials(settings)))
    # Not serving until the feed is open (a probe may land on this process).
    await set_health(health_servicer, serving=False)
    await server.start()
    feed_task = loop.create_task(feed.run(), name="feed")
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    log.info("watch worker %d serving on %s", os.getpid(), settings.grpc_addr)
    await stop.wait()
    await health_servicer.enter_graceful_shutdown()
    fanout.close_all()  # watchers resume elsewhere, from their last sequence
    await server.stop(settings.shutdown_grace_seconds)
    feed_task.cancel()
    await asyncio.gather(feed_task, return_exceptions=True)
    await channel.close()


def _bind_to_parent() -> None:
    """A worker lives and dies with its service: Ctrl-C reaches the whole process
    group, but the service decides when its workers stop (SIGTERM); and if the service
    is killed outright, the kernel sends this process SIGTERM (Linux PR_SET_PDEATHSIG),
    so no orphan keeps holding the port."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.environ.get(PARENT_ENV) != str(os.getppid()):  # it died before the line above
        raise SystemExit("the service that started this watch worker is gone")


def run_worker() -> None:
    """The worker process's body (`jobwire watch-worker`, started by the service: the
    CLI sets up logging, uvloop and the collector as for `jobwire serve`)."""
    primary = os.environ.get(PRIMARY_ENV, "")
    if not primary:
        raise SystemExit(f"{PRIMARY_ENV} is not set: watch workers are started by the service")
    _bind_to_parent()
    asyncio.run(serve_worker(Settings.from_env(), primary))
