"""One WatchJobs stream per dashboard process, fanned out to the open jobs pages.

A firehose of thousands of events a second must not reach a browser as such: each
subscriber (one browser tab) keeps only the latest change per job until its next
push, so a tab gets at most one message per push interval whatever the rate. An
event is turned into JSON once, however many tabs receive it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc
import orjson

from jobwire.v1 import event_pb2, job_pb2, job_service_pb2

from .present import event_row, iso

if TYPE_CHECKING:
    from jobwire.v1.job_service_pb2_grpc import JobServiceAsyncStub

log = logging.getLogger(__name__)

DEPTH_TTL_SECONDS = 3.0  # the live stats go out every 2 s
DEPTH_CAP = 1000  # ListJobs page limit: beyond it the page shows "1000+"
# Changes kept for tabs whose rows were read before their stream opened (a page load
# takes well under a second; at 1,000 events/s this is 8 s of them).
JOURNAL = 8192
# The WatchJobs stream stays up this long after the last page load or open tab, so a
# page's stream finds the journal its rows were read against (and reloads reuse it).
LINGER_SECONDS = 60.0
LIVE_WAIT_SECONDS = 3.0  # a page load waits this long for the stream to go live
# A page's mark (Hub.mark): "<this process's instance>.<stream start>.<changes seen>".
MARK = re.compile(r"([0-9a-f]{8})\.([0-9]{1,18})\.([0-9]{1,18})", re.ASCII)


class Change:
    """A job's latest change, serialised at most once."""

    __slots__ = ("_json", "event")

    def __init__(self, event: event_pb2.JobEvent) -> None:
        self.event = event
        self._json: bytes | None = None

    def json(self) -> bytes:
        if self._json is None:
            self._json = orjson.dumps(event_row(self.event))
        return self._json


MAX_FOLLOWED = 2000  # ids a tab may follow, its rows plus the jobs that appeared since
# Events that put a job in a new state (a progress moves a queued job to RUNNING too,
# but only its first one can be told apart by the event alone: sequence 1).
ENTERING = frozenset(
    {
        event_pb2.EVENT_TYPE_CLAIMED,
        event_pb2.EVENT_TYPE_REQUEUED,
        event_pb2.EVENT_TYPE_COMPLETED,
        event_pb2.EVENT_TYPE_FAILED,
        event_pb2.EVENT_TYPE_CANCELLED,
    }
)
# A journal entry: (counter, job id, kind, sequence, the state it entered or 0, the
# state it is in, the serialised event, or b"" for the job's deletion: an event is
# never empty).
_Entry = tuple[int, str, int, int, int, int, bytes]
_DELETION = b""


class Subscriber:
    """One open tab. `ids`: only these jobs (the rows it shows), plus, when `new`, every
    job's first event (a job that just became active); None: every job (curl, scripts)."""

    def __init__(
        self,
        kind: int,
        ids: set[str] | None = None,
        new: bool = True,
        states: frozenset[int] = frozenset(),
    ) -> None:
        self.kind = kind
        self.ids = ids
        self.new = new
        # The page's state filter: a job it does not show that enters one of these
        # states belongs on it now, where a reload would place it.
        self.states = states
        self.pending: dict[str, Change] = {}
        # Jobs this tab follows since their first event: the push says so, because the
        # latest change it carries may be a later one (changes coalesce), which alone
        # would read as an event of a job the tab does not show.
        self.fresh: set[str] = set()
        self.wake = asyncio.Event()
        # Set when the upstream stream broke or reported a gap: the tab must re-read rows.
        self.resync = False
        # Jobs it shows that were deleted since the last push.
        self.gone: set[str] = set()

    def shows(self, job_id: str) -> bool:
        return self.ids is None or job_id in self.ids

    def take(self) -> tuple[list[Change], set[str]]:
        """The pending changes and which of their jobs are new to this tab."""
        changes, fresh = list(self.pending.values()), self.fresh
        self.pending, self.fresh = {}, set()
        self.wake.clear()
        return changes, fresh

    def take_gone(self) -> set[str]:
        gone, self.gone = self.gone, set()
        return gone


class Hub:
    """The dashboard's one WatchJobs stream, fanned out to its subscribers (tabs).

    A jobs page reads its rows, then opens its stream: what happens in between would be
    lost (a job whose first event lands then never appears). So a page takes a `mark()`
    before it reads its rows (the stream is then live: the service says so), and its
    stream subscribes with it: the changes the hub saw since are replayed from a journal.
    A mark the journal no longer covers (or of another run of the hub) gets a resync:
    the tab re-reads its rows, with its subscription already taking changes.
    """

    def __init__(
        self,
        stub: Callable[[], JobServiceAsyncStub],
        journal: int = JOURNAL,
        linger_seconds: float = LINGER_SECONDS,
    ) -> None:
        self._stub = stub
        self._subscribers: set[Subscriber] = set()
        self._task: asyncio.Task[None] | None = None
        self._position = ""
        self._instance = secrets.token_hex(4)  # marks of another process never match
        self._epoch = 0  # one per start of the stream: a stopped hub's journal is gone
        self._counter = 0  # changes seen this epoch
        self._floor = 0  # marks below it are not covered (a gap reset the rows)
        self._journal: deque[_Entry] = deque(maxlen=journal)
        # Create times of the jobs whose first event the hub saw lately (the journal's
        # reach): a tab that meets a job there shows when it was created, although
        # the change it gets may be a later event, which does not carry it.
        self._created: OrderedDict[str, str] = OrderedDict()
        self._linger_seconds = linger_seconds
        self._linger_until = 0.0
        self._live = asyncio.Event()
        # Set once the stream went live or an attempt failed: a page load waits no longer.
        self._settled = asyncio.Event()
        self._seconds: deque[tuple[int, int]] = deque(maxlen=8)  # (second, events)
        self._depth: dict[str, int] = {}
        self._depth_at = -DEPTH_TTL_SECONDS
        self._depth_task: asyncio.Task[None] | None = None
        # False from a broken WatchJobs stream until the service answers again: the
        # open pages say "reconnecting" meanwhile rather than "live".
        self.connected = True

    @property
    def live(self) -> bool:
        """The service has the stream live (it said so in its headers)."""
        return self._live.is_set()

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def subscribe(
        self,
        kind: int = 0,
        ids: set[str] | None = None,
        new: bool = True,
        since: str | None = None,
        states: frozenset[int] = frozenset(),
    ) -> Subscriber:
        """A tab's subscription; `since`: the mark its rows were read after (None: live
        from now, for streams opened without a page)."""
        sub = Subscriber(kind, ids, new, states)
        self._subscribers.add(sub)
        self._start()
        if since is not None:
            self._catch_up(sub, since)
        return sub

    async def mark(self, wait: float = LIVE_WAIT_SECONDS) -> str:
        """Where a page's rows are read from: every change after it reaches a stream
        that subscribes with it. Starts the stream and waits (up to `wait`) until the
        service has it live; "" when it is not (the tab then re-reads its rows)."""
        self._linger_until = max(self._linger_until, time.monotonic() + self._linger_seconds)
        self._start()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                await self._settled.wait()
        if not self._live.is_set():
            return ""
        return f"{self._instance}.{self._epoch}.{self._counter}"

    def _start(self) -> None:
        if self._task is None or self._task.done():
            # Live from when the service says so: what happened while nobody watched is
            # in the rows a page reads; `position` resumes a stream that broke in use.
            self._position = ""
            self._epoch += 1
            self._counter = self._floor = 0
            self._journal.clear()
            self._created.clear()
            self._live.clear()
            self._settled.clear()
            self._task = asyncio.create_task(self._run(), name="dashboard-watch-jobs")

    def _catch_up(self, sub: Subscriber, since: str) -> None:
        """The journal's changes after `since` for a new subscriber, or a resync."""
        parsed = MARK.fullmatch(since)
        mark = int(parsed[3]) if parsed else -1
        oldest = self._journal[0][0] if self._journal else self._counter + 1
        covered = (
            parsed is not None
            and self._live.is_set()
            and parsed[1] == self._instance
            and int(parsed[2]) == self._epoch
            and max(self._floor, oldest - 1) <= mark <= self._counter
        )
        if not covered:
            sub.resync = True
            if self._live.is_set():
                sub.wake.set()  # else when it goes live (_run)
            return
        later: list[_Entry] = []
        for entry in reversed(self._journal):
            if entry[0] <= mark:
                break
            later.append(entry)
        for _, job_id, kind, sequence, entered, state, raw in reversed(later):
            if raw == _DELETION:
                if not sub.kind or sub.kind == kind:
                    self._gone(sub, job_id)
            elif self._wants(sub, job_id, kind, sequence, entered, state):
                sub.pending[job_id] = Change(event_pb2.JobEvent.FromString(raw))
                sub.wake.set()

    def created(self, job_id: str) -> str:
        """When a job the hub saw begin was created ("" when it did not see that)."""
        return self._created.get(job_id, "")

    def _idle(self) -> bool:
        return not self._subscribers and time.monotonic() >= self._linger_until

    def unsubscribe(self, sub: Subscriber) -> None:
        self._subscribers.discard(sub)

    def deleted(self, job_ids: set[str]) -> None:
        """Jobs deleted by this dashboard's Delete: pushed at once, before the stream's
        `deleted` for them (a repeat, which a tab takes as such)."""
        for sub in self._subscribers:
            for job_id in job_ids:
                self._gone(sub, job_id)

    @staticmethod
    def _gone(sub: Subscriber, job_id: str) -> None:
        """A tab that shows the job hears at its next push that it was deleted (its row
        goes; a job page says so). The tab goes on following the id: a job made again
        under it is another job, whose first event comes as a new one."""
        if not sub.shows(job_id):
            return
        sub.pending.pop(job_id, None)  # the deleted job's last change
        sub.fresh.discard(job_id)
        sub.gone.add(job_id)
        sub.wake.set()

    async def close(self) -> None:
        for task in (self._task, self._depth_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    def events_per_second(self) -> float:
        """Events seen over the last complete five seconds, per second."""
        now = int(time.monotonic())
        total = sum(n for second, n in self._seconds if now - 5 <= second < now)
        return round(total / 5, 1)

    def _count(self) -> None:
        second = int(time.monotonic())
        if self._seconds and self._seconds[-1][0] == second:
            self._seconds[-1] = (second, self._seconds[-1][1] + 1)
        else:
            self._seconds.append((second, 1))

    async def _run(self) -> None:
        delay = 0.2
        while not self._idle():
            try:
                call = self._stub().WatchJobs(
                    job_service_pb2.WatchJobsRequest(after=self._position)
                )
                if not self._live.is_set():
                    await self._went_live(call)
                if not self.connected:
                    # WatchJobs sends nothing until an event: a cheap call says whether
                    # the service answers. Only then do the tabs re-read their rows (a
                    # re-read while it was down got a 503 and kept the old rows).
                    await self._stub().ListJobs(
                        job_service_pb2.ListJobsRequest(page_size=1), timeout=5.0
                    )
                    self.connected = True
                    self._resync_all()
                async for response in call:
                    delay = 0.2
                    if response.HasField("gap"):
                        self._floor = self._counter  # earlier marks miss the lost events
                        self._resync_all()
                    if response.position:
                        self._position = response.position
                    if response.HasField("event"):
                        self._dispatch(response.event)
                    elif response.HasField("deleted"):
                        # In commit order with the events, also when the stream resumed
                        # after a break (a gap instead re-reads every tab's rows).
                        self._dispatch_deletion(response.deleted)
                    if self._idle():
                        call.cancel()
                        return
            except grpc.aio.AioRpcError as err:
                log.warning("WatchJobs ended: %s; reconnecting", err.code().name)
            self._settled.set()  # not live: a page load goes on without waiting
            # Whatever happens while the stream is down, the tabs re-read their rows once
            # it is back (above); until then they say so.
            self.connected = False
            for sub in self._subscribers:
                sub.wake.set()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _went_live(self, call: grpc.aio.UnaryStreamCall) -> None:  # type: ignore[type-arg]
        """Waits for the service's headers: the stream is live (and, with its firehose
        log on, has a position to resume from before any event)."""
        headers = dict(list(await call.initial_metadata() or ()))
        if headers.get("jobwire-live") != "1":
            self._settled.set()
            return  # refused (the status follows) or a service without the signal
        if not self._position:
            self._position = str(headers.get("jobwire-position", ""))
        self._live.set()
        self._settled.set()
        # Tabs that subscribed before it was live re-read their rows now.
        self._resync_all()

    def _dispatch(self, event: event_pb2.JobEvent) -> None:
        self._count()
        change = Change(event)
        job_id, kind, sequence = event.job_id, event.kind, event.sequence
        entered = event.state if event.type in ENTERING else 0
        self._counter += 1
        # As bytes: a kept event would keep its whole response's arena (about 5 KB
        # each, measured: +41 MiB for the journal under the bench's 50-tab load).
        self._journal.append(
            (self._counter, job_id, kind, sequence, entered, event.state, event.SerializeToString())
        )
        if event.HasField("job_create_time"):
            self._created[job_id] = iso(event.job_create_time)
            if len(self._created) > JOURNAL:
                self._created.popitem(last=False)
        for sub in self._subscribers:
            if self._wants(sub, job_id, kind, sequence, entered, event.state):
                sub.pending[job_id] = change
                sub.wake.set()

    def _dispatch_deletion(self, deleted: event_pb2.JobDeletion) -> None:
        self._counter += 1
        self._journal.append((self._counter, deleted.job_id, deleted.kind, 0, 0, 0, _DELETION))
        self._created.pop(deleted.job_id, None)
        for sub in self._subscribers:
            if not sub.kind or sub.kind == deleted.kind:
                self._gone(sub, deleted.job_id)

    @staticmethod
    def _wants(
        sub: Subscriber, job_id: str, kind: int, sequence: int, entered: int, state: int
    ) -> bool:
        """Whether the tab gets this job's change (and follows the job from now on when
        this is its first event, or when it `entered` a state the tab filters on)."""
        if sub.kind and sub.kind != kind:
            return False
        if sub.states and state not in sub.states and sub.ids is not None:
            # A page filtered by state shows no row of a job outside it (it drops one
            # that leaves it, skips a new one), so the job is not followed: its entering
            # one of the states then re-reads the rows (below). Followed, it never
            # appeared (its change was of a row the page did not have) until a reload.
            if job_id not in sub.ids:
                return False
            sub.ids.discard(job_id)
            sub.fresh.discard(job_id)
            return True  # the row's last change: the page drops it
        if sequence == 1 and sub.ids is not None and job_id in sub.ids:
            # A first event of a job the tab shows: a job made again under the id of
            # one deleted (DeleteJob, the retention). Marked new with its create time,
            # so the tab replaces the deleted job's row; its events were dropped there
            # as older than that row's until their sequence passed its own.
            sub.fresh.add(job_id)
            return True
        if sub.ids is not None and job_id not in sub.ids:
            if entered and entered in sub.states:
                # It belongs on this state-filtered page now (a job that failed on a
                # FAILED page), but where depends on its create time, which this event
                # does not carry: the tab re-reads its rows, as a reload would, and
                # follows the job. It used to appear only after a reload.
                sub.resync = True
                if len(sub.ids) < MAX_FOLLOWED:
                    sub.ids.add(job_id)
                if sequence == 1:
                    # Its first event (a queued job cancelled, claimed): marked new with
                    # its create time, as any job's first event. Its row had none (the
                    # re-read does not redo a row at the same sequence): Created "—".
                    sub.fresh.add(job_id)
                return True
            if not (sub.new and sequence == 1):
                return False
            if len(sub.ids) < MAX_FOLLOWED:
                sub.ids.add(job_id)  # the tab shows it from now on
            sub.fresh.add(job_id)
        return True

    def _resync_all(self) -> None:
        for sub in self._subscribers:
            sub.resync = True
            sub.wake.set()

    def queue_depth(self) -> dict[str, int]:
        """QUEUED jobs per kind (capped at DEPTH_CAP), as last counted; never waits.

        Counting reads up to DEPTH_CAP jobs per kind, so it runs in the background at
        most every DEPTH_TTL_SECONDS instead of inside a page render or a stream push.
        """
        stale = time.monotonic() - self._depth_at >= DEPTH_TTL_SECONDS
        if stale and (self._depth_task is None or self._depth_task.done()):
            self._depth_task = asyncio.create_task(self._count_depth(), name="dashboard-depth")
        return self._depth

    async def fresh_queue_depth(self, wait: float) -> dict[str, int]:
        """The counts, waiting up to `wait` seconds for a count in progress (first render)."""
        self.queue_depth()
        if self._depth_task is not None and not self._depth_task.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._depth_task), wait)
        return self._depth

    async def _count_depth(self, rpc_seconds: float = 5.0) -> None:
        stub = self._stub()
        kinds = [k for k in job_pb2.JobKind.values() if k]

        async def depth(kind: int) -> int:
            request = job_service_pb2.ListJobsRequest(
                kind=job_pb2.JobKind.ValueType(kind),
                states=[job_pb2.JOB_STATE_QUEUED],
                page_size=DEPTH_CAP,
            )
            reply = await stub.ListJobs(request, timeout=rpc_seconds)
            return len(reply.jobs) + (1 if reply.next_page_token else 0)

        try:
            counts = await asyncio.gather(*(depth(k) for k in kinds))
        except grpc.aio.AioRpcError as err:
            log.warning("queue depth: ListJobs failed: %s", err.code().name)
            self._depth_at = time.monotonic()  # try again after the TTL, not at once
            return
        self._depth = {
            job_pb2.JobKind.Name(k).removeprefix("JOB_KIND_"): n
            for k, n in zip(kinds, counts, strict=True)
        }
        self._depth_at = time.monotonic()
