"""The server-sent event streams: the jobs firehose (coalesced) and one job's events.

`GET /events/jobs/{id}`: every message that carries events has `id: <sequence of
its last event>`; the browser's automatic reconnect sends it back as Last-Event-ID
and the stream resumes through WatchJob's `from_sequence`: no gap, no duplicate.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import grpc
import orjson
from aiohttp import web

from jobwire.v1 import job_pb2, job_service_pb2

from . import present
from .grpc_client import GRPC, HUB, SETTINGS, STREAMS, PageError, grpc_error
from .live import MARK, Change
from .query import parse_kind, parse_state
from .views import principal

RETRY_MS = 1000
MAX_IDS = 500


def _frame(event: str, data: bytes, event_id: str = "") -> bytes:
    head = f"id: {event_id}\n" if event_id else ""
    return f"{head}event: {event}\n".encode() + b"data: " + data + b"\n\n"


STREAM_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache, no-store",
    "X-Accel-Buffering": "no",  # nginx: do not buffer the stream
}


def head_only(request: web.Request) -> web.Response | None:
    """The answer to a HEAD: the headers alone. aiohttp sends whatever a StreamResponse
    writes even then, so the stream's events (an endless body) followed the headers, and
    a kept-alive connection's next answer began inside them."""
    if request.method != "HEAD":
        return None
    return web.Response(headers=STREAM_HEADERS)


async def _open(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers=STREAM_HEADERS)
    await response.prepare(request)
    await response.write(f"retry: {RETRY_MS}\n\n".encode())
    task = asyncio.current_task()
    if task is not None:  # ended when the dashboard stops (app.py, end_streams)
        streams = request.app[STREAMS]
        streams.add(task)
        task.add_done_callback(streams.discard)
    return response


async def jobs_stream(request: web.Request) -> web.StreamResponse:
    """Latest state of changed jobs (filtered by `kind`, and to `ids` plus the first event
    of any job when given), stats every few seconds."""
    kind = parse_kind(request.query.get("kind", ""))
    ids = _ids(request.query.get("ids"))
    since = _since(request.query.get("since"))
    states = _states(request.query.get("states"))
    if (head := head_only(request)) is not None:
        return head
    settings = request.app[SETTINGS]
    hub = request.app[HUB]
    expires = principal(request).expires
    response = await _open(request)
    sub = hub.subscribe(
        kind, ids, new=request.query.get("new", "1") != "0", since=since, states=states
    )
    interval = settings.push_interval_seconds
    last_push = 0.0
    last_stats = 0.0
    last_beat = time.monotonic()
    told = True  # what the tab was last told of the service (its page starts "live")
    try:
        while time.time() < expires:  # the page's reconnect then hears 401
            if hub.connected != told:
                told = hub.connected
                await response.write(_frame("upstream", orjson.dumps({"connected": told})))
            now = time.monotonic()
            if now - last_stats >= 2.0:
                stats = {"eps": hub.events_per_second(), "depth": hub.queue_depth()}
                await response.write(_frame("stats", orjson.dumps(stats)))
                last_stats = last_beat = time.monotonic()
            if now - last_beat >= settings.heartbeat_seconds:
                await response.write(b": keep-alive\n\n")
                last_beat = now
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(sub.wake.wait(), timeout=2.0)
            if not sub.wake.is_set():
                continue
            # At most one push per interval per tab: later changes wait and coalesce.
            wait = last_push + interval - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if sub.resync:
                sub.resync = False
                await response.write(_frame("resync", b"{}"))
            # Before the changes: one may be of a job made again under a deleted id.
            if gone := sub.take_gone():
                await response.write(_frame("deleted", orjson.dumps(sorted(gone))))
            changes, fresh = sub.take()
            if changes:
                rows = (
                    _marked_new(c, hub.created(c.event.job_id))
                    if c.event.job_id in fresh
                    else c.json()
                    for c in changes
                )
                await response.write(_frame("jobs", b"[" + b",".join(rows) + b"]"))
            last_push = last_beat = time.monotonic()
    except ConnectionResetError:
        pass  # the tab went away
    finally:
        hub.unsubscribe(sub)
    return response


def _marked_new(change: Change, created: str) -> bytes:
    """The change's row with `"new": true`: the job had its first event since the last
    push (the row may carry a later one), and with when the job was created, which the
    tab shows. Spliced in: the shared JSON stays shared."""
    head = b'{"new":true,' + (b'"created":%b,' % orjson.dumps(created) if created else b"")
    return head + change.json()[1:]


def _ids(raw: str | None) -> set[str] | None:
    """`ids=a,b,c`: follow only these jobs (a page's rows); absent: every job."""
    if raw is None:
        return None
    ids = {i for i in raw.split(",") if i}
    if len(ids) > MAX_IDS:
        raise PageError(400, f"ids: at most {MAX_IDS} job ids", json=True)
    return ids


def _states(raw: str | None) -> frozenset[int]:
    """`states=FAILED,CANCELLED`: the page's state filter (jobs entering one of them
    make the tab re-read its rows)."""
    if not raw:
        return frozenset()
    names = raw.split(",")
    if len(names) > len(job_pb2.JobState.keys()):
        raise PageError(400, "states: too many states", json=True)
    return frozenset(parse_state(name, json=True, field="states") for name in names if name)


def _since(raw: str | None) -> str | None:
    """`since=`: the mark a jobs page was read at (its `data-since`); "" when the page
    had none (the tab re-reads its rows once the hub is live)."""
    if raw is None or raw == "" or MARK.fullmatch(raw):
        return raw
    message = f"since must be the mark of a jobs page (its data-since), got {raw[:40]!r}"
    raise PageError(400, message, json=True)


def _from_sequence(request: web.Request) -> int:
    raw = request.headers.get("Last-Event-ID") or request.query.get("from", "") or "0"
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 18:
        message = f"Last-Event-ID / from must be a sequence number, got {raw[:40]!r}"
        raise PageError(400, message, json=True)
    return int(raw)


async def job_stream(request: web.Request) -> web.StreamResponse:
    """One job: `snapshot` (no id), `events` batches (id = last sequence), `gap`, `end`,
    and `ping` when there was nothing else for a heartbeat."""
    job_id = request.match_info["job_id"]
    from_sequence = _from_sequence(request)
    settings = request.app[SETTINGS]
    expires = principal(request).expires
    call = request.app[GRPC]().WatchJob(
        job_service_pb2.WatchJobRequest(id=job_id, from_sequence=from_sequence)
    )
    try:
        # Read the first message before answering, so an unknown job is a plain 404.
        first = await call.read()
    except grpc.aio.AioRpcError as err:
        raise grpc_error(err, json=True) from None
    if (head := head_only(request)) is not None:
        call.cancel()
        return head
    response = await _open(request)
    interval = settings.push_interval_seconds
    batch: list[bytes] = []
    last_seq = from_sequence
    last_flush = 0.0
    last_beat = time.monotonic()

    async def flush() -> None:
        nonlocal batch, last_flush, last_beat
        if batch:
            await response.write(_frame("events", b"[" + b",".join(batch) + b"]", str(last_seq)))
            batch = []
        last_flush = last_beat = time.monotonic()

    async def handle(item: Any) -> None:
        nonlocal last_seq
        which = item.WhichOneof("item")
        if which == "snapshot":
            await flush()
            await response.write(
                _frame("snapshot", orjson.dumps(present.job_detail(item.snapshot)))
            )
        elif which == "gap":
            await flush()
            gap = item.gap
            # A gap going back (the job's history ends before the client's id: a restored
            # backup): what follows starts after the snapshot, not after that id.
            last_seq = min(last_seq, gap.oldest_available_sequence - 1)
            data = {
                "requested": gap.requested_sequence,
                "oldest": gap.oldest_available_sequence,
            }
            await response.write(_frame("gap", orjson.dumps(data)))
        elif which == "event" and item.event.sequence > last_seq:
            last_seq = item.event.sequence
            batch.append(orjson.dumps(present.timeline_entry(item.event)))

    read: asyncio.Future[Any] | None = None
    try:
        await handle(first)
        read = asyncio.ensure_future(call.read())
        while True:
            now = time.monotonic()
            due = (
                last_flush + interval - now
                if batch
                else last_beat + settings.heartbeat_seconds - now
            )
            due = min(due, expires - time.time())
            done, _ = await asyncio.wait({read}, timeout=max(due, 0))
            if time.time() >= expires:  # the session ended: the page's reconnect hears 401
                await flush()
                break
            if read in done:
                try:
                    item = read.result()
                except grpc.aio.AioRpcError:
                    await flush()
                    break  # the service went away: the browser reconnects with Last-Event-ID
                if item is grpc.aio.EOF:
                    await flush()
                    await response.write(_frame("end", b"{}"))
                    break
                await handle(item)
                read = asyncio.ensure_future(call.read())
                if batch and time.monotonic() - last_flush >= interval:
                    await flush()
            elif batch:
                await flush()
            else:
                # An event, not a comment: the page hears it, and one that hears nothing
                # for a few heartbeats knows its connection went silent.
                await response.write(_frame("ping", b"{}"))
                last_beat = time.monotonic()
    except ConnectionResetError:
        pass  # the tab went away
    finally:
        if read is not None and not read.done():
            read.cancel()
        call.cancel()
    return response
