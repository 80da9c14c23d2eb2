"""Restart and shutdown: what was acknowledged survives; streams end cleanly."""

from __future__ import annotations

import asyncio
import hashlib
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from jobwire.v1 import job_pb2, job_service_pb2, log_pb2
from tests.conftest import ServiceHandle, make_policy, open_test_store, start_service
from tests.helpers import completed, create, progress, read, read_all


async def test_restarted_service_keeps_every_acknowledged_write(
    store_kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    database = f"restart_{uuid.uuid4().hex[:8]}"
    first = await start_service(
        await open_test_store(store_kind, tmp_path, request, make_policy(), database)
    )
    acknowledged = []
    for i in range(20):
        await create(first.stub, job_pb2.JOB_KIND_GENERIC, f"job-{i}")
        for pct in (10, 50):
            await first.stub.ReportEvent(progress(f"job-{i}", pct))
        if i % 2:
            await first.stub.ReportEvent(completed(f"job-{i}"))
        entry = log_pb2.LogEntry(job_id=f"job-{i}", level=log_pb2.LOG_LEVEL_INFO, message=f"m{i}")
        await first.stub.WriteLog(job_service_pb2.WriteLogRequest(entry=entry))
        acknowledged.append(await first.stub.GetJob(job_service_pb2.GetJobRequest(id=f"job-{i}")))
    await first.close()

    second = await start_service(
        await open_test_store(store_kind, tmp_path, request, make_policy(), database)
    )
    try:
        for before in acknowledged:
            after = await second.stub.GetJob(job_service_pb2.GetJobRequest(id=before.id))
            assert after == before
            events = await second.stub.ListJobEvents(
                job_service_pb2.ListJobEventsRequest(job_id=before.id)
            )
            assert [e.sequence for e in events.events] == list(range(1, before.sequence + 1))
            logs = await second.stub.ListLogs(job_service_pb2.ListLogsRequest(job_id=before.id))
            assert [e.message for e in logs.entries] == [f"m{before.id.split('-')[1]}"]
        # Idempotency records survive too: a retried event is still a duplicate.
        retry = await second.stub.ReportEvent(progress("job-0", 50))
        assert retry.duplicate
    finally:
        await second.close()


async def test_shutdown_ends_watch_streams_with_unavailable(
    store_kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    handle = await start_service(
        await open_test_store(store_kind, tmp_path, request, make_policy())
    )
    await create(handle.stub, job_id="s")
    call = handle.stub.WatchJob(job_service_pb2.WatchJobRequest(id="s"))
    assert (await read(call)).HasField("snapshot")
    await handle.stub.ReportEvent(progress("s", 10))
    stopping = asyncio.ensure_future(handle.running.stop(grace=5.0))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await read_all(call)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "last sequence" in (err.value.details() or "")
    await asyncio.wait_for(stopping, 10)
    await handle.channel.close()


async def _chunks(
    data: bytes, size: int = 1 << 20
) -> AsyncIterator[job_service_pb2.UploadArtifactRequest]:
    for i in range(0, len(data), size):
        yield job_service_pb2.UploadArtifactRequest(data=data[i : i + size])


async def test_artifact_upload_read_list_replace(service: ServiceHandle) -> None:
    created = await create(service.stub, job_pb2.JOB_KIND_EXTRACTION, "doc")
    data = os.urandom(5 * (1 << 20) + 123)

    async def upload(
        payload: bytes, token: str = ""
    ) -> AsyncIterator[job_service_pb2.UploadArtifactRequest]:
        yield job_service_pb2.UploadArtifactRequest(
            header=job_service_pb2.ArtifactHeader(
                job_id="doc",
                name="images.zip",
                content_type="application/zip",
                callback_token=token,
            )
        )
        async for part in _chunks(payload):
            yield part

    meta = await service.stub.UploadArtifact(upload(data, created.callback_token))
    assert (meta.size_bytes, meta.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    parts = await read_all(
        service.stub.ReadArtifact(
            job_service_pb2.ReadArtifactRequest(job_id="doc", name="images.zip")
        )
    )
    assert parts[0].artifact == meta
    assert all(len(p.data) <= 1 << 20 for p in parts[1:])
    assert b"".join(p.data for p in parts[1:]) == data

    await service.stub.UploadArtifact(upload(b"small"))
    listed = await service.stub.ListArtifacts(job_service_pb2.ListArtifactsRequest(job_id="doc"))
    assert [(a.name, a.size_bytes) for a in listed.artifacts] == [("images.zip", 5)]

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await service.stub.UploadArtifact(upload(b"x", token="wrong"))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await read_all(
            service.stub.ReadArtifact(
                job_service_pb2.ReadArtifactRequest(job_id="doc", name="nope")
            )
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    "content_type",
    ["text/html\r\nSet-Cookie: a=b", "text/plain\x00", "zip", "t/" + "x" * 300, "tëxt/plain"],
)
async def test_an_artifact_content_type_no_header_can_carry_is_refused(
    service: ServiceHandle, content_type: str
) -> None:
    """UploadArtifact stored any content_type: one with a line break was served by the
    bridge's Secretary download as a 500 (aiohttp refuses the header) with a traceback
    logged. Not a MIME type (printable ASCII type/subtype, at most 255): INVALID_ARGUMENT
    naming header.content_type, nothing stored."""
    await create(service.stub, job_pb2.JOB_KIND_EXTRACTION, "ct")

    async def upload() -> AsyncIterator[job_service_pb2.UploadArtifactRequest]:
        header = job_service_pb2.ArtifactHeader(job_id="ct", name="a", content_type=content_type)
        yield job_service_pb2.UploadArtifactRequest(header=header)
        yield job_service_pb2.UploadArtifactRequest(data=b"<b>x</b>")

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await service.stub.UploadArtifact(upload())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "header.content_type" in (err.value.details() or "")
    listed = await service.stub.ListArtifacts(job_service_pb2.ListArtifactsRequest(job_id="ct"))
    assert list(listed.artifacts) == []


@pytest.mark.parametrize(
    ("second", "expected"),
    [
        (
            job_service_pb2.UploadArtifactRequest(),
            "every UploadArtifactRequest after the header must carry data",
        ),
        (
            job_service_pb2.UploadArtifactRequest(
                header=job_service_pb2.ArtifactHeader(job_id="parts", name="a")
            ),
            "only the first message may carry a header",
        ),
    ],
    ids=["empty", "header"],
)
async def test_an_upload_message_after_the_header_must_carry_data(
    service: ServiceHandle, second: job_service_pb2.UploadArtifactRequest, expected: str
) -> None:
    """A message after the header with neither part set was refused with "only the
    first message may carry a header", which it did not carry. Each mistake is named
    for what it is; nothing is stored and an artifact of that name stays."""
    await create(service.stub, job_pb2.JOB_KIND_EXTRACTION, "parts")
    header = job_service_pb2.ArtifactHeader(job_id="parts", name="a")

    async def upload(
        *parts: job_service_pb2.UploadArtifactRequest,
    ) -> AsyncIterator[job_service_pb2.UploadArtifactRequest]:
        yield job_service_pb2.UploadArtifactRequest(header=header)
        for part in parts:
            yield part

    kept = await service.stub.UploadArtifact(
        upload(job_service_pb2.UploadArtifactRequest(data=b"kept"))
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await service.stub.UploadArtifact(
            upload(job_service_pb2.UploadArtifactRequest(data=b"new"), second)
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == expected
    listed = await service.stub.ListArtifacts(job_service_pb2.ListArtifactsRequest(job_id="parts"))
    assert list(listed.artifacts) == [kept]
