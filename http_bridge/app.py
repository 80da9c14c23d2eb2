"""Assembles the aiohttp application: one route table per contract, health, OpenAPI."""

from __future__ import annotations

from aiohttp import web

from . import (
    aurora,
    aws_batch,
    connection_guard,
    edge,
    health,
    metrics,
    openapi,
    secretary,
    tracing,
    video_worker,
)
from .config import Config
from .grpc_client import CONFIG, grpc_context
from .shared_counts import CONTRACTS

CONTRACT_ROUTES = (aws_batch.routes, video_worker.routes, aurora.routes, secretary.routes)


def create_app(config: Config) -> web.Application:
    # Each handler enforces its own body limit while reading (1 MiB, or the larger
    # one for the Secretary final event); aiohttp's own limit must not undercut it.
    app = web.Application(client_max_size=max(config.max_body_bytes, config.max_final_body_bytes))
    app[CONFIG] = config
    app.cleanup_ctx.append(grpc_context)
    for table in (*CONTRACT_ROUTES, health.routes, openapi.routes):
        # `100 Continue` only once a handler wants the body, after its checks.
        app.add_routes(edge.continue_later(table))
    metrics.install(app, dict(zip(CONTRACTS, CONTRACT_ROUTES, strict=True)))
    edge.install(app, config)  # per-credential rate limit, when configured
    connection_guard.install(app)  # tells the connection watchdog where requests begin
    tracing.install(app)  # first middleware, when OTEL_EXPORTER_OTLP_ENDPOINT is set
    return app
