"""Deleting ended jobs: JOBWIRE_JOB_RETENTION's sweep and DeleteJob (both stores).

A deleted job goes with its retained events, its log lines and its artifacts, the
artifacts' bytes too (files on disk, GridFS chunks); a job that has not ended is
never deleted, however old; a job that ended recently is kept. Real services on
loopback; the sweep runs every 50 ms, and the tests wait on completed sweeps, not time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path

import grpc
import pytest
from bson import Binary
from prometheus_client import REGISTRY

from jobwire.v1 import artifact_pb2, job_pb2, job_service_pb2, log_pb2
from service.domain import events
from service.domain.records import Applied, JobCommand, Policy, Report
from service.retention import Retention
from service.store.embedded import EmbeddedStore
from service.store.mongo import DELETIONS, MongoStore
from service.store.port import Store
from tests.bridge_harness import (
    BATCH_SECRET,
    TEST_CONFIG,
    TRANSCODE_TOKEN,
    VIDEO_AUTH,
    Bridge,
    create_job,
    running_bridge,
)
from tests.conftest import ServiceHandle, make_policy, open_test_store, start_service
from tests.helpers import WAIT, completed, create, eventually, failed, progress, until
from tests.mongo_server import FerretDBProcess, require_ferretdb
from tests.tcp_cutter import TcpCutter

QUEUED, RUNNING = job_pb2.JOB_STATE_QUEUED, job_pb2.JOB_STATE_RUNNING
GENERIC = job_pb2.JOB_KIND_GENERIC
RETENTION_S = 2.0
MiB = 1024 * 1024
CONTENT = bytes(range(256)) * (10 * 1024)  # 2.5 MiB: three chunks


async def _gone(service: ServiceHandle, job_id: str) -> bool:
    return not await _exists(service, job_id)


def _swept_after(sweeps: Retention, low_ns: float, high_ns: float = float("inf")) -> bool:
    """A sweep that began between the two clock times has completed."""
    return any(low_ns < began < high_ns for began in sweeps.swept)


async def _exists(service: ServiceHandle, job_id: str) -> bool:
    try:
        await service.stub.GetJob(job_service_pb2.GetJobRequest(id=job_id))
    except grpc.aio.AioRpcError as err:
        assert err.code() == grpc.StatusCode.NOT_FOUND, err
        return False
    return True


async def _upload(service: ServiceHandle, job_id: str, name: str, data: bytes) -> None:
    async def parts() -> AsyncIterator[job_service_pb2.UploadArtifactRequest]:
        header = job_service_pb2.ArtifactHeader(job_id=job_id, name=name, size=len(data))
        yield job_service_pb2.UploadArtifactRequest(header=header)
        for start in range(0, len(data), MiB):
            yield job_service_pb2.UploadArtifactRequest(data=data[start : start + MiB])

    await service.stub.UploadArtifact(parts())


async def _log(service: ServiceHandle, job_id: str, message: str, at_ns: int = 0) -> None:
    entry = log_pb2.LogEntry(job_id=job_id, level=log_pb2.LOG_LEVEL_INFO, message=message)
    if at_ns:
        entry.time.FromNanoseconds(at_ns)
    await service.stub.WriteLog(job_service_pb2.WriteLogRequest(entry=entry))


async def _logs(service: ServiceHandle, job_id: str) -> list[str]:
    reply = await service.stub.ListLogs(job_service_pb2.ListLogsRequest(job_id=job_id, limit=100))
    return [e.message for e in reply.entries]


async def _a_job_with_everything(service: ServiceHandle, job_id: str) -> None:
    """A job with events, log lines and an artifact of several chunks, then ended."""
    await create(service.stub, job_id=job_id)
    await service.stub.ReportEvent(progress(job_id, 40))
    await _log(service, job_id, f"{job_id} working")
    await _upload(service, job_id, "out.bin", CONTENT)
    await service.stub.ReportEvent(completed(job_id))


class ArtifactBytes:
    """Where a store keeps an artifact's content, looked at from outside the service."""

    def __init__(self, service: ServiceHandle, tmp_path: Path) -> None:
        self.store = service.running.store
        self.tmp_path = tmp_path

    async def stored(self, job_id: str) -> int:
        """Bytes of `job_id`'s artifacts still stored (files / GridFS chunks)."""
        if isinstance(self.store, EmbeddedStore):
            directory = self.tmp_path / "data" / "artifacts"
            directory /= hashlib.sha256(job_id.encode()).hexdigest()[:32]
            return sum(f.stat().st_size for f in directory.glob("*")) if directory.is_dir() else 0
        assert isinstance(self.store, MongoStore)
        total = 0
        async for doc in self.store.files.find({"metadata.job_id": job_id}, {"_id": 1}):
            async for chunk in self.store.chunks.find({"files_id": doc["_id"]}, {"data": 1}):
                total += len(chunk["data"])
        # Chunks whose files document is gone count too: no orphan may stay.
        return total + await self._orphan_chunks()

    async def _orphan_chunks(self) -> int:
        assert isinstance(self.store, MongoStore)
        files = {doc["_id"] async for doc in self.store.files.find({}, {"_id": 1})}
        orphans = 0
        async for chunk in self.store.chunks.find({}, {"files_id": 1, "data": 1}):
            if chunk["files_id"] not in files:
                orphans += len(chunk["data"])
        return orphans


def _deleted_count(reason: str) -> float:
    value = REGISTRY.get_sample_value("jobwire_jobs_deleted_total", {"reason": reason})
    return value or 0.0


@pytest.fixture
async def retaining(
    store_kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[ServiceHandle]:
    """A service keeping ended jobs RETENTION_S seconds, sweeping every 50 ms."""
    store = await open_test_store(store_kind, tmp_path, request, make_policy())
    handle = await start_service(
        store,
        lease_sweep_seconds=0.05,
        event_retention=16,
        job_retention_seconds=RETENTION_S,
        job_retention_sweep_seconds=0.05,
    )
    yield handle
    await handle.close()


def _sweeps(service: ServiceHandle) -> Retention:
    retention = service.running.retention
    assert retention is not None
    return retention


async def test_an_ended_job_past_the_retention_goes_with_everything_it_had(
    retaining: ServiceHandle, tmp_path: Path
) -> None:
    service = retaining
    sweeps = _sweeps(service)
    bytes_of = ArtifactBytes(service, tmp_path)
    before = _deleted_count("retention")
    # As old as the ended one, but not ended: kept however old.
    await create(service.stub, job_id="queued")
    await create(service.stub, job_id="running")
    await service.stub.ReportEvent(progress("running", 10))
    # Before "old" ends: the sweep that deletes "old" finds this line past the retention.
    await _log(service, "UNKNOWN", "no job, long ago", at_ns=time.time_ns() - 3600 * 10**9)
    await _a_job_with_everything(service, "old")
    old = await service.stub.GetJob(job_service_pb2.GetJobRequest(id="old"))
    assert old.state == job_pb2.JOB_STATE_SUCCEEDED
    assert await bytes_of.stored("old") == len(CONTENT)
    assert await _logs(service, "old") == ["old working"]

    await eventually(lambda: _gone(service, "old"))
    # The job vanished first (MongoDB: then its artifacts and lines): the sweep that
    # deleted it is over once a later one is.
    gone_ns = time.time_ns()
    await until(lambda: _swept_after(sweeps, gone_ns))
    # Everything of it is gone: events, log lines, artifacts and their bytes.
    for call in (
        service.stub.ListJobEvents(job_service_pb2.ListJobEventsRequest(job_id="old")),
        service.stub.ListArtifacts(job_service_pb2.ListArtifactsRequest(job_id="old")),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as gone:
            await call
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    assert await service.running.store.events_after("old", 0) == []
    assert await _logs(service, "old") == []
    assert await bytes_of.stored("old") == 0
    assert "no job, long ago" not in await _logs(service, "UNKNOWN")
    assert _deleted_count("retention") >= before + 1

    # The QUEUED and RUNNING jobs, created before "old" ended, are past the retention
    # for a sweep that began this late: one completed, and they are still there.
    deleted_ns = time.time_ns()
    await until(lambda: _swept_after(sweeps, deleted_ns))
    for job_id, state in (("queued", QUEUED), ("running", RUNNING)):
        job = await service.stub.GetJob(job_service_pb2.GetJobRequest(id=job_id))
        assert job.state == state
        assert job.create_time.ToNanoseconds() < sweeps.swept[-1] - RETENTION_S * 1e9

    # A job that ended now is kept by the sweeps within the retention.
    await _a_job_with_everything(service, "recent")
    recent = await service.stub.GetJob(job_service_pb2.GetJobRequest(id="recent"))
    ended_ns = recent.end_time.ToNanoseconds()
    await until(lambda: _swept_after(sweeps, ended_ns, ended_ns + RETENTION_S * 1e9))
    assert await _exists(service, "recent")
    assert await _logs(service, "recent") == ["recent working"]
    assert await bytes_of.stored("recent") == len(CONTENT)


async def test_log_lines_of_no_job_age_out_from_when_they_came(retaining: ServiceHandle) -> None:
    """A line under an id that names no job (a video id, a deleted job's) was kept for
    ever: no job's deletion takes it, and only UNKNOWN lines aged out. Now every line
    of no job goes once it came longer ago than the retention (not by its own time,
    which the worker sets: this one says an hour ago); a RUNNING job's lines stay,
    however old their time."""
    service = retaining
    sweeps = _sweeps(service)
    await create(service.stub, job_id="alive")
    await service.stub.ReportEvent(progress("alive", 10))
    wrote = time.time_ns()
    long_ago = wrote - HOUR_NS
    await _log(service, "ghost", "of no job", at_ns=long_ago)
    await _log(service, "UNKNOWN", "of no job either")
    await _log(service, "alive", "of a running job", at_ns=long_ago)
    came = time.time_ns()
    # Within the retention they are all kept, the one timed an hour ago too.
    await until(lambda: _swept_after(sweeps, came, wrote + RETENTION_S * 1e9))
    assert await _logs(service, "ghost") == ["of no job"]
    assert await _logs(service, "UNKNOWN") == ["of no job either"]

    async def aged_out() -> bool:
        return await _logs(service, "ghost") == [] and await _logs(service, "UNKNOWN") == []

    await eventually(aged_out)
    later = time.time_ns()
    await until(lambda: _swept_after(sweeps, later))
    assert await _logs(service, "alive") == ["of a running job"]


async def test_older_lines_of_no_job_are_found_at_the_upgrade(
    store_kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Lines stored before they were marked (no `no_job_ns` column / `nj` field): those
    under an id that names no job are marked once, aging from then; a job's lines are
    not; older UNKNOWN lines age by their own time, as before."""
    database = f"t_nj_{uuid.uuid4().hex[:12]}"
    store = await open_test_store(store_kind, tmp_path, request, make_policy(), database)
    handle = await start_service(store)
    try:
        await create(handle.stub, job_id="kept")
        await _log(handle, "kept", "of a job")
        await _log(handle, "ghost", "of no job")
        await _log(handle, "UNKNOWN", "unknown, an hour ago", at_ns=time.time_ns() - HOUR_NS)
        await _log(handle, "UNKNOWN", "unknown, now")
    finally:
        await handle.close()
    if isinstance(store, MongoStore):  # back to the older documents
        store = await open_test_store(store_kind, tmp_path, request, make_policy(), database)
        assert isinstance(store, MongoStore)
        await store.start()
        await store.old_logs_upgraded()  # the start's own pass: done, nothing to do
        await store.logs.update_many({}, {"$unset": {"nj": ""}})
        await store.database["migrations"].delete_many({})
        upgraded = time.time_ns()
        assert await store.mark_jobless_logs() == 1
    else:
        with sqlite3.connect(tmp_path / "data" / "jobwire.sqlite3") as conn:
            conn.execute("DROP INDEX logs_no_job")
            conn.execute("ALTER TABLE logs DROP COLUMN no_job_ns")
        conn.close()
        upgraded = time.time_ns()
        store = EmbeddedStore(tmp_path / "data", make_policy())
        await store.start()
    try:
        # Retention one minute: nothing of no job came a minute before the upgrade, but
        # the UNKNOWN line timed an hour ago goes by its time.
        assert await store.delete_jobless_logs(upgraded - 60 * 10**9, 100) == 1
        # Then the rest of no job, once the retention has passed since the upgrade.
        assert await store.delete_jobless_logs(time.time_ns() + 1, 100) == 2
        left = {(e.job_id, e.message) for e in await store.list_logs("", 0, 100)}
        assert left == {("kept", "of a job")}
    finally:
        await store.close()


async def _code(call: Awaitable[object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call
    return refused.value.code(), refused.value.details() or ""


def _delete(service: ServiceHandle, job_id: str) -> Awaitable[object]:
    return service.stub.DeleteJob(job_service_pb2.DeleteJobRequest(id=job_id))


async def test_delete_job_deletes_an_ended_job_and_refuses_the_rest(
    service: ServiceHandle, tmp_path: Path
) -> None:
    bytes_of = ArtifactBytes(service, tmp_path)
    before = _deleted_count("rpc")
    await create(service.stub, job_id="d-1")
    code, details = await _code(_delete(service, "d-1"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "QUEUED" in details, details
    await service.stub.ReportEvent(progress("d-1", 10))
    code, details = await _code(_delete(service, "d-1"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "RUNNING" in details, details
    await _log(service, "d-1", "d-1 working")
    await _upload(service, "d-1", "out.bin", CONTENT)
    assert await _exists(service, "d-1") and await bytes_of.stored("d-1") == len(CONTENT)

    await service.stub.CancelJob(job_service_pb2.CancelJobRequest(id="d-1", reason="done"))
    assert await _delete(service, "d-1") == job_service_pb2.DeleteJobResponse()
    assert not await _exists(service, "d-1")
    assert await _logs(service, "d-1") == []
    assert await bytes_of.stored("d-1") == 0
    assert await service.running.store.events_after("d-1", 0) == []
    assert _deleted_count("rpc") == before + 1

    assert (await _code(_delete(service, "d-1")))[0] == grpc.StatusCode.NOT_FOUND
    assert (await _code(_delete(service, "never")))[0] == grpc.StatusCode.NOT_FOUND
    for bad in ("", "a/b", "x" * 129):
        code, details = await _code(_delete(service, bad))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "id" in details, (bad, details)
    # A late callback finds no job; nor does a late upload, which stores nothing.
    code, _ = await _code(service.stub.ReportEvent(completed("d-1", key="late")))
    assert code == grpc.StatusCode.NOT_FOUND
    code, _ = await _code(_upload(service, "d-1", "late.bin", b"late"))
    assert code == grpc.StatusCode.NOT_FOUND
    assert await bytes_of.stored("d-1") == 0


async def test_an_upload_that_ends_after_its_job_was_deleted_stores_nothing(
    service: ServiceHandle, tmp_path: Path
) -> None:
    """The job is deleted while an upload to it runs (after the service checked the job):
    the content is not kept for a job that is gone."""
    bytes_of = ArtifactBytes(service, tmp_path)
    await create(service.stub, job_id="u-1")
    await service.stub.ReportEvent(completed("u-1"))
    sent_first = asyncio.Event()
    finish = asyncio.Event()

    async def parts() -> AsyncIterator[job_service_pb2.UploadArtifactRequest]:
        header = job_service_pb2.ArtifactHeader(job_id="u-1", name="slow.bin", size=2)
        yield job_service_pb2.UploadArtifactRequest(header=header)
        yield job_service_pb2.UploadArtifactRequest(data=b"a")
        sent_first.set()
        await finish.wait()
        yield job_service_pb2.UploadArtifactRequest(data=b"b")

    upload = asyncio.ensure_future(service.stub.UploadArtifact(parts()))
    await asyncio.wait_for(sent_first.wait(), WAIT)
    await _delete(service, "u-1")
    finish.set()
    code, _ = await _code(upload)
    assert code == grpc.StatusCode.NOT_FOUND
    assert await bytes_of.stored("u-1") == 0


async def test_delete_job_needs_the_service_token(tmp_path: Path) -> None:
    handle = await start_service(EmbeddedStore(tmp_path / "d", make_policy()), grpc_token="s3cr3t")
    auth = (("authorization", "Bearer s3cr3t"),)
    try:
        await handle.stub.CreateJob(
            job_service_pb2.CreateJobRequest(job=job_pb2.Job(kind=GENERIC), job_id="t-1"),
            metadata=auth,
        )
        await handle.stub.CancelJob(job_service_pb2.CancelJobRequest(id="t-1"), metadata=auth)
        request = job_service_pb2.DeleteJobRequest(id="t-1")
        code, _ = await _code(handle.stub.DeleteJob(request))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        bad = (("authorization", "Bearer wrong"),)
        code, _ = await _code(handle.stub.DeleteJob(request, metadata=bad))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        await handle.stub.DeleteJob(request, metadata=auth)
        code, _ = await _code(
            handle.stub.GetJob(job_service_pb2.GetJobRequest(id="t-1"), metadata=auth)
        )
        assert code == grpc.StatusCode.NOT_FOUND
    finally:
        await handle.close()


async def _ended_with_artifact(store: Store, job_id: str) -> None:
    """Through the store: an ended job with one artifact and one log line."""
    record, _ = events.new_record(job_id, GENERIC, time.time_ns())
    await store.create(record)
    done = completed(job_id)
    assert isinstance((await store.apply([JobCommand(job_id, Report(done))]))[0], Applied)

    async def content() -> AsyncIterator[bytes]:
        yield CONTENT

    await store.put_artifact(artifact_pb2.Artifact(job_id=job_id, name="a.bin"), content())
    await store.write_log(log_pb2.LogEntry(job_id=job_id, message="line"))


async def test_a_mongodb_deletion_cut_short_is_finished(mongo_store: MongoStore) -> None:
    """A crash after the mark and the job's document went, before its artifacts and
    lines: the next finish_deletions() removes them. A mark for a job that has not
    ended (a new job of that id) is dropped, the job left whole."""
    store = mongo_store
    await _ended_with_artifact(store, "cut")
    await store.database[DELETIONS].insert_one({"_id": "cut", "ns": time.time_ns()})
    await store.jobs.delete_one({"_id": "cut"})
    await _create_queued(store, "alive")
    await store.database[DELETIONS].insert_one({"_id": "alive", "ns": time.time_ns()})
    assert await store.list_artifacts("cut") != []

    assert await store.finish_deletions() == 2
    assert await store.list_artifacts("cut") == []
    assert await store.chunks.count_documents({}) == 0
    assert await store.list_logs("cut", 0, 10) == []
    assert await store.database[DELETIONS].count_documents({}) == 0
    assert await store.get("alive") is not None
    assert await store.delete_jobs(["alive"]) == []  # not ended: left alone
    assert await store.get("alive") is not None


async def test_embedded_files_of_deleted_artifacts_are_removed_after_a_crash(
    tmp_path: Path,
) -> None:
    """The transaction that deletes a job lists its files in artifact_trash; a crash
    before they are removed leaves the rows there, and the next start removes them."""
    store = EmbeddedStore(tmp_path / "data", make_policy())
    await store.start()
    await _ended_with_artifact(store, "cut")
    files = list((tmp_path / "data" / "artifacts").glob("*/*"))
    assert len(files) == 1

    def crash_after_commit(conn: sqlite3.Connection) -> None:
        with conn:  # delete_jobs' transaction, the process gone before the unlink
            conn.execute("INSERT INTO artifact_trash SELECT path FROM artifacts")
            for table in ("jobs", "events", "logs", "artifacts"):
                conn.execute(f"DELETE FROM {table}")

    await store._write(crash_after_commit)
    await store.close()
    assert files[0].exists()
    store = EmbeddedStore(tmp_path / "data", make_policy())
    await store.start()
    try:
        assert not files[0].exists() and not files[0].parent.exists()
        assert (
            await store._read(lambda c: c.execute("SELECT * FROM artifact_trash").fetchall()) == []
        )
    finally:
        await store.close()


async def test_a_cut_short_mongodb_deletion_spares_a_new_job_of_that_id(
    mongo_store: MongoStore,
) -> None:
    """A crash after the mark and the job's document went leaves the mark; a new job of
    that id made before the next finish_deletions() (a late AuroraCloud outcome, which
    ends it at once) was deleted by it, acknowledged outcome and all, long before the
    retention, and until then an upload to the new job was NOT_FOUND. Only the job the
    mark was made for goes, with its artifacts and lines."""
    service = await start_service(mongo_store)
    try:
        await _a_job_with_everything(service, "again")
        old_lines = await _logs(service, "again")
        # The state a crash leaves after the mark and the job document's deletion.
        await mongo_store.database[DELETIONS].insert_one({"_id": "again", "ns": time.time_ns()})
        await mongo_store.jobs.delete_one({"_id": "again"})
        late = job_service_pb2.ReportEventRequest(
            job_id="again",
            idempotency_key="aurora:again:done",
            create_kind=job_pb2.JOB_KIND_TRANSCODE,
            completed=job_pb2.Result(output_key="s3://out/again.mp4"),
        )
        assert (await service.stub.ReportEvent(late)).state == job_pb2.JOB_STATE_SUCCEEDED
        await _log(service, "again", "the new job's line")
        await _upload(service, "again", "new.bin", b"new")

        await mongo_store.finish_deletions()
        job = await service.stub.GetJob(job_service_pb2.GetJobRequest(id="again"))
        assert job.kind == job_pb2.JOB_KIND_TRANSCODE
        assert job.result.output_key == "s3://out/again.mp4"
        listed = await service.stub.ListArtifacts(
            job_service_pb2.ListArtifactsRequest(job_id="again")
        )
        assert [a.name for a in listed.artifacts] == ["new.bin"]  # the old one went
        assert "the new job's line" in await _logs(service, "again")
        assert not set(old_lines) & set(await _logs(service, "again"))
        assert await mongo_store.database[DELETIONS].count_documents({}) == 0
    finally:
        await service.close()


@pytest.mark.parametrize("made_by", ["CreateJob", "a late AuroraCloud report"])
async def test_a_job_made_after_a_delete_job_cut_short_shows_nothing_of_the_old_one(
    tmp_path: Path, made_by: str
) -> None:
    """MongoDB lost in the middle of DeleteJob, after the job's document went and before
    its artifacts and lines: UNAVAILABLE, the retry NOT_FOUND, the mark left for the
    housekeeping pass (60 s after start, then every 6 h; the retention sweep when on).
    A job made again under that id meanwhile listed the deleted job's log lines (and
    artifacts) as its own until then. Making it now finishes that deletion first."""
    if os.environ.get("MONGODB_URI"):
        pytest.skip("needs a FerretDB this test controls; MONGODB_URI names an external server")
    server = FerretDBProcess(require_ferretdb(), base_dir=tmp_path / "ferretdb")
    server.start()
    cutter = await TcpCutter(server.port).start()
    store = MongoStore(f"mongodb://127.0.0.1:{cutter.port}/", policy=make_policy(), database="cut")
    service = await start_service(store)
    try:
        await _a_job_with_everything(service, "again")
        # The reply to the artifacts' files deletion is held, then the connection cut.
        cutter.hold_after = b"\x02delete\x00\x10\x00\x00\x00artifacts.files\x00"
        deleting = asyncio.ensure_future(
            service.stub.DeleteJob(job_service_pb2.DeleteJobRequest(id="again"), timeout=30)
        )
        await until(lambda: cutter.hold or deleting.done())
        cutter.cut()
        with pytest.raises(grpc.aio.AioRpcError) as cut:
            await deleting
        assert cut.value.code() == grpc.StatusCode.UNAVAILABLE, cut.value.details()
        assert not await _exists(service, "again")

        if made_by == "CreateJob":
            await create(service.stub, job_id="again")
        else:
            late = job_service_pb2.ReportEventRequest(
                job_id="again",
                idempotency_key="aurora:again:done",
                create_kind=job_pb2.JOB_KIND_TRANSCODE,
                completed=job_pb2.Result(output_key="s3://out/again.mp4"),
            )
            await service.stub.ReportEvent(late)
        assert await _logs(service, "again") == []
        listed = await service.stub.ListArtifacts(
            job_service_pb2.ListArtifactsRequest(job_id="again")
        )
        assert list(listed.artifacts) == []
        assert await store.database[DELETIONS].count_documents({}) == 0
        await _log(service, "again", "the new job's line")  # its own are kept
        assert await _logs(service, "again") == ["the new job's line"]
    finally:
        await service.close()
        await cutter.close()
        server.cleanup()


async def _create_queued(store: Store, job_id: str) -> None:
    record, _ = events.new_record(job_id, GENERIC, time.time_ns())
    await store.create(record)


@pytest.fixture
async def mongo_store(mongo_uri: str) -> AsyncIterator[MongoStore]:
    store = MongoStore(mongo_uri, policy=make_policy(), database=f"t_{uuid.uuid4().hex[:12]}")
    await store.start()
    yield store
    await store.close()


# -- stores written before jobs carried an end time --------------------------------

HOUR_NS = 3600 * 10**9


def _ended_long_ago(snapshot: bytes, ended_ns: int, with_end_time: bool) -> bytes:
    """An ended job's snapshot as if it had ended at `ended_ns`; without its end time
    (`with_end_time` False) as written before Job.end_time, ended when last updated."""
    job = job_pb2.Job.FromString(snapshot)
    job.update_time.FromNanoseconds(ended_ns)
    if with_end_time:
        job.end_time.FromNanoseconds(ended_ns)
    else:
        job.ClearField("end_time")
    return job.SerializeToString()


async def _before_end_times(service: ServiceHandle) -> None:
    """The jobs of the older-store tests: two that ended an hour ago (one stored before
    Job.end_time), one QUEUED and one RUNNING as old, one that ended just now."""
    await _a_job_with_everything(service, "old-done")
    await create(service.stub, job_id="old-failed")
    await _log(service, "old-failed", "old-failed working")
    await _upload(service, "old-failed", "out.bin", CONTENT)
    await service.stub.ReportEvent(failed("old-failed"))
    await create(service.stub, job_id="old-queued")
    await create(service.stub, job_id="old-running")
    await service.stub.ReportEvent(progress("old-running", 10))
    await _a_job_with_everything(service, "recent")


async def _check_end_times_were_added(service: ServiceHandle, tmp_path: Path) -> None:
    """The first sweep of a service keeping jobs an hour: the jobs that ended an hour
    ago went with everything they had; the others are there."""
    sweeps = _sweeps(service)
    bytes_of = ArtifactBytes(service, tmp_path)
    await until(lambda: len(sweeps.swept) >= 1)
    for job_id in ("old-done", "old-failed"):
        assert not await _exists(service, job_id), job_id
        assert await _logs(service, job_id) == []
        assert await bytes_of.stored(job_id) == 0
    for job_id, state in (("old-queued", QUEUED), ("old-running", RUNNING)):
        job = await service.stub.GetJob(job_service_pb2.GetJobRequest(id=job_id))
        assert job.state == state
    assert await _logs(service, "recent") == ["recent working"]
    assert await bytes_of.stored("recent") == len(CONTENT)


async def test_an_embedded_database_from_before_end_times_is_swept_too(tmp_path: Path) -> None:
    """A database written before jobs.end_ns: its start fills the column for the jobs
    that ended (from their snapshots: end_time, else the last update), so the
    retention deletes those that ended long ago and keeps the rest."""
    data = tmp_path / "data"
    handle = await start_service(EmbeddedStore(data, make_policy()))
    try:
        await _before_end_times(handle)
        recent = await handle.stub.GetJob(job_service_pb2.GetJobRequest(id="recent"))
    finally:
        await handle.close()
    long_ago = time.time_ns() - HOUR_NS
    with sqlite3.connect(data / "jobwire.sqlite3") as conn:  # back to the older schema
        conn.execute("DROP INDEX jobs_ended")
        conn.execute("ALTER TABLE jobs DROP COLUMN end_ns")
        for job_id, with_end_time in (("old-done", True), ("old-failed", False)):
            (snapshot,) = conn.execute(
                "SELECT snapshot FROM jobs WHERE id = ?", (job_id,)
            ).fetchone()
            conn.execute(
                "UPDATE jobs SET snapshot = ? WHERE id = ?",
                (_ended_long_ago(snapshot, long_ago, with_end_time), job_id),
            )
    conn.close()

    handle = await start_service(
        EmbeddedStore(data, make_policy()),
        job_retention_seconds=3600 - 60,
        job_retention_sweep_seconds=0.05,
    )
    try:
        await _check_end_times_were_added(handle, tmp_path)
        store = handle.running.store
        assert isinstance(store, EmbeddedStore)
        rows = await store._read(lambda c: c.execute("SELECT id, end_ns FROM jobs").fetchall())
        assert dict(rows) == {
            "old-queued": None,
            "old-running": None,
            "recent": recent.end_time.ToNanoseconds(),
        }
    finally:
        await handle.close()


async def test_mongodb_jobs_from_before_end_times_are_swept_too(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Job documents written before `end_ns` (no such field): the sweep gives the ended
    ones theirs (from the snapshot: end_time, else the last update), deletes those
    that ended long ago and keeps the rest."""
    database = f"ends_{uuid.uuid4().hex[:12]}"
    store = await open_test_store("mongo", tmp_path, request, make_policy(), database)
    handle = await start_service(store)
    try:
        await _before_end_times(handle)
        recent = await handle.stub.GetJob(job_service_pb2.GetJobRequest(id="recent"))
        assert isinstance(store, MongoStore)
        # Back to the older documents: no `end_ns` field; two ended an hour ago.
        await store.jobs.update_many({}, {"$unset": {"end_ns": ""}})
        long_ago = time.time_ns() - HOUR_NS
        for job_id, with_end_time in (("old-done", True), ("old-failed", False)):
            doc = await store.jobs.find_one({"_id": job_id}, {"job": 1})
            assert doc is not None
            snapshot = _ended_long_ago(bytes(doc["job"]), long_ago, with_end_time)
            await store.jobs.update_one({"_id": job_id}, {"$set": {"job": Binary(snapshot)}})
        assert await store.jobs.count_documents({"end_ns": {"$exists": True}}) == 0
    finally:
        await handle.close()

    store = await open_test_store("mongo", tmp_path, request, make_policy(), database)
    assert isinstance(store, MongoStore)
    handle = await start_service(
        store, job_retention_seconds=3600 - 60, job_retention_sweep_seconds=0.05
    )
    try:
        await _check_end_times_were_added(handle, tmp_path)
        ends = {doc["_id"]: doc.get("end_ns") async for doc in store.jobs.find({}, {"end_ns": 1})}
        assert ends == {
            "old-queued": None,
            "old-running": None,
            "recent": recent.end_time.ToNanoseconds(),
        }
    finally:
        await handle.close()


# -- late callbacks for a deleted job, through the bridge ----------------------------

BATCH_PATH = "/api/batch-callback"
NO_BATCH_JOB = {"error": "Projekt mit der angegebenen Job-ID nicht gefunden"}
NO_VIDEO = {"error": "El video no existe"}
TRANSCODE_PATH = "/api/transcode-callback"
TRANSCODE_AUTH = {"Authorization": f"Bearer {TRANSCODE_TOKEN}"}


@pytest.fixture
async def bridged(service: ServiceHandle) -> AsyncIterator[tuple[Bridge, ServiceHandle]]:
    """The real HTTP bridge in front of a service over each store."""
    config = dataclasses.replace(TEST_CONFIG, service_target=service.target)
    async with running_bridge(config) as bridge:
        yield bridge, service


async def _deleted(service: ServiceHandle, job_id: str) -> None:
    await service.stub.DeleteJob(job_service_pb2.DeleteJobRequest(id=job_id))
    assert not await _exists(service, job_id)


async def test_a_deleted_job_s_late_batch_callback_is_404(
    bridged: tuple[Bridge, ServiceHandle],
) -> None:
    """Also the verbatim retry of the callback that ended it: its idempotency key went
    with the job (README "Retention")."""
    bridge, service = bridged
    await create_job(service.stub, job_pb2.JOB_KIND_BATCH, "b-1")
    success = {
        "jobId": "b-1",
        "status": "success",
        "outputKey": "out/b-1.mp4",
        "callbackSecret": BATCH_SECRET,
    }
    assert (await bridge.post(BATCH_PATH, success))[0] == 200
    await _deleted(service, "b-1")
    failure = {**success, "status": "failed", "error": "late", "outputKey": None}
    for late in (success, failure):
        assert await bridge.post(BATCH_PATH, late) == (404, NO_BATCH_JOB)
    assert not await _exists(service, "b-1")


async def test_a_deleted_video_s_late_report_is_404_and_its_log_lines_are_kept(
    bridged: tuple[Bridge, ServiceHandle],
) -> None:
    """A late report finds no video; a late log line is stored (until the retention,
    counted from when it came: test_log_lines_of_no_job_age_out_from_when_they_came)
    and, as an ERROR, fails nothing and makes no job."""
    bridge, service = bridged
    await create_job(service.stub, job_pb2.JOB_KIND_VIDEO, "v-1")
    done = {"status": "success", "message": "hecho", "videoId": "v-1"}
    key = {"Idempotency-Key": "v-1-done"}
    assert await bridge.post("/api/report", done, headers={**VIDEO_AUTH, **key}) == (
        200,
        {"success": True},
    )
    await _deleted(service, "v-1")
    late = {"status": "progress", "message": "tarde", "videoId": "v-1", "percent": 50}
    assert await bridge.post("/api/report", late, headers=VIDEO_AUTH) == (404, NO_VIDEO)
    retried = await bridge.post("/api/report", done, headers={**VIDEO_AUTH, **key})
    assert retried == (404, NO_VIDEO)
    for level in ("INFO", "ERROR"):
        line = {
            "level": level,
            "message": f"tarde {level}",
            "timestamp": "2023-05-01T12:00:00Z",
            "videoId": "v-1",
        }
        assert await bridge.post("/api/log", line, headers=VIDEO_AUTH) == (200, {"success": True})
    assert sorted(await _logs(service, "v-1")) == ["tarde ERROR", "tarde INFO"]
    status, listed = await bridge.get("/api/log?limit=1000", headers=VIDEO_AUTH)
    assert status == 200
    assert {line["message"] for line in listed if line["videoId"] == "v-1"} == {
        "tarde ERROR",
        "tarde INFO",
    }
    assert not await _exists(service, "v-1")
    assert (await bridge.get("/api/pending", headers=VIDEO_AUTH))[0] == 204


async def test_a_deleted_transcode_job_s_late_notification_makes_a_new_job(
    bridged: tuple[Bridge, ServiceHandle],
) -> None:
    """AuroraCloud's contract creates a job for an unknown task_id: a late (retried)
    notification for a deleted job makes a new TRANSCODE job of that id, which is
    deleted in turn once asked (README "Retention")."""
    bridge, service = bridged
    task = {"task_id": "a-1", "status": "succeeded", "output": "oss://b/a-1.mp4"}
    notification = {"code": 0, "msg": "succeeded", "data": [task]}
    assert await bridge.post(TRANSCODE_PATH, notification, headers=TRANSCODE_AUTH) == (
        200,
        {"ack": True},
    )
    first = await service.stub.GetJob(job_service_pb2.GetJobRequest(id="a-1"))
    await _deleted(service, "a-1")
    assert await bridge.post(TRANSCODE_PATH, notification, headers=TRANSCODE_AUTH) == (
        200,
        {"ack": True},
    )
    again = await service.stub.GetJob(job_service_pb2.GetJobRequest(id="a-1"))
    assert (again.kind, again.state, again.sequence) == (
        job_pb2.JOB_KIND_TRANSCODE,
        job_pb2.JOB_STATE_SUCCEEDED,
        1,
    )
    assert again.result.output_uri == "oss://b/a-1.mp4"
    assert again.create_time.ToNanoseconds() > first.create_time.ToNanoseconds()
    await _deleted(service, "a-1")


# -- a backlog swept while callbacks arrive ------------------------------------------

BACKLOG = {"embedded": 250, "mongo": 150}  # two or three of the sweep's batches (FerretDB is slow)
LIVE = 4
LIVE_EVENTS = 500  # at most, per live job: within the event retention below
SWEEP_RETENTION_S = 0.5
SWEEP_INTERVAL_S = 0.5  # the backlog's end times spread less: most go in one sweep


async def _backlog_job(service: ServiceHandle, job_id: str, number: int) -> None:
    """A RUNNING job with a log line and an artifact (every 100th one of three chunks)."""
    await create(service.stub, job_id=job_id)
    await service.stub.ReportEvent(progress(job_id, 50))
    await _log(service, job_id, f"{job_id} working")
    data = CONTENT if number % 100 == 0 else job_id.encode() * 100
    await _upload(service, job_id, "out.bin", data)


async def _all_artifact_bytes(store: Store, tmp_path: Path) -> int:
    """Every artifact byte the store holds, whatever job it belongs to."""
    if isinstance(store, EmbeddedStore):
        directory = tmp_path / "data" / "artifacts"
        return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
    assert isinstance(store, MongoStore)
    total = 0
    async for chunk in store.chunks.find({}, {"data": 1}):
        total += len(chunk["data"])
    total += await store.files.count_documents({})
    return total + await store.database[DELETIONS].count_documents({})  # none unfinished


async def test_a_backlog_swept_while_callbacks_arrive_loses_no_acknowledged_event(
    store_kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Hundreds of jobs end within moments and the sweep deletes them in batches of a
    hundred while Secretary callbacks for other jobs keep arriving through the bridge:
    every acknowledged callback is a retained event of its job, in order, and nothing
    of the deleted jobs stays (rows, log lines, artifact files or GridFS chunks)."""
    policy = Policy(retention=LIVE_EVENTS + 12, lease_ns=60 * 10**9, max_attempts=3)
    store = await open_test_store(store_kind, tmp_path, request, policy)
    service = await start_service(
        store,
        event_retention=policy.retention,
        job_retention_seconds=SWEEP_RETENTION_S,
        job_retention_sweep_seconds=SWEEP_INTERVAL_S,
    )
    sweeps = _sweeps(service)
    backlog = BACKLOG[store_kind]
    config = dataclasses.replace(TEST_CONFIG, service_target=service.target)
    try:
        async with running_bridge(config) as bridge:
            semaphore = asyncio.Semaphore(16)

            async def backlog_job(number: int) -> None:
                async with semaphore:
                    await _backlog_job(service, f"old-{number}", number)

            await asyncio.gather(*(backlog_job(n) for n in range(backlog)))
            assert await _all_artifact_bytes(store, tmp_path) > 0

            live: dict[str, str] = {}
            for _ in range(LIVE):
                created = await create_job(service.stub, job_pb2.JOB_KIND_EXTRACTION)
                live[created.job.id] = created.callback_token
            acked: dict[str, list[tuple[int, str]]] = {job_id: [] for job_id in live}
            stop = asyncio.Event()

            async def ingest(job_id: str, token: str) -> None:
                auth = {"Authorization": f"Bearer {token}"}
                while not stop.is_set() and len(acked[job_id]) < LIVE_EVENTS:
                    message = f"{job_id} #{len(acked[job_id])}"
                    body = {
                        "phase": "work",
                        "progress": len(acked[job_id]) % 100,
                        "message": message,
                    }
                    status, answer = await bridge.post(
                        f"/api/external/jobs/{job_id}", body, headers=auth
                    )
                    assert status == 200, answer
                    acked[job_id].append((time.time_ns(), message))

            workers = [asyncio.create_task(ingest(j, t)) for j, t in live.items()]
            try:
                # The backlog ends, while callbacks arrive (8 more in flight: FerretDB
                # takes ~40 ms per job update, so a group commit of a hundred would
                # pass the service's 5 s MongoDB operation timeout).
                sent_ns = time.time_ns()  # each of them ended after this
                ending = asyncio.Semaphore(8)

                async def end(number: int) -> None:
                    async with ending:
                        await service.stub.ReportEvent(completed(f"old-{number}"))

                await asyncio.gather(*(end(n) for n in range(backlog)))
                ended_ns = time.time_ns()  # and before this
                # The sweep that began once the last of them was past the retention
                # took all that remained; it is over once the next one began.
                past_ns = ended_ns + SWEEP_RETENTION_S * 1e9
                # FerretDB scans its collections for each step of a deletion: a
                # sweep of a hundred jobs there took ~20 s.
                await until(lambda: len([b for b in sweeps.swept if b > past_ns]) >= 2, 12 * WAIT)
            finally:
                stop.set()
                await asyncio.gather(*workers)

        listed = await service.stub.ListJobs(job_service_pb2.ListJobsRequest(page_size=1000))
        assert sorted(job.id for job in listed.jobs) == sorted(live)
        assert await _all_artifact_bytes(store, tmp_path) == 0
        logs = await service.stub.ListLogs(job_service_pb2.ListLogsRequest(limit=1000))
        assert [e.job_id for e in logs.entries] == []
        # The backlog was deleted from the first sweep that may have found one of them
        # past the retention until the end of the one that began after all were (the
        # next one's start, less the interval).
        sweeping_ns = min(b for b in sweeps.swept if b > sent_ns + SWEEP_RETENTION_S * 1e9)
        swept_ns = sorted(b for b in sweeps.swept if b > past_ns)[1] - SWEEP_INTERVAL_S * 1e9
        during = 0
        for job_id, acks in acked.items():
            reply = await service.stub.ListJobEvents(
                job_service_pb2.ListJobEventsRequest(job_id=job_id, page_size=1000)
            )
            assert not reply.HasField("gap") and not reply.more
            messages = [e.progress.message for e in reply.events]
            assert messages == [message for _, message in acks], job_id
            job = await service.stub.GetJob(job_service_pb2.GetJobRequest(id=job_id))
            assert (job.state, job.sequence) == (RUNNING, len(acks))
            during += sum(1 for at, _ in acks if sweeping_ns < at < swept_ns)
        assert during > 0  # callbacks were acknowledged while the backlog was deleted
    finally:
        await service.close()
