"""Watch workers (JOBWIRE_WATCH_WORKERS): more processes serving WatchJob on the
service's port, fed by its commits; every other call passes through them unchanged.

The service runs in this process; its two workers are real processes bound to the same
port (SO_REUSEPORT), so the kernel spreads the test's connections over all three.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jobwire.client import Backoff, Client
from jobwire.v1 import event_pb2, job_pb2, job_service_pb2, job_service_pb2_grpc
from service.store.embedded import EmbeddedStore
from service.store.port import Store
from service.watch_workers import FEED_METHOD
from tests.conftest import ServiceHandle, make_policy, start_service
from tests.helpers import WAIT, completed, progress, read
from tests.test_ops import _self_signed

TOKEN = "watch-workers-test-token"
WORKERS = 2
CONNECTIONS = 18  # P(some process gets none of them) = 3 x (2/3)^18 < 0.2%
AUTH = (("authorization", f"Bearer {TOKEN}"),)


@pytest.fixture
async def service_with_workers(store: Store) -> AsyncIterator[ServiceHandle]:
    handle = await start_service(store, watch_workers=WORKERS, grpc_token=TOKEN)
    await workers_up(handle)
    yield handle
    await handle.close()


async def workers_up(handle: ServiceHandle) -> None:
    """Until every worker holds its feed subscription (it binds the port before it
    opens the feed): connections made earlier would all reach the service itself."""
    fanout = handle.running.jobs.fanout
    deadline = asyncio.get_running_loop().time() + 6 * WAIT
    while fanout.watchers < WORKERS:
        assert asyncio.get_running_loop().time() < deadline, "watch workers did not start"
        await asyncio.sleep(0.02)  # the polling interval of this waiter


async def create(stub: Any) -> job_service_pb2.CreateJobResponse:
    job = job_pb2.Job(kind=job_pb2.JOB_KIND_GENERIC)
    return await stub.CreateJob(job_service_pb2.CreateJobRequest(job=job), metadata=AUTH)


def worker_pids(handle: ServiceHandle) -> list[int]:
    """The running watch worker processes of this service."""
    pids = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read_text().split()
    out = []
    for pid in map(int, pids):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"watch-worker" in cmdline:
            out.append(pid)
    return out


@contextlib.asynccontextmanager
async def own_connections(handle: ServiceHandle, n: int) -> AsyncIterator[list[grpc.aio.Channel]]:
    """`n` channels, each its own TCP connection (so landing on any process), closed after."""
    own = [("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.insecure_channel(handle.target, options=own) for _ in range(n)]
    try:
        yield channels
    finally:
        for ch in channels:
            await ch.close()


async def until_serving(stubs: list[Any], job_id: str) -> None:
    """Until a WatchJob on every connection gets its snapshot: each worker answers
    UNAVAILABLE until its feed from the service is open."""

    async def one(stub: Any) -> None:
        while True:
            call = stub.WatchJob(job_service_pb2.WatchJobRequest(id=job_id), metadata=AUTH)
            try:
                item = await read(call)
                assert item.HasField("snapshot")
                return
            except grpc.aio.AioRpcError as err:
                assert err.code() == grpc.StatusCode.UNAVAILABLE, err
                await asyncio.sleep(0.05)  # a retry's pause, not a wait for an event
            finally:
                call.cancel()

    await asyncio.wait_for(asyncio.gather(*(one(s) for s in stubs)), 6 * WAIT)


@contextlib.asynccontextmanager
async def watching_on_own_connections(svc: ServiceHandle, job_id: str) -> AsyncIterator[list[Any]]:
    """A WatchJob of `job_id` on each of CONNECTIONS connections (spread over the
    service and its workers), each past its snapshot."""
    async with own_connections(svc, CONNECTIONS) as channels:
        stubs = [job_service_pb2_grpc.JobServiceStub(ch) for ch in channels]
        await until_serving(stubs, job_id)
        calls = [
            s.WatchJob(job_service_pb2.WatchJobRequest(id=job_id), metadata=AUTH) for s in stubs
        ]
        for call in calls:
            assert (await read(call)).HasField("snapshot")
        yield calls


async def test_every_stream_on_every_process_sees_every_event_in_order(
    service_with_workers: ServiceHandle,
) -> None:
    svc = service_with_workers
    stub = svc.stub
    assert len(worker_pids(svc)) == WORKERS
    job = (await create(stub)).job
    async with watching_on_own_connections(svc, job.id) as calls:
        # The service holds only its own share of the streams (+1 feed per worker).
        assert svc.running.jobs.fanout.watchers - WORKERS < CONNECTIONS

        for k in range(5):
            await stub.ReportEvent(progress(job.id, 10 * k, message=f"step {k}"), metadata=AUTH)
        await stub.ReportEvent(completed(job.id), metadata=AUTH)
        for call in calls:
            events = []
            while (item := await read(call)) is not grpc.aio.EOF:
                events.append(item.event)
            assert [e.sequence for e in events] == list(range(job.sequence + 1, job.sequence + 7))
            assert [e.progress.message for e in events[:5]] == [f"step {k}" for k in range(5)]
            assert events[-1].state == job_pb2.JOB_STATE_SUCCEEDED


async def test_other_calls_pass_through_a_worker_unchanged(
    service_with_workers: ServiceHandle,
) -> None:
    svc = service_with_workers
    job = (await create(svc.stub)).job
    async with own_connections(svc, CONNECTIONS) as channels:
        for ch in channels:
            stub = job_service_pb2_grpc.JobServiceStub(ch)
            got = await stub.GetJob(job_service_pb2.GetJobRequest(id=job.id), metadata=AUTH)
            assert got.id == job.id
            # Errors come back with their code and details.
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await stub.GetJob(job_service_pb2.GetJobRequest(id="no-such-job"), metadata=AUTH)
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND
            assert "no-such-job" in (missing.value.details() or "")
            # The token is checked wherever the connection lands.
            with pytest.raises(grpc.aio.AioRpcError) as unauth:
                await stub.GetJob(job_service_pb2.GetJobRequest(id=job.id))
            assert unauth.value.code() == grpc.StatusCode.UNAUTHENTICATED
            # A client stream and a server stream, through whichever process.
            name = f"a-{id(ch)}.txt"
            header = job_service_pb2.ArtifactHeader(job_id=job.id, name=name)
            chunks = [
                job_service_pb2.UploadArtifactRequest(header=header),
                job_service_pb2.UploadArtifactRequest(data=b"hello "),
                job_service_pb2.UploadArtifactRequest(data=b"workers"),
            ]
            stored = await stub.UploadArtifact(iter(chunks), metadata=AUTH)
            assert stored.size_bytes == len(b"hello workers")
            read_back = stub.ReadArtifact(
                job_service_pb2.ReadArtifactRequest(job_id=job.id, name=name), metadata=AUTH
            )
            data = b"".join([r.data async for r in read_back])
            assert data == b"hello workers"
            # WatchJobs says it is live in its headers, before any event, through a
            # worker too (the dashboard's jobs pages wait for them).
            firehose = stub.WatchJobs(job_service_pb2.WatchJobsRequest(), metadata=AUTH)
            headers = dict(list(await asyncio.wait_for(firehose.initial_metadata(), WAIT)))
            assert headers.get("jobwire-live") == "1" and headers.get("jobwire-position")
            firehose.cancel()
            # A WatchJob request protobuf cannot parse, wherever it lands: a caller's
            # mistake (INVALID_ARGUMENT), not UNKNOWN.
            garbage = ch.unary_stream(
                "/jobwire.v1.JobService/WatchJob",
                request_serializer=lambda b: b,
                response_deserializer=lambda b: b,
            )(b"\xff\xff\xff\xff", metadata=AUTH)
            with pytest.raises(grpc.aio.AioRpcError) as bad:
                await read(garbage)
            assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad.value


async def test_every_process_reports_serving_once_its_feed_is_open(
    service_with_workers: ServiceHandle,
) -> None:
    job = (await create(service_with_workers.stub)).job
    async with own_connections(service_with_workers, CONNECTIONS) as channels:
        await until_serving([job_service_pb2_grpc.JobServiceStub(c) for c in channels], job.id)
        for ch in channels:
            reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_the_feed_is_not_served_over_tcp(service_with_workers: ServiceHandle) -> None:
    codes = []
    async with own_connections(service_with_workers, CONNECTIONS) as channels:
        for ch in channels:
            feed: Any = ch.unary_stream(FEED_METHOD)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in feed(b"", metadata=AUTH):
                    pass
            codes.append(err.value.code())
    # The service refuses it; a worker does not even have the method.
    assert set(codes) <= {grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNIMPLEMENTED}
    assert grpc.StatusCode.PERMISSION_DENIED in codes


async def report(stub: Any, request: job_service_pb2.ReportEventRequest) -> None:
    """ReportEvent, again after UNAVAILABLE: the connection may have been to the worker
    just killed, and the event's idempotency key makes a repeat harmless."""
    deadline = asyncio.get_running_loop().time() + WAIT
    while True:
        try:
            await stub.ReportEvent(request, metadata=AUTH, timeout=WAIT)
            return
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            assert asyncio.get_running_loop().time() < deadline, err
            await asyncio.sleep(0.05)  # a retry's pause, not a wait for an event


async def test_a_killed_worker_is_restarted_and_its_watchers_resume_without_a_gap(
    service_with_workers: ServiceHandle,
) -> None:
    svc = service_with_workers
    job = (await create(svc.stub)).job
    own = [("grpc.use_local_subchannel_pool", 1)]
    backoff = Backoff(initial=0.05, maximum=0.5)
    clients = [
        Client(svc.target, token=TOKEN, options=own, watch_backoff=backoff)
        for _ in range(CONNECTIONS)
    ]
    await until_serving([c._stub for c in clients], job.id)
    seen: list[list[int]] = [[] for _ in clients]
    first: list[asyncio.Event] = [asyncio.Event() for _ in clients]

    async def watch(i: int) -> None:
        async for item in clients[i].watch_job(job.id):
            if isinstance(item, event_pb2.JobEvent):
                seen[i].append(item.sequence)
                first[i].set()

    tasks = [asyncio.create_task(watch(i)) for i in range(len(clients))]
    try:
        await svc.stub.ReportEvent(progress(job.id, 1, message="before"), metadata=AUTH)
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in first)), WAIT)
        victim = worker_pids(svc)[0]
        os.kill(victim, signal.SIGKILL)
        for k in range(4):
            await report(svc.stub, progress(job.id, 20 + k, message=f"after {k}"))
        await report(svc.stub, completed(job.id))
        await asyncio.wait_for(asyncio.gather(*tasks), 6 * WAIT)
        for sequences in seen:
            # No gap, no duplicate.
            assert sequences == list(range(job.sequence + 1, job.sequence + 7))
        deadline = asyncio.get_running_loop().time() + 6 * WAIT
        while victim in worker_pids(svc) or len(worker_pids(svc)) < WORKERS:
            assert asyncio.get_running_loop().time() < deadline, "worker not restarted"
            await asyncio.sleep(0.05)  # polling interval (deadline above)
    finally:
        for t in tasks:
            t.cancel()
        for c in clients:
            await c.close()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("65", "JOBWIRE_WATCH_WORKERS must be at most 64, got 65"),
        ("-1", "JOBWIRE_WATCH_WORKERS must be a whole number >= 0"),
        ("two", "JOBWIRE_WATCH_WORKERS must be a whole number >= 0 and <= 1000000000, got 'two'"),
    ],
)
def test_a_bad_worker_count_is_refused_by_name(
    raw: str, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.config import Settings

    monkeypatch.setenv("JOBWIRE_WATCH_WORKERS", raw)
    with pytest.raises(SystemExit) as exc:
        Settings.from_env()
    assert message in str(exc.value)


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:  # a zombie has exited: it only waits for its parent (here: init) to reap it
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


async def test_workers_do_not_outlive_a_killed_service(tmp_path: Path) -> None:
    env = dict(
        os.environ,
        JOBWIRE_GRPC_ADDR="127.0.0.1:0",
        JOBWIRE_DATA_DIR=str(tmp_path),
        JOBWIRE_METRICS_ADDR="",
        JOBWIRE_WATCH_WORKERS="2",
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli", "serve", env=env, stderr=asyncio.subprocess.PIPE
    )
    assert proc.stderr is not None
    workers: list[int] = []
    try:
        serving = 0
        while serving < WORKERS:  # each worker logs once it is up (and bound to us)
            line = await asyncio.wait_for(proc.stderr.readline(), 6 * WAIT)
            assert line, "the service exited"
            serving += b"watch worker" in line and b"serving on" in line
        workers = _children(proc.pid)
        assert len(workers) == WORKERS
        proc.kill()  # SIGKILL: the service cannot stop them itself
        # Not proc.wait(): it also waits for the stderr pipe, which a surviving worker
        # would hold open.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 2 * WAIT
        while _alive(proc.pid) or any(_alive(w) for w in workers):
            assert loop.time() < deadline, "a watch worker outlived its service"
            await asyncio.sleep(0.05)  # polling interval (deadline above)
    finally:
        for pid in [proc.pid, *workers]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        await proc.wait()


async def test_workers_serve_tls_like_the_service(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    handle = await start_service(
        EmbeddedStore(tmp_path / "d", make_policy()),
        watch_workers=WORKERS,
        grpc_tls_cert=str(cert),
        grpc_tls_key=str(key),
    )
    await workers_up(handle)
    creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    own = [("grpc.use_local_subchannel_pool", 1), ("grpc.ssl_target_name_override", "localhost")]
    channels = [grpc.aio.secure_channel(handle.target, creds, options=own) for _ in range(12)]
    try:
        stubs = [job_service_pb2_grpc.JobServiceStub(ch) for ch in channels]
        job = (await create(stubs[0])).job
        await until_serving(stubs, job.id)  # a WatchJob over TLS on every connection
        for stub in stubs:  # and a call passed through, wherever it lands
            assert (await stub.GetJob(job_service_pb2.GetJobRequest(id=job.id))).id == job.id
        plain = job_service_pb2_grpc.JobServiceStub(handle.channel)  # no TLS: refused
        with pytest.raises(grpc.aio.AioRpcError):
            await plain.GetJob(job_service_pb2.GetJobRequest(id=job.id), timeout=2)
    finally:
        for ch in channels:
            await ch.close()
        await handle.close()


async def test_worker_streams_heal_an_entry_lost_between_replicas_as_the_service_does(
    mongo_uri: str,
) -> None:
    """Replica A's feed entry of a job's end is lost; B runs watch workers. B's own
    streams find the end in the ring after JOBWIRE_WATCH_RESYNC_SECONDS: so must the
    streams its workers hold. Theirs waited for ever (a worker never resynced)."""
    from service.store.mongo import MongoStore

    database = f"w_{uuid.uuid4().hex[:12]}"
    a, b = [
        await start_service(
            MongoStore(mongo_uri, policy=make_policy(), database=database),
            event_feed=True,
            watch_resync_seconds=0.3,
            **extra,
        )
        for extra in ({}, {"watch_workers": WORKERS, "grpc_token": TOKEN})
    ]
    try:
        await workers_up(b)
        job = (await create(b.stub)).job
        async with watching_on_own_connections(b, job.id) as calls:
            relay = a.running.jobs.relay
            assert relay is not None
            relay.send = lambda events: None  # type: ignore[method-assign]  # entries lost
            await a.stub.ReportEvent(completed(job.id))
            for call in calls:
                event = (await read(call, timeout=5)).event
                assert event.state == job_pb2.JOB_STATE_SUCCEEDED
                assert await read(call) is grpc.aio.EOF
    finally:
        await b.close()
        await a.close()
