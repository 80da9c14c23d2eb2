"""The errors aiohttp answers itself are answered in JSON, like every other error.

aiohttp answers some requests before any contract handler sees them, with a
`text/plain` body no contract documents:
- a request it cannot parse (a request line over 8190 bytes, a broken header or broken
  framing), before routing, from its connection handler;
- a path no route matches (404), a method a path does not take (405), an `Expect` it
  does not know (417), from its router.

Both are answered here, by a subclass of aiohttp's connection handler (a request that
succeeds pays one type check, one version check and one call more; A/B of the first
two: within the ingest bench's noise), with one JSON body that fits all four contracts'
error shapes (which contract the bytes were meant for is not known), naming the
problem without quoting the bytes (a request line may carry a token).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import hdrs, web
from aiohttp.http import HttpVersion10, HttpVersion11, RawRequestMessage
from aiohttp.http_exceptions import (
    BadHttpMessage,
    BadHttpMethod,
    BadStatusLine,
    ContentEncodingError,
    DecompressSizeError,
    InvalidHeader,
    InvalidURLError,
    LineTooLong,
    PayloadEncodingError,
)
from aiohttp.streams import EMPTY_PAYLOAD
from aiohttp.web_protocol import RequestHandler, _ErrInfo
from aiohttp.web_request import BaseRequest
from multidict import CIMultiDict


class UnsupportedVersion(BadHttpMessage):
    """A request line llhttp takes but HTTP/1 framing has no answer for (HTTP/0.9,
    HTTP/2.0): aiohttp served it and answered in its version (`HTTP/2.0 200 OK`),
    a status line no HTTP/1 client reads (RFC 9112 2.3: a server must not send a
    version it does not conform to)."""


# Most specific first: BadHttpMethod is a BadStatusLine, the payload errors share a base.
_PROBLEMS: tuple[tuple[type[BaseException], str], ...] = (
    (UnsupportedVersion, "HTTP version not supported (HTTP/1.0 and HTTP/1.1 only)"),
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


# aiohttp's own messages that hold no client bytes (a duplicate can only be one of the
# headers it allows once, all known names): without them, a request with 200 headers,
# no Host or two was a bare "malformed HTTP request".
_AIOHTTP_REASON = re.compile(
    r"Too many headers received|Missing 'Host' header in request"
    r"|Duplicate '[A-Za-z-]{1,40}' header found"
)


def _parser_reason(exc: BaseException | None) -> str | None:
    """llhttp's reason ("Invalid header field char"), from aiohttp's C parser message
    "<reason>:\n\n  <the bytes>\n  <pointer>"; the bytes after it are not passed on.
    Else one of aiohttp's own fixed messages."""
    message = str(getattr(exc, "message", ""))
    reason, sep, _ = message.partition(":\n\n")
    if sep and len(reason) <= 80 and reason.isascii() and reason.isprintable():
        return reason
    if _AIOHTTP_REASON.fullmatch(message.removesuffix(".")):
        return message.removesuffix(".")
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


def _as_json(exc: web.HTTPException) -> web.Response:
    """The router's own HTTPException (contract handlers answer with plain Responses)
    with error_body instead of its text, keeping its other headers (Allow on a 405)."""
    headers = CIMultiDict(exc.headers)
    headers.popall(hdrs.CONTENT_TYPE, None)
    headers.popall(hdrs.CONTENT_LENGTH, None)
    text = _ROUTER_PROBLEMS.get(exc.status, exc.reason.lower())
    return web.Response(
        status=exc.status,
        reason=exc.reason,
        headers=headers,
        body=error_body(text),
        content_type="application/json",
    )


class JsonErrorHandler(RequestHandler):
    """aiohttp's connection handler, answering its own errors with error_body."""

    __slots__ = ("_half_closed", "_last_payload")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._half_closed = False
        self._last_payload: Any = None  # the body of the request parsed last

    # asyncio.Protocol's signature (True keeps the transport open); aiohttp's says None.
    def eof_received(self) -> bool | None:  # type: ignore[override]
        """The client shut its sending side (`nc -N`, an HTTP/1.0 script). aiohttp let
        the transport close on it, so a request received whole was handled (a report
        applied) and its answer never sent. Now the requests received whole are still
        answered, then the connection closes; with a body cut short it closes at once,
        as before (its handler cannot get the rest), and so does an idle one."""
        # Busy: requests queued, or one taken from the queue and not answered yet.
        busy = bool(self._messages) or (self._waiter is None and self._request_count > 0)
        last = self._last_payload
        if not busy or (last is not None and not last.is_eof()):
            return None
        self._half_closed = True
        if not self._messages:
            self.close()  # the request in flight is the last: close after its answer
        return True  # writing stays open for the answers (finish_response closes)

    def data_received(self, data: bytes) -> None:
        queued = len(self._messages)
        super().data_received(data)
        # The requests just parsed (aiohttp is pinned: its private queue) that are not
        # HTTP/1.0 or 1.1 are answered as parse errors are, in HTTP/1.0, and close.
        for index in range(queued, len(self._messages)):
            message, payload = self._messages[index]
            self._last_payload = payload
            if not isinstance(message, RawRequestMessage):
                continue
            if message.version not in _HTTP1:
                exc = UnsupportedVersion("HTTP version not supported")
                self._messages[index] = (_ErrInfo(400, exc, exc.message), EMPTY_PAYLOAD)
            elif message.upgrade and not message.should_close and _declined(message):
                # The parser stops at the end of an upgrade it does not take and drops
                # the bytes after it that came with it (a pipelined request, never
                # answered, its connection held until the keep-alive timeout).
                # Answered with Connection: close, the client resends them at once.
                self._messages[index] = (message._replace(should_close=True), payload)

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

    async def finish_response(
        self, request: BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        # Every response passes here; only aiohttp's router raises HTTPExceptions in
        # this app (contract handlers return their errors), and only those change.
        if isinstance(resp, web.HTTPException) and resp.status >= 400:
            resp = _as_json(resp)
            # Late: connection_guard imports this module.
            from .connection_guard import head_answered

            head_answered(self, request)  # a 417 leaves before the middleware
        if not self._messages:
            self._last_payload = None  # answered: its buffer is not kept for the next
            if self._half_closed:
                resp.force_close()  # the last answer a half-closed client gets
        return await super().finish_response(request, resp, start_time)


_HTTP1 = (HttpVersion10, HttpVersion11)


def _declined(message: RawRequestMessage) -> bool:
    """An upgrade aiohttp's parser does not switch for (its ALLOWED_UPGRADES: websocket;
    and CONNECT): `Upgrade: h2c`, say."""
    asked = message.headers.get(hdrs.UPGRADE, "")
    return message.method != hdrs.METH_CONNECT and asked.strip().lower() != "websocket"


def json_errors(server: web.Server) -> Callable[[], RequestHandler]:
    """A protocol factory for `server` whose connections answer errors in JSON."""
    # What web.Server.__call__ does, with the subclass (aiohttp is pinned: private attrs).
    return lambda: JsonErrorHandler(server, loop=server._loop, **server._kwargs)
