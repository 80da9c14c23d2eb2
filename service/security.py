"""TLS for the gRPC port and the optional bearer token for internal gRPC clients.

Service: JOBWIRE_GRPC_TLS_CERT + JOBWIRE_GRPC_TLS_KEY (PEM files) serve TLS;
JOBWIRE_GRPC_TLS_CLIENT_CA also requires client certificates signed by it (mTLS).
JOBWIRE_GRPC_TOKEN: every call except the health service must carry
`authorization: Bearer <token>` (compared in constant time), else UNAUTHENTICATED.

Clients (jobwire.client, the CLI, the bridge and the dashboard) build their channel
with client/channel.py (the bridge's http_bridge/service_channel.py wraps it).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc

from jobwire.client.channel import REFUSED_TOKEN, pem_problem

from .grpc_handlers import Handler, replace_behavior

HEALTH_PREFIX = "/grpc.health.v1.Health/"


def _read(path: str, what: str, holds: str = "certificate") -> bytes:
    """The file's bytes, which must hold a PEM `holds` ("certificate", "private key")."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SystemExit(f"cannot read {what} {path!r}: {exc.strerror}") from None
    # gRPC's own errors for a file that is not PEM named nothing, then "cannot listen
    # on JOBWIRE_GRPC_ADDR" (the wrong variable).
    if (problem := pem_problem(data, holds)) is not None:
        raise SystemExit(f"{what} {path!r} {problem}")
    return data


def server_credentials(cert: str, key: str, client_ca: str = "") -> grpc.ServerCredentials | None:
    """TLS credentials from PEM files, or None when neither cert nor key is set."""
    if not cert and not key:
        if client_ca:
            raise SystemExit("JOBWIRE_GRPC_TLS_CLIENT_CA needs JOBWIRE_GRPC_TLS_CERT and _KEY")
        return None
    if not (cert and key):
        raise SystemExit("set both JOBWIRE_GRPC_TLS_CERT and JOBWIRE_GRPC_TLS_KEY (or neither)")
    certs = _read(cert, "JOBWIRE_GRPC_TLS_CERT")
    pair = (_read(key, "JOBWIRE_GRPC_TLS_KEY", "private key"), certs)
    ca = _read(client_ca, "JOBWIRE_GRPC_TLS_CLIENT_CA") if client_ca else None
    return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=bool(ca))


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls without `authorization: Bearer <token>` (health checks exempt)."""

    def __init__(self, token: str) -> None:
        # Digests: compare_digest of unequal lengths returns at once (the token's length).
        self._expected = hashlib.sha256(token.encode()).digest()

    def allowed(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> bool:
        ok = False
        for key, value in metadata or ():
            if key.lower() == "authorization":
                given = value.encode() if isinstance(value, str) else bytes(value)
                # The scheme's case does not matter (RFC 9110 11.1): `bearer x` was refused.
                scheme, _, credentials = given.partition(b" ")
                digest = hashlib.sha256(credentials.lstrip(b" ")).digest()
                ok |= scheme.lower() == b"bearer" and hmac.compare_digest(digest, self._expected)
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
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, _DENIED, (REFUSED_TOKEN,))


async def _deny_stream(request: Any, context: Any) -> AsyncIterator[Any]:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, _DENIED, (REFUSED_TOKEN,))
    yield  # pragma: no cover - abort raises


def _deny(handler: Handler) -> Handler:
    return replace_behavior(
        handler, lambda kind, _: _deny_stream if kind.endswith("_stream") else _deny_unary
    )
