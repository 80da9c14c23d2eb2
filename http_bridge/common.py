"""Request plumbing every contract shares: bounded body reads, JSON + pydantic
validation, secrets, idempotency keys and time conversions."""

from __future__ import annotations

import hashlib
import hmac
import re
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

import grpc
import orjson
import pydantic
from aiohttp import web
from google.protobuf import duration_pb2, timestamp_pb2

from jobwire.v1 import job_pb2
from jobwire.v1 import job_service_pb2 as svc

from .coalescer import MAX_EVENT_BYTES
from .content_coding import BodyDecoder, codings
from .edge import BodyClock, send_continue, text_header, token_text, webhook_id
from .errors import BridgeError, RequestProblem, RpcFailed
from .grpc_client import COALESCER, CONFIG, STUB

M = TypeVar("M", bound=pydantic.BaseModel)

STRICT = pydantic.ConfigDict(strict=True, extra="ignore", frozen=True)
MIN_TIME = datetime(1970, 1, 1, tzinfo=UTC)
MAX_TIME = datetime(2200, 1, 1, tzinfo=UTC)


class Body:
    """A request body read once; `digest` is its SHA-256, computed while reading."""

    __slots__ = ("data", "digest")

    def __init__(self, data: bytes | bytearray, digest: bytes) -> None:
        self.data = data
        self.digest = digest


def decoded_length(request: web.Request) -> int | None:
    """The body's size as read, when the head says it: its Content-Length counts the
    encoded bytes of a body with a Content-Encoding, so it says nothing then."""
    coding = request.headers.get("Content-Encoding", "identity").strip().lower()
    return request.content_length if coding in ("", "identity") else None


async def read_body(request: web.Request, limit: int) -> Body:
    """Reads at most `limit` bytes (413 beyond it) into a buffer that grows as they
    arrive, its Content-Encoding undone (415 for one the bridge does not decode)."""
    applied = codings(request)
    decoder = BodyDecoder(applied, limit) if applied else None
    length = decoded_length(request)
    if length is not None and length > limit:
        raise BridgeError(413, f"request body exceeds {limit} bytes")
    content = request.content
    if content.is_eof():
        # The whole body has arrived (the usual small callback, in its head's segment):
        # taken in one piece, with no clock, buffer copy or incremental hash.
        data = content.read_nowait()
        if decoder is not None:
            data = decoder.feed(data)
            decoder.finish()
        if len(data) > limit:
            raise BridgeError(413, f"request body exceeds {limit} bytes")
        if length is not None and len(data) < length:
            raise BridgeError(400, "request body shorter than Content-Length")
        return Body(data, hashlib.sha256(data).digest())
    await send_continue(request)  # the handler's checks passed: now the body is wanted
    hasher = hashlib.sha256()
    clock = BodyClock(request.app[CONFIG])  # 408 for a body that trickles in
    # The buffer grows with what arrives (large ones by realloc, without copies). It
    # was allocated at the announced size up front: a client announcing 256 MiB and
    # sending nothing held 256 MiB for the body's deadline, per connection.
    most = limit if length is None else length
    buf = bytearray()
    try:
        while chunk := await clock.read(request):
            if decoder is not None:
                chunk = decoder.feed(chunk)
            if len(buf) + len(chunk) > most:
                if length is None:
                    raise BridgeError(413, f"request body exceeds {limit} bytes")
                chunk = chunk[: length - len(buf)]
            buf += chunk
            hasher.update(chunk)
            if len(buf) == length:
                break
    except BaseException:
        # A body cut off (408, 413, the client gone): its bytes go now. The exception's
        # traceback keeps this frame, in a cycle through the request, until a full
        # garbage collection, which an idle bridge may not run for hours.
        buf = bytearray()
        raise
    if decoder is not None:
        decoder.finish()
    if length is not None and len(buf) < length:
        raise BridgeError(400, "request body shorter than Content-Length")
    return Body(buf, hasher.digest())


_BOM = b"\xef\xbb\xbf"


def parse_json(data: bytes | bytearray) -> Any:
    # RFC 8259 8.1: a parser may ignore a leading BOM, and some writers add one.
    view = memoryview(data)[3:] if data[:3] == _BOM else data
    try:
        return orjson.loads(view)
    except orjson.JSONDecodeError as exc:
        raise BridgeError(400, f"malformed JSON: {exc.msg}") from None


def validate(model: type[M], data: Any) -> M:
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as exc:
        raise BridgeError(400, describe(exc)) from None


def describe(exc: pydantic.ValidationError, within: str = "") -> str:
    """The first problems, each named by its field's path (under `within`, e.g. an
    AuroraCloud task's `data.1`)."""
    parts = []
    for err in exc.errors(include_url=False, include_input=False)[:5]:
        where = ".".join([within, *map(str, err["loc"])] if within else map(str, err["loc"]))
        parts.append(f"{where or 'body'}: {err['msg']}")
    return "; ".join(parts)


def secret_matches(given: str | None, expected: str) -> bool:
    """Constant-time comparison; an unconfigured secret matches nothing."""
    if not expected or not isinstance(given, str) or not given:
        return False
    # surrogateescape: header bytes that are not UTF-8 compare as the bytes they were.
    return same_secret(given.encode("utf-8", "surrogateescape"), expected.encode("utf-8"))


def same_secret(given: bytes, expected: bytes) -> bool:
    """Constant time on equal-length digests: compare_digest of unequal lengths returns
    at once, which told a guesser the secret's length. The dashboard's too."""
    return hmac.compare_digest(hashlib.sha256(given).digest(), hashlib.sha256(expected).digest())


def bearer_token(request: web.Request) -> str:
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    return token_text(value) if scheme.lower() == "bearer" else ""


def header_token(request: web.Request) -> str:
    """The token from `Authorization: Bearer` or, failing that, `X-Callback-Token`."""
    return bearer_token(request) or token_text(request.headers.get("X-Callback-Token", ""))


def idempotency_key(request: web.Request, contract: str, job_id: str, body: Body) -> str:
    """The client's Idempotency-Key, else a digest of contract, job id and raw body,
    so a verbatim retry is recognised and applied once. A verified Standard Webhooks
    `webhook-id` comes first: it is what the sender keeps across redeliveries. (A
    worker repeating the same progress as a heartbeat still renews its claim: the
    service applies a repeat once the claim is half gone, service/domain/events.py.)"""
    given = senders_key(request, contract)
    if given:
        return given
    h = hashlib.sha256(contract.encode() + b"\0" + job_id.encode() + b"\0" + body.digest)
    return f"{contract}:{h.hexdigest()}"


def senders_key(request: web.Request, contract: str) -> str:
    """The key the sender gives a request it may repeat: a verified `webhook-id`, else
    the `Idempotency-Key` header; "" when neither."""
    signed = webhook_id(request)
    if signed:
        return service_key(f"{contract}:whk:{signed}")
    given = client_key(request)
    return service_key(f"{contract}:hdr:{given}") if given else ""


MAX_CLIENT_KEY = 1024  # characters of an Idempotency-Key header


def client_key(request: web.Request) -> str:
    """The `Idempotency-Key` header, whole (400 naming it past MAX_CLIENT_KEY). It was
    cut to 200 characters: keys that differed only after that (`<prefix>-step-1`,
    `-final`) were one key, and a final report was acknowledged and dropped."""
    given = text_header(request, "Idempotency-Key", MAX_CLIENT_KEY + 1)
    if len(given) > MAX_CLIENT_KEY:
        # A header's problem, named in every contract (the video worker's field error
        # is one fixed body: it said `Faltan campos requeridos: ...` of fields all sent).
        raise RequestProblem(f"Idempotency-Key header must be at most {MAX_CLIENT_KEY} characters")
    return given


SERVICE_KEY_LENGTH = 256  # the service's limit for an idempotency key


def service_key(key: str) -> str:
    """`key` as the service takes it: a key past its 256 characters (a long header or
    webhook-id with the contract's prefix) becomes a digest of the whole key, which
    stays as distinct as the key was; it used to be refused (400) or cut."""
    if len(key) <= SERVICE_KEY_LENGTH:
        return key
    return f"sha256:{hashlib.sha256(key.encode()).hexdigest()}"


def whole_numbers(value: Any) -> Any:
    """A protobuf Struct keeps every number as a double, so a worker's `"pages": 28`
    comes back as 28.0: given back as the integer it was (up to 2**53, where doubles
    still hold every integer exactly)."""
    if isinstance(value, float) and value.is_integer() and abs(value) <= 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: whole_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [whole_numbers(v) for v in value]
    return value


MAX_MESSAGE = 64 * 1024  # characters of an event's message, the service's limit


def clip(text: str, limit: int = MAX_MESSAGE) -> str:
    """`text` within `limit` characters: its start and its end (where a tool's stderr
    says what failed), the middle left out and said so. A failure whose message was
    longer (FFmpeg's stderr) was refused with 400 and its job stayed QUEUED for good."""
    if len(text) <= limit:
        return text
    keep = (limit - 64) // 2
    gap = f"\n… ({len(text) - 2 * keep} characters left out) …\n"
    return text[:keep] + gap + text[-keep:]


# A leap second's seconds field (RFC 3339 5.6 allows `60`) and its fraction.
_LEAP_SECOND = re.compile(r"(?<=[Tt ][0-9]{2}:[0-9]{2}):60(?:[.,][0-9]+)?")


def parse_iso(value: str) -> datetime:
    """ISO-8601 with offset or `Z`; naive times are taken as UTC. RFC 3339 allows a
    lowercase `t` and `z` (section 5.6), which Python's parser refuses, and a leap
    second (`23:59:60Z`), which it refuses too: a datetime holds no second 60, so it is
    taken as the last microsecond of its minute (`23:59:59.999999`), kept in order."""
    value = _LEAP_SECOND.sub(":59.999999", value, count=1)
    parsed = datetime.fromisoformat(value.upper() if value.isascii() else value)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _iso_before(value: object) -> object:
    if isinstance(value, str):
        try:
            value = parse_iso(value)
        except ValueError:
            raise ValueError("expected an ISO-8601 date-time") from None
    if not isinstance(value, datetime):
        raise ValueError("expected an ISO-8601 date-time string")
    # Worker clocks are trusted within reason; far-off dates are typos or fuzz, and
    # nanosecond timestamps beyond 2262 do not fit a 64-bit integer in storage.
    if not MIN_TIME <= value <= MAX_TIME:
        raise ValueError("date-time must lie between 1970 and 2200")
    return value


# The document says what _iso_before checks: a year from 1970 to 2199 (the offset may
# still move an edge case across a bound).
IsoDateTime = Annotated[
    datetime,
    pydantic.BeforeValidator(_iso_before),
    pydantic.Field(
        json_schema_extra={
            "pattern": r"^(19[7-9][0-9]|2[01][0-9][0-9])-",
            "description": "ISO-8601 date-time between 1970 and 2200; no offset means UTC",
        }
    ),
]


def to_timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts


def format_timestamp(ts: timestamp_pb2.Timestamp) -> str:
    """`2023-05-01T12:00:00Z`, with milliseconds only when there are any."""
    dt = ts.ToDatetime(tzinfo=UTC)
    base = dt.strftime("%Y-%m-%dT%H:%M:%S")
    ms = dt.microsecond // 1000
    return f"{base}.{ms:03d}Z" if ms else f"{base}Z"


_CLOCK = re.compile(r"(\d{1,3}):([0-5]\d):([0-5]\d)(?:\.(\d{1,9}))?")


def parse_clock(value: str) -> duration_pb2.Duration:
    """`HH:MM:SS.mmm` (video worker currentTime/totalTime) as a Duration."""
    match = _CLOCK.fullmatch(value)
    if match is None:
        raise ValueError("expected HH:MM:SS.mmm")
    hours, minutes, seconds, frac = match.groups()
    nanos = int((frac or "0").ljust(9, "0"))
    d = duration_pb2.Duration(
        seconds=int(hours) * 3600 + int(minutes) * 60 + int(seconds), nanos=nanos
    )
    return d


def seconds_duration(value: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(round(value * 1e9))
    return d


def duration_seconds(d: duration_pb2.Duration) -> float:
    return d.seconds + d.nanos / 1e9


async def report_event(
    request: web.Request, event: svc.ReportEventRequest
) -> svc.ReportEventResponse:
    """Reports through the coalescer. A terminal event that meets a job already in
    that same terminal state (e.g. an `error` report after an ERROR log failed the
    video) is acknowledged: the outcome the worker wants is already stored."""
    size = event.ByteSize()
    if size > MAX_EVENT_BYTES:
        raise BridgeError(
            413, f"the event is {size} bytes, at most {MAX_EVENT_BYTES}: it can never be applied"
        )
    try:
        return await request.app[COALESCER].report(event, size)
    except RpcFailed as exc:
        target = _TERMINAL_TARGET.get(event.WhichOneof("payload") or "")
        if exc.code != grpc.StatusCode.FAILED_PRECONDITION or target is None:
            raise
        job = await request.app[STUB].GetJob(
            svc.GetJobRequest(id=event.job_id, callback_token=event.callback_token),
            timeout=request.app[CONFIG].rpc_timeout_seconds,
        )
        if job.state != target:
            raise
        return svc.ReportEventResponse(
            job_id=job.id, sequence=job.sequence, state=job.state, duplicate=True
        )


_TERMINAL_TARGET = {
    "completed": job_pb2.JOB_STATE_SUCCEEDED,
    "failed": job_pb2.JOB_STATE_FAILED,
}
