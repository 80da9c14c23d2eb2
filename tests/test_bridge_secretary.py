"""Secretary: progress/final/failed callbacks, polling, artifacts (64 MiB round trip)."""
# ruff: noqa: F811  (pytest fixtures imported from tests.bridge_harness)

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
from typing import Any

import grpc
import orjson
import pytest

from jobwire.v1 import job_pb2, job_service_pb2
from tests.bridge_harness import (
    bridge,  # noqa: F401
    create_job,
    get_job,
    stub,  # noqa: F401
)
from tests.bridge_process import raw_exchange, status_of
from tests.helpers import eventually

PROGRESS = {
    "phase": "extract_text",
    "progress": 55,
    "message": "Seite 14/26 verarbeitet",
    "process": {"id": "sec-98765"},
}
FAILED = {
    "phase": "failed",
    "error": {
        "code": "LLM_RATE_LIMIT",
        "message": "Rate limit exceeded",
        "details": {"retryAfterSec": 30},
    },
}


async def new_job(stub: Any) -> tuple[str, dict[str, str]]:
    created = await create_job(stub, job_pb2.JOB_KIND_EXTRACTION)
    return created.job.id, {"Authorization": f"Bearer {created.callback_token}"}


def path(job_id: str) -> str:
    return f"/api/external/jobs/{job_id}"


async def read_artifact(stub: Any, job_id: str, name: str) -> tuple[Any, bytes]:
    call = stub.ReadArtifact(job_service_pb2.ReadArtifactRequest(job_id=job_id, name=name))
    meta, data = None, bytearray()
    while (msg := await call.read()) is not grpc.aio.EOF:
        if msg.WhichOneof("part") == "artifact":
            meta = msg.artifact
        else:
            data += msg.data
    return meta, bytes(data)


async def test_progress_example_and_poll(bridge: Any, stub: Any) -> None:
    job_id, auth = await new_job(stub)
    first = {
        "phase": "extract_text",
        "progress": 42,
        "message": "Seite 12/28 verarbeitet",
        "process": {"id": "sec-1234"},
    }
    for body in (first, PROGRESS):
        assert await bridge.post(path(job_id), body, headers=auth) == (
            200,
            {"status": "ok", "kind": "progress", "jobId": job_id},
        )
    job = await get_job(stub, job_id)
    assert (job.state, job.progress.percent, job.process_id) == (
        job_pb2.JOB_STATE_RUNNING,
        55,
        "sec-98765",
    )
    status, polled = await bridge.get(path(job_id), headers=auth)
    assert status == 200
    assert (polled["status"], polled["processId"], polled["result"]) == (
        "running",
        "sec-98765",
        None,
    )
    assert [(e["phase"], e["progress"], e["message"]) for e in polled["logs"]] == [
        ("extract_text", 42, "Seite 12/28 verarbeitet"),
        ("extract_text", 55, "Seite 14/26 verarbeitet"),
    ]
    assert (polled["phase"], polled["progress"]) == ("extract_text", 55)
    status, newest = await bridge.get(path(job_id) + "?limit=1", headers=auth)
    assert [e["progress"] for e in newest["logs"]] == [55]


@pytest.mark.parametrize("end", ["completed", "failed", "cancelled"])
async def test_an_ended_jobs_poll_gives_the_phase_it_ended_in(
    bridge: Any, stub: Any, end: str
) -> None:
    """The poll kept the last progress phase after the end: `"phase": "finalizing"`
    beside `"status": "completed"`, as if the job were still at work."""
    job_id, auth = await new_job(stub)
    progress = {"phase": "finalizing", "progress": 90, "message": "fast fertig"}
    assert (await bridge.post(path(job_id), progress, headers=auth))[0] == 200
    if end == "cancelled":
        await stub.CancelJob(job_service_pb2.CancelJobRequest(id=job_id, reason="operator"))
    else:
        final = (
            {"phase": "completed", "data": {"extracted_text": "x"}}
            if end == "completed"
            else FAILED
        )
        assert (await bridge.post(path(job_id), final, headers=auth))[0] == 200
    status, polled = await bridge.get(path(job_id), headers=auth)
    assert status == 200
    percent = 100 if end == "completed" else 90
    assert (polled["status"], polled["phase"], polled["progress"]) == (end, end, percent)


async def test_a_stall_shows_in_the_poll_as_stalled(
    bridge: Any, stub: Any, grpc_service: Any
) -> None:
    """A job past its progress deadline gets a STALLED event; the poll listed it as
    `"phase": "unknown"`, a type it had no name for."""
    job = job_pb2.Job(kind=job_pb2.JOB_KIND_EXTRACTION)
    job.progress_deadline.FromNanoseconds(1_000_000)  # 1 ms: past by the first sweep
    created = await stub.CreateJob(job_service_pb2.CreateJobRequest(job=job))
    job_id, auth = created.job.id, {"Authorization": f"Bearer {created.callback_token}"}
    assert (await bridge.post(path(job_id), PROGRESS, headers=auth))[0] == 200

    async def stalled() -> bool:
        await grpc_service.running.jobs.mark_stalls()
        return bool((await get_job(stub, job_id)).stalled)

    await eventually(stalled, what="the STALLED event")
    status, polled = await bridge.get(path(job_id), headers=auth)
    assert status == 200
    assert [item["phase"] for item in polled["logs"]] == ["extract_text", "stalled"], polled
    assert (polled["status"], polled["phase"]) == ("running", "extract_text")


async def test_failed_example(bridge: Any, stub: Any) -> None:
    job_id, auth = await new_job(stub)
    assert await bridge.post(path(job_id), FAILED, headers=auth) == (
        200,
        {"status": "ok", "kind": "failed", "jobId": job_id},
    )
    job = await get_job(stub, job_id)
    assert (job.state, job.error.code, job.error.message) == (
        job_pb2.JOB_STATE_FAILED,
        "LLM_RATE_LIMIT",
        "Rate limit exceeded",
    )
    assert job.error.details["retryAfterSec"] == 30
    status, polled = await bridge.get(
        path(job_id), headers={"X-Callback-Token": auth["Authorization"][7:]}
    )
    assert (status, polled["status"]) == (200, "failed")
    # As sent: 30, not the 30.0 a Struct's double made of it.
    assert repr(polled["error"]["details"]["retryAfterSec"]) == "30"


async def test_final_event_stores_artifacts_first(bridge: Any, stub: Any) -> None:
    job_id, auth = await new_job(stub)
    zip_bytes = b"PK\x03\x04" + os.urandom(5000)
    final = {
        "phase": "completed",
        "message": "Extraktion abgeschlossen",
        "data": {
            "extracted_text": "# Titel\n\nÄrger über Öl – ✓",
            "images_archive_data": base64.b64encode(zip_bytes).decode(),
            "images_archive_filename": "pdf_images.zip",
            "metadata": {"text_contents": [{"page": 1, "content": "..."}]},
        },
    }
    assert await bridge.post(path(job_id), final, headers=auth) == (
        200,
        {"status": "ok", "kind": "final", "jobId": job_id},
    )
    job = await get_job(stub, job_id)
    assert job.state == job_pb2.JOB_STATE_SUCCEEDED
    names = {a.name for a in job.result.artifacts}
    assert names == {"extracted_text.md", "pdf_images.zip", "metadata.json"}
    _, text = await read_artifact(stub, job_id, "extracted_text.md")
    assert text.decode() == final["data"]["extracted_text"]  # type: ignore[index]
    _, data = await read_artifact(stub, job_id, "pdf_images.zip")
    assert data == zip_bytes
    _, meta = await read_artifact(stub, job_id, "metadata.json")
    assert orjson.loads(meta) == final["data"]["metadata"]  # type: ignore[index]
    status, polled = await bridge.get(path(job_id), headers=auth)
    assert polled["status"] == "completed"
    urls = {a["name"]: a["url"] for a in polled["result"]["artifacts"]}
    status, body = await bridge.get(urls["pdf_images.zip"], headers=auth)
    assert (status, body) == (200, zip_bytes)
    # A verbatim retry of the final event is acknowledged without re-uploading.
    assert (await bridge.post(path(job_id), final, headers=auth))[0] == 200


async def test_only_text_final_example_shape(bridge: Any, stub: Any) -> None:
    job_id, auth = await new_job(stub)
    final = {"phase": "completed", "data": {"extracted_text": "..."}}
    assert (await bridge.post(path(job_id), final, headers=auth))[0] == 200
    assert [a.name for a in (await get_job(stub, job_id)).result.artifacts] == ["extracted_text.md"]


async def test_head_of_an_artifact_sends_its_headers_only(bridge: Any, stub: Any) -> None:
    """HEAD of an artifact streamed its bytes after the headers, so on a kept-alive
    connection the next response was read from inside them."""
    job_id, auth = await new_job(stub)
    text = "# Titel\n\nÄrger über Öl – ✓\n" * 100
    final = {"phase": "completed", "data": {"extracted_text": text}}
    assert (await bridge.post(path(job_id), final, headers=auth))[0] == 200
    port = int(bridge.url.rsplit(":", 1)[1])
    head = (
        f"HEAD {path(job_id)}/artifacts/extracted_text.md HTTP/1.1\r\nHost: t\r\n"
        f"Authorization: {auth['Authorization']}\r\n\r\n"
    )
    # One keep-alive connection: the HEAD, then a GET that closes it.
    answer = await raw_exchange(
        port, head.encode() + b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )
    first, rest = answer.split(b"\r\n\r\n", 1)
    assert status_of(first) == 200, answer[:300]
    assert f"Content-Length: {len(text.encode())}".encode() in first.split(b"\r\n")
    assert status_of(rest) == 200, rest[:100]  # the next response, right after the head
    assert rest.startswith(b"HTTP/1.1 200 ")


async def test_64_mib_final_round_trip(bridge: Any, stub: Any) -> None:
    job_id, auth = await new_job(stub)
    blob = os.urandom(64 * 1024 * 1024)
    digest = hashlib.sha256(blob).hexdigest()
    body = orjson.dumps(
        {"phase": "completed", "data": {"images_archive_data": base64.b64encode(blob).decode()}}
    )
    status, answer = await bridge.post_raw(path(job_id), body, headers=auth)
    del body
    assert (status, answer["kind"]) == (200, "final")
    job = await get_job(stub, job_id)
    (ref,) = job.result.artifacts
    assert (ref.name, ref.size_bytes, ref.sha256) == ("images.zip", len(blob), digest)
    meta, data = await read_artifact(stub, job_id, "images.zip")
    assert meta.content_type == "application/zip"
    assert hashlib.sha256(data).hexdigest() == digest
    del data
    url = bridge.url + path(job_id) + "/artifacts/images.zip"
    async with bridge.http.get(url, headers=auth) as resp:
        assert resp.status == 200
        assert resp.content_length == len(blob)
        h = hashlib.sha256()
        async for chunk in resp.content.iter_chunked(1 << 20):
            h.update(chunk)
    assert h.hexdigest() == digest


async def test_auth_and_query_tokens(bridge: Any, stub: Any) -> None:
    job_id, auth = await new_job(stub)
    _, other_auth = await new_job(stub)
    token = auth["Authorization"][7:]
    assert (await bridge.post(path(job_id), PROGRESS))[0] == 401
    assert (await bridge.post(path(job_id), PROGRESS, headers=other_auth))[0] == 401
    assert (await bridge.post(path(job_id) + f"?token={token}", PROGRESS))[0] == 400
    assert (await bridge.post(path(job_id) + f"?token={token}", PROGRESS, headers=auth))[0] == 400
    assert (await bridge.get(path(job_id)))[0] == 401
    assert (await bridge.get(path(job_id), headers=other_auth))[0] == 401
    assert (await bridge.get(path(job_id) + "/artifacts/x.zip", headers=other_auth))[0] == 401
    assert (await bridge.post(path("no-such-job"), PROGRESS, headers=auth))[0] == 404
    job = await get_job(stub, job_id)
    assert (job.state, job.sequence) == (job_pb2.JOB_STATE_QUEUED, 0)


async def test_bad_input_is_400_and_writes_nothing(bridge: Any, stub: Any) -> None:
    job_id, auth = await new_job(stub)
    for body in (
        {**PROGRESS, "progress": 101},
        {**PROGRESS, "progress": -0.5},
        {**PROGRESS, "progress": "55"},
        {k: v for k, v in PROGRESS.items() if k != "progress"},
        {**PROGRESS, "phase": ""},
        {"phase": "completed", "data": {}},
        {"phase": "completed", "data": {"metadata": {"a": 1}}},
        {"phase": "completed"},
        {"phase": "completed", "data": {"images_archive_data": "UEsDB... (base64)"}},
        {"phase": "completed", "data": {"extracted_text": 5}},
        {"phase": "completed", "data": {"extracted_text": "t"}, "message": 5},
        {"phase": "failed"},
        {"phase": "failed", "error": {"code": "X"}},
        [],
    ):
        status, answer = await bridge.post(path(job_id), body, headers=auth)
        assert (status, answer["status"]) == (400, "error"), body
    assert (await bridge.post_raw(path(job_id), b"{", headers=auth))[0] == 400
    job = await get_job(stub, job_id)
    assert (job.state, job.sequence) == (job_pb2.JOB_STATE_QUEUED, 0)
    listed = await stub.ListArtifacts(job_service_pb2.ListArtifactsRequest(job_id=job_id))
    assert list(listed.artifacts) == []


async def test_a_large_body_is_read_only_for_the_job_s_own_token(bridge: Any, stub: Any) -> None:
    """Any token got a body of up to 256 MiB read and parsed before the service said
    401. A body past the usual limit now gets its 401 (or 404) before it is read: here
    after 1 KiB of a declared 100 MiB, long before the body timeout."""
    job_id, _ = await new_job(stub)
    host, port = bridge.url.removeprefix("http://").split(":")
    for target, token, expected in (
        (job_id, "wrong", b" 401 "),
        ("no-such-job", "x" * 43, b" 404 "),
    ):
        reader, writer = await asyncio.open_connection(host, int(port))
        head = (
            f"POST {path(target)} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {100 * 1024 * 1024}\r\n\r\n"
        )
        writer.write(
            head.encode() + b'{"phase": "completed", "data": {"extracted_text": "' + b"a" * 1024
        )
        await writer.drain()
        status = await asyncio.wait_for(reader.readline(), 2.0)
        assert expected in status, status
        writer.close()


async def test_a_body_cannot_forge_the_archive_placeholder(bridge: Any, stub: Any) -> None:
    """A large archive is taken from the raw body and replaced by a placeholder in what
    is parsed. The placeholder was fixed text: a body that sent it as the archive and
    put a large base64 value under `metadata.images_archive_data` got its metadata
    stored as images.zip. The placeholder is now unguessable: such a body is parsed
    whole, its archive is not base64, and the answer is 400 with nothing stored."""
    job_id, auth = await new_job(stub)
    zipped = base64.b64encode(os.urandom(100_000)).decode()
    body = {
        "phase": "completed",
        "data": {
            "images_archive_data": "\u0000jobwire:images_archive_data",
            "metadata": {"images_archive_data": zipped},
        },
    }
    status, answer = await bridge.post(path(job_id), body, headers=auth)
    assert (status, answer["error"]) == (400, "data.images_archive_data: invalid base64")
    listed = await stub.ListArtifacts(job_service_pb2.ListArtifactsRequest(job_id=job_id))
    assert list(listed.artifacts) == []


async def test_padding_before_the_end_of_a_large_archive_is_invalid_base64(
    bridge: Any, stub: Any
) -> None:
    """The archive's base64 is checked in slices of 1,398,100 characters, each on its
    own: a slice ending in `==` passed even when more followed, which base64 does not
    allow. The text artifact was then stored, the archive's upload refused as "cut
    off", and the 400 said so. Now the archive is invalid base64 before anything is
    written."""
    from http_bridge.secretary import B64_SLICE

    job_id, auth = await new_job(stub)
    first = base64.b64encode(os.urandom(B64_SLICE // 4 * 3 - 2))
    assert len(first) == B64_SLICE and first.endswith(b"==")
    archive = (first + base64.b64encode(os.urandom(3000))).decode()
    data = {"extracted_text": "# Hallo", "images_archive_data": archive}
    raw = orjson.dumps({"phase": "completed", "data": data})
    # Left in the raw buffer (bytes), and parsed whole (a str: JSON escapes in it).
    for body in (raw, raw.replace(b"A", b"\\u0041")):
        status, answer = await bridge.post_raw(path(job_id), body, headers=auth)
        assert (status, answer["error"]) == (400, "data.images_archive_data: invalid base64")
    listed = await stub.ListArtifacts(job_service_pb2.ListArtifactsRequest(job_id=job_id))
    assert list(listed.artifacts) == []
    assert (await get_job(stub, job_id)).state == job_pb2.JOB_STATE_QUEUED


async def test_an_event_too_large_to_apply_is_413_not_retry_later(bridge: Any, stub: Any) -> None:
    """A failed event whose details came to 5 MB went to the service, past its 4 MiB
    message limit: RESOURCE_EXHAUSTED, which a worker read as 429 with Retry-After, for
    ever. Past the service's 1 MiB per event it is now a 413 that names the size; the
    job is unchanged. Just under it, the event is applied."""
    job_id, auth = await new_job(stub)
    error = {"code": "LLM_RATE_LIMIT", "message": "Rate limit exceeded"}
    big = {**FAILED, "error": {**error, "details": {"log": "x" * (2 * 1024 * 1024)}}}
    status, answer = await bridge.post(path(job_id), big, headers=auth)
    assert status == 413 and "at most 1048576" in answer["error"], answer
    job = await get_job(stub, job_id)
    assert (job.state, job.sequence) == (job_pb2.JOB_STATE_QUEUED, 0)
    fits = {**FAILED, "error": {**error, "details": {"log": "x" * 1_000_000}}}
    assert (await bridge.post(path(job_id), fits, headers=auth))[0] == 200
    assert (await get_job(stub, job_id)).error.details["log"] == "x" * 1_000_000


async def test_a_stored_content_type_no_header_can_carry_downloads_as_octet_stream(
    bridge: Any, stub: Any, grpc_service: Any
) -> None:
    """An artifact stored before the service checked content types (a line break in
    one) made the download a 500 with a traceback: aiohttp refuses such a header. It is
    served as application/octet-stream now, and no download is sniffed by a browser."""
    from jobwire.v1 import artifact_pb2

    job_id, auth = await new_job(stub)
    meta = artifact_pb2.Artifact(job_id=job_id, name="old.html", content_type="text/html\r\nX: 1")

    async def chunks() -> Any:
        yield b"<b>x</b>"

    await grpc_service.running.store.put_artifact(meta, chunks())
    url = bridge.url + path(job_id) + "/artifacts/old.html"
    async with bridge.http.get(url, headers=auth) as r:
        assert r.status == 200, await r.text()
        assert r.headers["Content-Type"] == "application/octet-stream"
        assert r.headers["X-Content-Type-Options"] == "nosniff"
        assert await r.read() == b"<b>x</b>"


async def test_a_deleted_job_s_late_callback_and_poll_are_404(bridge: Any, stub: Any) -> None:
    """DeleteJob (or the retention) took the job: its worker's late callback and its
    poll find no job (README "Retention")."""
    job_id, auth = await new_job(stub)
    assert (await bridge.post(path(job_id), FAILED, headers=auth))[0] == 200
    await stub.DeleteJob(job_service_pb2.DeleteJobRequest(id=job_id))
    late = {"phase": "finalizing", "progress": 95, "message": "late"}
    assert (await bridge.post(path(job_id), late, headers=auth))[0] == 404
    assert (await bridge.get(path(job_id), headers=auth))[0] == 404


async def test_a_failure_with_a_long_message_is_stored_clipped(bridge: Any, stub: Any) -> None:
    """The contract sets no limit on `error.message`. One past the service's 65,536
    characters (a traceback) was a 400, "fix the payload and resend", which the worker
    cannot: the job stayed running. It is stored with its start and its end, as AWS
    Batch's error."""
    job_id, auth = await new_job(stub)
    trace = "Traceback (most recent call last):\n" + '  File "ocr.py"\n' * 5000 + "TimeoutError"
    failed = {"phase": "failed", "error": {"code": "OCR_TIMEOUT", "message": trace}}
    failed["message"] = "OCR failed: " + "retrying; " * 500  # not stored, not refused
    assert await bridge.post(path(job_id), failed, headers=auth) == (
        200,
        {"status": "ok", "kind": "failed", "jobId": job_id},
    )
    job = await get_job(stub, job_id)
    assert (job.state, job.error.code) == (job_pb2.JOB_STATE_FAILED, "OCR_TIMEOUT")
    assert len(job.error.message) <= 65536 < len(trace)
    assert job.error.message.startswith("Traceback") and job.error.message.endswith("TimeoutError")
    assert "characters left out" in job.error.message


async def test_a_final_with_a_long_message_is_stored_with_it_clipped(
    bridge: Any, stub: Any
) -> None:
    """A final event's `message` past 4,096 characters (the contract asks only progress
    messages to be short) was a 400: the extracted text was lost over a note beside it,
    a payload the worker could not fix. It is stored, the message clipped to 4,096."""
    job_id, auth = await new_job(stub)
    note = "Fertig. " + "Seite verarbeitet; " * 400 + "Ende"
    final = {"phase": "completed", "data": {"extracted_text": "# Text"}, "message": note}
    assert await bridge.post(path(job_id), final, headers=auth) == (
        200,
        {"status": "ok", "kind": "final", "jobId": job_id},
    )
    job = await get_job(stub, job_id)
    assert job.state == job_pb2.JOB_STATE_SUCCEEDED
    assert len(job.result.message) <= 4096 < len(note)
    assert job.result.message.startswith("Fertig.") and job.result.message.endswith("Ende")
    assert (await read_artifact(stub, job_id, "extracted_text.md"))[1] == b"# Text"


async def test_an_archive_name_of_any_characters_is_stored_under_a_safe_form(
    bridge: Any, stub: Any
) -> None:
    """The contract's `images_archive_filename` is any string. A name with a space or an
    umlaut (`jobwire callback secretary final --images-zip` sends the file's own name)
    made the whole final event a 400: neither the text nor the archive was stored, and
    the worker could not fix it. The archive is stored under a safe form of the name."""
    zip_bytes = b"PK\x03\x04" + bytes(range(256))
    for given, stored in (
        ("Bericht 2024 (Übersicht).zip", "Bericht_2024__Ubersicht_.zip"),
        ("../../etc/passwd", ".._.._etc_passwd"),
        ("写真.zip", "__.zip"),
        ("..", "images.zip"),
        ("", "images.zip"),
    ):
        job_id, auth = await new_job(stub)
        final = {
            "phase": "completed",
            "data": {
                "extracted_text": "Seite 1",
                "images_archive_data": base64.b64encode(zip_bytes).decode(),
                "images_archive_filename": given,
            },
        }
        assert await bridge.post(path(job_id), final, headers=auth) == (
            200,
            {"status": "ok", "kind": "final", "jobId": job_id},
        ), given
        job = await get_job(stub, job_id)
        assert job.state == job_pb2.JOB_STATE_SUCCEEDED
        assert [a.name for a in job.result.artifacts] == ["extracted_text.md", stored]
        _, data = await read_artifact(stub, job_id, stored)
        assert data == zip_bytes
