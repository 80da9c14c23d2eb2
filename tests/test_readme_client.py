"""The README's `jobwire.client` snippet ("Using jobwire from your service"), as written:
run against a real service with TLS and a token (only its address is replaced), and
checked by `mypy --strict` the way a user's module would be."""

from __future__ import annotations

import asyncio
import re
import textwrap
from pathlib import Path
from typing import Any

import mypy.api
import pytest

from jobwire.client import TLS, Client, Job, JobEvent, StreamGap
from jobwire.v1 import event_pb2, job_pb2
from service.store.embedded import EmbeddedStore
from tests.conftest import make_policy, start_service
from tests.helpers import WAIT, sample_video
from tests.test_ops import _self_signed

ROOT = Path(__file__).resolve().parent.parent
ADDRESS = "jobwire.internal:50051"  # the snippet's; replaced by the test service's
TOKEN = "readme-snippet-token"
# What the snippet leaves to its reader, declared for mypy.
PLACEHOLDERS = """
from jobwire.client import Job, JobEvent, StreamGap
TOKEN = "t"
def hand_to_worker(url: str, token: str) -> None: ...
def show(job: Job) -> None: ...
def rebuild_from_next(gap: StreamGap) -> None: ...
def apply(event: JobEvent) -> None: ...
"""


def client_snippet() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("<!-- section:client") : readme.index("<!-- /section:client")]
    (block,) = re.findall(r"```python\n(.*?)```", section, re.S)
    assert ADDRESS in block
    return block


def as_function(block: str, name: str = "snippet") -> str:
    """The snippet (top-level `async with`, as in an asyncio REPL) as a coroutine."""
    return f"async def {name}() -> None:\n" + textwrap.indent(block, "    ")


async def test_readme_client_snippet_runs_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = _self_signed(tmp_path)
    handle = await start_service(
        EmbeddedStore(tmp_path / "d", make_policy()),
        grpc_tls_cert=str(cert),
        grpc_tls_key=str(key),
        grpc_token=TOKEN,
        public_url="https://bridge.example.invalid",
    )
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ca.pem").write_bytes(cert.read_bytes())  # TLS(ca="ca.pem")
    (tmp_path / "manifest.txt").write_text("frames: 3\n")
    seen: list[Any] = []
    workers: list[asyncio.Task[None]] = []

    async with Client(handle.target, token=TOKEN, tls=TLS(ca=cert)) as setup:
        await setup.create_job("VIDEO", job_id="queued-video", video=sample_video("queued"))

        async def worker(url: str, callback_token: str) -> None:
            """The external worker: reports with the job's own token, then finishes."""
            job_id = url.rsplit("/", 1)[-1]
            await setup.report_progress(job_id, 50, callback_token=callback_token)
            await setup.complete(job_id, output_key="text.md", callback_token=callback_token)

        def hand_to_worker(url: str, callback_token: str) -> None:
            seen.append(("handed", url))
            workers.append(asyncio.ensure_future(worker(url, callback_token)))

        namespace: dict[str, Any] = {
            "TOKEN": TOKEN,
            "hand_to_worker": hand_to_worker,
            "show": lambda job: seen.append(("show", job)),
            "rebuild_from_next": lambda gap: seen.append(("gap", gap)),
            "apply": lambda event: seen.append(("apply", event)),
        }
        code = as_function(client_snippet().replace(ADDRESS, handle.target))
        try:
            exec(compile(code, "README.md", "exec"), namespace)
            await asyncio.wait_for(namespace["snippet"](), WAIT)
            await asyncio.gather(*workers)
            video = await setup.get_job("queued-video")
            artifacts = await setup.list_artifacts("queued-video")
        finally:
            await handle.close()
    handed, snapshot, *applied = seen
    assert handed[0] == "handed" and handed[1].startswith("https://bridge.example.invalid/")
    assert snapshot[0] == "show" and isinstance(snapshot[1], Job)
    events = [item for what, item in applied if what == "apply"]
    assert all(isinstance(e, JobEvent) for e in events) and not any(
        isinstance(item, StreamGap) for _, item in applied
    )
    assert [e.type for e in events] == [
        event_pb2.EVENT_TYPE_PROGRESS,
        event_pb2.EVENT_TYPE_COMPLETED,
    ]
    assert video.state == job_pb2.JOB_STATE_SUCCEEDED and video.result.output_key == "videos/x.mp4"
    assert video.progress.media_duration.seconds == 180
    assert [a.name for a in artifacts] == ["manifest.txt"]


def test_readme_client_snippet_passes_mypy_strict(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)  # the config's mypy_path is relative to it
    user = tmp_path / "user.py"
    user.write_text(PLACEHOLDERS + "\n\n" + as_function(client_snippet()))
    out, err, status = mypy.api.run(
        [
            "--strict",
            "--config-file", str(ROOT / "pyproject.toml"),
            "--cache-dir", str(tmp_path / "cache"),
            str(user),
        ]
    )  # fmt: skip
    assert status == 0, out + err
