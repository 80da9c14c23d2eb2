"""Byte-level fuzzing of the dashboard, with the bridge fuzzer's generator
(tests/test_bridge_fuzz.py): raw requests with random and mutated credentials,
cookies, CSRF tokens, paths, query strings, forms and framings, at every route.
Asserted: no 5xx, nothing logged at ERROR (no traceback), and a well-formed request
served after every round.

JOBWIRE_FUZZ_CASES (default 600) and JOBWIRE_FUZZ_SEED (default: random, printed)
set the size and make a failure reproducible, as for the bridge.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any

import pytest

from dashboard.auth import COOKIE, Auth
from dashboard.config import DashboardConfig
from jobwire.v1 import job_pb2, job_service_pb2
from tests.bridge_harness import create_job
from tests.bridge_process import raw_exchange, status_of
from tests.test_bridge_fuzz import CASES, CONCURRENCY, SEED, Route, build
from tests.test_dashboard_hostile import guarded

TOKEN = "fuzz-test-token-abcdefghijklmnopqrs"
NAMES = [
    b"Authorization",
    b"Cookie",
    b"X-CSRF-Token",
    b"X-User",
    b"Last-Event-ID",
    b"X-Forwarded-Proto",
    b"If-None-Match",
    b"Accept",
    b"Content-Type",
    b"Content-Length",
    b"Transfer-Encoding",
    b"Expect",
    b"Host",
]


def routes(live: str, done: str, session: str, csrf: str) -> list[Route]:
    bearer = {"Authorization": f"Bearer {TOKEN}".encode()}
    cookie = {"Cookie": f"{COOKIE}={session}".encode()}
    form = {"Content-Type": b"application/x-www-form-urlencoded"}
    return [
        Route(
            "GET",
            "/jobs?kind=EXTRACTION&state=RUNNING&label=a%3Db&page_size=5&order=oldest",
            bearer,
        ),
        Route("GET", f"/jobs/{live}?level=INFO", cookie),
        Route("GET", "/api/jobs?page_token=&page_size=3&order=newest", bearer),
        Route("GET", f"/api/jobs/{live}", bearer),
        Route("GET", f"/jobs/{live}/artifacts/result.json", bearer),
        # A finished job's stream ends after its snapshot and events: no open stream.
        Route("GET", f"/events/jobs/{done}?from=0", {**bearer, "Last-Event-ID": b"1"}),
        Route("GET", "/login?next=/jobs", {}),
        Route("POST", "/login", form, b"token=" + TOKEN.encode() + b"&next=%2Fjobs"),
        Route("POST", f"/jobs/{live}/cancel", {**cookie, **form}, f"csrf={csrf}".encode()),
        Route("POST", "/logout", {**cookie, "X-CSRF-Token": csrf.encode()}),
        Route("GET", "/static/app.js", {}),
        Route("GET", "/healthz", {}),
        Route("GET", "/", bearer),
    ]


async def test_fuzzed_bytes_never_5xx_never_an_error_logged(
    grpc_service: Any, caplog: pytest.LogCaptureFixture
) -> None:
    print(f"fuzz seed {SEED} ({CASES} cases); JOBWIRE_FUZZ_SEED={SEED} reproduces")
    rng = random.Random(SEED)
    live = await create_job(grpc_service.stub, job_pb2.JOB_KIND_EXTRACTION)
    done = await create_job(grpc_service.stub, job_pb2.JOB_KIND_EXTRACTION)
    await grpc_service.stub.CancelJob(job_service_pb2.CancelJobRequest(id=done.job.id))
    cfg = DashboardConfig(
        service_target=grpc_service.target,
        token=TOKEN,
        trusted_user_header="X-User",
        header_timeout_seconds=2,
    )
    auth = Auth(cfg)
    session = auth.new_session()
    csrf = auth.csrf_for("session:" + session.partition(".")[0])
    table = routes(live.job.id, done.job.id, session, csrf)
    failures: list[str] = []
    seen: dict[int | None, int] = {}
    sem = asyncio.Semaphore(CONCURRENCY)

    async def one(port: int, n: int, request: bytes) -> None:
        async with sem:
            try:
                answer = await raw_exchange(port, request, timeout=20)
            except (ConnectionResetError, BrokenPipeError):
                return  # hanging up on garbage is not a 5xx
            except TimeoutError:
                cut = f"{request[:200]!r}...{request[-300:]!r}"
                failures.append(f"case {n}: no end within 20 s for {cut}")
                return
            status = status_of(answer)
            seen[status] = seen.get(status, 0) + 1
            if status is not None and status >= 500:
                failures.append(f"case {n}: {status} for {request[:300]!r}: {answer[-300:]!r}")

    with caplog.at_level(logging.INFO):
        async with guarded(cfg) as port:
            rounds = 4
            for r in range(rounds):
                count = max(1, CASES // rounds)
                requests = [build(rng, rng.choice(table), NAMES) for _ in range(count)]
                await asyncio.gather(*(one(port, r * count + n, q) for n, q in enumerate(requests)))
                healthy = b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
                assert status_of(await raw_exchange(port, healthy)) == 200
    print("statuses:", dict(sorted(seen.items(), key=lambda kv: str(kv[0]))))
    assert not failures, "\n".join(failures[:10])
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, "\n".join(caplog.text.splitlines()[-40:])
