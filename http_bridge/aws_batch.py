"""AWS Batch callback (specs/aws-batch-callback.de.md): `POST /api/batch-callback`.

The container reports the outcome of a job the internal service registered first
(CreateJob with the Batch job id). Auth is the shared `callbackSecret` in the body.
Error body: `{"error": "<text>"}`; the text names the offending field.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import pydantic
from aiohttp import web

from jobwire.v1 import job_pb2
from jobwire.v1 import job_service_pb2 as svc

from .common import (
    STRICT,
    clip,
    idempotency_key,
    parse_json,
    read_body,
    report_event,
    secret_matches,
    validate,
)
from .edge import by_address, check_signature
from .errors import BridgeError, contract_errors, json_response
from .grpc_client import config_of

routes = web.RouteTableDef()
CONTRACT = "aws-batch"
JobId = Annotated[str, pydantic.StringConstraints(pattern=r"^[A-Za-z0-9._:\-]{1,128}$")]


def _output_key_rule(schema: dict[str, Any]) -> None:
    # What _output_key_on_success requires, stated in the document: a success without
    # a non-empty outputKey was schema-valid there, and answered 400.
    schema["if"] = {"required": ["status"], "properties": {"status": {"const": "success"}}}
    schema["then"] = {
        "required": ["outputKey"],
        "properties": {"outputKey": {"type": "string", "minLength": 1}},
    }


class BatchCallback(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(**STRICT, json_schema_extra=_output_key_rule)

    jobId: JobId
    status: Literal["success", "failed"]
    outputKey: Annotated[str, pydantic.StringConstraints(max_length=1024)] | None = None
    error: str | None = None  # no limit in the contract: clipped to the service's (clip)
    callbackSecret: str

    @pydantic.model_validator(mode="after")
    def _output_key_on_success(self) -> BatchCallback:
        if self.status == "success" and not self.outputKey:
            raise ValueError("outputKey is required when status is success")
        return self


class BatchAck(pydantic.BaseModel):
    success: Literal[True]
    jobId: str
    state: str


class BatchError(pydantic.BaseModel):
    error: str


_MESSAGES = {
    400: "Fehlende oder ungültige Parameter",
    401: "Ungültiger oder fehlender Authentifizierungsschlüssel",
    404: "Projekt mit der angegebenen Job-ID nicht gefunden",
}


def render_error(err: BridgeError) -> dict[str, Any]:
    if err.status == 400:
        return {"error": f"{_MESSAGES[400]}: {err.message}"}
    if err.status >= 500:
        return {"error": "Serverfehler bei der Verarbeitung der Anfrage"}
    return {"error": _MESSAGES.get(err.status, err.message)}


def to_event(cb: BatchCallback) -> svc.ReportEventRequest:
    # kind: the shared secret reaches only AWS Batch jobs; any other job is "not found".
    event = svc.ReportEventRequest(job_id=cb.jobId, kind=job_pb2.JOB_KIND_BATCH)
    if cb.status == "success":
        event.completed.output_key = cb.outputKey or ""
    else:
        event.failed.code = "BATCH_FAILED"
        event.failed.message = clip(cb.error or "AWS Batch job failed")
    return event


@routes.post("/api/batch-callback")
@contract_errors(render_error, credential=by_address)
async def batch_callback(request: web.Request) -> web.StreamResponse:
    config = config_of(request)
    body = await read_body(request, config.max_body_bytes)
    # On the raw bytes, before any parsing (the secret is in the body: it must wait).
    check_signature(request, "aws_batch", body.data)
    data = parse_json(body.data)
    # Authenticate before validating, so an unauthenticated caller learns nothing.
    given = data.get("callbackSecret") if isinstance(data, dict) else None
    if not secret_matches(given, config.batch_callback_secret):
        raise BridgeError(401, "unauthenticated", token_sent=given is not None)
    callback = validate(BatchCallback, data)
    event = to_event(callback)
    event.idempotency_key = idempotency_key(request, CONTRACT, callback.jobId, body)
    result = await report_event(request, event)
    state = job_pb2.JobState.Name(result.state).removeprefix("JOB_STATE_").lower()
    return json_response({"success": True, "jobId": callback.jobId, "state": state})
