"""Deletions in the firehose: WatchJobs' `deleted` (DeleteJob and the retention sweep).

Both stores, real services on loopback. A deletion is an entry of the firehose log
written in the step that removes the job: it is delivered live, replayed on resume,
filtered by kind and by the state the job ended in, and carried across replicas
sharing one MongoDB database.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from bson import Binary

from jobwire.v1 import event_pb2, job_pb2, job_service_pb2
from service.domain import events
from service.domain.records import Deleted
from service.store.embedded import EmbeddedStore
from service.store.mongo import DELETIONS, MongoStore
from tests.conftest import ServiceHandle, make_policy, open_test_store, start_service
from tests.helpers import completed, create, progress, read

BATCH, VIDEO = job_pb2.JOB_KIND_BATCH, job_pb2.JOB_KIND_VIDEO
SUCCEEDED, RUNNING = job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_RUNNING


async def _live(stub: Any, **request: Any) -> Any:
    """A WatchJobs stream, once its headers say it is live."""
    call = stub.WatchJobs(job_service_pb2.WatchJobsRequest(**request))
    headers = dict(list(await call.initial_metadata()))
    assert headers.get("jobwire-live") == "1"
    return call


async def _ended(stub: Any, job_id: str, kind: job_pb2.JobKind.ValueType = BATCH) -> job_pb2.Job:
    await create(stub, kind, job_id)
    await stub.ReportEvent(completed(job_id))
    job: job_pb2.Job = await stub.GetJob(job_service_pb2.GetJobRequest(id=job_id))
    return job


async def _delete(stub: Any, job_id: str) -> None:
    await stub.DeleteJob(job_service_pb2.DeleteJobRequest(id=job_id))


async def _next_deletion(call: Any) -> job_service_pb2.WatchJobsResponse:
    """The stream's next deletion (events before it are skipped)."""
    while True:
        message: job_service_pb2.WatchJobsResponse = await read(call)
        if message.HasField("deleted"):
            return message


async def test_a_deleted_job_reaches_watchjobs_as_a_deletion(service: ServiceHandle) -> None:
    """DeleteJob sends `deleted` (no event) with the job's id, kind, end state, last
    sequence, create time and the deletion time, at a position; a job made again
    under the id is told apart by its create time."""
    call = await _live(service.stub)
    job = await _ended(service.stub, "d1", VIDEO)
    await _delete(service.stub, "d1")
    message = await _next_deletion(call)
    assert not message.HasField("event") and message.position
    gone = message.deleted
    assert (gone.job_id, gone.kind, gone.state, gone.sequence) == ("d1", VIDEO, SUCCEEDED, 1)
    assert gone.job_create_time == job.create_time
    assert gone.delete_time.ToNanoseconds() >= job.update_time.ToNanoseconds()

    await create(service.stub, VIDEO, "d1")  # made again under the id
    await service.stub.ReportEvent(progress("d1", 10))
    again: job_service_pb2.WatchJobsResponse = await read(call)
    assert again.event.job_id == "d1" and again.event.sequence == 1
    assert again.event.job_create_time != gone.job_create_time
    call.cancel()


async def test_filters_take_a_deletion_by_its_kind_and_end_state(service: ServiceHandle) -> None:
    """`kind` is the deleted job's; `states` applies to the state it ended in: a
    watcher of SUCCEEDED jobs gets the deletions of succeeded jobs, one of RUNNING
    jobs none (the probe's event, committed after the deletions, comes first)."""
    videos = await _live(service.stub, kind=VIDEO)
    succeeded = await _live(service.stub, states=[SUCCEEDED])
    running = await _live(service.stub, states=[RUNNING])
    await _ended(service.stub, "b", BATCH)
    await _ended(service.stub, "v", VIDEO)
    await create(service.stub, BATCH, "probe")
    await _delete(service.stub, "b")
    await _delete(service.stub, "v")
    await service.stub.ReportEvent(progress("probe", 10))

    assert (await _next_deletion(videos)).deleted.job_id == "v"
    assert [(await _next_deletion(succeeded)).deleted.job_id for _ in range(2)] == ["b", "v"]
    first: job_service_pb2.WatchJobsResponse = await read(running)
    assert first.event.job_id == "probe" and not first.HasField("deleted")
    for call in (videos, succeeded, running):
        call.cancel()


async def test_a_resumed_stream_replays_a_deletion(service: ServiceHandle) -> None:
    """A consumer away while a job is deleted gets the deletion on resume, once."""
    call = await _live(service.stub)
    await _ended(service.stub, "r1")
    seen: job_service_pb2.WatchJobsResponse = await read(call)
    assert seen.event.job_id == "r1" and seen.event.type == event_pb2.EVENT_TYPE_COMPLETED
    call.cancel()
    await _delete(service.stub, "r1")
    await create(service.stub, BATCH, "after")
    await service.stub.ReportEvent(progress("after", 10))

    resumed = service.stub.WatchJobs(job_service_pb2.WatchJobsRequest(after=seen.position))
    replayed: job_service_pb2.WatchJobsResponse = await read(resumed)
    assert replayed.deleted.job_id == "r1" and replayed.deleted.state == SUCCEEDED
    following: job_service_pb2.WatchJobsResponse = await read(resumed)
    assert following.event.job_id == "after"
    resumed.cancel()


async def test_a_sweeps_batch_of_deletions_is_written_within_the_timeout(
    service: ServiceHandle,
) -> None:
    """A hundred ended jobs deleted in one call (the sweep's batch), each with its entry.
    On FerretDB a second bulk update of the hundred marks (their deletion events) did
    not finish within the 5 s operation timeout: UNAVAILABLE, and the sweep failed."""
    ids = [f"batch-{k}" for k in range(100)]
    for job_id in ids:
        await create(service.stub, BATCH, job_id)
        await service.stub.CancelJob(job_service_pb2.CancelJobRequest(id=job_id))
    call = await _live(service.stub)
    deleted = await service.running.store.delete_jobs(ids)
    assert sorted(d.job_id for d in deleted) == sorted(ids)
    assert all(d.position is not None for d in deleted)
    service.running.jobs.publish_deleted(deleted)
    got = {(await _next_deletion(call)).deleted.job_id for _ in ids}
    assert got == set(ids)
    call.cancel()


async def test_two_replicas_finishing_one_deletion_cut_short_append_its_entry_once(
    mongo_uri: str,
) -> None:
    """Every replica's sweep finishes the deletions a crash cut short: two at once both
    found the entry missing and appended it; the second insert failed on its _id, was
    counted and logged as a lost firehose append (and took any event entries sharing
    that insert with it)."""
    database = f"d_{uuid.uuid4().hex[:12]}"
    stores = [MongoStore(mongo_uri, policy=make_policy(), database=database) for _ in range(2)]
    for store in stores:
        await store.start()
    service = await start_service(stores[0])
    try:
        job = await _ended(service.stub, "both")
        mark = events.deletion(job, job.update_time.ToNanoseconds() + 1)
        await (
            stores[0]
            .database[DELETIONS]
            .insert_one(
                {
                    "_id": "both",
                    "ns": mark.create_time.ToNanoseconds(),
                    "e": Binary(mark.SerializeToString()),
                }
            )
        )
        await stores[0].jobs.delete_one({"_id": "both"})
        before = await stores[0].log_bounds(0)
        failures = [store.log_failures for store in stores]
        await asyncio.gather(*(store.finish_deletions() for store in stores))
        entries = [
            entry.event
            for origin, (_, newest) in (await stores[0].log_bounds(0)).items()
            for entry in await stores[0].log_after(origin, before.get(origin, (0, 0))[1], 0, 100)
        ]
        assert entries == [mark]
        assert [store.log_failures for store in stores] == failures
    finally:
        await service.close()
        await stores[1].close()


async def test_with_the_firehose_log_off_a_deletion_is_sent_live_without_a_position(
    store_kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    policy = make_policy()
    policy.firehose_retention_ns = 0
    store = await open_test_store(store_kind, tmp_path, request, policy)
    service = await start_service(store)
    try:
        call = await _live(service.stub)
        await _ended(service.stub, "nolog")
        await _delete(service.stub, "nolog")
        message = await _next_deletion(call)
        assert message.deleted.job_id == "nolog" and not message.position
        call.cancel()
    finally:
        await service.close()


class AnswersLate(EmbeddedStore):
    """The embedded store, answering delete_jobs only once `answer` is set (after its
    commit): a DeleteJob call can be cancelled between the deletion and its answer."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.committed = asyncio.Event()
        self.answer = asyncio.Event()

    async def delete_jobs(self, job_ids: Sequence[str]) -> list[Deleted]:
        deleted = await super().delete_jobs(job_ids)
        self.committed.set()
        await self.answer.wait()
        return deleted


async def test_a_deletejob_cancelled_after_its_commit_still_reaches_the_streams(
    tmp_path: Path,
) -> None:
    """The caller's deadline passed while the deletion was being written: the job was
    deleted, its entry written, and the deletion never published, so no live stream
    got it (a hole in the log's published run, until a stream re-read it)."""
    store = AnswersLate(tmp_path / "data", make_policy())
    service = await start_service(store)
    try:
        call = await _live(service.stub)
        await _ended(service.stub, "late")
        ended: job_service_pb2.WatchJobsResponse = await read(call)
        assert ended.event.job_id == "late"
        deleting = asyncio.ensure_future(
            service.stub.DeleteJob(job_service_pb2.DeleteJobRequest(id="late"))
        )
        await asyncio.wait_for(store.committed.wait(), 10)
        deleting.cancel()  # the client gives up: the service's handler is cancelled
        with contextlib.suppress(asyncio.CancelledError):
            await deleting
        # A later call on the connection answered: the service has taken the cancel
        # (HTTP/2 frames are read in order).
        await service.stub.ListJobs(job_service_pb2.ListJobsRequest(page_size=1))
        store.answer.set()
        message = await _next_deletion(call)
        assert message.deleted.job_id == "late"
        call.cancel()
    finally:
        store.answer.set()
        await service.close()


@pytest.fixture
async def retaining(
    store_kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[ServiceHandle]:
    """Ended jobs kept 0.5 s, swept every 50 ms."""
    store = await open_test_store(store_kind, tmp_path, request, make_policy())
    handle = await start_service(store, job_retention_seconds=0.5, job_retention_sweep_seconds=0.05)
    yield handle
    await handle.close()


async def test_the_retention_sweep_sends_its_deletions(retaining: ServiceHandle) -> None:
    call = await _live(retaining.stub, kind=BATCH)
    job = await _ended(retaining.stub, "old")
    message = await _next_deletion(call)
    assert message.deleted.job_id == "old" and message.deleted.job_create_time == job.create_time
    call.cancel()


async def test_a_deletion_through_one_replica_reaches_the_others_streams(mongo_uri: str) -> None:
    """Live through the feed, and replayed by the other replica from a position of the
    first (the shared log)."""
    database = f"d_{uuid.uuid4().hex[:12]}"
    a = await start_service(
        MongoStore(mongo_uri, policy=make_policy(), database=database), event_feed=True
    )
    b = await start_service(
        MongoStore(mongo_uri, policy=make_policy(), database=database), event_feed=True
    )
    try:
        on_a = await _live(a.stub)
        await _ended(b.stub, "x")
        ended: job_service_pb2.WatchJobsResponse = await read(on_a)
        assert ended.event.job_id == "x"
        await _delete(b.stub, "x")
        live = await _next_deletion(on_a)
        assert live.deleted.job_id == "x"
        on_a.cancel()

        resumed = b.stub.WatchJobs(job_service_pb2.WatchJobsRequest(after=ended.position))
        replayed: job_service_pb2.WatchJobsResponse = await read(resumed)
        assert replayed.deleted == live.deleted
        resumed.cancel()
    finally:
        await b.close()
        await a.close()


async def test_a_mongodb_deletion_cut_short_gets_its_entry_once(
    mongo_uri: str, tmp_path: Path
) -> None:
    """The process died after the job document went and before the entry was appended
    (the mark holds the deletion's event): finishing the deletion appends it, once."""
    store = MongoStore(mongo_uri, policy=make_policy(), database=f"d_{uuid.uuid4().hex[:12]}")
    await store.start()
    service = await start_service(store)
    try:
        job = await _ended(service.stub, "cut")
        mark = events.deletion(job, job.update_time.ToNanoseconds() + 1)
        await store.database[DELETIONS].insert_one(
            {
                "_id": "cut",
                "ns": mark.create_time.ToNanoseconds(),
                "e": Binary(mark.SerializeToString()),
            }
        )
        await store.jobs.delete_one({"_id": "cut"})
        before = await store.log_bounds(0)
        for _ in range(2):
            await store.finish_deletions()
        entries = [
            entry.event
            for origin, (_, newest) in (await store.log_bounds(0)).items()
            for entry in await store.log_after(origin, before[origin][1], 0, 100)
        ]
        assert entries == [mark]
        assert await store.database[DELETIONS].count_documents({}) == 0
    finally:
        await service.close()
