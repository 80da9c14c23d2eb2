"""Video worker: pending (claim), report, log; examples, auth, bad input, no double claims."""
# ruff: noqa: F811  (pytest fixtures imported from tests.bridge_harness)

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import grpc

from jobwire.v1 import job_pb2, job_service_pb2, log_pb2
from tests.bridge_harness import (
    TEST_CONFIG,
    VIDEO_AUTH,
    bridge,  # noqa: F401
    create_job,
    fresh_stack,
    get_job,
    new_id,
    stub,  # noqa: F401
)

UNAUTHORIZED = {"error": "No autorizado"}
REPORT_400 = {"error": "Faltan campos requeridos: status, videoId, message"}
LOG_400 = {"error": "Faltan campos requeridos: level, message, timestamp"}


def video(n: int = 0) -> job_pb2.Video:
    return job_pb2.Video(
        url=f"https://ejemplo.com/video{n}.mp4",
        playlist="Nombre de la Playlist",
        title="Título del Video",
        subtitle="Subtítulo del Video",
    )


async def test_idempotency_keys_are_kept_whole(bridge: Any, stub: Any) -> None:
    """Keys were cut to 200 characters: three reports whose keys differed only after
    that were one key, and the final one was acknowledged (200) and dropped. A key
    past 1,024 characters is a 400 naming the header, and changes nothing."""
    vid = new_id("k")
    await create_job(stub, job_pb2.JOB_KIND_VIDEO, vid, video())
    base = "k" * 200
    steps: list[tuple[str, dict[str, Any]]] = [
        ("-step-1", {"status": "progress", "percent": 10}),
        ("-step-2", {"status": "progress", "percent": 20}),
        ("-final", {"status": "success"}),
    ]
    for suffix, fields in steps:
        body: dict[str, Any] = {**fields, "message": suffix, "videoId": vid}
        headers = {**VIDEO_AUTH, "Idempotency-Key": base + suffix}
        assert await bridge.post("/api/report", body, headers=headers) == (200, {"success": True})
    job = await get_job(stub, vid)
    assert (job.state, job.sequence) == (job_pb2.JOB_STATE_SUCCEEDED, 3)
    other = new_id("k")
    await create_job(stub, job_pb2.JOB_KIND_VIDEO, other, video())
    body = {"status": "progress", "percent": 5, "message": "m", "videoId": other}
    too_long = {**VIDEO_AUTH, "Idempotency-Key": "k" * 1025}
    named = {"error": "Solicitud inválida: Idempotency-Key header must be at most 1024 characters"}
    # It got the body's fixed `Faltan campos requeridos: ...`, naming fields all there.
    assert await bridge.post("/api/report", body, headers=too_long) == (400, named)
    line = {"level": "ERROR", "message": "m", "timestamp": "2024-01-01T00:00:00Z", "videoId": other}
    assert await bridge.post("/api/log", line, headers=too_long) == (400, named)
    assert (await get_job(stub, other)).sequence == 0


async def test_examples_verbatim(tmp_path: Any) -> None:
    """Every example of the Spanish contract, on a fresh service (videoId "12345")."""
    async with fresh_stack(tmp_path) as (b, s):
        assert (await b.get("/api/pending", headers=VIDEO_AUTH))[0] == 204
        await create_job(s, job_pb2.JOB_KIND_VIDEO, "12345", video())
        status, body = await b.get("/api/pending", headers=VIDEO_AUTH)
        assert status == 200
        assert body == {
            "videoUrl": "https://ejemplo.com/video0.mp4",
            "videoId": "12345",
            "playlist": "Nombre de la Playlist",
            "title": "Título del Video",
            "subtitle": "Subtítulo del Video",
        }
        report = {
            "status": "progress",
            "message": "Mensaje descriptivo",
            "timestamp": "2023-05-01T12:00:00Z",
            "videoId": "12345",
            "currentTime": "00:01:30.500",
            "percent": 45,
            "totalTime": "00:03:20.000",
        }
        assert await b.post("/api/report", report, headers=VIDEO_AUTH) == (200, {"success": True})
        job = await get_job(s, "12345")
        assert job.state == job_pb2.JOB_STATE_RUNNING
        assert job.progress.percent == 45
        assert job.progress.media_time.ToMilliseconds() == 90_500
        assert job.progress.media_duration.ToMilliseconds() == 200_000
        assert job.progress.report_time.ToJsonString() == "2023-05-01T12:00:00Z"
        log_lines = [
            {
                "level": "INFO",
                "message": "Descarga completada exitosamente",
                "timestamp": "2023-05-01T12:00:00Z",
                "videoId": "12345",
            },
            {
                "level": "WARNING",
                "message": "Mensaje descriptivo",
                "timestamp": "2023-05-01T12:00:00Z",
            },
        ]
        for line in log_lines:
            assert await b.post("/api/log", line, headers=VIDEO_AUTH) == (200, {"success": True})
        status, listed = await b.get("/api/log", headers=VIDEO_AUTH)
        assert status == 200
        assert {
            "level": "WARNING",
            "message": "Mensaje descriptivo",
            "timestamp": "2023-05-01T12:00:00Z",
            "videoId": "UNKNOWN",
        } in listed
        assert log_lines[0] in listed
        status, infos = await b.get("/api/log?level=INFO&limit=1", headers=VIDEO_AUTH)
        assert (status, infos) == (200, [log_lines[0]])
        done = {**report, "status": "success", "message": "Operación completada con éxito"}
        for key in ("currentTime", "percent", "totalTime"):
            done.pop(key)
        assert await b.post("/api/report", done, headers=VIDEO_AUTH) == (200, {"success": True})
        assert (await get_job(s, "12345")).state == job_pb2.JOB_STATE_SUCCEEDED


async def test_a_log_line_with_an_empty_video_id_or_a_lowercase_timestamp_is_kept(
    bridge: Any, stub: Any
) -> None:
    """`videoId` is optional ("si no se proporciona se usa UNKNOWN"): an empty one was a
    400 and the line was lost; it is a line of UNKNOWN now. RFC 3339 allows a lowercase
    `t` and `z` (section 5.6), which Python's parser refused: a 400, the line lost."""
    marker = new_id("empty-id")
    for body in (
        {"level": "INFO", "message": marker, "timestamp": "2023-05-01T12:00:00Z", "videoId": ""},
        {"level": "INFO", "message": marker + "-lower", "timestamp": "2023-05-01t12:00:01z"},
    ):
        assert await bridge.post("/api/log", body, headers=VIDEO_AUTH) == (200, {"success": True})
    status, listed = await bridge.get("/api/log?limit=1000", headers=VIDEO_AUTH)
    assert status == 200
    mine = {e["message"]: e for e in listed if e["message"].startswith(marker)}
    assert mine[marker]["videoId"] == "UNKNOWN"
    assert mine[marker + "-lower"]["timestamp"] == "2023-05-01T12:00:01Z"


async def test_a_log_line_posted_again_with_its_idempotency_key_is_stored_once(
    bridge: Any, stub: Any
) -> None:
    """A worker retrying a POST /api/log (its 200 lost) stored the line again; with an
    Idempotency-Key it is stored once. Without one, two lines alike to the byte are two
    lines (a message repeated within its timestamp's second)."""
    vid = new_id("v")
    await create_job(stub, job_pb2.JOB_KIND_VIDEO, vid, video())
    line = {"level": "INFO", "message": "fragmento", "timestamp": "2023-05-01T12:00:00Z"}
    keyed = {**VIDEO_AUTH, "Idempotency-Key": "line-1"}
    for _ in range(2):
        ok = await bridge.post("/api/log", {**line, "videoId": vid}, headers=keyed)
        assert ok == (200, {"success": True})
        plain = await bridge.post(
            "/api/log", {**line, "videoId": vid, "message": "sin clave"}, headers=VIDEO_AUTH
        )
        assert plain == (200, {"success": True})
    # The same key for another video is another line.
    other = new_id("v")
    assert (await bridge.post("/api/log", {**line, "videoId": other}, headers=keyed))[0] == 200
    status, listed = await bridge.get("/api/log?limit=1000", headers=VIDEO_AUTH)
    assert status == 200
    mine = [entry["message"] for entry in listed if entry["videoId"] == vid]
    assert sorted(mine) == ["fragmento", "sin clave", "sin clave"]
    assert [entry["message"] for entry in listed if entry["videoId"] == other] == ["fragmento"]


async def test_error_report_and_error_log_fail_the_video(bridge: Any, stub: Any) -> None:
    vid = new_id("v")
    await create_job(stub, job_pb2.JOB_KIND_VIDEO, vid, video())
    line = {
        "level": "ERROR",
        "message": "yt-dlp: 403",
        "timestamp": "2023-05-01T12:00:00Z",
        "videoId": vid,
    }
    assert await bridge.post("/api/log", line, headers=VIDEO_AUTH) == (200, {"success": True})
    job = await get_job(stub, vid)
    assert job.state == job_pb2.JOB_STATE_FAILED
    # The worker's `error` report after its ERROR log agrees with the stored outcome.
    report = {"status": "error", "message": "yt-dlp: 403", "videoId": vid}
    assert await bridge.post("/api/report", report, headers=VIDEO_AUTH) == (200, {"success": True})


async def test_a_lowercase_log_level_is_a_400_naming_the_level(bridge: Any, stub: Any) -> None:
    """The contract lists its levels in capitals ("INFO | ERROR | WARNING"; an "ERROR"
    line fails its video): `info` is not one of them. Its 400 was the contract's fixed
    "Faltan campos requeridos: level, message, timestamp", of three fields all sent; it
    now names the level. Nothing is stored, and a lowercase `error` fails nothing."""
    vid = new_id("v")
    await create_job(stub, job_pb2.JOB_KIND_VIDEO, vid, video())
    for level in ("info", "Error", "warning"):
        line = {"level": level, "message": "m", "timestamp": "2023-05-01T12:00:00Z", "videoId": vid}
        expected = f"Solicitud inválida: level must be written in capitals ({level.upper()!r})"
        assert await bridge.post("/api/log", line, headers=VIDEO_AUTH) == (400, {"error": expected})
    assert (await get_job(stub, vid)).state == job_pb2.JOB_STATE_QUEUED
    logs = await stub.ListLogs(job_service_pb2.ListLogsRequest(job_id=vid))
    assert list(logs.entries) == []


async def test_unknown_video_is_404(bridge: Any) -> None:
    report = {"status": "progress", "message": "m", "videoId": new_id("nope"), "percent": 1}
    assert await bridge.post("/api/report", report, headers=VIDEO_AUTH) == (
        404,
        {"error": "El video no existe"},
    )


async def test_auth(bridge: Any) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "test-api-key"}):
        assert await bridge.get("/api/pending", headers=headers) == (401, UNAUTHORIZED)
        assert await bridge.get("/api/log", headers=headers) == (401, UNAUTHORIZED)
        report = {"status": "progress", "message": "m", "videoId": "x"}
        assert await bridge.post("/api/report", report, headers=headers) == (401, UNAUTHORIZED)
        assert await bridge.post("/api/log", {}, headers=headers) == (401, UNAUTHORIZED)


async def test_bad_input_is_400_and_writes_nothing(bridge: Any, stub: Any) -> None:
    vid = new_id("v")
    await create_job(stub, job_pb2.JOB_KIND_VIDEO, vid, video())
    good = {"status": "progress", "message": "m", "videoId": vid, "percent": 10}
    for body in (
        {"message": "m", "videoId": vid},
        {"status": "progress", "videoId": vid},
        {"status": "progress", "message": "m"},
        {**good, "status": "paused"},
        {**good, "percent": 101},
        {**good, "percent": -1},
        {**good, "percent": "50"},
        {**good, "currentTime": "1:30"},
        {**good, "timestamp": "yesterday"},
        {**good, "videoId": 12345},
    ):
        assert await bridge.post("/api/report", body, headers=VIDEO_AUTH) == (400, REPORT_400)
    assert await bridge.post_raw("/api/report", b"{", headers=VIDEO_AUTH) == (400, REPORT_400)
    line = {"level": "INFO", "message": "m", "timestamp": "2023-05-01T12:00:00Z", "videoId": vid}
    bad_lines: tuple[dict[str, object], ...] = (
        {k: v for k, v in line.items() if k != "timestamp"},
        {k: v for k, v in line.items() if k != "level"},
        {**line, "message": None},
    )
    for bad in bad_lines:
        assert await bridge.post("/api/log", bad, headers=VIDEO_AUTH) == (400, LOG_400)
    for level in ("TRACE", "", 3):  # there, but not one of the contract's: named
        level_400 = {
            "error": "Solicitud inválida: level must be one of DEBUG, INFO, WARNING, ERROR"
        }
        answer = await bridge.post("/api/log", {**line, "level": level}, headers=VIDEO_AUTH)
        assert answer == (400, level_400)
    assert (await bridge.get("/api/log?limit=0", headers=VIDEO_AUTH))[0] == 400
    assert (await bridge.get("/api/log?level=LOUD", headers=VIDEO_AUTH))[0] == 400
    job = await get_job(stub, vid)
    assert (job.state, job.sequence) == (job_pb2.JOB_STATE_QUEUED, 0)
    logs = await stub.ListLogs(job_service_pb2.ListLogsRequest(job_id=vid))
    assert list(logs.entries) == []


async def test_concurrent_pollers_never_share_a_video(tmp_path: Any) -> None:
    async with fresh_stack(tmp_path) as (b, s):
        ids = {new_id("v") for _ in range(200)}
        await asyncio.gather(*(create_job(s, job_pb2.JOB_KIND_VIDEO, i, video()) for i in ids))

        async def poller() -> list[str]:
            got = []
            while True:
                status, body = await b.get("/api/pending", headers=VIDEO_AUTH)
                if status == 204:
                    return got
                assert status == 200
                got.append(body["videoId"])

        results = await asyncio.gather(*(poller() for _ in range(4)))
        claimed = [v for r in results for v in r]
        assert len(claimed) == len(set(claimed)) == 200
        assert set(claimed) == ids


async def test_watcher_sees_rest_progress_in_order(bridge: Any, stub: Any) -> None:
    vid = new_id("v")
    await create_job(stub, job_pb2.JOB_KIND_VIDEO, vid, video())
    call = stub.WatchJob(job_service_pb2.WatchJobRequest(id=vid))
    first = await asyncio.wait_for(call.read(), 10)
    assert first.WhichOneof("item") == "snapshot"
    for pct in (10, 20, 30, 40):
        body = {"status": "progress", "message": f"{pct}%", "videoId": vid, "percent": pct}
        assert (await bridge.post("/api/report", body, headers=VIDEO_AUTH))[0] == 200
    done = {"status": "success", "message": "ok", "videoId": vid}
    assert (await bridge.post("/api/report", done, headers=VIDEO_AUTH))[0] == 200
    seen = []
    while (item := await asyncio.wait_for(call.read(), 10)) is not grpc.aio.EOF:
        seen.append(item.event)
    assert [e.progress.percent for e in seen[:4]] == [10, 20, 30, 40]
    assert seen[-1].state == job_pb2.JOB_STATE_SUCCEEDED
    assert [e.sequence for e in seen] == sorted(e.sequence for e in seen)


async def test_log_level_filter_maps_to_service(bridge: Any, stub: Any) -> None:
    vid = new_id("v")
    line = {
        "level": "DEBUG",
        "message": "dbg",
        "timestamp": "2023-05-01T12:00:00.250Z",
        "videoId": vid,
    }
    assert (await bridge.post("/api/log", line, headers=VIDEO_AUTH))[0] == 200
    logs = await stub.ListLogs(job_service_pb2.ListLogsRequest(job_id=vid))
    assert [e.level for e in logs.entries] == [log_pb2.LOG_LEVEL_DEBUG]
    status, listed = await bridge.get("/api/log?level=DEBUG&limit=1000", headers=VIDEO_AUTH)
    assert status == 200
    assert {**line} in listed


async def test_log_list_shows_video_lines_only(bridge: Any, stub: Any) -> None:
    """The video worker's API key lists the lines of videos (and its own lines of no
    video), never those an internal service wrote for a Secretary or Batch job."""
    doc = new_id("doc")
    await create_job(stub, job_pb2.JOB_KIND_EXTRACTION, doc)
    secret = log_pb2.LogEntry(job_id=doc, level=log_pb2.LOG_LEVEL_INFO, message=f"iban {doc}")
    await stub.WriteLog(job_service_pb2.WriteLogRequest(entry=secret))
    mine = {"level": "INFO", "message": f"worker {doc}", "timestamp": "2023-05-01T12:00:00Z"}
    assert (await bridge.post("/api/log", mine, headers=VIDEO_AUTH))[0] == 200
    status, listed = await bridge.get("/api/log?limit=1000", headers=VIDEO_AUTH)
    assert status == 200
    messages = [line["message"] for line in listed]
    assert f"worker {doc}" in messages
    assert f"iban {doc}" not in messages


async def test_head_on_pending_claims_nothing(tmp_path: Any) -> None:
    """HEAD must be safe: aiohttp answers HEAD with the GET handler, which claimed the
    oldest video for a response whose body HEAD then dropped (the video sat in
    processing, leased to no one who knew it). HEAD is refused with Allow: GET."""
    async with fresh_stack(tmp_path) as (b, s):
        await create_job(s, job_pb2.JOB_KIND_VIDEO, "12345", video())
        async with b.http.head(b.url + "/api/pending", headers=VIDEO_AUTH) as resp:
            assert resp.status == 405
            assert resp.headers["Allow"] == "GET"
        job = await get_job(s, "12345")
        assert (job.state, job.sequence) == (job_pb2.JOB_STATE_QUEUED, 0)
        status, body = await b.get("/api/pending", headers=VIDEO_AUTH)
        assert (status, body["videoId"]) == (200, "12345")


async def test_an_error_past_the_services_message_limit_fails_the_video_clipped(
    bridge: Any, stub: Any
) -> None:
    """The contract sets no limit on `message`. An `error` report (or an ERROR line)
    quoting a downloader's whole output, past the service's 65,536 characters, was a
    400 and failed nothing: the video stayed processing until its lease ran out and
    went to the next worker. It is stored with its start and its end, as AWS Batch's
    error (the middle said to be left out)."""
    output = "yt-dlp 2024.08.06\n" + "[download] 10.0% of 3.2MiB\n" * 4000 + "ERROR: HTTP 403"
    assert len(output) > 65536
    for how in ("report", "log"):
        vid = new_id("v")
        await create_job(stub, job_pb2.JOB_KIND_VIDEO, vid, video())
        if how == "report":
            body = {"status": "error", "message": output, "videoId": vid}
        else:
            body = {
                "level": "ERROR",
                "message": output,
                "timestamp": "2023-05-01T12:00:00Z",
                "videoId": vid,
            }
        assert await bridge.post(f"/api/{how}", body, headers=VIDEO_AUTH) == (
            200,
            {"success": True},
        ), how
        job = await get_job(stub, vid)
        assert job.state == job_pb2.JOB_STATE_FAILED, how
        message = job.error.message
        assert len(message) <= 65536, how
        assert message.startswith("yt-dlp 2024.08.06") and message.endswith("ERROR: HTTP 403")
        assert "characters left out" in message
    logs = await stub.ListLogs(job_service_pb2.ListLogsRequest(job_id=vid))
    assert [e.message for e in logs.entries] == [message]  # the line as clipped


async def test_empty_optional_times_in_a_report_are_not_given(bridge: Any, stub: Any) -> None:
    """`currentTime`, `totalTime` (optional, for progress only) and `timestamp` sent
    empty, as a worker filling every key does, were a 400 naming required fields that
    were all there: a `success` report was lost and the video stayed processing. An
    empty one is not given, like an empty `videoId` of a log line."""
    vid = new_id("v")
    await create_job(stub, job_pb2.JOB_KIND_VIDEO, vid, video())
    empty = {"currentTime": "", "totalTime": "", "timestamp": ""}
    first = {"status": "progress", "message": "a", "videoId": vid, "percent": 40}
    full = {**first, "currentTime": "00:01:20.000", "totalTime": "00:03:20.000"}
    assert await bridge.post("/api/report", full, headers=VIDEO_AUTH) == (200, {"success": True})
    report = {"status": "progress", "message": "b", "videoId": vid, **empty}
    assert await bridge.post("/api/report", report, headers=VIDEO_AUTH) == (200, {"success": True})
    job = await get_job(stub, vid)
    # Not given: the percent and both times stay (a percent-less report's rule).
    assert (job.progress.message, job.progress.percent) == ("b", 40)
    assert job.progress.media_time.ToMilliseconds() == 80_000
    assert job.progress.media_duration.ToMilliseconds() == 200_000
    done = {"status": "success", "message": "ok", "videoId": vid, **empty}
    assert await bridge.post("/api/report", done, headers=VIDEO_AUTH) == (200, {"success": True})
    assert (await get_job(stub, vid)).state == job_pb2.JOB_STATE_SUCCEEDED


async def test_a_body_over_the_limit_is_413_naming_the_limit(bridge: Any, stub: Any) -> None:
    """The contract has no 413 body: a body past JOBWIRE_MAX_BODY_BYTES got the fixed
    `Faltan campos requeridos: ...`, claiming fields were missing from a body the
    bridge never read. It names the limit, after the Spanish prefix of a request the
    contract has no body for, and stores nothing."""
    vid = new_id("big")
    await create_job(stub, job_pb2.JOB_KIND_VIDEO, vid, video())
    limit = TEST_CONFIG.max_body_bytes
    big = {"level": "INFO", "message": "m" * (2 * limit), "timestamp": "2023-05-01T12:00:00Z"}
    named = {"error": f"Solicitud inválida: request body exceeds {limit} bytes"}
    assert await bridge.post("/api/log", {**big, "videoId": vid}, headers=VIDEO_AUTH) == (
        413,
        named,
    )
    report = {"status": "progress", "videoId": vid, "message": "m" * (2 * limit)}
    assert await bridge.post("/api/report", report, headers=VIDEO_AUTH) == (413, named)
    assert (await get_job(stub, vid)).sequence == 0
    logs = await stub.ListLogs(job_service_pb2.ListLogsRequest(job_id=vid))
    assert list(logs.entries) == []


async def test_empty_log_query_parameters_are_not_given(bridge: Any, stub: Any) -> None:
    """README: an empty optional video field is not given. `GET /api/log?level=` (a
    form's empty select) was a 400 and `?limit=` too; now all levels, the default 50."""
    vid = new_id("q")
    # Other tests share this store and write lines of far later times (the fuzz tests'),
    # and the newest come first: the last instant the bridge takes (2199) stays among them.
    line = {"level": "WARNING", "message": f"w {vid}", "timestamp": "2199-12-31T23:59:59.999Z"}
    assert (await bridge.post("/api/log", {**line, "videoId": vid}, headers=VIDEO_AUTH))[0] == 200
    status, listed = await bridge.get("/api/log?level=&limit=", headers=VIDEO_AUTH)
    assert status == 200 and 0 < len(listed) <= 50
    assert {**line, "videoId": vid} in listed
    assert (200, listed) == await bridge.get("/api/log", headers=VIDEO_AUTH)


async def test_a_leap_second_timestamp_is_taken_as_the_last_instant_of_its_minute(
    bridge: Any, stub: Any
) -> None:
    """RFC 3339 5.6 allows a second of 60 (a leap second): Python's parser refused it,
    so such a log line was a 400 and lost, and such a report too. It is taken as
    23:59:59.999999 of that minute, in its offset."""
    vid = new_id("leap")
    await create_job(stub, job_pb2.JOB_KIND_VIDEO, vid, video())
    line = {"level": "INFO", "message": "leap", "timestamp": "2016-12-31T23:59:60Z"}
    ok = (200, {"success": True})
    assert await bridge.post("/api/log", {**line, "videoId": vid}, headers=VIDEO_AUTH) == ok
    report = {"status": "progress", "videoId": vid, "message": "m", "percent": 5}
    leap = {**report, "timestamp": "2016-12-31T15:59:60.5-08:00"}
    assert await bridge.post("/api/report", leap, headers=VIDEO_AUTH) == ok
    logs = await stub.ListLogs(job_service_pb2.ListLogsRequest(job_id=vid))
    last = datetime(2016, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
    assert [e.time.ToDatetime(tzinfo=UTC) for e in logs.entries] == [last]
    assert (await get_job(stub, vid)).sequence == 1  # the report applied
    for bad in ("2016-12-31T23:59:61Z", "2016-12-31T23:60:00Z"):
        refused = await bridge.post("/api/log", {**line, "timestamp": bad}, headers=VIDEO_AUTH)
        assert refused == (400, LOG_400)
