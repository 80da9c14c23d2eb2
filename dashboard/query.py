"""The jobs page's query string -> a ListJobsRequest; bad input is a 400 naming the field."""

from __future__ import annotations

from multidict import MultiMapping

from jobwire.v1 import job_pb2, job_service_pb2

from .grpc_client import PageError

MAX_QUERY_CHARS = 4096
MAX_PAGE_SIZE = 200
LABEL_LIMIT = 16


def parse_kind(raw: str, json: bool = True) -> int:
    if not raw:
        return 0
    try:
        return int(job_pb2.JobKind.Value("JOB_KIND_" + raw.upper()))
    except ValueError:
        raise PageError(400, f"kind: unknown job kind {raw[:40]!r}", json=json) from None


def parse_state(raw: str, json: bool, field: str = "state") -> int:
    """A state's name; a bad one is named by the parameter it came in (`state` of a
    page, `states` of the jobs stream)."""
    try:
        return int(job_pb2.JobState.Value("JOB_STATE_" + raw.upper()))
    except ValueError:
        raise PageError(400, f"{field}: unknown job state {raw[:40]!r}", json=json) from None


def newest_first(raw: str, json: bool) -> bool:
    """`order=newest` (the default: what an operator looks for first) or `oldest`."""
    if raw not in ("", "newest", "oldest"):
        raise PageError(400, f"order must be newest or oldest, got {raw[:40]!r}", json=json)
    return raw != "oldest"


def list_request(
    query: MultiMapping[str], query_string: str, default_size: int, json: bool = False
) -> job_service_pb2.ListJobsRequest:
    if len(query_string) > MAX_QUERY_CHARS:
        raise PageError(400, f"the query string is longer than {MAX_QUERY_CHARS} characters", json)
    request = job_service_pb2.ListJobsRequest(
        kind=job_pb2.JobKind.ValueType(parse_kind(query.get("kind", ""), json)),
        states=[
            job_pb2.JobState.ValueType(parse_state(s, json)) for s in query.getall("state", []) if s
        ],
        page_token=query.get("page_token", ""),
        page_size=default_size,
        newest_first=newest_first(query.get("order", ""), json),
    )
    size = query.get("page_size", "")
    if size:
        if not (size.isascii() and size.isdigit()) or not 1 <= int(size) <= MAX_PAGE_SIZE:
            raise PageError(400, f"page_size must be 1..{MAX_PAGE_SIZE}, got {size[:20]!r}", json)
        request.page_size = int(size)
    labels = [item for item in query.getall("label", []) if item]
    if len(labels) > LABEL_LIMIT:
        raise PageError(400, f"label: at most {LABEL_LIMIT} label filters", json)
    for item in labels:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise PageError(400, f"label must be KEY=VALUE, got {item[:60]!r}", json)
        if request.labels.get(key, value) != value:
            # A job has one value per key: the last one silently won, while the form
            # showed both fields as if every one applied.
            raise PageError(
                400,
                f"label {key[:60]!r} given twice ({request.labels[key][:60]!r} and"
                f" {value[:60]!r}): a job has one value per label",
                json,
            )
        request.labels[key] = value
    return request
