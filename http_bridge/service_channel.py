"""The client side of the service's gRPC port, shared by the bridge and the CLI.

TLS as configured, the internal bearer token and the request id on every call:
JOBWIRE_SERVICE_TLS_CA (trust this CA; "system" for the system roots),
JOBWIRE_SERVICE_TLS_CERT / _KEY (client certificate for mTLS),
JOBWIRE_SERVICE_TLS_SERVER_NAME (expected name in the server certificate when the
target address differs) and JOBWIRE_GRPC_TOKEN (sent as `authorization: Bearer`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc

from .metrics import REQUEST_ID


def service_channel(
    target: str, options: Sequence[tuple[str, Any]] = (), env: Mapping[str, str] | None = None
) -> grpc.aio.Channel:
    """A grpc.aio channel to the service: TLS, token and request id as configured."""
    env = os.environ if env is None else env
    creds = client_credentials(env)
    opts = [*options, *_client_options(env)]
    token = env.get("JOBWIRE_GRPC_TOKEN", "")
    interceptors = metadata_interceptors(("authorization", f"Bearer {token}") if token else None)
    if creds is None:
        return grpc.aio.insecure_channel(target, options=opts, interceptors=interceptors)
    return grpc.aio.secure_channel(target, creds, options=opts, interceptors=interceptors)


def sync_channel(target: str, env: Mapping[str, str] | None = None) -> grpc.Channel:
    """A blocking channel for health checks (exempt from the token), TLS as configured."""
    env = os.environ if env is None else env
    creds = client_credentials(env)
    if creds is None:
        return grpc.insecure_channel(target)
    return grpc.secure_channel(target, creds, options=_client_options(env))


def client_credentials(env: Mapping[str, str]) -> grpc.ChannelCredentials | None:
    """Channel credentials from JOBWIRE_SERVICE_TLS_*, or None for plaintext."""
    ca = env.get("JOBWIRE_SERVICE_TLS_CA", "")
    cert = env.get("JOBWIRE_SERVICE_TLS_CERT", "")
    key = env.get("JOBWIRE_SERVICE_TLS_KEY", "")
    if not ca and not cert:
        return None
    if bool(cert) != bool(key):
        raise SystemExit("set both JOBWIRE_SERVICE_TLS_CERT and JOBWIRE_SERVICE_TLS_KEY")
    return grpc.ssl_channel_credentials(
        root_certificates=None if ca in ("", "system") else _read(ca, "JOBWIRE_SERVICE_TLS_CA"),
        private_key=_read(key, "JOBWIRE_SERVICE_TLS_KEY") if key else None,
        certificate_chain=_read(cert, "JOBWIRE_SERVICE_TLS_CERT") if cert else None,
    )


def _client_options(env: Mapping[str, str]) -> list[tuple[str, Any]]:
    name = env.get("JOBWIRE_SERVICE_TLS_SERVER_NAME", "")
    return [("grpc.ssl_target_name_override", name)] if name else []


def _read(path: str, name: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SystemExit(f"cannot read {name} {path!r}: {exc.strerror}") from None


def metadata_interceptors(token: tuple[str, str] | None) -> list[grpc.aio.ClientInterceptor]:
    """Adds the token and the current request id (when any) to every call's metadata."""

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

    class StreamStream(grpc.aio.StreamStreamClientInterceptor):
        async def intercept_stream_stream(
            self, continuation: Any, details: Any, request_iterator: Any
        ) -> Any:
            return await continuation(add(details), request_iterator)

    return [UnaryUnary(), UnaryStream(), StreamUnary(), StreamStream()]
