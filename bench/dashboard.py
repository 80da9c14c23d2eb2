"""The dashboard's figures (`make bench`, keys under `dashboard`).

- first_render_ms_10000_jobs: the jobs page ready (its first page of 50 rows in the DOM)
  with 10,000 jobs stored; median of 5 loads in chromium (the first, with the dashboard's
  queue-depth cache cold, is in details);
- dom_update_p50_ms / _p99_ms: from a Secretary callback's 2xx to the row's progress bar
  showing that progress (or a later one: updates are coalesced per job) in the browser,
  at 100 callbacks/s over the 50 rows shown (MutationObserver + performance.now, on the
  same wall clock as the sender);
- dashboard_rss_mib_50_tabs / dashboard_cpu_cores_50_tabs: the dashboard process with 50
  open SSE streams (/events/jobs) while the bridge and service ingest 1,000 callbacks/s.

Run alone: python -m bench.dashboard (merges its keys into bench/results/latest.json).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import grpc

from bench.run import (
    API_KEY,
    HOST,
    PY,
    RESULTS,
    Proc,
    base_env,
    cpu_seconds,
    create_jobs,
    free_port,
    pct,
    proc_status,
    run_clients,
    wait_grpc,
    wait_http,
)
from jobwire.v1 import job_pb2, job_service_pb2_grpc

KEYS = (
    "first_render_ms_10000_jobs",
    "dom_update_p50_ms",
    "dom_update_p99_ms",
    "dashboard_rss_mib_50_tabs",
    "dashboard_cpu_cores_50_tabs",
)
GOALS = {
    "first_render_ms_10000_jobs": ("<", 1000.0),
    "dom_update_p99_ms": ("<", 250.0),
    "dashboard_rss_mib_50_tabs": ("<", 150.0),
    "dashboard_cpu_cores_50_tabs": ("<", 0.3),
}
TOKEN = "bench-dashboard-" + secrets.token_hex(8)

OBSERVE = """() => {
  window.__muts = [];
  const body = document.querySelector('#jobs tbody');
  new MutationObserver((list) => {
    const t = performance.timeOrigin + performance.now();
    for (const m of list) {
      const tr = m.target.closest('tr');
      window.__muts.push([tr.dataset.job, Number(m.target.getAttribute('value')), t]);
    }
  }).observe(body, {subtree: true, attributes: true, attributeFilter: ['value']});
}"""


async def measure(
    workdir: Path,
    jobs_n: int = 10_000,
    tabs: int = 50,
    rate: float = 1000.0,
    seconds: float = 10.0,
    dom_rate: float = 100.0,
    dom_seconds: float = 10.0,
) -> dict[str, Any]:
    from tests.dashboard_harness import LAPTOP, chromium, login

    procs: list[Proc] = []
    figures: dict[str, Any] = {}
    details: dict[str, Any] = {}

    def spawn(name: str, argv: list[str], env: dict[str, str]) -> Proc:
        p = Proc(name, argv, env, workdir)
        procs.append(p)
        return p

    try:
        env = base_env()
        grpc_port, http_port, dash_port = free_port(), free_port(), free_port()
        target = f"{HOST}:{grpc_port}"
        env.update(
            JOBWIRE_GRPC_ADDR=target,
            JOBWIRE_DATA_DIR=str(workdir / "data-dashboard"),
            JOBWIRE_HTTP_ADDR=f"{HOST}:{http_port}",
            JOBWIRE_SERVICE_TARGET=target,
            JOBWIRE_ENV_FILE=os.devnull,
            API_KEY=API_KEY,
            JOBWIRE_DASHBOARD_ADDR=f"{HOST}:{dash_port}",
            JOBWIRE_DASHBOARD_TOKEN=TOKEN,
        )
        service = spawn("dash-service", [PY, "-m", "cli", "serve"], env)
        await wait_grpc(target, service)
        bridge = spawn("dash-bridge", [PY, "-m", "cli", "bridge"], env)
        await wait_http(f"http://{HOST}:{http_port}/readyz", bridge)
        dash = spawn("dashboard", [PY, "-m", "cli", "dashboard"], env)
        url = f"http://{HOST}:{dash_port}"
        await wait_http(url + "/readyz", dash)

        t = time.monotonic()
        async with grpc.aio.insecure_channel(target) as channel:
            stub = job_service_pb2_grpc.JobServiceStub(channel)
            jobs = await create_jobs(stub, jobs_n, job_pb2.JOB_KIND_EXTRACTION, "dash")
        details["create_s"] = round(time.monotonic() - t, 1)
        tokens = dict((j[0], j[1]) for j in jobs)

        async with chromium() as browser:
            context = await browser.new_context(viewport=LAPTOP)
            page = await login(context, url, TOKEN)
            renders = []
            for _ in range(5):
                t = time.perf_counter()
                await page.goto(url + "/jobs", wait_until="commit")
                await page.wait_for_selector("#jobs tbody tr:nth-child(50)", state="attached")
                renders.append((time.perf_counter() - t) * 1000)
            details["first_render_ms_each"] = [round(r, 1) for r in renders]
            figures["first_render_ms_10000_jobs"] = round(statistics.median(renders), 1)

            await page.wait_for_selector("#live[data-state=live]", timeout=10_000)
            shown = await page.eval_on_selector_all(
                "#jobs tbody tr", "rows => rows.map(r => r.dataset.job)"
            )
            await page.evaluate(OBSERVE)
            sent = await _paced_callbacks(http_port, shown, tokens, dom_rate, dom_seconds)
            await asyncio.sleep(1.5)
            muts = await page.evaluate("window.__muts")
            lat = _dom_latencies(sent, muts)
            details["dom_update"] = {
                "callbacks": len(sent),
                "matched": len(lat),
                "dom_mutations": len(muts),
                "max_ms": round(max(lat), 1) if lat else None,
            }
            figures["dom_update_p50_ms"] = round(pct(lat, 50), 1)
            figures["dom_update_p99_ms"] = round(pct(lat, 99), 1)
            await context.close()

        figures.update(
            await _tabs(url, dash, http_port, jobs, tabs, rate, seconds, workdir, details)
        )
    finally:
        for p in reversed(procs):
            p.stop()
    return {"figures": figures, "details": details}


async def _paced_callbacks(
    port: int, shown: list[str], tokens: dict[str, str], rate: float, seconds: float
) -> list[tuple[str, float, float]]:
    """Secretary progress callbacks at `rate`/s over the shown rows; (job, percent, 2xx ms)."""
    total = int(rate * seconds)
    done: list[tuple[str, float, float]] = []
    async with aiohttp.ClientSession() as http:

        async def one(i: int) -> None:
            job_id = shown[i % len(shown)]
            percent = round((i + 1) * 100 / total, 1)  # the page shows one decimal
            body = {"phase": "bench", "progress": percent, "message": f"cb {i}"}
            headers = {"Authorization": f"Bearer {tokens[job_id]}"}
            path = f"http://{HOST}:{port}/api/external/jobs/{job_id}"
            async with http.post(path, json=body, headers=headers) as reply:
                await reply.read()
                if reply.status == 200:
                    done.append((job_id, percent, time.time() * 1000))

        start = time.monotonic()
        tasks = []
        for i in range(total):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
    return done


def _dom_latencies(sent: list[tuple[str, float, float]], muts: list[list[Any]]) -> list[float]:
    """For each callback: the first DOM change of its row to its percent or beyond."""
    by_job: dict[str, list[tuple[float, float]]] = {}
    for job_id, value, at in muts:
        by_job.setdefault(job_id, []).append((value, at))
    out = []
    for job_id, percent, ok_at in sent:
        for value, at in by_job.get(job_id, []):
            if value >= percent - 1e-6:
                out.append(max(at - ok_at, 0.0))
                break
    return out


async def _tabs(
    url: str,
    dash: Proc,
    http_port: int,
    jobs: list[list[str]],
    tabs: int,
    rate: float,
    seconds: float,
    workdir: Path,
    details: dict[str, Any],
) -> dict[str, Any]:
    """`tabs` SSE streams open while 1,000 callbacks/s flow in: the dashboard's RSS/CPU."""
    received = [0] * tabs
    headers = {"Authorization": f"Bearer {TOKEN}"}
    timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
    async with aiohttp.ClientSession(timeout=timeout) as http:

        async def tab(i: int) -> None:
            async with http.get(url + "/events/jobs", headers=headers) as stream:
                async for chunk in stream.content.iter_any():
                    received[i] += len(chunk)

        readers = [asyncio.create_task(tab(i)) for i in range(tabs)]
        await asyncio.sleep(2.0)
        details["rss_mib_idle_tabs"] = round(proc_status(dash.pid, "VmRSS"), 1)
        spec = {
            "host": HOST,
            "port": http_port,
            "jobs": jobs[:1000],
            "tag": "dash",
            "mode": "open",
            "rate": rate / 2,
            "connections": 64,
            "warmup": 1.0,
            "duration": seconds,
            "drain_timeout": 10.0,
        }
        cpu0 = cpu_seconds(dash.pid)
        t0 = time.monotonic()
        res = await run_clients([{**spec, "offset": i, "stride": 2} for i in range(2)], workdir)
        wall = time.monotonic() - t0
        cpu = (cpu_seconds(dash.pid) - cpu0) / wall
        rss = proc_status(dash.pid, "VmRSS")
        details["tabs"] = {
            "streams": tabs,
            "offered_per_s": rate,
            "ok_per_s": round(sum(len(r["ok_latencies_ms"]) for r in res) / seconds, 1),
            "callback_p99_ms": round(pct([x for r in res for x in r["ok_latencies_ms"]], 99), 1),
            "statuses": [r["statuses"] for r in res],
            "window_s": round(wall, 1),
            "bytes_per_tab_per_s": round(statistics.mean(received) / (wall + 2), 1),
            "rss_hwm_mib": round(proc_status(dash.pid, "VmHWM"), 1),
        }
        for r in readers:
            r.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*readers, return_exceptions=True)
    return {
        "dashboard_rss_mib_50_tabs": round(rss, 1),
        "dashboard_cpu_cores_50_tabs": round(cpu, 3),
    }


async def phase(workdir: Path, results: dict[str, Any], details: dict[str, Any]) -> None:
    """The `dashboard` phase of `make bench`: keys under results["dashboard"]."""
    t = time.monotonic()
    try:
        out = await asyncio.wait_for(measure(workdir), 600)
    except Exception as exc:
        print(f"bench: dashboard FAILED: {exc!r}"[:1000], file=sys.stderr, flush=True)
        results["dashboard"] = dict.fromkeys(KEYS)
        details["dashboard"] = {"error": repr(exc)[:1000]}
        return
    results["dashboard"] = out["figures"]
    details["dashboard"] = {**out["details"], "seconds": round(time.monotonic() - t, 1)}
    for key, (op, goal) in GOALS.items():
        value = out["figures"].get(key)
        met = value is not None and (value < goal if op == "<" else value >= goal)
        print(f"bench: dashboard {key} = {value} (goal {op} {goal}: {'met' if met else 'MISSED'})")


def main() -> None:
    import shutil
    import tempfile

    workdir = Path(tempfile.mkdtemp(prefix="jobwire-bench-dashboard-"))
    try:
        out = asyncio.run(measure(workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    latest = RESULTS / "latest.json"
    results = json.loads(latest.read_text()) if latest.exists() else {}
    results["dashboard"] = out["figures"]
    results.setdefault("details", {})["dashboard"] = out["details"]
    latest.write_text(json.dumps(results, indent=2, allow_nan=False) + "\n")
    json.dump(out, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
