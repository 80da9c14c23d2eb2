"""`/healthz` (the bridge process answers) and `/readyz` (the service reports SERVING)."""

from __future__ import annotations

import grpc
from aiohttp import web
from grpc_health.v1 import health_pb2

from jobwire.client.channel import refuses_our_token

from .errors import TOKEN_REFUSED, json_response, note_token_refused
from .grpc_client import CHANNEL, CONFIG, HEALTH

routes = web.RouteTableDef()
SERVICE_NAME = "jobwire.v1.JobService"
READY_TIMEOUT = 2.0


@routes.get("/healthz")
async def healthz(_: web.Request) -> web.StreamResponse:
    return json_response({"status": "ok"})


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.StreamResponse:
    retry = {"Retry-After": str(request.app[CONFIG].retry_after_seconds)}
    try:
        answer = await request.app[HEALTH].Check(
            health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=READY_TIMEOUT
        )
    except grpc.aio.AioRpcError as exc:
        return json_response({"status": "unavailable", "reason": exc.code().name}, 503, retry)
    if answer.status != health_pb2.HealthCheckResponse.SERVING:
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
        return json_response({"status": "unavailable", "reason": status}, 503, retry)
    # With the wrong token every callback failed, and the bridge said it was ready.
    if await refuses_our_token(request.app[CHANNEL], READY_TIMEOUT):
        note_token_refused()
        return json_response({"status": "unavailable", "reason": TOKEN_REFUSED}, 503, retry)
    return json_response({"status": "ready"})
