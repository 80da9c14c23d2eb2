"""Per-job locks of one service process, for what the store cannot do in one write.

A job's completion that names its artifacts (by sha256) and an upload that replaces
one of them each check the other's side and then write: the check and the write must
not interleave with the other's, or the job ends with a result naming content it
does not have. These locks make each check-then-write one step within the process
(the embedded store is single-process; on MongoDB, see README "MongoDB"). The MongoDB
store serialises its own writes per job with the same KeyedLocks.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable


class KeyedLocks:
    """asyncio locks by key (a job id), made on first use and dropped once nobody holds
    or waits for them; several are taken in sorted order (no deadlock between batches)."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    def __len__(self) -> int:
        return len(self._locks)

    @contextlib.asynccontextmanager
    async def hold(self, keys: Iterable[str]) -> AsyncIterator[None]:
        held: list[str] = []
        try:
            for key in sorted(set(keys)):
                lock = self._ref(key)
                try:
                    await lock.acquire()
                except BaseException:
                    self._unref(key)
                    raise
                held.append(key)
            yield
        finally:
            for key in reversed(held):
                self.release(key)

    async def try_acquire(self, key: str) -> bool:
        """Takes the lock of `key` unless someone holds it (then returns False)."""
        entry = self._locks.get(key)
        if entry is not None and entry[0].locked():
            return False
        lock = self._ref(key)
        try:
            await lock.acquire()  # free: returns at once (or after a hand-over)
        except BaseException:
            self._unref(key)
            raise
        return True

    def release(self, key: str) -> None:
        self._locks[key][0].release()
        self._unref(key)

    def _ref(self, key: str) -> asyncio.Lock:
        lock, users = self._locks.get(key) or (asyncio.Lock(), 0)
        self._locks[key] = (lock, users + 1)
        return lock

    def _unref(self, key: str) -> None:
        lock, users = self._locks[key]
        if users <= 1:
            del self._locks[key]
        else:
            self._locks[key] = (lock, users - 1)
