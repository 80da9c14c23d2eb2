"""Live progress across service replicas, through the store's optional EventFeed.

Each replica publishes the events it applies to its own Fanout at once (watchers on
the writing replica see them with no extra hop) and queues them for the feed; one
writer task appends what is queued with one write per round, after the job updates
are durable. A tailer task reads everybody's entries and publishes the ones written
by *other* replicas into the local Fanout, so nothing is delivered twice by the
writing replica; an entry seen twice after a re-open is dropped by (job id, sequence,
event time).

The job document's ring stays the source of truth. A feed entry may be lost (the
process dies between the job update and the append, or the database is away when
the writer tries): a watcher notices the gap at the job's next event, or after
`resync_seconds` without any, and replays the ring (service/jobs.py, watch_job);
a client that reconnects with its last sequence replays the ring anyway. So the
feed needs no stronger durability than w=1 and is never waited for by a callback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import OrderedDict
from collections.abc import Iterable

from jobwire.v1 import event_pb2

from . import metrics
from .domain.errors import DomainError
from .domain.records import LogPosition
from .fanout import Fanout, Item
from .store.port import EventFeed

log = logging.getLogger("jobwire.feed")

MAX_APPEND = 1000  # entries per feed write
MAX_PENDING = 100_000  # queued entries kept while the database is away (oldest dropped)
RECENT = 65_536  # (job id, sequence, event time) keys remembered to drop repeated entries


class FeedRelay:
    """Appends this replica's applied events to the feed and publishes the others'."""

    def __init__(self, feed: EventFeed, fanout: Fanout, origin: str = "") -> None:
        self.feed = feed
        self.fanout = fanout
        self.origin = origin or uuid.uuid4().hex
        self._pending: list[Item] = []
        self._wakeup = asyncio.Event()
        self._recent: OrderedDict[tuple[str, int, int], None] = OrderedDict()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self.sent = 0
        self.received = 0
        self.dropped = 0

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._write_forever(), name="feed-writer"),
            loop.create_task(self._tail_forever(), name="feed-tailer"),
        ]

    def send(self, events: Iterable[Item]) -> None:
        """Queues applied events (with their firehose positions) for the feed; never blocks."""
        if self._closing:
            return
        self._pending.extend(events)
        excess = len(self._pending) - MAX_PENDING
        if excess > 0:
            del self._pending[:excess]
            self._count_dropped(excess)
        self._wakeup.set()

    async def close(self, flush_seconds: float = 2.0) -> None:
        """Appends what is queued (bounded wait), then stops both tasks."""
        self._closing = True
        self._wakeup.set()
        if self._tasks:
            writer, tailer = self._tasks
            tailer.cancel()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(asyncio.shield(writer), flush_seconds)
            for task in self._tasks:
                task.cancel()
            for task in self._tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.feed.close()

    async def _write_forever(self) -> None:
        down = False
        while True:
            if not self._pending:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch = self._pending[:MAX_APPEND]
            del self._pending[:MAX_APPEND]
            try:
                await self.feed.append(self.origin, [e for e, _ in batch], [p for _, p in batch])
            except DomainError as err:
                # Not retried: the events are in their jobs' rings, and watchers heal
                # from there. Retrying would only reorder the feed.
                self._count_dropped(len(batch))
                _storage_error("feed_append")
                if not down:
                    log.warning("event feed append failed, watchers will resync: %s", err)
                down = True
                if self._closing:
                    return
                await asyncio.sleep(0.2)
                continue
            if down:
                log.info("event feed appends resumed")
                down = False
            self.sent += len(batch)
            _feed_events("sent", len(batch))

    async def _tail_forever(self) -> None:
        delay = 0.1
        down = False
        while True:
            try:
                async for batch in self.feed.tail():
                    if down:
                        log.info("event feed tail resumed")
                        down = False
                    delay = 0.1
                    fresh = [
                        (e, p) for origin, e, p in batch if origin != self.origin and self._first(e)
                    ]
                    if fresh:
                        self.received += len(fresh)
                        _feed_events("received", len(fresh))
                        positions: list[LogPosition | None] = [p for _, p in fresh]
                        self.fanout.publish([e for e, _ in fresh], positions)
            except DomainError as err:
                _storage_error("feed_tail")
                if not down:
                    log.warning("event feed tail lost, retrying: %s", err)
                down = True
            except Exception:
                log.exception("event feed tail failed, retrying")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    def _first(self, event: event_pb2.JobEvent) -> bool:
        # The event's time is in the key: a job made again under a deleted job's id
        # numbers its events from 1 again, and those are no repeats (they were dropped,
        # so other replicas' watchers got none of them live).
        key = (event.job_id, event.sequence, event.create_time.ToNanoseconds())
        if key in self._recent:
            return False
        self._recent[key] = None
        if len(self._recent) > RECENT:
            self._recent.popitem(last=False)
        return True

    def _count_dropped(self, n: int) -> None:
        self.dropped += n
        _feed_events("dropped", n)


def _feed_events(direction: str, n: int) -> None:
    metrics.FEED_EVENTS.labels(direction).inc(n)


def _storage_error(operation: str) -> None:
    metrics.STORAGE_ERRORS.labels(operation).inc()
