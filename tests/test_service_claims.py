"""ClaimJob: exactly-once hand-out under contention, lease expiry and the attempt limit."""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter
from pathlib import Path

import grpc
import pytest

from jobwire.v1 import event_pb2, job_pb2, job_service_pb2
from tests.conftest import ServiceHandle, make_policy, open_test_store, start_service
from tests.helpers import WAIT, create, progress, read


def _claim(worker: str, lease_ms: int = 0) -> job_service_pb2.ClaimJobRequest:
    request = job_service_pb2.ClaimJobRequest(kind=job_pb2.JOB_KIND_VIDEO, worker_id=worker)
    if lease_ms:
        request.lease_duration.FromMilliseconds(lease_ms)
    return request


async def test_oldest_first_and_empty_queue(service: ServiceHandle) -> None:
    reply = await service.stub.ClaimJob(_claim("w"))
    assert not reply.HasField("job")
    for i in range(3):
        await create(service.stub, job_pb2.JOB_KIND_VIDEO, f"v{i}")
    claimed = [(await service.stub.ClaimJob(_claim("w"))).job for _ in range(3)]
    assert [j.id for j in claimed] == ["v0", "v1", "v2"]
    assert all(j.state == job_pb2.JOB_STATE_RUNNING and j.attempts == 1 for j in claimed)
    assert all(j.worker_id == "w" and j.HasField("lease_expire_time") for j in claimed)


async def test_32_claimers_over_500_jobs_claim_each_exactly_once(service: ServiceHandle) -> None:
    ids = [f"v{i:03d}" for i in range(500)]
    for chunk in range(0, 500, 50):
        await asyncio.gather(
            *(create(service.stub, job_pb2.JOB_KIND_VIDEO, i) for i in ids[chunk : chunk + 50])
        )
    await create(service.stub, job_pb2.JOB_KIND_BATCH, "not-a-video")

    async def claimer(n: int) -> list[str]:
        got: list[str] = []
        while True:
            reply = await service.stub.ClaimJob(_claim(f"w{n}"))
            if not reply.HasField("job"):
                return got
            got.append(reply.job.id)

    per_worker = await asyncio.gather(*(claimer(n) for n in range(32)))
    counts = Counter(i for got in per_worker for i in got)
    assert sorted(counts) == ids
    assert set(counts.values()) == {1}
    assert sum(1 for got in per_worker if got) > 1  # the work really was shared
    batch = await service.stub.GetJob(job_service_pb2.GetJobRequest(id="not-a-video"))
    assert batch.state == job_pb2.JOB_STATE_QUEUED


async def test_expired_lease_requeues_then_attempt_limit_fails(service: ServiceHandle) -> None:
    await create(service.stub, job_pb2.JOB_KIND_VIDEO, "lease")
    watch = service.stub.WatchJob(job_service_pb2.WatchJobRequest(id="lease"))
    assert (await read(watch)).HasField("snapshot")
    types = []
    for attempt in range(1, 4):  # the test service allows 3 attempts
        claimed = await service.stub.ClaimJob(_claim("w", lease_ms=150))
        assert claimed.job.id == "lease" and claimed.job.attempts == attempt
        assert (await read(watch)).event.type == event_pb2.EVENT_TYPE_CLAIMED
        lapsed = (await read(watch, timeout=WAIT)).event
        types.append(lapsed.type)
        if attempt < 3:
            assert lapsed.state == job_pb2.JOB_STATE_QUEUED
    assert types == [
        event_pb2.EVENT_TYPE_REQUEUED,
        event_pb2.EVENT_TYPE_REQUEUED,
        event_pb2.EVENT_TYPE_FAILED,
    ]
    assert await read(watch) is grpc.aio.EOF
    job = await service.stub.GetJob(job_service_pb2.GetJobRequest(id="lease"))
    assert job.state == job_pb2.JOB_STATE_FAILED and job.error.code == "LEASE_EXPIRED"
    assert not (await service.stub.ClaimJob(_claim("w"))).HasField("job")


async def test_events_renew_the_lease(service: ServiceHandle) -> None:
    await create(service.stub, job_pb2.JOB_KIND_VIDEO, "renew")
    claimed = (await service.stub.ClaimJob(_claim("w", lease_ms=60_000))).job
    expiry = claimed.lease_expire_time.ToNanoseconds()
    for pct in range(10, 60, 10):
        reply = await service.stub.ReportEvent(progress("renew", pct))
        assert reply.state == job_pb2.JOB_STATE_RUNNING
        job = await service.stub.GetJob(job_service_pb2.GetJobRequest(id="renew"))
        assert job.lease_expire_time.ToNanoseconds() > expiry  # each event pushes it out
        expiry = job.lease_expire_time.ToNanoseconds()
    assert job.attempts == 1 and job.worker_id == "w"


async def test_a_video_reported_on_without_a_claim_is_held_on_the_default_lease(
    store_kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A video (handed out by claims only) reported on without one became RUNNING with
    no lease: once its worker went silent it was never handed out again nor failed. It
    is now held on the default lease and requeued when that lapses. A push worker's job
    (a Secretary's) takes no lease: its silence is a progress deadline's business."""
    policy = dataclasses.replace(make_policy(), lease_ns=150 * 10**6)
    store = await open_test_store(store_kind, tmp_path, request, policy)
    service = await start_service(store, lease_sweep_seconds=0.05)
    try:
        await create(service.stub, job_pb2.JOB_KIND_VIDEO, "unclaimed")
        await create(service.stub, job_pb2.JOB_KIND_EXTRACTION, "pushed")
        watch = service.stub.WatchJob(job_service_pb2.WatchJobRequest(id="unclaimed"))
        assert (await read(watch)).HasField("snapshot")
        for job_id in ("unclaimed", "pushed"):
            await service.stub.ReportEvent(progress(job_id, 10))
        assert (await read(watch)).event.type == event_pb2.EVENT_TYPE_PROGRESS
        lapsed = (await read(watch, timeout=WAIT)).event
        assert (lapsed.type, lapsed.state) == (
            event_pb2.EVENT_TYPE_REQUEUED,
            job_pb2.JOB_STATE_QUEUED,
        )
        assert (await service.stub.ClaimJob(_claim("w"))).job.id == "unclaimed"
        pushed = await service.stub.GetJob(job_service_pb2.GetJobRequest(id="pushed"))
        assert pushed.state == job_pb2.JOB_STATE_RUNNING
        assert not pushed.HasField("lease_expire_time")
        watch.cancel()
    finally:
        await service.close()
