"""The resumable firehose: WatchJobs with a cursor into the firehose log.

Every applied event, and every deletion of a job (an EVENT_TYPE_DELETED entry,
events.deletion, sent as WatchJobsResponse.deleted; filtered by its kind and the
state the job ended in like an event), has a place in the log: entry `n` of an origin (a store
process; the embedded store has one), numbered 1, 2, 3, ... in the order that
origin wrote them. A consumer's position is a `Cursor`: per origin, the highest
`n` up to which every entry was delivered, plus the few delivered above it (live
events of one origin can reach a stream slightly out of order, e.g. a claim and a
batch committed side by side). Resuming replays, per origin, what the cursor does
not cover, merged across origins by write time, then goes live; a live event is
delivered unless the cursor covers it. So every event is delivered exactly once
per cursor, whichever replica serves the stream, and filtered-out events advance
the cursor too. The position string is opaque to clients: `v1.` + base64url JSON.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from jobwire.v1 import event_pb2

from .domain.errors import invalid
from .fanout import Fanout, FellBehind
from .store.port import LogEntry, Store

PAGE = 500
# Delivered entries above an origin's contiguous run past which the stream re-reads
# the log (filling the holes) instead of remembering more.
MAX_EXTRAS = 64
_PREFIX = "v1."


@dataclass
class Cursor:
    """What a consumer has been delivered, per origin (see the module docstring)."""

    done: dict[str, int] = field(default_factory=dict)
    extra: dict[str, set[int]] = field(default_factory=dict)
    # Write time of the newest entry delivered (ns): tells a position older than
    # the retention window.
    time_ns: int = 0

    def covers(self, origin: str, n: int) -> bool:
        if n <= self.done.get(origin, 0):
            return True
        extra = self.extra.get(origin)
        return extra is not None and n in extra

    def mark(self, origin: str, n: int, time_ns: int = 0) -> bool:
        """Records a delivery; False when the origin has too many holes to track."""
        self.time_ns = max(self.time_ns, time_ns)
        done = self.done.get(origin, 0)
        if n != done + 1:
            holes = self.extra.setdefault(origin, set())
            holes.add(n)
            return len(holes) <= MAX_EXTRAS
        extra = self.extra.get(origin)
        done = n
        if extra:
            while done + 1 in extra:
                done += 1
                extra.discard(done)
            if not extra:
                del self.extra[origin]
        self.done[origin] = done
        return True

    def skip_to(self, origin: str, n: int) -> None:
        """Treats every entry of `origin` up to `n` as delivered (lost or before start)."""
        if n > self.done.get(origin, 0):
            self.done[origin] = n
            extra = self.extra.get(origin)
            if extra is not None:
                for k in [k for k in extra if k <= n]:
                    extra.discard(k)
                # Fold in the extras that are now contiguous.
                while n + 1 in extra:
                    n += 1
                    extra.discard(n)
                self.done[origin] = n
                if not extra:
                    del self.extra[origin]

    def forget(self, origin: str) -> None:
        """Drops what was delivered of `origin` (they were another log's entries)."""
        self.done.pop(origin, None)
        self.extra.pop(origin, None)

    def encode(self) -> str:
        body: dict[str, object] = {"d": self.done, "t": self.time_ns}
        if self.extra:
            body["x"] = {o: sorted(x) for o, x in self.extra.items() if x}
        raw = json.dumps(body, separators=(",", ":")).encode()
        return _PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> Cursor:
        problem = 'after must be a position from WatchJobsResponse.position, or "0"'
        if not text.startswith(_PREFIX) or len(text) > 65536:
            raise invalid(problem)
        data = text[len(_PREFIX) :]
        try:
            body = json.loads(base64.urlsafe_b64decode(data + "=" * (-len(data) % 4)))
            done = {str(o): _count(n) for o, n in body["d"].items()}
            extra = {str(o): {_count(n) for n in ns} for o, ns in body.get("x", {}).items()}
            time_ns = _count(body.get("t", 0))
        # RecursionError: forged JSON nested deeper than the parser goes (was UNKNOWN).
        except (ValueError, TypeError, KeyError, AttributeError, binascii.Error, RecursionError):
            raise invalid(problem) from None
        if any(n < 0 for n in done.values()):
            raise invalid(problem)
        return cls(done, extra, time_ns)


def _count(value: object) -> int:
    """A whole number of a position, as the service writes them: Python's JSON also
    reads `Infinity` and 1e400 (int() of them was an OverflowError, UNKNOWN), fractions
    and `true`."""
    if type(value) is not int:
        raise ValueError(f"not a whole number: {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class Gap:
    requested: str
    oldest: str


@dataclass(frozen=True, slots=True)
class Live:
    """Yielded once, when the stream is subscribed to the live fan-out: every event
    committed from then on reaches it, and `position` (when the log is on) resumes
    from that point (the servicer tells the client in its headers; README)."""

    position: str = ""


# Longest position sent in the headers (gRPC's default metadata limit is 8 KiB); a
# longer one (a log of very many origins) comes with the stream's first event only.
MAX_HEADER_POSITION = 4096

Delivery = tuple[event_pb2.JobEvent, str]
StreamItem = Delivery | Gap | Live


class Firehose:
    """Serves WatchJobs streams from the store's log and the live fan-out."""

    def __init__(self, store: Store, fanout: Fanout) -> None:
        self.store = store
        self.fanout = fanout
        self.catch_ups = 0  # live streams that fell behind and re-read the log
        # Set when other replicas' entries come through the feed (operations.py): one
        # lost there (a crash before the append, a failed append) is in the log only,
        # so a live stream re-reads the log after this long without an event, or with
        # an entry missing below ones it has. 0: this process publishes every entry.
        self.resync_seconds = 0.0

    @property
    def retention_ns(self) -> int:
        return self.store.policy.firehose_retention_ns

    async def watch(
        self, kind: int, states: Sequence[int], after: str
    ) -> AsyncIterator[StreamItem]:
        wanted = frozenset(states)

        def matches(event: event_pb2.JobEvent) -> bool:
            if kind and event.kind != kind:
                return False
            return not wanted or event.state in wanted

        cursor: Cursor | None = None
        if after == "0":
            cursor = Cursor()
            for origin, (oldest, _) in (await self.store.log_bounds(self._cutoff())).items():
                cursor.skip_to(origin, oldest - 1)  # the whole retained window, no gap
        elif after:
            cursor = Cursor.decode(after)
            gap = await self._gap(cursor, after)
            if gap is not None:
                yield gap
        announced = False
        while True:
            if cursor is not None:
                # Catch up without buffering live events (a long replay would overflow).
                async for item in self._replay(cursor, matches):
                    yield item
            # Routed by its filter where the publish watermark is known (fanout.py);
            # each item then says up to where the filtered-out entries have passed.
            sub = self.fanout.subscribe(kind=kind, states=states, lossless=True)
            try:
                if cursor is None:
                    cursor = Cursor()
                    for origin, (_, newest) in (
                        await self.store.log_bounds(self._cutoff())
                    ).items():
                        cursor.skip_to(origin, newest)
                    cursor.time_ns = time.time_ns()
                else:
                    # What landed between the replay's last read and the subscription.
                    async for item in self._replay(cursor, matches):
                        yield item
                if not announced:
                    announced = True
                    yield Live(cursor.encode())
                loop = asyncio.get_running_loop()
                resync_at = loop.time() + self.resync_seconds
                while True:
                    try:
                        async with asyncio.timeout_at(resync_at if self.resync_seconds else None):
                            batch = await sub.next_marked_batch()
                    except FellBehind:
                        self.catch_ups += 1
                        break
                    except TimeoutError:
                        # Still subscribed: what arrives meanwhile is in the cursor already.
                        async for item in self._replay(cursor, matches):
                            yield item
                        resync_at = loop.time() + self.resync_seconds
                        continue
                    holes = False
                    for (event, position), passed in batch:
                        if position is None:
                            continue  # not in the log (its append failed): see README
                        origin, n = position
                        fresh = not cursor.covers(origin, n)
                        if fresh:
                            holes = not cursor.mark(origin, n, time.time_ns()) or holes
                        if passed:
                            # Every entry up to `passed` was published before this one:
                            # the ones this stream wants came earlier in its buffer.
                            cursor.skip_to(origin, passed)
                        if fresh and matches(event):
                            yield event, cursor.encode()
                    if holes:
                        break  # too many out-of-order entries: re-read the log
                    if not cursor.extra:  # none missing: the silence is counted anew
                        resync_at = loop.time() + self.resync_seconds
            finally:
                self.fanout.unsubscribe(sub)

    def _cutoff(self) -> int:
        return time.time_ns() - self.retention_ns

    async def _gap(self, cursor: Cursor, requested: str) -> Gap | None:
        """The gap announcement when entries after the cursor have expired; advances
        the cursor past them."""
        cutoff = self._cutoff()
        bounds = await self.store.log_bounds(cutoff)
        lost = self._past_the_end(cursor, bounds)
        for origin, (oldest, _) in bounds.items():
            done = cursor.done.get(origin, 0)
            if oldest > done + 1:
                seen = sum(1 for n in cursor.extra.get(origin, ()) if n < oldest)
                if oldest - 1 - done > seen:
                    lost = True
                cursor.skip_to(origin, oldest - 1)
        # An origin the cursor knows whose entries are all gone from the store (MongoDB's
        # TTL deletes them): when the position is older than the window, some may be lost.
        if any(o not in bounds for o in cursor.done) and 0 < cursor.time_ns < cutoff:
            lost = True
        if not lost:
            return None
        return Gap(requested=requested, oldest=cursor.encode())

    def _past_the_end(self, cursor: Cursor, bounds: dict[str, tuple[int, int]]) -> bool:
        """True when the cursor covers entries an origin never wrote: the position is
        from another database or from before a restore (the embedded store's one origin
        has the same name in every database). The cursor forgets that origin, so this
        log's retained entries are delivered (as for "0"), none taken for ones seen."""
        single = self.store.single_writer_origin
        ends = {origin: newest for origin, (_, newest) in bounds.items()}
        if single and single not in ends:
            ends[single] = 0  # nothing written yet
        past = False
        for origin, newest in ends.items():
            if cursor.done.get(origin, 0) > newest or any(
                n > newest for n in cursor.extra.get(origin, ())
            ):
                past = True
                cursor.forget(origin)
        return past

    async def _replay(
        self, cursor: Cursor, matches: Callable[[event_pb2.JobEvent], bool]
    ) -> AsyncIterator[Delivery]:
        """Entries the cursor does not cover, origins merged by write time."""
        cutoff = self._cutoff()
        bounds = await self.store.log_bounds(cutoff)
        heads: dict[str, deque[LogEntry]] = {}
        read_to: dict[str, int] = {}
        exhausted: set[str] = set()

        async def refill(origin: str) -> None:
            page = await self.store.log_after(origin, read_to[origin], cutoff, PAGE)
            heads[origin] = deque(page)
            if page:
                read_to[origin] = page[-1].n
            if not page:  # (a page of large events may hold fewer than PAGE)
                exhausted.add(origin)

        for origin, (_, newest) in bounds.items():
            read_to[origin] = cursor.done.get(origin, 0)
            if newest > read_to[origin]:
                await refill(origin)
        last: dict[str, int] = dict(read_to)
        while True:
            best: LogEntry | None = None
            for origin in list(heads):
                page = heads[origin]
                if not page:
                    if origin in exhausted:
                        del heads[origin]
                        continue
                    await refill(origin)
                    page = heads[origin]
                    if not page:
                        del heads[origin]
                        continue
                head = page[0]
                if best is None or (head.time_ns, head.origin, head.n) < (
                    best.time_ns,
                    best.origin,
                    best.n,
                ):
                    best = head
            if best is None:
                return
            heads[best.origin].popleft()
            if best.n > last[best.origin] + 1:
                # Expired between the gap check and this read: nothing left to wait for.
                cursor.skip_to(best.origin, best.n - 1)
            last[best.origin] = best.n
            if cursor.covers(best.origin, best.n):
                continue
            cursor.mark(best.origin, best.n, best.time_ns)
            if matches(best.event):
                yield best.event, cursor.encode()
