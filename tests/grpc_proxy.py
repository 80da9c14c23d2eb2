"""A loopback gRPC proxy in front of the real service that injects network faults.

It forwards every JobService call byte for byte (metadata included, both ways) and, when told
to, breaks one: answers UNAVAILABLE after the service applied a unary call (the
reply is lost on the way back), aborts a stream with a status after n messages
(ABORTED: what the service says to a watcher that fell behind), or rewrites /
drops stream messages (to stand in for coalescing). Used by tests/test_client.py.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

_STREAMS_OUT = {"WatchJob", "WatchJobs", "ReadArtifact"}
_STREAMS_IN = {"UploadArtifact"}

Rewrite = Callable[[bytes], bytes | None]  # a stream message -> what to send (None: drop)


class FaultProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.calls: Counter[str] = Counter()
        # method -> how many of its next calls lose their reply (after being applied)
        self.lose_reply: Counter[str] = Counter()
        # method -> (messages, code) for its next streams: abort after that many messages
        self.abort_streams: dict[str, list[tuple[int, grpc.StatusCode]]] = {}
        self.rewrite: dict[str, Rewrite] = {}
        # While `gate` is clear, unary calls wait before they are forwarded (`waiting`
        # counts them): a request held in flight (tests/test_ops_shutdown.py).
        self.gate = asyncio.Event()
        self.gate.set()
        self.waiting = 0
        # method -> the x-request-id of each of its unary calls, in arrival order
        self.request_ids: dict[str, list[str]] = {}
        # method -> statuses its next calls end with, before reaching the service (what
        # a service stopping answers calls that arrived as it stopped: CANCELLED)
        self.refuse: dict[str, list[grpc.StatusCode]] = {}
        # method -> run once after its next call's reply, before the caller has it
        # (what others wrote between two of a client's calls)
        self.after_reply: dict[str, Callable[[], Awaitable[None]]] = {}
        self._channel = grpc.aio.insecure_channel(upstream)
        self._server = grpc.aio.server()
        self._server.add_generic_rpc_handlers([_Handler(self)])
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self.target = f"127.0.0.1:{self.port}"

    async def start(self) -> FaultProxy:
        await self._server.start()
        return self

    async def close(self) -> None:
        await self._server.stop(0)
        await self._channel.close()

    def abort_next_stream(
        self, method: str, after: int, code: grpc.StatusCode = grpc.StatusCode.ABORTED
    ) -> None:
        self.abort_streams.setdefault(method, []).append((after, code))

    async def unary(self, method: str, request: bytes, context: Any) -> bytes:
        name = method.rsplit("/", 1)[1]
        self.calls[name] += 1
        ids = [v for k, v in context.invocation_metadata() if k == "x-request-id"]
        self.request_ids.setdefault(name, []).append(ids[0] if ids else "")
        if not self.gate.is_set():
            self.waiting += 1
            await self.gate.wait()
        if self.refuse.get(name):
            await context.abort(self.refuse[name].pop(0), "proxy: refused")
        call = self._channel.unary_unary(method)
        try:
            reply: bytes = await call(request, metadata=_metadata(context))
        except grpc.aio.AioRpcError as err:
            await context.abort(err.code(), err.details() or "")
            raise
        hook = self.after_reply.pop(name, None)
        if hook is not None:
            await hook()
        if self.lose_reply[name] > 0:
            self.lose_reply[name] -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "proxy: connection dropped")
        return reply

    async def unary_stream(self, method: str, request: bytes, context: Any) -> AsyncIterator[bytes]:
        name = method.rsplit("/", 1)[1]
        self.calls[name] += 1
        pending = self.abort_streams.get(name)
        abort = pending.pop(0) if pending else None
        rewrite = self.rewrite.get(name)
        stream: Any = self._channel.unary_stream(method)
        call = stream(request, metadata=_metadata(context))
        sent = 0
        try:
            # The service's headers, passed on when they come (WatchJobs sends them when
            # live, before any message).
            await context.send_initial_metadata(tuple(await call.initial_metadata() or ()))
            async for message in call:
                if abort is not None and sent >= abort[0]:
                    call.cancel()
                    await context.abort(abort[1], "proxy: watcher fell too far behind")
                out = rewrite(message) if rewrite is not None else message
                if out is None:
                    continue
                yield out
                sent += 1
        except grpc.aio.AioRpcError as err:
            await context.abort(err.code(), err.details() or "")

    async def stream_unary(
        self, method: str, requests: AsyncIterator[bytes], context: Any
    ) -> bytes:
        name = method.rsplit("/", 1)[1]
        self.calls[name] += 1
        call = self._channel.stream_unary(method)
        try:
            reply: bytes = await call(requests, metadata=_metadata(context))
        except grpc.aio.AioRpcError as err:
            await context.abort(err.code(), err.details() or "")
            raise
        return reply


class _Handler(grpc.GenericRpcHandler):
    def __init__(self, proxy: FaultProxy) -> None:
        self._proxy = proxy

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
        method: str = details.method
        name = method.rsplit("/", 1)[1]
        p = self._proxy
        # grpc.aio tells coroutine handlers from sync ones by inspection: real async defs.
        if name in _STREAMS_OUT:

            async def unary_stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
                async for message in p.unary_stream(method, request, context):
                    yield message

            return grpc.unary_stream_rpc_method_handler(unary_stream)
        if name in _STREAMS_IN:

            async def stream_unary(requests: AsyncIterator[bytes], context: Any) -> bytes:
                return await p.stream_unary(method, requests, context)

            return grpc.stream_unary_rpc_method_handler(stream_unary)

        async def unary(request: bytes, context: Any) -> bytes:
            return await p.unary(method, request, context)

        return grpc.unary_unary_rpc_method_handler(unary)


def _metadata(context: Any) -> tuple[tuple[str, str], ...]:
    return tuple((k, v) for k, v in context.invocation_metadata() if not k.startswith(":"))
