"""The MongoDB store when the database misbehaves, with real processes: credentials
refused at run time; bad settings, an unreachable or refusing server at start.

(Outages by SIGKILL are in test_mongo_specific.py and test_cross_replica.py.)
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from pymongo import AsyncMongoClient

from jobwire.v1 import event_pb2, job_pb2, job_service_pb2, log_pb2
from service.config import Settings
from service.store.factory import open_store
from service.store.mongo import MongoStore
from tests.conftest import make_policy, start_service
from tests.helpers import (
    cli_result,
    completed,
    create,
    eventually,
    free_port,
    progress,
    read,
    read_all,
    until,
)
from tests.mongo_server import FerretDBProcess, require_ferretdb
from tests.mongo_wire_faults import WriteConcernFaults
from tests.tcp_cutter import TcpCutter

# A server restarted or a password rotated: the service heals within this.
OUTAGE_WAIT = 20.0
ADMIN_PASSWORD = "adm1n-pw-for-tests"
PASSWORD = "svc-Pa55word-9f2c"
ROTATED = "rotated-Pa55word-77aa"


def _own_ferretdb() -> None:
    if os.environ.get("MONGODB_URI"):
        pytest.skip("needs a FerretDB this test controls; MONGODB_URI names an external server")


@pytest.fixture
async def auth_server() -> AsyncIterator[FerretDBProcess]:
    """A FerretDB that requires a login, with the user `svc` (PASSWORD) on `jobwire`."""
    _own_ferretdb()
    server = FerretDBProcess.with_user(require_ferretdb(), "admin", ADMIN_PASSWORD, "jobwire")
    try:
        server.start()
        await _admin(server, "createUser", "svc", pwd=PASSWORD, roles=[])
        yield server
    finally:
        server.cleanup()


async def _admin(server: FerretDBProcess, *command: object, **options: object) -> None:
    uri = f"mongodb://admin:{ADMIN_PASSWORD}@127.0.0.1:{server.port}/jobwire"
    client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(uri)
    try:
        await client["jobwire"].command(*command, **options)  # type: ignore[call-overload]
    finally:
        await client.close()


async def test_refused_credentials_are_unavailable_and_heal_without_a_restart(
    auth_server: FerretDBProcess, caplog: pytest.LogCaptureFixture
) -> None:
    """A password rotated under a running service (the database restarted, so every
    connection logs in again): each call answers UNAVAILABLE naming MongoDB and the
    credentials (was: UNKNOWN "Unexpected <class 'pymongo.errors.OperationFailure'>",
    HTTP 500 at the bridge), and the lease sweeps keep running (was: the sweeper task
    died on the first refusal, so no lease ever lapsed again until jobwire restarted),
    saying so once, not every tick."""
    caplog.set_level(logging.INFO, logger="jobwire.jobs")
    uri = f"mongodb://svc:{PASSWORD}@127.0.0.1:{auth_server.port}/jobwire"
    store = MongoStore(uri, policy=make_policy(), timeout_ms=2000)
    handle = await start_service(store, lease_sweep_seconds=0.05)
    try:
        stub = handle.stub
        await create(stub, job_id="steady")
        await create(stub, job_id="leased")
        claimed = await stub.ClaimJob(
            job_service_pb2.ClaimJobRequest(
                kind=job_pb2.JOB_KIND_GENERIC, worker_id="w", lease_duration=Duration(seconds=5)
            )
        )
        assert claimed.job.id == "steady"  # the older one
        lapses_ns = claimed.job.lease_expire_time.ToNanoseconds()
        await create(stub, job_id="other")

        await _admin(auth_server, "updateUser", "svc", pwd=ROTATED)
        auth_server.kill()
        auth_server.start()  # same port and data: the store's connections log in anew
        assert time.time_ns() < lapses_ns, (
            "the lease lapsed too early: only a sweeper that survived may requeue it"
        )

        calls: dict[str, Callable[[], Awaitable[Any]]] = {
            "ReportEvent": lambda: stub.ReportEvent(progress("other", 5), timeout=10),
            "GetJob": lambda: stub.GetJob(job_service_pb2.GetJobRequest(id="other"), timeout=10),
            "CreateJob": lambda: create(stub, job_id="during"),
            "ListJobs": lambda: stub.ListJobs(job_service_pb2.ListJobsRequest(), timeout=10),
            "ClaimJob": lambda: stub.ClaimJob(
                job_service_pb2.ClaimJobRequest(kind=job_pb2.JOB_KIND_GENERIC), timeout=10
            ),
        }
        for name, call in calls.items():
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call()
            details = refused.value.details() or ""
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, (name, details)
            assert "MongoDB refused the credentials of MONGODB_URI" in details, (name, details)
            assert PASSWORD not in details and ROTATED not in details

        async def sweep_refused() -> bool:  # logged once, not once per 50 ms tick
            return any("lease sweep failed" in r.getMessage() for r in caplog.records)

        await eventually(sweep_refused, OUTAGE_WAIT, "a lease sweep refused by MongoDB")
        await _admin(auth_server, "updateUser", "svc", pwd=PASSWORD)

        async def answers() -> bool:
            try:
                await stub.ReportEvent(progress("other", 6), timeout=10)
            except grpc.aio.AioRpcError as err:
                assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
                return False
            return True

        await eventually(answers, OUTAGE_WAIT, "ReportEvent after the password was restored")

        async def requeued() -> bool:  # the sweeper, still running, expires the lease
            job = await stub.GetJob(job_service_pb2.GetJobRequest(id="steady"))
            return bool(job.state == job_pb2.JOB_STATE_QUEUED)

        await eventually(requeued, OUTAGE_WAIT, "the lapsed lease requeued by the sweeper")
        assert not handle.running.sweeper.done()
        failures = [r for r in caplog.records if "lease sweep failed" in r.getMessage()]
        assert len(failures) == 1, [r.getMessage() for r in failures]
        assert any("lease sweep resumed" in r.getMessage() for r in caplog.records)
    finally:
        await handle.close()


BAD_SETTINGS = [
    ("MONGODB_URI", f"mongo://svc:{PASSWORD}@db.example.com/jobwire", "Invalid URI scheme"),
    ("MONGODB_URI", f"mongodb://svc:{PASSWORD}@x@db.example.com/", "must be escaped"),
    ("MONGODB_URI", f"mongodb://svc:{PASSWORD}@db.example.com/?tls=yes", "tls"),
    ("MONGODB_URI", f"mongodb://svc:{PASSWORD}@db.example.com/?retryWrite=true", "'retryWrite'"),
    ("MONGODB_URI", f"mongodb+srv://svc:{PASSWORD}@db.example.com:27017/", "port"),
    # TLS files the driver reads as the client is made: a file that is missing, a
    # directory or no PEM was an OSError / SSLError traceback.
    *(
        ("MONGODB_URI", f"mongodb://svc:{PASSWORD}@db/?tls=true&{option}={path}", option)
        for option, path in (
            ("tlsCAFile", "/nonexistent/ca.pem"),
            ("tlsCAFile", "/"),
            ("tlsCAFile", __file__),
            ("tlsCertificateKeyFile", "/nonexistent/client.pem"),
            ("tlsCRLFile", "/nonexistent/crl.pem"),
        )
    ),
    # A secret file's trailing newline (kubectl create secret --from-file): the database
    # was "jobwire\n" (FerretDB: an InvalidNamespace traceback at start; MongoDB: another,
    # empty database), and a URI of a bare newline waited for a host named "\n".
    *(
        ("MONGODB_URI", uri, "trailing newline")
        for uri in (f"mongodb://svc:{PASSWORD}@db.example.com/jobwire\n", "\n", " mongodb://db/")
    ),
    ("JOBWIRE_MONGODB_TIMEOUT_MS", "soon", "'soon'"),
    # Past the driver's bound (11.6 days) the message blamed MONGODB_URI's timeoutMS.
    ("JOBWIRE_MONGODB_TIMEOUT_MS", "1000000000", "'1000000000'"),
    ("JOBWIRE_MONGODB_TIMEOUT_MS", "0", "'0'"),
    ("JOBWIRE_MONGODB_W", "0", "'0'"),
    ("JOBWIRE_MONGODB_READ_PREFERENCE", "sideways", "'sideways'"),
    ("JOBWIRE_MONGODB_DB", "jobs/prod", "'jobs/prod'"),
    ("JOBWIRE_MONGODB_DB", "j" * 64, "longer than 63 bytes"),
]


@pytest.mark.parametrize(("var", "value", "reason"), BAD_SETTINGS)
def test_a_bad_mongodb_setting_stops_the_service_with_one_line(
    monkeypatch: pytest.MonkeyPatch, var: str, value: str, reason: str
) -> None:
    """As every other setting (README "Configuration"): one line naming the variable and
    the problem, exit status 1. Was a traceback (pymongo's InvalidURI, the adapter's
    ValueError), and a bad URI option (`tls=yes`, a misspelt `retryWrite`) only a
    warning, the option ignored: `tls=yes` connected in the clear. `w=0` was accepted:
    writes acknowledged before MongoDB has them; a bad database name was pymongo's
    InvalidName traceback. The password is never printed."""
    monkeypatch.setenv("MONGODB_URI", "mongodb://127.0.0.1:1/")
    monkeypatch.setenv(var, value)
    with pytest.raises(SystemExit) as stopped:
        open_store(Settings(mongodb_uri=os.environ["MONGODB_URI"]))
    message = str(stopped.value.code)
    assert message.startswith(var) and reason in message, message
    assert "\n" not in message and PASSWORD not in message


@pytest.mark.parametrize("problem", ["unreachable", "credentials"])
async def test_the_service_exits_with_one_line_when_mongodb_cannot_be_used(
    tmp_path: Path, problem: str
) -> None:
    """`jobwire serve` with MongoDB down or refusing the login: after the timeout, one
    line naming the problem and exit status 1 (a supervisor restarts it). Was a
    traceback for refused credentials. The password is never printed."""
    _own_ferretdb()
    server: FerretDBProcess | None = None
    if problem == "unreachable":
        uri = f"mongodb://svc:{PASSWORD}@127.0.0.1:{free_port()}/jobwire"
        expected = "cannot start: MongoDB unavailable (start)"
    else:
        server = FerretDBProcess.with_user(require_ferretdb(), "admin", ADMIN_PASSWORD, "jobwire")
        server.start()
        uri = f"mongodb://admin:{PASSWORD}@127.0.0.1:{server.port}/jobwire"
        expected = "cannot start: MongoDB refused the credentials of MONGODB_URI (start)"
    try:
        env = {
            "MONGODB_URI": uri,
            "JOBWIRE_MONGODB_TIMEOUT_MS": "1000",
            "JOBWIRE_GRPC_ADDR": "127.0.0.1:0",
            "JOBWIRE_METRICS_ADDR": "",
            "JOBWIRE_DATA_DIR": str(tmp_path / "data"),
            "JOBWIRE_LOG_FORMAT": "text",
        }
        code, out, err = await cli_result("serve", env=env, timeout=60)
    finally:
        if server is not None:
            server.cleanup()
    assert code == 1, (out, err)
    assert expected in err, err
    assert "Traceback" not in out + err and PASSWORD not in out + err


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        # The SRV lookup happens at the first operation: pymongo's ConfigurationError
        # from the `buildInfo` in MongoStore.start was an 88-line traceback.
        ("cluster0.doesnotexist-audit.invalid", "cannot start: MongoDB unavailable (start)"),
        # An IP address is no SRV name: refused before anything starts.
        ("127.0.0.1", "MONGODB_URI is not a valid MongoDB URI"),
    ],
)
async def test_an_srv_uri_that_cannot_be_resolved_stops_the_service_with_one_line(
    tmp_path: Path, host: str, expected: str
) -> None:
    env = {
        "MONGODB_URI": f"mongodb+srv://svc:{PASSWORD}@{host}/jobwire",
        "JOBWIRE_MONGODB_TIMEOUT_MS": "1000",
        "JOBWIRE_GRPC_ADDR": "127.0.0.1:0",
        "JOBWIRE_METRICS_ADDR": "",
        "JOBWIRE_DATA_DIR": str(tmp_path / "data"),
        "JOBWIRE_LOG_FORMAT": "text",
    }
    code, out, err = await cli_result("serve", env=env, timeout=60)
    assert code == 1, (out, err)
    assert expected in err and "MONGODB_URI" in err, err
    assert "Traceback" not in out + err and PASSWORD not in out + err
    assert len(err.strip().splitlines()) == 1, err


async def test_a_ferretdb_server_is_named_at_start_with_its_limit(
    mongo_uri: str, caplog: pytest.LogCaptureFixture
) -> None:
    """FerretDB v1 lets two concurrent conditional updates of one document both match,
    so two service replicas writing one job lose acknowledged events (the adapter's
    per-job lock covers one process only). Nothing said so at start."""
    caplog.set_level(logging.WARNING, logger="jobwire.store.mongo")
    store = MongoStore(mongo_uri, policy=make_policy(), database="ferretdb_note")
    await store.start()
    try:
        info = await store.database.client.admin.command("buildInfo")
    finally:
        await store.database.client.drop_database("ferretdb_note")
        await store.close()
    notes = [r.getMessage() for r in caplog.records if "run ONE service replica" in r.getMessage()]
    if "ferretdbVersion" in info:
        assert len(notes) == 1 and info["ferretdbVersion"] in notes[0], notes
    else:
        assert notes == []


async def test_a_callback_whose_reply_was_lost_reaches_every_stream_once(
    tmp_path: Path,
) -> None:
    """The job update landed, its reply was lost (connection reset), ReportEvent said
    UNAVAILABLE and the worker retried: the retry is acknowledged as a duplicate. The
    event must still reach WatchJob and WatchJobs, once. Was: neither ever saw it (the
    retry is Unchanged, so nothing was published or written to the firehose log), and
    a COMPLETED lost this way left WatchJob streams open for good."""
    _own_ferretdb()
    server = FerretDBProcess(require_ferretdb(), base_dir=tmp_path / "ferretdb")
    server.start()
    cutter = await TcpCutter(server.port).start()
    store = MongoStore(
        f"mongodb://127.0.0.1:{cutter.port}/", policy=make_policy(), database="lost_reply"
    )
    handle = await start_service(store, lease_sweep_seconds=0.05)
    direct: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(server.uri)
    try:
        stub = handle.stub
        await create(stub, job_id="j")
        watch = stub.WatchJob(job_service_pb2.WatchJobRequest(id="j"))
        assert (await read(watch)).HasField("snapshot")
        firehose = stub.WatchJobs(job_service_pb2.WatchJobsRequest())
        await stub.ReportEvent(progress("j", 10))
        assert (await read(watch)).event.sequence == 1
        assert (await read(firehose)).event.sequence == 1

        cutter.hold_after = b"\x02update\x00"  # the reply to the job's update is held
        first = asyncio.ensure_future(stub.ReportEvent(completed("j"), timeout=30))

        async def landed() -> bool:
            doc = await direct["lost_reply"]["jobs"].find_one({"_id": "j"}, {"seq": 1})
            return bool(doc and doc["seq"] == 2)

        await eventually(landed, OUTAGE_WAIT, "the update reaching the database")
        cutter.cut()
        with pytest.raises(grpc.aio.AioRpcError) as lost:
            await first
        assert lost.value.code() == grpc.StatusCode.UNAVAILABLE, lost.value.details()

        async def retried() -> bool:
            try:
                reply = await stub.ReportEvent(completed("j"), timeout=10)
            except grpc.aio.AioRpcError as err:
                assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
                return False
            assert reply.duplicate and reply.sequence == 2, reply
            return True

        await eventually(retried, OUTAGE_WAIT, "the retried callback acknowledged")
        rest = await read_all(watch, timeout=10)
        assert [item.event.sequence for item in rest] == [2]
        assert rest[0].event.type == event_pb2.EVENT_TYPE_COMPLETED
        item = await read(firehose, timeout=10)
        assert (item.event.job_id, item.event.sequence) == ("j", 2)
        events = await stub.ListJobEvents(job_service_pb2.ListJobEventsRequest(job_id="j"))
        assert [e.sequence for e in events.events] == [1, 2]
        firehose.cancel()
    finally:
        await direct.close()
        await handle.close()
        await cutter.close()
        server.cleanup()


async def test_a_frozen_database_bounds_every_call_and_the_service_recovers(
    tmp_path: Path,
) -> None:
    """MongoDB frozen (SIGSTOP): a call with a deadline ends by it, one without ends
    UNAVAILABLE within the store's budget (timeoutMS), nothing hangs; after SIGCONT
    the same service writes and streams again."""
    _own_ferretdb()
    server = FerretDBProcess(require_ferretdb(), base_dir=tmp_path / "ferretdb")
    server.start()
    store = MongoStore(server.uri, policy=make_policy(), database="frozen", timeout_ms=1500)
    handle = await start_service(store, lease_sweep_seconds=0.05)
    frozen = False
    try:
        stub = handle.stub
        await create(stub, job_id="f")
        watch = stub.WatchJob(job_service_pb2.WatchJobRequest(id="f"))
        assert (await read(watch)).HasField("snapshot")
        assert server.pid is not None
        os.kill(server.pid, signal.SIGSTOP)
        frozen = True
        calls: dict[str, tuple[float | None, Callable[[float | None], Awaitable[Any]]]] = {
            "ReportEvent, 1 s deadline": (
                1.0,
                lambda t: stub.ReportEvent(progress("f", 1), timeout=t),
            ),
            "GetJob": (None, lambda t: stub.GetJob(job_service_pb2.GetJobRequest(id="f"))),
            "CreateJob": (None, lambda t: create(stub, job_id="g")),
            "ReportEvent": (None, lambda t: stub.ReportEvent(progress("f", 2))),
        }
        for name, (deadline, call) in calls.items():
            began = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await call(deadline)
            took = time.monotonic() - began
            code = failed.value.code()
            assert code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
            # A call may queue behind one commit in flight: up to two budgets, plus slack.
            assert took < (deadline or 2 * 1.5) + 1.5, (name, took, code)
            print(f"{name} frozen: {code.name} after {took:.2f}s")
        os.kill(server.pid, signal.SIGCONT)
        frozen = False

        async def writes() -> bool:
            try:
                await stub.ReportEvent(progress("f", 3), timeout=5)
            except grpc.aio.AioRpcError as err:
                assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
                return False
            return True

        await eventually(writes, OUTAGE_WAIT, "a write after SIGCONT")
        seen = [(await read(watch)).event.sequence]
        job = await stub.GetJob(job_service_pb2.GetJobRequest(id="f"))
        while seen[-1] < job.sequence:
            seen.append((await read(watch)).event.sequence)
        assert seen == list(range(1, job.sequence + 1))  # no gap, no repeat
        watch.cancel()
    finally:
        if frozen and server.pid is not None:
            os.kill(server.pid, signal.SIGCONT)
        await handle.close()
        server.cleanup()


async def test_a_write_concern_not_met_is_unavailable_and_never_acknowledged(
    tmp_path: Path,
) -> None:
    """The write reached the primary, the write concern (w=majority, a tag) was not met:
    a replica set without its secondaries, a failover, a tag it does not know. Such a
    write may be rolled back, so it is not durable. Was: ReportEvent, BatchReportEvents
    and ClaimJob (a bulk write's `writeConcernErrors`) acknowledged OK, CreateJob and
    WriteLog (the driver's WriteConcernError) UNKNOWN with a traceback. Now each is
    UNAVAILABLE naming the write concern, and an event of such a write that stays
    reaches the streams once, as one whose reply was lost does."""
    _own_ferretdb()
    server = FerretDBProcess(require_ferretdb(), base_dir=tmp_path / "ferretdb")
    server.start()
    faults = await WriteConcernFaults(server.port).start()
    store = MongoStore(faults.uri, policy=make_policy(), database="write_concern")
    handle = await start_service(store, lease_sweep_seconds=0.05)
    try:
        stub = handle.stub
        await create(stub, job_id="j")
        await create(stub, job_id="k")
        await create(stub, job_id="queued")
        watch = stub.WatchJob(job_service_pb2.WatchJobRequest(id="j"))
        assert (await read(watch)).HasField("snapshot")
        calls: list[tuple[str, str, Callable[[], Awaitable[Any]]]] = [
            ("update", "ReportEvent", lambda: stub.ReportEvent(progress("j", 10), timeout=10)),
            (
                "update",
                "BatchReportEvents",
                lambda: stub.BatchReportEvents(
                    job_service_pb2.BatchReportEventsRequest(requests=[progress("k", 5)]),
                    timeout=10,
                ),
            ),
            (
                "update",
                "ClaimJob",
                lambda: stub.ClaimJob(
                    job_service_pb2.ClaimJobRequest(
                        kind=job_pb2.JOB_KIND_GENERIC,
                        worker_id="w",
                        lease_duration=Duration(seconds=60),
                    ),
                    timeout=10,
                ),
            ),
            ("insert", "CreateJob", lambda: create(stub, job_id="new")),
            (
                "insert",
                "WriteLog",
                lambda: stub.WriteLog(
                    job_service_pb2.WriteLogRequest(
                        entry=log_pb2.LogEntry(
                            job_id="j", level=log_pb2.LOG_LEVEL_INFO, message="line"
                        )
                    ),
                    timeout=10,
                ),
            ),
        ]
        for command, name, call in calls:
            faults.command = (command, "logs" if name == "WriteLog" else "jobs")
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call()
            faults.command = None
            details = refused.value.details() or ""
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, (name, details)
            assert "write concern" in details, (name, details)

        # The update stayed on the server: the retry is a duplicate, the event streamed once.
        retried = await stub.ReportEvent(progress("j", 10), timeout=10)
        assert retried.duplicate and retried.sequence == 1, retried
        assert (await read(watch, timeout=10)).event.sequence == 1
        await stub.ReportEvent(completed("j"), timeout=10)
        rest = await read_all(watch, timeout=10)
        assert [item.event.sequence for item in rest] == [2]
    finally:
        await handle.close()
        await faults.close()
        server.cleanup()


async def test_a_server_error_the_store_does_not_expect_is_internal_naming_operation_and_code(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A server's OperationFailure of a code the adapter does not map (here FerretDB's
    own NotImplemented, 238, for a `find` it is sent with a `collation`) passed through
    as UNKNOWN with a traceback, naming neither the operation nor the code (a report's
    was UNAVAILABLE, "storage error: OperationFailure(...)"). It is INTERNAL naming
    both, said in the log, and nothing is changed; the store works again once the
    server answers."""
    _own_ferretdb()
    server = FerretDBProcess(require_ferretdb(), base_dir=tmp_path / "ferretdb")
    server.start()
    faults = await WriteConcernFaults(server.port).start()
    store = MongoStore(faults.uri, policy=make_policy(), database="not_implemented")
    handle = await start_service(store, lease_sweep_seconds=3600)  # no sweep reads jobs
    try:
        stub = handle.stub
        await create(stub, job_id="j")
        faults.command = ("find", "jobs")
        faults.request_fields = {"collation": {"locale": "fr"}}
        calls: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
            ("get", lambda: stub.GetJob(job_service_pb2.GetJobRequest(id="j"), timeout=10)),
            ("apply", lambda: stub.ReportEvent(progress("j", 10), timeout=10)),
        ]
        for what, call in calls:
            with caplog.at_level(logging.WARNING), pytest.raises(grpc.aio.AioRpcError) as failed:
                await call()
            details = failed.value.details() or ""
            assert failed.value.code() == grpc.StatusCode.INTERNAL, (what, details)
            assert details.startswith(
                f"MongoDB failed ({what}): server error 238, NotImplemented: find: support"
                ' for field "collation"'
            ), details
            assert f"calls fail: MongoDB failed ({what})" in caplog.text, caplog.text
        assert "Traceback" not in caplog.text, caplog.text
        faults.command = None
        job = await stub.GetJob(job_service_pb2.GetJobRequest(id="j"), timeout=10)
        assert job.sequence == 0 and not job.progress.percent, job  # the report changed nothing
        assert (await stub.ReportEvent(progress("j", 10), timeout=10)).sequence == 1
    finally:
        await handle.close()
        await faults.close()
        server.cleanup()


async def test_a_batch_cut_off_after_a_lost_race_still_streams_what_it_wrote(
    tmp_path: Path,
) -> None:
    """A group commit writes A and B; B's conditional update loses a race (another
    replica changed B), and MongoDB is lost as B is read again for the next round. The
    call is UNAVAILABLE, but A's update of the first round is in the database: the
    worker's retry is a duplicate. Was: A's event reached no stream (it was neither
    published nor in doubt, so a COMPLETED lost this way left WatchJob open for good);
    now it is settled as a write whose answer was lost, and streamed once."""
    _own_ferretdb()
    server = FerretDBProcess(require_ferretdb(), base_dir=tmp_path / "ferretdb")
    server.start()
    cutter = await TcpCutter(server.port).start()
    store = MongoStore(
        f"mongodb://127.0.0.1:{cutter.port}/",
        policy=make_policy(),
        database="lost_race",
        timeout_ms=1500,
    )
    # No sweep reads the jobs meanwhile (the cutter picks requests by their bytes).
    handle = await start_service(store, lease_sweep_seconds=3600)
    direct: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(server.uri)
    try:
        stub = handle.stub
        await create(stub, job_id="a")
        await create(stub, job_id="b")
        watch = stub.WatchJob(job_service_pb2.WatchJobRequest(id="a"))
        assert (await read(watch)).HasField("snapshot")

        cutter.pause_after = b"\x02find\x00\x05\x00\x00\x00jobs\x00"  # the round's read
        batch = asyncio.ensure_future(
            stub.BatchReportEvents(
                job_service_pb2.BatchReportEventsRequest(
                    requests=[completed("a"), progress("b", 5)]
                ),
                timeout=30,
            )
        )
        await until(lambda: cutter.paused or batch.done())
        # Another writer changes b between the read and the update: b's update loses.
        jobs = direct["lost_race"]["jobs"]
        await jobs.update_one({"_id": "b"}, {"$set": {"seq": -1}})
        cutter.hold_after = b"singleBatch"  # the next round's read of b alone
        cutter.release()
        # Every reply held from then on (the driver retries a read on a new connection
        # for as long as its budget lasts): the read times out.
        await until(lambda: cutter.hold or batch.done())
        with pytest.raises(grpc.aio.AioRpcError) as lost:
            await batch
        cutter.cut()
        assert lost.value.code() == grpc.StatusCode.UNAVAILABLE, lost.value.details()
        assert (await jobs.find_one({"_id": "a"}, {"seq": 1}) or {}).get("seq") == 1

        retried = await stub.ReportEvent(completed("a"), timeout=10)
        assert retried.duplicate and retried.sequence == 1, retried
        rest = await read_all(watch, timeout=10)
        assert [(i.event.sequence, i.event.type) for i in rest] == [
            (1, event_pb2.EVENT_TYPE_COMPLETED)
        ]
    finally:
        await direct.close()
        await handle.close()
        await cutter.close()
        server.cleanup()


async def test_a_write_concern_the_server_cannot_meet_stops_the_start_with_one_line(
    tmp_path: Path,
) -> None:
    """JOBWIRE_MONGODB_W names a tag the replica set does not have (MongoDB answers each
    write with writeConcernError 79): `jobwire serve` stops with one line naming the
    write concern and exit status 1. Was a 60-line WriteConcernError traceback."""
    _own_ferretdb()
    server = FerretDBProcess(require_ferretdb(), base_dir=tmp_path / "ferretdb")
    server.start()
    faults = await WriteConcernFaults(server.port).start()
    faults.command = ("update", "firehose_origins")  # the start's first write
    faults.code, faults.errmsg = 79, "No write concern mode named 'dc-east' found"
    try:
        env = {
            "MONGODB_URI": faults.uri,
            "JOBWIRE_MONGODB_W": "dc-east",
            "JOBWIRE_GRPC_ADDR": "127.0.0.1:0",
            "JOBWIRE_METRICS_ADDR": "",
            "JOBWIRE_DATA_DIR": str(tmp_path / "data"),
            "JOBWIRE_LOG_FORMAT": "text",
        }
        code, out, err = await cli_result("serve", env=env, timeout=60)
    finally:
        await faults.close()
        server.cleanup()
    assert code == 1, (out, err)
    assert "cannot start: MongoDB did not confirm the write concern (start)" in err, err
    assert "dc-east" in err and "Traceback" not in out + err
