"""Small builders and waiters shared by the tests."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NoReturn

import grpc
import pytest

from jobwire.v1 import job_pb2, job_service_pb2, job_service_pb2_grpc

WAIT = 10.0  # seconds any single expected event may take before a test fails


async def create(
    stub: job_service_pb2_grpc.JobServiceAsyncStub,
    kind: job_pb2.JobKind.ValueType = job_pb2.JOB_KIND_GENERIC,
    job_id: str = "",
    **labels: str,
) -> job_service_pb2.CreateJobResponse:
    """A job of `kind` with these labels; a VIDEO job gets a video URL, which CreateJob
    requires of one."""
    job = job_pb2.Job(kind=kind)
    job.labels.update(labels)
    if kind == job_pb2.JOB_KIND_VIDEO:
        job.video.CopyFrom(sample_video(job_id))
    return await stub.CreateJob(job_service_pb2.CreateJobRequest(job=job, job_id=job_id))


def sample_video(name: str = "") -> job_pb2.Video:
    """A video for a test's VIDEO job (CreateJob refuses one without `video.url`)."""
    return job_pb2.Video(url=f"https://videos.example.invalid/{name or 'v'}.mp4")


def progress(
    job_id: str, percent: float, key: str = "", message: str = ""
) -> job_service_pb2.ReportEventRequest:
    return job_service_pb2.ReportEventRequest(
        job_id=job_id,
        idempotency_key=key or f"p-{percent}",
        progress=job_pb2.Progress(percent=percent, phase="work", message=message),
    )


def completed(
    job_id: str, key: str = "done", output_key: str = "out/x"
) -> job_service_pb2.ReportEventRequest:
    return job_service_pb2.ReportEventRequest(
        job_id=job_id, idempotency_key=key, completed=job_pb2.Result(output_key=output_key)
    )


def failed(
    job_id: str, key: str = "fail", message: str = "boom"
) -> job_service_pb2.ReportEventRequest:
    return job_service_pb2.ReportEventRequest(
        job_id=job_id, idempotency_key=key, failed=job_pb2.JobError(code="E", message=message)
    )


async def read(call: Any, timeout: float = WAIT) -> Any:
    """The stream's next message (grpc.aio.EOF at its end), or a failure after `timeout`."""
    return await asyncio.wait_for(call.read(), timeout)


async def read_all(call: Any, timeout: float = WAIT) -> list[Any]:
    """Every message until the server ends the stream."""
    items = []
    while (item := await read(call, timeout)) is not grpc.aio.EOF:
        items.append(item)
    return items


async def until(predicate: Callable[[], bool], timeout: float = WAIT) -> None:
    """Polls a cheap condition that no event announces (e.g. how many watchers the
    service has subscribed), until it holds or `timeout` passes."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)  # the polling interval of this waiter


async def eventually(
    check: Callable[[], Awaitable[bool]], timeout: float = WAIT, what: str = "condition"
) -> None:
    """`until` for a condition read over the network (an RPC, a query): polls it until
    it holds, or fails naming `what` after `timeout`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        assert loop.time() < deadline, f"{what} not within {timeout}s"
        await asyncio.sleep(0.01)  # the polling interval of this waiter


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tool_missing(why: str) -> NoReturn:
    """A tool a test needs is not installed: the test fails under CI=true (CI installs
    every tool the suite uses) and is skipped elsewhere, saying why."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(why)
    pytest.skip(why)


async def cli_process(*args: str, env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
    """`jobwire ARGS` as its own process, stdout and stderr piped."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cli",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )


async def cli_result(
    *args: str, env: dict[str, str] | None = None, timeout: float = 2 * WAIT
) -> tuple[int, str, str]:
    """`jobwire ARGS` run to its end: exit status, stdout, stderr."""
    proc = await cli_process(*args, env=env)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def run_environment(tmp_path: Path) -> tuple[dict[str, int], dict[str, str]]:
    """Free loopback ports (grpc, http, dashboard) and the environment that puts
    `jobwire run`'s three processes on them, with data and jobwire.env in `tmp_path`
    and no metrics port."""
    ports = {name: free_port() for name in ("grpc", "http", "dashboard")}
    return ports, {
        "JOBWIRE_GRPC_ADDR": f"127.0.0.1:{ports['grpc']}",
        "JOBWIRE_SERVICE_TARGET": f"127.0.0.1:{ports['grpc']}",
        "JOBWIRE_HTTP_ADDR": f"127.0.0.1:{ports['http']}",
        "JOBWIRE_DASHBOARD_ADDR": f"127.0.0.1:{ports['dashboard']}",
        "JOBWIRE_METRICS_ADDR": "",
        "JOBWIRE_DATA_DIR": str(tmp_path / "data"),
        "JOBWIRE_ENV_FILE": str(tmp_path / "jobwire.env"),
    }


def port_0_environment(tmp_path: Path, **env: str) -> dict[str, str]:
    """This process's environment for a `jobwire serve|bridge|dashboard` of a test:
    every address on port 0 (any free one), data and env file in `tmp_path`, no
    metrics port, a dashboard token; `env` on top."""
    return {
        **os.environ,
        "JOBWIRE_ENV_FILE": str(tmp_path / "none.env"),
        "JOBWIRE_DATA_DIR": str(tmp_path / "data"),
        "JOBWIRE_GRPC_ADDR": "127.0.0.1:0",
        "JOBWIRE_HTTP_ADDR": "127.0.0.1:0",
        "JOBWIRE_DASHBOARD_ADDR": "127.0.0.1:0",
        "JOBWIRE_METRICS_ADDR": "",
        "JOBWIRE_DASHBOARD_TOKEN": "a-token-for-this-test",
        **env,
    }
