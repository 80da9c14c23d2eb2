"""An internal service that starts a Secretary extraction and shows its live progress.

It creates an EXTRACTION job, hands the job's callback URL and token to the Secretary
worker (here: a JSON file the worker reads, written with mode 0600, since the token is
a secret), then renders every event until the job ends and downloads the extracted
text. The Secretary worker reports over HTTP to the bridge; this program only speaks
gRPC, through jobwire.client, and survives a service restart while it watches.

    python examples/python/secretary_job.py --handoff /tmp/handoff.json [--target HOST:PORT]

TLS and the bearer token come from JOBWIRE_SERVICE_TLS_* / JOBWIRE_GRPC_TOKEN, as for the
`jobwire` CLI. Exit status: 0 when the extraction succeeded, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

from jobwire.client import Client, Job, JobwireError, StreamGap
from jobwire.v1 import event_pb2, job_pb2


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default=os.environ.get("JOBWIRE_SERVICE_TARGET", ""))
    parser.add_argument("--handoff", type=Path, required=True, help="where the worker looks")
    parser.add_argument("--document", default="contract.pdf", help="a label for the job")
    parser.add_argument("--save-text", type=Path, help="write extracted_text.md here")
    args = parser.parse_args()
    try:
        return await extract(args)
    except JobwireError as err:  # a wrong --target or token: one line, not a traceback
        print(f"secretary_job: {err}", file=sys.stderr)
        return 1


async def extract(args: argparse.Namespace) -> int:
    async with Client.from_env(args.target or None) as client:
        created = await client.create_job(
            "EXTRACTION", labels={"document": args.document, "requested-by": "example"}
        )
        job_id = created.job.id
        print(f"created job {job_id}", flush=True)
        hand_over(args.handoff, job_id, created.callback_url, created.callback_token)

        final: Job | None = None
        async for item in client.watch_job(job_id):
            if isinstance(item, Job):
                final = item
                print(f"job {item.id}: {state(item.state)}", flush=True)
            elif isinstance(item, StreamGap):
                print(f"(events up to {item.oldest_available_sequence - 1} were missed)")
            else:
                print(render(item), flush=True)
                if item.state != job_pb2.JOB_STATE_RUNNING:
                    final = await client.get_job(job_id)

        assert final is not None
        if final.state != job_pb2.JOB_STATE_SUCCEEDED:
            error = final.error
            print(f"extraction {state(final.state)}: {shown(error.code)} {shown(error.message)}")
            return 1
        for ref in final.result.artifacts:
            print(f"artifact {ref.name}: {ref.size_bytes} bytes, sha256 {ref.sha256[:12]}…")
        if args.save_text:
            saved = await client.read_artifact(job_id, "extracted_text.md").save(args.save_text)
            print(f"saved {saved.name} to {args.save_text}")
        return 0


def hand_over(path: Path, job_id: str, url: str, token: str) -> None:
    """What the Secretary worker needs to call back (the token never goes to a log)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    # The mode above is for a new file only: an earlier run's, readable by all, kept it.
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"job_id": job_id, "callback_url": url, "callback_token": token}, f)


def render(event: event_pb2.JobEvent) -> str:
    """One line per event: sequence, a bar, the percent, the phase and message."""
    what = event_pb2.EventType.Name(event.type).removeprefix("EVENT_TYPE_")
    if event.type == event_pb2.EVENT_TYPE_PROGRESS:
        p = event.progress
        bar = "#" * round(p.percent / 5)
        text = f"{shown(p.phase)}: {shown(p.message)}"
        return f"#{event.sequence:<3} [{bar:<20}] {p.percent:5.1f}% {text}"
    if event.type == event_pb2.EVENT_TYPE_FAILED:
        error = event.error
        return f"#{event.sequence:<3} {what} {shown(error.code)}: {shown(error.message)}"
    return f"#{event.sequence:<3} {what} -> {state(event.state)}"


def shown(text: str) -> str:
    """A worker's text, fit for a terminal: controls escaped as Python writes them
    (`\\x1b`: an ESC sequence would retitle or clear the terminal), and invisible
    format characters too (`\\u202e` reverses the rest of the line)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def state(value: job_pb2.JobState.ValueType) -> str:
    return job_pb2.JobState.Name(value).removeprefix("JOB_STATE_")


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
