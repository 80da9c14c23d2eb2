"""Stopping the processes an operator runs: SIGTERM to `jobwire bridge` while a
callback is in flight, and what `jobwire run` says when one of its children dies."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import os
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import grpc
import pytest

from jobwire.v1 import job_pb2, job_service_pb2, job_service_pb2_grpc
from service.server import STORE_CLOSE_SECONDS, SWEEPER_STOP_SECONDS
from service.store.embedded import EmbeddedStore
from service.store.mongo import MongoStore
from tests.bridge_harness import BATCH_SECRET, TEST_CONFIG, VIDEO_AUTH, running_bridge
from tests.bridge_process import BridgeProcess, cli_bridge_process
from tests.conftest import ServiceHandle, make_policy, start_service
from tests.dashboard_harness import TOKEN as DASHBOARD_TOKEN
from tests.dashboard_harness import running_dashboard
from tests.grpc_proxy import FaultProxy
from tests.helpers import (
    WAIT,
    create,
    eventually,
    free_port,
    progress,
    run_environment,
    until,
)
from tests.tcp_cutter import TcpCutter


@pytest.fixture
async def gated(tmp_path: Path) -> AsyncIterator[tuple[ServiceHandle, FaultProxy]]:
    """The service, and a proxy in front of it that can hold calls in flight."""
    handle = await start_service(EmbeddedStore(tmp_path / "data", make_policy()))
    proxy = await FaultProxy(handle.target).start()
    yield handle, proxy
    proxy.gate.set()
    await proxy.close()
    await handle.close()


async def _callback_in_flight(
    bridge: BridgeProcess, handle: ServiceHandle, proxy: FaultProxy, job_id: str
) -> asyncio.Task[tuple[int, str]]:
    """A batch callback posted while the proxy holds the bridge's call to the service;
    returns once the call waits at the proxy."""
    await create(handle.stub, job_pb2.JOB_KIND_BATCH, job_id)
    proxy.gate.clear()
    body = {
        "jobId": job_id,
        "status": "success",
        "outputKey": "o/x",
        "callbackSecret": BATCH_SECRET,
    }

    async def post() -> tuple[int, str]:
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"{bridge.url}/api/batch-callback", json=body) as reply,
        ):
            return reply.status, await reply.text()

    task = asyncio.create_task(post())
    await until(lambda: proxy.waiting >= 1)
    return task


async def _refused(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except (ConnectionRefusedError, ConnectionResetError):  # reset: closed as it connected
        return True
    writer.close()
    return False


async def test_sigterm_lets_the_bridge_finish_a_callback_in_flight(
    gated: tuple[ServiceHandle, FaultProxy], tmp_path: Path
) -> None:
    """A rolling deploy sends the bridge SIGTERM while a worker's callback waits for
    its commit: the bridge refuses new connections at once, answers the callback (200,
    committed) and exits 0 saying so. It used to die on the spot (no SIGTERM handler):
    the worker saw a reset connection for a callback that may well have committed."""
    handle, proxy = gated
    async with cli_bridge_process(proxy.target, tmp_path) as bridge:
        task = await _callback_in_flight(bridge, handle, proxy, "drain-1")
        assert bridge.proc.pid is not None
        bridge.proc.send_signal(signal.SIGTERM)
        await until(lambda: "bridge stopping" in bridge.log())
        assert await _refused(bridge.port)  # no new work while draining
        proxy.gate.set()
        status, text = await asyncio.wait_for(task, WAIT)
        assert status == 200, text
        assert await asyncio.wait_for(bridge.proc.wait(), WAIT) == 0, bridge.log()
    job = await handle.stub.GetJob(job_service_pb2.GetJobRequest(id="drain-1"))
    assert job.state == job_pb2.JOB_STATE_SUCCEEDED
    last = bridge.log().strip().splitlines()[-1]
    assert "bridge stopped" in last, bridge.log()
    assert "Traceback" not in bridge.log()


async def test_a_callback_still_in_flight_after_the_grace_gets_no_answer_at_all(
    gated: tuple[ServiceHandle, FaultProxy], tmp_path: Path
) -> None:
    """Past JOBWIRE_SHUTDOWN_GRACE_SECONDS the bridge closes the connection of a
    callback it could not finish without answering it: never a 500, never a 2xx for
    an event that was not committed; the worker retries it elsewhere."""
    handle, proxy = gated
    env = {"JOBWIRE_SHUTDOWN_GRACE_SECONDS": "0.2"}
    async with cli_bridge_process(proxy.target, tmp_path, **env) as bridge:
        task = await _callback_in_flight(bridge, handle, proxy, "drain-2")
        bridge.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(bridge.proc.wait(), WAIT) == 0, bridge.log()
        with pytest.raises(aiohttp.ClientError):
            await asyncio.wait_for(task, WAIT)
    job = await handle.stub.GetJob(job_service_pb2.GetJobRequest(id="drain-2"))
    assert job.state == job_pb2.JOB_STATE_QUEUED
    assert "Traceback" not in bridge.log() and " 500 " not in bridge.log(), bridge.log()


async def test_sigterm_lets_the_dashboard_finish_a_request_within_the_grace(
    gated: tuple[ServiceHandle, FaultProxy],
) -> None:
    """README "Deploy": on SIGTERM each part finishes what is in flight within
    JOBWIRE_SHUTDOWN_GRACE_SECONDS (10). The dashboard gave its requests a fixed 2 s (4 s
    in all with aiohttp's second wait): an
    operator's request whose call to the service took longer (a Cancel, a page, a
    download) lost its connection, unanswered. Its open streams still end at once
    (tests/test_dashboard.py::test_open_streams_do_not_hold_up_a_stop)."""
    handle, proxy = gated
    await create(handle.stub, job_pb2.JOB_KIND_GENERIC, "dash-drain")
    async with running_dashboard(proxy.target) as dash, aiohttp.ClientSession() as http:
        assert dash.proc is not None
        proxy.gate.clear()
        bearer = {"Authorization": f"Bearer {DASHBOARD_TOKEN}"}

        async def read() -> tuple[int, str]:
            async with http.get(f"{dash.url}/api/jobs/dash-drain", headers=bearer) as reply:
                return reply.status, await reply.text()

        before = proxy.calls["GetJob"]
        task = asyncio.create_task(read())
        await until(lambda: proxy.calls["GetJob"] > before)  # held at the proxy
        dash.proc.send_signal(signal.SIGTERM)
        await eventually(lambda: _refused(dash.port), what="the dashboard closing its port")
        # Past what the dashboard's fixed 2 s allowed (aiohttp waits for the handler,
        # then as long again for it to end once cancelled), within the 10 s grace.
        await asyncio.sleep(4.5)
        assert not task.done()
        proxy.gate.set()
        status, text = await asyncio.wait_for(task, WAIT)
        assert status == 200 and "dash-drain" in text, text
        assert await asyncio.to_thread(dash.proc.wait, WAIT) == 0


async def test_a_callback_held_past_the_grace_is_cut_at_the_grace_not_twice_it(
    gated: tuple[ServiceHandle, FaultProxy], tmp_path: Path
) -> None:
    """JOBWIRE_SHUTDOWN_GRACE_SECONDS is how long SIGTERM waits for callbacks in flight.
    aiohttp's shutdown_timeout, which the bridge set to the grace, waits for a handler
    and then as long again once it is told to stop: the bridge stopped after twice the
    grace (20 s by default, compose's whole stop_grace_period)."""
    handle, proxy = gated
    grace = 2.0
    env = {"JOBWIRE_SHUTDOWN_GRACE_SECONDS": str(grace)}
    async with cli_bridge_process(proxy.target, tmp_path, **env) as bridge:
        task = await _callback_in_flight(bridge, handle, proxy, "drain-3")
        loop = asyncio.get_running_loop()
        began = loop.time()
        bridge.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(bridge.proc.wait(), 4 * grace) == 0, bridge.log()
        took = loop.time() - began
        with pytest.raises(aiohttp.ClientError):  # closed unanswered, as before
            await asyncio.wait_for(task, WAIT)
    assert grace <= took < grace + 1.0, f"stopped {took:.1f} s after SIGTERM"
    assert "Traceback" not in bridge.log() and " 500 " not in bridge.log(), bridge.log()


async def test_a_dashboard_request_held_past_the_grace_is_cut_at_the_grace(
    gated: tuple[ServiceHandle, FaultProxy],
) -> None:
    """As the bridge's: a request still waiting on the service when the grace ends is
    closed then, not after aiohttp's second wait (twice the grace)."""
    handle, proxy = gated
    await create(handle.stub, job_pb2.JOB_KIND_GENERIC, "dash-cut")
    grace = 2.0
    env = {"JOBWIRE_SHUTDOWN_GRACE_SECONDS": str(grace)}
    async with running_dashboard(proxy.target, **env) as dash, aiohttp.ClientSession() as http:
        assert dash.proc is not None
        proxy.gate.clear()
        bearer = {"Authorization": f"Bearer {DASHBOARD_TOKEN}"}
        before = proxy.calls["GetJob"]
        task = asyncio.create_task(http.get(f"{dash.url}/api/jobs/dash-cut", headers=bearer))
        await until(lambda: proxy.calls["GetJob"] > before)  # held at the proxy
        loop = asyncio.get_running_loop()
        began = loop.time()
        dash.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(dash.proc.wait, 4 * grace) == 0
        took = loop.time() - began
        with pytest.raises(aiohttp.ClientError):
            await asyncio.wait_for(task, WAIT)
        proxy.gate.set()
    assert grace <= took < grace + 1.0, f"stopped {took:.1f} s after SIGTERM"


def _children(pid: int) -> list[int]:
    """The child processes of `pid` (Linux /proc)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()]


def _cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


async def _start_run(
    tmp_path: Path, **extra: str
) -> tuple[asyncio.subprocess.Process, Path, dict[str, int]]:
    ports, run_env = run_environment(tmp_path)
    env = {
        **os.environ,
        **run_env,
        "JOBWIRE_LOG_FORMAT": "text",
        "BATCH_CALLBACK_SECRET": BATCH_SECRET,
        **extra,
    }
    log_path = tmp_path / "run.log"
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cli", "run", env=env, stdout=log, stderr=log
        )
    await until(
        lambda: (
            b"dashboard on http://" in log_path.read_bytes()
            and b"bridge on http://" in log_path.read_bytes()
        ),
        timeout=60,
    )
    return proc, log_path, ports


async def test_jobwire_run_fails_naming_the_child_that_died(tmp_path: Path) -> None:
    """The service of `jobwire run` killed (the OOM killer's SIGKILL): run stops the
    bridge and the dashboard and exits 137 saying which child died and how. It exited
    0, silently: max() of the children's codes, where a signal's death is negative."""
    proc, log_path, _ = await _start_run(tmp_path)
    try:
        service = next(p for p in _children(proc.pid) if "serve" in _cmdline(p))
        os.kill(service, signal.SIGKILL)
        code = await asyncio.wait_for(proc.wait(), 3 * WAIT)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    log = log_path.read_text(errors="replace")
    assert code == 128 + signal.SIGKILL, log
    assert "jobwire: the service exited (killed by SIGKILL); stopped the others" in log, log


async def _run_to_its_end(env: dict[str, str]) -> tuple[int, str, float]:
    """`jobwire run` with `env` that must exit by itself within WAIT: status, stderr and
    how long it took."""
    loop = asyncio.get_running_loop()
    began = loop.time()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cli",
        "run",
        env={**os.environ, "JOBWIRE_LOG_FORMAT": "text", **env},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        _, err = await asyncio.wait_for(proc.communicate(), WAIT)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, err.decode(errors="replace"), loop.time() - began


async def test_jobwire_run_says_at_once_that_its_service_exited_before_it_was_healthy(
    tmp_path: Path,
) -> None:
    """A service that cannot start (its data directory is a file) exits at once:
    `jobwire run` said only "the service did not become healthy", with neither the
    service's exit status nor where to look. It names both and exits with that status."""
    _, run_env = run_environment(tmp_path)
    (tmp_path / "data").write_text("a file where the data directory should be")
    code, err, _ = await _run_to_its_end(run_env)
    assert code == 1, err
    assert (
        "jobwire: the service exited (status 1) before it became healthy; its log above"
        " says why" in err
    ), err
    assert "cannot use the data directory" in err, err


async def test_jobwire_run_waits_for_its_service_as_long_as_the_setting_says(
    tmp_path: Path,
) -> None:
    """The service runs but never answers its health check (here: run checks a port
    nobody listens on). `jobwire run` gave it a fixed 30 s, too short for a large
    embedded store's recovery on a slow machine; the bound is now
    JOBWIRE_SERVICE_START_TIMEOUT_SECONDS, and run stops the service when it passes."""
    _, run_env = run_environment(tmp_path)
    code, err, took = await _run_to_its_end(
        {
            **run_env,
            "JOBWIRE_SERVICE_TARGET": f"127.0.0.1:{free_port()}",
            "JOBWIRE_SERVICE_START_TIMEOUT_SECONDS": "1",
        }
    )
    assert code == 1, err
    assert (
        "jobwire: the service did not become healthy within 1 s"
        " (JOBWIRE_SERVICE_START_TIMEOUT_SECONDS); stopped it" in err
    ), err
    assert took >= 1, f"{took:.1f} s"
    # Stopped, not left running: the data directory's lock is free. (Its "service
    # stopped" line is not asserted: a service still starting ends by the SIGTERM.)
    store = EmbeddedStore(tmp_path / "data", make_policy())
    await store.start()
    await store.close()


async def test_jobwire_run_refuses_a_service_target_it_could_never_reach(tmp_path: Path) -> None:
    """JOBWIRE_SERVICE_TARGET="" (an unfilled template value) or a port past 65535: the
    health check could never pass, so `jobwire run` waited out its whole start bound
    (now 300 s) before saying the service "did not become healthy", though it was.
    Refused at once, naming the variable, as the bridge refuses it; nothing started."""
    _, run_env = run_environment(tmp_path)
    for target, said in (("", "got ''"), ("127.0.0.1:99999", "port must be 1-65535")):
        code, err, _ = await _run_to_its_end({**run_env, "JOBWIRE_SERVICE_TARGET": target})
        assert code == 1, err
        assert "jobwire: JOBWIRE_SERVICE_TARGET: target " in err and said in err, err
        assert "jobwire.server" not in err, err  # no service was started


async def test_jobwire_run_refuses_an_address_another_service_already_answers_on(
    tmp_path: Path,
) -> None:
    """A second `jobwire run` on the first one's JOBWIRE_GRPC_ADDR: the first service
    answered the health check, so the second started its bridge and dashboard against
    that service, then its own service failed to bind and it stopped everything with
    "the service exited (status 1)". Refused before anything starts, naming the address;
    the first run is left as it was."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, log_path, ports = await _start_run(tmp_path / "a")
    try:
        _, run_env = run_environment(tmp_path / "b")
        taken = f"127.0.0.1:{ports['grpc']}"
        code, err, _ = await _run_to_its_end(
            {**run_env, "JOBWIRE_GRPC_ADDR": taken, "JOBWIRE_SERVICE_TARGET": taken}
        )
        assert code == 1, err
        assert (
            f"jobwire: a service already answers at {taken} (another jobwire run or"
            " serve?); started nothing: stop it, or give this run another"
            " JOBWIRE_GRPC_ADDR" in err
        ), err
        # Nothing of the second run started: no child's log line, no data directory.
        assert "jobwire." not in err, err
        assert not (tmp_path / "b" / "data").exists()
        assert first.returncode is None and len(_children(first.pid)) == 3
    finally:
        first.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(first.wait(), 3 * WAIT) == 0, log_path.read_text()


def _running(pid: int) -> bool:
    """Alive and not a zombie waiting for a reaper (an orphan's is PID 1)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def test_jobwire_run_killed_takes_its_children_with_it(tmp_path: Path) -> None:
    """`jobwire run` killed with SIGKILL (the OOM killer, kill -9 by hand) left the
    service, bridge and dashboard running on their ports, the data directory locked:
    the next `make run` could not start. Each child now gets SIGTERM when run dies,
    and stops as it does on a stop."""
    proc, log_path, _ = await _start_run(tmp_path)
    children = _children(proc.pid)
    try:
        assert len(children) == 3, children
        # Each in a session of its own: a terminal's Ctrl-C (SIGINT to the foreground
        # group) reaches run alone, which stops the bridge and the dashboard before the
        # service; it reached all four at once.
        assert all(os.getsid(pid) == pid != os.getsid(proc.pid) for pid in children)
        proc.kill()
        await proc.wait()
        await until(lambda: not any(_running(pid) for pid in children), timeout=3 * WAIT)
    finally:
        for pid in children:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
    log = log_path.read_text(errors="replace")
    assert "service stopped" in log and "bridge stopped" in log, log


@pytest.mark.parametrize("store_kind", ["embedded", "mongo"])
async def test_sigterm_to_jobwire_run_under_callback_load_keeps_every_acknowledged_callback(
    store_kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Workers post callbacks (each to a job of its own) while `jobwire run` gets
    SIGTERM: run exits 0 with each part saying it stopped; every callback was answered
    200 (and is SUCCEEDED after a restart), 503 with Retry-After, or had its connection
    closed unanswered: never a 500, never a 2xx for an event the restart lacks."""
    extra: dict[str, str] = {}
    database = f"run_{os.urandom(4).hex()}"
    if store_kind == "mongo":
        extra = {
            "MONGODB_URI": request.getfixturevalue("mongo_uri"),
            "JOBWIRE_MONGODB_DB": database,
        }
    proc, log_path, ports = await _start_run(tmp_path, **extra)
    answers: list[tuple[str, str | tuple[int, str | None]]] = []
    acked = asyncio.Event()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{ports['grpc']}")
    stub = job_service_pb2_grpc.JobServiceStub(channel)

    async def worker(http: aiohttp.ClientSession, w: int) -> None:
        for n in itertools.count():
            job_id = f"w{w}-{n}"
            try:
                await create(stub, job_pb2.JOB_KIND_BATCH, job_id)
            except grpc.aio.AioRpcError:
                return  # the service is stopping
            body = {
                "jobId": job_id,
                "status": "success",
                "outputKey": "o",
                "callbackSecret": BATCH_SECRET,
            }
            try:
                async with http.post(
                    f"http://127.0.0.1:{ports['http']}/api/batch-callback", json=body
                ) as reply:
                    await reply.read()
                    answers.append((job_id, (reply.status, reply.headers.get("Retry-After"))))
            except aiohttp.ClientError as err:
                answers.append((job_id, type(err).__name__))
                return
            if sum(1 for _, a in answers if a == (200, None)) >= 100:
                acked.set()

    try:
        async with aiohttp.ClientSession() as http:
            workers = [asyncio.create_task(worker(http, w)) for w in range(8)]
            await asyncio.wait_for(acked.wait(), 6 * WAIT)
            proc.send_signal(signal.SIGTERM)
            code = await asyncio.wait_for(proc.wait(), 6 * WAIT)
            await asyncio.wait_for(asyncio.gather(*workers), 3 * WAIT)
    finally:
        await channel.close()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    log = log_path.read_text(errors="replace")
    assert code == 0, log
    assert "Traceback" not in log, log
    assert "bridge stopped" in log and "dashboard stopped" in log, log
    assert "service stopped" in log.strip().splitlines()[-1], log  # the last to stop
    statuses = {a if isinstance(a, str) else a[0] for _, a in answers}
    print(Counter(a if isinstance(a, str) else a[0] for _, a in answers))
    assert statuses <= {
        200,
        503,
        "ServerDisconnectedError",
        "ClientOSError",
        "ClientConnectorError",
    }, statuses
    assert all(a[1] for _, a in answers if isinstance(a, tuple) and a[0] == 503)  # Retry-After

    if store_kind == "embedded":
        store: EmbeddedStore | MongoStore = EmbeddedStore(tmp_path / "data", make_policy())
    else:
        store = MongoStore(
            request.getfixturevalue("mongo_uri"), policy=make_policy(), database=database
        )
    handle = await start_service(store)
    try:
        for job_id, answer in answers:
            if isinstance(answer, tuple) and answer[0] == 200:
                job = await handle.stub.GetJob(job_service_pb2.GetJobRequest(id=job_id))
                assert job.state == job_pb2.JOB_STATE_SUCCEEDED, job_id
    finally:
        await handle.close()


async def test_stopping_with_mongodb_hung_ends_soon_after_the_grace(
    request: pytest.FixtureRequest,
) -> None:
    """SIGTERM while MongoDB has stopped answering (a hung primary): the service stops
    within its grace plus a few seconds, saying the store did not close. Closing the
    MongoDB client waited for its timeouts (16 s after a 10 s grace seen with
    `jobwire serve`): past Kubernetes' 30 s the kubelet's SIGKILL ended it unlogged."""
    mongo_port = urlsplit(request.getfixturevalue("mongo_uri")).port or 27017
    relay = await TcpCutter(mongo_port).start()
    store = MongoStore(f"mongodb://127.0.0.1:{relay.port}/", policy=make_policy(), database="hung")
    handle = await start_service(store, event_feed=True)  # as deployed: a feed to close too
    try:
        await create(handle.stub, job_id="h")
        relay.hold = True  # MongoDB stops answering
        call = asyncio.ensure_future(handle.stub.GetJob(job_service_pb2.GetJobRequest(id="h")))
        await until(lambda: relay.connections > 0)
        started = asyncio.get_running_loop().time()
        grace = 1.0
        await asyncio.wait_for(handle.running.stop(grace), 60)
        took = asyncio.get_running_loop().time() - started
        # the grace, a sweep given up, the store's close given up, and scheduling
        assert took < grace + SWEEPER_STOP_SECONDS + STORE_CLOSE_SECONDS + 2, took
        with pytest.raises(grpc.aio.AioRpcError):
            await call
    finally:
        await handle.channel.close()
        await relay.close()


@pytest.mark.parametrize("store_kind", ["embedded", "mongo"])
async def test_a_service_stopped_under_load_keeps_every_acknowledged_event(
    store_kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Sixteen writers report progress (one job each, one event after another) while the
    service is stopped (SIGTERM's path, with a grace): each call is answered OK or
    refused UNAVAILABLE/CANCELLED, never UNKNOWN or INTERNAL; after a restart on the
    same data each job holds every event acknowledged to its writer (its sequence is
    at least their count, at most one more: a commit whose answer the stop cut off)."""
    from tests.conftest import open_test_store

    database = f"stop_{os.urandom(4).hex()}"
    store = await open_test_store(store_kind, tmp_path, request, make_policy(), database)
    handle = await start_service(store)
    writers = 16
    for w in range(writers):
        await create(handle.stub, job_id=f"load-{w}")
    acked = [0] * writers
    refused: Counter[str] = Counter()
    enough = asyncio.Event()

    async def writer(w: int) -> None:
        for n in itertools.count(1):
            try:
                await handle.stub.ReportEvent(progress(f"load-{w}", n % 100, key=f"k{n}"))
            except grpc.aio.AioRpcError as err:
                refused[err.code().name] += 1
                return
            acked[w] = n
            if sum(acked) >= 200:
                enough.set()

    tasks = [asyncio.create_task(writer(w)) for w in range(writers)]
    await asyncio.wait_for(enough.wait(), 6 * WAIT)
    await asyncio.wait_for(handle.running.stop(grace=2.0), 6 * WAIT)
    await asyncio.wait_for(asyncio.gather(*tasks), 3 * WAIT)
    await handle.channel.close()
    assert set(refused) <= {"UNAVAILABLE", "CANCELLED"}, refused
    print(f"acknowledged {sum(acked)}, refused {dict(refused)}")

    store = await open_test_store(store_kind, tmp_path, request, make_policy(), database)
    handle = await start_service(store)
    try:
        for w in range(writers):
            job = await handle.stub.GetJob(job_service_pb2.GetJobRequest(id=f"load-{w}"))
            assert acked[w] <= job.sequence <= acked[w] + 1, (w, acked[w], job.sequence)
    finally:
        await handle.close()


async def test_a_call_the_stopping_service_cancelled_is_503_with_retry_after(
    gated: tuple[ServiceHandle, FaultProxy],
) -> None:
    """gRPC ends calls that reach a server as it stops with CANCELLED (not UNAVAILABLE;
    seen with grpcio 1.85 for calls not yet picked up when stop() began): nothing was
    applied. The bridge answered such a callback 499, a 4xx that workers do not retry,
    so the event was lost; it is now 503 + Retry-After like any refusal of a service
    that is going away (the bridge never cancels its own calls)."""
    handle, proxy = gated
    await create(handle.stub, job_pb2.JOB_KIND_BATCH, "cancelled")
    config = dataclasses.replace(TEST_CONFIG, service_target=proxy.target)
    body = {"jobId": "cancelled", "status": "success", "outputKey": "o"}
    body["callbackSecret"] = BATCH_SECRET
    async with running_bridge(config) as bridge:
        proxy.refuse["BatchReportEvents"] = [grpc.StatusCode.CANCELLED]
        async with bridge.http.post(f"{bridge.url}/api/batch-callback", json=body) as reply:
            assert reply.status == 503, await reply.text()
            assert reply.headers["Retry-After"] == str(TEST_CONFIG.retry_after_seconds)
        job = await handle.stub.GetJob(job_service_pb2.GetJobRequest(id="cancelled"))
        assert job.state == job_pb2.JOB_STATE_QUEUED  # nothing applied: the retry is needed
        assert (await bridge.post("/api/batch-callback", body))[0] == 200


async def test_a_lost_race_is_503_with_retry_after_not_a_conflict(
    gated: tuple[ServiceHandle, FaultProxy],
) -> None:
    """The service answers ABORTED only for a race it lost ("changed concurrently …
    times; retry", "claim lost … races in a row; retry": MongoDB replicas contending
    for one job). The bridge answered 409, which tells a worker the job is settled: the
    video worker read "El video ya está finalizado" for a video it had never been given
    and a report that was never applied, so it dropped the event."""
    handle, proxy = gated
    await create(handle.stub, job_pb2.JOB_KIND_VIDEO, "raced")
    config = dataclasses.replace(TEST_CONFIG, service_target=proxy.target)
    report = {"status": "progress", "message": "m", "videoId": "raced", "percent": 5}
    async with running_bridge(config) as bridge:
        proxy.refuse["ClaimJob"] = [grpc.StatusCode.ABORTED]
        async with bridge.http.get(f"{bridge.url}/api/pending", headers=VIDEO_AUTH) as reply:
            assert reply.status == 503, await reply.text()
            assert reply.headers["Retry-After"] == str(TEST_CONFIG.retry_after_seconds)
        proxy.refuse["BatchReportEvents"] = [grpc.StatusCode.ABORTED]
        async with bridge.http.post(
            f"{bridge.url}/api/report", json=report, headers=VIDEO_AUTH
        ) as reply:
            assert reply.status == 503, await reply.text()
            assert "finalizado" not in await reply.text()
            assert reply.headers["Retry-After"] == str(TEST_CONFIG.retry_after_seconds)
        # The retries the 503 asks for are applied.
        async with bridge.http.get(f"{bridge.url}/api/pending", headers=VIDEO_AUTH) as reply:
            assert reply.status == 200 and (await reply.json())["videoId"] == "raced"
        applied = await bridge.post("/api/report", report, headers=VIDEO_AUTH)
        assert applied == (200, {"success": True})


async def test_a_service_failure_is_not_described_to_the_worker(
    gated: tuple[ServiceHandle, FaultProxy], caplog: pytest.LogCaptureFixture
) -> None:
    """The service's status details (a database's host and port, a driver's error) stay
    out of the 5xx body a worker on the internet reads, and go to the bridge's log."""
    handle, proxy = gated
    await create(handle.stub, job_pb2.JOB_KIND_VIDEO, "hidden")
    config = dataclasses.replace(TEST_CONFIG, service_target=proxy.target)
    body = {"status": "progress", "message": "m", "videoId": "hidden", "percent": 5}
    async with running_bridge(config) as bridge:
        for code, status in ((grpc.StatusCode.UNAVAILABLE, 503), (grpc.StatusCode.INTERNAL, 500)):
            proxy.refuse["BatchReportEvents"] = [code]
            async with bridge.http.post(
                f"{bridge.url}/api/report", json=body, headers=VIDEO_AUTH
            ) as reply:
                text = await reply.text()
            assert reply.status == status, text
            assert "proxy" not in text and "refused" not in text, text
        assert "proxy: refused" in caplog.text  # the operator still sees why
