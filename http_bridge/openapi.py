"""`GET /openapi.json`: an OpenAPI 3.1 document for every endpoint of the bridge.

Request and response bodies come from the contracts' pydantic models (their JSON
Schema is 2020-12, which OpenAPI 3.1 uses as is), so the document cannot drift
from what the handlers validate.
"""

from __future__ import annotations

from typing import Any

import pydantic
from aiohttp import web
from pydantic.json_schema import models_json_schema

from . import aurora, aws_batch, secretary, video_worker
from .common import MAX_CLIENT_KEY
from .errors import json_response
from .video_worker import MAX_LOG_LIMIT

routes = web.RouteTableDef()
REF = "#/components/schemas/{model}"

_MODELS: list[type[pydantic.BaseModel]] = [
    aws_batch.BatchCallback,
    aws_batch.BatchAck,
    aws_batch.BatchError,
    video_worker.Report,
    video_worker.LogLine,
    video_worker.PendingVideo,
    video_worker.LogItem,
    video_worker.VideoSuccess,
    video_worker.VideoError,
    aurora.Notification,
    aurora.Task,
    aurora.AuroraAck,
    secretary.ProgressEvent,
    secretary.FinalEvent,
    secretary.FailedEvent,
    secretary.SecretaryAck,
    secretary.SecretaryError,
]

_EXTRA_SCHEMAS: dict[str, Any] = {
    "SecretaryJob": {
        "type": "object",
        "required": ["jobId", "status", "logs", "result", "processId"],
        "properties": {
            "jobId": {"type": "string"},
            "status": {"enum": ["queued", "running", "completed", "failed", "cancelled"]},
            "progress": {"type": ["number", "null"]},
            "phase": {"type": ["string", "null"]},
            "logs": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["timestamp", "phase", "progress", "message"],
                    "properties": {
                        "timestamp": {"type": "string", "format": "date-time"},
                        "phase": {"type": "string"},
                        "progress": {"type": ["number", "null"]},
                        "message": {"type": ["string", "null"]},
                    },
                },
            },
            "result": {
                "oneOf": [
                    {"type": "null"},
                    {
                        "type": "object",
                        "required": ["artifacts"],
                        "properties": {
                            "message": {"type": ["string", "null"]},
                            "artifacts": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "required": ["name", "contentType", "sizeBytes", "url"],
                                    "properties": {
                                        "name": {"type": "string"},
                                        "contentType": {"type": "string"},
                                        "sizeBytes": {"type": "integer"},
                                        "sha256": {"type": "string"},
                                        "url": {"type": "string"},
                                    },
                                },
                            },
                            "metadata": {"type": ["object", "null"]},
                        },
                    },
                ]
            },
            "error": {"type": ["object", "null"]},
            "processId": {"type": ["string", "null"]},
            "updatedAt": {"type": "string"},
        },
    },
    "Health": {"type": "object", "properties": {"status": {"type": "string"}}},
}


def _ref(model: type[pydantic.BaseModel] | str) -> dict[str, str]:
    name = model if isinstance(model, str) else model.__name__
    return {"$ref": REF.format(model=name)}


def _json(
    schema: dict[str, Any], description: str, retry: bool = False, challenge: bool = False
) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": schema}},
    }
    if retry:
        response["headers"] = {
            "Retry-After": {"description": "seconds to wait", "schema": {"type": "string"}}
        }
    if challenge:
        response["headers"] = {
            "WWW-Authenticate": {
                "description": 'Bearer realm="jobwire", with error="invalid_token" when a '
                "credential (or webhook signature) was sent but refused (RFC 6750)",
                "schema": {"type": "string"},
            }
        }
    return response


# Standard Webhooks v1 (JOBWIRE_SIGNING_SECRET_<CONTRACT>): required by a contract
# only when its secret is configured, so optional in the document.
SIGNATURE_HEADERS = [
    {
        "name": name,
        "in": "header",
        "required": False,
        "description": text,
        "schema": {"type": "string"},
    }
    for name, text in (
        ("webhook-id", "message id; the idempotency key of a signed callback"),
        ("webhook-timestamp", "Unix seconds; refused beyond +-5 minutes"),
        (
            "webhook-signature",
            "space-separated v1,<base64 HMAC-SHA256 of {id}.{timestamp}.{raw body}>",
        ),
    )
]


# Every callback reads it (common.client_key); no operation documented it.
IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": "the sender's key for a request it may repeat: one applied before is"
    " acknowledged and not applied again (a verified webhook-id comes first); without"
    " it, a digest of the body (a log line: none). Printable text, else 400",
    "schema": {"type": "string", "maxLength": MAX_CLIENT_KEY},
}
WORKER = {
    "name": "X-Worker",
    "in": "header",
    "required": False,
    "description": "the claiming worker's name, kept on the job (its first 128"
    " characters; the client's address when absent). Printable text, else 400",
    "schema": {"type": "string"},
}


def _errors(body: dict[str, Any], *statuses: int) -> dict[str, Any]:
    text = {
        400: "malformed or invalid payload, header or query parameter (the error names it)",
        401: "missing or wrong credentials or webhook signature",
        403: "source address not allowed",
        404: "unknown job / video",
        409: "the job already ended with another outcome",
        408: "the request body did not arrive in time (JOBWIRE_BODY_TIMEOUT_SECONDS)",
        413: "request body too large",
        429: "too many requests (JOBWIRE_RATE_LIMIT per credential)",
        500: "unexpected error",
        503: "service or storage unavailable; retry after Retry-After",
    }
    documented = {
        str(s): _json(body, text[s], retry=s in (429, 503), challenge=s == 401)
        for s in (*statuses, 408, 429, 500, 503)
    }
    return {**documented, **_expect_failed()}


# Any route: aiohttp's router answers it before a handler runs (aiohttp_errors.py), in
# the one body every contract's error schema accepts. No operation documented it.
EXPECT_FAILED = "an Expect header other than 100-continue"
ROUTER_ERROR: dict[str, Any] = {
    "type": "object",
    "required": ["status", "error", "ack"],
    "properties": {
        "status": {"const": "error"},
        "error": {"type": "string"},
        "ack": {"const": False},
    },
}


def _expect_failed() -> dict[str, Any]:
    return {"417": _json(ROUTER_ERROR, EXPECT_FAILED)}


def _op(
    summary: str,
    tag: str,
    ok: dict[str, Any],
    errors: dict[str, Any],
    body: dict[str, Any] | None = None,
    params: list[dict[str, Any]] | None = None,
    security: list[dict[str, list[str]]] | None = None,
) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "tags": [tag], "responses": {**ok, **errors}}
    keyed: list[dict[str, Any]] = []
    if body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
        keyed = [IDEMPOTENCY_KEY]  # every operation with a body is a callback
    op["parameters"] = [*(params or []), *keyed, *SIGNATURE_HEADERS]
    if security is not None:
        op["security"] = security
    return op


def _path_param(name: str, pattern: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "schema": {"type": "string", "pattern": pattern},
    }


def _query(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema}


def build_document() -> dict[str, Any]:
    _, defs = models_json_schema([(m, "validation") for m in _MODELS], ref_template=REF)
    schemas = {**defs.get("$defs", {}), **_EXTRA_SCHEMAS}
    job_id = r"^[A-Za-z0-9._:\-]{1,128}$"
    batch_err = _ref(aws_batch.BatchError)
    video_err = _ref(video_worker.VideoError)
    aurora_err = _ref(aurora.AuroraAck)
    sec_err = _ref(secretary.SecretaryError)
    bearer: list[dict[str, list[str]]] = [{"bearer": []}]
    secretary_auth: list[dict[str, list[str]]] = [{"bearer": []}, {"callbackToken": []}]
    aurora_auth: list[dict[str, list[str]]] = [{"bearer": []}, {"callbackToken": []}, {}]
    ok = "accepted and durably stored"
    paths: dict[str, Any] = {
        "/api/batch-callback": {
            "post": _op(
                "AWS Batch job outcome",
                "aws-batch",
                {"200": _json(_ref(aws_batch.BatchAck), ok)},
                _errors(batch_err, 400, 401, 404, 409, 413),
                body=_ref(aws_batch.BatchCallback),
                security=[],
            )
        },
        "/api/pending": {
            "get": _op(
                "Claim the oldest pending video",
                "video-worker",
                {
                    "200": _json(_ref(video_worker.PendingVideo), "the claimed video"),
                    "204": {"description": "no pending video"},
                },
                _errors(video_err, 400, 401),
                params=[WORKER],
                security=bearer,
            )
        },
        "/api/report": {
            "post": _op(
                "Report video progress, error or success",
                "video-worker",
                {"200": _json(_ref(video_worker.VideoSuccess), ok)},
                _errors(video_err, 400, 401, 404, 409, 413),
                body=_ref(video_worker.Report),
                security=bearer,
            )
        },
        "/api/log": {
            "post": _op(
                "Write a worker log line",
                "video-worker",
                {"200": _json(_ref(video_worker.VideoSuccess), ok)},
                _errors(video_err, 400, 401, 404, 413),
                body=_ref(video_worker.LogLine),
                security=bearer,
            ),
            "get": _op(
                "List log lines, newest first",
                "video-worker",
                {"200": _json({"type": "array", "items": _ref(video_worker.LogItem)}, "log lines")},
                _errors(video_err, 400, 401),
                params=[
                    _query(
                        "limit",
                        {"type": "integer", "minimum": 1, "maximum": MAX_LOG_LIMIT, "default": 50},
                    ),
                    _query("level", {"enum": ["DEBUG", "INFO", "WARNING", "ERROR"]}),
                ],
                security=bearer,
            ),
        },
        "/api/transcode-callback": {
            "post": _op(
                "AuroraCloud task outcomes (token in a header and/or allowed source IP)",
                "aurora",
                {"200": _json(_ref(aurora.AuroraAck), "every task durably stored")},
                _errors(aurora_err, 400, 401, 403, 409, 413),
                body=_ref(aurora.Notification),
                security=aurora_auth,
            )
        },
        "/api/transcode-callback/{token}": {
            "post": _op(
                "AuroraCloud task outcomes (token in the path)",
                "aurora",
                {"200": _json(_ref(aurora.AuroraAck), "every task durably stored")},
                _errors(aurora_err, 400, 401, 403, 409, 413),
                body=_ref(aurora.Notification),
                params=[_path_param("token", r"^[^/]+$")],
                security=[],
            )
        },
        "/api/external/jobs/{jobId}": {
            "post": _op(
                "Secretary progress, final or failed event",
                "secretary",
                {"200": _json(_ref(secretary.SecretaryAck), ok)},
                _errors(sec_err, 400, 401, 404, 409, 413),
                body={
                    "oneOf": [
                        _ref(secretary.ProgressEvent),
                        _ref(secretary.FinalEvent),
                        _ref(secretary.FailedEvent),
                    ]
                },
                params=[_path_param("jobId", job_id)],
                security=secretary_auth,
            ),
            "get": _op(
                "Poll a Secretary job: status, logs, result, processId",
                "secretary",
                {"200": _json(_ref("SecretaryJob"), "the job")},
                _errors(sec_err, 400, 401, 404),
                params=[
                    _path_param("jobId", job_id),
                    _query("limit", {"type": "integer", "minimum": 1, "maximum": 10000}),
                ],
                security=secretary_auth,
            ),
        },
        "/api/external/jobs/{jobId}/artifacts/{name}": {
            "get": _op(
                "Download one artifact of a job",
                "secretary",
                {
                    "200": {
                        "description": "the artifact's bytes",
                        "content": {
                            "application/octet-stream": {
                                "schema": {"type": "string", "format": "binary"}
                            },
                            "*/*": {"schema": {}},
                        },
                    }
                },
                _errors(sec_err, 400, 401, 404),
                params=[
                    _path_param("jobId", job_id),
                    _path_param("name", r"^[A-Za-z0-9._\-]{1,255}$"),
                ],
                security=secretary_auth,
            )
        },
        "/healthz": {
            "get": {
                "summary": "The bridge process is up",
                "tags": ["health"],
                "responses": {"200": _json(_ref("Health"), "up"), **_expect_failed()},
            }
        },
        "/readyz": {
            "get": {
                "summary": "The JobService answers its gRPC health check as SERVING",
                "tags": ["health"],
                "responses": {
                    "200": _json(_ref("Health"), "ready"),
                    "503": _json(_ref("Health"), "service unavailable", retry=True),
                    **_expect_failed(),
                },
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This document",
                "tags": ["meta"],
                "responses": {
                    "200": _json({"type": "object"}, "OpenAPI 3.1 document"),
                    **_expect_failed(),
                },
            }
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "jobwire HTTP bridge",
            "version": "1.0.0",
            "description": "Worker callbacks (AWS Batch, video worker, AuroraCloud, Secretary) "
            "translated into JobService gRPC calls.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "callbackToken": {"type": "apiKey", "in": "header", "name": "X-Callback-Token"},
            },
        },
    }


@routes.get("/openapi.json")
async def openapi_json(request: web.Request) -> web.StreamResponse:
    return json_response(build_document())
