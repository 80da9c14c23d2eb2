"""Log lines quote what arrived from the internet (a request's decoded path, ids,
messages): none may carry a raw control character into an operator's terminal or a
forged line into the log, nor a path token. The real `jobwire bridge` process, its
stderr read as bytes."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import signal
import sys
from pathlib import Path

import pytest

from http_bridge.config import read_env_file
from http_bridge.redaction import redact
from service.logs import (
    JOB_ID,
    JsonFormatter,
    RedactingFilter,
    TextFormatter,
    printable,
    record_context,
)
from tests.bridge_harness import TRANSCODE_TOKEN
from tests.bridge_process import cli_bridge_process, raw_exchange
from tests.helpers import run_environment, until

# Percent-encoded, so they pass the HTTP parser and are decoded into request.path:
# ESC ] 0;title BEL sets a terminal's title; a newline would start a forged line;
# U+202E reverses what follows on screen; U+009B is a C1 control (CSI).
HOSTILE = (
    "/x%1b%5d0;PWNED%07y",
    "/a%0a2026-01-01%2000:00:00,000%20INFO%20forged",
    "/b%e2%80%aeevil",
    "/c%c2%9b31m",
    "/d%0d%7f",
)
# What secrets.token_urlsafe(32) makes: CreateJob's per-job callback token.
JOB_TOKEN = "Zq3xV0b_Kc9-LmT2pR7sYw4NhA8dEf1GjUoIiBkX5ne"
SECRETARY_TOKEN_PATHS = (
    f"/api/external/jobs/doc-7/{JOB_TOKEN}",
    f"/api/external/jobs/doc-7/{JOB_TOKEN[:9]}",  # a short one, after the id: all of it
    f"/api/external/jobs/doc-7/artifacts/text.txt/{JOB_TOKEN[9:18]}",
    f"/api/external/{JOB_TOKEN}/jobs",  # token-shaped, anywhere
    f"/{JOB_TOKEN}",
)
RAW_FORBIDDEN = (b"\x1b", b"\x07", b"\r", b"\x7f", "\u202e".encode(), "\u009b".encode())
LINE_START = re.compile(rb"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ ")


async def _hostile_requests(port: int) -> None:
    for path in HOSTILE:
        reply = await raw_exchange(
            port, f"GET {path} HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n".encode()
        )
        assert reply.startswith(b"HTTP/1.1 404"), (path, reply[:80])
    # a per-job callback token (the bridge cannot know it) where a misbuilt callback URL
    # puts it: after the job id, or as a path of its own
    for path in SECRETARY_TOKEN_PATHS:
        reply = await raw_exchange(
            port, f"GET {path} HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n".encode()
        )
        assert reply.startswith(b"HTTP/1.1 404"), (path, reply[:80])
    # the real token, with an encoded slash in it: all of it must stay out of the log
    token = TRANSCODE_TOKEN[:6] + "%2F" + TRANSCODE_TOKEN[6:]
    for method in ("GET", "POST"):
        await raw_exchange(
            port,
            f"{method} /api/transcode-callback/{token} HTTP/1.1\r\nHost: h\r\n"
            "Content-Length: 0\r\nConnection: close\r\n\r\n".encode(),
        )


@pytest.mark.parametrize("fmt", ["text", "json"])
async def test_the_access_log_escapes_decoded_paths_and_redacts_the_path_token(
    tmp_path: Path, fmt: str
) -> None:
    async with cli_bridge_process(
        "127.0.0.1:1",  # nothing listens: these requests never reach the service
        tmp_path,
        JOBWIRE_LOG_FORMAT=fmt,
        JOBWIRE_ACCESS_LOG="all",
    ) as bridge:
        await _hostile_requests(bridge.port)
        log = bridge.log_path.read_bytes()
        # each request's line is written before its answer leaves the bridge
        assert b"/api/transcode-callback/***" in log
    for forbidden in RAW_FORBIDDEN:
        assert forbidden not in log, forbidden
    assert TRANSCODE_TOKEN[:6].encode() not in log
    assert TRANSCODE_TOKEN[6:].encode() not in log
    for part in (JOB_TOKEN[:9], JOB_TOKEN[9:18], JOB_TOKEN[18:]):
        assert part.encode() not in log, part
    for redacted in (b"GET /api/external/jobs/doc-7/*** 404", b"GET /api/external/***/jobs 404"):
        assert redacted in log, redacted
    lines = log.decode().splitlines()
    if fmt == "json":
        messages = [json.loads(line)["message"] for line in lines]
    else:
        for line in lines:
            assert LINE_START.match(line.encode()), f"a line that is not a log record: {line!r}"
        messages = lines
    access = "\n".join(m for m in messages if " GET /" in m)
    for shown in (
        r"/x\x1b]0;PWNED\x07y",
        r"/a\n2026-01-01",
        r"/b\u202eevil",
        r"/c\x9b31m",
        r"/d\r\x7f",
    ):
        assert shown in access, (shown, access)


def test_what_the_access_log_shows_of_a_path() -> None:
    """A Secretary path shows its job id and, below it, only an artifact's name; any
    segment shaped like a callback token (43+ of [A-Za-z0-9_-], both cases) is hidden."""
    assert redact("/api/external/jobs/doc-7") == "/api/external/jobs/doc-7"
    assert redact("/api/external/jobs/doc-7/artifacts/images.zip") == (
        "/api/external/jobs/doc-7/artifacts/images.zip"
    )
    assert redact(f"/api/external/jobs/doc-7/{JOB_TOKEN}") == "/api/external/jobs/doc-7/***"
    assert redact("/api/external/jobs/doc-7/status/x") == "/api/external/jobs/doc-7/***"
    assert redact(f"/api/external/jobs/{JOB_TOKEN}") == "/api/external/jobs/***"
    assert redact(f"/API/External/Jobs/doc-7/{JOB_TOKEN[:20]}") == "/API/External/Jobs/doc-7/***"
    assert redact(f"/x/{JOB_TOKEN}/y") == "/x/***/y"
    # ids and names that are no token stay: a UUID, a hex digest, a long readable id
    for path in (
        "/api/external/jobs/123e4567-e89b-12d3-a456-426614174000",
        "/api/external/jobs/" + "ab12" * 16,
        "/api/external/jobs/monthly-report-2026-11-extraction-batch-0001",
    ):
        assert redact(path) == path


def _format(formatter: logging.Formatter, message: str, *args: object) -> str:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    handler.addFilter(RedactingFilter({}))
    logger = logging.getLogger("jobwire.test_log_injection")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        try:
            raise ValueError("bad \x1b[2J value\nsecond line")
        except ValueError:
            logger.exception(message, *args)
    finally:
        logger.removeHandler(handler)
    return stream.getvalue()


def test_messages_and_tracebacks_are_printable_in_both_formats() -> None:
    text = _format(TextFormatter(), "job %s failed", "j\x1b]0;x\x07\u202e")
    first, *rest = text.splitlines()
    assert first.endswith(r"job j\x1b]0;x\x07\u202e failed")
    assert rest[0] == "Traceback (most recent call last):"  # the traceback keeps its lines
    assert r"ValueError: bad \x1b[2J value" in text and "\x1b" not in text
    entry = json.loads(_format(JsonFormatter(), "job %s", "j\u009b\u2028"))
    assert entry["message"] == r"job j\x9b\u2028"
    # The job id of the call a line was logged in: what the request said, unchecked.
    record_context()
    token = JOB_ID.set("j\u202e\u009b\u2028\x85")
    try:
        line = _format(JsonFormatter(), "calls fail")
    finally:
        JOB_ID.reset(token)
    assert len(line.splitlines()) == 1  # str.splitlines breaks at U+2028 and U+0085 too
    assert json.loads(line)["job_id"] == r"j\u202e\x9b\u2028\x85"
    assert "\x1b" not in entry["error"] and r"\x1b[2J" in entry["error"]


def test_printable_keeps_every_script_and_escapes_only_controls() -> None:
    kept = "größe 中文 😀 e\u0301 a\u200db \u00a0"
    assert printable(kept) == kept
    assert printable("\t\x00\udcff\u2066") == r"\t\x00\udcff\u2066"


async def test_secrets_a_bridge_on_its_own_reads_from_the_env_file_are_redacted(
    tmp_path: Path,
) -> None:
    """`jobwire bridge` (and `jobwire dashboard`) read their secrets from the env file
    when the environment lacks them (`make run`'s jobwire.env, or a site's own). The log
    filter knew only the environment's values: a key the operator chose, not shaped like
    a token, was written in clear when a worker put it in the URL path."""
    api_key = "video-key-of-this-site"
    env_file = tmp_path / "site.env"
    env_file.write_text(f"API_KEY={api_key}\n")
    env_file.chmod(0o600)
    async with cli_bridge_process(
        "127.0.0.1:1",  # nothing listens: no request here needs the service
        tmp_path,
        JOBWIRE_LOG_FORMAT="text",
        JOBWIRE_ENV_FILE=str(env_file),
        API_KEY="",  # empty in the environment: the file's value is the bridge's key
    ) as bridge:
        reply = await raw_exchange(
            bridge.port,
            f"GET /{api_key}/status HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n".encode(),
        )
        assert reply.startswith(b"HTTP/1.1 404")
        await until(lambda: b" 404 " in bridge.log_path.read_bytes())
    written = bridge.log()
    assert "GET /***/status 404" in written, written
    assert api_key not in written


async def test_secrets_jobwire_run_keeps_in_its_env_file_are_redacted(tmp_path: Path) -> None:
    """`jobwire run` (make run) generates the bridge's secrets into jobwire.env. A worker
    that puts its key in the URL path gets a 404, whose access-log line quotes the path:
    the key must not reach the log, though it came from the file, not the environment."""
    ports, run_env = run_environment(tmp_path)
    env = {**os.environ, **run_env, "JOBWIRE_LOG_FORMAT": "text"}
    env_file = Path(run_env["JOBWIRE_ENV_FILE"])
    for name in ("API_KEY", "BATCH_CALLBACK_SECRET", "TRANSCODE_CALLBACK_TOKEN"):
        env.pop(name, None)
    log_path = tmp_path / "run.log"
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cli", "run", env=env, stdout=log, stderr=log
        )
    try:
        await until(lambda: b"bridge on http://" in log_path.read_bytes(), timeout=60)
        api_key = read_env_file(env_file)["API_KEY"]
        reply = await raw_exchange(
            ports["http"],
            f"GET /{api_key}/status HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n".encode(),
        )
        assert reply.startswith(b"HTTP/1.1 404")
        await until(lambda: b" 404 " in log_path.read_bytes())
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 30)
    written = log_path.read_text()
    assert "GET /***/status 404" in written, written
    assert api_key not in written
