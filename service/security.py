"""TLS for the gRPC port and the optional bearer token for internal gRPC clients.

Service: JOBWIRE_GRPC_TLS_CERT + JOBWIRE_GRPC_TLS_KEY (PEM files) serve TLS;
JOBWIRE_GRPC_TLS_CLIENT_CA also requires client certificates signed by it (mTLS).
JOBWIRE_GRPC_TOKEN: every call except the health service must carry
`authorization: Bearer <token>` (compared in constant time), else UNAUTHENTICATED.

Clients (the CLI here; the bridge has its own copy in http_bridge/service_channel.py):
JOBWIRE_SERVICE_TLS_CA (trust this CA; "system" for the system roots),
JOBWIRE_SERVICE_TLS_CERT / JOBWIRE_SERVICE_TLS_KEY (client certificate for mTLS),
JOBWIRE_SERVICE_TLS_SERVER_NAME (expected name in the server certificate, when the
target address differs) and JOBWIRE_GRPC_TOKEN (sent as the bearer token).
"""

from __future__ import annotations

import hmac
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

HEALTH_PREFIX = "/grpc.health.v1.Health/"
if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]
else:
    Handler = grpc.RpcMethodHandler
_KINDS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SystemExit(f"cannot read {what} {path!r}: {exc.strerror}") from None


def server_credentials(cert: str, key: str, client_ca: str = "") -> grpc.ServerCredentials | None:
    """TLS credentials from PEM files, or None when neither cert nor key is set."""
    if not cert and not key:
        if client_ca:
            raise SystemExit("JOBWIRE_GRPC_TLS_CLIENT_CA needs JOBWIRE_GRPC_TLS_CERT and _KEY")
        return None
    if not (cert and key):
        raise SystemExit("set both JOBWIRE_GRPC_TLS_CERT and JOBWIRE_GRPC_TLS_KEY (or neither)")
    pair = (_read(key, "JOBWIRE_GRPC_TLS_KEY"), _read(cert, "JOBWIRE_GRPC_TLS_CERT"))
    ca = _read(client_ca, "JOBWIRE_GRPC_TLS_CLIENT_CA") if client_ca else None
    return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=bool(ca))


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls without `authorization: Bearer <token>` (health checks exempt)."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    def allowed(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> bool:
        ok = False
        for key, value in metadata or ():
            if key.lower() == "authorization":
                given = value.encode() if isinstance(value, str) else bytes(value)
                ok |= hmac.compare_digest(given, self._expected)
        return ok

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(HEALTH_PREFIX):
            return handler
        if self.allowed(handler_call_details.invocation_metadata):
            return handler
        return _deny(handler)


_DENIED = "missing or invalid bearer token (authorization metadata)"


async def _deny_unary(request: Any, context: Any) -> Any:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, _DENIED)


async def _deny_stream(request: Any, context: Any) -> AsyncIterator[Any]:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, _DENIED)
    yield  # pragma: no cover - abort raises


def _deny(handler: Handler) -> Handler:
    h: Any = handler
    for kind in _KINDS:
        if getattr(h, kind) is None:
            continue
        factory = getattr(grpc, f"{kind}_rpc_method_handler")
        behavior = _deny_stream if kind.endswith("_stream") else _deny_unary
        denied: Handler = factory(
            behavior,
            request_deserializer=h.request_deserializer,
            response_serializer=h.response_serializer,
        )
        return denied
    return handler


# -- clients -----------------------------------------------------------------------


def client_credentials(env: Mapping[str, str] | None = None) -> grpc.ChannelCredentials | None:
    """Channel credentials from JOBWIRE_SERVICE_TLS_*, or None for plaintext."""
    env = os.environ if env is None else env
    ca = env.get("JOBWIRE_SERVICE_TLS_CA", "")
    cert = env.get("JOBWIRE_SERVICE_TLS_CERT", "")
    key = env.get("JOBWIRE_SERVICE_TLS_KEY", "")
    if not ca and not cert:
        return None
    if bool(cert) != bool(key):
        raise SystemExit("set both JOBWIRE_SERVICE_TLS_CERT and JOBWIRE_SERVICE_TLS_KEY")
    roots = None if ca in ("", "system") else _read(ca, "JOBWIRE_SERVICE_TLS_CA")
    return grpc.ssl_channel_credentials(
        root_certificates=roots,
        private_key=_read(key, "JOBWIRE_SERVICE_TLS_KEY") if key else None,
        certificate_chain=_read(cert, "JOBWIRE_SERVICE_TLS_CERT") if cert else None,
    )


def client_options(env: Mapping[str, str] | None = None) -> list[tuple[str, Any]]:
    env = os.environ if env is None else env
    name = env.get("JOBWIRE_SERVICE_TLS_SERVER_NAME", "")
    return [("grpc.ssl_target_name_override", name)] if name else []


def call_metadata(env: Mapping[str, str] | None = None) -> tuple[tuple[str, str], ...]:
    """The metadata every call of an internal client carries (the bearer token)."""
    env = os.environ if env is None else env
    token = env.get("JOBWIRE_GRPC_TOKEN", "")
    return (("authorization", f"Bearer {token}"),) if token else ()


def aio_channel(target: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
    """A grpc.aio channel to the service with TLS and the bearer token as configured."""
    creds = client_credentials()
    opts = [*options, *client_options()]
    interceptors = _token_interceptors()
    if creds is None:
        return grpc.aio.insecure_channel(target, options=opts, interceptors=interceptors)
    return grpc.aio.secure_channel(target, creds, options=opts, interceptors=interceptors)


def sync_channel(target: str) -> grpc.Channel:
    """A blocking channel for health checks (exempt from the token), TLS as configured."""
    creds = client_credentials()
    if creds is None:
        return grpc.insecure_channel(target)
    return grpc.secure_channel(target, creds, options=client_options())


def _token_interceptors() -> list[grpc.aio.ClientInterceptor]:
    metadata = call_metadata()
    return [*_aio_metadata_interceptors(metadata)] if metadata else []


def _aio_metadata_interceptors(
    metadata: tuple[tuple[str, str], ...],
) -> list[grpc.aio.ClientInterceptor]:
    def add(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        merged = grpc.aio.Metadata(*(details.metadata or ()), *metadata)
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

    class StreamStream(grpc.aio.StreamStreamClientInterceptor):
        async def intercept_stream_stream(
            self, continuation: Any, details: Any, request_iterator: Any
        ) -> Any:
            return await continuation(add(details), request_iterator)

    return [UnaryUnary(), UnaryStream(), StreamUnary(), StreamStream()]
