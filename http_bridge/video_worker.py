"""Video download worker (specs/video-worker-api.es.txt).

`GET /api/pending` claims the oldest queued video (ClaimJob, so two workers never get
the same one), `POST /api/report` reports progress/error/success, `GET`/`POST
/api/log` list and write log lines. Auth: `Authorization: Bearer {API_KEY}`.
Every error body is exactly one of the contract's Spanish `{"error": ...}` bodies.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import pydantic
from aiohttp import web

from jobwire.job_ids import UNKNOWN_JOB
from jobwire.v1 import job_pb2, log_pb2
from jobwire.v1 import job_service_pb2 as svc

from .common import (
    STRICT,
    IsoDateTime,
    bearer_token,
    clip,
    format_timestamp,
    idempotency_key,
    parse_clock,
    parse_json,
    read_body,
    report_event,
    secret_matches,
    senders_key,
    to_timestamp,
    validate,
)
from .edge import check_signature, int_param, text_header
from .errors import BridgeError, RequestProblem, contract_errors, json_response
from .grpc_client import config_of, stub_of

routes = web.RouteTableDef()
CONTRACT = "video"
SIGNED_AS = "video_worker"  # JOBWIRE_SIGNING_SECRET_VIDEO_WORKER
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
MAX_LOG_LIMIT = 1000

NOT_AUTHORIZED = {"error": "No autorizado"}
NO_SUCH_VIDEO = {"error": "El video no existe"}
FAILED = {"error": "Error al procesar la solicitud"}
REPORT_FIELDS = {"error": "Faltan campos requeridos: status, videoId, message"}
LOG_FIELDS = {"error": "Faltan campos requeridos: level, message, timestamp"}

VideoId = Annotated[str, pydantic.StringConstraints(pattern=r"^[A-Za-z0-9._:\-]{1,128}$")]
# No limit in the contract (the body's bounds it): a message past the service's 65,536
# characters is clipped (`clip`), as AWS Batch's error. It was a 400, so a worker's
# `error` report or ERROR line quoting a downloader's whole output failed nothing.
Message = str


def _clock(value: str) -> str:
    parse_clock(value)  # raises ValueError on a bad clock
    return value


Clock = Annotated[
    str,
    pydantic.StringConstraints(pattern=r"^\d{1,3}:[0-5]\d:[0-5]\d(\.\d{1,9})?$"),
    pydantic.AfterValidator(_clock),
]


class Report(pydantic.BaseModel):
    model_config = STRICT

    status: Literal["progress", "error", "success"]
    message: Message
    videoId: VideoId
    # Optional: "" is not given (a worker filling every key sends it), not a bad value:
    # it was a 400 naming required fields that were all there, and a `success` was lost.
    timestamp: IsoDateTime | Literal[""] | None = None
    currentTime: Clock | Literal[""] | None = None
    totalTime: Clock | Literal[""] | None = None
    percent: Annotated[float, pydantic.Field(ge=0, le=100, allow_inf_nan=False)] | None = None


class LogLine(pydantic.BaseModel):
    model_config = STRICT

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"]
    # Not empty: the service refuses an empty log line (WriteLog), so say it here too.
    message: Annotated[Message, pydantic.StringConstraints(min_length=1)]
    timestamp: IsoDateTime
    # Optional ("si no se proporciona se usa UNKNOWN"): "" is not given, not a bad id
    # (it was a 400, and the line was lost).
    videoId: VideoId | Literal[""] | None = None


class PendingVideo(pydantic.BaseModel):
    videoUrl: str
    videoId: str
    playlist: str
    title: str
    subtitle: str


class LogItem(pydantic.BaseModel):
    level: str
    message: str
    timestamp: str
    videoId: str


class VideoSuccess(pydantic.BaseModel):
    success: Literal[True]


class VideoError(pydantic.BaseModel):
    error: str


def render(missing_fields_body: dict[str, str]) -> Any:
    def render_error(err: BridgeError) -> dict[str, str]:
        if isinstance(err, RequestProblem):  # a header, the body's encoding: named
            return {"error": f"Solicitud inválida: {err.message}"}
        if err.status == 401:
            return NOT_AUTHORIZED
        if err.status == 404:
            return NO_SUCH_VIDEO
        if err.status == 413:
            # The contract has no 413 body, and its 400 one says fields are missing
            # from a body that was never read: name the limit, as other causes are.
            return {"error": f"Solicitud inválida: {err.message}"}
        if err.status == 400:
            return missing_fields_body
        if err.status == 409:
            return {"error": "El video ya está finalizado"}
        return FAILED

    return render_error


def authorize(request: web.Request) -> None:
    if not secret_matches(bearer_token(request), config_of(request).api_key):
        raise BridgeError(401, "unauthenticated")


def check_level(data: object) -> None:
    """A level the contract does not list is named: the contract's one 400 body for a
    log line says fields are missing, and the level was there. The contract lists its
    levels in capitals ("INFO | ERROR | WARNING", and an ERROR line fails its video), so
    `info` is not taken but said to need capitals. No level at all is a missing field."""
    level = data.get("level") if isinstance(data, dict) else None
    if level is None or level in LEVELS:
        return
    if isinstance(level, str) and level.upper() in LEVELS:
        # Not echoed: "ınfo" (dotless i) is one too.
        raise RequestProblem(f"level must be written in capitals ({level.upper()!r})")
    raise RequestProblem(f"level must be one of {', '.join(LEVELS)}")


def to_event(report: Report) -> svc.ReportEventRequest:
    # kind: the API key reaches only videos; any other job is "El video no existe".
    event = svc.ReportEventRequest(job_id=report.videoId, kind=job_pb2.JOB_KIND_VIDEO)
    if report.timestamp:
        event.event_time.CopyFrom(to_timestamp(report.timestamp))
    if report.status == "progress":
        progress = event.progress
        progress.SetInParent()  # a progress report even with an empty message
        progress.message = clip(report.message)
        # Each time is optional: one not sent stays the video's, percent or not.
        event.keep_media_times = True
        if report.percent is None:
            # Optional, like the times: the service keeps the video's percent (or
            # derives it from the times) in the event's own write.
            event.percent_not_given = True
        else:
            progress.percent = report.percent
        if report.currentTime:
            progress.media_time.CopyFrom(parse_clock(report.currentTime))
        if report.totalTime:
            progress.media_duration.CopyFrom(parse_clock(report.totalTime))
    elif report.status == "success":
        event.completed.message = clip(report.message)
    else:
        event.failed.code = "VIDEO_ERROR"
        event.failed.message = clip(report.message)
    return event


# No HEAD: it would run the claim and drop the video it hands out (405, Allow: GET).
@routes.get("/api/pending", allow_head=False)
@contract_errors(render(REPORT_FIELDS), credential=bearer_token)
async def pending(request: web.Request) -> web.StreamResponse:
    authorize(request)
    check_signature(request, SIGNED_AS)
    worker = text_header(request, "X-Worker", 128) or (request.remote or "")
    claim = await stub_of(request).ClaimJob(
        svc.ClaimJobRequest(kind=job_pb2.JOB_KIND_VIDEO, worker_id=worker[:128]),
        timeout=config_of(request).rpc_timeout_seconds,
    )
    if not claim.HasField("job"):
        return web.Response(status=204)
    job = claim.job
    return json_response(
        {
            "videoUrl": job.video.url,
            "videoId": job.id,
            "playlist": job.video.playlist,
            "title": job.video.title,
            "subtitle": job.video.subtitle,
        }
    )


@routes.post("/api/report")
@contract_errors(render(REPORT_FIELDS), credential=bearer_token)
async def report(request: web.Request) -> web.StreamResponse:
    authorize(request)
    body = await read_body(request, config_of(request).max_body_bytes)
    check_signature(request, SIGNED_AS, body.data)
    parsed = validate(Report, parse_json(body.data))
    event = to_event(parsed)
    event.idempotency_key = idempotency_key(request, CONTRACT, parsed.videoId, body)
    await report_event(request, event)
    return json_response({"success": True})


@routes.post("/api/log")
@contract_errors(render(LOG_FIELDS), credential=bearer_token)
async def write_log(request: web.Request) -> web.StreamResponse:
    authorize(request)
    body = await read_body(request, config_of(request).max_body_bytes)
    check_signature(request, SIGNED_AS, body.data)
    data = parse_json(body.data)
    check_level(data)
    line = validate(LogLine, data)
    entry = log_pb2.LogEntry(
        job_id=line.videoId or UNKNOWN_JOB,
        level=log_pb2.LogLevel.Value(f"LOG_LEVEL_{line.level}"),
        message=clip(line.message),
    )
    entry.time.CopyFrom(to_timestamp(line.timestamp))
    # Only a key the worker sends, not a digest of the body as for reports: two lines
    # alike to the byte (a message repeated within the timestamp's second) are two
    # lines, not a retry.
    key = senders_key(request, f"{CONTRACT}-log")
    # An ERROR line fails a pending or processing video, never a job of another kind.
    await stub_of(request).WriteLog(
        svc.WriteLogRequest(entry=entry, kind=job_pb2.JOB_KIND_VIDEO, idempotency_key=key),
        timeout=config_of(request).rpc_timeout_seconds,
    )
    return json_response({"success": True})


def render_query_error(err: BridgeError) -> dict[str, str]:
    if err.status == 400 and not isinstance(err, RequestProblem):
        # The message names the parameter and its range.
        return {"error": f"Parámetros inválidos: {err.message}"}
    return render(REPORT_FIELDS)(err)  # type: ignore[no-any-return]


@routes.get("/api/log")
@contract_errors(render_query_error, credential=bearer_token)
async def list_logs(request: web.Request) -> web.StreamResponse:
    authorize(request)
    check_signature(request, SIGNED_AS)
    # Empty is not given, as the contract's other optional fields (README): a form's
    # empty `?level=&limit=` was a 400.
    empty = request.query.get("limit") == ""
    limit = 50 if empty else int_param(request, "limit", 1, MAX_LOG_LIMIT, default=50) or 50
    given_level = request.query.get("level") or None
    if given_level is not None and given_level not in LEVELS:
        raise BridgeError(400, f"level must be one of {', '.join(LEVELS)}")
    level = log_pb2.LogLevel.Value(f"LOG_LEVEL_{given_level or 'UNSPECIFIED'}")
    response = await stub_of(request).ListLogs(
        # Video lines only: the API key must not read the lines of other kinds' jobs.
        svc.ListLogsRequest(level=level, limit=limit, kind=job_pb2.JOB_KIND_VIDEO),
        timeout=config_of(request).rpc_timeout_seconds,
    )
    return json_response(
        [
            {
                "level": log_pb2.LogLevel.Name(e.level).removeprefix("LOG_LEVEL_"),
                "message": e.message,
                "timestamp": format_timestamp(e.time),
                "videoId": e.job_id,
            }
            for e in response.entries
        ]
    )
