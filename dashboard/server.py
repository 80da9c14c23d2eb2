"""`jobwire dashboard`: runs the dashboard from the environment."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal

from aiohttp import web

from http_bridge.config import http_url
from http_bridge.connection_guard import (
    DRAIN_SECONDS,
    SHUTDOWN_CUT_SECONDS,
    ConnectionGuard,
    GuardedSite,
)

from .app import create_app, end_streams
from .config import DashboardConfig, load_config

log = logging.getLogger("dashboard")


def runner_for(config: DashboardConfig) -> web.AppRunner:
    # A tab that goes away cancels its handler: its streams end at once. The body
    # drain after an early answer matches what the connection watchdog allows for.
    # On SIGTERM open streams end at once and other requests get the grace (serve(): a
    # fixed 2 s cut an operator's Cancel or download waiting on the service); aiohttp's
    # shutdown_timeout, which waits twice, then only cuts what is left.
    return web.AppRunner(
        create_app(config),
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=SHUTDOWN_CUT_SECONDS,
        lingering_time=DRAIN_SECONDS,
    )


def site_for(runner: web.AppRunner, config: DashboardConfig) -> GuardedSite:
    """The listening site: slow request heads get 408, connections past the cap 503
    (the bridge's watchdog, http_bridge/connection_guard.py)."""
    guard = ConnectionGuard(config.header_timeout_seconds, config.max_connections, 5)
    return GuardedSite(
        runner, config.host, config.port, guard=guard, addr_var="JOBWIRE_DASHBOARD_ADDR"
    )


async def serve(config: DashboardConfig) -> None:
    runner = runner_for(config)
    await runner.setup()
    site = site_for(runner, config)
    await site.start()
    for warning in config.warnings():
        log.warning("%s", warning)
    # The URL only: the token lives in the environment / jobwire.env.
    # The port bound: JOBWIRE_DASHBOARD_ADDR's port 0 said ":0".
    print(f"jobwire: dashboard on {http_url(config.host, site.port)}/", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        # Open streams end at once (their pages reconnect to the next dashboard), other
        # requests in flight get the grace.
        await site.drain(config.shutdown_grace_seconds, lambda: end_streams(runner.app))
    finally:
        await runner.cleanup()
    print("jobwire: dashboard stopped", flush=True)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    config = load_config(generate=os.environ.get("JOBWIRE_GENERATE_SECRETS") == "1")
    try:
        import uvloop
    except ImportError:
        runner: asyncio.Runner = asyncio.Runner()
    else:
        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    with runner, contextlib.suppress(KeyboardInterrupt):
        runner.run(serve(config))
