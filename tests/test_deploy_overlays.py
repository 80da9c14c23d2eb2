"""The kustomize overlays deploy/overlays/{plain,tls}, rendered offline with
`kubectl kustomize` and checked against the Kubernetes schemas; the TLS overlay's
exec probe is then run for real: `jobwire healthcheck` with the manifest's command
and environment against a service serving TLS with a certificate for the names the
overlay documents."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import os
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from service.store.embedded import EmbeddedStore
from tests.conftest import make_policy, start_service
from tests.helpers import tool_missing

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "deploy" / "k8s"
OVERLAYS = ROOT / "deploy" / "overlays"
K8S_VERSIONS = ("1.29.0", kubernetes_validate.utils.latest_version())
TLS_SECRET = "jobwire-grpc-tls"

Doc = dict[str, Any]


def kubectl() -> str:
    return shutil.which("kubectl") or tool_missing(
        "kubectl not installed: the overlays cannot be rendered"
    )


@cache
def render(path: Path) -> tuple[Doc, ...]:
    out = subprocess.run(
        [kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    return tuple(d for d in yaml.safe_load_all(out) if d)


def deployment(docs: tuple[Doc, ...], name: str) -> Doc:
    (found,) = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == name]
    return found


def container(doc: Doc) -> Doc:
    result: Doc = doc["spec"]["template"]["spec"]["containers"][0]
    return result


def env_of(c: Doc) -> dict[str, str]:
    return {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}


@pytest.mark.parametrize("overlay", ["plain", "tls"])
def test_overlay_renders_valid_objects(overlay: str) -> None:
    docs = render(OVERLAYS / overlay)
    assert len(docs) == len(render(BASE))
    for doc in docs:
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "jobwire"
        assert "namespace" not in doc["metadata"]
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)


def test_plain_overlay_is_the_base() -> None:
    assert render(OVERLAYS / "plain") == render(BASE)


def test_tls_overlay_serves_tls_and_probes_by_exec() -> None:
    docs = render(OVERLAYS / "tls")
    service = container(deployment(docs, "jobwire-service"))
    port = service["ports"][0]["containerPort"]
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert "grpc" not in service[probe], f"{probe}: the kubelet's gRPC probe has no TLS"
        assert service[probe]["exec"]["command"] == [
            "jobwire",
            "healthcheck",
            "--target",
            f"127.0.0.1:{port}",
        ]
    env = env_of(service)
    mounts = {m["name"]: m for m in service["volumeMounts"]}
    volumes = {
        v["name"]: v
        for v in deployment(docs, "jobwire-service")["spec"]["template"]["spec"]["volumes"]
    }
    mount = mounts["grpc-tls"]
    assert mount["readOnly"] is True
    assert volumes["grpc-tls"]["secret"]["secretName"] == TLS_SECRET
    for name, key in [
        ("JOBWIRE_GRPC_TLS_CERT", "tls.crt"),
        ("JOBWIRE_GRPC_TLS_KEY", "tls.key"),
        ("JOBWIRE_SERVICE_TLS_CA", "ca.crt"),
    ]:
        assert env[name] == f"{mount['mountPath']}/{key}", name
    assert env["JOBWIRE_SERVICE_TLS_SERVER_NAME"] == "jobwire-service"

    # Every other Deployment is a gRPC client of the service (bridge, dashboard).
    clients = [
        d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] != "jobwire-service"
    ]
    assert "jobwire-bridge" in {d["metadata"]["name"] for d in clients}
    for client in clients:
        name = client["metadata"]["name"]
        c = container(client)
        client_env = env_of(c)
        (client_mount,) = [m for m in c["volumeMounts"] if m["name"] == "grpc-tls"]
        (client_volume,) = [
            v for v in client["spec"]["template"]["spec"]["volumes"] if v["name"] == "grpc-tls"
        ]
        assert client_volume["secret"]["items"] == [{"key": "ca.crt", "path": "ca.crt"}], (
            f"{name} needs the CA only, never the service's key"
        )
        assert client_env["JOBWIRE_SERVICE_TLS_CA"] == f"{client_mount['mountPath']}/ca.crt"
        assert client_env["JOBWIRE_SERVICE_TLS_SERVER_NAME"] == "jobwire-service", name
        assert "JOBWIRE_GRPC_TLS_KEY" not in client_env, name


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def write_tls_secret(directory: Path) -> None:
    """What the Secret jobwire-grpc-tls holds: a CA and a service certificate it signed,
    for the names the overlay documents."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "jobwire test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "jobwire-service")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("jobwire-service"),
                    x509.DNSName("jobwire-service-headless"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True)
    (directory / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (directory / "tls.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "tls.key").write_bytes(_pem(key))


def run_probe(command: list[str], env: dict[str, str]) -> int:
    """The probe's command, `jobwire` being this checkout's CLI."""
    assert command[0] == "jobwire"
    argv = [sys.executable, "-m", "cli", *command[1:]]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("JOBWIRE_")}
    done = subprocess.run(
        argv, env={**clean, **env}, cwd=ROOT, capture_output=True, timeout=60, check=False
    )
    return done.returncode


async def test_tls_overlay_exec_probe_passes_against_a_tls_service(tmp_path: Path) -> None:
    docs = render(OVERLAYS / "tls")
    service = container(deployment(docs, "jobwire-service"))
    mount_path = next(m["mountPath"] for m in service["volumeMounts"] if m["name"] == "grpc-tls")
    secret_dir = tmp_path / "tls"
    write_tls_secret(secret_dir)
    # The manifest's environment, its mount path mapped onto the Secret's files here.
    env = {k: v.replace(mount_path, str(secret_dir)) for k, v in env_of(service).items()}
    handle = await start_service(
        EmbeddedStore(tmp_path / "d", make_policy()),
        grpc_tls_cert=env["JOBWIRE_GRPC_TLS_CERT"],
        grpc_tls_key=env["JOBWIRE_GRPC_TLS_KEY"],
    )
    try:
        probe = list(service["readinessProbe"]["exec"]["command"])
        probe[-1] = handle.target  # the container port, here a free loopback port
        client_env = {k: v for k, v in env.items() if k.startswith("JOBWIRE_SERVICE_TLS_")}
        # In a thread: the service answers on this test's event loop.
        assert await asyncio.to_thread(run_probe, probe, client_env) == 0
        # The check can fail: without the CA (as the kubelet's plaintext probe) it does.
        assert await asyncio.to_thread(run_probe, probe, {}) != 0
        wrong_name = {**client_env, "JOBWIRE_SERVICE_TLS_SERVER_NAME": "someone-else"}
        assert await asyncio.to_thread(run_probe, probe, wrong_name) != 0
    finally:
        await handle.close()
