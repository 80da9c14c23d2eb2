"""Service settings, read once from the environment (defaults from DESIGN.md)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from jobwire.env_numbers import decimal_number, whole_number
from jobwire.v1 import job_pb2

from .admission import DEFAULT_MAX_WATCHERS
from .domain.records import Policy
from .domain.validation import MAX_DEADLINE_NS

# The longest duration a setting takes, as a request's lease_duration or deadline: a
# lease expiry or deadline past it is no valid Timestamp (1e12 s made every ClaimJob
# UNKNOWN), and int(1e300 s * 1e9) raised OverflowError at start.
MAX_SECONDS = MAX_DEADLINE_NS / 1e9
# Counts: far above any use, below what SQLite, BSON and gRPC's C ints hold.
MAX_COUNT = 1_000_000_000
# gRPC's backlog is 4x the admitted streams, in a C int (2**31 - 1).
MAX_WATCHERS = 10_000_000
# gRPC takes the ping interval in milliseconds, in a C int (24.8 days).
MAX_MIN_PING_SECONDS = 86_400.0
# The shortest interval a sweep or poll of the store takes: 1e-9 passed "> 0" and made
# the service query the store in a tight loop.
MIN_INTERVAL_SECONDS = 0.01


def _float(
    name: str,
    default: float,
    minimum: float = 0.0,
    above: bool = False,
    maximum: float = MAX_SECONDS,
) -> float:
    """A finite number >= `minimum` (> it when `above`) and <= `maximum` (seconds: at
    most 366 days unless told); NaN and infinity are refused."""
    raw = os.environ.get(name, "")
    parsed = decimal_number(raw) if raw.strip() else default
    if parsed is None:
        raise SystemExit(f"{name} must be a number, got {raw!r}")
    value = parsed
    if not minimum <= value <= maximum or (above and value == minimum):
        bound = f"> {minimum:g}" if above else f">= {minimum:g}"
        if maximum < float("inf"):
            most = f"{maximum:.0f}" if maximum == int(maximum) else f"{maximum:g}"
            bound += f" and <= {most}" + (" (366 days)" if maximum == MAX_SECONDS else "")
        raise SystemExit(f"{name} must be a number {bound}, got {raw!r}")
    return value


def _public_url(name: str) -> str:
    """An absolute http(s) URL: callback URLs handed to workers are built on it."""
    raw = os.environ.get(name, "").strip()
    scheme, sep, rest = raw.partition("://")
    if raw and not (sep and scheme.lower() in ("http", "https") and rest and rest[0] not in "/?#"):
        raise SystemExit(
            f"{name} must be an http(s) URL such as https://jobs.example.com, got {raw!r}"
        )
    return raw.rstrip("/")


def _addr(name: str, default: str, *, optional: bool = False) -> str:
    """`host:port` with a port 0-65535 ("" when `optional`: no endpoint). A bare host
    was taken: gRPC bound `localhost` to port 443, the metrics endpoint failed later.
    gRPC's own `unix:` socket addresses pass as they are."""
    raw = os.environ.get(name, default)
    if (optional and not raw) or raw.startswith("unix:"):
        return raw
    host, sep, port = raw.rpartition(":")
    if not (sep and host and port.isascii() and port.isdigit() and int(port) <= 65535):
        raise SystemExit(f"{name} must be host:port (port 0-65535), got {raw!r}")
    return raw


def _token(name: str) -> str:
    """A secret clients send as `authorization: Bearer`: visible ASCII, or no client
    could ever match it (a trailing newline from a secret file). Never echoed."""
    raw = os.environ.get(name, "")
    if raw and not (raw.isascii() and raw.isprintable() and " " not in raw):
        raise SystemExit(
            f"{name} must be visible ASCII with no spaces or line breaks"
            " (a trailing newline from a file?); its value is not shown"
        )
    return raw


def _int(name: str, default: int, minimum: int = 1, maximum: int = MAX_COUNT) -> int:
    raw = os.environ.get(name, "")
    value = whole_number(raw) if raw.strip() else default
    if value is None or not minimum <= value <= maximum:
        raise SystemExit(
            f"{name} must be a whole number >= {minimum} and <= {maximum}, got {raw!r}"
        )
    return value


def _workers(name: str, limit: int = 64) -> int:
    value = _int(name, 0, minimum=0)
    if value > limit:
        raise SystemExit(f"{name} must be at most {limit}, got {value}")
    return value


def _flag(name: str, default: bool) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "on", "yes"):
        return True
    if raw in ("0", "false", "off", "no"):
        return False
    raise SystemExit(f"{name} must be on or off, got {raw!r}")


_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def _duration(name: str, default: float) -> float:
    """Seconds, or a number with a unit: 90, 90s, 15m, 24h, 7d; 0 or "off" turns it off."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if raw.lower() == "off":
        return 0.0
    unit = _UNITS.get(raw[-1].lower(), 0.0)
    number = decimal_number(raw[:-1] if unit else raw)
    value = -1.0 if number is None else number * (unit or 1.0)
    if not 0 <= value <= MAX_SECONDS:
        raise SystemExit(
            f"{name} must be a duration such as 90, 90s, 15m, 24h or off, at most 366d, got {raw!r}"
        )
    return value


def _per_kind(prefix: str) -> tuple[tuple[int, float], ...]:
    """PREFIX<KIND>=duration for each job kind (BATCH, VIDEO, TRANSCODE, ...). A PREFIX
    variable for no kind (a misspelt BATCHH) was ignored: the deadline silently off."""
    kinds = {
        name.removeprefix("JOB_KIND_"): int(number)
        for name, number in job_pb2.JobKind.items()
        if number
    }
    for name in sorted(os.environ):
        if name.startswith(prefix) and name.removeprefix(prefix) not in kinds:
            raise SystemExit(f"{name} names no job kind: {prefix}<KIND> takes {', '.join(kinds)}")
    out = []
    for kind, number in kinds.items():
        if (seconds := _duration(prefix + kind, 0.0)) > 0:
            out.append((number, seconds))
    return tuple(out)


@dataclass(frozen=True)
class Settings:
    grpc_addr: str = "127.0.0.1:50051"
    data_dir: Path = Path("data")
    mongodb_uri: str = ""
    public_url: str = ""
    lease_seconds: float = 60.0
    max_attempts: int = 3
    event_retention: int = 64
    lease_sweep_seconds: float = 1.0
    watch_buffer: int = 256
    # Jobs the embedded store's writer keeps in memory with their recent keys (about
    # 9 KB each with full histories): past this many jobs reporting at once, each event
    # re-reads its job (README "Scaling").
    embedded_cache_jobs: int = 2048
    # Open WatchJob/WatchJobs streams one node admits (README "Watchers").
    max_watchers: int = DEFAULT_MAX_WATCHERS
    # Extra processes serving WatchJob on the same port (service/watch_workers.py).
    watch_workers: int = 0
    # A job's fan-out written per client connection under TCP_CORK (service/cork.py).
    watch_cork: bool = True
    shutdown_grace_seconds: float = 10.0
    # How long `jobwire run` waits for the service it started to become healthy while
    # it runs (a fixed 30 s cut short a large embedded store's recovery at start).
    service_start_timeout_seconds: float = 300.0
    # Keepalive pings a client may send this often while its streams are idle (gRPC's
    # default, 300 s, cut jobwire.client's watches, which ping every 30 s).
    min_ping_seconds: float = 20.0
    # Operations (README "Metrics", "Live progress across replicas", "TLS and internal
    # auth"). The same defaults whether built in code or from the environment.
    metrics_addr: str = "127.0.0.1:9464"
    metrics_queue_seconds: float = 15.0
    event_feed: bool = True
    event_feed_max_docs: int = 20_000
    watch_resync_seconds: float = 10.0
    # Streams (README "streams"): the firehose log's retention (0: no log) and the
    # per-kind progress deadline / stall failure defaults, as (JobKind, seconds).
    firehose_retention_seconds: float = 24 * 3600.0
    # Jobs ended longer ago than this are deleted with their events, logs and artifacts
    # (service/retention.py); 0: kept for ever. Swept this often, in batches.
    job_retention_seconds: float = 0.0
    job_retention_sweep_seconds: float = 60.0
    progress_deadlines: tuple[tuple[int, float], ...] = ()
    stall_fail_after: tuple[tuple[int, float], ...] = ()
    grpc_tls_cert: str = ""
    grpc_tls_key: str = ""
    grpc_tls_client_ca: str = ""
    grpc_token: str = field(default="", repr=False)
    # JOBWIRE_GRPC_INSECURE: listen beyond loopback with neither token nor mTLS, on
    # purpose (a private network); otherwise the service refuses to start that way.
    grpc_insecure: bool = False

    @classmethod
    def from_env(cls) -> Settings:
        return cls(
            grpc_addr=_addr("JOBWIRE_GRPC_ADDR", cls.grpc_addr),
            # Empty as unset (like the numbers): Path("") is the working directory. A
            # leading ~ is the home directory, as a shell would have it (an env file
            # or a unit's Environment= does not expand it: a directory named "~").
            # Spaces and line breaks at the ends are dropped: they made a directory
            # named " " or "data\n" beside the volume meant for the data.
            data_dir=Path(os.environ.get("JOBWIRE_DATA_DIR", "").strip() or "data").expanduser(),
            mongodb_uri=os.environ.get("MONGODB_URI", ""),
            public_url=_public_url("JOBWIRE_PUBLIC_URL"),
            lease_seconds=_float("JOBWIRE_LEASE_SECONDS", cls.lease_seconds, above=True),
            max_attempts=_int("JOBWIRE_MAX_ATTEMPTS", cls.max_attempts),
            event_retention=_int("JOBWIRE_EVENT_RETENTION", cls.event_retention, minimum=8),
            lease_sweep_seconds=_float(
                "JOBWIRE_LEASE_SWEEP_SECONDS", cls.lease_sweep_seconds, MIN_INTERVAL_SECONDS
            ),
            watch_buffer=_int("JOBWIRE_WATCH_BUFFER", cls.watch_buffer, minimum=4),
            embedded_cache_jobs=_int("JOBWIRE_EMBEDDED_CACHE_JOBS", cls.embedded_cache_jobs),
            max_watchers=_int("JOBWIRE_MAX_WATCHERS", cls.max_watchers, maximum=MAX_WATCHERS),
            watch_workers=_workers("JOBWIRE_WATCH_WORKERS"),
            watch_cork=_flag("JOBWIRE_WATCH_CORK", cls.watch_cork),
            shutdown_grace_seconds=_float("JOBWIRE_SHUTDOWN_GRACE_SECONDS", 10.0),
            service_start_timeout_seconds=_float(
                "JOBWIRE_SERVICE_START_TIMEOUT_SECONDS",
                cls.service_start_timeout_seconds,
                above=True,
            ),
            min_ping_seconds=_float(
                "JOBWIRE_GRPC_MIN_PING_SECONDS",
                cls.min_ping_seconds,
                above=True,
                maximum=MAX_MIN_PING_SECONDS,
            ),
            metrics_addr=_addr("JOBWIRE_METRICS_ADDR", cls.metrics_addr, optional=True),
            metrics_queue_seconds=_float(
                "JOBWIRE_METRICS_QUEUE_SECONDS", 15.0, MIN_INTERVAL_SECONDS
            ),
            event_feed=_flag("JOBWIRE_EVENT_FEED", cls.event_feed),
            event_feed_max_docs=_int("JOBWIRE_EVENT_FEED_MAX_DOCS", 20_000, minimum=100),
            watch_resync_seconds=_float("JOBWIRE_WATCH_RESYNC_SECONDS", 10.0, MIN_INTERVAL_SECONDS),
            firehose_retention_seconds=_duration("JOBWIRE_FIREHOSE_RETENTION", 24 * 3600.0),
            job_retention_seconds=_duration("JOBWIRE_JOB_RETENTION", 0.0),
            job_retention_sweep_seconds=_float(
                "JOBWIRE_JOB_RETENTION_SWEEP_SECONDS", 60.0, MIN_INTERVAL_SECONDS
            ),
            progress_deadlines=_per_kind("JOBWIRE_PROGRESS_DEADLINE_"),
            stall_fail_after=_per_kind("JOBWIRE_STALL_FAIL_AFTER_"),
            grpc_tls_cert=os.environ.get("JOBWIRE_GRPC_TLS_CERT", ""),
            grpc_tls_key=os.environ.get("JOBWIRE_GRPC_TLS_KEY", ""),
            grpc_tls_client_ca=os.environ.get("JOBWIRE_GRPC_TLS_CLIENT_CA", ""),
            grpc_token=_token("JOBWIRE_GRPC_TOKEN"),
            grpc_insecure=_flag("JOBWIRE_GRPC_INSECURE", cls.grpc_insecure),
        )

    def policy(self) -> Policy:
        return Policy(
            retention=self.event_retention,
            lease_ns=int(self.lease_seconds * 1e9),
            max_attempts=self.max_attempts,
            firehose_retention_ns=int(self.firehose_retention_seconds * 1e9),
            progress_deadline_ns={k: int(s * 1e9) for k, s in self.progress_deadlines},
            stall_fail_after_ns={k: int(s * 1e9) for k, s in self.stall_fail_after},
        )
