"""The four contracts at the byte level and across contracts: encoded bodies, and which
jobs a contract's shared secret reaches."""
# ruff: noqa: F811  (pytest fixtures imported from tests.bridge_harness)

from __future__ import annotations

import asyncio
import base64
import dataclasses
import gzip
import hashlib
import logging
import random
import time
import zlib
from typing import Any

import grpc
import orjson
import pytest
from prometheus_client import REGISTRY

from http_bridge.config import load_config
from jobwire.v1 import event_pb2, job_pb2, job_service_pb2, log_pb2
from tests.bridge_harness import (
    BATCH_SECRET,
    TEST_CONFIG,
    TRANSCODE_TOKEN,
    VIDEO_AUTH,
    bridge,  # noqa: F401
    create_job,
    fresh_stack,
    get_job,
    new_id,
    running_bridge,
    stub,  # noqa: F401
)
from tests.bridge_process import raw_exchange, status_of


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
    limit = TEST_CONFIG.max_body_bytes
    assert (status, answer) == (
        413,
        {"error": f"Solicitud inválida: request body exceeds {limit} bytes"},
    )
    assert (await get_job(stub, vid)).sequence == 0


@pytest.mark.parametrize("coding", ["gzip", "deflate"])
async def test_a_body_that_is_not_its_content_encoding_is_400_on_every_contract(
    bridge: Any, stub: Any, caplog: pytest.LogCaptureFixture, coding: str
) -> None:
    """`Content-Encoding: gzip` over bytes that are not gzip: aiohttp's
    RequestPayloadError reached the handler unmapped (500, a traceback), and aiohttp
    raised it again draining the body after the answer ("Unhandled exception").
    Now 400 in each contract's body, naming the encoding, and the connection closes
    (its parser cannot find the next request after such a body)."""
    port = int(bridge.url.rsplit(":", 1)[1])
    vid = new_id("enc")
    await create_job(stub, job_pb2.JOB_KIND_VIDEO, vid)
    created = await create_job(stub, job_pb2.JOB_KIND_EXTRACTION)
    problem = f"request body does not decode as Content-Encoding {coding}"
    video = f"Authorization: {VIDEO_AUTH['Authorization']}"
    cases = [
        ("/api/batch-callback", "", {"error": f"Fehlende oder ungültige Parameter: {problem}"}),
        ("/api/report", video, {"error": f"Solicitud inválida: {problem}"}),
        ("/api/log", video, {"error": f"Solicitud inválida: {problem}"}),
        (f"/api/transcode-callback/{TRANSCODE_TOKEN}", "", {"ack": False, "error": problem}),
        (
            f"/api/external/jobs/{created.job.id}",
            f"Authorization: Bearer {created.callback_token}",
            {"status": "error", "error": problem},
        ),
    ]
    caplog.clear()
    for path, auth, expected in cases:
        body = b"notgzip, not deflate either"
        head = f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Encoding: {coding}\r\n"
        if auth:
            head += auth + "\r\n"
        head += f"Content-Length: {len(body)}\r\n\r\n"
        # No `Connection: close`: the bridge closes it (raw_exchange reads until then,
        # which also waits out aiohttp's drain of the body after the answer).
        answer = await raw_exchange(port, head.encode() + body)
        assert status_of(answer) == 400, (path, answer)
        assert orjson.loads(answer.split(b"\r\n\r\n", 1)[1]) == expected, path
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []
    assert (await get_job(stub, vid)).sequence == 0
    assert (await get_job(stub, created.job.id)).sequence == 0


@pytest.mark.parametrize(
    ("coding", "encode"),
    [
        ("x-gzip", gzip.compress),  # RFC 9110 8.4.1.3: taken as gzip
        ("X-GZIP", gzip.compress),
        ("gzip, gzip", lambda body: gzip.compress(gzip.compress(body))),
        ("deflate, gzip", lambda body: gzip.compress(zlib.compress(body))),
        ("identity, gzip", gzip.compress),
    ],
)
async def test_x_gzip_and_stacked_codings_are_decoded(
    bridge: Any, stub: Any, coding: str, encode: Any
) -> None:
    """`x-gzip` and stacked codings reached the contract undecoded (aiohttp decodes
    one exact `gzip` or `deflate`): a 400 "malformed JSON" for a body that was fine."""
    vid = new_id("xg")
    await create_job(stub, job_pb2.JOB_KIND_VIDEO, vid)
    body = orjson.dumps({"status": "progress", "videoId": vid, "message": "m", "percent": 7})
    headers = {**VIDEO_AUTH, "Content-Encoding": coding}
    status, answer = await bridge.post_raw("/api/report", encode(body), headers=headers)
    assert (status, answer) == (200, {"success": True})
    assert (await get_job(stub, vid)).progress.percent == 7


async def test_a_stacked_gzip_bomb_stops_at_the_limit(bridge: Any, stub: Any) -> None:
    """Each layer of `gzip, gzip` inflates at most to the body limit: 64 MiB of
    zeros, gzipped twice (a few hundred bytes), is 413 and writes nothing."""
    vid = new_id("bomb")
    await create_job(stub, job_pb2.JOB_KIND_VIDEO, vid)
    bomb = gzip.compress(gzip.compress(bytes(64 << 20), 1))
    assert len(bomb) < 64 * 1024
    headers = {**VIDEO_AUTH, "Content-Encoding": "gzip, gzip"}
    limit = TEST_CONFIG.max_body_bytes
    assert await bridge.post_raw("/api/report", bomb, headers=headers) == (
        413,
        {"error": f"Solicitud inválida: request body exceeds {limit} bytes"},
    )
    assert (await get_job(stub, vid)).sequence == 0


async def test_an_unsupported_content_coding_is_415_naming_it_on_every_contract(
    bridge: Any, stub: Any
) -> None:
    """`br` and `zstd` failed in aiohttp's parser (their libraries are not installed):
    a generic 400 "malformed HTTP request: invalid Content-Encoding", the connection
    closed. Any coding the bridge does not decode is 415 naming it (RFC 9110 15.5.16),
    in the contract's error body, and nothing is written."""
    port = int(bridge.url.rsplit(":", 1)[1])
    vid = new_id("br")
    await create_job(stub, job_pb2.JOB_KIND_VIDEO, vid)
    created = await create_job(stub, job_pb2.JOB_KIND_EXTRACTION)
    video = f"Authorization: {VIDEO_AUTH['Authorization']}"
    for coding in ("br", "zstd", "compress"):
        problem = f"unsupported Content-Encoding '{coding}' (gzip, x-gzip and deflate are decoded)"
        cases = [
            ("/api/batch-callback", "", {"error": problem}),
            ("/api/report", video, {"error": f"Solicitud inválida: {problem}"}),
            (f"/api/transcode-callback/{TRANSCODE_TOKEN}", "", {"ack": False, "error": problem}),
            (
                f"/api/external/jobs/{created.job.id}",
                f"Authorization: Bearer {created.callback_token}",
                {"status": "error", "error": problem},
            ),
        ]
        for path, auth, expected in cases:
            body = b"\x28\xb5\x2f\xfd not JSON in any case"
            head = f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Encoding: {coding}\r\n"
            head += "Connection: close\r\n"
            head += (auth + "\r\n" if auth else "") + f"Content-Length: {len(body)}\r\n\r\n"
            answer = await raw_exchange(port, head.encode() + body)
            assert status_of(answer) == 415, (coding, path, answer)
            assert orjson.loads(answer.split(b"\r\n\r\n", 1)[1]) == expected, path
    assert (await get_job(stub, vid)).sequence == 0
    assert (await get_job(stub, created.job.id)).sequence == 0


async def test_a_shared_secret_reaches_only_its_contracts_kind_of_job(
    bridge: Any, stub: Any
) -> None:
    """The AWS Batch secret, the video worker's API key and the AuroraCloud token are
    shared by every worker of their contract. They finished any job whose id they
    named: the video worker's key failed a Secretary job (guarded by its own per-job
    token) through /api/report or an ERROR log, the Batch secret completed a video.
    Now a job of another kind is, to them, a job that does not exist."""
    doc = await create_job(stub, job_pb2.JOB_KIND_EXTRACTION)
    vid, batch = new_id("v"), new_id("b")
    await create_job(stub, job_pb2.JOB_KIND_VIDEO, vid)
    await create_job(stub, job_pb2.JOB_KIND_BATCH, batch)
    for other in (doc.job.id, batch):
        report = {"status": "error", "message": "x", "videoId": other}
        assert await bridge.post("/api/report", report, headers=VIDEO_AUTH) == (
            404,
            {"error": "El video no existe"},
        )
    line = {
        "level": "ERROR",
        "message": "boom",
        "timestamp": "2023-05-01T12:00:00Z",
        "videoId": doc.job.id,
    }
    # The line is stored (it names a job), but fails only videos.
    assert await bridge.post("/api/log", line, headers=VIDEO_AUTH) == (200, {"success": True})
    logs = await stub.ListLogs(job_service_pb2.ListLogsRequest(job_id=doc.job.id))
    assert [e.message for e in logs.entries] == ["boom"]
    for other in (doc.job.id, vid):
        callback = {
            "jobId": other,
            "status": "success",
            "outputKey": "o",
            "callbackSecret": BATCH_SECRET,
        }
        assert await bridge.post("/api/batch-callback", callback) == (
            404,
            {"error": "Projekt mit der angegebenen Job-ID nicht gefunden"},
        )
    # AuroraCloud: acknowledged (a retry cannot change it), nothing applied or created.
    task = {"task_id": doc.job.id, "status": "failed", "error_msg": "late"}
    aurora = {"Authorization": f"Bearer {TRANSCODE_TOKEN}"}
    notification = {"code": 0, "msg": "failed", "data": [task]}
    assert await bridge.post("/api/transcode-callback", notification, headers=aurora) == (
        200,
        {"ack": True},
    )
    for job_id, kind in (
        (doc.job.id, job_pb2.JOB_KIND_EXTRACTION),
        (vid, job_pb2.JOB_KIND_VIDEO),
        (batch, job_pb2.JOB_KIND_BATCH),
    ):
        job = await get_job(stub, job_id)
        assert (job.kind, job.state, job.sequence) == (kind, job_pb2.JOB_STATE_QUEUED, 0)
    # Each contract still reaches its own kind, and the Secretary its job by its token.
    report = {"status": "error", "message": "x", "videoId": vid}
    assert await bridge.post("/api/report", report, headers=VIDEO_AUTH) == (200, {"success": True})
    secretary = {"Authorization": f"Bearer {doc.callback_token}"}
    progress = {"phase": "extract_text", "progress": 5}
    assert (await bridge.post(f"/api/external/jobs/{doc.job.id}", progress, headers=secretary))[
        0
    ] == 200


async def test_report_and_log_kind_checked_on_both_stores(service: Any) -> None:
    """ReportEventRequest.kind / WriteLogRequest.kind, alone and in a batch."""
    stub = service.stub
    doc = (await create_job(stub, job_pb2.JOB_KIND_EXTRACTION)).job.id

    def report(kind: job_pb2.JobKind.ValueType, key: str) -> job_service_pb2.ReportEventRequest:
        event = job_service_pb2.ReportEventRequest(job_id=doc, idempotency_key=key, kind=kind)
        event.failed.message = "x"
        return event

    try:
        await stub.ReportEvent(report(job_pb2.JOB_KIND_VIDEO, "k1"))
        raise AssertionError("a video report reached an extraction job")
    except grpc.aio.AioRpcError as exc:
        assert exc.code() == grpc.StatusCode.NOT_FOUND
    batch = await stub.BatchReportEvents(
        job_service_pb2.BatchReportEventsRequest(requests=[report(job_pb2.JOB_KIND_BATCH, "k2")])
    )
    assert [r.code for r in batch.results] == [grpc.StatusCode.NOT_FOUND.value[0]]
    mixed = report(job_pb2.JOB_KIND_VIDEO, "k3")
    mixed.create_kind = job_pb2.JOB_KIND_TRANSCODE
    try:
        await stub.ReportEvent(mixed)
        raise AssertionError("kind and create_kind disagreeing were accepted")
    except grpc.aio.AioRpcError as exc:
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "create_kind" in (exc.details() or "")
    entry = log_pb2.LogEntry(job_id=doc, level=log_pb2.LOG_LEVEL_ERROR, message="boom")
    written = await stub.WriteLog(
        job_service_pb2.WriteLogRequest(entry=entry, kind=job_pb2.JOB_KIND_VIDEO)
    )
    assert not written.job_failed
    job = await get_job(stub, doc)
    assert (job.state, job.sequence) == (job_pb2.JOB_STATE_QUEUED, 0)
    # The same kind (or none) still applies.
    applied = await stub.ReportEvent(report(job_pb2.JOB_KIND_EXTRACTION, "k4"))
    assert applied.state == job_pb2.JOB_STATE_FAILED


async def next_event(watch: Any, timeout: float = 10.0) -> Any:
    item = await asyncio.wait_for(watch.read(), timeout)
    assert item is not grpc.aio.EOF
    return item.event


async def test_a_late_progress_after_a_lapsed_lease_takes_the_claim_back(
    service: Any,
) -> None:
    """A video whose worker went quiet past its lease returns to pending. When that
    worker then reported progress after all, the video became processing with no
    lease: if the worker died then, it was never handed out again nor failed. The
    progress now takes the claim back, with the claim's own lease."""
    stub = service.stub
    vid = new_id("v")
    await create_job(stub, job_pb2.JOB_KIND_VIDEO, vid)
    watch = stub.WatchJob(job_service_pb2.WatchJobRequest(id=vid))
    assert (await asyncio.wait_for(watch.read(), 10)).HasField("snapshot")
    claim = job_service_pb2.ClaimJobRequest(kind=job_pb2.JOB_KIND_VIDEO, worker_id="w1")
    claim.lease_duration.FromMilliseconds(300)
    assert (await stub.ClaimJob(claim)).job.id == vid
    assert (await next_event(watch)).type == event_pb2.EVENT_TYPE_CLAIMED
    assert (await next_event(watch)).type == event_pb2.EVENT_TYPE_REQUEUED
    late = job_service_pb2.ReportEventRequest(
        job_id=vid, idempotency_key="late", kind=job_pb2.JOB_KIND_VIDEO
    )
    late.progress.percent = 40
    assert (await stub.ReportEvent(late)).state == job_pb2.JOB_STATE_RUNNING
    assert (await next_event(watch)).type == event_pb2.EVENT_TYPE_PROGRESS
    job = await get_job(stub, vid)
    assert job.HasField("lease_expire_time")
    assert job.lease_duration.ToMilliseconds() == 300
    # The worker goes quiet again: the lease lapses and the video is pending again.
    requeued = await next_event(watch)
    assert (requeued.type, requeued.state) == (
        event_pb2.EVENT_TYPE_REQUEUED,
        job_pb2.JOB_STATE_QUEUED,
    )
    again = await stub.ClaimJob(job_service_pb2.ClaimJobRequest(kind=job_pb2.JOB_KIND_VIDEO))
    assert (again.job.id, again.job.attempts) == (vid, 2)
    watch.cancel()


async def test_secretary_token_in_the_query_is_refused_however_spelled(
    bridge: Any, stub: Any
) -> None:
    """ "Keine Token in Query-Parametern": only six exact names were refused, so the
    token under `callbackToken`, `Token` or any other name was accepted beside the
    header (and sat in every proxy's access log)."""
    created = await create_job(stub, job_pb2.JOB_KIND_EXTRACTION)
    token, path = created.callback_token, f"/api/external/jobs/{created.job.id}"
    auth = {"Authorization": f"Bearer {token}"}
    progress = {"phase": "extract_text", "progress": 5}
    refused = (400, {"status": "error", "error": "tokens in the query string are not accepted"})
    queries = [
        (f"{name}={token}", f"limit=5&{name}={token}")
        for name in (
            "callbackToken",
            "Token",
            "CALLBACK_TOKEN",
            "callback-token",
            "x-callback-token",
            "t",
        )
    ]
    # Named like a credential, whatever it holds: an exact list let `api_token`,
    # `auth_token` and the like through (200), though the README promised this rule.
    queries += [
        (f"{name}=zzz", f"{name}=zzz")
        for name in (
            "api_token",
            "auth_token",
            "AccessToken",
            "id-token",
            "apiKey",
            "X-API-KEY",
            "client_secret",
            "Authorization",
            "password",
            "credentials",
        )
    ]
    for post_query, get_query in queries:
        assert await bridge.post(f"{path}?{post_query}", progress, headers=auth) == refused, (
            post_query
        )
        assert (await bridge.get(f"{path}?{get_query}", headers=auth))[0] == 400, get_query
    assert (await get_job(stub, created.job.id)).sequence == 0
    # The contracts' own parameters (limit, level) and other plain names pass.
    for query in ("source=ocr", "from=2024-01-01", "level=INFO", "phase=x&page=2"):
        assert (await bridge.post(f"{path}?{query}", progress, headers=auth))[0] == 200, query
    assert (await bridge.get(f"{path}?limit=5&level=INFO&from=x", headers=auth))[0] == 200


async def test_an_archive_named_like_another_artifact_replaces_nothing(
    bridge: Any, stub: Any
) -> None:
    """`images_archive_filename` names the ZIP's artifact. Named `extracted_text.md`
    (or `metadata.json`), the ZIP replaced the extracted text, and the result listed
    two artifacts of that name. Such an archive is now stored as `images.zip`."""
    for clash in ("extracted_text.md", "metadata.json"):
        created = await create_job(stub, job_pb2.JOB_KIND_EXTRACTION)
        auth = {"Authorization": f"Bearer {created.callback_token}"}
        final = {
            "phase": "completed",
            "data": {
                "extracted_text": "Hallo Text",
                "images_archive_data": "UEsDBAo=",
                "images_archive_filename": clash,
                "metadata": {"text_contents": []},
            },
        }
        path = f"/api/external/jobs/{created.job.id}"
        assert (await bridge.post(path, final, headers=auth))[0] == 200
        job = await get_job(stub, created.job.id)
        assert sorted(a.name for a in job.result.artifacts) == [
            "extracted_text.md",
            "images.zip",
            "metadata.json",
        ], clash
        assert await read_text_artifact(stub, created.job.id, "extracted_text.md") == "Hallo Text"
        status, body = await bridge.get(f"{path}/artifacts/images.zip", headers=auth)
        assert (status, body) == (200, b"PK\x03\x04\n")


async def test_a_utf8_byte_order_mark_before_the_json_is_ignored(bridge: Any, stub: Any) -> None:
    """RFC 8259 8.1 lets a parser ignore a leading BOM, which some writers (PowerShell,
    .NET's UTF-8 encoder) put there; it was a 400 "malformed JSON"."""
    bom = b"\xef\xbb\xbf"
    job_id, vid = new_id("b"), new_id("v")
    await create_job(stub, job_pb2.JOB_KIND_BATCH, job_id)
    await create_job(stub, job_pb2.JOB_KIND_VIDEO, vid)
    batch = {"jobId": job_id, "status": "failed", "callbackSecret": BATCH_SECRET}
    status, _ = await bridge.post_raw("/api/batch-callback", bom + orjson.dumps(batch))
    assert status == 200
    report = {"status": "progress", "message": "m", "videoId": vid, "percent": 12}
    answer = await bridge.post_raw("/api/report", bom + orjson.dumps(report), headers=VIDEO_AUTH)
    assert answer == (200, {"success": True})
    assert (await get_job(stub, vid)).progress.percent == 12
    # Only at the start: anywhere else it is still not JSON.
    answer = await bridge.post_raw(
        "/api/report", b" " + bom + orjson.dumps(report), headers=VIDEO_AUTH
    )
    assert answer[0] == 400


async def test_the_same_progress_repeated_as_a_heartbeat_renews_the_lease(
    grpc_service: Any,
) -> None:
    """A video worker that repeats the same progress body (no timestamp, the same
    percent while a download stalls) was deduplicated as a verbatim retry forever:
    its claim's lease was never renewed, the video went back to pending and to
    another worker, while this one's reports got 200 and did nothing. A repeat is
    still a retry (applied once) while the claim is fresh, and a sign of life once
    half of it is gone: exact, with no time window in the key (a window's edge made a
    real retry count twice)."""
    stub = grpc_service.stub
    config = dataclasses.replace(TEST_CONFIG, service_target=grpc_service.target)
    vid = new_id("v")
    await create_job(stub, job_pb2.JOB_KIND_VIDEO, vid)
    lease = job_service_pb2.ClaimJobRequest(kind=job_pb2.JOB_KIND_VIDEO)
    lease.lease_duration.FromMilliseconds(1200)
    job = (await stub.ClaimJob(lease)).job
    while job.id != vid:  # videos of other tests may be older
        job = (await stub.ClaimJob(lease)).job
    heartbeat = {"status": "progress", "message": "Descargando", "videoId": vid, "percent": 50}
    async with running_bridge(config) as b:
        for _ in range(3):  # verbatim retries while the claim is fresh: applied once
            assert await b.post("/api/report", heartbeat, headers=VIDEO_AUTH) == (
                200,
                {"success": True},
            )
        first = await get_job(stub, vid)
        assert first.sequence == 2  # claimed, progress
        # The time under test: until half of the claim is gone.
        half = first.lease_expire_time.ToNanoseconds() - 600_000_000
        await asyncio.sleep(max(0.0, (half - time.time_ns()) / 1e9) + 0.05)
        assert (await b.post("/api/report", heartbeat, headers=VIDEO_AUTH))[0] == 200
        later = await get_job(stub, vid)
        assert later.sequence == 3 and later.state == job_pb2.JOB_STATE_RUNNING
        assert later.lease_expire_time.ToNanoseconds() > first.lease_expire_time.ToNanoseconds()
        # ... and at once again it is a retry of that one.
        assert (await b.post("/api/report", heartbeat, headers=VIDEO_AUTH))[0] == 200
        assert (await get_job(stub, vid)).sequence == 3


def test_a_header_secret_that_no_header_can_carry_is_refused_at_start(tmp_path: Any) -> None:
    """API_KEY and TRANSCODE_CALLBACK_TOKEN travel in a header (or the path), where the
    bridge takes only printable ASCII: set to `schlüssel`, the video worker got 401
    for ever with its correct key. Refused at start, naming the variable, never the
    value. (BATCH_CALLBACK_SECRET travels in the JSON body: any text, as the
    contract's own example `dein-geheimer-schlüssel`.)"""
    base = {"JOBWIRE_ENV_FILE": str(tmp_path / "none.env")}
    for name, value in (
        ("API_KEY", "schlüssel-geheim"),
        ("TRANSCODE_CALLBACK_TOKEN", "tok\tgeheim"),
        ("API_KEY", "k" * 4097),
    ):
        with pytest.raises(SystemExit) as refused:
            load_config({**base, name: value})
        message = str(refused.value.code)
        assert name in message and value not in message and "geheim" not in message, message
    config = load_config({**base, "BATCH_CALLBACK_SECRET": "dein-geheimer-schlüssel"})
    assert config.batch_callback_secret == "dein-geheimer-schlüssel"
    assert load_config({**base, "API_KEY": "k" * 4096, "TRANSCODE_CALLBACK_TOKEN": "a b"})


async def test_a_header_secret_with_whitespace_at_an_end_is_refused_at_start(
    tmp_path: Any,
) -> None:
    """HTTP takes a header value without the spaces at its ends (RFC 9110 5.5), and the
    bridge strips what it reads: `API_KEY="k3y "` (a compose file's stray space) started
    the bridge, and its video worker, sending that very key, got 401 for ever."""
    async with running_bridge(dataclasses.replace(TEST_CONFIG, api_key="k3y ")) as bridge:
        headers = {"Authorization": "Bearer k3y "}
        assert (await bridge.get("/api/log", headers=headers))[0] == 401  # it could not work
    base = {"JOBWIRE_ENV_FILE": str(tmp_path / "none.env")}
    for name, value in (
        ("API_KEY", "k3y-geheim "),
        ("API_KEY", " k3y-geheim"),
        ("TRANSCODE_CALLBACK_TOKEN", " tok-geheim "),
    ):
        with pytest.raises(SystemExit) as refused:
            load_config({**base, name: value})
        message = str(refused.value.code)
        assert name in message and "geheim" not in message, message
        assert "whitespace" in message, message


async def test_video_contract_pins_on_a_fresh_service(tmp_path: Any) -> None:
    """What the Spanish contract states and no other test pinned: 204 has no body, the
    oldest pending video goes first, GET /api/log gives 50 lines by default, newest
    first (as its example), and `level` filters them."""
    async with fresh_stack(tmp_path) as (b, s):
        assert await b.get("/api/pending", headers=VIDEO_AUTH) == (204, b"")
        for vid in ("older", "newer"):
            await create_job(s, job_pb2.JOB_KIND_VIDEO, vid)
        for vid in ("older", "newer"):
            status, body = await b.get("/api/pending", headers=VIDEO_AUTH)
            assert (status, body["videoId"]) == (200, vid)
        assert await b.get("/api/pending", headers=VIDEO_AUTH) == (204, b"")
        for second in range(60):
            line = {
                "level": "ERROR" if second % 10 == 0 else "INFO",
                "message": f"m{second}",
                "timestamp": f"2023-05-01T12:00:{second:02d}Z",
            }
            assert (await b.post("/api/log", line, headers=VIDEO_AUTH))[0] == 200
        status, listed = await b.get("/api/log", headers=VIDEO_AUTH)
        assert status == 200 and len(listed) == 50
        assert [e["message"] for e in listed] == [f"m{n}" for n in range(59, 9, -1)]
        status, errors = await b.get("/api/log?level=ERROR", headers=VIDEO_AUTH)
        assert [e["message"] for e in errors] == [f"m{n}" for n in range(50, -1, -10)]
        assert {e["videoId"] for e in errors} == {"UNKNOWN"}


async def test_secretary_and_aurora_pins(bridge: Any, stub: Any) -> None:
    """The Secretary's alternative header with its diagnostic headers, and a sender
    still putting `jobId`/`correlation` in the body (no longer sent, ignored: the path
    names the job); AuroraCloud's empty batch is acknowledged."""
    created = await create_job(stub, job_pb2.JOB_KIND_EXTRACTION)
    other = await create_job(stub, job_pb2.JOB_KIND_EXTRACTION)
    headers = {
        "X-Callback-Token": created.callback_token,
        "Accept": "application/json",
        "X-Worker": "secretary",
    }
    progress = {
        "phase": "extract_text",
        "progress": 42,
        "jobId": other.job.id,
        "correlation": {"jobId": other.job.id},
    }
    path = f"/api/external/jobs/{created.job.id}"
    assert await bridge.post(path, progress, headers=headers) == (
        200,
        {"status": "ok", "kind": "progress", "jobId": created.job.id},
    )
    assert (await get_job(stub, created.job.id)).progress.percent == 42
    assert (await get_job(stub, other.job.id)).sequence == 0
    aurora = {"Authorization": f"Bearer {TRANSCODE_TOKEN}"}
    empty = {"code": 0, "msg": "succeeded", "data": []}
    assert await bridge.post("/api/transcode-callback", empty, headers=aurora) == (
        200,
        {"ack": True},
    )


async def test_a_progress_report_without_percent_keeps_the_percent(bridge: Any, stub: Any) -> None:
    """`percent` (like currentTime and totalTime) is optional in a progress report. A
    report without it ("Reintentando conexión") set the video's progress to 0 % and
    dropped its media times. Now the percent comes from currentTime/totalTime when
    both are known, else stays; times not sent stay; an explicit 0 is still 0."""
    vid = new_id("v")
    await create_job(stub, job_pb2.JOB_KIND_VIDEO, vid)

    async def report(**fields: Any) -> job_pb2.Progress:
        body = {"status": "progress", "message": "m", "videoId": vid, **fields}
        assert await bridge.post("/api/report", body, headers=VIDEO_AUTH) == (
            200,
            {"success": True},
        )
        return (await get_job(stub, vid)).progress

    first = await report(percent=45, currentTime="00:01:30.500", totalTime="00:03:20.000")
    assert first.percent == 45
    kept = await report(message="Reintentando conexión")
    assert (kept.percent, kept.message) == (45, "Reintentando conexión")
    assert (kept.media_time.ToMilliseconds(), kept.media_duration.ToMilliseconds()) == (
        90_500,
        200_000,
    )
    derived = await report(currentTime="00:02:00.000")
    assert derived.percent == 60
    assert (derived.media_time.ToMilliseconds(), derived.media_duration.ToMilliseconds()) == (
        120_000,
        200_000,
    )
    # A length of zero (not known yet) says nothing of the percent: it was set to 0.
    unknown = await report(currentTime="00:00:05.000", totalTime="00:00:00")
    assert unknown.percent == 60
    assert (await report(percent=0)).percent == 0


async def test_a_report_with_a_percent_keeps_the_media_times_it_leaves_out(
    bridge: Any, stub: Any
) -> None:
    """currentTime, percent and totalTime are each optional. A report with a percent
    alone (a worker post-processing, with no position to give) erased the video's
    position and length, where a report without a percent kept them: the dashboard's
    "1:30 / 3:20" vanished. A time left out now stays either way; one sent replaces."""
    vid = new_id("v")
    await create_job(stub, job_pb2.JOB_KIND_VIDEO, vid)

    async def report(**fields: Any) -> tuple[float, int, int]:
        body = {"status": "progress", "message": "m", "videoId": vid, **fields}
        assert await bridge.post("/api/report", body, headers=VIDEO_AUTH) == (
            200,
            {"success": True},
        )
        progress = (await get_job(stub, vid)).progress
        times = progress.media_time.ToMilliseconds(), progress.media_duration.ToMilliseconds()
        return (progress.percent, *times)

    assert await report(percent=45, currentTime="00:01:30.500", totalTime="00:03:20.000") == (
        45,
        90_500,
        200_000,
    )
    assert await report(percent=50) == (50, 90_500, 200_000)
    assert await report(percent=60, currentTime="00:02:00.000") == (60, 120_000, 200_000)
    assert await report(percent=61, totalTime="00:04:00.000") == (61, 120_000, 240_000)
    # The gRPC API's report is the job's latest progress, whole, as before.
    await stub.ReportEvent(
        job_service_pb2.ReportEventRequest(
            job_id=vid, idempotency_key=new_id("k"), progress=job_pb2.Progress(percent=70)
        )
    )
    assert not (await get_job(stub, vid)).progress.HasField("media_duration")


async def test_percent_less_reports_never_restore_a_stale_percent(bridge: Any, stub: Any) -> None:
    """The percent a report without one keeps is the video's when the report is
    applied, in the same write: the bridge no longer reads the job first (a report
    committed between that read and the write was overwritten with the older
    percent). Here every percent-less report lands behind a 30 % one, in any order."""
    vid = new_id("v")
    await create_job(stub, job_pb2.JOB_KIND_VIDEO, vid)
    reads_before = requests_counted("GetJob", "OK")

    def body(**fields: Any) -> dict[str, Any]:
        return {"status": "progress", "videoId": vid, **fields}

    await bridge.post("/api/report", body(message="start", percent=10), headers=VIDEO_AUTH)
    answers = await asyncio.gather(
        bridge.post("/api/report", body(message="a", percent=30), headers=VIDEO_AUTH),
        *(
            bridge.post("/api/report", body(message=f"retry {i}"), headers=VIDEO_AUTH)
            for i in range(8)
        ),
    )
    assert answers == [(200, {"success": True})] * 9
    assert requests_counted("GetJob", "OK") == reads_before  # no read-then-write
    events = (await stub.ListJobEvents(job_service_pb2.ListJobEventsRequest(job_id=vid))).events
    percents = [e.progress.percent for e in events]
    thirty = percents.index(30)
    assert set(percents[:thirty]) == {10} and set(percents[thirty:]) == {30}
    assert (await get_job(stub, vid)).progress.percent == 30


def requests_counted(method: str, code: str) -> float:
    """The service's own count (it runs in this process)."""
    value = REGISTRY.get_sample_value(
        "jobwire_grpc_requests_total", {"method": method, "code": code}
    )
    return value or 0.0


async def test_concurrent_aurora_retries_create_a_task_once(service: Any) -> None:
    """AuroraCloud retries a notification 5 s apart, but a slow answer can make a retry
    overlap the original: every copy creating the same new task at once is answered
    200 and the task applied once, on both stores."""
    config = dataclasses.replace(TEST_CONFIG, service_target=service.target)
    task_ids = [new_id("a") for _ in range(3)]
    note = {
        "code": 0,
        "msg": "failed",
        "data": [{"task_id": t, "status": "failed", "error_code": 7} for t in task_ids],
    }
    aurora = {"Authorization": f"Bearer {TRANSCODE_TOKEN}"}
    async with running_bridge(config) as b:
        answers = await asyncio.gather(
            *(b.post("/api/transcode-callback", note, headers=aurora) for _ in range(8))
        )
    assert answers == [(200, {"ack": True})] * 8
    for task_id in task_ids:
        job = await get_job(service.stub, task_id)
        assert (job.kind, job.state, job.sequence) == (
            job_pb2.JOB_KIND_TRANSCODE,
            job_pb2.JOB_STATE_FAILED,
            1,
        )


async def test_overlapping_secretary_final_retries_leave_one_set_of_artifacts(
    service: Any,
) -> None:
    """The Secretary retries a final event with backoff on a 5xx or a timeout, so a
    retry may overlap the original: all copies are answered 200, the job completes
    once, and each artifact is there once with the content the result names."""
    config = dataclasses.replace(TEST_CONFIG, service_target=service.target)
    created = await create_job(service.stub, job_pb2.JOB_KIND_EXTRACTION)
    auth = {"Authorization": f"Bearer {created.callback_token}"}
    zip_bytes = b"PK\x03\x04" + bytes(range(256)) * 64
    final = {
        "phase": "completed",
        "data": {
            "extracted_text": "Seite 1\n\nÄrger über Öl",
            "images_archive_data": base64.b64encode(zip_bytes).decode(),
            "images_archive_filename": "pdf_images.zip",
        },
    }
    path = f"/api/external/jobs/{created.job.id}"
    async with running_bridge(config) as b:
        answers = await asyncio.gather(*(b.post(path, final, headers=auth) for _ in range(4)))
    assert [a[0] for a in answers] == [200] * 4
    job = await get_job(service.stub, created.job.id)
    assert (job.state, job.sequence) == (job_pb2.JOB_STATE_SUCCEEDED, 1)
    listed = await service.stub.ListArtifacts(
        job_service_pb2.ListArtifactsRequest(job_id=created.job.id)
    )
    stored = {a.name: a.sha256 for a in listed.artifacts}
    assert len(listed.artifacts) == 2
    assert stored == {a.name: a.sha256 for a in job.result.artifacts}
    assert stored["pdf_images.zip"] == hashlib.sha256(zip_bytes).hexdigest()
