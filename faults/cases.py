"""The fault cases. Each runs the real service and bridge processes under load, injects
its fault, lets the system recover by itself, and checks every acknowledged callback."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sqlite3
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from .load import Load, Tally, create_jobs, verify
from .procs import Bridge, Service

WARM_SECONDS = 3.0  # load before the fault
AFTER_SECONDS = 4.0  # load after the fault ended
DRAIN_SECONDS = 15.0  # reports being retried at the end get this long to finish
RPC_TIMEOUT = 2.0  # the bridge's deadline for each call to the service
WORKERS = 8
CLIENTS = 4


@dataclass
class Row:
    case: str
    acknowledged: int = 0
    lost: int = 0
    duplicates: int = 0
    unavailable: int = 0
    recovery_seconds: float | None = None
    notes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    ran: bool = True


@dataclass
class Stack:
    workdir: Path
    service: Service
    bridge: Bridge
    load: Load


Fault = Callable[[Stack, Row], Awaitable[None]]


async def run_case(
    name: str,
    workdir: Path,
    fault: Fault,
    data_dir: Path | None = None,
    mongodb_uri: str = "",
    after_stop: Callable[[Stack, Row], None] | None = None,
) -> Row:
    row = Row(name)
    await asyncio.to_thread(workdir.mkdir, parents=True, exist_ok=True)
    service = Service(workdir, data_dir or workdir / "data", mongodb_uri)
    await asyncio.to_thread(service.start)
    bridge = Bridge(workdir, service.target, RPC_TIMEOUT)
    try:
        await asyncio.to_thread(bridge.start)
        jobs = [f"fault-{name}-{i}-{uuid.uuid4().hex[:6]}" for i in range(WORKERS)]
        await create_jobs(service.target, jobs)
        load = Load(bridge.url, jobs, clients=CLIENTS)
        stack = Stack(workdir, service, bridge, load)
        running = asyncio.create_task(load.run())
        await asyncio.sleep(WARM_SECONDS)  # the load runs meanwhile
        load.tally.fault_start = time.monotonic()
        await fault(stack, row)
        load.tally.fault_end = time.monotonic()
        await asyncio.sleep(AFTER_SECONDS)
        load.stop(DRAIN_SECONDS)
        await running
        tally = load.tally
        verdict = await verify(service.target, tally.acked)
        row.acknowledged = tally.acknowledged
        row.lost = verdict.lost
        row.duplicates = verdict.duplicates
        row.unavailable = tally.unavailable
        row.recovery_seconds = tally.recovery_seconds
        common_checks(tally, row)
        row.notes.append(f"stored {verdict.stored}, unresolved {tally.unresolved}")
        row.notes.append(
            "answers: " + ", ".join(f"{k}x{v}" for k, v in sorted(tally.statuses.items()))
        )
        if after_stop is not None:
            bridge.stop()
            service.stop()
            after_stop(stack, row)
    finally:
        bridge.stop()
        service.stop()
    return row


def common_checks(tally: Tally, row: Row) -> None:
    if row.lost:
        row.failures.append(f"{row.lost} acknowledged callbacks lost")
    if row.duplicates:
        row.failures.append(f"{row.duplicates} callbacks applied twice")
    if tally.unavailable_without_retry_after:
        row.failures.append(f"{tally.unavailable_without_retry_after} 503s without Retry-After")
    if tally.first_ok_after_fault is None:
        row.failures.append("no callback succeeded after the fault: no recovery")
    if row.acknowledged == 0:
        row.failures.append("nothing acknowledged")
    if tally.unresolved:
        row.failures.append(f"{tally.unresolved} callbacks still refused when the run ended")
    bad = [k for k in tally.statuses if k.startswith("5") and k != "503"]
    if bad:
        row.failures.append(f"unexpected answers: {', '.join(bad)}")


def expect_503_while_down(stack: Stack, row: Row, before: int) -> None:
    if stack.load.tally.unavailable <= before:
        row.failures.append("no 503 while the dependency was down")


# -- the cases -----------------------------------------------------------------------

DOWN_SECONDS = 3.0


async def kill_service(stack: Stack, row: Row) -> None:
    before = stack.load.tally.unavailable
    stack.service.kill9()
    await asyncio.sleep(DOWN_SECONDS)  # down for a while, under load
    expect_503_while_down(stack, row, before)
    await asyncio.to_thread(stack.service.start)  # same port, same data


async def kill_bridge(stack: Stack, row: Row) -> None:
    stack.bridge.kill9()
    await asyncio.sleep(DOWN_SECONDS)
    await asyncio.to_thread(stack.bridge.start)  # same port
    row.notes.append("while the bridge is down, workers get connection errors and retry")


async def freeze_service(stack: Stack, row: Row) -> None:
    before = stack.load.tally.unavailable
    stack.service.signal(signal.SIGSTOP)
    await asyncio.sleep(RPC_TIMEOUT * 2 + 1)  # frozen for longer than the deadline
    tally = stack.load.tally
    slowest = tally.slowest_answer_in_fault
    stack.service.signal(signal.SIGCONT)
    expect_503_while_down(stack, row, before)
    row.notes.append(f"slowest answer while frozen {slowest:.2f}s (deadline {RPC_TIMEOUT}s)")
    if slowest > RPC_TIMEOUT + 1.5:
        row.failures.append(f"an answer took {slowest:.2f}s while frozen: a worker hung")


def mongo_case(workdir: Path) -> Callable[[], Awaitable[Row]]:
    async def run() -> Row:
        from tests.mongo_server import FerretDBProcess, ferretdb_binary

        binary = ferretdb_binary()
        if not (binary.is_file() and os.access(binary, os.X_OK)):
            return not_run("mongo_restart", f"FerretDB not found at {binary} (make ferretdb)")
        ferret = FerretDBProcess(binary, base_dir=workdir / "ferretdb")
        await asyncio.to_thread(ferret.start)

        async def restart(stack: Stack, row: Row) -> None:
            before = stack.load.tally.unavailable
            await asyncio.to_thread(ferret.stop)
            await asyncio.sleep(DOWN_SECONDS)
            expect_503_while_down(stack, row, before)
            await asyncio.to_thread(ferret.start)  # same port, same data; jobwire untouched
            row.notes.append("FerretDB stopped and started; service and bridge never restarted")

        try:
            return await run_case("mongo_restart", workdir, restart, mongodb_uri=ferret.uri)
        finally:
            await asyncio.to_thread(ferret.stop)

    return run


def disk_full_case(workdir: Path) -> Callable[[], Awaitable[Row]]:
    async def run() -> Row:
        mount = workdir / "tmpfs"
        await asyncio.to_thread(mount.mkdir, parents=True, exist_ok=True)
        done = await asyncio.to_thread(
            subprocess.run,
            ["mount", "-t", "tmpfs", "-o", "size=128m", "tmpfs", str(mount)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            reason = (done.stderr or done.stdout).strip() or f"exit {done.returncode}"
            return not_run("disk_full", f"cannot mount a tmpfs here: {reason}")
        data = mount / "data"
        filler = mount / "filler"

        async def fill(stack: Stack, row: Row) -> None:
            before = stack.load.tally.unavailable
            written = await asyncio.to_thread(fill_up, filler)
            row.notes.append(f"tmpfs 128 MiB, filled with {written // 1024} KiB until ENOSPC")
            await asyncio.sleep(DOWN_SECONDS)
            expect_503_while_down(stack, row, before)
            filler.unlink()  # space freed; the service is not restarted
            row.notes.append("space freed without restarting anything")

        def integrity(stack: Stack, row: Row) -> None:
            for db in sorted(data.glob("*.db")) + sorted(data.glob("*.sqlite*")):
                if db.suffix in (".db", ".sqlite", ".sqlite3"):
                    with sqlite3.connect(db) as conn:
                        result = conn.execute("PRAGMA integrity_check").fetchone()[0]
                    row.notes.append(f"{db.name} integrity_check: {result}")
                    if result != "ok":
                        row.failures.append(f"{db.name} corrupted: {result}")

        try:
            return await run_case("disk_full", workdir, fill, data_dir=data, after_stop=integrity)
        finally:
            await asyncio.to_thread(subprocess.run, ["umount", "-l", str(mount)], check=False)
            await asyncio.to_thread(shutil.rmtree, mount, ignore_errors=True)

    return run


def fill_up(path: Path) -> int:
    """Writes zeros to `path` until the file system is full; returns the bytes written."""
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (256 * 1024, 4096, 512, 1):
            block = b"\0" * size
            try:
                while True:
                    written += os.write(fd, block)
            except OSError:  # ENOSPC: go on with smaller blocks to the last byte
                pass
    finally:
        os.close(fd)
    return written


def not_run(case: str, why: str) -> Row:
    return Row(case, ran=False, notes=[f"NOT RUN: {why}"])
