"""The dashboard in a real browser (Debian's chromium via Playwright), against the real
service, bridge and dashboard process on loopback ports."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import os
import re
import signal
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest

from dashboard.present import iso
from jobwire.v1 import job_pb2, job_service_pb2, log_pb2
from service.domain.records import Policy
from service.store.embedded import EmbeddedStore
from tests.bridge_harness import API_KEY, BATCH_SECRET, TEST_CONFIG, TRANSCODE_TOKEN, running_bridge
from tests.conftest import ServiceHandle, start_service
from tests.dashboard_harness import (
    LAPTOP,
    PHONE,
    SCREENSHOTS,
    TOKEN,
    DashboardProcess,
    chromium,
    login,
    running_dashboard,
)
from tests.helpers import free_port, until
from tests.tcp_cutter import TcpCutter

WAIT_MS = 10_000  # any awaited page change; the live-update test asserts its own 1 s
BEARER = {"Authorization": f"Bearer {TOKEN}"}


POLICY = Policy(retention=64, lease_ns=60 * 10**9, max_attempts=3)


@pytest.fixture(scope="module")
async def svc(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ServiceHandle]:
    data = tmp_path_factory.mktemp("dashboard")
    handle = await start_service(EmbeddedStore(data, POLICY), lease_sweep_seconds=0.05)
    yield handle
    await handle.close()


@pytest.fixture(scope="module")
async def bridge(svc: ServiceHandle) -> AsyncIterator[Any]:
    config = dataclasses.replace(TEST_CONFIG, service_target=svc.target)
    async with running_bridge(config) as b:
        yield b


@pytest.fixture(scope="module")
async def dash(svc: ServiceHandle) -> AsyncIterator[DashboardProcess]:
    async with running_dashboard(svc.target) as d:
        yield d


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Any]:
    async with chromium() as b:
        yield b


@pytest.fixture
async def context(browser: Any) -> AsyncIterator[Any]:
    ctx = await browser.new_context(viewport=LAPTOP, accept_downloads=True)
    yield ctx
    await ctx.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@contextlib.asynccontextmanager
async def held_requests(
    context: Any, pattern: re.Pattern[str]
) -> AsyncIterator[tuple[asyncio.Event, asyncio.Event]]:
    """The browser holds requests to URLs matching `pattern` until `release` is set;
    `held` is set once one is being held."""
    held, release = asyncio.Event(), asyncio.Event()

    async def hold(route: Any) -> None:
        held.set()
        await release.wait()
        await route.continue_()

    await context.route(pattern, hold)
    try:
        yield held, release
    finally:
        release.set()
        await context.unroute(pattern, hold)


async def new_job(
    stub: Any, kind: Any, job_id: str, labels: dict[str, str] | None = None, **video: str
) -> job_service_pb2.CreateJobResponse:
    job = job_pb2.Job(kind=kind)
    job.labels.update(labels or {})
    if video:
        job.video.CopyFrom(job_pb2.Video(**video))
    return await stub.CreateJob(job_service_pb2.CreateJobRequest(job=job, job_id=job_id))


async def progress(stub: Any, job_id: str, percent: float, phase: str, message: str) -> int:
    reply = await stub.ReportEvent(
        job_service_pb2.ReportEventRequest(
            job_id=job_id,
            idempotency_key=uuid.uuid4().hex,
            progress=job_pb2.Progress(percent=percent, phase=phase, message=message),
        )
    )
    return int(reply.sequence)


async def fail(stub: Any, job_id: str) -> None:
    await stub.ReportEvent(
        job_service_pb2.ReportEventRequest(
            job_id=job_id,
            idempotency_key=uuid.uuid4().hex,
            failed=job_pb2.JobError(code="E", message=f"{job_id} broke"),
        )
    )


async def probe_until_live(
    stub: Any, job_id: str, percent: float, seen: list[asyncio.Event], what: str
) -> None:
    """Sends probe progress on `job_id` until every `seen` event is set: the hub's
    WatchJobs stream is open once a probe comes through."""
    for probe in range(50):
        await progress(stub, job_id, percent, "p", f"probe {probe}")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in seen)), 0.2)
            break
    assert all(e.is_set() for e in seen), f"{what} never delivered a probe"


async def write_log(stub: Any, job_id: str, level: int, message: str) -> None:
    entry = log_pb2.LogEntry(
        job_id=job_id, level=log_pb2.LogLevel.ValueType(level), message=message
    )
    await stub.WriteLog(job_service_pb2.WriteLogRequest(entry=entry))


async def timeline_seqs(page: Any) -> list[int]:
    return [
        int(s)
        for s in await page.eval_on_selector_all(
            "#timeline tbody tr", "rows => rows.map(r => r.dataset.seq)"
        )
    ]


# -- closed by default ---------------------------------------------------------------


async def test_every_page_and_stream_is_refused_without_login(
    dash: DashboardProcess, context: Any, http: aiohttp.ClientSession, svc: ServiceHandle
) -> None:
    await new_job(svc.stub, job_pb2.JOB_KIND_GENERIC, uid("closed"))
    for path in (
        "/",
        "/jobs",
        "/jobs/x",
        "/jobs/x/artifacts/a.txt",
        "/api/jobs",
        "/api/jobs/x",
        "/events/jobs",
        "/events/jobs/x",
    ):
        async with http.get(dash.url + path, allow_redirects=False) as reply:
            assert reply.status == 401, path
            assert "Content-Security-Policy" in reply.headers
            body = await reply.text()
            assert "data-job" not in body
    async with http.post(dash.url + "/jobs/x/cancel", data={"csrf": "x"}) as reply:
        assert reply.status == 401
    # A wrong token is refused; a wrong Bearer is no login either.
    async with http.get(dash.url + "/api/jobs", headers={"Authorization": "Bearer nope"}) as r:
        assert r.status == 401

    page = await context.new_page()
    await page.goto(dash.url + "/jobs")
    assert await page.locator("input[name=token]").count() == 1
    await page.fill("input[name=token]", "wrong-token")
    async with page.expect_navigation():
        await page.click("button[type=submit]")
    assert "Wrong token" in await page.inner_text("main")
    assert await page.locator("#jobs").count() == 0

    await page.fill("input[name=token]", TOKEN)
    async with page.expect_navigation():
        await page.click("button[type=submit]")
    assert page.url.endswith("/jobs")
    await page.wait_for_selector("#jobs tbody tr")
    cookies = {c["name"]: c for c in await context.cookies()}
    session = cookies["jobwire_session"]
    assert session["httpOnly"] is True
    assert session["sameSite"] == "Strict"
    assert session["secure"] is False  # plain http on loopback; https sets Secure


# -- screenshots for the README -------------------------------------------------------


@contextlib.asynccontextmanager
async def own_stack(data: Path) -> AsyncIterator[tuple[ServiceHandle, Any, DashboardProcess]]:
    """A service, bridge and dashboard of their own: the screenshots show only the jobs
    their test made, not those other tests of the module left in the shared store."""
    handle = await start_service(EmbeddedStore(data, POLICY), lease_sweep_seconds=0.05)
    try:
        config = dataclasses.replace(TEST_CONFIG, service_target=handle.target)
        async with running_bridge(config) as b, running_dashboard(handle.target) as d:
            yield handle, b, d
    finally:
        await handle.close()


async def test_screenshots(context: Any, tmp_path: Path) -> None:
    async with own_stack(tmp_path) as (svc, bridge, dash):
        await take_screenshots(context, svc, bridge, dash)


async def take_screenshots(
    context: Any, svc: ServiceHandle, bridge: Any, dash: DashboardProcess
) -> None:
    stub = svc.stub
    run = uuid.uuid4().hex[:4]
    doc = f"contract-2026-117-{run}"
    created = await new_job(stub, job_pb2.JOB_KIND_EXTRACTION, doc, {"team": "legal"})
    auth = {"Authorization": f"Bearer {created.callback_token}"}
    for i, (phase, pct, msg) in enumerate(
        [
            ("download", 5, "PDF geladen (2.4 MB)"),
            ("ocr", 21, "Seite 6/28"),
            ("extract_text", 48, "Seite 14/28"),
            ("extract_text", 77, "Seite 22/28"),
            ("images", 93, "12 Bilder extrahiert"),
        ]
    ):
        body = {"phase": phase, "progress": pct, "message": msg, "process": {"id": "sec-4711"}}
        assert (await bridge.post(f"/api/external/jobs/{doc}", body, headers=auth))[0] == 200
        await write_log(
            stub, doc, [log_pb2.LOG_LEVEL_INFO, log_pb2.LOG_LEVEL_DEBUG][i % 2], f"{phase}: {msg}"
        )
    await write_log(stub, doc, log_pb2.LOG_LEVEL_WARNING, "OCR confidence 0.71 on page 9")
    final = {
        "phase": "completed",
        "message": "Extraktion abgeschlossen",
        "data": {
            "extracted_text": "# Vertrag 2026-117\n\n§1 Gegenstand ...",
            "images_archive_data": base64.b64encode(b"PK\x03\x04" + b"\0" * 48_000).decode(),
            "images_archive_filename": "pdf_images.zip",
            "metadata": {"pages": 28},
        },
    }
    assert (await bridge.post(f"/api/external/jobs/{doc}", final, headers=auth))[0] == 200

    # A realistic mix for the jobs page.
    video = await new_job(
        stub,
        job_pb2.JOB_KIND_VIDEO,
        f"video-{run}",
        {"playlist": "keynotes"},
        url="https://media.example/keynote.mp4",
        title="Keynote 2026",
    )
    # As the video worker reports it: its position and the video's length.
    downloading = job_pb2.Progress(percent=45, phase="download", message="Descargando")
    downloading.media_time.FromSeconds(90)
    downloading.media_duration.FromSeconds(200)
    await stub.ReportEvent(
        job_service_pb2.ReportEventRequest(
            job_id=video.job.id, idempotency_key=uuid.uuid4().hex, progress=downloading
        )
    )
    batch = await new_job(stub, job_pb2.JOB_KIND_BATCH, f"batch-{run}", {"pipeline": "render"})
    await stub.ReportEvent(
        job_service_pb2.ReportEventRequest(
            job_id=batch.job.id,
            idempotency_key="done",
            completed=job_pb2.Result(output_key="output/render-0042.mp4"),
        )
    )
    tr = await new_job(stub, job_pb2.JOB_KIND_TRANSCODE, f"transcode-{run}")
    await stub.ReportEvent(
        job_service_pb2.ReportEventRequest(
            job_id=tr.job.id,
            idempotency_key="fail",
            failed=job_pb2.JobError(code="1003", message="Invalid input file"),
        )
    )
    ocr = await new_job(stub, job_pb2.JOB_KIND_EXTRACTION, f"invoice-{run}", {"team": "finance"})
    await progress(stub, ocr.job.id, 12, "ocr", "Seite 2/17")
    await new_job(stub, job_pb2.JOB_KIND_EXTRACTION, f"scan-{run}", {"team": "finance"})
    gen = await new_job(stub, job_pb2.JOB_KIND_GENERIC, f"reindex-{run}")
    await stub.CancelJob(job_service_pb2.CancelJobRequest(id=gen.job.id, reason="superseded"))

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page = await login(context, dash.url)
    # A CSP violation or a script error shows up here.
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    await page.wait_for_selector("#live[data-state=live]", timeout=WAIT_MS)
    # Queue depth per kind arrives with the live stats (counted in the background).
    await page.wait_for_function(
        "() => document.querySelector('[data-depth=EXTRACTION]').textContent === '1'",
        timeout=WAIT_MS,
    )
    await page.screenshot(path=str(SCREENSHOTS / "jobs-laptop.png"))
    await page.goto(f"{dash.url}/jobs/{doc}")
    await page.wait_for_selector("#live[data-state=ended]", timeout=WAIT_MS)
    await page.screenshot(path=str(SCREENSHOTS / "job-laptop.png"), full_page=True)
    await page.set_viewport_size(PHONE)
    await page.goto(dash.url + "/jobs")
    await page.wait_for_selector("#live[data-state=live]", timeout=WAIT_MS)
    await page.screenshot(path=str(SCREENSHOTS / "jobs-phone.png"))
    await page.goto(f"{dash.url}/jobs/{doc}")
    await page.screenshot(path=str(SCREENSHOTS / "job-phone.png"), full_page=True)
    # Nothing may overflow the phone's width: no sideways scrolling of the page, nor of
    # the timeline and the artifacts (their rows become blocks), nor of the logs.
    for path in ("/jobs", f"/jobs/{doc}"):
        await page.goto(dash.url + path)
        width = await page.evaluate("document.documentElement.scrollWidth")
        assert width <= PHONE["width"], (path, width)
    wide = await page.eval_on_selector_all(
        "#timeline, #logs, #artifacts",
        "ts => ts.filter(t => t.parentElement.scrollWidth > t.parentElement.clientWidth)"
        ".map(t => t.id)",
    )
    assert wide == []
    # The event's message is still on the block, with its type and progress.
    block = await page.inner_text("#timeline tbody tr:last-child")
    assert "COMPLETED" in block and "Extraktion abgeschlossen" in block, block
    # The worker sent `"pages": 28`; a protobuf Struct returns it as 28.0.
    result = await page.inner_text("#result pre")
    assert '"pages": 28\n' in result, result
    assert problems == []


# -- live rows ----------------------------------------------------------------------


async def assert_created_shown(page: Any, stub: Any, job_id: str) -> None:
    """A row that appeared live shows when its job was created, and an unfinished one
    counts its duration from then (it showed "—" and no duration until a reload)."""
    job = await stub.GetJob(job_service_pb2.GetJobRequest(id=job_id))
    row = page.locator(f'#jobs tr[data-job="{job_id}"]')
    assert await row.locator(".created time").get_attribute("datetime") == iso(job.create_time)
    assert await row.locator(".duration .elapsed").get_attribute("data-since") == iso(
        job.create_time
    )


ROW_IS = """([id, pct, state]) => {
  const tr = document.querySelector(`#jobs tr[data-job="${CSS.escape(id)}"]`);
  if (!tr || tr.dataset.state !== state) return false;
  return Math.round(tr.querySelector('progress').value) === pct;
}"""


async def changed_within(page: Any, job_id: str, percent: int, state: str) -> float:
    """Seconds from now (just after the callback's 2xx) until the row shows the change."""
    start = time.monotonic()
    await page.wait_for_function(ROW_IS, arg=[job_id, percent, state], timeout=WAIT_MS)
    return time.monotonic() - start


async def test_rows_change_live_from_each_contract(
    dash: DashboardProcess, context: Any, svc: ServiceHandle, bridge: Any
) -> None:
    stub = svc.stub
    # The page lists newest first: a job created before the three below is on the next
    # page when a page holds three.
    other = await new_job(stub, job_pb2.JOB_KIND_GENERIC, uid("elsewhere"))
    await progress(stub, other.job.id, 5, "p", "first")
    doc = await new_job(stub, job_pb2.JOB_KIND_EXTRACTION, uid("live-doc"))
    video_id = str(uuid.uuid4().int % 10**9)
    await new_job(stub, job_pb2.JOB_KIND_VIDEO, video_id, url="https://media.example/v.mp4")
    batch_id = str(uuid.uuid4())
    await new_job(stub, job_pb2.JOB_KIND_BATCH, batch_id)
    page = await login(context, dash.url)
    await page.goto(f"{dash.url}/jobs?page_size=3")
    shown = await page.eval_on_selector_all("#jobs tbody tr", "rs => rs.map(r => r.dataset.job)")
    assert shown == [batch_id, video_id, doc.job.id]
    assert await page.locator("#next-page").count() == 1
    await page.wait_for_selector("#live[data-state=live]", timeout=WAIT_MS)
    await page.evaluate("window.__sameDocument = 42")
    elapsed: dict[str, float] = {}

    auth = {"Authorization": f"Bearer {doc.callback_token}"}
    body = {"phase": "extract_text", "progress": 42, "message": "Seite 12/28"}
    assert (await bridge.post(f"/api/external/jobs/{doc.job.id}", body, headers=auth))[0] == 200
    elapsed["secretary progress"] = await changed_within(page, doc.job.id, 42, "RUNNING")
    failed = {"phase": "failed", "error": {"code": "OCR_TIMEOUT", "message": "Timeout"}}
    assert (await bridge.post(f"/api/external/jobs/{doc.job.id}", failed, headers=auth))[0] == 200
    elapsed["secretary failed"] = await changed_within(page, doc.job.id, 42, "FAILED")

    video_auth = {"Authorization": f"Bearer {API_KEY}"}
    report = {"status": "progress", "videoId": video_id, "message": "Descargando", "percent": 45}
    assert (await bridge.post("/api/report", report, headers=video_auth))[0] == 200
    elapsed["video progress"] = await changed_within(page, video_id, 45, "RUNNING")
    done = {"status": "success", "videoId": video_id, "message": "Listo"}
    assert (await bridge.post("/api/report", done, headers=video_auth))[0] == 200
    elapsed["video success"] = await changed_within(page, video_id, 100, "SUCCEEDED")

    batch = {
        "jobId": batch_id,
        "status": "success",
        "outputKey": "out/x.mp4",
        "callbackSecret": BATCH_SECRET,
    }
    assert (await bridge.post("/api/batch-callback", batch))[0] == 200
    elapsed["batch success"] = await changed_within(page, batch_id, 100, "SUCCEEDED")

    # A job on the next page that changes again is not pulled onto this one (no churn);
    await progress(stub, other.job.id, 6, "p", "second")
    # ... while AuroraCloud creates a job with its first callback: a new row appears.
    task = uuid.uuid4().hex
    note = {
        "code": 0,
        "msg": "succeeded",
        "data": [
            {
                "task_id": task,
                "status": "succeeded",
                "output": "oss://b/t.mp4",
                "format": "mp4",
                "duration": 30.0,
                "spend_time": 2.0,
            }
        ],
    }
    aurora_auth = {"Authorization": f"Bearer {TRANSCODE_TOKEN}"}
    assert (await bridge.post("/api/transcode-callback", note, headers=aurora_auth))[0] == 200
    elapsed["aurora new job"] = await changed_within(page, task, 100, "SUCCEEDED")
    assert await page.locator(f"#jobs tr[data-job='{other.job.id}']").count() == 0

    assert await page.evaluate("window.__sameDocument") == 42, "the page was reloaded"
    slow = {k: round(v, 3) for k, v in elapsed.items() if v >= 1.0}
    assert not slow, f"rows changed later than 1 s after the 2xx: {slow}"


async def test_jobs_stream_coalesces_a_firehose(
    dash: DashboardProcess, http: aiohttp.ClientSession, svc: ServiceHandle
) -> None:
    """500 events on one job in about a second reach a tab as a handful of messages,
    the last of which carries the final state."""
    job = await new_job(svc.stub, job_pb2.JOB_KIND_GENERIC, uid("firehose"))
    messages: list[bytes] = []
    first_seen, last_seen = asyncio.Event(), asyncio.Event()
    async with http.get(dash.url + "/events/jobs?kind=GENERIC", headers=BEARER) as stream:
        assert stream.status == 200
        assert stream.headers["Content-Type"].startswith("text/event-stream")

        async def read() -> None:
            async for line in stream.content:
                if line.startswith(b"data: [") and job.job.id.encode() in line:
                    messages.append(line)
                    first_seen.set()
                    if b'"m500"' in line:
                        last_seen.set()

        reader = asyncio.create_task(read())
        await probe_until_live(svc.stub, job.job.id, 0, [first_seen], "the stream")
        messages.clear()  # only the firehose's pushes are counted
        start = time.monotonic()
        for i in range(1, 501):
            await svc.stub.ReportEvent(
                job_service_pb2.ReportEventRequest(
                    job_id=job.job.id,
                    idempotency_key=f"k{i}",
                    progress=job_pb2.Progress(percent=i / 5, phase="p", message=f"m{i}"),
                )
            )
        sent_for = time.monotonic() - start
        await asyncio.wait_for(last_seen.wait(), 10)
        reader.cancel()
    assert messages and b'"m500"' in messages[-1]
    # At most one push per 200 ms (plus the first, leading one).
    assert len(messages) <= sent_for / 0.2 + 3, (len(messages), sent_for)


async def test_jobs_stream_follows_only_the_rows_a_page_shows(
    dash: DashboardProcess, http: aiohttp.ClientSession, svc: ServiceHandle
) -> None:
    """`ids=`: only those jobs, plus (unless new=0) the first event of a job that just
    became active, which is then followed too; a firehose over others never arrives."""
    stub = svc.stub
    shown, other, fresh = uid("shown"), uid("other"), uid("fresh")
    # The dashboard's stream may still be up from an earlier page: the first events of
    # `shown` and `other` must have gone through it before the tabs open, or they are
    # new jobs to the tabs. A stream of every job sees them go through.
    witnessed: list[bytes] = []
    seen = asyncio.Event()
    async with http.get(f"{dash.url}/events/jobs", headers=BEARER) as witness:

        async def watch() -> None:
            async for line in witness.content:
                if line.startswith(b"data: ["):
                    witnessed.append(line)
                    seen.set()

        watching = asyncio.create_task(watch())
        probe = uid("probe")
        await new_job(stub, job_pb2.JOB_KIND_GENERIC, probe)
        await probe_until_live(stub, probe, 1, [seen], "the witness stream")
        for job_id in (shown, other):
            await new_job(stub, job_pb2.JOB_KIND_GENERIC, job_id)
            await progress(stub, job_id, 1, "p", "first")
        await until(lambda: all(j.encode() in b"".join(witnessed) for j in (shown, other)))
        watching.cancel()
    got: dict[str, list[bytes]] = {"1": [], "0": []}
    pushed = {"1": asyncio.Event(), "0": asyncio.Event()}

    async def tab(new: str, ready: asyncio.Event) -> None:
        path = f"{dash.url}/events/jobs?ids={shown}&new={new}"
        async with http.get(path, headers=BEARER) as stream:
            ready.set()
            async for line in stream.content:
                if line.startswith(b"data: ["):
                    got[new].append(line)
                    pushed[new].set()

    ready = [asyncio.Event(), asyncio.Event()]
    tabs = [asyncio.create_task(tab(n, r)) for n, r in zip(("1", "0"), ready, strict=True)]
    await asyncio.gather(*(r.wait() for r in ready))
    # Both tabs are live once a probe on the shown job reaches both.
    await probe_until_live(stub, shown, 1, list(pushed.values()), "the streams")
    got["1"].clear()
    got["0"].clear()
    for i in range(2, 12):
        await progress(stub, other, i, "p", f"other {i}")
    await progress(stub, shown, 50, "p", "shown 50")
    await new_job(stub, job_pb2.JOB_KIND_GENERIC, fresh)
    await progress(stub, fresh, 5, "p", "fresh first")
    await progress(stub, fresh, 6, "p", "fresh second")
    await until(lambda: b"fresh second" in b"".join(got["1"]) and b"shown 50" in b"".join(got["0"]))
    await asyncio.sleep(0.5)  # a negative check: time for what must not arrive to arrive
    for t in tabs:
        t.cancel()
    everything = b"".join(got["1"])
    assert b"shown 50" in everything
    # (Its first event may be coalesced into the second: same job, same push.)
    assert b"fresh second" in everything, "a job that appeared is followed from then on"
    assert other.encode() not in everything
    only = b"".join(got["0"])
    assert b"shown 50" in only
    assert fresh.encode() not in only and other.encode() not in only


async def test_job_stream_resumes_from_last_event_id(
    dash: DashboardProcess, http: aiohttp.ClientSession, svc: ServiceHandle
) -> None:
    job = await new_job(svc.stub, job_pb2.JOB_KIND_GENERIC, uid("resume"))
    for i in range(1, 6):
        await progress(svc.stub, job.job.id, i * 10, "p", f"m{i}")
    headers = {**BEARER, "Last-Event-ID": "3"}
    async with http.get(f"{dash.url}/events/jobs/{job.job.id}", headers=headers) as stream:
        assert stream.status == 200
        lines: list[bytes] = []
        async for line in stream.content:
            lines.append(line.strip())
            if line.startswith(b"data: [{"):
                break
    assert b"event: snapshot" in lines
    assert b"id: 5" in lines
    data = lines[-1]
    assert b'"sequence":4' in data and b'"sequence":5' in data and b'"sequence":3' not in data


async def test_job_stream_past_the_jobs_end_follows_it(
    dash: DashboardProcess, http: aiohttp.ClientSession, svc: ServiceHandle
) -> None:
    """A Last-Event-ID past the job's newest sequence (the service restored from an older
    backup under an open page): the service says so with a gap going back, but the
    stream kept dropping every event up to the old id, the job's end too. It follows
    the job from the snapshot now (and the page reloads on such a gap)."""
    job = await new_job(svc.stub, job_pb2.JOB_KIND_GENERIC, uid("ahead"))
    await progress(svc.stub, job.job.id, 10, "p", "m1")
    headers = {**BEARER, "Last-Event-ID": "40"}
    async with http.get(f"{dash.url}/events/jobs/{job.job.id}", headers=headers) as stream:
        assert stream.status == 200
        lines: list[bytes] = []
        async with asyncio.timeout(WAIT_MS / 1000):
            async for line in stream.content:
                lines.append(line.strip())
                if line.startswith(b"data: {") and lines[-2] == b"event: gap":
                    await progress(svc.stub, job.job.id, 20, "p", "m2")
                if line.startswith(b"data: [{"):
                    break
    assert lines[lines.index(b"event: gap") + 1] == b'data: {"requested":40,"oldest":2}'
    assert b"id: 2" in lines and b'"sequence":2' in lines[-1]


# -- job page -----------------------------------------------------------------------


async def test_job_page_timeline_logs_and_artifact_download(
    dash: DashboardProcess, context: Any, svc: ServiceHandle, bridge: Any
) -> None:
    stub = svc.stub
    created = await new_job(stub, job_pb2.JOB_KIND_EXTRACTION, uid("page"))
    job_id = created.job.id
    auth = {"Authorization": f"Bearer {created.callback_token}"}
    for pct in (10, 40, 70):
        body = {"phase": "ocr", "progress": pct, "message": f"at {pct}"}
        assert (await bridge.post(f"/api/external/jobs/{job_id}", body, headers=auth))[0] == 200
    await write_log(stub, job_id, log_pb2.LOG_LEVEL_DEBUG, "debug line")
    await write_log(stub, job_id, log_pb2.LOG_LEVEL_INFO, "info line")
    await write_log(stub, job_id, log_pb2.LOG_LEVEL_WARNING, "warning line")
    zip_bytes = b"PK\x03\x04" + os.urandom(300_000)
    final = {
        "phase": "completed",
        "message": "fertig",
        "data": {
            "extracted_text": "# Titel\n\nÄrger über Öl",
            "images_archive_data": base64.b64encode(zip_bytes).decode(),
            "images_archive_filename": "pdf_images.zip",
        },
    }
    assert (await bridge.post(f"/api/external/jobs/{job_id}", final, headers=auth))[0] == 200

    page = await login(context, dash.url)
    await page.goto(f"{dash.url}/jobs/{job_id}")
    assert await timeline_seqs(page) == [1, 2, 3, 4]
    types = await page.eval_on_selector_all("#timeline .type", "c => c.map(x => x.textContent)")
    assert types == ["PROGRESS", "PROGRESS", "PROGRESS", "COMPLETED"]
    assert await page.inner_text("#job .state") == "SUCCEEDED"
    logs = await page.inner_text("#logs tbody")
    assert all(f"{lvl} line" in logs for lvl in ("debug", "info", "warning"))

    async with page.expect_navigation():
        await page.select_option("#level", "WARNING")  # submits the filter on change
    assert "level=WARNING" in page.url
    logs = await page.inner_text("#logs tbody")
    assert "warning line" in logs and "info line" not in logs and "debug line" not in logs

    rows = await page.inner_text("#artifacts")
    assert "pdf_images.zip" in rows and hashlib.sha256(zip_bytes).hexdigest() in rows
    assert f"{len(zip_bytes):,} B" in rows
    async with page.expect_download() as info:
        await page.click("#artifacts a:text('pdf_images.zip')")
    download = await info.value
    assert await asyncio.to_thread(Path(await download.path()).read_bytes) == zip_bytes

    # An unknown artifact or job: a clear 404, not a 500.
    reply = await page.request.get(f"{dash.url}/jobs/{job_id}/artifacts/nope.bin")
    assert reply.status == 404
    reply = await page.request.get(f"{dash.url}/jobs/no-such-job-{uuid.uuid4().hex}")
    assert reply.status == 404 and "no-such-job" in await reply.text()


async def test_job_page_goes_live_and_shows_gap_notice(
    dash: DashboardProcess, context: Any, svc: ServiceHandle
) -> None:
    job_id = uid("golive")
    await new_job(svc.stub, job_pb2.JOB_KIND_GENERIC, job_id)
    page = await login(context, dash.url)
    await page.goto(f"{dash.url}/jobs/{job_id}")
    await page.wait_for_selector("#live[data-state=live]", timeout=WAIT_MS)
    assert await timeline_seqs(page) == []
    for i in range(1, 4):
        await progress(svc.stub, job_id, i * 25, "work", f"step {i}")
    await page.wait_for_function(
        "() => document.querySelectorAll('#timeline tbody tr').length === 3", timeout=WAIT_MS
    )
    assert await timeline_seqs(page) == [1, 2, 3]
    assert await page.eval_on_selector("#job progress", "p => p.value") == 75
    assert await page.is_hidden("#gap-notice")

    # More events than the service retains (64): the page says the history is cut.
    long_id = uid("long")
    await new_job(svc.stub, job_pb2.JOB_KIND_GENERIC, long_id)
    for i in range(70):
        await progress(svc.stub, long_id, i, "work", f"step {i}")
    await page.goto(f"{dash.url}/jobs/{long_id}")
    assert await page.is_visible("#gap-notice")
    assert (await timeline_seqs(page))[0] == 7


async def test_job_page_details_artifacts_and_message_follow_the_job_live(
    dash: DashboardProcess, context: Any, svc: ServiceHandle, bridge: Any
) -> None:
    """Started, Ended, Process id and the artifacts stayed "—" and "No artifacts." until
    a reload, and the head's message read as the timeline words it ("OCR_TIMEOUT: ...")
    where a reload shows the error's message; an empty progress message did not clear
    it. The page now reads what events do not carry again when the state changes."""
    created = await new_job(svc.stub, job_pb2.JOB_KIND_EXTRACTION, uid("details"))
    job_id = created.job.id
    auth = {"Authorization": f"Bearer {created.callback_token}"}
    page = await login(context, dash.url)
    await page.goto(f"{dash.url}/jobs/{job_id}")
    await page.wait_for_selector("#live[data-state=live]", timeout=WAIT_MS)
    detail = "(el, name) => [...el.querySelectorAll('dt')].find(d => d.textContent === name)"
    dd = detail + ".nextElementSibling.textContent.trim()"
    assert await page.eval_on_selector("#details", f"(el) => ({dd})(el, 'Started')") == "—"
    body = {"phase": "ocr", "progress": 10, "message": "Seite 1", "process": {"id": "sec-77"}}
    assert (await bridge.post(f"/api/external/jobs/{job_id}", body, headers=auth))[0] == 200
    process_id = f"(el) => ({detail})(el, 'Process id').nextElementSibling.textContent"
    await page.wait_for_function(
        f"() => ({process_id})(document.querySelector('#details')) === 'sec-77'", timeout=WAIT_MS
    )
    assert await page.eval_on_selector("#details", f"(el) => ({dd})(el, 'Started')") != "—"
    quiet = {"phase": "ocr", "progress": 20, "message": ""}
    assert (await bridge.post(f"/api/external/jobs/{job_id}", quiet, headers=auth))[0] == 200
    await page.wait_for_function(
        "() => document.querySelectorAll('#timeline tbody tr').length === 2", timeout=WAIT_MS
    )
    assert await page.inner_text("#message") == ""
    await svc.stub.UploadArtifact(
        iter(
            [
                job_service_pb2.UploadArtifactRequest(
                    header=job_service_pb2.ArtifactHeader(job_id=job_id, name="partial.md")
                ),
                job_service_pb2.UploadArtifactRequest(data=b"# partial"),
            ]
        )
    )
    failed = {"phase": "failed", "error": {"code": "OCR_TIMEOUT", "message": "Timeout beim OCR"}}
    assert (await bridge.post(f"/api/external/jobs/{job_id}", failed, headers=auth))[0] == 200
    await page.wait_for_selector("#artifacts-card a[download]", timeout=WAIT_MS)
    assert await page.inner_text("#artifacts-card .name") == "partial.md"
    assert await page.eval_on_selector("#details", f"(el) => ({dd})(el, 'Ended')") != "—"
    assert await page.inner_text("#message") == "Timeout beim OCR"
    assert "OCR_TIMEOUT" in await page.inner_text("#error")
    live = await page.inner_text("#details")
    await page.reload()
    assert await page.inner_text("#details") == live
    # The job page had no Log out (only the jobs page did).
    await page.click("form.logout button")
    await page.wait_for_url(re.compile(r"/login"), timeout=WAIT_MS)


async def test_job_page_shows_the_log_line_that_failed_the_job(
    dash: DashboardProcess, context: Any, svc: ServiceHandle
) -> None:
    """A job failed by an ERROR log line while its page was open showed FAILED and the
    line's message as its error, but the Logs table kept the lines of the page's load
    (the failing line only after a reload). The log lines are read again with the rest
    when the state changes."""
    job_id = uid("logfail")
    await new_job(svc.stub, job_pb2.JOB_KIND_GENERIC, job_id)
    await progress(svc.stub, job_id, 30, "download", "started")
    await write_log(svc.stub, job_id, log_pb2.LOG_LEVEL_INFO, "loaded with the page")
    page = await login(context, dash.url)
    await page.goto(f"{dash.url}/jobs/{job_id}")
    await page.wait_for_selector("#live[data-state=live]", timeout=WAIT_MS)
    await write_log(svc.stub, job_id, log_pb2.LOG_LEVEL_ERROR, "download failed: 403")
    await page.wait_for_selector("#job[data-state=FAILED]", timeout=WAIT_MS)
    await page.wait_for_function(
        "() => document.querySelector('#logs tbody').textContent.includes('download failed')",
        timeout=WAIT_MS,
    )
    live = await page.inner_text("#logs")
    await page.reload()
    assert await page.inner_text("#logs") == live


async def test_a_job_that_ends_before_its_stream_opens_is_shown_ended(
    dash: DashboardProcess, context: Any, svc: ServiceHandle
) -> None:
    """A job that ended between its page's load and its stream's opening (or while the
    stream was reconnecting: a restart of the dashboard, a network blip) came as a
    snapshot saying FAILED before its events: the page took the state from the
    snapshot, then saw no change in the events, and never read what events do not
    carry again (Ended "—", no outcome, the lines of the page's load under Logs)."""
    job_id = uid("endsfirst")
    await new_job(svc.stub, job_pb2.JOB_KIND_GENERIC, job_id)
    await progress(svc.stub, job_id, 40, "work", "running")
    stream = re.compile(rf"/events/jobs/{job_id}\?")
    async with held_requests(context, stream) as (held, release):
        page = await login(context, dash.url)
        await page.goto(f"{dash.url}/jobs/{job_id}")
        await asyncio.wait_for(held.wait(), WAIT_MS / 1000)  # its stream, held
        await write_log(svc.stub, job_id, log_pb2.LOG_LEVEL_ERROR, "disk full")
        release.set()
        await page.wait_for_selector("#job[data-state=FAILED]", timeout=WAIT_MS)
        await page.wait_for_function(
            "() => document.querySelector('#logs tbody').textContent.includes('disk full')",
            timeout=WAIT_MS,
        )
        assert "disk full" in await page.inner_text("#error")
        live = await page.inner_text("#details")
        await page.reload()
        assert await page.inner_text("#details") == live


async def test_a_log_line_and_an_error_keep_their_line_breaks(
    dash: DashboardProcess, context: Any, svc: ServiceHandle
) -> None:
    """A log line or an error of several lines (a stack trace, FFmpeg's output) ran
    together into one paragraph: "Traceback (most recent call last): File ...". Read
    as drawn (innerText follows the CSS), each line is its own."""
    job_id = uid("lines")
    trace = 'Traceback (most recent call last):\n  File "w.py", line 3\nValueError: bad'
    await new_job(svc.stub, job_pb2.JOB_KIND_GENERIC, job_id)
    await write_log(svc.stub, job_id, log_pb2.LOG_LEVEL_WARNING, trace)
    await svc.stub.ReportEvent(
        job_service_pb2.ReportEventRequest(
            job_id=job_id,
            idempotency_key=uuid.uuid4().hex,
            failed=job_pb2.JobError(code="CRASH", message=trace),
        )
    )
    page = await login(context, dash.url)
    for viewport in (LAPTOP, PHONE):
        await page.set_viewport_size(viewport)
        await page.goto(f"{dash.url}/jobs/{job_id}")
        assert await page.inner_text("#logs tbody .message") == trace
        assert await page.inner_text("#error p.error > bdi") == trace


async def test_multi_line_text_keeps_its_line_breaks_in_the_timeline_and_the_list(
    dash: DashboardProcess, context: Any, svc: ServiceHandle
) -> None:
    """A progress message or an error of several lines ran together in the timeline,
    the job's head and the jobs list's message cell ("Seite 4/10 OCR läuft"), where the
    logs and the outcome keep them. Read as drawn (innerText follows the CSS)."""
    job_id = uid("tl-lines")
    text = "Seite 4/10\nOCR läuft"
    await new_job(svc.stub, job_pb2.JOB_KIND_GENERIC, job_id, {"run": job_id})
    page = await login(context, dash.url)
    await page.goto(f"{dash.url}/jobs/{job_id}")
    await page.wait_for_selector("#live[data-state=live]", timeout=WAIT_MS)
    await progress(svc.stub, job_id, 40, "ocr", text)  # a row the page adds live
    await page.wait_for_selector("#timeline tbody tr[data-seq='1']", timeout=WAIT_MS)
    assert await page.inner_text("#timeline tbody tr[data-seq='1'] .message") == text
    for viewport in (LAPTOP, PHONE):
        await page.set_viewport_size(viewport)
        await page.goto(f"{dash.url}/jobs/{job_id}")
        assert await page.inner_text("#timeline tbody .message") == text
        assert await page.inner_text("#message") == text
        await page.goto(f"{dash.url}/jobs?label=run%3D{job_id}")
        assert await page.inner_text(f"#jobs tr[data-job='{job_id}'] .clip") == text


async def test_a_videos_position_and_length_are_shown(
    dash: DashboardProcess, context: Any, svc: ServiceHandle
) -> None:
    """A video worker's currentTime and totalTime (Progress media_time / media_duration)
    were shown nowhere: a worker that sends its position only, with no percent and no
    length yet, left the page at 0 % with nothing moving. The head shows them (live and
    as loaded), each progress of the timeline its own, and the jobs list the job's."""
    job_id = uid("video")
    await new_job(
        svc.stub, job_pb2.JOB_KIND_VIDEO, job_id, {"run": job_id}, url="https://m.example/v.mp4"
    )
    page = await login(context, dash.url)
    await page.goto(f"{dash.url}/jobs/{job_id}")
    await page.wait_for_selector("#live[data-state=live]", timeout=WAIT_MS)
    media = "#job .progress .media"
    assert not await page.is_visible(media)

    async def report(**times: Any) -> None:
        progress = job_pb2.Progress(message="Descargando")
        for name, seconds in times.items():
            getattr(progress, name).FromMilliseconds(int(seconds * 1000))
        await svc.stub.ReportEvent(
            job_service_pb2.ReportEventRequest(
                job_id=job_id,
                kind=job_pb2.JOB_KIND_VIDEO,
                idempotency_key=uuid.uuid4().hex,
                progress=progress,
                percent_not_given=True,
            )
        )

    await report(media_time=90.5, media_duration=0)  # a length of 0: not known yet
    await page.wait_for_selector("#timeline tbody tr[data-seq='1']", timeout=WAIT_MS)
    assert await page.inner_text(media) == "1:30"
    await report(media_duration=3 * 3600 + 200)
    await page.wait_for_selector("#timeline tbody tr[data-seq='2']", timeout=WAIT_MS)
    assert await page.inner_text(media) == "1:30 / 3:03:20"
    for _ in range(2):  # live, then as loaded
        medias = "rs => rs.map(r => r.querySelector('.percent').innerText)"
        assert await page.eval_on_selector_all("#timeline tbody tr", medias) == [
            "0.0% 1:30",
            "0.8% 1:30 / 3:03:20",
        ]
        assert await page.inner_text(media) == "1:30 / 3:03:20"
        await page.reload()
    await page.goto(f"{dash.url}/jobs?label=run%3D{job_id}")
    await page.wait_for_selector("#live[data-state=live]", timeout=WAIT_MS)
    row = f"#jobs tr[data-job='{job_id}'] .media"
    assert await page.inner_text(row) == "1:30 / 3:03:20"
    await report(media_time=100)  # live
    await page.wait_for_function(
        "s => document.querySelector(s).textContent === '1:40 / 3:03:20'", arg=row, timeout=WAIT_MS
    )


async def test_a_cancelled_jobs_outcome_is_no_error(
    dash: DashboardProcess, context: Any, svc: ServiceHandle
) -> None:
    """A cancelled job's outcome read "Error" in red, "CANCELLED superseded", as if it
    had failed: it says Cancelled and the reason, also when it is cancelled while its
    page is open. A failed job's stays an error."""
    job_id = uid("cancelled")
    await new_job(svc.stub, job_pb2.JOB_KIND_GENERIC, job_id)
    page = await login(context, dash.url)
    await page.goto(f"{dash.url}/jobs/{job_id}")
    await page.wait_for_selector("#live[data-state=live]", timeout=WAIT_MS)
    await svc.stub.CancelJob(job_service_pb2.CancelJobRequest(id=job_id, reason="superseded"))
    await page.wait_for_selector("#outcome h3", timeout=WAIT_MS)
    for _ in range(2):  # live, then as loaded
        assert await page.inner_text("#outcome h3") == "Cancelled"
        assert await page.inner_text("#error p") == "superseded"
        assert await page.locator("#outcome .error").count() == 0
        await page.reload()
    failed = uid("failed")
    await new_job(svc.stub, job_pb2.JOB_KIND_GENERIC, failed)
    await svc.stub.ReportEvent(
        job_service_pb2.ReportEventRequest(
            job_id=failed,
            idempotency_key=uuid.uuid4().hex,
            failed=job_pb2.JobError(code="CANCELLED", message="the worker gave up"),
        )
    )
    await page.goto(f"{dash.url}/jobs/{failed}")
    assert await page.inner_text("#outcome h3") == "Error"
    assert await page.inner_text("#error p.error") == "CANCELLED the worker gave up"


async def test_job_page_says_when_older_log_lines_are_not_shown(
    dash: DashboardProcess, context: Any, svc: ServiceHandle
) -> None:
    """The job page lists a job's newest 200 log lines; with more, the oldest were left
    out without a word, and the last line shown read as the job's first. It now says."""
    job_id = uid("manylogs")
    await new_job(svc.stub, job_pb2.JOB_KIND_GENERIC, job_id)
    for n in range(200):
        await write_log(svc.stub, job_id, log_pb2.LOG_LEVEL_INFO, f"line {n}")
    page = await login(context, dash.url)
    await page.goto(f"{dash.url}/jobs/{job_id}")
    assert len(await page.query_selector_all("#logs tbody tr")) == 200
    assert not await page.is_visible("#logs-cut")  # every line is shown
    await write_log(svc.stub, job_id, log_pb2.LOG_LEVEL_INFO, "line 200")
    await page.reload()
    shown = await page.eval_on_selector_all(
        "#logs tbody .message", "cells => cells.map(c => c.textContent)"
    )
    assert len(shown) == 200 and shown[0] == "line 200" and "line 0" not in shown
    assert await page.is_visible("#logs-cut")
    assert "the newest 200 lines" in await page.inner_text("#logs-cut")
    reply = await page.request.get(f"{dash.url}/api/jobs/{job_id}")
    body = await reply.json()
    assert len(body["logs"]) == 200 and body["logs_cut"] is True


async def test_a_job_without_events_says_so_until_its_first(
    dash: DashboardProcess, context: Any, svc: ServiceHandle
) -> None:
    """A queued job's Timeline was a bare header row (on a phone, a heading over
    nothing) where Logs and Artifacts say "No log lines." and "No artifacts."."""
    job_id = uid("quiet")
    await new_job(svc.stub, job_pb2.JOB_KIND_GENERIC, job_id)
    page = await login(context, dash.url)
    await page.goto(f"{dash.url}/jobs/{job_id}")
    assert await page.inner_text("#no-events") == "No events yet."
    await page.wait_for_selector("#live[data-state=live]", timeout=WAIT_MS)
    await progress(svc.stub, job_id, 5, "fetch", "first")
    await page.wait_for_selector("#timeline tbody tr", timeout=WAIT_MS)
    assert not await page.is_visible("#no-events")


async def test_job_page_reloads_when_the_jobs_history_went_back(
    dash: DashboardProcess, context: Any, svc: ServiceHandle
) -> None:
    """A page whose last sequence is past the job's newest (the service restored from an
    older backup while it was open: here its HTML says 40) gets a gap going back; it
    kept its timeline and dropped every new event up to 40. It reloads now."""
    job_id = uid("rewind")
    await new_job(svc.stub, job_pb2.JOB_KIND_GENERIC, job_id)
    await progress(svc.stub, job_id, 10, "work", "step 1")
    page = await login(context, dash.url)
    served: list[str] = []

    async def first_as_if_at_40(route: Any) -> None:
        served.append(route.request.url)
        if len(served) > 1:
            await route.continue_()
            return
        reply = await route.fetch()
        body = (await reply.text()).replace('data-seq="1"', 'data-seq="40"', 1)
        await route.fulfill(response=reply, body=body)

    await page.route(f"{dash.url}/jobs/{job_id}", first_as_if_at_40)
    await page.goto(f"{dash.url}/jobs/{job_id}")
    await until(lambda: len(served) == 2)  # reloaded on the gap
    await page.wait_for_selector("#live[data-state=live]", timeout=WAIT_MS)
    await progress(svc.stub, job_id, 20, "work", "step 2")
    await page.wait_for_function(
        "() => document.querySelectorAll('#timeline tbody tr').length === 2", timeout=WAIT_MS
    )
    assert await timeline_seqs(page) == [1, 2]


async def test_stalled_job_and_stream_gap(
    dash: DashboardProcess, context: Any, svc: ServiceHandle, http: aiohttp.ClientSession
) -> None:
    stub = svc.stub
    job_id = uid("stall")
    job = job_pb2.Job(kind=job_pb2.JOB_KIND_GENERIC)
    job.progress_deadline.FromMilliseconds(300)
    await stub.CreateJob(job_service_pb2.CreateJobRequest(job=job, job_id=job_id))
    await progress(stub, job_id, 30, "work", "then silence")
    page = await login(context, dash.url)
    await page.goto(f"{dash.url}/jobs/{job_id}")
    # The service's sweep appends STALLED (about a second): shown live, badge and timeline.
    await page.wait_for_selector("#job .badge.stalled", timeout=WAIT_MS)
    # Wait for the timeline row too: CI read the timeline after the badge had changed
    # and before the STALLED row was there.
    await page.wait_for_function(
        "() => document.querySelectorAll('#timeline .type').length >= 2", timeout=WAIT_MS
    )
    types = await page.eval_on_selector_all("#timeline .type", "c => c.map(x => x.textContent)")
    assert types == ["PROGRESS", "STALLED"]
    await page.goto(dash.url + "/jobs")
    assert await page.locator(f"#jobs tr[data-job='{job_id}'] .badge.stalled").count() == 1
    await progress(stub, job_id, 40, "work", "alive again")
    await page.wait_for_function(ROW_IS, arg=[job_id, 40, "RUNNING"], timeout=WAIT_MS)
    assert await page.locator(f"#jobs tr[data-job='{job_id}'] .badge.stalled").count() == 0

    # Resuming from a sequence older than the retained events: the stream says `gap`.
    long_id = uid("gap")
    await new_job(stub, job_pb2.JOB_KIND_GENERIC, long_id)
    for i in range(70):
        await progress(stub, long_id, i, "work", f"step {i}")
    headers = {**BEARER, "Last-Event-ID": "2"}
    async with http.get(f"{dash.url}/events/jobs/{long_id}", headers=headers) as stream:
        lines: list[bytes] = []
        async for line in stream.content:
            lines.append(line.strip())
            if line.startswith(b"data: [{"):
                break
    gap = lines[lines.index(b"event: gap") + 1]
    assert gap == b'data: {"requested":2,"oldest":7}'


# -- untrusted text ----------------------------------------------------------------

PAYLOADS = [
    '<img src=x onerror="window.__pwned=1">',
    "<script>window.__pwned=2</script>",
    '"><svg onload=window.__pwned=3>',
    "javascript:window.__pwned=4",
    '<a href="javascript:window.__pwned=5">click</a>',
]


async def test_xss_payloads_render_as_text_and_run_nothing(
    dash: DashboardProcess, context: Any, svc: ServiceHandle
) -> None:
    stub = svc.stub
    job_id = uid("xss")
    labels = {f"k{i}": p for i, p in enumerate(PAYLOADS)}
    await new_job(stub, job_pb2.JOB_KIND_GENERIC, job_id, labels)
    dialogs: list[str] = []
    page = await login(context, dash.url)

    async def on_dialog(dialog: Any) -> None:
        dialogs.append(dialog.message)
        await dialog.dismiss()

    page.on("dialog", on_dialog)
    await page.wait_for_selector("#live[data-state=live]", timeout=WAIT_MS)
    # Live: the payloads arrive over SSE after the page has loaded.
    for i, payload in enumerate(PAYLOADS):
        await progress(stub, job_id, 10 + i, payload, payload)
    await write_log(stub, job_id, log_pb2.LOG_LEVEL_INFO, "<img src=x onerror=alert(1)>")
    for payload in PAYLOADS:
        await write_log(stub, job_id, log_pb2.LOG_LEVEL_WARNING, payload)
    await page.wait_for_function(ROW_IS, arg=[job_id, 14, "RUNNING"], timeout=WAIT_MS)
    row = await page.inner_text(f"#jobs tr[data-job='{job_id}']")
    assert PAYLOADS[-1] in row
    # Server-rendered: job page, then the jobs page reloaded.
    await page.goto(f"{dash.url}/jobs/{job_id}")
    await page.wait_for_selector("#live[data-state=live]", timeout=WAIT_MS)
    error = "<script>window.__pwned=6</script><img src=x onerror=window.__pwned=7>"
    await stub.ReportEvent(
        job_service_pb2.ReportEventRequest(
            job_id=job_id,
            idempotency_key="x-fail",
            failed=job_pb2.JobError(code="<b>E</b>", message=error),
        )
    )
    await page.wait_for_function(
        "() => document.querySelector('#job').dataset.state === 'FAILED'", timeout=WAIT_MS
    )
    text = await page.inner_text("main")
    assert "<img src=x onerror=alert(1)>" in text
    for payload in PAYLOADS:
        assert payload in text
    assert error in await page.inner_text("#timeline")
    await page.reload()
    assert error in await page.inner_text("#outcome")
    assert "<b>E</b>" in await page.inner_text("#outcome")
    await page.goto(dash.url + "/jobs")
    assert error in await page.inner_text(f"#jobs tr[data-job='{job_id}']")
    # Nothing ran: no global set, no dialog, no injected element.
    assert await page.evaluate("window.__pwned") is None
    await page.goto(f"{dash.url}/jobs/{job_id}")
    assert await page.evaluate("window.__pwned") is None
    assert await page.locator("main img, main svg, main script").count() == 0
    assert dialogs == []
    csp = (await page.request.get(dash.url + "/jobs")).headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "unsafe-eval" not in csp


# -- cancel ---------------------------------------------------------------------


async def decline(page: Any, button: str) -> None:
    """Clicks `button` and dismisses its confirmation: nothing may be sent."""
    dismissed = asyncio.Event()

    async def dismiss(dialog: Any) -> None:
        await dialog.dismiss()
        dismissed.set()

    page.once("dialog", lambda d: asyncio.ensure_future(dismiss(d)))
    await page.click(button)
    await asyncio.wait_for(dismissed.wait(), WAIT_MS / 1000)
    await asyncio.sleep(0.3)  # a negative check: time for a request that must not be sent


async def confirm(page: Any, button: str) -> None:
    """Clicks `button`, accepts its confirmation and waits for the page it leads to."""
    page.once("dialog", lambda d: asyncio.ensure_future(d.accept()))
    async with page.expect_navigation():
        await page.click(button)


async def test_cancel_needs_the_csrf_token(
    dash: DashboardProcess, context: Any, svc: ServiceHandle
) -> None:
    stub = svc.stub
    job_id = uid("cancel")
    await new_job(stub, job_pb2.JOB_KIND_GENERIC, job_id)
    page = await login(context, dash.url)
    await page.goto(f"{dash.url}/jobs/{job_id}")
    url = f"{dash.url}/jobs/{job_id}/cancel"
    # Without the token, or with a wrong one: refused, nothing changes.
    for form in ({}, {"csrf": "forged"}):
        reply = await page.request.post(url, form=form, max_redirects=0)
        assert reply.status == 403, form
        assert "CSRF" in await reply.text()
    get = job_service_pb2.GetJobRequest(id=job_id)
    assert (await stub.GetJob(get)).state == job_pb2.JOB_STATE_QUEUED
    # The token of another session does not work either.
    other = await context.browser.new_context()
    other_page = await login(other, dash.url)
    await other_page.goto(f"{dash.url}/jobs/{job_id}")
    other_csrf = await other_page.get_attribute("#cancel input[name=csrf]", "value")
    await other.close()
    reply = await page.request.post(url, form={"csrf": other_csrf}, max_redirects=0)
    assert reply.status == 403
    assert (await stub.GetJob(get)).state == job_pb2.JOB_STATE_QUEUED

    # Declining the confirmation sends nothing.
    await decline(page, "#cancel button")
    assert (await stub.GetJob(get)).state == job_pb2.JOB_STATE_QUEUED
    # With the page's own token, after confirming: cancelled.
    await confirm(page, "#cancel button")
    await page.wait_for_function(
        "() => document.querySelector('#job').dataset.state === 'CANCELLED'", timeout=WAIT_MS
    )
    assert (await stub.GetJob(get)).state == job_pb2.JOB_STATE_CANCELLED
    assert await page.locator("#cancel").count() == 0


async def test_an_ended_job_is_deleted_from_its_page(
    dash: DashboardProcess, context: Any, svc: ServiceHandle
) -> None:
    """Delete job (DeleteJob) shows on an ended job's page, also when the job ends while
    the page is open; it needs the page's CSRF token and a confirmation, and leads back
    to the list. A job that has not ended cannot be deleted: 409 naming its state."""
    stub = svc.stub
    job_id = uid("delete")
    await new_job(stub, job_pb2.JOB_KIND_GENERIC, job_id)
    page = await login(context, dash.url)
    await page.goto(f"{dash.url}/jobs/{job_id}")
    assert not await page.is_visible("#delete button")
    url = f"{dash.url}/jobs/{job_id}/delete"
    csrf = await page.get_attribute("#delete input[name=csrf]", "value")
    reply = await page.request.post(url, form={"csrf": "forged"}, max_redirects=0)
    assert reply.status == 403
    reply = await page.request.post(url, form={"csrf": csrf or ""}, max_redirects=0)
    assert reply.status == 409
    assert "has not ended (QUEUED)" in await reply.text()
    get = job_service_pb2.GetJobRequest(id=job_id)
    assert (await stub.GetJob(get)).state == job_pb2.JOB_STATE_QUEUED
    # The job ends while the page is open: the button appears.
    await stub.CancelJob(job_service_pb2.CancelJobRequest(id=job_id, reason="done"))
    await page.wait_for_selector("#delete button", state="visible", timeout=WAIT_MS)
    await decline(page, "#delete button")
    assert (await stub.GetJob(get)).state == job_pb2.JOB_STATE_CANCELLED
    await confirm(page, "#delete button")
    assert page.url.endswith(f"/jobs?deleted={job_id}")
    # It says so (the list came back without a word: was it deleted?).
    assert await page.inner_text("#deleted") == f"Job {job_id} was deleted."
    assert await page.get_attribute("#deleted", "role") == "status"
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await stub.GetJob(get)
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    shown = await page.eval_on_selector_all("#jobs tbody tr", "rs => rs.map(r => r.dataset.job)")
    assert job_id not in shown
    # Deleted already (another tab, the retention): the list, not an error.
    reply = await page.request.post(url, form={"csrf": csrf or ""}, max_redirects=0)
    assert (reply.status, reply.headers["location"]) == (303, f"/jobs?deleted={job_id}")
    # A link naming a job that is there says nothing of a deletion.
    kept = (await new_job(stub, job_pb2.JOB_KIND_GENERIC, uid("kept"))).job.id
    await page.goto(f"{dash.url}/jobs?deleted={kept}")
    assert await page.locator("#deleted").count() == 0


async def test_a_job_page_leads_back_to_the_list_it_was_opened_from(
    dash: DashboardProcess, context: Any, svc: ServiceHandle
) -> None:
    """The job page's "← Jobs" and Delete job led to /jobs, every filter gone: an
    operator clearing failed jobs one by one filtered the list again after each. Both
    go back to the list the job was opened from, its filters and order kept."""
    run = uuid.uuid4().hex[:6]
    for i in range(2):
        await new_job(svc.stub, job_pb2.JOB_KIND_GENERIC, f"back-{run}-{i}", {"run": run})
        await svc.stub.CancelJob(job_service_pb2.CancelJobRequest(id=f"back-{run}-{i}"))
    listed = f"/jobs?label=run%3D{run}&state=CANCELLED&order=oldest"
    page = await login(context, dash.url)
    await page.goto(dash.url + listed)
    async with page.expect_navigation():
        await page.click(f"#jobs a[href='/jobs/back-{run}-0']")
    assert await page.get_attribute("#back", "href") == listed
    await confirm(page, "#delete button")
    assert page.url == f"{dash.url}{listed}&deleted=back-{run}-0"
    assert await page.inner_text("#deleted") == f"Job back-{run}-0 was deleted."
    shown = "rs => rs.map(r => r.dataset.job)"
    assert await page.eval_on_selector_all("#jobs tbody tr", shown) == [f"back-{run}-1"]
    # From the list the deletion led to: the notice is not carried on.
    async with page.expect_navigation():
        await page.click(f"#jobs a[href='/jobs/back-{run}-1']")
    assert await page.get_attribute("#back", "href") == listed
    # A page opened on its own (a link, a new tab) leads to the whole list.
    other = await context.new_page()
    await other.goto(f"{dash.url}/jobs/back-{run}-1")
    assert await other.get_attribute("#back", "href") == "/jobs"


async def test_a_deleted_job_leaves_the_pages_open_on_it(
    dash: DashboardProcess, context: Any, svc: ServiceHandle
) -> None:
    """A list kept a deleted job's row (its link answering 404) and the job's own page
    went on showing it, until a reload. Deleted by Delete job in another tab, or by
    DeleteJob (another client, the retention), the row goes and the job page says so at
    once: the dashboard's WatchJobs stream carries the deletion."""
    stub = svc.stub
    run = uuid.uuid4().hex[:6]
    ours, theirs, kept = f"del-{run}-ours", f"del-{run}-theirs", f"del-{run}-kept"
    for job_id in (ours, theirs, kept):
        await new_job(stub, job_pb2.JOB_KIND_GENERIC, job_id, {"run": run})
        await stub.CancelJob(job_service_pb2.CancelJobRequest(id=job_id, reason="done"))
    listing = await login(context, dash.url)
    await listing.goto(f"{dash.url}/jobs?label=run%3D{run}")
    pages = {}
    for job_id in (ours, theirs):
        pages[job_id] = await context.new_page()
        await pages[job_id].goto(f"{dash.url}/jobs/{job_id}")
    for page in (listing, *pages.values()):
        await page.wait_for_selector("#live:not([data-state=connecting])", timeout=WAIT_MS)
    assert not await pages[ours].is_visible("#gone")

    deleter = await context.new_page()
    await deleter.goto(f"{dash.url}/jobs/{ours}")
    await confirm(deleter, "#delete button")
    page = pages[ours]
    await page.wait_for_selector("#gone", state="visible", timeout=WAIT_MS)
    assert await page.get_attribute("#gone", "role") == "status"
    assert await page.locator("#delete").count() == 0  # nothing left to delete
    assert await page.inner_text("#live") == "deleted"
    await listing.wait_for_selector(
        f'#jobs tr[data-job="{ours}"]', state="detached", timeout=WAIT_MS
    )

    await stub.DeleteJob(job_service_pb2.DeleteJobRequest(id=theirs))
    page = pages[theirs]
    await page.wait_for_selector("#gone", state="visible", timeout=WAIT_MS)
    assert await page.inner_text("#live") == "deleted"
    await listing.wait_for_selector(
        f'#jobs tr[data-job="{theirs}"]', state="detached", timeout=WAIT_MS
    )
    shown = "rs => rs.map(r => r.dataset.job)"
    assert await listing.eval_on_selector_all("#jobs tbody tr", shown) == [kept]
    assert await listing.inner_text("#live") == "live"


async def test_a_job_page_shows_a_job_made_again_at_once_under_its_deleted_id(
    dash: DashboardProcess, context: Any, svc: ServiceHandle
) -> None:
    """Another client deletes the job and makes one again under its id at once: the
    dashboard looked the shown jobs up every 5 s (a deletion was no event), found a job
    of the id, and the page went on showing the deleted one, ended, for good. The
    deletion comes on the dashboard's WatchJobs stream: the page says so, and the new
    job's first event has it show that job."""
    job_id = uid("remade")
    await new_job(svc.stub, job_pb2.JOB_KIND_GENERIC, job_id)
    await svc.stub.CancelJob(job_service_pb2.CancelJobRequest(id=job_id, reason="done"))
    page = await login(context, dash.url)
    await page.goto(f"{dash.url}/jobs/{job_id}")
    await page.wait_for_selector("#live[data-state=ended]", timeout=WAIT_MS)
    await svc.stub.DeleteJob(job_service_pb2.DeleteJobRequest(id=job_id))
    await page.wait_for_selector("#gone", state="visible", timeout=WAIT_MS)
    again = await new_job(svc.stub, job_pb2.JOB_KIND_GENERIC, job_id)
    await progress(svc.stub, job_id, 40, "new", "made again")
    created = iso(again.job.create_time)
    await page.wait_for_function(
        "c => document.querySelector('#job')?.dataset.created === c", arg=created, timeout=WAIT_MS
    )
    await page.wait_for_selector("#job[data-state=RUNNING]", timeout=WAIT_MS)
    assert not await page.is_visible("#gone")


async def test_an_ended_jobs_page_waits_for_its_deletion_quietly(
    browser: Any, svc: ServiceHandle
) -> None:
    """An ended job's page follows its deletion on the jobs stream, whose heartbeat is
    `stats`: unheard, the page took its stream for silent every three heartbeats, said
    "reconnecting…" and opened another."""
    job_id = uid("quiet")
    await new_job(svc.stub, job_pb2.JOB_KIND_GENERIC, job_id)
    await svc.stub.CancelJob(job_service_pb2.CancelJobRequest(id=job_id))
    # Three heartbeats (6 s) leave a margin over the stats' 2 s on a loaded machine.
    async with running_dashboard(svc.target, JOBWIRE_DASHBOARD_HEARTBEAT_SECONDS="2") as dash:
        ctx = await browser.new_context(viewport=LAPTOP)
        try:
            page = await login(ctx, dash.url)
            opened: list[str] = []
            watch = f"/events/jobs?ids={job_id}&new=0"  # the job page's, not the login's list
            page.on("request", lambda r: opened.append(r.url) if watch in r.url else None)
            await page.goto(f"{dash.url}/jobs/{job_id}")
            await page.wait_for_selector("#live[data-state=ended]", timeout=WAIT_MS)
            await page.evaluate(RECORD_STATES)
            await page.wait_for_timeout(7000)  # a negative check: past three heartbeats
            assert await page.evaluate("window.__states") == []
            assert len(opened) == 1, opened
            await svc.stub.DeleteJob(job_service_pb2.DeleteJobRequest(id=job_id))
            await page.wait_for_selector("#gone", state="visible", timeout=WAIT_MS)
        finally:
            await ctx.close()


async def test_a_job_deleted_before_its_page_streams_says_so(
    dash: DashboardProcess, context: Any, svc: ServiceHandle
) -> None:
    """A job page whose stream opens after the job was deleted heard 404 and retried it
    as "reconnecting…" for ever; it says the job was deleted."""
    job_id = uid("gone")
    await new_job(svc.stub, job_pb2.JOB_KIND_GENERIC, job_id)
    await svc.stub.CancelJob(job_service_pb2.CancelJobRequest(id=job_id))
    page = await login(context, dash.url)
    async with held_requests(context, re.compile(r"/events/jobs/")) as (held, release):
        await page.goto(f"{dash.url}/jobs/{job_id}")
        await asyncio.wait_for(held.wait(), WAIT_MS / 1000)
        await svc.stub.DeleteJob(job_service_pb2.DeleteJobRequest(id=job_id))
        release.set()
        await page.wait_for_selector("#gone", state="visible", timeout=WAIT_MS)
    assert await page.inner_text("#live") == "deleted"


async def test_an_ended_jobs_page_hears_a_deletion_made_before_its_jobs_stream_opened(
    browser: Any, svc: ServiceHandle
) -> None:
    """An ended job's page learns of its deletion from the jobs stream it opens once the
    job's own stream ends, and that stream subscribed live from its opening: a deletion
    made before (the job cancelled and deleted at once by a script, or while the
    dashboard restarted and another tab had its stream live again first) was never
    heard, and the page showed the deleted job, "finished", for good. It subscribes
    from a mark taken as the page read the job: the journal replays the deletion, or a
    mark of another process makes the page read the job again."""
    job_id = uid("late")
    await new_job(svc.stub, job_pb2.JOB_KIND_GENERIC, job_id)
    watch = re.compile(rf"/events/jobs\?ids={job_id}&new=0")
    async with running_dashboard(svc.target) as dash:
        ctx = await browser.new_context(viewport=LAPTOP)
        try:
            page = await login(ctx, dash.url)
            await page.goto(f"{dash.url}/jobs/{job_id}")
            await page.wait_for_selector("#live[data-state=live]", timeout=WAIT_MS)
            # The job ends and is deleted before its page's jobs stream is open.
            async with held_requests(ctx, watch) as (held, release):
                await svc.stub.CancelJob(job_service_pb2.CancelJobRequest(id=job_id))
                await asyncio.wait_for(held.wait(), WAIT_MS / 1000)
                await svc.stub.DeleteJob(job_service_pb2.DeleteJobRequest(id=job_id))
                release.set()
                await page.wait_for_selector("#gone", state="visible", timeout=WAIT_MS)
            assert await page.inner_text("#live") == "deleted"

            # Deleted while the dashboard restarts; a jobs page has the new process's
            # stream live before the job page's stream reconnects.
            other = uid("restart-gone")
            await new_job(svc.stub, job_pb2.JOB_KIND_GENERIC, other)
            await svc.stub.CancelJob(job_service_pb2.CancelJobRequest(id=other))
            await page.goto(f"{dash.url}/jobs/{other}")
            await page.wait_for_selector("#live[data-state=ended]", timeout=WAIT_MS)
            again = re.compile(rf"/events/jobs\?ids={other}&new=0")
            async with held_requests(ctx, again) as (held, release):
                await dash.stop()
                await svc.stub.DeleteJob(job_service_pb2.DeleteJobRequest(id=other))
                await dash.start()
                await asyncio.wait_for(held.wait(), WAIT_MS * 3 / 1000)
                listing = await ctx.new_page()
                await listing.goto(f"{dash.url}/jobs")
                await listing.wait_for_selector("#live[data-state=live]", timeout=WAIT_MS)
                release.set()
                await page.wait_for_selector("#gone", state="visible", timeout=WAIT_MS)
            assert await page.inner_text("#live") == "deleted"
        finally:
            await ctx.close()


async def test_a_job_made_again_under_a_deleted_jobs_id_replaces_its_row(
    dash: DashboardProcess, context: Any, svc: ServiceHandle
) -> None:
    """A job deleted and made again under its id (a client's own ids, a late AuroraCloud
    report): an open jobs page kept the deleted job's row, SUCCEEDED at 100 %, and
    dropped the new job's events as older than that row until their sequence passed its
    own. The row now follows the new job, as a reload shows it."""
    stub = svc.stub
    job_id = uid("again")
    await new_job(stub, job_pb2.JOB_KIND_GENERIC, job_id)
    for percent in (10, 20, 30):
        await progress(stub, job_id, percent, "old", "the deleted job")
    await stub.ReportEvent(
        job_service_pb2.ReportEventRequest(
            job_id=job_id, idempotency_key=uuid.uuid4().hex, completed=job_pb2.Result()
        )
    )
    page = await login(context, dash.url)
    row = f'#jobs tr[data-job="{job_id}"]'
    await page.wait_for_selector(row, timeout=WAIT_MS)
    await page.wait_for_selector("#live[data-state=live]", timeout=WAIT_MS)
    await stub.DeleteJob(job_service_pb2.DeleteJobRequest(id=job_id))
    again = await new_job(stub, job_pb2.JOB_KIND_GENERIC, job_id)
    assert await progress(stub, job_id, 50, "new", "made again") == 1  # below the row's 4
    await page.wait_for_function(ROW_IS, arg=[job_id, 50, "RUNNING"], timeout=WAIT_MS)
    assert await page.locator(row).count() == 1
    assert await page.inner_text(f"{row} .message") == "made again"
    created = await page.get_attribute(row, "data-created")
    assert created == iso(again.job.create_time)


# -- paging and filters ---------------------------------------------------------


async def test_paging_by_token_and_filters(
    dash: DashboardProcess, context: Any, svc: ServiceHandle
) -> None:
    run = uuid.uuid4().hex[:6]
    made = []
    for i in range(7):
        kind = job_pb2.JOB_KIND_VIDEO if i % 2 else job_pb2.JOB_KIND_BATCH
        extra = {"url": f"https://v.example/{i}.mp4"} if i % 2 else {}
        made.append((await new_job(svc.stub, kind, f"pg-{run}-{i}", {"run": run}, **extra)).job.id)
    page = await login(context, dash.url)

    async def every_page() -> tuple[int, list[str]]:
        seen: list[str] = []
        pages = 0
        while True:
            pages += 1
            seen += await page.eval_on_selector_all(
                "#jobs tbody tr", "rs => rs.map(r => r.dataset.job)"
            )
            if await page.locator("#next-page").count() == 0:
                return pages, seen
            async with page.expect_navigation():
                await page.click("#next-page")
            assert "page_token=" in page.url

    await page.goto(f"{dash.url}/jobs?label=run%3D{run}&page_size=3")
    assert await every_page() == (3, made[::-1]), "every job once, newest first, 3 a page"
    async with page.expect_navigation():
        await page.click("#first-page")
    assert "page_token" not in page.url
    # Oldest first, chosen in the filters: the same jobs the other way round.
    await page.select_option("select[name=order]", "oldest")
    async with page.expect_navigation():
        await page.click("#filters button[type=submit]")
    assert "order=oldest" in page.url
    await page.goto(f"{dash.url}/jobs?label=run%3D{run}&page_size=3&order=oldest")
    assert await every_page() == (3, made), "every job once, oldest first"
    async with page.expect_navigation():
        await page.click("#first-page")
    await page.select_option("select[name=kind]", "VIDEO")
    async with page.expect_navigation():
        await page.click("#filters button[type=submit]")
    shown = await page.eval_on_selector_all("#jobs tbody tr", "rs => rs.map(r => r.dataset.job)")
    assert shown == made[1::2]  # (still oldest first: the form kept the order)
    # Open a job by its id.
    await page.fill("input[name=id]", made[4])
    async with page.expect_navigation():
        await page.click("button[form=search]")
    assert page.url.endswith(f"/jobs/{made[4]}")


async def test_the_filter_form_keeps_every_label_and_state_of_the_url(
    dash: DashboardProcess, context: Any, svc: ServiceHandle
) -> None:
    """The form showed only the first `label` of the URL and one state of several, so
    the next Filter (to change the order, say) dropped the rest and listed more jobs."""
    run = uuid.uuid4().hex[:6]
    both = (
        await new_job(svc.stub, job_pb2.JOB_KIND_BATCH, f"fl-{run}-1", {"run": run, "t": "a"})
    ).job.id
    await new_job(svc.stub, job_pb2.JOB_KIND_BATCH, f"fl-{run}-2", {"run": run, "t": "b"})
    await new_job(svc.stub, job_pb2.JOB_KIND_BATCH, f"fl-{run}-3", {"run": "other", "t": "a"})
    page = await login(context, dash.url)
    await page.goto(f"{dash.url}/jobs?label=run%3D{run}&label=t%3Da&state=QUEUED&state=RUNNING")
    shown = "() => [...document.querySelectorAll('#jobs tbody tr')].map(r => r.dataset.job)"
    assert await page.evaluate(shown) == [both]
    assert await page.eval_on_selector_all(
        "#filters input[name=label]", "xs => xs.map(x => x.value)"
    ) == [f"run={run}", "t=a"]
    assert await page.eval_on_selector_all(
        "select[name=state] option:checked", "os => os.map(o => o.value)"
    ) == ["QUEUED", "RUNNING"]
    await page.select_option("select[name=order]", "oldest")
    async with page.expect_navigation():
        await page.click("#filters button[type=submit]")
    assert "order=oldest" in page.url
    assert await page.evaluate(shown) == [both], page.url
    # Emptying one field drops that filter only.
    await page.locator("#filters input[name=label]").nth(1).fill("")
    async with page.expect_navigation():
        await page.click("#filters button[type=submit]")
    assert sorted(await page.evaluate(shown)) == [both, f"fl-{run}-2"], page.url


async def test_the_filter_form_keeps_the_page_size_of_the_url(
    dash: DashboardProcess, context: Any, svc: ServiceHandle
) -> None:
    """Filter dropped `page_size`: a page of 200 asked for in the URL went back to 50
    (here: of 2, to every job) at the next Filter, to change the order, say."""
    run = uuid.uuid4().hex[:6]
    for i in range(3):
        await new_job(svc.stub, job_pb2.JOB_KIND_BATCH, f"ps-{run}-{i}", {"run": run})
    page = await login(context, dash.url)
    await page.goto(f"{dash.url}/jobs?label=run%3D{run}&page_size=2")
    rows = "#jobs tbody tr"
    assert await page.locator(rows).count() == 2
    await page.select_option("select[name=order]", "oldest")
    async with page.expect_navigation():
        await page.click("#filters button[type=submit]")
    assert "page_size=2" in page.url and "order=oldest" in page.url, page.url
    assert await page.eval_on_selector_all(rows, "rs => rs.map(r => r.dataset.job)") == [
        f"ps-{run}-0",
        f"ps-{run}-1",
    ]


# -- bad input ------------------------------------------------------------------


async def test_bad_input_gets_a_clear_4xx(
    dash: DashboardProcess, http: aiohttp.ClientSession
) -> None:
    cases = [
        ("/jobs?kind=SPACESHIP", 400, "kind"),
        ("/jobs?state=DONE", 400, "state"),
        ("/jobs?page_token=garbage!!", 400, "page_token"),
        ("/jobs?page_size=0", 400, "page_size"),
        ("/jobs?label=nokey", 400, "label"),
        # A job has one value per key: the last one won, the form showing both.
        ("/jobs?label=team%3Da&label=team%3Db", 400, "given twice"),
        ("/api/jobs?label=team%3Da&label=team%3Db", 400, "label 'team' given twice ('a' and 'b')"),
        ("/jobs?label=a%3Db&" + "x=" + "y" * 5000, 400, "query string"),
        ("/jobs/" + "x" * 300, 400, "id"),
        ("/jobs/no-such-job", 404, "no-such-job"),
        ("/jobs?id=no-such-job", 404, "no-such-job"),
        ("/jobs/some-job?level=LOUD", 400, "level"),
        ("/api/jobs?kind=SPACESHIP", 400, "kind"),
        ("/events/jobs?kind=SPACESHIP", 400, "kind"),
        ("/events/jobs?since=1.2.3", 400, "since"),
        # Named by its parameter, `states` (it said `state:`, the jobs page's one).
        ("/events/jobs?states=FAILED,DONE", 400, "states: unknown job state 'DONE'"),
        ("/events/jobs?states=" + ",".join(["FAILED"] * 40), 400, "states: too many"),
        ("/jobs?order=sideways", 400, "order"),
        ("/api/jobs?order=%ff", 400, "order"),
        ("/events/jobs?since=%00%ff", 400, "since"),
        ("/events/jobs/no-such-job", 404, "no-such-job"),
        ("/events/jobs/x?from=abc", 400, "from"),
        ("/static/nope.js", 404, "asset"),
    ]
    for path, status, word in cases:
        async with http.get(dash.url + path, headers=BEARER, allow_redirects=False) as reply:
            body = await reply.text()
            assert reply.status == status, (path, reply.status, body[:300])
            assert word in body, (path, body[:300])


# -- restart ----------------------------------------------------------------------


async def test_open_streams_do_not_hold_up_a_stop(svc: ServiceHandle) -> None:
    """SIGTERM with live streams open: they end at once and the dashboard stops. Each
    open stream held the stop for aiohttp's shutdown timeout, twice over (about 4 s
    with one tab open, within a pod's grace but a slow rollout)."""
    job_id = uid("stop")
    await new_job(svc.stub, job_pb2.JOB_KIND_GENERIC, job_id)
    async with (
        running_dashboard(svc.target) as dash,
        aiohttp.ClientSession() as http,
        http.get(f"{dash.url}/events/jobs", headers=BEARER) as jobs,
        http.get(f"{dash.url}/events/jobs/{job_id}", headers=BEARER) as one,
    ):
        assert (jobs.status, one.status) == (200, 200)
        await one.content.readline()  # the job's snapshot: both streams are open
        assert dash.proc is not None
        dash.proc.send_signal(signal.SIGTERM)
        began = time.monotonic()
        await asyncio.to_thread(dash.proc.wait, 10)
        took = time.monotonic() - began
        assert dash.proc.returncode == 0
        assert took < 1.5, f"stopped after {took:.1f} s"


async def test_a_row_a_reread_adds_is_followed_live(context: Any, svc: ServiceHandle) -> None:
    """A jobs page re-reads its rows after a reconnect; a job that began meanwhile (the
    dashboard restarting: its new stream never saw that job's first event) was added by
    the re-read but its stream did not follow it, so the row stood still at what the
    re-read showed until a reload. The page's stream now follows the rows it adds."""
    run = uuid.uuid4().hex[:6]
    shown, began = f"reread-{run}-shown", f"reread-{run}-began"
    await new_job(svc.stub, job_pb2.JOB_KIND_GENERIC, shown, {"run": run})
    async with running_dashboard(svc.target) as dash:
        page = await login(context, dash.url)
        await page.goto(f"{dash.url}/jobs?label=run={run}")
        await page.wait_for_selector("#live[data-state=live]", timeout=WAIT_MS)
        await dash.stop()
        await new_job(svc.stub, job_pb2.JOB_KIND_GENERIC, began, {"run": run})
        await progress(svc.stub, began, 10, "p", "while the dashboard restarted")
        await dash.start()
        await page.wait_for_function(ROW_IS, arg=[began, 10, "RUNNING"], timeout=WAIT_MS * 2)
        await page.wait_for_selector("#live[data-state=live]", timeout=WAIT_MS)
        await progress(svc.stub, began, 50, "p", "later")
        await page.wait_for_function(ROW_IS, arg=[began, 50, "RUNNING"], timeout=WAIT_MS)


async def test_restart_keeps_the_timeline_exactly_once(
    dash: DashboardProcess, context: Any, svc: ServiceHandle
) -> None:
    """The dashboard process restarts while a job page is open and events keep coming:
    after the browser reconnects (Last-Event-ID), every event is shown once, in order."""
    stub = svc.stub
    job_id = uid("restart")
    await new_job(stub, job_pb2.JOB_KIND_GENERIC, job_id)
    for i in range(1, 4):
        await progress(stub, job_id, i, "before", f"before {i}")
    row_id = uid("resync")
    await new_job(stub, job_pb2.JOB_KIND_GENERIC, row_id)
    page = await login(context, dash.url)
    # A jobs page in a second tab: it must re-read its rows after the reconnect.
    jobs_page = await context.new_page()
    await jobs_page.goto(dash.url + "/jobs")
    await jobs_page.wait_for_selector("#live[data-state=live]", timeout=WAIT_MS)
    await page.goto(f"{dash.url}/jobs/{job_id}")
    await page.wait_for_selector("#live[data-state=live]", timeout=WAIT_MS)
    await page.evaluate("window.__sameDocument = 7")
    sent = 3
    stop = asyncio.Event()

    async def keep_sending() -> None:
        nonlocal sent
        while not stop.is_set():
            sent = await progress(stub, job_id, min(sent + 1, 99), "during", f"event {sent + 1}")
            await asyncio.sleep(0.05)  # the sender's pace, not a synchronisation

    sender = asyncio.create_task(keep_sending())
    try:
        await page.wait_for_function(
            "() => document.querySelectorAll('#timeline tbody tr').length >= 8", timeout=WAIT_MS
        )
        await dash.stop()
        await page.wait_for_selector("#live[data-state=reconnecting]", timeout=WAIT_MS)
        await asyncio.sleep(0.5)  # events keep arriving while the dashboard is down
        await progress(stub, row_id, 77, "while down", "changed while the dashboard was down")
        await dash.start()
        await page.wait_for_selector("#live[data-state=live]", timeout=WAIT_MS * 3)
        # Events sent after the reconnect arrive live too, before the sender stops.
        await page.wait_for_function(
            "n => Number(document.querySelector('#job').dataset.seq) >= n",
            arg=sent + 3,
            timeout=WAIT_MS,
        )
    finally:
        stop.set()
        await sender
    await stub.ReportEvent(
        job_service_pb2.ReportEventRequest(
            job_id=job_id, idempotency_key="end", completed=job_pb2.Result(output_key="o")
        )
    )
    final = sent + 1
    await page.wait_for_function(
        "n => Number(document.querySelector('#job').dataset.seq) === n",
        arg=final,
        timeout=WAIT_MS,
    )
    assert await timeline_seqs(page) == list(range(1, final + 1))
    assert await page.evaluate("window.__sameDocument") == 7
    assert final > 12, "events kept arriving across the restart"
    # The jobs page reconnected and re-read its rows: the change made meanwhile is shown.
    await jobs_page.wait_for_function(ROW_IS, arg=[row_id, 77, "RUNNING"], timeout=WAIT_MS * 3)


async def test_a_page_while_the_service_is_away_says_so_plainly(context: Any) -> None:
    """A page loaded while the service was down read "the job service answered
    UNAVAILABLE: connections to all backends failing; last error: UNKNOWN: ipv4:...",
    gRPC's internals, and its only link led to the same 503. It now says the service is
    not answering and offers to try the same page again."""
    async with running_dashboard(f"127.0.0.1:{free_port()}") as down:
        page = await login(context, down.url)
        reply = await page.goto(f"{down.url}/jobs?order=oldest")
        assert reply is not None and reply.status == 503
        text = await page.inner_text(".error")
        assert text == "the job service is not answering (UNAVAILABLE); try again in a moment"
        assert await page.get_attribute("#retry", "href") == ""
        async with aiohttp.ClientSession() as http:
            auth = {"Authorization": f"Bearer {TOKEN}", "Accept": "application/json"}
            async with http.get(f"{down.url}/api/jobs", headers=auth) as api:
                assert api.status == 503
                assert (await api.json())["error"] == text


async def test_cancel_while_the_service_is_away_leads_back_to_the_job(
    context: Any, tmp_path: Path
) -> None:
    """Cancel (or Delete job) pressed while the service was away got the 503 page,
    "try again in a moment", whose only link led to the jobs list: the job was a search
    away. It leads back to the job, as the 409 page does."""
    port = free_port()
    svc: ServiceHandle | None = await start_service(
        EmbeddedStore(tmp_path / "away", POLICY), grpc_addr=f"127.0.0.1:{port}"
    )
    running, ended = uid("away"), uid("away-ended")
    try:
        assert svc is not None
        for job_id in (running, ended):
            await new_job(svc.stub, job_pb2.JOB_KIND_GENERIC, job_id)
        await svc.stub.CancelJob(job_service_pb2.CancelJobRequest(id=ended))
        async with running_dashboard(svc.target) as dash:
            page = await login(context, dash.url)
            pages = {"#cancel button": (page, running)}
            pages["#delete button"] = (await context.new_page(), ended)
            for tab, job_id in pages.values():
                await tab.goto(f"{dash.url}/jobs/{job_id}")
                await tab.wait_for_selector("#live:not([data-state=connecting])", timeout=WAIT_MS)
            await svc.close()
            svc = None
            for button, (tab, job_id) in pages.items():
                await confirm(tab, button)
                assert await tab.inner_text("h1") == "Error 503"
                back = tab.get_by_role("link", name="Back to the job", exact=True)
                assert await back.get_attribute("href", timeout=WAIT_MS) == f"/jobs/{job_id}"
    finally:
        if svc is not None:
            await svc.close()


async def test_jobs_page_across_a_service_restart(context: Any, tmp_path: Path) -> None:
    """The service goes away while a jobs page is open: the page says it is reconnecting
    (it said "live" throughout), and once the service is back it shows what changed
    meanwhile (it re-read its rows while the service was still down, got a 503 and kept
    the old ones), in one row per job."""
    data = tmp_path / "restarted"
    policy = POLICY
    port = free_port()
    svc: ServiceHandle | None = await start_service(
        EmbeddedStore(data, policy), grpc_addr=f"127.0.0.1:{port}"
    )
    job_id = uid("svc-restart")
    try:
        assert svc is not None
        await new_job(svc.stub, job_pb2.JOB_KIND_BATCH, job_id)
        await progress(svc.stub, job_id, 10, "before", "before the restart")
        async with running_dashboard(svc.target) as dash:
            page = await login(context, dash.url)
            await page.wait_for_selector("#live[data-state=live]", timeout=WAIT_MS)
            await svc.close()
            svc = None
            await page.wait_for_selector("#live[data-state=reconnecting]", timeout=WAIT_MS)
            svc = await start_service(EmbeddedStore(data, policy), grpc_addr=f"127.0.0.1:{port}")
            # At once, before the dashboard's own stream is back: only a re-read shows it.
            await progress(svc.stub, job_id, 60, "after", "after the restart")
            await page.wait_for_selector("#live[data-state=live]", timeout=WAIT_MS * 3)
            await page.wait_for_function(ROW_IS, arg=[job_id, 60, "RUNNING"], timeout=WAIT_MS)
            assert await page.locator(f'#jobs tr[data-job="{job_id}"]').count() == 1
            # And it is live again: a later change arrives without a reload.
            await progress(svc.stub, job_id, 70, "later", "live again")
            await page.wait_for_function(ROW_IS, arg=[job_id, 70, "RUNNING"], timeout=WAIT_MS)
    finally:
        if svc is not None:
            await svc.close()


async def test_back_after_logging_out_shows_no_jobs(
    dash: DashboardProcess, context: Any, svc: ServiceHandle
) -> None:
    """Log out, press Back: the browser showed the jobs page it had kept (no Cache-Control);
    the pages are no-store now, so Back asks again and gets the login form."""
    job_id = uid("back")
    await new_job(svc.stub, job_pb2.JOB_KIND_GENERIC, job_id)
    page = await login(context, dash.url)
    await page.goto(f"{dash.url}/jobs/{job_id}")
    await page.goto(f"{dash.url}/jobs")
    async with page.expect_navigation():
        await page.click("form.logout button")
    assert page.url.endswith("/login")
    await page.go_back()
    await page.wait_for_selector("input[name=token]", timeout=WAIT_MS)
    assert await page.locator(f'#jobs tr[data-job="{job_id}"]').count() == 0


async def test_logging_out_ends_the_live_updates_of_the_other_tabs(
    dash: DashboardProcess, context: Any, svc: ServiceHandle
) -> None:
    """Log out in one tab: the browser's cookie was gone, but its other tabs' streams,
    opened with it, went on showing every change for the rest of the session (12 hours)
    under "live". They now say the session ended and show nothing more."""
    job_id = uid("logout")
    await new_job(svc.stub, job_pb2.JOB_KIND_GENERIC, job_id, {"test": job_id})
    await progress(svc.stub, job_id, 10, "p", "before logging out")
    page = await login(context, dash.url)
    others = {
        "jobs": f"/jobs?label=test={job_id}",
        "job": f"/jobs/{job_id}",
    }
    tabs = {}
    for name, path in others.items():
        tabs[name] = await context.new_page()
        await tabs[name].goto(dash.url + path)
        await tabs[name].wait_for_selector("#live[data-state=live]", timeout=WAIT_MS)
    async with page.expect_navigation():
        await page.click("form.logout button")
    for tab in tabs.values():
        await tab.wait_for_selector("#live[data-state=logged-out]", timeout=WAIT_MS)
    await progress(svc.stub, job_id, 60, "p", "after logging out")
    await page.wait_for_timeout(1000)  # a negative check: time for a push that must not come
    assert await tabs["jobs"].inner_text(f'#jobs tr[data-job="{job_id}"] .pct') == "10%"
    assert await tabs["job"].inner_text("#job .pct") == "10%"


PERCENTS = """sel => [...document.querySelectorAll(sel)].map(n => n.textContent.trim())"""


async def test_percent_never_rounds_up_to_done(
    dash: DashboardProcess, context: Any, svc: ServiceHandle
) -> None:
    """A running job at 99.96 % read "100%" with a full bar (and 100.0% in its timeline),
    as if it had finished; 2.5 % read "2%" when the page was loaded and "3%" once a live
    update drew it. Shown percents are cut, never rounded up, the same on both paths."""
    stub = svc.stub
    job_id = uid("pct")
    await new_job(stub, job_pb2.JOB_KIND_BATCH, job_id, {"test": job_id})
    await progress(stub, job_id, 99.96, "almost", "not done yet")
    page = await login(context, dash.url)
    await page.goto(f"{dash.url}/jobs?label=test={job_id}")  # on a page of its own
    row = f'#jobs tr[data-job="{job_id}"]'
    await page.wait_for_selector("#live[data-state=live]", timeout=WAIT_MS)
    assert await page.inner_text(f"{row} .pct") == "99%"
    assert await page.eval_on_selector(f"{row} progress", "p => p.value") < 100
    await progress(stub, job_id, 2.5, "again", "from the start")
    await page.wait_for_function(
        "sel => document.querySelector(sel).textContent !== '99%'", arg=f"{row} .pct"
    )
    live = await page.inner_text(f"{row} .pct")
    await page.reload()
    assert live == await page.inner_text(f"{row} .pct") == "2%"
    await progress(stub, job_id, 99.97, "almost", "live")
    await page.wait_for_function(
        "sel => document.querySelector(sel).textContent !== '2%'", arg=f"{row} .pct"
    )
    assert await page.inner_text(f"{row} .pct") == "99%"

    await page.goto(f"{dash.url}/jobs/{job_id}")
    await page.wait_for_selector("#live[data-state=live]", timeout=WAIT_MS)
    assert await page.inner_text("#job .pct") == "99%"
    assert await page.evaluate(PERCENTS, "#timeline .percent") == ["99.9%", "2.5%", "99.9%"]
    await progress(stub, job_id, 99.99, "almost", "live on the job page")
    await page.wait_for_function(
        "() => document.querySelectorAll('#timeline tbody tr').length === 4", timeout=WAIT_MS
    )
    assert await page.evaluate(PERCENTS, "#timeline .percent") == ["99.9%", "2.5%"] + ["99.9%"] * 2
    assert await page.inner_text("#job .pct") == "99%"


async def test_log_level_can_be_chosen_with_the_keyboard(
    dash: DashboardProcess, context: Any, svc: ServiceHandle
) -> None:
    """The level list submitted itself on every change, and an arrow key on a closed list
    is a change: the first ArrowDown reloaded the page (focus back at the top), so WARNING
    could not be reached from the keyboard. Keys now only choose; Show applies."""
    job_id = uid("keys")
    await new_job(svc.stub, job_pb2.JOB_KIND_GENERIC, job_id)
    for level, text in ((log_pb2.LOG_LEVEL_INFO, "info line"), (3, "warning line")):
        await write_log(svc.stub, job_id, level, text)
    page = await login(context, dash.url)
    await page.goto(f"{dash.url}/jobs/{job_id}")
    await page.focus("#level")
    for _ in range(3):  # any -> debug -> info -> warning
        await page.keyboard.press("ArrowDown")
    assert "level=" not in page.url
    assert await page.evaluate("document.activeElement.id") == "level"
    assert await page.input_value("#level") == "WARNING"
    await page.keyboard.press("Tab")
    async with page.expect_navigation():
        await page.keyboard.press("Enter")  # on Show
    assert page.url.endswith("level=WARNING")
    logs = await page.inner_text("#logs tbody")
    assert "warning line" in logs and "info line" not in logs


CONTROLS = {"button", "link", "combobox", "textbox", "progressbar", "searchbox", "status"}


async def unnamed(page: Any) -> list[str]:
    """Controls (and progress bars, the live status) the accessibility tree gives no name."""
    cdp = await page.context.new_cdp_session(page)
    try:
        tree = await cdp.send("Accessibility.getFullAXTree")
    finally:
        await cdp.detach()
    found = []
    for node in tree["nodes"]:
        role = node.get("role", {}).get("value")
        if role in CONTROLS and not node.get("name", {}).get("value", "").strip():
            found.append(role)
    return found


async def test_every_control_has_an_accessible_name(
    dash: DashboardProcess, context: Any, svc: ServiceHandle
) -> None:
    """Every button, link, field and progress bar has a name a screen reader can say
    (the progress bars had none: "progress bar, 40 %" of which job?), also in a row that
    arrived live; the live indicator is a status, so "reconnecting…" is announced."""
    job_id = uid("a11y")
    await new_job(svc.stub, job_pb2.JOB_KIND_GENERIC, job_id)
    await progress(svc.stub, job_id, 40, "half", "named")
    page = await login(context, dash.url)
    await page.wait_for_selector("#live[data-state=live]", timeout=WAIT_MS)
    fresh = uid("a11y-live")
    await new_job(svc.stub, job_pb2.JOB_KIND_GENERIC, fresh)
    await progress(svc.stub, fresh, 5, "new", "arrived live")
    await page.wait_for_selector(f'#jobs tr[data-job="{fresh}"] progress', timeout=WAIT_MS)
    assert await unnamed(page) == []
    assert await page.get_attribute("#live", "role") == "status"
    await page.goto(f"{dash.url}/jobs/{job_id}")
    await page.wait_for_selector("#live[data-state=live]", timeout=WAIT_MS)
    assert await unnamed(page) == []
    assert await page.get_attribute("#live", "role") == "status"


# Times shown without a visible "UTC" near them: in their own ::after, their cell's label
# (phone cards), their column's visible header, or their card's heading.
UNZONED = """() => [...document.querySelectorAll('time')].filter(t => t.offsetParent).filter(t => {
  if (getComputedStyle(t, '::after').content.includes('UTC')) return false;
  const td = t.closest('td');
  if (td) {
    if (getComputedStyle(td, '::before').content.includes('UTC')) return false;
    const th = td.closest('table').tHead?.rows[0]?.cells[td.cellIndex];
    if (th && th.offsetParent && th.textContent.includes('UTC')) return false;
  }
  const heading = t.closest('section')?.querySelector('h2');
  return !(heading && heading.textContent.includes('UTC'));
}).map(t => t.closest('td, dd')?.className || t.parentElement.tagName)"""


async def test_every_time_shown_says_utc(
    dash: DashboardProcess, browser: Any, svc: ServiceHandle
) -> None:
    """Times are UTC: the tables' headers said so, but the job's details, the phone cards
    of the jobs list and the phone timeline showed bare times a reader takes as local."""
    job_id = uid("utc")
    await new_job(svc.stub, job_pb2.JOB_KIND_GENERIC, job_id)
    await progress(svc.stub, job_id, 10, "p", "m")
    await write_log(svc.stub, job_id, log_pb2.LOG_LEVEL_INFO, "a line")
    for viewport in (LAPTOP, PHONE):
        ctx = await browser.new_context(viewport=viewport)
        try:
            page = await login(ctx, dash.url)
            assert await page.evaluate(UNZONED) == [], viewport
            await page.goto(f"{dash.url}/jobs/{job_id}")
            assert await page.evaluate(UNZONED) == [], viewport
        finally:
            await ctx.close()


# Every state the live indicator takes, in order (a reconnect may be too quick to poll).
RECORD_STATES = """() => {
  window.__states = [];
  new MutationObserver(() => window.__states.push(document.querySelector('#live').dataset.state))
    .observe(document.querySelector('#live'), { attributes: true });
}"""


@pytest.mark.parametrize("which", ["jobs", "job"])
async def test_a_stream_gone_silent_is_noticed_and_reopened(
    which: str, browser: Any, svc: ServiceHandle
) -> None:
    """The connection under an open page goes silent (a dead NAT entry, a hung proxy: no
    reset, no close). EventSource waits forever, so the page said "live" while it showed
    nothing more. The streams now send something every heartbeat (stats; a `ping` on a
    job's quiet stream), and a page that hears nothing for three says reconnecting and
    opens a new stream, which shows what happened meanwhile."""
    job_id = uid(f"silent-{which}")
    await new_job(svc.stub, job_pb2.JOB_KIND_GENERIC, job_id, {"test": job_id})
    await progress(svc.stub, job_id, 10, "before", "before the stall")
    async with (
        running_dashboard(svc.target, JOBWIRE_DASHBOARD_HEARTBEAT_SECONDS="1") as dash,
        contextlib.AsyncExitStack() as stack,
    ):
        cutter = await TcpCutter(dash.port).start()
        stack.push_async_callback(cutter.close)
        ctx = await browser.new_context(viewport=LAPTOP)
        stack.push_async_callback(ctx.close)
        base = f"http://127.0.0.1:{cutter.port}"
        page = await login(ctx, base)
        path = f"/jobs?label=test={job_id}" if which == "jobs" else f"/jobs/{job_id}"
        await page.goto(base + path)
        await page.wait_for_selector("#live[data-state=live]", timeout=WAIT_MS)
        await page.evaluate(RECORD_STATES)
        cutter.stall_open()
        await progress(svc.stub, job_id, 60, "after", "after the stall")
        if which == "jobs":
            await page.wait_for_function(ROW_IS, arg=[job_id, 60, "RUNNING"], timeout=WAIT_MS * 3)
        else:
            await page.wait_for_function(
                "() => document.querySelectorAll('#timeline tbody tr').length === 2",
                timeout=WAIT_MS * 3,
            )
            assert await timeline_seqs(page) == [1, 2]
            assert await page.inner_text("#job .pct") == "60%"
        states = await page.evaluate("window.__states")
        assert "reconnecting" in states and states[-1] == "live", states


@pytest.mark.parametrize("which", ["jobs", "job"])
async def test_an_ended_session_says_log_in_again(
    which: str, context: Any, svc: ServiceHandle
) -> None:
    """The session ends under an open page (the token changed and the dashboard restarted;
    or 12 hours passed): its stream's reconnects get 401, and the page said
    "reconnecting…" forever. It now says the session ended, with a link to log in that
    comes back to the same page."""
    job_id = uid(f"session-{which}")
    await new_job(svc.stub, job_pb2.JOB_KIND_GENERIC, job_id)
    async with running_dashboard(svc.target) as dash:
        page = await login(context, dash.url)
        path = "/jobs" if which == "jobs" else f"/jobs/{job_id}"
        await page.goto(dash.url + path)
        await page.wait_for_selector("#live[data-state=live]", timeout=WAIT_MS)
        await dash.stop()
        dash.extra_env["JOBWIRE_DASHBOARD_TOKEN"] = "another-token-0123456789abcdef"
        await dash.start()
        await page.wait_for_selector("#live[data-state=logged-out]", timeout=WAIT_MS * 2)
        link = page.locator("#live a")
        assert "log in" in (await link.inner_text()).lower()
        async with page.expect_navigation():
            await link.click()
        await page.fill("input[name=token]", "another-token-0123456789abcdef")
        async with page.expect_navigation():
            await page.click("button[type=submit]")
        assert page.url == dash.url + path
        await page.wait_for_selector("#live[data-state=live]", timeout=WAIT_MS)


async def test_duration_of_an_unfinished_job_keeps_counting(
    dash: DashboardProcess, context: Any, svc: ServiceHandle
) -> None:
    """A job's duration ran from its creation to its last event, so a job queued for an
    hour read "0.0 s" and a silent running one stood still. An unfinished job's duration
    now counts from its creation, on both pages, while the page is open; a finished
    one's is fixed (creation to end)."""
    stub = svc.stub
    queued, running, done = uid("dur-q"), uid("dur-r"), uid("dur-d")
    for job_id in (queued, running, done):
        await new_job(stub, job_pb2.JOB_KIND_GENERIC, job_id, {"test": queued})
    await progress(stub, running, 5, "p", "m")
    await stub.ReportEvent(
        job_service_pb2.ReportEventRequest(
            job_id=done, idempotency_key="end", completed=job_pb2.Result(output_key="o")
        )
    )
    page = await login(context, dash.url)
    await page.goto(f"{dash.url}/jobs?label=test={queued}")  # on a page of their own
    cell = '#jobs tr[data-job="{}"] .duration'
    grows = "([sel, seconds]) => parseFloat(document.querySelector(sel).textContent) >= seconds"
    for job_id in (queued, running):
        await page.wait_for_function(grows, arg=[cell.format(job_id), 1.5], timeout=WAIT_MS)
    fixed = await page.inner_text(cell.format(done))
    assert fixed.endswith(" s") and float(fixed.split()[0]) < 1.5, fixed
    # A running job's later event and its end keep and then fix the count.
    await progress(stub, running, 50, "p", "m")
    await page.wait_for_function(ROW_IS, arg=[running, 50, "RUNNING"], timeout=WAIT_MS)
    assert float((await page.inner_text(cell.format(running))).split()[0]) >= 1.5
    await stub.ReportEvent(
        job_service_pb2.ReportEventRequest(
            job_id=running, idempotency_key="end", completed=job_pb2.Result(output_key="o")
        )
    )
    await page.wait_for_function(ROW_IS, arg=[running, 100, "SUCCEEDED"], timeout=WAIT_MS)
    ended = await page.inner_text(cell.format(running))
    await page.wait_for_timeout(1500)
    assert await page.inner_text(cell.format(running)) == ended
    await page.goto(f"{dash.url}/jobs/{queued}")
    await page.wait_for_function(grows, arg=["#duration", 1.5], timeout=WAIT_MS)


async def test_durations_count_by_the_dashboards_clock_not_the_browsers(
    dash: DashboardProcess, context: Any, svc: ServiceHandle
) -> None:
    """An unfinished job's duration counted from its creation (the service's clock) to
    the browser's clock: a laptop 10 minutes fast read "10m 04s" for a job begun
    seconds ago (one slow, "0.0 s" for minutes). It counts by the dashboard's clock,
    which the page carries."""
    job_id = uid("skew")
    await new_job(svc.stub, job_pb2.JOB_KIND_GENERIC, job_id, {"test": job_id})
    await progress(svc.stub, job_id, 5, "p", "m")
    page = await login(context, dash.url)
    for skew in (timedelta(minutes=10), timedelta(minutes=-10)):
        await page.clock.install(time=datetime.now(UTC) + skew)
        for url, cell in (
            (f"/jobs?label=test={job_id}", f'#jobs tr[data-job="{job_id}"] .duration'),
            (f"/jobs/{job_id}", "#duration"),
        ):
            await page.goto(dash.url + url)
            await page.clock.run_for(1500)
            shown = await page.inner_text(cell)
            assert shown.endswith(" s") and 0.5 < float(shown.split()[0]) < 30, (skew, shown)


async def test_jobs_page_fits_tablet_widths(
    dash: DashboardProcess, context: Any, svc: ServiceHandle
) -> None:
    """Between the phone layout (up to 760 px) and a laptop the jobs table did not fit:
    from 761 to 1000 px (a tablet upright, half a laptop screen) the page scrolled
    sideways and Updated and Duration were cut at the edge. Rows are cards up to the
    width where the table fits."""
    job_id = uid("tablet")
    await new_job(svc.stub, job_pb2.JOB_KIND_TRANSCODE, job_id, {"test": job_id})
    await progress(svc.stub, job_id, 42, "encoding", "a message of ordinary length")
    page = await login(context, dash.url)  # the first page, and the job's own
    for url in (f"{dash.url}/jobs", f"{dash.url}/jobs?label=test={job_id}"):
        await page.goto(url)
        await fits_tablet_widths(page, job_id)
    assert await page.locator(f'#jobs tr[data-job="{job_id}"]').count() == 1


async def fits_tablet_widths(page: Any, job_id: str) -> None:
    for width in (768, 820, 900, 1000, 1040, 1100, 1280):
        await page.set_viewport_size({"width": width, "height": 900})
        sideways = await page.evaluate(
            "() => document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        assert sideways <= 0, (width, sideways)
        duration = page.locator(f'#jobs tr[data-job="{job_id}"] td.duration')
        if await duration.count():
            box = await duration.bounding_box()
            assert box is not None and box["x"] + box["width"] <= width, (width, box)


async def test_a_new_job_appears_even_when_its_first_events_coalesce(
    context: Any, svc: ServiceHandle
) -> None:
    """A job appears on the jobs page with its first event. Changes to one job coalesce
    into the latest within a push interval, so when its second event came within the
    same interval (a worker that claims and reports at once, any busy minute) the tab got
    only sequence 2, took it for a job it does not show, and the job never appeared."""
    async with running_dashboard(svc.target, JOBWIRE_DASHBOARD_PUSH_MS="1000") as dash:
        page = await login(context, dash.url)
        await page.wait_for_selector("#live[data-state=live]", timeout=WAIT_MS)
        # One push now: the next changes wait (and coalesce) for up to a second.
        first = uid("opener")
        await new_job(svc.stub, job_pb2.JOB_KIND_GENERIC, first)
        await progress(svc.stub, first, 1, "p", "opens the push interval")
        await page.wait_for_selector(f'#jobs tr[data-job="{first}"]', timeout=WAIT_MS)
        job_id = uid("quick")
        await new_job(svc.stub, job_pb2.JOB_KIND_GENERIC, job_id)
        await progress(svc.stub, job_id, 10, "p", "first")
        await progress(svc.stub, job_id, 20, "p", "second, within the same interval")
        await page.wait_for_function(ROW_IS, arg=[job_id, 20, "RUNNING"], timeout=WAIT_MS)
        assert await page.locator(f'#jobs tr[data-job="{job_id}"]').count() == 1
        await assert_created_shown(page, svc.stub, first)
        await assert_created_shown(page, svc.stub, job_id)  # its first event was coalesced


async def test_what_changes_while_the_page_opens_its_stream_is_shown(
    context: Any, svc: ServiceHandle
) -> None:
    """The page reads its rows, then opens its stream: a new job's first event and a
    shown job's progress that land in between are on the page once the stream opens.
    The stream is held open-pending by the browser's router; the dashboard is fresh,
    so no tab had started its stream from the service (it was started only by the
    first stream, and these changes were lost)."""
    shown = uid("shown")
    await new_job(svc.stub, job_pb2.JOB_KIND_GENERIC, shown)
    await progress(svc.stub, shown, 10, "p", "before the page")
    streams = re.compile(r"/events/jobs\?")
    async with (
        held_requests(context, streams) as (held, release),
        running_dashboard(svc.target) as dash,
    ):
        page = await login(context, dash.url)
        await page.wait_for_selector(f'#jobs tr[data-job="{shown}"]', timeout=WAIT_MS)
        await asyncio.wait_for(held.wait(), WAIT_MS / 1000)  # its stream, held
        appeared = uid("appeared")
        await new_job(svc.stub, job_pb2.JOB_KIND_GENERIC, appeared)
        await progress(svc.stub, appeared, 5, "p", "while the stream opens")
        await progress(svc.stub, shown, 60, "p", "while the stream opens")
        release.set()
        await page.wait_for_function(ROW_IS, arg=[appeared, 5, "RUNNING"], timeout=WAIT_MS)
        await page.wait_for_function(ROW_IS, arg=[shown, 60, "RUNNING"], timeout=WAIT_MS)
        assert await page.locator(f'#jobs tr[data-job="{appeared}"]').count() == 1
        await assert_created_shown(page, svc.stub, appeared)  # replayed from the journal


async def test_a_job_that_begins_goes_where_a_reload_puts_it(
    dash: DashboardProcess, context: Any, svc: ServiceHandle
) -> None:
    """Newest first, a job whose first event comes while the page is open goes where its
    create time puts it: a job created before the page's last row stays on its later
    page, and of two jobs that begin in the other order the newer is on top. Both used
    to go on top (a reload then moved them, or took them off the page)."""
    rows_js = "rs => rs.map(r => r.dataset.job)"
    old = uid("old")
    await new_job(svc.stub, job_pb2.JOB_KIND_GENERIC, old)
    shown = [uid("shown-b"), uid("shown-a")]
    for job_id in reversed(shown):
        await new_job(svc.stub, job_pb2.JOB_KIND_GENERIC, job_id)
    page = await login(context, dash.url)
    await page.goto(f"{dash.url}/jobs?kind=GENERIC&page_size=2")
    await page.wait_for_selector("#live[data-state=live]", timeout=WAIT_MS)
    assert await page.eval_on_selector_all("#jobs tbody tr", rows_js) == shown
    assert await page.locator("#next-page").count() == 1
    earlier, later = uid("earlier"), uid("later")
    await new_job(svc.stub, job_pb2.JOB_KIND_GENERIC, earlier)
    await new_job(svc.stub, job_pb2.JOB_KIND_GENERIC, later)
    await progress(svc.stub, later, 1, "p", "begins first")
    await page.wait_for_function(ROW_IS, arg=[later, 1, "RUNNING"], timeout=WAIT_MS)
    await progress(svc.stub, earlier, 2, "p", "begins second")
    await page.wait_for_function(ROW_IS, arg=[earlier, 2, "RUNNING"], timeout=WAIT_MS)
    await progress(svc.stub, old, 3, "p", "begins, a page further on")
    witness = uid("witness")  # pushed after the old job's change (commit order)
    await new_job(svc.stub, job_pb2.JOB_KIND_GENERIC, witness)
    await progress(svc.stub, witness, 4, "p", "begins last")
    await page.wait_for_function(ROW_IS, arg=[witness, 4, "RUNNING"], timeout=WAIT_MS)
    live = await page.eval_on_selector_all("#jobs tbody tr", rows_js)
    assert live == [witness, later, earlier, *shown]
    await page.goto(f"{dash.url}/jobs?kind=GENERIC&page_size=5")
    assert await page.eval_on_selector_all("#jobs tbody tr", rows_js) == live


async def test_an_oldest_first_last_page_leaves_out_a_job_of_an_earlier_page(
    dash: DashboardProcess, context: Any, svc: ServiceHandle
) -> None:
    """Oldest first, the last page took every job that began, even one older than its
    first row (a reload then took it off): it now goes where its create time puts it."""
    rows_js = "rs => rs.map(r => r.dataset.job)"
    earlier, last = uid("t-earlier"), uid("t-last")
    for job_id in (earlier, last):
        await new_job(svc.stub, job_pb2.JOB_KIND_TRANSCODE, job_id)
    token, token_of_last = "", ""
    while True:
        reply = await svc.stub.ListJobs(
            job_service_pb2.ListJobsRequest(
                kind=job_pb2.JOB_KIND_TRANSCODE, page_size=1, page_token=token
            )
        )
        if not reply.next_page_token:
            break
        token_of_last = token = reply.next_page_token
    page = await login(context, dash.url)
    await page.goto(
        f"{dash.url}/jobs?kind=TRANSCODE&order=oldest&page_size=1&page_token={token_of_last}"
    )
    await page.wait_for_selector("#live[data-state=live]", timeout=WAIT_MS)
    assert await page.eval_on_selector_all("#jobs tbody tr", rows_js) == [last]
    await progress(svc.stub, earlier, 1, "p", "begins, a page further back")
    newer = uid("t-newer")  # its first event is pushed after the earlier job's
    await new_job(svc.stub, job_pb2.JOB_KIND_TRANSCODE, newer)
    await progress(svc.stub, newer, 2, "p", "begins")
    await page.wait_for_function(ROW_IS, arg=[newer, 2, "RUNNING"], timeout=WAIT_MS)
    assert await page.eval_on_selector_all("#jobs tbody tr", rows_js) == [last, newer]


async def test_a_state_filtered_page_drops_a_row_that_leaves_its_state(
    dash: DashboardProcess, context: Any, svc: ServiceHandle
) -> None:
    """A row that no longer matched the page's state filter stayed (a FAILED badge under
    "running") until a reload; it now leaves, as a reload would drop it."""
    job_id = uid("leaves")
    await new_job(svc.stub, job_pb2.JOB_KIND_GENERIC, job_id)
    await progress(svc.stub, job_id, 10, "p", "running")
    page = await login(context, dash.url)
    await page.goto(f"{dash.url}/jobs?state=RUNNING")
    await page.wait_for_selector(f'#jobs tr[data-job="{job_id}"]', timeout=WAIT_MS)
    await page.wait_for_selector("#live[data-state=live]", timeout=WAIT_MS)
    await fail(svc.stub, job_id)
    await page.wait_for_selector(
        f'#jobs tr[data-job="{job_id}"]', state="detached", timeout=WAIT_MS
    )


async def test_a_page_whose_last_row_leaves_says_no_jobs_match(
    dash: DashboardProcess, context: Any, svc: ServiceHandle
) -> None:
    """The last row leaving a state-filtered page live left an empty frame (a header row
    at laptop width, a bare line on a phone) where a reload says "No jobs match."."""
    job_id = uid("last")
    label = f"qa={job_id}"
    await new_job(svc.stub, job_pb2.JOB_KIND_GENERIC, job_id, {"qa": job_id})
    await progress(svc.stub, job_id, 10, "p", "running")
    page = await login(context, dash.url)
    await page.goto(f"{dash.url}/jobs?state=RUNNING&label={label}")
    await page.wait_for_selector(f'#jobs tr[data-job="{job_id}"]', timeout=WAIT_MS)
    await page.wait_for_selector("#live[data-state=live]", timeout=WAIT_MS)
    assert not await page.is_visible("#empty")
    await fail(svc.stub, job_id)
    await page.wait_for_selector(
        f'#jobs tr[data-job="{job_id}"]', state="detached", timeout=WAIT_MS
    )
    await page.wait_for_selector("#empty", state="visible", timeout=WAIT_MS)
    assert await page.inner_text("#empty") == "No jobs match."
    await page.reload()
    assert await page.inner_text("#empty") == "No jobs match."


async def test_a_page_that_leaves_out_new_jobs_says_so(
    dash: DashboardProcess, context: Any, svc: ServiceHandle
) -> None:
    """A page adds at most 50 jobs live; the 51st dropped the first one added without a
    word, a hole between the rows added and those read (and paging goes on after the
    last row read, so nothing led to the job). It now says some are left out."""
    page = await login(context, dash.url)
    await page.goto(f"{dash.url}/jobs?kind=GENERIC")
    await page.wait_for_selector("#live[data-state=live]", timeout=WAIT_MS)
    assert not await page.is_visible("#live-cut")
    run = uid("burst")
    ids = [f"{run}-{n:02d}" for n in range(51)]
    for job_id in ids:
        await new_job(svc.stub, job_pb2.JOB_KIND_GENERIC, job_id)
        await progress(svc.stub, job_id, 1, "p", "begins")
    await page.wait_for_selector(f'#jobs tr[data-job="{ids[-1]}"]', timeout=WAIT_MS)
    assert await page.query_selector(f'#jobs tr[data-job="{ids[0]}"]') is None
    assert await page.is_visible("#live-cut")
    assert "left out" in await page.inner_text("#live-cut")


async def test_a_row_that_finishes_keeps_its_phase_and_message(
    dash: DashboardProcess, context: Any, svc: ServiceHandle
) -> None:
    """A completion without a message blanked the row's phase and message live, while a
    reload showed the last ones: the live row now shows what a reload does."""
    job_id = uid("finishes")
    await new_job(svc.stub, job_pb2.JOB_KIND_GENERIC, job_id)
    await progress(svc.stub, job_id, 90, "extract_text", "almost")
    page = await login(context, dash.url)
    await page.wait_for_selector(f'#jobs tr[data-job="{job_id}"]', timeout=WAIT_MS)
    await page.wait_for_selector("#live[data-state=live]", timeout=WAIT_MS)
    await svc.stub.ReportEvent(
        job_service_pb2.ReportEventRequest(
            job_id=job_id, idempotency_key=uuid.uuid4().hex, completed=job_pb2.Result()
        )
    )
    await page.wait_for_function(ROW_IS, arg=[job_id, 100, "SUCCEEDED"], timeout=WAIT_MS)
    row = page.locator(f'#jobs tr[data-job="{job_id}"]')
    live = (await row.locator(".phase").inner_text(), await row.locator(".message").inner_text())
    assert live == ("extract_text", "almost")
    await page.reload()
    row = page.locator(f'#jobs tr[data-job="{job_id}"]')
    shown = (await row.locator(".phase").inner_text(), await row.locator(".message").inner_text())
    assert shown == live


async def test_an_oldest_first_page_adds_a_new_job_after_its_last_row(
    dash: DashboardProcess, context: Any, svc: ServiceHandle
) -> None:
    """Oldest first, a new job belongs after the last row of the last page: it is
    appended there, and a page with more pages after it does not show it."""
    for _ in range(2):
        await new_job(svc.stub, job_pb2.JOB_KIND_GENERIC, uid("before"))
    # The token of the last page (the dashboard passes page tokens through).
    token, last = "", ""
    while True:
        reply = await svc.stub.ListJobs(
            job_service_pb2.ListJobsRequest(page_size=200, page_token=token)
        )
        if not reply.next_page_token:
            break
        last = token = reply.next_page_token
    page = await login(context, dash.url)
    last_page = await context.new_page()
    await last_page.goto(f"{dash.url}/jobs?order=oldest&page_size=200&page_token={last}")
    await page.goto(f"{dash.url}/jobs?order=oldest&page_size=1")
    for tab in (page, last_page):
        await tab.wait_for_selector("#live[data-state=live]", timeout=WAIT_MS)
    assert await page.locator("#next-page").count() == 1
    assert await last_page.locator("#next-page").count() == 0
    job_id = uid("appended")
    await new_job(svc.stub, job_pb2.JOB_KIND_GENERIC, job_id)
    await progress(svc.stub, job_id, 3, "p", "first")
    await last_page.wait_for_function(ROW_IS, arg=[job_id, 3, "RUNNING"], timeout=WAIT_MS)
    rows = await last_page.eval_on_selector_all(
        "#jobs tbody tr", "rs => rs.map(r => r.dataset.job)"
    )
    assert rows[-1] == job_id and rows.count(job_id) == 1
    # The first page's own stream leaves it out: it asks without new jobs (new=0).
    await progress(svc.stub, job_id, 4, "p", "second")
    await last_page.wait_for_function(ROW_IS, arg=[job_id, 4, "RUNNING"], timeout=WAIT_MS)
    assert await page.locator(f'#jobs tr[data-job="{job_id}"]').count() == 0
    await last_page.close()


async def test_a_long_open_timeline_says_where_it_starts(
    dash: DashboardProcess, context: Any, svc: ServiceHandle
) -> None:
    """A job page left open keeps its newest 2,000 events; the older rows went without a
    word, and the notice loaded with the page still named its first sequence then. The
    notice now names the first sequence shown."""
    stub = svc.stub
    job_id = uid("long")
    await new_job(stub, job_pb2.JOB_KIND_GENERIC, job_id)
    await progress(stub, job_id, 0, "p", "first")
    page = await login(context, dash.url)
    await page.goto(f"{dash.url}/jobs/{job_id}")
    await page.wait_for_selector("#live[data-state=live]", timeout=WAIT_MS)
    # In steps the page keeps up with, so that no events are coalesced into one row.
    for start in range(0, 2100, 150):
        reports = [
            job_service_pb2.ReportEventRequest(
                job_id=job_id,
                idempotency_key=f"k{start + i}",
                progress=job_pb2.Progress(percent=(start + i) / 30, phase="p", message="m"),
            )
            for i in range(150)
        ]
        await stub.BatchReportEvents(job_service_pb2.BatchReportEventsRequest(requests=reports))
        await page.wait_for_function(
            "n => Number(document.querySelector('#job').dataset.seq) === n",
            arg=2 + start + 149,
            timeout=WAIT_MS,
        )
    last = 1 + 2100
    seqs = await timeline_seqs(page)
    assert len(seqs) == 2000 and seqs[-1] == last
    assert await page.is_visible("#gap-notice")
    assert await page.inner_text("#gap-oldest") == str(seqs[0])


async def test_a_job_that_enters_a_pages_state_filter_appears_on_it(
    dash: DashboardProcess, context: Any, svc: ServiceHandle
) -> None:
    """A FAILED page said "live" but never showed a job that failed after it opened
    (only its first event, or a reload, brought a job onto a page). Now the tab re-reads
    its rows when a job enters one of its states, and the job shows where a reload puts
    it. A job that enters another state does not."""
    run = uid("enter")
    label = f"qa={run}"
    old, new, other = f"{run}-old", f"{run}-new", f"{run}-other"
    for job_id in (old, new, other):
        await new_job(svc.stub, job_pb2.JOB_KIND_GENERIC, job_id, {"qa": run})
        await progress(svc.stub, job_id, 10, "p", "running")
    await fail(svc.stub, old)
    page = await login(context, dash.url)
    await page.goto(f"{dash.url}/jobs?state=FAILED&label={label}")
    await page.wait_for_selector(f'#jobs tr[data-job="{old}"]', timeout=WAIT_MS)
    await page.wait_for_selector("#live[data-state=live]", timeout=WAIT_MS)
    await svc.stub.CancelJob(job_service_pb2.CancelJobRequest(id=other, reason="not this one"))
    await fail(svc.stub, new)
    await page.wait_for_selector(f'#jobs tr[data-job="{new}"]', timeout=WAIT_MS)
    shown = await page.eval_on_selector_all(
        "#jobs tbody tr", "rows => rows.map(r => r.dataset.job)"
    )
    assert shown == [new, old]  # newest first, by create time, as a reload shows them
    assert await page.inner_text(f'#jobs tr[data-job="{new}"] .state') == "FAILED"
    await page.reload()
    again = await page.eval_on_selector_all(
        "#jobs tbody tr", "rows => rows.map(r => r.dataset.job)"
    )
    assert again == shown


# Records the ids each `jobs` push of the page's streams carries (window.__pushed).
RECORD_PUSHES = """() => {
  window.__pushed = [];
  const Original = window.EventSource;
  window.EventSource = function (url, init) {
    const source = new Original(url, init);
    const ids = (m) => JSON.parse(m.data).map((c) => c.id);
    source.addEventListener("jobs", (m) => window.__pushed.push(...ids(m)));
    return source;
  };
  window.EventSource.prototype = Original.prototype;
  Object.assign(window.EventSource, { CONNECTING: 0, OPEN: 1, CLOSED: 2 });
}"""


async def test_a_job_seen_begin_outside_a_pages_state_filter_appears_when_it_enters_it(
    browser: Any, dash: DashboardProcess, svc: ServiceHandle
) -> None:
    """A CANCELLED page followed every job whose first event it was pushed, also one it
    did not show (RUNNING: not its state), so that job's cancellation came as a change
    of a followed row, which the page had not, and it never appeared, nor did a job
    made again under the id of a row deleted from it: a reload showed both. A job the
    page does not show is not followed: its entering the page's state re-reads the rows."""
    ctx = await browser.new_context(viewport=LAPTOP)
    try:
        await ctx.add_init_script(script=f"({RECORD_PUSHES})()")
        page = await login(ctx, dash.url)
        pushed = "id => window.__pushed.includes(id)"
        # A job made again under a shown row's deleted id.
        again = uid("again-filtered")
        await new_job(svc.stub, job_pb2.JOB_KIND_GENERIC, again)
        await svc.stub.CancelJob(job_service_pb2.CancelJobRequest(id=again, reason="first"))
        await page.goto(f"{dash.url}/jobs?state=CANCELLED")
        await page.wait_for_selector("#live[data-state=live]", timeout=WAIT_MS)
        await page.wait_for_selector(f'#jobs tr[data-job="{again}"]', timeout=WAIT_MS)
        await svc.stub.DeleteJob(job_service_pb2.DeleteJobRequest(id=again))
        await page.wait_for_selector(
            f'#jobs tr[data-job="{again}"]', state="detached", timeout=WAIT_MS
        )
        fresh = uid("fresh-filtered")
        for job_id in (fresh, again):
            await new_job(svc.stub, job_pb2.JOB_KIND_GENERIC, job_id)
            await progress(svc.stub, job_id, 10, "p", "running")
        # A job cancelled after theirs began: once the page has it, the page has had
        # (before, in commit order) whatever it was to hear of them while RUNNING.
        marker = uid("marker")
        await new_job(svc.stub, job_pb2.JOB_KIND_GENERIC, marker)
        await svc.stub.CancelJob(job_service_pb2.CancelJobRequest(id=marker))
        await page.wait_for_function(pushed, arg=marker, timeout=WAIT_MS)
        for job_id in (fresh, again):
            assert await page.locator(f'#jobs tr[data-job="{job_id}"]').count() == 0
        for job_id in (fresh, again):
            await svc.stub.CancelJob(job_service_pb2.CancelJobRequest(id=job_id, reason="now"))
        for job_id in (fresh, again):
            await page.wait_for_selector(f'#jobs tr[data-job="{job_id}"]', timeout=WAIT_MS)
            assert await page.inner_text(f'#jobs tr[data-job="{job_id}"] .state') == "CANCELLED"
        shown = "rs => rs.map(r => r.dataset.job)"
        rows = await page.eval_on_selector_all("#jobs tbody tr", shown)
        await page.reload()
        # The rows a reload shows.
        assert sorted(await page.eval_on_selector_all("#jobs tbody tr", shown)) == sorted(rows)
    finally:
        await ctx.close()


async def test_a_job_whose_first_event_enters_a_pages_state_filter_shows_when_it_was_created(
    context: Any, dash: DashboardProcess, svc: ServiceHandle
) -> None:
    """A queued job cancelled on a CANCELLED page (or claimed on a RUNNING page): its
    first event is the one entering the page's state, and its row came without the
    job's create time: Created "—", no Duration, and the rows added after it were put
    above it, newer or not, until a reload. It comes as a new job, with its create time."""
    page = await login(context, dash.url)
    await page.goto(f"{dash.url}/jobs?state=CANCELLED&kind=GENERIC")
    await page.wait_for_selector("#live[data-state=live]", timeout=WAIT_MS)
    job_id = uid("cancelled-queued")
    created = await new_job(svc.stub, job_pb2.JOB_KIND_GENERIC, job_id)
    await svc.stub.CancelJob(job_service_pb2.CancelJobRequest(id=job_id, reason="not needed"))
    row = f'#jobs tr[data-job="{job_id}"]'
    await page.wait_for_selector(row, timeout=WAIT_MS)
    assert await page.get_attribute(row, "data-created") == iso(created.job.create_time)
    cells = f"{row} .created, {row} .duration"
    live = await page.eval_on_selector_all(cells, "cs => cs.map(c => c.textContent)")
    assert "—" not in live[0] and live[1].endswith(" s"), live
    await page.reload()
    assert await page.eval_on_selector_all(cells, "cs => cs.map(c => c.textContent)") == live


async def test_a_job_deleted_while_the_dashboard_restarts_leaves_the_jobs_page(
    context: Any, dash: DashboardProcess, svc: ServiceHandle
) -> None:
    """A job deleted while the dashboard restarted: the jobs page's stream, back, has
    it re-read its rows (the new process's stream cannot replay the deletion), but the
    re-read only updated and added rows: the deleted job's stayed, its link answering
    404, until a reload. A row the re-read does not list where it would be goes."""
    run = uuid.uuid4().hex[:6]
    gone, kept = f"restart-del-{run}-gone", f"restart-del-{run}-kept"
    for job_id in (gone, kept):
        await new_job(svc.stub, job_pb2.JOB_KIND_GENERIC, job_id, {"run": run})
        await svc.stub.CancelJob(job_service_pb2.CancelJobRequest(id=job_id))
    page = await login(context, dash.url)
    await page.goto(f"{dash.url}/jobs?label=run%3D{run}")
    await page.wait_for_selector("#live[data-state=live]", timeout=WAIT_MS)
    await dash.stop()
    await page.wait_for_selector("#live[data-state=reconnecting]", timeout=WAIT_MS)
    await svc.stub.DeleteJob(job_service_pb2.DeleteJobRequest(id=gone))
    await dash.start()
    await page.wait_for_selector(f'#jobs tr[data-job="{gone}"]', state="detached", timeout=WAIT_MS)
    shown = "rs => rs.map(r => r.dataset.job)"
    assert await page.eval_on_selector_all("#jobs tbody tr", shown) == [kept]
    assert await page.inner_text("#live") == "live"


async def test_a_queued_job_a_reread_adds_shows_its_state(
    context: Any, dash: DashboardProcess, svc: ServiceHandle
) -> None:
    """A job created while the dashboard restarted, still queued (no event yet), comes
    onto the open jobs page with its re-read; its row showed no state, no Updated and
    no Duration (the re-read skipped a row at the sequence it was added with, 0) until
    a reload. It shows what a reload shows."""
    run = uuid.uuid4().hex[:6]
    queued = f"reread-queued-{run}"
    page = await login(context, dash.url)
    await page.goto(f"{dash.url}/jobs?kind=GENERIC")
    await page.wait_for_selector("#live[data-state=live]", timeout=WAIT_MS)
    await dash.stop()
    await page.wait_for_selector("#live[data-state=reconnecting]", timeout=WAIT_MS)
    await new_job(svc.stub, job_pb2.JOB_KIND_GENERIC, queued)
    await dash.start()
    row = f'#jobs tr[data-job="{queued}"]'
    await page.wait_for_selector(row, timeout=WAIT_MS)
    cells = f"{row} .state, {row} .updated"
    live = await page.eval_on_selector_all(cells, "cs => cs.map(c => c.textContent.trim())")
    assert live[0] == "QUEUED" and live[1], live
    await page.reload()
    assert await page.eval_on_selector_all(cells, "cs => cs.map(c => c.textContent.trim())") == live
