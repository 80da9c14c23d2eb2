"""Races as workers and operators make them, through the real bridge and service on
loopback, on both stores: callbacks of one job arriving together, artifacts replaced
while the job completes."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
from collections.abc import AsyncIterator

import grpc
import pytest

from jobwire.v1 import artifact_pb2, job_pb2, job_service_pb2
from tests.bridge_harness import TEST_CONFIG, Bridge, create_job, running_bridge
from tests.conftest import ServiceHandle


@pytest.fixture
async def bridge_on(service: ServiceHandle) -> AsyncIterator[Bridge]:
    """A bridge in front of this test's own service (each store)."""
    config = dataclasses.replace(TEST_CONFIG, service_target=service.target)
    async with running_bridge(config) as b:
        yield b


async def _content(service: ServiceHandle, job_id: str, name: str) -> bytes:
    call = service.stub.ReadArtifact(job_service_pb2.ReadArtifactRequest(job_id=job_id, name=name))
    return b"".join([m.data async for m in call])


async def test_two_different_secretary_finals_leave_a_result_naming_what_is_stored(
    service: ServiceHandle, bridge_on: Bridge
) -> None:
    """Two different final events of one Secretary job at once (a retry with another
    text, two worker processes): each uploads `extracted_text.md`, then reports a
    result naming its sha256. Both were acknowledged, and in about one race in five the
    job's result named one text while the other was stored: the check of the upload
    against the job's end, and the completion's check of its named artifacts, each ran
    before the other's write landed. Now the job's result always names the stored
    text, and its message is the same final's."""
    finals = 0
    for round_ in range(3):
        jobs = []
        for _ in range(16):
            created = await create_job(service.stub, job_pb2.JOB_KIND_EXTRACTION)
            jobs.append((created.job.id, {"Authorization": f"Bearer {created.callback_token}"}))

        async def race(job_id: str, auth: dict[str, str], size: int) -> list[int]:
            bodies = [
                {"phase": "completed", "message": letter, "data": {"extracted_text": letter * n}}
                for letter, n in (("A", size), ("B", 100))
            ]
            answers = await asyncio.gather(
                *(bridge_on.post(f"/api/external/jobs/{job_id}", b, headers=auth) for b in bodies)
            )
            return [status for status, _ in answers]

        sizes = [1 + 100_000 * ((round_ + i) % 3) for i in range(len(jobs))]
        statuses = await asyncio.gather(
            *(race(job_id, auth, size) for (job_id, auth), size in zip(jobs, sizes, strict=True))
        )
        for (job_id, _), answered in zip(jobs, statuses, strict=True):
            assert 200 in answered and set(answered) <= {200, 409}, answered
            job = await service.stub.GetJob(job_service_pb2.GetJobRequest(id=job_id))
            assert job.state == job_pb2.JOB_STATE_SUCCEEDED
            stored = await _content(service, job_id, "extracted_text.md")
            named = {a.name: a.sha256 for a in job.result.artifacts}
            assert named["extracted_text.md"] == hashlib.sha256(stored).hexdigest(), job_id
            assert stored[:1].decode() == job.result.message, job_id
            finals += 1
    assert finals == 48


async def test_an_upload_waits_for_a_completion_that_names_its_artifact(
    service: ServiceHandle,
) -> None:
    """The gRPC side of the race above, many uploads of other content racing one
    completion: whatever order they land in, the completed job's result names the
    content stored, and every upload after the end was refused."""
    stub = service.stub
    for round_ in range(20):
        job_id = f"up-{round_}"
        await stub.CreateJob(
            job_service_pb2.CreateJobRequest(
                job_id=job_id, job=job_pb2.Job(kind=job_pb2.JOB_KIND_GENERIC)
            )
        )
        first = await _upload(service, job_id, b"first")
        report = job_service_pb2.ReportEventRequest(job_id=job_id, idempotency_key="done")
        report.completed.artifacts.add(name="text.md", sha256=first.sha256)
        others = [_upload(service, job_id, f"other {i}".encode()) for i in range(8)]
        outcomes = await asyncio.gather(stub.ReportEvent(report), *others, return_exceptions=True)
        job = await stub.GetJob(job_service_pb2.GetJobRequest(id=job_id))
        stored = hashlib.sha256(await _content(service, job_id, "text.md")).hexdigest()
        if job.state == job_pb2.JOB_STATE_SUCCEEDED:
            assert job.result.artifacts[0].sha256 == stored
        for outcome in outcomes:
            if isinstance(outcome, grpc.aio.AioRpcError):
                assert outcome.code() == grpc.StatusCode.FAILED_PRECONDITION, outcome


async def _upload(service: ServiceHandle, job_id: str, data: bytes) -> job_pb2.ArtifactRef:
    header = job_service_pb2.ArtifactHeader(
        job_id=job_id, name="text.md", content_type="text/markdown", size=len(data)
    )
    artifact = await service.stub.UploadArtifact(
        iter(
            [
                job_service_pb2.UploadArtifactRequest(header=header),
                job_service_pb2.UploadArtifactRequest(data=data),
            ]
        )
    )
    return job_pb2.ArtifactRef(name=artifact.name, sha256=artifact.sha256)


async def test_the_upload_acknowledged_last_is_the_artifact(service: ServiceHandle) -> None:
    """Two uploads of one name at once, the one begun first (a large file) ending
    last: on MongoDB the artifact stayed the other one, as the newest by the id its
    upload was given when it began, although this upload was acknowledged after it;
    its file stayed beside it for good. A completion naming the content acknowledged
    last was then refused. Now the upload stored last is the artifact (as in the
    embedded store, and as a GridFS reader's newest `uploadDate`)."""
    stub = service.stub
    await stub.CreateJob(
        job_service_pb2.CreateJobRequest(
            job_id="slow", job=job_pb2.Job(kind=job_pb2.JOB_KIND_GENERIC)
        )
    )
    gate = asyncio.Event()
    sent = asyncio.Event()
    large = b"large " * 50_000

    async def parts() -> AsyncIterator[job_service_pb2.UploadArtifactRequest]:
        header = job_service_pb2.ArtifactHeader(job_id="slow", name="text.md", size=len(large))
        yield job_service_pb2.UploadArtifactRequest(header=header)
        yield job_service_pb2.UploadArtifactRequest(data=large[:-1])
        sent.set()
        await gate.wait()
        yield job_service_pb2.UploadArtifactRequest(data=large[-1:])

    async def upload_large() -> artifact_pb2.Artifact:
        return await stub.UploadArtifact(parts())

    first = asyncio.create_task(upload_large())
    await asyncio.wait_for(sent.wait(), 10)
    await _upload(service, "slow", b"small")
    gate.set()
    last = await asyncio.wait_for(first, 10)
    assert await _content(service, "slow", "text.md") == large
    listed = await stub.ListArtifacts(job_service_pb2.ListArtifactsRequest(job_id="slow"))
    assert [(a.name, a.sha256) for a in listed.artifacts] == [("text.md", last.sha256)]
    report = job_service_pb2.ReportEventRequest(job_id="slow", idempotency_key="done")
    report.completed.artifacts.add(name="text.md", sha256=last.sha256)
    await stub.ReportEvent(report)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _upload(service, "slow", b"again")
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert await _content(service, "slow", "text.md") == large


async def test_a_read_racing_a_replacement_gets_an_artifact_never_unavailable(
    service: ServiceHandle,
) -> None:
    """ReadArtifact while uploads replace the artifact: the embedded store read the
    row, then opened the file it named, which a replacement committed in between had
    removed; about one read in nine was UNAVAILABLE ("No such file or directory"),
    storage down (and counted as such) for an artifact that was there all along. Now
    the read finds the row again and answers the artifact stored then; only one
    replaced at every attempt is ABORTED, "read it again", as on MongoDB."""
    stub = service.stub
    await stub.CreateJob(
        job_service_pb2.CreateJobRequest(
            job_id="busy", job=job_pb2.Job(kind=job_pb2.JOB_KIND_GENERIC)
        )
    )
    contents = {b"%06d" % i for i in range(200)}
    stored = {hashlib.sha256(c).hexdigest(): c for c in contents}
    await _upload(service, "busy", b"000000")
    writers_done = asyncio.Event()
    outcomes: list[grpc.StatusCode] = []

    async def writer(first: int) -> None:
        for i in range(first, 200, 4):
            await _upload(service, "busy", b"%06d" % i)

    async def reader() -> None:
        while not writers_done.is_set():
            call = stub.ReadArtifact(
                job_service_pb2.ReadArtifactRequest(job_id="busy", name="text.md")
            )
            try:
                parts = [m async for m in call]
            except grpc.aio.AioRpcError as err:
                outcomes.append(err.code())
                continue
            outcomes.append(grpc.StatusCode.OK)
            data = b"".join(p.data for p in parts[1:])
            assert stored[parts[0].artifact.sha256] == data

    async def writers() -> None:
        try:
            await asyncio.gather(*(writer(k) for k in range(4)))
        finally:
            writers_done.set()

    await asyncio.wait_for(asyncio.gather(writers(), *(reader() for _ in range(8))), 60)
    assert outcomes.count(grpc.StatusCode.OK) > 0
    assert set(outcomes) <= {grpc.StatusCode.OK, grpc.StatusCode.ABORTED}, sorted(
        {c.name for c in outcomes}
    )


async def test_one_job_deleted_at_once_by_several_callers_is_deleted_once(
    service: ServiceHandle,
) -> None:
    """DeleteJob of one ended job from two operators at once, and the retention sweep
    beside them: each caller marked the job's deletion with an upsert, and on FerretDB
    (and any server that does not retry an upsert that loses its insert) the loser's
    write failed with a duplicate key; the driver could not read that reply and the
    caller got UNKNOWN ("Unexpected <class 'KeyError'>: 'nModified'"), a traceback in
    the log. Now exactly one deletion is OK and the others are NOT_FOUND naming the
    job, every time, and nothing of the job is left."""
    stub = service.stub
    store = service.running.jobs.store
    outcomes: dict[str, int] = {}
    for round_ in range(30):
        job_id = f"del-{round_}"
        await stub.CreateJob(
            job_service_pb2.CreateJobRequest(
                job_id=job_id, job=job_pb2.Job(kind=job_pb2.JOB_KIND_GENERIC)
            )
        )
        await _upload(service, job_id, b"content")
        await stub.CancelJob(job_service_pb2.CancelJobRequest(id=job_id, reason="done"))
        calls = [stub.DeleteJob(job_service_pb2.DeleteJobRequest(id=job_id)) for _ in range(3)]
        answers = await asyncio.gather(*calls, store.delete_jobs([job_id]), return_exceptions=True)
        swept = answers.pop()
        assert isinstance(swept, list), repr(swept)
        deleted = len(swept)
        for answer in answers:
            if isinstance(answer, grpc.aio.AioRpcError):
                assert answer.code() == grpc.StatusCode.NOT_FOUND, (answer.code(), answer.details())
                assert job_id in (answer.details() or "")
            else:
                assert answer == job_service_pb2.DeleteJobResponse(), repr(answer)
                deleted += 1
        assert deleted == 1, answers
        with pytest.raises(grpc.aio.AioRpcError) as gone:
            await stub.ListArtifacts(job_service_pb2.ListArtifactsRequest(job_id=job_id))
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND
        outcomes["sweep" if swept else "rpc"] = outcomes.get("sweep" if swept else "rpc", 0) + 1
    assert sum(outcomes.values()) == 30, outcomes
