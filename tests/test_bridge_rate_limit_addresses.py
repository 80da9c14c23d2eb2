"""The rate limit's client address, over real IPv6 and IPv4 sockets.

One IPv6 host owns a /64 and can send each request from another address in it; keyed
by the full address, each guess came with a fresh bucket. The bridge runs in a network
namespace of its own (`unshare --net`), where the test gives the loopback interface
addresses in two /64s and connects from them; it is skipped where the kernel does not
let it make one. A 401 needs no service: none is running.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from http_bridge.client_address import limited_address
from tests.bridge_harness import API_KEY
from tests.bridge_process import status_of

CLONE_NEWNET = 0x40000000
PORT = 8080  # the namespace is the bridge's alone
BRIDGE = "fd00:64::1"
ROTATED = [f"fd00:64::{n:x}" for n in range(0x10, 0x18)]  # one host's /64
OTHER_64 = "fd00:65::10"
ADDRESSES = [BRIDGE, *ROTATED, "fd00:65::1", OTHER_64]


def _namespaces_allowed() -> bool:
    if not (shutil.which("unshare") and shutil.which("ip")):
        return False
    return subprocess.run(["unshare", "--net", "true"], capture_output=True).returncode == 0


pytestmark = pytest.mark.skipif(
    not _namespaces_allowed(), reason="needs `unshare --net` (root or CAP_SYS_ADMIN) and `ip`"
)


@contextlib.asynccontextmanager
async def in_namespace(tmp_path: Path, main: str, **env: str) -> AsyncIterator[int]:
    """The process of `main` (the bridge's or the dashboard's), listening on [::], in a
    network namespace whose loopback holds ADDRESSES; yields its pid (its namespace:
    /proc/<pid>/ns/net)."""
    setup = ["ip link set lo up"] + [f"ip -6 addr add {a}/64 dev lo nodad" for a in ADDRESSES]
    script = " && ".join([*setup, f'exec "$0" -c "from {main}.server import main; main()"'])
    log = (tmp_path / f"{main}.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        "unshare",
        "--net",
        "sh",
        "-c",
        script,
        sys.executable,
        env={
            **os.environ,
            "JOBWIRE_HTTP_ADDR": f"[::]:{PORT}",
            "JOBWIRE_DASHBOARD_ADDR": f"[::]:{PORT}",
            "JOBWIRE_SERVICE_TARGET": "127.0.0.1:1",
            "JOBWIRE_ENV_FILE": str(tmp_path / "none.env"),
            "API_KEY": API_KEY,
            **env,
        },
        stdout=log,
        stderr=log,
        stdin=asyncio.subprocess.DEVNULL,
    )
    try:
        yield proc.pid
    finally:
        log.close()
        if proc.returncode is None:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 10)


def _connect_in(namespace: str, source: str, target: str) -> socket.socket:
    """A connected socket of the namespace, from `source`. Runs on a thread of the
    test's own (setns changes the calling thread's namespace for good)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(namespace, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns")
    finally:
        os.close(fd)
    family = socket.AF_INET6 if ":" in target else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.bind((source, 0))
    sock.connect((target, PORT))
    sock.setblocking(False)
    return sock


async def get_from(
    thread: concurrent.futures.Executor,
    pid: int,
    source: str,
    target: str,
    token: str = "",
    path: str = "/api/log?limit=1",
) -> int | None:
    """GET `path` from `source` with `token` (none: GET /healthz); the answer's status."""
    loop = asyncio.get_running_loop()
    sock = await loop.run_in_executor(thread, _connect_in, f"/proc/{pid}/ns/net", source, target)
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        head = f"GET {path} HTTP/1.1\r\nAuthorization: Bearer {token}\r\n"
        if not token:
            head = "GET /healthz HTTP/1.1\r\n"
        writer.write(f"{head}Host: t\r\nConnection: close\r\n\r\n".encode())
        async with asyncio.timeout(10):
            return status_of(await reader.read())
    finally:
        writer.close()


async def wait_listening(healthz: Callable[[], Awaitable[int | None]]) -> None:
    async def probe() -> None:
        while True:
            with contextlib.suppress(OSError):
                if await healthz() == 200:
                    return
            await asyncio.sleep(0.05)  # polling a process that is starting

    await asyncio.wait_for(probe(), 30)


async def test_an_ipv6_client_is_limited_by_its_64(tmp_path: Path) -> None:
    """Guesses from eight addresses of one /64 share one bucket (3/min: three 401s,
    then 429); a client of another /64 has its own."""
    thread = concurrent.futures.ThreadPoolExecutor(1)  # its namespace changes: ours alone
    try:
        async with in_namespace(tmp_path, "http_bridge", JOBWIRE_RATE_LIMIT="3/min") as pid:
            guesses = iter(range(100))

            async def guess(source: str) -> int | None:
                return await get_from(thread, pid, source, BRIDGE, f"guess-{next(guesses)}")

            await wait_listening(lambda: get_from(thread, pid, OTHER_64, BRIDGE))
            assert [await guess(source) for source in ROTATED] == [401] * 3 + [429] * 5
            assert await guess(OTHER_64) == 401
    finally:
        thread.shutdown()


async def test_the_dashboard_limits_an_ipv6_client_by_its_64(tmp_path: Path) -> None:
    """The dashboard's wrong-token limit (JOBWIRE_DASHBOARD_LOGIN_LIMIT) keyed on the
    full address too: Bearer guesses from eight addresses of one /64 were eight 401s."""
    thread = concurrent.futures.ThreadPoolExecutor(1)  # its namespace changes: ours alone
    env = {"JOBWIRE_DASHBOARD_LOGIN_LIMIT": "3/min", "JOBWIRE_DASHBOARD_TOKEN": "t" * 32}
    try:
        async with in_namespace(tmp_path, "dashboard", **env) as pid:
            guesses = iter(range(100))

            async def guess(source: str) -> int | None:
                token = f"guess-{next(guesses)}"
                return await get_from(thread, pid, source, BRIDGE, token, "/api/jobs")

            await wait_listening(lambda: get_from(thread, pid, OTHER_64, BRIDGE))
            assert [await guess(source) for source in ROTATED] == [401] * 3 + [429] * 5
            assert await guess(OTHER_64) == 401
    finally:
        thread.shutdown()


def test_the_address_a_limit_counts() -> None:
    """An IPv4-mapped address (a dual-stack listener's IPv4 client) is its IPv4 address:
    its /64 would be every IPv4 client at once."""
    assert limited_address("2001:db8:1:2:aaaa:bbbb:cccc:dddd") == "2001:db8:1:2::/64"
    assert limited_address("::ffff:192.0.2.7") == "192.0.2.7"
    assert limited_address("192.0.2.7") == "192.0.2.7"
    assert limited_address("fe80::1%eth0") == "fe80::1%eth0"  # fe80::/64: the whole link
    assert limited_address(None) == ""
