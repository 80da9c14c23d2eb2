"""Opens N WatchJob streams on one job and records when each event arrives.

Usage: python -m bench.watchers TARGET JOB_ID N OUT.json [READY_LIMIT_S]
Prints "READY k" once every stream has its snapshot, or after READY_LIMIT_S (default
290) with k streams that have one; on a line on stdin (or EOF) it
writes {message: [wall-clock arrival times...]} to OUT.json and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time

import grpc

from jobwire.v1 import job_service_pb2, job_service_pb2_grpc

STREAMS_PER_CHANNEL = 100


async def main() -> None:
    target, job_id, n, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    limit = float(sys.argv[5]) if len(sys.argv) > 5 else 290.0
    channels = [
        grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range((n + STREAMS_PER_CHANNEL - 1) // STREAMS_PER_CHANNEL)
    ]
    arrivals: dict[str, list[float]] = {}
    ready = 0
    all_ready = asyncio.Event()
    errors: list[str] = []

    async def watch(i: int) -> None:
        nonlocal ready
        stub = job_service_pb2_grpc.JobServiceStub(channels[i // STREAMS_PER_CHANNEL])
        call = stub.WatchJob(job_service_pb2.WatchJobRequest(id=job_id))
        try:
            async for item in call:
                now = time.time()
                if item.HasField("snapshot"):
                    ready += 1
                    if ready == n:
                        all_ready.set()
                    continue
                arrivals.setdefault(item.event.progress.message, []).append(now)
        except grpc.aio.AioRpcError as exc:
            # Every code, CANCELLED too: our own cancel at STOP raises CancelledError,
            # so a CANCELLED here came from the server (README "Watchers").
            errors.append(exc.code().name)

    tasks = [asyncio.create_task(watch(i)) for i in range(n)]
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(all_ready.wait(), limit)
    print(f"READY {ready}", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.readline)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    with open(out, "w", encoding="utf-8") as fh:  # noqa: ASYNC230 - once, at exit
        json.dump({"arrivals": arrivals, "errors": errors}, fh)
    for ch in channels:
        await ch.close()


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())
