"""Shared fixtures: real stores, a real gRPC server on a loopback port, a real channel.

Store-backed fixtures are parametrised over both adapters, so every storage and
service test runs unchanged against the embedded store and against MongoDB
(FerretDB unless MONGODB_URI names another server).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from jobwire.v1 import job_service_pb2_grpc
from service.config import Settings
from service.domain.records import Policy
from service.server import RunningService, start
from service.store.embedded import EmbeddedStore
from service.store.port import Store
from tests.mongo_server import mongo_uri  # noqa: F401  (session fixture)

STORE_KINDS = ["embedded", "mongo"]


def make_policy() -> Policy:
    return Policy(retention=16, lease_ns=60 * 10**9, max_attempts=3)


async def open_test_store(
    kind: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    policy: Policy,
    database: str = "",
) -> Store:
    """A fresh store; the same `tmp_path` (embedded) or `database` (mongo) reopens one."""
    if kind == "embedded":
        return EmbeddedStore(tmp_path / "data", policy)
    from service.store.mongo import MongoStore

    uri = request.getfixturevalue("mongo_uri")
    return MongoStore(uri, policy=policy, database=database or f"t_{uuid.uuid4().hex[:12]}")


@pytest.fixture(params=STORE_KINDS)
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def store(
    store_kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[Store]:
    s = await open_test_store(store_kind, tmp_path, request, make_policy())
    await s.start()
    yield s
    await s.close()


@dataclass
class ServiceHandle:
    running: RunningService
    target: str
    channel: grpc.aio.Channel
    stub: job_service_pb2_grpc.JobServiceAsyncStub

    async def close(self) -> None:
        await self.channel.close()
        await self.running.stop(grace=1.0)


async def start_service(store: Store, **settings: object) -> ServiceHandle:
    settings.setdefault("grpc_addr", "127.0.0.1:0")
    # One service per test, alone on its database: no metrics port to collide on and
    # no cross-replica feed (tests/test_cross_replica.py turns it on).
    settings.setdefault("metrics_addr", "")
    settings.setdefault("event_feed", False)
    config = Settings(**settings)  # type: ignore[arg-type]
    running = await start(config, store=store)
    target = f"127.0.0.1:{running.port}"
    channel = grpc.aio.insecure_channel(target)
    return ServiceHandle(running, target, channel, job_service_pb2_grpc.JobServiceStub(channel))


@pytest.fixture
async def service(
    store_kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[ServiceHandle]:
    """The real gRPC service on a free loopback port, over each store."""
    s = await open_test_store(store_kind, tmp_path, request, make_policy())
    handle = await start_service(s, lease_sweep_seconds=0.05, event_retention=16)
    yield handle
    await handle.close()


@pytest.fixture(scope="session")
async def grpc_service(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ServiceHandle]:
    """One service over the embedded store for the whole session (bridge tests)."""
    data = tmp_path_factory.mktemp("grpc_service")
    handle = await start_service(EmbeddedStore(data, make_policy()), lease_sweep_seconds=0.05)
    yield handle
    await handle.close()
