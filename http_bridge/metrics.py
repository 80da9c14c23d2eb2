"""Bridge operations: `/metrics`, callbacks counted by contract and status, request ids,
and the channel to the service with TLS and the internal bearer token.

- jobwire_bridge_callbacks_total{contract,status}: answered contract requests
  (contract = aws_batch, video_worker, aurora, secretary)
- jobwire_bridge_request_duration_seconds{contract}: their latency
- X-Request-ID: taken from the request when well-formed (else a new one), echoed
  on the response, stamped on log records (`request_id`) and sent to the service as
  gRPC metadata `x-request-id`.
- Channel: JOBWIRE_SERVICE_TLS_CA ("system" = system roots), JOBWIRE_SERVICE_TLS_CERT
  and _KEY (mTLS), JOBWIRE_SERVICE_TLS_SERVER_NAME, JOBWIRE_GRPC_TOKEN (bearer token).
"""

from __future__ import annotations

import contextvars
import logging
import os
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar(
    "jobwire_bridge_request_id", default=""
)
HEADER = "X-Request-ID"
_VALID_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

CALLBACKS = Counter(
    "jobwire_bridge_callbacks", "Answered worker callbacks by contract and HTTP status",
    ["contract", "status"],
)  # fmt: skip
LATENCY = Histogram(
    "jobwire_bridge_request_duration_seconds",
    "Latency of worker callbacks by contract",
    ["contract"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
CONTRACTS: web.AppKey[dict[str, str]] = web.AppKey("jobwire_contract_of_route", dict)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def install(app: web.Application, contracts: Mapping[str, web.RouteTableDef]) -> None:
    """Adds the middleware and GET /metrics; `contracts` names each route table."""
    app[CONTRACTS] = {
        f"{route.method} {route.path}": name
        for name, table in contracts.items()
        for route in table
        if isinstance(route, web.RouteDef)
    }
    app.middlewares.append(observe)
    app.router.add_get("/metrics", metrics)
    _stamp_log_records()


@web.middleware
async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    given = request.headers.get(HEADER, "")
    request_id = given if _VALID_ID.fullmatch(given) else uuid.uuid4().hex
    REQUEST_ID.set(request_id)
    route = request.match_info.route.resource
    canonical = route.canonical if route is not None else ""
    contract = request.app[CONTRACTS].get(f"{request.method} {canonical}", "")
    start = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
    except web.HTTPException as exc:
        status = exc.status
        exc.headers[HEADER] = request_id
        raise
    finally:
        if contract:
            CALLBACKS.labels(contract, str(status)).inc()
            LATENCY.labels(contract).observe(time.perf_counter() - start)
    if not response.prepared:
        response.headers[HEADER] = request_id
    return response


async def metrics(_: web.Request) -> web.Response:
    body = generate_latest()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


_stamped = False


def _stamp_log_records() -> None:
    global _stamped
    if _stamped:
        return
    _stamped = True
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        if not getattr(record, "request_id", ""):
            value = REQUEST_ID.get()
            if value:
                record.request_id = value
        return record

    logging.setLogRecordFactory(factory)


# -- the channel to the service -----------------------------------------------------


def _read(path: str, name: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SystemExit(f"cannot read {name} {path!r}: {exc.strerror}") from None


def service_channel(
    target: str, options: Sequence[tuple[str, Any]] = (), env: Mapping[str, str] | None = None
) -> grpc.aio.Channel:
    """The channel to the service: TLS as configured, token and request id on each call."""
    env = os.environ if env is None else env
    ca = env.get("JOBWIRE_SERVICE_TLS_CA", "")
    cert = env.get("JOBWIRE_SERVICE_TLS_CERT", "")
    key = env.get("JOBWIRE_SERVICE_TLS_KEY", "")
    name = env.get("JOBWIRE_SERVICE_TLS_SERVER_NAME", "")
    token = env.get("JOBWIRE_GRPC_TOKEN", "")
    opts = [*options, *([("grpc.ssl_target_name_override", name)] if name else [])]
    interceptors = _metadata_interceptors(("authorization", f"Bearer {token}") if token else None)
    if not ca and not cert:
        return grpc.aio.insecure_channel(target, options=opts, interceptors=interceptors)
    if bool(cert) != bool(key):
        raise SystemExit("set both JOBWIRE_SERVICE_TLS_CERT and JOBWIRE_SERVICE_TLS_KEY")
    creds = grpc.ssl_channel_credentials(
        root_certificates=None if ca in ("", "system") else _read(ca, "JOBWIRE_SERVICE_TLS_CA"),
        private_key=_read(key, "JOBWIRE_SERVICE_TLS_KEY") if key else None,
        certificate_chain=_read(cert, "JOBWIRE_SERVICE_TLS_CERT") if cert else None,
    )
    return grpc.aio.secure_channel(target, creds, options=opts, interceptors=interceptors)


def _metadata_interceptors(token: tuple[str, str] | None) -> list[grpc.aio.ClientInterceptor]:
    def add(details: Any) -> Any:
        extra: list[tuple[str, str]] = [token] if token else []
        request_id = REQUEST_ID.get()
        if request_id:
            extra.append(("x-request-id", request_id))
        if not extra:
            return details
        merged = grpc.aio.Metadata(*(details.metadata or ()), *extra)
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, merged, details.credentials, details.wait_for_ready
        )

    class UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
        async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
            return await continuation(add(details), request)

    class UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
        async def intercept_unary_stream(
            self, continuation: Any, details: Any, request: Any
        ) -> Any:
            return await continuation(add(details), request)

    class StreamUnary(grpc.aio.StreamUnaryClientInterceptor):
        async def intercept_stream_unary(
            self, continuation: Any, details: Any, request_iterator: Any
        ) -> Any:
            return await continuation(add(details), request_iterator)

    return [UnaryUnary(), UnaryStream(), StreamUnary()]
