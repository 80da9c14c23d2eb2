"""The dashboard's one gRPC channel to the JobService, its app keys, and gRPC status
-> HTTP status (the bridge's table, after google/rpc/code.proto)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import grpc
from aiohttp import web

from http_bridge.errors import HTTP_STATUS
from http_bridge.grpc_client import CHANNEL_OPTIONS
from http_bridge.service_channel import service_channel
from jobwire.v1 import job_service_pb2_grpc

from .auth import Auth
from .config import DashboardConfig
from .live import Hub

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from jobwire.v1.job_service_pb2_grpc import JobServiceAsyncStub as Stub
else:
    Stub = Any

StubFactory = Callable[[], Stub]

SETTINGS = web.AppKey("settings", DashboardConfig)
AUTH = web.AppKey("auth", Auth)
GRPC: web.AppKey[StubFactory] = web.AppKey("grpc")
CHANNEL: web.AppKey[grpc.aio.Channel] = web.AppKey("channel")
HUB = web.AppKey("hub", Hub)
# The tasks of the open event streams, ended when the dashboard stops (app.py).
STREAMS: web.AppKey[set[asyncio.Task[Any]]] = web.AppKey("streams")


async def channel_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    channel = service_channel(settings.service_target, CHANNEL_OPTIONS, env=settings.service_env)
    stub: Stub = job_service_pb2_grpc.JobServiceStub(channel)
    app[CHANNEL] = channel
    app[GRPC] = lambda: stub
    app[HUB] = Hub(app[GRPC])
    yield
    await app[HUB].close()
    await channel.close()


class PageError(Exception):
    """Ends a request with `status`: an HTML error page, or a JSON body for the APIs."""

    def __init__(self, status: int, message: str, json: bool = False, back: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.json = json
        self.back = back  # the page the error page leads back to (default: the jobs)


def grpc_error(err: grpc.aio.AioRpcError, json: bool = False, back: str = "") -> PageError:
    status = HTTP_STATUS.get(err.code(), 500)
    if err.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        status = 502  # the dashboard's own credentials to the service are wrong
    message = err.details() or err.code().name
    if err.code() in _AWAY:
        # gRPC's own words ("connections to all backends failing; last error: ...") said
        # nothing to an operator, and the service had not answered at all.
        log.warning("job service %s: %s", err.code().name, message)
        message = f"{_AWAY[err.code()]} ({err.code().name}); try again in a moment"
    elif status >= 500:
        message = f"the job service answered {err.code().name}: {message}"
    return PageError(status, message, json=json, back=back)


_AWAY = {
    grpc.StatusCode.UNAVAILABLE: "the job service is not answering",
    grpc.StatusCode.DEADLINE_EXCEEDED: "the job service did not answer in time",
}
