"""The group committer: a caller's outcome is settled once its commands are handed over."""

from __future__ import annotations

import asyncio
import time

import pytest

from jobwire.v1 import job_pb2
from service.committer import Committer
from service.domain import events
from service.domain.errors import StorageUnavailable
from service.domain.records import Applied, JobCommand, Report
from service.store.port import Store
from tests.conftest import make_policy
from tests.helpers import progress


async def _job(store: Store, job_id: str) -> None:
    record, _ = events.new_record(
        job_id, job_pb2.JOB_KIND_EXTRACTION, time.time_ns(), policy=make_policy()
    )
    await store.create(record)


async def _queued(committer: Committer, job_id: str) -> asyncio.Task[object]:
    caller = asyncio.create_task(
        committer.submit([JobCommand(job_id, Report(progress(job_id, 5)))])
    )
    # One loop step: the caller runs up to its wait, its command queued. Not a timed wait.
    await asyncio.sleep(0)
    assert not caller.done()
    return caller


async def test_a_cancelled_caller_returns_only_once_its_commit_is_over(store: Store) -> None:
    """The write may land after a caller was cancelled (a client gone, a deadline), so
    the caller, and any lock it holds around the write, waits for the commit before
    its CancelledError. It used to return at once, its event not yet stored."""
    await _job(store, "c")
    published: list[Applied] = []
    committer = Committer(store, published.extend)
    committer.start()
    try:
        caller = await _queued(committer, "c")
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        found = await store.get("c")
        assert found is not None and found.job.sequence == 1
        assert [a.record.job.sequence for a in published] == [1]
    finally:
        await committer.close()


async def test_a_caller_is_never_left_waiting_for_a_committer_that_is_gone(
    store: Store,
) -> None:
    """Outcomes cannot be cancelled, so a committer cancelled at shutdown (the loop's
    teardown) fails the callers it had instead of leaving them waiting for ever."""
    await _job(store, "g")
    committer = Committer(store, lambda applied: None)
    before = asyncio.all_tasks()
    committer.start()
    (task,) = asyncio.all_tasks() - before  # its task (other services' run in this loop too)
    caller = await _queued(committer, "g")
    task.cancel()
    with pytest.raises(StorageUnavailable, match="shutting down"):
        await asyncio.wait_for(caller, 10)
