"""The four contracts at the byte level and across contracts: encoded bodies, and which
jobs a contract's shared secret reaches."""
# ruff: noqa: F811  (pytest fixtures imported from tests.bridge_harness)

from __future__ import annotations

import gzip
import random
import zlib
from typing import Any

import grpc
import orjson

from jobwire.v1 import job_pb2, job_service_pb2
from tests.bridge_harness import (
    BATCH_SECRET,
    VIDEO_AUTH,
    bridge,  # noqa: F401
    create_job,
    get_job,
    new_id,
    stub,  # noqa: F401
)


async def read_text_artifact(stub: Any, job_id: str, name: str) -> str:
    call = stub.ReadArtifact(job_service_pb2.ReadArtifactRequest(job_id=job_id, name=name))
    data = bytearray()
    while (msg := await call.read()) is not grpc.aio.EOF:
        if msg.WhichOneof("part") == "data":
            data += msg.data
    return data.decode()


async def test_gzip_encoded_bodies_are_read_whole(bridge: Any, stub: Any) -> None:
    """aiohttp decodes a `Content-Encoding: gzip` body, but the bridge measured it
    against Content-Length, which counts the encoded bytes: a small callback (gzip's
    header makes it longer) got 400 "request body shorter than Content-Length", and a
    large one arriving in several segments was cut to its encoded length (400
    "malformed JSON: unexpected end of data")."""
    job_id = new_id("gz")
    await create_job(stub, job_pb2.JOB_KIND_BATCH, job_id)
    small = orjson.dumps(
        {
            "jobId": job_id,
            "status": "success",
            "outputKey": "o/k.mp4",
            "callbackSecret": BATCH_SECRET,
        }
    )
    headers = {"Content-Encoding": "gzip"}
    status, answer = await bridge.post_raw(
        "/api/batch-callback", gzip.compress(small), headers=headers
    )
    assert (status, answer) == (200, {"success": True, "jobId": job_id, "state": "succeeded"})
    assert (await get_job(stub, job_id)).result.output_key == "o/k.mp4"

    created = await create_job(stub, job_pb2.JOB_KIND_EXTRACTION)
    rng = random.Random(7)
    text = " ".join(f"Seite{rng.randrange(10**6)} über Öl" for _ in range(100_000))
    final = orjson.dumps({"phase": "completed", "data": {"extracted_text": text}})
    deflated = zlib.compress(final)
    assert 200_000 < len(deflated) < len(final)  # many segments, shorter than decoded
    status, answer = await bridge.post_raw(
        f"/api/external/jobs/{created.job.id}",
        deflated,
        headers={
            "Content-Encoding": "deflate",
            "Authorization": f"Bearer {created.callback_token}",
        },
    )
    assert (status, answer["kind"]) == (200, "final")
    assert await read_text_artifact(stub, created.job.id, "extracted_text.md") == text


async def test_a_gzip_body_decoding_past_the_limit_is_413(bridge: Any, stub: Any) -> None:
    vid = new_id("gz")
    await create_job(stub, job_pb2.JOB_KIND_VIDEO, vid)
    report = {"status": "progress", "videoId": vid, "percent": 5, "message": "m" * (4 << 20)}
    bomb = gzip.compress(orjson.dumps(report))
    assert len(bomb) < 64 * 1024
    headers = {**VIDEO_AUTH, "Content-Encoding": "gzip"}
    status, answer = await bridge.post_raw("/api/report", bomb, headers=headers)
    assert (status, answer) == (
        413,
        {"error": "Faltan campos requeridos: status, videoId, message"},
    )
    assert (await get_job(stub, vid)).sequence == 0
