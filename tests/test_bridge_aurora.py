"""AuroraCloud transcoding callback: example, idempotency, auth, terminal conflicts."""
# ruff: noqa: F811  (pytest fixtures imported from tests.bridge_harness)

from __future__ import annotations

import dataclasses
from typing import Any

import grpc
import jsonschema  # type: ignore[import-untyped]
import pytest

from http_bridge.config import parse_networks
from jobwire.job_ids import NOT_A_NEW_JOB_ID
from jobwire.v1 import job_pb2
from tests.bridge_harness import (
    TEST_CONFIG,
    TRANSCODE_TOKEN,
    bridge,  # noqa: F401
    create_job,
    get_job,
    new_id,
    running_bridge,
    stub,  # noqa: F401
)

PATH = "/api/transcode-callback"
# The contract's example with its `//` comments removed (they are not JSON).
EXAMPLE = {
    "code": 0,
    "msg": "succeeded",
    "callback_url": "http://xxx.com/notify",
    "data": [
        {
            "task_id": "20220420111542664667cccc3d179880",
            "input": "https://input-source.com/test.mp4",
            "output": "oss://output-bucket/path/test.mp4",
            "format": "mp4",
            "status": "succeeded",
            "duration": 30.0,
            "spend_time": 2.0,
        },
        {
            "task_id": "20220420111542664667cccc3d179780",
            "status": "failed",
            "error_code": 1003,
            "error_msg": "Invalid input file",
        },
    ],
}
AUTH = {"Authorization": f"Bearer {TRANSCODE_TOKEN}"}


def notification(*tasks: dict[str, Any]) -> dict[str, Any]:
    return {"code": 0, "msg": "succeeded", "data": list(tasks)}


async def test_example_applied_once_when_sent_three_times(bridge: Any, stub: Any) -> None:
    ok_id, failed_id = (t["task_id"] for t in EXAMPLE["data"])  # type: ignore[attr-defined]
    for _ in range(3):
        assert await bridge.post(PATH, EXAMPLE, headers=AUTH) == (200, {"ack": True})
    ok = await get_job(stub, ok_id)
    assert (ok.kind, ok.state, ok.sequence) == (
        job_pb2.JOB_KIND_TRANSCODE,
        job_pb2.JOB_STATE_SUCCEEDED,
        1,
    )
    assert ok.result.output_uri == "oss://output-bucket/path/test.mp4"
    assert ok.result.input_uri == "https://input-source.com/test.mp4"
    assert ok.result.format == "mp4"
    assert ok.result.media_duration.seconds == 30
    assert ok.result.processing_time.seconds == 2
    failed = await get_job(stub, failed_id)
    assert (failed.state, failed.sequence) == (job_pb2.JOB_STATE_FAILED, 1)
    assert (failed.error.code, failed.error.message) == ("1003", "Invalid input file")


async def test_token_in_path_or_header(bridge: Any, stub: Any) -> None:
    for how in ("path", "bearer", "x-callback-token"):
        task_id = new_id("a")
        body = notification({"task_id": task_id, "status": "succeeded", "output": "s3://b/o"})
        if how == "path":
            answer = await bridge.post(f"{PATH}/{TRANSCODE_TOKEN}", body)
        elif how == "bearer":
            answer = await bridge.post(PATH, body, headers=AUTH)
        else:
            answer = await bridge.post(PATH, body, headers={"X-Callback-Token": TRANSCODE_TOKEN})
        assert answer == (200, {"ack": True}), how
        assert (await get_job(stub, task_id)).state == job_pb2.JOB_STATE_SUCCEEDED


async def test_auth_refused(bridge: Any) -> None:
    body = notification({"task_id": new_id("a"), "status": "failed"})
    for path, headers in (
        (PATH, {}),
        (PATH, {"Authorization": "Bearer nope"}),
        (f"{PATH}/nope", {}),
        (f"{PATH}/nope", AUTH),  # a wrong path token is not rescued by a header
    ):
        status, answer = await bridge.post(path, body, headers=headers)
        assert status == 401 and answer["ack"] is False, (path, headers)


async def test_unconfigured_endpoint_refuses_everything(grpc_service: Any) -> None:
    config = dataclasses.replace(
        TEST_CONFIG, service_target=grpc_service.target, transcode_callback_token=""
    )
    async with running_bridge(config) as b:
        body = notification({"task_id": new_id("a"), "status": "failed"})
        assert (await b.post(PATH, body, headers=AUTH))[0] == 401
        assert (await b.post(f"{PATH}/", body))[0] in (401, 404)


async def test_ip_allow_list(grpc_service: Any, stub: Any) -> None:
    base = dataclasses.replace(TEST_CONFIG, service_target=grpc_service.target)
    allowed = dataclasses.replace(
        base,
        transcode_callback_token="",
        transcode_allowed_ips=parse_networks("10.0.0.0/8, 127.0.0.1"),
    )
    denied = dataclasses.replace(base, transcode_allowed_ips=parse_networks("10.0.0.0/8"))
    task_id = new_id("a")
    body = notification({"task_id": task_id, "status": "failed", "error_code": 7})
    async with running_bridge(denied) as b:
        assert (await b.post(PATH, body, headers=AUTH))[0] == 403
    async with running_bridge(allowed) as b:
        assert await b.post(PATH, body) == (200, {"ack": True})
    assert (await get_job(stub, task_id)).error.code == "7"


async def test_terminal_conflict_is_acknowledged(bridge: Any, stub: Any) -> None:
    task_id = new_id("a")
    ok = {"task_id": task_id, "status": "succeeded", "output": "s3://x"}
    assert (await bridge.post(PATH, notification(ok), headers=AUTH))[0] == 200
    bad = {"task_id": task_id, "status": "failed", "error_msg": "late"}
    assert await bridge.post(PATH, notification(bad), headers=AUTH) == (200, {"ack": True})
    assert (await get_job(stub, task_id)).state == job_pb2.JOB_STATE_SUCCEEDED


async def test_a_bad_task_costs_the_others_nothing(bridge: Any, stub: Any) -> None:
    """One invalid task made the whole notification a 400, and AuroraCloud's three
    retries of it lost every outcome in it. The valid tasks are now stored; the 400
    names the others (a retry stores nothing twice)."""
    good_id, bad_id = new_id("a"), "bad id with spaces"
    body = notification(
        {"task_id": good_id, "status": "succeeded", "output": "oss://b/t.mp4"},
        {"task_id": bad_id, "status": "failed"},
        {"task_id": new_id("a"), "status": "failed", "error_code": 1.5},
    )
    for _ in range(2):
        status, answer = await bridge.post(PATH, body, headers=AUTH)
        assert (status, answer["ack"]) == (400, False)
        assert answer["error"].startswith("data.1.task_id: ")
        assert "data.2.error_code" in answer["error"]
    job = await get_job(stub, good_id)
    assert (job.state, job.sequence) == (job_pb2.JOB_STATE_SUCCEEDED, 1)
    assert job.result.output_uri == "oss://b/t.mp4"


async def test_a_bad_error_code_is_named_in_one_plain_problem(bridge: Any) -> None:
    """`error_code` is an integer or a string (the document's example is 1003). One
    that is neither was named by pydantic's internals, twice: `data.0.error_code.
    function-before[_whole_number(), constrained-int]: Input should be a valid integer;
    data.0.error_code.constrained-str: Input should be a valid string`."""
    for code in (1003.5, [1003], {"n": 1}, True):
        body = notification({"task_id": new_id("a"), "status": "failed", "error_code": code})
        status, answer = await bridge.post(PATH, body, headers=AUTH)
        assert (status, answer["ack"]) == (400, False)
        assert answer["error"] == (
            "data.0.error_code: must be an integer (within ±2^53) or a string of at most"
            " 4096 characters"
        ), code


async def test_a_task_that_is_not_an_object_costs_the_others_nothing(
    bridge: Any, stub: Any
) -> None:
    """A `null` (or a string, a list, a number) among the tasks made the whole
    notification a 400 before any task was looked at: the valid tasks beside it were
    lost with AuroraCloud's retries. It is now a bad task like any other."""
    good = [new_id("a") for _ in range(2)]
    body = notification(
        {"task_id": good[0], "status": "succeeded", "output": "oss://b/t.mp4"},
        None,  # type: ignore[arg-type]
        "task",  # type: ignore[arg-type]
        {"task_id": good[1], "status": "failed", "error_code": 1003},
    )
    status, answer = await bridge.post(PATH, body, headers=AUTH)
    assert (await get_job(stub, good[0])).state == job_pb2.JOB_STATE_SUCCEEDED
    assert (await get_job(stub, good[1])).error.code == "1003"
    assert (status, answer) == (
        400,
        {
            "ack": False,
            "error": "data.1: a task must be an object; data.2: a task must be an object",
        },
    )


async def test_each_problem_of_a_bad_task_names_its_task(bridge: Any) -> None:
    """A task with two problems: the second was named without its `data.N.`, so the
    400 read as if the notification itself had a bad `status`."""
    body = notification({"task_id": "bad id", "status": "running"})
    status, answer = await bridge.post(PATH, body, headers=AUTH)
    assert status == 400
    problems = answer["error"].split("; ")
    assert [p.split(":")[0] for p in problems] == ["data.0.task_id", "data.0.status"], problems


async def test_bad_input_is_400_and_writes_nothing(bridge: Any, stub: Any) -> None:
    good_id = new_id("a")
    for body in (
        notification({"task_id": good_id, "status": "running"}),
        notification({"task_id": good_id, "status": "succeeded", "duration": -1}),
        notification({"task_id": good_id, "status": "succeeded", "duration": "30"}),
        {"code": 0, "msg": "ok"},
        {"code": "0", "msg": "ok", "data": []},
        [],
    ):
        status, answer = await bridge.post(PATH, body, headers=AUTH)
        assert status == 400 and answer["ack"] is False, body
    assert (await bridge.post_raw(PATH, b"{", headers=AUTH))[0] == 400
    try:
        await get_job(stub, good_id)
        raise AssertionError("a task of a rejected notification was stored")
    except Exception as exc:  # grpc NOT_FOUND
        assert "NOT_FOUND" in str(exc)


async def test_a_failed_tasks_long_error_msg_is_stored_clipped(bridge: Any, stub: Any) -> None:
    """The contract sets no limit on `error_msg`. One past 4,096 characters made its task
    a bad task (400): AuroraCloud's three identical retries were refused too, and the
    failure was never recorded. It is stored, past the service's 65,536 characters with
    its start and its end, as AWS Batch's error."""
    short_id, long_id = new_id("a"), new_id("a")
    medium = "ffmpeg: " + "x" * 5000
    huge = "ffmpeg version 6.1\n" + "frame= 1 fps=0.0\n" * 5000 + "Conversion failed!"
    body = notification(
        {"task_id": short_id, "status": "failed", "error_code": 1003, "error_msg": medium},
        {"task_id": long_id, "status": "failed", "error_code": 1004, "error_msg": huge},
    )
    assert await bridge.post(PATH, body, headers=AUTH) == (200, {"ack": True})
    short = await get_job(stub, short_id)
    assert (short.state, short.error.code, short.error.message) == (
        job_pb2.JOB_STATE_FAILED,
        "1003",
        medium,
    )
    message = (await get_job(stub, long_id)).error.message
    assert len(message) <= 65536 < len(huge)
    assert message.startswith("ffmpeg version 6.1") and message.endswith("Conversion failed!")
    assert "characters left out" in message


async def test_a_dot_task_id_is_a_bad_task_named_by_its_place(bridge: Any, stub: Any) -> None:
    """`.` and `..` pass the id pattern, but the service refuses them for a new job (URL
    dot segments). The 400 named `requests[1]: job_id ...`, the event's place in the
    bridge's batch to the service, and left out the notification's other bad tasks. It
    is now a bad task like any other, named by its place in `data`."""
    good = new_id("a")
    body = notification(
        {"task_id": good, "status": "failed", "error_code": 1003},
        {"task_id": "..", "status": "failed"},
        {"task_id": ".", "status": "succeeded"},
    )
    status, answer = await bridge.post(PATH, body, headers=AUTH)
    assert status == 400
    assert [p.split(":")[0] for p in answer["error"].split("; ")] == [
        "data.1.task_id",
        "data.2.task_id",
    ], answer
    assert (await get_job(stub, good)).error.code == "1003"


async def test_an_unknown_task_id_is_a_bad_task_the_document_refuses(
    bridge: Any, stub: Any
) -> None:
    """`UNKNOWN` (the id of log lines of no job) passes the id pattern, but the service
    refuses it for a new job. The document took it, and the bridge's 400 was the
    service's, naming no task (`job_id must not be 'UNKNOWN': ...`). It is now a bad
    task like `..`, named by its place in `data`, and the document refuses it."""
    good = new_id("a")
    body = notification(
        {"task_id": good, "status": "failed", "error_code": 1003},
        {"task_id": "UNKNOWN", "status": "failed"},
    )
    status, answer = await bridge.post(PATH, body, headers=AUTH)
    assert status == 400
    assert answer["error"].startswith("data.1.task_id: "), answer
    assert (await get_job(stub, good)).error.code == "1003"
    _, doc = await bridge.get("/openapi.json")
    task = {"components": doc["components"], "$ref": "#/components/schemas/Task"}
    validator = jsonschema.Draft202012Validator(task)
    assert not validator.is_valid(body["data"][1])
    assert validator.is_valid(body["data"][0])


async def test_the_bridge_refuses_the_task_ids_the_service_refuses(bridge: Any, stub: Any) -> None:
    """One list of the ids no new job may take (`jobwire.job_ids`), read by the service
    and the bridge alike: the bridge kept a copy of the service's, to keep in step by
    hand. Each is refused by CreateJob, and by the bridge as a task named by its place."""
    for job_id in NOT_A_NEW_JOB_ID:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await create_job(stub, job_pb2.JOB_KIND_TRANSCODE, job_id)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    tasks = [{"task_id": job_id, "status": "failed"} for job_id in NOT_A_NEW_JOB_ID]
    status, answer = await bridge.post(PATH, notification(*tasks), headers=AUTH)
    assert status == 400
    named = [p.split(":")[0] for p in answer["error"].split("; ")]
    assert named == [f"data.{i}.task_id" for i in range(len(tasks))], answer


async def test_a_whole_number_written_as_a_float_is_the_integer_the_document_says(
    bridge: Any, stub: Any
) -> None:
    """The document's `integer` (JSON Schema) takes 0.0 and 1e3; the bridge refused
    them ("code: Input should be a valid integer"), and an envelope `code` of 0.0 cost
    every task of the notification its outcome. Past 2**53 (no longer exact) both the
    document and the bridge refuse."""
    _, doc = await bridge.get("/openapi.json")
    schema = {"components": doc["components"], "$ref": "#/components/schemas/Notification"}
    validator = jsonschema.Draft202012Validator(schema)
    task = new_id("a")
    body = {
        "code": 0.0,
        "msg": "failed",
        "data": [{"task_id": task, "status": "failed", "error_code": 1003.0}],
    }
    assert validator.is_valid(body)
    assert await bridge.post(PATH, body, headers=AUTH) == (200, {"ack": True})
    assert (await get_job(stub, task)).error.code == "1003"
    past = {"code": 2**53 + 1, "msg": "x", "data": []}
    assert not validator.is_valid(past)
    status, answer = await bridge.post(PATH, past, headers=AUTH)
    assert status == 400 and answer["error"].startswith("code: "), answer
