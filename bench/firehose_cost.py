"""What the firehose log costs the ingest path: the same callback load against a
service with the log on (JOBWIRE_FIREHOSE_RETENTION=24h) and one with it off,
alternating rounds in the same minutes so that machine noise hits both alike.

Each round drives closed-loop ReportEvent calls (progress of many jobs, `--concurrency`
in flight) for `--seconds` against one service process and records callbacks/s and
the service's CPU time per callback (from /proc). Figures: the medians of each side
and their ratios (on / off).

For the embedded store it also measures the store alone, in this process: CPU time
(process_time, both threads) per event of `EmbeddedStore.apply` on batches of 64
progress reports, log on vs off, alternating; far less noisy on a shared machine
than the end-to-end rate, which includes gRPC and the load generator.

Usage: python -m bench.firehose_cost [--stores embedded,mongo] [--rounds 4] [--seconds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

from bench.run import HOST, PY, Proc, base_env, cpu_seconds, free_port, wait_grpc
from jobwire.v1 import job_pb2, job_service_pb2, job_service_pb2_grpc

JOBS = 200


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.firehose_cost", description=__doc__)
    p.add_argument("--stores", default="embedded")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--mongo-seconds", type=float, default=3.0)
    p.add_argument("--mongo-concurrency", type=int, default=4)
    return p


async def _start(workdir: Path, name: str, retention: str, mongo_uri: str) -> tuple[Proc, str]:
    port = free_port()
    env = base_env()
    env.update(
        JOBWIRE_GRPC_ADDR=f"{HOST}:{port}",
        JOBWIRE_DATA_DIR=str(workdir / name),
        JOBWIRE_FIREHOSE_RETENTION=retention,
        JOBWIRE_EVENT_FEED="off",
        JOBWIRE_LOG_LEVEL="WARNING",
    )
    if mongo_uri:
        env["MONGODB_URI"] = mongo_uri
        env["JOBWIRE_MONGODB_DB"] = f"fc_{name}"
    proc = Proc(name, [PY, "-m", "cli", "serve"], env, workdir)
    target = f"{HOST}:{port}"
    await wait_grpc(target, proc)
    return proc, target


async def _load(
    stub: job_service_pb2_grpc.JobServiceAsyncStub, ids: list[str], seconds: float, n: int
) -> int:
    """Closed loop for `seconds`; returns how many callbacks were acknowledged."""
    done = 0
    stop = time.monotonic() + seconds
    counter = iter(range(10**9))

    async def worker() -> None:
        nonlocal done
        while time.monotonic() < stop:
            i = next(counter)
            job_id = ids[i % len(ids)]
            await stub.ReportEvent(
                job_service_pb2.ReportEventRequest(
                    job_id=job_id,
                    idempotency_key=f"k{i}",
                    progress=job_pb2.Progress(percent=float(i % 100), phase="work"),
                )
            )
            done += 1

    await asyncio.gather(*(worker() for _ in range(n)))
    return done


async def store_cost(workdir: Path, rounds: int, batches: int = 300) -> dict[str, Any]:
    """CPU per event of EmbeddedStore.apply, firehose log on vs off (same process)."""
    from service.domain.events import new_record
    from service.domain.records import JobCommand, Policy, Report
    from service.store.embedded import EmbeddedStore

    stores = {}
    for side, retention in (("on", 24 * 3600 * 10**9), ("off", 0)):
        store = EmbeddedStore(workdir / f"store-{side}", Policy(firehose_retention_ns=retention))
        await store.start()
        for k in range(JOBS):
            record, _ = new_record(f"job-{k}", job_pb2.JOB_KIND_GENERIC, time.time_ns())
            await store.create(record)
        stores[side] = store
    counter = iter(range(10**9))

    def batch() -> list[JobCommand]:
        out = []
        for _ in range(64):
            i = next(counter)
            request = job_service_pb2.ReportEventRequest(
                job_id=f"job-{i % JOBS}",
                idempotency_key=f"k{i}",
                progress=job_pb2.Progress(percent=float(i % 100), phase="work"),
            )
            out.append(JobCommand(request.job_id, Report(request)))
        return out

    samples: dict[str, list[float]] = {"on": [], "off": []}
    try:
        for r in range(rounds + 1):
            for side in ("on", "off") if r % 2 == 0 else ("off", "on"):
                commands = [batch() for _ in range(batches)]
                cpu0 = time.process_time()
                for cmds in commands:
                    await stores[side].apply(cmds)
                if r:  # round 0 warms up
                    cpu = time.process_time() - cpu0
                    samples[side].append(cpu / (batches * 64) * 1e6)
    finally:
        for store in stores.values():
            await store.close()
    on, off = statistics.median(samples["on"]), statistics.median(samples["off"])
    return {
        "store_cpu_us_per_event_on": round(on, 2),
        "store_cpu_us_per_event_off": round(off, 2),
        "store_extra_cpu_us_per_event": round(on - off, 2),
        "store_on_over_off_cpu": round(on / off, 3),
        "store_samples": samples,
    }


async def measure_store(
    args: argparse.Namespace, workdir: Path, store: str, mongo_uri: str = ""
) -> dict[str, Any]:
    seconds = args.mongo_seconds if store == "mongo" else args.seconds
    concurrency = args.mongo_concurrency if store == "mongo" else args.concurrency
    sides: dict[str, tuple[Proc, str]] = {}
    try:
        for side, retention in (("on", "24h"), ("off", "off")):
            sides[side] = await _start(workdir, f"{store}-{side}", retention, mongo_uri)
        stubs: dict[str, Any] = {}
        ids = [f"job-{k}" for k in range(JOBS)]
        channels = []
        for side, (_, target) in sides.items():
            channel = grpc.aio.insecure_channel(target)
            channels.append(channel)
            stubs[side] = job_service_pb2_grpc.JobServiceStub(channel)
            for job_id in ids:
                await stubs[side].CreateJob(
                    job_service_pb2.CreateJobRequest(
                        job=job_pb2.Job(kind=job_pb2.JOB_KIND_GENERIC), job_id=job_id
                    )
                )
            await _load(stubs[side], ids, min(1.0, seconds), concurrency)  # warm-up
        rounds: dict[str, list[dict[str, float]]] = {"on": [], "off": []}
        for r in range(args.rounds):
            order = ("on", "off") if r % 2 == 0 else ("off", "on")
            for side in order:
                proc = sides[side][0]
                cpu0, t0 = cpu_seconds(proc.pid), time.monotonic()
                n = await _load(stubs[side], ids, seconds, concurrency)
                elapsed, cpu = time.monotonic() - t0, cpu_seconds(proc.pid) - cpu0
                rounds[side].append(
                    {"per_s": n / elapsed, "cpu_us_per_callback": cpu / max(n, 1) * 1e6}
                )
                print(
                    f"[firehose_cost] {store} {side}: {n / elapsed:.0f}/s, "
                    f"{cpu / max(n, 1) * 1e6:.0f} us CPU per callback",
                    file=sys.stderr,
                    flush=True,
                )
        for channel in channels:
            await channel.close()
    finally:
        for proc, _ in sides.values():
            proc.stop()

    def med(side: str, key: str) -> float:
        return statistics.median(x[key] for x in rounds[side])

    on_rate, off_rate = med("on", "per_s"), med("off", "per_s")
    on_cpu, off_cpu = med("on", "cpu_us_per_callback"), med("off", "cpu_us_per_callback")
    out: dict[str, Any] = {}
    if store == "embedded":
        out = await store_cost(workdir, args.rounds)
        print(
            f"[firehose_cost] embedded store alone: {out['store_cpu_us_per_event_on']} vs "
            f"{out['store_cpu_us_per_event_off']} us CPU per event (on vs off)",
            file=sys.stderr,
            flush=True,
        )
    return out | {
        "log_on_per_s": round(on_rate),
        "log_off_per_s": round(off_rate),
        "on_over_off_per_s": round(on_rate / off_rate, 3),
        "log_on_cpu_us_per_callback": round(on_cpu, 1),
        "log_off_cpu_us_per_callback": round(off_cpu, 1),
        "on_over_off_cpu": round(on_cpu / off_cpu, 3),
        "rounds": rounds,
        "seconds": seconds,
        "concurrency": concurrency,
    }


async def measure(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for store in args.stores.split(","):
        if store == "mongo":
            from bench.run import ferretdb

            with ferretdb(workdir) as uri:
                out[store] = await measure_store(args, workdir, store, uri)
        elif store:
            out[store] = await measure_store(args, workdir, store)
    return out


def main() -> None:
    args = parser().parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="jobwire-firehose-cost-"))
    result = asyncio.run(measure(args, workdir))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
