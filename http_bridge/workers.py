"""`JOBWIRE_HTTP_WORKERS=N`: N bridge processes on one port.

The bridge keeps no state between requests (the service holds it all), so on a machine
with more cores the same port can be served by several processes: each binds it with
SO_REUSEPORT and the kernel spreads new connections over them. The parent only
supervises: it forks the workers before any event loop or gRPC channel exists (each
worker builds its own), forwards SIGTERM/SIGINT to them, and when one dies stops the
others and exits with a failure, so a supervisor (systemd, Kubernetes) restarts the lot.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Callable, Mapping
from types import FrameType

from jobwire.env_numbers import whole_number

log = logging.getLogger("http_bridge")

ENV = "JOBWIRE_HTTP_WORKERS"
MAX_WORKERS = 64


def worker_count(environ: Mapping[str, str] | None = None) -> int:
    """The configured number of worker processes (default 1: no fork at all)."""
    raw = (os.environ if environ is None else environ).get(ENV, "").strip()
    if not raw:
        return 1
    count = whole_number(raw)
    if count is None or not 1 <= count <= MAX_WORKERS:
        raise SystemExit(f"{ENV} must be a whole number from 1 to {MAX_WORKERS}, got {raw!r}")
    return count


def run_workers(count: int, serve: Callable[[int], None]) -> int:
    """Forks `count` processes running `serve(index)`; returns the exit status for the
    parent."""
    children: set[int] = set()
    for index in range(count):
        pid = os.fork()
        if pid == 0:  # the worker
            code = 0
            try:
                serve(index)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                log.exception("bridge worker %d failed", index)
                code = 1
            finally:
                logging.shutdown()
            os._exit(code)
        children.add(pid)
    log.info("bridge: %d worker processes on one port (SO_REUSEPORT)", count)
    stopping = False

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    status = 0
    while children:
        try:
            pid, raw = os.wait()
        except ChildProcessError:
            break
        children.discard(pid)
        code = os.waitstatus_to_exitcode(raw)
        if not stopping:
            # A worker died on its own: the port is served at a fraction of its
            # capacity and nothing restarts it here; stop all, exit non-zero.
            log.error("bridge worker %d exited (%d); stopping the others", pid, code)
            status = code or 1
            forward(signal.SIGTERM, None)
    return status
