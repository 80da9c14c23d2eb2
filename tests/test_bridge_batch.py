"""AWS Batch callback: the contract's examples, validation, auth, idempotency."""
# ruff: noqa: F811  (pytest fixtures imported from tests.bridge_harness)

from __future__ import annotations

import asyncio
from typing import Any

from jobwire.v1 import job_pb2
from tests.bridge_harness import (
    BATCH_SECRET,
    bridge,  # noqa: F401
    create_job,
    fresh_stack,
    get_job,
    new_id,
    stub,  # noqa: F401
)

PATH = "/api/batch-callback"
EXAMPLE_ID = "569dbdb0-c8cb-4121-be44-35aa7bb8ef30"
SUCCESS = {
    "jobId": EXAMPLE_ID,
    "status": "success",
    "outputKey": "output/processed-video.mp4",
    "callbackSecret": "dein-geheimer-schlüssel",
}
FAILED = {
    "jobId": EXAMPLE_ID,
    "status": "failed",
    "error": "FFmpeg failed with exit code 1: File not found",
    "callbackSecret": "dein-geheimer-schlüssel",
}


async def test_large_callbacks_that_arrive_together_are_all_applied(tmp_path: Any) -> None:
    """The bridge batches callbacks that arrive together: 120 failures with 60 KB of
    FFmpeg output each made one BatchReportEvents of 6.7 MB, past the service's 4 MiB
    message limit, and 111 of them got 429. Batches now end before 3 MiB."""
    async with fresh_stack(tmp_path) as (b, s):
        ids = [new_id() for _ in range(120)]
        for job_id in ids:
            await create_job(s, job_pb2.JOB_KIND_BATCH, job_id)
        stderr = "FFmpeg stderr: " + "x" * 60_000
        bodies = [
            {"jobId": i, "status": "failed", "error": stderr, "callbackSecret": BATCH_SECRET}
            for i in ids
        ]
        answers = await asyncio.gather(*(b.post(PATH, body) for body in bodies))
        assert [status for status, _ in answers] == [200] * len(ids)
        for job_id in ids:
            assert (await get_job(s, job_id)).error.message == stderr


async def test_a_failure_with_a_long_error_is_stored_clipped(tmp_path: Any) -> None:
    """The contract sets no limit on `error`; one past the service's 65,536 characters
    (a container's whole FFmpeg stderr) was refused with 400, and its job stayed QUEUED
    for good. It is stored with its start and its end, the middle said to be left out."""
    async with fresh_stack(tmp_path) as (b, s):
        job_id = new_id()
        await create_job(s, job_pb2.JOB_KIND_BATCH, job_id)
        stderr = "ffmpeg version 6.1\n" + "frame= 1 fps=0.0\n" * 5000 + "Conversion failed!"
        body = {
            "jobId": job_id,
            "status": "failed",
            "error": stderr,
            "callbackSecret": BATCH_SECRET,
        }
        assert (await b.post(PATH, body))[0] == 200
        message = (await get_job(s, job_id)).error.message
        assert len(message) <= 65536 and len(stderr) > 65536
        assert message.startswith("ffmpeg version 6.1") and message.endswith("Conversion failed!")
        assert "characters left out" in message


async def test_success_example_verbatim(tmp_path: Any) -> None:
    async with fresh_stack(tmp_path) as (b, s):
        await create_job(s, job_pb2.JOB_KIND_BATCH, EXAMPLE_ID)
        status, body = await b.post(PATH, SUCCESS)
        assert (status, body["success"]) == (200, True)
        job = await get_job(s, EXAMPLE_ID)
        assert job.state == job_pb2.JOB_STATE_SUCCEEDED
        assert job.result.output_key == "output/processed-video.mp4"
        # A verbatim retry is acknowledged, not applied twice.
        assert (await b.post(PATH, SUCCESS))[0] == 200
        assert (await get_job(s, EXAMPLE_ID)).sequence == job.sequence
        # A different outcome for a finished job is a conflict.
        assert (await b.post(PATH, {**FAILED}))[0] == 409


async def test_failed_example_verbatim(tmp_path: Any) -> None:
    async with fresh_stack(tmp_path) as (b, s):
        await create_job(s, job_pb2.JOB_KIND_BATCH, EXAMPLE_ID)
        assert await b.post(PATH, FAILED) == (
            200,
            {"success": True, "jobId": EXAMPLE_ID, "state": "failed"},
        )
        job = await get_job(s, EXAMPLE_ID)
        assert job.state == job_pb2.JOB_STATE_FAILED
        assert job.error.message == FAILED["error"]


async def test_unknown_job_is_404(bridge: Any) -> None:
    status, body = await bridge.post(PATH, {**SUCCESS, "jobId": new_id()})
    assert status == 404
    assert body == {"error": "Projekt mit der angegebenen Job-ID nicht gefunden"}


async def test_auth(bridge: Any, stub: Any) -> None:
    job_id = new_id()
    await create_job(stub, job_pb2.JOB_KIND_BATCH, job_id)
    for secret in (None, "", "wrong", 42):
        body = {**SUCCESS, "jobId": job_id, "callbackSecret": secret}
        status, answer = await bridge.post(PATH, body)
        assert status == 401, secret
        assert answer == {"error": "Ungültiger oder fehlender Authentifizierungsschlüssel"}
    without = {k: v for k, v in SUCCESS.items() if k != "callbackSecret"}
    assert (await bridge.post(PATH, {**without, "jobId": job_id}))[0] == 401
    assert (await get_job(stub, job_id)).state == job_pb2.JOB_STATE_QUEUED


async def test_bad_input_is_400_and_writes_nothing(bridge: Any, stub: Any) -> None:
    job_id = new_id()
    await create_job(stub, job_pb2.JOB_KIND_BATCH, job_id)
    good = {**SUCCESS, "jobId": job_id, "callbackSecret": BATCH_SECRET}
    bad_bodies = [
        {k: v for k, v in good.items() if k != "outputKey"},
        {k: v for k, v in good.items() if k != "status"},
        {k: v for k, v in good.items() if k != "jobId"},
        {**good, "status": "done"},
        {**good, "outputKey": 5},
        {**good, "jobId": "has spaces"},
    ]
    for body in bad_bodies:
        status, answer = await bridge.post(PATH, body)
        assert status == 400, body
        assert answer["error"].startswith("Fehlende oder ungültige Parameter")
    for raw in (b"{not json", b"[]", b'"x"'):
        assert (await bridge.post_raw(PATH, raw))[0] in (400, 401)
    job = await get_job(stub, job_id)
    assert (job.state, job.sequence) == (job_pb2.JOB_STATE_QUEUED, 0)
