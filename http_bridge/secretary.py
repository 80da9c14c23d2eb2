"""Secretary extraction worker (specs/secretary-jobs-callback.de.md).

`POST /api/external/jobs/{jobId}`: progress, final (`phase: completed`) and failed
events. A final event's large fields become artifacts - extracted_text.md, the images
ZIP, metadata.json - uploaded BEFORE the completed event that references them, so a
completed job never points at a missing artifact. `GET /api/external/jobs/{jobId}`
returns status, logs, result and processId; `GET .../artifacts/{name}` downloads one.

Auth: the per-job callback token (`Authorization: Bearer` or `X-Callback-Token`),
checked by the service against its stored hash; a token in the query is refused.
Memory: the body is read once and parsed once; base64 is decoded in slices while it
streams to the service, so no second full copy of a large ZIP is ever held.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
import secrets
import unicodedata
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

import grpc
import orjson
import pydantic
from aiohttp import web
from google.protobuf import json_format, struct_pb2

from jobwire.v1 import event_pb2, job_pb2
from jobwire.v1 import job_service_pb2 as svc

from .common import (
    STRICT,
    clip,
    decoded_length,
    format_timestamp,
    header_token,
    idempotency_key,
    parse_json,
    read_body,
    report_event,
    secret_matches,
    validate,
    whole_numbers,
)
from .edge import awaits_continue, check_signature, int_param, json_depth
from .errors import BridgeError, contract_errors, json_response
from .grpc_client import config_of, stub_of

log = logging.getLogger(__name__)
routes = web.RouteTableDef()
CONTRACT = "secretary"
JOB_PATH = "/api/external/jobs/{jobId}"
ARTIFACT_PATH = "/api/external/jobs/{jobId}/artifacts/{name}"

CHUNK = 1024 * 1024  # bytes per UploadArtifact data message (gRPC limit is 4 MiB)
B64_SLICE = CHUNK // 3 * 4  # base64 chars decoding to <= 1 MiB; a multiple of 4
TEXT_SLICE = CHUNK // 4  # characters encoding to <= 1 MiB of UTF-8
SMALL_METADATA = 64 * 1024  # metadata up to this size is also kept on the job's result
# A query parameter whose name holds one of these (without case, `_` or `-`) is refused:
# `callbackToken`, `api_token`, `X-API-Key`, `client_secret`. An exact list of names let
# `api_token` and `auth_token` through. The contracts' own parameters (`limit`,
# `level`) hold none.
QUERY_TOKEN_WORDS = ("token", "secret", "key", "auth", "bearer", "passw", "credential")
_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_ARTIFACT = re.compile(r"[A-Za-z0-9._\-]{1,255}")
_WHITESPACE = str.maketrans("", "", " \r\n\t")

TEXT_ARTIFACT = "extracted_text.md"
IMAGES_ARTIFACT = "images.zip"
METADATA_ARTIFACT = "metadata.json"

STATUS = {
    job_pb2.JOB_STATE_QUEUED: "queued",
    job_pb2.JOB_STATE_RUNNING: "running",
    job_pb2.JOB_STATE_SUCCEEDED: "completed",
    job_pb2.JOB_STATE_FAILED: "failed",
    job_pb2.JOB_STATE_CANCELLED: "cancelled",
}
EVENT_PHASE = {
    event_pb2.EVENT_TYPE_COMPLETED: "completed",
    event_pb2.EVENT_TYPE_FAILED: "failed",
    event_pb2.EVENT_TYPE_CANCELLED: "cancelled",
    event_pb2.EVENT_TYPE_CLAIMED: "claimed",
    event_pb2.EVENT_TYPE_REQUEUED: "requeued",
    event_pb2.EVENT_TYPE_STALLED: "stalled",  # past its progress deadline (was "unknown")
}
TERMINAL = (job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_FAILED, job_pb2.JOB_STATE_CANCELLED)

SHORT = 4096
Short = Annotated[str, pydantic.StringConstraints(max_length=SHORT)]


class Process(pydantic.BaseModel):
    model_config = STRICT
    id: Annotated[str, pydantic.StringConstraints(max_length=256)] | None = None


class ProgressEvent(pydantic.BaseModel):
    model_config = STRICT

    # `completed` and `failed` make the body a final or failed event (callback): as a
    # progress phase the document took them, and `{"phase": "failed", "progress": 5}`
    # was answered 400 for the failed event's missing `error`.
    phase: Annotated[
        str,
        pydantic.StringConstraints(min_length=1, max_length=128),
        pydantic.Field(json_schema_extra={"not": {"enum": ["completed", "failed"]}}),
    ]
    progress: Annotated[float, pydantic.Field(ge=0, le=100, allow_inf_nan=False)]
    message: Short | None = None
    process: Process | None = None


def _one_of_text_or_archive(schema: dict[str, Any]) -> None:
    # What final_fields requires, stated in the document: a non-empty text or archive.
    schema["anyOf"] = [
        {"required": [name], "properties": {name: {"type": "string", "minLength": 1}}}
        for name in ("extracted_text", "images_archive_data")
    ]


class FinalData(pydantic.BaseModel):
    """Documents the final event; the handler checks it by hand (see `final_fields`)
    because a pydantic pass over tens of MB of text would cost time and memory."""

    model_config = pydantic.ConfigDict(json_schema_extra=_one_of_text_or_archive)

    extracted_text: str | None = None
    images_archive_data: (
        Annotated[str, pydantic.Field(json_schema_extra={"contentEncoding": "base64"})] | None
    ) = None
    images_archive_filename: (
        Annotated[
            str,
            pydantic.Field(
                description="any name: the archive is stored under its safe form, each"
                " character outside [A-Za-z0-9._-] as _ (images.zip when none is left)"
            ),
        ]
        | None
    ) = None
    metadata: dict[str, Any] | None = None


class FinalEvent(pydantic.BaseModel):
    phase: Literal["completed"]
    message: (
        Annotated[str, pydantic.Field(description=f"short: past {SHORT} characters stored clipped")]
        | None
    ) = None
    data: FinalData


class ErrorInfo(pydantic.BaseModel):
    model_config = STRICT

    code: Annotated[str, pydantic.StringConstraints(min_length=1, max_length=256)]
    # No limit in the contract: clipped to the service's (`clip`), as AWS Batch's error.
    # Past 65,536 characters (a traceback) it was a 400 the worker could not fix.
    message: str
    details: dict[str, Any] | None = None


class FailedEvent(pydantic.BaseModel):
    model_config = STRICT

    phase: Literal["failed"]
    error: ErrorInfo
    # Not stored (error.message is the failure's text); past 4,096 characters it made
    # the failure a 400, and the job stayed running.
    message: str | None = None


class SecretaryAck(pydantic.BaseModel):
    status: Literal["ok"]
    kind: Literal["progress", "final", "failed"]
    jobId: str


class SecretaryError(pydantic.BaseModel):
    status: Literal["error"]
    error: str


def render_error(err: BridgeError) -> dict[str, str]:
    message = err.message if err.status < 500 else "service unavailable, retry with backoff"
    return {"status": "error", "error": message}


def job_id_and_token(request: web.Request) -> tuple[str, str]:
    token = header_token(request)
    # raw_path holds the query as sent: most requests have none, so skip parsing it.
    if "?" in request.raw_path and token_in_query(request, token):
        raise BridgeError(400, "tokens in the query string are not accepted")
    job_id = request.match_info["jobId"]
    if not _ID.fullmatch(job_id):
        raise BridgeError(404, f"job {job_id[:64]!r} not found")
    if not token:
        raise BridgeError(401, "callback token required (Authorization: Bearer)")
    return job_id, token


def _token_first(request: web.Request, usual: int) -> bool:
    """Whether the job's token is checked before the body is read: a body still to come
    that may be past `usual` bytes, or one the client holds back until a `100 Continue`
    (any size: a wrong token was invited to send it, then got its 401)."""
    if request.content.is_eof():
        return False
    length = decoded_length(request)
    return length is None or length > usual or awaits_continue(request)


def token_in_query(request: web.Request, token: str) -> bool:
    """A parameter named like a token, or one holding the header's token (any name)."""
    for name, value in request.query.items():
        plain = name.lower().replace("_", "").replace("-", "")
        if any(word in plain for word in QUERY_TOKEN_WORDS):
            return True
        if token and secret_matches(value, token):
            return True
    return False


def ack(kind: str, job_id: str) -> web.Response:
    return json_response({"status": "ok", "kind": kind, "jobId": job_id})


@routes.post(JOB_PATH)
@contract_errors(render_error, credential=header_token)
async def callback(request: web.Request) -> web.StreamResponse:
    job_id, token = job_id_and_token(request)
    config = config_of(request)
    if _token_first(request, config.max_body_bytes):
        # Anyone can send some token: the bridge read and parsed up to 256 MiB for it
        # before the service said 401 (100 MiB took it from 80 to 387 MB). A body past
        # the usual limit is read only for the job's own token (a callback of the usual
        # size, whole in its first segment, skips this call).
        await stub_of(request).GetJob(
            svc.GetJobRequest(id=job_id, callback_token=token), timeout=config.rpc_timeout_seconds
        )
    body = await read_body(request, config.max_final_body_bytes)
    check_signature(request, "secretary", body.data)
    data, archive = parse_body(body.data)
    if not isinstance(data, dict):
        raise BridgeError(400, "body must be a JSON object")
    phase = data.get("phase")
    key = idempotency_key(request, CONTRACT, job_id, body)
    del body  # from here on only `data` and the archive's view of the buffer remain
    if phase == "completed":
        try:
            await final(request, job_id, token, key, data, archive)
        finally:
            if archive is not None:
                archive.release()
        return ack("final", job_id)
    if phase == "failed":
        failed = validate(FailedEvent, data)
        if failed.error.details and not json_depth(failed.error.details):
            raise BridgeError(400, "error.details: nested too deeply (32 levels at most)")
        event = svc.ReportEventRequest(job_id=job_id, idempotency_key=key, callback_token=token)
        event.failed.code = failed.error.code
        event.failed.message = clip(failed.error.message)
        if failed.error.details:
            event.failed.details.update(failed.error.details)
        await report_event(request, event)
        return ack("failed", job_id)
    progress = validate(ProgressEvent, data)
    event = svc.ReportEventRequest(job_id=job_id, idempotency_key=key, callback_token=token)
    event.progress.phase = progress.phase
    event.progress.percent = progress.progress
    event.progress.message = progress.message or ""
    if progress.process and progress.process.id:
        event.process_id = progress.process.id
    await report_event(request, event)
    return ack("progress", job_id)


_ARCHIVE_KEY = re.compile(rb'"images_archive_data"\s*:\s*"')
LARGE_FIELD = 64 * 1024


def parse_body(raw: bytes | bytearray) -> tuple[Any, memoryview | None]:
    """Parses the body once; a large `images_archive_data` is left in the raw buffer.

    orjson briefly needs two copies of a string it builds, which for a 100 MiB ZIP
    would triple the body in memory. Base64 never needs JSON escapes, so its value is
    located in the raw bytes, swapped for a sentinel in the (small) rest that orjson
    parses, and later decoded straight from the buffer. Anything unusual (escapes, the
    key found somewhere else) falls back to parsing the whole body.
    """
    best: tuple[int, int] | None = None
    for match in _ARCHIVE_KEY.finditer(raw):
        start = match.end()
        end = raw.find(b'"', start)
        if end > 0 and (best is None or end - start > best[1] - best[0]):
            best = (start, end)
    if best is None or best[1] - best[0] < LARGE_FIELD or raw.find(b"\\", *best) != -1:
        return parse_json(raw), None
    start, end = best
    # A fresh sentinel: a fixed one could be sent as the field's value while the key
    # found is in the metadata, and that value became the archive (a body's own
    # placeholder swapped its ZIP and its metadata).
    mark = secrets.token_hex(16)
    rest = raw[:start] + b"\\u0000jobwire:" + mark.encode() + raw[end:]
    data = parse_json(rest)
    del rest
    payload = data.get("data") if isinstance(data, dict) else None
    if not isinstance(payload, dict) or payload.get("images_archive_data") != f"\x00jobwire:{mark}":
        return parse_json(raw), None
    del payload["images_archive_data"]
    return data, memoryview(raw)[start:end]


def final_fields(data: dict[str, Any], has_archive: bool) -> dict[str, Any]:
    """Checks the final event by hand; returns `data.data` (the caller pops from it)."""
    payload = data.get("data")
    if not isinstance(payload, dict):
        raise BridgeError(400, "data: an object is required for phase completed")
    for name in ("extracted_text", "images_archive_data", "images_archive_filename"):
        if payload.get(name) is not None and not isinstance(payload[name], str):
            raise BridgeError(400, f"data.{name}: must be a string")
    if (
        not payload.get("extracted_text")
        and not payload.get("images_archive_data")
        and not has_archive
    ):
        raise BridgeError(400, "data: extracted_text or images_archive_data is required")
    if payload.get("metadata") is not None and not isinstance(payload["metadata"], dict):
        raise BridgeError(400, "data.metadata: must be an object")
    if payload.get("metadata") and not json_depth(payload["metadata"]):
        raise BridgeError(400, "data.metadata: nested too deeply (32 levels at most)")
    if data.get("message") is not None and not isinstance(data["message"], str):
        raise BridgeError(400, "message: must be a string")
    return payload


_UNSAFE = re.compile(r"[^A-Za-z0-9._\-]")


def archive_name(given: str) -> str:
    """The artifact name of the images ZIP: the worker's file name in a safe form.
    The contract allows any name, and one with a space or an umlaut (a PDF's own
    name) made the whole final event a 400: text and archive lost, a payload the
    worker could not fix. Accents are dropped (Ü as U), other characters become `_`."""
    decomposed = unicodedata.normalize("NFKD", given)
    plain = "".join(c for c in decomposed if not unicodedata.combining(c))
    name = _UNSAFE.sub("_", plain)[-255:]  # the end keeps the extension
    if name in ("", ".", "..", TEXT_ARTIFACT, METADATA_ARTIFACT):
        return IMAGES_ARTIFACT  # none left, or it would replace the text or the metadata
    return name


Base64 = str | bytes | memoryview
_WHITESPACE_BYTES = re.compile(rb"[ \r\n\t]")


def clean_base64(value: Base64) -> Base64:
    """Validates the base64 text slice by slice before anything is written."""
    if isinstance(value, str):
        if any(c in value for c in " \r\n\t"):
            value = value.translate(_WHITESPACE)  # MIME-style line breaks: one extra copy
    elif _WHITESPACE_BYTES.search(value):
        value = bytes(value).translate(None, b" \r\n\t")
    if len(value) % 4:
        raise BridgeError(400, "data.images_archive_data: invalid base64 length")
    invalid = BridgeError(400, "data.images_archive_data: invalid base64")
    last = len(value) - B64_SLICE  # slices starting after this are the last one
    try:
        for start in range(0, len(value), B64_SLICE):
            piece = value[start : start + B64_SLICE]
            binascii.a2b_base64(piece, strict_mode=True)
            # Padding closes the whole text only: a slice ending in `=` with more to
            # come passed on its own, and was refused at upload as "cut off".
            if start < last and _ends_padded(piece):
                raise invalid
    except (binascii.Error, ValueError):  # ValueError: non-ASCII characters
        raise invalid from None
    return value


def _ends_padded(piece: Base64) -> bool:
    return piece[-1] == ("=" if isinstance(piece, str) else ord("="))


async def final(
    request: web.Request,
    job_id: str,
    token: str,
    key: str,
    data: dict[str, Any],
    raw_archive: memoryview | None,
) -> None:
    payload = final_fields(data, raw_archive is not None)
    text: str | None = payload.pop("extracted_text", None) or None
    archive: Base64 | None = raw_archive if raw_archive is not None else None
    archive = archive or payload.pop("images_archive_data", None) or None
    if archive is not None:
        archive = clean_base64(archive)
    metadata: dict[str, Any] | None = payload.get("metadata")
    # Short, as the document says, but clipped rather than refused: a 400 lost the
    # extracted text over a note beside it, a payload the worker could not fix.
    result = job_pb2.Result(message=clip(data.get("message") or "", SHORT))
    stub, timeout = stub_of(request), config_of(request).rpc_timeout_seconds
    # Fail fast (404/401) before moving megabytes, and never replace the artifacts of
    # a job that already ended: its final event is then only a (duplicate) report.
    job = await stub.GetJob(svc.GetJobRequest(id=job_id, callback_token=token), timeout=timeout)
    if job.state not in TERMINAL:
        store = Uploader(request, job_id, token)
        if text is not None:
            size = utf8_size(text)
            chunks = text_chunks(text)
            del text  # the generator holds the only reference; slices are freed as sent
            result.artifacts.append(
                await store.upload(TEXT_ARTIFACT, "text/markdown", chunks, size)
            )
        if archive is not None:
            name = archive_name(payload.get("images_archive_filename") or "")
            size = base64_size(archive)
            chunks = base64_chunks(archive)
            del archive
            result.artifacts.append(await store.upload(name, "application/zip", chunks, size))
        if metadata is not None:
            raw = orjson.dumps(metadata)
            result.artifacts.append(
                await store.upload(
                    METADATA_ARTIFACT, "application/json", bytes_chunks(raw), len(raw)
                )
            )
            if len(raw) <= SMALL_METADATA:
                result.metadata.update(metadata)
    event = svc.ReportEventRequest(job_id=job_id, idempotency_key=key, callback_token=token)
    event.completed.CopyFrom(result)
    await report_event(request, event)


async def text_chunks(text: str) -> AsyncIterator[bytes]:
    for start in range(0, len(text), TEXT_SLICE):
        yield text[start : start + TEXT_SLICE].encode("utf-8")


async def base64_chunks(value: Base64) -> AsyncIterator[bytes]:
    for start in range(0, len(value), B64_SLICE):
        yield base64.b64decode(value[start : start + B64_SLICE])


def utf8_size(text: str) -> int:
    """The UTF-8 length of `text`, encoded slice by slice (no second whole copy)."""
    if text.isascii():
        return len(text)
    return sum(
        len(text[start : start + TEXT_SLICE].encode("utf-8"))
        for start in range(0, len(text), TEXT_SLICE)
    )


def base64_size(value: Base64) -> int:
    """The decoded length of `value`, strict base64 as `clean_base64` returns it."""
    tail = bytes(value[-2:], "ascii") if isinstance(value, str) else bytes(value[-2:])
    return len(value) // 4 * 3 - tail.count(b"=")


async def bytes_chunks(raw: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(raw), CHUNK):
        yield raw[start : start + CHUNK]


class Uploader:
    """Streams artifacts of one job to UploadArtifact: a header, then <= 1 MiB chunks."""

    def __init__(self, request: web.Request, job_id: str, token: str) -> None:
        self.stub = stub_of(request)
        # Uploads of hundreds of MB need more than a unary deadline.
        self.timeout = config_of(request).rpc_timeout_seconds * 10
        self.job_id = job_id
        self.token = token

    async def upload(
        self, name: str, content_type: str, chunks: AsyncIterator[bytes], size: int
    ) -> job_pb2.ArtifactRef:
        # The size declared: if this upload is cut off (the bridge stopping, its
        # request cancelled), the service refuses it rather than store the part.
        header = svc.ArtifactHeader(
            job_id=self.job_id,
            name=name,
            content_type=content_type,
            callback_token=self.token,
            size=size,
        )

        async def messages() -> AsyncIterator[svc.UploadArtifactRequest]:
            yield svc.UploadArtifactRequest(header=header)
            async for chunk in chunks:
                yield svc.UploadArtifactRequest(data=chunk)

        artifact = await self.stub.UploadArtifact(messages(), timeout=self.timeout)
        return job_pb2.ArtifactRef(
            name=artifact.name,
            size_bytes=artifact.size_bytes,
            content_type=artifact.content_type,
            sha256=artifact.sha256,
        )


MAX_POLL_LIMIT = 10_000


def artifact_url(request: web.Request, job_id: str, name: str) -> str:
    return f"{config_of(request).public_url}/api/external/jobs/{job_id}/artifacts/{name}"


def struct_dict(value: struct_pb2.Struct) -> dict[str, Any]:
    """As the worker sent it: its whole numbers came back as 1.0 (a Struct's doubles)."""
    return dict(whole_numbers(json_format.MessageToDict(value)))


@routes.get(JOB_PATH)
@contract_errors(render_error, credential=header_token)
async def poll(request: web.Request) -> web.StreamResponse:
    job_id, token = job_id_and_token(request)
    check_signature(request, "secretary")
    limit = int_param(request, "limit", 1, MAX_POLL_LIMIT)
    stub, timeout = stub_of(request), config_of(request).rpc_timeout_seconds
    job = await stub.GetJob(svc.GetJobRequest(id=job_id, callback_token=token), timeout=timeout)
    listed = await stub.ListJobEvents(
        svc.ListJobEventsRequest(job_id=job_id, callback_token=token), timeout=timeout
    )
    events = list(listed.events)
    if limit is not None:
        events = events[-limit:]
    result = None
    if job.state == job_pb2.JOB_STATE_SUCCEEDED:
        result = {
            "message": job.result.message or None,
            "artifacts": [
                {
                    "name": a.name,
                    "contentType": a.content_type,
                    "sizeBytes": a.size_bytes,
                    "sha256": a.sha256,
                    "url": artifact_url(request, job_id, a.name),
                }
                for a in job.result.artifacts
            ],
            "metadata": (
                struct_dict(job.result.metadata) if job.result.HasField("metadata") else None
            ),
        }
    error = None
    if job.HasField("error"):
        error = {
            "code": job.error.code,
            "message": job.error.message,
            "details": struct_dict(job.error.details) if job.error.HasField("details") else None,
        }
    return json_response(
        {
            "jobId": job.id,
            "status": STATUS.get(job.state, "queued"),
            "progress": job.progress.percent if job.HasField("progress") else None,
            "phase": poll_phase(job),
            "logs": [log_item(e) for e in events],
            "result": result,
            "error": error,
            "processId": job.process_id or None,
            "updatedAt": format_timestamp(job.update_time),
        }
    )


def poll_phase(job: job_pb2.Job) -> str | None:
    """An ended job's phase is how it ended, as the worker's own final said it
    (`completed`, `failed`; `cancelled` for a cancel): the last progress phase
    (`finalizing`) beside status `completed` read as still at work."""
    if job.state in TERMINAL:
        return STATUS[job.state]
    return job.progress.phase or None if job.HasField("progress") else None


def log_item(event: event_pb2.JobEvent) -> dict[str, Any]:
    progress: float | None
    if event.type == event_pb2.EVENT_TYPE_PROGRESS:
        phase, progress = event.progress.phase, event.progress.percent
        message = event.progress.message
    else:
        phase = EVENT_PHASE.get(event.type, "unknown")
        progress = 100.0 if event.type == event_pb2.EVENT_TYPE_COMPLETED else None
        message = event.error.message if event.HasField("error") else event.result.message
    return {
        "timestamp": format_timestamp(event.create_time),
        "phase": phase,
        "progress": progress,
        "message": message or None,
    }


@routes.get(ARTIFACT_PATH)
@contract_errors(render_error, credential=header_token)
async def download(request: web.Request) -> web.StreamResponse:
    job_id, token = job_id_and_token(request)
    check_signature(request, "secretary")
    name = request.match_info["name"]
    if not _ARTIFACT.fullmatch(name):
        raise BridgeError(404, f"artifact {name[:64]!r} not found")
    call = stub_of(request).ReadArtifact(
        svc.ReadArtifactRequest(job_id=job_id, name=name, callback_token=token),
        timeout=config_of(request).rpc_timeout_seconds * 10,
    )
    first: Any = await call.read()  # an error (404/401/503) surfaces here, before any byte
    if first is grpc.aio.EOF or first.WhichOneof("part") != "artifact":
        raise BridgeError(500, "artifact stream did not start with its metadata")
    content_type = first.artifact.content_type
    if not (content_type.isascii() and content_type.isprintable()):
        content_type = ""  # stored before the service checked them: no header carries it
    response = web.StreamResponse(
        headers={
            "Content-Type": content_type or "application/octet-stream",
            "Content-Disposition": f'attachment; filename="{name}"',
            "X-Content-SHA256": first.artifact.sha256,
            "X-Content-Type-Options": "nosniff",
        }
    )
    response.content_length = first.artifact.size_bytes
    await response.prepare(request)
    if request.method == "HEAD":
        # Headers only: aiohttp sends whatever is written, and bytes after a HEAD's
        # head were read by a kept-alive client as the start of its next response.
        call.cancel()
        await response.write_eof()
        return response
    try:
        message: Any
        while (message := await call.read()) is not grpc.aio.EOF:
            await response.write(message.data)
    except grpc.aio.AioRpcError as exc:
        # Headers are gone: cut the connection so the client sees a short body.
        log.warning("artifact %s/%s broke off: %s", job_id, name, exc.code().name)
        if request.transport is not None:
            request.transport.close()
        return response
    except ConnectionError:
        # The client went away mid-download (its own timeout, a cancelled fetch): the
        # answer was a 200 and stays one, not an 'unexpected error' 500 in the log and
        # the 5xx alert; the service's stream is ended rather than left to run on.
        call.cancel()
        log.info("artifact %s/%s: the client closed the connection", job_id, name)
        return response
    await response.write_eof()
    return response
