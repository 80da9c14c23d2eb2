"""What a running service adds for operators: the cross-replica event feed, metrics,
per-call log context (request id, job id) and the internal bearer token."""

from __future__ import annotations

import contextlib
import logging
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from .admission import WatchAdmission
from .config import Settings
from .domain.errors import DomainError, StorageUnavailable
from .feed import FeedRelay
from .jobs import Jobs
from .logs import JOB_ID, REQUEST_ID
from .metrics import (
    MetricsInterceptor,
    MetricsServer,
    start_metrics,
    watch_firehose,
    watch_streams,
)
from .security import TokenAuthInterceptor
from .store.port import FeedUnsupported, Store

log = logging.getLogger("jobwire.server")

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


@contextlib.contextmanager
def call_context(request: Any, context: Any) -> Iterator[None]:
    """Sets the request id (metadata `x-request-id`, or a new one) and the job id of
    the call for its log lines. Each call runs in its own task, hence no reset."""
    request_id = ""
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id":
            text = value if isinstance(value, str) else value.decode(errors="replace")
            if _REQUEST_ID.fullmatch(text):
                request_id = text
            break
    REQUEST_ID.set(request_id or uuid.uuid4().hex)
    job_id = getattr(request, "job_id", "") or getattr(request, "id", "")
    JOB_ID.set(job_id if isinstance(job_id, str) else "")
    yield


@dataclass
class Operations:
    interceptors: list[grpc.aio.ServerInterceptor]
    metrics: MetricsServer
    relay: FeedRelay | None

    async def stop(self) -> None:
        """After the committer is closed (so its last events reach the feed)."""
        if self.relay is not None:
            await self.relay.close()
        await self.metrics.stop()


async def start_operations(
    settings: Settings, store: Store, jobs: Jobs, admission: WatchAdmission
) -> Operations:
    watch_streams(admission)
    watch_firehose(store)
    relay = await _start_feed(settings, store, jobs)
    metrics = await start_metrics(settings.metrics_addr, store, settings.metrics_queue_seconds)
    if metrics.port:
        log.info("metrics on http://%s/metrics", with_port(settings.metrics_addr, metrics.port))
    interceptors: list[grpc.aio.ServerInterceptor] = [MetricsInterceptor(around=call_context)]
    if settings.grpc_token:
        interceptors.append(TokenAuthInterceptor(settings.grpc_token))
    return Operations(interceptors, metrics, relay)


async def _start_feed(settings: Settings, store: Store, jobs: Jobs) -> FeedRelay | None:
    feed = store.event_feed(settings.event_feed_max_docs)  # None: the embedded store
    if feed is None:
        log.info(
            "live progress is not shared across service replicas: the embedded store "
            "serves a single replica"
        )
        return None
    if not settings.event_feed:
        log.warning(
            "live progress is not shared across service replicas: JOBWIRE_EVENT_FEED=off "
            "(run a single replica, or watchers miss events written through others)"
        )
        return None
    try:
        await feed.open()
    except StorageUnavailable:
        # MongoDB lost just then: fail the start as a moment earlier would have. Running
        # on without the feed, this replica's watchers never saw the others' events.
        raise
    except (FeedUnsupported, DomainError) as err:
        log.warning(
            "live progress is not shared across service replicas: the event feed cannot "
            "be created (%s); run a single replica",
            err,
        )
        return None
    relay = FeedRelay(feed, jobs.fanout)
    relay.start()
    jobs.relay = relay
    jobs.resync_seconds = jobs.firehose.resync_seconds = settings.watch_resync_seconds
    log.info("live progress is shared across service replicas through the event feed")
    return relay


def with_port(addr: str, port: int) -> str:
    host = addr.rpartition(":")[0] or "127.0.0.1"
    return f"{host}:{port}"
