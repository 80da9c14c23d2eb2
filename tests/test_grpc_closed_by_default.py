"""The gRPC port is closed by default (DESIGN.md: "No endpoint is open by default"): a
service that other hosts can reach starts only when it authenticates its callers
(JOBWIRE_GRPC_TOKEN, or client certificates) or is told it may be open
(JOBWIRE_GRPC_INSECURE=1). On loopback it starts as before."""

from __future__ import annotations

import asyncio
import re
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import grpc
import pytest

from http_bridge.config import read_env_file
from jobwire.v1 import job_service_pb2, job_service_pb2_grpc
from service.store.embedded import EmbeddedStore
from tests.conftest import make_policy, start_service
from tests.helpers import WAIT, port_0_environment, run_environment, until
from tests.test_ops import _self_signed

LISTENING = re.compile(rb"jobwire service listening on \S+:(\d+) ")


def serve_environment(tmp_path: Path, **env: str) -> dict[str, str]:
    """`jobwire serve` on port 0 of `env`'s JOBWIRE_GRPC_ADDR, with no token, no TLS and
    no opt-out unless `env` sets them (the test runner's environment may hold any)."""
    base = port_0_environment(tmp_path)
    for name in list(base):
        if name.startswith(("JOBWIRE_GRPC_TOKEN", "JOBWIRE_GRPC_TLS_", "JOBWIRE_GRPC_INSECURE")):
            del base[name]
    return {**base, **env}


@asynccontextmanager
async def serving(env: dict[str, str]) -> AsyncIterator[tuple[int, bytes]]:
    """`jobwire serve` once it says it listens: its port and what it said so far."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli", "serve", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        said = b""
        async with asyncio.timeout(2 * WAIT):
            while not (found := LISTENING.search(said)):
                line = await proc.stdout.readline()
                assert line, said  # it exited
                said += line
        yield int(found.group(1)), said
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        await proc.wait()


@pytest.mark.parametrize("addr", ["0.0.0.0:0", "[::]:0"])
async def test_a_service_reachable_from_other_hosts_without_a_token_does_not_start(
    tmp_path: Path, addr: str
) -> None:
    """The image and the manifests listen on 0.0.0.0: without JOBWIRE_GRPC_TOKEN the
    service only warned, and anyone who reached the port could create, cancel, delete
    and read every job. It now stops before opening the store, in one line that names
    the variable, how to make one, and the two other ways."""
    env = serve_environment(tmp_path, JOBWIRE_GRPC_ADDR=addr)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli", "serve", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 2 * WAIT)
    assert proc.returncode == 1, (out, err)
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith(f"jobwire: JOBWIRE_GRPC_TOKEN is not set and JOBWIRE_GRPC_ADDR={addr}")
    for named in ("token_urlsafe(32)", "JOBWIRE_GRPC_TLS_CLIENT_CA", "JOBWIRE_GRPC_INSECURE=1"):
        assert named in line, line
    assert not (tmp_path / "data").exists(), "the store was opened"


@pytest.mark.parametrize("closed_by", ["token", "client certificates", "insecure on purpose"])
async def test_a_service_reachable_from_other_hosts_starts_when_told_how(
    tmp_path: Path, closed_by: str
) -> None:
    """A token or mTLS close the port; JOBWIRE_GRPC_INSECURE=1 opens it on purpose (a
    private network), and the service says so at start."""
    env = serve_environment(tmp_path, JOBWIRE_GRPC_ADDR="0.0.0.0:0")
    if closed_by == "token":
        env["JOBWIRE_GRPC_TOKEN"] = "s3cr3t"
    elif closed_by == "client certificates":
        cert, key = _self_signed(tmp_path)
        env |= {
            "JOBWIRE_GRPC_TLS_CERT": str(cert),
            "JOBWIRE_GRPC_TLS_KEY": str(key),
            "JOBWIRE_GRPC_TLS_CLIENT_CA": str(cert),
        }
    else:
        env["JOBWIRE_GRPC_INSECURE"] = "1"
    async with serving(env) as (port, said):
        warned = b"JOBWIRE_GRPC_INSECURE is on: the service listens on 0.0.0.0:0" in said
        assert warned == (closed_by == "insecure on purpose"), said
        if closed_by != "client certificates":
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = job_service_pb2_grpc.JobServiceStub(channel)
                call = stub.ListJobs(job_service_pb2.ListJobsRequest(page_size=1), timeout=WAIT)
                if closed_by == "token":
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await call
                    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
                else:
                    await call  # open, as asked


async def test_a_service_on_loopback_starts_without_a_token_as_before(tmp_path: Path) -> None:
    async with serving(serve_environment(tmp_path)) as (port, said):
        assert b"JOBWIRE_GRPC" not in said, said
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = job_service_pb2_grpc.JobServiceStub(channel)
            await stub.ListJobs(job_service_pb2.ListJobsRequest(page_size=1), timeout=WAIT)


@pytest.mark.parametrize(
    ("addr", "settings", "outcome"),
    [
        ("0.0.0.0:0", {}, "refused"),
        ("[::]:0", {}, "refused"),
        ("0.0.0.0:0", {"grpc_insecure": True}, "warned"),
        ("0.0.0.0:0", {"grpc_token": "t"}, "quiet"),
        ("127.0.0.1:0", {}, "quiet"),
        ("[::1]:0", {}, "quiet"),
        ("localhost:0", {}, "quiet"),
    ],
)
async def test_start_refuses_an_open_port_beyond_this_host(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    addr: str,
    settings: dict[str, object],
    outcome: str,
) -> None:
    """The same rule where code starts the service (service.server.start)."""
    caplog.set_level("WARNING", logger="jobwire")
    store = EmbeddedStore(tmp_path / "d", make_policy())
    if outcome == "refused":
        with pytest.raises(SystemExit, match="JOBWIRE_GRPC_TOKEN is not set"):
            await start_service(store, grpc_addr=addr, **settings)
        assert not (tmp_path / "d").exists(), "the store was opened"
        return
    handle = await start_service(store, grpc_addr=addr, **settings)
    try:
        assert ("JOBWIRE_GRPC_INSECURE is on" in caplog.text) == (outcome == "warned")
    finally:
        await handle.close()


@pytest.mark.parametrize("in_file", [False, True])
async def test_jobwire_run_beyond_loopback_closes_the_service_with_a_token_it_hands_on(
    tmp_path: Path, in_file: bool
) -> None:
    """`jobwire run` with JOBWIRE_GRPC_ADDR=0.0.0.0:…: its service refused to start for
    want of a token (or, before that, served open). run now generates one into the env
    file, as it does the bridge's secrets, and hands it to the service, the bridge and
    the dashboard; a token already in the file is the one they all get (the service read
    only its environment, so a token in the file closed nothing)."""
    ports, env = run_environment(tmp_path)
    env["JOBWIRE_GRPC_ADDR"] = f"0.0.0.0:{ports['grpc']}"
    env_file = Path(env["JOBWIRE_ENV_FILE"])
    if in_file:
        await asyncio.to_thread(env_file.write_text, "JOBWIRE_GRPC_TOKEN=site-token\n")
    run_env = serve_environment(tmp_path, **env)
    log_path = tmp_path / "run.log"
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cli", "run", env=run_env, stdout=log, stderr=log
        )
    try:

        def started() -> bool:  # each says so once it listens
            said = log_path.read_bytes()
            return b"bridge on http://" in said and b"dashboard on http://" in said

        await until(lambda: started() or proc.returncode is not None, timeout=60)
        assert started(), log_path.read_text()
        token = read_env_file(env_file)["JOBWIRE_GRPC_TOKEN"]
        assert (token == "site-token") == in_file
        said = log_path.read_text()
        assert ("generated JOBWIRE_GRPC_TOKEN into" in said) != in_file, said
        assert token not in said
        async with grpc.aio.insecure_channel(f"127.0.0.1:{ports['grpc']}") as channel:
            stub = job_service_pb2_grpc.JobServiceStub(channel)
            request = job_service_pb2.ListJobsRequest(page_size=1)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.ListJobs(request, timeout=WAIT)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            await stub.ListJobs(
                request, timeout=WAIT, metadata=(("authorization", f"Bearer {token}"),)
            )
        async with aiohttp.ClientSession() as http:  # both take the service's token
            for port in (ports["http"], ports["dashboard"]):
                async with http.get(f"http://127.0.0.1:{port}/readyz") as reply:
                    assert reply.status == 200, await reply.text()
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 30)
