"""OpenTelemetry traces of the service: a SERVER span per gRPC call (continuing the
caller's W3C `traceparent` from the call's metadata) and a span per group commit with
its batch size; also the commit latency and batch-size metrics, which are always on.

Tracing is off unless the composition root (cli/tracing.py) calls `enable()`, which it
does only when OTEL_EXPORTER_OTLP_ENDPOINT is set. Off, nothing of OpenTelemetry is
imported, no interceptor is installed, and the committer's hooks cost one global check.

A group commit serves many calls at once: its span is a child of the first waiting
call's span and links to the others (a span has one parent).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import grpc

from .grpc_handlers import Handler, replace_behavior
from .metrics import COMMIT_BATCH, COMMIT_LATENCY

_tracer: Any = None  # an opentelemetry Tracer while enabled
# The OpenTelemetry context each waiting commit caller had, until its commit.
_waiting: dict[int, Any] = {}


def enable(tracer_provider: Any) -> None:
    """Traces from now on, through `tracer_provider` (servers started later)."""
    global _tracer
    _tracer = tracer_provider.get_tracer("jobwire.service")


def disable() -> None:
    global _tracer
    _tracer = None
    _waiting.clear()


def server_interceptors() -> list[grpc.aio.ServerInterceptor]:
    """The tracing interceptor when tracing is on, else nothing."""
    return [_TracingInterceptor(_tracer)] if _tracer is not None else []


def note_waiter(future: Any) -> None:
    """Remembers the caller's trace context for the commit that will answer `future`."""
    if _tracer is not None:
        from opentelemetry import context

        _waiting[id(future)] = context.get_current()


@contextmanager
def commit_observed(size: int, futures: Sequence[Any]) -> Iterator[None]:
    """Times one group commit of `size` commands (answering `futures`)."""
    start = time.perf_counter()
    try:
        if _tracer is None:
            yield
        else:
            with _commit_span(size, futures):
                yield
    finally:
        COMMIT_LATENCY.observe(time.perf_counter() - start)
        COMMIT_BATCH.observe(size)


@contextmanager
def _commit_span(size: int, futures: Sequence[Any]) -> Iterator[None]:
    from opentelemetry import trace

    contexts = [c for f in futures if (c := _waiting.pop(id(f), None)) is not None]
    spans = [trace.get_current_span(c).get_span_context() for c in contexts]
    links = [trace.Link(s) for s in spans[1:] if s.is_valid]
    with _tracer.start_as_current_span(
        "jobwire.commit",
        context=contexts[0] if contexts else None,
        links=links,
        attributes={"jobwire.commit.batch_size": size, "jobwire.commit.calls": len(futures)},
    ):
        yield


class _TracingInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, tracer: Any) -> None:
        self._tracer = tracer

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        full = handler_call_details.method  # "/jobwire.v1.JobService/GetJob"
        service, _, method = full.lstrip("/").rpartition("/")
        if service == "grpc.health.v1.Health":
            return handler  # probes every few seconds: noise, not traces
        metadata = handler_call_details.invocation_metadata or ()
        carrier = {k: v for k, v in metadata if isinstance(v, str)}
        tracer = self._tracer
        name = f"{service}/{method}"
        attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}

        def span(context: Any) -> Any:
            from opentelemetry import propagate, trace

            return tracer.start_as_current_span(
                name,
                context=propagate.extract(carrier),
                kind=trace.SpanKind.SERVER,
                attributes=attributes,
                # _set_code sets the status from the call's code: an abort is how a
                # handler answers (NOT_FOUND...), no exception to record or to name it.
                record_exception=False,
                set_status_on_exception=False,
            )

        def make(kind: str, behavior: Any) -> Any:
            if kind.endswith("_stream"):

                async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
                    with span(context) as current:
                        try:
                            async for item in behavior(request, context):
                                yield item
                        except BaseException as exc:
                            _set_code(current, context, grpc.StatusCode.UNKNOWN, exc)
                            raise
                        _set_code(current, context, grpc.StatusCode.OK)

                return stream

            async def unary(request: Any, context: Any) -> Any:
                with span(context) as current:
                    try:
                        response = await behavior(request, context)
                    except BaseException as exc:
                        _set_code(current, context, grpc.StatusCode.UNKNOWN, exc)
                        raise
                    _set_code(current, context, grpc.StatusCode.OK)
                    return response

            return unary

        return replace_behavior(handler, make)


# The codes that are the server's failure (OpenTelemetry's gRPC conventions): a
# NOT_FOUND or a wrong token is the caller's, and marks a server span no more than a
# 404 marks the bridge's HTTP span.
_SERVER_ERRORS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)


def _set_code(
    span: Any, context: Any, default: grpc.StatusCode, exc: BaseException | None = None
) -> None:
    try:
        code = context.code()
    except Exception:
        code = None
    if code is None and isinstance(exc, asyncio.CancelledError):
        code = grpc.StatusCode.CANCELLED  # the client cancelled the call
    elif code is None:  # none set by the handler (or an abort): an unexpected exception
        code = default
        if exc is not None:
            span.record_exception(exc)
    if isinstance(code, grpc.StatusCode):
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code in _SERVER_ERRORS:
            from opentelemetry.trace import Status, StatusCode

            span.set_status(Status(StatusCode.ERROR, code.name))
