"""JOBWIRE_JOB_RETENTION: the sweep that deletes jobs ended longer ago than the
retention, with their events, log lines and artifacts, and log lines of no job
(`UNKNOWN`, or an id that named no job when written) received as long ago.

Each batch is one store write of at most BATCH jobs (one SQLite transaction; a few
MongoDB round trips): the group commit's writes go in between batches, so a large
backlog (the retention set for the first time on a years-old store) is worked off
in steps instead of stalling callbacks. Every replica may sweep: a job deleted by
one is skipped by the others (the store deletes only what is there and has ended).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .domain.errors import DomainError
from .domain.records import Deleted
from .metrics import JOBS_DELETED, RETENTION_SWEEPS
from .store.port import Store

log = logging.getLogger("jobwire.retention")

# Jobs per delete: each may hold up to 256 MiB of artifacts and many log lines.
BATCH = 100
LOG_BATCH = 5_000


@dataclass
class Retention:
    store: Store
    retention_ns: int
    interval: float
    batch: int = BATCH
    # The clock time (ns) each completed sweep began at: tests wait on sweeps, not time.
    swept: list[int] = field(default_factory=list)
    # Publishes the deletions to WatchJobs streams (Jobs.publish_deleted), as DeleteJob's.
    publish: Callable[[list[Deleted]], None] | None = None

    async def sweep(self, now_ns: int) -> int:
        """Deletes what ended before `now_ns` - retention; how many jobs."""
        cutoff = now_ns - self.retention_ns
        await self.store.finish_deletions()  # what a crash cut short, first
        deleted = 0
        while True:
            ids = await self.store.ended_jobs(cutoff, self.batch)
            if ids:
                gone = await self.store.delete_jobs(ids)
                if self.publish is not None:
                    self.publish(gone)
                deleted += len(gone)
                JOBS_DELETED.labels("retention").inc(len(gone))
            if len(ids) < self.batch:
                break
            await asyncio.sleep(0)  # the committer's waiting writes go first
        for _ in range(100):  # at most 500,000 lines a sweep; the next goes on
            if await self.store.delete_jobless_logs(cutoff, LOG_BATCH) < LOG_BATCH:
                break
            await asyncio.sleep(0)
        return deleted

    async def run_forever(self) -> None:
        failing = False  # logged once per outage, not once per tick
        task = asyncio.current_task()
        while task is None or not task.cancelling():
            began = time.time_ns()
            try:
                deleted = await self.sweep(began)
            except Exception as err:  # the store away: the next tick tries again
                if task is not None and task.cancelling():
                    return
                RETENTION_SWEEPS.labels("failed").inc()
                if not failing:
                    detail = err.message if isinstance(err, DomainError) else repr(err)
                    log.warning("retention sweep failed, retrying: %s", detail)
                failing = True
            else:
                RETENTION_SWEEPS.labels("ok").inc()
                if failing:
                    log.info("retention sweep resumed")
                failing = False
                if deleted:
                    log.info("retention: deleted %d jobs ended before the retention", deleted)
                self.swept.append(began)
                del self.swept[:-1000]
            await asyncio.sleep(self.interval)
