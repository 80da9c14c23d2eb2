"""Reproduces (and measures) how a grpc.aio server admits a burst of server-streaming calls.

A bare grpc.aio server whose one method, like WatchJob, sends one message at once and then
holds the stream open; N client streams opened in one burst from P client processes over C
connections each. Reports how many streams got their first message, how many ended with
which status (and its details), and how long the burst took.

    python -m bench.stream_admission [--streams 3000] [--procs 2] [--per-conn 100]
        [--server-arg grpc.max_concurrent_streams=100 ...] [--max-rpcs N]
        [--handler-delay-ms 0] [--limit-s 60] [--fanout-events 0]

`--fanout-events K` then sends K events to every open stream (the server resolves one
shared future per event) and times their arrival: the floor of fan-out latency for
grpc.aio itself, with no application code.

Why it matters (see README "watchers"): grpc.aio accepts calls one at a time (one
`grpc_server_request_call` at a time on its event loop), so a burst queues inside gRPC core
as "unrequested" calls; core kills a queued call older than
`grpc.server_max_unrequested_time_in_server` (default 30 s) with a bare CANCELLED
(RST_STREAM), and the client is never told why.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import resource
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc

METHOD = "/bench.Admission/Watch"
ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _parse_arg(text: str) -> tuple[str, int | str]:
    key, _, value = text.partition("=")
    try:
        return key, int(value)
    except ValueError:
        return key, value


async def serve(
    port: int, options: list[tuple[str, Any]], max_rpcs: int | None, delay: float
) -> None:
    accepted = 0
    loop = asyncio.get_running_loop()
    # Each FIRE resolves this future (one event to every stream) and replaces it.
    fire: list[asyncio.Future[bytes]] = [loop.create_future()]

    async def watch(
        request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> AsyncIterator[bytes]:
        nonlocal accepted
        accepted += 1
        if delay:
            await asyncio.sleep(delay)
        yield b"snapshot"
        while True:  # held open, like a watcher waiting for events
            yield await asyncio.shield(fire[0])

    handler = grpc.unary_stream_rpc_method_handler(watch)
    generic = grpc.method_handlers_generic_handler("bench.Admission", {"Watch": handler})
    server = grpc.aio.server(options=options, maximum_concurrent_rpcs=max_rpcs)
    server.add_generic_rpc_handlers((generic,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("SERVING", flush=True)
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line or line.startswith("STOP"):
            break
        if line.startswith("FIRE"):
            current, fire[0] = fire[0], loop.create_future()
            current.set_result(b"event")
            print(json.dumps({"fired": time.time()}), flush=True)
            continue
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps({"accepted": accepted, "rss_mib": round(rss, 1)}), flush=True)
    await server.stop(0)


async def clients(
    target: str, n: int, per_conn: int, limit: float, channel_options: list[tuple[str, Any]]
) -> None:
    channels = [
        grpc.aio.insecure_channel(
            target, options=[("grpc.use_local_subchannel_pool", 1), *channel_options]
        )
        for _ in range((n + per_conn - 1) // per_conn)
    ]
    for ch in channels:
        await ch.channel_ready()
    print("CONNECTED", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)  # GO
    t0 = time.monotonic()
    first: list[float] = []
    events: list[list[float]] = [[] for _ in range(n)]  # wall-clock arrivals per stream
    ends: collections.Counter[str] = collections.Counter()
    ended_at: dict[str, list[float]] = collections.defaultdict(list)

    settled = asyncio.Event()  # every stream got its first message or ended

    async def one(i: int) -> None:
        method: Any = channels[i // per_conn].unary_stream(METHOD)
        call = method(b"")
        try:
            async for message in call:
                if message != b"snapshot":
                    events[i].append(time.time())
                    continue
                first.append(time.monotonic() - t0)
                if len(first) + sum(ends.values()) == n:
                    settled.set()
        except grpc.aio.AioRpcError as exc:
            key = f"{exc.code().name}: {exc.details()}"
            ends[key] += 1
            ended_at[key].append(time.monotonic() - t0)
            if len(first) + sum(ends.values()) == n:
                settled.set()

    tasks = [asyncio.create_task(one(i)) for i in range(n)]
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(settled.wait(), limit)
    elapsed = time.monotonic() - t0
    print(
        json.dumps(
            {
                "streams": n,
                "first_message": len(first),
                "last_first_message_s": round(max(first), 2) if first else None,
                "ended": dict(ends),
                "ended_at_s": {
                    k: [round(min(v), 1), round(max(v), 1)] for k, v in ended_at.items()
                },
                "elapsed_s": round(elapsed, 2),
            }
        ),
        flush=True,
    )
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)  # STOP
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    print(json.dumps({"events": events}), flush=True)
    for ch in channels:
        await ch.close()


async def drive(args: argparse.Namespace) -> dict[str, Any]:
    port = _free_port()
    py = sys.executable
    server_cmd = [py, "-m", "bench.stream_admission", "--role", "server", "--port", str(port)]
    for a in args.server_arg:
        server_cmd += ["--server-arg", a]
    if args.max_rpcs:
        server_cmd += ["--max-rpcs", str(args.max_rpcs)]
    server_cmd += ["--handler-delay-ms", str(args.handler_delay_ms)]
    pipe = asyncio.subprocess.PIPE
    server = await asyncio.create_subprocess_exec(
        *server_cmd, stdin=pipe, stdout=pipe, limit=1 << 26
    )
    assert server.stdout is not None and server.stdin is not None
    try:
        assert (await server.stdout.readline()).startswith(b"SERVING")
        per_proc = args.streams // args.procs
        procs = []
        env = dict(os.environ)
        for _ in range(args.procs):
            if args.client == "node":
                script = str(ROOT / "bench" / "stream_admission_client.js")
                cmd = ["node", script, f"127.0.0.1:{port}", str(per_proc), str(args.per_conn)]
                cmd.append(str(args.limit_s))
                env["NODE_PATH"] = str(ROOT / "examples" / "node" / "node_modules")
            else:
                cmd = [py, "-m", "bench.stream_admission", "--role", "client", "--port", str(port)]
                cmd += ["--streams", str(per_proc), "--per-conn", str(args.per_conn)]
                cmd += ["--limit-s", str(args.limit_s)]
                for a in args.channel_arg:
                    cmd += ["--channel-arg", a]
            procs.append(
                await asyncio.create_subprocess_exec(
                    *cmd, stdin=pipe, stdout=pipe, limit=1 << 26, env=env
                )
            )
        for p in procs:
            assert p.stdout is not None
            assert (await p.stdout.readline()).startswith(b"CONNECTED")
        load0 = os.getloadavg()[0]
        for p in procs:
            assert p.stdin is not None
            p.stdin.write(b"GO\n")
            await p.stdin.drain()
        results = []
        for p in procs:
            assert p.stdout is not None
            results.append(json.loads(await p.stdout.readline()))
        server.stdin.write(b"STATS\n")
        await server.stdin.drain()
        stats = json.loads(await server.stdout.readline())
        fired: list[float] = []  # the floor of fan-out: one event to every open stream
        for _ in range(args.fanout_events):
            server.stdin.write(b"FIRE\n")
            await server.stdin.drain()
            fired.append(json.loads(await server.stdout.readline())["fired"])
            await asyncio.sleep(1 / args.fanout_rate)
        await asyncio.sleep(5.0 if fired else 0)  # the last event reaches everyone
        lat: list[float] = []
        for p in procs:
            assert p.stdin is not None and p.stdout is not None
            p.stdin.write(b"STOP\n")
            await p.stdin.drain()
            for arrivals in json.loads(await p.stdout.readline())["events"]:
                lat += [(t - f) * 1000 for t, f in zip(arrivals, fired, strict=False)]
            await p.wait()
    finally:
        if server.stdin is not None:
            server.stdin.write(b"STOP\n")
            await server.stdin.drain()
        await asyncio.wait_for(server.wait(), 30)
    ended: collections.Counter[str] = collections.Counter()
    for r in results:
        ended.update(r["ended"])
    return {
        "config": {
            "streams": args.streams,
            "procs": args.procs,
            "client": args.client,
            "per_conn": args.per_conn,
            "server_args": args.server_arg,
            "channel_args": args.channel_arg,
            "max_rpcs": args.max_rpcs,
            "handler_delay_ms": args.handler_delay_ms,
        },
        "first_message": sum(r["first_message"] for r in results),
        "ended": dict(ended),
        "ended_at_s": [r["ended_at_s"] for r in results],
        "open_s": max((r["last_first_message_s"] or 0) for r in results),
        "elapsed_s": max(r["elapsed_s"] for r in results),
        "server": stats,
        "load_avg_1m_before": round(load0, 2),
        "fanout": _fanout_summary(lat, len(fired), args.streams) if fired else None,
    }


def _fanout_summary(lat: list[float], events: int, streams: int) -> dict[str, Any]:
    lat.sort()

    def at(q: float) -> float | None:
        return round(lat[min(len(lat) - 1, int(q * len(lat)))], 1) if lat else None

    return {
        "events": events,
        "delivered": len(lat),
        "expected": events * streams,
        "p50_ms": at(0.5),
        "p99_ms": at(0.99),
        "max_ms": at(1.0),
    }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--role", choices=("drive", "server", "client"), default="drive")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--streams", type=int, default=3000)
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--per-conn", type=int, default=100)
    p.add_argument("--server-arg", action="append", default=[], help="KEY=VALUE gRPC server arg")
    p.add_argument("--channel-arg", action="append", default=[], help="KEY=VALUE gRPC channel arg")
    p.add_argument(
        "--max-rpcs", type=int, default=0, help="grpc.aio.server maximum_concurrent_rpcs"
    )
    p.add_argument(
        "--handler-delay-ms", type=float, default=0.0, help="work before the first message"
    )
    p.add_argument("--limit-s", type=float, default=60.0)
    p.add_argument("--fanout-events", type=int, default=0, help="then time events to all")
    p.add_argument(
        "--client",
        choices=("python", "node"),
        default="python",
        help="node: @grpc/grpc-js from examples/node/node_modules (npm ci there)",
    )
    p.add_argument("--fanout-rate", type=float, default=2.0)
    args = p.parse_args()
    try:
        import uvloop

        run: Any = uvloop.run
    except ImportError:
        run = asyncio.run
    if args.role == "server":
        options = [_parse_arg(a) for a in args.server_arg]
        run(serve(args.port, options, args.max_rpcs or None, args.handler_delay_ms / 1000))
    elif args.role == "client":
        options = [_parse_arg(a) for a in args.channel_arg]
        run(clients(f"127.0.0.1:{args.port}", args.streams, args.per_conn, args.limit_s, options))
    else:
        print(json.dumps(run(drive(args)), indent=1))


if __name__ == "__main__":
    main()
