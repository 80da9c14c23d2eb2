"""Operations: metrics, JSON logs and redaction, gRPC TLS (and mTLS), the bearer token."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import io
import ipaddress
import json
import logging
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jobwire.v1 import job_pb2, job_service_pb2, job_service_pb2_grpc
from service.logs import REQUEST_ID, JsonFormatter, RedactingFilter, record_context
from service.store.embedded import EmbeddedStore
from tests.conftest import make_policy, start_service
from tests.helpers import WAIT, create, free_port, port_0_environment, progress


async def test_metrics_endpoint(tmp_path: Path) -> None:
    handle = await start_service(
        EmbeddedStore(tmp_path / "d", make_policy()),
        metrics_addr="127.0.0.1:0",
        metrics_queue_seconds=0.05,
    )
    try:
        await create(handle.stub, job_id="m")
        await handle.stub.ReportEvent(progress("m", 5))
        port = handle.running.ops.metrics.port if handle.running.ops else 0
        assert port
        wanted = [
            'jobwire_grpc_requests_total{code="OK",method="CreateJob"}',
            'jobwire_grpc_request_duration_seconds_count{method="ReportEvent"}',
            "jobwire_events_applied_total",
            "jobwire_watchers",
            'jobwire_queue_depth{kind="generic"} 0.0',
            "jobwire_storage_errors",
        ]
        # The gauges are refreshed every 0.05 s: scrape until the lines are there.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT
        async with aiohttp.ClientSession() as session:
            while True:
                async with session.get(f"http://127.0.0.1:{port}/metrics") as reply:
                    text = await reply.text()
                if all(line in text for line in wanted) or loop.time() > deadline:
                    break
                await asyncio.sleep(0.05)  # polling interval (deadline above)
        assert 'jobwire_grpc_requests_total{code="OK",method="CreateJob"}' in text
        assert 'jobwire_grpc_request_duration_seconds_count{method="ReportEvent"}' in text
        assert "jobwire_events_applied_total" in text
        assert "jobwire_watchers" in text
        assert 'jobwire_queue_depth{kind="generic"} 0.0' in text
        assert "jobwire_storage_errors_total" in text or "jobwire_storage_errors" in text
    finally:
        await handle.close()


async def test_token_required_except_health(tmp_path: Path) -> None:
    handle = await start_service(EmbeddedStore(tmp_path / "d", make_policy()), grpc_token="s3cr3t")
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await create(handle.stub, job_id="t")
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await handle.stub.GetJob(
                job_service_pb2.GetJobRequest(id="t"), metadata=(("authorization", "Bearer no"),)
            )
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as err:  # streams too
            call = handle.stub.WatchJob(job_service_pb2.WatchJobRequest(id="t"))
            await call.read()
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        ok = (("authorization", "Bearer s3cr3t"),)
        created = await handle.stub.CreateJob(
            job_service_pb2.CreateJobRequest(
                job_id="t", job=job_pb2.Job(kind=job_pb2.JOB_KIND_GENERIC)
            ),
            metadata=ok,
        )
        assert created.job.id == "t"
        # The scheme in any case, as HTTP reads it (`bearer` was refused); not the token.
        for scheme in ("bearer", "BEARER"):
            got = await handle.stub.GetJob(
                job_service_pb2.GetJobRequest(id="t"),
                metadata=(("authorization", f"{scheme} s3cr3t"),),
            )
            assert got.id == "t"
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await handle.stub.GetJob(
                job_service_pb2.GetJobRequest(id="t"),
                metadata=(("authorization", "Bearer S3CR3T"),),
            )
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await handle.stub.GetJob(
                job_service_pb2.GetJobRequest(id="t"), metadata=(("authorization", "Basic s3cr3t"),)
            )
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        health = health_pb2_grpc.HealthStub(handle.channel)
        answer = await health.Check(health_pb2.HealthCheckRequest())
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await handle.close()


def _self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.mark.parametrize("mutual", [False, True])
async def test_tls(tmp_path: Path, mutual: bool) -> None:
    cert, key = _self_signed(tmp_path)
    handle = await start_service(
        EmbeddedStore(tmp_path / "d", make_policy()),
        grpc_tls_cert=str(cert),
        grpc_tls_key=str(key),
        grpc_tls_client_ca=str(cert) if mutual else "",
    )
    try:
        plain = job_service_pb2_grpc.JobServiceStub(handle.channel)  # insecure channel
        with pytest.raises(grpc.aio.AioRpcError):
            await plain.GetJob(job_service_pb2.GetJobRequest(id="x"), timeout=2)
        creds = grpc.ssl_channel_credentials(
            root_certificates=cert.read_bytes(),
            private_key=key.read_bytes() if mutual else None,
            certificate_chain=cert.read_bytes() if mutual else None,
        )
        async with grpc.aio.secure_channel(handle.target, creds) as channel:
            stub = job_service_pb2_grpc.JobServiceStub(channel)
            created = await stub.CreateJob(
                job_service_pb2.CreateJobRequest(
                    job_id="tls", job=job_pb2.Job(kind=job_pb2.JOB_KIND_GENERIC)
                )
            )
            assert created.job.id == "tls"
        if mutual:  # a client without a certificate is refused
            anonymous = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
            async with grpc.aio.secure_channel(handle.target, anonymous) as channel:
                stub = job_service_pb2_grpc.JobServiceStub(channel)
                with pytest.raises(grpc.aio.AioRpcError):
                    await stub.GetJob(job_service_pb2.GetJobRequest(id="tls"), timeout=2)
    finally:
        await handle.close()


def test_logs_are_json_with_request_id_and_never_a_secret() -> None:
    env = {"API_KEY": "key-abcdef-123", "MONGODB_URI": "mongodb://u:pw9876@db/x"}
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RedactingFilter(env))
    record_context()
    logger = logging.getLogger("jobwire.test_ops")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        token = REQUEST_ID.set("req-42")
        logger.warning(
            "headers %s", {"Authorization": "Bearer tok-999", "X-Callback-Token": "cb-1"}
        )
        logger.warning("api key %s, uri %s", env["API_KEY"], env["MONGODB_URI"])
        REQUEST_ID.reset(token)
        try:
            raise RuntimeError("failed with key-abcdef-123")
        except RuntimeError:
            logger.exception("boom")
    finally:
        logger.removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["level"] for line in lines] == ["WARNING", "WARNING", "ERROR"]
    assert lines[0]["request_id"] == "req-42" and lines[0]["logger"] == "jobwire.test_ops"
    assert {"time", "level", "logger", "message"} <= set(lines[0])
    text = stream.getvalue()
    for secret in ("tok-999", "cb-1", "key-abcdef-123", "pw9876"):
        assert secret not in text, secret
    assert "***" in lines[0]["message"] and "***" in lines[2]["error"]


def test_the_dashboard_token_and_signing_secrets_are_never_logged() -> None:
    env = {
        "JOBWIRE_DASHBOARD_TOKEN": "dash-token-4711",
        # space-separated during a key rotation: each one is a secret on its own
        "JOBWIRE_SIGNING_SECRET_SECRETARY": "whsec_bmV3LWtleQ== whsec_b2xkLWtleQ==",
    }
    redactor = RedactingFilter(env)
    text = redactor.redact("token dash-token-4711, keys whsec_b2xkLWtleQ== and whsec_bmV3LWtleQ==")
    for secret in ("dash-token-4711", "whsec_b2xkLWtleQ==", "whsec_bmV3LWtleQ=="):
        assert secret not in text, secret


@pytest.mark.parametrize(
    ("command", "variable"),
    [("serve", "OTEL_EXPORTER_OTLP_HEADERS"), ("bridge", "OTEL_EXPORTER_OTLP_TRACES_HEADERS")],
)
async def test_otlp_exporter_headers_are_never_logged(
    tmp_path: Path, command: str, variable: str
) -> None:
    """OTEL_EXPORTER_OTLP_HEADERS (or _TRACES_HEADERS) carry the collector's credentials
    (README "Traces"). An entry the OpenTelemetry SDK cannot parse (`name:value` for
    `name=value`) it logs whole, as a warning at start: the key was written in clear,
    the log filter knew only jobwire's own secret variables."""
    secret = "S3cr3t-ingest-key-4711"
    env = {
        **os.environ,
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}",
        variable: f"x-team=ops,X-Api-Key:{secret}",
        "JOBWIRE_LOG_FORMAT": "json",
        "JOBWIRE_ENV_FILE": str(tmp_path / "none.env"),
        "JOBWIRE_DATA_DIR": str(tmp_path / "data"),
        "JOBWIRE_GRPC_ADDR": "127.0.0.1:0",
        "JOBWIRE_HTTP_ADDR": "127.0.0.1:0",
        "JOBWIRE_METRICS_ADDR": "",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli", command, env=env, stderr=asyncio.subprocess.PIPE
    )
    assert proc.stderr is not None
    lines: list[str] = []
    try:
        async with asyncio.timeout(2 * WAIT):
            while not any("listening on" in line or "bridge on" in line for line in lines):
                line = (await proc.stderr.readline()).decode()
                assert line, lines  # it stopped
                lines.append(line)
    finally:
        proc.terminate()
        rest, _ = await proc.communicate()
    text = "".join(lines) + (rest or b"").decode()
    assert "Header format invalid" in text  # the SDK did log the entries it refused
    assert secret not in text, text


@pytest.mark.parametrize("command", ["bridge", "dashboard"])
async def test_the_grpc_token_in_the_env_file_reaches_the_service(
    tmp_path: Path, command: str
) -> None:
    """`jobwire bridge` and `jobwire dashboard` read their settings and secrets from the
    env file (JOBWIRE_ENV_FILE), but the channel to the service read JOBWIRE_GRPC_TOKEN
    (and JOBWIRE_SERVICE_TLS_*) from the environment alone: with the token in the file,
    every call was UNAUTHENTICATED, and the bridge told an AWS Batch worker whose secret
    was right that it was wrong (401)."""
    from tests.bridge_harness import BATCH_SECRET
    from tests.bridge_process import cli_bridge_process
    from tests.dashboard_harness import TOKEN as DASHBOARD_TOKEN
    from tests.dashboard_harness import running_dashboard

    handle = await start_service(EmbeddedStore(tmp_path / "d", make_policy()), grpc_token="s3cr3t")
    env_file = tmp_path / "jobwire.env"
    env_file.write_text("JOBWIRE_GRPC_TOKEN=s3cr3t\n", encoding="utf-8")
    ok = (("authorization", "Bearer s3cr3t"),)
    await handle.stub.CreateJob(
        job_service_pb2.CreateJobRequest(job_id="f", job=job_pb2.Job(kind=job_pb2.JOB_KIND_BATCH)),
        metadata=ok,
    )
    try:
        async with aiohttp.ClientSession() as http:
            if command == "bridge":
                body = {"jobId": "f", "status": "success", "outputKey": "o"}
                body["callbackSecret"] = BATCH_SECRET
                env = {"JOBWIRE_ENV_FILE": str(env_file)}
                async with cli_bridge_process(handle.target, tmp_path, **env) as bridge:
                    url = f"{bridge.url}/api/batch-callback"
                    async with http.post(url, json=body) as reply:
                        assert reply.status == 200, await reply.text()
            else:
                env = {"JOBWIRE_ENV_FILE": str(env_file)}
                async with running_dashboard(handle.target, **env) as dash:
                    bearer = {"Authorization": f"Bearer {DASHBOARD_TOKEN}"}
                    async with http.get(f"{dash.url}/api/jobs/f", headers=bearer) as reply:
                        assert reply.status == 200, await reply.text()
    finally:
        await handle.close()


async def test_bridge_request_id_and_callback_metrics(tmp_path: Path) -> None:
    from aiohttp.test_utils import TestClient, TestServer

    from http_bridge.app import create_app
    from http_bridge.config import Config

    handle = await start_service(EmbeddedStore(tmp_path / "d", make_policy()))
    try:
        config = Config(service_target=handle.target, batch_callback_secret="b" * 32)
        async with TestClient(TestServer(create_app(config))) as client:
            reply = await client.post(
                "/api/batch-callback", json={"jobId": "nope"}, headers={"X-Request-ID": "r-77"}
            )
            assert reply.headers["X-Request-ID"] == "r-77"
            status = reply.status
            fresh = await client.get("/healthz")
            assert len(fresh.headers["X-Request-ID"]) == 32  # generated
            text = await (await client.get("/metrics")).text()
        assert f'jobwire_bridge_callbacks_total{{contract="aws_batch",status="{status}"}}' in text
    finally:
        await handle.close()


def test_deployment_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.config import Settings

    for name in ("JOBWIRE_METRICS_ADDR", "JOBWIRE_EVENT_FEED", "JOBWIRE_GRPC_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings.from_env()
    assert settings.metrics_addr == "127.0.0.1:9464" and settings.event_feed
    monkeypatch.setenv("JOBWIRE_METRICS_ADDR", "")
    monkeypatch.setenv("JOBWIRE_EVENT_FEED", "off")
    monkeypatch.setenv("JOBWIRE_GRPC_TOKEN", "t0ken")
    settings = Settings.from_env()
    assert settings.metrics_addr == "" and not settings.event_feed
    assert "t0ken" not in repr(settings)


async def test_a_bridge_whose_grpc_token_the_service_refuses_says_so(tmp_path: Path) -> None:
    """The bridge's JOBWIRE_GRPC_TOKEN differing from the service's: every call was
    UNAUTHENTICATED, and the bridge told each worker that *its* credential was wrong (an
    AWS Batch worker with the right secret got 401, which workers do not retry) while
    /readyz said ready. The bridge's own credential is now told apart (the service marks
    its refusal): 503 + Retry-After to the worker, not ready, and the operator is told."""
    from tests.bridge_harness import API_KEY, BATCH_SECRET
    from tests.bridge_process import cli_bridge_process
    from tests.dashboard_harness import running_dashboard

    handle = await start_service(EmbeddedStore(tmp_path / "d", make_policy()), grpc_token="s3cr3t")
    ok = (("authorization", "Bearer s3cr3t"),)
    await handle.stub.CreateJob(
        job_service_pb2.CreateJobRequest(job_id="m", job=job_pb2.Job(kind=job_pb2.JOB_KIND_BATCH)),
        metadata=ok,
    )
    body = {"jobId": "m", "status": "success", "outputKey": "o", "callbackSecret": BATCH_SECRET}
    try:
        env = {"JOBWIRE_GRPC_TOKEN": "not-the-service-token"}
        async with (
            aiohttp.ClientSession() as http,
            cli_bridge_process(handle.target, tmp_path, **env) as bridge,
        ):
            async with http.post(f"{bridge.url}/api/batch-callback", json=body) as reply:
                assert reply.status == 503, await reply.text()
                assert "Retry-After" in reply.headers
            video = {"Authorization": f"Bearer {API_KEY}"}
            async with http.get(f"{bridge.url}/api/pending", headers=video) as reply:
                assert reply.status == 503, await reply.text()
            async with http.get(f"{bridge.url}/readyz") as reply:
                assert reply.status == 503
                assert (await reply.json())["reason"] == "the service refused JOBWIRE_GRPC_TOKEN"
            async with (
                running_dashboard(handle.target, **env) as dash,  # the same for it
                http.get(f"{dash.url}/readyz") as reply,
            ):
                assert reply.status == 503
                assert await reply.text() == "service: refused JOBWIRE_GRPC_TOKEN\n"
            log = bridge.log()
            assert "the service refused the bridge's JOBWIRE_GRPC_TOKEN" in log, log
            assert "not-the-service-token" not in log
        job = await handle.stub.GetJob(job_service_pb2.GetJobRequest(id="m"), metadata=ok)
        assert job.state == job_pb2.JOB_STATE_QUEUED
    finally:
        await handle.close()


def _calls(method: str, code: str = "") -> float:
    """`method`'s calls this process's services finished (with status `code`, or any)."""
    from prometheus_client import REGISTRY

    return sum(
        sample.value
        for metric in REGISTRY.collect()
        if metric.name == "jobwire_grpc_requests"
        for sample in metric.samples
        if sample.name.endswith("_total")
        and sample.labels.get("method") == method
        and code in ("", sample.labels.get("code"))
    )


@pytest.mark.parametrize("bridge_token", ["s3cr3t", ""])
async def test_readyz_checks_the_grpc_token_without_reading_the_store(
    tmp_path: Path, bridge_token: str
) -> None:
    """The bridge's and the dashboard's /readyz asked the service a ListJobs of one job
    to learn whether it took their JOBWIRE_GRPC_TOKEN: a store read every probe (every
    5 s per pod on Kubernetes). They now ask a call the token check answers before any
    handler runs (gRPC reflection's service list), so ready still means "the service
    takes our token" (and 503 when it does not) without touching the store."""
    from tests.bridge_process import cli_bridge_process
    from tests.dashboard_harness import running_dashboard

    handle = await start_service(EmbeddedStore(tmp_path / "d", make_policy()), grpc_token="s3cr3t")
    env = {"JOBWIRE_GRPC_TOKEN": bridge_token}
    try:
        async with (
            aiohttp.ClientSession() as http,
            cli_bridge_process(handle.target, tmp_path, **env) as bridge,
            running_dashboard(handle.target, **env) as dash,
        ):
            list_jobs, reflection_ok = _calls("ListJobs"), _calls("ServerReflectionInfo", "OK")
            for _ in range(3):
                async with http.get(f"{bridge.url}/readyz") as reply:
                    if bridge_token:
                        assert reply.status == 200, await reply.text()
                    else:
                        assert reply.status == 503
                        reason = (await reply.json())["reason"]
                        assert reason == "the service refused JOBWIRE_GRPC_TOKEN"
                async with http.get(f"{dash.url}/readyz") as reply:
                    if bridge_token:
                        assert (reply.status, await reply.text()) == (200, "ok\n")
                    else:
                        assert reply.status == 503
                        assert await reply.text() == "service: refused JOBWIRE_GRPC_TOKEN\n"
            assert _calls("ListJobs") == list_jobs
            # Answered and ended OK: no CANCELLED or error calls in the service's metrics.
            probes_ok = 6 if bridge_token else 0
            assert _calls("ServerReflectionInfo", "OK") == reflection_ok + probes_ok
    finally:
        await handle.close()


@contextlib.asynccontextmanager
async def _said_port(command: str, env: dict[str, str], said: bytes) -> AsyncIterator[int]:
    """`jobwire <command>` started with `env`, and the port its start-up line (`said`,
    the port as group 1) names, not 0; the process is stopped on exit."""
    import re

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli", command, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        seen = b""
        async with asyncio.timeout(30):
            while not (found := re.search(said, seen)):
                line = await proc.stdout.readline()
                assert line, seen
                seen += line
        port = int(found.group(1))
        assert port != 0, seen
        yield port
    finally:
        proc.terminate()
        await proc.wait()


@pytest.mark.parametrize(
    ("command", "said", "host"),
    [
        ("serve", rb"jobwire service listening on 127\.0\.0\.1:(\d+) ", "127.0.0.1"),
        ("bridge", rb"bridge on http://127\.0\.0\.1:(\d+) ", "127.0.0.1"),
        ("dashboard", rb"dashboard on http://127\.0\.0\.1:(\d+)/", "127.0.0.1"),
        # An IPv6 address in brackets, as a URL has it: it said http://::1:8080.
        ("bridge", rb"bridge on http://\[::1\]:(\d+) ", "::1"),
        ("dashboard", rb"dashboard on http://\[::1\]:(\d+)/", "::1"),
    ],
)
async def test_a_process_on_port_0_says_the_port_it_listens_on(
    tmp_path: Path, command: str, said: bytes, host: str
) -> None:
    """With port 0 in its address (any free port), each process said it listened on
    ":0": the one number an operator needs to reach it was nowhere."""

    addr = {"JOBWIRE_HTTP_ADDR": "[::1]:0", "JOBWIRE_DASHBOARD_ADDR": "[::1]:0"}
    env = port_0_environment(tmp_path, API_KEY="k", **(addr if host == "::1" else {}))
    async with _said_port(command, env, said) as port:
        _, writer = await asyncio.open_connection(host, port)  # it listens there
        writer.close()


@pytest.mark.parametrize(
    ("command", "said", "variables"),
    [
        ("serve", rb"jobwire service listening on \[::\]:(\d+) ", {"JOBWIRE_GRPC_INSECURE": "1"}),
        ("bridge", rb"bridge on http://\[::\]:(\d+) ", {}),
        ("dashboard", rb"dashboard on http://\[::\]:(\d+)/", {}),
    ],
)
async def test_a_process_on_the_ipv6_any_address_takes_ipv4_clients_too(
    tmp_path: Path, command: str, said: bytes, variables: dict[str, str]
) -> None:
    """`[::]:PORT` is every address of both families (README "Configuration"), as
    gRPC has it: asyncio bound the bridge's and the dashboard's `::` IPv6-only, so an
    IPv4 client (a dual-stack cluster's) was refused."""

    addr = "[::]:0"
    env = port_0_environment(
        tmp_path,
        API_KEY="k",
        JOBWIRE_GRPC_ADDR=addr,
        JOBWIRE_HTTP_ADDR=addr,
        JOBWIRE_DASHBOARD_ADDR=addr,
        **variables,
    )
    async with _said_port(command, env, said) as port:
        for host in ("127.0.0.1", "::1"):
            reader, writer = await asyncio.open_connection(host, port)
            if command != "serve":  # an HTTP answer, from the one process on that port
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"HTTP/1.1 ")
            writer.close()
