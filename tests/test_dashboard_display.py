"""What an operator sees when workers send hostile strings, in a real browser (Debian's
chromium via Playwright) against the real service, bridge and dashboard process.

Everything the dashboard shows about a job comes from workers on the internet. Each test
creates jobs carrying one kind of hostile string (very long and unbroken; bidi controls;
markup; control, zero-width, wide and combining characters) through the real gRPC API
and the Secretary callback of the real bridge, opens the jobs page and the job's page at
laptop and phone width, then pushes live updates carrying the same strings while the page
is open, and asserts what a person sees: no sideways scrolling, the state and percent as
they are, nothing run, nothing thrown. Screenshots of every case go to
`JOBWIRE_DISPLAY_SCREENSHOTS` (a temp dir when unset).
"""

from __future__ import annotations

import dataclasses
import os
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from jobwire.v1 import job_pb2, job_service_pb2, log_pb2
from service.domain.records import Policy
from service.store.embedded import EmbeddedStore
from tests.bridge_harness import TEST_CONFIG, Bridge, running_bridge
from tests.conftest import ServiceHandle, start_service
from tests.dashboard_harness import LAPTOP, PHONE, DashboardProcess, chromium, login
from tests.dashboard_harness import running_dashboard as dashboard_process

WAIT_MS = 10_000
WIDTHS = {"laptop": LAPTOP, "phone": PHONE, "narrow": {"width": 320, "height": 640}}

# -- the hostile strings ------------------------------------------------------------

LONG = "Wm" * 1000  # 2,000 characters without a single break opportunity
LONG_ID = "long-" + "W" * 123  # the longest job id the service takes (128)
LONG_URL = "https://cdn.example.com/v/" + "a1B2c3D4" * 150 + ".mp4?sig=" + "Zz09" * 100
ARTIFACT = "a" * 251 + ".txt"  # the longest artifact name (255)
LONG_PHASE = "P" * 128  # the longest phase the Secretary callback takes
# A stray PDI closes whatever isolate the page opened around the field (even a <bdi>'s),
# then RLO overrides the rest of the line: "deliaf" would read "failed", "%001" "100%".
FLIP = "\u2069\u202e"
BIDI_PHASE = FLIP + "%001"
BIDI_MESSAGE = FLIP + "deliaf \u2066 \u2067 \u2068 \u202a \u202b \u202c \u202d ok"
BIDI_CODE = "E" + FLIP + "42"
RTL_LABELS = {"שלום": "5", "lang": "עברית 42"}
CONTROLS = "nul\x00 esc\x1b[31m bel\x07 bs\x08 del\x7f c1\x85\x9b\x9f end"
ZERO_WIDTH = "zero\u200bwidth\u200c\u200djoin\u2060\ufeffend"
WIDE = "漢字テスト表示ｆｕｌｌ😀👨\u200d👩\u200d👧🏳\ufe0f\u200d🌈"
COMBINING = "e\u0301 Z" + "\u0336\u0337\u0338\u0335\u0334\u0489" * 8 + " done"
ODD = f"{CONTROLS} | {ZERO_WIDTH} | {WIDE} | {COMBINING}"


def payload(field: str) -> str:
    """Markup that, if it ever ran, would add `field` to window.__pwned."""
    run = f"(window.__pwned=(window.__pwned||[]).concat('{field}'))"
    return f'"><img src=x onerror="{run}"><script>{run}</script>\'><svg onload="{run}">'


def visible(text: str) -> str:
    """How the dashboard shows worker text (README, Dashboard): C0 controls (but tab and
    newlines), DEL, C1 controls and the explicit bidi controls (embeddings, overrides,
    isolates) as their JSON escape, `\\u202e`; everything else as it is."""
    out = []
    for c in text:
        n = ord(c)
        hidden = (n < 0x20 and c not in "\t\n\r") or 0x7F <= n <= 0x9F
        if hidden or 0x202A <= n <= 0x202E or 0x2066 <= n <= 0x2069:
            out.append(f"\\u{n:04x}")
        else:
            out.append(c)
    return "".join(out)


RAW_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")

# -- what the browser reports ---------------------------------------------------------

# Sideways overflow of the page, and of every box that scrolls on its own.
OVERFLOW = """() => {
  const out = [];
  if (document.documentElement.scrollWidth > innerWidth) {
    out.push(`page ${document.documentElement.scrollWidth} > ${innerWidth}`);
  }
  for (const box of document.querySelectorAll('.scroll')) {
    if (box.scrollWidth > box.clientWidth + 1) {
      out.push(`${box.firstElementChild.id} ${box.scrollWidth} > ${box.clientWidth}`);
    }
  }
  return out;
}"""

# How a person can read `text` in the element: all of it shown, or the rest in a
# tooltip (title) of the element showing its start.
REACHABLE = """([sel, text]) => {
  const cell = document.querySelector(sel);
  if (!cell) return 'missing';
  // A header row drawn as nothing (kept for screen readers) is clipped by design.
  const all = [cell, ...cell.querySelectorAll('*')].filter(e => !e.closest('thead'));
  if (all.some(e => e.title === text)) return 'title';
  const clipped = all.some(e =>
    e.scrollHeight > e.clientHeight + 1 || e.scrollWidth > e.clientWidth + 1);
  return !clipped && cell.textContent.includes(text) ? 'shown' : 'hidden';
}"""

# The on-screen boxes of consecutive pieces of an element's text: [[left, right, top]].
BOXES = """([sel, parts]) => {
  const root = document.querySelector(sel);
  if (!root) return null;
  const walker = document.createTreeWalker(root, NodeFilter.SHOW_TEXT);
  const chars = [];
  for (let n = walker.nextNode(); n; n = walker.nextNode()) {
    for (let i = 0; i < n.data.length; i++) chars.push([n, i]);
  }
  const text = chars.map(([n, i]) => n.data[i]).join('');
  const out = [];
  let from = 0;
  for (const part of parts) {
    const at = text.indexOf(part, from);
    if (at < 0) return null;
    from = at + part.length;
    let left = Infinity, right = -Infinity, top = Infinity;
    const lefts = [];
    for (let k = at; k < from; k++) {
      const range = document.createRange();
      range.setStart(chars[k][0], chars[k][1]);
      range.setEnd(chars[k][0], chars[k][1] + 1);
      const r = range.getBoundingClientRect();
      if (r.width === 0) continue;
      left = Math.min(left, r.left); right = Math.max(right, r.right); top = Math.min(top, r.top);
      lefts.push([Math.round(r.top), r.left]);
    }
    // Read in stored order: each character right of the one before, or on a later line.
    const ordered = lefts.every((p, k) =>
      k === 0 || p[0] > lefts[k - 1][0] + 2 || p[1] >= lefts[k - 1][1] - 0.5);
    out.push([left, right, top, ordered]);
  }
  return out;
}"""

INSIDE = """(sel) => [...document.querySelectorAll(sel)].filter(e => {
  const r = e.getBoundingClientRect();
  return r.width === 0 || r.left < 0 || r.right > innerWidth + 0.5;
}).map(e => e.outerHTML.slice(0, 80))"""

INJECTED = """() => [...document.querySelectorAll('main *')].filter(e =>
  ['IMG', 'SVG', 'SCRIPT', 'IFRAME'].includes(e.tagName.toUpperCase())
  || [...e.attributes].some(a => a.name.startsWith('on'))).map(e => e.outerHTML.slice(0, 80))"""

SHOWN_TEXT = """() => [document.querySelector('main').innerText,
  ...[...document.querySelectorAll('main [title]')].map(e => e.title)].join('\\n')"""


def row(job_id: str) -> str:
    return f'#jobs tr[data-job="{job_id}"]'


# -- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def svc(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ServiceHandle]:
    data = tmp_path_factory.mktemp("display")
    policy = Policy(retention=64, lease_ns=60 * 10**9, max_attempts=3)
    handle = await start_service(EmbeddedStore(data, policy), lease_sweep_seconds=0.05)
    yield handle
    await handle.close()


@pytest.fixture(scope="module")
async def bridge(svc: ServiceHandle) -> AsyncIterator[Bridge]:
    config = dataclasses.replace(TEST_CONFIG, service_target=svc.target)
    async with running_bridge(config) as b:
        yield b


@pytest.fixture(scope="module")
async def dash(svc: ServiceHandle) -> AsyncIterator[DashboardProcess]:
    async with dashboard_process(svc.target) as d:
        yield d


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Any]:
    async with chromium() as b:
        yield b


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = os.environ.get("JOBWIRE_DISPLAY_SCREENSHOTS")
    path = Path(where) if where else tmp_path_factory.mktemp("display-screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclasses.dataclass
class Tab:
    """A logged-in page that records what the browser complains about."""

    page: Any
    width: str
    problems: list[str]
    dialogs: list[str]

    async def open(self, url: str) -> None:
        await self.page.goto(url)
        await self.page.wait_for_selector("#live[data-state=live]", timeout=WAIT_MS)

    async def overflow(self) -> list[str]:
        result: list[str] = await self.page.evaluate(OVERFLOW)
        return result

    async def boxes(self, sel: str, *parts: str) -> list[tuple[float, float, float, bool]]:
        found = await self.page.evaluate(BOXES, [sel, list(parts)])
        assert found is not None, f"{parts!r} not shown in order in {sel}"
        return [tuple(b) for b in found]

    async def reads_as_stored(self, sel: str, *texts: str) -> None:
        for left, right, _top, ordered in await self.boxes(sel, *texts):
            assert ordered, f"{texts!r} in {sel} is not shown in the order it was sent"
            assert right > left

    async def shown(self) -> str:
        text: str = await self.page.evaluate(SHOWN_TEXT)
        return text


@pytest.fixture(params=list(WIDTHS))
async def tab(request: pytest.FixtureRequest, browser: Any, dash: DashboardProcess) -> Any:
    context = await browser.new_context(viewport=WIDTHS[request.param])
    page = await login(context, dash.url)
    problems: list[str] = []
    dialogs: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else 0)
    page.on("pageerror", lambda e: problems.append(str(e)))

    async def on_dialog(dialog: Any) -> None:
        dialogs.append(dialog.message)
        await dialog.dismiss()

    page.on("dialog", on_dialog)
    yield Tab(page, request.param, problems, dialogs)
    await context.close()


async def snap(tab: Tab, shots: Path, name: str) -> None:
    """The whole page, up to twice the viewport's width and 8,000 pixels down."""
    width, height = await tab.page.evaluate(
        "[document.documentElement.scrollWidth, document.documentElement.scrollHeight]"
    )
    clip = {"x": 0, "y": 0, "width": min(width, 2 * WIDTHS[tab.width]["width"])}
    clip["height"] = min(height, 8000)
    await tab.page.screenshot(
        path=str(shots / f"{name}-{tab.width}.png"), full_page=True, clip=clip
    )


# -- writing jobs the way workers do ------------------------------------------------------


@dataclasses.dataclass
class Worker:
    """One EXTRACTION job, reported on through the bridge's Secretary callback where the
    contract takes the string, through gRPC where it does not."""

    svc: ServiceHandle
    bridge: Bridge
    job_id: str
    token: str
    sequence: int = 0

    @classmethod
    async def create(
        cls, svc: ServiceHandle, bridge: Bridge, job_id: str, labels: dict[str, str] | None = None
    ) -> Worker:
        job = job_pb2.Job(kind=job_pb2.JOB_KIND_EXTRACTION)
        job.labels.update(labels or {})
        created = await svc.stub.CreateJob(job_service_pb2.CreateJobRequest(job=job, job_id=job_id))
        return cls(svc, bridge, job_id, created.callback_token)

    async def callback(self, percent: float, phase: str, message: str, process: str = "") -> int:
        body: dict[str, Any] = {"phase": phase, "progress": percent, "message": message}
        if process:
            body["process"] = {"id": process}
        auth = {"Authorization": f"Bearer {self.token}"}
        status, reply = await self.bridge.post(
            f"/api/external/jobs/{self.job_id}", body, headers=auth
        )
        assert status == 200, reply
        return await self._sequence()

    async def progress(self, percent: float, phase: str, message: str) -> int:
        reply = await self.svc.stub.ReportEvent(
            job_service_pb2.ReportEventRequest(
                job_id=self.job_id,
                idempotency_key=uuid.uuid4().hex,
                progress=job_pb2.Progress(percent=percent, phase=phase, message=message),
            )
        )
        self.sequence = int(reply.sequence)
        return self.sequence

    async def fail(self, code: str, message: str, details: dict[str, Any]) -> int:
        error = job_pb2.JobError(code=code, message=message)
        error.details.update(details)
        reply = await self.svc.stub.ReportEvent(
            job_service_pb2.ReportEventRequest(
                job_id=self.job_id, idempotency_key=uuid.uuid4().hex, failed=error
            )
        )
        self.sequence = int(reply.sequence)
        return self.sequence

    async def log(self, message: str, level: int = log_pb2.LOG_LEVEL_WARNING) -> None:
        entry = log_pb2.LogEntry(
            job_id=self.job_id, level=log_pb2.LogLevel.ValueType(level), message=message
        )
        await self.svc.stub.WriteLog(job_service_pb2.WriteLogRequest(entry=entry))

    async def artifact(self, name: str, content_type: str) -> None:
        async def parts() -> AsyncIterator[job_service_pb2.UploadArtifactRequest]:
            header = job_service_pb2.ArtifactHeader(
                job_id=self.job_id, name=name, content_type=content_type
            )
            yield job_service_pb2.UploadArtifactRequest(header=header)
            yield job_service_pb2.UploadArtifactRequest(data=b"hostile\n")

        await self.svc.stub.UploadArtifact(parts())

    async def _sequence(self) -> int:
        job = await self.svc.stub.GetJob(job_service_pb2.GetJobRequest(id=self.job_id))
        self.sequence = int(job.sequence)
        return self.sequence


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def row_at(tab: Tab, job_id: str, sequence: int) -> None:
    await tab.page.wait_for_function(
        "([sel, seq]) => Number(document.querySelector(sel)?.dataset.seq) >= seq",
        arg=[row(job_id), sequence],
        timeout=WAIT_MS,
    )


async def head_at(tab: Tab, sequence: int) -> None:
    await tab.page.wait_for_function(
        "(seq) => Number(document.querySelector('#job').dataset.seq) >= seq",
        arg=sequence,
        timeout=WAIT_MS,
    )


# -- very long strings -------------------------------------------------------------------


async def test_long_strings_never_scroll_the_page_sideways(
    tab: Tab, dash: DashboardProcess, svc: ServiceHandle, bridge: Bridge, shots: Path
) -> None:
    job_id = LONG_ID[:-9] + "-" + uuid.uuid4().hex[:8]
    labels = {"note": "V" * 256, "source": LONG_URL[:256], "k" * 63: "x"}
    worker = await Worker.create(svc, bridge, job_id, labels)
    await worker.callback(14, LONG_PHASE, LONG, process="p" * 256)
    await worker.log(LONG)
    await worker.log(LONG_URL)
    await worker.artifact(ARTIFACT, "text/plain; name=" + "Q" * 238)  # 255: the longest taken
    await worker.fail("E" * 200, LONG, {"url": LONG_URL, "W" * 300: LONG})
    video_id = uid("long-video")
    video = job_pb2.Job(kind=job_pb2.JOB_KIND_VIDEO)
    video.video.CopyFrom(job_pb2.Video(url=LONG_URL, title=LONG, playlist=LONG, subtitle=LONG))
    await svc.stub.CreateJob(job_service_pb2.CreateJobRequest(job=video, job_id=video_id))
    await Worker(svc, bridge, video_id, "").progress(1, "", "")  # running: nobody claims it
    running = await Worker.create(svc, bridge, uid("long-live"))
    await running.progress(3, "G" * 3000, LONG)

    await tab.open(dash.url + "/jobs")
    await snap(tab, shots, "long-jobs")
    assert await tab.overflow() == []
    for job in (job_id, running.job_id):
        # The whole message, readable: shown, or in the tooltip of what shows its start.
        assert await tab.page.evaluate(REACHABLE, [row(job) + " td.message", LONG]) != "hidden"
    assert (
        await tab.page.evaluate(REACHABLE, [row(running.job_id) + " td.progress", "G" * 3000])
        != "hidden"
    )
    # The id column is not starved by the long message beside it: the whole id in a few
    # lines, never one or two characters a line.
    link = await tab.page.locator(row(job_id) + " td.id a").bounding_box()
    assert link["width"] >= 100, link
    assert await tab.page.evaluate(INSIDE, "#jobs .badge, #jobs .pct, #jobs progress") == []

    # Live: the rows change while the page is open, through the page's script, and a
    # row is added for a job whose first event arrives now.
    seq = await running.progress(57, "H" * 5000, "M" * 4000)
    fresh = await Worker.create(svc, bridge, uid("long-fresh"))
    await fresh.progress(9, "N" * 5000, "O" * 4000)
    await row_at(tab, running.job_id, seq)
    await row_at(tab, fresh.job_id, 1)
    assert await tab.overflow() == []
    assert (
        await tab.page.evaluate(REACHABLE, [row(fresh.job_id) + " td.message", "O" * 4000])
        == "title"
    )
    assert (
        await tab.page.evaluate(REACHABLE, [row(fresh.job_id) + " td.progress", "N" * 5000])
        == "title"
    )
    assert (
        await tab.page.evaluate(REACHABLE, [row(running.job_id) + " td.message", "M" * 4000])
        != "hidden"
    )
    assert (
        await tab.page.evaluate(REACHABLE, [row(running.job_id) + " td.progress", "H" * 5000])
        != "hidden"
    )
    await snap(tab, shots, "long-jobs-live")

    for job, name in ((job_id, "long-job"), (video_id, "long-video")):
        await tab.page.goto(f"{dash.url}/jobs/{job}")
        await tab.page.wait_for_selector("#live[data-state=ended], #live[data-state=live]")
        await snap(tab, shots, name)
        assert await tab.overflow() == [], name
    # The job page shows every long string whole (wrapped), nothing only in a tooltip.
    await tab.page.goto(f"{dash.url}/jobs/{job_id}")
    main = await tab.page.inner_text("main")
    for text in (LONG, LONG_URL, "p" * 256, "V" * 256, "E" * 200, ARTIFACT):
        assert text in main.replace("\n", ""), text[:20]
    assert await tab.page.evaluate(REACHABLE, ["#timeline", LONG_PHASE]) == "shown"
    assert await tab.page.evaluate(REACHABLE, ["#logs", LONG]) == "shown"
    if tab.width == "laptop":
        # Columns keep a readable width beside a 2,000-character message.
        for cell in ("#timeline td.ev-phase", "#timeline td.message", "#logs td.message"):
            box = await tab.page.locator(cell).first.bounding_box()
            assert box["width"] >= 100, (cell, box)

    await tab.open(f"{dash.url}/jobs/{running.job_id}")
    seq = await running.progress(88, "J" * 6000, "K" * 3000)
    await head_at(tab, seq)
    await snap(tab, shots, "long-job-live")
    assert await tab.overflow() == []
    assert await tab.page.evaluate(REACHABLE, ["#job .progress", "J" * 6000]) != "hidden"
    assert await tab.page.evaluate(REACHABLE, ["#job .message", "K" * 3000]) != "hidden"
    assert await tab.page.evaluate(REACHABLE, ["#timeline", "K" * 3000]) == "shown"
    # A long message does not push Cancel off the first screen.
    cancel = await tab.page.locator("#cancel button").bounding_box()
    assert cancel["y"] + cancel["height"] <= WIDTHS[tab.width]["height"], cancel
    assert tab.problems == []


# -- bidi controls ---------------------------------------------------------------------


async def test_bidi_controls_cannot_reorder_what_surrounds_them(
    tab: Tab, dash: DashboardProcess, svc: ServiceHandle, bridge: Bridge, shots: Path
) -> None:
    worker = await Worker.create(svc, bridge, uid("bidi"), RTL_LABELS)
    await worker.callback(14, BIDI_PHASE, BIDI_MESSAGE, process=FLIP + "proc")
    await worker.log(BIDI_MESSAGE)
    failed = await Worker.create(svc, bridge, uid("bidi-failed"))
    await failed.progress(14, BIDI_PHASE, BIDI_MESSAGE)
    await failed.fail(BIDI_CODE, "retry later", {"hint": FLIP + "eurt", "ok": False})

    await tab.open(dash.url + "/jobs")
    await snap(tab, shots, "bidi-jobs")

    async def check_rows() -> None:
        for job, state in ((worker.job_id, "RUNNING"), (failed.job_id, "FAILED")):
            tr = row(job)
            # The state and the percent read as they are, the phase and message as sent
            # (the override shown, not obeyed), and the percent stays left of the phase.
            await tab.reads_as_stored(tr + " td.state", state)
            pct, phase = await tab.boxes(tr + " td.progress", "14%", visible(BIDI_PHASE))
            assert pct[3] and phase[3], (pct, phase)
            assert pct[1] <= phase[0] or pct[2] < phase[2], (pct, phase)
        await tab.reads_as_stored(row(worker.job_id) + " td.message", visible(BIDI_MESSAGE))
        shown = await tab.shown()
        assert not RAW_CONTROL.search(shown), ascii(RAW_CONTROL.findall(shown))

    await check_rows()
    # Live: the same strings through the page's script.
    seq = await worker.callback(14, BIDI_PHASE, BIDI_MESSAGE + " live")
    await row_at(tab, worker.job_id, seq)
    await check_rows()
    await tab.reads_as_stored(row(worker.job_id) + " td.message", visible(BIDI_MESSAGE + " live"))

    await tab.page.goto(f"{dash.url}/jobs/{failed.job_id}")
    await snap(tab, shots, "bidi-failed-job")
    # The error's code is shown before its message, each as sent.
    code, message = await tab.boxes("#error .error", visible(BIDI_CODE), "retry later")
    assert code[3] and message[3]
    assert code[1] <= message[0] or code[2] < message[2], (code, message)
    await tab.reads_as_stored("#error pre", visible(FLIP + "eurt"))
    await tab.reads_as_stored("#timeline", visible(BIDI_CODE))
    await tab.reads_as_stored("#job .state", "FAILED")
    assert not RAW_CONTROL.search(await tab.shown())

    await tab.open(f"{dash.url}/jobs/{worker.job_id}")
    await snap(tab, shots, "bidi-job")

    async def check_job() -> None:
        await tab.reads_as_stored("#job .state", "RUNNING")
        pct, phase = await tab.boxes("#job .progress", "14%", visible(BIDI_PHASE))
        assert pct[3] and phase[3] and (pct[1] <= phase[0] or pct[2] < phase[2])
        await tab.reads_as_stored("#message", visible(BIDI_MESSAGE))
        await tab.reads_as_stored("#logs", visible(BIDI_MESSAGE))
        # A right-to-left label key stays left of its value: "שלום=5" never reads "5=שלום".
        key, equals, value = await tab.boxes(".labels", "שלום", "=", "5")
        assert key[1] <= equals[0] + 0.5 and equals[1] <= value[0] + 0.5, (key, equals, value)
        assert not RAW_CONTROL.search(await tab.shown())

    await check_job()
    seq = await worker.callback(14, BIDI_PHASE, BIDI_MESSAGE)
    await head_at(tab, seq)
    await check_job()
    await tab.reads_as_stored(f"#timeline tr[data-seq='{seq}'] td.message", visible(BIDI_MESSAGE))
    assert await tab.overflow() == []
    assert tab.problems == []


# -- markup in every field ----------------------------------------------------------------


async def test_markup_in_every_field_runs_nothing(
    tab: Tab, dash: DashboardProcess, svc: ServiceHandle, bridge: Bridge, shots: Path
) -> None:
    stub = svc.stub
    labels = {"label_value": payload("label"), "k": payload("label2")[:256]}
    worker = await Worker.create(svc, bridge, uid("xss"), labels)
    await worker.callback(10, payload("phase")[:128], payload("message"), payload("process"))
    await worker.log(payload("log"))
    # A parameter: the service refuses a content type that is not a MIME type.
    await worker.artifact("x.html", "text/html; x=" + payload("content_type"))
    # A claimed VIDEO job: worker id and video fields; it fails with markup everywhere
    # while its page is open.
    video_id = uid("xss-video")
    video = job_pb2.Job(kind=job_pb2.JOB_KIND_VIDEO)
    video.video.CopyFrom(
        job_pb2.Video(
            url=payload("url"),
            title=payload("title"),
            playlist=payload("pl"),
            subtitle=payload("sub"),
        )
    )
    await stub.CreateJob(job_service_pb2.CreateJobRequest(job=video, job_id=video_id))
    claimed = await stub.ClaimJob(
        job_service_pb2.ClaimJobRequest(kind=job_pb2.JOB_KIND_VIDEO, worker_id=payload("worker"))
    )
    assert claimed.job.id == video_id
    failing = Worker(svc, bridge, video_id, "")
    await failing.progress(50, payload("phase2"), payload("message2"))
    done = await Worker.create(svc, bridge, uid("xss-done"))
    await stub.ReportEvent(
        job_service_pb2.ReportEventRequest(
            job_id=done.job_id,
            idempotency_key="done",
            completed=job_pb2.Result(
                message=payload("result"),
                output_key=payload("key"),
                output_uri=payload("uri"),
                format=payload("format"),
            ),
        )
    )

    async def nothing_ran() -> None:
        assert await tab.page.evaluate("window.__pwned") is None
        assert await tab.page.evaluate(INJECTED) == []
        assert tab.dialogs == []

    async def shows(*fields: str) -> None:
        shown = (await tab.shown()).replace("\\", "")  # JSON (video, result) escapes quotes
        for field in fields:
            assert payload(field) in shown, field

    await tab.open(dash.url + "/jobs")
    await snap(tab, shots, "markup-jobs")
    await nothing_ran()
    assert payload("message") in await tab.page.inner_text(row(worker.job_id))
    # Live: the jobs page's script puts new markup into the rows, and into a row it
    # adds for a job whose first event arrives while the page is open.
    seq = await worker.callback(20, payload("live_phase")[:128], payload("live_message"))
    fresh = await Worker.create(svc, bridge, uid("xss-fresh"))
    await fresh.callback(5, payload("new_phase")[:128], payload("new_message"))
    await row_at(tab, worker.job_id, seq)
    text = await tab.page.inner_text(row(worker.job_id))
    assert payload("live_message") in text and payload("live_phase")[:128] in text
    await row_at(tab, fresh.job_id, 1)
    text = await tab.page.inner_text(row(fresh.job_id))
    assert payload("new_message") in text and payload("new_phase")[:128] in text
    await nothing_ran()

    await tab.page.goto(f"{dash.url}/jobs/{done.job_id}")
    await snap(tab, shots, "markup-done")
    await nothing_ran()
    await shows("result", "key", "uri", "format")
    await tab.page.goto(f"{dash.url}/jobs/{worker.job_id}")
    await snap(tab, shots, "markup-job")
    await nothing_ran()
    await shows("label", "process", "log", "content_type", "live_message")

    # Live on the job page: the snapshot, the head and the timeline rows.
    await tab.open(f"{dash.url}/jobs/{video_id}")
    await shows("worker", "message2", "phase2", "url", "title", "pl", "sub")
    seq = await failing.progress(60, payload("head_phase"), payload("head_message"))
    await head_at(tab, seq)
    assert payload("head_message") in await tab.page.inner_text("#message")
    assert payload("head_message") in await tab.page.inner_text("#timeline")
    await failing.fail(payload("code"), payload("error"), {payload("dkey"): payload("dvalue")})
    await tab.page.wait_for_selector("#job[data-state=FAILED]", timeout=WAIT_MS)
    assert payload("error") in await tab.page.inner_text("#timeline")
    await nothing_ran()
    await tab.page.reload()
    await snap(tab, shots, "markup-video")
    await nothing_ran()
    await shows("code", "error", "dkey", "dvalue")
    assert tab.problems == []


# -- control, zero-width, wide and combining characters ------------------------------------


async def test_control_zero_width_wide_and_combining_characters(
    tab: Tab, dash: DashboardProcess, svc: ServiceHandle, bridge: Bridge, shots: Path
) -> None:
    # Labels hold no control or format characters (the service refuses them), so no ZWJ.
    labels = {"wide": WIDE.split("👨")[0], "mark": COMBINING}
    worker = await Worker.create(svc, bridge, uid("odd"), labels)
    await worker.callback(14, WIDE, ODD, process=ZERO_WIDTH)
    await worker.log(ODD)
    await worker.log(CONTROLS, log_pb2.LOG_LEVEL_INFO)
    failed = await Worker.create(svc, bridge, uid("odd-failed"))
    await failed.progress(14, COMBINING, ODD)
    await failed.fail(CONTROLS, ODD, {"ctl": CONTROLS, "wide": WIDE})

    async def check(sel_message: str) -> None:
        assert await tab.overflow() == []
        shown = await tab.shown()
        assert not RAW_CONTROL.search(shown), ascii(RAW_CONTROL.findall(shown))
        text = await tab.page.inner_text(sel_message)
        # Shown as sent, the controls as visible symbols: the same on the first paint
        # (HTML parsers drop a NUL) and through the page's script.
        assert visible(ODD) in text, ascii(text)
        assert await tab.page.evaluate(INSIDE, "main .badge, main .pct, main progress") == []

    await tab.open(dash.url + "/jobs")
    await snap(tab, shots, "odd-jobs")
    await check(row(worker.job_id) + " td.message")
    await tab.reads_as_stored(row(failed.job_id) + " td.state", "FAILED")
    seq = await worker.callback(15, WIDE, ODD + " ")
    await row_at(tab, worker.job_id, seq)
    await check(row(worker.job_id) + " td.message")
    await snap(tab, shots, "odd-jobs-live")

    await tab.page.goto(f"{dash.url}/jobs/{failed.job_id}")
    await snap(tab, shots, "odd-failed-job")
    await check("#error")
    assert visible(CONTROLS) in await tab.page.inner_text("#error code")

    await tab.open(f"{dash.url}/jobs/{worker.job_id}")
    await check("#message")
    await check("#logs")
    seq = await worker.callback(16, WIDE, ODD)
    await head_at(tab, seq)
    await check("#message")
    await check(f"#timeline tr[data-seq='{seq}'] td.message")
    await snap(tab, shots, "odd-job-live")
    assert tab.problems == []


LINE_BREAKS = """(sel) => {
  const node = document.querySelector(sel).firstChild;
  const text = node.textContent, range = document.createRange(), breaks = [];
  let top = null;
  for (let i = 0; i < text.length; i++) {
    range.setStart(node, i); range.setEnd(node, i + 1);
    const t = range.getClientRects()[0].top;
    if (top !== null && t > top + 1) breaks.push(i);
    top = t;
  }
  return [text, breaks];
}"""


async def test_a_long_job_id_wraps_at_its_hyphens(
    tab: Tab, dash: DashboardProcess, svc: ServiceHandle, bridge: Bridge
) -> None:
    """A job id too long for its column broke anywhere (word-break: break-all), e.g.
    `contract-2026-117-782` / `2`; it now wraps after a hyphen when its parts fit."""
    hex_ = uuid.uuid4().hex
    job_id = "contract-2026-117-" + "-".join(hex_[i : i + 4] for i in range(0, 32, 4))
    await Worker.create(svc, bridge, job_id)
    await tab.open(dash.url + "/jobs")
    text, breaks = await tab.page.evaluate(LINE_BREAKS, row(job_id) + " td.id a")
    assert text == job_id
    assert breaks, f"{job_id} fits on one line at {tab.width}: the test shows nothing"
    assert all(text[i - 1] == "-" for i in breaks), (tab.width, [text[:i] for i in breaks])
