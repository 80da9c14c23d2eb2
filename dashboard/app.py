"""The dashboard's aiohttp application: middlewares, routes, templates, static assets."""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

import aiohttp_jinja2
import jinja2
from aiohttp import web
from markupsafe import Markup

from http_bridge import connection_guard

from . import present, sse, views
from .auth import Auth, TooManyWrongTokens
from .config import DashboardConfig, host_allowed
from .grpc_client import AUTH, SETTINGS, STREAMS, PageError, channel_ctx

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
HERE = Path(__file__).parent
PUBLIC = ("/login", "/static/", "/healthz", "/readyz")

# Only the dashboard's own script and stylesheet; no inline script, no eval, no frames.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    # Pages about jobs are for the logged-in operator only: no browser or proxy keeps
    # them (Back after logging out showed them again). Assets and downloads set their own.
    "Cache-Control": "no-store",
}


class Static:
    """The two assets, read once; URLs carry a content hash, so they cache for a year."""

    def __init__(self, folder: Path) -> None:
        self.files: dict[str, tuple[bytes, str, str]] = {}
        types = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
        for path in sorted(folder.iterdir()):
            if path.suffix in types:
                body = path.read_bytes()
                digest = hashlib.sha256(body).hexdigest()[:12]
                self.files[path.name] = (body, types[path.suffix], digest)

    def url(self, name: str) -> str:
        return f"/static/{name}?v={self.files[name][2]}"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        entry = self.files.get(request.match_info["name"])
        if entry is None:
            raise PageError(404, "no such asset")
        body, content_type, digest = entry
        etag = f'"{digest}"'
        cache = (
            "public, max-age=31536000, immutable"
            if request.query.get("v") == digest
            else ("public, max-age=300")
        )
        headers = {"Cache-Control": cache, "ETag": etag}
        if request.headers.get("If-None-Match") == etag:
            return web.Response(status=304, headers=headers)
        return web.Response(body=body, content_type=content_type, headers=headers)


@web.middleware
async def security_headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        for name, value in SECURITY_HEADERS.items():
            exc.headers.setdefault(name, value)
        raise
    if not response.prepared:
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
    return response


def _wants_json(request: web.Request) -> bool:
    return request.path.startswith(("/api/", "/events/"))


# The router's own answers, in the dashboard's words (the connection handler it shares
# with the bridge would answer them with the callbacks' JSON error body).
ROUTER_ERRORS = {404: "no such page", 405: "this page does not take {method} requests"}


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except PageError as err:
        return _error_page(request, err.status, err.message, err.json, err.back)
    except TooManyWrongTokens as exc:  # a Bearer token from an address past its limit
        message = f"too many wrong tokens from your address: retry in {exc.retry_after} s"
        response = _error_page(request, 429, message, False)
        response.headers["Retry-After"] = str(exc.retry_after)
        return response
    except web.HTTPException as exc:
        if exc.status not in ROUTER_ERRORS:
            raise  # redirects
        message = ROUTER_ERRORS[exc.status].format(method=request.method)
        response = _error_page(request, exc.status, message, False)
        if "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response


def _error_page(
    request: web.Request, status: int, message: str, json: bool, back: str = ""
) -> web.Response:
    if json or _wants_json(request):
        return web.json_response({"error": message}, status=status)
    # The service away (502-504): the same page may work in a moment.
    retry = request.method == "GET" and status in (502, 503, 504)
    context = {"status": status, "message": message, "back": back, "retry": retry}
    return aiohttp_jinja2.render_template("error.html", request, context, status=status)


# Probes reach a pod by its address, whatever the allowed names.
PROBES = ("/healthz", "/readyz")


@web.middleware
async def allowed_host(request: web.Request, handler: Handler) -> web.StreamResponse:
    """JOBWIRE_DASHBOARD_ALLOWED_HOSTS: 421 for any other Host, before authentication."""
    allowed = request.app[SETTINGS].allowed_hosts
    if allowed and request.path not in PROBES:
        host = request.headers.get("Host", "")
        if not host_allowed(allowed, host):
            shown = ascii(host) if host else "none"
            message = f"this dashboard does not answer to the host {shown}"
            return _error_page(request, 421, message, False)
    return await handler(request)


@web.middleware
async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path.startswith(PUBLIC) or request.path == "/login":
        return await handler(request)
    who = request.app[AUTH].principal(request)
    if who is None:
        if _wants_json(request):
            return web.json_response(
                {"error": "log in first (session cookie or Bearer token)"}, status=401
            )
        context = {"next": request.path_qs if request.method == "GET" else "/jobs", "error": ""}
        return aiohttp_jinja2.render_template("login.html", request, context, status=401)
    return await handler(request)


def _finalize(value: object) -> object:
    """Every value a template prints: text shows its controls (present.visible), so no
    field of a worker's can be forgotten. Markup is the templates' own."""
    if isinstance(value, str) and not isinstance(value, Markup):
        return present.visible(value)
    return value


async def end_streams(app: web.Application) -> None:
    """Open event streams end when the dashboard stops (their pages reconnect to the
    next one): each held the stop for aiohttp's shutdown timeout, twice over."""
    streams = app[STREAMS]
    for task in list(streams):
        task.cancel()


def create_app(config: DashboardConfig) -> web.Application:
    app = web.Application(
        middlewares=[security_headers, errors, allowed_host, authenticate],
        client_max_size=64 * 1024,
    )
    app[SETTINGS] = config
    app[AUTH] = Auth(config)
    connection_guard.install(app)  # where requests begin, for the head watchdog
    static = Static(HERE / "static")
    env = aiohttp_jinja2.setup(
        app,
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        finalize=_finalize,
    )
    env.globals["static"] = static.url
    # The page's clock (base.html's data-now): durations count by it, not the browser's.
    env.globals["server_now"] = lambda: present.iso_datetime(datetime.now(UTC))
    env.filters["urlpart"] = lambda s: quote(str(s), safe="")
    app.cleanup_ctx.append(channel_ctx)
    app[STREAMS] = set()
    app.on_shutdown.append(end_streams)
    app.router.add_routes(views.routes)
    app.router.add_get("/static/{name}", static.handle)
    app.router.add_get("/events/jobs", sse.jobs_stream)
    app.router.add_get("/events/jobs/{job_id}", sse.job_stream)
    return app
