"""examples/node run against a real service process on a loopback port.

The example (JavaScript, @grpc/grpc-js + @grpc/proto-loader loading proto/) creates a
job, watches it, drops its stream on purpose, lets the job move on, resumes with
`from_sequence` and follows it to the end. Its RESULT line is checked against what
the service itself recorded; through a fault-injecting proxy, its reconnect path
(ABORTED, UNAVAILABLE) is checked too. Without node the tests skip, and fail under
CI=true.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jobwire.v1 import job_pb2, job_service_pb2, job_service_pb2_grpc
from tests.grpc_proxy import FaultProxy
from tests.helpers import WAIT, free_port, tool_missing

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "node"
TOKEN = "node-example-token"  # a test value for the service's JOBWIRE_GRPC_TOKEN
RUN_TIMEOUT = 90.0


def _unavailable(why: str) -> None:
    tool_missing(f"{why} (scripts/install-node-example.sh installs it)")


@pytest.fixture(scope="module")
def node() -> str:
    """The node binary, with the example's locked dependencies installed."""
    path = shutil.which("node")
    if path is None:
        _unavailable("node is not installed")
        raise AssertionError("unreachable")
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "install-node-example.sh")], check=True, timeout=300
    )
    if not (EXAMPLE / "node_modules" / "@grpc" / "grpc-js").is_dir():
        _unavailable("npm did not install examples/node's dependencies")
    return path


@dataclass
class Service:
    target: str
    proc: asyncio.subprocess.Process
    channel: grpc.aio.Channel
    stub: job_service_pb2_grpc.JobServiceAsyncStub


async def _start(data: Path, token: str = "") -> Service:
    port = free_port()
    env = dict(
        os.environ,
        JOBWIRE_GRPC_ADDR=f"127.0.0.1:{port}",
        JOBWIRE_DATA_DIR=str(data),
        JOBWIRE_METRICS_ADDR="127.0.0.1:0",
        JOBWIRE_LOG_FORMAT="text",
        JOBWIRE_GRPC_TOKEN=token,
    )
    env.pop("MONGODB_URI", None)
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "cli", "serve", env=env)
    target = f"127.0.0.1:{port}"
    channel = grpc.aio.insecure_channel(target)
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + 30
    while True:  # ready once its health service says SERVING (exempt from the token)
        try:
            reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=2)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                break
        except grpc.aio.AioRpcError:
            pass
        assert proc.returncode is None, "service process exited during start-up"
        assert time.monotonic() < deadline, "service process did not become healthy"
        await asyncio.sleep(0.1)  # polling a process that is starting, not a sync point
    return Service(target, proc, channel, job_service_pb2_grpc.JobServiceStub(channel))


async def _stop(service: Service) -> None:
    await service.channel.close()
    if service.proc.returncode is None:
        service.proc.send_signal(signal.SIGTERM)
    await asyncio.wait_for(service.proc.wait(), WAIT)


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[Service]:
    svc = await _start(tmp_path / "data")
    yield svc
    await _stop(svc)


@pytest.fixture
async def token_service(tmp_path: Path) -> AsyncIterator[Service]:
    svc = await _start(tmp_path / "data", token=TOKEN)
    yield svc
    await _stop(svc)


async def _run_example(node: str, target: str, token: str = "") -> tuple[int, str, str]:
    env = dict(os.environ, JOBWIRE_SERVICE_TARGET=target, JOBWIRE_GRPC_TOKEN=token)
    env.pop("JOBWIRE_SERVICE_TLS_CA", None)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = await asyncio.create_subprocess_exec(
            node, str(EXAMPLE / "watch_job.js"), env=env, stdout=out, stderr=err
        )
        try:
            await asyncio.wait_for(proc.wait(), RUN_TIMEOUT)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            out.seek(0)
            err.seek(0)
            stdout, stderr = out.read().decode(), err.read().decode()
            if proc.returncode != 0:  # a timeout included: show what the example said
                print(f"example stdout:\n{stdout}\nexample stderr:\n{stderr}")
    assert proc.returncode is not None
    return proc.returncode, stdout, stderr


def _result(stdout: str) -> dict[str, Any]:
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, stdout
    result: dict[str, Any] = json.loads(lines[0].removeprefix("RESULT "))
    return result


async def _check_against_service(stub: Any, result: dict[str, Any], token: str = "") -> None:
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    job = await stub.GetJob(job_service_pb2.GetJobRequest(id=result["job_id"]), metadata=metadata)
    assert job.state == job_pb2.JOB_STATE_SUCCEEDED
    assert job.labels["source"] == "examples/node"
    listed = await stub.ListJobEvents(
        job_service_pb2.ListJobEventsRequest(job_id=job.id), metadata=metadata
    )
    recorded = [e.sequence for e in listed.events]
    # Every event the service recorded was seen by the example exactly once, in order.
    assert result["sequences"] == recorded == list(range(1, job.sequence + 1))
    assert result["sequence"] == job.sequence


async def test_node_example_resumes_after_a_disconnect_without_gap_or_duplicate(
    node: str, service: Service
) -> None:
    code, out, err = await _run_example(node, service.target)
    assert code == 0, f"stdout:\n{out}\nstderr:\n{err}"
    result = _result(out)
    assert result["state"] == "JOB_STATE_SUCCEEDED"
    # Two streams: the second resumed after the last sequence the first one saw...
    assert result["streams"] == 2
    assert len(result["resumed_from"]) == 1
    resumed_from = result["resumed_from"][0]
    # ...and the events reported while no stream was open came by replay, not lost.
    assert result["missed_while_disconnected"]
    assert min(result["missed_while_disconnected"]) == resumed_from + 1
    assert "disconnect: cancelled stream 1" in out
    assert f"stream 2: resuming with from_sequence={resumed_from}" in out
    for missed in result["missed_while_disconnected"]:
        assert f"stream 2: event sequence={missed} EVENT_TYPE_PROGRESS" in out
    assert "EVENT_TYPE_COMPLETED" in out
    await _check_against_service(service.stub, result)


async def test_node_example_sends_the_bearer_token(node: str, token_service: Service) -> None:
    code, out, err = await _run_example(node, token_service.target, token=TOKEN)
    assert code == 0, f"stdout:\n{out}\nstderr:\n{err}"
    await _check_against_service(token_service.stub, _result(out), token=TOKEN)

    code, out, err = await _run_example(node, token_service.target, token="wrong")
    assert code == 1
    assert "UNAUTHENTICATED" in err and "RESULT" not in out


async def test_node_example_reconnects_after_aborted_and_unavailable_streams(
    node: str, service: Service
) -> None:
    """Unplanned stream ends (a watcher that fell behind, a dropped connection) are
    resumed from the last sequence seen, with backoff: still each event once, in order."""
    proxy = await FaultProxy(service.target).start()
    try:
        # Stream 1 is the example's own (it cancels it); stream 2 is cut after the
        # snapshot and one replayed event, stream 3 right after its snapshot.
        proxy.abort_next_stream("WatchJob", after=1000)
        proxy.abort_next_stream("WatchJob", after=2, code=grpc.StatusCode.ABORTED)
        proxy.abort_next_stream("WatchJob", after=1, code=grpc.StatusCode.UNAVAILABLE)
        code, out, err = await _run_example(node, proxy.target)
    finally:
        await proxy.close()
    assert code == 0, f"stdout:\n{out}\nstderr:\n{err}"
    result = _result(out)
    assert result["streams"] == 4
    first_resume = result["resumed_from"][0]
    assert result["resumed_from"] == [first_resume, first_resume + 1, first_resume + 1]
    assert "stream 2: ABORTED: proxy: watcher fell too far behind; reconnecting in" in out
    assert "stream 3: UNAVAILABLE: proxy: watcher fell too far behind; reconnecting in" in out, out
    await _check_against_service(service.stub, result)
