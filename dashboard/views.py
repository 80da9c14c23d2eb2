"""Pages and form actions: login, the jobs page, the job page, Cancel, downloads."""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

import aiohttp_jinja2
import grpc
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jobwire.client.channel import refuses_our_token
from jobwire.v1 import job_pb2, job_service_pb2, log_pb2

from . import present
from .auth import COOKIE, Principal, TooManyWrongTokens
from .grpc_client import AUTH, CHANNEL, GRPC, HUB, SETTINGS, PageError, grpc_error
from .live import DEPTH_CAP
from .query import list_request

routes = web.RouteTableDef()
LOG_LIMIT = 200
# Served inline only when they cannot run script in our origin; anything else downloads.
SAFE_INLINE = frozenset({"text/plain", "application/json", "image/png", "image/jpeg"})


def principal(request: web.Request) -> Principal:
    """The caller the auth middleware let in (checked again: a cheap HMAC)."""
    who = request.app[AUTH].principal(request)
    if who is None:
        raise PageError(401, "log in first")
    return who


async def _form(request: web.Request) -> Any:
    """The posted form (at most 64 KiB). One that cannot be parsed (multipart framing,
    bytes that are not UTF-8) is a 400, not a 500; one that has not fully arrived
    within the head timeout is a 408 (a body that never ends held the connection)."""
    try:
        async with asyncio.timeout(request.app[SETTINGS].header_timeout_seconds):
            return await request.post()
    except TimeoutError:
        raise PageError(408, "form not received in time") from None
    except (HttpProcessingError, UnicodeDecodeError, ValueError):
        raise PageError(400, "malformed form: send it from the dashboard's page") from None


def _timeout(request: web.Request) -> float:
    return request.app[SETTINGS].rpc_timeout_seconds


# -- login ---------------------------------------------------------------------


def _safe_next(raw: str) -> str:
    """Only a path on this site: never `//host` or a scheme (open redirect). Printable
    ASCII without spaces only: URL parsers (browsers, yarl) drop tabs and newlines, so
    "/<TAB>/host" would become "//host" after the check."""
    plain = all("!" <= c <= "~" for c in raw)
    if plain and raw.startswith("/") and not raw.startswith("//") and "\\" not in raw:
        return raw
    return "/jobs"


@routes.get("/login")
@aiohttp_jinja2.template("login.html")
async def login_form(request: web.Request) -> dict[str, Any]:
    return {"next": _safe_next(request.query.get("next", "")), "error": ""}


@routes.post("/login")
async def login(request: web.Request) -> web.StreamResponse:
    auth = request.app[AUTH]
    form = await _form(request)
    token = str(form.get("token", ""))
    target = _safe_next(str(form.get("next", "")))
    status, headers = 401, {}
    if not auth.has_token:
        error = "The dashboard is closed: set JOBWIRE_DASHBOARD_TOKEN to open it."
    else:
        try:
            right = auth.try_token(request, token)
        except TooManyWrongTokens as exc:
            error = f"Too many wrong tokens from your address: try again in {exc.retry_after} s."
            status, headers = 429, {"Retry-After": str(exc.retry_after)}
        else:
            if right:
                response = web.HTTPSeeOther(target)
                auth.set_cookie(request, response, auth.new_session())
                raise response
            error = "Wrong token."
    context = {"next": target, "error": error}
    page = aiohttp_jinja2.render_template("login.html", request, context, status=status)
    page.headers.update(headers)
    return page


@routes.post("/logout")
async def logout(request: web.Request) -> web.StreamResponse:
    await _check_csrf(request)
    response = web.HTTPSeeOther("/login")
    response.del_cookie(COOKIE, path="/")
    raise response


async def _check_csrf(request: web.Request) -> Any:
    """The posted form, once its CSRF token (or header) checks out."""
    form = await _form(request)
    submitted = str(form.get("csrf", "")) or request.headers.get("X-CSRF-Token", "")
    if not request.app[AUTH].csrf_ok(principal(request), submitted):
        raise PageError(403, "missing or wrong CSRF token: reload the page and try again")
    return form


# -- jobs page -----------------------------------------------------------------


@routes.get("/")
async def index(request: web.Request) -> web.StreamResponse:
    raise web.HTTPSeeOther("/jobs")


def _list_request(request: web.Request, json: bool) -> job_service_pb2.ListJobsRequest:
    """The page's query as a ListJobsRequest; bad input is a 400 naming the field."""
    size = request.app[SETTINGS].page_size
    return list_request(request.query, request.query_string, size, json)


async def _list(
    request: web.Request, list_req: job_service_pb2.ListJobsRequest, json: bool
) -> job_service_pb2.ListJobsResponse:
    try:
        reply: job_service_pb2.ListJobsResponse = await request.app[GRPC]().ListJobs(
            list_req, timeout=_timeout(request)
        )
    except grpc.aio.AioRpcError as err:
        if err.code() == grpc.StatusCode.INVALID_ARGUMENT and "newest_first" in (
            err.details() or ""
        ):
            # The service names its field (newest_first); here the parameter is `order`.
            other = "oldest" if list_req.newest_first else "newest"
            message = (
                f"page_token is from a listing with order={other}: pass order={other},"
                " as in the request that returned it"
            )
            raise PageError(400, message, json=json) from None
        raise grpc_error(err, json) from None
    return reply


@routes.get("/jobs")
async def jobs_page(request: web.Request) -> web.StreamResponse:
    search = request.query.get("id", "").strip()
    if search:
        await _get_job(request, search, json=False)  # 404 page when unknown
        raise web.HTTPSeeOther(f"/jobs/{quote(search, safe='')}")
    list_req = _list_request(request, json=False)  # a bad query is a 400 before any wait
    # Before the rows are read: the page's stream replays what changes after this.
    since = await request.app[HUB].mark()
    reply, depth, deleted = await asyncio.gather(
        _list(request, list_req, False),
        request.app[HUB].fresh_queue_depth(wait=0.3),
        _deleted(request, request.query.get("deleted", "")),
    )
    filters = {
        "kind": request.query.get("kind", "").upper(),
        "states": [s.upper() for s in request.query.getall("state", []) if s],
        "labels": [item for item in request.query.getall("label", []) if item],
        "order": "newest" if list_req.newest_first else "oldest",
    }
    next_url = ""
    pairs = [(k, v) for k, v in request.query.items() if k not in ("page_token", "deleted")]
    if reply.next_page_token:
        next_url = "/jobs?" + urlencode([*pairs, ("page_token", reply.next_page_token)])
    context = {
        "jobs": [present.job_row(j) for j in reply.jobs],
        "terminal": present.TERMINAL,
        "filters": filters,
        "kinds": present.KINDS,
        "states": present.STATES,
        "depth": depth,
        "depth_cap": DEPTH_CAP,
        "eps": request.app[HUB].events_per_second(),
        "next_url": next_url,
        "first_url": "/jobs?" + urlencode(pairs) if request.query.get("page_token") else "",
        "query": request.rel_url.raw_query_string,  # as sent: decoding it changes a filter
        "csrf": principal(request).csrf,
        "heartbeat": request.app[SETTINGS].heartbeat_seconds,
        "since": since,
        "page_size": request.query.get("page_size", ""),  # checked by _list_request
        "deleted": deleted,
    }
    return aiohttp_jinja2.render_template("jobs.html", request, context)


async def _deleted(request: web.Request, job_id: str) -> str:
    """`job_id` when Delete job led here (`?deleted=`) and the job is gone: the list
    came back without a word. A link naming a job that is there says nothing."""
    if not job_id:
        return ""
    try:
        await request.app[GRPC]().GetJob(
            job_service_pb2.GetJobRequest(id=job_id), timeout=_timeout(request)
        )
    except grpc.aio.AioRpcError as err:
        return job_id if err.code() == grpc.StatusCode.NOT_FOUND else ""
    return ""


@routes.get("/api/jobs")
async def jobs_json(request: web.Request) -> web.StreamResponse:
    """The rows of a jobs page as JSON (the page re-reads them after a reconnect)."""
    reply = await _list(request, _list_request(request, json=True), True)
    body = {
        "jobs": [present.job_row(j) for j in reply.jobs],
        "next_page_token": reply.next_page_token,
    }
    return web.json_response(body)


# -- job page ------------------------------------------------------------------


async def _get_job(request: web.Request, job_id: str, json: bool) -> job_pb2.Job:
    try:
        job: job_pb2.Job = await request.app[GRPC]().GetJob(
            job_service_pb2.GetJobRequest(id=job_id), timeout=_timeout(request)
        )
    except grpc.aio.AioRpcError as err:
        raise grpc_error(err, json) from None
    return job


def _level(raw: str, json: bool) -> int:
    if not raw:
        return 0
    try:
        return int(log_pb2.LogLevel.Value("LOG_LEVEL_" + raw.upper()))
    except ValueError:
        raise PageError(400, f"level: unknown log level {raw[:40]!r}", json) from None


async def _job_parts(request: web.Request, json: bool) -> dict[str, Any]:
    job_id = request.match_info["job_id"]
    level = _level(request.query.get("level", ""), json)
    job = await _get_job(request, job_id, json)
    stub = request.app[GRPC]()
    timeout = _timeout(request)
    try:
        events, logs, artifacts = await asyncio.gather(
            stub.ListJobEvents(
                job_service_pb2.ListJobEventsRequest(job_id=job_id), timeout=timeout
            ),
            stub.ListLogs(
                job_service_pb2.ListLogsRequest(
                    job_id=job_id,
                    level=log_pb2.LogLevel.ValueType(level),
                    limit=LOG_LIMIT + 1,  # one more than shown: are there older lines?
                ),
                timeout=timeout,
            ),
            stub.ListArtifacts(
                job_service_pb2.ListArtifactsRequest(job_id=job_id), timeout=timeout
            ),
        )
    except grpc.aio.AioRpcError as err:
        raise grpc_error(err, json) from None
    timeline = [present.timeline_entry(e) for e in events.events]
    gap = None
    if events.HasField("gap"):
        gap = {
            "requested": events.gap.requested_sequence,
            "oldest": events.gap.oldest_available_sequence,
        }
    elif timeline and timeline[0]["sequence"] > 1:
        # Only the newest events are retained; say so rather than imply a full history.
        gap = {"requested": 0, "oldest": timeline[0]["sequence"]}
    return {
        "job": present.job_detail(job),
        "timeline": timeline,
        "gap": gap,
        "last_sequence": timeline[-1]["sequence"] if timeline else 0,
        "logs": [present.log_entry(e) for e in logs.entries[:LOG_LIMIT]],
        # Older lines than those shown exist (the page said nothing of them).
        "logs_cut": len(logs.entries) > LOG_LIMIT,
        "artifacts": [present.artifact(a) for a in artifacts.artifacts],
    }


@routes.get("/jobs/{job_id}")
async def job_page(request: web.Request) -> web.StreamResponse:
    # Before the job is read: once it has ended, the page follows its deletion on the
    # jobs stream, which replays from here one made before that stream opened.
    since = await request.app[HUB].mark()
    parts = await _job_parts(request, False)
    job = parts["job"]
    settings = request.app[SETTINGS]
    context = {
        **parts,
        "callback_url": _callback_url(settings.public_url, job),
        "level": request.query.get("level", "").upper(),
        "levels": present.LEVELS,
        "log_limit": LOG_LIMIT,
        "terminal": job["state"] in present.TERMINAL,
        "csrf": principal(request).csrf,
        "heartbeat": settings.heartbeat_seconds,
        "since": since,
        "pretty": present.pretty,
        "quote": lambda s: quote(s, safe=""),
    }
    return aiohttp_jinja2.render_template("job.html", request, context)


@routes.get("/api/jobs/{job_id}")
async def job_json(request: web.Request) -> web.StreamResponse:
    return web.json_response(await _job_parts(request, True))


_CALLBACK_PATHS = {
    "BATCH": "/api/batch-callback",
    "VIDEO": "/api/report",
    "TRANSCODE": "/api/transcode-callback",
    "EXTRACTION": "/api/external/jobs/{id}",
}


def _callback_url(public_url: str, job: dict[str, Any]) -> str:
    path = _CALLBACK_PATHS.get(job["kind"])
    if not public_url or path is None:
        return ""
    return public_url + path.format(id=quote(job["id"], safe=""))


@routes.post("/jobs/{job_id}/cancel")
async def cancel(request: web.Request) -> web.StreamResponse:
    form = await _check_csrf(request)
    job_id = request.match_info["job_id"]
    reason = str(form.get("reason", "")) or "cancelled from the dashboard"
    page = f"/jobs/{quote(job_id, safe='')}"
    try:
        await request.app[GRPC]().CancelJob(
            job_service_pb2.CancelJobRequest(id=job_id, reason=reason), timeout=_timeout(request)
        )
    except grpc.aio.AioRpcError as err:
        if err.code() != grpc.StatusCode.FAILED_PRECONDITION:
            # Back to the job (the service away: it may work in a moment).
            raise grpc_error(err, back=page) from None
        # The job ended after its page was loaded: say how, and lead back to it.
        state = await _state_of(request, job_id)
        message = f"job {job_id!r} has already ended ({state}): there is nothing to cancel"
        raise PageError(409, message, back=page) from None
    raise web.HTTPSeeOther(page)


@routes.post("/jobs/{job_id}/delete")
async def delete(request: web.Request) -> web.StreamResponse:
    """DeleteJob: an ended job with its events, logs and artifacts (README "Retention");
    back to the list, where the job no longer is and a notice says it was deleted."""
    form = await _check_csrf(request)
    job_id = request.match_info["job_id"]
    # Back to the list the job was opened from (`back`, its query only: the path is
    # ours), which says the job was deleted.
    back = str(form.get("back", ""))
    query = urlsplit(back).query if back.startswith("/jobs?") else ""
    pairs = [(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k != "deleted"]
    done = "/jobs?" + urlencode([*pairs, ("deleted", job_id)])
    try:
        await request.app[GRPC]().DeleteJob(
            job_service_pb2.DeleteJobRequest(id=job_id), timeout=_timeout(request)
        )
    except grpc.aio.AioRpcError as err:
        page = f"/jobs/{quote(job_id, safe='')}"
        if err.code() != grpc.StatusCode.NOT_FOUND:  # NOT_FOUND: deleted meanwhile
            if err.code() != grpc.StatusCode.FAILED_PRECONDITION:
                raise grpc_error(err, back=page) from None  # back to the job, as a 409
            state = await _state_of(request, job_id)
            message = f"job {job_id!r} has not ended ({state}): only an ended job can be deleted"
            raise PageError(409, message, back=page) from None
    # The tabs open on it hear it now (its row goes, its page says so).
    request.app[HUB].deleted({job_id})
    raise web.HTTPSeeOther(done)


async def _state_of(request: web.Request, job_id: str) -> str:
    """The job's state as a 409 page names it (the job changed since its page loaded)."""
    return present.state_name((await _get_job(request, job_id, False)).state)


@routes.get("/jobs/{job_id}/artifacts/{name}")
async def download(request: web.Request) -> web.StreamResponse:
    """Streams an artifact chunk by chunk; never held whole in memory."""
    request_msg = job_service_pb2.ReadArtifactRequest(
        job_id=request.match_info["job_id"], name=request.match_info["name"]
    )
    call = request.app[GRPC]().ReadArtifact(request_msg)
    try:
        first = await call.read()
    except grpc.aio.AioRpcError as err:
        raise grpc_error(err) from None
    if not isinstance(first, job_service_pb2.ReadArtifactResponse):
        raise PageError(404, "the artifact stream ended before its header")
    meta = first.artifact
    content_type = (
        meta.content_type if meta.content_type in SAFE_INLINE else "application/octet-stream"
    )
    response = web.StreamResponse(
        headers={
            "Content-Type": content_type,
            "Content-Disposition": f"attachment; filename*=UTF-8''{quote(meta.name, safe='')}",
            "Content-Security-Policy": "sandbox; default-src 'none'",
            "X-Content-Type-Options": "nosniff",
            "Cache-Control": "private, no-store",
        }
    )
    response.content_length = meta.size_bytes
    await response.prepare(request)
    if request.method == "HEAD":  # aiohttp would send the bytes written even then
        call.cancel()
        return response
    try:
        async for part in call:
            await response.write(part.data)
    except grpc.aio.AioRpcError:
        # Headers are gone; cutting the body short makes the client see a failed download.
        if request.transport is not None:
            request.transport.close()
        return response
    await response.write_eof()
    return response


# -- health ----------------------------------------------------------------------


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.StreamResponse:
    return web.Response(text="ok\n")


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.StreamResponse:
    stub = health_pb2_grpc.HealthStub(request.app[CHANNEL])
    try:
        reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
    except grpc.aio.AioRpcError as err:
        return web.Response(status=503, text=f"service: {err.code().name}\n")
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        return web.Response(status=503, text="service: not serving\n")
    # With the wrong token every page was a 502 while /readyz said ok.
    if await refuses_our_token(request.app[CHANNEL], 2):
        return web.Response(status=503, text="service: refused JOBWIRE_GRPC_TOKEN\n")
    return web.Response(text="ok\n")
