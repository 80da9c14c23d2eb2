"""jobwire.client against the real service on loopback ports (both stores where storage
matters); network faults come from a real loopback proxy (tests/grpc_proxy.py)."""

from __future__ import annotations

import asyncio
import hashlib
import math
import os
import re
import shutil
import sys
import tracemalloc
from collections.abc import AsyncIterable, AsyncIterator, Callable, Sequence
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import grpc
import pytest

from jobwire.client import (
    TLS,
    AlreadyExists,
    Client,
    ClientConfigError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    Job,
    JobDeletion,
    JobEvent,
    JobwireError,
    NotFound,
    RetryPolicy,
    StreamGap,
    Unauthenticated,
    Unavailable,
)
from jobwire.client.retry import Backoff
from jobwire.v1 import artifact_pb2, event_pb2, job_pb2, job_service_pb2, log_pb2
from service.store.embedded import EmbeddedStore
from service.store.port import Store
from tests.conftest import ServiceHandle, make_policy, open_test_store, start_service
from tests.grpc_proxy import FaultProxy, Rewrite
from tests.helpers import WAIT, sample_video, until
from tests.tcp_cutter import TcpCutter

FAST = RetryPolicy(attempts=4, backoff=Backoff(initial=0.05, maximum=0.2))
QUICK_WATCH = Backoff(initial=0.05, maximum=0.5)
MiB = 1024 * 1024


def client(target: str, **kwargs: object) -> Client:
    kwargs.setdefault("retry", FAST)
    kwargs.setdefault("watch_backoff", QUICK_WATCH)
    return Client(target, **kwargs)  # type: ignore[arg-type]


async def collect(watch: AsyncIterable[object], until: int = 10_000) -> list[object]:
    """Items of a watch until it ends (or `until` items), each within WAIT seconds."""
    items: list[object] = []
    iterator = aiter(watch)
    while len(items) < until:
        try:
            items.append(await asyncio.wait_for(anext(iterator), WAIT))
        except StopAsyncIteration:
            break
    await iterator.aclose()  # type: ignore[attr-defined]
    return items


def sequences(items: Sequence[object]) -> list[int]:
    return [i.sequence for i in items if isinstance(i, JobEvent)]


@pytest.fixture
async def proxy(service: ServiceHandle) -> AsyncIterator[FaultProxy]:
    p = await FaultProxy(service.target).start()
    yield p
    await p.close()


# -- every method ---------------------------------------------------------------


async def test_create_get_list_cancel(service: ServiceHandle) -> None:
    async with client(service.target) as c:
        made = await c.create_job("GENERIC", job_id="c-1", labels={"team": "a"})
        assert made.job.id == "c-1" and made.callback_token
        assert (await c.get_job("c-1")).state == job_pb2.JOB_STATE_QUEUED
        for i in range(2, 8):
            await c.create_job(job_pb2.JOB_KIND_GENERIC, job_id=f"c-{i}", labels={"team": "a"})
        await c.create_job(
            "VIDEO", job_id="other", labels={"team": "b"}, video=sample_video("other")
        )
        # list_jobs walks every page (page_size 2 -> 4 pages), oldest first
        ids = [j.id async for j in c.list_jobs(labels={"team": "a"}, page_size=2)]
        assert ids == [f"c-{i}" for i in range(1, 8)]
        assert [j.id async for j in c.list_jobs(kind="VIDEO")] == ["other"]
        page = await c.list_jobs_page(labels={"team": "a"}, page_size=3)
        assert len(page.jobs) == 3 and page.next_page_token
        cancelled = await c.cancel_job("c-1", "no longer needed")
        assert cancelled.state == job_pb2.JOB_STATE_CANCELLED
        assert [j.id async for j in c.list_jobs(states=["CANCELLED"])] == ["c-1"]


async def test_delete_job(service: ServiceHandle) -> None:
    """delete_job deletes an ended job; the service's refusals come as their classes,
    and a refused delete is not retried."""
    async with client(service.target) as c:
        await c.create_job("GENERIC", job_id="del-1")
        with pytest.raises(FailedPrecondition, match="has not ended \\(QUEUED\\)"):
            await c.delete_job("del-1")
        await c.upload_artifact("del-1", "a.txt", b"bytes")
        await c.cancel_job("del-1")
        await c.delete_job("del-1")
        with pytest.raises(NotFound):
            await c.get_job("del-1")
        with pytest.raises(NotFound):
            await c.delete_job("del-1")
        with pytest.raises(InvalidArgument, match="id must be"):
            await c.delete_job("no/such")


async def test_claim_report_complete_fail_and_events(service: ServiceHandle) -> None:
    async with client(service.target) as c:
        assert await c.claim_job("VIDEO", worker_id="w") is None  # nothing queued
        video = job_pb2.Video(url="https://example.invalid/v.mp4", title="t")
        await c.create_job("VIDEO", job_id="v-1", video=video)
        job = await c.claim_job("VIDEO", worker_id="w", lease=30)
        assert job is not None and job.id == "v-1" and job.state == job_pb2.JOB_STATE_RUNNING
        assert job.video.url == video.url and job.worker_id == "w"
        reply = await c.report_progress(
            "v-1", 40, phase="download", message="40%", media_time=4, media_duration=10
        )
        assert reply.sequence == 2 and not reply.duplicate
        done = await c.complete("v-1", output_key="out/v-1.mp4", metadata={"frames": 3})
        assert done.state == job_pb2.JOB_STATE_SUCCEEDED
        got = await c.get_job("v-1")
        assert got.result.output_key == "out/v-1.mp4"
        assert got.progress.media_duration.seconds == 10
        events = await c.list_job_events("v-1")
        assert [e.type for e in events.events] == [
            event_pb2.EVENT_TYPE_CLAIMED,
            event_pb2.EVENT_TYPE_PROGRESS,
            event_pb2.EVENT_TYPE_COMPLETED,
        ]
        await c.create_job("GENERIC", job_id="f-1")
        failed = await c.fail("f-1", "OCR_TIMEOUT", "took too long", details={"page": 3})
        assert failed.state == job_pb2.JOB_STATE_FAILED
        assert (await c.get_job("f-1")).error.code == "OCR_TIMEOUT"
        # the same explicit key twice: applied once
        await c.create_job("GENERIC", job_id="k-1")
        first = await c.report_progress("k-1", 10, idempotency_key="once")
        again = await c.report_progress("k-1", 10, idempotency_key="once")
        assert again.duplicate and again.sequence == first.sequence == 1


async def test_a_progress_report_without_a_percent_keeps_the_jobs(service: ServiceHandle) -> None:
    """report_progress's percent defaulted to 0.0, so a report of a message alone set the
    job back to 0 %. Without one the job keeps its percent; an explicit 0 still sets it;
    with both media times the percent follows them."""
    async with client(service.target) as c:
        await c.create_job("GENERIC", job_id="keep-1")
        await c.report_progress("keep-1", 40, phase="ocr", message="page 4 of 10")
        await c.report_progress("keep-1", message="still on page 4")
        got = (await c.get_job("keep-1")).progress
        assert (got.percent, got.message) == (40.0, "still on page 4")
        await c.report_progress("keep-1", media_time=3, media_duration=12)
        assert (await c.get_job("keep-1")).progress.percent == 25.0
        await c.report_progress("keep-1", 0, message="starting over")
        assert (await c.get_job("keep-1")).progress.percent == 0.0


async def test_logs(service: ServiceHandle) -> None:
    async with client(service.target) as c:
        await c.create_job("GENERIC", job_id="l-1")
        await c.write_log("starting", job_id="l-1")
        await c.write_log("careful", job_id="l-1", level="WARNING")
        lines = await c.list_logs(job_id="l-1")
        assert [e.message for e in lines] == ["careful", "starting"]  # newest first
        assert [e.message for e in await c.list_logs(job_id="l-1", level="WARNING")] == ["careful"]
        reply = await c.write_log("broke", job_id="l-1", level=log_pb2.LOG_LEVEL_ERROR)
        assert reply.job_failed


async def test_a_per_call_timeout_is_checked(service: ServiceHandle) -> None:
    """A per-call timeout was passed on as it was: inf or 1e10 (past what gRPC holds)
    failed at once with DeadlineExceeded, never trying the call; "5" a bare TypeError.
    It is checked as the client's own timeout is, naming it."""
    async with client(service.target) as c:
        await c.create_job("GENERIC", job_id="timed")
        for bad in (math.inf, 1e10, 0, -1, math.nan, "5"):
            with pytest.raises(ClientConfigError, match="timeout must be a"):
                await c.get_job("timed", timeout=bad)  # type: ignore[arg-type]
            with pytest.raises(ClientConfigError, match="timeout must be a"):
                c.read_artifact("timed", "a.txt", timeout=bad)  # type: ignore[arg-type]
        assert (await c.get_job("timed", timeout=31_622_400)).id == "timed"


async def test_list_jobs_filters_every_page(service: ServiceHandle) -> None:
    """`states` given as a generator was used up by the first page: the later pages came
    back unfiltered (192 jobs of every state for 77 CANCELLED ones)."""
    async with client(service.target) as c:
        for i in range(7):
            job = await c.create_job("GENERIC", job_id=f"lf-{i}")
            if i % 2:
                await c.cancel_job(job.job.id)
        listed = [j.id async for j in c.list_jobs(states=(s for s in ["CANCELLED"]), page_size=2)]
    assert listed == ["lf-1", "lf-3", "lf-5"]


async def test_errors_are_typed_with_code_and_message(service: ServiceHandle) -> None:
    async with client(service.target) as c:
        with pytest.raises(NotFound) as not_found:
            await c.get_job("missing")
        assert not_found.value.code == grpc.StatusCode.NOT_FOUND
        assert "missing" in not_found.value.message
        await c.create_job("GENERIC", job_id="e-1")
        with pytest.raises(AlreadyExists):
            await c.create_job("GENERIC", job_id="e-1")
        with pytest.raises(InvalidArgument) as bad:
            await c.create_job(job_pb2.JOB_KIND_UNSPECIFIED)
        assert bad.value.code == grpc.StatusCode.INVALID_ARGUMENT and bad.value.message
        # The service's refusal of a VIDEO job without its url, raised as it is.
        for video in (None, job_pb2.Video(title="Talk")):
            with pytest.raises(InvalidArgument) as no_url:
                await c.create_job("VIDEO", job_id="e-video", video=video)
            assert no_url.value.message == "job.video.url is required for JOB_KIND_VIDEO jobs"
        with pytest.raises(NotFound):
            await c.get_job("e-video")
        await c.cancel_job("e-1")
        with pytest.raises(FailedPrecondition):
            await c.cancel_job("e-1")
        assert isinstance(bad.value, JobwireError)
        # durations the client converts itself name the argument (before: "cannot
        # convert float NaN to integer", "Value out of range: 1000...")
        with pytest.raises(InvalidArgument, match="lease must be a finite number of seconds"):
            await c.claim_job("GENERIC", lease=float("nan"))
        with pytest.raises(InvalidArgument, match="progress_deadline must be a finite number"):
            await c.create_job("GENERIC", progress_deadline=1e30)
        with pytest.raises(InvalidArgument, match="media_time must be a finite number"):
            await c.report_progress("e-1", 5, media_time=float("inf"))


async def test_bad_names_and_durations_raise_invalid_argument(service: ServiceHandle) -> None:
    """An unknown kind, state or level name, or a duration given as "15m", raised a bare
    ValueError ("Enum JobKind has no value defined for name 'JOB_KIND_FOO'"), though the
    README promises JobwireError subclasses: each is now InvalidArgument naming the
    argument and what it takes (still a ValueError, for callers that caught that), and
    nothing is sent."""
    async with client(service.target) as c:
        cases: list[tuple[Callable[[], Any], str]] = [
            (lambda: c.create_job("FOO"), "kind must be one of BATCH, VIDEO, "),
            (lambda: c.claim_job("FOO"), "kind must be one of BATCH, "),
            (lambda: anext(c.list_jobs(states=["DONE"])), "states must be one of QUEUED, "),
            (lambda: c.list_jobs_page(kind="nope"), "kind must be one of "),
            (lambda: c.list_logs(level="LOUD"), "level must be one of DEBUG, INFO, "),
            (lambda: c.write_log("x", level="LOUD"), "level must be one of "),
            (
                lambda: c.create_job("GENERIC", job_id="dl", progress_deadline="15m"),  # type: ignore[arg-type]
                "progress_deadline must be a finite number of seconds or a timedelta, got '15m'",
            ),
            (
                lambda: c.create_job("GENERIC", stall_fail_after="1h"),  # type: ignore[arg-type]
                "stall_fail_after must be a finite number of seconds or a timedelta",
            ),
            # Struct values JSON cannot hold: protobuf's bare "Unexpected type" before.
            (
                lambda: c.complete("any", metadata={"at": datetime.now(UTC)}),
                "metadata must hold JSON values only (str, int, float, bool, None, ",
            ),
            (lambda: c.fail("any", "E", details={"ids": {1, 2}}), "details must hold JSON "),
            (lambda: c.fail("any", "E", details={"by": {1: "x"}}), "details must hold JSON "),
        ]
        for call, said in cases:
            with pytest.raises(InvalidArgument) as bad:
                await call()
            assert bad.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert bad.value.message.startswith(said), bad.value.message
            assert isinstance(bad.value, JobwireError) and isinstance(bad.value, ValueError)
        with pytest.raises(InvalidArgument):
            c.watch_jobs(states=["DONE"])
        assert list((await c.list_jobs_page()).jobs) == []


async def test_arguments_of_the_wrong_type_raise_invalid_argument_naming_them(
    service: ServiceHandle,
) -> None:
    """labels={"n": 1}, a job id that is not a str, a percent given as "50": protobuf
    raised a bare TypeError ("bad argument type for built-in operation", naming no
    argument), or AttributeError for a datetime given as a str. Each is now
    InvalidArgument naming the argument (still a TypeError), and nothing is sent."""
    bad: Any = 5
    async with client(service.target) as c:
        cases: list[tuple[Callable[[], Any], str]] = [
            (lambda: c.create_job("GENERIC", labels={"n": bad}), "labels must be a mapping of "),
            (lambda: c.create_job("GENERIC", labels={bad: "n"}), "labels must be a mapping of "),
            (lambda: anext(c.list_jobs(labels={"n": bad})), "labels must be a mapping of str"),
            (lambda: c.create_job(None), "kind must be a name or a JobKind value, got None"),  # type: ignore[arg-type]
            (lambda: c.get_job(bad), "job_id must be a str, got 5"),
            (lambda: c.cancel_job("j", bad), "reason must be a str, got 5"),
            (lambda: c.claim_job("GENERIC", worker_id=bad), "worker_id must be a str"),
            (lambda: c.report_progress("j", "50"), "percent must be a number"),  # type: ignore[arg-type]
            (lambda: c.report_progress("j", 5, phase=bad), "phase must be a str, got 5"),
            (lambda: c.report_progress("j", 5, idempotency_key=bad), "idempotency_key must be"),
            (lambda: c.report_progress("j", 5, event_time="2020"), "event_time must be a datetime"),  # type: ignore[arg-type]
            (lambda: c.complete("j", result={"output_key": "x"}), "result must be a jobwire."),  # type: ignore[arg-type]
            (lambda: c.write_log(bad), "message must be a str, got 5"),
            (lambda: c.list_logs(limit="3"), "limit must be an int, got '3'"),  # type: ignore[arg-type]
            (lambda: c.list_job_events("j", "3"), "from_sequence must be an int"),  # type: ignore[arg-type]
            (lambda: c.upload_artifact("j", "a", bytearray(b"x")), "source must be a path, bytes"),  # type: ignore[arg-type]
            (lambda: c.upload_artifact("j", bad, b"x"), "name must be a str, got 5"),
        ]
        for call, said in cases:
            with pytest.raises(InvalidArgument) as err:
                await call()
            assert err.value.message.startswith(said), err.value.message
            assert isinstance(err.value, TypeError)
        with pytest.raises(InvalidArgument, match="job_id must be a str"):
            c.watch_job(bad)
        with pytest.raises(InvalidArgument, match=r"states must be a list of states, e.g. \['RUNN"):
            c.watch_jobs(states="RUNNING")
        with pytest.raises(InvalidArgument, match=r"states must be a list of states"):
            await c.list_jobs_page(states="RUNNING")
        with pytest.raises(InvalidArgument, match="after must be a str, got 5"):
            c.watch_jobs(after=bad)
        with pytest.raises(ClientConfigError, match="give_up_after must be a finite number"):
            c.watch_job("j", give_up_after=str(bad))  # type: ignore[arg-type]
        assert list((await c.list_jobs_page()).jobs) == []
        # numbers of other types protobuf takes are still taken
        await c.create_job("GENERIC", job_id="num")
        await c.report_progress("num", Decimal("12.5"))  # type: ignore[arg-type]
        assert (await c.get_job("num")).progress.percent == 12.5
        await c.report_progress("num", Fraction(51, 2))  # type: ignore[arg-type]
        assert (await c.get_job("num")).progress.percent == 25.5
        # and UTF-8 bytes for a str, as protobuf takes them
        await c.create_job("GENERIC", job_id=b"bytes-id", labels={b"k": b"v"})  # type: ignore[arg-type, dict-item]
        assert (await c.get_job(b"bytes-id")).labels["k"] == "v"  # type: ignore[arg-type]


async def test_artifacts_from_bytes_path_and_iterator(
    service: ServiceHandle, tmp_path: Path
) -> None:
    async with client(service.target) as c:
        await c.create_job("EXTRACTION", job_id="a-1")
        text = b"# extracted\n" * 1000
        art = await c.upload_artifact("a-1", "text.md", text, content_type="text/markdown")
        assert art.size_bytes == len(text) and art.sha256 == hashlib.sha256(text).hexdigest()
        source = tmp_path / "images.zip"
        source.write_bytes(os.urandom(3 * MiB + 5))
        art = await c.upload_artifact("a-1", "images.zip", source, chunk_size=MiB)
        assert art.sha256 == hashlib.sha256(source.read_bytes()).hexdigest()

        async def parts() -> AsyncIterator[bytes]:
            for i in range(3):
                yield bytes([i]) * 1000

        art = await c.upload_artifact("a-1", "parts.bin", parts())
        assert art.size_bytes == 3000
        names = [a.name for a in await c.list_artifacts("a-1")]
        assert sorted(names) == ["images.zip", "parts.bin", "text.md"]
        stream = c.read_artifact("a-1", "text.md")
        assert b"".join([chunk async for chunk in stream]) == text
        assert stream.artifact is not None and stream.artifact.content_type == "text/markdown"
        saved = await c.read_artifact("a-1", "images.zip").save(tmp_path / "copy.zip")
        assert (tmp_path / "copy.zip").read_bytes() == source.read_bytes()
        assert saved.name == "images.zip"
        with pytest.raises(NotFound):
            await c.read_artifact("a-1", "nope").save(tmp_path / "nope")
        assert not (tmp_path / "nope").exists() and not (tmp_path / "nope.partial").exists()


async def test_an_upload_whose_source_fails_raises_the_sources_error(
    service: ServiceHandle, tmp_path: Path
) -> None:
    """Before: a missing file, a directory or an iterator that raised surfaced as
    asyncio.CancelledError (grpc cancels the call when its request iterator fails), which
    `except Exception` does not catch and which reads as the caller's own cancellation;
    and the service could take the cancel for the stream's end and store what it had
    got in place of the artifact (MongoDB stored empty ones)."""

    async def breaks() -> AsyncIterator[bytes]:
        yield b"first part"
        raise RuntimeError("the source broke")

    async with client(service.target) as c:
        await c.create_job("GENERIC", job_id="up")
        await c.upload_artifact("up", "a.bin", b"the stored version")
        for _ in range(3):  # the service's side was a race
            with pytest.raises(FileNotFoundError):
                await c.upload_artifact("up", "a.bin", tmp_path / "missing.bin")
            with pytest.raises(IsADirectoryError):
                await c.upload_artifact("up", "a.bin", tmp_path)
            with pytest.raises(RuntimeError, match="the source broke"):
                await c.upload_artifact("up", "a.bin", breaks())
            with pytest.raises(RuntimeError, match="the source broke"):
                await c.upload_artifact("up", "new.bin", breaks())
        # a chunk size that cannot be sent (before: -1 stored an empty artifact in place
        # of the stored one, 0 a bare range() error, 5 MiB the service's RESOURCE_EXHAUSTED)
        for bad in (-1, 0, 5 * MiB):
            with pytest.raises(ValueError, match="chunk_size must be 1 to"):
                await c.upload_artifact("up", "a.bin", b"replacement", chunk_size=bad)
        assert [a.name for a in await c.list_artifacts("up")] == ["a.bin"]
        stored = [chunk async for chunk in c.read_artifact("up", "a.bin")]
        assert b"".join(stored) == b"the stored version"  # never replaced by a part


async def test_a_cancelled_upload_never_replaces_the_stored_artifact(
    service: ServiceHandle,
) -> None:
    """Before: grpc.aio ends a request stream the same way when the client cancels, so
    the service stored the part it had got in place of the artifact (MongoDB: 16 of 20
    trials). The upload now declares its size and the service refuses one cut short."""
    async with client(service.target) as c:
        await c.create_job("GENERIC", job_id="cut")
        await c.upload_artifact("cut", "a.bin", b"the stored version")
        for _ in range(10):
            handed_over = asyncio.Event()

            async def stalls(handed_over: asyncio.Event) -> AsyncIterator[bytes]:
                yield b"first part of the new one"
                handed_over.set()  # grpc asked for the next message: the part is sent
                await asyncio.Event().wait()
                yield b"never"

            source = stalls(handed_over)
            task = asyncio.create_task(c.upload_artifact("cut", "a.bin", source, size=1000))
            await asyncio.wait_for(handed_over.wait(), WAIT)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        stored = [chunk async for chunk in c.read_artifact("cut", "a.bin")]
        assert b"".join(stored) == b"the stored version"
        with pytest.raises(ValueError, match="size must be a byte count"):
            await c.upload_artifact("cut", "a.bin", b"x", size=-1)


async def test_the_service_refuses_an_upload_that_misses_its_declared_size(
    service: ServiceHandle,
) -> None:
    stub = service.stub
    await stub.CreateJob(
        job_service_pb2.CreateJobRequest(
            job=job_pb2.Job(kind=job_pb2.JOB_KIND_GENERIC), job_id="sz"
        )
    )

    async def put(size: int, *parts: bytes) -> artifact_pb2.Artifact:
        header = job_service_pb2.ArtifactHeader(job_id="sz", name="a.bin", size=size)
        messages = [job_service_pb2.UploadArtifactRequest(header=header)]
        messages += [job_service_pb2.UploadArtifactRequest(data=p) for p in parts]
        return await stub.UploadArtifact(iter(messages))

    assert (await put(6, b"kept", b"!!")).size_bytes == 6
    for size, parts, says in (
        (10, [b"short"], "ended after 5 of the 10 bytes"),
        (3, [b"ab", b"cd"], "more than the 3 bytes"),
        (-1, [b"x"], "header.size must not be negative"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await put(size, *parts)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert says in (err.value.details() or "")
    read = stub.ReadArtifact(job_service_pb2.ReadArtifactRequest(job_id="sz", name="a.bin"))
    assert b"".join([m.data async for m in read]) == b"kept!!"


async def test_50_mib_artifact_in_bounded_memory(tmp_path: Path) -> None:
    """Upload and read 50 MiB; Python's peak allocation stays a few chunks, not 50 MiB
    (client and service run in this process, so both are measured)."""
    handle = await start_service(EmbeddedStore(tmp_path / "d", make_policy()))
    digest = hashlib.sha256()

    async def generated() -> AsyncIterator[bytes]:
        block = os.urandom(MiB)
        for i in range(50):
            chunk = block[:-1] + bytes([i])
            digest.update(chunk)
            yield chunk

    try:
        async with client(handle.target) as c:
            await c.create_job("EXTRACTION", job_id="big")
            tracemalloc.start()
            try:
                art = await c.upload_artifact("big", "big.bin", generated())
                _, upload_peak = tracemalloc.get_traced_memory()
                tracemalloc.reset_peak()
                read = hashlib.sha256()
                async for chunk in c.read_artifact("big", "big.bin"):
                    read.update(chunk)
                _, read_peak = tracemalloc.get_traced_memory()
                tracemalloc.reset_peak()
                await c.read_artifact("big", "big.bin").save(tmp_path / "big.out")
                _, save_peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            assert art.size_bytes == 50 * MiB and art.sha256 == digest.hexdigest()
            assert read.hexdigest() == digest.hexdigest()
            assert (tmp_path / "big.out").stat().st_size == 50 * MiB
            for peak in (upload_peak, read_peak, save_peak):
                assert peak < 12 * MiB, f"peak {peak / MiB:.1f} MiB"
    finally:
        await handle.close()


# -- deadlines, retries, TLS, token ------------------------------------------------


async def test_default_and_per_call_deadlines_fire() -> None:
    stalled = grpc.aio.server()  # accepts calls and never answers them
    started = asyncio.Event()

    async def hang(request: bytes, context: object) -> bytes:
        started.set()
        await asyncio.sleep(3600)  # a service that never answers (cancelled by the deadline)
        return b""

    port = await serve_one(stalled, "GetJob", grpc.unary_unary_rpc_method_handler(hang))
    try:
        async with client(f"127.0.0.1:{port}", timeout=0.3) as c:
            loop = asyncio.get_running_loop()
            begin = loop.time()
            with pytest.raises(DeadlineExceeded) as err:
                await c.get_job("x")  # the client's default deadline
            assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert started.is_set() and loop.time() - begin < WAIT
            with pytest.raises(DeadlineExceeded):
                await c.get_job("x", timeout=0.1)  # a per-call deadline
        # closed while a call waits: UsageError (before: CancelledError, the task
        # ending as cancelled though nobody had cancelled it)
        c = client(f"127.0.0.1:{port}")
        started.clear()
        waiting = asyncio.ensure_future(c.get_job("x"))
        await asyncio.wait_for(started.wait(), WAIT)
        await c.close()
        with pytest.raises(grpc.aio.UsageError, match="closed"):
            await waiting
    finally:
        await stalled.stop(0)


async def serve_one(server: grpc.aio.Server, method: str, handler: Any) -> int:
    """Starts `server` on a loopback port with JobService's `method` only; the port."""
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("jobwire.v1.JobService", {method: handler})]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return port


async def test_a_call_deadline_covers_its_retries() -> None:
    """`timeout=` bounds the whole call: a service that answers UNAVAILABLE slowly is
    retried only while the deadline allows (before: each retry had a fresh deadline,
    so 1 s became 20 attempts x 0.2 s plus backoff)."""
    flaky = grpc.aio.server()
    attempts = 0

    async def slow_unavailable(
        request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> bytes:
        nonlocal attempts
        attempts += 1
        await asyncio.sleep(0.2)  # the service's slowness, not synchronisation
        await context.abort(grpc.StatusCode.UNAVAILABLE, "draining")
        return b""

    port = await serve_one(flaky, "GetJob", grpc.unary_unary_rpc_method_handler(slow_unavailable))
    patient = RetryPolicy(attempts=20, backoff=Backoff(initial=0.01, maximum=0.02))
    try:
        async with client(f"127.0.0.1:{port}", retry=patient) as c:
            loop = asyncio.get_running_loop()
            begin = loop.time()
            with pytest.raises((Unavailable, DeadlineExceeded)):
                await c.get_job("x", timeout=1.0)
            took = loop.time() - begin
            assert 1 < attempts < 20, attempts  # retried, but not past the deadline
            assert took < 2.5, f"{took:.1f} s"  # 20 attempts take 4 s or more
    finally:
        await flaky.stop(0)


async def test_a_read_deadline_covers_its_retries(tmp_path: Path) -> None:
    """`read_artifact(timeout=)` bounds the whole read, as `timeout=` does for the other
    calls: before, each attempt had a fresh deadline, so a service that answered
    UNAVAILABLE or ABORTED slowly made 1 s into 20 attempts x 0.2 s plus backoff."""
    flaky = grpc.aio.server()
    attempts = 0

    async def slow_refusal(
        request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> AsyncIterator[bytes]:
        nonlocal attempts
        attempts += 1
        await asyncio.sleep(0.2)  # the service's slowness, not synchronisation
        code = grpc.StatusCode.ABORTED if attempts % 2 else grpc.StatusCode.UNAVAILABLE
        await context.abort(code, "replaced or draining")
        yield b""

    port = await serve_one(
        flaky, "ReadArtifact", grpc.unary_stream_rpc_method_handler(slow_refusal)
    )
    patient = RetryPolicy(attempts=20, backoff=Backoff(initial=0.01, maximum=0.02))
    loop = asyncio.get_running_loop()
    try:
        async with client(f"127.0.0.1:{port}", retry=patient) as c:
            for read in ("iterate", "save"):
                attempts = 0
                begin = loop.time()
                with pytest.raises(JobwireError):  # the last refusal, or DeadlineExceeded
                    stream = c.read_artifact("j", "a.bin", timeout=1.0)
                    if read == "save":
                        await stream.save(tmp_path / "a.bin")
                    else:
                        _ = [chunk async for chunk in stream]
                took = loop.time() - begin
                assert 1 < attempts < 20, (read, attempts)  # retried, but not past the deadline
                assert took < 2.5, f"{read}: {took:.1f} s"  # 20 attempts take 4 s or more
            assert not (tmp_path / "a.bin.partial").exists()
    finally:
        await flaky.stop(0)


async def test_saving_an_artifact_tries_as_often_as_the_policy_says(tmp_path: Path) -> None:
    """Before: save() retried the download, and each download retried its start, so
    RetryPolicy(attempts=3) made 9 calls (5 -> 25 by default: 6 s against a dead port)."""
    down = grpc.aio.server()
    calls = 0

    async def unavailable(
        request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> AsyncIterator[bytes]:
        nonlocal calls
        calls += 1
        await context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")
        yield b""

    port = await serve_one(down, "ReadArtifact", grpc.unary_stream_rpc_method_handler(unavailable))
    three = RetryPolicy(attempts=3, backoff=Backoff(initial=0.01, maximum=0.02))
    try:
        async with client(f"127.0.0.1:{port}", retry=three) as c:
            with pytest.raises(Unavailable):
                await c.read_artifact("j", "a.bin").save(tmp_path / "a.bin")
            assert calls == 3
            assert not (tmp_path / "a.bin.partial").exists()
            calls = 0
            with pytest.raises(Unavailable):
                _ = [chunk async for chunk in c.read_artifact("j", "a.bin")]
            assert calls == 3
    finally:
        await down.stop(0)


async def test_an_artifact_replaced_under_a_read_is_read_again(
    service: ServiceHandle, proxy: FaultProxy, tmp_path: Path
) -> None:
    """A read that a replacement overtakes is ABORTED by the service ("... was replaced;
    read it again"): a read is idempotent, yet the client raised it to the caller. Now
    it reads again: `save()` at any point (it starts the file over), iteration while no
    chunk was yielded (a read cannot resume mid-way)."""
    content = os.urandom(3 * MiB + 7)
    async with client(proxy.target) as c:
        await c.create_job("EXTRACTION", job_id="re-1")
        await c.upload_artifact("re-1", "images.zip", content)
        # header and one chunk written, then the replacement: the file is started over
        proxy.abort_next_stream("ReadArtifact", 2, grpc.StatusCode.ABORTED)
        await c.read_artifact("re-1", "images.zip").save(tmp_path / "copy.zip")
        assert (tmp_path / "copy.zip").read_bytes() == content
        assert proxy.calls["ReadArtifact"] == 2
        proxy.abort_next_stream("ReadArtifact", 0, grpc.StatusCode.ABORTED)
        assert b"".join([chunk async for chunk in c.read_artifact("re-1", "images.zip")]) == content
        assert proxy.calls["ReadArtifact"] == 4
        # once chunks were yielded, iteration cannot start over unseen: it says so
        proxy.abort_next_stream("ReadArtifact", 2, grpc.StatusCode.ABORTED)
        with pytest.raises(JobwireError) as err:
            _ = [chunk async for chunk in c.read_artifact("re-1", "images.zip")]
        assert err.value.code == grpc.StatusCode.ABORTED


async def test_report_progress_retried_after_a_lost_reply_is_applied_once(
    service: ServiceHandle, proxy: FaultProxy
) -> None:
    async with client(proxy.target) as c:
        await c.create_job("GENERIC", job_id="r-1")
        proxy.lose_reply["ReportEvent"] = 1  # applied by the service, reply lost
        reply = await c.report_progress("r-1", 50, message="half")
        assert proxy.calls["ReportEvent"] == 2  # the client retried once...
        assert reply.duplicate and reply.sequence == 1  # ...with the same key: applied once
        events = (await c.list_job_events("r-1")).events
        assert [e.sequence for e in events] == [1]
        # reads are retried too; a call that is not safe to repeat is not
        proxy.lose_reply["GetJob"] = 1
        assert (await c.get_job("r-1")).sequence == 1
        assert proxy.calls["GetJob"] == 2
        # A create is retried too: the job the lost attempt made comes back, with the
        # token this client chose for it (the id too, when not given).
        proxy.lose_reply["CreateJob"] = 1
        made = await c.create_job("GENERIC", job_id="r-2")
        assert proxy.calls["CreateJob"] == 3  # r-1 once, r-2 twice
        mine = job_service_pb2.GetJobRequest(id="r-2", callback_token=made.callback_token)
        assert (await service.stub.GetJob(mine)).id == "r-2"
        proxy.lose_reply["CreateJob"] = 1
        unnamed = await c.create_job("GENERIC")
        listed = await service.stub.ListJobs(job_service_pb2.ListJobsRequest())
        assert sorted(j.id for j in listed.jobs) == sorted(["r-1", "r-2", unnamed.job.id])
        proxy.lose_reply["ReportEvent"] = 10  # more than the retry policy allows
        with pytest.raises(Unavailable):
            await c.report_progress("r-1", 60)
        assert (await c.get_job("r-1")).sequence == 2  # applied once all the same


async def test_report_event_keys_its_own_copy_of_a_request_without_a_key(
    service: ServiceHandle, proxy: FaultProxy
) -> None:
    """report_event(request) wrote the key it generated into the caller's request: the
    same request object sent again with new progress carried that key and was answered
    `duplicate`, the report silently dropped. The key is now the call's own, kept
    across its retries only."""
    async with client(proxy.target) as c:
        await c.create_job("GENERIC", job_id="rk-1")
        request = job_service_pb2.ReportEventRequest(
            job_id="rk-1", progress=job_pb2.Progress(percent=10)
        )
        proxy.lose_reply["ReportEvent"] = 1  # retried with the key it generated
        assert (await c.report_event(request)).duplicate
        assert request.idempotency_key == ""
        request.progress.percent = 20
        second = await c.report_event(request)
        assert not second.duplicate and second.sequence == 2
        assert (await c.get_job("rk-1")).progress.percent == 20


async def test_write_log_retried_after_a_lost_reply_is_stored_once(
    service: ServiceHandle, proxy: FaultProxy
) -> None:
    """write_log was never retried (a repeat stored the line twice): now its key makes
    a repeat a duplicate, answered with the line stored first."""
    async with client(proxy.target) as c:
        await c.create_job("GENERIC", job_id="wl-1")
        proxy.lose_reply["WriteLog"] = 1  # stored by the service, reply lost
        reply = await c.write_log("once", job_id="wl-1")
        assert proxy.calls["WriteLog"] == 2  # the client retried...
        assert reply.duplicate and reply.entry.message == "once"  # ...with the same key
        assert [e.message for e in await c.list_logs(job_id="wl-1")] == ["once"]
        # A key given by hand: the same key again is the same line; another is another.
        first = await c.write_log("mine", job_id="wl-1", idempotency_key="k-1")
        again = await c.write_log("mine, changed", job_id="wl-1", idempotency_key="k-1")
        assert not first.duplicate and again.duplicate
        assert again.entry.message == "mine" and again.entry.time == first.entry.time
        other = await c.write_log("mine", job_id="wl-1", idempotency_key="k-2")
        assert not other.duplicate
        assert [e.message for e in await c.list_logs(job_id="wl-1")].count("mine") == 2
        # An ERROR line that fails its job keeps its key too (it was stored under the
        # job failure's own key, so its retry was stored again).
        await c.create_job("GENERIC", job_id="wl-2")
        await c.report_progress("wl-2", 10)
        broke = await c.write_log("broke", job_id="wl-2", level="ERROR", idempotency_key="e-1")
        retried = await c.write_log("broke", job_id="wl-2", level="ERROR", idempotency_key="e-1")
        assert broke.job_failed and retried.duplicate
        assert [e.message for e in await c.list_logs(job_id="wl-2")] == ["broke"]
        with pytest.raises(InvalidArgument, match="idempotency_key must be at most 256"):
            await c.write_log("long key", job_id="wl-1", idempotency_key="k" * 257)


async def test_write_log_with_an_empty_key_is_still_stored_once(
    service: ServiceHandle, proxy: FaultProxy
) -> None:
    """idempotency_key="" (a header that was not there, say) went out as no key at all,
    yet the call was retried: a lost reply stored the line twice. An empty key is a key
    not given, as for event reports: one is generated."""
    async with client(proxy.target) as c:
        await c.create_job("GENERIC", job_id="wl-empty")
        proxy.lose_reply["WriteLog"] = 1
        reply = await c.write_log("once", job_id="wl-empty", idempotency_key="")
        assert proxy.calls["WriteLog"] == 2 and reply.duplicate
        assert [e.message for e in await c.list_logs(job_id="wl-empty")] == ["once"]


async def test_report_progress_retried_after_a_dropped_connection_is_applied_once(
    service: ServiceHandle,
) -> None:
    """The TCP connection is reset after the service applied the report and before its
    reply arrived: the client reconnects, retries with the same key, and the service
    acknowledges a duplicate."""
    cutter = await TcpCutter(service.running.port).start()
    patient = RetryPolicy(attempts=10, backoff=Backoff(initial=0.1, maximum=1.0))
    try:
        async with client(service.target) as direct, client(cutter.target, retry=patient) as c:
            await c.create_job("GENERIC", job_id="cut-1")
            cutter.hold = True
            report = asyncio.ensure_future(c.report_progress("cut-1", 50, message="half"))
            deadline = asyncio.get_running_loop().time() + WAIT
            while (await direct.get_job("cut-1")).sequence != 1:  # the service applied it
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.01)  # polling interval (deadline above)
            assert not report.done()  # ...and its reply is held
            cutter.cut()
            reply = await asyncio.wait_for(report, WAIT)
            assert cutter.connections >= 2  # the retry went over a new connection
            assert reply.duplicate and reply.sequence == 1  # same key: applied once
            assert [e.sequence for e in (await direct.list_job_events("cut-1")).events] == [1]
    finally:
        await cutter.close()


# A service's module-level client, made before asyncio.run starts the loop it is used in.
MADE_BEFORE_THE_LOOP = """
import asyncio, sys
from jobwire.client import Client, NotFound
client = Client(sys.argv[1])

async def main() -> None:
    async with client:
        try:
            await client.get_job("nope")
        except NotFound:
            print("NOT_FOUND")
    await client.close()  # twice is fine

other = Client(sys.argv[1])

async def again(c: Client) -> None:
    try:
        await c.get_job("nope")
    except Exception as err:
        print(type(err).__name__, err)

asyncio.run(main())
asyncio.run(again(client))
asyncio.run(again(other))
asyncio.run(again(other))
"""


async def test_a_client_made_before_its_event_loop_runs_works_in_it(
    grpc_service: ServiceHandle,
) -> None:
    """Before: the channel was bound to the loop current at construction, so the first
    call failed with 'Future attached to a different loop'."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-W", "error", "-c", MADE_BEFORE_THE_LOOP, grpc_service.target,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), WAIT)
    assert proc.returncode == 0, err.decode()[-1500:]
    assert out.decode().splitlines() == [
        "NOT_FOUND",
        "UsageError this jobwire Client is closed",
        "NotFound NOT_FOUND: job 'nope' not found",
        "UsageError this jobwire Client was opened in another event loop; make one per loop",
    ]


async def test_a_closed_client_says_so(grpc_service: ServiceHandle) -> None:
    """Closed under running watches, each raises UsageError (before: the watching tasks
    ended as cancelled, CancelledError, though nobody had cancelled them); later calls
    and watches raise it too; closing twice is fine."""
    fanout = grpc_service.running.jobs.fanout
    job_id = f"closed-{os.urandom(4).hex()}"
    c = client(grpc_service.target)
    await c.create_job("GENERIC", job_id=job_id)
    before = fanout.watchers

    async def follow_job() -> None:
        async for _ in c.watch_job(job_id):
            pass

    async def follow_all() -> None:
        async for _ in c.watch_jobs():
            pass

    tasks = [asyncio.ensure_future(follow_job()), asyncio.ensure_future(follow_all())]
    await until(lambda: fanout.watchers == before + 2)
    await c.close()
    for task in tasks:
        with pytest.raises(grpc.aio.UsageError, match="closed"):
            await asyncio.wait_for(task, WAIT)
    await c.close()
    with pytest.raises(grpc.aio.UsageError, match="closed"):
        await c.get_job("x")
    with pytest.raises(grpc.aio.UsageError, match="closed"):
        await collect(c.watch_job("x"))


async def test_channel_options_given_override_the_librarys(grpc_service: ServiceHandle) -> None:
    """Before: the library's defaults came first and gRPC keeps the first of two equal
    keys, so Client(options=...) could not change a keepalive or a message limit."""
    job_id = f"opt-{os.urandom(4).hex()}"
    async with client(grpc_service.target) as c:
        await c.create_job("GENERIC", job_id=job_id)
        await c.upload_artifact(job_id, "a.bin", b"x" * 1000)
    small = [("grpc.max_receive_message_length", 100)]
    async with client(grpc_service.target, options=small) as c:
        with pytest.raises(JobwireError) as err:
            _ = [chunk async for chunk in c.read_artifact(job_id, "a.bin")]
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_unreachable_service_is_unavailable_after_retries() -> None:
    from tests.helpers import free_port

    async with client(f"127.0.0.1:{free_port()}") as c:
        with pytest.raises(Unavailable) as err:
            await c.get_job("x", timeout=2)
        assert err.value.code == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("mutual", [False, True])
async def test_tls_and_token(tmp_path: Path, mutual: bool) -> None:
    from tests.test_ops import _self_signed

    cert, key = _self_signed(tmp_path)
    handle = await start_service(
        EmbeddedStore(tmp_path / "d", make_policy()),
        grpc_tls_cert=str(cert),
        grpc_tls_key=str(key),
        grpc_tls_client_ca=str(cert) if mutual else "",
        grpc_token="s3cr3t",
    )
    tls = TLS(ca=cert, cert=cert if mutual else None, key=key if mutual else None)
    try:
        async with client(handle.target, tls=tls, token="s3cr3t") as c:
            made = await c.create_job("GENERIC", job_id="tls-1")
            assert made.job.id == "tls-1"
            items = await collect(c.watch_job("tls-1"), until=1)  # streams carry the token too
            assert isinstance(items[0], Job)
        async with client(handle.target, tls=tls, token="wrong") as c:
            with pytest.raises(Unauthenticated):
                await c.get_job("tls-1")
        async with client(handle.target, tls=tls) as c:
            with pytest.raises(Unauthenticated):
                await c.get_job("tls-1")
        async with client(handle.target, token="s3cr3t", retry=RetryPolicy(attempts=1)) as c:
            with pytest.raises(JobwireError):  # plaintext against a TLS port
                await c.get_job("tls-1", timeout=2)
        env = {
            "JOBWIRE_SERVICE_TARGET": handle.target,
            "JOBWIRE_SERVICE_TLS_CA": str(cert),
            "JOBWIRE_GRPC_TOKEN": "s3cr3t",
        }
        if mutual:
            env |= {"JOBWIRE_SERVICE_TLS_CERT": str(cert), "JOBWIRE_SERVICE_TLS_KEY": str(key)}
        async with Client.from_env(env=env) as c:
            assert (await c.get_job("tls-1")).id == "tls-1"
        with pytest.raises(ClientConfigError, match="JOBWIRE_SERVICE_TLS_KEY"):
            Client.from_env(env={"JOBWIRE_SERVICE_TLS_CERT": str(cert)})
        # a client key alone (its certificate's variable misspelt) meant mTLS, but gave
        # plaintext, the token in the clear
        with pytest.raises(ClientConfigError, match="JOBWIRE_SERVICE_TLS_CERT"):
            Client.from_env(env={"JOBWIRE_SERVICE_TLS_KEY": str(key)})
        # a server name alone meant TLS, but gave plaintext (and the token in the clear)
        with pytest.raises(ClientConfigError, match="set JOBWIRE_SERVICE_TLS_CA"):
            Client.from_env(env={"JOBWIRE_SERVICE_TLS_SERVER_NAME": "jobwire.internal"})
        with pytest.raises(ClientConfigError, match="cannot read"):
            Client(handle.target, tls=TLS(ca=tmp_path / "missing.pem"))
        # Not PEM: gRPC printed its own errors and every call then failed.
        (tmp_path / "not.pem").write_text("not a certificate\n")
        with pytest.raises(ClientConfigError, match=r"not\.pem' is not a PEM certificate"):
            Client(handle.target, tls=TLS(ca=tmp_path / "not.pem"))
        with pytest.raises(ClientConfigError, match="key given as bytes is not a PEM private"):
            Client(handle.target, tls=TLS(cert=cert.read_bytes(), key=cert.read_bytes()))
    finally:
        await handle.close()


# -- watch_job ------------------------------------------------------------------


async def test_watch_job_snapshot_events_and_end(service: ServiceHandle) -> None:
    async with client(service.target) as c:
        await c.create_job("GENERIC", job_id="w-1")
        await c.report_progress("w-1", 10)
        watch = c.watch_job("w-1")
        iterator = aiter(watch)
        first = await asyncio.wait_for(anext(iterator), WAIT)
        assert isinstance(first, Job) and first.id == "w-1"
        assert sequences([await asyncio.wait_for(anext(iterator), WAIT)]) == [1]
        await c.report_progress("w-1", 60)
        await c.complete("w-1")
        rest = [item async for item in iterator]
        assert sequences(rest) == [2, 3]
        assert rest[-1].state == job_pb2.JOB_STATE_SUCCEEDED  # type: ignore[union-attr]
        # from_sequence resumes after it; a finished job's watch ends by itself
        later = await collect(c.watch_job("w-1", from_sequence=2))
        assert isinstance(later[0], Job) and sequences(later) == [3]
        assert sequences(await collect(c.watch_job("w-1", from_sequence=3))) == []
        with pytest.raises(NotFound):
            await collect(c.watch_job("missing"))


async def test_watch_job_across_a_service_restart(
    store_kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    database = f"t_restart_{os.urandom(6).hex()}"  # (mongo) the second service reopens it

    async def store() -> Store:
        return await open_test_store(store_kind, tmp_path, request, make_policy(), database)

    first = await start_service(await store())
    port = first.running.port
    second: ServiceHandle | None = None
    async with client(first.target) as c:
        await c.create_job("GENERIC", job_id="rs")
        for percent in (10, 20):
            await c.report_progress("rs", percent)
        iterator = aiter(c.watch_job("rs"))
        seen = [await asyncio.wait_for(anext(iterator), WAIT) for _ in range(3)]
        await first.close()  # the watcher sees UNAVAILABLE and keeps reconnecting
        second = await start_service(await store(), grpc_addr=f"127.0.0.1:{port}")
        try:
            async with client(second.target) as writer:
                for percent in (30, 40, 50):
                    await writer.report_progress("rs", percent)
                await writer.complete("rs")
            seen += [item async for item in iterator]
        finally:
            await second.close()
    assert isinstance(seen[0], Job)
    assert sum(isinstance(i, Job) for i in seen) == 1  # the reconnect's snapshot is not repeated
    assert sequences(seen) == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("how", ["retried", "never_repeated", "artifact_read", "artifact_save"])
async def test_a_call_after_the_service_is_back_waits_for_the_reconnect(
    tmp_path: Path, how: str
) -> None:
    """gRPC fails a call at once while the channel backs off before reconnecting, and
    its backoff (0.2-2 s by default) outlasts the retries' (FAST: 0.35 s at most), so a
    call made just after the service came back failed UNAVAILABLE: 'Connection
    refused' from a port that was listening again (a CI flake of the restart test
    above). A retry now waits for the channel to connect, within the backoff's bound.
    So does the one attempt of a call that is never repeated (cancel_job, claim_job,
    delete_job): it failed so while get_job on the same client worked. And so do the
    retries of an artifact read, iterated or saved: they failed so too."""
    first = await start_service(EmbeddedStore(tmp_path, make_policy()))
    port = first.running.port
    slow = [("grpc.initial_reconnect_backoff_ms", 3000), ("grpc.max_reconnect_backoff_ms", 3000)]
    saved = tmp_path / "saved.txt"

    async def call(c: Client) -> object:
        if how == "retried":
            return (await c.get_job("back")).id
        if how == "never_repeated":
            return (await c.cancel_job("back", reason="back again")).state
        if how == "artifact_read":
            return b"".join([chunk async for chunk in c.read_artifact("back", "a.txt")])
        await c.read_artifact("back", "a.txt").save(saved)
        return saved.read_bytes()

    expected: object = {
        "retried": "back",
        "never_repeated": job_pb2.JOB_STATE_CANCELLED,
    }.get(how, b"frames: 3\n")
    async with client(first.target, options=slow) as c:
        await c.create_job("GENERIC", job_id="back")
        await c.upload_artifact("back", "a.txt", b"frames: 3\n")
        await first.close()
        with pytest.raises(Unavailable):  # a refused connect: the channel backs off 2.4-3.6 s
            await c.get_job("back", timeout=0.2)
        second = await start_service(
            EmbeddedStore(tmp_path, make_policy()), grpc_addr=f"127.0.0.1:{port}"
        )
        try:
            assert await call(c) == expected
        finally:
            await second.close()
        # Down for good: still UNAVAILABLE (not a passed deadline), after one reconnect
        # wait at most, well before the 10 s deadline.
        loop = asyncio.get_running_loop()
        begin = loop.time()
        with pytest.raises(Unavailable):
            await (c.delete_job("back") if how == "never_repeated" else call(c))
        assert loop.time() - begin < 6  # 0.35 s of backoff + 3 s x 1.2 + 0.5 s


async def test_a_client_closed_while_a_retry_waits_for_the_reconnect_says_so_at_once(
    tmp_path: Path,
) -> None:
    """A retry waits for the channel to connect (up to 2.9 s by default); closing the
    client did not end that wait: the call went on until it ran out, then raised
    grpc's 'Channel is closed.', where a call closed under raises at once that the
    client is closed."""
    gone = await start_service(EmbeddedStore(tmp_path, make_policy()))
    target = gone.target
    await gone.close()
    c = client(target)
    call = asyncio.ensure_future(c.get_job("any"))
    await asyncio.sleep(0.6)  # past FAST's backoff: in the reconnect wait
    assert not call.done()
    loop = asyncio.get_running_loop()
    closed = loop.time()
    await c.close()
    with pytest.raises(grpc.aio.UsageError, match="this jobwire Client is closed"):
        await call
    assert loop.time() - closed < 0.5


async def test_a_client_closed_during_a_backoff_says_so_at_once(tmp_path: Path) -> None:
    """close() did not end a retry's or a watch's backoff (up to 5 s by default, or a
    full node's retry-after hint): the call slept on, then raised grpc's 'Channel is
    closed.'; the watch slept on too. Both now say at once that the client is closed."""
    gone = await start_service(EmbeddedStore(tmp_path, make_policy()))
    target = gone.target
    await gone.close()
    slow = Backoff(initial=5.0, maximum=5.0)  # each wait 2.5-5 s
    c = client(target, retry=RetryPolicy(attempts=3, backoff=slow), watch_backoff=slow)
    call = asyncio.ensure_future(c.get_job("any"))
    waiting = asyncio.Event()
    watch = c.watch_job("any", on_retry=lambda error, delay: waiting.set())
    watching = asyncio.ensure_future(collect(watch))
    await asyncio.wait_for(waiting.wait(), WAIT)  # the watch is in its backoff, and the
    assert not call.done()  # call, on the same channel, failed first: in its own
    loop = asyncio.get_running_loop()
    closed = loop.time()
    await c.close()
    for ended in (call, watching):
        with pytest.raises(grpc.aio.UsageError, match="this jobwire Client is closed"):
            await asyncio.wait_for(ended, WAIT)
    assert loop.time() - closed < 0.5


async def test_watch_job_follows_a_job_whose_history_went_back(
    store_kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The service came back on older data (a restored backup): the job is at sequence 1
    where the watcher had yielded 4. The watch resumed from 4 and dropped the job's new
    events 2 and 3 as already seen, the terminal one too, so it never ended. It now
    yields the fresh snapshot and a StreamGap going back (requested 4, oldest 2), then
    every new event. The backup is a copy of the live data (the job's create time is
    the same: a job made anew under the id is another job, see
    test_a_watch_resumed_across_a_delete_and_remake_of_its_job_says_so)."""
    live, backup = f"t_live_{os.urandom(6).hex()}", f"t_backup_{os.urandom(6).hex()}"

    async def store(name: str) -> Store:
        return await open_test_store(store_kind, tmp_path / name, request, make_policy(), name)

    # The backup: the job as it was after its first event.
    earlier = await start_service(await store(live))
    async with client(earlier.target) as c:
        await c.create_job("GENERIC", job_id="rb")
        await c.report_progress("rb", 10)
    await earlier.close()
    await _copy_database(store_kind, tmp_path, request, live, backup)

    first = await start_service(await store(live))
    port = first.running.port
    second: ServiceHandle | None = None
    async with client(first.target) as c:
        for percent in (20, 30, 40):
            await c.report_progress("rb", percent)
        iterator = aiter(c.watch_job("rb"))
        seen = [await asyncio.wait_for(anext(iterator), WAIT) for _ in range(5)]
        await first.close()  # restored: the service starts again on the backup
        second = await start_service(await store(backup), grpc_addr=f"127.0.0.1:{port}")
        try:
            snapshot = await asyncio.wait_for(anext(iterator), WAIT)
            assert isinstance(snapshot, Job) and snapshot.sequence == 1
            gap = await asyncio.wait_for(anext(iterator), WAIT)
            assert isinstance(gap, StreamGap)
            assert (gap.requested_sequence, gap.oldest_available_sequence) == (4, 2)
            async with client(second.target) as writer:
                await writer.report_progress("rb", 50)
                await writer.complete("rb")
            rest = await collect(iterator)
        finally:
            await second.close()
    assert sequences(seen) == [1, 2, 3, 4]
    assert sequences(rest) == [2, 3] and not any(isinstance(i, (Job, StreamGap)) for i in rest)
    end = rest[-1]
    assert isinstance(end, JobEvent) and end.state == job_pb2.JOB_STATE_SUCCEEDED


async def test_many_watches_on_one_client_end_when_their_tasks_are_cancelled(
    grpc_service: ServiceHandle,
) -> None:
    """50 watch tasks share one client; cancelled, each ends with CancelledError and its
    stream is gone from the service (no leaked call or task)."""
    fanout = grpc_service.running.jobs.fanout
    before = fanout.watchers
    job_id = f"many-{os.urandom(4).hex()}"
    async with client(grpc_service.target) as c:
        await c.create_job("GENERIC", job_id=job_id)

        async def watch() -> None:
            async for _ in c.watch_job(job_id):
                pass

        tasks = [asyncio.ensure_future(watch()) for _ in range(50)]
        await until(lambda: fanout.watchers == before + 50)
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, asyncio.CancelledError) for r in results)
        await until(lambda: fanout.watchers == before)
        assert (await c.get_job(job_id)).id == job_id  # the client is still usable


async def test_watch_job_across_a_forced_aborted(service: ServiceHandle, proxy: FaultProxy) -> None:
    """The stream ends with ABORTED (a watcher that fell behind) twice, mid-stream and
    while events keep coming: every event arrives once, in order."""
    async with client(service.target) as writer, client(proxy.target) as c:
        await writer.create_job("GENERIC", job_id="ab")
        for i in range(1, 6):
            await writer.report_progress("ab", i)
        proxy.abort_next_stream("WatchJob", after=3)  # snapshot + events 1, 2
        proxy.abort_next_stream("WatchJob", after=4, code=grpc.StatusCode.UNAVAILABLE)
        watch = c.watch_job("ab")
        iterator = aiter(watch)
        items = [await asyncio.wait_for(anext(iterator), WAIT) for _ in range(6)]
        for i in range(6, 12):
            await writer.report_progress("ab", i)
        await writer.complete("ab")
        items += [item async for item in iterator]
        assert proxy.calls["WatchJob"] == 3
        assert isinstance(items[0], Job) and sum(isinstance(i, Job) for i in items) == 1
        assert sequences(items) == list(range(1, 13))
        assert not any(isinstance(i, StreamGap) for i in items)
        assert watch.last_sequence == 12


async def test_a_naive_datetime_is_refused_not_taken_as_utc(service: ServiceHandle) -> None:
    """`event_time=datetime.now()` (naive: the machine's local time) was taken as UTC by
    protobuf, so a worker in Berlin stored report times an hour or two off, unsaid. A
    naive datetime is refused, naming the argument; an aware one is stored as it says."""
    async with client(service.target) as c:
        await c.create_job("GENERIC", job_id="tz")
        naive = datetime(2026, 6, 1, 12, 0)
        for call, name in (
            (lambda: c.report_progress("tz", 5, event_time=naive), "event_time"),
            (lambda: c.complete("tz", event_time=naive), "event_time"),
            (lambda: c.write_log("x", job_id="tz", time=naive), "time"),
        ):
            with pytest.raises(InvalidArgument) as err:
                await call()
            assert err.value.message.startswith(f"{name} must be timezone-aware"), err.value
            assert isinstance(err.value, ValueError)
        assert (await c.get_job("tz")).sequence == 0  # nothing was sent
        assert not await c.list_logs(job_id="tz")
        berlin = datetime(2026, 6, 1, 12, 0, tzinfo=timezone(timedelta(hours=2)))
        await c.report_progress("tz", 5, event_time=berlin)
        stored = (await c.get_job("tz")).progress.report_time
        assert stored.ToJsonString() == "2026-06-01T10:00:00Z"


async def test_a_watch_resumed_across_a_delete_and_remake_of_its_job_says_so(
    service: ServiceHandle, proxy: FaultProxy
) -> None:
    """The watched job ends, is deleted and made again under its id while the watch is
    away. The resume (`from_sequence` = the old job's last sequence) got the new job's
    snapshot and replayed the new job's events as the old one's continuation, and
    would have ended with the new job's outcome. The snapshot's create_time tells the
    two apart: the watch raises NotFound naming both, as it does for a job deleted
    and not made again. A later watch resumed with `created=` does the same."""
    async with client(service.target) as writer, client(proxy.target) as c:
        await writer.create_job("GENERIC", job_id="again")
        await writer.report_progress("again", 10)
        proxy.abort_next_stream("WatchJob", after=2)  # snapshot + event 1: not the end
        watch = c.watch_job("again")
        iterator = aiter(watch)
        first = await asyncio.wait_for(anext(iterator), WAIT)
        assert isinstance(first, Job)
        assert sequences([await asyncio.wait_for(anext(iterator), WAIT)]) == [1]
        assert watch.created == first.create_time.ToDatetime(tzinfo=UTC)
        await writer.complete("again")  # the proxy drops the stream instead of this event
        await writer.delete_job("again")
        remade = (await writer.create_job("GENERIC", job_id="again")).job
        for percent in (20, 30, 40):
            await writer.report_progress("again", percent)
        with pytest.raises(NotFound) as err:
            await asyncio.wait_for(anext(iterator), WAIT)
        assert "'again' is not the job this watch followed" in err.value.message, err.value
        assert watch.last_sequence == 1
        # A watch in a later process, resumed from what the first one kept.
        with pytest.raises(NotFound):
            await collect(c.watch_job("again", watch.last_sequence, created=watch.created))
        # Resumed with the new job's own create time, it follows the new job.
        new_created = remade.create_time.ToDatetime(tzinfo=UTC)
        await writer.complete("again")
        items = await collect(c.watch_job("again", 1, created=new_created))
        assert sequences(items) == [2, 3, 4]
        with pytest.raises(ValueError, match="created must be timezone-aware"):
            c.watch_job("again", created=datetime(2026, 1, 1))


async def test_watch_waits_out_a_full_node_and_gives_up_when_told(tmp_path: Path) -> None:
    """A node at its watch limit refuses with RESOURCE_EXHAUSTED + retry-after-ms: the
    watch waits and gets in once a slot frees; with give_up_after it raises instead."""
    from tests.helpers import free_port

    handle = await start_service(EmbeddedStore(tmp_path / "d", make_policy()), max_watchers=1)
    try:
        async with client(handle.target) as c:
            await c.create_job("GENERIC", job_id="full")
            held = aiter(c.watch_job("full"))
            assert isinstance(await asyncio.wait_for(anext(held), WAIT), Job)
            # Unavailable, as give_up_after promises (it came out as a plain JobwireError,
            # which code catching Unavailable missed); the refusal's code is kept.
            with pytest.raises(Unavailable) as err:
                await collect(c.watch_job("full", give_up_after=0))
            assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            waiting = asyncio.ensure_future(anext(aiter(c.watch_job("full"))))
            done, _ = await asyncio.wait([waiting], timeout=0.3)
            assert not done  # refused; waiting out the service's hint
            await held.aclose()  # frees the node's only slot
            assert isinstance(await asyncio.wait_for(waiting, WAIT), Job)
        async with client(f"127.0.0.1:{free_port()}") as nowhere:
            with pytest.raises(Unavailable):
                await collect(nowhere.watch_job("x", give_up_after=0.3))
        # give_up_after is kept even when the backoff is longer: the wait is cut to the
        # time left (before: a 2.5-5 s backoff ran out first, whatever give_up_after said)
        slow = Backoff(initial=5.0, maximum=5.0)
        async with client(f"127.0.0.1:{free_port()}", watch_backoff=slow) as nowhere:
            loop = asyncio.get_running_loop()
            begin = loop.time()
            with pytest.raises(Unavailable):
                await collect(nowhere.watch_job("x", give_up_after=0.3))
            assert loop.time() - begin < 2.0
    finally:
        await handle.close()


def _coalesce(first: int, last: int) -> Rewrite:
    """A proxy rewrite that drops events first..last-1 and marks `last` as standing for
    them, as the service does for a slow watcher."""

    def rewrite(message: bytes) -> bytes | None:
        reply = job_service_pb2.WatchJobResponse.FromString(message)
        if reply.WhichOneof("item") != "event":
            return message
        if first <= reply.event.sequence < last:
            return None
        if reply.event.sequence == last:
            reply.event.coalesced_from_sequence = first
        return reply.SerializeToString()

    return rewrite


async def test_watch_job_fills_coalesced_progress_or_reports_its_range(
    service: ServiceHandle, proxy: FaultProxy
) -> None:
    async with client(service.target) as writer, client(proxy.target) as c:
        await writer.create_job("GENERIC", job_id="co")
        for i in range(1, 10):
            await writer.report_progress("co", i * 10)
        await writer.complete("co")
        proxy.rewrite["WatchJob"] = _coalesce(3, 7)
        every = await collect(c.watch_job("co"))
        assert sequences(every) == list(range(1, 11))  # 3..6 fetched from the history
        assert all(e.coalesced_from_sequence == 0 for e in every if isinstance(e, JobEvent))
        latest = await collect(c.watch_job("co", every_event=False))
        assert sequences(latest) == [1, 2, 7, 8, 9, 10]
        seven = next(e for e in latest if isinstance(e, JobEvent) and e.sequence == 7)
        assert seven.coalesced_from_sequence == 3
        # a range that overlaps what was already given shrinks to the part not seen
        proxy.rewrite["WatchJob"] = _overlapping(seen=(3, 4), dropped=(5, 6), at=7, start=3)
        partial = await collect(c.watch_job("co", every_event=False))
        assert sequences(partial) == [1, 2, 3, 4, 7, 8, 9, 10]
        seven = next(e for e in partial if isinstance(e, JobEvent) and e.sequence == 7)
        assert seven.coalesced_from_sequence == 5
        # an unannounced jump is filled whatever every_event says
        proxy.rewrite["WatchJob"] = _drop(4, 5)
        assert sequences(await collect(c.watch_job("co", every_event=False))) == list(range(1, 11))


async def test_watch_job_survives_a_slow_history_read(
    service: ServiceHandle, proxy: FaultProxy
) -> None:
    """Filling a jump reads the history (ListJobEvents); when that read passes its
    deadline the watch reconnects and fills again (before: DeadlineExceeded ended it)."""
    retries: list[JobwireError] = []

    def on_retry(error: JobwireError, delay: float) -> None:
        retries.append(error)
        proxy.gate.set()  # the history answers again

    async with client(service.target) as writer, client(proxy.target, timeout=0.3) as c:
        await writer.create_job("GENERIC", job_id="slow")
        for i in range(1, 6):
            await writer.report_progress("slow", i * 10)
        await writer.complete("slow")
        proxy.rewrite["WatchJob"] = _drop(2, 3)  # a jump to fill from the history...
        proxy.gate.clear()  # ...which does not answer in time
        items = await collect(c.watch_job("slow", on_retry=on_retry))
    assert sequences(items) == [1, 2, 3, 4, 5, 6]
    assert [type(e) for e in retries] == [DeadlineExceeded]


def _overlapping(seen: tuple[int, ...], dropped: tuple[int, ...], at: int, start: int) -> Rewrite:
    """Drops `dropped` and marks `at` as standing for `start`..`at`, although the
    sequences in `seen` were delivered one by one."""

    def rewrite(message: bytes) -> bytes | None:
        reply = job_service_pb2.WatchJobResponse.FromString(message)
        if reply.WhichOneof("item") != "event":
            return message
        if reply.event.sequence in dropped:
            return None
        if reply.event.sequence == at:
            reply.event.coalesced_from_sequence = start
        return reply.SerializeToString()

    assert all(s < at for s in seen)
    return rewrite


def _drop(*dropped: int) -> Rewrite:
    def rewrite(message: bytes) -> bytes | None:
        reply = job_service_pb2.WatchJobResponse.FromString(message)
        if reply.WhichOneof("item") == "event" and reply.event.sequence in dropped:
            return None
        return message

    return rewrite


async def test_watch_job_surfaces_a_gap_when_history_is_gone(service: ServiceHandle) -> None:
    async with client(service.target) as c:  # the fixture's service retains 16 events a job
        await c.create_job("GENERIC", job_id="gap")
        for i in range(1, 31):
            await c.report_progress("gap", i)
        await c.complete("gap")
        items = await collect(c.watch_job("gap", from_sequence=2))
        gaps = [i for i in items if isinstance(i, StreamGap)]
        assert len(gaps) == 1 and gaps[0].requested_sequence == 2
        after = sequences(items)
        assert after[0] == gaps[0].oldest_available_sequence > 3
        assert after == list(range(after[0], 32))  # consecutive from there, to the end
        assert items.index(gaps[0]) < next(
            i for i, x in enumerate(items) if isinstance(x, JobEvent)
        )


# -- watch_jobs -----------------------------------------------------------------


async def test_watch_jobs_with_kind_and_state_filters(service: ServiceHandle) -> None:
    fanout = service.running.jobs.fanout
    async with client(service.target) as c:
        videos = aiter(c.watch_jobs(kind="VIDEO"))
        finished = aiter(c.watch_jobs(states=["SUCCEEDED", "FAILED"]))
        first_video = asyncio.ensure_future(anext(videos))
        first_finished = asyncio.ensure_future(anext(finished))
        await until(lambda: fanout.watchers == 2)  # both streams are live
        await c.create_job("VIDEO", job_id="fv-1", video=sample_video("fv-1"))
        await c.create_job("GENERIC", job_id="fg-1")
        await c.report_progress("fg-1", 50)
        await c.report_progress("fv-1", 50)
        await c.complete("fg-1")
        await c.fail("fv-1", "E", "broken")
        seen_videos = [await asyncio.wait_for(first_video, WAIT)]
        seen_videos.append(await asyncio.wait_for(anext(videos), WAIT))
        assert [(e.job_id, e.type) for e in seen_videos] == [  # type: ignore[union-attr]
            ("fv-1", event_pb2.EVENT_TYPE_PROGRESS),
            ("fv-1", event_pb2.EVENT_TYPE_FAILED),
        ]
        seen_finished = [await asyncio.wait_for(first_finished, WAIT)]
        seen_finished.append(await asyncio.wait_for(anext(finished), WAIT))
        assert [(e.job_id, e.state) for e in seen_finished] == [  # type: ignore[union-attr]
            ("fg-1", job_pb2.JOB_STATE_SUCCEEDED),
            ("fv-1", job_pb2.JOB_STATE_FAILED),
        ]
        await videos.aclose()
        await finished.aclose()


async def test_watch_jobs_yields_a_deletion_and_replays_it_on_resume(
    service: ServiceHandle,
) -> None:
    """A deleted job comes as a JobDeletion, filtered by kind and end state like the
    job's events, with a position to resume from; a watch resumed from before it
    yields it again."""
    fanout = service.running.jobs.fanout
    async with client(service.target) as c:
        watch = c.watch_jobs(kind="GENERIC", states=["SUCCEEDED"])
        items = aiter(watch)
        first = asyncio.ensure_future(anext(items))
        await until(lambda: fanout.watchers == 1)
        await c.create_job("GENERIC", job_id="del-1")
        await c.complete("del-1")
        ended = await asyncio.wait_for(first, WAIT)
        assert isinstance(ended, JobEvent) and ended.job_id == "del-1"
        before = watch.position
        await c.delete_job("del-1")
        gone = await asyncio.wait_for(anext(items), WAIT)
        assert isinstance(gone, JobDeletion), gone
        assert (gone.job_id, gone.kind, gone.state) == (
            "del-1",
            job_pb2.JOB_KIND_GENERIC,
            job_pb2.JOB_STATE_SUCCEEDED,
        )
        assert watch.position != before
        await items.aclose()

        resumed = aiter(c.watch_jobs(kind="GENERIC", after=before))
        again = await asyncio.wait_for(anext(resumed), WAIT)
        assert again == gone
        await resumed.aclose()


async def test_watch_jobs_resumes_after_a_dropped_stream(
    service: ServiceHandle, proxy: FaultProxy
) -> None:
    """The firehose drops (ABORTED) mid-stream: nothing is yielded twice and nothing is
    lost silently: with the service's positions every event arrives, without them a
    StreamGap says that some may be missing."""
    fanout = service.running.jobs.fanout
    async with client(service.target) as writer, client(proxy.target) as c:
        watch, iterator, first = await _dropping_watch(writer, c, proxy, "fh", 2)
        for i in range(1, 4):  # the proxy passes 1 and 2, then aborts at 3
            await writer.report_progress("fh", i)
        items = [await asyncio.wait_for(first, WAIT)]
        items.append(await asyncio.wait_for(anext(iterator), WAIT))
        following = asyncio.ensure_future(anext(iterator))  # meets the abort, reconnects
        await until(lambda: proxy.calls["WatchJobs"] == 2 and fanout.watchers == 1)
        for i in range(4, 7):
            await writer.report_progress("fh", i)
        items.append(await asyncio.wait_for(following, WAIT))
        while not isinstance(items[-1], JobEvent) or items[-1].sequence < 6:
            items.append(await asyncio.wait_for(anext(iterator), WAIT))
        await iterator.aclose()
        seqs = sequences(items)
        assert seqs == sorted(set(seqs))  # in order, never twice
        gaps = [i for i in items if isinstance(i, StreamGap)]
        if watch.position:  # the service resumes by position: nothing lost
            assert not gaps and seqs == list(range(1, 7))
        else:  # it cannot: the loss is announced before the events that follow it
            assert len(gaps) == 1 and seqs[:2] == [1, 2] and seqs[-3:] == [4, 5, 6]
            assert isinstance(items[2], StreamGap)


async def _dropping_watch(
    writer: Client, c: Client, proxy: FaultProxy, job_id: str, after: int
) -> tuple[Any, Any, asyncio.Future[Any]]:
    """A GENERIC job `job_id`, and a watch of GENERIC jobs through `proxy`, live, whose
    stream the proxy aborts after `after` messages: (watch, its iterator, its first
    item to come)."""
    await writer.create_job("GENERIC", job_id=job_id)
    proxy.abort_next_stream("WatchJobs", after=after)
    watch = c.watch_jobs(kind="GENERIC")
    iterator = aiter(watch)
    first = asyncio.ensure_future(anext(iterator))
    await asyncio.wait_for(watch.live.wait(), WAIT)
    return watch, iterator, first


async def test_watch_jobs_dropped_before_its_first_event_loses_nothing(
    service: ServiceHandle, proxy: FaultProxy
) -> None:
    """A live-only firehose (`after=""`) that drops on its very first event: the service
    said in its headers where the stream went live, so the watch resumes from there and
    the event arrives (it used to resume live again, and the event was lost unsaid)."""
    async with client(service.target) as writer, client(proxy.target) as c:
        # The proxy aborts the stream as its first event passes.
        watch, iterator, first = await _dropping_watch(writer, c, proxy, "fh-early", 0)
        assert watch.position.startswith("v1.")
        await writer.report_progress("fh-early", 7)
        got = await asyncio.wait_for(first, WAIT)
        assert isinstance(got, JobEvent) and (got.job_id, got.sequence) == ("fh-early", 1)
        assert proxy.calls["WatchJobs"] == 2  # it did drop, and was resumed
        await iterator.aclose()


async def test_watch_jobs_without_positions_says_a_drop_before_its_first_event(
    tmp_path: Path,
) -> None:
    """A service with its firehose log off gives no position, not even in its live
    headers: a stream that drops on its very first event cannot get it back, and the
    watch says so (a StreamGap before the next event) instead of going on as if
    nothing was missed."""
    policy = make_policy()
    policy.firehose_retention_ns = 0
    service = await start_service(EmbeddedStore(tmp_path, policy))
    proxy = await FaultProxy(service.target).start()
    try:
        async with client(service.target) as writer, client(proxy.target) as c:
            watch, iterator, first = await _dropping_watch(writer, c, proxy, "nolog", 0)
            assert watch.position == ""
            await writer.report_progress("nolog", 1)  # the proxy aborts as it passes
            fanout = service.running.jobs.fanout
            await until(lambda: proxy.calls["WatchJobs"] == 2 and fanout.watchers == 1)
            await writer.report_progress("nolog", 2)
            items = [await asyncio.wait_for(first, WAIT)]
            items.append(await asyncio.wait_for(anext(iterator), WAIT))
            assert isinstance(items[0], StreamGap)
            assert isinstance(items[1], JobEvent) and items[1].sequence == 2
            await iterator.aclose()
    finally:
        await proxy.close()
        await service.close()


async def test_watch_jobs_without_positions_delivers_a_job_made_again_under_a_deleted_id(
    tmp_path: Path,
) -> None:
    """Without positions (firehose log off) the watch drops a (job, sequence) it yielded
    before as a repeat. A job deleted (DeleteJob, the retention) and made again under its
    id (a client's own ids, a late AuroraCloud report) numbers its events from 1 again:
    its first four were dropped, unsaid, as repeats of the deleted job's (by the service's
    stream and again by the watch). A repeat is the same event, of the same time; these
    are not, and every one is yielded."""
    policy = make_policy()
    policy.firehose_retention_ns = 0
    service = await start_service(EmbeddedStore(tmp_path, policy))
    try:
        async with client(service.target) as c:
            watch = c.watch_jobs()
            iterator = aiter(watch)
            first = asyncio.ensure_future(anext(iterator))
            await asyncio.wait_for(watch.live.wait(), WAIT)
            await c.create_job("GENERIC", job_id="again")
            for percent in (1, 2, 3):
                await c.report_progress("again", percent)
            await c.complete("again")
            await c.delete_job("again")
            await c.create_job("GENERIC", job_id="again")
            for percent in (51, 52, 53, 54, 55):
                await c.report_progress("again", percent)
            seen = [await asyncio.wait_for(first, WAIT)]
            while len(seen) < 10:
                seen.append(await asyncio.wait_for(anext(iterator), WAIT))
            await iterator.aclose()
        # The deleted job's four events, its deletion, then the new job's five.
        assert isinstance(seen[4], JobDeletion) and seen[4].job_id == "again"
        events = [i for i in seen if isinstance(i, JobEvent)]
        assert [(e.sequence, round(e.progress.percent)) for e in events[4:]] == [
            (1, 51), (2, 52), (3, 53), (4, 54), (5, 55)
        ]  # fmt: skip
    finally:
        await service.close()


async def _copy_database(
    store_kind: str, tmp_path: Path, request: pytest.FixtureRequest, source: str, target: str
) -> None:
    """A backup of a stopped service's data: the directory, or every collection."""
    if store_kind == "embedded":
        await asyncio.to_thread(shutil.copytree, tmp_path / source, tmp_path / target)
        return
    from pymongo import AsyncMongoClient

    mongo: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(request.getfixturevalue("mongo_uri"))
    try:
        for name in await mongo[source].list_collection_names():
            docs = await mongo[source][name].find({}).to_list(None)
            if docs:
                await mongo[target][name].insert_many(docs)
    finally:
        await mongo.close()


async def test_watch_jobs_delivers_a_restored_jobs_new_events(
    store_kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The service restored from an older backup: the job's sequences 3 and 4 are new
    events there. The firehose watch kept every (job, sequence) it had yielded and
    dropped them as repeats, though the service's position already says what a stream
    had; and the embedded log numbered the restored log's new entries as the ones the
    position covered (its numbers restarted from the backup's), so a consumer that
    resumed after them was skipped past them too. Both ways, every new event arrives."""
    live, backup = f"t_live_{os.urandom(6).hex()}", f"t_backup_{os.urandom(6).hex()}"

    async def store(name: str) -> Store:
        return await open_test_store(store_kind, tmp_path / name, request, make_policy(), name)

    first = await start_service(await store(live))
    async with client(first.target) as c:
        await c.create_job("GENERIC", job_id="rj")
        await c.report_progress("rj", 10)
        await c.report_progress("rj", 20)
    await first.close()
    await _copy_database(store_kind, tmp_path, request, live, backup)
    second = await start_service(await store(live))
    port = second.running.port
    async with client(second.target) as c:
        await c.report_progress("rj", 30)
        await c.report_progress("rj", 40)
        watch = c.watch_jobs(after="0")
        iterator = aiter(watch)
        seen = [await asyncio.wait_for(anext(iterator), WAIT) for _ in range(4)]
        assert sequences(seen) == [1, 2, 3, 4]
        position = watch.position
        await second.close()
        for resume_first, restored in ((True, f"{backup}a"), (False, f"{backup}b")):
            # Restored: the service starts again on (a copy of) the backup.
            await _copy_database(store_kind, tmp_path, request, backup, restored)
            third = await start_service(await store(restored), grpc_addr=f"127.0.0.1:{port}")
            rest: list[object] = []

            async def read_on(into: list[object], it: Any) -> None:
                while not any(isinstance(i, JobEvent) and i.sequence == 4 for i in into):
                    into.append(await asyncio.wait_for(anext(it), WAIT))

            try:
                if resume_first:  # the watch resumes before the restored log grows
                    reader = asyncio.ensure_future(read_on(rest, iterator))
                    fanout = third.running.jobs.fanout
                    await until(lambda: fanout.watchers == 1)  # noqa: B023 (awaited here)
                else:  # a consumer resumes from its stored position after it grew
                    iterator = aiter(c.watch_jobs(after=position))
                async with client(third.target) as writer:
                    await writer.report_progress("rj", 50)
                    await writer.complete("rj")
                if not resume_first:
                    reader = asyncio.ensure_future(read_on(rest, iterator))
                await reader
                await iterator.aclose()
            finally:
                await third.close()
            new = [i for i in rest if isinstance(i, JobEvent) and i.sequence >= 3]
            assert [(e.sequence, e.state) for e in new] == [
                (3, job_pb2.JOB_STATE_RUNNING),
                (4, job_pb2.JOB_STATE_SUCCEEDED),
            ], resume_first
            assert new[0].progress.percent == 50


def test_unusable_retry_and_deadline_settings_are_refused_by_name() -> None:
    """Before: RetryPolicy(attempts=0) failed each call with AssertionError('unreachable'),
    a zero or negative backoff reconnected a watch in a tight loop, a NaN never fired."""
    nan = float("nan")
    bad: list[tuple[str, Callable[[], object]]] = [
        ("attempts must be >= 1, got 0", lambda: RetryPolicy(attempts=0)),
        ("attempts must be a whole number", lambda: RetryPolicy(attempts=2.5)),  # type: ignore[arg-type]
        ("initial must be a finite number of seconds > 0 and <= 31622400, got 0",
         lambda: Backoff(initial=0)),
        ("maximum must be a finite number of seconds > 0 and <= 31622400, got -1",
         lambda: Backoff(0.1, -1)),
        ("maximum must be >= initial", lambda: Backoff(initial=2, maximum=1)),
        ("multiplier must be >= 1, got 0.5", lambda: Backoff(multiplier=0.5)),
        ("timeout must be a finite number of seconds > 0 and <= 31622400, got nan",
         lambda: Client(timeout=nan)),
        ("give_up_after must be a finite number of seconds >= 0",
         lambda: Client().watch_job("j", give_up_after=-1)),
        # grpc refused it on every call with a bare ExecuteBatchError, not a JobwireError
        ("token (token=, JOBWIRE_GRPC_TOKEN) must be visible ASCII",
         lambda: Client(token="s3cr3t-from-a-file\n")),
        ("must be visible ASCII", lambda: Client.from_env(env={"JOBWIRE_GRPC_TOKEN": "sécret"})),
        # gRPC dialled 127.0.0.1:99999 as port 34463; a URL never resolved
        ("target port must be 1-65535, got '127.0.0.1:99999'", lambda: Client("127.0.0.1:99999")),
        ("target port must be 1-65535", lambda: Client("dns:///jobwire.internal:0")),
        ("target is host:port, not a URL", lambda: Client("https://jobwire.internal:50051")),
        ("target must be host:port, got ''", lambda: Client("")),
        # an AttributeError at the first retry, in the middle of an outage; None broke reads
        ("retry must be a RetryPolicy (RetryPolicy(attempts=1): no retries), got 3",
         lambda: Client(retry=3)),  # type: ignore[arg-type]
        ("retry must be a RetryPolicy", lambda: Client(retry=None)),  # type: ignore[arg-type]
        ("watch_backoff must be a Backoff, got 1.0", lambda: Client(watch_backoff=1.0)),  # type: ignore[arg-type]
        # Python's own words, naming no argument: "dictionary update sequence element #6
        # has length 1; 2 is required", "could not convert string to float: 'abc'"
        ("options must be (name, value) pairs, got ('grpc.keepalive_time_ms',)",
         lambda: Client(options=[("grpc.keepalive_time_ms",)])),  # type: ignore[list-item]
        ("options must be a sequence of (name, value) pairs, got 'grpc.keepalive_time_ms'",
         lambda: Client(options="grpc.keepalive_time_ms")),  # type: ignore[arg-type]
        ("option grpc.max_reconnect_backoff_ms must be a whole number of milliseconds > 0,"
         " got 'abc'", lambda: Client(options=[("grpc.max_reconnect_backoff_ms", "abc")])),
        ("option grpc.max_reconnect_backoff_ms must be a whole number of milliseconds > 0",
         lambda: Client(options=[("grpc.max_reconnect_backoff_ms", -5)])),
    ]  # fmt: skip
    for message, make in bad:
        with pytest.raises(ClientConfigError, match=re.escape(message)) as err:
            make()
        assert "s3cr3t" not in str(err.value) and "sécret" not in str(err.value)


async def test_a_quiet_firehose_is_not_given_up_at_the_next_restart(tmp_path: Path) -> None:
    """give_up_after counts time without reaching the service. A WatchJobs stream sends
    nothing until a matching event, so one that reconnected and stayed quiet was never
    marked healthy: at the next restart, long after, the watch gave up at once."""
    handle = await start_service(EmbeddedStore(tmp_path, make_policy()))
    port = handle.running.port

    async def restart() -> ServiceHandle:
        await handle.close()
        again = await start_service(
            EmbeddedStore(tmp_path, make_policy()), grpc_addr=f"127.0.0.1:{port}"
        )
        # reconnected (or, before the fix, given up: `pending` raises Unavailable below)
        await until(lambda: again.running.jobs.fanout.watchers == 1 or pending.done())
        return again

    try:
        async with client(handle.target) as c:
            watch = aiter(c.watch_jobs(states=["FAILED"], give_up_after=2.0))
            pending = asyncio.ensure_future(anext(watch))
            await until(lambda: handle.running.jobs.fanout.watchers == 1)
            handle = await restart()
            await asyncio.sleep(2.5)  # quiet, connected, past give_up_after: under test
            handle = await restart()
            await c.create_job("GENERIC", job_id="quiet")
            await c.fail("quiet", "E", "noticed")
            items = [await asyncio.wait_for(pending, WAIT)]
            while not isinstance(items[-1], JobEvent):
                items.append(await asyncio.wait_for(anext(watch), WAIT))
            assert items[-1].job_id == "quiet"
            await watch.aclose()
    finally:
        await handle.close()


def test_every_public_name_of_the_library_is_documented() -> None:
    """get_job, list_artifacts and new_idempotency_key had no docstring, and nothing in
    Client's said what its methods raise."""
    import jobwire.client as library

    for name, member in vars(Client).items():
        func = member.fget if isinstance(member, property) else getattr(member, "__func__", member)
        if not name.startswith("_") and callable(func):
            assert (func.__doc__ or "").strip(), f"Client.{name} has no docstring"
    for name in library.__all__:
        obj = getattr(library, name)
        if getattr(obj, "__module__", "").startswith("jobwire.client") and callable(obj):
            assert (obj.__doc__ or "").strip(), f"{name} has no docstring"
    said = Client.__doc__ or ""
    for raised in ("JobwireError", "InvalidArgument", "ClientConfigError", "UsageError"):
        assert raised in said, raised


def test_backoff_grows_with_jitter_up_to_its_cap() -> None:
    backoff = Backoff(initial=0.1, maximum=1.0)
    # 5000: a watch that kept trying through a long outage (2.0**1024 overflowed a float:
    # the watch died with OverflowError after about 1,100 reconnects, 1.5 h at 5 s each)
    steps = [(0, 0.1), (1, 0.2), (2, 0.4), (3, 0.8), (4, 1.0), (30, 1.0), (5000, 1.0)]
    for attempt, ceiling in steps:
        delays = {backoff.delay(attempt) for _ in range(50)}
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(delays) > 1  # jittered: clients that failed together come back apart


async def test_a_call_the_stopping_service_cancelled_is_retried(
    service: ServiceHandle, proxy: FaultProxy
) -> None:
    """gRPC ends calls that reach a service as it stops (a rolling restart) with
    CANCELLED, unapplied; the client raised it to the caller of a read or a report
    instead of retrying as it does UNAVAILABLE. A watch resumes after it too."""
    async with client(service.target) as c:
        await c.create_job("GENERIC", job_id="rolling")
    async with client(proxy.target) as c:
        proxy.refuse["GetJob"] = [grpc.StatusCode.CANCELLED]
        assert (await c.get_job("rolling")).id == "rolling"
        assert proxy.calls["GetJob"] == 2  # refused once, served on the retry
        proxy.abort_next_stream("WatchJob", after=1, code=grpc.StatusCode.CANCELLED)
        seen: list[object] = []

        async def follow() -> None:
            async for item in c.watch_job("rolling"):
                seen.append(item)

        watching = asyncio.create_task(follow())
        try:
            await until(lambda: len(seen) >= 1)  # the snapshot; the proxy ends the stream
            await c.report_progress("rolling", 10.0, idempotency_key="k1")  # at this event
            await until(lambda: any(isinstance(i, JobEvent) for i in seen) or watching.done())
            assert not watching.done(), watching.exception()
            assert proxy.calls["WatchJob"] == 2  # resumed once
        finally:
            watching.cancel()
