"""Ten thousand watchers on one node: burst opens, fan-out, a restart, the firehose.

    python -m bench.watchers10k [--watchers 10000] [--procs 4] [--phases open,storm,firehose]

Starts the service (`python -m cli serve`, embedded store) and drives it from client
processes (this module, `--role client`), each holding its share of the streams over
connections of 100 streams:

- open: `watchers` WatchJob streams on one job opened in one burst (raw gRPC, a refusal
  is retried after its hint and counted): `watchers_N_open_s` from the burst to the
  last snapshot; then `fanout_events` progress reports (ReportEvent, gRPC), each timed
  from its answer to its arrival on every stream: `watchers_N_fanout_p99_ms`; the
  service's RSS with all of them open: `service_rss_mib_N_watchers`. Run once per
  `--open-clients` kind: Node (bench/watchers10k_client.js, ~20 µs of CPU per message
  received) gives the figures, Python grpc.aio (~57 µs) follows in the details: on a
  2-core machine the watchers' CPU competes with the service's. With
  `--workers-compare N`, the phase runs again on a service with N watch workers.
- storm: `watchers` streams through the client library (`jobwire.client`, jittered
  reconnect); events before, the service stopped (SIGTERM) and started again on the
  same port and data, events after: `reconnect_storm_N_s` from the stop until every
  stream has the first event reported after the restart; every stream checked for a
  gap or a duplicate sequence.
- firehose: `subscribers` WatchJobs streams with filters (kind, and for most of them
  terminal states only) while `firehose_rate` events/s go to jobs of five kinds:
  `watchjobs_1000_subscribers_p99_ms` from the report's answer to arrival.

Used by `make bench` (bench/run.py, keys under `embedded`) and alone.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import grpc

from jobwire.v1 import job_pb2, job_service_pb2, job_service_pb2_grpc

PER_CONNECTION = 100
KINDS = (
    job_pb2.JOB_KIND_BATCH,
    job_pb2.JOB_KIND_VIDEO,
    job_pb2.JOB_KIND_TRANSCODE,
    job_pb2.JOB_KIND_EXTRACTION,
    job_pb2.JOB_KIND_GENERIC,
)
TERMINAL = (job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_FAILED)
RETRY_AFTER_KEY = "retry-after-ms"
WORKDIR: list[Path] = [Path("/tmp")]  # where client processes write their results


# -- client processes ----------------------------------------------------------


class Streams:
    """The streams of one client process and what arrived on them."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.ready = 0
        self.last_ready = 0.0
        self.refused = 0
        self.errors: collections.Counter[str] = collections.Counter()
        self.gaps = 0
        self.duplicates = 0
        self.arrivals: dict[str, list[float]] = collections.defaultdict(list)
        self.changed = asyncio.Event()

    def on_ready(self) -> None:
        self.ready += 1
        self.last_ready = time.time()
        self.changed.set()

    def on_event(self, key: str) -> None:
        self.arrivals[key].append(time.time())
        self.changed.set()

    async def until(self, done: Any, limit: float) -> None:
        deadline = time.monotonic() + limit
        while not done() and time.monotonic() < deadline:
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), max(0.01, deadline - time.monotonic()))


def _retry_after(exc: grpc.aio.AioRpcError) -> float:
    for key, value in exc.trailing_metadata() or ():
        if key == RETRY_AFTER_KEY:
            return int(value) / 1000
    return 1.0


async def raw_watch(stub: Any, job_id: str, s: Streams) -> None:
    """One WatchJob stream; a refusal (RESOURCE_EXHAUSTED) is retried after its hint."""
    while True:
        try:
            async for item in stub.WatchJob(job_service_pb2.WatchJobRequest(id=job_id)):
                if item.HasField("snapshot"):
                    s.on_ready()
                elif item.HasField("event"):
                    s.on_event(item.event.idempotency_key)
            return
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                s.refused += 1
                await asyncio.sleep(_retry_after(exc))
                continue
            s.errors[exc.code().name] += 1
            return


async def library_watch(client: Any, job_id: str, s: Streams) -> None:
    """One stream through jobwire.client: checks that sequences go up by exactly one."""
    last = 0
    async for item in client.watch_job(job_id):
        name = type(item).__name__
        if name == "Job":
            s.on_ready()
        elif name == "StreamGap":
            s.gaps += 1
        else:
            if item.sequence <= last:
                s.duplicates += 1
                continue
            if item.sequence != last + 1:
                s.gaps += 1
            last = item.sequence
            s.on_event(item.idempotency_key)


async def firehose_watch(stub: Any, index: int, s: Streams) -> None:
    kind = KINDS[index % len(KINDS)]
    # One in a hundred watches every event of its kind (a dashboard); the others
    # only jobs of their kind that finish (a service waiting for results).
    states = [] if index % 100 == 0 else list(TERMINAL)
    request = job_service_pb2.WatchJobsRequest(kind=kind, states=states)
    first = True
    try:
        async for reply in stub.WatchJobs(request):
            if first:
                first = False
                s.on_ready()
            if reply.HasField("event"):
                s.on_event(reply.event.idempotency_key)
    except grpc.aio.AioRpcError as exc:
        s.errors[exc.code().name] += 1


async def client_main(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()

    async def line() -> list[str]:
        return (await loop.run_in_executor(None, sys.stdin.readline)).split()

    n = args.streams
    conns = (n + PER_CONNECTION - 1) // PER_CONNECTION
    s = Streams(n)
    own = [("grpc.use_local_subchannel_pool", 1)]  # one connection per channel
    clients: list[Any] = []
    channels: list[grpc.aio.Channel] = []
    if args.mode == "library":
        from jobwire.client import Backoff, Client

        backoff = Backoff(initial=0.2, maximum=5.0)
        clients = [Client(args.target, options=own, watch_backoff=backoff) for _ in range(conns)]
    else:
        channels = [grpc.aio.insecure_channel(args.target, options=own) for _ in range(conns)]
        for ch in channels:
            await ch.channel_ready()
    stubs = [job_service_pb2_grpc.JobServiceStub(ch) for ch in channels]
    print("CONNECTED", flush=True)
    await line()  # GO
    t0 = time.time()
    if args.mode == "raw":
        tasks = [raw_watch(stubs[i // PER_CONNECTION], args.job, s) for i in range(n)]
    elif args.mode == "library":
        tasks = [library_watch(clients[i // PER_CONNECTION], args.job, s) for i in range(n)]
    else:
        base = args.index_base
        tasks = [firehose_watch(stubs[i // PER_CONNECTION], base + i, s) for i in range(n)]
    running = [asyncio.create_task(t) for t in tasks]
    if args.mode != "firehose":
        await s.until(lambda: s.ready >= n, args.limit)
        ready_s = round(s.last_ready - t0, 2) if s.ready else None
        print(json.dumps({"ready": s.ready, "ready_s": ready_s, "refused": s.refused}), flush=True)
    while True:
        cmd = await line()
        if not cmd or cmd[0] == "STOP":
            break
        if cmd[0] == "WAITFOR":  # WAITFOR key limit: every stream has that event
            key, limit = cmd[1], float(cmd[2])
            await s.until(lambda key=key: len(s.arrivals.get(key, ())) >= n, limit)
            got = s.arrivals.get(key, [])
            print(
                json.dumps({"key": key, "have": len(got), "last": max(got, default=0)}), flush=True
            )
        elif cmd[0] == "WAITALL":  # every stream has had a message (firehose warm-up)
            await s.until(lambda: s.ready >= n, float(cmd[1]))
            print(json.dumps({"ready": s.ready}), flush=True)
    for t in running:
        t.cancel()
    await asyncio.gather(*running, return_exceptions=True)
    out = {
        "arrivals": s.arrivals,
        "errors": dict(s.errors),
        "refused": s.refused,
        "gaps": s.gaps,
        "duplicates": s.duplicates,
    }
    Path(args.out).write_text(json.dumps(out))  # noqa: ASYNC240 - once, at exit
    for ch in channels:
        await ch.close()
    for c in clients:
        await c.close()


# -- the driver ----------------------------------------------------------------


class ClientProc:
    """A watcher process (this module's `--role client`, or bench/watchers10k_client.js),
    spoken to over stdin/stdout: CONNECTED; GO -> its ready report; WAITFOR; STOP."""

    def __init__(self, proc: asyncio.subprocess.Process, out: Path) -> None:
        self.proc = proc
        self.out = out

    async def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode() + b"\n")
        await self.proc.stdin.drain()

    async def reply(self, limit: float) -> Any:
        assert self.proc.stdout is not None
        raw = await asyncio.wait_for(self.proc.stdout.readline(), limit)
        if not raw:
            raise RuntimeError(f"client {self.proc.pid} exited")
        text = raw.decode().strip()
        return text if text == "CONNECTED" else json.loads(text)

    async def connected(self, limit: float = 120) -> None:
        if await self.reply(limit) != "CONNECTED":
            raise RuntimeError("watcher client did not connect")

    async def stop(self) -> dict[str, Any]:
        await self.send("STOP")
        await asyncio.wait_for(self.proc.wait(), 120)
        data: dict[str, Any] = json.loads(self.out.read_text())
        return data


async def spawn_node(
    run: Any, target: str, job: str, streams: int, limit: float, out: Path, mark: str = ""
) -> ClientProc:
    """bench/watchers10k_client.js: `streams` raw WatchJob streams on `job`, 100 per
    connection; an event's key is `mark` and the digits after it in its message
    (default "fan-"). Also the fan-out phase of `make bench` (bench/run.py)."""
    argv = ["node", str(run.ROOT / "bench" / "watchers10k_client.js"), target, job]
    argv += [str(streams), str(PER_CONNECTION), str(limit), str(out)] + ([mark] if mark else [])
    env = {**run.base_env(), "NODE_PATH": str(run.NODE_MODULES)}
    pipe = asyncio.subprocess.PIPE
    proc = await asyncio.create_subprocess_exec(
        *argv, env=env, cwd=run.ROOT, stdin=pipe, stdout=pipe
    )
    return ClientProc(proc, out)


async def spawn_clients(
    run: Any, target: str, job: str, total: int, procs: int, mode: str, limit: float
) -> list[ClientProc]:
    out = []
    per = total // procs
    for i in range(procs):
        path = WORKDIR[0] / f"watchers10k-{mode}-{i}.json"
        if mode == "node":  # raw WatchJob streams from bench/watchers10k_client.js
            out.append(await spawn_node(run, target, job, per, limit, path))
            continue
        argv = [run.PY, "-m", "bench.watchers10k", "--role", "client", "--mode", mode]
        argv += ["--target", target, "--job", job, "--streams", str(per), "--out", str(path)]
        argv += ["--limit", str(limit), "--index-base", str(i * per)]
        pipe = asyncio.subprocess.PIPE
        proc = await asyncio.create_subprocess_exec(
            *argv, env=run.base_env(), cwd=run.ROOT, stdin=pipe, stdout=pipe
        )
        out.append(ClientProc(proc, path))
    for c in out:
        await c.connected()
    return out


async def report(stub: Any, job: str, key: str) -> float:
    """A progress report; the wall-clock time of its answer."""
    progress = job_pb2.Progress(percent=50, phase="work", message=key)
    request = job_service_pb2.ReportEventRequest(job_id=job, idempotency_key=key, progress=progress)
    await stub.ReportEvent(request, timeout=30)
    return time.time()


def latencies(
    run: Any, arrivals: list[dict[str, list[float]]], acks: dict[str, float]
) -> list[float]:
    """Fan-out delays over every client process's arrivals (bench.run.delivery_ms)."""
    return [ms for a in arrivals for ms in run.delivery_ms(a, acks)]


async def open_burst(
    run: Any, args: argparse.Namespace, target: str, job: str, mode: str
) -> tuple[list[Any], list[dict[str, Any]], float]:
    """Spawns the client processes, opens all their streams at once ("GO") and waits
    for each process's ready report; returns the clients, the reports, the load."""
    clients = await spawn_clients(
        run, target, job, args.watchers, args.procs, mode, args.open_limit
    )
    load = cpu_load()
    for c in clients:
        await c.send("GO")
    readies = [await c.reply(args.open_limit + 60) for c in clients]
    return clients, readies, load


def _listening_inodes(port: int) -> set[str]:
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if int(f[1].rsplit(":", 1)[1], 16) == port and f[3] == "0A":  # LISTEN
                out.add(f[9])
    return out


def _children_listening(pid: int, port: int) -> int:
    """How many child processes of `pid` hold a socket listening on `port` (/proc)."""
    inodes = _listening_inodes(port)
    listening = 0
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        with contextlib.suppress(OSError):
            links = (os.readlink(fd) for fd in Path(f"/proc/{child}/fd").iterdir())
            listening += any(link[8:-1] in inodes for link in links)
    return listening


async def workers_listening(pid: int, port: int, workers: int, limit: float = 60) -> None:
    """Until the service's watch workers listen on its port too: connections made
    before they do all reach the service process."""
    deadline = time.monotonic() + limit
    while workers:
        listening = _children_listening(pid, port)
        if listening >= workers:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{listening} of {workers} watch workers listen")
        await asyncio.sleep(0.05)


def cpu_load() -> float:
    return round(os.getloadavg()[0], 2)


async def open_phase(
    run: Any, args: argparse.Namespace, svc: Any, target: str, stub: Any, mode: str = "raw"
) -> dict[str, Any]:
    n = args.watchers
    (job,) = await run.create_jobs(
        stub, 1, job_pb2.JOB_KIND_EXTRACTION, f"w10k-open-{time.time_ns()}"
    )
    clients, readies, load = await open_burst(run, args, target, job[0], mode)
    ready = sum(r["ready"] for r in readies)
    refused = sum(r["refused"] for r in readies)
    open_s = max((r["ready_s"] or args.open_limit) for r in readies)
    await asyncio.sleep(1.0)
    rss = run.rss_mib(svc.pid)
    acks: dict[str, float] = {}
    cpu0 = run.cpu_seconds(svc.pid)
    clients_cpu0 = sum(run.cpu_seconds(c.proc.pid) for c in clients)
    for k in range(args.fanout_events):
        key = f"fan-{k}"
        acks[key] = await report(stub, job[0], key)
        rss = max(rss, run.rss_mib(svc.pid))
        await asyncio.sleep(1 / args.fanout_rate)
    waits = []
    for c in clients:
        await c.send(f"WAITFOR fan-{args.fanout_events - 1} 60")
    for c in clients:
        waits.append(await c.reply(90))
    # The service's CPU per event, from the first report until every stream had the last.
    cpu_ms = (run.cpu_seconds(svc.pid) - cpu0) * 1000 / max(1, args.fanout_events)
    clients_cpu = sum(run.cpu_seconds(c.proc.pid) for c in clients) - clients_cpu0
    clients_cpu_ms = clients_cpu * 1000 / max(1, args.fanout_events)
    rss = max(rss, run.rss_mib(svc.pid))
    results = [await c.stop() for c in clients]
    lat = latencies(run, [r["arrivals"] for r in results], acks)
    errors: collections.Counter[str] = collections.Counter()
    for r in results:
        errors.update(r["errors"])
    return {
        "watchers": n,
        "ready": ready,
        "refused": refused,
        "open_s": round(open_s, 2),
        "stream_errors": dict(errors),
        "delivered": len(lat),
        "expected": n * len(acks),
        "fanout_p50_ms": round(run.pct(lat, 50), 1),
        "fanout_p99_ms": round(run.pct(lat, 99), 1),
        "fanout_max_ms": round(max(lat, default=float("nan")), 1),
        "fanout_service_cpu_ms_per_event": round(cpu_ms, 1),
        # The watchers' own CPU: on a 2-core machine it competes with the service.
        "fanout_clients_cpu_ms_per_event": round(clients_cpu_ms, 1),
        "rss_mib": round(rss, 1),
        "load_avg_1m": load,
    }


async def storm_phase(
    run: Any, args: argparse.Namespace, start: Any, svc: Any, target: str, stub: Any, channel: Any
) -> tuple[dict[str, Any], Any, Any, Any]:
    n = args.watchers
    (job,) = await run.create_jobs(
        stub, 1, job_pb2.JOB_KIND_EXTRACTION, f"w10k-storm-{time.time_ns()}"
    )
    clients, readies, load = await open_burst(run, args, target, job[0], "library")
    ready = sum(r["ready"] for r in readies)
    open_s = max((r["ready_s"] or args.open_limit) for r in readies)
    acks: dict[str, float] = {}
    for k in range(3):
        acks[f"pre-{k}"] = await report(stub, job[0], f"pre-{k}")
    for c in clients:
        await c.send("WAITFOR pre-2 60")
    before = [await c.reply(90) for c in clients]
    # The deploy: SIGTERM (the service ends every stream with UNAVAILABLE), start again.
    await channel.close()
    t_stop = time.time()
    svc.stop()
    svc, target, channel, stub = await start(target)
    t_up = time.time()
    for k in range(3):
        acks[f"post-{k}"] = await report(stub, job[0], f"post-{k}")
    for c in clients:
        await c.send(f"WAITFOR post-2 {args.storm_limit}")
    after = [await c.reply(args.storm_limit + 60) for c in clients]
    have = sum(a["have"] for a in after)
    storm_s = max(a["last"] for a in after) - t_stop if have else float("nan")
    results = [await c.stop() for c in clients]
    errors: collections.Counter[str] = collections.Counter()
    for r in results:
        errors.update(r["errors"])
    for key in ("pre-0", "pre-1", "pre-2", "post-0", "post-1", "post-2"):
        got = sum(len(r["arrivals"].get(key, ())) for r in results)
        if got != n:
            errors[f"{key} on {got} of {n} streams"] += 1
    return (
        {
            "watchers": n,
            "ready": ready,
            "open_s": round(open_s, 2),
            "before_restart": sum(b["have"] for b in before),
            "restart_s": round(t_up - t_stop, 2),
            "resumed": have,
            "storm_s": round(storm_s, 2),
            "gaps": sum(r["gaps"] for r in results),
            "duplicates": sum(r["duplicates"] for r in results),
            "stream_errors": dict(errors),
            "load_avg_1m": load,
        },
        svc,
        channel,
        stub,
    )


async def firehose_phase(
    run: Any, args: argparse.Namespace, target: str, stub: Any
) -> dict[str, Any]:
    n = args.subscribers
    tag = f"w10k-fh-{time.time_ns()}"
    total = int(args.firehose_rate * args.firehose_seconds)
    finishing = total // 50  # 2% of the events finish a job
    per_kind = (args.firehose_jobs + finishing) // len(KINDS) + 1
    by_kind = [await run.create_jobs(stub, per_kind, k, f"{tag}-{k}") for k in KINDS]
    pool = [j for group in zip(*by_kind, strict=True) for j in group]  # kinds interleaved
    active, fresh = pool[: args.firehose_jobs], iter(pool[args.firehose_jobs :])
    clients = await spawn_clients(run, target, "", n, args.procs, "firehose", 60)
    for c in clients:
        await c.send("GO")
    # Warm-up: a finished job of each kind reaches every subscriber (all match it);
    # repeated until every stream has had one (a stream opened late missed the last).
    opened = 0
    for attempt in range(20):
        for kind in KINDS:
            (j,) = await run.create_jobs(stub, 1, kind, f"{tag}-warm{attempt}-{kind}")
            done = job_service_pb2.ReportEventRequest(
                job_id=j[0], idempotency_key="warm", completed=job_pb2.Result(output_key="w")
            )
            await stub.ReportEvent(done, timeout=30)
        for c in clients:
            await c.send("WAITALL 3")
        opened = sum([(await c.reply(30))["ready"] for c in clients])
        if opened >= n:
            break
    # The load: batches every 10 ms over `firehose_jobs` running jobs; every 50th
    # event finishes the job it goes to, which a fresh one then replaces.
    acks: dict[str, float] = {}
    batch = max(1, int(args.firehose_rate / 100))
    load = cpu_load()
    t0 = time.monotonic()
    sent = 0
    errors = 0
    pending: set[asyncio.Task[None]] = set()

    async def send(reqs: list[job_service_pb2.ReportEventRequest]) -> None:
        nonlocal errors
        try:
            reply = await stub.BatchReportEvents(
                job_service_pb2.BatchReportEventsRequest(requests=reqs), timeout=30
            )
            now = time.time()
            for req, res in zip(reqs, reply.results, strict=True):
                if res.code == 0:
                    acks[req.idempotency_key] = now
                else:
                    errors += 1
        except grpc.aio.AioRpcError:
            errors += len(reqs)

    while sent < total:
        reqs = []
        for _ in range(batch):
            i = sent
            sent += 1
            slot = i % len(active)
            j = active[slot]
            key = f"fh-{i}"
            if i % 50 == 49:
                req = job_service_pb2.ReportEventRequest(
                    job_id=j[0], idempotency_key=key, completed=job_pb2.Result(output_key=key)
                )
                active[slot] = next(fresh)
            else:
                progress = job_pb2.Progress(percent=i % 100, phase="work", message=key)
                req = job_service_pb2.ReportEventRequest(
                    job_id=j[0], idempotency_key=key, progress=progress
                )
            reqs.append(req)
        task = asyncio.create_task(send(reqs))
        pending.add(task)
        task.add_done_callback(pending.discard)
        delay = t0 + sent / args.firehose_rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
    await asyncio.gather(*pending)
    achieved = sent / (time.monotonic() - t0)
    await asyncio.sleep(3.0)  # let the last ones arrive
    results = [await c.stop() for c in clients]
    lat = latencies(run, [r["arrivals"] for r in results], acks)
    stream_errors: collections.Counter[str] = collections.Counter()
    for r in results:
        stream_errors.update(r["errors"])
    return {
        "subscribers": n,
        "opened": opened,
        "events": sent,
        "acknowledged": len(acks),
        "report_errors": errors,
        "rate_per_s": round(achieved),
        "deliveries": len(lat),
        "p50_ms": round(run.pct(lat, 50), 1),
        "p99_ms": round(run.pct(lat, 99), 1),
        "max_ms": round(max(lat, default=float("nan")), 1),
        "stream_errors": dict(stream_errors),
        "load_avg_1m": load,
    }


async def measure(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Every phase in `args.phases`; returns {"figures": {...}, "details": {...}}."""
    from bench import run

    WORKDIR[:] = [workdir]
    procs: list[Any] = []
    data = workdir / "data-watchers10k"
    env = run.base_env()
    env["JOBWIRE_DATA_DIR"] = str(data)
    env["JOBWIRE_SHUTDOWN_GRACE_SECONDS"] = "5"
    env["JOBWIRE_WATCH_WORKERS"] = str(args.watch_workers)

    async def start(target: str = "") -> tuple[Any, str, Any, Any]:
        target = target or f"{run.HOST}:{run.free_port()}"
        env["JOBWIRE_GRPC_ADDR"] = target
        p = run.Proc(
            f"service-watchers10k-{len(procs)}", [run.PY, "-m", "cli", "serve"], env, workdir
        )
        procs.append(p)
        await run.wait_grpc(target, p)
        workers = int(env["JOBWIRE_WATCH_WORKERS"])
        await workers_listening(p.pid, int(target.rsplit(":", 1)[1]), workers)
        channel = grpc.aio.insecure_channel(target)
        return p, target, channel, job_service_pb2_grpc.JobServiceStub(channel)

    figures: dict[str, Any] = {}
    details: dict[str, Any] = {"machine_load_avg_start": cpu_load()}
    n = args.watchers
    svc, target, channel, stub = await start()
    try:
        if "open" in args.phases:
            # The first client kind that can run here gives the figures; the others
            # are kept in details.open_by_client (README "Watchers").
            by_client: dict[str, Any] = {}
            for mode in args.open_clients.split(","):
                missing = run.watcher_client_missing("node" if mode == "node" else "python")
                if missing:
                    details.setdefault("open_skipped", {})[mode] = missing
                    run.log(f"watchers10k: {mode} watchers skipped: {missing}")
                    continue
                run.log(f"watchers10k: opening {n} WatchJob streams ({mode} clients)")
                by_client[mode] = await open_phase(run, args, svc, target, stub, mode)
                run.log(f"watchers10k: open ({mode}) {by_client[mode]}")
            details["open_by_client"] = by_client
            o = details["open"] = next(iter(by_client.values()))
            ok = o["ready"] == n and o["refused"] == 0
            figures[f"watchers_{n}_open_s"] = o["open_s"] if ok else float("nan")
            figures[f"watchers_{n}_fanout_p99_ms"] = o["fanout_p99_ms"]
            figures[f"service_rss_mib_{n}_watchers"] = o["rss_mib"]
        if "storm" in args.phases:
            run.log(f"watchers10k: reconnect storm of {n} client-library watchers")
            st, svc, channel, stub = await storm_phase(run, args, start, svc, target, stub, channel)
            details["storm"] = st
            clean = st["resumed"] == n and st["gaps"] == 0 and st["duplicates"] == 0
            figures[f"reconnect_storm_{n}_s"] = st["storm_s"] if clean else float("nan")
            run.log(f"watchers10k: storm {st}")
        if "firehose" in args.phases:
            run.log(f"watchers10k: firehose, {args.subscribers} WatchJobs subscribers")
            fh = await firehose_phase(run, args, target, stub)
            details["firehose"] = fh
            figures[f"watchjobs_{args.subscribers}_subscribers_p99_ms"] = fh["p99_ms"]
            run.log(f"watchers10k: firehose {fh}")
        if args.workers_compare and "open" in args.phases:
            # The same burst and fan-out on a service with watch workers (README
            # "Watchers"): a fresh service on a fresh port, the first client kind.
            await channel.close()
            svc.stop()
            env["JOBWIRE_WATCH_WORKERS"] = str(args.workers_compare)
            env["JOBWIRE_DATA_DIR"] = str(workdir / "data-watchers10k-workers")
            svc, target, channel, stub = await start()
            mode = next(iter(details["open_by_client"]))
            run.log(f"watchers10k: {args.workers_compare} watch workers, {mode} clients")
            ow = await open_phase(run, args, svc, target, stub, mode)
            details["open_watch_workers"] = {"workers": args.workers_compare, **ow}
            run.log(f"watchers10k: open with watch workers {ow}")
    finally:
        await channel.close()
        for p in reversed(procs):
            p.stop()
    details["machine_load_avg_end"] = cpu_load()
    return {"figures": figures, "details": details}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--role", choices=("drive", "client"), default="drive")
    p.add_argument("--phases", default="open,storm,firehose")
    p.add_argument("--watchers", type=int, default=10_000)
    p.add_argument("--procs", type=int, default=4, help="client processes")
    p.add_argument(
        "--open-clients",
        default="node,raw",
        help="watcher processes of the open phase, in order (node, raw: Python grpc.aio); "
        "the first that can run gives the figures",
    )
    p.add_argument("--watch-workers", type=int, default=0, help="JOBWIRE_WATCH_WORKERS")
    p.add_argument(
        "--workers-compare",
        type=int,
        default=2,
        help="then the open phase again with this many watch workers (0: not)",
    )
    p.add_argument("--open-limit", type=float, default=120.0)
    p.add_argument("--storm-limit", type=float, default=120.0)
    p.add_argument("--fanout-events", type=int, default=10)
    p.add_argument("--fanout-rate", type=float, default=2.0)
    p.add_argument("--subscribers", type=int, default=1000)
    p.add_argument("--firehose-rate", type=float, default=1000.0)
    p.add_argument("--firehose-seconds", type=float, default=10.0)
    p.add_argument("--firehose-jobs", type=int, default=1000)
    # client role
    p.add_argument("--mode", choices=("raw", "library", "firehose"), default="raw")
    p.add_argument("--target", default="")
    p.add_argument("--job", default="")
    p.add_argument("--streams", type=int, default=0)
    p.add_argument("--out", default="")
    p.add_argument("--limit", type=float, default=120.0)
    p.add_argument("--index-base", type=int, default=0)
    return p


def main() -> None:
    args = parser().parse_args()
    args.phases = [s.strip() for s in args.phases.split(",") if s.strip()]
    if args.role == "client":
        try:
            import uvloop

            uvloop.run(client_main(args))
        except ImportError:
            asyncio.run(client_main(args))
        return
    import tempfile

    workdir = Path(tempfile.mkdtemp(prefix="watchers-bench-"))
    result = asyncio.run(measure(args, workdir))
    print(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
