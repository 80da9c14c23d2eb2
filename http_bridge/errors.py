"""gRPC status -> HTTP status, in one table, and the per-contract error rendering.

The table follows google/rpc/code.proto with these deliberate deviations:
- FAILED_PRECONDITION -> 409, not 400: the service raises it only when an event hits a
  job in a terminal state. That is a conflict with the stored state, not a malformed
  payload; a 400 would tell the Secretary "fix the payload and resend", which cannot
  help. (AuroraCloud never sees it: aurora.py acknowledges such tasks.)
- DEADLINE_EXCEEDED -> 503 + Retry-After, not 504: for a worker both mean "the
  service did not answer in time, retry later", and 503 is what the contracts retry on.
- ABORTED -> 503 + Retry-After, not 409: the service answers it only for a race it
  lost (MongoDB replicas contending for a job, "…; retry"), with nothing applied. A
  409 told a worker the job was settled (the video worker: "El video ya está
  finalizado", for a claim or a report that never happened), so it dropped the event.
- RESOURCE_EXHAUSTED -> 429 also carries Retry-After.
- CANCELLED -> 503 + Retry-After, not 499: the bridge never cancels its own calls, so a
  CANCELLED comes from the service: gRPC ends calls that reach a server as it stops
  with it, unapplied. A 4xx would tell the worker not to retry, and lose the event.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import orjson
from aiohttp import web
from aiohttp.http_exceptions import ContentEncodingError, HttpProcessingError

from jobwire.client.channel import token_refused

from .redaction import loggable_path

log = logging.getLogger(__name__)

HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 503,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 503,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.ABORTED: 503,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
}
# What the metrics and the access log say of a request whose client went away before
# its answer (nothing is sent).
CLIENT_CLOSED = 499
# Statuses after which the worker should come back: they carry Retry-After.
RETRYABLE_HTTP = frozenset({429, 503})

_BY_NUMBER: dict[int, grpc.StatusCode] = {c.value[0]: c for c in grpc.StatusCode}


def status_code_of(number: int) -> grpc.StatusCode:
    """The grpc.StatusCode of a google.rpc.Code int (ReportEventResult.code)."""
    return _BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)


class BridgeError(Exception):
    """A request ends with `status`; `code` is the gRPC status it came from, if any."""

    def __init__(
        self,
        status: int,
        message: str,
        code: grpc.StatusCode | None = None,
        *,
        token_sent: bool | None = None,
        retry_after: int | None = None,
        close_connection: bool = False,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        # 401: whether the caller sent a credential (None: judge by the headers).
        self.token_sent = token_sent
        # 429/503: seconds for Retry-After (None: the configured default).
        self.retry_after = retry_after
        # No next request can be read on this connection: close it after the answer.
        self.close_connection = close_connection or status == 408


class RequestProblem(BridgeError):
    """A 400 for the request itself (a header, the body's encoding, a value the
    contract's fixed field error does not describe, such as a video log line's level),
    not for missing fields: a contract whose field error is one fixed body (the video
    worker's) must still name the problem, not fields the request may not even have."""

    def __init__(self, message: str, *, close_connection: bool = False, status: int = 400) -> None:
        super().__init__(status, message, close_connection=close_connection)


class RpcFailed(BridgeError):
    """The service answered a call (or one event of a batch) with a non-OK status."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(HTTP_STATUS.get(code, 500), message, code)


TOKEN_REFUSED = "the service refused JOBWIRE_GRPC_TOKEN"
_token_refused_logged = 0.0  # monotonic time of the last such log line


def from_rpc_error(exc: grpc.aio.AioRpcError) -> RpcFailed:
    if token_refused(exc):
        # The bridge's own credential, not the worker's: a 401 told a worker with the
        # right secret that it was wrong (workers do not retry a 401). 503: it comes
        # back once the operator sets the token.
        note_token_refused()
        return RpcFailed(grpc.StatusCode.UNAVAILABLE, TOKEN_REFUSED)
    return RpcFailed(exc.code(), exc.details() or exc.code().name)


def note_token_refused() -> None:
    """Tells the operator that the service refuses the bridge's token (at most once a
    minute: every call fails until it is set)."""
    global _token_refused_logged
    if time.monotonic() - _token_refused_logged > 60:
        _token_refused_logged = time.monotonic()
        log.error(
            "the service refused the bridge's JOBWIRE_GRPC_TOKEN (missing or not the"
            " service's): every call fails until it is set to the service's token"
        )


# A contract turns an error into its own body (dict or list, serialised with orjson).
Renderer = Callable[[BridgeError], Any]
# A contract's credential as its auth parses it ("" when none: the client's address).
Credential = Callable[[web.Request], str]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(
    body: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(body), status=status, content_type="application/json", headers=headers
    )


def error_response(
    err: BridgeError, render: Renderer, retry_after: int, token_sent: bool = False
) -> web.Response:
    headers: dict[str, str] = {}
    if err.status in RETRYABLE_HTTP:
        headers["Retry-After"] = str(err.retry_after or retry_after)
    if err.status == 401:
        headers["WWW-Authenticate"] = challenge(
            token_sent if err.token_sent is None else err.token_sent
        )
    response = json_response(render(err), err.status, headers or None)
    if err.close_connection:
        response.force_close()  # e.g. the rest of a late body is not worth waiting for
    return response


# Content-Encoding values aiohttp decodes; any other is passed on undecoded.
_CODINGS = frozenset({"gzip", "deflate", "br", "zstd"})


def unreadable_body(request: web.Request, exc: Exception) -> RequestProblem:
    """aiohttp could not read the body: not the data its Content-Encoding names, or
    broken framing. The client's bytes (400), and the parser is stuck past them, so
    the connection closes. The body is marked ended: aiohttp drains what is left of it
    after the answer, and that read raised the error again ("Unhandled exception")."""
    request.content.feed_eof()
    cause = exc.__cause__ if isinstance(exc, web.RequestPayloadError) else exc
    coding = request.headers.get("Content-Encoding", "").strip().lower()
    if isinstance(cause, ContentEncodingError) and coding in _CODINGS:
        message = f"request body does not decode as Content-Encoding {coding}"
    else:
        message = f"malformed request body ({type(cause or exc).__name__})"
    return RequestProblem(message, close_connection=True)


def challenge(token_sent: bool) -> str:
    """RFC 9110 11.6.1 / RFC 6750 3: every 401 names its scheme; a wrong token says so."""
    if token_sent:
        return 'Bearer realm="jobwire", error="invalid_token"'
    return 'Bearer realm="jobwire"'


def credential_sent(request: web.Request) -> bool:
    headers = request.headers
    return bool(
        headers.get("Authorization")
        or headers.get("X-Callback-Token")
        or request.match_info.get("token")
    )


def contract_errors(render: Renderer, *, credential: Credential) -> Callable[[Handler], Handler]:
    """Wraps a handler so every failure is answered in its contract's error body;
    `JOBWIRE_RATE_LIMIT` counts per `credential`."""

    def decorate(handler: Handler) -> Handler:
        # Late (edge and grpc_client import this module), but once per handler rather
        # than two import statements run on every request.
        from .edge import check_rate, count_failed_authentication, vouch_for_credential
        from .grpc_client import CONFIG

        @functools.wraps(handler)
        async def wrapper(request: web.Request) -> web.StreamResponse:
            try:
                key = check_rate(request, credential)
                response = await handler(request)
                if response.status < 400 and key is not None:
                    vouch_for_credential(request, key)
                return response
            except grpc.aio.AioRpcError as exc:
                err: BridgeError = from_rpc_error(exc)
            except BridgeError as exc:
                err = exc
            except web.HTTPException:
                raise
            except (web.RequestPayloadError, HttpProcessingError) as exc:
                # A body aiohttp could not decode, a broken chunked encoding, a body
                # cut short: the client's bytes. (RequestPayloadError was a 500.)
                err = unreadable_body(request, exc)
            except ConnectionError:
                # The client went away mid-request (its connection lost while its body
                # was read): no answer reaches it, and the bridge did not fail. Counted
                # and logged as 499 (nginx's 'client closed request'), not a 500.
                log.info(
                    "%s %s: the client closed the connection",
                    request.method,
                    loggable_path(request),
                )
                return web.Response(status=CLIENT_CLOSED)
            except Exception:
                log.exception("unexpected error in %s %s", request.method, loggable_path(request))
                err = BridgeError(500, "internal error")
            if err.status >= 500:
                log.warning(
                    "%s %s -> %d: %s",
                    request.method,
                    loggable_path(request),
                    err.status,
                    err.message,
                )
            if err.status == 401:
                count_failed_authentication(request)
            retry_after = request.app[CONFIG].retry_after_seconds
            return error_response(err, render, retry_after, credential_sent(request))

        return wrapper

    return decorate
