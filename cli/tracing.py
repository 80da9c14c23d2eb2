"""Turns traces on for `jobwire serve` / `jobwire bridge` when the environment asks.

On only when OTEL_EXPORTER_OTLP_ENDPOINT (or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) is set
and OTEL_SDK_DISABLED is not "true". Then spans are exported by OTLP, configured by the
standard variables: OTEL_EXPORTER_OTLP_PROTOCOL (http/protobuf, the default, or grpc),
OTEL_EXPORTER_OTLP_HEADERS / _TIMEOUT / _CERTIFICATE, OTEL_SERVICE_NAME (default
jobwire-service / jobwire-bridge), OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_SAMPLER(_ARG),
OTEL_PROPAGATORS (W3C tracecontext by default) and OTEL_BSP_*. Otherwise nothing of
OpenTelemetry is even imported.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any


def wanted(env: Mapping[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return bool(
        env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


# The span batches' settings, read by the SDK itself (milliseconds and counts), and the
# least each takes. A bad one was a traceback at start (the SDK's check naming its own
# parameter) or, not a number, an ERROR with a traceback and the default in its place.
BATCH_SETTINGS = {
    "OTEL_BSP_SCHEDULE_DELAY": 1,
    "OTEL_BSP_EXPORT_TIMEOUT": 0,
    "OTEL_BSP_MAX_QUEUE_SIZE": 1,
    "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": 1,
}


def check_batch_settings(env: Mapping[str, str]) -> None:
    """OTEL_BSP_*: whole numbers, a batch no larger than the queue; else one line."""
    got: dict[str, int] = {}
    for name, least in BATCH_SETTINGS.items():
        raw = env.get(name, "").strip()
        if raw and not (raw.isascii() and raw.isdigit() and int(raw) >= least):
            raise SystemExit(f"{name} must be a whole number >= {least}, got {raw!r}")
        if raw:
            got[name] = int(raw)
    queue = got.get("OTEL_BSP_MAX_QUEUE_SIZE", 2048)  # the SDK's defaults
    batch = got.get("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512)
    if batch > queue:
        raise SystemExit(
            f"OTEL_BSP_MAX_EXPORT_BATCH_SIZE must be at most OTEL_BSP_MAX_QUEUE_SIZE ({queue}),"
            f" got '{batch}'"
        )


def otlp_provider(default_name: str, env: Mapping[str, str] | None = None) -> Any:
    """A TracerProvider exporting by OTLP in batches (flushed at exit)."""
    env = os.environ if env is None else env
    check_batch_settings(env)
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    protocol = (
        env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip()
    exporter: Any
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()
    elif protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpExporter,
        )

        exporter = HttpExporter()
    else:
        raise SystemExit(
            f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: jobwire exports grpc or http/protobuf"
        )
    # Resource.create reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES, but names
    # passed to it win: pass the default name only when the environment gives none.
    named = env.get("OTEL_SERVICE_NAME") or "service.name=" in env.get(
        "OTEL_RESOURCE_ATTRIBUTES", ""
    )
    resource = Resource.create({} if named else {SERVICE_NAME: default_name})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def setup_service() -> None:
    if wanted():
        from service import tracing

        tracing.enable(otlp_provider("jobwire-service"))


def setup_bridge() -> None:
    if wanted():
        from http_bridge import tracing

        tracing.enable(otlp_provider("jobwire-bridge"))
