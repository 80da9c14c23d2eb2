"""The baseline: a bare aiohttp server (uvloop, like the bridge) that reads, parses and
validates the Secretary progress callback with the bridge's own pydantic model and
answers like the bridge - no gRPC, no storage.

Usage: python -m bench.bare HOST PORT
"""

from __future__ import annotations

import sys

import orjson
import pydantic
from aiohttp import web

from http_bridge.secretary import ProgressEvent


async def callback(request: web.Request) -> web.Response:
    job_id = request.match_info["jobId"]
    if not request.headers.get("Authorization", "").startswith("Bearer "):
        return web.json_response({"status": "error", "error": "token"}, status=401)
    try:
        ProgressEvent.model_validate(orjson.loads(await request.read()))
    except (orjson.JSONDecodeError, pydantic.ValidationError) as exc:
        return web.json_response({"status": "error", "error": str(exc)}, status=400)
    body = orjson.dumps({"status": "ok", "kind": "progress", "jobId": job_id})
    return web.Response(body=body, content_type="application/json")


async def healthz(_: web.Request) -> web.Response:
    return web.Response(text="ok")


def main() -> None:
    host, port = sys.argv[1], int(sys.argv[2])
    app = web.Application()
    app.router.add_post("/api/external/jobs/{jobId}", callback)
    app.router.add_get("/healthz", healthz)
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:
        loop = None
    web.run_app(app, host=host, port=port, access_log=None, print=None, loop=loop)


if __name__ == "__main__":
    main()
