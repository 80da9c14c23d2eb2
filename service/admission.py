"""Bounded admission of watch streams, and the gRPC core limits in front of it.

A watch stream holds memory and a share of every fan-out for as long as it is open,
so one node admits at most `max_watchers` of them (JOBWIRE_MAX_WATCHERS). A stream
past the limit is refused at once with RESOURCE_EXHAUSTED and a retry hint in its
trailing metadata (`retry-after-ms`, jittered so that refused clients do not come
back together); the client library waits that long and tries again, here or on
another replica. Nobody is left waiting and nobody is dropped without a word.

That refusal only works if the call reaches the servicer. gRPC core holds calls that
the application has not yet asked for (grpc.aio asks for one at a time) in a backlog,
and past `grpc.server.max_pending_requests` (default 1,000; rejections become certain
at `..._hard_limit`, default 3,000) it kills new ones with a bare CANCELLED, as it does
with a call left there longer than `grpc.server_max_unrequested_time_in_server`
(default 30 s). A burst of a few thousand stream opens hits that
(`bench/stream_admission.py` reproduces it), so the service raises those limits above
what admission bounds anyway (`server_options`).
"""

from __future__ import annotations

import random
from typing import Any

RETRY_AFTER_KEY = "retry-after-ms"
DEFAULT_MAX_WATCHERS = 20_000  # JOBWIRE_MAX_WATCHERS; README "Watchers" says how to size it


class WatchAdmission:
    """Counts open watch streams; `enter()` is False past the limit."""

    def __init__(self, max_watchers: int, retry_after_ms: int = 1000) -> None:
        self.limit = max_watchers
        self.retry_after_ms = retry_after_ms
        self.active = 0
        self.refused = 0

    def enter(self) -> bool:
        if self.active >= self.limit:
            self.refused += 1
            return False
        self.active += 1
        return True

    def leave(self) -> None:
        self.active -= 1

    def retry_hint_ms(self) -> int:
        """The base delay spread over [1x, 2x): refused watchers come back apart."""
        return int(self.retry_after_ms * (1 + random.random()))  # jitter, not security

    def refusal(self) -> tuple[str, tuple[tuple[str, str], ...]]:
        """The RESOURCE_EXHAUSTED details and trailing metadata for a refused stream."""
        hint = self.retry_hint_ms()
        details = (
            f"this node serves at most {self.limit} watch streams (JOBWIRE_MAX_WATCHERS); "
            f"retry in {hint} ms, here or on another replica"
        )
        return details, ((RETRY_AFTER_KEY, str(hint)),)


def server_options(max_watchers: int, min_ping_seconds: float) -> list[tuple[str, Any]]:
    """gRPC core arguments that let a burst of opens reach admission instead of being
    cancelled in the backlog: room for every admitted stream plus as many refused ones,
    with no random early rejection below that, and time to accept them all. And the
    keepalive pings a client may send while its streams are idle: gRPC's default
    allows one per 5 minutes and answers more with GOAWAY `too_many_pings`, which cut
    every idle watch (jobwire.client pings every 30 s) after about 2 minutes."""
    backlog = max(4 * max_watchers, 10_000)
    return [
        ("grpc.server.max_pending_requests", backlog),
        ("grpc.server.max_pending_requests_hard_limit", backlog),
        ("grpc.server_max_unrequested_time_in_server", 300),
        ("grpc.http2.min_ping_interval_without_data_ms", int(min_ping_seconds * 1000)),
    ]
