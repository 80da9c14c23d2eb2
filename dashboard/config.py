"""Dashboard configuration: environment first, then the local env file.

Closed by default: without JOBWIRE_DASHBOARD_TOKEN (and without a trusted user
header) every page and stream is refused. `load_config(generate=True)` (only
`jobwire run`) writes a random token into the env file, mode 600.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from http_bridge.config import (
    channel_env,
    generate_missing,
    merged_env,
    number,
    parse_addr,
    parse_rate,
    public_url,
    service_target,
    whole,
)

TOKEN_VAR = "JOBWIRE_DASHBOARD_TOKEN"
MIN_TOKEN_CHARS = 16  # below this a warning at start; the operator's choice still holds


@dataclass(frozen=True)
class DashboardConfig:
    host: str = "127.0.0.1"
    port: int = 8081
    service_target: str = "127.0.0.1:50051"
    token: str = field(default="", repr=False)
    # Header set by an authenticating proxy (oauth2-proxy: X-Forwarded-User); off unless set.
    trusted_user_header: str = ""
    # Base URL of the bridge as workers reach it, to show a job's callback URL.
    public_url: str = ""
    # Minimum time between two pushes to one browser tab (coalescing).
    push_interval_seconds: float = 0.2
    heartbeat_seconds: float = 15.0
    rpc_timeout_seconds: float = 10.0
    # On SIGTERM: how long requests in flight may take to finish (open streams end at
    # once); the service's variable, one grace for the whole stack (README "Deploy").
    shutdown_grace_seconds: float = 10.0
    # Sessions live this long; changing the token ends them all.
    session_seconds: int = 12 * 3600
    page_size: int = 50
    # The bridge's connection watchdog (http_bridge/connection_guard.py): a request
    # head must be complete within this long; connections beyond the cap get 503.
    header_timeout_seconds: float = 10.0
    max_connections: int = 1024
    # Wrong tokens (login form, Bearer) per client address: bursts of `login_burst`,
    # then `login_rate` a second; past it 429 for every token from there. 0: off, the
    # default: behind a proxy every client has the proxy's address, and one guesser
    # would hold up every new login (a generated token is 256 random bits).
    login_rate: float = 0.0
    login_burst: float = 0.0
    # Host names (optionally host:port) the dashboard answers to; empty: any. A page
    # opened by another site's DNS name pointed at the dashboard (DNS rebinding) is
    # same-origin for that site's script, which can then set the trusted user header.
    allowed_hosts: frozenset[str] = frozenset()
    # JOBWIRE_GRPC_TOKEN, JOBWIRE_SERVICE_TLS_* from the env file and the environment (as
    # the bridge's); None: the environment alone.
    service_env: Mapping[str, str] | None = field(default=None, repr=False)

    @property
    def closed(self) -> bool:
        return not self.token and not self.trusted_user_header

    def warnings(self) -> list[str]:
        """What an operator should hear at start (the token's value never)."""
        if self.closed:
            return [f"dashboard is closed: set {TOKEN_VAR} to open it"]
        said = []
        if self.trusted_user_header and not self.allowed_hosts:
            said.append(
                "JOBWIRE_DASHBOARD_TRUSTED_USER_HEADER is set without"
                " JOBWIRE_DASHBOARD_ALLOWED_HOSTS: a web page whose DNS name is pointed at"
                " this dashboard (DNS rebinding) could send that header itself; set the"
                " host names the proxy uses"
            )
        if 0 < len(self.token) < MIN_TOKEN_CHARS:
            said.append(
                f"{TOKEN_VAR} is {len(self.token)} characters: a short token can be guessed;"
                f" use {MIN_TOKEN_CHARS} or more (jobwire run generates 43)"
            )
        return said


def ensure_token(path: Path, present: Mapping[str, str]) -> dict[str, str]:
    """Appends a random JOBWIRE_DASHBOARD_TOKEN to `path` when none is set."""
    return generate_missing(path, present, [TOKEN_VAR], "the dashboard's login token")


def _login_token(value: str) -> str:
    """A token a login form or a Bearer header can carry: a secret file's trailing
    newline (or a space, a tab) made the right token 'Wrong token.' for ever. The
    message never shows the value."""
    if value and (not value.isprintable() or value != value.strip()):
        raise SystemExit(
            f"{TOKEN_VAR} must not hold line breaks, tabs or other control characters, nor"
            " start or end with a space (a secret file's trailing newline?): no login could"
            " match it"
        )
    return value


def load_config(env: Mapping[str, str] | None = None, *, generate: bool = False) -> DashboardConfig:
    env_file, merged = merged_env(env)
    if generate:
        merged.update(ensure_token(env_file, merged))
    host, port = parse_addr(
        merged.get("JOBWIRE_DASHBOARD_ADDR", "127.0.0.1:8081"), "JOBWIRE_DASHBOARD_ADDR"
    )
    login_rate, login_burst = parse_rate(
        merged.get("JOBWIRE_DASHBOARD_LOGIN_LIMIT", "off"), "JOBWIRE_DASHBOARD_LOGIN_LIMIT"
    )
    push_ms = number(merged, "JOBWIRE_DASHBOARD_PUSH_MS", 200, per_second=1000)
    return DashboardConfig(
        host=host,
        port=port,
        service_target=service_target(merged),
        token=_login_token(merged.get(TOKEN_VAR, "")),
        trusted_user_header=_header_name(merged, "JOBWIRE_DASHBOARD_TRUSTED_USER_HEADER"),
        public_url=public_url(merged.get("JOBWIRE_PUBLIC_URL", "")),
        push_interval_seconds=push_ms / 1000,
        heartbeat_seconds=number(merged, "JOBWIRE_DASHBOARD_HEARTBEAT_SECONDS", 15),
        shutdown_grace_seconds=number(merged, "JOBWIRE_SHUTDOWN_GRACE_SECONDS", 10.0, minimum=0),
        header_timeout_seconds=number(merged, "JOBWIRE_DASHBOARD_HEADER_TIMEOUT_SECONDS", 10),
        max_connections=whole(merged, "JOBWIRE_DASHBOARD_MAX_CONNECTIONS", 1024),
        login_rate=login_rate,
        login_burst=login_burst,
        allowed_hosts=_hosts(merged, "JOBWIRE_DASHBOARD_ALLOWED_HOSTS"),
        service_env=channel_env(merged),
    )


# A host name or IPv4 address, or a bracketed IPv6 one, and an optional port.
_HOST = re.compile(r"(?:[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?|\[[0-9a-f:.]+\])(?::[0-9]{1,5})?")


def _hosts(env: Mapping[str, str], name: str) -> frozenset[str]:
    """Comma-separated `host` or `host:port` entries, lower-cased; empty: any host."""
    entries = [part.strip().lower() for part in env.get(name, "").split(",")]
    hosts = frozenset(entry for entry in entries if entry)
    for entry in sorted(hosts):
        if not _HOST.fullmatch(entry):
            raise SystemExit(
                f"{name} must list host names (or host:port), comma-separated, such as"
                f" dash.example.com,dash.example.com:8443; got {entry!r}"
            )
    return hosts


def host_allowed(allowed: frozenset[str], host_header: str) -> bool:
    """Whether a request's Host header names an allowed host: an entry with a port
    matches that host and port, one without matches the host on any port."""
    if not allowed:
        return True
    host = host_header.strip().lower()
    if host in allowed:
        return bool(host)
    name, sep, port = host.rpartition(":")  # "[::1]:8081" -> "[::1]"
    return bool(sep) and port.isdigit() and name in allowed


# RFC 9110's token: a header name no request could carry would name nobody, silently.
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _header_name(env: Mapping[str, str], name: str) -> str:
    raw = env.get(name, "").strip()
    if raw and not _TOKEN.fullmatch(raw):
        raise SystemExit(
            f"{name} must be an HTTP header name such as X-Forwarded-User, got {raw!r}"
        )
    return raw
