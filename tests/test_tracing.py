"""OpenTelemetry traces across bridge -> gRPC -> commit, with an in-process exporter
against the real bridge and service on loopback; a worker's own `traceparent` is
continued; OTLP export when OTEL_EXPORTER_OTLP_ENDPOINT is set; and with tracing off
nothing of OpenTelemetry is imported at all."""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from cli import tracing as cli_tracing
from http_bridge import tracing as bridge_tracing
from jobwire.v1 import job_pb2
from service import tracing as service_tracing
from service.metrics import COMMIT_BATCH
from service.store.embedded import EmbeddedStore
from tests.bridge_harness import BATCH_SECRET, TEST_CONFIG, create_job, running_bridge
from tests.conftest import make_policy, start_service
from tests.helpers import WAIT

ROOT = Path(__file__).resolve().parents[1]
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    service_tracing.enable(provider)
    bridge_tracing.enable(provider)
    try:
        yield memory
    finally:
        service_tracing.disable()
        bridge_tracing.disable()
        provider.shutdown()


@pytest.fixture
async def stack(tmp_path: Path, exporter: InMemorySpanExporter) -> AsyncIterator[tuple[Any, Any]]:
    """Service and bridge started after tracing was enabled (it hooks in at start)."""
    handle = await start_service(EmbeddedStore(tmp_path / "data", make_policy()))
    try:
        config = dataclasses.replace(TEST_CONFIG, service_target=handle.target)
        async with running_bridge(config) as bridge:
            yield bridge, handle.stub
    finally:
        await handle.close()


async def spans_until(exporter: InMemorySpanExporter, names: set[str]) -> list[ReadableSpan]:
    """The finished spans, once one of each name is among them (spans end asynchronously)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while True:
        spans = list(exporter.get_finished_spans())
        if names <= {s.name for s in spans} or loop.time() > deadline:
            return spans
        await asyncio.sleep(0.02)  # the polling interval of this waiter


def one(spans: list[ReadableSpan], name: str) -> ReadableSpan:
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, (name, [s.name for s in spans])
    return found[0]


def parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


async def callback(bridge: Any, stub: Any, headers: dict[str, str] | None = None) -> str:
    created = await create_job(stub, job_pb2.JOB_KIND_BATCH)
    job_id: str = created.job.id
    body = {
        "jobId": job_id,
        "status": "success",
        "outputKey": "o/1",
        "callbackSecret": BATCH_SECRET,
    }
    assert (await bridge.post("/api/batch-callback", body, headers=headers or {}))[0] == 200
    return job_id


HTTP = "POST /api/batch-callback"
RPC = "jobwire.v1.JobService/BatchReportEvents"
COMMIT = "jobwire.commit"


async def test_one_callback_is_one_trace_bridge_grpc_commit(
    stack: tuple[Any, Any], exporter: InMemorySpanExporter
) -> None:
    bridge, stub = stack
    commits_before = COMMIT_BATCH._sum.get()
    created = await create_job(stub, job_pb2.JOB_KIND_BATCH)
    exporter.clear()  # CreateJob's spans are a trace of their own
    body = {
        "jobId": created.job.id,
        "status": "success",
        "outputKey": "o/1",
        "callbackSecret": BATCH_SECRET,
    }
    assert (await bridge.post("/api/batch-callback", body))[0] == 200
    spans = await spans_until(exporter, {HTTP, RPC, COMMIT})

    http = one(spans, HTTP)
    server = next(s for s in spans if s.name == RPC and s.kind == SpanKind.SERVER)
    client = next(s for s in spans if s.name == RPC and s.kind == SpanKind.CLIENT)
    commit = one(spans, COMMIT)
    trace_ids = {s.context.trace_id for s in (http, client, server, commit)}
    assert len(trace_ids) == 1, "bridge, gRPC and commit spans are one trace"
    assert http.kind == SpanKind.SERVER and http.parent is None
    assert http.attributes is not None and http.attributes["http.response.status_code"] == 200
    # commit <- gRPC server <- gRPC client <- (batch) <- HTTP request
    assert parent_id(commit) == server.context.span_id
    assert parent_id(server) == client.context.span_id
    by_id = {s.context.span_id: s for s in spans}
    ancestor = by_id[parent_id(client)]
    while ancestor is not http:
        ancestor = by_id[parent_id(ancestor)]
    assert commit.attributes is not None and commit.attributes["jobwire.commit.batch_size"] == 1
    assert server.attributes is not None and server.attributes["rpc.grpc.status_code"] == 0
    assert COMMIT_BATCH._sum.get() > commits_before


async def test_a_worker_traceparent_continues_its_trace(
    stack: tuple[Any, Any], exporter: InMemorySpanExporter
) -> None:
    bridge, stub = stack
    await callback(bridge, stub, {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"})
    spans = await spans_until(exporter, {HTTP, RPC, COMMIT})
    http = one(spans, HTTP)
    assert http.context.trace_id == int(TRACE_ID, 16)
    assert parent_id(http) == int(PARENT_ID, 16)
    commit = [s for s in spans if s.name == COMMIT][-1]
    assert commit.context.trace_id == int(TRACE_ID, 16)


async def test_token_path_is_never_in_a_span(
    stack: tuple[Any, Any], exporter: InMemorySpanExporter
) -> None:
    bridge, _ = stack
    await bridge.post("/api/transcode-callback/not-the-token", {"code": 0, "data": []})
    spans = await spans_until(exporter, {"POST /api/transcode-callback/{token}"})
    span = one(spans, "POST /api/transcode-callback/{token}")
    assert "not-the-token" not in repr(span.to_json())


async def test_a_caller_s_mistake_is_no_server_error_in_any_span(
    stack: tuple[Any, Any], exporter: InMemorySpanExporter
) -> None:
    """A wrong callback token (401) or a missing artifact (404) marked the service's
    SERVER span as an error, described as 'AbortError: Locally aborted.' with an
    exception event (gRPC's abort), while the bridge's HTTP span of the same 4xx was
    not: a trace view's error rate counted callers' mistakes as the service failing.
    Server spans are errors for the server's codes (UNAVAILABLE, INTERNAL, ...); the
    bridge's CLIENT span, as a client's, is an error for any code but OK, named."""
    bridge, stub = stack
    created = await create_job(stub, job_pb2.JOB_KIND_EXTRACTION)
    job = f"/api/external/jobs/{created.job.id}"
    wrong = {"Authorization": "Bearer wrong-token-4711"}
    assert (await bridge.get(job, headers=wrong))[0] == 401
    auth = {"Authorization": f"Bearer {created.callback_token}"}
    assert (await bridge.get(f"{job}/artifacts/none.md", headers=auth))[0] == 404
    names = {"GET /api/external/jobs/{jobId}", "GET /api/external/jobs/{jobId}/artifacts/{name}"}
    spans = await spans_until(
        exporter, names | {f"jobwire.v1.JobService/{m}" for m in ("GetJob", "ReadArtifact")}
    )
    for method, code in (("GetJob", "UNAUTHENTICATED"), ("ReadArtifact", "NOT_FOUND")):
        calls = [s for s in spans if s.name == f"jobwire.v1.JobService/{method}"]
        server = one([s for s in calls if s.kind == SpanKind.SERVER], calls[0].name)
        client = one([s for s in calls if s.kind == SpanKind.CLIENT], calls[0].name)
        assert server.status.status_code == StatusCode.UNSET, server.status
        assert not server.events  # no exception recorded for an answer
        assert server.attributes is not None
        assert server.attributes["rpc.grpc.status_code"] == grpc.StatusCode[code].value[0]
        assert client.status.status_code == StatusCode.ERROR
        assert client.status.description == code
    for name in names:
        assert one(spans, name).status.status_code == StatusCode.UNSET
    for span in spans:  # no credential in any span
        text = span.to_json()
        assert created.callback_token not in text and "wrong-token-4711" not in text


async def test_probes_and_scrapes_are_not_traced(
    stack: tuple[Any, Any], exporter: InMemorySpanExporter
) -> None:
    """README: health checks are not traced. The bridge traced every /healthz, /readyz
    (and its gRPC health Check: two spans a probe) and /metrics scrape: a kubelet's
    probes every few seconds and Prometheus' scrapes filled the trace store."""
    bridge, stub = stack
    for path in ("/healthz", "/readyz", "/metrics"):
        assert (await bridge.get(path))[0] == 200
    await callback(bridge, stub)  # the spans after it are its own
    spans = await spans_until(exporter, {HTTP, COMMIT})
    names = {s.name for s in spans}
    assert HTTP in names
    assert not {n for n in names if "health" in n.lower() or "/readyz" in n or "/metrics" in n}


def test_tracing_wanted_only_with_an_otlp_endpoint() -> None:
    assert not cli_tracing.wanted({})
    assert cli_tracing.wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"})
    assert cli_tracing.wanted({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318"})
    assert not cli_tracing.wanted(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_SDK_DISABLED": "true"}
    )
    with pytest.raises(SystemExit, match="OTEL_EXPORTER_OTLP_PROTOCOL='udp'"):
        cli_tracing.otlp_provider("x", {"OTEL_EXPORTER_OTLP_PROTOCOL": "udp"})


async def test_spans_are_exported_by_otlp_http(monkeypatch: pytest.MonkeyPatch) -> None:
    """A loopback OTLP/HTTP receiver gets the span, with the default service name."""
    received: list[ExportTraceServiceRequest] = []

    async def traces(request: web.Request) -> web.Response:
        received.append(ExportTraceServiceRequest.FromString(await request.read()))
        return web.Response(body=b"", content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", traces)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    try:
        provider = cli_tracing.otlp_provider("jobwire-service")
        with provider.get_tracer("t").start_as_current_span("exported"):
            pass
        # The exporter posts from its own thread; the receiver answers on this loop.
        assert await asyncio.to_thread(provider.force_flush, 10_000)
        await asyncio.to_thread(provider.shutdown)
    finally:
        await runner.cleanup()
    (request,) = received
    (resource_spans,) = request.resource_spans
    names = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
    assert names["service.name"] == "jobwire-service"
    assert [s.name for s in resource_spans.scope_spans[0].spans] == ["exported"]


def test_off_imports_no_opentelemetry(tmp_path: Path) -> None:
    """Service and bridge, one callback end to end, tracing off: no OpenTelemetry module."""
    script = textwrap.dedent(
        f"""
        import asyncio, dataclasses, sys
        from pathlib import Path
        from service.store.embedded import EmbeddedStore
        from tests.bridge_harness import BATCH_SECRET, TEST_CONFIG, create_job, running_bridge
        from tests.conftest import make_policy, start_service
        from jobwire.v1 import job_pb2
        import cli.main

        async def main():
            handle = await start_service(EmbeddedStore(Path({str(tmp_path)!r}), make_policy()))
            config = dataclasses.replace(TEST_CONFIG, service_target=handle.target)
            async with running_bridge(config) as bridge:
                job = (await create_job(handle.stub, job_pb2.JOB_KIND_BATCH)).job.id
                body = {{"jobId": job, "status": "success", "outputKey": "o",
                        "callbackSecret": BATCH_SECRET}}
                assert (await bridge.post("/api/batch-callback", body))[0] == 200
            await handle.close()

        asyncio.run(main())
        loaded = sorted(m for m in sys.modules if m.startswith("opentelemetry"))
        print("otel modules:", loaded)
        assert not loaded, loaded
        """
    )
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "otel modules: []" in done.stdout
