"""The service's own ceiling: progress events per second it takes over gRPC in
BatchReportEvents calls of `batch` events (what the bridge's coalescer sends), with
`concurrency` calls in flight, no HTTP in front. The bound for more bridge workers.

Usage: python -m bench.service_ceiling TARGET SPEC.json
SPEC: {"jobs": [[id, token], ...], "seconds": 5, "batch": 100, "concurrency": 4, "out": path}
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import grpc

from jobwire.v1 import job_pb2, job_service_pb2_grpc
from jobwire.v1 import job_service_pb2 as svc


def batches(jobs: list[list[str]], batch: int, count: int, tag: str) -> list[Any]:
    out = []
    n = 0
    for _ in range(count):
        requests = []
        for _ in range(batch):
            job_id, token = jobs[n % len(jobs)]
            requests.append(
                svc.ReportEventRequest(
                    job_id=job_id,
                    idempotency_key=f"ceiling:{tag}:{n}",
                    callback_token=token,
                    progress=job_pb2.Progress(
                        phase="extract_text", percent=n % 100, message=f"ceiling {n}"
                    ),
                )
            )
            n += 1
        out.append(svc.BatchReportEventsRequest(requests=requests))
    return out


async def main(target: str, spec: dict[str, Any]) -> dict[str, Any]:
    seconds, batch, concurrency = spec["seconds"], spec["batch"], spec["concurrency"]
    # Built before the clock starts: 20,000 events/s is more than this service takes here.
    prepared = batches(spec["jobs"], batch, int(20_000 * seconds / batch) + concurrency, "c")
    applied = errors = calls = 0
    async with grpc.aio.insecure_channel(target) as channel:
        stub = job_service_pb2_grpc.JobServiceStub(channel)
        deadline = time.monotonic() + seconds
        t0 = time.monotonic()

        async def worker() -> None:
            nonlocal applied, errors, calls
            while time.monotonic() < deadline and prepared:
                reply = await stub.BatchReportEvents(prepared.pop(), timeout=30)
                calls += 1
                for result in reply.results:
                    if result.code == 0:
                        applied += 1
                    else:
                        errors += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.monotonic() - t0
    return {
        "events_per_s": round(applied / elapsed),
        "events": applied,
        "errors": errors,
        "calls": calls,
        "batch": batch,
        "concurrency": concurrency,
        "seconds": round(elapsed, 2),
    }


if __name__ == "__main__":
    with open(sys.argv[2], encoding="utf-8") as fh:
        spec = json.load(fh)
    result = asyncio.run(main(sys.argv[1], spec))
    with open(spec["out"], "w", encoding="utf-8") as fh:
        json.dump(result, fh)
