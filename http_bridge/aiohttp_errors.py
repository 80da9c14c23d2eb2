"""The errors aiohttp answers itself are answered in JSON, like every other error.

aiohttp answers some requests before any contract handler sees them, with a
`text/plain` body no contract documents:
- a request it cannot parse (a request line over 8190 bytes, a broken header or broken
  framing), before routing, from its connection handler;
- a path no route matches (404), a method a path does not take (405), an `Expect` it
  does not know (417), from its router.

Both are answered here with one JSON body that fits all four contracts' error shapes
(which contract the bytes were meant for is not known), naming the problem without
quoting the bytes (a request line may carry a token).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import hdrs, web
from aiohttp.http_exceptions import (
    BadHttpMethod,
    BadStatusLine,
    ContentEncodingError,
    DecompressSizeError,
    InvalidHeader,
    InvalidURLError,
    LineTooLong,
    PayloadEncodingError,
)
from aiohttp.web_protocol import RequestHandler

# Most specific first: BadHttpMethod is a BadStatusLine, the payload errors share a base.
_PROBLEMS: tuple[tuple[type[BaseException], str], ...] = (
    (LineTooLong, "the request line or a header is too long"),
    (BadHttpMethod, "invalid HTTP method"),
    (BadStatusLine, "invalid HTTP request line"),
    (InvalidURLError, "invalid request target"),
    (InvalidHeader, "invalid header"),
    (DecompressSizeError, "decompressed body too large"),
    (ContentEncodingError, "invalid Content-Encoding"),
    (PayloadEncodingError, "invalid body framing (Content-Length / Transfer-Encoding)"),
)


def problem(status: int, exc: BaseException | None) -> str:
    if status >= 500:
        return "unexpected error" if status == 500 else "service unavailable"
    for kind, text in _PROBLEMS:
        if isinstance(exc, kind):
            return f"malformed HTTP request: {text}"
    reason = _parser_reason(exc)
    return f"malformed HTTP request: {reason}" if reason else "malformed HTTP request"


def _parser_reason(exc: BaseException | None) -> str | None:
    """llhttp's reason ("Invalid header field char"), from aiohttp's C parser message
    "<reason>:\n\n  <the bytes>\n  <pointer>"; the bytes after it are not passed on."""
    reason, sep, _ = str(getattr(exc, "message", "")).partition(":\n\n")
    if sep and len(reason) <= 80 and reason.isascii() and reason.isprintable():
        return reason
    return None


_ROUTER_PROBLEMS = {
    404: "no such path",
    405: "method not allowed for this path",
    417: "unsupported Expect header",
}


def error_body(text: str) -> bytes:
    # `error` for AWS Batch and the video worker, `status` for the Secretary, `ack`
    # for AuroraCloud: the one body every contract's error schema accepts.
    return orjson.dumps({"status": "error", "error": text, "ack": False})


async def _router_errors_in_json(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: the router's own HTTPExceptions (contract handlers answer
    with plain Responses) get error_body, keeping their headers (Allow on a 405)."""
    if isinstance(response, web.HTTPException) and response.status >= 400:
        body = error_body(_ROUTER_PROBLEMS.get(response.status, response.reason.lower()))
        response.body = body
        response.content_type = "application/json"
        # Content-Length was set from the old body just before this hook runs.
        response.headers[hdrs.CONTENT_LENGTH] = str(len(body))


def install(app: web.Application) -> None:
    app.on_response_prepare.append(_router_errors_in_json)


class JsonErrorHandler(RequestHandler):
    """aiohttp's connection handler, answering its own errors with error_body."""

    __slots__ = ()

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        super().handle_error(request, status, exc, message)  # logs; raises if already sent
        response = web.Response(
            status=status, body=error_body(problem(status, exc)), content_type="application/json"
        )
        response.force_close()
        return response


def json_errors(server: web.Server) -> Callable[[], RequestHandler]:
    """A protocol factory for `server` whose connections answer errors in JSON."""
    # What web.Server.__call__ does, with the subclass (aiohttp is pinned: private attrs).
    return lambda: JsonErrorHandler(server, loop=server._loop, **server._kwargs)
