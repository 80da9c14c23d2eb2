"""The channel to the service: TLS, the bearer token and a request id on every call.

Shared by the client library, the CLI and the HTTP bridge, so the three speak to the
service the same way. The environment form (`TLS.from_env`, `token_from_env`) reads
the variables the CLI and the bridge document: JOBWIRE_SERVICE_TLS_CA (trust this CA;
"system" for the system roots), JOBWIRE_SERVICE_TLS_CERT / _KEY (client certificate
for mTLS), JOBWIRE_SERVICE_TLS_SERVER_NAME (expected name in the server certificate
when the target address differs) and JOBWIRE_GRPC_TOKEN (`authorization: Bearer`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from .errors import ClientConfigError

# Artifacts move in 1 MiB chunks; 8 MiB leaves room for any header or batch.
MAX_MESSAGE = 8 * 1024 * 1024
DEFAULT_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.keepalive_time_ms", 30_000),
    # Reconnect quickly after the service restarts.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
    # Calls spread over every address the target resolves to (a headless Service: each
    # replica). gRPC's default, pick_first, sent every call to the first one.
    ("grpc.service_config", '{"loadBalancingConfig": [{"round_robin": {}}]}'),
)

PemSource = str | os.PathLike[str] | bytes


@dataclass(frozen=True)
class TLS:
    """TLS to the service. Each PEM is a path or the PEM bytes themselves.

    `ca=None` trusts the system roots; `cert` + `key` present a client certificate
    (mTLS); `server_name` is the name expected in the server's certificate when it
    differs from the target's host.
    """

    ca: PemSource | None = None
    cert: PemSource | None = None
    key: PemSource | None = field(default=None, repr=False)
    server_name: str = ""

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ClientConfigError("TLS needs both cert and key for a client certificate")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> TLS | None:
        """The JOBWIRE_SERVICE_TLS_* settings, or None when they ask for plaintext."""
        env = os.environ if env is None else env
        ca = env.get("JOBWIRE_SERVICE_TLS_CA", "")
        cert = env.get("JOBWIRE_SERVICE_TLS_CERT", "")
        key = env.get("JOBWIRE_SERVICE_TLS_KEY", "")
        if not ca and not cert and not key:
            if env.get("JOBWIRE_SERVICE_TLS_SERVER_NAME", ""):
                # A name to check in the server's certificate means TLS was meant: the
                # channel would have been plaintext, the token sent in the clear.
                raise ClientConfigError(
                    "JOBWIRE_SERVICE_TLS_SERVER_NAME is set but TLS is not: set"
                    " JOBWIRE_SERVICE_TLS_CA (a CA file, or 'system' for the system roots)"
                )
            return None
        if bool(cert) != bool(key):  # a key alone meant mTLS too: plaintext before
            raise ClientConfigError("set both JOBWIRE_SERVICE_TLS_CERT and JOBWIRE_SERVICE_TLS_KEY")
        # Read here, once: a file that cannot serve is named by its variable.
        return cls(
            ca=None if ca in ("", "system") else _env_pem("JOBWIRE_SERVICE_TLS_CA", ca),
            cert=_env_pem("JOBWIRE_SERVICE_TLS_CERT", cert) if cert else None,
            key=_env_pem("JOBWIRE_SERVICE_TLS_KEY", key, "private key") if key else None,
            server_name=env.get("JOBWIRE_SERVICE_TLS_SERVER_NAME", ""),
        )

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_pem(self.ca, "ca"),
            private_key=_pem(self.key, "key"),
            certificate_chain=_pem(self.cert, "cert"),
        )

    def options(self) -> list[tuple[str, Any]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


_VISIBLE = re.compile(r"[\x21-\x7e]*")


def check_token(token: str | None) -> str | None:
    """`token`, refused by name (never echoed) unless visible ASCII: grpc fails every
    call that carries such a header with a bare ExecuteBatchError, and the usual cause
    is a token read from a file with its line break."""
    if token is not None and not _VISIBLE.fullmatch(token):
        raise ClientConfigError(
            "the gRPC token (token=, JOBWIRE_GRPC_TOKEN) must be visible ASCII with no"
            " spaces or line breaks (a trailing newline from a file?)"
        )
    return token


def check_options(options: Iterable[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """`options` (gRPC channel arguments) as a list of (name, value) pairs; else
    ClientConfigError naming what is wrong. A malformed one failed in the middle of
    building the channel with Python's own words, naming no argument (and a generator
    was used up by the first of the two reads of it: the channel got none)."""
    if isinstance(options, str | bytes) or not isinstance(options, Iterable):
        raise ClientConfigError(
            f"options must be a sequence of (name, value) pairs, got {options!r}"
        )
    pairs = list(options)
    for pair in pairs:
        if not (isinstance(pair, tuple | list) and len(pair) == 2 and isinstance(pair[0], str)):
            raise ClientConfigError(f"options must be (name, value) pairs, got {pair!r}")
    for name, value in pairs:
        # The one the client reads itself, to bound its wait for a reconnect.
        if name == "grpc.max_reconnect_backoff_ms" and (
            isinstance(value, bool) or not isinstance(value, int) or value <= 0
        ):
            raise ClientConfigError(
                f"option {name} must be a whole number of milliseconds > 0, got {value!r}"
            )
    return [(name, value) for name, value in pairs]


def reconnect_wait(options: Sequence[tuple[str, Any]] = ()) -> float:
    """Seconds within which a channel with these `options` tries to connect again: its
    maximum reconnect backoff, gRPC's 20 % jitter, and half a second to connect."""
    merged = dict([*DEFAULT_OPTIONS, *options])
    return float(merged["grpc.max_reconnect_backoff_ms"]) / 1000 * 1.2 + 0.5


def token_from_env(env: Mapping[str, str] | None = None) -> str | None:
    env = os.environ if env is None else env
    return env.get("JOBWIRE_GRPC_TOKEN", "") or None


def open_channel(
    target: str,
    *,
    tls: TLS | None = None,
    token: str | None = None,
    options: Sequence[tuple[str, Any]] = (),
    request_id: Callable[[], str] | None = None,
    interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
) -> grpc.aio.Channel:
    """A grpc.aio channel: TLS when given, the token and `request_id()` on every call;
    `interceptors` (e.g. tracing) run first, outside those that add the metadata."""
    # One entry per key, the last given winning: gRPC keeps the first of two equal
    # keys, so `options` could not override a default (a keepalive, a message limit).
    opts = list(dict([*DEFAULT_OPTIONS, *options, *(tls.options() if tls else [])]).items())
    auth = ("authorization", f"Bearer {check_token(token)}") if token else None
    interceptors = [*interceptors, *metadata_interceptors(auth, request_id)]
    if tls is None:
        return grpc.aio.insecure_channel(target, options=opts, interceptors=interceptors)
    return grpc.aio.secure_channel(
        target, tls.credentials(), options=opts, interceptors=interceptors
    )


def open_sync_channel(target: str, *, tls: TLS | None = None) -> grpc.Channel:
    """A blocking channel for health checks (exempt from the token)."""
    if tls is None:
        return grpc.insecure_channel(target)
    return grpc.secure_channel(target, tls.credentials(), options=tls.options())


# What each PEM must hold: a file that is not PEM got only gRPC's own errors on stderr
# (a server then blamed its listen address; a client failed every call).
_PEM_BLOCKS = {
    "certificate": re.compile(rb"-----BEGIN (?:X509 |TRUSTED )?CERTIFICATE-----"),
    "private key": re.compile(rb"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----"),
}


# Trailing metadata on the service's UNAUTHENTICATED for a call without its
# JOBWIRE_GRPC_TOKEN: the caller's own credential was refused, not a job's callback
# token (also UNAUTHENTICATED), so a bridge can say so instead of blaming its worker.
REFUSED_TOKEN = ("jobwire-refused", "grpc-token")


def token_refused(exc: grpc.aio.AioRpcError) -> bool:
    """The service refused this caller's JOBWIRE_GRPC_TOKEN (missing or wrong)."""
    return exc.code() == grpc.StatusCode.UNAUTHENTICATED and REFUSED_TOKEN in tuple(
        exc.trailing_metadata() or ()
    )


# gRPC reflection's one method, every jobwire process serves it behind the token check.
_REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"


async def refuses_our_token(channel: grpc.aio.Channel, timeout: float) -> bool:
    """Whether the service refuses the JOBWIRE_GRPC_TOKEN of `channel`, for readiness
    probes. Its health service takes no token, so a readiness check that asks only
    health said ready while every call failed. This asks gRPC reflection for the
    service list: the token check comes before it, and it is answered from memory (a
    ListJobs of one job read the store on every probe, every 5 s per pod). Any other
    failure is not the token's: the health check answers for those."""
    from grpc_reflection.v1alpha import reflection_pb2

    # Called as unary-stream (the same on the wire: one request, then the half-close):
    # as a bidi stream, grpc.aio's request sender could race the service's refusal and
    # fail the call with INTERNAL "Failed execute_batch", hiding the refusal's marker.
    ask = channel.unary_stream(
        _REFLECTION,
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    try:
        async for _ in ask(
            reflection_pb2.ServerReflectionRequest(list_services=""), timeout=timeout
        ):
            pass  # one answer, then the stream ends OK
    except grpc.aio.AioRpcError as exc:
        return token_refused(exc)
    return False


def pem_problem(data: bytes, holds: str) -> str | None:
    """Why `data` is not a PEM `holds` ("certificate", "private key"); None when it is."""
    if _PEM_BLOCKS[holds].search(data):
        return None
    block = "-----BEGIN CERTIFICATE-----" if holds == "certificate" else "PRIVATE KEY"
    return f"is not a PEM {holds} (no {block} block)"


def _env_pem(var: str, path: str, holds: str = "certificate") -> bytes:
    """The PEM file a JOBWIRE_SERVICE_TLS_* variable names; ClientConfigError naming the
    variable when it cannot be read or does not hold `holds`."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ClientConfigError(f"cannot read {var} {path!r}: {exc.strerror}") from None
    if (problem := pem_problem(data, holds)) is not None:
        raise ClientConfigError(f"{var} {path!r} {problem}")
    return data


def _pem(source: PemSource | None, what: str) -> bytes | None:
    if source is None:
        return None
    if isinstance(source, bytes):
        data, shown = source, f"the TLS {what} given as bytes"
    else:
        try:
            data = Path(source).read_bytes()
        except OSError as exc:
            raise ClientConfigError(
                f"cannot read the TLS {what} {str(source)!r}: {exc.strerror}"
            ) from None
        shown = f"the TLS {what} {str(source)!r}"
    problem = pem_problem(data, "private key" if what == "key" else "certificate")
    if problem is not None:
        raise ClientConfigError(f"{shown} {problem}")
    return data


def metadata_interceptors(
    token: tuple[str, str] | None, request_id: Callable[[], str] | None = None
) -> list[grpc.aio.ClientInterceptor]:
    """Adds the token and the current request id (when any) to every call's metadata."""

    def add(details: Any) -> Any:
        extra: list[tuple[str, str]] = [token] if token else []
        rid = request_id() if request_id is not None else ""
        if rid:
            extra.append(("x-request-id", rid))
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
