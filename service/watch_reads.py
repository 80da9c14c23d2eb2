"""One storage read for many watchers of one job opened at the same moment.

A watcher needs the job's snapshot and retained events read *after* it subscribed to
live events (so nothing committed in between is missed). When thousands of watchers
open the same job together (a dashboard's audience, a fleet reconnecting after a
deploy), reading once per watcher costs two store round trips each; instead, the
watchers that arrive while a read is running share the next read, which starts as
soon as that one ends. Each caller's read therefore starts after its call, and there
are at most two reads per job in flight, whatever the burst.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from jobwire.v1 import event_pb2

from .domain.records import JobRecord
from .store.port import Store

Read = tuple[JobRecord | None, list[event_pb2.JobEvent]]


@dataclass
class _Slot:
    current: asyncio.Future[Read]
    following: asyncio.Future[Read] | None = field(default=None)


class SharedReads:
    def __init__(self, store: Store) -> None:
        self._store = store
        self._slots: dict[str, _Slot] = {}
        self._tasks: set[asyncio.Task[None]] = set()  # kept referenced while running

    async def read(self, job_id: str) -> Read:
        """The job's record (None when unknown) and every retained event of it, read
        after this call began. The objects are shared: callers must not modify them."""
        slot = self._slots.get(job_id)
        loop = asyncio.get_running_loop()
        if slot is None:
            slot = self._slots[job_id] = _Slot(loop.create_future())
            task = loop.create_task(self._run(job_id, slot))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            future = slot.current
        else:  # the running read may predate our subscription: wait for the next
            if slot.following is None:
                slot.following = loop.create_future()
            future = slot.following
        return await asyncio.shield(future)

    async def _run(self, job_id: str, slot: _Slot) -> None:
        while True:
            future = slot.current
            try:
                found = await self._store.get_with_events(job_id, 0)
                future.set_result(found or (None, []))
            except Exception as exc:  # every waiter gets the storage error
                future.set_exception(exc)
                future.exception()  # retrieved: no warning when every waiter left
            if slot.following is None:
                del self._slots[job_id]
                return
            slot.current, slot.following = slot.following, None
