"""The dashboard's accessibility in chromium: axe-core (pinned by tests/a11y/package-lock.json,
installed by scripts/install-axe.sh) run on the real pages for WCAG 2.1 A and AA, at
laptop and phone widths, plus what axe cannot see: the keyboard."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from jobwire.v1 import job_pb2, job_service_pb2, log_pb2
from service.domain.records import Policy
from service.store.embedded import EmbeddedStore
from tests.conftest import ServiceHandle, start_service
from tests.dashboard_harness import (
    LAPTOP,
    PHONE,
    ROOT,
    DashboardProcess,
    chromium,
    login,
    running_dashboard,
)
from tests.helpers import tool_missing, until

WAIT_MS = 10_000
WCAG = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa"]
# What fails the test. Moderate and minor findings are printed (pytest -s) but pass.
FAILING = {"serious", "critical"}
# Rules turned off on purpose, each with why: none (every WCAG 2.1 A/AA rule runs).
DISABLED: dict[str, str] = {}
AXE = ROOT / "tests" / "a11y" / "node_modules" / "axe-core" / "axe.min.js"


@pytest.fixture(scope="module")
def axe_source() -> str:
    """axe-core's script, installed by npm as tests/a11y/package-lock.json pins it."""
    subprocess.run(["bash", str(ROOT / "scripts" / "install-axe.sh")], check=True, timeout=300)
    if not AXE.is_file():
        tool_missing("axe-core is not installed (scripts/install-axe.sh installs it with npm)")
    return AXE.read_text()


async def axe(page: Any, source: str) -> list[dict[str, Any]]:
    """axe's WCAG 2.1 A/AA violations on the page as it is now. Evaluated through the
    DevTools protocol, so the page's CSP (no inline script) stays as it is."""
    if not await page.evaluate("() => typeof window.axe === 'object'"):
        await page.evaluate(source)
    rules = {rule: {"enabled": False} for rule in DISABLED}
    found: list[dict[str, Any]] = await page.evaluate(
        """async ([tags, rules]) => {
          const r = await axe.run(document, {runOnly: {type: 'tag', values: tags}, rules});
          return r.violations.map(v => ({
            id: v.id, impact: v.impact, help: v.help,
            nodes: v.nodes.map(n => ({target: n.target.join(' '), summary: n.failureSummary})),
          }));
        }""",
        [WCAG, rules],
    )
    return found


def report(where: str, violations: list[dict[str, Any]]) -> list[str]:
    """Prints every finding; returns the ones that fail the test, one line each."""
    failing = []
    for v in violations:
        for node in v["nodes"]:
            line = f"{where}: {v['impact']} {v['id']} ({v['help']}) at {node['target']}"
            print(line, "\n   ", (node["summary"] or "").replace("\n", "\n    "))
            if v["impact"] in FAILING:
                failing.append(line)
    return failing


# -- the pages, with something of everything on them -----------------------------------


POLICY = Policy(retention=64, lease_ns=60 * 10**9, max_attempts=3)


@dataclass
class Jobs:
    """The job pages checked: one running, one ended with everything, one failed."""

    running: str = ""
    ended: str = ""
    failed: str = ""


async def make_jobs(stub: Any) -> Jobs:
    run = uuid.uuid4().hex[:6]
    jobs = Jobs()

    async def create(kind: Any, job_id: str, video: str = "", **labels: str) -> str:
        job = job_pb2.Job(kind=kind)
        job.labels.update(labels)
        if video:
            job.video.CopyFrom(job_pb2.Video(url=video, title="Keynote 2026"))
        await stub.CreateJob(job_service_pb2.CreateJobRequest(job=job, job_id=job_id))
        return job_id

    async def report_event(job_id: str, **what: Any) -> None:
        request = job_service_pb2.ReportEventRequest(
            job_id=job_id, idempotency_key=uuid.uuid4().hex, **what
        )
        await stub.ReportEvent(request)

    async def log(job_id: str, level: Any, message: str) -> None:
        entry = log_pb2.LogEntry(job_id=job_id, level=level, message=message)
        await stub.WriteLog(job_service_pb2.WriteLogRequest(entry=entry))

    # Stalled: no progress within its deadline, the service's sweep flags it (about 1 s).
    stall = job_pb2.Job(kind=job_pb2.JOB_KIND_GENERIC)
    stall.progress_deadline.FromMilliseconds(300)
    stalled = f"stalled-{run}"
    await stub.CreateJob(job_service_pb2.CreateJobRequest(job=stall, job_id=stalled))
    await report_event(stalled, progress=job_pb2.Progress(percent=30, phase="work"))

    await create(job_pb2.JOB_KIND_EXTRACTION, f"queued-{run}", team="finance")
    cancelled = await create(job_pb2.JOB_KIND_GENERIC, f"cancelled-{run}")
    await stub.CancelJob(job_service_pb2.CancelJobRequest(id=cancelled, reason="superseded"))

    jobs.failed = await create(job_pb2.JOB_KIND_TRANSCODE, f"failed-{run}")
    await report_event(jobs.failed, progress=job_pb2.Progress(percent=12, phase="probe"))
    await log(jobs.failed, log_pb2.LOG_LEVEL_WARNING, "no audio stream")
    # An ERROR line fails a running job (WriteLog), as a worker's failure would.
    await log(jobs.failed, log_pb2.LOG_LEVEL_ERROR, "1003: invalid input file")

    jobs.ended = await create(job_pb2.JOB_KIND_EXTRACTION, f"contract-{run}", team="legal")
    for i, (phase, pct, msg) in enumerate(
        [("download", 5, "PDF loaded"), ("ocr", 40, "page 11/28"), ("images", 90, "12 images")]
    ):
        await report_event(
            jobs.ended, progress=job_pb2.Progress(percent=pct, phase=phase, message=msg)
        )
        level = [log_pb2.LOG_LEVEL_INFO, log_pb2.LOG_LEVEL_DEBUG][i % 2]
        await log(jobs.ended, level, f"{phase}: {msg}")
    await log(jobs.ended, log_pb2.LOG_LEVEL_WARNING, "OCR confidence 0.71 on page 9")
    await stub.UploadArtifact(
        iter(
            [
                job_service_pb2.UploadArtifactRequest(
                    header=job_service_pb2.ArtifactHeader(job_id=jobs.ended, name="text.md")
                ),
                job_service_pb2.UploadArtifactRequest(data=b"# Contract\n"),
            ]
        )
    )
    await report_event(jobs.ended, completed=job_pb2.Result(output_key="out/contract.md"))

    jobs.running = await create(
        job_pb2.JOB_KIND_VIDEO, f"video-{run}", "https://media.example/k.mp4", playlist="keynotes"
    )
    await report_event(
        jobs.running, progress=job_pb2.Progress(percent=45, phase="download", message="01:30")
    )
    await log(jobs.running, log_pb2.LOG_LEVEL_INFO, "downloading")

    for _ in range(100):  # polling: the stall sweep runs about once a second, unannounced
        if (await stub.GetJob(job_service_pb2.GetJobRequest(id=stalled))).stalled:
            break
        await asyncio.sleep(0.05)
    return jobs


@pytest.fixture(scope="module")
async def stack(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[tuple[ServiceHandle, DashboardProcess, Jobs]]:
    data = tmp_path_factory.mktemp("a11y")
    handle = await start_service(EmbeddedStore(data, POLICY), lease_sweep_seconds=0.05)
    try:
        jobs = await make_jobs(handle.stub)
        async with running_dashboard(handle.target) as dash:
            yield handle, dash, jobs
    finally:
        await handle.close()


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Any]:
    async with chromium() as b:
        yield b


@pytest.fixture
async def context(browser: Any) -> AsyncIterator[Any]:
    ctx = await browser.new_context(viewport=LAPTOP)
    yield ctx
    await ctx.close()


# -- axe ---------------------------------------------------------------------------------


async def test_no_serious_axe_violation_on_any_page(
    stack: tuple[ServiceHandle, DashboardProcess, Jobs], context: Any, axe_source: str
) -> None:
    """Login (and its error), the jobs list (every state, a stalled job, filters with
    several states, both paging links), a running job, an ended one with its outcome,
    artifacts, timeline and logs, a failed one, and an error page, at laptop and phone
    widths. `JOBWIRE_A11Y_SCREENSHOTS=dir` keeps a screenshot of each."""
    _, dash, jobs = stack
    failing: list[str] = []
    errors: list[str] = []
    shots = os.environ.get("JOBWIRE_A11Y_SCREENSHOTS", "")

    async def check(page: Any, where: str) -> None:
        if await page.locator("#live").count():  # its colours as a connected page shows
            await page.wait_for_selector("#live:not([data-state=connecting])", timeout=WAIT_MS)
        failing.extend(report(where, await axe(page, axe_source)))
        if shots:
            await page.screenshot(path=f"{shots}/{where.replace(' ', '-')}.png", full_page=True)

    page = await context.new_page()
    page.on("pageerror", lambda e: errors.append(str(e)))
    for name, size in (("laptop", LAPTOP), ("phone", PHONE)):
        await page.set_viewport_size(size)
        await page.goto(dash.url + "/login")
        await check(page, f"login {name}")
    await page.fill("input[name=token]", "wrong-token")
    async with page.expect_navigation():
        await page.click("button[type=submit]")
    await check(page, "login wrong token phone")

    page = await login(context, dash.url)
    page.on("pageerror", lambda e: errors.append(str(e)))
    pages = {
        "jobs": "/jobs?page_size=5",
        "jobs filtered": "/jobs?state=RUNNING&state=FAILED&state=QUEUED&label=team%3Dfinance",
        "job running": f"/jobs/{jobs.running}",
        "job ended": f"/jobs/{jobs.ended}",
        "job failed": f"/jobs/{jobs.failed}",
        "error 404": "/jobs/no-such-job",
    }
    for name, size in (("laptop", LAPTOP), ("phone", PHONE)):
        await page.set_viewport_size(size)
        for what, path in pages.items():
            await page.goto(dash.url + path)
            await check(page, f"{what} {name}")
        await page.goto(dash.url + "/jobs?page_size=5")
        await page.click("#next-page")
        await page.wait_for_selector("#first-page")
        await check(page, f"jobs page 2 {name}")
    assert errors == []
    assert failing == [], json.dumps(failing, indent=1)


# -- what axe does not see ---------------------------------------------------------------


def luminance(rgb: str) -> float:
    """Relative luminance (WCAG) of a computed `rgb(r, g, b)` colour."""
    channels = [int(c) / 255 for c in rgb[rgb.index("(") + 1 : rgb.index(")")].split(",")[:3]]
    r, g, b = (c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast(a: str, b: str) -> float:
    high, low = sorted((luminance(a), luminance(b)), reverse=True)
    return (high + 0.05) / (low + 0.05)


COLOURS = """() => {
  const probe = (cls, attrs = {}) => {
    const node = document.createElement('span');
    node.className = cls;
    node.textContent = 'X';
    Object.assign(node.dataset, attrs);
    document.querySelector('header').append(node);
    const s = getComputedStyle(node);
    const colours = [s.color, s.backgroundColor];
    node.remove();
    return colours;
  };
  const out = {};
  for (const st of ['QUEUED', 'RUNNING', 'SUCCEEDED', 'FAILED', 'CANCELLED'])
    out[st] = probe(`badge state-${st}`);
  out.STALLED = probe('badge stalled');
  for (const st of ['connecting', 'live', 'reconnecting', 'ended', 'deleted', 'logged-out'])
    out[`live ${st}`] = probe('live', {state: st});
  const page = getComputedStyle(document.documentElement).backgroundColor;
  for (const f of document.querySelectorAll('input:not([type=hidden]), select'))
    out[`edge of ${f.name}`] = [getComputedStyle(f).borderTopColor, page, 'white'];
  return out;
}"""


async def test_state_badges_and_field_edges_have_contrast(
    stack: tuple[ServiceHandle, DashboardProcess, Jobs], context: Any
) -> None:
    """Every state badge and every state of the live indicator, drawn or not on this
    page (axe checks only what is drawn): 4.5:1 for their small text. A field's edge:
    3:1 against the page and the field's white (WCAG 1.4.11; it was 1.3:1)."""
    _, dash, _ = stack
    page = await login(context, dash.url)
    colours = await page.evaluate(COLOURS)
    low = []
    for what, (fg, bg, *also) in colours.items():
        need = 3.0 if what.startswith("edge") else 4.5
        for other in [bg, *("rgb(255, 255, 255)" for _ in also)]:
            if contrast(fg, other) < need:
                low.append(f"{what}: {fg} on {other} is {contrast(fg, other):.2f}:1")
    assert any(w.startswith("edge of label") for w in colours)
    assert low == []


async def test_tables_drawn_as_blocks_keep_their_column_headers(
    stack: tuple[ServiceHandle, DashboardProcess, Jobs], context: Any
) -> None:
    """At phone width the jobs list, the timeline and the artifacts draw each row as a
    block; their header rows were display: none, so a screen reader read "01:30" with no
    "Message". Now the headers are there, drawn as nothing, and a cell's drawn label
    ("Created (UTC)") is not read a second time."""
    _, dash, jobs = stack
    page = await login(context, dash.url)
    await page.set_viewport_size(PHONE)
    for path, table, header in (
        ("/jobs", "#jobs", "Message"),
        (f"/jobs/{jobs.ended}", "#timeline", "Phase"),
        (f"/jobs/{jobs.ended}", "#artifacts", "SHA-256"),
    ):
        await page.goto(dash.url + path)
        th = page.locator(table).get_by_role("columnheader", name=header, exact=True)
        assert await th.count() == 1, (path, table)
        # Drawn as nothing: a clipped box of 1 px.
        box = await page.locator(f"{table} thead").bounding_box()
        assert box is not None and box["width"] <= 1 and box["height"] <= 1, (table, box)
    await page.goto(dash.url + "/jobs")
    created = await page.locator(f'#jobs tr[data-job="{jobs.ended}"] td.created').aria_snapshot()
    assert "Created" not in created, created
    width = await page.evaluate("document.documentElement.scrollWidth")
    assert width <= PHONE["width"]


async def test_job_ending_under_the_keyboard_focus(
    stack: tuple[ServiceHandle, DashboardProcess, Jobs], context: Any
) -> None:
    """From the keyboard: Cancel asks first (Escape keeps the job); when the job ends
    while Cancel has the focus, Delete takes its place and the focus (it fell to the top
    of the page); Delete asks first too."""
    svc, dash, _ = stack
    job_id = f"keys-{uuid.uuid4().hex[:6]}"
    await svc.stub.CreateJob(
        job_service_pb2.CreateJobRequest(
            job=job_pb2.Job(kind=job_pb2.JOB_KIND_GENERIC), job_id=job_id
        )
    )
    page = await login(context, dash.url)
    await page.goto(f"{dash.url}/jobs/{job_id}")
    await page.wait_for_selector("#live[data-state=live]", timeout=WAIT_MS)
    focused = "() => document.activeElement.closest('form')?.id || document.activeElement.tagName"
    for _ in range(10):
        await page.keyboard.press("Tab")
        if await page.evaluate(focused) == "cancel":
            break
    assert await page.evaluate(focused) == "cancel"
    asked: list[str] = []

    async def dismiss(dialog: Any) -> None:
        asked.append(dialog.message)
        await dialog.dismiss()

    page.on("dialog", dismiss)
    await page.keyboard.press("Enter")
    assert asked == [f"Cancel job {job_id}?"]
    assert await page.evaluate(focused) == "cancel"
    await svc.stub.ReportEvent(
        job_service_pb2.ReportEventRequest(
            job_id=job_id, idempotency_key="done", completed=job_pb2.Result(output_key="k")
        )
    )
    await page.wait_for_selector("#delete:not([hidden])", timeout=WAIT_MS)
    assert await page.locator("#cancel").count() == 0
    assert await page.evaluate(focused) == "delete"
    await page.keyboard.press("Enter")
    assert asked[1].startswith(f"Delete job {job_id} ")
    assert await page.locator("#job").count() == 1


async def test_the_connection_state_is_announced_once_per_change(
    stack: tuple[ServiceHandle, DashboardProcess, Jobs], context: Any
) -> None:
    """#live is a status region: each change of the connection's state is announced. A
    stream that stays down retried with "reconnecting…" written anew each time (three
    times in the first 2 s here), each a fresh announcement."""
    _, dash, jobs = stack
    page = await login(context, dash.url)
    await page.add_init_script(
        """window.__said = [];
        new MutationObserver((records) => {
          const live = document.getElementById('live');
          if (records.some((r) => live?.contains(r.target))) window.__said.push(live.textContent);
        }).observe(document, {subtree: true, childList: true, characterData: true});"""
    )
    tries: list[str] = []

    async def refuse(route: Any) -> None:
        tries.append(route.request.method)
        await route.fulfill(status=503, body="down")

    await page.route("**/events/jobs/**", refuse)
    await page.goto(f"{dash.url}/jobs/{jobs.running}")
    assert await page.get_attribute("#live", "role") == "status"
    await until(lambda: tries.count("GET") >= 3)  # retried after 0.5 s, then 1 s
    await page.unroute("**/events/jobs/**")
    await page.wait_for_selector("#live[data-state=live]", timeout=WAIT_MS)
    said = await page.evaluate("window.__said")
    assert said == ["connecting…", "reconnecting…", "live"], said


async def test_a_focused_row_leaving_the_list_hands_the_focus_on(
    stack: tuple[ServiceHandle, DashboardProcess, Jobs], context: Any
) -> None:
    """On a RUNNING page a job that fails leaves the list: when its link had the focus,
    the next row's link has it now (it fell to the top of the page)."""
    svc, dash, jobs = stack
    job_id = f"leaving-{uuid.uuid4().hex[:6]}"
    await svc.stub.CreateJob(
        job_service_pb2.CreateJobRequest(
            job=job_pb2.Job(kind=job_pb2.JOB_KIND_GENERIC), job_id=job_id
        )
    )
    await svc.stub.ReportEvent(
        job_service_pb2.ReportEventRequest(
            job_id=job_id, idempotency_key="p", progress=job_pb2.Progress(percent=5)
        )
    )
    page = await login(context, dash.url)
    await page.goto(dash.url + "/jobs?state=RUNNING")
    await page.wait_for_selector("#live[data-state=live]", timeout=WAIT_MS)
    shown = await page.eval_on_selector_all("#jobs tbody tr", "rs => rs.map(r => r.dataset.job)")
    assert shown[0] == job_id and jobs.running in shown, shown
    await page.focus(f'#jobs tr[data-job="{job_id}"] a')
    await svc.stub.ReportEvent(
        job_service_pb2.ReportEventRequest(
            job_id=job_id, idempotency_key="f", failed=job_pb2.JobError(code="E", message="x")
        )
    )
    await page.wait_for_selector(f'#jobs tr[data-job="{job_id}"]', state="detached")
    focused = await page.evaluate("document.activeElement.closest('tr')?.dataset.job")
    assert focused == shown[1]


async def test_a_job_pages_tab_title_says_the_jobs_state(
    stack: tuple[ServiceHandle, DashboardProcess, Jobs], context: Any
) -> None:
    """A job page's title (its browser tab, the first thing a screen reader reads) says
    the job's state first, and follows it live: a job watched in a background tab showed
    "Job … · jobwire" whether it ran, failed or was deleted."""
    svc, dash, _ = stack
    job_id = f"titled-{uuid.uuid4().hex[:6]}"
    await svc.stub.CreateJob(
        job_service_pb2.CreateJobRequest(
            job=job_pb2.Job(kind=job_pb2.JOB_KIND_GENERIC), job_id=job_id
        )
    )
    page = await login(context, dash.url)
    await page.goto(f"{dash.url}/jobs/{job_id}")
    assert await page.title() == f"queued · Job {job_id} · jobwire"
    await page.wait_for_selector("#live[data-state=live]", timeout=WAIT_MS)
    await svc.stub.ReportEvent(
        job_service_pb2.ReportEventRequest(
            job_id=job_id, idempotency_key="p", progress=job_pb2.Progress(percent=5)
        )
    )
    running = f"running · Job {job_id} · jobwire"
    await page.wait_for_function("t => document.title === t", arg=running, timeout=WAIT_MS)
    await svc.stub.ReportEvent(
        job_service_pb2.ReportEventRequest(
            job_id=job_id, idempotency_key="f", failed=job_pb2.JobError(code="E", message="x")
        )
    )
    failed = f"failed · Job {job_id} · jobwire"
    await page.wait_for_function("t => document.title === t", arg=failed, timeout=WAIT_MS)
    await page.reload()
    assert await page.title() == failed
    await svc.stub.DeleteJob(job_service_pb2.DeleteJobRequest(id=job_id))
    gone = f"deleted · Job {job_id} · jobwire"
    await page.wait_for_function("t => document.title === t", arg=gone, timeout=WAIT_MS)


async def test_a_job_pages_state_change_is_announced_once(
    stack: tuple[ServiceHandle, DashboardProcess, Jobs], context: Any
) -> None:
    """The job page's state is a status: a screen reader hears the job start, stall or
    end ("FAILED"), once per change; progress events that leave the state as it was say
    nothing. Only "finished" was announced (#live, the stream's end): how it ended was
    silent, and the badge was drawn anew at every event."""
    svc, dash, _ = stack
    job_id = f"spoken-{uuid.uuid4().hex[:6]}"
    await svc.stub.CreateJob(
        job_service_pb2.CreateJobRequest(
            job=job_pb2.Job(kind=job_pb2.JOB_KIND_GENERIC), job_id=job_id
        )
    )
    page = await login(context, dash.url)
    await page.add_init_script(
        # From the page as parsed on: what changes it after.
        """window.__said = [];
        document.addEventListener('DOMContentLoaded', () => {
          const state = document.querySelector('#job .state');
          new MutationObserver(() => window.__said.push(state.textContent))
            .observe(state, {subtree: true, childList: true, characterData: true});
        });"""
    )
    await page.goto(f"{dash.url}/jobs/{job_id}")
    assert await page.get_attribute("#job .state", "role") == "status"
    await page.wait_for_selector("#live[data-state=live]", timeout=WAIT_MS)
    for pct in (5, 10, 15):
        await svc.stub.ReportEvent(
            job_service_pb2.ReportEventRequest(
                job_id=job_id, idempotency_key=f"p{pct}", progress=job_pb2.Progress(percent=pct)
            )
        )
        await page.wait_for_selector(f"#job .pct:text('{pct}%')", timeout=WAIT_MS)
    await svc.stub.ReportEvent(
        job_service_pb2.ReportEventRequest(
            job_id=job_id, idempotency_key="f", failed=job_pb2.JobError(code="E", message="x")
        )
    )
    await page.wait_for_selector("#live[data-state=ended]", timeout=WAIT_MS)
    said = await page.evaluate("window.__said")
    assert said == ["RUNNING", "FAILED"], said


async def test_a_job_id_is_selected_whole(
    stack: tuple[ServiceHandle, DashboardProcess, Jobs], context: Any
) -> None:
    """One click (or a phone's long press, a double click) on the job page's id, or on
    the deleted notice's, selects the whole id to copy: a double click selected the word
    under it, "video" or "3f9a2c" of "video-3f9a2c" (ids are cut at hyphens and dots)."""
    _, dash, jobs = stack
    page = await login(context, dash.url)
    selected = "() => window.getSelection().toString()"
    await page.goto(f"{dash.url}/jobs/{jobs.running}")
    await page.dblclick("#job .job-id")
    assert await page.evaluate(selected) == jobs.running
    await page.goto(f"{dash.url}/jobs?deleted=gone-1.2")
    await page.click("#deleted .job-id")
    assert await page.evaluate(selected) == "gone-1.2"


async def test_delete_from_the_keyboard_lands_on_its_notice(
    stack: tuple[ServiceHandle, DashboardProcess, Jobs], context: Any
) -> None:
    """Delete job leads back to the list with the keyboard's focus (and so a screen
    reader) on "Job … was deleted.": the focus was at the top of the page, and a status
    already there when a page loads is not announced, so nothing said the job was gone."""
    svc, dash, _ = stack
    job_id = f"removed-{uuid.uuid4().hex[:6]}"
    await svc.stub.CreateJob(
        job_service_pb2.CreateJobRequest(
            job=job_pb2.Job(kind=job_pb2.JOB_KIND_GENERIC), job_id=job_id
        )
    )
    await svc.stub.ReportEvent(
        job_service_pb2.ReportEventRequest(
            job_id=job_id, idempotency_key="done", completed=job_pb2.Result(output_key="k")
        )
    )
    page = await login(context, dash.url)
    await page.goto(f"{dash.url}/jobs/{job_id}")
    page.on("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
    await page.focus("#delete button")
    async with page.expect_navigation():
        await page.keyboard.press("Enter")
    await page.wait_for_selector("#deleted", timeout=WAIT_MS)
    await page.wait_for_function("() => document.activeElement?.id === 'deleted'", timeout=WAIT_MS)
    assert job_id in await page.evaluate("document.activeElement.textContent")


async def test_a_jobs_lists_tab_title_says_which_list(
    stack: tuple[ServiceHandle, DashboardProcess, Jobs], context: Any
) -> None:
    """The jobs page's title names its filters, its order and a later page: every list
    was "Jobs · jobwire", so the Back button's history, the tabs and a screen reader's
    first words could not tell the failed transcodes' second page from all the jobs."""
    _, dash, _ = stack
    page = await login(context, dash.url)
    await page.goto(f"{dash.url}/jobs")
    assert await page.title() == "Jobs · jobwire"
    query = "kind=TRANSCODE&state=FAILED&state=QUEUED&label=team%3Dfinance&order=oldest"
    await page.goto(f"{dash.url}/jobs?{query}")
    listed = "Jobs: transcode, failed or queued, team=finance, oldest first · jobwire"
    assert await page.title() == listed
    await page.goto(f"{dash.url}/jobs?page_size=2")
    await page.click("#next-page")
    await page.wait_for_selector("#first-page")
    assert await page.title() == "Jobs: a later page · jobwire"
    await page.go_back()
    await page.wait_for_selector("#next-page")
    assert await page.title() == "Jobs · jobwire"


async def test_a_skip_link_leads_past_the_header(
    stack: tuple[ServiceHandle, DashboardProcess, Jobs], context: Any
) -> None:
    """The first Tab shows a skip link; Enter on it and the next Tab reaches the jobs
    list's first job (past the header and the nine filter controls), or on a job page
    its content (Cancel job): every page began with the header's links, every time."""
    _, dash, jobs = stack
    page = await login(context, dash.url)
    focused = """() => document.activeElement.closest('tr')?.dataset.job
        || document.activeElement.textContent.trim()"""
    for path, then in (("/jobs", None), (f"/jobs/{jobs.running}", "Cancel job")):
        await page.goto(dash.url + path)
        await page.keyboard.press("Tab")
        skip = page.locator(".skip")
        assert await page.evaluate("document.activeElement.className") == "skip", path
        box = await skip.bounding_box()
        assert box is not None and box["width"] > 20 and box["y"] >= 0, box  # drawn
        if shots := os.environ.get("JOBWIRE_A11Y_SCREENSHOTS", ""):
            await page.screenshot(path=f"{shots}/skip-{path.count('/')}.png")
        await page.keyboard.press("Enter")
        await page.keyboard.press("Tab")
        if then is None:  # the first job's row
            then = await page.locator("#jobs tbody tr").first.get_attribute("data-job")
        assert await page.evaluate(focused) == then, path
