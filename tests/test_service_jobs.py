"""CreateJob, GetJob, ListJobs, CancelJob over the real gRPC server, on both stores."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import pytest

from jobwire.v1 import job_pb2, job_service_pb2, log_pb2
from tests.conftest import ServiceHandle
from tests.helpers import completed, create, failed, progress, read


async def test_create_get_roundtrip(service: ServiceHandle) -> None:
    created = await create(service.stub, job_pb2.JOB_KIND_BATCH, "batch-1", team="video")
    assert created.job.id == "batch-1"
    assert created.job.state == job_pb2.JOB_STATE_QUEUED
    assert created.job.sequence == 0
    assert created.job.has_callback_token
    assert len(created.callback_token) >= 32
    got = await service.stub.GetJob(job_service_pb2.GetJobRequest(id="batch-1"))
    assert got == created.job
    assert dict(got.labels) == {"team": "video"}


async def test_generated_id_and_video_details(service: ServiceHandle) -> None:
    job = job_pb2.Job(kind=job_pb2.JOB_KIND_VIDEO, video=job_pb2.Video(url="https://x/v.mp4"))
    created = await service.stub.CreateJob(job_service_pb2.CreateJobRequest(job=job))
    assert len(created.job.id) == 36
    assert created.job.video.url == "https://x/v.mp4"


@pytest.mark.parametrize(
    ("video", "said"),
    [
        (
            job_pb2.Video(url="https://v.example/a.mp4\nX-Injected: 1"),
            "job.video.url must not hold control characters, got U+000A at character 24",
        ),
        (
            job_pb2.Video(url="https://v.example/" + "a" * 8192),
            "job.video.url must be at most 8192 characters, got 8210 characters",
        ),
        (
            job_pb2.Video(url="https://v.example/a.mp4", title="T\x00"),
            "job.video.title must not hold control characters, got U+0000 at character 2",
        ),
        (
            job_pb2.Video(url="https://v.example/a.mp4", playlist="p" * 4097),
            "job.video.playlist must be at most 4096 characters, got 4097 characters",
        ),
        (
            job_pb2.Video(url="https://v.example/a.mp4", subtitle="a\x85b"),
            "job.video.subtitle must not hold control characters, got U+0085 at character 2",
        ),
    ],
    ids=["line break in url", "url too long", "NUL in title", "long playlist", "C1 control"],
)
async def test_a_video_jobs_source_is_bounded_and_printable(
    service: ServiceHandle, video: job_pb2.Video, said: str
) -> None:
    """The url is handed to the worker as `videoUrl` and the texts are shown to people:
    a line break, a NUL or megabytes in them were stored as sent. The refusal says
    which rule, and for a control character which one and where: a 3-character title
    with a line break read "must be at most 4096 characters, none of them control
    characters, got 3 characters"."""
    job = job_pb2.Job(kind=job_pb2.JOB_KIND_VIDEO, video=video)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await service.stub.CreateJob(job_service_pb2.CreateJobRequest(job=job, job_id="v-odd"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == said
    listed = await service.stub.ListJobs(job_service_pb2.ListJobsRequest())
    assert list(listed.jobs) == []
    ok = job_pb2.Video(url="https://v.example/a b.mp4", title="Ünïcode 🙂 \u200fשלום " * 50)
    job = job_pb2.Job(kind=job_pb2.JOB_KIND_VIDEO, video=ok)
    created = await service.stub.CreateJob(job_service_pb2.CreateJobRequest(job=job))
    assert created.job.video == ok


@pytest.mark.parametrize(
    "video",
    [
        None,
        job_pb2.Video(title="Talk", playlist="p", subtitle="es"),
        job_pb2.Video(url=" \t "),
    ],
    ids=["no video", "video without url", "blank url"],
)
async def test_a_video_job_without_its_url_is_refused(
    service: ServiceHandle, video: job_pb2.Video | None
) -> None:
    """CreateJob took a VIDEO job without `video.url`; the video worker then claimed it
    from GET /api/pending as {"videoUrl": ""}, which it could only fail. It is now
    INVALID_ARGUMENT naming job.video.url, and nothing is created."""
    job = job_pb2.Job(kind=job_pb2.JOB_KIND_VIDEO, video=video)
    for request in (
        job_service_pb2.CreateJobRequest(job=job),
        job_service_pb2.CreateJobRequest(job=job, job_id="v-1"),
        job_service_pb2.CreateJobRequest(job=job, job_id="v-1", callback_token=CHOSEN),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await service.stub.CreateJob(request)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details() == "job.video.url is required for JOB_KIND_VIDEO jobs"
    listed = await service.stub.ListJobs(job_service_pb2.ListJobsRequest())
    assert list(listed.jobs) == []
    claim = job_service_pb2.ClaimJobRequest(kind=job_pb2.JOB_KIND_VIDEO, worker_id="w")
    assert not (await service.stub.ClaimJob(claim)).HasField("job")
    # With its url the same job is made, under the id the refusals left free.
    job.video.url = "https://videos.example.invalid/talk.mp4"
    created = await service.stub.CreateJob(job_service_pb2.CreateJobRequest(job=job, job_id="v-1"))
    assert created.job.video.url == job.video.url
    claimed = await service.stub.ClaimJob(claim)
    assert claimed.job.id == "v-1" and claimed.job.video.url == job.video.url


async def test_duplicate_id_is_already_exists(service: ServiceHandle) -> None:
    await create(service.stub, job_id="same")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await create(service.stub, job_id="same")
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "same" in (err.value.details() or "")


CHOSEN = "t" * 20 + "_-" + "A9" * 11  # 44 characters of [A-Za-z0-9_-]


def chosen_create(
    job_id: str, token: str, kind: job_pb2.JobKind.ValueType = job_pb2.JOB_KIND_GENERIC
) -> job_service_pb2.CreateJobRequest:
    return job_service_pb2.CreateJobRequest(
        job=job_pb2.Job(kind=kind), job_id=job_id, callback_token=token
    )


async def test_a_create_with_its_own_token_is_safe_to_repeat(service: ServiceHandle) -> None:
    first = await service.stub.CreateJob(chosen_create("mine", CHOSEN))
    assert first.callback_token == CHOSEN and first.job.has_callback_token
    mine = job_service_pb2.GetJobRequest(id="mine", callback_token=CHOSEN)
    assert (await service.stub.GetJob(mine)).id == "mine"

    # The reply was lost, the caller tries again: the job as it is now, same token.
    await service.stub.ReportEvent(progress("mine", 10))
    again = await service.stub.CreateJob(chosen_create("mine", CHOSEN))
    assert again.callback_token == CHOSEN
    assert again.job.id == "mine" and again.job.sequence == 1
    assert again.job.create_time == first.job.create_time
    listed = await service.stub.ListJobs(job_service_pb2.ListJobsRequest())
    assert [j.id for j in listed.jobs] == ["mine"]

    # Another token, or the same one for another kind, is another job: the id is taken.
    for request in (
        chosen_create("mine", CHOSEN[:-1] + "x"),
        chosen_create("mine", CHOSEN, job_pb2.JOB_KIND_BATCH),
        job_service_pb2.CreateJobRequest(
            job=job_pb2.Job(kind=job_pb2.JOB_KIND_GENERIC), job_id="mine"
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await service.stub.CreateJob(request)
        assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert (await service.stub.GetJob(mine)).sequence == 1


@pytest.mark.parametrize(
    "token",
    [CHOSEN[:42], CHOSEN[:43] + "+", CHOSEN[:43] + " ", "é" * 43, "x" * 257],
    ids=["42 characters", "plus", "space", "non-ASCII", "257 characters"],
)
async def test_a_weak_or_malformed_chosen_token_is_refused_unechoed(
    service: ServiceHandle, token: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await service.stub.CreateJob(chosen_create("weak", token))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = err.value.details() or ""
    assert "callback_token" in details and token[:20] not in details
    listed = await service.stub.ListJobs(job_service_pb2.ListJobsRequest())
    assert list(listed.jobs) == []


async def test_unknown_job_is_not_found(service: ServiceHandle) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await service.stub.GetJob(job_service_pb2.GetJobRequest(id="nope"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "nope" in (err.value.details() or "")


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (job_service_pb2.CreateJobRequest(job=job_pb2.Job()), "job.kind"),
        (
            job_service_pb2.CreateJobRequest(
                job=job_pb2.Job(kind=job_pb2.JOB_KIND_GENERIC), job_id="bad id/"
            ),
            "job_id",
        ),
    ],
)
async def test_bad_create_names_the_field(
    service: ServiceHandle, request_: job_service_pb2.CreateJobRequest, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await service.stub.CreateJob(request_)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (err.value.details() or "")
    listed = await service.stub.ListJobs(job_service_pb2.ListJobsRequest())
    assert list(listed.jobs) == []


async def test_list_filters_and_pages(service: ServiceHandle) -> None:
    for i in range(7):
        kind = job_pb2.JOB_KIND_VIDEO if i % 2 else job_pb2.JOB_KIND_BATCH
        await create(service.stub, kind, f"job-{i}", parity=str(i % 2))
    await service.stub.CancelJob(job_service_pb2.CancelJobRequest(id="job-0", reason="no"))

    seen: list[str] = []
    token = ""
    while True:
        page = await service.stub.ListJobs(
            job_service_pb2.ListJobsRequest(page_size=3, page_token=token)
        )
        seen += [j.id for j in page.jobs]
        assert len(page.jobs) <= 3
        token = page.next_page_token
        if not token:
            break
    assert seen == [f"job-{i}" for i in range(7)]

    newest: list[str] = []
    token = ""
    while True:
        page = await service.stub.ListJobs(
            job_service_pb2.ListJobsRequest(page_size=3, page_token=token, newest_first=True)
        )
        newest += [j.id for j in page.jobs]
        token = page.next_page_token
        if not token:
            break
        # A token answers only in the order that gave it: mixed, pages would skip jobs.
        with pytest.raises(grpc.aio.AioRpcError) as mixed:
            await service.stub.ListJobs(job_service_pb2.ListJobsRequest(page_token=token))
        assert mixed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "other order" in (mixed.value.details() or "")
    assert newest == [f"job-{i}" for i in reversed(range(7))]

    videos = await service.stub.ListJobs(
        job_service_pb2.ListJobsRequest(kind=job_pb2.JOB_KIND_VIDEO)
    )
    assert [j.id for j in videos.jobs] == ["job-1", "job-3", "job-5"]
    labelled = await service.stub.ListJobs(job_service_pb2.ListJobsRequest(labels={"parity": "0"}))
    assert [j.id for j in labelled.jobs] == ["job-0", "job-2", "job-4", "job-6"]
    cancelled = await service.stub.ListJobs(
        job_service_pb2.ListJobsRequest(states=[job_pb2.JOB_STATE_CANCELLED])
    )
    assert [j.id for j in cancelled.jobs] == ["job-0"]
    queued_batch = await service.stub.ListJobs(
        job_service_pb2.ListJobsRequest(
            states=[job_pb2.JOB_STATE_QUEUED], kind=job_pb2.JOB_KIND_BATCH, labels={"parity": "0"}
        )
    )
    assert [j.id for j in queued_batch.jobs] == ["job-2", "job-4", "job-6"]


async def test_bad_page_token_is_invalid_argument(service: ServiceHandle) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await service.stub.ListJobs(job_service_pb2.ListJobsRequest(page_token="%%%"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # Well-formed but forged: a position no 64-bit store column can hold (it was
    # UNKNOWN: the store's integer overflowed).
    for create_ns in (2**63, -(2**63) - 1, 10**30):
        forged = base64.urlsafe_b64encode(json.dumps([create_ns, "x"]).encode()).decode()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await service.stub.ListJobs(job_service_pb2.ListJobsRequest(page_token=forged))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, create_ns
    assert "page_token" in (err.value.details() or "")


async def test_a_page_token_nested_too_deep_is_invalid_argument(
    service: ServiceHandle, caplog: pytest.LogCaptureFixture
) -> None:
    """A forged token of deeply nested JSON arrays (10 KiB of `[`) was UNKNOWN, its
    RecursionError logged at ERROR with a traceback: it is a bad token like any other."""
    forged = base64.urlsafe_b64encode(b"[" * 10_000).decode()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await service.stub.ListJobs(job_service_pb2.ListJobsRequest(page_token=forged))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_token is invalid" in (err.value.details() or "")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_page_token_whose_position_is_not_a_number_is_invalid_argument(
    service: ServiceHandle,
) -> None:
    """A forged token whose position is JSON `true` or `false` was taken as a number
    (Python's bool is an int) and the stores answered it differently: the embedded store
    listed the jobs after 1 ns, MongoDB none (a boolean is no number to it). It is
    INVALID_ARGUMENT like any other bad token."""
    await create(service.stub, job_pb2.JOB_KIND_BATCH, "listed")
    for create_ns in (True, False):
        forged = base64.urlsafe_b64encode(json.dumps([create_ns, "x"]).encode()).decode()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await service.stub.ListJobs(job_service_pb2.ListJobsRequest(page_token=forged))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, create_ns
        assert "page_token is invalid" in (err.value.details() or "")


async def test_cancel_is_final(service: ServiceHandle) -> None:
    await create(service.stub, job_id="c1")
    job = await service.stub.CancelJob(job_service_pb2.CancelJobRequest(id="c1", reason="user"))
    assert job.state == job_pb2.JOB_STATE_CANCELLED
    assert job.error.message == "user"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await service.stub.CancelJob(job_service_pb2.CancelJobRequest(id="c1"))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_labels_take_any_character_but_control_characters(service: ServiceHandle) -> None:
    """Labels hold no control characters, as README says: every character Python does
    not call printable was refused as one, so an ideographic space (東京\u3000本社), a
    no-break space (10\u00a0kg) or a Hebrew value's bidi mark was INVALID_ARGUMENT
    "must not hold control characters". Their filters find them on both stores."""
    labels = {"Standort": "東京\u3000本社", "Gewicht": "10\u00a0kg", "שם": "\u200fשלום"}
    await create(service.stub, job_pb2.JOB_KIND_BATCH, "spaced", **labels)
    for key, value in labels.items():
        listed = await service.stub.ListJobs(job_service_pb2.ListJobsRequest(labels={key: value}))
        assert [j.id for j in listed.jobs] == ["spaced"], key
        assert dict(listed.jobs[0].labels) == labels
    for control in ("\x85", "\x7f", "\x1b"):  # C1, DEL, C0: still refused
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await create(service.stub, job_pb2.JOB_KIND_BATCH, "ctl", k=f"a{control}b")
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, repr(control)
        assert "control characters" in (err.value.details() or "")


async def test_label_filters_and_leases_out_of_range_are_invalid_argument(
    service: ServiceHandle,
) -> None:
    """Found by fuzzing the gRPC API: a label filter with a NUL in its key was a store
    error (UNAVAILABLE), and a lease of 10,000 years an UNKNOWN (its expiry is not a
    valid Timestamp). Both are the caller's mistakes, named as such."""
    await create(service.stub, job_pb2.JOB_KIND_VIDEO, "lease-me")
    bad_filters = [{"a\x00b": "v"}, {"k": "line\nbreak"}, {"": "v"}, {"k" * 64: "v"}]
    for labels in bad_filters:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await service.stub.ListJobs(job_service_pb2.ListJobsRequest(labels=labels))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, labels
        assert "label" in (err.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await create(service.stub, job_pb2.JOB_KIND_VIDEO, "ctl", k="tab\there")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    request = job_service_pb2.ClaimJobRequest(kind=job_pb2.JOB_KIND_VIDEO, worker_id="w")
    request.lease_duration.seconds = 315_576_000_000  # 10,000 years
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await service.stub.ClaimJob(request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "lease_duration" in (err.value.details() or "")
    # Mixed signs (protobuf's Duration forbids them): seconds 1, nanos -999999999 was
    # taken as a lease of 1 ns, and nanos past a second were carried into the seconds.
    for seconds, nanos in ((1, -999_999_999), (-1, 5), (0, 1_000_000_000), (30, -1)):
        request.lease_duration.seconds, request.lease_duration.nanos = seconds, nanos
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await service.stub.ClaimJob(request)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (seconds, nanos)
        assert "lease_duration" in (err.value.details() or ""), err.value.details()
    # Nothing was claimed: the job is still queued.
    job = await service.stub.GetJob(job_service_pb2.GetJobRequest(id="lease-me"))
    assert job.state == job_pb2.JOB_STATE_QUEUED


async def test_dot_segment_ids_cannot_be_created(service: ServiceHandle) -> None:
    """`.` and `..` would be callback URLs and dashboard pages that clients resolve to
    another path (WHATWG URLs, curl): refused at creation, by CreateJob and by an
    event that creates its job."""
    for job_id in (".", ".."):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await create(service.stub, job_pb2.JOB_KIND_EXTRACTION, job_id)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "resolve" in (err.value.details() or "")
        report = progress(job_id, 5)
        report.create_kind = job_pb2.JOB_KIND_TRANSCODE
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await service.stub.ReportEvent(report)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (await create(service.stub, job_pb2.JOB_KIND_EXTRACTION, "..x")).job.id == "..x"


async def test_the_id_of_lines_of_no_job_cannot_be_a_job(service: ServiceHandle) -> None:
    """`UNKNOWN` is the id of every log line that names no job: a job of that id took
    them all (written before it too), and deleting it (DeleteJob, the retention)
    deleted every worker's anonymous lines. Refused at creation like `.` and `..`."""
    anonymous = job_service_pb2.WriteLogRequest(
        entry=log_pb2.LogEntry(level=log_pb2.LOG_LEVEL_INFO, message="no job named")
    )
    await service.stub.WriteLog(anonymous)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await create(service.stub, job_pb2.JOB_KIND_VIDEO, "UNKNOWN")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "UNKNOWN" in (err.value.details() or "")
    report = progress("UNKNOWN", 5)
    report.create_kind = job_pb2.JOB_KIND_TRANSCODE
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await service.stub.ReportEvent(report)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    listed = await service.stub.ListLogs(job_service_pb2.ListLogsRequest(job_id="UNKNOWN"))
    assert [e.message for e in listed.entries] == ["no job named"]
    assert (await create(service.stub, job_pb2.JOB_KIND_BATCH, "unknown")).job.id == "unknown"


async def test_a_page_of_big_jobs_stays_under_the_message_limit(service: ServiceHandle) -> None:
    """Workers may write 64 KiB messages: 40 jobs with a progress message and an error
    of that size are 5 MiB, and ListJobs' default page of 50 failed with
    RESOURCE_EXHAUSTED (over gRPC's 4 MiB), for that page and any filter reaching it
    (the dashboard's jobs page too). A page now ends before 3 MiB; the next holds the rest."""
    big = "m" * 65536
    for i in range(40):
        job_id = f"big-{i:02d}"
        await create(service.stub, job_pb2.JOB_KIND_VIDEO, job_id, size="big")
        await service.stub.ReportEvent(progress(job_id, 10, message=big))
        await service.stub.ReportEvent(failed(job_id, message=big))
    seen: list[str] = []
    token = ""
    while True:
        page = await service.stub.ListJobs(
            job_service_pb2.ListJobsRequest(labels={"size": "big"}, page_token=token)
        )
        assert page.jobs and page.ByteSize() <= 3 * 1024 * 1024
        seen += [job.id for job in page.jobs]
        token = page.next_page_token
        if not token:
            break
    assert seen == [f"big-{i:02d}" for i in range(40)]


async def _upload(
    service: ServiceHandle,
    job_id: str,
    name: str,
    data: bytes,
    gate: asyncio.Event | None = None,
    content_type: str = "",
) -> None:
    """UploadArtifact of `data`; with `gate`, the last byte waits for it (a slow upload)."""

    async def parts() -> AsyncIterator[job_service_pb2.UploadArtifactRequest]:
        header = job_service_pb2.ArtifactHeader(
            job_id=job_id, name=name, size=len(data), content_type=content_type
        )
        yield job_service_pb2.UploadArtifactRequest(header=header)
        yield job_service_pb2.UploadArtifactRequest(data=data[:-1])
        if gate is not None:
            await gate.wait()
        yield job_service_pb2.UploadArtifactRequest(data=data[-1:])

    await service.stub.UploadArtifact(parts())


async def _content(service: ServiceHandle, job_id: str, name: str) -> bytes:
    call = service.stub.ReadArtifact(job_service_pb2.ReadArtifactRequest(job_id=job_id, name=name))
    return b"".join([m.data async for m in call])


async def test_an_ended_job_s_artifacts_are_final(service: ServiceHandle) -> None:
    """Two final reports raced: the one with a small file completed the job while the
    other's large upload still ran, and that upload then replaced the file the job's
    result describes. An upload that would change an artifact of a job that has ended
    is refused when it is about to be stored; the stored one stays. The same content
    again (a retry that overlapped the original) and new names are taken."""
    await create(service.stub, job_id="art")
    await _upload(service, "art", "text.md", b"small")
    gate = asyncio.Event()
    late = asyncio.create_task(_upload(service, "art", "text.md", b"large" * 1000, gate))
    await service.stub.ReportEvent(completed("art"))
    gate.set()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await late
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "'text.md' is final" in (err.value.details() or "")
    assert await _content(service, "art", "text.md") == b"small"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _upload(service, "art", "text.md", b"again")
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    # The same bytes as another type: the stored artifact's metadata would change (a
    # download's Content-Type); only its bytes and size were compared.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _upload(service, "art", "text.md", b"small", content_type="image/png")
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    await _upload(service, "art", "text.md", b"small")  # a retry: the same content
    await _upload(service, "art", "notes.md", b"added after the end")
    listed = await service.stub.ListArtifacts(job_service_pb2.ListArtifactsRequest(job_id="art"))
    assert sorted(a.name for a in listed.artifacts) == ["notes.md", "text.md"]


async def test_an_empty_job_id_is_named_as_the_request_spells_it(
    service: ServiceHandle,
) -> None:
    """GetJob said `job_id is required`, but its field is `id` (as CancelJob and
    WatchJob say): each refusal names the field of the request that was sent."""
    stub, svc = service.stub, job_service_pb2

    async def upload() -> object:
        header = svc.ArtifactHeader(name="a.txt")
        return await stub.UploadArtifact(iter([svc.UploadArtifactRequest(header=header)]))

    calls: dict[str, list[Callable[[], Awaitable[object]]]] = {
        "id": [
            lambda: stub.GetJob(svc.GetJobRequest()),
            lambda: stub.CancelJob(svc.CancelJobRequest()),
            lambda: read(stub.WatchJob(svc.WatchJobRequest())),
        ],
        "job_id": [
            lambda: stub.ListJobEvents(svc.ListJobEventsRequest()),
            lambda: stub.ListArtifacts(svc.ListArtifactsRequest()),
            lambda: read(stub.ReadArtifact(svc.ReadArtifactRequest(name="a.txt"))),
            lambda: stub.ReportEvent(
                svc.ReportEventRequest(idempotency_key="k", progress=job_pb2.Progress())
            ),
        ],
        "header.job_id": [upload],
    }
    for field, pending in calls.items():
        for call in pending:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call()
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert err.value.details() == f"{field} is required"


async def test_a_result_that_names_an_artifact_s_old_content_is_refused(
    service: ServiceHandle,
) -> None:
    """Two different finals racing, both uploads done before either completes: the
    result of the one whose upload was replaced named content the job no longer had,
    and it was applied. It is now FAILED_PRECONDITION; the other's result applies."""
    await create(service.stub, job_id="named")
    await _upload(service, "named", "text.md", b"first")
    first = (
        await service.stub.ListArtifacts(job_service_pb2.ListArtifactsRequest(job_id="named"))
    ).artifacts[0]
    await _upload(service, "named", "text.md", b"second")
    second = (
        await service.stub.ListArtifacts(job_service_pb2.ListArtifactsRequest(job_id="named"))
    ).artifacts[0]
    stale = completed("named", key="a")
    stale.completed.artifacts.add(name=first.name, sha256=first.sha256)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await service.stub.ReportEvent(stale)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "'text.md'" in (err.value.details() or "")
    batch = await service.stub.BatchReportEvents(
        job_service_pb2.BatchReportEventsRequest(requests=[stale])
    )
    assert batch.results[0].code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert (await service.stub.GetJob(job_service_pb2.GetJobRequest(id="named"))).sequence == 0
    current = completed("named", key="b")
    current.completed.artifacts.add(name=second.name, sha256=second.sha256)
    await service.stub.ReportEvent(current)
    job = await service.stub.GetJob(job_service_pb2.GetJobRequest(id="named"))
    assert (job.state, job.result.artifacts[0].sha256) == (
        job_pb2.JOB_STATE_SUCCEEDED,
        second.sha256,
    )


async def test_a_page_token_answers_only_with_its_own_filters(service: ServiceHandle) -> None:
    """A token used with other filters went on from its place in another listing: a
    client that sent `states` only with the first page got jobs of every state after
    it. It is now INVALID_ARGUMENT naming the filters; a token from before tokens
    carried them is still taken."""
    for i in range(4):
        await create(service.stub, job_id=f"pt-{i}")
    await service.stub.CancelJob(job_service_pb2.CancelJobRequest(id="pt-1"))
    await service.stub.CancelJob(job_service_pb2.CancelJobRequest(id="pt-3"))
    cancelled = job_service_pb2.ListJobsRequest(states=[job_pb2.JOB_STATE_CANCELLED], page_size=1)
    first = await service.stub.ListJobs(cancelled)
    assert [j.id for j in first.jobs] == ["pt-1"]
    for other in (
        job_service_pb2.ListJobsRequest(page_token=first.next_page_token),
        job_service_pb2.ListJobsRequest(
            page_token=first.next_page_token,
            kind=job_pb2.JOB_KIND_GENERIC,
            states=[job_pb2.JOB_STATE_CANCELLED],
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await service.stub.ListJobs(other)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "other filters" in (err.value.details() or "")
    cancelled.page_token = first.next_page_token
    assert [j.id for j in (await service.stub.ListJobs(cancelled)).jobs] == ["pt-3"]
    # The same filters spelt otherwise (a state twice, in another order) are the same
    # listing: states=[CANCELLED, CANCELLED] was "from a listing with other filters".
    twice = job_service_pb2.ListJobsRequest(
        states=[job_pb2.JOB_STATE_CANCELLED] * 2, page_token=first.next_page_token
    )
    assert [j.id for j in (await service.stub.ListJobs(twice)).jobs] == ["pt-3"]
    # A token of the old form (no filters in it) still answers.
    ns, job_id, _ = json.loads(base64.urlsafe_b64decode(first.next_page_token))
    old = base64.urlsafe_b64encode(json.dumps([ns, job_id]).encode()).decode()
    cancelled.page_token = old
    assert [j.id for j in (await service.stub.ListJobs(cancelled)).jobs] == ["pt-3"]


async def test_a_bad_id_is_named_as_the_caller_gave_it(service: ServiceHandle) -> None:
    """CreateJob takes the id from `job_id`, else from `job.id`; a bad `job.id` was
    refused as a bad `job_id`, a field the caller had not set."""
    generic = job_pb2.Job(kind=job_pb2.JOB_KIND_GENERIC, id="no spaces")
    for request, field in (
        (job_service_pb2.CreateJobRequest(job=generic), "job.id"),
        (job_service_pb2.CreateJobRequest(job=generic, job_id="a/b"), "job_id"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await service.stub.CreateJob(request)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (err.value.details() or "").startswith(f"{field} must be 1-128 characters")


async def test_worker_and_process_ids_hold_the_documented_256_characters(
    service: ServiceHandle,
) -> None:
    """job_service.proto says so of ClaimJobRequest.worker_id and
    ReportEventRequest.process_id (it said "free-form" of the first, nothing of the
    second): 256 characters are taken, 257 are INVALID_ARGUMENT naming the field."""
    await create(service.stub, job_pb2.JOB_KIND_GENERIC, "ids")
    for field, call in (
        (
            "worker_id",
            lambda n: service.stub.ClaimJob(
                job_service_pb2.ClaimJobRequest(kind=job_pb2.JOB_KIND_GENERIC, worker_id="w" * n)
            ),
        ),
        (
            "process_id",
            lambda n: service.stub.ReportEvent(
                job_service_pb2.ReportEventRequest(
                    job_id="ids",
                    idempotency_key=f"k{n}",
                    process_id="p" * n,
                    progress=job_pb2.Progress(percent=1),
                )
            ),
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call(257)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"{field} must be at most 256 characters" in (err.value.details() or "")
        await call(256)
    job = await service.stub.GetJob(job_service_pb2.GetJobRequest(id="ids"))
    assert (job.worker_id, job.process_id) == ("w" * 256, "p" * 256)


async def test_create_job_takes_job_id_then_job_s_own_id(service: ServiceHandle) -> None:
    """What job_service.proto now says (it said only "generated when empty" of
    `job_id`): an empty `job_id` takes `job.id`; and ListLogs with a callback token
    needs `job_id`."""
    job = job_pb2.Job(kind=job_pb2.JOB_KIND_GENERIC, id="from-job")
    created = await service.stub.CreateJob(job_service_pb2.CreateJobRequest(job=job))
    assert created.job.id == "from-job"
    given = job_service_pb2.CreateJobRequest(job=job, job_id="from-request")
    assert (await service.stub.CreateJob(given)).job.id == "from-request"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await service.stub.ListLogs(
            job_service_pb2.ListLogsRequest(callback_token=created.callback_token)
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "job_id is required" in (err.value.details() or "")
