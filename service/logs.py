"""Process logging: one JSON object per line (or plain text), request context, redaction.

JOBWIRE_LOG_FORMAT=json|text (json unless stderr is a terminal), JOBWIRE_LOG_LEVEL
(INFO). A JSON line holds time, level, logger, message, and request_id / job_id
when known: the servicer's interceptor (and the bridge's middleware) set them per
call in context variables that `record_context` copies onto each record.

Secrets never reach a line: `RedactingFilter` sits on every handler and replaces
the values of the known secret variables, bearer tokens, Authorization and
X-Callback-Token header values and MongoDB URI credentials with "***".
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import re
import sys
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("jobwire_request_id", default="")
JOB_ID: contextvars.ContextVar[str] = contextvars.ContextVar("jobwire_job_id", default="")

# Environment variables whose values are secrets wherever they appear.
SECRET_ENV_VARS = (
    "BATCH_CALLBACK_SECRET",
    "API_KEY",
    "TRANSCODE_CALLBACK_TOKEN",
    "JOBWIRE_GRPC_TOKEN",
    "MONGODB_URI",
    "JOBWIRE_DASHBOARD_TOKEN",
    "JOBWIRE_SIGNING_SECRET_AWS_BATCH",
    "JOBWIRE_SIGNING_SECRET_VIDEO_WORKER",
    "JOBWIRE_SIGNING_SECRET_AURORA",
    "JOBWIRE_SIGNING_SECRET_SECRETARY",
)
# OTLP exporter headers (README "Traces"): `name=value` entries, comma-separated, that
# carry a collector's credentials. The OpenTelemetry SDK logs an entry it cannot parse
# (`api-key:KEY`) whole, so each entry and each value is a secret too.
HEADER_ENV_VARS = ("OTEL_EXPORTER_OTLP_HEADERS", "OTEL_EXPORTER_OTLP_TRACES_HEADERS")
REDACTED = "***"
_MIN_SECRET = 4  # shorter values would redact ordinary words

_PATTERNS = (
    # header dumps: "Authorization: Bearer x", "'x-callback-token': 'x'", authorization=x
    (
        re.compile(
            r"(?i)(['\"]?(?:authorization|x-callback-token|proxy-authorization)['\"]?\s*[:=]\s*"
            r"['\"]?(?:(?:bearer|basic)\s+)?)[^'\"\s,;}]+"
        ),
        r"\g<1>" + REDACTED,
    ),
    (re.compile(r"(?i)(\bbearer\s+)[A-Za-z0-9._~+/=-]+"), r"\g<1>" + REDACTED),
    (re.compile(r"(mongodb(?:\+srv)?://)[^@/\s]+@"), r"\g<1>" + REDACTED + "@"),
)


class RedactingFilter(logging.Filter):
    """Rewrites each record's message (and exception text) without secrets."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        super().__init__()
        env = os.environ if environ is None else environ
        # Split: a signing secret holds several space-separated keys during a rotation.
        values = {v for name in SECRET_ENV_VARS for v in env.get(name, "").split()}
        for name in HEADER_ENV_VARS:
            for entry in env.get(name, "").split(","):
                values.add(entry.strip())
                values.update(entry.split(sep, 1)[1].strip() for sep in "=:" if sep in entry)
        # Longest first, so a secret containing another is replaced whole.
        self._values = sorted((v for v in values if len(v) >= _MIN_SECRET), key=len, reverse=True)

    def redact(self, text: str) -> str:
        for value in self._values:
            if value in text:
                text = text.replace(value, REDACTED)
        for pattern, replacement in _PATTERNS:
            text = pattern.sub(replacement, text)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = self.redact(message)
        if redacted != message or record.args:
            record.msg, record.args = redacted, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        return True


# Bidirectional controls: they reorder how the rest of a line reads on screen.
_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
# Controls (a terminal runs ESC sequences; a newline forges a line), lone surrogates
# (undecodable header bytes), line and paragraph separators.
_ESCAPED_CATEGORIES = frozenset(("Cc", "Cs", "Zl", "Zp"))


def printable(text: str) -> str:
    """`text` with the characters no log line or terminal should get raw escaped as
    Python does (`\\x1b`, `\\u202e`): messages quote paths, ids and messages that
    arrived from the internet. Letters of every script, emoji and spaces stay."""
    if text.isprintable():  # the common case, in C
        return text
    return "".join(
        repr(c)[1:-1] if c in _BIDI or unicodedata.category(c) in _ESCAPED_CATEGORIES else c
        for c in text
    )


def printable_traceback(formatter: logging.Formatter, record: logging.LogRecord) -> str:
    """The record's traceback ("" when none), made printable line by line: its own
    line breaks stay. Kept on the record, as logging.Formatter keeps it."""
    if record.exc_info and not record.exc_text:
        record.exc_text = formatter.formatException(record.exc_info)
    if record.exc_text:
        record.exc_text = "\n".join(printable(line) for line in record.exc_text.split("\n"))
    return record.exc_text or ""


class TextFormatter(logging.Formatter):
    """`time LEVEL logger: message`, message and traceback made printable."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = printable(record.message)
        return super().formatMessage(record)

    def format(self, record: logging.LogRecord) -> str:
        printable_traceback(self, record)  # logging.Formatter then appends exc_text
        return super().format(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id, job_id, error."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            # JSON escapes only C0 controls; C1 and bidi controls would reach a
            # terminal that shows the line (`tail`, `jq -r`) raw.
            "message": printable(record.getMessage()),
        }
        for key in ("request_id", "job_id"):
            value = getattr(record, key, "")
            if value:  # a call's job id is whatever its request said, checked or not
                entry[key] = printable(str(value))
        if error := printable_traceback(self, record):
            entry["error"] = error
        return json.dumps(entry, ensure_ascii=False, default=str)


# Other context sources (the bridge's middleware) register a getter here; the
# record factory copies the first non-empty value onto each record.
_CONTEXT_SOURCES: list[tuple[str, Callable[[], str]]] = [
    ("request_id", REQUEST_ID.get),
    ("job_id", JOB_ID.get),
]
_installed = False


def add_context_source(key: str, getter: Callable[[], str]) -> None:
    if (key, getter) not in _CONTEXT_SOURCES:
        _CONTEXT_SOURCES.append((key, getter))


def record_context() -> None:
    """Installs (once) a record factory that stamps request_id / job_id on records."""
    global _installed
    if _installed:
        return
    _installed = True
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        for key, getter in _CONTEXT_SOURCES:
            if not getattr(record, key, ""):
                value = getter()
                if value:
                    setattr(record, key, value)
        return record

    logging.setLogRecordFactory(factory)


_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def default_format(stream: Any = None) -> str:
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return "text" if isatty is not None and isatty() else "json"


def configure(
    fmt: str | None = None,
    level: str | None = None,
    handlers: Iterable[logging.Handler] | None = None,
    environ: Mapping[str, str] | None = None,
) -> None:
    """Sets up the root logger from JOBWIRE_LOG_FORMAT / JOBWIRE_LOG_LEVEL; the secrets
    redacted are those `environ` holds (default: the process environment)."""
    # Blank is unset, as for every other setting (a blank level was refused as ''), and
    # a refusal shows the value as given, not lower- or upper-cased.
    given_fmt = fmt or os.environ.get("JOBWIRE_LOG_FORMAT") or ""
    fmt = given_fmt.strip().lower() or default_format()
    if fmt not in ("json", "text"):
        raise SystemExit(f"JOBWIRE_LOG_FORMAT must be json or text, got {given_fmt!r}")
    given_level = level or os.environ.get("JOBWIRE_LOG_LEVEL") or ""
    level = given_level.strip().upper() or "INFO"
    if level not in _LEVELS:
        raise SystemExit(
            f"JOBWIRE_LOG_LEVEL must be one of {', '.join(_LEVELS)}, got {given_level!r}"
        )
    record_context()
    chosen = list(handlers) if handlers is not None else [logging.StreamHandler()]
    formatter: logging.Formatter = JsonFormatter() if fmt == "json" else TextFormatter()
    redactor = RedactingFilter(environ)
    for handler in chosen:
        handler.setFormatter(formatter)
        handler.addFilter(redactor)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    for handler in chosen:
        root.addHandler(handler)
    root.setLevel(level)
