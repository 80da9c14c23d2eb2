"""Who may see the dashboard: a login token, a session cookie, CSRF tokens.

Stateless on purpose: the session cookie is signed with a key derived from
JOBWIRE_DASHBOARD_TOKEN, so sessions survive a restart of the dashboard (the
open tabs reconnect) and changing the token ends every session. A CSRF token is
derived from the session id: no server-side store either. Every secret is
compared with hmac.compare_digest and never logged.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import secrets
import time
from dataclasses import dataclass

from aiohttp import web

from http_bridge.client_address import limited_address
from http_bridge.common import same_secret
from http_bridge.edge import RateLimiter

from .config import DashboardConfig

COOKIE = "jobwire_session"


class TooManyWrongTokens(Exception):
    """The client's address has used up its wrong tokens: 429 with Retry-After."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"too many wrong tokens: retry in {retry_after} s")
        self.retry_after = retry_after


@dataclass(frozen=True)
class Principal:
    """An authenticated caller. `csrf` is what a state-changing form must carry
    (empty for a bearer caller: browsers never attach that header on their own)."""

    name: str
    csrf: str
    # When its session ends (time.time()); a Bearer token or proxy user has none. An
    # open stream ends then too (sse.py): it used to outlive its session for ever.
    expires: float = math.inf


# The caller, worked out once per request: a wrong Bearer token is counted once.
_WHO: web.RequestKey[tuple[Principal | None]] = web.RequestKey("jobwire_principal")


class Auth:
    def __init__(self, config: DashboardConfig) -> None:
        self._token = config.token.encode()
        self._header = config.trusted_user_header
        self._ttl = config.session_seconds
        seed = self._token or secrets.token_bytes(32)  # proxy-only: per-process key
        # One key per use: with one key for both, the CSRF token of a trusted-header user
        # named "x.99999999999" was a valid session cookie ("csrf:user:x" + an expiry in
        # the year 5138), which then worked without the proxy's header.
        self._session_key = hmac.new(seed, b"jobwire-dashboard-session-v1", hashlib.sha256).digest()
        self._csrf_key = hmac.new(seed, b"jobwire-dashboard-csrf-v1", hashlib.sha256).digest()
        self._wrong: RateLimiter | None = None
        if config.login_rate > 0:
            self._wrong = RateLimiter(config.login_rate, size=config.login_burst)

    @property
    def has_token(self) -> bool:
        return bool(self._token)

    def check_token(self, candidate: str) -> bool:
        return bool(self._token) and same_secret(_bytes(candidate), self._token)

    def try_token(self, request: web.Request, candidate: str) -> bool:
        """check_token, limited per client address: each wrong token draws on the
        address's bucket, and while it is empty every token from there (the right one
        too: else a 429 against a success would still tell a guess) is refused unread.
        Sessions already open are not affected. Without it a guesser tried thousands of
        tokens a second, by the login form or as Bearer tokens."""
        # An IPv6 client by its /64: it could send each guess from another address in it.
        key = b"wrong-token\0" + _bytes(limited_address(request.remote))
        if self._wrong is not None and (wait := self._wrong.take(key, peek=True)) > 0:
            raise TooManyWrongTokens(max(1, math.ceil(wait)))
        if self.check_token(candidate):
            return True
        if self._wrong is not None:
            self._wrong.take(key)
        return False

    @staticmethod
    def _sign(key: bytes, payload: str) -> str:
        mac = hmac.new(key, _bytes(payload), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).decode().rstrip("=")

    def new_session(self) -> str:
        payload = f"{secrets.token_urlsafe(18)}.{int(time.time()) + self._ttl}"
        return f"{payload}.{self._sign(self._session_key, payload)}"

    def csrf_for(self, subject: str) -> str:
        return self._sign(self._csrf_key, "csrf:" + subject)

    def principal(self, request: web.Request) -> Principal | None:
        """The caller, from (in order) the trusted proxy header, a Bearer token, the cookie.
        Raises TooManyWrongTokens for a Bearer token from an address past its limit."""
        known = request.get(_WHO)
        if known is None:
            known = request[_WHO] = (self._principal(request),)
        return known[0]

    def _principal(self, request: web.Request) -> Principal | None:
        if self._header:
            user = request.headers.get(self._header, "").strip()
            if user and user.isprintable():  # not text (bytes, controls): nobody
                return Principal(user, self.csrf_for("user:" + user))
        bearer = request.headers.get("Authorization", "")
        # The scheme's case does not matter (RFC 9110 11.1): `bearer x` was refused.
        if bearer[:7].lower() == "bearer " and self.try_token(request, bearer[7:].strip()):
            return Principal("token", "")
        cookie = request.cookies.get(COOKIE, "")
        if cookie and self._token:
            return self._from_cookie(cookie)
        return None

    def _from_cookie(self, cookie: str) -> Principal | None:
        payload, _, signature = cookie.rpartition(".")
        session_id, _, expiry = payload.partition(".")
        if not (session_id and expiry.isascii() and expiry.isdigit() and signature):
            return None
        if not same_secret(_bytes(signature), _bytes(self._sign(self._session_key, payload))):
            return None
        if int(expiry) < time.time():
            return None
        return Principal("session", self.csrf_for("session:" + session_id), int(expiry))

    def csrf_ok(self, principal: Principal, submitted: str) -> bool:
        if not principal.csrf:  # Bearer: not a browser's ambient credential
            return True
        return bool(submitted) and same_secret(_bytes(submitted), _bytes(principal.csrf))

    def set_cookie(self, request: web.Request, response: web.StreamResponse, value: str) -> None:
        response.set_cookie(
            COOKIE,
            value,
            max_age=self._ttl,
            path="/",
            httponly=True,
            samesite="Strict",
            secure=served_over_https(request),
        )


def _bytes(text: str) -> bytes:
    """Any header, cookie or form value as bytes, for hashing and constant-time
    comparison. aiohttp hands over undecodable bytes as surrogates, and
    compare_digest refuses non-ASCII strings: both used to end as a 500."""
    return text.encode("utf-8", "surrogateescape")


def served_over_https(request: web.Request) -> bool:
    """TLS here, or at a proxy in front that says so. Trusting the header is harmless:
    it can only make the cookie stricter (a Secure cookie is never sent over http)."""
    forwarded = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
    return request.secure or forwarded == "https"
