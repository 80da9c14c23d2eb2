"""ReportEvent and BatchReportEvents: the state machine, idempotency, tokens, logs."""

from __future__ import annotations

import math

import grpc
import pytest

from jobwire.v1 import event_pb2, job_pb2, job_service_pb2, log_pb2
from tests.conftest import ServiceHandle
from tests.helpers import completed, create, failed, progress


def _with_details(
    request: job_service_pb2.ReportEventRequest, log: str
) -> job_service_pb2.ReportEventRequest:
    request.failed.details["log"] = log
    return request


async def _events(service: ServiceHandle, job_id: str) -> list[event_pb2.JobEvent]:
    reply = await service.stub.ListJobEvents(job_service_pb2.ListJobEventsRequest(job_id=job_id))
    return list(reply.events)


async def test_progress_then_complete(service: ServiceHandle) -> None:
    await create(service.stub, job_id="j")
    first = await service.stub.ReportEvent(progress("j", 10, message="a"))
    assert (first.sequence, first.state, first.duplicate) == (1, job_pb2.JOB_STATE_RUNNING, False)
    await service.stub.ReportEvent(progress("j", 55.5, message="b"))
    done = await service.stub.ReportEvent(completed("j", output_key="out/v.mp4"))
    assert (done.sequence, done.state) == (3, job_pb2.JOB_STATE_SUCCEEDED)
    job = await service.stub.GetJob(job_service_pb2.GetJobRequest(id="j"))
    assert job.result.output_key == "out/v.mp4"
    assert job.progress.percent == 100.0
    assert job.HasField("start_time") and job.HasField("end_time")
    events = await _events(service, "j")
    assert [e.sequence for e in events] == [1, 2, 3]
    assert [e.type for e in events] == [
        event_pb2.EVENT_TYPE_PROGRESS,
        event_pb2.EVENT_TYPE_PROGRESS,
        event_pb2.EVENT_TYPE_COMPLETED,
    ]
    assert events[1].progress.percent == 55.5


async def test_keep_media_times_keeps_those_a_report_leaves_unset(service: ServiceHandle) -> None:
    """ReportEventRequest.keep_media_times (the video worker's reports): a time the
    report leaves unset stays the job's, with a percent given too; without it the
    report's progress is the job's whole, as before."""
    await create(service.stub, job_id="m")
    first = progress("m", 10, key="k1")
    first.progress.media_time.FromSeconds(90)
    first.progress.media_duration.FromSeconds(200)
    await service.stub.ReportEvent(first)
    kept = progress("m", 50, key="k2")
    kept.keep_media_times = True
    kept.progress.media_time.FromSeconds(100)
    await service.stub.ReportEvent(kept)
    job = await service.stub.GetJob(job_service_pb2.GetJobRequest(id="m"))
    assert (job.progress.percent, job.progress.media_time.seconds) == (50, 100)
    assert job.progress.media_duration.seconds == 200
    await service.stub.ReportEvent(progress("m", 60, key="k3"))
    job = await service.stub.GetJob(job_service_pb2.GetJobRequest(id="m"))
    assert not job.progress.HasField("media_time") and not job.progress.HasField("media_duration")


@pytest.mark.parametrize("final", [completed, failed])
async def test_nothing_leaves_a_terminal_state(service: ServiceHandle, final: object) -> None:
    await create(service.stub, job_id="t")
    await service.stub.ReportEvent(final("t"))  # type: ignore[operator]
    before = await service.stub.GetJob(job_service_pb2.GetJobRequest(id="t"))
    for late in (
        progress("t", 50, key="late-p"),
        completed("t", key="late-c"),
        failed("t", "late-f"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await service.stub.ReportEvent(late)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "terminal" in (err.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError):
        await service.stub.CancelJob(job_service_pb2.CancelJobRequest(id="t"))
    after = await service.stub.GetJob(job_service_pb2.GetJobRequest(id="t"))
    assert after == before


async def test_repeated_idempotency_key_is_applied_once(service: ServiceHandle) -> None:
    await create(service.stub, job_id="k")
    first = await service.stub.ReportEvent(progress("k", 20, key="same"))
    again = await service.stub.ReportEvent(progress("k", 90, key="same"))
    assert not first.duplicate and again.duplicate
    assert again.sequence == first.sequence == 1
    job = await service.stub.GetJob(job_service_pb2.GetJobRequest(id="k"))
    assert job.progress.percent == 20 and job.sequence == 1
    # A retried terminal event is acknowledged too, not refused.
    await service.stub.ReportEvent(completed("k", key="fin"))
    retry = await service.stub.ReportEvent(completed("k", key="fin"))
    assert retry.duplicate and retry.state == job_pb2.JOB_STATE_SUCCEEDED
    assert len(await _events(service, "k")) == 2


async def test_keys_are_those_of_the_retained_events(service: ServiceHandle) -> None:
    """An idempotency key is remembered as long as its event is retained, whatever the
    events after it carry (a cancel, claim, requeue or stall has no key). The embedded
    store kept the last `retention` keys instead, so after a cancel it still took the
    oldest key for a duplicate when MongoDB (rightly) no longer did."""
    retention = service.running.jobs.policy.retention
    await create(service.stub, job_id="w")
    for i in range(retention):
        await service.stub.ReportEvent(progress("w", i, key=f"k{i}"))
    await service.stub.CancelJob(job_service_pb2.CancelJobRequest(id="w"))
    events = await _events(service, "w")
    assert [e.idempotency_key for e in events][:2] == ["k1", "k2"]  # k0's event is gone
    kept = await service.stub.ReportEvent(progress("w", 1, key="k1"))
    assert kept.duplicate and kept.state == job_pb2.JOB_STATE_CANCELLED
    with pytest.raises(grpc.aio.AioRpcError) as err:  # k0 is new again: the job is final
        await service.stub.ReportEvent(progress("w", 0, key="k0"))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_batch_gives_each_event_its_own_outcome(service: ServiceHandle) -> None:
    await create(service.stub, job_id="b1")
    await create(service.stub, job_id="b2")
    bad = job_service_pb2.ReportEventRequest(job_id="b1", idempotency_key="x")  # no payload
    reply = await service.stub.BatchReportEvents(
        job_service_pb2.BatchReportEventsRequest(
            requests=[
                progress("b1", 10, key="1"),
                progress("b1", 20, key="2"),
                progress("missing", 10),
                bad,
                completed("b2"),
                progress("b1", 99, key="1"),
            ]
        )
    )
    codes = [r.code for r in reply.results]
    assert codes == [0, 0, grpc.StatusCode.NOT_FOUND.value[0], 3, 0, 0]
    assert "payload" not in reply.results[3].message
    assert "progress, completed or failed" in reply.results[3].message
    # Each result is its event's, as ReportEvent's error would be: a "requests[3]: "
    # before it (and only on some errors) reached a worker's HTTP answer, naming a
    # place in the bridge's batch it never sent.
    with pytest.raises(grpc.aio.AioRpcError) as alone:
        await service.stub.ReportEvent(bad)
    assert reply.results[3].message == alone.value.details()
    assert [r.response.sequence for r in reply.results if r.code == 0] == [1, 2, 1, 2]
    assert reply.results[5].response.duplicate
    job = await service.stub.GetJob(job_service_pb2.GetJobRequest(id="b1"))
    assert job.progress.percent == 20


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (progress("v", 101), "progress.percent"),
        (progress("v", -1), "progress.percent"),
        (
            job_service_pb2.ReportEventRequest(job_id="v", progress=job_pb2.Progress()),
            "idempotency_key",
        ),
        (
            job_service_pb2.ReportEventRequest(job_id="v", idempotency_key="k"),
            "progress, completed",
        ),
        # A job's retained events travel together (a MongoDB document, a replay).
        (_with_details(failed("v"), "x" * (1024 * 1024)), "at most 1048576"),
    ],
)
async def test_bad_event_names_the_problem_and_writes_nothing(
    service: ServiceHandle, request_: job_service_pb2.ReportEventRequest, field: str
) -> None:
    await create(service.stub, job_id="v")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await service.stub.ReportEvent(request_)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (err.value.details() or "")
    job = await service.stub.GetJob(job_service_pb2.GetJobRequest(id="v"))
    assert job.sequence == 0 and job.state == job_pb2.JOB_STATE_QUEUED


def _timed(
    payload: str, field: str, seconds: int, nanos: int = 0
) -> job_service_pb2.ReportEventRequest:
    """A report whose `payload` (progress or completed) carries `field` as this time."""
    request = job_service_pb2.ReportEventRequest(job_id="m", idempotency_key="k")
    message = request.progress if payload == "progress" else request.completed
    message.SetInParent()
    value = getattr(message, field)
    value.seconds, value.nanos = seconds, nanos
    return request


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (_timed("progress", "media_time", -5), "progress.media_time"),
        (_timed("progress", "media_duration", 10**12), "progress.media_duration"),
        (_timed("progress", "media_time", 1, -1), "progress.media_time"),
        (_timed("progress", "report_time", 10**12), "progress.report_time"),
        (_timed("completed", "processing_time", -(10**12)), "completed.processing_time"),
        (_timed("completed", "media_duration", -1), "completed.media_duration"),
    ],
)
async def test_a_media_time_or_stamp_out_of_range_is_refused(
    service: ServiceHandle, request_: job_service_pb2.ReportEventRequest, field: str
) -> None:
    """Progress and result times were stored unchecked: a negative media time made the
    percent derived for `percent_not_given` negative (-5 s of 10 s: -50), and a
    duration or timestamp out of protobuf's range (or of mixed signs) was stored, after
    which every JSON reader of the job failed on it (the dashboard, `jobwire jobs get`).
    Now each is INVALID_ARGUMENT naming its field, and nothing is written."""
    await create(service.stub, job_id="m")
    request_.percent_not_given = request_.HasField("progress")
    if request_.HasField("progress") and field != "progress.media_duration":
        request_.progress.media_duration.seconds = 10
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await service.stub.ReportEvent(request_)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (err.value.details() or "")
    job = await service.stub.GetJob(job_service_pb2.GetJobRequest(id="m"))
    assert job.sequence == 0 and job.state == job_pb2.JOB_STATE_QUEUED
    batch = await service.stub.BatchReportEvents(
        job_service_pb2.BatchReportEventsRequest(requests=[request_])
    )
    assert batch.results[0].code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert field in batch.results[0].message


def _struct_with(payload: str, number: float) -> job_service_pb2.ReportEventRequest:
    """A completed (metadata) or failed (details) report holding `number` deep inside."""
    request = job_service_pb2.ReportEventRequest(job_id="s", idempotency_key="k")
    struct = request.completed.metadata if payload == "completed" else request.failed.details
    struct.update({"ok": 1.5, "nested": {"list": ["a", 2, {"ratio": number}]}})
    return request


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (_struct_with("completed", math.nan), "completed.metadata.nested.list[2].ratio"),
        (_struct_with("failed", math.inf), "failed.details.nested.list[2].ratio"),
        (_struct_with("failed", -math.inf), "failed.details.nested.list[2].ratio"),
    ],
)
async def test_a_number_json_cannot_hold_is_refused(
    service: ServiceHandle, request_: job_service_pb2.ReportEventRequest, field: str
) -> None:
    """A NaN or an infinity in a result's metadata or an error's details was stored,
    and every JSON reader of the job then failed on it (`jobwire jobs get`: a
    SerializeToJsonError traceback). INVALID_ARGUMENT naming where, nothing written."""
    await create(service.stub, job_id="s")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await service.stub.ReportEvent(request_)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (err.value.details() or "")
    job = await service.stub.GetJob(job_service_pb2.GetJobRequest(id="s"))
    assert job.sequence == 0 and job.state == job_pb2.JOB_STATE_QUEUED
    batch = await service.stub.BatchReportEvents(
        job_service_pb2.BatchReportEventsRequest(requests=[request_])
    )
    assert batch.results[0].code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert field in batch.results[0].message


async def test_callback_token_is_checked_against_the_hash(service: ServiceHandle) -> None:
    created = await create(service.stub, job_id="tok")
    wrong = progress("tok", 5)
    wrong.callback_token = created.callback_token[:-1] + (
        "A" if created.callback_token[-1] != "A" else "B"
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await service.stub.ReportEvent(wrong)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert created.callback_token not in (err.value.details() or "")
    right = progress("tok", 5)
    right.callback_token = created.callback_token
    assert (await service.stub.ReportEvent(right)).sequence == 1
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await service.stub.GetJob(job_service_pb2.GetJobRequest(id="tok", callback_token="x"))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_unknown_job_with_create_kind_becomes_a_job(service: ServiceHandle) -> None:
    request = completed("task-1", key="aurora:task-1:succeeded")
    request.create_kind = job_pb2.JOB_KIND_TRANSCODE
    reply = await service.stub.ReportEvent(request)
    assert (reply.sequence, reply.state) == (1, job_pb2.JOB_STATE_SUCCEEDED)
    again = await service.stub.ReportEvent(request)
    assert again.duplicate
    job = await service.stub.GetJob(job_service_pb2.GetJobRequest(id="task-1"))
    assert job.kind == job_pb2.JOB_KIND_TRANSCODE and not job.has_callback_token
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await service.stub.ReportEvent(progress("task-2", 1))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_create_kind_video_is_refused(service: ServiceHandle) -> None:
    """A report cannot carry a video's url, which every VIDEO job needs (CreateJob
    refuses one without it): create_kind VIDEO is INVALID_ARGUMENT, nothing created."""
    request = progress("vid-1", 5)
    request.create_kind = job_pb2.JOB_KIND_VIDEO
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await service.stub.ReportEvent(request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = err.value.details() or ""
    assert "create_kind" in details and "job.video.url" in details
    batch = await service.stub.BatchReportEvents(
        job_service_pb2.BatchReportEventsRequest(requests=[request])
    )
    assert [r.code for r in batch.results] == [grpc.StatusCode.INVALID_ARGUMENT.value[0]]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await service.stub.GetJob(job_service_pb2.GetJobRequest(id="vid-1"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def _log(
    job_id: str, level: log_pb2.LogLevel.ValueType, message: str, seconds: int
) -> job_service_pb2.WriteLogRequest:
    entry = log_pb2.LogEntry(job_id=job_id, level=level, message=message)
    entry.time.FromSeconds(1_700_000_000 + seconds)
    return job_service_pb2.WriteLogRequest(entry=entry)


async def test_a_listing_of_large_log_lines_reads_only_what_it_answers(
    service: ServiceHandle,
) -> None:
    """400 lines of 256 KiB (65,536 four-byte characters each), listed with limit
    1000: the store read all 102 MB to answer 3 MiB, which on FerretDB was a reply past
    its 48 MB message limit (UNKNOWN, for every such listing)."""
    await create(service.stub, job_id="big-logs")
    for i in range(400):
        line = chr(0x1F600 + i % 64) * 65536
        await service.stub.WriteLog(_log("big-logs", log_pb2.LOG_LEVEL_INFO, line, i))
    listed = await service.stub.ListLogs(
        job_service_pb2.ListLogsRequest(job_id="big-logs", limit=1000)
    )
    times = [e.time.seconds - 1_700_000_000 for e in listed.entries]
    assert 8 <= len(times) <= 12 and times == list(range(399, 399 - len(times), -1))
    assert listed.ByteSize() <= 3 * 1024 * 1024


async def test_logs_newest_first_with_limit_and_level(service: ServiceHandle) -> None:
    await create(service.stub, job_id="lg")
    await service.stub.WriteLog(_log("lg", log_pb2.LOG_LEVEL_INFO, "one", 1))
    await service.stub.WriteLog(_log("lg", log_pb2.LOG_LEVEL_WARNING, "three", 3))
    await service.stub.WriteLog(_log("lg", log_pb2.LOG_LEVEL_INFO, "two", 2))
    await service.stub.WriteLog(_log("", log_pb2.LOG_LEVEL_INFO, "anon", 4))
    every = await service.stub.ListLogs(job_service_pb2.ListLogsRequest(job_id="lg"))
    assert [e.message for e in every.entries] == ["three", "two", "one"]
    limited = await service.stub.ListLogs(job_service_pb2.ListLogsRequest(job_id="lg", limit=2))
    assert [e.message for e in limited.entries] == ["three", "two"]
    infos = await service.stub.ListLogs(
        job_service_pb2.ListLogsRequest(level=log_pb2.LOG_LEVEL_INFO)
    )
    assert [(e.message, e.job_id) for e in infos.entries] == [
        ("anon", "UNKNOWN"),
        ("two", "lg"),
        ("one", "lg"),
    ]


async def test_list_logs_by_kind_shows_no_other_kind(service: ServiceHandle) -> None:
    """ListLogs(kind) lists lines of jobs of that kind, and lines of no job written with
    that kind: the bridge lists the video worker's GET /api/log this way, so its API key
    does not read the lines of a Secretary or Batch job (it read every line before)."""
    await create(service.stub, job_pb2.JOB_KIND_VIDEO, "lk-video")
    await create(service.stub, job_pb2.JOB_KIND_EXTRACTION, "lk-doc")
    await service.stub.WriteLog(_log("lk-video", log_pb2.LOG_LEVEL_INFO, "video line", 1))
    await service.stub.WriteLog(_log("lk-doc", log_pb2.LOG_LEVEL_INFO, "secret doc", 2))
    await service.stub.WriteLog(_log("", log_pb2.LOG_LEVEL_INFO, "internal anon", 3))
    worker_anon = _log("", log_pb2.LOG_LEVEL_INFO, "worker anon", 4)
    worker_anon.kind = job_pb2.JOB_KIND_VIDEO
    await service.stub.WriteLog(worker_anon)
    # A video writer naming a job of another kind: the line is that job's.
    into_doc = _log("lk-doc", log_pb2.LOG_LEVEL_INFO, "about the doc", 5)
    into_doc.kind = job_pb2.JOB_KIND_VIDEO
    await service.stub.WriteLog(into_doc)
    videos = await service.stub.ListLogs(
        job_service_pb2.ListLogsRequest(kind=job_pb2.JOB_KIND_VIDEO)
    )
    assert [e.message for e in videos.entries] == ["worker anon", "video line"]
    assert {e.kind for e in videos.entries} == {job_pb2.JOB_KIND_VIDEO}
    docs = await service.stub.ListLogs(
        job_service_pb2.ListLogsRequest(kind=job_pb2.JOB_KIND_EXTRACTION, limit=1)
    )
    assert [e.message for e in docs.entries] == ["about the doc"]
    every = await service.stub.ListLogs(job_service_pb2.ListLogsRequest())
    assert len(every.entries) == 5
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await service.stub.ListLogs(job_service_pb2.ListLogsRequest(kind=99))  # type: ignore[arg-type]
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "kind" in (err.value.details() or "")


async def test_list_logs_stays_under_the_message_limit(service: ServiceHandle) -> None:
    """Log lines may be 64 KiB and ListLogs takes up to 1,000: 70 such lines failed
    with RESOURCE_EXHAUSTED (over gRPC's 4 MiB; the video worker's GET /api/log past
    the bridge's 8 MiB). The answer now ends with the newest lines that fit in 3 MiB."""
    for i in range(70):
        await service.stub.WriteLog(_log("", log_pb2.LOG_LEVEL_INFO, f"{i:02d}" + "m" * 65530, i))
    reply = await service.stub.ListLogs(job_service_pb2.ListLogsRequest(limit=1000))
    assert reply.ByteSize() <= 3 * 1024 * 1024
    shown = [int(e.message[:2]) for e in reply.entries]
    assert shown == list(range(69, 69 - len(shown), -1)) and len(shown) >= 40


async def test_error_log_fails_a_queued_or_running_job(service: ServiceHandle) -> None:
    await create(service.stub, job_id="e1")
    await service.stub.ReportEvent(progress("e1", 30))
    reply = await service.stub.WriteLog(_log("e1", log_pb2.LOG_LEVEL_ERROR, "disk full", 1))
    assert reply.job_failed
    job = await service.stub.GetJob(job_service_pb2.GetJobRequest(id="e1"))
    assert job.state == job_pb2.JOB_STATE_FAILED and job.error.message == "disk full"
    again = await service.stub.WriteLog(_log("e1", log_pb2.LOG_LEVEL_ERROR, "later", 2))
    assert not again.job_failed
    logs = await service.stub.ListLogs(job_service_pb2.ListLogsRequest(job_id="e1"))
    assert [e.message for e in logs.entries] == ["later", "disk full"]


async def test_an_error_line_under_a_key_already_stored_fails_nothing(
    service: ServiceHandle,
) -> None:
    """A key already stored is answered as a duplicate and stores nothing, whatever the
    line: an ERROR line under it (a worker numbering its keys from 1 again after a
    restart) failed the job with its message, answered duplicate=true, job_failed=false,
    and the line that failed it was stored nowhere."""
    await create(service.stub, job_id="lk")
    await service.stub.ReportEvent(progress("lk", 10))
    fine = _log("lk", log_pb2.LOG_LEVEL_INFO, "fine", 1)
    fine.idempotency_key = "line-1"
    assert not (await service.stub.WriteLog(fine)).duplicate
    broke = _log("lk", log_pb2.LOG_LEVEL_ERROR, "broke", 2)
    broke.idempotency_key = "line-1"
    reply = await service.stub.WriteLog(broke)
    assert reply.duplicate and not reply.job_failed and reply.entry.message == "fine"
    job = await service.stub.GetJob(job_service_pb2.GetJobRequest(id="lk"))
    assert job.state == job_pb2.JOB_STATE_RUNNING and job.sequence == 1
    logs = await service.stub.ListLogs(job_service_pb2.ListLogsRequest(job_id="lk"))
    assert [e.message for e in logs.entries] == ["fine"]


async def test_bad_log_writes_nothing(service: ServiceHandle) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await service.stub.WriteLog(_log("x", log_pb2.LOG_LEVEL_UNSPECIFIED, "m", 1))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "entry.level" in (err.value.details() or "")
    logs = await service.stub.ListLogs(job_service_pb2.ListLogsRequest())
    assert list(logs.entries) == []


async def test_log_time_out_of_range_is_invalid(service: ServiceHandle) -> None:
    request = _log("x", log_pb2.LOG_LEVEL_INFO, "m", 1)
    request.entry.time.FromSeconds(10**11)  # year ~5138
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await service.stub.WriteLog(request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "entry.time" in (err.value.details() or "")
    event = progress("x", 1)
    event.event_time.FromSeconds(10**11)
    await create(service.stub, job_id="x")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await service.stub.ReportEvent(event)
    assert "event_time" in (err.value.details() or "")
