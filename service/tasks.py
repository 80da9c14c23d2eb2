"""Background tasks stopped without waiting on a library that unwinds slowly."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable
from typing import Any, TypeVar

T = TypeVar("T")


async def stop_within(tasks: Iterable[asyncio.Future[Any] | None], seconds: float) -> None:
    """Cancels `tasks` (None: none) and waits for them at most `seconds`. A task
    cancelled inside a MongoDB round trip can leave PyMongo unwinding its connection
    for a long time (seen: > 30 s on FerretDB), or swallowing the cancel; closing the
    store afterwards ends whatever is left. What such a task ends with is dropped: a
    failure against the store closed meanwhile is expected."""
    running = [task for task in tasks if task is not None]
    for task in running:
        task.cancel()
    if running:
        await asyncio.wait(running, timeout=seconds)
    for task in running:
        task.add_done_callback(_discard_outcome)


def _discard_outcome(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved, so asyncio does not log it as never retrieved


async def outlasting_cancel(work: Awaitable[T]) -> T:
    """`work`'s result; a caller cancelled meanwhile gets its CancelledError only once
    `work` is over (a store write and what must follow it are never cut off half-way),
    and `work`'s own outcome is then dropped (retrieved, not logged as lost)."""
    future = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        await asyncio.wait([future])
        _discard_outcome(future)
        raise
