"""JOBWIRE_HTTP_WORKERS=N: N bridge processes share one port (SO_REUSEPORT), under a
parent that stops them together."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers import free_port

ROOT = Path(__file__).resolve().parent.parent


def bridge_env(tmp_path: Path, port: int, workers: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        JOBWIRE_HTTP_WORKERS=workers,
        JOBWIRE_HTTP_ADDR=f"127.0.0.1:{port}",
        # Nothing listens there: /healthz answers without the service.
        JOBWIRE_SERVICE_TARGET=f"127.0.0.1:{free_port()}",
        JOBWIRE_ENV_FILE=str(tmp_path / "bridge.env"),
        BATCH_CALLBACK_SECRET="s" * 32,
        API_KEY="k" * 32,
        TRANSCODE_CALLBACK_TOKEN="t" * 32,
    )
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


@pytest.fixture
def two_workers(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "bridge"],
        env=bridge_env(tmp_path, port, "2"),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_healthy(port, proc)
        wait_for(lambda: len(children(proc.pid)) == 2, "two workers")
        wait_for(lambda: len(listeners(port)) == 2, "two listening sockets")
        yield proc, port
    finally:
        for pid in children(proc.pid):
            with_kill(pid)
        proc.kill()
        proc.wait()


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)  # the polling interval of this waiter (deadline above)
    raise AssertionError(f"timed out waiting for {what}")


def wait_healthy(port: int, proc: subprocess.Popen[bytes]) -> None:
    def healthy() -> bool:
        assert proc.poll() is None, "bridge exited"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    wait_for(healthy, "/healthz")


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def with_kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def listeners(port: int) -> dict[str, int]:
    """Inodes of the LISTEN sockets on 127.0.0.1:port -> the pid holding each."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, state, inode = fields[1], fields[3], fields[9]
        if state == "0A" and local == f"0100007F:{port:04X}":
            inodes.add(inode)
    holders: dict[str, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            for fd in (entry / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    holders[target[8:-1]] = int(entry.name)
        except OSError:
            continue
    return holders


def test_two_workers_each_listen_on_the_same_port(
    two_workers: tuple[subprocess.Popen[bytes], int],
) -> None:
    proc, port = two_workers
    holders = listeners(port)
    assert sorted(holders.values()) == sorted(children(proc.pid))
    # New connections are spread by the kernel; every one is answered.
    for _ in range(20):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            assert r.status == 200


def test_sigterm_to_the_parent_stops_every_worker(
    two_workers: tuple[subprocess.Popen[bytes], int],
) -> None:
    proc, _ = two_workers
    workers = children(proc.pid)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    wait_for(lambda: not any(alive(p) for p in workers), "workers gone")


def test_a_dead_worker_stops_the_rest_and_fails(
    two_workers: tuple[subprocess.Popen[bytes], int],
) -> None:
    proc, _ = two_workers
    first, second = children(proc.pid)
    os.kill(first, signal.SIGKILL)
    assert proc.wait(timeout=30) != 0
    wait_for(lambda: not alive(second), "the other worker gone")


@pytest.mark.parametrize("value", ["0", "two", "65"])
def test_a_bad_worker_count_is_refused_by_name(tmp_path: Path, value: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "cli", "bridge"],
        env=bridge_env(tmp_path, free_port(), value),
        cwd=ROOT,
        capture_output=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert b"JOBWIRE_HTTP_WORKERS" in done.stderr


def scrape(port: int) -> dict[str, float]:
    """Every sample of /metrics on a fresh connection (so on either worker)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def test_metrics_count_every_worker_whichever_one_is_scraped(
    two_workers: tuple[subprocess.Popen[bytes], int],
) -> None:
    _, port = two_workers
    # 40 callbacks without credentials, each on its own connection: the kernel spreads
    # the connections over both workers, and each answers its share.
    for i in range(40):
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/external/jobs/job-{i}", data=b"{}", method="POST"
        )
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(request, timeout=5)
    # Idle connections, open on whichever worker took them.
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(6)]
    try:
        # Accepted (and the 40 closed ones let go) by the workers' loops in their time.
        wait_for(
            lambda: scrape(port)["jobwire_bridge_open_connections"] == 6 + 1,
            "the idle connections counted, the closed ones not",
        )
        for _ in range(12):
            samples = scrape(port)
            answered = sum(
                v
                for k, v in samples.items()
                if k.startswith('jobwire_bridge_callbacks_total{contract="secretary"')
            )
            assert answered == 40
            latency = 'jobwire_bridge_request_duration_seconds_count{contract="secretary"}'
            assert samples[latency] == 40
            # The idle ones and this scrape's; the previous scrape's connection may be
            # counted too, until the worker that served it sees the close (a CI run did).
            assert samples["jobwire_bridge_open_connections"] in (6 + 1, 6 + 2)
        wait_for(
            lambda: scrape(port)["jobwire_bridge_open_connections"] == 6 + 1,
            "the scrapes' connections let go again",
        )
    finally:
        for sock in idle:
            sock.close()
