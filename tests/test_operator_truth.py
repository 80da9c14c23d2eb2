"""What an operator reads is true: metric values, log lines and their levels, after
real traffic through the real bridge and service (README "Metrics", "Logs")."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from http_bridge.grpc_client import COALESCER
from jobwire.v1 import job_pb2, job_service_pb2, job_service_pb2_grpc
from service.store.embedded import EmbeddedStore
from tests.bridge_harness import (
    API_KEY,
    TEST_CONFIG,
    TRANSCODE_TOKEN,
    Bridge,
    bridge,  # noqa: F401
    create_job,
    running_bridge,
    stub,  # noqa: F401
)
from tests.conftest import ServiceHandle, make_policy, start_service
from tests.grpc_proxy import FaultProxy
from tests.helpers import WAIT, create, progress, read, until


async def scrape(to: Bridge) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the bridge's /metrics, parsed by prometheus_client's own parser."""
    async with to.http.get(to.url + "/metrics") as reply:
        text = await reply.text()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def callbacks(samples: dict[Any, float], contract: str, status: int) -> float:
    key = ("jobwire_bridge_callbacks_total", (("contract", contract), ("status", str(status))))
    return samples.get(key, 0.0)


async def test_a_download_the_client_abandons_is_no_500_and_no_error(
    bridge: Any,  # noqa: F811 (the fixture)
    stub: Any,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A worker that stops reading an artifact halfway (its own timeout) was logged as
    an 'unexpected error' with a traceback and counted as a 500: the 5xx alert fired
    for clients hanging up. The answer was a 200 and is counted as one."""
    created = await create_job(stub, job_pb2.JOB_KIND_EXTRACTION)
    job_id, token = created.job.id, created.callback_token
    archive = os.urandom(12 * 1024 * 1024)  # far more than the sockets' buffers hold
    final = {
        "phase": "completed",
        "data": {
            "extracted_text": "x",
            "images_archive_data": base64.b64encode(archive).decode(),
            "images_archive_filename": "big.zip",
        },
    }
    auth = {"Authorization": f"Bearer {token}"}
    assert (await bridge.post(f"/api/external/jobs/{job_id}", final, headers=auth))[0] == 200
    before = await scrape(bridge)
    host, port = bridge.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        f"GET /api/external/jobs/{job_id}/artifacts/big.zip HTTP/1.1\r\n"
        f"Host: x\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 200")
    writer.transport.abort()  # gone, with megabytes still to send

    async def answered() -> float:
        now = await scrape(bridge)
        return sum(
            callbacks(now, "secretary", status) - callbacks(before, "secretary", status)
            for status in (200, 500)
        )

    for _ in range(200):  # until the bridge has counted the download (or 10 s)
        if await answered():
            break
        await asyncio.sleep(0.05)  # polling interval; the asserts below fail if never counted
    after = await scrape(bridge)
    assert callbacks(after, "secretary", 500) == callbacks(before, "secretary", 500)
    assert callbacks(after, "secretary", 200) == callbacks(before, "secretary", 200) + 1
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


async def service_gauge(port: int, name: str) -> float:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{port}/metrics") as reply,
    ):
        text = await reply.text()
    values = [
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    ]
    assert len(values) == 1, (name, values)
    return values[0]


async def test_jobwire_watchers_counts_no_watch_worker_feed(tmp_path: Path) -> None:
    """With JOBWIRE_WATCH_WORKERS=2 and nobody watching, jobwire_watchers read 2 (each
    worker's feed from the service is a subscription too), and after a worker died and
    was restarted the same; it counts clients' streams (README "Watch workers")."""
    from tests.test_watch_workers import WORKERS, worker_pids, workers_up

    handle = await start_service(
        EmbeddedStore(tmp_path / "d", make_policy()),
        watch_workers=WORKERS,
        metrics_addr="127.0.0.1:0",
    )
    try:
        await workers_up(handle)
        assert handle.running.ops is not None
        port = handle.running.ops.metrics.port
        assert await service_gauge(port, "jobwire_watchers") == 0
        fanout = handle.running.jobs.fanout
        victim = worker_pids(handle)[0]
        os.kill(victim, signal.SIGKILL)
        await until(lambda: fanout.watchers < WORKERS, timeout=6 * WAIT)  # its feed ended
        await until(lambda: fanout.watchers == WORKERS, timeout=6 * WAIT)  # and reopened
        assert victim not in worker_pids(handle)
        assert await service_gauge(port, "jobwire_watchers") == 0
        # A client's stream on the service itself is counted: new connections until
        # one lands on the service rather than on a worker (SO_REUSEPORT spreads them).
        await create(handle.stub, job_id="watched")
        own = [("grpc.use_local_subchannel_pool", 1)]
        for _ in range(60):  # P(none of 60 on the service) = (2/3)^60
            async with grpc.aio.insecure_channel(handle.target, options=own) as channel:
                stub = job_service_pb2_grpc.JobServiceStub(channel)
                call = stub.WatchJob(job_service_pb2.WatchJobRequest(id="watched"))
                await read(call)  # the snapshot: subscribed wherever it landed
                if fanout.watchers > WORKERS:
                    assert await service_gauge(port, "jobwire_watchers") == 1
                    break
                call.cancel()
        else:
            raise AssertionError("no connection reached the service itself")
    finally:
        await handle.close()


async def test_a_coalesced_batch_carries_a_request_id_of_its_own_callbacks(
    tmp_path: Path,
) -> None:
    """The coalescer's sender kept the context of the callback that started it: every
    batch it sent afterwards went to the service (and into both processes' log lines
    about it) under that first callback's X-Request-ID, none of the batch's own."""
    service = await start_service(EmbeddedStore(tmp_path / "d", make_policy()))
    proxy = await FaultProxy(service.target).start()
    try:
        config = dataclasses.replace(TEST_CONFIG, service_target=proxy.target)
        async with running_bridge(config) as front:
            jobs = [await create_job(service.stub, job_pb2.JOB_KIND_EXTRACTION) for _ in range(4)]
            proxy.gate.clear()  # the service's answers are held: callbacks queue up

            async def callback(i: int) -> int:
                job = jobs[i]
                status, _ = await front.post(
                    f"/api/external/jobs/{job.job.id}",
                    {"phase": "extract_text", "progress": 10},
                    headers={
                        "Authorization": f"Bearer {job.callback_token}",
                        "X-Request-ID": f"callback-{i}",
                    },
                )
                return status

            tasks = [asyncio.create_task(callback(0))]
            await until(lambda: proxy.waiting == 1)  # a sender holds [0]
            tasks.append(asyncio.create_task(callback(1)))
            await until(lambda: proxy.waiting == 2)  # the other sender holds [1]
            tasks += [asyncio.create_task(callback(i)) for i in (2, 3)]
            coalescer = front.runner.app[COALESCER]
            await until(lambda: len(coalescer._pending) == 2)  # queued behind them
            proxy.gate.set()
            assert await asyncio.gather(*tasks) == [200] * 4
        sent = proxy.request_ids["BatchReportEvents"]
        assert sorted(sent[:2]) == ["callback-0", "callback-1"]
        assert sent[2:] == ["callback-2"], sent  # the batch of callbacks 2 and 3
    finally:
        await proxy.close()
        await service.close()


@pytest.mark.parametrize("contract", ["aws_batch", "video_worker", "aurora", "secretary"])
async def test_a_client_gone_mid_body_is_499_not_a_500_with_a_traceback(
    bridge: Any,  # noqa: F811
    stub: Any,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
    contract: str,
) -> None:
    """A worker killed while sending its callback (the connection lost mid-body) was
    logged as an 'unexpected error' with a traceback and counted 500: the 5xx alert
    fired for clients going away. Nothing is answered; it is counted 499."""
    created = await create_job(stub, job_pb2.JOB_KIND_EXTRACTION)
    path, auth = {
        "aws_batch": ("/api/batch-callback", ""),
        "video_worker": ("/api/report", f"Bearer {API_KEY}"),
        "aurora": ("/api/transcode-callback", f"Bearer {TRANSCODE_TOKEN}"),
        "secretary": (f"/api/external/jobs/{created.job.id}", f"Bearer {created.callback_token}"),
    }[contract]
    before = await scrape(bridge)
    host, port = bridge.url.removeprefix("http://").rsplit(":", 1)
    _, writer = await asyncio.open_connection(host, int(port))
    auth_line = f"Authorization: {auth}\r\n" if auth else ""
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: x\r\n{auth_line}Content-Type: application/json\r\n"
        f'Content-Length: 100000\r\n\r\n{{"jobId": "'.encode()
    )
    await writer.drain()
    writer.transport.abort()  # gone, 99,990 bytes short

    async def counted() -> float:
        now = await scrape(bridge)
        return sum(
            callbacks(now, contract, status) - callbacks(before, contract, status)
            for status in (499, 500, 400, 408)
        )

    for _ in range(200):  # until the bridge has counted the request (or 10 s)
        if await counted():
            break
        await asyncio.sleep(0.05)  # polling interval; the asserts below fail if never counted
    after = await scrape(bridge)
    assert callbacks(after, contract, 500) == callbacks(before, contract, 500)
    assert callbacks(after, contract, 499) == callbacks(before, contract, 499) + 1
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


def requests_counted(method: str, code: str) -> float:
    value = REGISTRY.get_sample_value(
        "jobwire_grpc_requests_total", {"method": method, "code": code}
    )
    return value or 0.0


async def test_an_upload_the_client_cancels_is_counted_cancelled_not_unknown(
    service: ServiceHandle,
) -> None:
    """A client that gave up an upload mid-stream was counted
    jobwire_grpc_requests_total{code="UNKNOWN"}, the code of a server's failure (the
    dashboard's gRPC errors panel); streams already said CANCELLED. Both stores."""
    await create(service.stub, job_id="up")
    before = {c: requests_counted("UploadArtifact", c) for c in ("CANCELLED", "UNKNOWN")}

    async def parts() -> AsyncIterator[job_service_pb2.UploadArtifactRequest]:
        header = job_service_pb2.ArtifactHeader(job_id="up", name="a.txt")
        yield job_service_pb2.UploadArtifactRequest(header=header)
        yield job_service_pb2.UploadArtifactRequest(data=b"x" * 1000)
        await asyncio.Event().wait()  # and nothing more: the client gives up

    # A call cancelled before the service took it up is counted nowhere: several at once,
    # so that some reach the handler before their cancel does.
    calls = [service.stub.UploadArtifact(parts()) for _ in range(20)]
    for call in calls:
        await call.wait_for_connection()
    for call in calls:
        call.cancel()
    await until(lambda: uploads_seen(before) > 0)
    assert requests_counted("UploadArtifact", "UNKNOWN") == before["UNKNOWN"]
    assert requests_counted("UploadArtifact", "CANCELLED") > before["CANCELLED"]


def uploads_seen(before: dict[str, float]) -> float:
    return sum(requests_counted("UploadArtifact", c) - before[c] for c in before)


async def test_an_artifact_download_is_not_in_the_answer_latency_histogram(
    bridge: Any,  # noqa: F811
    stub: Any,  # noqa: F811
) -> None:
    """jobwire_bridge_request_duration_seconds (JobwireAckLatencyP99High: 'slow answers
    mean slow commits') took in an artifact download's whole transfer, seconds to
    minutes for a large archive to a slow client: a few downloads among a Secretary's
    callbacks pushed the p99 over the alert's 0.5 s with every commit fast. Downloads
    are counted by status, not timed."""
    created = await create_job(stub, job_pb2.JOB_KIND_EXTRACTION)
    job, auth = (
        f"/api/external/jobs/{created.job.id}",
        {"Authorization": f"Bearer {created.callback_token}"},
    )
    final = {"phase": "completed", "data": {"extracted_text": "# text"}}
    assert (await bridge.post(job, final, headers=auth))[0] == 200
    timed = ("jobwire_bridge_request_duration_seconds_count", (("contract", "secretary"),))
    before = await scrape(bridge)
    status, body = await bridge.get(f"{job}/artifacts/extracted_text.md", headers=auth)
    assert (status, body) == (200, b"# text")
    between = await scrape(bridge)
    assert between[timed] == before[timed]
    assert callbacks(between, "secretary", 200) == callbacks(before, "secretary", 200) + 1
    assert (await bridge.get(job, headers=auth))[0] == 200  # a poll is an answer: timed
    assert (await scrape(bridge))[timed] == before[timed] + 1


async def test_firehose_append_failures_gauge_counts_events_missing_from_the_log(
    mongo_uri: str,
) -> None:
    """MongoDB appends an event's firehose entry after its commit: when that insert
    fails (here an entry already holds the next number), the callback is still
    acknowledged, jobwire_firehose_append_failures counts the event, and the next
    append re-reads the log's last number and succeeds (README "Metrics")."""
    from service.store.mongo import MongoStore

    store = MongoStore(mongo_uri, policy=make_policy(), database=f"t_{os.urandom(6).hex()}")
    handle = await start_service(store, metrics_addr="127.0.0.1:0")
    try:
        assert handle.running.ops is not None
        port = handle.running.ops.metrics.port
        await create(handle.stub, job_id="gauge")
        await handle.stub.ReportEvent(progress("gauge", 10))
        assert await service_gauge(port, "jobwire_firehose_append_failures") == 0
        last = await store.firehose.find_one({"o": store.origin}, sort=[("n", -1)])
        assert last is not None
        await store.firehose.insert_one({"o": store.origin, "n": last["n"] + 1, "ns": 0})

        reply = await handle.stub.ReportEvent(progress("gauge", 20))
        assert reply.sequence == 2 and not reply.duplicate
        assert await service_gauge(port, "jobwire_firehose_append_failures") == 1

        await handle.stub.ReportEvent(progress("gauge", 30))
        assert await service_gauge(port, "jobwire_firehose_append_failures") == 1
        newest = await store.firehose.find_one({"o": store.origin}, sort=[("n", -1)])
        assert newest is not None and newest["n"] == last["n"] + 2 and "e" in newest
    finally:
        name = store.database.name
        await handle.close()
        from pymongo import AsyncMongoClient

        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongo_uri)
        await client.drop_database(name)
        await client.close()


async def test_jobwire_watchers_counts_a_stream_replaying_the_firehose_log(
    tmp_path: Path,
) -> None:
    """A WatchJobs stream resumed from "0" is open while it replays the log: it counts.
    It read 0 until the replay was over (the gauge counted fan-out subscriptions, and a
    stream subscribes only once it has caught up), so a consumer catching up on a
    day's log, held back by its own reading, was no watcher for minutes."""
    handle = await start_service(
        EmbeddedStore(tmp_path / "d", make_policy()), metrics_addr="127.0.0.1:0"
    )
    try:
        assert handle.running.ops is not None
        port = handle.running.ops.metrics.port
        await create(handle.stub, job_id="big")
        big = "x" * 16_000  # 400 of them: 6.4 MB to replay, far past any flow-control window
        for start in range(0, 400, 100):
            requests = [
                progress("big", 1, key=f"b{i}", message=big) for i in range(start, start + 100)
            ]
            await handle.stub.BatchReportEvents(
                job_service_pb2.BatchReportEventsRequest(requests=requests)
            )
        call = handle.stub.WatchJobs(job_service_pb2.WatchJobsRequest(after="0"))
        assert (await read(call)).event.sequence == 1  # open, replaying; read no further
        assert await service_gauge(port, "jobwire_watchers") == 1
        call.cancel()
    finally:
        await handle.close()
