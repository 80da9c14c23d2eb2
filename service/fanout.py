"""Live fan-out of applied events to watchers inside one process.

Publishing never blocks and never waits for a watcher: each subscription has a
bounded buffer. When a slow watcher's buffer is full, its PROGRESS events are
coalesced to the latest one per job, which then names the first sequence it stands
for (`coalesced_from_sequence`); other events (claims, requeues, stalls, terminal
events) are always kept, up to a hard cap past which the subscription is closed
so a stalled client cannot hold unbounded memory (it can resume by sequence).
A lossless subscription (a WatchJobs stream backed by the firehose log) never
coalesces: past the hard cap it is marked `behind` and the stream catches up
from the log instead.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable, Sequence

from jobwire.v1 import event_pb2

from .cork import MIN_WATCHERS as CORK_MIN_WATCHERS
from .cork import Corker, peer_key
from .domain.records import LogPosition

_PROGRESS = event_pb2.EVENT_TYPE_PROGRESS
MAX_UNPUBLISHED = 100_000  # entries published above a hole before the anchor is dropped
# An event and its place in the firehose log (None when the store keeps no log).
Item = tuple[event_pb2.JobEvent, LogPosition | None]


class SubscriptionClosed(Exception):
    """The stream must end: the watcher fell behind, or the service is stopping.

    Either way the client reconnects with its last sequence number and loses nothing.
    """

    def __init__(self, message: str, shutting_down: bool) -> None:
        super().__init__(message)
        self.shutting_down = shutting_down


class FellBehind(Exception):
    """A lossless subscription overflowed: its stream must catch up from the log."""


class Subscription:
    __slots__ = (
        "_behind",
        "_buffer",
        "_capacity",
        "_closed",
        "_hard_cap",
        "_marks",
        "_overflow",
        "_shutdown",
        "_waiter",
        "job_id",
        "kind",
        "lossless",
        "peer",
        "states",
    )

    def __init__(
        self,
        capacity: int,
        job_id: str = "",
        kind: int = 0,
        states: Iterable[int] = (),
        lossless: bool = False,
        peer: tuple[str, int] | None = None,
    ) -> None:
        self.job_id = job_id
        # The client connection's address (service/cork.py), when known.
        self.peer = peer
        self.kind = kind
        self.states = frozenset(states)
        self.lossless = lossless
        self._capacity = capacity
        self._hard_cap = capacity * 4
        self._buffer: deque[Item] = deque()
        # Coalesced progress, latest per job (with the first event it replaced),
        # delivered after the buffer.
        self._overflow: dict[str, tuple[event_pb2.JobEvent, Item]] = {}
        # A lossless subscription's publish watermark per buffered item (Fanout.publish).
        self._marks: deque[int] = deque()
        # A bare future rather than an asyncio.Event: Event.wait() looks up the running
        # loop on every call, and that costs a getpid() system call (CPython checks for
        # a fork) - per watcher per event, 10% of py-spy's samples in a 10,000-stream
        # fan-out. The loop is looked up once, at the first wait.
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False
        self._shutdown = False
        self._behind = False

    def matches(self, event: event_pb2.JobEvent) -> bool:
        if self.kind and event.kind != self.kind:
            return False
        return not self.states or event.state in self.states

    def offer(self, item: Item, watermark: int = 0) -> None:
        if self._closed:
            return
        event = item[0]
        if self.lossless:
            self._buffer.append(item)
            self._marks.append(watermark)
        elif len(self._buffer) < self._capacity and not self._overflow:
            self._buffer.append(item)
        elif event.type == _PROGRESS:
            replaced = self._overflow.get(event.job_id)
            first = event if replaced is None else replaced[0]
            self._overflow[event.job_id] = (first, item)
        else:
            # Keep per-job order: a coalesced progress goes out before this event.
            pending = self._overflow.pop(event.job_id, None)
            if pending is not None:
                self._buffer.append(_coalesced(*pending))
            self._buffer.append(item)
        if len(self._buffer) + len(self._overflow) > self._hard_cap:
            self._closed = True
            self._behind = self.lossless
            self._buffer.clear()
            self._marks.clear()
            self._overflow.clear()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def next_batch(self) -> list[Item]:
        """Everything buffered, in order; waits while there is nothing."""
        # The wait is in this frame, not in a helper coroutine: a fan-out resumes the
        # chain of frames above the future once per watcher per event.
        while not self._buffer and not self._overflow:
            await self._waiter_while_open()
        return self._take()

    async def next_marked_batch(self) -> list[tuple[Item, int]]:
        """A lossless subscription's next batch, each item with the watermark of its
        origin when it was offered: every entry of the origin up to it had been
        published by then (0: unknown). See Fanout.publish."""
        while not self._buffer and not self._overflow:
            await self._waiter_while_open()
        marks = list(self._marks)
        return list(zip(self._take(), marks, strict=True))

    def _take(self) -> list[Item]:
        batch = list(self._buffer)
        self._buffer.clear()
        self._marks.clear()
        if self._overflow:
            batch.extend(_coalesced(*pending) for pending in self._overflow.values())
            self._overflow.clear()
        return batch

    def _waiter_while_open(self) -> asyncio.Future[None]:
        """What the next offer resolves; raises when the stream must end instead."""
        if self._shutdown:
            raise SubscriptionClosed(
                "service is shutting down; reconnect with your last sequence", True
            )
        if self._behind:
            raise FellBehind
        if self._closed:
            raise SubscriptionClosed(
                "watcher fell too far behind; reconnect with your last sequence", False
            )
        waiter = self._waiter
        if waiter is None or waiter.done():
            loop = asyncio.get_running_loop() if waiter is None else waiter.get_loop()
            waiter = self._waiter = loop.create_future()
        return waiter

    def close(self) -> None:
        """Ends the stream once what is buffered has been read (service shutdown)."""
        self._closed = True
        self._shutdown = True
        self._wake()

    def pending(self) -> int:
        return len(self._buffer) + len(self._overflow)


def _coalesced(first: event_pb2.JobEvent, item: Item) -> Item:
    """The latest progress, marked with the first sequence it stands for (and, when
    that is the job's first event, its create time). A copy: the same event object
    goes to every other subscription unchanged."""
    event, position = item
    if first.sequence >= event.sequence:
        return item
    marked = event_pb2.JobEvent()
    marked.CopyFrom(event)
    marked.coalesced_from_sequence = first.sequence
    if first.HasField("job_create_time"):
        marked.job_create_time.CopyFrom(first.job_create_time)
    return marked, position


class Fanout:
    """Routes each published event to the subscriptions that want it."""

    def __init__(self, capacity: int = 256) -> None:
        self._capacity = capacity
        self._by_job: dict[str, set[Subscription]] = {}
        self._all: set[Subscription] = set()
        # Firehose subscriptions by (kind, state) they accept, 0 for any: an event
        # reaches only those that match, not a check against every subscription.
        self._routes: dict[tuple[int, int], set[Subscription]] = {}
        # Lossless (cursor-keeping) ones are routed by their filter too, but only for
        # events of an anchored origin: there the publish watermark tells a stream
        # which filtered-out entries it may count as passed (Cursor.skip_to). Events
        # of other origins reach every lossless subscription, as the cursor needs.
        self._lossless_routes: dict[tuple[int, int], set[Subscription]] = {}
        self._lossless: set[Subscription] = set()
        self._published: dict[str, int] = {}  # anchored origin -> contiguous n published
        self._published_extra: dict[str, set[int]] = {}
        # After close_all() (shutdown, or a watch worker's feed lost) until reopen(): a
        # subscription made now would miss what is published meanwhile, so it is ended
        # at once (a call that passed its checks just before the close subscribes late).
        self._refusing = False
        # Batches a job's fan-out per client connection (TCP_CORK), when set.
        self.corker: Corker | None = None

    def subscribe(
        self,
        job_id: str = "",
        kind: int = 0,
        states: Iterable[int] = (),
        lossless: bool = False,
        capacity: int = 0,
        peer: str = "",
    ) -> Subscription:
        """`capacity` (default: the fan-out's) bounds the subscription's buffer; `peer`
        is gRPC's address of the client (`context.peer()`)."""
        sub = Subscription(
            capacity or self._capacity, job_id, kind, states, lossless, peer_key(peer)
        )
        if self._refusing:
            sub.close()
        if job_id:
            self._by_job.setdefault(job_id, set()).add(sub)
        else:
            self._all.add(sub)
            if lossless:
                self._lossless.add(sub)
            routes = self._lossless_routes if lossless else self._routes
            for key in _routes_of(sub):
                routes.setdefault(key, set()).add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        if sub.job_id:
            subs = self._by_job.get(sub.job_id)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._by_job[sub.job_id]
        else:
            self._all.discard(sub)
            self._lossless.discard(sub)
            routes = self._lossless_routes if sub.lossless else self._routes
            for key in _routes_of(sub):
                routed = routes.get(key)
                if routed is not None:
                    routed.discard(sub)
                    if not routed:
                        del routes[key]

    def publish(
        self,
        events: Iterable[event_pb2.JobEvent],
        positions: Sequence[LogPosition | None] = (),
    ) -> None:
        """`positions[i]` is the firehose position of the i-th event, when known."""
        for i, event in enumerate(events):
            item = (event, positions[i] if i < len(positions) else None)
            watchers = self._by_job.get(event.job_id, ())
            if self.corker is not None and len(watchers) >= CORK_MIN_WATCHERS:
                self.corker.offer(watchers, item)
            else:
                for sub in watchers:
                    sub.offer(item)
            if not self._routes and not self._lossless:
                continue  # no WatchJobs stream open: no route keys to build per event
            keys = {(event.kind, event.state), (event.kind, 0), (0, event.state), (0, 0)}
            for key in keys:
                for sub in self._routes.get(key, ()):
                    sub.offer(item)
            if not self._lossless:
                continue
            watermark = self._advance(item[1])
            if watermark:
                for key in keys:
                    for sub in self._lossless_routes.get(key, ()):
                        sub.offer(item, watermark)
            else:
                for sub in self._lossless:
                    sub.offer(item)

    def anchor(self, origin: str, newest: int) -> None:
        """Declares that every entry of `origin` up to `newest` is already in the log and
        that this process publishes each later one (a single-writer store at start-up),
        so its publish watermark is exact."""
        self._published[origin] = newest
        self._published_extra[origin] = set()

    def _advance(self, position: LogPosition | None) -> int:
        """Records the publication of `position`; the origin's contiguous watermark, or
        0 when the origin is not anchored."""
        if position is None or position[0] not in self._published:
            return 0
        origin, n = position
        done = self._published[origin]
        extra = self._published_extra[origin]
        if n == done + 1:
            done = n
            while done + 1 in extra:
                done += 1
                extra.discard(done)
            self._published[origin] = done
        elif n > done:
            extra.add(n)
            if len(extra) > MAX_UNPUBLISHED:  # an entry never came: stop trusting it
                del self._published[origin], self._published_extra[origin]
                return 0
        return done

    def reopen(self) -> None:
        """Subscriptions are served again (a watch worker's feed is open again)."""
        self._refusing = False

    def close_all(self) -> None:
        self._refusing = True
        for subs in self._by_job.values():
            for sub in subs:
                sub.close()
        for sub in self._all:
            sub.close()

    @property
    def watchers(self) -> int:
        return len(self._all) + sum(len(s) for s in self._by_job.values())


def _routes_of(sub: Subscription) -> set[tuple[int, int]]:
    """The (kind, state) keys a firehose subscription is found under (0: any)."""
    return {(sub.kind, state) for state in (sub.states or (0,))}
