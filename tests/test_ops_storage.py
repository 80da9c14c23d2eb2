"""What an operator meets on the storage side: a data directory that cannot be used,
a database that is not one or is corrupt, a second service on the same directory, a
full disk mid-traffic, a store that fails (and the alert that must then fire)."""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import shutil
import signal
import sqlite3
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit

import aiohttp
import grpc
import pytest
from prometheus_client import REGISTRY

from http_bridge.config import read_env_file
from jobwire.v1 import job_pb2, job_service_pb2, job_service_pb2_grpc, log_pb2
from service.domain.errors import StorageUnavailable
from service.store import embedded
from service.store.embedded import EmbeddedStore
from service.store.mongo import MongoStore
from tests.conftest import make_policy, open_test_store, start_service
from tests.helpers import (
    WAIT,
    cli_process,
    cli_result,
    create,
    free_port,
    progress,
    run_environment,
    until,
)
from tests.tcp_cutter import TcpCutter

ROOT = Path(__file__).resolve().parents[1]


async def _serve_result(data_dir: Path, mongodb_uri: str = "") -> tuple[int, str]:
    """`jobwire serve` on `data_dir` that must exit by itself: status and stderr."""
    proc = await cli_process(
        "serve",
        env={
            "JOBWIRE_DATA_DIR": str(data_dir),
            "JOBWIRE_GRPC_ADDR": f"127.0.0.1:{free_port()}",
            "JOBWIRE_METRICS_ADDR": "",
            "JOBWIRE_LOG_FORMAT": "text",
            "MONGODB_URI": mongodb_uri,
        },
    )
    try:
        _, err = await asyncio.wait_for(proc.communicate(), 3 * WAIT)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, err.decode(errors="replace")


@pytest.mark.parametrize("problem", ["a file", "not a database", "in use", "MongoDB down"])
async def test_serve_refuses_a_data_dir_it_cannot_use_naming_path_and_problem(
    tmp_path: Path, problem: str
) -> None:
    """`jobwire serve` on a data directory that is a file, holds a file that is not a
    database, or is in use by another service, or with MongoDB unreachable: exit 1
    with one line naming the path (server) and the problem, no traceback. It used to
    print a traceback (FileExistsError, sqlite3.DatabaseError, StorageUnavailable),
    and a second service on the same directory started as a second writer."""
    data = tmp_path / "data"
    holder: EmbeddedStore | None = None
    mongodb_uri = ""
    if problem == "a file":
        data.write_text("")
        # The problem, not mkdir's "[Errno 17] File exists", which read as if a directory
        # already there were the fault.
        expected = f"cannot use the data directory {data}: it is a file, not a directory"
    elif problem == "not a database":
        data.mkdir()
        (data / "jobwire.sqlite3").write_bytes(os.urandom(8192))
        expected = f"{data / 'jobwire.sqlite3'}: file is not a database"
    elif problem == "in use":
        holder = EmbeddedStore(data, make_policy())
        await holder.start()
        expected = f"{data} is in use by another jobwire service (pid {os.getpid()})"
    else:
        port = free_port()  # nothing listens there
        mongodb_uri = f"mongodb://127.0.0.1:{port}/?serverSelectionTimeoutMS=1000"
        expected = f"MongoDB unavailable (start): ServerSelectionTimeoutError: 127.0.0.1:{port}"
    try:
        code, err = await _serve_result(data, mongodb_uri)
    finally:
        if holder is not None:
            await holder.close()
    assert code == 1, err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert "cannot start: " in last and expected in last, err


async def test_a_second_store_on_the_same_directory_is_refused_until_the_first_closes(
    tmp_path: Path,
) -> None:
    first = EmbeddedStore(tmp_path / "data", make_policy())
    await first.start()
    second = EmbeddedStore(tmp_path / "data", make_policy())
    with pytest.raises(StorageUnavailable, match="is in use by another jobwire service"):
        await second.start()
    await first.close()
    await second.start()  # the lock goes with the store that held it
    await second.close()


async def test_a_corrupt_database_is_unavailable_naming_the_file(tmp_path: Path) -> None:
    """Pages of the jobs table overwritten (a bad disk, a copy of a live file): reads
    of those jobs answer UNAVAILABLE naming the database file and what to do, not
    UNKNOWN with "Unexpected <class 'sqlite3.DatabaseError'>" and a traceback."""
    data = tmp_path / "data"
    handle = await start_service(EmbeddedStore(data, make_policy()))
    for i in range(300):
        await create(handle.stub, job_id=f"j{i}", padding="x" * 200)
    await handle.close()
    db = data / "jobwire.sqlite3"
    with sqlite3.connect(db) as conn:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        (root,) = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'jobs'").fetchone()
    conn.close()
    with db.open("r+b") as f:
        f.seek((root - 1) * page_size)
        f.write(b"\xa5" * page_size)

    handle = await start_service(EmbeddedStore(data, make_policy()))
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await handle.stub.GetJob(job_service_pb2.GetJobRequest(id="j7"))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
        details = err.value.details() or ""
        assert str(db) in details and "malformed" in details and "backup" in details
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await handle.stub.ListJobs(job_service_pb2.ListJobsRequest())
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
    finally:
        await handle.close()


async def test_log_lines_from_before_log_kinds_get_their_jobs_kind(tmp_path: Path) -> None:
    """A data directory written before LogEntry.kind (its logs table has no kind
    column): on start its lines take their job's kind, so the video worker's list
    (ListLogs kind=VIDEO) still shows the videos' lines and none of other jobs."""
    data = tmp_path / "data"
    handle = await start_service(EmbeddedStore(data, make_policy()))
    await create(handle.stub, job_pb2.JOB_KIND_VIDEO, "old-video")
    await create(handle.stub, job_pb2.JOB_KIND_EXTRACTION, "old-doc")
    for job_id in ("old-video", "old-doc", ""):
        entry = log_pb2.LogEntry(job_id=job_id, level=log_pb2.LOG_LEVEL_INFO, message=f"l{job_id}")
        await handle.stub.WriteLog(job_service_pb2.WriteLogRequest(entry=entry))
    await handle.close()
    with sqlite3.connect(data / "jobwire.sqlite3") as conn:  # back to the older schema
        conn.execute("DROP INDEX logs_kind")
        conn.execute("ALTER TABLE logs DROP COLUMN kind")
    conn.close()
    handle = await start_service(EmbeddedStore(data, make_policy()))
    try:
        videos = await handle.stub.ListLogs(
            job_service_pb2.ListLogsRequest(kind=job_pb2.JOB_KIND_VIDEO)
        )
        assert [e.message for e in videos.entries] == ["lold-video"]
        every = await handle.stub.ListLogs(job_service_pb2.ListLogsRequest())
        assert len(every.entries) == 3
    finally:
        await handle.close()


async def test_mongo_log_lines_from_before_log_kinds_get_their_jobs_kind(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The same on MongoDB: lines written before LogEntry.kind have no `kind` field,
    and the video worker's list (ListLogs kind=VIDEO, `GET /api/log`) showed none of
    them after an upgrade. The store gives them their job's kind once, in the
    background after its start (a line of no job: none, as the embedded store does;
    it may be any writer's, so the video worker's key is not shown it)."""
    database = f"kinds_{os.getpid()}"
    store = await open_test_store("mongo", tmp_path, request, make_policy(), database)
    handle = await start_service(store)
    try:
        await create(handle.stub, job_pb2.JOB_KIND_VIDEO, "old-video")
        await create(handle.stub, job_pb2.JOB_KIND_EXTRACTION, "old-doc")
        for job_id in ("old-video", "old-doc", "UNKNOWN", "gone"):
            entry = log_pb2.LogEntry(job_id=job_id, level=log_pb2.LOG_LEVEL_INFO, message=job_id)
            await handle.stub.WriteLog(job_service_pb2.WriteLogRequest(entry=entry))
        assert isinstance(store, MongoStore)
        # Back to the older documents: no `kind` field.
        await store.logs.update_many({}, {"$unset": {"kind": ""}})
    finally:
        await handle.close()
    store = await open_test_store("mongo", tmp_path, request, make_policy(), database)
    assert isinstance(store, MongoStore)
    handle = await start_service(store)
    try:
        await store.old_logs_upgraded()
        videos = await handle.stub.ListLogs(
            job_service_pb2.ListLogsRequest(kind=job_pb2.JOB_KIND_VIDEO)
        )
        assert [e.message for e in videos.entries] == ["old-video"]
        docs = await handle.stub.ListLogs(
            job_service_pb2.ListLogsRequest(kind=job_pb2.JOB_KIND_EXTRACTION)
        )
        assert [e.message for e in docs.entries] == ["old-doc"]
        every = await handle.stub.ListLogs(job_service_pb2.ListLogsRequest())
        assert len(every.entries) == 4
        assert await store.logs.count_documents({"kind": {"$exists": False}}) == 0
    finally:
        await handle.close()


def _storage_errors(metrics: str) -> float:
    for line in metrics.splitlines():
        if line.startswith('jobwire_storage_errors_total{operation="rpc"}'):
            return float(line.split()[-1])
    return 0.0


async def _scrape(port: int) -> str:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/metrics") as reply,
    ):
        return await reply.text()


@pytest.mark.parametrize("store_kind", ["embedded", "mongo"])
async def test_calls_failing_on_storage_count_for_the_storage_alert(
    store_kind: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A call answered UNAVAILABLE because the store failed counts in
    jobwire_storage_errors_total{operation="rpc"}, the metric JobwireStorageUnavailable
    alerts on, and the service's log says why. Nothing counted it (the counting
    function was never called), so with the disk full or MongoDB gone the critical
    alert stayed silent, and the service logged nothing at all."""
    if store_kind == "embedded":
        store: EmbeddedStore | MongoStore = EmbeddedStore(tmp_path / "data", make_policy())
    else:
        # The test MongoDB behind a relay that can stop answering (`hold`).
        mongo_port = urlsplit(request.getfixturevalue("mongo_uri")).port or 27017
        relay = await TcpCutter(mongo_port).start()
        uri = f"mongodb://127.0.0.1:{relay.port}/"
        store = MongoStore(uri, policy=make_policy(), database="alert", timeout_ms=1000)
    handle = await start_service(store, metrics_addr="127.0.0.1:0")
    blocker = sqlite3.connect(tmp_path / "blocker.sqlite3")  # replaced below (embedded)
    try:
        port = handle.running.ops.metrics.port if handle.running.ops else 0
        await create(handle.stub, job_id="a")
        before = _storage_errors(await _scrape(port))
        if store_kind == "embedded":
            # Another connection holds the write lock past the store's busy timeout.
            blocker = sqlite3.connect(tmp_path / "data" / "jobwire.sqlite3", isolation_level=None)
            blocker.execute("BEGIN EXCLUSIVE")
        else:
            relay.hold = True  # MongoDB stops answering
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await handle.stub.WriteLog(
                job_service_pb2.WriteLogRequest(
                    entry=log_pb2.LogEntry(job_id="a", level=log_pb2.LOG_LEVEL_INFO, message="m")
                ),
                timeout=3 * WAIT,
            )
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
        assert _storage_errors(await _scrape(port)) == before + 1
        warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert f"calls fail: {err.value.details()}" in warned, warned
    finally:
        blocker.close()
        await handle.close()
        if store_kind == "mongo":
            await relay.close()


async def test_a_full_disk_mid_traffic_is_unavailable_and_heals_when_space_is_freed(
    tmp_path: Path,
) -> None:
    """`jobwire serve` whose files may not grow (RLIMIT_FSIZE lowered on the running
    process: the kernel answers its writes as a full disk would, EFBIG instead of
    ENOSPC, without a mount): commits and an artifact upload answer UNAVAILABLE naming
    the data directory (the upload was UNKNOWN, "Unexpected <class 'OSError'>"), and
    count for the storage alert; with the limit lifted the same service accepts them
    again, and nothing acknowledged before is lost."""
    data = tmp_path / "data"
    port, metrics_port = free_port(), free_port()
    proc = await cli_process(
        "serve",
        env={
            "JOBWIRE_DATA_DIR": str(data),
            "JOBWIRE_GRPC_ADDR": f"127.0.0.1:{port}",
            "JOBWIRE_METRICS_ADDR": f"127.0.0.1:{metrics_port}",
            "JOBWIRE_LOG_FORMAT": "text",
            "MONGODB_URI": "",
        },
    )
    unlimited = resource.getrlimit(resource.RLIMIT_FSIZE)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = job_service_pb2_grpc.JobServiceStub(channel)

    async def upload(size: int) -> object:
        async def parts() -> AsyncIterator[job_service_pb2.UploadArtifactRequest]:
            header = job_service_pb2.ArtifactHeader(job_id="full", name="images.zip")
            yield job_service_pb2.UploadArtifactRequest(header=header)
            yield job_service_pb2.UploadArtifactRequest(data=b"z" * size)

        return await stub.UploadArtifact(parts(), timeout=WAIT)

    try:
        await channel.channel_ready()
        await create(stub, job_pb2.JOB_KIND_EXTRACTION, "full")
        for pct in range(1, 11):
            await stub.ReportEvent(progress("full", pct), timeout=WAIT)
        # Exported at 0 before the first error: Prometheus' increase() (the alert's
        # expression) cannot see the first error of a series born with it.
        assert 'jobwire_storage_errors_total{operation="rpc"} 0.0' in await _scrape(metrics_port)
        wal = data / "jobwire.sqlite3-wal"
        resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (wal.stat().st_size, unlimited[1]))

        with pytest.raises(grpc.aio.AioRpcError) as err:
            await upload(1 << 20)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
        assert str(data) in (err.value.details() or "")
        failures = []
        for pct in range(11, 60):  # the WAL's next writes pass the limit
            try:
                await stub.ReportEvent(progress("full", pct), timeout=WAIT)
            except grpc.aio.AioRpcError as e:
                failures.append(e)
        assert failures, "no commit failed with the file size limit"
        assert {e.code() for e in failures} == {grpc.StatusCode.UNAVAILABLE}
        assert all(str(data) in (e.details() or "") for e in failures)
        assert _storage_errors(await _scrape(metrics_port)) == 1 + len(failures)

        resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, unlimited)  # space freed
        await stub.ReportEvent(progress("full", 99), timeout=WAIT)
        assert (await upload(1 << 20)).size_bytes == 1 << 20  # type: ignore[attr-defined]
        job = await stub.GetJob(job_service_pb2.GetJobRequest(id="full"))
        assert job.progress.percent == 99
        events = await stub.ListJobEvents(job_service_pb2.ListJobEventsRequest(job_id="full"))
        assert [e.progress.percent for e in events.events][:10] == list(range(1, 11))
    finally:
        await channel.close()
        if proc.returncode is None:
            proc.terminate()
        _, stderr = await asyncio.wait_for(proc.communicate(), 3 * WAIT)
        assert "Traceback" not in stderr.decode(errors="replace")


# README "Backups", the embedded store: the database copied by SQLite's online backup
# while the service runs (the image has Python, not the sqlite3 shell), then artifacts/.
BACKUP_COMMAND = (
    "import sqlite3; sqlite3.connect('data/jobwire.sqlite3')"
    ".backup(sqlite3.connect('backup/jobwire.sqlite3'))"
)


async def test_a_backup_under_traffic_restores_into_a_fresh_directory(tmp_path: Path) -> None:
    """The README's backup procedure followed while callbacks flow, restored into
    another directory after the original is lost: every job acknowledged before the
    backup began is there, and the artifacts are readable. Artifacts were lost: rows
    held their files' absolute paths, which pointed into the directory that was gone
    (ReadArtifact: UNKNOWN, FileNotFoundError)."""
    data = tmp_path / "data"
    handle = await start_service(EmbeddedStore(data, make_policy()))
    created = await create(handle.stub, job_pb2.JOB_KIND_EXTRACTION, "doc")
    payload = os.urandom(300_000)

    async def parts() -> AsyncIterator[job_service_pb2.UploadArtifactRequest]:
        header = job_service_pb2.ArtifactHeader(
            job_id="doc", name="text.txt", callback_token=created.callback_token
        )
        yield job_service_pb2.UploadArtifactRequest(header=header)
        yield job_service_pb2.UploadArtifactRequest(data=payload)

    await handle.stub.UploadArtifact(parts())
    acked: list[str] = []
    enough = asyncio.Event()
    stop = asyncio.Event()

    async def traffic() -> None:
        n = 0
        while not stop.is_set():
            job_id = f"t{n}"
            n += 1
            await create(handle.stub, job_id=job_id)
            await handle.stub.ReportEvent(progress(job_id, 50))
            acked.append(job_id)
            if len(acked) >= 50:
                enough.set()

    writer = asyncio.create_task(traffic())
    try:
        await asyncio.wait_for(enough.wait(), 3 * WAIT)
        before_backup = list(acked)
        (tmp_path / "backup").mkdir()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", BACKUP_COMMAND, cwd=tmp_path
        )
        assert await asyncio.wait_for(proc.wait(), 3 * WAIT) == 0
        await asyncio.to_thread(shutil.copytree, data / "artifacts", tmp_path / "backup/artifacts")
        assert not writer.done()  # the backup ran under traffic
    finally:
        stop.set()
        await writer
        await handle.close()

    shutil.rmtree(data)  # the original volume is gone
    restored = tmp_path / "restored"
    (tmp_path / "backup").rename(restored)
    handle = await start_service(EmbeddedStore(restored, make_policy()))
    try:
        for job_id in before_backup:
            job = await handle.stub.GetJob(job_service_pb2.GetJobRequest(id=job_id))
            assert job.progress.percent == 50, job_id
        reply = handle.stub.ReadArtifact(
            job_service_pb2.ReadArtifactRequest(job_id="doc", name="text.txt")
        )
        chunks = [part.data async for part in reply]
        assert b"".join(chunks) == payload
    finally:
        await handle.close()


async def test_jobwire_run_says_when_it_cannot_write_its_env_file(tmp_path: Path) -> None:
    """`jobwire run` generates missing secrets into JOBWIRE_ENV_FILE; a path it cannot
    write (a directory that does not exist, a read-only checkout) ended it with a
    traceback (FileNotFoundError). Now exit 1 with one line naming the file, the
    problem and the ways out; nothing was started."""
    _, env = run_environment(tmp_path)
    env_file = tmp_path / "missing-dir" / "jobwire.env"
    env["JOBWIRE_ENV_FILE"] = str(env_file)
    for name in ("API_KEY", "BATCH_CALLBACK_SECRET", "TRANSCODE_CALLBACK_TOKEN"):
        env[name] = ""
    code, out, err = await cli_result("run", env=env)
    assert code == 1, out + err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert f"cannot write random secrets for the HTTP bridge to {env_file}" in last, err
    assert "No such file or directory" in last and "in the environment" in last, err
    assert not (tmp_path / "data").exists()  # the service was not started


async def test_jobwire_run_keeps_the_last_line_of_an_env_file_without_a_final_newline(
    tmp_path: Path,
) -> None:
    """An env file whose last line has no newline (`printf 'API_KEY=%s' ...`): the
    secrets `jobwire run` generated were appended to that line, so the file's API_KEY
    became `site-key# generated by jobwire: ...`, and from the next start on the video
    worker's key got 401."""
    ports, env = run_environment(tmp_path)
    env_file = Path(env["JOBWIRE_ENV_FILE"])
    await asyncio.to_thread(env_file.write_text, "API_KEY=site-key")
    for name in ("API_KEY", "BATCH_CALLBACK_SECRET", "TRANSCODE_CALLBACK_TOKEN"):
        env[name] = ""
    log_path = tmp_path / "run.log"
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cli", "run", env={**os.environ, **env}, stdout=log, stderr=log
        )
    try:
        await until(lambda: b"bridge on http://" in log_path.read_bytes(), timeout=60)
        url = f"http://127.0.0.1:{ports['http']}/api/pending"
        async with aiohttp.ClientSession() as session:
            bearer = {"Authorization": "Bearer site-key"}
            async with session.get(url, headers=bearer) as reply:
                assert reply.status == 204, await reply.text()  # the key works; no job
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 30)
    assert read_env_file(env_file)["API_KEY"] == "site-key"
    lines = (await asyncio.to_thread(env_file.read_text)).splitlines()
    assert lines[0] == "API_KEY=site-key", lines
    assert [line.partition("=")[0] for line in lines[1:] if not line.startswith("#")] == [
        "BATCH_CALLBACK_SECRET",
        "TRANSCODE_CALLBACK_TOKEN",
        "JOBWIRE_DASHBOARD_TOKEN",
    ], lines


async def test_mongodb_out_of_space_is_unavailable_and_heals(tmp_path: Path) -> None:
    """The MongoDB server's disk full (FerretDB's files may not grow: RLIMIT_FSIZE on its
    process): writes fail with a server error (FerretDB: InternalError "disk I/O
    error"), which an artifact upload or a log line answered UNKNOWN, "Unexpected
    <class 'pymongo.errors.OperationFailure'>" (the bridge: 500). They are UNAVAILABLE
    now, like a commit, and succeed again once the server can write."""
    if os.environ.get("MONGODB_URI"):
        pytest.skip("needs a FerretDB whose files this test limits; MONGODB_URI is external")
    from tests.mongo_server import FerretDBProcess, require_ferretdb

    server = FerretDBProcess(require_ferretdb(), base_dir=tmp_path / "ferretdb")
    await asyncio.to_thread(server.start)
    unlimited = resource.getrlimit(resource.RLIMIT_FSIZE)
    handle = await start_service(
        MongoStore(server.uri, policy=make_policy(), database="full", timeout_ms=5000)
    )
    created = await create(handle.stub, job_pb2.JOB_KIND_EXTRACTION, "full")

    async def upload() -> object:
        async def parts() -> AsyncIterator[job_service_pb2.UploadArtifactRequest]:
            header = job_service_pb2.ArtifactHeader(
                job_id="full", name="a.zip", callback_token=created.callback_token
            )
            yield job_service_pb2.UploadArtifactRequest(header=header)
            yield job_service_pb2.UploadArtifactRequest(data=os.urandom(1 << 20))

        return await handle.stub.UploadArtifact(parts(), timeout=3 * WAIT)

    def log_line(n: int) -> job_service_pb2.WriteLogRequest:
        entry = log_pb2.LogEntry(job_id="full", level=log_pb2.LOG_LEVEL_INFO, message=f"m{n}")
        return job_service_pb2.WriteLogRequest(entry=entry)

    try:
        sizes = [p.stat().st_size for p in server.data_dir.rglob("*") if p.is_file()]
        assert server._proc is not None
        resource.prlimit(server._proc.pid, resource.RLIMIT_FSIZE, (max(sizes), unlimited[1]))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await upload()
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
        assert "MongoDB" in (err.value.details() or "")
        codes = set()
        for n in range(50):
            try:
                await handle.stub.WriteLog(log_line(n), timeout=3 * WAIT)
            except grpc.aio.AioRpcError as e:
                codes.add(e.code())
        assert codes == {grpc.StatusCode.UNAVAILABLE}, codes

        resource.prlimit(server._proc.pid, resource.RLIMIT_FSIZE, unlimited)  # space freed
        await handle.stub.WriteLog(log_line(99), timeout=3 * WAIT)
        assert (await upload()).size_bytes == 1 << 20  # type: ignore[attr-defined]
    finally:
        await handle.close()
        await asyncio.to_thread(server.cleanup)


async def test_uploads_cut_off_by_a_crash_are_cleared_at_start(tmp_path: Path) -> None:
    """An artifact upload in progress when the service died (SIGKILL, OOM, power) left
    its partial file in artifacts/.tmp for good: each crash could keep up to an
    upload's size (256 MiB) of disk. At start nothing can be uploading (the data
    directory is locked to this store), so what is there is removed."""
    data = tmp_path / "data"
    first = EmbeddedStore(data, make_policy())
    await first.start()
    await first.close()
    leftover = data / "artifacts" / ".tmp" / "0123456789abcdef"
    leftover.write_bytes(b"x" * 4096)
    store = EmbeddedStore(data, make_policy())
    await store.start()
    try:
        assert not leftover.exists()
    finally:
        await store.close()


async def test_an_upload_cancelled_while_its_file_opens_leaves_no_handle_or_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The embedded store opens an upload's temporary file in a worker thread. An
    UploadArtifact cancelled during that open left the thread's file open, unreferenced
    (closed only by the garbage collector), and the file in artifacts/.tmp until the
    next start. The open is held at a gate until the service has seen the cancel."""
    entered, release = threading.Event(), threading.Event()
    opened: list[IO[bytes]] = []
    real_open = open

    def gated_open(path: Path, mode: str = "r") -> IO[bytes]:
        if mode == "wb" and not opened:  # the first upload's temporary file
            entered.set()
            release.wait(WAIT)
            opened.append(real_open(path, mode))  # held to see it closed
            return opened[0]
        return real_open(path, mode)

    monkeypatch.setattr(embedded, "open", gated_open, raising=False)
    before = requests_counted("UploadArtifact", "CANCELLED")
    handle = await start_service(EmbeddedStore(tmp_path / "data", make_policy()))
    try:
        await create(handle.stub, job_id="up")

        async def parts() -> AsyncIterator[job_service_pb2.UploadArtifactRequest]:
            header = job_service_pb2.ArtifactHeader(job_id="up", name="a.bin", size=1)
            yield job_service_pb2.UploadArtifactRequest(header=header)
            await asyncio.Event().wait()  # the data never comes: the client gives up

        call = handle.stub.UploadArtifact(parts())
        await until(entered.is_set)
        call.cancel()
        await until(lambda: requests_counted("UploadArtifact", "CANCELLED") > before)
        release.set()
        await until(lambda: bool(opened) and opened[0].closed)
        await until(lambda: not any((tmp_path / "data" / "artifacts" / ".tmp").iterdir()))
        # and the store takes the next upload
        header = job_service_pb2.ArtifactHeader(job_id="up", name="a.bin")
        again = [
            job_service_pb2.UploadArtifactRequest(header=header),
            job_service_pb2.UploadArtifactRequest(data=b"kept"),
        ]
        assert (await handle.stub.UploadArtifact(iter(again))).size_bytes == 4
    finally:
        release.set()
        await handle.close()


def requests_counted(method: str, code: str) -> float:
    value = REGISTRY.get_sample_value(
        "jobwire_grpc_requests_total", {"method": method, "code": code}
    )
    return value or 0.0


@pytest.mark.parametrize(
    ("setting", "where"),
    [
        ("", "data"),
        ("~/jobwire-data", "home/jobwire-data"),
        # Spaces and line breaks at either end (`JOBWIRE_DATA_DIR= ` in an env file, a
        # ConfigMap value from a file): a directory named " " or "jobwire-data\n" in the
        # working directory, beside the volume mounted for the data.
        (" ", "data"),
        ("jobwire-data\n", "jobwire-data"),
    ],
)
async def test_the_data_dir_setting_means_what_an_operator_wrote(
    tmp_path: Path, setting: str, where: str
) -> None:
    """JOBWIRE_DATA_DIR="" (an unfilled template value) put the database, its WAL and
    artifacts/ straight into the working directory (Path("") is "."); empty now means
    unset, as for the other settings: ./data. "~/jobwire-data" from an env file (no
    shell to expand it) made a directory named "~" in the working directory; it is
    the home directory's now."""
    (tmp_path / "home").mkdir()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cli",
        "serve",
        cwd=tmp_path,
        env={
            **os.environ,
            "PYTHONPATH": str(ROOT),  # the tree under test, from another directory
            "HOME": str(tmp_path / "home"),
            "JOBWIRE_DATA_DIR": setting,
            "JOBWIRE_GRPC_ADDR": f"127.0.0.1:{free_port()}",
            "JOBWIRE_METRICS_ADDR": "",
            "MONGODB_URI": "",
        },
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await until(lambda: bool(_databases(tmp_path)), timeout=3 * WAIT)
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.communicate(), 3 * WAIT)
    assert _databases(tmp_path) == [tmp_path / where / "jobwire.sqlite3"]


def _databases(root: Path) -> list[Path]:
    return list(root.rglob("jobwire.sqlite3"))


async def test_a_data_dir_the_store_makes_is_private_to_its_user(tmp_path: Path) -> None:
    """The database and artifacts/ hold every job's payload, logs and outputs, which the
    service hands out only to a token's holder: a new ./data was made 0755 (its files
    0644), so every local user could read them all. A directory the store makes is 0700
    now; one the operator made keeps its mode (the image's 0750)."""
    made, given = tmp_path / "new" / "data", tmp_path / "given"
    given.mkdir(mode=0o750)
    given.chmod(0o750)  # whatever the umask
    for data in (made, given):
        store = EmbeddedStore(data, make_policy())
        await store.start()
        await store.close()
    assert made.stat().st_mode & 0o777 == 0o700
    assert given.stat().st_mode & 0o777 == 0o750
