"""A watchdog around each HTTP connection: slow request heads and too many connections.

aiohttp bounds an idle keep-alive connection (`keepalive_timeout`) but not a client
that trickles its request head one byte at a time: each byte restarts its clock. So
every connection's protocol is wrapped here:

- from the first byte of a request (or the connection's start) until the request
  reaches the app, at most `JOBWIRE_HEADER_TIMEOUT_SECONDS`; then 408 and close;
- at most `JOBWIRE_MAX_CONNECTIONS` open at once: one more is answered 503 with
  Retry-After and closed before a byte of it is parsed;
- an answer the client takes no bytes of for `JOBWIRE_BODY_TIMEOUT_SECONDS` (writing
  stays paused: its buffers are full) ends the connection. No other clock runs while
  an answer waits: a client that pipelined requests and never read held its
  connection for good.

The body has its own deadline, enforced while it is read (edge.BodyClock).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any, cast

from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError
from multidict import CIMultiDict, CIMultiDictProxy

from .aiohttp_errors import json_errors
from .config import Config
from .edge import continue_withheld
from .shared_counts import HEAD_TIMEOUTS, OPEN, REFUSED, SLABS

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
LINGER_SECONDS = 1.0
# aiohttp's lingering_time: after an answer sent before the body was read (401, 408,
# 413, 417), it reads and drops the rest of the body for at most this long.
DRAIN_SECONDS = 2.0
# The protocol of each open connection, by aiohttp's handler: the middleware finds it.
_GUARDS: dict[object, GuardedProtocol] = {}


class ConnectionGuard:
    """Limits shared by the connections of one listening site."""

    def __init__(
        self,
        header_timeout: float,
        max_connections: int,
        retry_after: int,
        write_timeout: float | None = None,
    ) -> None:
        self.header_timeout = header_timeout
        self.write_timeout = write_timeout  # None: no clock on unread answers
        self.max_connections = max_connections
        self.open = 0
        self.rejected = 0
        self.head_timeouts = 0
        # Requests being handled now; `drained()` waits for none (a SIGTERM's grace).
        self.in_flight = 0
        self._idle: asyncio.Event | None = None
        self.busy = (
            b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\n"
            b"Retry-After: %d\r\nContent-Length: 0\r\n\r\n" % retry_after
        )

    def wrap(self, factory: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        return lambda: GuardedProtocol(self, factory())

    def started(self) -> None:
        self.in_flight += 1

    def finished(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0 and self._idle is not None:
            self._idle.set()

    async def drained(self, within: float) -> bool:
        """Waits until no request is in flight, at most `within` seconds; whether none is.
        aiohttp's own shutdown_timeout waits twice (for the handler, then as long again
        once it is told to stop): a SIGTERM's grace took twice its length."""
        if self.in_flight == 0:
            return True
        self._idle = asyncio.Event()
        try:
            async with asyncio.timeout(within):
                await self._idle.wait()
        except TimeoutError:
            return False
        finally:
            self._idle = None
        return True


class GuardedProtocol(asyncio.Protocol):
    """Forwards everything to aiohttp's protocol, and watches the request head."""

    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol) -> None:
        self._guard = guard
        self._inner = inner
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        # When the request head now awaited began (loop time), None while none is: the
        # timer is not cancelled per request but re-armed lazily when it fires early.
        self._head_since: float | None = None
        self._in_request = False
        # Until then (loop time), bytes after an answer are the old body aiohttp is
        # draining, not a new head: its clock starts no earlier.
        self._draining_until = 0.0
        self._counted = False
        self._closing = False
        # Armed while writing is paused (the client takes nothing of its answer).
        self._write_timer: asyncio.TimerHandle | None = None
        # The rest of a compressed body answered unread: dropped as it arrives.
        self._discarding = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        guard = self._guard
        if guard.open >= guard.max_connections:
            guard.rejected += 1
            SLABS.add(REFUSED)
            self._transport = transport
            self._answer_and_close(guard.busy)
            return
        guard.open += 1
        SLABS.add(OPEN)
        self._counted = True
        self._transport = transport
        _GUARDS[self._inner] = self
        self._start_timer()
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if not self._counted or self._closing or self._discarding:
            return  # a refused or timed-out connection, or a body dropped: discarded
        if not self._in_request and self._head_since is None:
            self._start_timer()  # the first byte of the next request on this connection
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._counted else None

    def pause_writing(self) -> None:
        if self._counted:
            if self._write_timer is None and self._guard.write_timeout is not None:
                loop = asyncio.get_running_loop()
                self._write_timer = loop.call_later(self._guard.write_timeout, self._unread)
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._counted:
            self._cancel_write_timer()  # the client took some: its clock starts again
            self._inner.resume_writing()

    def _cancel_write_timer(self) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _unread(self) -> None:
        self._write_timer = None
        transport = self._transport
        if transport is None:
            return
        log.info(
            "answer not read by the client within %ss: connection closed",
            self._guard.write_timeout,
        )
        # A reset, not close(): close() waits to flush what the client does not read (a
        # transport already closing may be waiting for just that), and the kernel would
        # go on holding the unsent bytes of a socket closed without SO_LINGER 0.
        sock = transport.get_extra_info("socket")
        with contextlib.suppress(AttributeError, OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        self._cancel_write_timer()
        if not self._counted:
            return
        self._counted = False
        self._guard.open -= 1
        SLABS.add(OPEN, -1)
        self._cancel_timer()
        _GUARDS.pop(self._inner, None)
        self._inner.connection_lost(exc)

    # -- called by the middleware and aiohttp_errors ----------------------------------

    def request_started(self) -> None:
        if not self._in_request:
            self._guard.started()
        self._in_request = True
        self._head_since = None  # the head is complete; a pending timer finds nothing

    def request_finished(self, body_left: bool, encoded: bool = False) -> None:
        """`encoded`: the body left has a Content-Encoding. aiohttp's drain decodes what
        it reads: 2 MB of gzip on the wire was 2 GB inflated, a second of CPU for a
        request refused without a credential. Such a body's bytes are dropped as they
        arrive, undecoded, and the answer closes the connection (nothing after it is
        read); aiohttp's drain then finds nothing and closes when its time is up."""
        if self._in_request:
            self._guard.finished()
        self._in_request = False
        if body_left:
            self._drain()
            self._discarding = encoded

    def answered_early(self, body_left: bool) -> None:
        """aiohttp answered before any middleware ran (417 for an unknown Expect): the
        head was complete, and a 408 written later would be a second response."""
        if not self._in_request:
            self._head_since = None
            if body_left:
                self._drain()

    def _drain(self) -> None:
        self._draining_until = asyncio.get_running_loop().time() + DRAIN_SECONDS

    # -----------------------------------------------------------------------------

    def _start_timer(self) -> None:
        loop = asyncio.get_running_loop()
        self._head_since = since = max(loop.time(), self._draining_until)
        if self._timer is None:  # else the pending one re-arms for this head
            self._timer = loop.call_at(since + self._guard.header_timeout, self._head_timed_out)

    def _cancel_timer(self) -> None:
        self._head_since = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _head_timed_out(self) -> None:
        self._timer = None
        transport = self._transport
        since = self._head_since
        if self._in_request or since is None or transport is None or transport.is_closing():
            return
        loop = asyncio.get_running_loop()
        due = since + self._guard.header_timeout
        if loop.time() < due:  # armed for an earlier head: this one has time left
            self._timer = loop.call_at(due, self._head_timed_out)
            return
        self._guard.head_timeouts += 1
        SLABS.add(HEAD_TIMEOUTS)
        log.info(
            "request head not complete within %ss: connection closed", self._guard.header_timeout
        )
        self._answer_and_close(REQUEST_TIMEOUT)

    def _answer_and_close(self, answer: bytes) -> None:
        """Writes `answer`, half-closes, and closes a moment later. Closing at once while
        the client still sends would reset the connection, and the reset can destroy
        the answer before the client reads it."""
        transport = self._transport
        assert transport is not None
        self._closing = True
        transport.write(answer)
        if transport.can_write_eof():
            transport.write_eof()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(LINGER_SECONDS, transport.close)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def track_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    guard = _GUARDS.get(request.protocol)
    if guard is not None:
        guard.request_started()
    dropped = False  # the rest of the body is dropped: no next request can be read
    try:
        response = await handler(request)
    finally:
        if guard is not None:
            body_left = not request.content.is_eof()
            dropped = body_left and _encoded(request)
            guard.request_finished(body_left, encoded=dropped)
    if dropped or continue_withheld(request):
        response.force_close()  # Connection: close (RFC 9110 10.1.1 for a 100 withheld)
    return response


def _encoded(request: web.Request) -> bool:
    return request.headers.get(hdrs.CONTENT_ENCODING, "identity").strip().lower() != "identity"


def head_answered(handler: object, request: web.BaseRequest) -> None:
    """`handler`'s connection answered aiohttp's own HTTPException (aiohttp_errors)."""
    guard = _GUARDS.get(handler)
    if guard is not None:
        guard.answered_early(body_left=not request.content.is_eof())


def install(app: web.Application) -> None:
    # Outermost: the head is complete as soon as aiohttp hands the request over.
    app.middlewares.insert(0, track_requests)
    _quiet_bad_requests()


class _BadRequestFilter(logging.Filter):
    """aiohttp logs a request it cannot parse (a client's broken bytes) with a full
    traceback, which may quote the raw request line or a header (a token). Keep one
    line with the error's class instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.msg = "unparseable request (%s): answered %s"
            record.args = (type(exc).__name__, exc.code)
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def _quiet_bad_requests() -> None:
    logger = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _BadRequestFilter) for f in logger.filters):
        logger.addFilter(_BadRequestFilter())


def runner_options(config: Config) -> dict[str, Any]:
    """AppRunner options: idle keep-alive connections close after this long."""
    # lingering_time: after an early answer (408, 413) the rest of the body is read and
    # dropped for at most this long before the connection closes.
    # auto_decompress: the handlers decode bodies (content_coding.py): aiohttp's parser
    # decoded only some codings, and failed a request for others before any handler.
    return {
        "keepalive_timeout": config.keepalive_timeout_seconds,
        "lingering_time": DRAIN_SECONDS,
        "auto_decompress": False,
    }


def guarded_site(runner: web.BaseRunner, config: Config, **options: Any) -> GuardedSite:
    """The listening site for `config` (options as for web.TCPSite)."""
    guard = ConnectionGuard(
        config.header_timeout_seconds,
        config.max_connections,
        config.retry_after_seconds,
        write_timeout=config.body_timeout_seconds,
    )
    return GuardedSite(
        runner,
        config.http_host,
        config.http_port,
        guard=guard,
        addr_var="JOBWIRE_HTTP_ADDR",
        **options,
    )


def sanitise_expect(factory: Any) -> Any:
    """aiohttp answers an `Expect` header it does not know with 417 quoting the value,
    before any middleware runs; a value that is not ASCII made that answer fail (500).
    Such a value is replaced with one aiohttp refuses cleanly (417)."""

    def make(message: Any, *args: Any) -> Any:
        expect = message.headers.get("Expect")
        if expect is not None and not (expect.isascii() and expect.isprintable()):
            headers = CIMultiDict(message.headers)
            headers["Expect"] = "invalid"
            message = message._replace(headers=CIMultiDictProxy(headers))
        return factory(message, *args)

    make.jobwire_sanitised = True  # type: ignore[attr-defined]
    return make


def listen_hosts(host: str | None) -> tuple[str | None, ...]:
    """The hosts a listen address binds. `::` (`[::]:8080`) is every address of both
    families, as on Linux a user expects (nginx's `[::]` with ipv6only=off, gRPC's own
    `[::]`): asyncio sets IPV6_V6ONLY on an IPv6 socket, so `::` alone refused every
    IPv4 client. Two sockets, one per family, on one port: an IPv4 client is seen as
    its IPv4 address (not `::ffff:...`), as TRANSCODE_ALLOWED_IPS and the limits read it."""
    return ("0.0.0.0", "::") if host == "::" else (host,)


# After a SIGTERM's grace (GuardedSite.drain), aiohttp's wait for what is still running.
SHUTDOWN_CUT_SECONDS = 0.1


class GuardedSite(web.TCPSite):
    """`web.TCPSite` whose connections go through a ConnectionGuard."""

    def __init__(
        self,
        runner: web.BaseRunner,
        *args: Any,
        guard: ConnectionGuard,
        addr_var: str,
        **kw: Any,
    ) -> None:
        super().__init__(runner, *args, **kw)
        self.guard = guard
        self.addr_var = addr_var  # the variable that named the address, for errors

    async def start(self) -> None:
        # TCPSite.start, with the protocol factory wrapped (BaseSite.start registers
        # the site with its runner).
        await web.BaseSite.start(self)
        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None
        if not getattr(server.request_factory, "jobwire_sanitised", False):
            server.request_factory = sanitise_expect(server.request_factory)
        factory = self.guard.wrap(json_errors(server))
        port = self._port
        self._also: list[asyncio.AbstractServer] = []
        try:
            for index, host in enumerate(listen_hosts(self._host)):
                listening = await loop.create_server(
                    factory,
                    host,
                    port,
                    ssl=self._ssl_context,
                    backlog=self._backlog,
                    reuse_address=self._reuse_address,
                    reuse_port=self._reuse_port,
                )
                if index == 0:
                    self._server = listening
                    # Port 0: the second family's socket takes the port the first got.
                    port = listening.sockets[0].getsockname()[1] if listening.sockets else port
                else:
                    self._also.append(listening)
        except OSError as exc:  # in use, or not an address of this machine
            await self._close_also()
            if self._server is not None:
                self._server.close()
            where = f"{self.addr_var}={self._host}:{self._port}"
            raise SystemExit(f"cannot listen on {where}: {exc.strerror or exc}") from None
        self._bound_port = port

    async def stop(self) -> None:
        await self._close_also()
        await super().stop()

    async def _close_also(self) -> None:
        for listening in getattr(self, "_also", ()):
            listening.close()
        self._also = []

    async def drain(self, grace: float, first: Callable[[], Awaitable[None]] | None = None) -> None:
        """SIGTERM: new connections refused at once, idle keep-alive ones closed, `first`
        run (the dashboard ends its streams), and the requests in flight given `grace` to
        finish. The runner's cleanup, with a short shutdown_timeout
        (SHUTDOWN_CUT_SECONDS), then closes what is left unanswered."""
        await self.stop()
        server = self._runner.server
        if server is not None:
            server.pre_shutdown()
        if first is not None:
            await first()
        await self.guard.drained(grace)
