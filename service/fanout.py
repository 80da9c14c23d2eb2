"""Live fan-out of applied events to watchers inside one process.

Publishing never blocks and never waits for a watcher: each subscription has a
bounded buffer. When a slow watcher's buffer is full, its PROGRESS events are
coalesced to the latest one per job; other events (claims, requeues, terminal
events) are always kept, up to a hard cap past which the subscription is closed
so a stalled client cannot hold unbounded memory (it can resume by sequence).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable

from jobwire.v1 import event_pb2

_PROGRESS = event_pb2.EVENT_TYPE_PROGRESS


class SubscriptionClosed(Exception):
    """The stream must end: the watcher fell behind, or the service is stopping.

    Either way the client reconnects with its last sequence number and loses nothing.
    """

    def __init__(self, message: str, shutting_down: bool) -> None:
        super().__init__(message)
        self.shutting_down = shutting_down


class Subscription:
    __slots__ = (
        "_buffer",
        "_capacity",
        "_closed",
        "_hard_cap",
        "_overflow",
        "_shutdown",
        "_wakeup",
        "job_id",
        "kind",
        "states",
    )

    def __init__(
        self, capacity: int, job_id: str = "", kind: int = 0, states: Iterable[int] = ()
    ) -> None:
        self.job_id = job_id
        self.kind = kind
        self.states = frozenset(states)
        self._capacity = capacity
        self._hard_cap = capacity * 4
        self._buffer: deque[event_pb2.JobEvent] = deque()
        # Coalesced progress, latest per job, delivered after the buffer.
        self._overflow: dict[str, event_pb2.JobEvent] = {}
        self._wakeup = asyncio.Event()
        self._closed = False
        self._shutdown = False

    def matches(self, event: event_pb2.JobEvent) -> bool:
        if self.kind and event.kind != self.kind:
            return False
        return not self.states or event.state in self.states

    def offer(self, event: event_pb2.JobEvent) -> None:
        if self._closed:
            return
        if len(self._buffer) < self._capacity and not self._overflow:
            self._buffer.append(event)
        elif event.type == _PROGRESS:
            self._overflow[event.job_id] = event
        else:
            # Keep per-job order: a coalesced progress goes out before this event.
            pending = self._overflow.pop(event.job_id, None)
            if pending is not None:
                self._buffer.append(pending)
            self._buffer.append(event)
        if len(self._buffer) + len(self._overflow) > self._hard_cap:
            self._closed = True
            self._buffer.clear()
            self._overflow.clear()
        self._wakeup.set()

    async def next_batch(self) -> list[event_pb2.JobEvent]:
        """Everything buffered, in order; waits while there is nothing."""
        while not self._buffer and not self._overflow:
            if self._shutdown:
                raise SubscriptionClosed(
                    "service is shutting down; reconnect with your last sequence", True
                )
            if self._closed:
                raise SubscriptionClosed(
                    "watcher fell too far behind; reconnect with your last sequence", False
                )
            self._wakeup.clear()
            await self._wakeup.wait()
        batch = list(self._buffer)
        self._buffer.clear()
        if self._overflow:
            batch.extend(self._overflow.values())
            self._overflow.clear()
        return batch

    def close(self) -> None:
        """Ends the stream once what is buffered has been read (service shutdown)."""
        self._closed = True
        self._shutdown = True
        self._wakeup.set()

    def pending(self) -> int:
        return len(self._buffer) + len(self._overflow)


class Fanout:
    """Routes each published event to the subscriptions that want it."""

    def __init__(self, capacity: int = 256) -> None:
        self._capacity = capacity
        self._by_job: dict[str, set[Subscription]] = {}
        self._all: set[Subscription] = set()

    def subscribe(
        self, job_id: str = "", kind: int = 0, states: Iterable[int] = ()
    ) -> Subscription:
        sub = Subscription(self._capacity, job_id, kind, states)
        if job_id:
            self._by_job.setdefault(job_id, set()).add(sub)
        else:
            self._all.add(sub)
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

    def publish(self, events: Iterable[event_pb2.JobEvent]) -> None:
        for event in events:
            for sub in self._by_job.get(event.job_id, ()):
                sub.offer(event)
            for sub in self._all:
                if sub.matches(event):
                    sub.offer(event)

    def close_all(self) -> None:
        for subs in self._by_job.values():
            for sub in subs:
                sub.close()
        for sub in self._all:
            sub.close()

    @property
    def watchers(self) -> int:
        return len(self._all) + sum(len(s) for s in self._by_job.values())
