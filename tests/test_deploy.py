"""The deploy artefacts, checked offline: Kubernetes manifests against the bundled
Kubernetes JSON schemas (kubernetes-validate, strict), the compose stack (structure,
plus `docker compose config -q` where the compose plugin exists) and the Dockerfile
(statically: stages, user, healthcheck, commands)."""

from __future__ import annotations

import os
import re
import secrets
import shlex
import shutil
import subprocess
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "compose.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
ENV_EXAMPLE = DEPLOY / "jobwire.env.example"

# The oldest Kubernetes we claim to support (gRPC probes are GA since 1.27) and the
# newest schema kubernetes-validate bundles.
K8S_VERSIONS = ("1.29.0", kubernetes_validate.utils.latest_version())
BRIDGE_SECRETS = ("BATCH_CALLBACK_SECRET", "API_KEY", "TRANSCODE_CALLBACK_TOKEN")
RUNTIME_UID = 10001

Doc = dict[str, Any]


# --------------------------------------------------------------------------- k8s


def k8s_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def load_all(path: Path) -> list[Doc]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]


@cache
def k8s_docs() -> tuple[Doc, ...]:
    return tuple(doc for path in k8s_files() for doc in load_all(path))


def find(kind: str, name: str) -> Doc:
    for doc in k8s_docs():
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    raise AssertionError(f"no {kind} named {name} in deploy/k8s")


def containers(deployment: Doc) -> list[Doc]:
    result: list[Doc] = deployment["spec"]["template"]["spec"]["containers"]
    return result


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))
    assert kustomization["kind"] == "Kustomization"
    assert sorted(kustomization["resources"]) == [p.name for p in k8s_files()]
    assert "namespace" not in kustomization, "manifests must stay namespace-agnostic"


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", k8s_files(), ids=lambda p: p.name)
def test_k8s_manifest_matches_schema(path: Path, version: str) -> None:
    docs = load_all(path)
    assert docs, f"{path.name} is empty"
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{path.name} {doc.get('kind')}: {'.'.join(map(str, e.path))}: {e}")


def test_schema_validation_catches_mistakes() -> None:
    """Guards the guard: the validator must reject a typo and a wrong type."""
    bad = yaml.safe_load((K8S / "bridge-deployment.yaml").read_text(encoding="utf-8"))
    bad["spec"]["replica"] = 2  # unknown field
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSIONS[0], strict=True)
    bad = yaml.safe_load((K8S / "bridge-deployment.yaml").read_text(encoding="utf-8"))
    bad["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSIONS[0], strict=True)


def test_k8s_objects_are_complete_and_namespace_agnostic() -> None:
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in k8s_docs())
    assert kinds == [
        ("ConfigMap", "jobwire-config"),
        ("Deployment", "jobwire-bridge"),
        ("Deployment", "jobwire-dashboard"),
        ("Deployment", "jobwire-service"),
        ("PodDisruptionBudget", "jobwire-bridge"),
        ("PodDisruptionBudget", "jobwire-service"),
        ("Secret", "jobwire-secrets"),
        ("Service", "jobwire-bridge"),
        ("Service", "jobwire-dashboard"),
        ("Service", "jobwire-service"),
        ("Service", "jobwire-service-headless"),
    ]
    for doc in k8s_docs():
        assert "namespace" not in doc["metadata"], doc["metadata"]["name"]
    assert find("Service", "jobwire-service-headless")["spec"]["clusterIP"] == "None"


@pytest.mark.parametrize(
    ("name", "command", "ports"),
    [
        ("jobwire-service", "serve", [50051, 9464]),  # gRPC, and /metrics for a scrape
        ("jobwire-bridge", "bridge", [8080]),  # callbacks and /metrics
        ("jobwire-dashboard", "dashboard", [8081]),
    ],
)
def test_deployment_is_hardened_probed_and_sized(name: str, command: str, ports: list[int]) -> None:
    deployment = find("Deployment", name)
    assert deployment["spec"]["replicas"] == 2
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == RUNTIME_UID == dockerfile_uid()
    assert pod["automountServiceAccountToken"] is False
    (container,) = containers(deployment)
    assert container["image"] == "jobwire"
    assert container["args"] == [command]
    assert [p["containerPort"] for p in container["ports"]] == ports
    if command == "serve":  # the port the image's JOBWIRE_METRICS_ADDR serves
        assert f"JOBWIRE_METRICS_ADDR=0.0.0.0:{ports[1]}" in (DEPLOY / "Dockerfile").read_text()
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    for kind in ("requests", "limits"):
        assert set(container["resources"][kind]) == {"cpu", "memory"}, kind
    if command == "serve":
        assert container["readinessProbe"]["grpc"]["port"] == 50051
        assert container["livenessProbe"]["grpc"]["port"] == 50051
    else:
        port = "http" if command == "bridge" else "ui"  # the dashboard's is not scraped
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port}
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port}


def test_services_and_budgets_select_their_pods() -> None:
    pods = {
        d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"]
        for d in k8s_docs()
        if d["kind"] == "Deployment"
    }
    for svc in (d for d in k8s_docs() if d["kind"] == "Service"):
        selector = svc["spec"]["selector"]
        matched = [n for n, labels in pods.items() if selector.items() <= labels.items()]
        assert len(matched) == 1, f"Service {svc['metadata']['name']} selects {matched}"
        port_names = {
            p["name"] for c in containers(find("Deployment", matched[0])) for p in c["ports"]
        }
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in port_names, svc["metadata"]["name"]
    for pdb in (d for d in k8s_docs() if d["kind"] == "PodDisruptionBudget"):
        deployment = find("Deployment", pdb["metadata"]["name"])
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert 0 < pdb["spec"]["minAvailable"] < deployment["spec"]["replicas"]


# README "Scraping on Kubernetes": every pod labelled app.kubernetes.io/name: jobwire is
# scraped at /metrics on its ports named `metrics` and `http`. What serves /metrics there:
# the service on JOBWIRE_METRICS_ADDR's port, the bridge on its own.
SCRAPED_PORT_NAMES = ("metrics", "http")
SERVES_METRICS = {"service": 9464, "bridge": 8080}


def test_the_documented_scrape_finds_metrics_on_every_port_it_selects() -> None:
    """The dashboard's container port was named `http` too: a PodMonitor set up as the
    README says scraped its /metrics, which answers 401, and every dashboard replica was
    a target down (`up == 0`)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    scrape = readme[readme.index("**Scraping on Kubernetes:**") :][:800]
    assert all(f"`{name}`" in scrape for name in SCRAPED_PORT_NAMES), scrape
    for deployment in (d for d in k8s_docs() if d["kind"] == "Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "jobwire"
        component = labels["app.kubernetes.io/component"]
        for container in containers(deployment):
            for port in container["ports"]:
                if port["name"] in SCRAPED_PORT_NAMES:
                    assert SERVES_METRICS.get(component) == port["containerPort"], (
                        f"{component} port {port['name']} is scraped but serves no /metrics"
                    )


def test_config_and_secret_references_resolve() -> None:
    config = find("ConfigMap", "jobwire-config")["data"]
    secret = find("Secret", "jobwire-secrets")["stringData"]
    assert config["JOBWIRE_GRPC_ADDR"] == "0.0.0.0:50051"
    assert config["JOBWIRE_HTTP_ADDR"] == "0.0.0.0:8080"
    target = re.fullmatch(r"(?:dns:///)?([a-z0-9-]+):(\d+)", config["JOBWIRE_SERVICE_TARGET"])
    assert target, config["JOBWIRE_SERVICE_TARGET"]
    find("Service", target.group(1))
    assert target.group(2) == "50051"
    used_secret_keys = set()
    for deployment in (d for d in k8s_docs() if d["kind"] == "Deployment"):
        for container in containers(deployment):
            assert container["envFrom"] == [{"configMapRef": {"name": "jobwire-config"}}]
            for env in container.get("env", []):
                ref = env["valueFrom"]["secretKeyRef"]
                assert ref["name"] == "jobwire-secrets"
                assert ref["key"] in secret, ref["key"]
                used_secret_keys.add(ref["key"])
    expected = {"MONGODB_URI", "JOBWIRE_DASHBOARD_TOKEN", "JOBWIRE_GRPC_TOKEN", *BRIDGE_SECRETS}
    assert used_secret_keys == set(secret) == expected


def test_a_grpc_token_put_in_the_secret_reaches_the_service_and_its_callers() -> None:
    """README "TLS and internal auth": put JOBWIRE_GRPC_TOKEN in the Secret. No
    Deployment read that key, so the service stayed open while the operator believed
    it closed. Every Deployment now reads it, and requires it: the service listens on
    0.0.0.0, where it does not start without one (it was optional: an out-of-band
    Secret without the key started the service open to the cluster)."""
    for deployment in (d for d in k8s_docs() if d["kind"] == "Deployment"):
        for container in containers(deployment):
            refs = {
                env["name"]: env["valueFrom"]["secretKeyRef"] for env in container.get("env", [])
            }
            ref = refs.get("JOBWIRE_GRPC_TOKEN")
            assert ref == {
                "name": "jobwire-secrets",
                "key": "JOBWIRE_GRPC_TOKEN",
            }, deployment["metadata"]["name"]


@pytest.mark.parametrize("source", ["configmap", "env_example"])
async def test_the_shipped_service_starts_closed_or_not_at_all(
    source: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The ConfigMap and the compose env file put the service on 0.0.0.0. With the
    token left as shipped (the Secret's and the env file's empty placeholder) it stops
    at start naming JOBWIRE_GRPC_TOKEN (it ran open, with a WARNING); with the token
    filled in, as the operator is told, it authenticates every caller."""
    from service.server import start, unauthenticated_beyond_this_host

    env = shipped_settings(source)
    if source == "configmap":
        env["JOBWIRE_GRPC_TOKEN"] = find("Secret", "jobwire-secrets")["stringData"][
            "JOBWIRE_GRPC_TOKEN"
        ]
    else:
        env["JOBWIRE_GRPC_TOKEN"] = env_example_values()["JOBWIRE_GRPC_TOKEN"]
        env["JOBWIRE_GRPC_ADDR"] = compose()["services"]["service"]["environment"][
            "JOBWIRE_GRPC_ADDR"
        ]
    assert env["JOBWIRE_GRPC_ADDR"] == "0.0.0.0:50051" and env["JOBWIRE_GRPC_TOKEN"] == ""
    settings, _, _ = start_settings(env, monkeypatch, tmp_path)
    with pytest.raises(SystemExit, match="JOBWIRE_GRPC_TOKEN is not set"):
        await start(settings)  # stops before it opens a store
    filled = {**env, "JOBWIRE_GRPC_TOKEN": secrets.token_urlsafe(32)}
    settings, bridge, dashboard = start_settings(filled, monkeypatch, tmp_path)
    assert not unauthenticated_beyond_this_host(settings)
    for caller in (bridge, dashboard):  # they send the same token
        assert caller.service_env["JOBWIRE_GRPC_TOKEN"] == filled["JOBWIRE_GRPC_TOKEN"]


def test_secret_holds_placeholders_only() -> None:
    text = (K8S / "secret.yaml").read_text(encoding="utf-8")
    assert "REPLACE" in text and "EXTERNAL" in text
    for key, value in find("Secret", "jobwire-secrets")["stringData"].items():
        assert value == "" or "REPLACE_ME" in value, f"{key} looks like a real secret"
    assert find("Secret", "jobwire-secrets").get("data") is None


def test_kustomize_build_renders_valid_objects() -> None:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl not installed: `kubectl kustomize deploy/k8s` not run")
    out = subprocess.run(
        ["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    assert len(docs) == len(k8s_docs())
    for doc in docs:
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "jobwire"
        kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)
        if doc["kind"] == "Deployment":
            assert re.fullmatch(r"\S+:\S+", containers(doc)[0]["image"])


def env_example_values() -> dict[str, str]:
    text = ENV_EXAMPLE.read_text(encoding="utf-8")
    return dict(
        line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#")
    )


def shipped_settings(source: str) -> dict[str, str]:
    """The settings as shipped: the ConfigMap's data, or the compose env file as copied
    from the example, its empty secrets filled in as the operator is told to."""
    if source == "configmap":
        return dict(find("ConfigMap", "jobwire-config")["data"])
    values = env_example_values()
    for secret in (*BRIDGE_SECRETS, "JOBWIRE_DASHBOARD_TOKEN", "JOBWIRE_GRPC_TOKEN"):
        values[secret] = secrets.token_urlsafe(32)
    return values


def start_settings(env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    """What the service, the bridge and the dashboard make of `env` at start; a value
    one refuses ends the test as it would end the process (SystemExit)."""
    from dashboard.config import load_config as dashboard_config
    from http_bridge.config import load_config as bridge_config
    from service.config import Settings

    env = {**env, "JOBWIRE_ENV_FILE": str(tmp_path / "no-such.env")}
    for name in list(os.environ):
        if name.startswith("JOBWIRE_") or name in env:
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Settings.from_env(), bridge_config(env), dashboard_config(env)


@pytest.mark.parametrize("source", ["configmap", "env_example"])
def test_retention_and_login_limit_are_shipped_off_and_documented(
    source: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """README "Retention" and "Access": JOBWIRE_JOB_RETENTION (product default: kept for
    ever) and JOBWIRE_DASHBOARD_LOGIN_LIMIT (off) are in the ConfigMap and in the
    compose env file, off, with the value to set shown beside them. Off on purpose: a
    deletion is for good and the first sweep deletes the whole backlog; behind an
    Ingress the login limit would let one guesser hold up every login. Every process
    starts with the settings as shipped, and with the documented values set instead."""
    env = shipped_settings(source)
    text = (K8S / "configmap.yaml" if source == "configmap" else ENV_EXAMPLE).read_text()
    assert env["JOBWIRE_JOB_RETENTION"] == "off"
    assert env["JOBWIRE_JOB_RETENTION_SWEEP_SECONDS"] == "60"
    assert env["JOBWIRE_DASHBOARD_LOGIN_LIMIT"] == "off"
    for documented in ('README "Retention"', "30d", 'README "Access"', "10/min"):
        assert documented in text, documented

    service, bridge, dashboard = start_settings(env, monkeypatch, tmp_path)
    assert service.job_retention_seconds == 0  # kept for ever, as without the variable
    assert service.job_retention_sweep_seconds == 60
    assert dashboard.login_rate == 0 and dashboard.login_burst == 0
    assert bridge.service_target == env.get("JOBWIRE_SERVICE_TARGET", bridge.service_target)

    turned_on = {**env, "JOBWIRE_JOB_RETENTION": "30d", "JOBWIRE_DASHBOARD_LOGIN_LIMIT": "10/min"}
    service, _, dashboard = start_settings(turned_on, monkeypatch, tmp_path)
    assert service.job_retention_seconds == 30 * 86400
    assert (dashboard.login_burst, dashboard.login_rate) == (10, 10 / 60)


# ----------------------------------------------------------------------- compose


@cache
def compose() -> Doc:
    doc: Doc = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    return doc


def joined(command: Any) -> str:
    return command if isinstance(command, str) else " ".join(command)


def test_compose_runs_a_replica_set_service_and_bridge() -> None:
    services = compose()["services"]
    assert set(services) == {"mongo", "mongo-init", "service", "bridge", "dashboard"}

    mongo = services["mongo"]
    assert mongo["image"] == "mongo:7"
    assert "--replSet rs0" in joined(mongo["command"])
    assert "ping" in joined(mongo["healthcheck"]["test"])
    assert any(v.endswith(":/data/db") for v in mongo["volumes"])
    assert "ports" not in mongo, "MongoDB (no auth) must not be published"

    init = joined(services["mongo-init"]["command"])
    assert "rs.initiate(" in init and '_id: "rs0"' in init and "mongo:27017" in init
    assert "NotYetInitialized" in init, "the init must be idempotent"
    assert "isWritablePrimary" in init, "the init must wait for a primary"
    assert services["mongo-init"]["depends_on"]["mongo"]["condition"] == "service_healthy"

    service = services["service"]
    assert service["command"] == ["serve"]
    assert service["environment"]["MONGODB_URI"] == "mongodb://mongo:27017/jobwire?replicaSet=rs0"
    assert service["environment"]["JOBWIRE_GRPC_ADDR"] == "0.0.0.0:50051"
    assert service["depends_on"] == {
        "mongo": {"condition": "service_healthy"},
        "mongo-init": {"condition": "service_completed_successfully"},
    }
    assert service["healthcheck"]["test"][:3] == ["CMD", "jobwire", "healthcheck"]
    assert "127.0.0.1:50051" in service["healthcheck"]["test"]

    bridge = services["bridge"]
    assert bridge["command"] == ["bridge"]
    assert bridge["environment"]["JOBWIRE_SERVICE_TARGET"] == "service:50051"
    assert bridge["environment"]["JOBWIRE_HTTP_ADDR"] == "0.0.0.0:8080"
    assert bridge["depends_on"] == {"service": {"condition": "service_healthy"}}
    assert bridge["healthcheck"]["test"][:4] == ["CMD", "jobwire", "healthcheck", "--http"]
    assert bridge["healthcheck"]["test"][4].endswith(":8080/readyz")

    dashboard = services["dashboard"]
    assert dashboard["command"] == ["dashboard"]
    assert dashboard["environment"]["JOBWIRE_SERVICE_TARGET"] == "service:50051"
    assert dashboard["depends_on"] == {"service": {"condition": "service_healthy"}}
    assert dashboard["healthcheck"]["test"][4].endswith(":8081/readyz")
    assert dashboard["ports"][0].startswith("${JOBWIRE_DASHBOARD_BIND:-127.0.0.1}:")

    # The token (README "Docker Compose"): required by compose itself, for all three.
    required = re.fullmatch(
        r"\$\{JOBWIRE_GRPC_TOKEN:\?(.+)\}", service["environment"]["JOBWIRE_GRPC_TOKEN"]
    )
    assert required, service["environment"]["JOBWIRE_GRPC_TOKEN"]
    for said in ("deploy/jobwire.env", "--env-file deploy/jobwire.env", "token_urlsafe"):
        assert said in required.group(1), said
    header = COMPOSE.read_text(encoding="utf-8")
    command = "docker compose --env-file deploy/jobwire.env -f deploy/compose.yaml up --build"
    assert command in header
    assert command in (ROOT / "README.md").read_text(encoding="utf-8")

    for name in ("service", "bridge", "dashboard"):
        svc = services[name]
        token = svc["environment"]["JOBWIRE_GRPC_TOKEN"]
        assert token == service["environment"]["JOBWIRE_GRPC_TOKEN"], name
        assert svc["env_file"] == ["./jobwire.env"], name
        assert svc["image"] == services["service"]["image"], "one image for both commands"
        build = svc["build"]
        assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
        assert svc["read_only"] is True and svc["cap_drop"] == ["ALL"]
        for secret in BRIDGE_SECRETS:
            assert secret not in svc.get("environment", {}), f"{secret} belongs in jobwire.env"


def test_env_example_names_every_secret_without_values() -> None:
    text = ENV_EXAMPLE.read_text(encoding="utf-8")
    assert "cp deploy/jobwire.env.example deploy/jobwire.env" in text
    values = env_example_values()
    assert {*BRIDGE_SECRETS, "JOBWIRE_PUBLIC_URL", "TRANSCODE_ALLOWED_IPS"} <= set(values)
    for secret in BRIDGE_SECRETS:
        assert values[secret] == "", f"{secret} must stay an empty placeholder"


def test_real_env_file_is_gitignored() -> None:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", "deploy/jobwire.env"], cwd=ROOT, timeout=30, check=False
    )
    assert ignored.returncode == 0, "deploy/jobwire.env must be gitignored"
    tracked = subprocess.run(
        ["git", "ls-files", "deploy/jobwire.env"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert tracked.stdout == ""


def compose_command() -> list[str] | None:
    candidates = [["docker", "compose"], ["docker-compose"]]
    for cmd in candidates:
        if shutil.which(cmd[0]) is None:
            continue
        probe = subprocess.run([*cmd, "version"], capture_output=True, timeout=30, check=False)
        if probe.returncode == 0:
            return cmd
    return None


def test_docker_compose_config_accepts_the_stack(tmp_path: Path) -> None:
    cmd = compose_command()
    if cmd is None:
        pytest.skip("docker compose plugin (or docker-compose v2) not installed")
    # A copy, so the check needs no real deploy/jobwire.env and never reads one.
    shutil.copytree(DEPLOY, tmp_path / "deploy", ignore=shutil.ignore_patterns("jobwire.env"))
    env_file = tmp_path / "deploy" / "jobwire.env"
    config = [*cmd, "--env-file", str(env_file), "-f", str(tmp_path / "deploy" / "compose.yaml")]
    config += ["config", "-q"]
    missing = subprocess.run(config, capture_output=True, text=True, timeout=60, check=False)
    assert missing.returncode != 0, "compose must refuse to start without deploy/jobwire.env"
    shutil.copy(ENV_EXAMPLE, env_file)
    # As copied, JOBWIRE_GRPC_TOKEN is empty: refused, naming it.
    empty = subprocess.run(config, capture_output=True, text=True, timeout=60, check=False)
    assert empty.returncode != 0 and "JOBWIRE_GRPC_TOKEN" in empty.stderr, empty.stderr
    text = env_file.read_text(encoding="utf-8")
    env_file.write_text(text.replace("JOBWIRE_GRPC_TOKEN=\n", "JOBWIRE_GRPC_TOKEN=t0ken\n"))
    ok = subprocess.run(config, capture_output=True, text=True, timeout=60, check=False)
    assert ok.returncode == 0, ok.stderr


# -------------------------------------------------------------------- Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "dangling line continuation"
    result = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        result.append((keyword.upper(), args.strip()))
    return result


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for instruction in dockerfile_instructions():
        if instruction[0] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(instruction)
    return stages


def dockerfile_uid() -> int:
    users = [args for kw, args in dockerfile_stages()[-1] if kw == "USER"]
    assert users, "the final stage sets no USER"
    return int(users[-1].split(":")[0])


def test_dockerfile_is_multi_stage_on_python_slim() -> None:
    args = {
        m.group(1): m.group(2)
        for kw, a in dockerfile_instructions()
        if kw == "ARG" and (m := re.fullmatch(r"(\w+)=(\S+)", a))
    }
    stages = dockerfile_stages()
    assert len(stages) >= 2
    assert re.fullmatch(r"\S+ AS builder", stages[0][0][1], re.IGNORECASE)
    final_base = stages[-1][0][1].split()[0]
    final_base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], final_base)
    assert final_base.startswith("python:3.11-slim"), final_base
    final = " ".join(f"{kw} {a}" for kw, a in stages[-1])
    assert "COPY --from=builder /opt/jobwire /opt/jobwire" in final
    for forbidden in ("pip install", "pip wheel", "build-essential", "gcc", "apt-get install"):
        assert forbidden not in final, f"final stage must not run {forbidden!r}"
    builder = " ".join(f"{kw} {a}" for kw, a in stages[0])
    assert "venv" in builder and "pip wheel" in builder


def test_dockerfile_runs_as_non_root_with_both_commands() -> None:
    assert dockerfile_uid() not in (0,), "must not run as root"
    final = dict(dockerfile_stages()[-1])
    env = final["ENV"]
    assert "JOBWIRE_GRPC_ADDR=0.0.0.0:50051" in env
    assert "JOBWIRE_HTTP_ADDR=0.0.0.0:8080" in env
    assert "JOBWIRE_SERVICE_TARGET=" in env
    assert "jobwire" in final["ENTRYPOINT"] and final["CMD"] == '["serve"]'
    assert set(final["EXPOSE"].split()) == {"50051", "8080", "8081", "9464"}
    assert "JOBWIRE_DASHBOARD_ADDR=0.0.0.0:8081" in env
    # README "Metrics": the service's metrics must be reachable from outside its container.
    assert "JOBWIRE_METRICS_ADDR=0.0.0.0:9464" in env
    assert "jobwire healthcheck" in final["HEALTHCHECK"]
    assert "--interval=" in final["HEALTHCHECK"] and "CMD " in final["HEALTHCHECK"]
    header = DOCKERFILE.read_text(encoding="utf-8")
    assert "`jobwire serve`" in header and "`jobwire bridge`" in header
    # 0.0.0.0 without a token does not start: the image opens nothing by itself, and
    # says how to run it.
    assert "JOBWIRE_GRPC_TOKEN" not in env and "JOBWIRE_GRPC_INSECURE" not in env
    assert "docker run -e JOBWIRE_GRPC_TOKEN jobwire:local serve" in header


def test_build_context_holds_what_the_builder_copies() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*", ".dockerignore should allow-list the build context"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    for kw, args in dockerfile_stages()[0]:
        if kw != "COPY" or args.startswith("--from"):
            continue
        *sources, _dest = shlex.split(args)
        for source in sources:
            assert (ROOT / source).exists(), source
            assert source.rstrip("/") in allowed, f"{source} is excluded by .dockerignore"
    assert {".venv", ".git", "data", "jobwire.env"}.isdisjoint(allowed)
    assert "**/jobwire.env" in patterns


def test_wheel_installed_in_the_image_contains_every_package() -> None:
    """The image installs the wheel, not the checkout: a package missing from
    [tool.setuptools] packages would be missing at runtime."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"][
        "setuptools"
    ]
    declared = set(setuptools["packages"])
    for top in ("service", "http_bridge"):
        for init in (ROOT / top).rglob("__init__.py"):
            package = ".".join(init.parent.relative_to(ROOT).parts)
            assert package in declared, f"{package} is not in [tool.setuptools] packages"


def test_builder_copies_every_package_directory() -> None:
    """Each directory [tool.setuptools] maps a package to is copied into the builder
    (and allowed by .dockerignore), else the wheel build in the image fails."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"][
        "setuptools"
    ]
    package_dir: dict[str, str] = setuptools.get("package-dir", {})
    roots = set()
    for package in setuptools["packages"]:
        parts = package.split(".")
        mapped = next(
            (
                (package_dir[".".join(parts[:n])], parts[n:])
                for n in range(len(parts), 0, -1)
                if ".".join(parts[:n]) in package_dir
            ),
            None,
        )
        base, rest = mapped if mapped else (package_dir.get("", "."), parts)
        roots.add(Path(base, *rest).parts[0])
    copied = {
        shlex.split(args)[0].rstrip("/")
        for kw, args in dockerfile_stages()[0]
        if kw == "COPY" and not args.startswith("--from")
    }
    missing = roots - copied - {"."}
    assert not missing, f"deploy/Dockerfile copies no {sorted(missing)} into the builder"
