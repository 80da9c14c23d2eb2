"""`make bench`: load and latency figures for the embedded store and for MongoDB
(FerretDB), each next to a bare-aiohttp baseline measured in the same run.

Everything runs on loopback in separate processes: the service and the bridge as
`python -m cli serve|bridge`, the load generators (bench.httpload), the
baseline server (bench.bare) and the watchers (bench.watchers). Writes
bench/results/latest.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import math
import os
import platform
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jobwire.v1 import job_pb2, job_service_pb2, job_service_pb2_grpc

if TYPE_CHECKING:
    from bench.peer_bullmq import BullmqPeer

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PY = sys.executable
HOST = "127.0.0.1"
API_KEY = "bench-api-key-" + secrets.token_hex(8)

KEYS = (
    "e2e_callbacks_per_s",
    "e2e_p50_ms",
    "e2e_p99_ms",
    "bare_aiohttp_per_s",
    "e2e_over_bare",
    "fanout_p50_ms",
    "fanout_p99_ms",
    "claims_per_s",
    "double_claims",
    "service_rss_mib_1000_watchers",
    "bridge_peak_rss_mib_100mib_final",
    "e2e_over_bullmq",
    "cpu_us_per_callback",
    "bare_cpu_us_per_request",
    # bench/watchers10k.py (embedded only)
    "watchers_10000_open_s",
    "watchers_10000_fanout_p99_ms",
    "service_rss_mib_10000_watchers",
    "reconnect_storm_10000_s",
    "watchjobs_1000_subscribers_p99_ms",
)
PEER_KEYS = (
    "bullmq_callbacks_per_s",
    "node_bare_per_s",
    "bullmq_fanout_p50_ms",
    "bullmq_fanout_p99_ms",
)
GOALS: dict[str, dict[str, tuple[str, float]]] = {
    "embedded": {
        "e2e_callbacks_per_s": (">=", 4000),
        "e2e_over_bare": (">=", 0.7),
        "e2e_over_bullmq": (">=", 0.5),
        "watchers_10000_open_s": ("<", 15),
        "watchers_10000_fanout_p99_ms": ("<", 250),
        "service_rss_mib_10000_watchers": ("<", 400),
        "reconnect_storm_10000_s": ("<", 60),
        "watchjobs_1000_subscribers_p99_ms": ("<", 250),
    },
    "mongo": {
        "e2e_callbacks_per_s": (">=", 2000),
        "e2e_over_bare": (">=", 0.35),
    },
    "both": {
        "e2e_p99_ms": ("<", 25),
        "fanout_p99_ms": ("<", 50),
        "double_claims": ("==", 0),
        "service_rss_mib_1000_watchers": ("<", 200),
        "bridge_peak_rss_mib_100mib_final": ("<", 300),
    },
}


RETRIED = (grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED)
CREATE_RETRIES: Counter[str] = Counter()


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def proc_status(pid: int, field: str) -> float:
    """A /proc/PID/status field (VmRSS, VmHWM) in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rss_mib(pid: int) -> float:
    """VmRSS of a process and its live descendants (a service's watch workers), MiB."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        own = proc_status(pid, "VmRSS")
    except OSError:
        return 0.0
    return own + sum(rss_mib(int(c)) for c in children)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time so far of a process and its live descendants (the
    worker processes of a bridge with JOBWIRE_HTTP_WORKERS > 1)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return 0.0
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return own + sum(cpu_seconds(int(c)) for c in children)


def delivery_ms(arrivals: dict[str, list[float]], acks: dict[str, float]) -> list[float]:
    """Fan-out delays: each arrival of a message on a watcher after its callback's 200."""
    return [(t - acks[msg]) * 1000 for msg, times in arrivals.items() if msg in acks for t in times]


def send_timings(
    arrivals: dict[str, list[float]], sends: dict[str, float], acks: dict[str, float]
) -> dict[str, float]:
    """The fan-out counted from each callback's send instead of its 200 (which does not
    depend on when the 200 leaves: a 200 held back behind the fan-out made the delays
    after it look short, even negative), and the callbacks' own answer times."""
    answered = {m: sends[m] for m in acks if m in sends}
    from_send = delivery_ms(arrivals, answered)
    answers = [(acks[m] - sends[m]) * 1000 for m in answered]
    return {
        "from_send_p50_ms": pct(from_send, 50),
        "from_send_p99_ms": pct(from_send, 99),
        "callback_p50_ms": pct(answers, 50),
        "callback_max_ms": max(answers) if answers else float("nan"),
    }


# @grpc/grpc-js for the Node watcher clients: the Node example's, installed by
# scripts/install-node-example.sh.
NODE_MODULES = ROOT / "examples" / "node" / "node_modules"
FANOUT_MARK = "tick-"  # fan-out callbacks' messages: "tick-0", "tick-1", ...


def watcher_client_missing(client: str) -> str:
    """Why a fan-out watcher client cannot run here ("" when it can)."""
    if client == "python":
        return ""
    if client != "node":
        return f"unknown watcher client {client!r}"
    if shutil.which("node") is None:
        return "node is not installed"
    if not (NODE_MODULES / "@grpc" / "grpc-js").is_dir():
        return "examples/node/node_modules has no @grpc/grpc-js (scripts/install-node-example.sh)"
    return ""


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))]


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cores": cores,
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "python": platform.python_version(),
        "cpu_model": model or platform.processor(),
        "os": f"{platform.system()} {platform.release()}",
    }


class Proc:
    """A child process whose output goes to a log file; stopped with SIGTERM."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], logdir: Path) -> None:
        self.name = name
        self.log_path = logdir / f"{name}.log"
        with open(self.log_path, "ab") as fh:
            self.popen = subprocess.Popen(
                args,
                env=env,
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=logdir,
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 15) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()

    def tail(self) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-20:])
        except OSError:
            return ""


def base_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), str(ROOT / "proto"), env.get("PYTHONPATH", "")) if p
    )
    for name in ("MONGODB_URI", "JOBWIRE_PUBLIC_URL"):
        env.pop(name, None)
    # Never the default 127.0.0.1:9464 of a developer's running service: a free port.
    env["JOBWIRE_METRICS_ADDR"] = f"{HOST}:0"
    return env


async def wait_grpc(target: str, proc: Proc, timeout: float = 60) -> None:  # noqa: ASYNC109
    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited:\n{proc.tail()}")
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{proc.name} not healthy:\n{proc.tail()}")


async def wait_http(url: str, proc: Proc, timeout: float = 60) -> None:  # noqa: ASYNC109
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited:\n{proc.tail()}")
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(url) as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{proc.name} not ready:\n{proc.tail()}")


async def run_clients(specs: list[dict[str, Any]], workdir: Path) -> list[dict[str, Any]]:
    """Runs one bench.httpload process per spec, all at once; returns their results."""
    start_at = time.time() + 1.0
    procs = []
    paths: list[Path] = []
    for i, spec in enumerate(specs):
        path = workdir / f"spec-{os.getpid()}-{time.monotonic_ns()}-{i}.json"
        path.write_text(json.dumps({**spec, "start_at": start_at, "out": f"{path}.out"}))
        paths.append(path)
        procs.append(
            await asyncio.create_subprocess_exec(
                PY, "-m", "bench.httpload", str(path), env=base_env(), cwd=ROOT
            )
        )
    await asyncio.gather(*(p.wait() for p in procs))
    results = []
    for p, path in zip(procs, paths, strict=True):
        if p.returncode != 0:
            raise RuntimeError(f"load generator failed ({p.returncode})")
        results.append(json.loads(Path(f"{path}.out").read_text()))  # noqa: ASYNC240
    return results


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.procs: list[Proc] = []
        self.details: dict[str, Any] = {}
        self.partial: dict[str, dict[str, Any]] = {}
        # The BullMQ peer (bench/peer_bullmq.py), measured in the embedded store's
        # throughput and fan-out phases, alternating with jobwire.
        self.peer: BullmqPeer | None = None
        self.peer_figures: dict[str, Any] = {}
        self.targets: dict[str, str] = {}

    def opt(self, store: str, name: str) -> Any:
        """A parameter of the run; `--mongo-<name>` overrides it for the mongo store."""
        if store == "mongo" and getattr(self.args, f"mongo_{name}", None) is not None:
            return getattr(self.args, f"mongo_{name}")
        return getattr(self.args, name)

    def spawn(self, name: str, argv: list[str], env: dict[str, str]) -> Proc:
        p = Proc(name, argv, env, self.workdir)
        self.procs.append(p)
        return p

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            p.stop()
        self.procs.clear()

    # -- processes ---------------------------------------------------------

    async def start_bare(self) -> int:
        port = free_port()
        p = self.spawn("bare", [PY, "-m", "bench.bare", HOST, str(port)], base_env())
        await wait_http(f"http://{HOST}:{port}/healthz", p)
        return port

    async def start_service(self, store: str, mongo_uri: str) -> tuple[Proc, str]:
        port = free_port()
        env = base_env()
        env["JOBWIRE_GRPC_ADDR"] = f"{HOST}:{port}"
        env["JOBWIRE_DATA_DIR"] = str(self.workdir / f"data-{store}")
        if mongo_uri:
            env["MONGODB_URI"] = mongo_uri
        p = self.spawn(f"service-{store}", [PY, "-m", "cli", "serve"], env)
        target = f"{HOST}:{port}"
        await wait_grpc(target, p)
        return p, target

    async def start_bridge(self, name: str, target: str, workers: int = 1) -> tuple[Proc, int]:
        port = free_port()
        env = base_env()
        env.update(
            JOBWIRE_HTTP_WORKERS=str(workers),
            JOBWIRE_HTTP_ADDR=f"{HOST}:{port}",
            JOBWIRE_SERVICE_TARGET=target,
            JOBWIRE_ENV_FILE=str(self.workdir / "bridge.env"),
            BATCH_CALLBACK_SECRET="bench-batch-" + secrets.token_hex(8),
            API_KEY=API_KEY,
            TRANSCODE_CALLBACK_TOKEN="bench-transcode-" + secrets.token_hex(8),
        )
        p = self.spawn(name, [PY, "-m", "cli", "bridge"], env)
        await wait_http(f"http://{HOST}:{port}/readyz", p)
        return p, port

    # -- load --------------------------------------------------------------

    def callback_specs(
        self, port: int, jobs: list[list[str]], tag: str, **kw: Any
    ) -> list[dict[str, Any]]:
        n = self.args.clients
        return [
            {
                "host": HOST,
                "port": port,
                "jobs": jobs,
                "tag": f"{tag}{i}",
                "offset": i,
                "stride": n,
                **kw,
            }
            for i in range(n)
        ]

    async def throughput(
        self,
        port: int,
        jobs: list[list[str]],
        tag: str,
        watch: tuple[Proc, ...] = (),
        connections: int = 0,
        grace: float = 0,
    ) -> dict[str, Any]:
        conns = max(1, (connections or self.args.connections) // self.args.clients)
        specs = self.callback_specs(
            port,
            jobs,
            tag,
            mode="closed",
            connections=conns,
            warmup=self.args.warmup,
            duration=self.args.duration,
            grace=grace or self.args.grace,
        )
        cpu0 = [cpu_seconds(p.pid) for p in watch]
        t0 = time.monotonic()
        res = await run_clients(specs, self.workdir)
        wall = time.monotonic() - t0
        cpu_s = [cpu_seconds(p.pid) - c for p, c in zip(watch, cpu0, strict=True)]
        cpu = {p.name: round(c / wall, 2) for p, c in zip(watch, cpu_s, strict=True)}
        ok_total = sum(r.get("ok_total", 0) for r in res)
        return {
            "connections": conns * len(specs),
            "cores_used": cpu,
            # CPU of the watched processes per 200 answered, over the whole run.
            "cpu_us_per_ok": round(sum(cpu_s) * 1e6 / ok_total, 1) if ok_total else float("nan"),
            "cpu_us_per_ok_by_process": {
                p.name: round(c * 1e6 / ok_total, 1) for p, c in zip(watch, cpu_s, strict=True)
            }
            if ok_total
            else {},
            "ok_total": ok_total,
            "per_s": sum(r["per_s"] for r in res),
            "ok_per_s": sum(r["ok_per_s"] for r in res),
            "errors": sum(r["errors"] for r in res),
            "abandoned": sum(r["abandoned"] for r in res),
            "statuses": dict(sum((Counter(r["statuses"]) for r in res), Counter())),
        }

    async def latency(
        self,
        port: int,
        jobs: list[list[str]],
        tag: str,
        duration: float,
        drain: float,
        connections: int = 128,
    ) -> dict[str, Any]:
        n = self.args.clients
        connections = max(1, connections // n)
        specs = self.callback_specs(
            port,
            jobs,
            tag,
            mode="open",
            rate=self.args.rate / n,
            connections=connections,
            warmup=1.0,
            duration=duration,
            drain_timeout=drain,
        )
        res = await run_clients(specs, self.workdir)
        lat = [x for r in res for x in r["latencies_ms"]]
        ok = [x for r in res for x in r["ok_latencies_ms"]]
        sent = sum(r["sent"] for r in res)
        return {
            # Latency of the successful (200) answers, from their scheduled send time.
            "p50_ms": pct(ok, 50),
            "p99_ms": pct(ok, 99),
            "max_ms": max(ok) if ok else float("nan"),
            "p99_all_answers_ms": pct(lat, 99),
            "offered_per_s": self.args.rate,
            "duration_s": duration,
            "connections": connections * n,
            "sent": sent,
            "ok": len(ok),
            "errors": sum(r["errors"] for r in res),
            "statuses": dict(sum((Counter(r["statuses"]) for r in res), Counter())),
            "unfinished": sum(r["unfinished"] for r in res),
            # Meaningful only when most requests succeeded: unanswered ones have no latency.
            "meaningful": len(ok) >= 0.5 * sent,
        }

    async def settle(self, port: int, job: list[str], limit: float = 60, quiet: float = 0) -> float:
        """Waits `quiet` seconds (requests abandoned by the previous phase finish or
        time out), then until a single callback answers 200 within 2 s; returns the
        seconds waited."""
        t0 = time.monotonic()
        await asyncio.sleep(quiet)
        url = f"http://{HOST}:{port}/api/external/jobs/{job[0]}"
        headers = {"Authorization": f"Bearer {job[1]}"}
        timeout = aiohttp.ClientTimeout(total=10)
        k = 0
        async with aiohttp.ClientSession(timeout=timeout) as http:
            while time.monotonic() - t0 < limit:
                k += 1
                body = {"phase": "extract_text", "progress": 1, "message": f"settle {k}"}
                t = time.monotonic()
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with http.post(url, json=body, headers=headers) as resp:
                        await resp.read()
                        if resp.status == 200 and time.monotonic() - t < 2:
                            break
                await asyncio.sleep(1)
        return round(time.monotonic() - t0, 1)

    # -- one store -----------------------------------------------------------

    async def store_run(self, store: str, mongo_uri: str, bare_port: int) -> dict[str, Any]:
        figures: dict[str, Any] = {}
        details = self.details.setdefault(store, {})
        self.partial[store] = figures
        service, target = await self.start_service(store, mongo_uri)
        bridge, port = await self.start_bridge(f"bridge-{store}", target, self.args.http_workers)
        self.targets[store] = target
        channel = grpc.aio.insecure_channel(target)
        stub = job_service_pb2_grpc.JobServiceStub(channel)
        limits = self.opt(store, "phase_limits")
        try:
            t = time.monotonic()
            jobs = await create_jobs(stub, 1000, job_pb2.JOB_KIND_EXTRACTION, f"{store}-x")
            details["create_1000_jobs_s"] = round(time.monotonic() - t, 2)
            log(f"{store}: 1000 extraction jobs in {details['create_1000_jobs_s']} s")
            # Every phase runs within its time limit, after the previous phase's backlog
            # drained; a failed phase is recorded in details and the next one still runs.
            phases: dict[str, Callable[[], Awaitable[None]]] = {
                "throughput": lambda: self.throughput_phase(
                    store, service, bridge, port, bare_port, jobs, figures, details
                ),
                "latency": lambda: self.latency_phase(
                    store, port, bare_port, jobs, figures, details
                ),
                "fanout": lambda: self.fanout_phase(
                    store, stub, port, service, target, figures, details
                ),
                "claims": lambda: self.claims_phase(store, stub, port, figures, details),
                "final": lambda: self.final_phase(store, stub, target, figures, details),
            }
            order = [n for n in self.opt(store, "order").split(",") if n in self.args.phases]
            details["phase_order"] = order
            for name in order:
                phase = phases[name]
                if name != "throughput" and bridge.alive():
                    details.setdefault("settle_s", {})[name] = await self.settle(
                        port, jobs[0], self.opt(store, "settle_limit"), self.opt(store, "quiet")
                    )
                if name == "final" and name == order[-1]:
                    bridge.stop()  # a bridge is needed no more
                t = time.monotonic()
                try:
                    await asyncio.wait_for(phase(), limits[name])
                except Exception as exc:
                    if isinstance(exc, TimeoutError):
                        exc = TimeoutError(f"phase {name} exceeded its {limits[name]} s limit")
                    log(f"{store}: {name} FAILED: {exc!r}"[:1000])
                    details.setdefault("phase_errors", {})[name] = repr(exc)[:1000]
                details.setdefault("phase_s", {})[name] = round(time.monotonic() - t, 1)
        finally:
            await channel.close()
            self.stop_all_but_bare()
            details["create_retries"] = dict(CREATE_RETRIES)
            CREATE_RETRIES.clear()
        return {k: figures.get(k, float("nan")) for k in KEYS}

    async def throughput_phase(
        self,
        store: str,
        service: Proc,
        bridge: Proc,
        port: int,
        bare_port: int,
        jobs: list[list[str]],
        figures: dict[str, Any],
        details: dict[str, Any],
    ) -> None:
        # Throughput: the bare baseline and the bridge back to back, twice,
        # alternating, so a noisy neighbour hits both alike; best of each.
        bare_runs: list[dict[str, Any]] = []
        e2e_runs: list[dict[str, Any]] = []
        peer = self.peer if store == "embedded" else None
        node_runs: list[dict[str, Any]] = []
        bullmq_runs: list[dict[str, Any]] = []
        bare_proc = tuple(p for p in self.procs if p.name == "bare")
        # --workers-compare N: a second bridge with N worker processes (SO_REUSEPORT) on
        # the same service, measured right after the first in every round.
        wide: tuple[Proc, int] | None = None
        wide_runs: list[dict[str, Any]] = []
        n_wide = self.args.workers_compare
        if store == "embedded" and n_wide > 0:
            wide = await self.start_bridge(f"bridge-{store}-w{n_wide}", self.targets[store], n_wide)
        profile_tasks: list[asyncio.Task[None]] = []
        rounds = self.opt(store, "rounds")
        conns = self.opt(store, "connections")
        for rnd in range(rounds):
            if rnd:
                details.setdefault("settle_s", {})[f"throughput{rnd}"] = await self.settle(
                    port, jobs[0], self.opt(store, "settle_limit"), self.opt(store, "quiet")
                )
            bare_runs.append(await self.throughput(bare_port, jobs, f"b{rnd}-", bare_proc))
            grace = self.opt(store, "grace")
            if self.args.profile and rnd == rounds - 1:
                profile_tasks = [
                    asyncio.create_task(self.py_spy(p, f"{store}-{role}"))
                    for p, role in ((service, "service"), (bridge, "bridge"))
                ]
            e2e_runs.append(
                await self.throughput(port, jobs, f"e{rnd}-", (service, bridge), conns, grace)
            )
            log(
                f"{store}: bare {bare_runs[-1]['per_s']:.0f}/s, e2e {e2e_runs[-1]['per_s']:.0f}/s "
                f"(errors {e2e_runs[-1]['errors']}, cores {e2e_runs[-1]['cores_used']}, "
                f"{e2e_runs[-1]['cpu_us_per_ok']} us/callback; bare "
                f"{bare_runs[-1]['cpu_us_per_ok']} us/request)"
            )
            if wide is not None:
                wide_runs.append(
                    await self.throughput(
                        wide[1], jobs, f"w{rnd}-", (service, wide[0]), conns, grace
                    )
                )
                log(
                    f"{store}: e2e with {n_wide} bridge workers {wide_runs[-1]['ok_per_s']:.0f}/s "
                    f"(cores {wide_runs[-1]['cores_used']}, "
                    f"{wide_runs[-1]['cpu_us_per_ok']} us/callback)"
                )
            if peer is not None:
                await self.peer_round(peer, rnd, node_runs, bullmq_runs)
        if profile_tasks:
            await asyncio.gather(*profile_tasks)
        bare = max(r["per_s"] for r in bare_runs)
        # Callbacks answered 200 per second (errors are reported, not counted).
        e2e = max(r["ok_per_s"] for r in e2e_runs)
        details["throughput_runs"] = {"bare": bare_runs, "e2e": e2e_runs}
        figures["e2e_callbacks_per_s"] = round(e2e)
        figures["bare_aiohttp_per_s"] = round(bare)
        figures["e2e_over_bare"] = round(e2e / bare, 3)
        # CPU per acknowledged callback (bridge + service) and per bare request, in the
        # round with the best throughput of each.
        best_e2e = max(e2e_runs, key=lambda r: r["ok_per_s"])
        figures["cpu_us_per_callback"] = best_e2e["cpu_us_per_ok"]
        figures["bare_cpu_us_per_request"] = max(bare_runs, key=lambda r: r["per_s"])[
            "cpu_us_per_ok"
        ]
        if store == "embedded" and self.args.ceiling_seconds > 0:
            details["service_ceiling"] = await self.service_ceiling(service, jobs, store)
        if wide is not None:
            wide[0].stop()
            best = max(r["ok_per_s"] for r in wide_runs)
            details["throughput_runs"][f"e2e_{n_wide}_workers"] = wide_runs
            details[f"e2e_{n_wide}_workers_per_s"] = round(best)
            details[f"e2e_{n_wide}_workers_over_1"] = round(best / e2e, 3) if e2e else None
        if bullmq_runs:
            bullmq = max(r["ok_per_s"] for r in bullmq_runs)
            details["throughput_runs"].update(node_bare=node_runs, bullmq=bullmq_runs)
            self.peer_figures["bullmq_callbacks_per_s"] = round(bullmq)
            self.peer_figures["node_bare_per_s"] = round(max(r["per_s"] for r in node_runs))
            figures["e2e_over_bullmq"] = round(e2e / bullmq, 3) if bullmq else float("nan")

    async def service_ceiling(
        self, service: Proc, jobs: list[list[str]], store: str
    ) -> dict[str, Any]:
        """bench.service_ceiling: BatchReportEvents of 100 events straight to the service."""
        spec = self.workdir / f"ceiling-{store}.json"
        out = self.workdir / f"ceiling-{store}.out.json"
        spec.write_text(
            json.dumps(
                {
                    "jobs": jobs,
                    "seconds": self.args.ceiling_seconds,
                    "batch": 100,
                    "concurrency": 2,
                    "out": str(out),
                }
            )
        )
        proc = await asyncio.create_subprocess_exec(
            PY,
            "-m",
            "bench.service_ceiling",
            self.targets[store],
            str(spec),
            env=base_env(),
            cwd=ROOT,
        )
        cpu0 = cpu_seconds(service.pid)
        await asyncio.wait_for(proc.wait(), 120)
        cpu = cpu_seconds(service.pid) - cpu0
        if proc.returncode != 0:
            return {"error": f"exit status {proc.returncode}"}
        result: dict[str, Any] = json.loads(out.read_text())
        # CPU over the whole subprocess (its set-up included): an upper bound per event.
        result["service_cpu_us_per_event"] = (
            round(cpu * 1e6 / result["events"], 1) if result["events"] else None
        )
        log(
            f"{store}: service ceiling {result['events_per_s']}/s in batches of 100 "
            f"({result['service_cpu_us_per_event']} us service CPU per event)"
        )
        return result

    async def peer_round(
        self,
        peer: BullmqPeer,
        rnd: int,
        node_runs: list[dict[str, Any]],
        bullmq_runs: list[dict[str, Any]],
    ) -> None:
        """The peer's bare node:http and node:http + BullMQ, right after jobwire's round."""
        assert peer.bare is not None and peer.node is not None and peer.redis is not None
        node_runs.append(
            await self.throughput(peer.bare_port, peer.bare_jobs, f"nb{rnd}-", (peer.bare,))
        )
        bullmq_runs.append(
            await self.throughput(peer.node_port, peer.jobs, f"q{rnd}-", (peer.node, peer.redis))
        )
        log(
            f"peer: node bare {node_runs[-1]['per_s']:.0f}/s, bullmq "
            f"{bullmq_runs[-1]['ok_per_s']:.0f}/s (errors {bullmq_runs[-1]['errors']}, "
            f"cores {bullmq_runs[-1]['cores_used']}, "
            f"{bullmq_runs[-1]['cpu_us_per_ok']} us/callback)"
        )

    async def latency_phase(
        self,
        store: str,
        port: int,
        bare_port: int,
        jobs: list[list[str]],
        figures: dict[str, Any],
        details: dict[str, Any],
    ) -> None:
        duration = self.opt(store, "latency_duration")
        drain = self.opt(store, "latency_drain")
        conns = self.opt(store, "latency_connections")
        ok_rate = max(
            (r["ok_per_s"] for r in details.get("throughput_runs", {}).get("e2e", [])), default=0
        )
        seconds = self.opt(store, "sustainable_s")
        if seconds and ok_rate:
            # What a request costs when the server keeps up: half its closed-loop rate
            # (before the 1,000/s run, which leaves a slow server with a backlog).
            rate, self.args.rate = self.args.rate, max(1.0, round(ok_rate / 2, 1))
            try:
                low = await self.latency(port, jobs, "ls-", seconds, drain, conns)
            finally:
                self.args.rate = rate
            details["latency_at_half_throughput"] = low
            log(
                f"{store}: at {low['offered_per_s']}/s: p50 {low['p50_ms']:.1f} "
                f"p99 {low['p99_ms']:.1f} ms ({low['ok']}/{low['sent']} ok)"
            )
            await self.settle(
                port, jobs[0], self.opt(store, "settle_limit"), self.opt(store, "quiet")
            )
        lat = await self.latency(port, jobs, "l-", duration, drain, conns)
        details["latency_1000_per_s"] = lat
        bare_lat = await self.latency(bare_port, jobs, "bl-", duration, drain)
        details["bare_latency_1000_per_s"] = bare_lat
        nan = float("nan")
        figures["e2e_p50_ms"] = round(lat["p50_ms"], 2) if lat["meaningful"] else nan
        figures["e2e_p99_ms"] = round(lat["p99_ms"], 2) if lat["meaningful"] else nan
        log(
            f"{store}: latency p50 {lat['p50_ms']:.1f} p99 {lat['p99_ms']:.1f} ms of "
            f"{lat['ok']}/{lat['sent']} successes (bare p99 {bare_lat['p99_ms']:.1f}); "
            f"errors {lat['errors']}, unfinished {lat['unfinished']}"
        )

    async def fanout_phase(
        self,
        store: str,
        stub: Any,
        port: int,
        service: Proc,
        target: str,
        figures: dict[str, Any],
        details: dict[str, Any],
    ) -> None:
        # The headline is the first watcher client that can run here; each client's
        # run is kept in details.fanout_by_client (README "Against the peer").
        fans: dict[str, dict[str, Any]] = {}
        try:
            for client in self.args.watcher_clients.split(","):
                missing = watcher_client_missing(client)
                if missing:
                    details.setdefault("fanout_skipped", {})[client] = missing
                    log(f"{store}: fanout with {client} watchers skipped: {missing}")
                    continue
                fans[client] = await self.fanout(stub, port, service, target, store, client)
        finally:
            if store == "embedded" and self.peer is not None:
                await self.peer_fanout(self.peer)
        if not fans:
            skipped = details["fanout_skipped"]
            raise RuntimeError(f"fan-out: no watcher client could run ({skipped})")
        fan = next(iter(fans.values()))
        details["fanout"] = {k: v for k, v in fan.items() if k != "rss"}
        details["fanout_by_client"] = {
            c: {k: v for k, v in f.items() if k != "rss"} for c, f in fans.items()
        }
        figures["service_rss_mib_1000_watchers"] = round(fan["rss"], 1)
        if not fan["delivered"]:
            raise RuntimeError(f"fan-out: no event delivered ({fan['callback_errors']} errors)")
        figures["fanout_p50_ms"] = round(fan["p50_ms"], 2)
        figures["fanout_p99_ms"] = round(fan["p99_ms"], 2)
        figures["service_rss_mib_1000_watchers"] = round(fan["rss"], 1)
        for client, f in fans.items():
            log(
                f"{store}: fanout ({client} watchers) p50 {f['p50_ms']:.1f} "
                f"p99 {f['p99_ms']:.1f} ms (from the send: p99 {f['from_send_p99_ms']:.1f}; "
                f"callbacks answered in p50 {f['callback_p50_ms']:.1f} ms, max "
                f"{f['callback_max_ms']:.1f}), service RSS {f['rss']:.0f} MiB with 1000 watchers"
            )

    async def peer_fanout(self, peer: BullmqPeer) -> None:
        """The same events, rate and listener count through BullMQ's QueueEvents."""
        try:
            fan = await peer.fanout(
                self.args.watchers,
                self.args.fanout_events,
                self.args.fanout_rate,
                self.args.watchers_ready_limit,
            )
        except Exception as exc:
            log(f"peer: bullmq fanout FAILED: {exc!r}"[:1000])
            self.details.setdefault("peers", {})["bullmq_fanout_error"] = repr(exc)[:1000]
            return
        self.details.setdefault("peers", {})["bullmq_fanout"] = fan
        if fan["delivered"]:
            self.peer_figures["bullmq_fanout_p50_ms"] = round(fan["p50_ms"], 2)
            self.peer_figures["bullmq_fanout_p99_ms"] = round(fan["p99_ms"], 2)
        log(
            f"peer: bullmq fanout p50 {fan['p50_ms']:.1f} p99 {fan['p99_ms']:.1f} ms "
            f"(from the send: p99 {fan['from_send_p99_ms']:.1f}; callbacks answered in p50 "
            f"{fan['callback_p50_ms']:.1f} ms, max {fan['callback_max_ms']:.1f}; "
            f"{fan['delivered']}/{fan['expected']} delivered)"
        )

    async def claims_phase(
        self, store: str, stub: Any, port: int, figures: dict[str, Any], details: dict[str, Any]
    ) -> None:
        cl = await self.claims(stub, port, store)
        details["claims"] = {k: v for k, v in cl.items() if k not in ("per_s", "double")}
        details["claims"]["drained"] = cl["claimed"] >= cl["queued"]
        figures["claims_per_s"] = round(cl["per_s"])
        figures["double_claims"] = cl["double"]
        log(f"{store}: claims {cl['per_s']:.0f}/s, double claims {cl['double']}")

    async def final_phase(
        self, store: str, stub: Any, target: str, figures: dict[str, Any], details: dict[str, Any]
    ) -> None:
        peak = await self.big_final(stub, target, store)
        figures["bridge_peak_rss_mib_100mib_final"] = round(peak["peak_mib"], 1)
        details["big_final"] = peak
        log(
            f"{store}: bridge peak RSS {peak['peak_mib']:.0f} MiB for the 100 MiB final "
            f"(status {peak['status']})"
        )

    def stop_all_but_bare(self) -> None:
        keep = [p for p in self.procs if p.name == "bare"]
        for p in reversed(self.procs):
            if p.name != "bare":
                p.stop()
        self.procs = keep

    async def fanout(
        self, stub: Any, port: int, service: Proc, target: str, store: str, client: str
    ) -> dict[str, Any]:
        """`args.watchers` WatchJob streams on one job, in one watcher process of
        `client` ("node": bench/watchers10k_client.js, like the BullMQ peer's
        listeners; "python": bench.watchers, grpc.aio), and `fanout_events` progress
        callbacks timed from each 200 to each arrival."""
        (job,) = await create_jobs(stub, 1, job_pb2.JOB_KIND_EXTRACTION, f"{store}-{client}")
        out = self.workdir / f"watchers-{store}-{client}.json"
        limit = self.opt(store, "watchers_ready_limit")
        t_watch = time.monotonic()
        from bench import watchers10k

        if client == "node":
            node = await watchers10k.spawn_node(
                sys.modules[__name__], target, job[0], self.args.watchers, limit, out, FANOUT_MARK
            )
            await node.connected(60)
            await node.send("GO")
            # Streams that had their snapshot; fewer than asked when the server is too
            # slow to open them all within the limit (the figures then cover only those).
            watchers_ready = int((await node.reply(limit + 40))["ready"])
            watchers = node
        else:
            pipe = asyncio.subprocess.PIPE
            argv = [PY, "-m", "bench.watchers", target, job[0], str(self.args.watchers)]
            proc = await asyncio.create_subprocess_exec(
                *argv, str(out), str(limit), env=base_env(), cwd=ROOT, stdin=pipe, stdout=pipe
            )
            watchers = watchers10k.ClientProc(proc, out)  # it too ends on STOP, writing `out`
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 330)
            if not line.startswith(b"READY "):
                raise RuntimeError("watchers did not start")
            watchers_ready = int(line.split()[1])
        watchers_ready_s = round(time.monotonic() - t_watch, 1)
        await asyncio.sleep(1.0)
        rss = rss_mib(service.pid)
        acks: dict[str, float] = {}
        sends: dict[str, float] = {}
        callback_errors: Counter[int] = Counter()
        spy = None
        if self.args.profile:
            seconds = self.args.fanout_events / self.args.fanout_rate
            spy = asyncio.create_task(
                self.py_spy(service, f"{store}-service-fanout-{client}", seconds)
            )
        url = f"http://{HOST}:{port}/api/external/jobs/{job[0]}"
        headers = {"Authorization": f"Bearer {job[1]}"}
        async with aiohttp.ClientSession() as http:
            for k in range(self.args.fanout_events):
                msg = f"{FANOUT_MARK}{k}"
                body = {
                    "phase": "extract_text",
                    "progress": k % 100,
                    "message": msg,
                    "process": {"id": "sec-1"},
                }
                sends[msg] = time.time()
                async with http.post(url, json=body, headers=headers) as resp:
                    await resp.read()
                    if resp.status == 200:
                        acks[msg] = time.time()
                    else:
                        callback_errors[resp.status] += 1
                await asyncio.sleep(1 / self.args.fanout_rate)
        if spy is not None:
            await spy
        await asyncio.sleep(1.0)
        rss = max(rss, rss_mib(service.pid))
        data = await watchers.stop()
        lat = delivery_ms(data["arrivals"], acks)
        expected = self.args.watchers * len(acks)
        return {
            "watcher_client": client,
            "p50_ms": pct(lat, 50),
            "p99_ms": pct(lat, 99),
            "max_ms": max(lat) if lat else float("nan"),
            **send_timings(data["arrivals"], sends, acks),
            "delivered": len(lat),
            "expected": expected,
            "events": len(acks),
            "callback_errors": dict(callback_errors),
            "watchers": self.args.watchers,
            "watchers_ready_s": watchers_ready_s,
            "watchers_ready": watchers_ready,
            "stream_errors": Counter(data["errors"]),
            "rss": rss,
        }

    async def claims(self, stub: Any, port: int, store: str) -> dict[str, Any]:
        t = time.monotonic()
        n = self.opt(store, "videos")
        await create_jobs(stub, n, job_pb2.JOB_KIND_VIDEO, f"{store}-v")
        created_s = time.monotonic() - t
        log(f"{store}: {n} queued videos in {created_s:.1f} s")
        per = self.args.claim_workers // self.args.clients
        specs = [
            {
                "mode": "claims",
                "host": HOST,
                "port": port,
                "path": "/api/pending",
                "api_key": API_KEY,
                "workers": per,
                "tag": f"w{i}",
                "time_limit": self.opt(store, "claim_limit"),
            }
            for i in range(self.args.clients)
        ]
        t0 = time.time() + 1.0  # run_clients starts them one second from now
        res = await run_clients(specs, self.workdir)
        ids = [i for r in res for i in r["ids"]]
        elapsed = max(r["end"] for r in res) - t0
        return {
            "per_s": len(ids) / elapsed,
            "double": len(ids) - len(set(ids)),
            "claimed": len(ids),
            "queued": n,
            "errors": sum(r["errors"] for r in res),
            "elapsed_s": round(elapsed, 2),
            "time_limit_s": self.opt(store, "claim_limit"),
            "workers": per * self.args.clients,
            "create_s": round(created_s, 2),
        }

    async def big_final(self, stub: Any, target: str, store: str) -> dict[str, Any]:
        bridge, port = await self.start_bridge(f"bridge-{store}-final", target)
        (job,) = await create_jobs(stub, 1, job_pb2.JOB_KIND_EXTRACTION, f"{store}-big")
        archive = base64.b64encode(os.urandom(75 * 1024 * 1024 - 1024 * 1024 * 1)).decode()
        text = "# Extracted\n\n" + ("lorem ipsum dolor sit amet " * 40 + "\n") * (
            (100 * 1024 * 1024 - len(archive)) // 1081
        )
        body = json.dumps(
            {
                "phase": "completed",
                "message": "done",
                "data": {
                    "extracted_text": text,
                    "images_archive_data": archive,
                    "images_archive_filename": "images.zip",
                    "metadata": {"pages": 12},
                },
            }
        ).encode()
        del archive, text
        before = proc_status(bridge.pid, "VmHWM")
        peak = before
        stop = asyncio.Event()

        async def sample() -> None:
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, proc_status(bridge.pid, "VmHWM"))
                await asyncio.sleep(0.05)

        sampler = asyncio.create_task(sample())
        t = time.monotonic()
        timeout = aiohttp.ClientTimeout(total=300)
        async with (
            aiohttp.ClientSession(timeout=timeout) as http,
            http.post(
                f"http://{HOST}:{port}/api/external/jobs/{job[0]}",
                data=body,
                headers={"Authorization": f"Bearer {job[1]}", "Content-Type": "application/json"},
            ) as resp,
        ):
            status = resp.status
            await resp.read()
        elapsed = time.monotonic() - t
        stop.set()
        await sampler
        peak = max(peak, proc_status(bridge.pid, "VmHWM"))
        bridge.stop()
        return {
            "peak_mib": peak,
            "idle_mib": round(before, 1),
            "status": status,
            "body_mib": round(len(body) / 2**20, 1),
            "seconds": round(elapsed, 2),
        }

    async def py_spy(self, proc: Proc, name: str, seconds: float = 0) -> None:
        spy = shutil.which("py-spy") or str(Path(PY).parent / "py-spy")
        if not Path(spy).exists():  # noqa: ASYNC240
            log("py-spy not installed; no profile")
            return
        raw = RESULTS / f"profile-{name}.folded"
        p = await asyncio.create_subprocess_exec(
            spy,
            "record",
            "--pid",
            str(proc.pid),
            "--duration",
            str(int(seconds or self.args.warmup + self.args.duration + 1)),
            "--rate",
            "200",
            "--format",
            "raw",
            "--output",
            str(raw),
            "--nonblocking",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        await p.wait()
        if raw.exists():
            (RESULTS / f"profile-{name}.txt").write_text(summarise_folded(raw))
            raw.unlink()


def summarise_folded(path: Path, top: int = 25) -> str:
    """Top frames by self and by inclusive samples, from py-spy's collapsed stacks."""
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack:
            continue
        count = int(n)
        total += count
        frames = stack.split(";")
        own[frames[-1]] += count
        for f in set(frames):
            incl[f] += count
    out = [f"samples: {total}", "", "## self (top frames)"]
    out += [f"{100 * c / total:5.1f}%  {f}" for f, c in own.most_common(top)]
    out += ["", "## inclusive"]
    out += [f"{100 * c / total:5.1f}%  {f}" for f, c in incl.most_common(top + 15)]
    return "\n".join(out) + "\n"


async def create_jobs(
    stub: Any,
    n: int,
    kind: job_pb2.JobKind.ValueType,
    prefix: str,
    concurrency: int = 64,
) -> list[list[str]]:
    out: list[list[str]] = [[] for _ in range(n)]
    nxt = 0

    async def worker() -> None:
        nonlocal nxt
        while nxt < n:
            i = nxt
            nxt += 1
            job = job_pb2.Job(kind=kind)
            if kind == job_pb2.JOB_KIND_VIDEO:  # CreateJob requires a video job's url
                job.video.url = f"https://videos.example.com/{prefix}/{i}.m3u8"
                job.video.title = f"Video {i}"
                job.video.playlist = "bench"
                job.video.subtitle = "es"
            # Set-up, not a measurement: a create that fails on a busy server (FerretDB/
            # SQLite answers "database is locked" to concurrent writers) is retried under
            # a new id and counted in CREATE_RETRIES.
            for attempt in range(6):
                job_id = f"{prefix}-{i:05d}" + (f"-r{attempt}" if attempt else "")
                try:
                    reply = await stub.CreateJob(
                        job_service_pb2.CreateJobRequest(job=job, job_id=job_id), timeout=60
                    )
                    break
                except grpc.aio.AioRpcError as exc:
                    if attempt == 5 or exc.code() not in RETRIED:
                        raise
                    CREATE_RETRIES[exc.code().name] += 1
                    await asyncio.sleep(0.5 * (attempt + 1))
            out[i] = [reply.job.id, reply.callback_token]

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return out


@contextlib.contextmanager
def ferretdb(workdir: Path) -> Iterator[str]:
    from tests.mongo_server import FerretDBProcess, ferretdb_binary

    binary = ferretdb_binary()
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        raise RuntimeError(f"FerretDB not found at {binary} (make ferretdb)")
    server = FerretDBProcess(binary, base_dir=workdir / "ferretdb")
    server.start()
    try:
        yield server.uri
    finally:
        server.stop()


async def scan(uri: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """bench.ferretdb_scan on the same server, before the store run (an empty server)."""
    out = workdir / "ferretdb-scan.json"
    t = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        PY,
        "-m",
        "bench.ferretdb_scan",
        uri,
        "--sizes",
        args.mongo_scan_sizes,
        "--ops",
        str(args.mongo_scan_ops),
        "--out",
        str(out),
        env=base_env(),
        cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL,
    )
    try:
        await asyncio.wait_for(proc.wait(), args.mongo_scan_limit)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return {"error": f"exceeded {args.mongo_scan_limit} s"}
    if proc.returncode != 0:
        return {"error": f"exit status {proc.returncode}"}
    result: dict[str, Any] = json.loads(out.read_text())
    result["seconds"] = round(time.monotonic() - t, 1)
    log(
        "ferretdb_scan: update_one ms (median) by collection size: "
        + ", ".join(f"{n}: {r['update_one_ms']['median']}" for n, r in result["sizes"].items())
    )
    return result


async def watchers10k_phase(
    workdir: Path, figures: dict[str, Any], details: dict[str, Any]
) -> None:
    """bench/watchers10k.py with its defaults, on a service of its own."""
    from bench import watchers10k

    wargs = watchers10k.parser().parse_args([])
    wargs.phases = ["open", "storm", "firehose"]
    t = time.monotonic()
    try:
        out = await asyncio.wait_for(watchers10k.measure(wargs, workdir), 900)
    except Exception as exc:
        log(f"watchers10k FAILED: {exc!r}"[:1000])
        details.setdefault("phase_errors", {})["watchers10k"] = repr(exc)[:1000]
        return
    finally:
        details.setdefault("phase_s", {})["watchers10k"] = round(time.monotonic() - t, 1)
    figures.update(out["figures"])
    details["watchers10k"] = out["details"]


async def firehose_cost_phase(workdir: Path, details: dict[str, Any]) -> None:
    """bench/firehose_cost.py (embedded): callbacks with the firehose log on vs off."""
    from bench import firehose_cost

    t = time.monotonic()
    try:
        out = await asyncio.wait_for(
            firehose_cost.measure_store(firehose_cost.parser().parse_args([]), workdir, "embedded"),
            300,
        )
    except Exception as exc:
        log(f"firehose_cost FAILED: {exc!r}"[:1000])
        details.setdefault("phase_errors", {})["firehose_cost"] = repr(exc)[:1000]
        return
    finally:
        details.setdefault("phase_s", {})["firehose_cost"] = round(time.monotonic() - t, 1)
    details["firehose_cost"] = out
    log(
        f"firehose log on/off: {out['on_over_off_per_s']} x callbacks/s, "
        f"{out['on_over_off_cpu']} x CPU per callback"
    )


def check(value: Any, op: str, goal: float) -> bool:
    return {">=": value >= goal, "<": value < goal, "==": value == goal}[op]


def goal_of(store: str, key: str) -> tuple[str, float] | None:
    return GOALS[store].get(key) or GOALS["both"].get(key)


def table(results: dict[str, Any]) -> str:
    stores = [s for s in ("embedded", "mongo") if s in results]
    head = (
        "| figure | "
        + " | ".join("embedded (SQLite)" if s == "embedded" else "mongo (FerretDB)" for s in stores)
        + " |"
    )
    lines = [head, "|---|" + "---:|" * len(stores)]
    for key in KEYS:
        cells = []
        for s in stores:
            v = results[s][key]
            g = goal_of(s, key)
            mark = ""
            if g is not None:
                mark = " ✅" if check(v, *g) else f" ❌ (goal {g[0]} {g[1]:g})"
            cells.append(f"{v:g}{mark}" if isinstance(v, (int, float)) else f"{v}{mark}")
        lines.append(f"| `{key}` | " + " | ".join(cells) + " |")
    for key, value in results.get("peers", {}).items():
        lines.append(f"| `peers.{key}` | {value:g} |" + " |" * (len(stores) - 1))
    emb, peers = results.get("embedded", {}), results.get("peers", {})
    ratio_goals = (
        ("cpu_us_per_callback", "bare_cpu_us_per_request", 2.0),
        ("fanout_p99_ms", "bullmq_fanout_p99_ms", 0.5),
    )
    for num, den, goal in ratio_goals:
        label = f"{num} / {'peers.' if den in peers else ''}{den}"
        a, b = emb.get(num), emb.get(den, peers.get(den))
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b and a == a and b == b:
            ratio = a / b
            mark = "✅" if ratio <= goal else f"❌ (goal <= {goal:g})"
            lines.append(f"| {label} | {ratio:.2f} {mark} |" + " |" * (len(stores) - 1))
    skipped = results.get("details", {}).get("peers", {}).get("skipped")
    if skipped:
        lines.append(f"\nPeer BullMQ skipped: {skipped}")
    m = results["machine"]
    lines.append("")
    lines.append(
        f"Machine: {m['cores']} cores ({m['cpu_model']}), {m['memory_gib']} GiB, "
        f"Python {m['python']}, {m['os']}; commit {results.get('commit', '?')}."
    )
    return "\n".join(lines)


async def start_peer(bench: Bench, workdir: Path) -> None:
    """Starts the BullMQ peer, or records why it is skipped (details.peers.skipped)."""
    from bench.peer_bullmq import BullmqPeer

    peer = BullmqPeer(workdir)
    details = bench.details.setdefault("peers", {})
    try:
        reason = await peer.start()
    except Exception as exc:
        reason = f"peer did not start: {exc!r}"[:1000]
    if reason:
        peer.stop()
        details["skipped"] = reason
        log(f"peer bullmq SKIPPED: {reason}")
        return
    details["bullmq"] = {"redis": "appendonly yes, appendfsync always", "jobs": len(peer.jobs)}
    bench.peer = peer
    log(f"peer bullmq: redis on {peer.redis_port}, endpoints {peer.node_port}/{peer.bare_port}")


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="jobwire-bench-"))
    bench = Bench(args, workdir)
    results: dict[str, Any] = {"machine": machine()}
    with contextlib.suppress(Exception):
        results["commit"] = subprocess.run(  # noqa: ASYNC221
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    t0 = time.monotonic()
    try:
        bare_port = await bench.start_bare()
        if "bullmq" in args.peers:
            await start_peer(bench, workdir)
        for store in args.stores:
            log(store)
            try:
                if store == "mongo":
                    with ferretdb(workdir) as uri:
                        if args.mongo_scan_sizes:
                            bench.details.setdefault(store, {})["ferretdb_scan"] = await scan(
                                uri, args, workdir
                            )
                        results[store] = await bench.store_run(store, uri, bare_port)
                else:
                    results[store] = await bench.store_run(store, "", bare_port)
                    if "watchers10k" in args.phases:
                        await watchers10k_phase(workdir, results[store], bench.details[store])
                    if "firehose_cost" in args.phases:
                        await firehose_cost_phase(workdir, bench.details[store])
                    if "tracing_cost" in args.phases:  # bench/tracing_cost.py
                        from bench.tracing_cost import phase as tracing_cost_phase

                        await tracing_cost_phase(workdir, bench.details[store], args)
            except Exception as exc:  # keep what was measured, say what broke
                log(f"{store}: FAILED: {exc!r}"[:2000])
                partial = bench.partial.get(store, {})
                results[store] = {k: partial.get(k, float("nan")) for k in KEYS}
                bench.details.setdefault(store, {})["error"] = repr(exc)[:2000]
                bench.stop_all_but_bare()
        if "dashboard" in args.phases:  # bench/dashboard.py: its own service and browser
            from bench.dashboard import phase as dashboard_phase

            await dashboard_phase(workdir, results, bench.details)
    finally:
        if bench.peer is not None:
            bench.peer.stop()
        bench.stop_all()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            log(f"kept {workdir}")
    if "bullmq" in args.peers:
        results["peers"] = {k: bench.peer_figures.get(k, float("nan")) for k in PEER_KEYS}
    results["details"] = bench.details
    results["seconds"] = round(time.monotonic() - t0, 1)
    return results


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--stores", default="embedded,mongo")
    p.add_argument("--clients", type=int, default=2, help="load generator processes")
    p.add_argument("--connections", type=int, default=256, help="closed-loop, all clients")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--rate", type=float, default=1000.0)
    p.add_argument("--latency-duration", type=float, default=8.0)
    p.add_argument("--watchers", type=int, default=1000)
    p.add_argument("--fanout-events", type=int, default=30)
    p.add_argument("--fanout-rate", type=float, default=5.0)
    p.add_argument(
        "--watcher-clients",
        default="node,python",
        help="fan-out watcher processes, in order; the first that runs gives the figures",
    )
    p.add_argument("--videos", type=int, default=10_000)
    p.add_argument("--claim-workers", type=int, default=32)
    p.add_argument("--claim-limit", type=float, default=120.0)
    p.add_argument("--grace", type=float, default=30.0, help="closed loop: abandon after")
    p.add_argument("--latency-drain", type=float, default=30.0)
    p.add_argument("--latency-connections", type=int, default=128)
    p.add_argument("--sustainable-s", type=float, default=0.0)
    p.add_argument("--settle-limit", type=float, default=60.0)
    p.add_argument("--quiet", type=float, default=0.0, help="pause between phases")
    p.add_argument("--order", default="throughput,latency,fanout,claims,final")
    # The 1,000/s latency run leaves FerretDB with work it goes on with after the
    # load generator gave up; it runs last, so it cannot spoil the other phases.
    p.add_argument("--mongo-order", default="throughput,fanout,claims,final,latency")
    # MongoDB (FerretDB/SQLite) is far slower: every phase is bounded by time instead,
    # with a load that does not drive the service into its 5 s operation timeout.
    p.add_argument("--mongo-connections", type=int, default=4)
    p.add_argument("--mongo-rounds", type=int, default=1)
    p.add_argument("--mongo-latency-duration", type=float, default=2.0)
    p.add_argument("--mongo-latency-drain", type=float, default=8.0)
    # Few connections: the schedule stays 1,000/s (latency counts from the scheduled
    # send, queueing in the client included) but FerretDB is not left with a backlog
    # of abandoned work that would stall the next phases for minutes.
    p.add_argument("--mongo-latency-connections", type=int, default=4)
    p.add_argument("--mongo-settle-limit", type=float, default=30.0)
    p.add_argument("--watchers-ready-limit", type=float, default=290.0)
    p.add_argument("--mongo-watchers-ready-limit", type=float, default=140.0)
    p.add_argument("--mongo-quiet", type=float, default=6.0, help="> the 5 s op timeout")
    p.add_argument(
        "--mongo-sustainable-s",
        type=float,
        default=6.0,
        help="also the latency at half the measured throughput (details only); 0 skips",
    )
    p.add_argument("--mongo-videos", type=int, default=1000)
    p.add_argument("--mongo-claim-limit", type=float, default=30.0)
    p.add_argument("--mongo-grace", type=float, default=8.0)
    p.add_argument("--mongo-scan-sizes", default="100,1000,5000", help="'' skips it")
    p.add_argument("--mongo-scan-ops", type=int, default=30)
    p.add_argument("--mongo-scan-limit", type=float, default=120.0)
    p.add_argument(
        "--phases",
        default="throughput,latency,fanout,claims,final,watchers10k,firehose_cost,tracing_cost,"
        "dashboard",
        help="stop early for quick runs",
    )
    p.add_argument(
        "--peers",
        default="bullmq",
        help="'bullmq' (Node + BullMQ on Redis, alongside embedded) or '' (none)",
    )
    p.add_argument(
        "--ceiling-seconds", type=float, default=5.0, help="service alone over gRPC; 0 skips"
    )
    p.add_argument("--http-workers", type=int, default=1, help="JOBWIRE_HTTP_WORKERS of the bridge")
    p.add_argument(
        "--workers-compare",
        type=int,
        default=0,
        help="also measure a bridge with this many workers in the embedded throughput phase",
    )
    p.add_argument("--tracing-rounds", type=int, default=4, help="tracing_cost: off/on rounds")
    p.add_argument("--tracing-duration", type=float, default=4.0)
    p.add_argument("--tracing-connections", type=int, default=64)
    p.add_argument("--profile", action="store_true", help="py-spy the service and bridge")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--output", default=str(RESULTS / "latest.json"))
    args = p.parse_args()
    args.stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    args.phase_limits = {
        "throughput": 240,
        "latency": 180,
        "fanout": 300,
        "claims": 240,
        "final": 300,
    }
    args.mongo_phase_limits = {
        "throughput": 60,
        "latency": 60,
        "fanout": 210,
        "claims": 75,
        "final": 60,
    }
    results = asyncio.run(amain(args))
    # Strict JSON: a figure that could not be measured is null, not NaN.
    Path(args.output).write_text(json.dumps(_no_nan(results), indent=2, allow_nan=False) + "\n")
    print(table(results))
    print(f"\n(results in {args.output}; {results['seconds']} s)")


if __name__ == "__main__":
    main()


def _no_nan(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_nan(v) for v in value]
    return value
