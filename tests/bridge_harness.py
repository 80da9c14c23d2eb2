"""The real HTTP bridge on a free loopback port, in front of the real service.

Test modules import the fixtures they use from here (pytest collects imported
fixtures), so conftest.py stays the lead's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from http_bridge.app import create_app
from http_bridge.config import Config
from http_bridge.connection_guard import guarded_site, runner_options
from jobwire.v1 import job_pb2, job_service_pb2
from tests.helpers import sample_video

# The contract example's own secret, so its examples can be sent verbatim.
BATCH_SECRET = "dein-geheimer-schlüssel"
API_KEY = "test-api-key"
TRANSCODE_TOKEN = "test-transcode-token"

TEST_CONFIG = Config(
    http_host="127.0.0.1",
    http_port=0,
    batch_callback_secret=BATCH_SECRET,
    api_key=API_KEY,
    transcode_callback_token=TRANSCODE_TOKEN,
    retry_after_seconds=7,
    rpc_timeout_seconds=10.0,
)
VIDEO_AUTH = {"Authorization": f"Bearer {API_KEY}"}


@dataclass
class Bridge:
    url: str
    http: aiohttp.ClientSession
    runner: web.AppRunner

    async def post(self, path: str, body: Any = None, **kwargs: Any) -> tuple[int, Any]:
        async with self.http.post(self.url + path, json=body, **kwargs) as resp:
            return resp.status, await _body(resp)

    async def post_raw(self, path: str, data: bytes, **kwargs: Any) -> tuple[int, Any]:
        headers = {"Content-Type": "application/json", **kwargs.pop("headers", {})}
        async with self.http.post(self.url + path, data=data, headers=headers, **kwargs) as resp:
            return resp.status, await _body(resp)

    async def get(self, path: str, **kwargs: Any) -> tuple[int, Any]:
        async with self.http.get(self.url + path, **kwargs) as resp:
            return resp.status, await _body(resp)


async def _body(resp: aiohttp.ClientResponse) -> Any:
    raw = await resp.read()
    if resp.content_type == "application/json" and raw:
        return await resp.json()
    return raw


@contextlib.asynccontextmanager
async def running_bridge(config: Config) -> AsyncIterator[Bridge]:
    runner = web.AppRunner(create_app(config), **runner_options(config))
    await runner.setup()
    site = guarded_site(runner, dataclasses.replace(config, http_host="127.0.0.1", http_port=0))
    await site.start()
    host, port = runner.addresses[0][:2]
    async with aiohttp.ClientSession() as http:
        try:
            yield Bridge(f"http://{host}:{port}", http, runner)
        finally:
            await runner.cleanup()


@pytest.fixture(scope="session")
async def bridge(grpc_service: Any) -> AsyncIterator[Bridge]:
    config = dataclasses.replace(TEST_CONFIG, service_target=grpc_service.target)
    async with running_bridge(config) as b:
        yield b


@pytest.fixture(scope="session")
def stub(grpc_service: Any) -> Any:
    return grpc_service.stub


def new_id(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


async def create_job(
    stub: Any,
    kind: job_pb2.JobKind.ValueType,
    job_id: str = "",
    video: job_pb2.Video | None = None,
) -> job_service_pb2.CreateJobResponse:
    """A job of `kind`; a VIDEO job without `video` gets a test video URL, which
    CreateJob requires of one."""
    job = job_pb2.Job(kind=kind)
    if video is None and kind == job_pb2.JOB_KIND_VIDEO:
        video = sample_video(job_id)
    if video is not None:
        job.video.CopyFrom(video)
    return await stub.CreateJob(job_service_pb2.CreateJobRequest(job=job, job_id=job_id))


async def get_job(stub: Any, job_id: str) -> job_pb2.Job:
    return await stub.GetJob(job_service_pb2.GetJobRequest(id=job_id))


@contextlib.asynccontextmanager
async def fresh_stack(tmp_path: Any) -> AsyncIterator[tuple[Bridge, Any]]:
    """A bridge on its own new service: for examples whose fixed ids must be unused."""
    from service.store.embedded import EmbeddedStore
    from tests.conftest import make_policy, start_service

    handle = await start_service(EmbeddedStore(tmp_path / "data", make_policy()))
    try:
        config = dataclasses.replace(TEST_CONFIG, service_target=handle.target)
        async with running_bridge(config) as b:
            yield b, handle.stub
    finally:
        await handle.close()
