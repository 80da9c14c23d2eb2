"""AuroraCloud transcoding callback (specs/aurora-transcode-callback.en.txt).

`POST /api/transcode-callback[/{token}]` carries a batch of task outcomes. Each task is
applied by `task_id` with idempotency key `aurora:{task_id}:{status}` (AuroraCloud
retries up to 3 times); an unknown task id becomes a new transcode job. The answer is
200 `{"ack": true}` once every task is durable; a task that meets a job already
finished with another outcome is acknowledged and logged (retrying cannot change it);
only an unavailable service/storage answers 5xx, so AuroraCloud retries.

Auth: `TRANSCODE_CALLBACK_TOKEN` (path segment, `Authorization: Bearer` or
`X-Callback-Token`) and/or `TRANSCODE_ALLOWED_IPS`; each one configured must pass, and
with neither configured every request is refused.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from typing import Annotated, Any, Literal

import grpc
import pydantic
from aiohttp import web
from pydantic_core import PydanticCustomError

from jobwire.job_ids import NOT_A_NEW_JOB_ID
from jobwire.v1 import job_pb2
from jobwire.v1 import job_service_pb2 as svc

from .common import (
    STRICT,
    client_key,
    clip,
    describe,
    header_token,
    parse_json,
    read_body,
    report_event,
    seconds_duration,
    secret_matches,
    service_key,
    validate,
)
from .edge import check_signature, webhook_id
from .errors import BridgeError, RpcFailed, contract_errors, json_response
from .grpc_client import config_of

log = logging.getLogger(__name__)
routes = web.RouteTableDef()


def _an_id_the_service_takes(value: str) -> str:
    # Refused here, the task is named by its place in `data`, not by its place in the
    # service batch; UNKNOWN was the service's 400, naming no task, while the document
    # said the task was valid.
    if value in NOT_A_NEW_JOB_ID:
        *most, last = map(repr, NOT_A_NEW_JOB_ID)
        raise ValueError(f"must not be {', '.join(most)} or {last}")
    return value


TaskId = Annotated[
    str,
    pydantic.StringConstraints(pattern=r"^[A-Za-z0-9._:\-]{1,128}$"),
    pydantic.AfterValidator(_an_id_the_service_takes),
    pydantic.Field(json_schema_extra={"not": {"enum": list(NOT_A_NEW_JOB_ID)}}),
]
TEXT_MAX = 4096
Text = Annotated[str, pydantic.StringConstraints(max_length=TEXT_MAX)]
EXACT = 2**53  # the integers a JSON number (a double) holds exactly


def _whole_number(value: object) -> object:
    """JSON Schema's `integer` (the document's) takes 0.0 and 1e3, and orjson parses
    those as floats: a sender writing `"code": 0.0` had its whole notification refused
    (400, every outcome in it lost), though the document called it valid."""
    if isinstance(value, float) and value.is_integer() and abs(value) <= EXACT:
        return int(value)
    return value


# Past 2**53 a number is no longer exact (orjson gives a float past 64 bits).
Integer = Annotated[
    int, pydantic.Field(ge=-EXACT, le=EXACT), pydantic.BeforeValidator(_whole_number)
]
Seconds = Annotated[float, pydantic.Field(ge=0, le=10**9, allow_inf_nan=False)]


def _integer_or_text(value: object, handler: pydantic.ValidatorFunctionWrapHandler) -> object:
    """One problem for a code that is neither: pydantic named each branch of the union
    by its internals (`error_code.function-before[_whole_number(), constrained-int]: ...;
    error_code.constrained-str: ...`)."""
    try:
        return handler(value)
    except pydantic.ValidationError:
        raise PydanticCustomError(
            "integer_or_text",
            f"must be an integer (within ±2^53) or a string of at most {TEXT_MAX} characters",
        ) from None


IntegerOrText = Annotated[Integer | Text, pydantic.WrapValidator(_integer_or_text)]


class Task(pydantic.BaseModel):
    model_config = STRICT

    task_id: TaskId
    status: Literal["succeeded", "failed"]
    input: Text | None = None
    output: Text | None = None
    format: Annotated[str, pydantic.StringConstraints(max_length=32)] | None = None
    duration: Seconds | None = None
    spend_time: Seconds | None = None
    error_code: IntegerOrText | None = None
    # No limit in the contract (the body's bounds it): clipped to the service's (`clip`),
    # as AWS Batch's error. Past 4,096 characters it made a bad task, and the failure
    # was never recorded (AuroraCloud's retries are the same notification).
    error_msg: str | None = None


class Notification(pydantic.BaseModel):
    """The envelope; its tasks are checked one by one (`tasks`), so that one bad task
    does not cost the others their outcome. The schema (openapi.py) shows `Task`."""

    model_config = STRICT

    code: Integer
    msg: Text
    callback_url: Text | None = None
    # Any item: one that is not an object (`null`, a string) is a bad task like any
    # other, not a bad notification (it made the whole batch a 400, every outcome lost).
    data: Annotated[
        list[Any],
        pydantic.Field(
            max_length=1000, json_schema_extra={"items": {"$ref": "#/components/schemas/Task"}}
        ),
    ]


def tasks(notification: Notification) -> tuple[list[Task], list[str]]:
    """The valid tasks, and what is wrong with the others (`data.N.field: ...`)."""
    valid, problems = [], []
    for index, raw in enumerate(notification.data):
        if not isinstance(raw, dict):
            problems.append(f"data.{index}: a task must be an object")
            continue
        try:
            valid.append(Task.model_validate(raw))
        except pydantic.ValidationError as exc:
            problems.append(describe(exc, within=f"data.{index}"))
    return valid, problems


class AuroraAck(pydantic.BaseModel):
    ack: bool
    error: str | None = None


def render_error(err: BridgeError) -> dict[str, Any]:
    return {"ack": False, "error": err.message if err.status < 500 else "service unavailable"}


def credential(request: web.Request) -> str:
    """The token as sent: the path segment, else a header. With no token configured
    (the allow-list alone) none counts, and the rate limit goes by address."""
    if not config_of(request).transcode_callback_token:
        return ""
    return request.match_info.get("token") or header_token(request)


def authorize(request: web.Request) -> None:
    config = config_of(request)
    if not config.transcode_callback_token and not config.transcode_allowed_ips:
        raise BridgeError(401, "endpoint not configured")
    token = config.transcode_callback_token
    if token and not secret_matches(credential(request), token):
        raise BridgeError(401, "invalid or missing callback token")
    if config.transcode_allowed_ips:
        try:
            peer = ipaddress.ip_address(request.remote or "")
        except ValueError:
            raise BridgeError(403, "source address not allowed") from None
        if not any(peer in net for net in config.transcode_allowed_ips):
            raise BridgeError(403, "source address not allowed")


def to_event(task: Task, idempotency_prefix: str) -> svc.ReportEventRequest:
    event = svc.ReportEventRequest(
        job_id=task.task_id,
        idempotency_key=service_key(f"{idempotency_prefix}{task.task_id}:{task.status}"),
        create_kind=job_pb2.JOB_KIND_TRANSCODE,
        kind=job_pb2.JOB_KIND_TRANSCODE,  # the token reaches only transcode jobs
    )
    if task.status == "succeeded":
        result = event.completed
        result.output_uri = task.output or ""
        result.input_uri = task.input or ""
        result.format = task.format or ""
        if task.duration is not None:
            result.media_duration.CopyFrom(seconds_duration(task.duration))
        if task.spend_time is not None:
            result.processing_time.CopyFrom(seconds_duration(task.spend_time))
    else:
        event.failed.code = "" if task.error_code is None else str(task.error_code)
        event.failed.message = clip(task.error_msg or "transcoding failed")
    return event


async def apply_task(request: web.Request, event: svc.ReportEventRequest) -> None:
    try:
        await report_event(request, event)
    except RpcFailed as exc:
        # FAILED_PRECONDITION: already finished with another outcome. NOT_FOUND (the
        # task would be created otherwise): its id names a job of another kind. A
        # retry cannot change either, so ack.
        if exc.code not in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND):
            raise
        log.warning("aurora task %s: %s (acknowledged)", event.job_id, exc.message)


@routes.post("/api/transcode-callback")
@routes.post("/api/transcode-callback/{token}")
@contract_errors(render_error, credential=credential)
async def transcode_callback(request: web.Request) -> web.StreamResponse:
    authorize(request)
    body = await read_body(request, config_of(request).max_body_bytes)
    check_signature(request, "aurora", body.data)
    notification = validate(Notification, parse_json(body.data))
    given = client_key(request)
    prefix = f"aurora:hdr:{given}:" if given else "aurora:"
    if signed := webhook_id(request):
        prefix = f"aurora:whk:{signed}:"
    valid, problems = tasks(notification)
    events = [to_event(task, prefix) for task in valid]
    outcomes = await asyncio.gather(
        *(apply_task(request, e) for e in events), return_exceptions=True
    )
    failures = [o for o in outcomes if isinstance(o, BaseException)]
    if failures:
        # The most retry-worthy failure decides: a 5xx lets AuroraCloud retry the
        # whole batch, and the tasks already stored are acknowledged as duplicates.
        worst = max(failures, key=lambda f: getattr(f, "status", 500))
        raise worst
    if problems:
        # The valid tasks are stored: one bad task made the whole batch a 400, and
        # AuroraCloud's three retries of it lost every outcome in it.
        raise BridgeError(400, "; ".join(problems[:5]))
    return json_response({"ack": True})
