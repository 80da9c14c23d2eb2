"""OpenTelemetry traces of the bridge: a SERVER span per HTTP request (continuing a
worker's own W3C `traceparent` header) and a CLIENT span per gRPC call to the service,
whose `traceparent` travels in the call's metadata.

Off unless the composition root (cli/tracing.py) calls `enable()`, which it does only
when OTEL_EXPORTER_OTLP_ENDPOINT is set. Off, nothing of OpenTelemetry is imported, no
middleware or interceptor is installed, and the coalescer's hooks cost one global check.

The coalescer sends many callbacks' events in one BatchReportEvents call: that call's
span is a child of the first callback's span and links to the others.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import grpc
from aiohttp import web

_tracer: Any = None  # an opentelemetry Tracer while enabled
# The OpenTelemetry context each coalesced callback had, until its batch is sent.
_waiting: dict[int, Any] = {}
_W3C = ("traceparent", "tracestate")


def enable(tracer_provider: Any) -> None:
    """Traces from now on, through `tracer_provider` (apps and channels made later)."""
    global _tracer
    _tracer = tracer_provider.get_tracer("jobwire.bridge")


def disable() -> None:
    global _tracer
    _tracer = None
    _waiting.clear()


def install(app: web.Application) -> None:
    """Puts the tracing middleware first (outermost) when tracing is on."""
    if _tracer is not None:
        app.middlewares.insert(0, _middleware)


def client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    if _tracer is None:
        return []
    return [_UnaryUnary(), _UnaryStream(), _StreamUnary(), _StreamStream()]


def note_waiter(future: Any) -> None:
    """Remembers the callback's trace context for the batch that will carry it."""
    if _tracer is not None:
        from opentelemetry import context

        _waiting[id(future)] = context.get_current()


def batch_context(futures: Sequence[Any]) -> AbstractContextManager[None]:
    """Makes the first waiter's trace current (others linked) while a batch is sent."""
    return _NULL if _tracer is None else _batch_span(futures)


_NULL: AbstractContextManager[None] = nullcontext()


@contextmanager
def _batch_span(futures: Sequence[Any]) -> Iterator[None]:
    from opentelemetry import trace

    contexts = [c for f in futures if (c := _waiting.pop(id(f), None)) is not None]
    if not contexts:
        yield
        return
    spans = [trace.get_current_span(c).get_span_context() for c in contexts]
    links = [trace.Link(s) for s in spans[1:] if s.is_valid]
    with _tracer.start_as_current_span(
        "jobwire.bridge.batch",
        context=contexts[0],
        links=links,
        attributes={"jobwire.batch.events": len(futures)},
    ):
        yield


# Probes (every few seconds from a kubelet or a balancer) and scrapes: noise, not
# traces, as the service's gRPC health checks are not traced either.
_UNTRACED = frozenset({"/healthz", "/readyz", "/metrics"})
_HEALTH_METHODS = "/grpc.health.v1.Health/"


@web.middleware
async def _middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    if request.path in _UNTRACED:
        return await handler(request)
    from opentelemetry import propagate, trace

    # The route's pattern, never the raw path: an AuroraCloud token may be a path segment.
    info = request.match_info.route.resource
    route = info.canonical if info is not None else "unmatched"
    headers = {
        k: v for k, v in request.headers.items() if k.lower() in ("traceparent", "tracestate")
    }
    with _tracer.start_as_current_span(
        f"{request.method} {route}",
        context=propagate.extract(headers),
        kind=trace.SpanKind.SERVER,
        attributes={"http.request.method": request.method, "http.route": route},
    ) as span:
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            _answered(span, exc.status)
            raise
        _answered(span, response.status)
        return response


def _answered(span: Any, status: int) -> None:
    span.set_attribute("http.response.status_code", status)
    if status >= 500:  # a 4xx is the client's (OpenTelemetry's HTTP server conventions)
        from opentelemetry.trace import Status, StatusCode

        span.set_status(Status(StatusCode.ERROR))


def _traced(details: Any) -> tuple[Any, Any]:
    """A CLIENT span for the call and the call details with its `traceparent` added."""
    from opentelemetry import propagate, trace

    method = details.method.decode() if isinstance(details.method, bytes) else details.method
    service, _, name = method.lstrip("/").rpartition("/")
    span = _tracer.start_span(
        f"{service}/{name}",
        kind=trace.SpanKind.CLIENT,
        attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
    )
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    metadata = grpc.aio.Metadata(*(details.metadata or ()), *carrier.items())
    traced = grpc.aio.ClientCallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )
    return span, traced


def _finish(span: Any, call: Any) -> None:
    """Ends the span with the call's status once the call is done."""

    async def end(finished: Any) -> None:
        try:
            code = await finished.code()  # grpc.aio: a coroutine, ready once done
        except BaseException:
            code = None
        if isinstance(code, grpc.StatusCode):
            span.set_attribute("rpc.grpc.status_code", code.value[0])
            if code is not grpc.StatusCode.OK:
                from opentelemetry.trace import Status, StatusCode

                span.set_status(Status(StatusCode.ERROR, code.name))
        span.end()

    def done(finished: Any) -> None:
        task = asyncio.get_running_loop().create_task(end(finished))
        _ending.add(task)
        task.add_done_callback(_ending.discard)

    call.add_done_callback(done)


_ending: set[asyncio.Task[None]] = set()


async def _intercept(continuation: Any, details: Any, request: Any) -> Any:
    """Every call shape: a CLIENT span around the call, ended with its status."""
    method = details.method.decode() if isinstance(details.method, bytes) else details.method
    if method.startswith(_HEALTH_METHODS):  # /readyz asking the service
        return await continuation(details, request)
    span, traced = _traced(details)
    try:
        call = await continuation(traced, request)
    except BaseException:
        span.end()
        raise
    _finish(span, call)
    return call


class _UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await _intercept(continuation, details, request)


class _UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await _intercept(continuation, details, request)


class _StreamUnary(grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(
        self, continuation: Any, details: Any, request_iterator: Any
    ) -> Any:
        return await _intercept(continuation, details, request_iterator)


class _StreamStream(grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(
        self, continuation: Any, details: Any, request_iterator: Any
    ) -> Any:
        return await _intercept(continuation, details, request_iterator)
