"""The HTTP bridge as a real process (`jobwire bridge`'s entry point) on a free loopback
port, its log captured to a file: for tests that must see the process survive, read
its log, or hold hundreds of raw connections to it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from tests.bridge_harness import API_KEY, BATCH_SECRET, TRANSCODE_TOKEN
from tests.helpers import free_port

START_TIMEOUT = 30.0
_BARE_MAIN = "from http_bridge.server import main; main()"


@dataclass
class BridgeProcess:
    proc: asyncio.subprocess.Process
    host: str
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


async def raw_exchange(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Sends raw bytes on a new connection; everything the bridge answers until it
    closes the connection (the requests say `Connection: close`) or `timeout`."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        chunks = []
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(65536):
                chunks.append(chunk)
        return b"".join(chunks)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def trickle_head(port: int, head: bytes, every: float, limit: float) -> tuple[bytes, float]:
    """Sends `head` one byte every `every` seconds (the client's pace, not a
    synchronisation) on a new connection; everything answered until the server closes
    it (at most `limit` seconds), and how long that took."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()

    async def trickle() -> None:
        for byte in head:
            writer.write(bytes([byte]))
            await asyncio.sleep(every)  # the client's pace, not a synchronisation

    sender = asyncio.create_task(trickle())
    chunks = []
    try:
        async with asyncio.timeout(limit):
            while chunk := await reader.read(65536):
                chunks.append(chunk)
    finally:
        sender.cancel()
        writer.close()
    return b"".join(chunks), time.monotonic() - started


def status_of(response: bytes) -> int | None:
    """The status code of the first response in `response`, or None when there is none."""
    line = response.split(b"\r\n", 1)[0].split(b" ")
    if len(line) >= 2 and line[0].startswith(b"HTTP/") and line[1].isdigit():
        return int(line[1])
    return None


async def http_get(port: int, path: str, headers: str = "") -> int | None:
    request = f"GET {path} HTTP/1.1\r\nHost: t\r\n{headers}Connection: close\r\n\r\n"
    return status_of(await raw_exchange(port, request.encode()))


def bridge_process(
    service_target: str, tmp_path: Path, **env: str
) -> contextlib.AbstractAsyncContextManager[BridgeProcess]:
    """The bridge module's bare `main` in a process of its own."""
    return _bridge_process(service_target, tmp_path, env, via_cli=False)


def cli_bridge_process(
    service_target: str, tmp_path: Path, **env: str
) -> contextlib.AbstractAsyncContextManager[BridgeProcess]:
    """`jobwire bridge`: the deployed entry point, with jobwire's log configuration."""
    return _bridge_process(service_target, tmp_path, env, via_cli=True)


@contextlib.asynccontextmanager
async def _bridge_process(
    service_target: str, tmp_path: Path, env: dict[str, str], via_cli: bool
) -> AsyncIterator[BridgeProcess]:
    port = free_port()
    log_path = tmp_path / f"bridge-{port}.log"
    full_env = {
        **os.environ,
        "JOBWIRE_HTTP_ADDR": f"127.0.0.1:{port}",
        "JOBWIRE_SERVICE_TARGET": service_target,
        "JOBWIRE_ENV_FILE": str(tmp_path / "none.env"),
        "BATCH_CALLBACK_SECRET": BATCH_SECRET,
        "API_KEY": API_KEY,
        "TRANSCODE_CALLBACK_TOKEN": TRANSCODE_TOKEN,
        "JOBWIRE_ACCESS_LOG": "errors",
        **env,
    }
    with log_path.open("wb") as log:
        entry = ("-m", "cli", "bridge") if via_cli else ("-c", _BARE_MAIN)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *entry,
            env=full_env,
            stdout=log,
            stderr=log,
            stdin=asyncio.subprocess.DEVNULL,
        )
    bridge = BridgeProcess(proc, "127.0.0.1", port, log_path)
    try:
        await _wait_healthy(bridge)
        yield bridge
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def _wait_healthy(bridge: BridgeProcess) -> None:
    async def probe() -> None:
        while True:
            if not bridge.alive:
                raise AssertionError(f"bridge exited at start:\n{bridge.log()[-3000:]}")
            try:
                if await http_get(bridge.port, "/healthz") == 200:
                    return
            except OSError:
                pass
            await asyncio.sleep(0.05)  # polling a process that is starting, not a sync point

    await asyncio.wait_for(probe(), START_TIMEOUT)
