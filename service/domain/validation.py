"""Input checks shared by every entry point. Each failure names the field."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from google.protobuf.duration_pb2 import Duration
from google.protobuf.struct_pb2 import Struct, Value
from google.protobuf.timestamp_pb2 import Timestamp

from jobwire import job_ids
from jobwire.v1 import job_pb2, log_pb2

from .errors import invalid

_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_ARTIFACT_NAME = re.compile(r"[A-Za-z0-9._\-]{1,255}")
MAX_KEY_LENGTH = 256
MAX_MESSAGE_LENGTH = 64 * 1024
# One reported event, serialised. A job's retained events travel together (a MongoDB
# job document holds them, a replay answers them in one message): larger data (a log,
# an archive) belongs in an artifact. The HTTP bridge answers 413 past it.
MAX_EVENT_BYTES = 1024 * 1024
UNKNOWN_JOB = job_ids.UNKNOWN_JOB


def job_id(value: str, field: str = "job_id") -> str:
    if not value:
        raise invalid(f"{field} is required")
    if not _ID.fullmatch(value):
        raise invalid(f"{field} must be 1-128 characters of [A-Za-z0-9._:-], got {value[:64]!r}")
    return value


def new_job_id(value: str, field: str = "job_id") -> str:
    """The id of a job about to be created: `.` and `..` are valid ids but URL dot
    segments, which browsers and most HTTP clients resolve away, so its callback URL
    and dashboard page would reach another path. Refused, like artifact names; and
    `UNKNOWN`, the id log lines of no job carry."""
    job_id(value, field)
    if value in job_ids.DOT_SEGMENTS:
        raise invalid(f"{field} must not be {value!r}: a URL would resolve it away")
    if value == UNKNOWN_JOB:
        # A job of that id took every line of no job, and its deletion deleted them.
        raise invalid(f"{field} must not be {UNKNOWN_JOB!r}: it is the id of log lines of no job")
    return value


_CHOSEN_TOKEN = re.compile(r"[A-Za-z0-9_\-]{43,256}")


def chosen_token(value: str, field: str = "callback_token") -> str:
    """A callback token the caller picked: as strong as an issued one. The value is
    a secret: never echoed in the error."""
    if not _CHOSEN_TOKEN.fullmatch(value):
        raise invalid(
            f"{field} must be 43-256 characters of [A-Za-z0-9_-] (256 random bits, e.g."
            f" secrets.token_urlsafe(32)); got {len(value)} characters"
        )
    return value


def artifact_name(value: str) -> str:
    if not _ARTIFACT_NAME.fullmatch(value) or value in {".", ".."}:
        raise invalid(f"name must be 1-255 characters of [A-Za-z0-9._-], got {value[:64]!r}")
    return value


_MIME_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_CONTENT_TYPE = re.compile(rf"{_MIME_TOKEN}/{_MIME_TOKEN}( *;.*)?")


def content_type(value: str, field: str = "header.content_type") -> str:
    """A MIME type a Content-Type header can carry: a line break in one made the
    bridge's download a 500 (aiohttp refuses the header)."""
    if value and not (
        len(value) <= 255
        and value.isascii()
        and value.isprintable()
        and _CONTENT_TYPE.fullmatch(value)
    ):
        raise invalid(
            f"{field} must be a MIME type such as text/plain (printable ASCII, at most 255"
            f" characters), got {value[:64]!r}"
        )
    return value


def kind(value: int, field: str = "kind") -> int:
    if value == job_pb2.JOB_KIND_UNSPECIFIED or value not in job_pb2.JobKind.values():
        raise invalid(f"{field} must be one of {_names(job_pb2.JobKind)}")
    return value


def optional_kind(value: int, field: str = "kind") -> int:
    return value if value == job_pb2.JOB_KIND_UNSPECIFIED else kind(value, field)


def states(values: list[int], field: str = "states") -> list[int]:
    for v in values:
        if v == job_pb2.JOB_STATE_UNSPECIFIED or v not in job_pb2.JobState.values():
            raise invalid(f"{field} must hold values of {_names(job_pb2.JobState)}")
    return values


def log_level(value: int, field: str = "level", allow_unspecified: bool = False) -> int:
    if value not in log_pb2.LogLevel.values() or (
        value == log_pb2.LOG_LEVEL_UNSPECIFIED and not allow_unspecified
    ):
        raise invalid(f"{field} must be one of {_names(log_pb2.LogLevel)}")
    return value


def idempotency_key(value: str) -> str:
    if not value:
        raise invalid("idempotency_key is required")
    if len(value) > MAX_KEY_LENGTH:
        raise invalid(f"idempotency_key must be at most {MAX_KEY_LENGTH} characters")
    return value


def percent(value: float, field: str = "progress.percent") -> float:
    if not math.isfinite(value) or not 0.0 <= value <= 100.0:
        raise invalid(f"{field} must be between 0 and 100, got {value}")
    return value


# google.protobuf.Duration's range (10,000 years): its JSON form refuses more.
MAX_DURATION_SECONDS = 315_576_000_000


def media_duration(value: Duration, field: str) -> None:
    """A media time or length, or a processing time: 0 or more, within Duration's range.
    A negative one made a derived percent negative (-5 s of 10 s: -50 %), and one out of
    range (or of mixed signs) was stored and then failed every JSON reader of the job
    (the dashboard, `jobwire jobs get`)."""
    if not (0 <= value.seconds <= MAX_DURATION_SECONDS and 0 <= value.nanos < 10**9):
        raise invalid(
            f"{field} must be between 0 and {MAX_DURATION_SECONDS} seconds,"
            f" got {value.seconds} s and {value.nanos} ns"
        )


def well_formed(value: Duration, field: str) -> None:
    """protobuf's rules for a Duration: nanos within ±999,999,999, of the seconds' sign.
    ToNanoseconds() adds the two as given: seconds 1 with nanos -999,999,999 was taken
    as a lease of 1 ns."""
    if not -(10**9) < value.nanos < 10**9 or value.seconds * value.nanos < 0:
        raise invalid(
            f"{field} is not a valid Duration: nanos must lie within ±999,999,999 and"
            f" share the sign of seconds, got {value.seconds} s and {value.nanos} ns"
        )


def finite_numbers(value: Struct, field: str) -> None:
    """Every number in a Struct (a result's metadata, an error's details) is finite:
    JSON has no NaN or infinity, so one stored failed every JSON reader of the job
    (`jobwire jobs get`, the dashboard). Names where it is, e.g. `metadata.a[2].b`."""
    pending: list[tuple[Value, str]] = [(v, f"{field}.{k}") for k, v in value.fields.items()]
    while pending:
        item, path = pending.pop()
        kind = item.WhichOneof("kind")
        if kind == "number_value" and not math.isfinite(item.number_value):
            raise invalid(f"{path} must be a finite number, got {item.number_value}")
        if kind == "struct_value":
            pending += [(v, f"{path}.{k}") for k, v in item.struct_value.fields.items()]
        elif kind == "list_value":
            pending += [(v, f"{path}[{i}]") for i, v in enumerate(item.list_value.values)]


def event_size(size: int) -> None:
    if size > MAX_EVENT_BYTES:
        raise invalid(
            f"the event is {size} bytes, at most {MAX_EVENT_BYTES} (send large data as an artifact)"
        )


def message(value: str, field: str) -> str:
    if len(value) > MAX_MESSAGE_LENGTH:
        raise invalid(f"{field} must be at most {MAX_MESSAGE_LENGTH} characters")
    return value


# Worker clocks are trusted within reason: 1970 to 2200 (and nanoseconds fit in 64 bits).
_MAX_TIME_NS = 7_258_118_400 * 10**9


def timestamp(value: Timestamp, field: str) -> None:
    ns = value.seconds * 10**9 + value.nanos
    if not 0 <= ns < _MAX_TIME_NS or not 0 <= value.nanos < 10**9:
        raise invalid(f"{field} must lie between 1970 and 2200")


def bounded(value: int, field: str, default: int, maximum: int) -> int:
    if value < 0:
        raise invalid(f"{field} must not be negative, got {value}")
    if value > maximum:
        raise invalid(f"{field} must be at most {maximum}, got {value}")
    return value or default


def labels(values: Mapping[str, str], field: str = "labels") -> None:
    """A job's labels, or a ListJobs filter on them: the same rules, so a filter that
    no job could match is refused rather than answered with nothing."""
    items = dict(values)
    if len(items) > 64:
        raise invalid(f"{field} must hold at most 64 entries")
    for key, val in items.items():
        if not key or len(key) > 63 or len(val) > 256:
            raise invalid(f"label {key[:64]!r}: keys are 1-63 and values at most 256 characters")
        # Control characters only (as for a video's texts): isprintable() also refused
        # every space but ' ' (東京\u3000本社, 10\u00a0kg) and bidi marks, as "control".
        if found := _CONTROL.search(key) or _CONTROL.search(val):
            raise invalid(
                f"label {key[:64]!r}: keys and values must not hold control characters,"
                f" got U+{ord(found[0]):04X}"
            )


MAX_VIDEO_URL_LENGTH = 8192
MAX_VIDEO_TEXT_LENGTH = 4096
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def video(value: job_pb2.Video) -> None:
    """A VIDEO job's source: the worker is handed `url` as `videoUrl` from GET
    /api/pending, so a blank one (or spaces only) is a job it can only fail, and a line
    break or NUL in it is no URL any downloader takes. Title, playlist and subtitle
    are shown to people: bounded, no control characters (bidi marks stay: a Hebrew or
    Arabic title needs them, and the dashboard isolates every field)."""
    if not value.url.strip():
        raise invalid("job.video.url is required for JOB_KIND_VIDEO jobs")
    limits = {"url": MAX_VIDEO_URL_LENGTH, "title": MAX_VIDEO_TEXT_LENGTH}
    limits |= {"playlist": MAX_VIDEO_TEXT_LENGTH, "subtitle": MAX_VIDEO_TEXT_LENGTH}
    for name, most in limits.items():
        text = getattr(value, name)
        if len(text) > most:
            raise invalid(
                f"job.video.{name} must be at most {most} characters, got {len(text)} characters"
            )
        if found := _CONTROL.search(text):
            # Which character and where: "at most 4096 characters ... got 3 characters"
            # told the sender of a 3-character title with a line break nothing.
            raise invalid(
                f"job.video.{name} must not hold control characters, got"
                f" U+{ord(found[0]):04X} at character {found.start() + 1}"
            )


def _names(enum_type: object) -> str:
    names: list[str] = [n for n in enum_type.keys() if not n.endswith("UNSPECIFIED")]  # type: ignore[attr-defined]  # noqa: SIM118 - protobuf enum wrappers iterate values
    return ", ".join(names)


MAX_DEADLINE_NS = 366 * 24 * 3600 * 10**9


def deadlines(job: job_pb2.Job) -> None:
    """`progress_deadline` and `stall_fail_after`: positive, at most a year, the
    failure deadline after the stall deadline when both are set."""
    values = {}
    for name in ("progress_deadline", "stall_fail_after"):
        if not job.HasField(name):
            continue
        d = getattr(job, name)
        if d.seconds < 0 or d.nanos < 0 or d.nanos >= 10**9:
            raise invalid(f"job.{name} must be a positive duration")
        ns = d.ToNanoseconds()
        if ns > MAX_DEADLINE_NS:
            raise invalid(f"job.{name} must be at most 366 days, got {ns / 1e9:.0f}s")
        values[name] = ns
    pd, sfa = values.get("progress_deadline", 0), values.get("stall_fail_after", 0)
    if pd and sfa and sfa <= pd:
        raise invalid(
            f"job.stall_fail_after ({sfa / 1e9:g}s) must be longer than "
            f"job.progress_deadline ({pd / 1e9:g}s)"
        )
