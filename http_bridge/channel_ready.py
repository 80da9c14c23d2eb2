"""Holds the bridge's calls while its channel reconnects to a service that is back.

gRPC fails a call at once while the channel backs off between connection attempts
(up to its maximum reconnect backoff), even when the service has been listening again
for a while: the first callbacks after a service restart were answered 503. A call
made while the channel is not READY now waits for it to connect, up to about one
backoff; then it goes ahead and fails (503) if the service is still away. The call
is not sent before the wait ends, so this is safe for every call (a claim too).
Health checks are not held: readiness says what the channel is now.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

import grpc

from jobwire.client.channel import reconnect_wait

_HEALTH = "/grpc.health.v1.Health/"


class ChannelReady:
    """Waits for `channel` (set once it is open) to be READY, at most `bound` seconds."""

    def __init__(self, options: Sequence[tuple[str, Any]]) -> None:
        self.bound = reconnect_wait(options)
        self.channel: grpc.aio.Channel | None = None
        self._watch: asyncio.Task[None] | None = None

    async def wait(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        """`details` once the channel is READY or the wait is over, with what the wait
        left of the call's timeout: the deadline counts from the call, the wait in it
        (a call to a service gone away took the whole wait past a shorter deadline)."""
        channel = self.channel
        # One C call on the hot path: a connected channel is not held.
        if channel is None or channel.get_state(True) is grpc.ChannelConnectivity.READY:
            return details
        method = details.method
        if (method.decode() if isinstance(method, bytes) else method).startswith(_HEALTH):
            return details
        loop = asyncio.get_running_loop()
        began = loop.time()
        timeout = details.timeout
        bound = self.bound if timeout is None else max(0.0, min(self.bound, timeout))
        # One watcher for every held call, not one state-change wait per call.
        if self._watch is None or self._watch.done():
            self._watch = loop.create_task(channel.channel_ready())
        # Still away (or the channel closed) once it is over: the call says how.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(self._watch), bound)
        if timeout is None:
            return details
        left = max(0.0, timeout - (loop.time() - began))
        return grpc.aio.ClientCallDetails(
            method, left, details.metadata, details.credentials, details.wait_for_ready
        )

    def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()

    def interceptors(self) -> list[grpc.aio.ClientInterceptor]:
        wait = self.wait

        class UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
            async def intercept_unary_unary(
                self, continuation: Any, details: Any, request: Any
            ) -> Any:
                return await continuation(await wait(details), request)

        class UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
            async def intercept_unary_stream(
                self, continuation: Any, details: Any, request: Any
            ) -> Any:
                return await continuation(await wait(details), request)

        class StreamUnary(grpc.aio.StreamUnaryClientInterceptor):
            async def intercept_stream_unary(
                self, continuation: Any, details: Any, request_iterator: Any
            ) -> Any:
                return await continuation(await wait(details), request_iterator)

        return [UnaryUnary(), UnaryStream(), StreamUnary()]
