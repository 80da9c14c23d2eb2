"""`jobwire bridge`: runs the HTTP bridge from the environment."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse

from .app import create_app
from .config import Config, load_config

log = logging.getLogger("http_bridge")

# The AuroraCloud token may travel as a path segment; it must never reach a log.
_TOKEN_PATH = re.compile(r"^(/api/transcode-callback/)[^/?]+")


def redact(path: str) -> str:
    return _TOKEN_PATH.sub(r"\1***", path)


class AccessLogger(AbstractAccessLogger):
    """Method, redacted path (no query), status, size and time; never headers."""

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        self.logger.info(
            "%s %s %s %d %d %.1fms",
            request.remote,
            request.method,
            redact(request.path),
            response.status,
            response.body_length,
            time * 1000,
        )


async def serve(config: Config) -> None:
    runner = web.AppRunner(create_app(config), access_log_class=AccessLogger)
    await runner.setup()
    site = web.TCPSite(runner, config.http_host, config.http_port, backlog=1024)
    await site.start()
    log.info(
        "bridge on http://%s:%d -> service %s",
        config.http_host,
        config.http_port,
        config.service_target,
    )
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # Only `jobwire run` (local development) may invent secrets; a deployed bridge
    # never writes files and leaves an endpoint without its secret closed.
    config = load_config(generate=os.environ.get("JOBWIRE_GENERATE_SECRETS") == "1")
    try:
        import uvloop
    except ImportError:
        runner: asyncio.Runner = asyncio.Runner()
    else:
        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    with runner, contextlib.suppress(KeyboardInterrupt):
        runner.run(serve(config))
