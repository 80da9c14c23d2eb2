"""examples/python run as a user runs them: separate processes against a real
`jobwire serve` and `jobwire bridge` on free loopback ports; their output is checked.

The Secretary example is driven end to end: it creates the job, the test plays the
Secretary worker over HTTP (the bridge's callback), the service is restarted while the
example watches, and the example must print every event once and save the text.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from jobwire.client import Client, JobwireError
from jobwire.v1 import job_pb2
from tests.helpers import free_port, tool_missing

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "python"
WAIT = 30.0


@dataclass
class Stack:
    env: dict[str, str]
    grpc_target: str
    http_url: str
    service: asyncio.subprocess.Process
    bridge: asyncio.subprocess.Process

    async def restart_service(self) -> None:
        await _stop(self.service)
        self.service = await _start(["serve"], self.env)
        await _until_serving(self.grpc_target)


async def _start(args: list[str], env: dict[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli", *args, env=env, cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), WAIT)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def _until_serving(target: str) -> None:
    async with Client(target, timeout=1.0) as client:
        for _ in range(int(WAIT / 0.1)):
            try:
                await client.get_job("probe")
            except JobwireError as err:
                if err.code.name == "NOT_FOUND":
                    return
            await asyncio.sleep(0.1)  # polling a process that is starting, not a sync point
    raise AssertionError(f"service on {target} did not come up")


async def _until_http(url: str) -> None:
    async with aiohttp.ClientSession() as http:
        for _ in range(int(WAIT / 0.1)):
            try:
                async with http.get(url + "/healthz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)  # polling a process that is starting, not a sync point
    raise AssertionError(f"bridge on {url} did not come up")


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    grpc_port, http_port = free_port(), free_port()
    env = {
        **os.environ,
        "JOBWIRE_GRPC_ADDR": f"127.0.0.1:{grpc_port}",
        "JOBWIRE_SERVICE_TARGET": f"127.0.0.1:{grpc_port}",
        "JOBWIRE_HTTP_ADDR": f"127.0.0.1:{http_port}",
        "JOBWIRE_PUBLIC_URL": f"http://127.0.0.1:{http_port}",
        "JOBWIRE_DATA_DIR": str(tmp_path / "data"),
        "JOBWIRE_ENV_FILE": str(tmp_path / "none.env"),
        "JOBWIRE_METRICS_ADDR": "",
        "JOBWIRE_EVENT_FEED": "off",
        "JOBWIRE_SHUTDOWN_GRACE_SECONDS": "1",
    }
    for name in ("MONGODB_URI", "JOBWIRE_GRPC_TOKEN", "JOBWIRE_SERVICE_TLS_CA"):
        env.pop(name, None)
    service = await _start(["serve"], env)
    bridge = await _start(["bridge"], env)
    s = Stack(env, f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}", service, bridge)
    try:
        await _until_serving(s.grpc_target)
        await _until_http(s.http_url)
        yield s
    finally:
        await _stop(s.bridge)
        await _stop(s.service)


async def _example(name: str, *args: str, env: dict[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, str(EXAMPLES / name), *args, env=env, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def _line(proc: asyncio.subprocess.Process, pattern: str) -> list[str]:
    """Lines of stdout up to and including the first matching `pattern`."""
    assert proc.stdout is not None
    lines = []
    while True:
        raw = await asyncio.wait_for(proc.stdout.readline(), WAIT)
        assert raw, f"output ended before {pattern!r}: {lines}"
        lines.append(raw.decode().rstrip("\n"))
        if re.search(pattern, lines[-1]):
            return lines


async def test_secretary_example_renders_live_progress_across_a_restart(
    stack: Stack, tmp_path: Path
) -> None:
    handoff, text_out = tmp_path / "handoff.json", tmp_path / "text.md"
    handoff.write_text("{}")  # an earlier run's, readable by all: the token must not be
    handoff.chmod(0o644)
    proc = await _example(
        "secretary_job.py", "--handoff", str(handoff), "--save-text", str(text_out), env=stack.env
    )
    try:
        out = await _line(proc, r"^job .*: QUEUED$")
        assert re.fullmatch(r"created job [0-9a-f-]+", out[0])
        assert oct(handoff.stat().st_mode & 0o777) == "0o600"
        given = json.loads(handoff.read_text())
        url = given["callback_url"]
        assert url == f"{stack.http_url}/api/external/jobs/{given['job_id']}"
        auth = {"Authorization": f"Bearer {given['callback_token']}"}
        text = "# Vertrag\n\nSeite 1 …\n"
        async with aiohttp.ClientSession() as http:

            async def post(body: dict[str, object]) -> None:
                async with http.post(url, json=body, headers=auth) as resp:
                    assert resp.status == 200, await resp.text()

            await post({"phase": "uploading", "progress": 10, "process": {"id": "sec-1"}})
            await post({"phase": "extract_text", "progress": 42, "message": "Seite 12/28"})
            out += await _line(proc, r"42\.0% extract_text: Seite 12/28")
            await stack.restart_service()  # the example keeps watching through it
            # A worker's text reaches the terminal escaped: raw, an OSC sequence retitled
            # it and U+202E reversed the line.
            hostile = "Seite 26/28\x1b]0;pwned\x07\u202e"
            await post({"phase": "extract_text", "progress": 90, "message": hostile})
            await post(
                {"phase": "completed", "message": "fertig", "data": {"extracted_text": text}}
            )
        out += await _line(proc, r"^saved extracted_text\.md")
        assert await asyncio.wait_for(proc.wait(), WAIT) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    events = [line for line in out if line.startswith("#")]
    assert [int(line[1:4]) for line in events] == [1, 2, 3, 4]  # each once, in order
    assert "[##                  ]  10.0% uploading:" in events[0]
    assert events[-1].endswith("COMPLETED -> SUCCEEDED")
    assert events[2].endswith(r"90.0% extract_text: Seite 26/28\x1b]0;pwned\x07\u202e")
    assert not any(c in line for line in out for c in "\x1b\x07\u202e")
    assert any(line.startswith("artifact extracted_text.md:") for line in out)
    assert text_out.read_text() == text


async def test_video_worker_example_claims_reports_and_completes(stack: Stack) -> None:
    async with Client(stack.grpc_target) as client:
        good = await client.create_job(
            "VIDEO", video=job_pb2.Video(url="https://videos.invalid/a.mp4", title="Talk\u202e")
        )
        bad = await client.create_job("VIDEO", video=job_pb2.Video(url="ftp://nope"))
        proc = await _example("video_worker.py", "--max-jobs", "2", env=stack.env)
        out, err = await asyncio.wait_for(proc.communicate(), WAIT)
        assert proc.returncode == 0, err.decode()
        lines = out.decode().splitlines()
        g, b = good.job.id, bad.job.id
        assert lines == [
            f"claimed {g}: Talk\\u202e",  # a bidi mark (a title may hold one) escaped
            *(
                f"progress {g}: {p}% (sequence {s})"
                for p, s in ((25, 2), (50, 3), (75, 4), (100, 5))
            ),
            f"completed {g}",
            f"claimed {b}: ftp://nope",
            f"failed {b}: BAD_URL",
            "worker stopped after 2 job(s)",
        ]
        done = await client.get_job(g)
        assert done.state == job_pb2.JOB_STATE_SUCCEEDED
        assert done.progress.media_duration.seconds == 180
        assert [a.name for a in await client.list_artifacts(g)] == ["manifest.txt"]
        assert (await client.get_job(b)).error.code == "BAD_URL"


def _quickstart() -> list[str]:
    """The README's "Try it from another terminal" block, one command per item."""
    readme = (ROOT / "README.md").read_text()
    section = readme[
        readme.index("<!-- section:quickstart") : readme.index("<!-- /section:quickstart")
    ]
    block = re.findall(r"```sh\n(.*?)```", section, re.S)[-1]
    return [line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]


async def test_readme_quick_start_commands_work_as_written(stack: Stack) -> None:
    """Create with the CLI, report with the curl line, watch until the job ends: the
    README's commands with only the addresses (and the token it says to paste) filled in."""
    if shutil.which("curl") is None:
        tool_missing("curl is not installed (make test installs it)")
    create, token_line, curl, watch = _quickstart()
    assert token_line.startswith("TOKEN=...")
    http = stack.http_url.removeprefix("http://")
    jobwire = f"{sys.executable} -m cli"

    async def sh(command: str) -> str:
        proc = await asyncio.create_subprocess_shell(
            command.replace(".venv/bin/jobwire", jobwire).replace("localhost:8080", http),
            env=stack.env, cwd=ROOT, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(proc.communicate(), WAIT)
        assert proc.returncode == 0, (command, out)
        return out.decode()

    created = json.loads(await sh(create))
    assert created["job"]["id"] == "doc-1" and created["job"]["kind"] == "JOB_KIND_EXTRACTION"
    token = created["callbackToken"]
    reply = json.loads(await sh(f"TOKEN={token}\n{curl}"))
    assert reply == {"status": "ok", "kind": "progress", "jobId": "doc-1"}
    proc = await asyncio.create_subprocess_shell(
        watch.replace(".venv/bin/jobwire", jobwire), env=stack.env, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out = await _line(proc, r"42\.0% .*extract_text Seite 12/28")
        async with aiohttp.ClientSession() as session:
            done = {"phase": "completed", "message": "fertig", "data": {"extracted_text": "x"}}
            auth = {"Authorization": f"Bearer {token}"}
            url = f"{stack.http_url}/api/external/jobs/doc-1"
            async with session.post(url, json=done, headers=auth) as resp:
                assert resp.status == 200, await resp.text()
        out += await _line(proc, r"SUCCEEDED")
        assert await asyncio.wait_for(proc.wait(), WAIT) == 0  # the watch ends with the job
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.mark.parametrize("example", ["secretary_job.py", "video_worker.py"])
async def test_an_example_that_cannot_reach_the_service_says_so_in_one_line(
    example: str, tmp_path: Path
) -> None:
    """A wrong --target (the first thing a new user gets wrong) ended both examples in a
    JobwireError traceback; the Secretary's watch failing exited 2, argparse's status
    for a usage error, where its docstring says 1."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBWIRE_")}
    nowhere = f"127.0.0.1:{free_port()}"
    handoff = ["--handoff", str(tmp_path / "h.json")] if example == "secretary_job.py" else []
    proc = await _example(example, "--target", nowhere, *handoff, env=env)
    _, err = await asyncio.wait_for(proc.communicate(), WAIT)
    lines = err.decode().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, err.decode()
    assert re.fullmatch(rf"{example[:-3]}: UNAVAILABLE: .*{nowhere}.*", lines[0]), lines
