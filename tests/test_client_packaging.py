"""jobwire.client is part of the installed `jobwire` distribution: importable from the
editable install and from a built wheel, with py.typed, outside the checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULES = ["__init__", "artifacts", "channel", "client", "errors", "retry", "watch"]
PROBE = "import jobwire.client as c, jobwire.v1.job_pb2 as j; print(c.__file__); c.Client"
# A user's module, as `mypy --strict` sees it with the wheel installed: the client's
# replies are typed protobuf messages (a misspelt field is an error), not Any.
USER = """
from jobwire.client import Client, Job
from jobwire.v1 import job_pb2

async def use(client: Client) -> str:
    created = await client.create_job(job_pb2.JOB_KIND_GENERIC)
    async for item in client.watch_job(created.job.id):
        if isinstance(item, Job):
            return item.id
    return created.callback_url
"""
MISSPELT = "\nasync def typo(client: Client) -> str:\n    return (await client.get_job('x')).idd\n"


def _source_roots() -> set[str]:
    """The top-level folders [tool.setuptools] builds packages from."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    package_dir: dict[str, str] = setuptools.get("package-dir", {})
    roots = set()
    for package in setuptools["packages"]:
        parts = package.split(".")
        for n in range(len(parts), 0, -1):
            if ".".join(parts[:n]) in package_dir:
                roots.add(Path(package_dir[".".join(parts[:n])]).parts[0])
                break
        else:
            roots.add(parts[0])
    return roots


def _python(code: str, cwd: Path, pythonpath: str = "") -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_editable_install_imports_jobwire_client_outside_the_checkout(tmp_path: Path) -> None:
    where = Path(_python(PROBE, cwd=tmp_path))
    assert where.resolve() == (ROOT / "client" / "__init__.py").resolve()


def test_wheel_ships_jobwire_client_with_py_typed(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "node_modules", ".mypy_cache")
    for root in _source_roots():
        shutil.copytree(ROOT / root, source / root, symlinks=True, ignore=skip)
    out = tmp_path / "wheel"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(out), str(source)],
        cwd=tmp_path, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = out.glob("jobwire-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    ours = sorted(n for n in names if n.startswith("jobwire/client/"))
    assert ours == sorted([*(f"jobwire/client/{m}.py" for m in MODULES), "jobwire/client/py.typed"])
    assert len(names) == len(set(names))
    assert not any(n.startswith(("client/", "proto/")) for n in names)
    unpacked = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(unpacked)
    where = Path(_python(PROBE, cwd=tmp_path, pythonpath=str(unpacked)))
    assert where == unpacked / "jobwire" / "client" / "__init__.py"
    _mypy_as_a_user(wheel, tmp_path / "user")
    assert "jobwire/v1/py.typed" in names


def _mypy_as_a_user(wheel: Path, where: Path) -> None:
    """`mypy --strict` on a user's module, in a fresh environment with the wheel
    installed beside the dependencies (found through a .pth: no editable finder)."""
    env_dir = where / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    python = env_dir / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    zipfile.ZipFile(wheel).extractall(site)
    (Path(site) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    (where / "good.py").write_text(USER)
    (where / "typo.py").write_text(USER + MISSPELT)
    results = {}
    for name in ("good.py", "typo.py"):
        done = subprocess.run(
            [sys.executable, "-m", "mypy", "--strict", "--no-incremental",
             "--python-executable", str(python), name],
            cwd=where, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        results[name] = (done.returncode, done.stdout)
    assert results["good.py"][0] == 0, results["good.py"][1]
    assert results["typo.py"][0] == 1 and '"Job" has no attribute "idd"' in results["typo.py"][1]
