"""Random requests to every JobService method over the network, built from the
protobuf descriptors: strings empty, huge, with NUL, exotic or path-like; numbers at
their limits, NaN and infinities; enums out of range; timestamps and durations out of
range; deep Structs; maps of many entries; real job ids and tokens mixed in.

Asserted: every answer is OK or a status that names the caller's mistake (never
UNKNOWN, INTERNAL or UNAVAILABLE), nothing is logged at ERROR, and the service still
answers. It found a ListJobs label filter that was a store error, a lease whose
expiry overflowed, and undecodable requests answered UNKNOWN.

JOBWIRE_FUZZ_CASES (default 600) and JOBWIRE_FUZZ_SEED (default: random, printed)
size it and make a failure reproducible, as for the HTTP fuzzers.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor as d
from google.protobuf.message import Message

from jobwire.v1 import job_pb2, job_service_pb2
from tests.conftest import ServiceHandle
from tests.helpers import create
from tests.test_bridge_fuzz import CASES, SEED

F = d.FieldDescriptor
STRINGS = [
    "",
    "a",
    "x" * 300,
    "x" * 70_000,
    "\x00",
    "ä€𝄞\u202e",
    " ",
    "../../etc/passwd",
    "%ff",
    "a/b",
    "-1",
    "NaN",
    "\ufeff",
    "🙂" * 50,
]
CALLERS_MISTAKES = {
    "OK",
    "INVALID_ARGUMENT",
    "NOT_FOUND",
    "FAILED_PRECONDITION",
    "ALREADY_EXISTS",
    "UNAUTHENTICATED",
    "PERMISSION_DENIED",
    "OUT_OF_RANGE",
    "RESOURCE_EXHAUSTED",
    "ABORTED",
    "DEADLINE_EXCEEDED",  # a watch stream that stays open past the test's deadline
}


class Generator:
    def __init__(self, rng: random.Random, known: list[str]) -> None:
        self.rng = rng
        self.known = known  # real job ids and callback tokens

    def text(self) -> str:
        if self.known and self.rng.random() < 0.4:
            return self.rng.choice(self.known)
        return self.rng.choice(STRINGS)

    def scalar(self, field: Any) -> Any:
        rng, t = self.rng, field.type
        if t == F.TYPE_STRING:
            return self.text()
        if t == F.TYPE_BYTES:
            return rng.choice([b"", b"\xff" * 10, b"x" * 100_000])
        if t == F.TYPE_BOOL:
            return rng.random() < 0.5
        if t == F.TYPE_ENUM:
            return rng.choice([0, 1, 2, 3, 5, 99, -1, 2**31 - 1])
        if t in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
            return rng.choice([0.0, -1.0, 50.5, 100.0, 1e308, float("nan"), float("inf")])
        if t in (F.TYPE_UINT32, F.TYPE_FIXED32):
            return rng.choice([0, 1, 2**32 - 1])
        if t in (F.TYPE_UINT64, F.TYPE_FIXED64):
            return rng.choice([0, 1, 2**64 - 1])
        if t in (F.TYPE_INT32, F.TYPE_SINT32, F.TYPE_SFIXED32):
            return rng.choice([0, -1, 1, 5, 2**31 - 1, -(2**31)])
        return rng.choice([0, -1, 1, 3, 2**63 - 1, -(2**63)])

    def fill(self, msg: Message, depth: int = 0) -> None:
        rng = self.rng
        fields: list[Any] = list(msg.DESCRIPTOR.fields)  # upb's and Python's descriptors
        for field in fields:
            if rng.random() < 0.4:
                continue
            kind = field.message_type.full_name if field.message_type else ""
            value: Any = getattr(msg, field.name)
            if kind == "google.protobuf.Struct":
                node: dict[str, Any] = {"a": 1}
                for _ in range(rng.choice([1, 5, 40, 120])):  # 3 message levels each
                    node = {"a": node, "n": rng.choice([1e308, -0.0, 1, "s", None, True])}
                value.update(node)
            elif kind in ("google.protobuf.Timestamp", "google.protobuf.Duration"):
                value.seconds = rng.choice([0, -5, 60, 1_700_000_000, 253_402_300_800, 10**12])
                value.nanos = rng.choice([0, 0, 0, -1, 999_999_999, 10**9])
            elif field.is_repeated and field.message_type is not None:
                if field.message_type.GetOptions().map_entry:
                    for i in range(rng.choice([0, 1, 3, 100])):
                        value[self.text() + str(i)] = self.text()
                elif depth < 3:
                    for _ in range(rng.choice([0, 1, 3, 50])):
                        self.fill(value.add(), depth + 1)
            elif field.is_repeated:
                value.extend(self.scalar(field) for _ in range(rng.choice([0, 1, 3, 50])))
            elif field.message_type is not None:
                if depth < 4:
                    self.fill(value, depth + 1)
            else:
                setattr(msg, field.name, self.scalar(field))


async def test_random_requests_get_only_callers_mistakes(
    service: ServiceHandle, caplog: pytest.LogCaptureFixture
) -> None:
    print(f"fuzz seed {SEED} ({CASES} cases); JOBWIRE_FUZZ_SEED={SEED} reproduces")
    rng = random.Random(SEED)
    known: list[str] = []
    for _ in range(3):
        created = await create(service.stub, job_pb2.JOB_KIND_EXTRACTION)
        known += [created.job.id, created.callback_token]
    gen = Generator(rng, known)
    service_desc = job_service_pb2.DESCRIPTOR.services_by_name["JobService"]
    methods = [m for m in service_desc.methods if not m.client_streaming]
    seen: dict[tuple[str, str], int] = {}
    wrong: list[str] = []
    with caplog.at_level(logging.ERROR):
        for n in range(CASES):
            method = rng.choice(methods)
            request = getattr(job_service_pb2, method.input_type.name)()
            gen.fill(request)
            call = getattr(service.stub, method.name)
            try:
                if method.server_streaming:
                    async for _ in call(request, timeout=0.3):
                        pass
                else:
                    await call(request, timeout=10)
                code = "OK"
            except grpc.aio.AioRpcError as err:
                code = err.code().name
                if code not in CALLERS_MISTAKES:
                    wrong.append(f"case {n} {method.name}: {code} {err.details()!r:.300}")
            seen[(method.name, code)] = seen.get((method.name, code), 0) + 1
    print("answers:", dict(sorted(seen.items())))
    assert not wrong, "\n".join(wrong[:10])
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text[-3000:]
    # Still serving. (Not by reading known[0]: DeleteJob is among the calls, and an
    # ended known job may be gone.)
    fresh = (await create(service.stub, job_pb2.JOB_KIND_EXTRACTION)).job.id
    got = await service.stub.GetJob(job_service_pb2.GetJobRequest(id=fresh))
    assert got.id == fresh
