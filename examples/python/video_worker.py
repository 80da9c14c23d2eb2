"""A pull worker for VIDEO jobs, built on jobwire.client.

It claims the oldest queued VIDEO job (a lease that every report renews), "downloads"
it while reporting progress with the media position, uploads a small result artifact
and completes the job; a job it cannot handle is failed with a code. Every report
carries an idempotency key that the client keeps across its own retries, so a report
retried after a dropped connection is applied once.

    python examples/python/video_worker.py [--target HOST:PORT] [--max-jobs N] [--idle S]

Stops after --max-jobs jobs, or after --idle seconds with nothing queued.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import socket
import sys
from datetime import timedelta

from jobwire.client import Client, Job, JobwireError

STEPS = 4  # progress reports per job
MEDIA = timedelta(minutes=3)  # pretend every video is three minutes long


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default=os.environ.get("JOBWIRE_SERVICE_TARGET", ""))
    parser.add_argument("--worker-id", default=f"video-worker@{socket.gethostname()}")
    parser.add_argument("--max-jobs", type=int, default=0, help="0: no limit")
    parser.add_argument("--idle", type=float, default=5.0, help="stop after this long idle")
    parser.add_argument("--step-seconds", type=float, default=0.05)
    args = parser.parse_args()
    try:
        return await work(args)
    except JobwireError as err:  # a wrong --target or token: one line, not a traceback
        print(f"video_worker: {err}", file=sys.stderr)
        return 1


async def work(args: argparse.Namespace) -> int:
    done = 0
    async with Client.from_env(args.target or None) as client:
        idle_since = asyncio.get_running_loop().time()
        while not args.max_jobs or done < args.max_jobs:
            job = await client.claim_job("VIDEO", worker_id=args.worker_id, lease=30)
            if job is None:
                if asyncio.get_running_loop().time() - idle_since > args.idle:
                    break
                await asyncio.sleep(0.2)
                continue
            await process(client, job, args.step_seconds)
            done += 1
            idle_since = asyncio.get_running_loop().time()
    print(f"worker stopped after {done} job(s)", flush=True)
    return 0


async def process(client: Client, job: Job, step_seconds: float) -> None:
    # What the job's creator wrote, escaped for the terminal (a title may hold U+202E).
    print(f"claimed {job.id}: {shown(job.video.title or job.video.url)}", flush=True)
    if not job.video.url.startswith(("http://", "https://")):
        await client.fail(job.id, "BAD_URL", f"cannot download {job.video.url!r}")
        print(f"failed {job.id}: BAD_URL", flush=True)
        return
    for step in range(1, STEPS + 1):
        await asyncio.sleep(step_seconds)  # the actual download would happen here
        reply = await client.report_progress(
            job.id,
            100 * step / STEPS,
            phase="download",
            message=f"chunk {step}/{STEPS}",
            media_time=MEDIA * step / STEPS,
            media_duration=MEDIA,
        )
        print(f"progress {job.id}: {100 * step // STEPS}% (sequence {reply.sequence})", flush=True)
    manifest = f"{job.video.url}\n{job.video.title}\n".encode()
    artifact = await client.upload_artifact(
        job.id, "manifest.txt", manifest, content_type="text/plain"
    )
    assert artifact.sha256 == hashlib.sha256(manifest).hexdigest()
    await client.complete(job.id, output_key=f"videos/{job.id}.mp4", message="downloaded")
    print(f"completed {job.id}", flush=True)


def shown(text: str) -> str:
    """`text` with what a terminal should not get raw (controls, bidi marks) escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
