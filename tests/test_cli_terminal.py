"""`jobwire watch` in a real terminal (tmux), as an operator sees it. A job's phase and
message come from external workers: they must not drive the terminal (an ESC sequence
would retitle or clear it, a C1 CSI colour it, U+202E reverse the line), and a
message of wide characters must not wrap the progress line (each `\\r` redraw would
leave a torn copy above it)."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import re
import socket
import sys
import unicodedata
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from jobwire.client import Client
from service.store.embedded import EmbeddedStore
from tests.conftest import ServiceHandle, make_policy, start_service
from tests.helpers import cli_process, cli_result, free_port, run_environment
from tests.terminal import Terminal

WIDTH = 130
HOSTILE = "\x1b]0;PWNED\x07\x1b[2J\x9b31mred\nnext\u202elive"


def cells(row: str) -> int:
    return sum(2 if unicodedata.east_asian_width(c) in ("W", "F") else 1 for c in row)


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[ServiceHandle]:
    handle = await start_service(EmbeddedStore(tmp_path / "d", make_policy()))
    yield handle
    await handle.close()


@pytest.fixture
def terminal(tmp_path: Path) -> Iterator[Terminal]:
    term = Terminal(tmp_path, width=WIDTH)
    yield term
    term.close()


def watch(terminal: Terminal, service: ServiceHandle, job_id: str) -> None:
    terminal.start([sys.executable, "-m", "cli", "watch", job_id, "--target", service.target], {})


async def test_a_workers_message_cannot_drive_the_terminal(
    service: ServiceHandle, terminal: Terminal
) -> None:
    async with Client(service.target) as c:
        await c.create_job("GENERIC", job_id="tj")
        watch(terminal, service, "tj")
        title = terminal.title()
        await terminal.wait_for(lambda s: "0.0% QUEUED" in s)
        await c.report_progress("tj", 30, phase="\x1b[31mphase", message=HOSTILE)
        rows = await terminal.wait_for(lambda s: "30.0% RUNNING" in s)
        assert terminal.title() == title  # not PWNED
        line = next(r for r in rows if r.startswith("tj ["))
        shown = r"RUNNING \x1b[31mphase \x1b]0;PWNED\x07\x1b[2J\x9b31mred\nnext\u202elive"
        assert line.endswith(shown)
        assert [r for r in rows if r] == [line]  # not cleared, not broken into two lines
        await c.complete("tj")
        rows = await terminal.wait_for(lambda s: "[exit 0]" in s)
        assert any(r.startswith("tj [") and "100.0% SUCCEEDED" in r for r in rows)
        assert terminal.title() == title


async def test_wide_characters_do_not_wrap_the_progress_line(
    service: ServiceHandle, terminal: Terminal
) -> None:
    async with Client(service.target) as c:
        await c.create_job("GENERIC", job_id="wide")
        watch(terminal, service, "wide")
        await terminal.wait_for(lambda s: "QUEUED" in s)
        for percent in (10, 20, 30):
            await c.report_progress("wide", percent, message="进度消息" * 20 + "e\u0301")
            drawn_at = f"{percent}.0% RUNNING 进度"
            rows = await terminal.wait_for(lambda s: drawn_at in s)  # noqa: B023 (awaited here)
            drawn = [r for r in rows if r]
            assert len(drawn) == 1, drawn  # one line, redrawn in place
            assert cells(drawn[0]) <= WIDTH - 1
        await c.fail("wide", "E", "失败" * 40)
        rows = await terminal.wait_for(lambda s: "[exit 1]" in s)
        drawn = [r for r in rows if r]
        assert drawn[0].startswith("wide [") and "FAILED" in drawn[0]
        assert drawn[1] == "[exit 1]" and len(drawn) == 2


async def test_json_output_escapes_what_json_leaves_raw(service: ServiceHandle) -> None:
    """`jobs get` prints JSON; JSON escapes only C0 controls, so DEL, C1 controls and
    bidi controls are escaped too, and the JSON still reads back the same."""
    async with Client(service.target) as c:
        await c.create_job("GENERIC", job_id="js")
        await c.report_progress("js", 5, message="a\x7f\x9b31m\u202eb\u2028c 中")
    code, out, err = await cli_result("jobs", "get", "js", "--target", service.target)
    assert code == 0, err
    assert "\\u007f\\u009b31m\\u202eb\\u2028c 中" in out
    assert json.loads(out)["progress"]["message"] == "a\x7f\x9b31m\u202eb\u2028c 中"


async def test_piped_watch_prints_a_line_per_update(service: ServiceHandle) -> None:
    """Into a pipe or a file (`| tee`, a CI log) there is no line to redraw: each update
    is a line of its own, with no carriage returns and no padding."""
    async with Client(service.target) as c:
        await c.create_job("GENERIC", job_id="piped")
        await c.report_progress("piped", 25, message="at 25")
        proc = await cli_process("watch", "piped", "--target", service.target)
        assert proc.stdout is not None
        first = await asyncio.wait_for(proc.stdout.readline(), 30)
        await c.report_progress("piped", 50, message="at 50")
        await c.complete("piped")
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err
    assert b"\r" not in first + out
    lines = (first + out).decode().splitlines()
    bar = "piped [" + "#" * 20 + "." * 20 + "]  50.0% RUNNING at 50"
    assert lines == [
        "piped [" + "#" * 10 + "." * 30 + "]  25.0% RUNNING at 25",
        *([bar] if bar in lines else []),  # coalesced away when the complete came first
        "piped [" + "#" * 40 + "] 100.0% SUCCEEDED at 50",
    ]


async def test_jobwire_run_starts_all_three_and_ctrl_c_stops_them(
    tmp_path: Path, terminal: Terminal
) -> None:
    """The README's `make run` as a person runs it: in a terminal, stopped with Ctrl-C,
    which the terminal sends to the whole foreground process group (it reached the
    parent and its three children at once; the children now have sessions of their
    own). Everything stops, bridge first, with no traceback, exit status 0."""
    ports, env = run_environment(tmp_path)
    env["JOBWIRE_LOG_FORMAT"] = ""  # a terminal: text
    terminal.start([sys.executable, "-m", "cli", "run"], env)
    rows = await terminal.wait_for(
        lambda s: "bridge on http://" in s and "dashboard on http://" in s, timeout=60
    )
    assert any("jobwire service listening on" in r for r in rows)
    assert not any(r.startswith("{") for r in rows)  # text lines, not JSON, on a terminal
    for port in ports.values():
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
    terminal.send_keys("C-c")
    rows = await terminal.wait_for(lambda s: "[exit " in s, timeout=60)
    screen = "\n".join(rows)
    assert "[exit 0]" in screen and "Traceback" not in screen, screen
    # The bridge stops before the service, as on SIGTERM to run: Ctrl-C reached all
    # four at once, and the service stopped under the bridge's callbacks in flight.
    assert screen.index("bridge stopped") < screen.index("shutting down"), screen
    for port in ports.values():  # nothing listens any more
        with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=5):
            pass


async def test_ctrl_c_ends_a_watch_quietly(service: ServiceHandle, terminal: Terminal) -> None:
    """An operator stops `jobwire watch` with Ctrl-C: the progress line stays, the shell
    prompt starts on a line of its own, no traceback, exit status 130 (128 + SIGINT)."""
    async with Client(service.target) as c:
        await c.create_job("GENERIC", job_id="stop")
        await c.report_progress("stop", 40, message="halfway")
        watch(terminal, service, "stop")
        await terminal.wait_for(lambda s: "40.0% RUNNING halfway" in s)
        terminal.send_keys("C-c")
        rows = await terminal.wait_for(lambda s: "[exit " in s)
    screen = "\n".join(rows)
    assert "Traceback" not in screen and "KeyboardInterrupt" not in screen, screen
    assert rows[0].startswith("stop [") and "40.0% RUNNING halfway" in rows[0]
    # The shell's line starts a line of its own (the terminal may echo ^C before it).
    assert "[exit 130]" in rows, screen


async def test_watch_says_it_is_retrying_until_the_service_is_up(
    tmp_path: Path, terminal: Terminal
) -> None:
    """Started before the service (or with a wrong --target), `jobwire watch` says
    why it waits and when it tries again, instead of a blank screen; once the service
    is up, the progress line takes that line's place."""
    port = free_port()
    terminal.start(
        [sys.executable, "-m", "cli", "watch", "late", "--target", f"127.0.0.1:{port}"], {}
    )
    rows = await terminal.wait_for(lambda s: "retrying in" in s)
    line = next(r for r in rows if "retrying in" in r)
    assert re.match(r"retrying in \d+\.\d s: UNAVAILABLE: ", line), line
    handle = await start_service(
        EmbeddedStore(tmp_path / "d", make_policy()), grpc_addr=f"127.0.0.1:{port}"
    )
    try:
        async with Client(handle.target) as c:
            await c.create_job("GENERIC", job_id="late")
            await c.report_progress("late", 60, message="caught up")
            rows = await terminal.wait_for(lambda s: "60.0% RUNNING caught up" in s, timeout=30)
            assert [r for r in rows if r] == [next(r for r in rows if r.startswith("late ["))]
            await c.complete("late")
            await terminal.wait_for(lambda s: "[exit 0]" in s)
    finally:
        await handle.close()


async def test_watching_a_finished_job_shows_where_it_ended(service: ServiceHandle) -> None:
    """The replayed history (from sequence 0) gives its notes, but the line shows the
    job as it is: it used to step back through 30% and 60% after the SUCCEEDED snapshot."""
    async with Client(service.target) as c:
        await c.create_job("GENERIC", job_id="over")
        for percent in (30, 60):
            await c.report_progress("over", percent, message=f"at {percent}")
        await c.complete("over")
    code, out, err = await cli_result("watch", "over", "--target", service.target)
    assert code == 0, err
    assert out.splitlines() == ["over [" + "#" * 40 + "] 100.0% SUCCEEDED at 60"]


async def test_watching_a_job_that_failed_shows_why(service: ServiceHandle) -> None:
    """The line of a job that FAILED or was cancelled showed its last progress ("ocr
    Seite 3/28"), and its error was nowhere on screen: now the error stands there."""
    async with Client(service.target) as c:
        await c.create_job("GENERIC", job_id="broke")
        await c.report_progress("broke", 30, phase="ocr", message="Seite 3/28")
        await c.fail("broke", "OCR_TIMEOUT", "Timeout beim OCR-Dienst")
        await c.create_job("GENERIC", job_id="stopped")
        await c.report_progress("stopped", 30, phase="ocr", message="Seite 3/28")
        proc = await cli_process("watch", "stopped", "--target", service.target)
        assert proc.stdout is not None
        first = await asyncio.wait_for(proc.stdout.readline(), 30)
        await c.cancel_job("stopped", "operator said so")  # live: from the event
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    bar = "[" + "#" * 12 + "." * 28 + "]  30.0%"
    assert proc.returncode == 1, err
    assert (first + out).decode().splitlines() == [
        f"stopped {bar} RUNNING ocr Seite 3/28",
        f"stopped {bar} CANCELLED operator said so",  # the code says no more than the state
    ]
    code, out_text, err_text = await cli_result("watch", "broke", "--target", service.target)
    assert code == 1, err_text
    assert out_text.splitlines() == [f"broke {bar} FAILED OCR_TIMEOUT: Timeout beim OCR-Dienst"]


async def test_a_terminal_that_gives_no_size_still_gets_the_progress_line(
    service: ServiceHandle,
) -> None:
    """A pty whose size was never set (0 columns: `ssh -tt` from a script, some CI
    runners) made the progress line 0 cells wide: `watch` drew nothing but carriage
    returns. Such a terminal is taken as 80 columns (COLUMNS when set), as shutil does."""
    async with Client(service.target) as c:
        await c.create_job("GENERIC", job_id="sizeless")
        await c.report_progress("sizeless", 50, message="half")
        await c.complete("sizeless")
    main, sub = pty.openpty()  # no size given: 0 x 0
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cli", "watch", "sizeless", "--target", service.target,
            stdin=sub, stdout=sub, stderr=sub, env=env,
        )  # fmt: skip
        os.close(sub)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        out = os.read(main, 65536).decode()  # what it wrote is buffered in the pty
    finally:
        os.close(main)
    line = "sizeless [" + "#" * 40 + "] 100.0% SUCCEEDED half"
    drawn = out.removesuffix("\r\n").split("\r")  # each redraw: CR, then the whole line
    assert out.endswith("\r\n") and set(drawn) - {""} == {line.ljust(79)}, repr(out)


async def test_watch_stops_saying_it_is_retrying_once_it_is_back(
    tmp_path: Path, terminal: Terminal
) -> None:
    """After a restart of the service, the line kept saying `retrying in 2.7 s:
    UNAVAILABLE: …` until the job's next event (minutes, for a quiet step), though the
    watch was connected again: the job's line is drawn again as soon as it is back."""
    port = free_port()
    store = EmbeddedStore(tmp_path / "d", make_policy())
    handle = await start_service(store, grpc_addr=f"127.0.0.1:{port}")
    async with Client(handle.target) as c:
        await c.create_job("GENERIC", job_id="quiet")
        await c.report_progress("quiet", 40, phase="ocr", message="a long step")
    terminal.start([sys.executable, "-m", "cli", "watch", "quiet", "--target", handle.target], {})
    await terminal.wait_for(lambda s: "40.0% RUNNING ocr a long step" in s)
    await handle.close()
    await terminal.wait_for(lambda s: "retrying in" in s and "RUNNING" not in s)
    handle = await start_service(
        EmbeddedStore(tmp_path / "d", make_policy()), grpc_addr=f"127.0.0.1:{port}"
    )
    try:  # no event comes: the line says the job again once the watch is back
        rows = await terminal.wait_for(lambda s: "40.0% RUNNING ocr a long step" in s)
        assert not any("retrying" in row for row in rows), rows
    finally:
        await handle.close()
