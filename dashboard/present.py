"""Protobuf messages as plain dicts: one shape for the templates and the JSON streams.

Everything here is data; escaping happens where it is shown (Jinja2 autoescape on
the server, textContent in the browser), never by building markup from it.
"""

from __future__ import annotations

import json
import math
import re
from datetime import UTC, datetime
from typing import Any

from google.protobuf import json_format
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from http_bridge.common import whole_numbers
from jobwire.v1 import artifact_pb2, event_pb2, job_pb2, log_pb2

TERMINAL = frozenset({"SUCCEEDED", "FAILED", "CANCELLED"})
KINDS = [n.removeprefix("JOB_KIND_") for n in job_pb2.JobKind.keys()][1:]  # noqa: SIM118
STATES = [n.removeprefix("JOB_STATE_") for n in job_pb2.JobState.keys()][1:]  # noqa: SIM118
LEVELS = [n.removeprefix("LOG_LEVEL_") for n in log_pb2.LogLevel.keys()][1:]  # noqa: SIM118


# Characters in worker text that would act instead of show: C0 controls (but tab and
# newlines), DEL, C1 controls and the explicit bidi controls (embeddings, overrides,
# isolates). They are shown as the JSON escape `\u202e`, as the result and error blocks
# already show C0 controls, in plain ASCII (control pictures such as U+241B are missing
# from common Linux fonts). The bidi controls are why isolating a field is not enough: no
# element contains them (a stray U+2069 closes even a <bdi>'s isolate, and a U+202E after
# it reverses the rest of the line). dashboard.js keeps the same rule.
_HIDDEN = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def visible(text: str) -> str:
    """Worker text as the dashboard shows it: the characters above as `\\uXXXX`."""
    return _HIDDEN.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def kind_name(value: int) -> str:
    return _name(job_pb2.JobKind, value, "JOB_KIND_")


def state_name(value: int) -> str:
    return _name(job_pb2.JobState, value, "JOB_STATE_")


def _name(enum: Any, value: int, prefix: str) -> str:
    try:
        return str(enum.Name(value)).removeprefix(prefix)
    except ValueError:
        return str(value)


def iso(ts: Timestamp) -> str:
    if not ts.seconds and not ts.nanos:
        return ""
    return iso_datetime(datetime.fromtimestamp(ts.seconds + ts.nanos / 1e9, UTC))


def iso_datetime(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def seconds(a: Timestamp, b: Timestamp) -> float | None:
    if not a.seconds or not b.seconds:
        return None
    return round((b.ToNanoseconds() - a.ToNanoseconds()) / 1e9, 3)


def job_row(job: job_pb2.Job) -> dict[str, Any]:
    """What a row of the jobs table shows (and what the live stream sends for it)."""
    end = job.end_time if job.HasField("end_time") else job.update_time
    return {
        "id": job.id,
        "kind": kind_name(job.kind),
        "state": state_name(job.state),
        "stalled": job.stalled,
        "percent": _percent(job.progress.percent, job.state),
        "phase": job.progress.phase,
        "media": media(job.progress),
        "message": job.error.message or job.result.message or job.progress.message,
        "created": iso(job.create_time),
        "updated": iso(job.update_time),
        "duration": seconds(job.create_time, end),
        "sequence": job.sequence,
    }


def event_row(event: event_pb2.JobEvent) -> dict[str, Any]:
    """A job's change as the live jobs stream sends it (merged into its row): `percent`,
    `phase` and `message` only when the event changes them, so the row keeps what it
    shows, as a reload does (a finished job's row kept its last phase and message after
    a reload, while the live one had them blanked by the completion)."""
    row: dict[str, Any] = {
        "id": event.job_id,
        "kind": kind_name(event.kind),
        "state": state_name(event.state),
        "stalled": event.type == event_pb2.EVENT_TYPE_STALLED,
        "updated": iso(event.create_time),
        "sequence": event.sequence,
    }
    if event.HasField("progress"):
        row["percent"] = _percent(event.progress.percent, event.state)
        row["phase"] = event.progress.phase
        row["media"] = media(event.progress)  # the job's, whole (the event carries it)
        row["message"] = event.progress.message
    if event.HasField("error"):
        row["message"] = event.error.message
    if event.HasField("result"):
        row["percent"] = 100.0
        if event.result.message:
            row["message"] = event.result.message
    return row


def timeline_entry(event: event_pb2.JobEvent) -> dict[str, Any]:
    """One line of a job's event timeline."""
    message = event.progress.message
    if event.HasField("error"):
        message = f"{event.error.code}: {event.error.message}".strip(": ")
    elif event.HasField("result"):
        message = event.result.message or event.result.output_key or event.result.output_uri
    return {
        "sequence": event.sequence,
        "coalesced_from": event.coalesced_from_sequence,
        "type": _name(event_pb2.EventType, event.type, "EVENT_TYPE_"),
        "state": state_name(event.state),
        "time": iso(event.create_time),
        "percent": tenths(event.progress.percent) if event.HasField("progress") else None,
        "media": media(event.progress),
        "phase": event.progress.phase,
        "message": message,
        "worker_id": event.worker_id,
    }


def job_detail(job: job_pb2.Job) -> dict[str, Any]:
    """The job page's snapshot: the row plus result, error and the worker's ids."""
    detail = job_row(job)
    detail.update(
        {
            "labels": dict(sorted(job.labels.items())),
            "started": iso(job.start_time),
            "ended": iso(job.end_time),
            "worker_id": job.worker_id,
            "process_id": job.process_id,
            "attempts": job.attempts,
            "lease_expires": iso(job.lease_expire_time),
            "last_event": iso(job.last_event_time),
            "video": _dict(job.video) if job.HasField("video") else None,
            # The artifacts have their own table on the page.
            "result": _without(_dict(job.result), "artifacts") if job.HasField("result") else None,
            "error": _dict(job.error) if job.HasField("error") else None,
        }
    )
    return detail


def media(progress: job_pb2.Progress) -> str:
    """A video's position and length as a worker reported them (`currentTime`,
    `totalTime`): "1:30 / 3:20", "1:30" before the length is known (none, or 0: a
    worker's "00:00:00" while it does not know it yet), "" for neither."""
    at = _clock(progress.media_time) if progress.HasField("media_time") else ""
    if progress.media_duration.ToNanoseconds() <= 0:
        return at
    return f"{at or '–'} / {_clock(progress.media_duration)}"


def _clock(span: Duration) -> str:
    """Whole seconds, cut as percents are (1:29.9 is not 1:30): "1:30", "1:02:03"."""
    hours, rest = divmod(max(span.ToNanoseconds(), 0) // 10**9, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02}:{secs:02}" if hours else f"{minutes}:{secs:02}"


def log_entry(entry: log_pb2.LogEntry) -> dict[str, Any]:
    return {
        "level": _name(log_pb2.LogLevel, entry.level, "LOG_LEVEL_"),
        "message": entry.message,
        "time": iso(entry.time),
    }


def artifact(a: artifact_pb2.Artifact) -> dict[str, Any]:
    return {
        "name": a.name,
        "size": a.size_bytes,
        "sha256": a.sha256,
        "content_type": a.content_type,
        "created": iso(a.create_time),
    }


def pretty(value: Any) -> str:
    return json.dumps(whole_numbers(value), indent=2, ensure_ascii=False, sort_keys=True)


def _dict(message: Any) -> dict[str, Any]:
    return dict(json_format.MessageToDict(message, preserving_proto_field_name=True))


def _without(values: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in values.items() if k != key}


def _percent(value: float, state: int) -> float:
    if state == job_pb2.JOB_STATE_SUCCEEDED:
        return 100.0
    return tenths(value)


def tenths(value: float) -> float:
    """A percent cut to one decimal, never rounded up: 99.96 % of a running job read
    100.0 (and "100%", a full bar) as if it had finished. The pages cut it again to a
    whole percent (the template's `int`, dashboard.js's Math.floor). The epsilon keeps
    2.3 at 2.3 (2.3 * 10 is 22.999999999999996)."""
    return math.floor(min(max(value, 0.0), 100.0) * 10 + 1e-9) / 10
