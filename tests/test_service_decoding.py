"""Requests protobuf cannot parse: INVALID_ARGUMENT naming the message type, nothing
logged at ERROR, and the service goes on (service/decoding.py). Before, grpc.aio
answered UNKNOWN "Unexpected DecodeError" and logged a traceback, as for a bug."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2

from jobwire.v1 import job_pb2, job_service_pb2
from tests.conftest import ServiceHandle
from tests.helpers import create

METHOD = "/jobwire.v1.JobService/"


def _deep_struct(levels: int) -> struct_pb2.Struct:
    node: dict[str, Any] = {"leaf": 1}
    for _ in range(levels):
        node = {"a": node}
    s = struct_pb2.Struct()
    s.update(node)
    return s


def _raw(channel: grpc.aio.Channel, name: str) -> Any:
    identity = lambda b: b  # noqa: E731 - bytes in, bytes out
    return channel.unary_unary(
        METHOD + name, request_serializer=identity, response_deserializer=identity
    )


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field, by hand: protobuf will not copy a message it could
    not parse back."""
    key, size, out = number << 3 | 2, len(payload), bytearray()
    out.append(key)
    while size > 0x7F:
        out.append(size & 0x7F | 0x80)
        size >>= 7
    out.append(size)
    return bytes(out) + payload


async def test_unparseable_requests_are_invalid_argument(
    grpc_service: ServiceHandle, caplog: pytest.LogCaptureFixture
) -> None:
    job = await create(grpc_service.stub, kind=job_pb2.JOB_KIND_EXTRACTION)
    deep = job_service_pb2.ReportEventRequest(job_id=job.job.id, callback_token=job.callback_token)
    deep.failed.code = "E"
    deep.failed.message = "m"
    deep.failed.details.CopyFrom(_deep_struct(60))  # 3 message levels per dict level
    cases = {
        "GetJob": (b"\xff\xff\xff\xff", "jobwire.v1.GetJobRequest"),
        "ReportEvent": (deep.SerializeToString(), "jobwire.v1.ReportEventRequest"),
        "BatchReportEvents": (
            _field(1, deep.SerializeToString()),  # BatchReportEventsRequest.requests
            "jobwire.v1.BatchReportEventsRequest",
        ),
    }
    with caplog.at_level(logging.ERROR):
        for name, (payload, type_name) in cases.items():
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await _raw(grpc_service.channel, name)(payload, timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, err.value)
            assert type_name in (err.value.details() or ""), err.value.details()
        # A stream of requests: the second message is not an UploadArtifactRequest.
        identity = lambda b: b  # noqa: E731
        upload = grpc_service.channel.stream_unary(
            METHOD + "UploadArtifact", request_serializer=identity, response_deserializer=identity
        )
        header = job_service_pb2.UploadArtifactRequest()
        header.header.job_id = job.job.id
        header.header.name = "a.txt"
        header.header.callback_token = job.callback_token

        async def parts() -> AsyncIterator[bytes]:
            yield header.SerializeToString()
            yield b"\xff\xff\xff\xff"

        with pytest.raises(grpc.aio.AioRpcError) as err:
            await upload(parts(), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
        assert "UploadArtifactRequest" in (err.value.details() or "")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text[-3000:]
    # The job is untouched and the service answers.
    got = await grpc_service.stub.GetJob(job_service_pb2.GetJobRequest(id=job.job.id))
    assert got.state == job_pb2.JOB_STATE_QUEUED and got.sequence == job.job.sequence
