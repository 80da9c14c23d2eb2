"""The bridge's (and the dashboard's) channel to the service: the client library's
channel (jobwire.client.channel: TLS, token, request id) configured from the
environment, with the bridge's current request id on every call.

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

from jobwire.client.channel import (
    TLS,
    open_channel,
    open_sync_channel,
    pem_problem,
    token_from_env,
)
from jobwire.client.errors import ClientConfigError

from . import tracing
from .metrics import REQUEST_ID


def service_channel(
    target: str, options: Sequence[tuple[str, Any]] = (), env: Mapping[str, str] | None = None
) -> grpc.aio.Channel:
    """A grpc.aio channel to the service: TLS, token and request id as configured."""
    env = os.environ if env is None else env
    try:
        return open_channel(
            target,
            tls=tls_from_env(env),
            token=token_from_env(env),
            options=options,
            request_id=REQUEST_ID.get,
            interceptors=tracing.client_interceptors(),  # none unless tracing is on
        )
    except ClientConfigError as err:  # a token no header can carry: stop, naming it
        raise SystemExit(str(err)) from None


def sync_channel(target: str, env: Mapping[str, str] | None = None) -> grpc.Channel:
    """A blocking channel for health checks (exempt from the token), TLS as configured."""
    return open_sync_channel(target, tls=tls_from_env(os.environ if env is None else env))


def tls_from_env(env: Mapping[str, str]) -> TLS | None:
    """JOBWIRE_SERVICE_TLS_*; a process started with unusable settings stops, naming them."""
    try:
        tls = TLS.from_env(env)
        if tls is not None:
            check_pem_files(env)  # naming the variables, where the library names a file
            tls.credentials()  # reads the files now, not at the first call
    except ClientConfigError as err:
        raise SystemExit(str(err)) from None
    return tls


def check_pem_files(env: Mapping[str, str]) -> None:
    """Each JOBWIRE_SERVICE_TLS_* file holds what it names: one that is not PEM (a CA
    that is not a certificate) started the process, and every call then failed with
    gRPC's "Cannot load server root certificates" on stderr."""
    for var, holds in (
        ("JOBWIRE_SERVICE_TLS_CA", "certificate"),
        ("JOBWIRE_SERVICE_TLS_CERT", "certificate"),
        ("JOBWIRE_SERVICE_TLS_KEY", "private key"),
    ):
        path = env.get(var, "")
        if not path or (var == "JOBWIRE_SERVICE_TLS_CA" and path == "system"):
            continue
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise SystemExit(f"cannot read {var} {path!r}: {exc.strerror}") from None
        if (problem := pem_problem(data, holds)) is not None:
            raise SystemExit(f"{var} {path!r} {problem}")
