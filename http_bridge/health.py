"""`/healthz` (the bridge process answers) and `/readyz` (the service reports SERVING)."""

from __future__ import annotations

import grpc
from aiohttp import web
from grpc_health.v1 import health_pb2

from jobwire.client.channel import token_refused
from jobwire.v1 import job_service_pb2

from .errors import TOKEN_REFUSED, from_rpc_error, json_response
from .grpc_client import CONFIG, HEALTH, STUB

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
    # The health service takes no token: a call that does tells whether the service
    # takes the bridge's (one indexed read, answered OK: no error in its metrics). With
    # the wrong token every callback failed, and the bridge said it was ready.
    try:
        probe = job_service_pb2.ListJobsRequest(page_size=1)
        await request.app[STUB].ListJobs(probe, timeout=READY_TIMEOUT)
    except grpc.aio.AioRpcError as exc:
        if token_refused(exc):
            from_rpc_error(exc)  # logs it for the operator
            return json_response({"status": "unavailable", "reason": TOKEN_REFUSED}, 503, retry)
    return json_response({"status": "ready"})
