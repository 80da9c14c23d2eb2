"""Live progress across service replicas: two services on one MongoDB database.

Each test starts two services (A and B) over separate MongoStore instances (separate
clients and connection pools) on the same database; watchers on B must see what is
reported through A, through the capped-collection event feed (service/feed.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import statistics
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from jobwire.v1 import event_pb2, job_pb2, job_service_pb2
from service.domain.errors import StorageUnavailable
from service.store.embedded import EmbeddedStore
from service.store.mongo import MongoStore
from tests.conftest import ServiceHandle, make_policy, start_service
from tests.helpers import completed, create, progress, read, read_all, until
from tests.mongo_server import FerretDBProcess, require_ferretdb
from tests.tcp_cutter import TcpCutter

MAX_DELAY = 0.100  # seconds from ReportEvent returning on A to the event arriving on B
EVENTS = 30


async def _pair(uri: str, database: str, **settings: object) -> tuple[ServiceHandle, ServiceHandle]:
    settings.setdefault("event_feed", True)  # start_service turns it off by default
    a = await start_service(MongoStore(uri, policy=make_policy(), database=database), **settings)
    b = await start_service(MongoStore(uri, policy=make_policy(), database=database), **settings)
    return a, b


@pytest.fixture
async def replicas(mongo_uri: str) -> AsyncIterator[tuple[ServiceHandle, ServiceHandle]]:
    a, b = await _pair(mongo_uri, f"x_{uuid.uuid4().hex[:12]}")
    yield a, b
    await b.close()
    await a.close()


async def test_watch_on_b_sees_events_reported_through_a_within_100ms_and_resumes(
    mongo_uri: str,
) -> None:
    # The bound is the mechanism's (feed append + tailable cursor + fan-out). On a
    # shared 2-core box any process may stall past 100 ms, so up to 3 attempts run,
    # each on fresh replicas and a fresh database; one must keep every event under
    # the bound. Every attempt is printed.
    attempts: list[list[float]] = []
    for attempt in range(3):
        a, b = await _pair(mongo_uri, f"x_{uuid.uuid4().hex[:12]}")
        try:
            await create(a.stub, job_id="xr")
            call = b.stub.WatchJob(job_service_pb2.WatchJobRequest(id="xr"))
            assert (await read(call)).snapshot.sequence == 0
            order: list[int] = []
            delays = await _measure(a, b, call, order, start=1)
            attempts.append(delays)
            print(
                f"cross-replica delay, attempt {attempt + 1}, {len(delays)} events: "
                f"p50 {statistics.median(delays) * 1000:.1f} ms, "
                f"max {max(delays) * 1000:.1f} ms"
            )
            assert order == list(range(1, EVENTS + 1))  # in sequence order, each once
            if max(delays) < MAX_DELAY or attempt == 2:
                await _resume_without_gap(a, b, call, order[-1])
                break
            call.cancel()
        finally:
            await b.close()
            await a.close()
    assert max(attempts[-1]) < MAX_DELAY, [sorted(d)[-3:] for d in attempts]
    assert statistics.median(d for ds in attempts for d in ds) < MAX_DELAY / 2


async def _resume_without_gap(a: ServiceHandle, b: ServiceHandle, call: Any, last: int) -> None:
    """Disconnect, report through both replicas, reconnect to B with the last sequence."""
    call.cancel()
    for i in range(last + 1, last + 6):
        stub = a.stub if i % 2 else b.stub
        await stub.ReportEvent(progress("xr", i % 100, key=f"k{i}"))
    resumed = b.stub.WatchJob(job_service_pb2.WatchJobRequest(id="xr", from_sequence=last))
    assert (await read(resumed)).snapshot.sequence == last + 5
    seen = [(await read(resumed)).event.sequence for _ in range(5)]
    await a.stub.ReportEvent(completed("xr"))
    seen += [item.event.sequence for item in await read_all(resumed)]
    assert seen == list(range(last + 1, last + 7))  # no gap, no duplicate, ends at terminal


async def _measure(
    a: ServiceHandle, b: ServiceHandle, call: Any, order: list[int], start: int
) -> list[float]:
    """Reports EVENTS progress events through A; seconds from each ReportEvent
    returning until B's watcher holds the event."""
    delays = []
    for i in range(start, start + EVENTS):
        reply = await a.stub.ReportEvent(progress("xr", i % 100, key=f"k{i}"))
        returned = time.perf_counter()
        item = await read(call, timeout=5)
        delays.append(time.perf_counter() - returned)
        order.append(item.event.sequence)
        assert item.event.sequence == reply.sequence
        await asyncio.sleep(0.005)  # pacing: one event at a time, not a burst
    return delays


async def test_watch_jobs_on_b_sees_each_event_once(
    replicas: tuple[ServiceHandle, ServiceHandle],
) -> None:
    a, b = replicas
    call = b.stub.WatchJobs(job_service_pb2.WatchJobsRequest(kind=job_pb2.JOB_KIND_VIDEO))
    first = asyncio.ensure_future(read(call))
    probes = 0
    while not first.done() and probes < 50:  # live once something arrives
        probes += 1
        await create(a.stub, job_pb2.JOB_KIND_VIDEO, f"probe-{probes}")
        await a.stub.ReportEvent(completed(f"probe-{probes}"))
        await asyncio.wait({first}, timeout=0.2)
    first.result()
    await create(a.stub, job_pb2.JOB_KIND_VIDEO, "v1")
    for i in range(1, 6):
        await (a.stub if i % 2 else b.stub).ReportEvent(progress("v1", i * 10))
    await a.stub.ReportEvent(completed("v1"))
    # Replay the feed on B (as after an outage): entries arrive a second time.
    relay = b.running.jobs.relay
    assert relay is not None
    received: list[event_pb2.JobEvent] = []
    while not received or received[-1].type != event_pb2.EVENT_TYPE_COMPLETED:
        event = (await read(call)).event
        if event.job_id == "v1":
            received.append(event)
    relay._recent.clear()  # forget what the relay saw; WatchJobs must still dedupe
    b.running.jobs.fanout.publish(received)
    await create(a.stub, job_pb2.JOB_KIND_VIDEO, "v2")
    await a.stub.ReportEvent(completed("v2"))
    while (event := (await read(call)).event).job_id != "v2":
        assert event.job_id != "v1", "a repeated event was delivered twice"
    # Reported alternately through A and B, a job's events may interleave on B (B's
    # own are published at once, A's come through the feed); each arrives once.
    assert sorted(e.sequence for e in received) == [1, 2, 3, 4, 5, 6]
    call.cancel()


async def test_lost_feed_entry_is_healed_from_the_ring(mongo_uri: str) -> None:
    a, b = await _pair(mongo_uri, f"x_{uuid.uuid4().hex[:12]}", watch_resync_seconds=0.3)
    try:
        await create(a.stub, job_id="lost")
        call = b.stub.WatchJob(job_service_pb2.WatchJobRequest(id="lost"))
        assert (await read(call)).HasField("snapshot")
        relay = a.running.jobs.relay
        assert relay is not None
        send = relay.send
        relay.send = lambda events: None  # type: ignore[method-assign]  # "crash" before append
        await a.stub.ReportEvent(progress("lost", 10))
        relay.send = send  # type: ignore[method-assign]
        await a.stub.ReportEvent(progress("lost", 20))  # B sees 2 first: a gap, healed
        assert [(await read(call)).event.sequence for _ in range(2)] == [1, 2]
        relay.send = lambda events: None  # type: ignore[method-assign]
        await a.stub.ReportEvent(completed("lost"))  # the terminal entry is lost too
        rest = await read_all(call, timeout=5)  # found by the idle resync
        assert [item.event.sequence for item in rest] == [3]
    finally:
        await b.close()
        await a.close()


async def test_tail_resumes_after_a_mongodb_outage(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="jobwire.feed")
    server = FerretDBProcess(require_ferretdb(), base_dir=tmp_path / "ferretdb")
    server.start()
    try:
        a, b = await _pair(server.uri, "outage")
        try:
            await create(a.stub, job_id="o")
            call = b.stub.WatchJob(job_service_pb2.WatchJobRequest(id="o"))
            assert (await read(call)).HasField("snapshot")
            await a.stub.ReportEvent(progress("o", 1))
            assert (await read(call)).event.sequence == 1
            server.kill()
            # The outage lasts until both replicas' feed tails noticed it (each logs once).
            await until(lambda: _said(caplog, "event feed tail lost") >= 2, timeout=20)
            server.start()
            deadline = time.monotonic() + 20
            while True:  # the stores reconnect by themselves; retry until A answers
                try:
                    await a.stub.ReportEvent(progress("o", 2), timeout=5)
                    break
                except grpc.aio.AioRpcError as err:
                    assert err.code() == grpc.StatusCode.UNAVAILABLE
                    assert time.monotonic() < deadline, "service did not recover"
                    await asyncio.sleep(0.2)  # a retry's pause (deadline above)
            assert (await read(call, timeout=15)).event.sequence == 2
            t0 = time.perf_counter()
            await a.stub.ReportEvent(progress("o", 3))
            assert (await read(call)).event.sequence == 3
            assert time.perf_counter() - t0 < 1.0  # live again through the re-opened tail
            call.cancel()
        finally:
            await b.close()
            await a.close()
    finally:
        server.cleanup()


def _said(caplog: pytest.LogCaptureFixture, words: str) -> int:
    return sum(words in r.getMessage() for r in caplog.records)


async def test_embedded_store_logs_once_that_replicas_do_not_share_progress(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="jobwire.server")
    handle = await start_service(EmbeddedStore(tmp_path / "data", make_policy()))
    try:
        assert handle.running.jobs.relay is None
        notes = [r for r in caplog.records if "not shared across service replicas" in r.message]
        assert len(notes) == 1
    finally:
        await handle.close()


async def test_a_job_made_again_under_a_deleted_id_reaches_the_other_replica_live(
    mongo_uri: str,
) -> None:
    # The relay dropped feed entries it had seen by (job id, sequence): a job made
    # again under a deleted job's id numbers its events from 1 again, so B's watchers
    # got none of them live (WatchJob only at its idle resync, WatchJobs never).
    a, b = await _pair(mongo_uri, f"x_{uuid.uuid4().hex[:12]}", watch_resync_seconds=60)
    try:
        firehose = b.stub.WatchJobs(job_service_pb2.WatchJobsRequest())
        await firehose.initial_metadata()  # live
        await create(a.stub, job_id="again")
        await a.stub.ReportEvent(completed("again"))
        first = b.stub.WatchJob(job_service_pb2.WatchJobRequest(id="again"))
        assert [item.event.sequence for item in (await read_all(first))[1:]] == [1]
        assert (await read(firehose)).event.sequence == 1  # B's relay has seen ("again", 1)
        await a.stub.DeleteJob(job_service_pb2.DeleteJobRequest(id="again"))
        await create(a.stub, job_id="again")
        second = b.stub.WatchJob(job_service_pb2.WatchJobRequest(id="again"))
        assert (await read(second)).snapshot.sequence == 0
        await a.stub.ReportEvent(progress("again", 50))
        assert (await read(second, timeout=5)).event.sequence == 1
        # The deletion first (WatchJobsResponse.deleted), then the new job's event.
        assert (await read(firehose, timeout=5)).deleted.job_id == "again"
        event = (await read(firehose, timeout=5)).event
        assert (event.job_id, event.sequence, event.type) == (
            "again",
            1,
            event_pb2.EVENT_TYPE_PROGRESS,
        )
        second.cancel()
        firehose.cancel()
    finally:
        await b.close()
        await a.close()


@pytest.mark.parametrize("made_again", [False, True])
async def test_a_watch_whose_job_is_deleted_unseen_ends_with_not_found(
    mongo_uri: str, made_again: bool
) -> None:
    # The terminal feed entry is lost and the job deleted before B's idle resync: the
    # ring read found nothing (no job) and the stream waited for ever, resync after
    # resync; a job made again under the id had its events delivered as the old one's.
    # It ends now, NOT_FOUND, as a watch opened now would be.
    a, b = await _pair(mongo_uri, f"x_{uuid.uuid4().hex[:12]}", watch_resync_seconds=0.3)
    try:
        await create(a.stub, job_id="gone")
        call = b.stub.WatchJob(job_service_pb2.WatchJobRequest(id="gone"))
        assert (await read(call)).HasField("snapshot")
        relay = a.running.jobs.relay
        assert relay is not None
        relay.send = lambda events: None  # type: ignore[method-assign]  # entries lost
        await a.stub.ReportEvent(completed("gone"))
        await a.stub.DeleteJob(job_service_pb2.DeleteJobRequest(id="gone"))
        if made_again:
            await create(a.stub, job_id="gone")
            await a.stub.ReportEvent(progress("gone", 5))  # its sequence 1
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await read(call, timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert "gone" in (err.value.details() or "")
    finally:
        await b.close()
        await a.close()


async def test_a_watch_that_gets_its_jobs_deletion_before_its_end_ends_with_not_found(
    mongo_uri: str,
) -> None:
    # The terminal feed entry is lost, the deletion's reaches B: its sequence is the
    # job's last, right after what the watch had, so WatchJob sent it as the job's
    # terminal event (type DELETED, state SUCCEEDED) and ended as if the job had. A
    # deletion is no event of the job: the stream ends NOT_FOUND, as the heal does.
    a, b = await _pair(mongo_uri, f"x_{uuid.uuid4().hex[:12]}", watch_resync_seconds=60)
    try:
        await create(a.stub, job_id="cut")
        call = b.stub.WatchJob(job_service_pb2.WatchJobRequest(id="cut"))
        assert (await read(call)).HasField("snapshot")
        relay = a.running.jobs.relay
        assert relay is not None
        send = relay.send
        relay.send = lambda events: send(  # type: ignore[method-assign]  # the end is lost
            [(e, p) for e, p in events if e.type == event_pb2.EVENT_TYPE_DELETED]
        )
        await a.stub.ReportEvent(completed("cut"))
        await a.stub.DeleteJob(job_service_pb2.DeleteJobRequest(id="cut"))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            got = await read(call, timeout=5)
            pytest.fail(f"the stream went on: {got}")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert "was deleted while watched" in (err.value.details() or "")
    finally:
        await b.close()
        await a.close()


async def test_mongodb_lost_as_the_feed_is_opened_stops_the_start(tmp_path: Path) -> None:
    """MongoDB lost while a starting replica creates its event feed: the start fails
    (`jobwire serve`: "cannot start: MongoDB unavailable (feed)", exit 1, and the
    supervisor starts it again), as when MongoDB is lost a moment earlier. Was: the
    replica logged that live progress is not shared across replicas and ran on
    without the feed and without resyncing its watchers, so a WatchJob on it never saw
    what workers reported through the other replicas, until it was restarted."""
    server = FerretDBProcess(require_ferretdb(), base_dir=tmp_path / "ferretdb")
    server.start()
    cutter = await TcpCutter(server.port).start()
    store = MongoStore(f"mongodb://127.0.0.1:{cutter.port}/", policy=make_policy(), database="f")
    cutter.hold_after = b"\x02create\x00\x05\x00\x00\x00feed\x00"  # its capped collection

    async def cut_when_held() -> None:
        await until(lambda: cutter.hold, timeout=30)
        cutter.cut()

    cutting = asyncio.ensure_future(cut_when_held())
    try:
        with pytest.raises(StorageUnavailable) as failed:
            handle = await start_service(store, event_feed=True)
            await handle.close()
        assert "MongoDB unavailable (feed)" in failed.value.message
        await cutting
    finally:
        cutting.cancel()
        await store.close()
        await cutter.close()
        server.cleanup()


async def test_uploads_of_one_name_through_both_replicas_leave_one_file(
    replicas: tuple[ServiceHandle, ServiceHandle],
) -> None:
    """Uploads of one name through two replicas: each, once stored, deleted the files
    of the name stamped before its own. One stamped earlier but stored after the
    other's look (uploads at once: in 2 of 2 runs of 10 rounds of 8 uploads of up to
    600 KB; or, as here, A's clock ahead of B's, then B's upload) found nothing older
    than itself, and the other had not seen it: both files stayed for good (listed
    once, as the newest; the other's bytes kept until the job was deleted). Within one
    replica the job's artifact lock orders them; replicas do not share it. Now each
    deletes every file of the name but the newest: one stays."""
    a, b = replicas
    store = a.running.store
    assert isinstance(store, MongoStore)
    await create(a.stub, job_id="skewed")
    store._artifact_ns = time.time_ns() + 3600 * 10**9  # A's clock an hour ahead
    await _upload(a.stub, "skewed", b"through A")
    await _upload(b.stub, "skewed", b"through B, after")
    listed = await b.stub.ListArtifacts(job_service_pb2.ListArtifactsRequest(job_id="skewed"))
    stored = [
        f["metadata"]["sha256"] async for f in store.files.find({"metadata.job_id": "skewed"})
    ]
    # The newest by the stamps is the artifact (README "MongoDB"); its file alone stays.
    assert (
        [a.sha256 for a in listed.artifacts] == stored == [hashlib.sha256(b"through A").hexdigest()]
    )


async def _upload(stub: Any, job_id: str, data: bytes) -> None:
    header = job_service_pb2.ArtifactHeader(job_id=job_id, name="a.bin", size=len(data))
    parts = [
        job_service_pb2.UploadArtifactRequest(header=header),
        job_service_pb2.UploadArtifactRequest(data=data),
    ]
    await stub.UploadArtifact(iter(parts))
