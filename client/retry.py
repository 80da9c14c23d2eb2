"""Backoff with jitter, and the retry of calls that are safe to repeat.

UNAVAILABLE and CANCELLED (a connection reset under the call) are retried, and
only for calls that are safe to repeat: reads, event reports and log lines (their
idempotency key makes a repeat an acknowledged duplicate), creates (the client chooses
the job's token, so a repeat is answered as the first create) and uploads from a path
or bytes (a repeat replaces the same artifact). A call that a repeat would apply twice
(a claim, a cancel) is never repeated by the client.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc

from .errors import ClientConfigError, translate

T = TypeVar("T")
# Waits up to that many seconds for the channel to connect; True when it did.
Ready = Callable[[float], Awaitable[bool]]
# The wait between attempts: asyncio.sleep, or the client's, which its close() ends.
Sleep = Callable[[float], Awaitable[None]]


# gRPC takes a deadline past what it can hold (1e10 s) as one already passed: the call
# failed at once with DeadlineExceeded.
MAX_SECONDS = 366 * 24 * 3600


def positive_seconds(name: str, value: float) -> float:
    """`value` when it is a finite number of seconds > 0 (at most 366 days); else
    ClientConfigError naming it."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ClientConfigError(f"{name} must be a number of seconds, got {value!r}")
    if not (math.isfinite(value) and 0 < value <= MAX_SECONDS):
        raise ClientConfigError(
            f"{name} must be a finite number of seconds > 0 and <= {MAX_SECONDS}, got {value!r}"
        )
    return value


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with jitter: attempt n sleeps U(c/2, c), c = min(maximum, initial·2ⁿ)."""

    initial: float = 0.1
    maximum: float = 5.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        # A zero or negative wait would reconnect in a tight loop; NaN would never wait.
        positive_seconds("Backoff initial", self.initial)
        positive_seconds("Backoff maximum", self.maximum)
        if self.maximum < self.initial:
            raise ClientConfigError(
                f"Backoff maximum must be >= initial ({self.initial}), got {self.maximum}"
            )
        if not (math.isfinite(self.multiplier) and self.multiplier >= 1):
            raise ClientConfigError(f"Backoff multiplier must be >= 1, got {self.multiplier!r}")

    def delay(self, attempt: int) -> float:
        try:
            ceiling = min(self.maximum, self.initial * self.multiplier**attempt)
        except OverflowError:  # a watch that kept trying for hours: 2.0**1024 and up
            ceiling = self.maximum
        return random.uniform(ceiling / 2, ceiling)


@dataclass(frozen=True)
class RetryPolicy:
    """How often an idempotent call is tried when the service is UNAVAILABLE (or
    CANCELLED a call as it stopped)."""

    attempts: int = 5
    backoff: Backoff = Backoff()

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int):
            raise ClientConfigError(
                f"RetryPolicy attempts must be a whole number, got {self.attempts!r}"
            )
        if self.attempts < 1:
            raise ClientConfigError(f"RetryPolicy attempts must be >= 1, got {self.attempts}")


# CANCELLED reaches a caller only from the service: gRPC ends the calls that arrive as
# a server stops with it (a rolling restart), and the caller's own cancel is
# asyncio.CancelledError. The HTTP bridge answers it 503 for the same reason.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})


def say_if_closed(stub: Callable[[], object]) -> None:
    """For a CancelledError that nobody sent to the current task: the client was closed
    under the call, and grpc cancels its calls. `stub()` then raises what any call on a
    closed client raises (UsageError), rather than the caller's task ending as if it
    had been cancelled."""
    task = asyncio.current_task()
    if task is not None and not task.cancelling():
        stub()


async def call_with_retry(
    call: Callable[[float | None], Awaitable[T]],
    policy: RetryPolicy | None,
    timeout: float | None = None,
    ready: Ready | None = None,
    ready_budget: float = 0.0,
    sleep: Sleep = asyncio.sleep,
) -> T:
    """Runs `call(seconds left)`; repeats it on UNAVAILABLE when a policy is given.

    `timeout` bounds the whole call, retries and their backoff included: each attempt
    gets what is left of it, and no attempt is started that the backoff would leave no
    time for (the last error is raised instead). Raises JobwireError.

    Before a repeat (and before the one attempt of a call that is not repeated),
    `ready(seconds)` waits for the channel to connect, up to
    `ready_budget` seconds over the whole call: gRPC fails a call at once while its
    connection is backing off (up to the channel's maximum reconnect backoff, 2 s by
    default), so repeats spaced by a shorter backoff all failed against a service that
    had been back for a second.
    """
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    attempts = policy.attempts if policy is not None else 1
    if policy is None and ready is not None and ready_budget > 0:
        # A call that is not repeated (a cancel, a claim, a delete) waits for the
        # channel first, within the same bound: gRPC failed it at once while the
        # connection backed off, although it was never sent (about 2 s after a restart).
        await ready(ready_budget if deadline is None else min(ready_budget, timeout or 0.0))
    for attempt in range(attempts):
        left = None if deadline is None else max(0.0, deadline - loop.time())
        try:
            return await call(left)
        except grpc.aio.AioRpcError as err:
            if policy is None or err.code() not in RETRYABLE or attempt + 1 >= attempts:
                raise translate(err) from None
            delay = policy.backoff.delay(attempt)
            if deadline is not None and loop.time() + delay >= deadline:
                raise translate(err) from None
            last = err
        await sleep(delay)
        if ready is not None and ready_budget > 0:
            began = loop.time()
            wait = ready_budget if deadline is None else min(ready_budget, deadline - began)
            if not await ready(wait) and deadline is not None and loop.time() >= deadline:
                raise translate(last) from None  # still down: what it was, not a deadline
            ready_budget -= loop.time() - began
    raise AssertionError("unreachable")
