"""`jobwire callback ...`: send the four contracts' callbacks like the real workers do.

Stdlib HTTP only (urllib), so a worker image needs nothing beyond this package:

    jobwire callback batch <jobId> success <outputKey>
    jobwire callback batch <jobId> failed "<error>"
    jobwire callback video pending | report <videoId> <status> <message> | log <level> <message>
    jobwire callback aurora <task_id> succeeded|failed [--output ... | --error-code ...]
    jobwire callback secretary <jobId> progress|final|failed ...

Exit code 0 on a 2xx answer, 1 otherwise; the answer's body is printed. When
`JOBWIRE_SIGNING_SECRET_<CONTRACT>` (AWS_BATCH, VIDEO_WORKER, AURORA, SECRETARY) is set,
each request is signed (Standard Webhooks v1: webhook-id, -timestamp, -signature).
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import re
import sys
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import quote, urlsplit

from .signing import decode_secret, signature_headers

DEFAULT_BASE = "http://127.0.0.1:8080"


def base_url(args: argparse.Namespace) -> str:
    url: str = args.url or os.environ.get("JOBWIRE_BRIDGE_URL") or ""
    return (url or os.environ.get("NEXT_PUBLIC_APP_URL") or DEFAULT_BASE).rstrip("/")


def send(
    method: str,
    url: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    contract: str = "",
) -> int:
    check_url(url)
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Accept", "application/json")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    for name, value in (headers or {}).items():
        request.add_header(name, value)
    # Signed over the exact bytes sent; the bridge checks them before parsing.
    for name, value in signing_headers(contract, data or b"").items():
        request.add_header(name, value)
    try:
        with _OPENER.open(request, timeout=600) as response:
            status, payload = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, payload = exc.code, exc.read()
        if 300 <= status < 400:
            where = exc.headers.get("Location", "")  # repr: its controls escaped
            print(f"jobwire callback: {status} redirect to {where!r} not followed", file=sys.stderr)
    except (urllib.error.URLError, OSError) as exc:
        print(f"jobwire callback: {url}: {exc}", file=sys.stderr)
        return 1
    print(f"{status} {for_terminal(payload.decode('utf-8', 'replace'))}".rstrip())
    return 0 if 200 <= status < 300 else 1


# What text from a service must not bring to the terminal raw: controls but line breaks
# and tabs (an ESC sequence retitles or clears it; U+009B is CSI), bidi controls (a
# title's U+202E reverses the line) and line separators.
_TERMINAL_UNSAFE = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\u2028\u2029]"
)


def for_terminal(text: str) -> str:
    """`text` with what must not reach a terminal raw escaped as JSON writes it
    (`\\u001b`), so JSON reads back the same: JSON escapes C0 itself, not DEL, C1 or
    bidi marks. For this CLI's answers and `jobwire jobs`' JSON alike."""
    return _TERMINAL_UNSAFE.sub(lambda match: f"\\u{ord(match.group()):04x}", text)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is answered, not followed: urllib turned a redirected POST into a GET
    without its body (the callback lost, yet the GET's 200 said success) and sent the
    Authorization header on to wherever the redirect pointed."""

    def redirect_request(self, *_: Any) -> None:
        return None  # urllib then raises HTTPError with the 3xx and its body


_OPENER = urllib.request.build_opener(_NoRedirect)


def usage_error(message: str) -> NoReturn:
    """One line on stderr and status 2, as argparse says a usage error: nothing is sent."""
    print(f"jobwire callback: {message}", file=sys.stderr)
    raise SystemExit(2)


def is_http_url(url: str) -> bool:
    """An http(s) URL with a host and a valid port. One that does not parse
    (`http://[::1`, a port past 65535) raised ValueError: a traceback."""
    try:
        parts = urlsplit(url)
        return parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
    except ValueError:  # .port raises it past 65535
        return False


URL_SOURCES = "--url, --callback-url, CALLBACK_URL, JOBWIRE_BRIDGE_URL or NEXT_PUBLIC_APP_URL"


def check_url(url: str) -> None:
    """`is_http_url` without credentials, else a usage error."""
    try:
        netloc = urlsplit(url).netloc
    except ValueError:  # `http://[::1`: said by the check below
        netloc = ""
    if "@" in netloc:
        # urllib does not send them (it looked "user:pass@host" up as a host name), and
        # the connection error showed them: named, never shown.
        usage_error(
            f"the URL ({URL_SOURCES}) holds credentials (user:password@), which are not"
            " sent: leave them out; a contract's secret goes in its token option"
        )
    if not is_http_url(url):
        usage_error(f"{url!r} is no http(s) URL with a host and port (from {URL_SOURCES})")


def signing_headers(contract: str, data: bytes) -> dict[str, str]:
    secrets = os.environ.get(f"JOBWIRE_SIGNING_SECRET_{contract.upper()}", "").split()
    if not contract or not secrets:
        return {}
    try:
        keys = [decode_secret(s) for s in secrets]
    except ValueError as exc:
        raise SystemExit(f"JOBWIRE_SIGNING_SECRET_{contract.upper()}: {exc}") from None
    return signature_headers(keys, data)


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def bearer(env_name: str, given: str, option: str = "--token") -> dict[str, str]:
    """The Authorization header. A token with a line break (read from a file) or another
    control cannot go in a header: urllib's ValueError traceback printed it. Printable
    ASCII is what the bridge takes (http_bridge/edge.py). Named, never shown."""
    token = given or os.environ.get(env_name, "")
    if not (token.isascii() and token.isprintable()):
        usage_error(
            f"the token ({option} or {env_name}) must be printable ASCII, with no line"
            " breaks or other controls (a trailing newline from a file?)"
        )
    return {"Authorization": f"Bearer {token}"} if token else {}


# -- AWS Batch (same arguments as the contract's test-batch-callback.js) ------------


def batch(args: argparse.Namespace) -> int:
    url = os.environ.get("CALLBACK_URL") or f"{base_url(args)}/api/batch-callback"
    body: dict[str, Any] = {
        "jobId": args.job_id,
        "status": args.status,
        "callbackSecret": os.environ.get("BATCH_CALLBACK_SECRET", ""),
    }
    body["outputKey" if args.status == "success" else "error"] = args.detail
    return send("POST", url, body, contract="aws_batch")


# -- video worker ---------------------------------------------------------------------


def video(args: argparse.Namespace) -> int:
    base, auth = base_url(args), bearer("API_KEY", args.api_key, "--api-key")
    if args.action == "pending":
        return send("GET", f"{base}/api/pending", headers=auth, contract="video_worker")
    if args.action == "report":
        body: dict[str, Any] = {
            "status": args.status,
            "message": args.message,
            "timestamp": now_iso(),
            "videoId": args.video_id,
        }
        optional = {"percent": args.percent, "currentTime": args.current_time}
        body.update({k: v for k, v in optional.items() if v is not None})
        if args.total_time is not None:
            body["totalTime"] = args.total_time
        return send("POST", f"{base}/api/report", body, auth, "video_worker")
    line = {"level": args.level, "message": args.message, "timestamp": now_iso()}
    if args.video_id:
        line["videoId"] = args.video_id
    return send("POST", f"{base}/api/log", line, auth, "video_worker")


# -- AuroraCloud ----------------------------------------------------------------------


def aurora(args: argparse.Namespace) -> int:
    task: dict[str, Any] = {"task_id": args.task_id, "status": args.status}
    if args.status == "succeeded":
        fields = {"input": args.input, "output": args.output, "format": args.format}
        task.update({k: v for k, v in fields.items() if v})
        if args.duration is not None:
            task["duration"] = args.duration
        if args.spend_time is not None:
            task["spend_time"] = args.spend_time
    else:
        if args.error_code is not None:
            task["error_code"] = args.error_code
        if args.error_msg:
            task["error_msg"] = args.error_msg
    body = {"code": 0, "msg": args.status, "data": [task]}
    auth = bearer("TRANSCODE_CALLBACK_TOKEN", args.token)
    return send("POST", f"{base_url(args)}/api/transcode-callback", body, auth, "aurora")


# -- Secretary ------------------------------------------------------------------------


def secretary(args: argparse.Namespace) -> int:
    # The id is one path segment: sent as given, a space in it was http.client's
    # InvalidURL traceback and a '/' went to another path.
    job = quote(args.job_id, safe="")
    url = args.callback_url or f"{base_url(args)}/api/external/jobs/{job}"
    auth = {**bearer("CALLBACK_TOKEN", args.token), "X-Worker": "secretary"}
    body: dict[str, Any]
    if args.kind == "progress":
        body = {"phase": args.phase, "progress": args.progress}
        if args.message:
            body["message"] = args.message
        if args.process_id:
            body["process"] = {"id": args.process_id}
    elif args.kind == "final":
        # The files were read (and the JSON parsed) by argparse: see the types below.
        data: dict[str, Any] = {}
        if args.text_file is not None:
            data["extracted_text"] = args.text_file
        if args.images_zip is not None:
            name, raw = args.images_zip
            data["images_archive_data"] = base64.b64encode(raw).decode("ascii")
            data["images_archive_filename"] = name
        if args.metadata_file is not None:
            data["metadata"] = args.metadata_file
        body = {"phase": "completed", "data": data}
        if args.message:
            body["message"] = args.message
    else:
        error: dict[str, Any] = {"code": args.code, "message": args.message}
        if args.details is not None:
            error["details"] = args.details
        body = {"phase": "failed", "error": error}
    return send("POST", url, body, auth, "secretary")


# -- argparse -------------------------------------------------------------------------

# Argument types: a missing file or bad JSON is a usage error, one line naming the
# option and the problem, exit status 2, nothing sent (it was a traceback).


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot read {path!r}: {exc.strerror}") from None


def _text_file(path: str) -> str:
    try:
        return _read(path).decode("utf-8")
    except UnicodeDecodeError:
        raise argparse.ArgumentTypeError(f"{path!r} is not UTF-8 text") from None


def _zip_file(path: str) -> tuple[str, bytes]:
    return Path(path).name, _read(path)


def _json(text: str, what: str) -> Any:
    try:
        return json.loads(text, parse_constant=_not_json)
    except ValueError as exc:  # JSONDecodeError; also a UnicodeDecodeError of bytes
        raise argparse.ArgumentTypeError(f"{what} is not JSON: {exc}") from None


def _not_json(constant: str) -> Any:
    """Python's json reads NaN and Infinity, which JSON has not, and writes them back as
    they are: the body sent was not JSON, and the bridge answered 400."""
    raise ValueError(f"{constant} is no JSON number")


def _finite(text: str) -> float:
    """A number option: `nan` or `inf` went out as the bare token NaN, not JSON."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _json_file(path: str) -> Any:
    return _json(_text_file(path), repr(path))


def _json_object(text: str) -> dict[str, Any]:
    value = _json(text, repr(text[:40]))
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text[:40]!r}")
    return value


def register(subparsers: Any) -> None:
    """Adds `callback` to the `jobwire` command (cli/main.py)."""
    cb = subparsers.add_parser("callback", help="send a worker callback to the HTTP bridge")
    cb.add_argument("--url", default="", help=f"bridge base URL (default {DEFAULT_BASE})")
    contracts = cb.add_subparsers(dest="contract", required=True)

    p = contracts.add_parser(
        "batch", help="AWS Batch outcome (CALLBACK_URL, BATCH_CALLBACK_SECRET)"
    )
    p.add_argument("job_id")
    p.add_argument("status", choices=["success", "failed"])
    p.add_argument("detail", help="outputKey on success, error text on failure")
    p.set_defaults(func=batch)

    p = contracts.add_parser("video", help="video worker (API_KEY)")
    p.add_argument("--api-key", default="")
    actions = p.add_subparsers(dest="action", required=True)
    actions.add_parser("pending", help="claim the next pending video").set_defaults(func=video)
    r = actions.add_parser("report", help="report progress|error|success")
    r.add_argument("video_id")
    r.add_argument("status", choices=["progress", "error", "success"])
    r.add_argument("message")
    r.add_argument("--percent", type=_finite)
    r.add_argument("--current-time", help="HH:MM:SS.mmm")
    r.add_argument("--total-time", help="HH:MM:SS.mmm")
    r.set_defaults(func=video)
    lg = actions.add_parser("log", help="write a log line")
    lg.add_argument("level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    lg.add_argument("message")
    lg.add_argument("--video-id", default="")
    lg.set_defaults(func=video)

    p = contracts.add_parser("aurora", help="AuroraCloud task outcome (TRANSCODE_CALLBACK_TOKEN)")
    p.add_argument("task_id")
    p.add_argument("status", choices=["succeeded", "failed"])
    p.add_argument("--token", default="", help="Bearer token (TRANSCODE_CALLBACK_TOKEN)")
    p.add_argument("--input", default="", help="succeeded: the source URL")
    p.add_argument("--output", default="", help="succeeded: where the output was written")
    p.add_argument("--format", default="", help="succeeded: mp4, hls, dash or flv")
    p.add_argument("--duration", type=_finite, help="succeeded: media seconds")
    p.add_argument("--spend-time", type=_finite, help="succeeded: processing seconds")
    p.add_argument("--error-code", type=int, help="failed: AuroraCloud's error code")
    p.add_argument("--error-msg", default="", help="failed: AuroraCloud's error message")
    p.set_defaults(func=aurora)

    p = contracts.add_parser("secretary", help="Secretary event (CALLBACK_TOKEN)")
    p.add_argument("job_id")
    p.add_argument("--token", default="", help="per-job callback token")
    p.add_argument("--callback-url", default="", help="the callback_url handed to the worker")
    kinds = p.add_subparsers(dest="kind", required=True)
    k = kinds.add_parser("progress", help="phase and percent (0-100)")
    k.add_argument("phase")
    k.add_argument("progress", type=_finite)
    k.add_argument("--message", default="")
    k.add_argument("--process-id", default="")
    k.set_defaults(func=secretary)
    k = kinds.add_parser("final", help="the job succeeded: its results")
    k.add_argument("--text-file", type=_text_file, metavar="PATH", help="UTF-8 text")
    k.add_argument("--images-zip", type=_zip_file, metavar="PATH")
    k.add_argument("--metadata-file", type=_json_file, metavar="PATH", help="JSON")
    k.add_argument("--message", default="")
    k.set_defaults(func=secretary)
    k = kinds.add_parser("failed", help="the job failed: an error code and message")
    k.add_argument("code")
    k.add_argument("message")
    k.add_argument("--details", type=_json_object, help="JSON object")
    k.set_defaults(func=secretary)
