"""Renders a job as one terminal line: a bar, percent, state, phase and message."""

from __future__ import annotations

from jobwire.v1 import job_pb2


def render(job: job_pb2.Job, width: int = 80) -> str:
    percent = max(0.0, min(100.0, job.progress.percent))
    state = job_pb2.JobState.Name(job.state).removeprefix("JOB_STATE_")
    if job.stalled:
        state += " STALLED"
    text = job.progress.message or job.error.message
    detail = " ".join(p for p in (job.progress.phase, text) if p)
    bar_width = max(10, min(40, width - 40))
    filled = round(bar_width * percent / 100)
    line = f"{job.id} [{'#' * filled}{'.' * (bar_width - filled)}] {percent:5.1f}% {state}"
    if detail:
        line += " " + detail
    return line[: max(width - 1, 20)].ljust(max(width - 1, 20))
