"""The MongoDB store under MongoDB's limits (16 MiB per document, 48 MB per message):
large events, through the real service and bridge, against FerretDB (or MONGODB_URI).

A job document holds the job's retained events; one event may be 1 MiB, so without a
bound in bytes 64 of them passed 16 MiB and MongoDB refused every later update of the
job (FerretDB, which does not enforce the limit, slowed to timeouts instead).
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator
from typing import Any

import bson
import pytest

from jobwire.v1 import job_pb2, job_service_pb2
from service.domain.records import Policy
from service.store.mongo import MongoStore
from service.store.mongo_codec import RING_BODY_BYTES
from tests.bridge_harness import TEST_CONFIG, VIDEO_AUTH, running_bridge
from tests.conftest import ServiceHandle, start_service
from tests.helpers import WAIT, create, read

RETENTION = 64  # the default: 64 events of 1 MiB are 64 MiB
MiB = 1024 * 1024
# The most a job document may weigh: the ring's bodies, the snapshot (here at most
# two events' worth) and the ring's keys. MongoDB refuses a document past 16 MiB.
DOCUMENT_BOUND = RING_BODY_BYTES + 3 * MiB


@dataclasses.dataclass
class MongoService:
    store: MongoStore
    handle: ServiceHandle

    async def document_size(self, job_id: str) -> int:
        doc = await self.store.jobs.find_one({"_id": job_id})
        assert doc is not None
        return len(bson.encode(doc))


@pytest.fixture
async def mongo_service(mongo_uri: str) -> AsyncIterator[MongoService]:
    store = MongoStore(
        mongo_uri, policy=Policy(retention=RETENTION), database=f"l_{uuid.uuid4().hex[:12]}"
    )
    handle = await start_service(store, event_retention=RETENTION)
    try:
        yield MongoService(store, handle)
    finally:
        await store.database.client.drop_database(store.database.name)
        await handle.close()


def _big_progress(job_id: str, i: int, size: int) -> job_service_pb2.ReportEventRequest:
    # A phase of `size` bytes, each event's different (an event may be 1 MiB in all).
    return job_service_pb2.ReportEventRequest(
        job_id=job_id,
        idempotency_key=f"big-{i}",
        progress=job_pb2.Progress(percent=i, phase=chr(ord("A") + i % 26) * size),
    )


async def test_large_events_keep_the_job_document_bounded_and_writable(
    mongo_service: MongoService,
) -> None:
    stub = mongo_service.handle.stub
    job_id = (await create(stub)).job.id
    size = 1000 * 1024
    count = RING_BODY_BYTES // size + 3  # past the ring's budget
    for i in range(count):
        reply = await stub.ReportEvent(_big_progress(job_id, i, size), timeout=WAIT)
        assert reply.sequence == i + 1 and not reply.duplicate
        assert await mongo_service.document_size(job_id) <= DOCUMENT_BOUND, f"after event {i}"

    # The newest events that fit RING_BODY_BYTES are replayable; before them, a gap.
    kept = RING_BODY_BYTES // (size + 64)
    oldest = count - kept + 1
    page = await stub.ListJobEvents(
        job_service_pb2.ListJobEventsRequest(job_id=job_id, page_size=1), timeout=WAIT
    )
    assert (page.gap.requested_sequence, page.gap.oldest_available_sequence) == (0, oldest)
    assert [e.sequence for e in page.events] == [oldest] and page.more
    call = stub.WatchJob(job_service_pb2.WatchJobRequest(id=job_id), timeout=WAIT)
    first = await read(call)
    assert first.snapshot.sequence == count
    gap = await read(call)
    assert gap.gap.oldest_available_sequence == oldest
    replay = [(await read(call)).event for _ in range(oldest, count + 1)]
    assert [e.sequence for e in replay] == list(range(oldest, count + 1))
    assert replay[-1].progress.phase == _big_progress(job_id, count - 1, size).progress.phase
    call.cancel()

    # The first event's body is gone, its key is not: a retry is still a duplicate.
    again = await stub.ReportEvent(_big_progress(job_id, 0, size), timeout=WAIT)
    assert (again.sequence, again.duplicate) == (count, True)
    # And the job goes on.
    done = job_service_pb2.ReportEventRequest(
        job_id=job_id, idempotency_key="done", completed=job_pb2.Result(output_key="out")
    )
    assert (await stub.ReportEvent(done, timeout=WAIT)).sequence == count + 1
    assert await mongo_service.document_size(job_id) <= DOCUMENT_BOUND


async def test_video_reports_of_four_byte_characters_through_the_bridge(
    mongo_service: MongoService,
) -> None:
    """The video worker's message may be 65,536 characters: 256 KiB of emoji, and 64
    of them (the default retention) were past 16 MiB."""
    config = dataclasses.replace(TEST_CONFIG, service_target=mongo_service.handle.target)
    stub = mongo_service.handle.stub
    video = (await create(stub, job_pb2.JOB_KIND_VIDEO, f"v-{uuid.uuid4().hex[:8]}")).job.id
    count = RING_BODY_BYTES // (256 * 1024) + 4  # past the ring's budget
    async with running_bridge(config) as bridge:
        for i in range(count):
            body: dict[str, Any] = {
                "status": "progress",
                "message": chr(0x1F600 + i) * 65536,
                "videoId": video,
                "percent": i,
            }
            status, answer = await bridge.post("/api/report", body, headers=VIDEO_AUTH)
            assert (status, answer) == (200, {"success": True}), f"report {i}"
            assert await mongo_service.document_size(video) <= RING_BODY_BYTES + MiB // 2
    events = await stub.ListJobEvents(
        job_service_pb2.ListJobEventsRequest(job_id=video, page_size=1), timeout=WAIT
    )
    oldest = events.gap.oldest_available_sequence
    assert 1 < oldest < count
    assert events.events[0].progress.message == chr(0x1F600 + oldest - 1) * 65536


async def test_watch_jobs_replays_a_log_of_large_events(mongo_service: MongoService) -> None:
    """60 events of 1 MiB in the firehose log: a replay read them 500 at a time, so
    on FerretDB (no 16 MiB cap on a reply) one 61 MB reply passed the 48 MB message
    limit and WatchJobs failed with UNKNOWN (ProtocolError) at every reconnect; on
    MongoDB each stream held up to 500 MiB of one page."""
    stub = mongo_service.handle.stub
    job_id = (await create(stub)).job.id
    count = 60
    replies = await asyncio.gather(
        *(
            stub.ReportEvent(_big_progress(job_id, i, 1000 * 1024), timeout=WAIT)
            for i in range(count)
        )
    )
    assert sorted(r.sequence for r in replies) == list(range(1, count + 1))
    call = stub.WatchJobs(job_service_pb2.WatchJobsRequest(after="0"), timeout=2 * WAIT)
    seen = [(await read(call, 2 * WAIT)).event.sequence for _ in range(count)]
    call.cancel()
    assert seen == list(range(1, count + 1))


async def test_list_and_claim_large_jobs(mongo_service: MongoService) -> None:
    """16 queued videos of 3.9 MiB (a title as long as a request allowed before
    CreateJob bounded it: such jobs are still stored): on FerretDB one 64 MB reply,
    past the 48 MB message limit, failed ListJobs and every ClaimJob of the kind with
    UNKNOWN (ProtocolError)."""
    stub = mongo_service.handle.stub
    count = 16
    for i in range(count):
        video = job_pb2.Video(url="https://videos.example.invalid/v.mp4")
        job = job_pb2.Job(kind=job_pb2.JOB_KIND_VIDEO, video=video)
        made = await stub.CreateJob(job_service_pb2.CreateJobRequest(job=job), timeout=WAIT)
        # The title as an older version stored it (CreateJob now refuses it).
        made.job.video.title = chr(65 + i) * (3900 * 1024)
        await mongo_service.store.jobs.update_one(
            {"_id": made.job.id}, {"$set": {"job": bson.Binary(made.job.SerializeToString())}}
        )
    listed = await stub.ListJobs(job_service_pb2.ListJobsRequest(page_size=50), timeout=WAIT)
    assert [j.video.title[0] for j in listed.jobs] == ["A"]  # one fits an answer
    claim = job_service_pb2.ClaimJobRequest(kind=job_pb2.JOB_KIND_VIDEO, worker_id="w")
    claimed = await stub.ClaimJob(claim, timeout=WAIT)
    assert claimed.job.video.title[0] == "A"
