"""What only the MongoDB adapter has to prove, against FerretDB (or MONGODB_URI):
a bounded job document, outages, GridFS streaming in bounded memory, indexes."""

from __future__ import annotations

import asyncio
import hashlib
import os
import resource
import time
import tracemalloc
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import bson
import pytest
from gridfs.asynchronous import AsyncGridFSBucket

from jobwire.v1 import artifact_pb2, job_pb2, job_service_pb2, log_pb2
from service.domain import events
from service.domain.errors import Code, DomainError, StorageUnavailable
from service.domain.records import Applied, Change, JobCommand, Policy, Report, Unchanged
from service.store.mongo import MongoStore
from service.store.port import CHUNK_SIZE, JobQuery
from tests.helpers import WAIT
from tests.mongo_server import FerretDBProcess, require_ferretdb

RETENTION = 64
MiB = 1024 * 1024


def _db_name() -> str:
    return f"m_{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def mongo_store(mongo_uri: str) -> AsyncIterator[MongoStore]:
    store = MongoStore(mongo_uri, policy=Policy(retention=RETENTION), database=_db_name())
    await store.start()
    yield store
    await store.database.client.drop_database(store.database.name)
    await store.close()


async def _create(
    store: MongoStore, job_id: str, kind: job_pb2.JobKind.ValueType = job_pb2.JOB_KIND_GENERIC
) -> None:
    record, _ = events.new_record(job_id, kind, time.time_ns())
    await store.create(record)


def _report(job_id: str, key: str, percent: float = 1.0) -> JobCommand:
    request = job_service_pb2.ReportEventRequest(
        job_id=job_id, idempotency_key=key, progress=job_pb2.Progress(percent=percent)
    )
    return JobCommand(job_id, Report(request))


def _applied(outcomes: list[Change | DomainError]) -> list[Applied]:
    assert all(isinstance(o, Applied) for o in outcomes), outcomes
    return [o for o in outcomes if isinstance(o, Applied)]


async def _eventually(check: Callable[[], Any], timeout: float, what: str) -> None:
    """Awaits `check()` until it returns without raising, or fails after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            await check()
            return
        except Exception as exc:
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} not within {timeout}s: {exc}") from exc


async def test_ten_thousand_events_keep_a_bounded_document(mongo_store: MongoStore) -> None:
    store = mongo_store
    await _create(store, "busy")
    # 200 single-event calls from 8 concurrent writers (one write each), then
    # 9,800 events in calls of 98 (one write per call, many ring slots at once).
    singles = [f"s{i}" for i in range(200)]

    async def writer(keys: list[str]) -> None:
        for key in keys:
            _applied(await store.apply([_report("busy", key)]))

    await asyncio.gather(*(writer(singles[i::8]) for i in range(8)))
    batched = [f"b{i}" for i in range(9_800)]
    for start in range(0, len(batched), 98):
        _applied(await store.apply([_report("busy", k) for k in batched[start : start + 98]]))

    doc = await store.jobs.find_one({"_id": "busy"})
    assert doc is not None
    size = len(bson.encode(doc))
    print(f"\njob document after 10,000 events: {size} bytes, ring slots {len(doc['ring'])}")
    assert size < 32 * 1024
    assert sorted(doc["ring"], key=int) == [str(i) for i in range(RETENTION)]
    assert doc["seq"] == 10_000

    record = await store.get("busy")
    assert record is not None
    assert record.job.sequence == 10_000

    retained = await store.events_after("busy", 0)
    assert [e.sequence for e in retained] == list(range(10_000 - RETENTION + 1, 10_001))
    assert [e.idempotency_key for e in retained] == batched[-RETENTION:]
    assert [e.sequence for e in await store.events_after("busy", 9_990)] == list(
        range(9_991, 10_001)
    )
    assert await store.events_after("busy", 10_000) == []

    # A retained key is acknowledged, not applied again; the document stays the same size.
    (again,) = await store.apply([_report("busy", batched[-1])])
    assert isinstance(again, Unchanged)
    after = await store.jobs.find_one({"_id": "busy"})
    assert after is not None and after["seq"] == 10_000


async def test_outage_raises_unavailable_fast_and_keeps_acknowledged_events() -> None:
    if os.environ.get("MONGODB_URI"):
        pytest.skip("needs a FerretDB this test can stop; MONGODB_URI names an external server")
    server = FerretDBProcess(require_ferretdb())
    timeout_s = 1.5
    margin_s = 1.5
    try:
        server.start()
        store = MongoStore(
            server.uri, policy=Policy(retention=RETENTION), database="outage", timeout_ms=1500
        )
        await store.start()
        try:
            await _create(store, "steady")
            acked: list[str] = []
            enough = asyncio.Event()

            async def writer() -> BaseException:
                n = 0
                while True:
                    key = f"k{n}"
                    n += 1
                    try:
                        (outcome,) = await store.apply([_report("steady", key)])
                    except StorageUnavailable as exc:
                        return exc
                    assert isinstance(outcome, Applied)
                    acked.append(key)
                    if len(acked) >= 20:
                        enough.set()

            task = asyncio.create_task(writer())
            await asyncio.wait_for(enough.wait(), 60)
            server.kill()  # a crash, mid-write
            killed_at = time.monotonic()
            error = await asyncio.wait_for(task, timeout_s + margin_s + 5)
            assert isinstance(error, StorageUnavailable)
            assert error.code == Code.UNAVAILABLE
            print(f"\nin-flight writer failed {time.monotonic() - killed_at:.2f}s after the kill")

            calls: dict[str, Callable[[], Any]] = {
                "ping": store.ping,
                "get": lambda: store.get("steady"),
                "apply": lambda: store.apply([_report("steady", "during-outage")]),
                "claim": lambda: store.claim(job_pb2.JOB_KIND_GENERIC, "w", 10**9),
                "list_jobs": lambda: store.list_jobs(JobQuery()),
                "write_log": lambda: store.write_log(log_pb2.LogEntry(job_id="steady")),
                "events_after": lambda: store.events_after("steady", 0),
            }
            for name, call in calls.items():
                began = time.monotonic()
                with pytest.raises(StorageUnavailable):
                    await call()
                elapsed = time.monotonic() - began
                print(f"{name}: StorageUnavailable after {elapsed:.2f}s")
                assert elapsed < timeout_s + margin_s, name

            server.start()  # same port, same data directory
            await _eventually(store.ping, 30, "ping after restart")
            record = await store.get("steady")
            assert record is not None
            stored_keys = [e.idempotency_key for e in await store.events_after("steady", 0)]
            assert len(acked) < RETENTION  # so every acknowledged event is still retained
            assert set(acked) <= set(stored_keys)
            assert record.job.sequence >= len(acked)
            assert "during-outage" not in stored_keys
            (outcome,) = await store.apply([_report("steady", "after-restart")])
            assert isinstance(outcome, Applied)
            assert outcome.event.sequence == record.job.sequence + 1
        finally:
            await store.close()
    finally:
        server.cleanup()


async def _pieces(total: int, piece: int, digest: Any) -> AsyncIterator[bytes]:
    """`total` random bytes in pieces of `piece` (not CHUNK_SIZE on purpose)."""
    sent = 0
    while sent < total:
        data = os.urandom(min(piece, total - sent))
        digest.update(data)
        sent += len(data)
        yield data


@pytest.fixture
async def big_store() -> AsyncIterator[MongoStore]:
    """A store on a FerretDB of its own (or MONGODB_URI): 200 MiB of I/O should not
    slow the server the rest of the session shares."""
    server: FerretDBProcess | None = None
    uri = os.environ.get("MONGODB_URI", "")
    if not uri:
        server = FerretDBProcess(require_ferretdb())
        server.start()
        uri = server.uri
    store = MongoStore(uri, policy=Policy(retention=RETENTION), database=_db_name())
    try:
        await store.start()
        yield store
        await store.database.client.drop_database(store.database.name)
    finally:
        await store.close()
        if server is not None:
            server.cleanup()


async def test_200_mib_artifact_streams_in_bounded_memory(big_store: MongoStore) -> None:
    store = big_store
    await _create(store, "big")
    total = 200 * MiB
    sent_digest = hashlib.sha256()
    rss_before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    try:
        began = time.monotonic()
        stored = await store.put_artifact(
            artifact_pb2.Artifact(job_id="big", name="video.bin", content_type="video/mp4"),
            _pieces(total, 700_001, sent_digest),
        )
        upload_s = time.monotonic() - began
        opened = await store.open_artifact("big", "video.bin")
        assert opened is not None
        meta, content = opened
        read_digest = hashlib.sha256()
        sizes: list[int] = []
        began = time.monotonic()
        async for chunk in content:
            read_digest.update(chunk)
            sizes.append(len(chunk))
        download_s = time.monotonic() - began
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    rss_growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before_kib) * 1024
    print(
        f"\n200 MiB artifact: upload {upload_s:.1f}s, download {download_s:.1f}s, "
        f"tracemalloc peak {peak / MiB:.1f} MiB, max RSS growth {rss_growth / MiB:.1f} MiB"
    )
    assert stored.size_bytes == total == meta.size_bytes
    assert stored.sha256 == sent_digest.hexdigest() == read_digest.hexdigest() == meta.sha256
    assert sum(sizes) == total
    assert all(size == CHUNK_SIZE for size in sizes[:-1]) and 0 < sizes[-1] <= CHUNK_SIZE
    assert peak < 64 * MiB
    assert rss_growth < 64 * MiB

    # Plain GridFS layout: the driver's own bucket finds it by name.
    bucket = AsyncGridFSBucket(store.database, bucket_name="artifacts")
    grid_out = await bucket.open_download_stream_by_name("big/video.bin")
    assert grid_out.length == total
    assert (grid_out.metadata or {}).get("sha256") == stored.sha256
    old_id = grid_out._id

    # Replacing it: the new content is served, the old file and chunks are gone.
    async def small() -> AsyncIterator[bytes]:
        yield b"replaced"

    await store.put_artifact(
        artifact_pb2.Artifact(job_id="big", name="video.bin", content_type="text/plain"), small()
    )
    opened = await store.open_artifact("big", "video.bin")
    assert opened is not None
    assert [c async for c in opened[1]] == [b"replaced"]
    assert opened[0].content_type == "text/plain"
    assert await store.chunks.count_documents({"files_id": old_id}) == 0
    assert await store.files.count_documents({"_id": old_id}) == 0
    assert [a.name for a in await store.list_artifacts("big")] == ["video.bin"]


async def test_indexes_exist_after_starting_twice(mongo_uri: str) -> None:
    database = _db_name()
    first = MongoStore(mongo_uri, database=database)
    await first.start()
    await first.start()
    second = MongoStore(mongo_uri, database=database)
    await second.start()  # another replica starting against the same database
    try:
        jobs = await first.jobs.index_information()
        assert jobs["claim_queue"]["key"] == [
            ("kind", 1),
            ("state", 1),
            ("create_ns", 1),
            ("_id", 1),
        ]
        assert jobs["leases"]["key"] == [("state", 1), ("lease_expire_ns", 1)]
        assert jobs["list_order"]["key"] == [("create_ns", 1), ("_id", 1)]
        assert jobs["labels"]["key"] == [("lab", 1)]
        logs = await first.logs.index_information()
        assert logs["job_newest_first"]["key"] == [("job_id", 1), ("time_ns", -1), ("_id", -1)]
        assert logs["newest_first"]["key"] == [("time_ns", -1), ("_id", -1)]
        assert logs["kind_newest_first"]["key"] == [("kind", 1), ("time_ns", -1), ("_id", -1)]
        files = await first.files.index_information()
        assert files["filename_1_uploadDate_1"]["key"] == [("filename", 1), ("uploadDate", 1)]
        assert files["job_artifacts"]["key"] == [("metadata.job_id", 1), ("metadata.name", 1)]
        chunks = await first.chunks.index_information()
        assert chunks["files_id_1_n_1"]["key"] == [("files_id", 1), ("n", 1)]
        assert chunks["files_id_1_n_1"].get("unique") is True

        info = await first.database.client.admin.command("buildInfo")
        if "ferretdbVersion" not in info:
            # A real MongoDB must answer the claim query from the index, not a scan.
            plan = await first.database.command(
                "explain",
                {
                    "find": "jobs",
                    "filter": {"kind": 2, "state": job_pb2.JOB_STATE_QUEUED},
                    "sort": {"create_ns": 1, "_id": 1},
                    "limit": 16,
                },
            )
            assert "claim_queue" in str(plan["queryPlanner"]["winningPlan"])
    finally:
        await first.database.client.drop_database(database)
        await second.close()
        await first.close()


async def test_from_env_reads_the_documented_variables(mongo_uri: str) -> None:
    policy = Policy(retention=8)
    with pytest.raises(ValueError, match="MONGODB_URI"):
        MongoStore.from_env(policy, environ={})
    with pytest.raises(ValueError, match="JOBWIRE_MONGODB_TIMEOUT_MS"):
        MongoStore.from_env(
            policy, environ={"MONGODB_URI": mongo_uri, "JOBWIRE_MONGODB_TIMEOUT_MS": "soon"}
        )
    database = _db_name()
    store = MongoStore.from_env(
        policy,
        environ={
            "MONGODB_URI": mongo_uri,
            "JOBWIRE_MONGODB_DB": database,
            "JOBWIRE_MONGODB_W": "1",
            "JOBWIRE_MONGODB_TIMEOUT_MS": "2500",
            "JOBWIRE_MONGODB_READ_PREFERENCE": "primaryPreferred",
        },
    )
    assert store.policy is policy and store.timeout_ms == 2500
    await store.start()
    try:
        assert store.database.name == database
        client = store.database.client
        assert client.write_concern.document == {"w": 1}
        assert client.read_preference.mongos_mode == "primaryPreferred"
        assert client.options.timeout == 2.5
        await store.ping()
    finally:
        await client.drop_database(database)
        await store.close()


async def test_database_in_the_uri_path_wins(mongo_uri: str) -> None:
    if "?" in mongo_uri or mongo_uri.rstrip("/").count("/") > 2:
        pytest.skip("MONGODB_URI already names a database or options")
    database = _db_name()
    store = MongoStore(mongo_uri.rstrip("/") + "/" + database, database="ignored")
    await store.start()
    try:
        assert store.database.name == database
    finally:
        await store.database.client.drop_database(database)
        await store.close()


async def test_labels_with_dots_and_dollars_filter_exactly(mongo_store: MongoStore) -> None:
    store = mongo_store
    for job_id, labels in {
        "a": {"team.name": "x", "$env": "prod"},
        "b": {"team.name": "x"},
        "c": {"team": "x"},
    }.items():
        record, _ = events.new_record(job_id, job_pb2.JOB_KIND_BATCH, time.time_ns())
        record.job.labels.update(labels)
        await store.create(record)
    found = await store.list_jobs(JobQuery(labels={"team.name": "x"}))
    assert [j.id for j in found] == ["a", "b"]
    found = await store.list_jobs(JobQuery(labels={"team.name": "x", "$env": "prod"}))
    assert [j.id for j in found] == ["a"]


async def test_create_twice_is_already_exists(mongo_store: MongoStore) -> None:
    await _create(mongo_store, "once")
    with pytest.raises(DomainError) as caught:
        await _create(mongo_store, "once")
    assert caught.value.code == Code.ALREADY_EXISTS


def _upload_id(age_s: float) -> bson.ObjectId:
    """The id of a file whose upload started `age_s` seconds ago."""
    return bson.ObjectId.from_datetime(datetime.fromtimestamp(time.time() - age_s, UTC))


async def _orphan(store: MongoStore, file_id: bson.ObjectId, numbers: range) -> None:
    """What a failed upload leaves: chunks, no files document."""
    await store.chunks.insert_many(
        [{"files_id": file_id, "n": n, "data": bson.Binary(b"x" * 10)} for n in numbers]
    )


async def _one_piece(content: bytes) -> AsyncIterator[bytes]:
    yield content


async def test_chunks_of_failed_uploads_are_swept_once_a_day_old(mongo_store: MongoStore) -> None:
    store = mongo_store
    day = 24 * 3600.0
    await _create(store, "j")
    stored = await store.put_artifact(
        artifact_pb2.Artifact(job_id="j", name="kept.txt"), _one_piece(b"kept")
    )
    old, partly_deleted, young = _upload_id(2 * day), _upload_id(1.5 * day), _upload_id(60)
    await _orphan(store, old, range(3))
    await _orphan(store, partly_deleted, range(2, 4))  # its first chunks already gone
    await _orphan(store, young, range(1))  # perhaps an upload still going

    assert await store.sweep_orphan_chunks(time.time() - day) == 2
    left = {d["files_id"] for d in await store.chunks.find({}, {"files_id": 1}).to_list()}
    assert old not in left and partly_deleted not in left and young in left

    # Everything started before now: the young orphan goes, a stored file's chunks stay.
    assert await store.sweep_orphan_chunks(time.time() + 60) == 1
    opened = await store.open_artifact("j", "kept.txt")
    assert opened is not None and opened[0].sha256 == stored.sha256
    assert [c async for c in opened[1]] == [b"kept"]
    assert await store.sweep_orphan_chunks(time.time() + 60) == 0


async def test_an_upload_in_progress_is_not_swept(mongo_store: MongoStore) -> None:
    store = mongo_store
    first_written = asyncio.Event()
    finish = asyncio.Event()

    async def slow() -> AsyncIterator[bytes]:
        yield b"a" * CHUNK_SIZE
        yield b"b"  # the first chunk is written while this one is buffered
        first_written.set()
        await finish.wait()
        yield b"c"

    await _create(store, "j")
    upload = asyncio.create_task(
        store.put_artifact(artifact_pb2.Artifact(job_id="j", name="slow.bin"), slow())
    )
    await asyncio.wait_for(first_written.wait(), WAIT)
    assert await store.chunks.count_documents({}) == 1
    assert await store.sweep_orphan_chunks(time.time() + 60) == 0  # it has no files doc yet
    finish.set()
    stored = await asyncio.wait_for(upload, WAIT)
    assert stored.size_bytes == CHUNK_SIZE + 2
    assert stored.sha256 == hashlib.sha256(b"a" * CHUNK_SIZE + b"bc").hexdigest()


async def test_a_started_store_sweeps_failed_uploads(mongo_uri: str) -> None:
    database = _db_name()
    first = MongoStore(mongo_uri, database=database)
    await first.start()
    orphan = _upload_id(3 * 24 * 3600)
    await _orphan(first, orphan, range(2))
    second = MongoStore(mongo_uri, database=database, orphan_sweep_after_s=0)
    await second.start()
    try:
        deadline = time.monotonic() + WAIT
        while await first.chunks.count_documents({"files_id": orphan}):
            assert time.monotonic() < deadline, "the start-up sweep left the orphan"
            await asyncio.sleep(0.05)  # polling interval (deadline above)
    finally:
        await first.database.client.drop_database(database)
        await second.close()
        await first.close()
