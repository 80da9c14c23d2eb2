"""Two service processes on one MongoDB database: live progress crosses them.

The same contract as tests/test_cross_replica.py, but with the replicas as separate
OS processes started like production (`python -m cli serve`, configured only by
the environment), so nothing is shared but the database.
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jobwire.v1 import job_service_pb2, job_service_pb2_grpc
from tests.helpers import WAIT, completed, create, free_port, progress, read, read_all

# From ReportEvent returning on A to the event arriving on B. Far below the 10 s resync
# (so the event came through the feed, not the ring heal), far above the ~20 ms measured
# on a quiet machine: the figure itself belongs to bench/, and a shared 2-core machine
# showed 150 ms maxima under load.
MAX_DELAY = 1.0
EVENTS = 20


@dataclass
class Replica:
    proc: asyncio.subprocess.Process
    channel: grpc.aio.Channel
    stub: job_service_pb2_grpc.JobServiceAsyncStub


async def _replica(uri: str, database: str, data: Path) -> Replica:
    port = free_port()
    env = dict(
        os.environ,
        MONGODB_URI=uri,
        JOBWIRE_MONGODB_DB=database,
        JOBWIRE_GRPC_ADDR=f"127.0.0.1:{port}",
        JOBWIRE_METRICS_ADDR="127.0.0.1:0",
        JOBWIRE_EVENT_FEED="1",
        JOBWIRE_DATA_DIR=str(data),
        JOBWIRE_LOG_FORMAT="text",
    )
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "cli", "serve", env=env)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + 30
    while True:  # ready once its health service says SERVING
        try:
            reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=2)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                break
        except grpc.aio.AioRpcError:
            pass
        assert proc.returncode is None, "service process exited during start-up"
        assert time.monotonic() < deadline, "service process did not become healthy"
        await asyncio.sleep(0.1)  # polling a process that is starting, not a sync point
    return Replica(proc, channel, job_service_pb2_grpc.JobServiceStub(channel))


async def _stop(replica: Replica) -> int:
    await replica.channel.close()
    if replica.proc.returncode is None:
        replica.proc.send_signal(signal.SIGTERM)
    return await asyncio.wait_for(replica.proc.wait(), WAIT)


@pytest.fixture
async def pair(mongo_uri: str, tmp_path: Path) -> AsyncIterator[tuple[Replica, Replica]]:
    database = f"proc_{uuid.uuid4().hex[:12]}"
    a = await _replica(mongo_uri, database, tmp_path / "a")
    b = await _replica(mongo_uri, database, tmp_path / "b")
    yield a, b
    assert await _stop(b) == 0
    assert await _stop(a) == 0


async def test_two_processes_share_live_progress_and_resume(
    pair: tuple[Replica, Replica],
) -> None:
    a, b = pair
    attempts: list[list[float]] = []
    for attempt in range(3):  # a shared 2-core box may stall any process; see the other test
        job_id = f"xp{attempt}"
        await create(a.stub, job_id=job_id)
        call = b.stub.WatchJob(job_service_pb2.WatchJobRequest(id=job_id))
        assert (await read(call)).snapshot.sequence == 0
        delays, order = [], []
        for i in range(1, EVENTS + 1):
            reply = await a.stub.ReportEvent(progress(job_id, i, key=f"k{i}"))
            returned = time.perf_counter()
            item = await read(call, timeout=5)
            delays.append(time.perf_counter() - returned)
            order.append(item.event.sequence)
            assert item.event.sequence == reply.sequence
        attempts.append(delays)
        print(
            f"two processes, attempt {attempt + 1}: p50 {statistics.median(delays) * 1000:.1f} ms,"
            f" max {max(delays) * 1000:.1f} ms"
        )
        assert order == list(range(1, EVENTS + 1))
        if max(delays) < MAX_DELAY or attempt == 2:
            break
        call.cancel()
    assert max(attempts[-1]) < MAX_DELAY, [sorted(d)[-3:] for d in attempts]

    # Disconnect, keep reporting through A, reconnect to B: no gap, no duplicate.
    call.cancel()
    for i in range(EVENTS + 1, EVENTS + 4):
        await a.stub.ReportEvent(progress(job_id, i, key=f"k{i}"))
    resumed = b.stub.WatchJob(job_service_pb2.WatchJobRequest(id=job_id, from_sequence=EVENTS))
    assert (await read(resumed)).snapshot.sequence == EVENTS + 3
    await a.stub.ReportEvent(completed(job_id))
    seen = [item.event.sequence for item in await read_all(resumed)]
    assert seen == list(range(EVENTS + 1, EVENTS + 5))
