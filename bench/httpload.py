"""A small HTTP/1.1 keep-alive load generator (one process; run several for more).

Deliberately minimal (asyncio protocol on uvloop, prebuilt request bytes) so the
generator costs far less CPU per request than the server under test. Modes:

- `closed`: `connections` connections each send, wait for the reply, send again;
  counts replies inside the measured window (after `warmup`).
- `open`: sends are scheduled at fixed times (`rate` per second); latency is measured
  from the scheduled time, so a stalled server cannot hide queueing (no coordinated
  omission). A send waits for a free connection when all are busy.
- `claims`: `workers` pollers GET a path until it answers 204; returns the bodies.

Usage: python -m bench.httpload SPEC.json  (writes the result to spec['out'])
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import deque
from typing import Any

import orjson


class Conn(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("connection lost"))

    def data_received(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buf[:end]).lower()
        length = 0
        i = head.find(b"content-length:")
        if i >= 0:
            j = head.find(b"\r\n", i)
            length = int(head[i + 15 : j if j >= 0 else len(head)])
        total = end + 4 + length
        if len(self.buf) < total:
            return
        status = int(head[9:12])
        body = bytes(self.buf[end + 4 : total])
        del self.buf[:total]
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result((status, body))

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(raw)
        return await self.waiter


async def connect(host: str, port: int) -> Conn:
    _, conn = await asyncio.get_running_loop().create_connection(Conn, host, port)
    return conn


class Callbacks:
    """Secretary progress callbacks, each with a unique body (so a new event)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.host = spec["host"]
        self.port = spec["port"]
        self.jobs: list[tuple[str, str]] = [(j[0], j[1]) for j in spec["jobs"]]
        self.tag = spec.get("tag", "c")
        self.n = spec.get("offset", 0)
        self.stride = spec.get("stride", 1)

    def next(self) -> bytes:
        n = self.n
        self.n += self.stride
        job_id, token = self.jobs[n % len(self.jobs)]
        body = (
            b'{"phase":"extract_text","progress":%d.%02d,"message":"%s page %d",'
            b'"process":{"id":"sec-1"}}' % ((n // 7) % 100, n % 100, self.tag.encode(), n)
        )
        return b"".join(
            (
                b"POST /api/external/jobs/%s HTTP/1.1\r\nHost: %s:%d\r\n"
                % (job_id.encode(), self.host.encode(), self.port),
                b"Authorization: Bearer %s\r\nContent-Type: application/json\r\n" % token.encode(),
                b"Content-Length: %d\r\n\r\n" % len(body),
                body,
            )
        )


async def closed_loop(spec: dict[str, Any]) -> dict[str, Any]:
    gen = Callbacks(spec)
    conns = [await connect(gen.host, gen.port) for _ in range(spec["connections"])]
    await _sleep_until(spec["start_at"])
    t0 = time.monotonic()
    measure_from = t0 + spec["warmup"]
    stop_at = measure_from + spec["duration"]
    counted = errors = ok_total = 0
    statuses: dict[int, int] = {}

    async def run(conn: Conn) -> None:
        nonlocal counted, errors, ok_total
        while True:
            now = time.monotonic()
            if now >= stop_at:
                return
            status, _ = await conn.request(gen.next())
            done = time.monotonic()
            # Every 200 of the whole run (warm-up and tail too): the denominator of the
            # servers' CPU per acknowledged callback, measured over the same span.
            ok_total += status == 200
            if measure_from <= done < stop_at:
                counted += 1
                if status != 200:
                    errors += 1
                    statuses[status] = statuses.get(status, 0) + 1

    # A request still unanswered `grace` seconds after the window is abandoned (its
    # connection closed), so a stalled server cannot stretch the run.
    runs = [asyncio.ensure_future(run(c)) for c in conns]
    _, pending = await asyncio.wait(runs, timeout=stop_at + spec.get("grace", 30) - t0)
    for task in pending:
        task.cancel()
    await asyncio.gather(*runs, return_exceptions=True)
    for c in conns:
        assert c.transport is not None
        c.transport.close()
    return {
        "count": counted,
        "errors": errors,
        "statuses": statuses,
        "per_s": counted / spec["duration"],
        "ok_per_s": (counted - errors) / spec["duration"],
        "abandoned": len(pending),
        "ok_total": ok_total,
    }


async def open_loop(spec: dict[str, Any]) -> dict[str, Any]:
    gen = Callbacks(spec)
    idle: asyncio.Queue[Conn] = asyncio.Queue()
    for _ in range(spec["connections"]):
        idle.put_nowait(await connect(gen.host, gen.port))
    rate = spec["rate"]
    total = int(rate * (spec["warmup"] + spec["duration"]))
    warm = int(rate * spec["warmup"])
    latencies: list[float] = []
    ok_latencies: list[float] = []
    errors = 0
    statuses: dict[int, int] = {}
    await _sleep_until(spec["start_at"])
    t0 = time.monotonic()
    tasks: set[asyncio.Task[None]] = set()

    answered = 0

    async def one(i: int, scheduled: float, raw: bytes) -> None:
        nonlocal errors, answered
        conn = await idle.get()
        try:
            status, _ = await conn.request(raw)
        except ConnectionError:
            status = 599
            conn = await connect(gen.host, gen.port)
        idle.put_nowait(conn)
        if i >= warm:
            answered += 1
            latencies.append(time.monotonic() - scheduled)
            if status == 200:
                ok_latencies.append(latencies[-1])
            else:
                errors += 1
                statuses[status] = statuses.get(status, 0) + 1

    loop = asyncio.get_running_loop()
    for i in range(total):
        scheduled = t0 + i / rate
        delay = scheduled - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        task = loop.create_task(one(i, scheduled, gen.next()))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks, timeout=spec.get("drain_timeout", 30))
    return {
        "latencies_ms": [x * 1000 for x in latencies],
        "ok_latencies_ms": [x * 1000 for x in ok_latencies],
        "errors": errors,
        "statuses": statuses,
        "sent": total - warm,
        # Measured requests without an answer when the drain time ran out.
        "unfinished": total - warm - answered,
    }


async def claims(spec: dict[str, Any]) -> dict[str, Any]:
    host, port = spec["host"], spec["port"]
    raw = b"GET %s HTTP/1.1\r\nHost: %s:%d\r\nAuthorization: Bearer %s\r\nX-Worker: %s\r\n\r\n"
    ids: list[str] = []
    errors = 0
    await _sleep_until(spec["start_at"])
    deadline = time.monotonic() + spec["time_limit"]
    finished: deque[float] = deque()

    async def worker(w: int) -> None:
        nonlocal errors
        conn = await connect(host, port)
        req = raw % (
            spec["path"].encode(),
            host.encode(),
            port,
            spec["api_key"].encode(),
            f"{spec['tag']}-{w}".encode(),
        )
        while time.monotonic() < deadline:
            status, body = await conn.request(req)
            if status == 204:
                break
            if status != 200:
                errors += 1
                continue
            ids.append(orjson.loads(body)["videoId"])
        finished.append(time.time())
        assert conn.transport is not None
        conn.transport.close()

    await asyncio.gather(*(worker(w) for w in range(spec["workers"])))
    return {"ids": ids, "errors": errors, "end": max(finished)}


async def _sleep_until(wall: float) -> None:
    delay = wall - time.time()
    if delay > 0:
        await asyncio.sleep(delay)


def main() -> None:
    with open(sys.argv[1], encoding="utf-8") as fh:
        spec = json.load(fh)
    mode = {"closed": closed_loop, "open": open_loop, "claims": claims}[spec["mode"]]
    try:
        import uvloop

        result = uvloop.run(mode(spec))
    except ImportError:
        result = asyncio.run(mode(spec))
    # A file, not stdout: the event loop may leave stdout non-blocking, which
    # truncates a large write at exit.
    with open(spec["out"], "w", encoding="utf-8") as fh:
        json.dump(result, fh)


if __name__ == "__main__":
    main()
