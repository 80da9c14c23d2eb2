"""`python -m faults [--only CASE ...] [--markdown FILE]`: runs the fault cases in turn
and prints the table; exits 1 when any case lost or duplicated a callback, or failed
one of its checks."""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from .cases import (
    Row,
    disk_full_case,
    freeze_service,
    kill_bridge,
    kill_service,
    mongo_case,
    run_case,
)

CASE_TIMEOUT = 180.0  # seconds; a case that hangs fails instead of stalling CI
CASES = ("kill9_service", "kill9_bridge", "sigstop_service", "disk_full", "mongo_restart")


def case_runners(base: Path) -> dict[str, Callable[[], Awaitable[Row]]]:
    return {
        "kill9_service": lambda: run_case("kill9_service", base / "kill9_service", kill_service),
        "kill9_bridge": lambda: run_case("kill9_bridge", base / "kill9_bridge", kill_bridge),
        "sigstop_service": lambda: run_case(
            "sigstop_service", base / "sigstop_service", freeze_service
        ),
        "disk_full": disk_full_case(base / "disk_full"),
        "mongo_restart": mongo_case(base / "mongo_restart"),
    }


def table(rows: list[Row]) -> str:
    lines = [
        "| case | acknowledged | lost | duplicates | 503s | recovery | result |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if not r.ran:
            lines.append(f"| {r.case} | - | - | - | - | - | {'; '.join(r.notes)} |")
            continue
        recovery = "-" if r.recovery_seconds is None else f"{r.recovery_seconds:.2f} s"
        result = "ok" if not r.failures else "FAILED: " + "; ".join(r.failures)
        lines.append(
            f"| {r.case} | {r.acknowledged} | {r.lost} | {r.duplicates} | {r.unavailable} "
            f"| {recovery} | {result} |"
        )
    return "\n".join(lines)


async def main(only: list[str], markdown: str) -> int:
    base = Path(tempfile.mkdtemp(prefix="jobwire-faults-"))
    runners = case_runners(base)
    rows: list[Row] = []
    started = time.monotonic()
    try:
        for name in only or CASES:
            t0 = time.monotonic()
            print(f"faults: {name} ...", flush=True)
            try:
                row = await asyncio.wait_for(runners[name](), CASE_TIMEOUT)
            except Exception as exc:  # a case that could not run is a failure, said plainly
                row = Row(name, failures=[f"{type(exc).__name__}: {exc}"])
            print(f"faults: {name} done in {time.monotonic() - t0:.0f} s", flush=True)
            for note in row.notes:
                print(f"    {note}")
            rows.append(row)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    text = table(rows)
    print(f"\n{text}\n\n({time.monotonic() - started:.0f} s in all)")
    if markdown:
        await asyncio.to_thread(Path(markdown).write_text, text + "\n")
    failed = [r for r in rows if r.failures]
    ci = os.environ.get("CI", "").lower() == "true"
    missing = [r for r in rows if not r.ran and r.case == "mongo_restart"]
    return 1 if failed or (ci and missing) else 0


def cli() -> None:
    parser = argparse.ArgumentParser(prog="python -m faults", description=__doc__)
    parser.add_argument("--only", action="append", default=[], choices=CASES)
    parser.add_argument("--markdown", default="", help="also write the table to this file")
    args = parser.parse_args()
    sys.exit(asyncio.run(main(args.only, args.markdown)))


cli()
