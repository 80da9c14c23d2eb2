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
from typing import Any

import grpc

from jobwire.client.channel import (
    TLS,
    open_channel,
    open_sync_channel,
    token_from_env,
)
from jobwire.client.errors import ClientConfigError

from . import tracing
from .metrics import REQUEST_ID


def service_channel(
    target: str,
    options: Sequence[tuple[str, Any]] = (),
    env: Mapping[str, str] | None = None,
    interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
) -> grpc.aio.Channel:
    """A grpc.aio channel to the service: TLS, token and request id as configured;
    `interceptors` run after tracing's."""
    env = os.environ if env is None else env
    try:
        return open_channel(
            target,
            tls=tls_from_env(env),
            token=token_from_env(env),
            options=options,
            request_id=REQUEST_ID.get,
            # Tracing's none unless it is on.
            interceptors=[*tracing.client_interceptors(), *interceptors],
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
            tls.credentials()  # built now, not at the first call
    except ClientConfigError as err:
        raise SystemExit(str(err)) from None
    return tls
