"""A bad setting stops a process at start with one line that names the variable, what
it must be and what it got: never a traceback, never a value quietly accepted (a NaN
timeout, a negative lease, a public URL callbacks cannot be built on)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import socket
import sys
from pathlib import Path

import pytest

from dashboard.config import load_config as dashboard_config
from http_bridge.config import load_config as bridge_config
from http_bridge.workers import worker_count
from jobwire.v1 import job_pb2, job_service_pb2
from service.config import Settings
from service.domain.records import Policy
from service.logs import configure
from service.store.embedded import EmbeddedStore
from service.store.mongo import MongoStore
from tests.conftest import start_service
from tests.helpers import create, free_port, port_0_environment, progress
from tests.test_ops import _self_signed

BAD_NUMBERS = ("x", "nan", "inf", "-1")

SERVICE = [
    *((var, v) for var in ("JOBWIRE_LEASE_SECONDS", "JOBWIRE_LEASE_SWEEP_SECONDS",
                           "JOBWIRE_SHUTDOWN_GRACE_SECONDS", "JOBWIRE_METRICS_QUEUE_SECONDS",
                           "JOBWIRE_WATCH_RESYNC_SECONDS", "JOBWIRE_GRPC_MIN_PING_SECONDS",
                           "JOBWIRE_MAX_ATTEMPTS",
                           "JOBWIRE_EVENT_RETENTION", "JOBWIRE_WATCH_BUFFER",
                           "JOBWIRE_MAX_WATCHERS", "JOBWIRE_WATCH_WORKERS",
                           "JOBWIRE_EVENT_FEED_MAX_DOCS", "JOBWIRE_EMBEDDED_CACHE_JOBS")
      for v in BAD_NUMBERS),
    ("JOBWIRE_LEASE_SECONDS", "0"),
    ("JOBWIRE_MAX_ATTEMPTS", "1.5"),
    ("JOBWIRE_EMBEDDED_CACHE_JOBS", "0"),
    ("JOBWIRE_FIREHOSE_RETENTION", "nan"),
    ("JOBWIRE_PROGRESS_DEADLINE_VIDEO", "-5m"),
    ("JOBWIRE_EVENT_FEED", "maybe"),
    ("JOBWIRE_GRPC_INSECURE", "maybe"),
    ("JOBWIRE_PUBLIC_URL", "jobs.example.com"),
    ("JOBWIRE_PUBLIC_URL", "ftp://jobs.example.com"),
    ("JOBWIRE_PUBLIC_URL", "https:///path"),
    ("JOBWIRE_GRPC_ADDR", "localhost"),  # gRPC bound it to port 443
    ("JOBWIRE_GRPC_ADDR", "127.0.0.1:70000"),
    ("JOBWIRE_METRICS_ADDR", "localhost"),
    ("JOBWIRE_METRICS_ADDR", "127.0.0.1:port"),
    # Past what they can mean, these crashed at start with a traceback (a C int in gRPC's
    # channel arguments, int(inf) in Settings.policy) or broke every call at runtime (a
    # lease expiry or progress deadline past what a Timestamp holds).
    ("JOBWIRE_MAX_WATCHERS", "1000000000"),
    ("JOBWIRE_MAX_WATCHERS", "10000001"),
    ("JOBWIRE_GRPC_MIN_PING_SECONDS", "1e10"),
    ("JOBWIRE_GRPC_MIN_PING_SECONDS", "86401"),
    ("JOBWIRE_LEASE_SECONDS", "1e300"),
    ("JOBWIRE_LEASE_SECONDS", "1e12"),
    ("JOBWIRE_LEASE_SECONDS", "31622401"),
    ("JOBWIRE_LEASE_SWEEP_SECONDS", "1e300"),
    # Past "> 0" but no interval to sweep or poll the store at: a tight loop of queries.
    *((var, "1e-9") for var in ("JOBWIRE_LEASE_SWEEP_SECONDS", "JOBWIRE_METRICS_QUEUE_SECONDS",
                                "JOBWIRE_WATCH_RESYNC_SECONDS",
                                "JOBWIRE_JOB_RETENTION_SWEEP_SECONDS")),
    ("JOBWIRE_SHUTDOWN_GRACE_SECONDS", "1e300"),
    *(("JOBWIRE_SERVICE_START_TIMEOUT_SECONDS", v) for v in (*BAD_NUMBERS, "0", "1e300")),
    ("JOBWIRE_METRICS_QUEUE_SECONDS", "1e300"),
    ("JOBWIRE_WATCH_RESYNC_SECONDS", "1e300"),
    ("JOBWIRE_FIREHOSE_RETENTION", "1e300"),
    ("JOBWIRE_FIREHOSE_RETENTION", "367d"),
    ("JOBWIRE_JOB_RETENTION", "30x"),
    ("JOBWIRE_JOB_RETENTION", "-1d"),
    ("JOBWIRE_JOB_RETENTION", "367d"),
    *(("JOBWIRE_JOB_RETENTION_SWEEP_SECONDS", v) for v in (*BAD_NUMBERS, "0", "1e300")),
    ("JOBWIRE_PROGRESS_DEADLINE_BATCH", "1e300"),
    ("JOBWIRE_PROGRESS_DEADLINE_EXTRACTION", "1e12"),
    ("JOBWIRE_STALL_FAIL_AFTER_VIDEO", "8785h"),
    *((var, "1e300") for var in ("JOBWIRE_MAX_ATTEMPTS", "JOBWIRE_EVENT_RETENTION",
                                 "JOBWIRE_WATCH_BUFFER", "JOBWIRE_EVENT_FEED_MAX_DOCS",
                                 "JOBWIRE_EMBEDDED_CACHE_JOBS")),
]  # fmt: skip

BRIDGE = [
    *((var, v) for var in ("JOBWIRE_MAX_BODY_BYTES", "JOBWIRE_MAX_FINAL_BODY_BYTES",
                           "JOBWIRE_RETRY_AFTER_SECONDS", "JOBWIRE_RPC_TIMEOUT_SECONDS",
                           "JOBWIRE_HEADER_TIMEOUT_SECONDS", "JOBWIRE_BODY_TIMEOUT_SECONDS",
                           "JOBWIRE_BODY_MIN_RATE_BYTES", "JOBWIRE_KEEPALIVE_TIMEOUT_SECONDS",
                           "JOBWIRE_MAX_CONNECTIONS")
      for v in BAD_NUMBERS),
    ("JOBWIRE_MAX_BODY_BYTES", "1e6"),
    ("JOBWIRE_RETRY_AFTER_SECONDS", "31622401"),  # was sent as Retry-After, any size
    # Past 366 days: gRPC took a 1e300 s deadline as already passed, every call failed.
    *((var, "1e300") for var in ("JOBWIRE_RPC_TIMEOUT_SECONDS", "JOBWIRE_BODY_TIMEOUT_SECONDS",
                                 "JOBWIRE_SHUTDOWN_GRACE_SECONDS")),
    ("JOBWIRE_HTTP_ADDR", "127.0.0.1:http"),
    ("JOBWIRE_HTTP_ADDR", "127.0.0.1:70000"),
    ("JOBWIRE_HTTP_ADDR", "localhost"),  # it listened on 8080
    ("TRANSCODE_ALLOWED_IPS", "10.0.0.0/8, not-an-ip"),
    ("JOBWIRE_PUBLIC_URL", "//jobs.example.com"),
    ("JOBWIRE_RATE_LIMIT", "fast"),
    ("JOBWIRE_ACCESS_LOG", "some"),
    # gRPC dialled 122847 modulo 65536 (57311: another service, perhaps), and took a URL
    # for a host name: the bridge started and answered every callback 503.
    ("JOBWIRE_SERVICE_TARGET", "127.0.0.1:122847"),
    ("JOBWIRE_SERVICE_TARGET", "http://127.0.0.1:50051"),
    # A byte that is not UTF-8 (os.environ's surrogate escape) was a traceback from
    # gRPC's channel at start; a control character a name that never resolves.
    ("JOBWIRE_SERVICE_TARGET", "jobwire-\udcffservice:50051"),
    ("JOBWIRE_SERVICE_TARGET", "jobwire-service\t:50051"),
]  # fmt: skip

DASHBOARD = [
    *((var, v) for var in ("JOBWIRE_DASHBOARD_PUSH_MS", "JOBWIRE_DASHBOARD_HEARTBEAT_SECONDS",
                           "JOBWIRE_DASHBOARD_HEADER_TIMEOUT_SECONDS",
                           "JOBWIRE_DASHBOARD_MAX_CONNECTIONS") for v in BAD_NUMBERS),
    ("JOBWIRE_DASHBOARD_HEARTBEAT_SECONDS", "1e300"),
    ("JOBWIRE_SHUTDOWN_GRACE_SECONDS", "nan"),
    ("JOBWIRE_DASHBOARD_ADDR", "localhost:port"),
    ("JOBWIRE_DASHBOARD_ADDR", "localhost"),  # it listened on 8081
    ("JOBWIRE_DASHBOARD_TRUSTED_USER_HEADER", "X-User: admin"),
    ("JOBWIRE_DASHBOARD_LOGIN_LIMIT", "ten/min"),
    ("JOBWIRE_DASHBOARD_LOGIN_LIMIT", "-5/min"),
    ("JOBWIRE_PUBLIC_URL", "jobs.example.com"),
    ("JOBWIRE_SERVICE_TARGET", "127.0.0.1:122847"),
]  # fmt: skip


def _refused(load: object, var: str, value: str) -> str:
    with pytest.raises(SystemExit) as refused:
        load()  # type: ignore[operator]
    message = str(refused.value.code)
    assert var.rstrip("_") in message and repr(value.strip()) in message, message
    return message


@pytest.mark.parametrize(("var", "value"), SERVICE)
def test_service_settings(monkeypatch: pytest.MonkeyPatch, var: str, value: str) -> None:
    monkeypatch.setenv(var, value)
    _refused(Settings.from_env, var, value)


@pytest.mark.parametrize(("var", "value"), BRIDGE)
def test_bridge_settings(tmp_path: Path, var: str, value: str) -> None:
    env = {"JOBWIRE_ENV_FILE": str(tmp_path / "none.env"), var: value}
    _refused(lambda: bridge_config(env), var, value)


@pytest.mark.parametrize(("var", "value"), DASHBOARD)
def test_dashboard_settings(tmp_path: Path, var: str, value: str) -> None:
    env = {"JOBWIRE_ENV_FILE": str(tmp_path / "none.env"), var: value}
    _refused(lambda: dashboard_config(env), var, value)


def test_the_dashboards_push_interval_is_bounded_in_its_own_unit(tmp_path: Path) -> None:
    """JOBWIRE_DASHBOARD_PUSH_MS is milliseconds, but it was bounded by the seconds'
    31622400 "(366 days)": 8.8 hours, so a day's 86400000 was refused and the refusal
    named a bound that was not what it said. Now 366 days in milliseconds."""
    env = {"JOBWIRE_ENV_FILE": str(tmp_path / "none.env"), "JOBWIRE_DASHBOARD_PUSH_MS": "86400000"}
    assert dashboard_config(env).push_interval_seconds == 86400
    env["JOBWIRE_DASHBOARD_PUSH_MS"] = "31622400001"
    message = _refused(lambda: dashboard_config(env), "JOBWIRE_DASHBOARD_PUSH_MS", "31622400001")
    assert "<= 31622400000 (366 days)" in message, message


@pytest.mark.parametrize(
    "value",
    ["s3cr3t-dashboard-token-from-a-file\n", " s3cr3t-dashboard-token-0123", "s3cr3t-dash\ttoken"],
)
def test_a_dashboard_token_no_login_can_match_is_named_not_shown(
    tmp_path: Path, value: str
) -> None:
    """A secret file's trailing newline (or a space, a tab) in JOBWIRE_DASHBOARD_TOKEN:
    the dashboard started, and the right token typed at login, or sent as Bearer, got
    'Wrong token.' for ever. It stops at start naming the variable, never the value."""
    env = {"JOBWIRE_ENV_FILE": str(tmp_path / "none.env"), "JOBWIRE_DASHBOARD_TOKEN": value}
    with pytest.raises(SystemExit) as refused:
        dashboard_config(env)
    message = str(refused.value.code)
    assert "JOBWIRE_DASHBOARD_TOKEN" in message and "s3cr3t" not in message, message


def test_a_body_secret_that_is_not_text_is_named_not_shown(tmp_path: Path) -> None:
    """BATCH_CALLBACK_SECRET with a byte that is not UTF-8 (a Latin-1 'ü', as the
    environment hands it over) started the bridge; every AWS Batch callback got 500."""
    secret = "dein-geheimer-schl\udcfcssel"  # os.environ's form of the byte 0xfc
    env = {"JOBWIRE_ENV_FILE": str(tmp_path / "none.env"), "BATCH_CALLBACK_SECRET": secret}
    with pytest.raises(SystemExit) as refused:
        bridge_config(env)
    message = str(refused.value.code)
    assert "BATCH_CALLBACK_SECRET must be UTF-8" in message and "geheim" not in message


@pytest.mark.parametrize("load", [bridge_config, dashboard_config])
def test_an_env_file_that_is_not_utf8_is_named_not_shown(tmp_path: Path, load: object) -> None:
    """A jobwire.env saved as Latin-1 (a secret with an 'ü') ended the bridge, the
    dashboard and `jobwire run` with a UnicodeDecodeError traceback."""
    env_file = tmp_path / "jobwire.env"
    env_file.write_bytes(b"API_KEY=schl\xfcssel-0123456789\n")
    with pytest.raises(SystemExit) as refused:
        load({"JOBWIRE_ENV_FILE": str(env_file)})  # type: ignore[operator]
    message = str(refused.value.code)
    assert message.startswith(f"jobwire: cannot read {env_file} (JOBWIRE_ENV_FILE): not UTF-8")
    assert "schl" not in message and "0123456789" not in message, message


def test_an_env_file_with_a_byte_order_mark_is_read_whole(tmp_path: Path) -> None:
    """A jobwire.env saved by an editor that writes a UTF-8 byte order mark: its first
    line's name was '\ufeffAPI_KEY', so that secret was never read (the endpoint closed,
    and `jobwire run` generated a new key in its place)."""
    env_file = tmp_path / "jobwire.env"
    env_file.write_bytes(b"\xef\xbb\xbfAPI_KEY=site-key-0123456789\nJOBWIRE_DASHBOARD_TOKEN=t\n")
    assert bridge_config({"JOBWIRE_ENV_FILE": str(env_file)}).api_key == "site-key-0123456789"


def test_an_env_file_reads_values_as_docker_compose_does(tmp_path: Path) -> None:
    """`API_KEY=k # rotated monthly` made the key `k # rotated monthly`: every worker
    sending `k` was refused. A quote left open was dropped from one end only, mismatched
    quotes from both, and a quoted value's comment stayed in it."""
    env_file = tmp_path / "jobwire.env"
    env_file.write_text(
        "API_KEY=site-key-0123456789  # rotated monthly\n"
        "BATCH_CALLBACK_SECRET='batch # not a comment'   # this is one\n"
        'TRANSCODE_CALLBACK_TOKEN="aurora=token"\n'
        "export JOBWIRE_DASHBOARD_TOKEN=a#b\n"
    )
    config = bridge_config({"JOBWIRE_ENV_FILE": str(env_file)})
    assert config.api_key == "site-key-0123456789"
    assert config.batch_callback_secret == "batch # not a comment"
    assert config.transcode_callback_token == "aurora=token"
    assert dashboard_config({"JOBWIRE_ENV_FILE": str(env_file)}).token == "a#b"


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("API_KEY 'site-key-0123456789'", "line 2: expected NAME=value"),
        ("API_KEY='site-key-0123456789", "line 2: API_KEY's value opens a quote it never closes"),
        ("API_KEY=\"site-key-0123456789'", "line 2: API_KEY's value opens a quote it never closes"),
        (
            "API_KEY='site-key-0123456789'x",
            "line 2: API_KEY's value has text after its closing quote",
        ),
        (
            "API-KEY=site-key-0123456789",
            "line 2: the name before = holds '-' (a name is A-Z, a-z, 0-9, _)",
        ),
        # A value wrapped onto a line of its own: what stood before its `=` (base64
        # padding) was shown as the name, 40 of a signing key's 44 characters.
        (
            "MfKQ9r8GKY+qrTwjUPD8I/LPZIo2L0123456789=",
            "line 2: the name before = holds '+' (a name is A-Z, a-z, 0-9, _)",
        ),
        ("0123456789=x", "line 2: the name before = starts with a digit"),
        ("=site-key-0123456789", "line 2: no name before ="),
    ],
)
def test_an_env_file_line_that_cannot_be_read_is_named_not_shown(
    tmp_path: Path, line: str, problem: str
) -> None:
    """Such a line was skipped or read with its quote cut off at one end: the operator's
    key was never used (`jobwire run` generated another beside it) or changed."""
    env_file = tmp_path / "jobwire.env"
    env_file.write_text(f"# site secrets\n{line}\n")
    with pytest.raises(SystemExit) as refused:
        bridge_config({"JOBWIRE_ENV_FILE": str(env_file)})
    message = str(refused.value.code)
    assert message == f"jobwire: cannot read {env_file} (JOBWIRE_ENV_FILE): {problem}", message
    assert "0123456789" not in message


@pytest.mark.parametrize(
    "var",
    ["JOBWIRE_SIGNING_SECRET_BATCH", "JOBWIRE_SIGNING_SECRET_aurora", "JOBWIRE_SIGNING_SECRET_"],
)
def test_a_signing_secret_for_no_contract_is_named_not_shown(tmp_path: Path, var: str) -> None:
    """A misspelt contract was ignored: the bridge started and took that contract's
    callbacks unsigned, while the operator meant every one of them to be verified."""
    secret = "whsec_" + base64.b64encode(b"k" * 32).decode()
    env = {"JOBWIRE_ENV_FILE": str(tmp_path / "none.env"), var: secret}
    with pytest.raises(SystemExit) as refused:
        bridge_config(env)
    message = str(refused.value.code)
    assert message.startswith(f"{var} names no contract") and secret not in message, message
    assert "AWS_BATCH, VIDEO_WORKER, AURORA, SECRETARY" in message, message


@pytest.mark.parametrize(
    "var",
    [
        "JOBWIRE_PROGRESS_DEADLINE_BATCHH",
        "JOBWIRE_PROGRESS_DEADLINE_batch",
        "JOBWIRE_PROGRESS_DEADLINE_UNSPECIFIED",
        "JOBWIRE_STALL_FAIL_AFTER_EXTRACT",
    ],
)
def test_a_per_kind_variable_for_no_kind_is_named(
    monkeypatch: pytest.MonkeyPatch, var: str
) -> None:
    """A misspelt kind was ignored: the deadline the operator set was silently off."""
    monkeypatch.setenv(var, "10m")
    with pytest.raises(SystemExit) as refused:
        Settings.from_env()
    message = str(refused.value.code)
    assert message.startswith(f"{var} names no job kind") and "\n" not in message, message
    assert "BATCH, VIDEO, TRANSCODE, EXTRACTION, GENERIC" in message, message


async def test_the_longest_lease_and_deadline_the_settings_take_work_at_runtime(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """At the bound (366 days) a claim and a progress report are answered. Past it, which
    was accepted, JOBWIRE_LEASE_SECONDS=1e12 made every ClaimJob UNKNOWN (its expiry not
    a valid Timestamp) and JOBWIRE_PROGRESS_DEADLINE_EXTRACTION=1e12 every progress
    report UNAVAILABLE "storage error: OverflowError" (the storage alert)."""
    monkeypatch.setenv("JOBWIRE_LEASE_SECONDS", "31622400")
    monkeypatch.setenv("JOBWIRE_PROGRESS_DEADLINE_EXTRACTION", "366d")
    monkeypatch.setenv("JOBWIRE_STALL_FAIL_AFTER_EXTRACTION", "366d")
    settings = Settings.from_env()
    store = EmbeddedStore(tmp_path / "data", settings.policy())
    handle = await start_service(store, lease_seconds=settings.lease_seconds)
    try:
        await create(handle.stub, job_pb2.JOB_KIND_EXTRACTION, job_id="long")
        claim = await handle.stub.ClaimJob(
            job_service_pb2.ClaimJobRequest(kind=job_pb2.JOB_KIND_EXTRACTION, worker_id="w")
        )
        assert claim.job.id == "long"
        await handle.stub.ReportEvent(progress("long", 10))
        job = await handle.stub.GetJob(job_service_pb2.GetJobRequest(id="long"))
        assert job.progress.percent == 10
    finally:
        await handle.close()


# What int() and float() take but nobody writes as a setting: 1_0 was 10, Arabic-Indic
# and full-width digits were digits, "+10" and "Infinity" were numbers.
NOT_PLAIN_WHOLE = ("1_0", "+10", "\u0661\u0660", "\uff11\uff10", "10.0", "1e3", "0x10")
NOT_PLAIN_NUMBER = ("1_0.5", "+1.5", "\u0661.5", "nan", "inf", "Infinity", "-inf", "1e400")


@pytest.mark.parametrize("value", NOT_PLAIN_WHOLE)
@pytest.mark.parametrize(
    ("process", "var"),
    [
        ("service", "JOBWIRE_MAX_ATTEMPTS"),
        ("service", "JOBWIRE_WATCH_WORKERS"),
        ("bridge", "JOBWIRE_MAX_CONNECTIONS"),
        ("bridge", "JOBWIRE_HTTP_WORKERS"),
        ("dashboard", "JOBWIRE_DASHBOARD_MAX_CONNECTIONS"),
        ("mongo", "JOBWIRE_MONGODB_TIMEOUT_MS"),
    ],
)
def test_a_whole_number_setting_takes_only_ascii_digits(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, process: str, var: str, value: str
) -> None:
    _refused(_loader(monkeypatch, tmp_path, process, var, value), var, value)


@pytest.mark.parametrize("value", NOT_PLAIN_NUMBER)
@pytest.mark.parametrize(
    ("process", "var"),
    [
        ("service", "JOBWIRE_LEASE_SECONDS"),
        ("service", "JOBWIRE_JOB_RETENTION"),
        ("bridge", "JOBWIRE_RPC_TIMEOUT_SECONDS"),
        ("bridge", "JOBWIRE_RATE_LIMIT"),
        ("dashboard", "JOBWIRE_DASHBOARD_HEARTBEAT_SECONDS"),
        ("dashboard", "JOBWIRE_DASHBOARD_LOGIN_LIMIT"),
    ],
)
def test_a_number_setting_takes_only_plain_decimals(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, process: str, var: str, value: str
) -> None:
    _refused(_loader(monkeypatch, tmp_path, process, var, value), var, value)


def test_plain_numbers_with_spaces_at_their_ends_still_pass(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Spaces and a line break at the ends are dropped, as the env file drops them."""
    monkeypatch.setenv("JOBWIRE_MAX_ATTEMPTS", " 10")
    monkeypatch.setenv("JOBWIRE_LEASE_SECONDS", "0.5\n")
    settings = Settings.from_env()
    assert (settings.max_attempts, settings.lease_seconds) == (10, 0.5)
    env = {
        "JOBWIRE_ENV_FILE": str(tmp_path / "none.env"),
        "JOBWIRE_MAX_CONNECTIONS": " 10",
        "JOBWIRE_RPC_TIMEOUT_SECONDS": "1e1",
        "JOBWIRE_RATE_LIMIT": ".5/s",
    }
    config = bridge_config(env)
    assert (config.max_connections, config.rpc_timeout_seconds) == (10, 10.0)
    assert (config.rate_limit, config.rate_burst) == (0.5, 0.5)
    assert worker_count({"JOBWIRE_HTTP_WORKERS": "2 "}) == 2


def _loader(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, process: str, var: str, value: str
) -> object:
    env = {"JOBWIRE_ENV_FILE": str(tmp_path / "none.env"), var: value}
    if process == "service":
        monkeypatch.setenv(var, value)
        return Settings.from_env
    if var == "JOBWIRE_HTTP_WORKERS":
        return lambda: worker_count(env)
    if process == "mongo":

        def mongo() -> None:
            try:
                MongoStore.from_env(Policy(), {"MONGODB_URI": "mongodb://127.0.0.1:1", **env})
            except ValueError as err:  # cli turns it into the one line
                raise SystemExit(str(err)) from None

        return mongo
    return lambda: (bridge_config if process == "bridge" else dashboard_config)(env)


def test_the_http_worker_count_is_read_from_the_env_file(tmp_path: Path) -> None:
    """README: the bridge takes every setting of its from the env file; its
    JOBWIRE_HTTP_WORKERS was read from the environment alone (the file's 4: one
    process), and a bad one there was never refused."""
    env_file = tmp_path / "site.env"
    env_file.write_text("JOBWIRE_HTTP_WORKERS=4\n")
    assert bridge_config({"JOBWIRE_ENV_FILE": str(env_file)}).http_workers == 4
    env_file.write_text("JOBWIRE_HTTP_WORKERS=two\n")
    _refused(
        lambda: bridge_config({"JOBWIRE_ENV_FILE": str(env_file)}), "JOBWIRE_HTTP_WORKERS", "two"
    )


def test_log_level() -> None:
    _refused(lambda: configure(fmt="text", level="LOUD"), "JOBWIRE_LOG_LEVEL", "LOUD")


def test_a_blank_log_setting_is_unset_and_a_bad_one_is_shown_as_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """JOBWIRE_LOG_LEVEL=" " stopped the process "got ''", where every other blank
    setting is its default; a refusal showed the value upper-cased ('LOUD' for loud)."""
    _refused(lambda: configure(fmt="text", level="loud"), "JOBWIRE_LOG_LEVEL", "loud")
    _refused(lambda: configure(fmt="Texts", level="INFO"), "JOBWIRE_LOG_FORMAT", "Texts")
    monkeypatch.setenv("JOBWIRE_LOG_LEVEL", " ")
    monkeypatch.setenv("JOBWIRE_LOG_FORMAT", "\t")
    root = logging.getLogger()
    handlers, before = list(root.handlers), root.level
    try:
        configure(handlers=[logging.NullHandler()])
        assert root.level == logging.INFO
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(before)


def test_good_values_still_pass(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var, value in (("JOBWIRE_LEASE_SECONDS", "0.5"), ("JOBWIRE_SHUTDOWN_GRACE_SECONDS", "0"),
                       ("JOBWIRE_PUBLIC_URL", "https://jobs.example.com/"),
                       ("JOBWIRE_EMBEDDED_CACHE_JOBS", "16384")):  # fmt: skip
        monkeypatch.setenv(var, value)
    settings = Settings.from_env()
    assert settings.lease_seconds == 0.5 and settings.shutdown_grace_seconds == 0
    assert settings.embedded_cache_jobs == 16384
    assert settings.public_url == "https://jobs.example.com"
    env = {
        "JOBWIRE_ENV_FILE": str(tmp_path / "none.env"),
        "JOBWIRE_RETRY_AFTER_SECONDS": "0",
        "JOBWIRE_HTTP_ADDR": "[::1]:8080",
        "JOBWIRE_PUBLIC_URL": "http://10.0.0.5:8080",
    }
    config = bridge_config(env)
    assert (config.retry_after_seconds, config.http_host, config.http_port) == (0, "::1", 8080)
    assert config.public_url == "http://10.0.0.5:8080"
    # gRPC dials a target with a line break at its end (a secret file's): still taken.
    env["JOBWIRE_SERVICE_TARGET"] = "127.0.0.1:50051\n"
    assert bridge_config(env).service_target == "127.0.0.1:50051\n"


async def _start_refused(tmp_path: Path, command: str, **env: str) -> tuple[bytes, bytes]:
    """`jobwire COMMAND` with `env` over a test environment: it must exit 1 at start,
    with no traceback. Its stdout and stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cli",
        command,
        env=port_0_environment(tmp_path, **env),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1, (out, err)
    assert b"Traceback" not in err
    return out, err


@pytest.mark.parametrize(
    ("command", "var"),
    [
        ("serve", "JOBWIRE_GRPC_ADDR"),
        ("bridge", "JOBWIRE_HTTP_ADDR"),
        ("dashboard", "JOBWIRE_DASHBOARD_ADDR"),
    ],
)
async def test_an_address_in_use_is_named(tmp_path: Path, command: str, var: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        addr = f"127.0.0.1:{taken.getsockname()[1]}"
        _, err = await _start_refused(tmp_path, command, **{var: addr})
    assert f"cannot listen on {var}={addr}".encode() in err


@pytest.mark.parametrize(
    ("command", "var", "value", "named"),
    [
        # The SDK's own checks: a traceback at start, naming its parameter, not the variable.
        ("serve", "OTEL_BSP_MAX_QUEUE_SIZE", "-1", "OTEL_BSP_MAX_QUEUE_SIZE"),
        ("bridge", "OTEL_BSP_SCHEDULE_DELAY", "0", "OTEL_BSP_SCHEDULE_DELAY"),
        ("serve", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "4096", "OTEL_BSP_MAX_QUEUE_SIZE"),
        # Not a number: an ERROR with a traceback, the default taken in its place.
        ("bridge", "OTEL_BSP_MAX_QUEUE_SIZE", "lots", "OTEL_BSP_MAX_QUEUE_SIZE"),
        ("serve", "OTEL_BSP_EXPORT_TIMEOUT", "30s", "OTEL_BSP_EXPORT_TIMEOUT"),
    ],
)
async def test_a_bad_trace_batch_setting_is_named(
    tmp_path: Path, command: str, var: str, value: str, named: str
) -> None:
    """README "Traces": OTEL_BSP_* configure the span batches; a bad value stops the
    process at start with one line naming it, as every other setting."""
    endpoint = f"http://127.0.0.1:{free_port()}"
    _, err = await _start_refused(
        tmp_path, command, OTEL_EXPORTER_OTLP_ENDPOINT=endpoint, **{var: value}
    )
    lines = [line for line in err.decode().splitlines() if line.strip()]
    assert len(lines) == 1 and var in lines[0] and named in lines[0], err
    assert repr(value) in lines[0] or value in lines[0], err


async def _first_words(tmp_path: Path, command: str, env_file: str) -> tuple[int | None, bytes]:
    """`jobwire COMMAND` with only `env_file` (JOBWIRE_ENV_FILE) setting its logging: its
    exit status (None: still running) and its first line on stderr."""
    env = port_0_environment(
        tmp_path, JOBWIRE_LOG_LEVEL="", JOBWIRE_LOG_FORMAT="", JOBWIRE_ENV_FILE=env_file
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli", command, env=env, stderr=asyncio.subprocess.PIPE
    )
    assert proc.stderr is not None
    status = None
    try:
        line = await asyncio.wait_for(proc.stderr.readline(), 30)
        with contextlib.suppress(TimeoutError):
            status = await asyncio.wait_for(proc.wait(), 3)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return status, line


@pytest.mark.parametrize("command", ["bridge", "dashboard"])
async def test_a_bad_log_level_in_the_env_file_is_named(tmp_path: Path, command: str) -> None:
    """README: the bridge and the dashboard take every setting of theirs from the env
    file. JOBWIRE_LOG_LEVEL and JOBWIRE_LOG_FORMAT there were not read: a bad level
    started the process, quietly at INFO."""
    env_file = tmp_path / "site.env"
    env_file.write_text("JOBWIRE_LOG_LEVEL=loud\n")
    status, line = await _first_words(tmp_path, command, str(env_file))
    assert status == 1 and line.startswith(b"JOBWIRE_LOG_LEVEL must be one of"), (status, line)


async def test_the_log_format_in_the_env_file_is_used(tmp_path: Path) -> None:
    env_file = tmp_path / "site.env"
    env_file.write_text("JOBWIRE_LOG_FORMAT=text\n")
    status, line = await _first_words(tmp_path, "bridge", str(env_file))
    assert status is None and b" INFO http_bridge: bridge on http" in line, line


@pytest.mark.parametrize("command", ["serve", "bridge", "dashboard"])
async def test_a_grpc_token_no_header_can_carry_is_named_not_shown(
    tmp_path: Path, command: str
) -> None:
    """Before: the service took it (no client could ever match), and the bridge and the
    dashboard started and then failed every call with grpc's bare ExecuteBatchError."""
    out, err = await _start_refused(tmp_path, command, JOBWIRE_GRPC_TOKEN="s3cr3t-from-a-file\n")
    assert b"JOBWIRE_GRPC_TOKEN" in err and b"line breaks" in err, err
    assert b"s3cr3t" not in out + err


@pytest.mark.parametrize(
    ("command", "files", "named"),
    [
        # Files that are not PEM: gRPC's own errors, then "cannot listen on
        # JOBWIRE_GRPC_ADDR", the wrong variable; the bridge and the dashboard started
        # and failed every call.
        ("serve", {"JOBWIRE_GRPC_TLS_CERT": "junk", "JOBWIRE_GRPC_TLS_KEY": "junk"},
         "JOBWIRE_GRPC_TLS_CERT '{junk}' is not a PEM certificate"),
        ("serve", {"JOBWIRE_GRPC_TLS_CERT": "cert", "JOBWIRE_GRPC_TLS_KEY": "cert"},
         "JOBWIRE_GRPC_TLS_KEY '{cert}' is not a PEM private key"),
        ("serve", {"JOBWIRE_GRPC_TLS_CERT": "cert", "JOBWIRE_GRPC_TLS_KEY": "key",
                   "JOBWIRE_GRPC_TLS_CLIENT_CA": "junk"},
         "JOBWIRE_GRPC_TLS_CLIENT_CA '{junk}' is not a PEM certificate"),
        ("bridge", {"JOBWIRE_SERVICE_TLS_CA": "junk"},
         "JOBWIRE_SERVICE_TLS_CA '{junk}' is not a PEM certificate"),
        ("healthcheck", {"JOBWIRE_SERVICE_TLS_CA": "junk"},
         "JOBWIRE_SERVICE_TLS_CA '{junk}' is not a PEM certificate"),
        ("dashboard", {"JOBWIRE_SERVICE_TLS_CA": "key"},
         "JOBWIRE_SERVICE_TLS_CA '{key}' is not a PEM certificate"),
        ("bridge", {"JOBWIRE_SERVICE_TLS_CA": "system", "JOBWIRE_SERVICE_TLS_CERT": "junk",
                    "JOBWIRE_SERVICE_TLS_KEY": "key"},
         "JOBWIRE_SERVICE_TLS_CERT '{junk}' is not a PEM certificate"),
        ("dashboard", {"JOBWIRE_SERVICE_TLS_CA": "cert", "JOBWIRE_SERVICE_TLS_CERT": "cert",
                       "JOBWIRE_SERVICE_TLS_KEY": "junk"},
         "JOBWIRE_SERVICE_TLS_KEY '{junk}' is not a PEM private key"),
    ],
)  # fmt: skip
async def test_a_tls_file_that_is_not_pem_is_named(
    tmp_path: Path, command: str, files: dict[str, str], named: str
) -> None:
    cert, key = _self_signed(tmp_path)
    junk = tmp_path / "hostname"
    junk.write_text("build-host-7\n")
    paths = {"cert": str(cert), "key": str(key), "junk": str(junk), "system": "system"}
    env = {var: paths[which] for var, which in files.items()}
    _, err = await _start_refused(tmp_path, command, **env)
    lines = [line for line in err.decode().splitlines() if line.strip()]
    assert named.format(**paths) in err.decode(), err
    assert len(lines) == 1 and "cannot listen" not in lines[0], err
