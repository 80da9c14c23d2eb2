"""The peer of `make bench`: BullMQ on Redis behind a small `node:http` endpoint
(bench/peers/bullmq/), the setup a team would most likely pick instead of jobwire.

- redis-server (Debian's) on a free loopback port, its own directory in the bench's
  work dir, `appendonly yes` + `appendfsync always`: a progress update is in the AOF
  and fsynced before Redis answers, so before the endpoint's 200 (jobwire's guarantee).
- `server.js --redis`: the Secretary progress callback (per-job Bearer token compared
  in constant time, JSON checked) -> `job.updateProgress`; `server.js` without Redis
  is the same endpoint answering after its checks (Node's ceiling).
- `watchers.js`: N BullMQ `QueueEvents` listeners in one Node process, timed like
  jobwire's WatchJob fan-out (from the callback's 200 to each listener).

`install.sh` installs what is missing (apt-get redis-server/nodejs, `npm ci` of the
pinned package-lock.json); when it cannot, the peer is skipped with its reason recorded
in latest.json (`details.peers.skipped`), never silently.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp

from bench.run import (
    HOST,
    ROOT,
    Proc,
    base_env,
    delivery_ms,
    free_port,
    pct,
    proc_status,
    send_timings,
    wait_http,
)

PEER_DIR = ROOT / "bench" / "peers" / "bullmq"


class BullmqPeer:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[Proc] = []
        self.env: dict[str, str] = {}
        self.redis: Proc | None = None
        self.redis_port = 0
        self.node: Proc | None = None  # node:http + BullMQ
        self.node_port = 0
        self.bare: Proc | None = None  # node:http alone
        self.bare_port = 0
        self.jobs: list[list[str]] = []
        self.bare_jobs: list[list[str]] = []

    async def start(self) -> str:
        """Starts Redis and both endpoints; returns '' or why the peer is skipped."""
        node_path = await self._install()
        if node_path.startswith("!"):
            return node_path[1:]
        redis = shutil.which("redis-server")
        node = shutil.which("node")
        if redis is None or node is None:
            return "redis-server or node not on PATH after install.sh"
        self.env = {**base_env(), "NODE_PATH": node_path}
        data = self.workdir / "redis"
        data.mkdir(exist_ok=True)
        self.redis_port = free_port()
        self.redis = self._spawn(
            "redis",
            [
                redis,
                "--port", str(self.redis_port),
                "--bind", HOST,
                "--dir", str(data),
                "--appendonly", "yes",
                "--appendfsync", "always",
                "--save", "",
                "--daemonize", "no",
                "--protected-mode", "yes",
            ],
        )  # fmt: skip
        await wait_redis(self.redis_port, self.redis)
        self.node, self.node_port, self.jobs = await self._endpoint("node-bullmq", redis=True)
        self.bare, self.bare_port, self.bare_jobs = await self._endpoint("node-bare", redis=False)
        return ""

    async def _install(self) -> str:
        proc = await asyncio.create_subprocess_exec(
            "bash",
            str(PEER_DIR / "install.sh"),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), 600)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            return "!install.sh took more than 600 s"
        if proc.returncode != 0:
            reason = err.decode(errors="replace").strip().splitlines()
            return "!" + (reason[-1] if reason else f"install.sh exit status {proc.returncode}")
        return out.decode().strip().splitlines()[-1]

    def _spawn(self, name: str, argv: list[str]) -> Proc:
        p = Proc(name, argv, self.env, self.workdir)
        self.procs.append(p)
        return p

    async def _endpoint(self, name: str, redis: bool) -> tuple[Proc, int, list[list[str]]]:
        port = free_port()
        jobs_file = self.workdir / f"{name}-jobs.json"
        argv = ["node", str(PEER_DIR / "server.js"), "--port", str(port), "--jobs", "1000"]
        argv += ["--jobs-out", str(jobs_file)]
        if redis:
            argv += ["--redis", str(self.redis_port)]
        p = self._spawn(name, argv)
        await wait_http(f"http://{HOST}:{port}/healthz", p)
        jobs: list[list[str]] = json.loads(jobs_file.read_text())
        return p, port, jobs

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()
        self.procs.clear()

    async def fanout(self, watchers: int, events: int, rate: float, limit: float) -> dict[str, Any]:
        """BullMQ's fan-out: `events` progress callbacks at `rate`/s to the BullMQ
        endpoint, each timed from its 200 to its arrival at each QueueEvents listener."""
        assert self.redis is not None
        out = self.workdir / "bullmq-watchers.json"
        proc = await asyncio.create_subprocess_exec(
            "node",
            str(PEER_DIR / "watchers.js"),
            str(self.redis_port),
            str(watchers),
            str(out),
            str(limit),
            env=self.env,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None and proc.stdin is not None
        t_watch = time.monotonic()
        line = await asyncio.wait_for(proc.stdout.readline(), limit + 30)
        if not line.startswith(b"READY "):
            proc.kill()
            await proc.wait()
            raise RuntimeError("BullMQ watchers did not start")
        ready = int(line.split()[1])
        ready_s = round(time.monotonic() - t_watch, 1)
        await asyncio.sleep(1.0)
        job_id, token = self.jobs[0]
        url = f"http://{HOST}:{self.node_port}/api/external/jobs/{job_id}"
        headers = {"Authorization": f"Bearer {token}"}
        acks: dict[str, float] = {}
        sends: dict[str, float] = {}
        errors: Counter[int] = Counter()
        async with aiohttp.ClientSession() as http:
            for k in range(events):
                msg = f"fan {k}"
                body = {"phase": "extract_text", "progress": k % 100, "message": msg}
                sends[msg] = time.time()
                async with http.post(url, json=body, headers=headers) as resp:
                    await resp.read()
                    if resp.status == 200:
                        acks[msg] = time.time()
                    else:
                        errors[resp.status] += 1
                await asyncio.sleep(1 / rate)
        await asyncio.sleep(1.0)
        rss = round(proc_status(proc.pid, "VmRSS"), 1)
        proc.stdin.write(b"STOP\n")
        await proc.stdin.drain()
        await asyncio.wait_for(proc.wait(), 60)
        data = json.loads(out.read_text())
        lat = delivery_ms(data["arrivals"], acks)
        return {
            "p50_ms": pct(lat, 50),
            "p99_ms": pct(lat, 99),
            "max_ms": max(lat) if lat else float("nan"),
            **send_timings(data["arrivals"], sends, acks),
            "delivered": len(lat),
            "expected": ready * len(acks),
            "events": len(acks),
            "callback_errors": dict(errors),
            "watchers": watchers,
            "watchers_ready": ready,
            "watchers_ready_s": ready_s,
            "listener_errors": dict(Counter(data["errors"])),
            "node_watchers_rss_mib": rss,
        }


async def wait_redis(port: int, proc: Proc, timeout: float = 30) -> None:  # noqa: ASYNC109
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"redis-server exited:\n{proc.tail()}")
        try:
            reader, writer = await asyncio.open_connection(HOST, port)
            writer.write(b"PING\r\n")
            reply = await asyncio.wait_for(reader.readline(), 2)
            writer.close()
            if reply.startswith(b"+PONG"):
                return
        except (OSError, TimeoutError):
            pass
        await asyncio.sleep(0.1)
    raise RuntimeError(f"redis-server not answering:\n{proc.tail()}")
