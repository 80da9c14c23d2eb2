"""The `jobwire` CLI as a user runs it: a separate process talking gRPC to the service."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from jobwire.v1 import job_pb2
from service.store.embedded import EmbeddedStore
from tests.conftest import ServiceHandle, make_policy, start_service
from tests.helpers import cli_process, completed, create, progress

WAIT = 20.0


async def _wait_for_output(proc: asyncio.subprocess.Process, needle: bytes) -> bytes:
    """Reads the progress bar's output until `needle` shows up."""
    assert proc.stdout is not None
    seen = b""
    while needle not in seen:
        chunk = await asyncio.wait_for(proc.stdout.read(256), WAIT)
        assert chunk, f"watch ended before printing {needle!r}: {seen[-300:]!r}"
        seen += chunk
    return seen


async def test_jobs_create_get_list(grpc_service: ServiceHandle) -> None:
    proc = await cli_process(
        "jobs",
        "create",
        "--kind",
        "BATCH",
        "--id",
        "cli-1",
        "--label",
        "team=a",
        "--target",
        grpc_service.target,
    )
    out, err = await asyncio.wait_for(proc.communicate(), WAIT)
    assert proc.returncode == 0, err
    created = json.loads(out)
    assert created["job"]["id"] == "cli-1" and created["callbackToken"]
    proc = await cli_process("jobs", "list", "--label", "team=a", "--target", grpc_service.target)
    out, _ = await asyncio.wait_for(proc.communicate(), WAIT)
    assert [j["id"] for j in json.loads(out)["jobs"]] == ["cli-1"]
    proc = await cli_process("jobs", "get", "missing", "--target", grpc_service.target)
    _, err = await asyncio.wait_for(proc.communicate(), WAIT)
    assert proc.returncode == 1 and b"NOT_FOUND" in err


async def test_watch_follows_a_restart_and_exits_when_the_job_ends(tmp_path: Path) -> None:
    first = await start_service(EmbeddedStore(tmp_path, make_policy()))
    port = first.running.port
    await create(first.stub, job_pb2.JOB_KIND_GENERIC, "w1")
    await first.stub.ReportEvent(progress("w1", 25))
    watch = await cli_process("watch", "w1", "--target", first.target)
    await _wait_for_output(watch, b"25.0%")
    await first.close()  # the watcher sees UNAVAILABLE and keeps retrying

    second = await start_service(
        EmbeddedStore(tmp_path, make_policy()), grpc_addr=f"127.0.0.1:{port}"
    )
    try:
        await second.stub.ReportEvent(progress("w1", 75))
        await _wait_for_output(watch, b"75.0%")
        await second.stub.ReportEvent(completed("w1"))
        rest = await _wait_for_output(watch, b"SUCCEEDED")
        assert b"100.0%" in rest
        assert await asyncio.wait_for(watch.wait(), WAIT) == 0
    finally:
        if watch.returncode is None:
            watch.kill()
        await second.close()
