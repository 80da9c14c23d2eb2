"""The app's one gRPC channel to the JobService, its stubs and the event coalescer.

Created and closed with the app (`cleanup_ctx`); handlers reach them through typed
`web.AppKey`s, so the bridge itself holds no state between requests.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from aiohttp import web
from grpc_health.v1 import health_pb2_grpc

from jobwire.v1 import job_service_pb2_grpc

from .channel_ready import ChannelReady
from .coalescer import Coalescer
from .config import Config
from .service_channel import service_channel

if TYPE_CHECKING:
    from jobwire.v1.job_service_pb2_grpc import JobServiceAsyncStub

    Stub = JobServiceAsyncStub
else:
    Stub = Any

CONFIG = web.AppKey("jobwire_config", Config)
CHANNEL: web.AppKey[Any] = web.AppKey("jobwire_channel")
STUB: web.AppKey[Stub] = web.AppKey("jobwire_stub")
HEALTH: web.AppKey[Any] = web.AppKey("jobwire_health_stub")
COALESCER = web.AppKey("jobwire_coalescer", Coalescer)

# Artifacts move in 1 MiB chunks; 8 MiB leaves room for any header or batch.
_MAX_MESSAGE = 8 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", _MAX_MESSAGE),
    ("grpc.max_receive_message_length", _MAX_MESSAGE),
    ("grpc.keepalive_time_ms", 30_000),
    # Reconnect quickly after the service restarts, so readyz recovers fast; the calls
    # made meanwhile wait about one backoff for it (channel_ready.py).
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1_000),
]


async def grpc_context(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    ready = ChannelReady(CHANNEL_OPTIONS)
    # TLS, token, request id; a call waits while the channel reconnects.
    channel = service_channel(
        config.service_target,
        CHANNEL_OPTIONS,
        env=config.service_env,
        interceptors=ready.interceptors(),
    )
    ready.channel = channel
    stub = job_service_pb2_grpc.JobServiceStub(channel)
    app[CHANNEL] = channel
    app[STUB] = stub
    app[HEALTH] = health_pb2_grpc.HealthStub(channel)
    app[COALESCER] = Coalescer(stub, timeout=config.rpc_timeout_seconds)
    try:
        yield
    finally:
        await app[COALESCER].close()
        ready.close()
        await channel.close()


def stub_of(request: web.Request) -> Stub:
    return request.app[STUB]


def config_of(request: web.Request) -> Config:
    return request.app[CONFIG]
