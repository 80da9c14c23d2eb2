"""Reading hostile requests defensively: header text, body deadlines, rate limits.

aiohttp hands header values over as `str` decoded with `surrogateescape`, so bytes
that are not UTF-8 arrive as lone surrogates. Such a string cannot be encoded again:
sent to gRPC (protobuf strings are UTF-8) or compared as UTF-8 it raised, and the
bridge answered 500. Everything from a header goes through `text_header`/`token`
here first: bad text is a 400 (or, for a credential, simply a wrong one: 401).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import re
import time
from dataclasses import dataclass, field

from aiohttp import hdrs, web
from aiohttp.http import HttpVersion11

from . import signing
from .client_address import limited_address
from .config import Config
from .errors import BridgeError, Credential, RequestProblem
from .grpc_client import config_of

RATE_LIMITER: web.AppKey[RateLimiter] = web.AppKey("jobwire_rate_limiter")


def text_problem(value: str) -> str | None:
    """Why `value` is not text: bytes that are not UTF-8 as sent (aiohttp escapes
    them), or a character that is not printable (a control, a zero-width space)."""
    if value.isascii() and value.isprintable():
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid UTF-8"
    odd = next((c for c in value if not c.isprintable()), None)
    return (
        None if odd is None else f"holds a character that is not printable text (U+{ord(odd):04X})"
    )


def text_header(request: web.Request, name: str, limit: int = 256) -> str:
    """A header's text, stripped and cut to `limit`; 400 naming it and why when not
    text (a tab was said to be "not valid UTF-8")."""
    value = request.headers.get(name, "").strip()
    if value and (problem := text_problem(value)):
        raise RequestProblem(f"{name} header {problem}")
    return value[:limit]


def token_text(value: str) -> str:
    """A credential as sent, or "" when it cannot be one (not printable ASCII):
    such a token matches nothing and is never passed on to the service."""
    value = value.strip()
    if not value or len(value) > 4096 or not value.isascii() or not value.isprintable():
        return ""
    return value


_INTEGER = re.compile(r"[+-]?[0-9]{1,12}")


def int_param(
    request: web.Request, name: str, minimum: int, maximum: int, default: int | None = None
) -> int | None:
    """An integer query parameter within [minimum, maximum]; else 400 naming it."""
    raw = request.query.get(name)
    if raw is None:
        return default
    # One optional sign, then ASCII digits: int() also takes `_` and non-ASCII digits,
    # and the looser check before (`lstrip("+-")`) let `--5` reach int() and raise.
    match = _INTEGER.fullmatch(raw.strip())
    value = int(match[0]) if match else None
    if value is None or not minimum <= value <= maximum:
        raise BridgeError(400, f"{name} must be an integer from {minimum} to {maximum}")
    return value


def json_depth(value: object, limit: int = 32) -> bool:
    """True when nested no deeper than `limit` (protobuf Structs refuse deeper ones)."""
    stack: list[tuple[object, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return False
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return True


# -- slow bodies ---------------------------------------------------------------------


class BodyClock:
    """Deadline for reading one body: `body_timeout` seconds, extended by one second
    per `min_rate` bytes received (Apache mod_reqtimeout's rule). A large body on a
    fast link is never cut; a trickle is answered 408. Bytes received are counted as
    sent: a gzip body's decoded bytes extended the deadline, so a compressed trickle
    (30 bytes of zeros decoding to 4 KB) was held until the body's size limit."""

    __slots__ = ("_config", "_counted", "_deadline", "_loop", "_rate")

    def __init__(self, config: Config) -> None:
        self._config = config
        self._loop: asyncio.AbstractEventLoop | None = None
        self._counted = 0  # bytes received (before decoding) the deadline has grown by

    async def read(self, request: web.Request) -> bytes:
        content = request.content
        if content.is_eof():
            # The whole body has arrived (the usual small callback: with its head in
            # one segment): this read cannot wait, so no clock and no timer for it.
            return await content.readany()
        loop = self._loop
        if loop is None:  # the clock starts at the first read that may wait
            loop = self._loop = asyncio.get_running_loop()
            self._deadline = loop.time() + self._config.body_timeout_seconds
            self._rate = float(self._config.body_min_rate_bytes)
        remaining = self._deadline - loop.time()
        if remaining <= 0:
            raise body_too_slow()
        try:
            async with asyncio.timeout(remaining):
                chunk = await content.readany()
        except TimeoutError:
            raise body_too_slow() from None
        received = content.total_raw_bytes
        self._deadline += (received - self._counted) / self._rate
        self._counted = received
        return chunk


def body_too_slow() -> BridgeError:
    return BridgeError(408, "request body not received in time")


# -- Expect: 100-continue ------------------------------------------------------------

_CONTINUE_SENT = web.RequestKey("jobwire_continue_sent", bool)


def awaits_continue(request: web.BaseRequest) -> bool:
    """The client holds its body back until a `100 Continue` (RFC 9110 10.1.1)."""
    return (
        request.version == HttpVersion11
        and request.headers.get(hdrs.EXPECT, "").lower() == "100-continue"
    )


async def expect_later(request: web.Request) -> None:
    """Every route's `Expect` handler. aiohttp's own sent `100 Continue` as soon as the
    route was known, before the handler checked anything: a client with a wrong token
    was invited to send its body (up to 256 MiB for a Secretary final event), and the
    401 came after it. The 100 now goes out when the body is read (send_continue),
    after the handler's checks. Any other expectation is still a 417."""
    if request.version == HttpVersion11 and not awaits_continue(request):
        raise web.HTTPExpectationFailed()


def continue_later(table: web.RouteTableDef) -> list[web.AbstractRouteDef]:
    """`table`'s routes with expect_later as their `Expect` handler."""
    return [
        web.RouteDef(d.method, d.path, d.handler, {**d.kwargs, "expect_handler": expect_later})
        if isinstance(d, web.RouteDef)
        else d
        for d in table
    ]


async def send_continue(request: web.Request) -> None:
    """`100 Continue`, once, for a client waiting for it: its body is now wanted."""
    if awaits_continue(request) and not request.get(_CONTINUE_SENT):
        request[_CONTINUE_SENT] = True
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the interim answer is not the response's size


def continue_withheld(request: web.Request) -> bool:
    """Answered before its body was wanted: the client never got its 100 and may never
    send that body, so the connection cannot carry a next request."""
    return (
        awaits_continue(request)
        and not request.get(_CONTINUE_SENT)
        and not request.content.is_eof()
    )


# -- rate limit per credential -------------------------------------------------------


@dataclass
class RateLimiter:
    """Token buckets (`rate` per second, bursts of `max(1, rate)`) keyed by a digest of
    the credential, so no secret is kept as a key. Bounded: the oldest keys go first.
    Failed authentications also draw on their address's bucket, and a credential not
    yet seen to work waits while that bucket is empty (check_rate): else each guessed
    token came with a fresh bucket, and guessing was never limited."""

    rate: float
    max_keys: int = 10_000
    size: float = 0.0  # the N of `N/min`; 0: max(1, rate)
    _buckets: dict[bytes, tuple[float, float]] = field(default_factory=dict)
    _vouched: dict[bytes, None] = field(default_factory=dict)  # keys that worked, oldest first

    def vouch(self, key: bytes) -> None:
        self._vouched.pop(key, None)
        self._vouched[key] = None
        while len(self._vouched) > self.max_keys:
            del self._vouched[next(iter(self._vouched))]

    def vouched(self, key: bytes) -> bool:
        return key in self._vouched

    @property
    def burst(self) -> float:
        return max(1.0, self.size or self.rate)

    def take(self, key: bytes, now: float | None = None, peek: bool = False) -> float:
        """0 when a request may pass, else the seconds until one may. `peek`: only say."""
        now = time.monotonic() if now is None else now
        tokens, last = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if peek:
            self._buckets[key] = (tokens, now)
            wait = 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate
        elif tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            wait = 0.0
        else:
            self._buckets[key] = (tokens, now)
            wait = (1.0 - tokens) / self.rate
        while len(self._buckets) > self.max_keys:
            del self._buckets[next(iter(self._buckets))]
        return wait


def by_address(request: web.Request) -> str:
    """No credential before the body (the AWS Batch secret travels in it): the rate
    limit goes by the client's address."""
    return ""


def credential_key(request: web.Request, credential: Credential) -> bytes:
    """The caller's bucket: its token as the contract's auth parses it (`credential`),
    else its address. A digest of the raw header gave `Bearer` plus any number of
    spaces, or any extra header the contract ignores, a fresh bucket per request."""
    token = credential(request)
    if token:
        return hashlib.sha256(b"token\0" + token.encode("utf-8", "surrogateescape")).digest()
    address = limited_address(request.remote).encode("utf-8", "surrogateescape")
    return hashlib.sha256(b"address\0" + address).digest()


def check_rate(request: web.Request, credential: Credential) -> bytes | None:
    """429 beyond the caller's rate; else its bucket's key (None: no limit set)."""
    limiter = request.app.get(RATE_LIMITER)
    if limiter is None:
        return None
    key = credential_key(request, credential)
    wait = limiter.take(key)
    if not wait and not limiter.vouched(key):
        # Not seen to work yet (a guess, or a worker's first call): not while its
        # address has used up its bucket on failed authentications.
        wait = limiter.take(_failures_key(request), peek=True)
    if wait > 0:
        raise BridgeError(429, "rate limit exceeded", retry_after=max(1, math.ceil(wait)))
    return key


def _failures_key(request: web.Request) -> bytes:
    # An IPv6 client by its /64: it could rotate through it, a fresh bucket per guess.
    return b"failed:" + limited_address(request.remote).encode("utf-8", "surrogateescape")


def count_failed_authentication(request: web.Request) -> None:
    """A 401: its address's bucket pays (check_rate)."""
    limiter = request.app.get(RATE_LIMITER)
    if limiter is not None:
        limiter.take(_failures_key(request))


def vouch_for_credential(request: web.Request, key: bytes) -> None:
    """After a success: the credential works, it no longer draws on its address."""
    limiter = request.app.get(RATE_LIMITER)
    if limiter is not None:
        limiter.vouch(key)


def install(app: web.Application, config: Config) -> None:
    if config.rate_limit > 0:
        app[RATE_LIMITER] = RateLimiter(config.rate_limit, size=config.rate_burst)


# -- Standard Webhooks signatures (signing.py) ---------------------------------------

WEBHOOK_ID_KEY = web.RequestKey("jobwire_webhook_id", str)


def check_signature(request: web.Request, contract: str, body: bytes | bytearray = b"") -> None:
    """Enforces the contract's signature when a secret is configured for it."""
    keys = config_of(request).signing_secrets.get(contract)
    if not keys:
        return
    headers = request.headers
    msg_id = _ascii(headers.get("webhook-id", ""))
    try:
        signing.verify(
            keys,
            msg_id,
            _ascii(headers.get("webhook-timestamp", "")),
            _ascii(headers.get("webhook-signature", "")),
            body,
        )
    except ValueError as exc:
        raise BridgeError(401, str(exc), token_sent="webhook-signature" in headers) from None
    request[WEBHOOK_ID_KEY] = msg_id


def webhook_id(request: web.Request) -> str:
    """The verified `webhook-id` of this request, or ""."""
    return str(request.get(WEBHOOK_ID_KEY, ""))


def _ascii(value: str) -> str:
    """Header text as sent; bytes that are not ASCII never match anything."""
    return value.strip() if value.isascii() else "\x00"
