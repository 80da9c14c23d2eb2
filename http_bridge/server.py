"""`jobwire bridge`: runs the HTTP bridge from the environment."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse

from .app import create_app
from .config import Config, http_url, load_config
from .connection_guard import SHUTDOWN_CUT_SECONDS, guarded_site, runner_options
from .redaction import loggable_path
from .shared_counts import SLABS
from .workers import run_workers

log = logging.getLogger("http_bridge")


class AccessLogger(AbstractAccessLogger):
    """Method, redacted path (no query), status, size and time; never headers."""

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        self.logger.info(
            "%s %s %s %d %d %.1fms",
            request.remote,
            request.method,
            loggable_path(request),
            response.status,
            response.body_length,
            time * 1000,
        )


class ErrorAccessLogger(AccessLogger):
    """Only responses >= 400 (JOBWIRE_ACCESS_LOG=errors, the default)."""

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        if response.status >= 400:
            super().log(request, response, time)


ACCESS_LOGGERS: dict[str, type[AccessLogger]] = {
    "all": AccessLogger,
    "errors": ErrorAccessLogger,
}


async def serve(config: Config, reuse_port: bool = False) -> None:
    logger_class = ACCESS_LOGGERS.get(config.access_log)
    # On SIGTERM (a rolling deploy, `jobwire run` stopping) the requests in flight
    # finish within the grace (site.drain): their workers get the answer, not a reset
    # connection. aiohttp's shutdown_timeout waits twice, so it only cuts what is left.
    options = {**runner_options(config), "shutdown_timeout": SHUTDOWN_CUT_SECONDS}
    if logger_class is None:
        runner = web.AppRunner(create_app(config), access_log=None, **options)
    else:
        runner = web.AppRunner(create_app(config), access_log_class=logger_class, **options)
    await runner.setup()
    # What start-up allocated lives as long as the process: keep it out of the
    # collector's generations, so a full collection has less to walk (no long pauses).
    gc.collect()
    gc.freeze()
    # Slow request heads and too many connections: see connection_guard.py.
    site = guarded_site(runner, config, backlog=1024, reuse_port=reuse_port)
    await site.start()
    log.info(
        "bridge on %s -> service %s",
        http_url(config.http_host, site.port),  # JOBWIRE_HTTP_ADDR's port 0 said ":0"
        config.service_target,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        log.info(
            "bridge stopping: new connections refused, requests in flight finish (grace %gs)",
            config.shutdown_grace_seconds,
        )
        await site.drain(config.shutdown_grace_seconds)
    finally:
        await runner.cleanup()
    log.info("bridge stopped")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # Only `jobwire run` (local development) may invent secrets; a deployed bridge
    # never writes files and leaves an endpoint without its secret closed.
    config = load_config(generate=os.environ.get("JOBWIRE_GENERATE_SECRETS") == "1")
    count = config.http_workers  # JOBWIRE_HTTP_WORKERS: N processes on one port
    if count > 1:
        SLABS.resize(count)  # their metrics, summed by whichever one is scraped

        def serve_worker(index: int) -> None:
            SLABS.become(index)
            run(config, reuse_port=True)

        raise SystemExit(run_workers(count, serve_worker))
    run(config)


def run(config: Config, reuse_port: bool = False) -> None:
    try:
        import uvloop
    except ImportError:
        runner: asyncio.Runner = asyncio.Runner()
    else:
        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    with runner, contextlib.suppress(KeyboardInterrupt):
        runner.run(serve(config, reuse_port))
