"""Renders a job as one terminal line: a bar, percent, state, phase and message.

Phase and message come from external workers: they are shown escaped where they hold
controls (an ESC sequence would retitle or clear the operator's terminal) and cut to
the terminal's width in cells, not characters (a CJK character takes two), so the line
never wraps and each redraw with `\\r` overwrites it whole.
"""

from __future__ import annotations

import unicodedata

from jobwire.v1 import job_pb2
from service.logs import printable

ENDED_BADLY = frozenset({job_pb2.JOB_STATE_FAILED, job_pb2.JOB_STATE_CANCELLED})


def render(job: job_pb2.Job, width: int = 80) -> str:
    percent = max(0.0, min(100.0, job.progress.percent))
    state = job_pb2.JobState.Name(job.state).removeprefix("JOB_STATE_")
    if job.stalled:
        state += " STALLED"
    detail = " ".join(p for p in (job.progress.phase, job.progress.message) if p)
    if job.state in ENDED_BADLY and (job.error.code or job.error.message):
        # Why it ended, in place of its last progress: that hid the error from the line.
        code = job.error.code if job.error.code != state else ""  # CANCELLED: CANCELLED
        detail = ": ".join(p for p in (code, job.error.message) if p)
    bar_width = max(10, min(40, width - 40))
    filled = round(bar_width * percent / 100)
    line = f"{job.id} [{'#' * filled}{'.' * (bar_width - filled)}] {percent:5.1f}% {state}"
    if detail:
        line += " " + detail
    return fit(printable(line), width - 1)  # the last column left empty: no auto-wrap


def fit(text: str, cells: int) -> str:
    """`text` cut or padded with spaces to exactly `cells` terminal cells."""
    out, used = [], 0
    for char in text:
        width = cell_width(char)
        if used + width > cells:
            break
        out.append(char)
        used += width
    return "".join(out) + " " * (cells - used)


def cell_width(char: str) -> int:
    if unicodedata.combining(char) or unicodedata.category(char) in ("Mn", "Me", "Cf"):
        return 0
    return 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1
