"""Proto hygiene and locked installs, checked for what they are meant to catch.

buf (built by scripts/install-buf.sh, as `make lint` does) runs with the repository's
own buf.yaml on a copy of proto/ with one change each: a renamed field must fail
`buf breaking` against proto/last-release.binpb, an RPC without its own request and
response messages must fail `buf lint`. The lock checks are static: uv.lock pins every
dependency with hashes, and the image installs from it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

from tests.helpers import tool_missing

ROOT = Path(__file__).resolve().parents[1]


def _buf() -> str:
    path = subprocess.run(
        ["bash", str(ROOT / "scripts" / "install-buf.sh"), "--path"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not os.access(path, os.X_OK):
        tool_missing(f"buf is not built ({path}); make lint builds it")
    return path


def _workspace(tmp_path: Path) -> Path:
    """A copy of buf.yaml, proto/*.proto and the release image."""
    work = tmp_path / "ws"
    shutil.copytree(ROOT / "proto", work / "proto", ignore=shutil.ignore_patterns("*.py*"))
    shutil.copy(ROOT / "buf.yaml", work / "buf.yaml")
    return work


def _run(buf: str, work: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [buf, *args], cwd=work, capture_output=True, text=True, timeout=120, check=False
    )


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


def test_proto_is_lint_clean_and_unbroken(tmp_path: Path) -> None:
    buf, work = _buf(), _workspace(tmp_path)
    lint = _run(buf, work, "lint")
    assert lint.returncode == 0, lint.stdout + lint.stderr
    breaking = _run(buf, work, "breaking", "--against", "proto/last-release.binpb")
    assert breaking.returncode == 0, breaking.stdout + breaking.stderr


def test_renaming_a_released_field_is_a_breaking_change(tmp_path: Path) -> None:
    buf, work = _buf(), _workspace(tmp_path)
    service = work / "proto" / "jobwire" / "v1" / "job_service.proto"
    _edit(
        service,
        "  int64 from_sequence = 2;\n}\n\nmessage WatchJobResponse",
        ("  int64 from_seq = 2;\n}\n\nmessage WatchJobResponse"),
    )
    breaking = _run(buf, work, "breaking", "--against", "proto/last-release.binpb")
    assert breaking.returncode != 0
    assert 'changed name from "from_sequence" to "from_seq"' in breaking.stdout


def test_removing_a_released_rpc_is_a_breaking_change(tmp_path: Path) -> None:
    buf, work = _buf(), _workspace(tmp_path)
    service = work / "proto" / "jobwire" / "v1" / "job_service.proto"
    _edit(
        service, "  rpc ListArtifacts(ListArtifactsRequest) returns (ListArtifactsResponse);\n", ""
    )
    breaking = _run(buf, work, "breaking", "--against", "proto/last-release.binpb")
    assert breaking.returncode != 0
    assert "ListArtifacts" in breaking.stdout


def test_a_new_rpc_must_have_its_own_messages(tmp_path: Path) -> None:
    """The lint exceptions cover the released RPCs' shapes, not new ones in other files."""
    buf, work = _buf(), _workspace(tmp_path)
    (work / "proto" / "jobwire" / "v1" / "extra.proto").write_text(
        'syntax = "proto3";\n\npackage jobwire.v1;\n\nimport "jobwire/v1/job.proto";\n\n'
        "service ExtraService {\n  rpc Touch(Job) returns (Job);\n}\n",
        encoding="utf-8",
    )
    lint = _run(buf, work, "lint")
    assert lint.returncode != 0
    assert "RPC request type" in lint.stdout or "should be named" in lint.stdout


# buf.yaml's lint exceptions cover all of job_service.proto; these are the only RPCs
# they are for. A new RPC there is held to the rule by this test instead.
RELEASED_RESPONSE_EXCEPTIONS = {"GetJob": "Job", "CancelJob": "Job", "UploadArtifact": "Artifact"}


def test_lint_exceptions_cover_only_the_released_rpcs() -> None:
    text = (ROOT / "proto" / "jobwire" / "v1" / "job_service.proto").read_text(encoding="utf-8")
    rpcs = re.findall(
        r"^\s*rpc\s+(\w+)\s*\(\s*(?:stream\s+)?(\w+)\s*\)\s*returns\s*"
        r"\(\s*(?:stream\s+)?(\w+)\s*\)",
        text,
        re.M,
    )
    assert len(rpcs) >= 15, rpcs
    exceptions = {}
    for name, request, response in rpcs:
        assert request == f"{name}Request", f"{name}: request {request}, not {name}Request"
        if response != f"{name}Response":
            exceptions[name] = response
    assert exceptions == RELEASED_RESPONSE_EXCEPTIONS


def _lock() -> dict[str, Any]:
    lock = tomllib.loads((ROOT / "uv.lock").read_text(encoding="utf-8"))
    return {p["name"]: p for p in lock["package"]}


def _name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)
    assert match, requirement
    return re.sub(r"[-_.]+", "-", match.group(0)).lower()


def test_uv_lock_pins_every_dependency_with_hashes() -> None:
    packages = _lock()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    jobwire = packages["jobwire"]
    locked_runtime = {d["name"] for d in jobwire["dependencies"]}
    locked_dev = {d["name"] for d in jobwire["optional-dependencies"]["dev"]}
    # Every direct dependency of pyproject.toml is in the lock (else: make lock).
    assert {_name(r) for r in project["dependencies"]} <= locked_runtime
    assert {_name(r) for r in project["optional-dependencies"]["dev"]} <= locked_dev
    # ...and every locked package (direct or transitive) comes with hashes.
    for name, package in packages.items():
        if name == "jobwire":
            continue
        files = [*package.get("wheels", []), *([package["sdist"]] if "sdist" in package else [])]
        assert files, f"{name}: no files in uv.lock"
        assert all(f["hash"].startswith("sha256:") for f in files), name


def test_the_image_installs_from_the_lock_with_the_same_uv() -> None:
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text(encoding="utf-8")
    installer = (ROOT / "scripts" / "install-uv.sh").read_text(encoding="utf-8")
    version = re.search(r"^VERSION=(\S+)$", installer, re.M)
    assert version
    assert f"ARG UV_VERSION={version.group(1)}" in dockerfile
    assert re.search(r"COPY [^\n]*uv\.lock", dockerfile)
    assert "uv export --locked" in dockerfile
    assert "--require-hashes" in dockerfile
