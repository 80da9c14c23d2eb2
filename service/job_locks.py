"""Per-job locks of one service process, for what the store cannot do in one write.

A job's completion that names its artifacts (by sha256) and an upload that replaces
one of them each check the other's side and then write: the check and the write must
not interleave with the other's, or the job ends with a result naming content it
does not have. These locks make each check-then-write one step within the process
(the embedded store is single-process; on MongoDB, see README "MongoDB").
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Iterable
from typing import TypeVar

T = TypeVar("T")


class JobLocks:
    """asyncio locks by job id, made on first use and dropped once nobody holds or
    waits for them; several are taken in sorted order (no deadlock between batches)."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    def __len__(self) -> int:
        return len(self._locks)

    @contextlib.asynccontextmanager
    async def hold(self, job_ids: Iterable[str]) -> AsyncIterator[None]:
        held: list[str] = []
        try:
            for job_id in sorted(set(job_ids)):
                lock = self._ref(job_id)
                try:
                    await lock.acquire()
                except BaseException:
                    self._unref(job_id)
                    raise
                held.append(job_id)
            yield
        finally:
            for job_id in reversed(held):
                self._locks[job_id][0].release()
                self._unref(job_id)

    def _ref(self, job_id: str) -> asyncio.Lock:
        lock, users = self._locks.get(job_id) or (asyncio.Lock(), 0)
        self._locks[job_id] = (lock, users + 1)
        return lock

    def _unref(self, job_id: str) -> None:
        lock, users = self._locks[job_id]
        if users <= 1:
            del self._locks[job_id]
        else:
            self._locks[job_id] = (lock, users - 1)


async def settled(work: Awaitable[T]) -> T:
    """`work`'s result; when the caller is cancelled meanwhile, returns (raising the
    cancellation) only once `work` is over: a write already handed to the committer
    may still land, and a lock held around it must not be released before."""
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait([task])
        raise
