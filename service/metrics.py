"""Prometheus metrics of the service, served on JOBWIRE_METRICS_ADDR (/metrics).

- jobwire_grpc_requests_total{method,code}: finished calls by method and status
- jobwire_grpc_request_duration_seconds{method}: unary call latency (streams: count only)
- jobwire_watchers: open WatchJob/WatchJobs streams on this replica
- jobwire_storage_errors_total{operation}: storage failures (rpc, feed_append, feed_tail,
  queue_depth)
- jobwire_queue_depth{kind}: QUEUED jobs per kind, refreshed every
  JOBWIRE_METRICS_QUEUE_SECONDS (15) by one aggregate query, not per scrape; every
  replica reports the same figure, so aggregate it with max(), not sum()
- jobwire_events_applied_total: events committed through this replica
- jobwire_feed_events_total{direction}: cross-replica feed entries sent, received, dropped
- jobwire_commit_duration_seconds, jobwire_commit_batch_size: each group commit's
  latency and number of commands (service/tracing.py observes them)
- jobwire_oldest_queued_job_age_seconds{kind}: age of the oldest QUEUED job, refreshed with
  the queue depths (0 when none is queued)
- jobwire_jobs_stalled_total: jobs marked STALLED (their progress deadline passed)
- jobwire_jobs_stall_failed_total: jobs failed with STALLED (their stall_fail_after passed)
- jobwire_stream_gaps_total{stream}: gap announcements (WatchJob, WatchJobs, ListJobEvents)
- jobwire_coalesced_deliveries_total{stream}: events delivered in place of several
  coalesced progress events (a slow watcher)
- jobwire_jobs_deleted_total{reason}: ended jobs deleted with their events, logs and
  artifacts, by DeleteJob (`rpc`) or by JOBWIRE_JOB_RETENTION (`retention`)
- jobwire_retention_sweeps_total{result}: JOBWIRE_JOB_RETENTION sweeps of this replica
  that completed (`ok`) or failed (`failed`; retried at the next tick)
- jobwire_firehose_append_failures: events this replica committed but could not append
  to the firehose log (MongoDB only; README "streams")
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from threading import Thread
from typing import Any
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import Counter, Gauge, Histogram, start_http_server

from jobwire.v1 import job_pb2

from .admission import WatchAdmission
from .domain.errors import DomainError, StorageFailure
from .grpc_handlers import Handler, replace_behavior
from .store.port import JobQuery, Store

log = logging.getLogger("jobwire.metrics")

GRPC_REQUESTS = Counter(
    "jobwire_grpc_requests", "Finished gRPC calls by method and status code", ["method", "code"]
)
GRPC_LATENCY = Histogram(
    "jobwire_grpc_request_duration_seconds",
    "Latency of unary gRPC calls by method",
    ["method"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
WATCHERS = Gauge("jobwire_watchers", "Open WatchJob/WatchJobs streams on this replica")
STORAGE_ERRORS = Counter(
    "jobwire_storage_errors",
    "Storage operations that failed (unavailable or timed out)",
    ["operation"],
)
# Exported at 0 from the start: Prometheus' increase() cannot see the first errors of a
# series born with them, so JobwireStorageUnavailable missed a burst that then stopped
# (tests/test_observability.py runs the rule on both shapes).
for _operation in ("rpc", "feed_append", "feed_tail", "queue_depth"):
    STORAGE_ERRORS.labels(_operation)
QUEUE_DEPTH = Gauge("jobwire_queue_depth", "QUEUED jobs per kind (whole deployment)", ["kind"])
EVENTS_APPLIED = Counter("jobwire_events_applied", "Job events committed through this replica")
FEED_EVENTS = Counter(
    "jobwire_feed_events", "Cross-replica feed entries by direction", ["direction"]
)
COMMIT_LATENCY = Histogram(
    "jobwire_commit_duration_seconds",
    "Group commits: time until the store acknowledged the batch as durable",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
COMMIT_BATCH = Histogram(
    "jobwire_commit_batch_size",
    "Commands per group commit",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
)
OLDEST_QUEUED = Gauge(
    "jobwire_oldest_queued_job_age_seconds", "Age of the oldest QUEUED job per kind", ["kind"]
)
JOBS_STALLED = Counter("jobwire_jobs_stalled", "Jobs marked STALLED (progress deadline passed)")
JOBS_STALL_FAILED = Counter(
    "jobwire_jobs_stall_failed", "Jobs failed with STALLED (stall_fail_after passed)"
)
STREAM_GAPS = Counter(
    "jobwire_stream_gaps", "Gap announcements: history no longer retained", ["stream"]
)
COALESCED_DELIVERIES = Counter(
    "jobwire_coalesced_deliveries",
    "Events delivered in place of several coalesced progress events (slow watchers)",
    ["stream"],
)

JOBS_DELETED = Counter(
    "jobwire_jobs_deleted",
    "Ended jobs deleted with their events, logs and artifacts, by DeleteJob or retention",
    ["reason"],
)
for _reason in ("rpc", "retention"):  # at 0 from the start, as STORAGE_ERRORS
    JOBS_DELETED.labels(_reason)
# A failing sweep was only a log line: jobs past the retention stayed, the store grew,
# and no metric said so (the JobwireRetentionSweepFailing alert reads this).
RETENTION_SWEEPS = Counter(
    "jobwire_retention_sweeps",
    "JOBWIRE_JOB_RETENTION sweeps of this replica, completed (ok) or failed",
    ["result"],
)
for _result in ("ok", "failed"):  # at 0 from the start: increase() sees the first failure
    RETENTION_SWEEPS.labels(_result)


FIREHOSE_APPEND_FAILURES = Gauge(
    "jobwire_firehose_append_failures",
    "Committed events missing from the firehose log (append failed), since start",
)


def watch_streams(admission: WatchAdmission) -> None:
    """Clients' streams open on this process, counted from the start (a WatchJobs
    stream replaying the log subscribes to the fan-out only once it has caught up, and
    read 0 meanwhile); the watch workers' feeds do not pass through admission."""
    WATCHERS.set_function(lambda: admission.active)


def watch_firehose(store: Store) -> None:
    FIREHOSE_APPEND_FAILURES.set_function(lambda: float(store.log_failures))


_last_logged: tuple[str, float] = ("", 0.0)
LOG_EVERY_SECONDS = 10.0


def count_domain_error(err: DomainError) -> None:
    """Counts a call failed by the store, and says why in the log: a new reason at
    once, the same one at most every LOG_EVERY_SECONDS (a full disk fails every call)."""
    global _last_logged
    if err.code.name == "UNAVAILABLE":
        STORAGE_ERRORS.labels("rpc").inc()
    elif not isinstance(err, StorageFailure):  # its server's error: logged, not counted
        return
    now = time.monotonic()
    if err.message != _last_logged[0] or now - _last_logged[1] >= LOG_EVERY_SECONDS:
        _last_logged = (err.message, now)
        log.warning("calls fail: %s", err.message)


def _code_of(context: Any, default: grpc.StatusCode) -> str:
    try:
        code = context.code()
    except Exception:
        code = None
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):  # some grpc versions keep the raw integer
        for status in grpc.StatusCode:
            if status.value[0] == code:
                return status.name
    return default.name


def wrap_handler(
    handler: Handler,
    method: str,
    around: Callable[[Any, Any], contextlib.AbstractContextManager[Any]] | None = None,
) -> Handler:
    """The same handler, its behaviour timed and counted (and run inside `around`)."""

    def make(kind: str, behavior: Any) -> Any:
        if kind.endswith("_stream"):
            return _wrap_stream(behavior, method, around)
        return _wrap_unary(behavior, method, around, timed=not kind.startswith("stream"))

    return replace_behavior(handler, make)


def _null(_: Any, __: Any) -> contextlib.AbstractContextManager[Any]:
    return contextlib.nullcontext()


def _wrap_unary(
    behavior: Callable[[Any, Any], Awaitable[Any]],
    method: str,
    around: Callable[[Any, Any], contextlib.AbstractContextManager[Any]] | None,
    timed: bool,
) -> Callable[[Any, Any], Awaitable[Any]]:
    enter = around or _null
    requests = GRPC_REQUESTS
    latency = GRPC_LATENCY.labels(method)

    async def call(request: Any, context: Any) -> Any:
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            with enter(request, context):
                return await behavior(request, context)
        except asyncio.CancelledError:  # the client cancelled (an upload it gave up)
            code = grpc.StatusCode.CANCELLED
            raise
        except BaseException:
            code = grpc.StatusCode.UNKNOWN
            raise
        finally:
            requests.labels(method, _code_of(context, code)).inc()
            if timed:
                latency.observe(time.perf_counter() - start)

    return call


def _wrap_stream(
    behavior: Callable[[Any, Any], AsyncIterator[Any]],
    method: str,
    around: Callable[[Any, Any], contextlib.AbstractContextManager[Any]] | None,
) -> Callable[[Any, Any], AsyncIterator[Any]]:
    enter = around or _null

    async def call(request: Any, context: Any) -> AsyncIterator[Any]:
        code = grpc.StatusCode.OK
        try:
            with enter(request, context):
                async for item in behavior(request, context):
                    yield item
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except BaseException:
            code = grpc.StatusCode.UNKNOWN
            raise
        finally:
            GRPC_REQUESTS.labels(method, _code_of(context, code)).inc()

    return call


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts and times every call; `around` adds per-call context (request id, job id)."""

    def __init__(
        self, around: Callable[[Any, Any], contextlib.AbstractContextManager[Any]] | None = None
    ) -> None:
        self._around = around

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method.rsplit("/", 1)[-1]
        return wrap_handler(handler, method, self._around)


@dataclass
class MetricsServer:
    """The /metrics endpoint and the queue-depth refresher of one service."""

    port: int
    _http: WSGIServer | None
    _thread: Thread | None
    _refresher: asyncio.Task[None]

    async def stop(self) -> None:
        self._refresher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._refresher
        if self._http is not None:
            http = self._http
            await asyncio.to_thread(http.shutdown)
            http.server_close()


async def start_metrics(addr: str, store: Store, refresh_seconds: float) -> MetricsServer:
    """Serves /metrics on `addr` ("" = no endpoint, metrics still collected)."""
    http: WSGIServer | None = None
    thread: Thread | None = None
    port = 0
    if addr:
        host, _, port_text = addr.rpartition(":")
        try:
            http, thread = start_http_server(int(port_text), addr=host.strip("[]") or "127.0.0.1")
        except (OSError, ValueError) as exc:
            message = f"cannot serve metrics on JOBWIRE_METRICS_ADDR={addr}: {exc}"
            raise SystemExit(message) from None
        port = int(http.server_address[1])
    task = asyncio.get_running_loop().create_task(
        _refresh_queue_depths(store, refresh_seconds), name="metrics-queue-depth"
    )
    return MetricsServer(port, http, thread, task)


async def _refresh_queue_depths(store: Store, interval: float) -> None:
    kinds = [k for k in job_pb2.JobKind.values() if k != job_pb2.JOB_KIND_UNSPECIFIED]
    while True:
        try:
            depths = await store.queue_depths()
        except DomainError:
            STORAGE_ERRORS.labels("queue_depth").inc()
        except Exception:
            log.exception("queue depth refresh failed")
        else:
            for kind in kinds:
                name = job_pb2.JobKind.Name(kind).removeprefix("JOB_KIND_").lower()
                QUEUE_DEPTH.labels(name).set(depths.get(kind, 0))
                age = await _oldest_queued_age(store, kind) if depths.get(kind, 0) else 0.0
                OLDEST_QUEUED.labels(name).set(age)
        await asyncio.sleep(interval)


async def _oldest_queued_age(store: Store, kind: int) -> float:
    """Seconds since the oldest QUEUED job of `kind` was created (ListJobs is oldest first)."""
    try:
        page = await store.list_jobs(
            JobQuery(states=(job_pb2.JOB_STATE_QUEUED,), kind=kind, limit=1)
        )
    except DomainError:
        STORAGE_ERRORS.labels("queue_depth").inc()
        return 0.0
    if not page:
        return 0.0
    return max(0.0, time.time() - page[0].create_time.ToNanoseconds() / 1e9)
