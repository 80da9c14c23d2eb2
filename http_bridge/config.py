"""Bridge configuration: environment first, then the local env file, loaded once.

Secrets have no built-in default. When one is missing, `load_config(generate=True)`
writes fresh random values into the env file (mode 600) so a first `make run` works
without exposing an open endpoint; environment variables always win over the file.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from jobwire.client.client import check_target
from jobwire.client.errors import ClientConfigError
from jobwire.env_numbers import decimal_number, whole_number

from .workers import worker_count

log = logging.getLogger(__name__)

ENV_FILE_VAR = "JOBWIRE_ENV_FILE"
DEFAULT_ENV_FILE = "jobwire.env"
# Secrets the bridge may generate; TRANSCODE_ALLOWED_IPS is never invented.
GENERATED_SECRETS = ("BATCH_CALLBACK_SECRET", "API_KEY", "TRANSCODE_CALLBACK_TOKEN")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Config:
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    service_target: str = "127.0.0.1:50051"
    batch_callback_secret: str = field(default="", repr=False)
    api_key: str = field(default="", repr=False)
    transcode_callback_token: str = field(default="", repr=False)
    transcode_allowed_ips: tuple[IPNetwork, ...] = ()
    max_body_bytes: int = 1024 * 1024
    max_final_body_bytes: int = 256 * 1024 * 1024
    # Seconds advertised in Retry-After when the service or its storage is down.
    retry_after_seconds: int = 5
    # Deadline of each unary RPC; uploads get a longer one (see secretary).
    rpc_timeout_seconds: float = 30.0
    # On SIGTERM: how long requests in flight may take to finish (new connections are
    # refused at once); the service's variable, one grace for the whole stack.
    shutdown_grace_seconds: float = 10.0
    public_url: str = ""
    # Access log: "errors" (responses >= 400, the default: thousands of 200s a second
    # would cost the bridge a tenth of its CPU), "all", or "off".
    access_log: str = "errors"
    # The edge (http_bridge/edge.py, connection_guard.py): slow and greedy clients.
    header_timeout_seconds: float = 10.0
    body_timeout_seconds: float = 30.0
    body_min_rate_bytes: int = 4096  # each byte/s beyond this extends the body deadline
    keepalive_timeout_seconds: float = 30.0
    max_connections: int = 1000
    rate_limit: float = 0.0  # requests per second per credential; 0: off
    rate_burst: float = 0.0  # the N of `N/min`: bursts of N (0: max(1, rate_limit))
    # Standard Webhooks v1 secrets (raw key bytes) by contract: aws_batch, video_worker,
    # aurora, secretary. Several per contract while a key is being rotated.
    signing_secrets: Mapping[str, tuple[bytes, ...]] = field(default_factory=dict, repr=False)
    # The channel's settings (JOBWIRE_GRPC_TOKEN, JOBWIRE_SERVICE_TLS_*) from the env file
    # and the environment, as every other setting here; None: the environment alone.
    service_env: Mapping[str, str] | None = field(default=None, repr=False)
    # JOBWIRE_HTTP_WORKERS: processes serving the port (http_bridge/workers.py).
    http_workers: int = 1


def parse_addr(value: str, name: str) -> tuple[str, int]:
    """`host:port` from the variable `name`. A bare host was taken with `default_port`,
    where the README says an address is host:port and the service refuses one."""
    host, sep, port = value.rpartition(":")
    if not (sep and port.isascii() and port.isdigit() and int(port) <= 65535):
        raise SystemExit(f"{name} must be host:port (port 0-65535), got {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def http_url(host: str, port: int) -> str:
    """The URL of a listen address: an IPv6 host in brackets (RFC 3986 3.2.2); the
    start-up line said `http://::1:8080`, which no client takes."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def service_target(env: Mapping[str, str]) -> str:
    """JOBWIRE_SERVICE_TARGET, checked as the client library checks a target: gRPC
    dialled a port past 65535 modulo 65536 (another service, perhaps) and took a URL
    for a host name that never resolves, so every call failed UNAVAILABLE."""
    value = env.get("JOBWIRE_SERVICE_TARGET", "127.0.0.1:50051")
    try:
        return check_target(value)
    except ClientConfigError as err:
        raise SystemExit(f"JOBWIRE_SERVICE_TARGET: {err}") from None


def parse_networks(value: str) -> tuple[IPNetwork, ...]:
    """TRANSCODE_ALLOWED_IPS: comma-separated addresses or CIDR networks."""
    try:
        return tuple(
            ipaddress.ip_network(part.strip(), strict=False)
            for part in value.split(",")
            if part.strip()
        )
    except ValueError as exc:
        message = f"TRANSCODE_ALLOWED_IPS must be comma-separated addresses or networks: {exc}"
        raise SystemExit(f"{message}; got {value!r}") from None


def public_url(raw: str, name: str = "JOBWIRE_PUBLIC_URL") -> str:
    """An absolute http(s) URL: callback URLs handed to workers are built on it."""
    raw = raw.strip()
    scheme, sep, rest = raw.partition("://")
    if raw and not (sep and scheme.lower() in ("http", "https") and rest and rest[0] not in "/?#"):
        raise SystemExit(
            f"{name} must be an http(s) URL such as https://jobs.example.com, got {raw!r}"
        )
    return raw.rstrip("/")


def read_env_file(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    if not path.is_file():
        return values
    try:
        # utf-8-sig: a byte order mark (Windows editors) made the first line's name
        # "\ufeffAPI_KEY": that secret was never read, and `jobwire run` replaced it.
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        # A traceback before; a decode error names a byte's position, never a value.
        reason = err.strerror if isinstance(err, OSError) else f"not UTF-8 ({err.reason})"
        raise SystemExit(f"jobwire: cannot read {path} (JOBWIRE_ENV_FILE): {reason}") from None
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            key, value = _env_line(line)
        except ValueError as err:  # names the line and the variable, never the value
            raise SystemExit(
                f"jobwire: cannot read {path} (JOBWIRE_ENV_FILE): line {number}: {err}"
            ) from None
        values[key] = value
    return values


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _not_a_name(key: str) -> str:
    """What is wrong with the text before a line's `=`, without showing it: it may be
    a value (a secret wrapped onto a line of its own, cut at its base64 padding)."""
    if not key:
        return "no name before ="
    if key[0].isdigit():
        return "the name before = starts with a digit"
    wrong = next(c for c in key if not (c.isascii() and (c.isalnum() or c == "_")))
    return f"the name before = holds {wrong!r} (a name is A-Z, a-z, 0-9, _)"


def _env_line(line: str) -> tuple[str, str]:
    """One `NAME=value` line as Docker Compose reads an env file: a value in matching
    quotes is taken as is (`#` too); an unquoted one ends at ` #` (a comment). Read
    loosely, `API_KEY=k # rotated` made the key `k # rotated`, and a line without `=`
    was skipped: the operator's key was never used."""
    if "=" not in line:
        raise ValueError("expected NAME=value")
    key, _, value = line.partition("=")
    key = key.strip().removeprefix("export ").strip()
    if not _ENV_NAME.fullmatch(key):
        raise ValueError(_not_a_name(key))
    value = value.strip()
    if value[:1] in ("'", '"'):
        end = value.find(value[0], 1)
        if end < 0:
            raise ValueError(f"{key}'s value opens a quote it never closes")
        rest = value[end + 1 :].strip()
        if rest and not rest.startswith("#"):
            raise ValueError(f"{key}'s value has text after its closing quote")
        return key, value[1:end]
    comment = re.search(r"\s#", value)
    return key, (value[: comment.start()] if comment else value).rstrip()


def generate_missing(
    path: Path, present: Mapping[str, str], names: Sequence[str], what: str
) -> dict[str, str]:
    """Appends random values for the `names` missing from `present` to the env file
    `path` (mode 600); returns the new ones. Used by `jobwire run` for the bridge's
    secrets and the dashboard's token."""
    missing = [name for name in names if not present.get(name)]
    if not missing:
        return {}
    fresh = {name: secrets.token_urlsafe(32) for name in missing}
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        os.fchmod(fd, 0o600)  # before writing: an existing file may have been readable by all
        # A last line without its newline (`printf 'API_KEY=%s'`) would take the comment
        # below as part of its value: the operator's key changed without a word.
        size = os.fstat(fd).st_size
        unterminated = size > 0 and os.pread(fd, 1, size - 1) not in (b"\n", b"\r")
        with os.fdopen(fd, "a", encoding="utf-8") as fh:
            fh.write(("\n" if unterminated else "") + f"# generated by jobwire: {what}\n")
            fh.writelines(f"{name}={value}\n" for name, value in fresh.items())
    except OSError as err:
        raise SystemExit(
            f"jobwire: cannot write {what} to {path} (JOBWIRE_ENV_FILE): {err.strerror};"
            f" make it writable, set JOBWIRE_ENV_FILE to a writable file, or set"
            f" {', '.join(missing)} in the environment"
        ) from None
    # Only the path and the names: the values never reach a log or a terminal.
    print(f"jobwire: generated {', '.join(missing)} into {path.resolve()}")
    return fresh


def ensure_secrets(path: Path, present: Mapping[str, str]) -> dict[str, str]:
    """Appends random values for missing secrets to `path`; returns the new ones."""
    return generate_missing(path, present, GENERATED_SECRETS, "random secrets for the HTTP bridge")


def merged_env(env: Mapping[str, str] | None = None) -> tuple[Path, dict[str, str]]:
    """The env file and the settings: the file's values, overridden by the environment's
    non-empty ones (the environment always wins)."""
    environ = dict(os.environ if env is None else env)
    env_file = Path(environ.get(ENV_FILE_VAR, DEFAULT_ENV_FILE))
    merged = read_env_file(env_file)
    merged.update({k: v for k, v in environ.items() if v != ""})
    return env_file, merged


def load_config(env: Mapping[str, str] | None = None, *, generate: bool = False) -> Config:
    env_file, merged = merged_env(env)
    if generate:
        merged.update(ensure_secrets(env_file, merged))
    host, port = parse_addr(merged.get("JOBWIRE_HTTP_ADDR", "127.0.0.1:8080"), "JOBWIRE_HTTP_ADDR")
    rate, burst = parse_rate(merged.get("JOBWIRE_RATE_LIMIT", ""))
    return Config(
        http_host=host,
        http_port=port,
        service_target=service_target(merged),
        batch_callback_secret=body_secret(merged, "BATCH_CALLBACK_SECRET"),
        api_key=header_secret(merged, "API_KEY"),
        transcode_callback_token=header_secret(merged, "TRANSCODE_CALLBACK_TOKEN"),
        transcode_allowed_ips=parse_networks(merged.get("TRANSCODE_ALLOWED_IPS", "")),
        max_body_bytes=whole(merged, "JOBWIRE_MAX_BODY_BYTES", 1024 * 1024),
        max_final_body_bytes=whole(merged, "JOBWIRE_MAX_FINAL_BODY_BYTES", 256 * 1024 * 1024),
        # A time, at most 366 days as the others: Retry-After: 99999999999999 was sent.
        retry_after_seconds=whole(
            merged, "JOBWIRE_RETRY_AFTER_SECONDS", 5, minimum=0, maximum=MAX_NUMBER
        ),
        public_url=public_url(merged.get("JOBWIRE_PUBLIC_URL", "")),
        access_log=parse_access_log(merged.get("JOBWIRE_ACCESS_LOG", "errors")),
        rpc_timeout_seconds=number(merged, "JOBWIRE_RPC_TIMEOUT_SECONDS", 30.0),
        shutdown_grace_seconds=number(merged, "JOBWIRE_SHUTDOWN_GRACE_SECONDS", 10.0, minimum=0),
        header_timeout_seconds=number(merged, "JOBWIRE_HEADER_TIMEOUT_SECONDS", 10.0),
        body_timeout_seconds=number(merged, "JOBWIRE_BODY_TIMEOUT_SECONDS", 30.0),
        body_min_rate_bytes=whole(merged, "JOBWIRE_BODY_MIN_RATE_BYTES", 4096),
        keepalive_timeout_seconds=number(merged, "JOBWIRE_KEEPALIVE_TIMEOUT_SECONDS", 30.0),
        max_connections=whole(merged, "JOBWIRE_MAX_CONNECTIONS", 1000),
        rate_limit=rate,
        rate_burst=burst,
        signing_secrets=signing_secrets(merged),
        service_env=channel_env(merged),
        # From the env file too, as every other setting: it was read from the
        # environment alone, so the file's JOBWIRE_HTTP_WORKERS=4 ran one process.
        http_workers=worker_count(merged),
    )


def channel_env(merged: Mapping[str, str]) -> dict[str, str]:
    """The settings of the channel to the service, from the env file and the environment:
    read from the environment alone, a JOBWIRE_GRPC_TOKEN in the file was never sent,
    and every call was UNAUTHENTICATED (a worker with the right secret got 401)."""
    return {
        name: value
        for name, value in merged.items()
        if name == "JOBWIRE_GRPC_TOKEN" or name.startswith("JOBWIRE_SERVICE_TLS_")
    }


def header_secret(env: Mapping[str, str], name: str) -> str:
    """A secret that travels in a header, where the bridge takes only printable ASCII
    up to 4096 characters (edge.token_text): any other value could never match, and
    its worker would get 401 for ever. The message never shows the value."""
    value = env.get(name, "")
    if value and not (len(value) <= 4096 and value.isascii() and value.isprintable()):
        raise SystemExit(
            f"{name} must be at most 4096 printable ASCII characters: it is sent in an "
            "HTTP header (its value is not shown)"
        )
    if value != value.strip():
        # A header's value arrives without the spaces at its ends (RFC 9110 5.5), and
        # the bridge strips what it reads: such a key started, then matched nothing.
        raise SystemExit(
            f"{name} must not begin or end with whitespace: it is sent in an HTTP header,"
            " which drops it (its value is not shown)"
        )
    return value


def body_secret(env: Mapping[str, str], name: str) -> str:
    """A secret that travels in a JSON body: any text, but text. A value that is not
    UTF-8 (a Latin-1 'ü' from a shell) started the bridge, and then every callback got
    500 (encoding it to compare failed). The message never shows the value."""
    value = env.get(name, "")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise SystemExit(f"{name} must be UTF-8 text (its value is not shown)") from None
    return value


# Seconds: a year is plenty, and gRPC took a 1e300 s deadline as one already passed
# (every call DEADLINE_EXCEEDED).
MAX_NUMBER = 366 * 24 * 3600


def number(
    env: Mapping[str, str], name: str, default: float, minimum: float = 0.001, per_second: int = 1
) -> float:
    """A finite number from `minimum` to 366 days in the setting's unit (`per_second`
    1000 for milliseconds: the seconds' bound made a push interval at most 8.8 hours)."""
    raw = env.get(name, "")
    parsed = decimal_number(raw) if raw.strip() else default
    if parsed is None:
        raise SystemExit(f"{name} must be a number, got {raw!r}")
    value = parsed
    maximum = MAX_NUMBER * per_second
    if not minimum <= value <= maximum:
        raise SystemExit(
            f"{name} must be a number >= {minimum} and <= {maximum} (366 days), got {raw!r}"
        )
    return value


def whole(
    env: Mapping[str, str], name: str, default: int, minimum: int = 1, maximum: int = 2**63 - 1
) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    value = whole_number(raw)
    if value is None or not minimum <= value <= maximum:
        if maximum < 2**63 - 1:
            raise SystemExit(
                f"{name} must be a whole number >= {minimum} and <= {maximum}, got {raw!r}"
            )
        raise SystemExit(f"{name} must be a whole number >= {minimum}, got {raw!r}")
    return value


def parse_rate(value: str, name: str = "JOBWIRE_RATE_LIMIT") -> tuple[float, float]:
    """`JOBWIRE_RATE_LIMIT`, `N`, `N/s` or `N/min`: (requests per second per credential,
    the burst N, also for `N/min` whose rate per second is below 1); (0, 0) when off."""
    text = value.strip().lower()
    if text in ("", "0", "off"):
        return 0.0, 0.0
    count, _, unit = text.partition("/")
    per = {"": 1.0, "s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0}
    burst_or_none = decimal_number(count)
    if burst_or_none is None or unit.strip() not in per:
        raise SystemExit(f"{name} must be N, N/s or N/min, got {value!r}")
    burst = burst_or_none
    rate = burst / per[unit.strip()]
    if rate <= 0:
        raise SystemExit(f"{name} must be positive, got {value!r}")
    return rate, burst


SIGNED_CONTRACTS = ("aws_batch", "video_worker", "aurora", "secretary")


def signing_secrets(env: Mapping[str, str]) -> dict[str, tuple[bytes, ...]]:
    """`JOBWIRE_SIGNING_SECRET_<CONTRACT>`: one or more space-separated `whsec_...`. A
    `<CONTRACT>` that is none (`..._BATCH`, `..._aurora`) stops the bridge: it was
    ignored, and that contract's callbacks were taken unsigned, the operator unaware."""
    from .signing import decode_secret

    prefix = "JOBWIRE_SIGNING_SECRET_"
    names = [contract.upper() for contract in SIGNED_CONTRACTS]
    for name in sorted(env):
        if name.startswith(prefix) and name.removeprefix(prefix) not in names:
            raise SystemExit(
                f"{name} names no contract: {prefix}<CONTRACT> takes {', '.join(names)}"
            )
    found: dict[str, tuple[bytes, ...]] = {}
    for contract in SIGNED_CONTRACTS:
        name = f"JOBWIRE_SIGNING_SECRET_{contract.upper()}"
        raw = env.get(name, "").split()
        if raw:
            try:
                found[contract] = tuple(decode_secret(s) for s in raw)
            except ValueError as exc:
                raise SystemExit(f"{name}: {exc}") from None
    return found


_ACCESS_LOG = {
    "all": "all",
    "1": "all",
    "on": "all",
    "true": "all",
    "yes": "all",
    "errors": "errors",
    "off": "off",
    "0": "off",
    "false": "off",
    "no": "off",
    "none": "off",
}


def parse_access_log(value: str) -> str:
    try:
        return _ACCESS_LOG[value.strip().lower()]
    except KeyError:
        raise SystemExit(f"JOBWIRE_ACCESS_LOG must be all, errors or off, got {value!r}") from None
