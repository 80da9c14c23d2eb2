"""Slow and greedy clients against the bridge process: request heads that trickle in,
bodies that trickle in, idle keep-alive connections, too many connections, a caller
over its rate limit, and 200 slow connections held while normal callbacks go on.

Every timeout is set small through the environment, so the tests stay fast; each
waits for the event it expects (the connection closing) with a generous bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import statistics
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from jobwire.v1 import job_pb2
from tests.bridge_harness import API_KEY, BATCH_SECRET, TRANSCODE_TOKEN, create_job, new_id
from tests.bridge_process import bridge_process, raw_exchange, status_of, trickle_head
from tests.helpers import eventually

SLACK = 10.0  # seconds beyond a configured timeout before a test gives up waiting
VIDEO_AUTH = f"Authorization: Bearer {API_KEY}\r\n"


async def open_conn(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def read_until_closed(reader: asyncio.StreamReader, timeout: float) -> bytes:
    chunks = []
    async with asyncio.timeout(timeout):
        while chunk := await reader.read(65536):
            chunks.append(chunk)
    return b"".join(chunks)


async def metric(port: int, name: str) -> float:
    request = b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    for line in (await raw_exchange(port, request)).decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


async def test_trickled_request_head_is_cut_at_the_header_timeout(
    grpc_service: Any, tmp_path: Path
) -> None:
    async with bridge_process(
        grpc_service.target, tmp_path, JOBWIRE_HEADER_TIMEOUT_SECONDS="1"
    ) as bridge:
        head = b"GET /api/pending HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer x"
        # One byte every 0.1 s: 6 s for the whole head.
        answer, elapsed = await trickle_head(bridge.port, head, 0.1, 1 + SLACK)
        assert status_of(answer) == 408
        assert elapsed < len(head) * 0.1, f"closed after {elapsed:.1f}s, head still trickling"

        # A connection that sends nothing at all is closed as well.
        reader, writer = await open_conn(bridge.port)
        assert status_of(await read_until_closed(reader, 1 + SLACK)) == 408
        writer.close()
        assert bridge.alive
        assert await metric(bridge.port, "jobwire_bridge_header_timeouts_total") == 2


async def test_trickled_body_gets_408_in_the_contract_body(
    grpc_service: Any, tmp_path: Path
) -> None:
    env = {"JOBWIRE_BODY_TIMEOUT_SECONDS": "1", "JOBWIRE_BODY_MIN_RATE_BYTES": "1000"}
    async with bridge_process(grpc_service.target, tmp_path, **env) as bridge:
        reader, writer = await open_conn(bridge.port)
        writer.write(
            f"POST /api/report HTTP/1.1\r\nHost: t\r\n{VIDEO_AUTH}"
            "Content-Type: application/json\r\nContent-Length: 500\r\n\r\n{".encode()
        )

        async def trickle() -> None:
            for _ in range(200):
                writer.write(b" ")
                await asyncio.sleep(0.1)  # 10 bytes/s, far below the minimum rate

        sender = asyncio.create_task(trickle())
        started = time.monotonic()
        try:
            answer = await read_until_closed(reader, 1 + SLACK)
        finally:
            sender.cancel()
            writer.close()
        assert status_of(answer) == 408
        assert answer.endswith(b'{"error":"Error al procesar la solicitud"}')
        assert b"Connection: close" in answer
        assert time.monotonic() - started < 1 + SLACK


async def test_a_compressed_trickle_gets_408(grpc_service: Any, tmp_path: Path) -> None:
    """The body's deadline grew by the bytes read after decoding: a gzip stream of
    zeros, 30 bytes on the wire per 4 KB decoded every 0.2 s (150 B/s against a
    1000 B/s minimum), held the AWS Batch endpoint (no credential before the body)
    until its 1 MiB limit, about a minute for 8 KB sent. The deadline grows by the
    bytes received, as sent."""
    env = {"JOBWIRE_BODY_TIMEOUT_SECONDS": "1", "JOBWIRE_BODY_MIN_RATE_BYTES": "1000"}
    async with bridge_process(grpc_service.target, tmp_path, **env) as bridge:
        reader, writer = await open_conn(bridge.port)
        writer.write(
            b"POST /api/batch-callback HTTP/1.1\r\nHost: t\r\nContent-Encoding: gzip\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        gzip = zlib.compressobj(6, zlib.DEFLATED, 31)

        async def trickle() -> None:
            while True:
                piece = gzip.compress(b"0" * 4000) + gzip.flush(zlib.Z_SYNC_FLUSH)
                writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                await asyncio.sleep(0.2)  # the client's pace, not a synchronisation

        sender = asyncio.create_task(trickle())
        try:
            answer = await read_until_closed(reader, 1 + SLACK)
        finally:
            sender.cancel()
            writer.close()
        assert status_of(answer) == 408, answer[:300]
        assert bridge.alive


HAS_PROC = os.path.exists("/proc/self/status")


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field}")


async def test_a_large_body_holds_only_what_has_arrived(grpc_service: Any, tmp_path: Path) -> None:
    """A body was read into a buffer of its announced size, allocated at once: three
    connections announcing 200 MiB with a Secretary job's token and sending 1 KiB took
    the bridge's RSS up by 600 MiB for the body's deadline. And a body cut off after
    120 MiB kept its buffer after its request ended (the exception's traceback holds
    the reading frame in a cycle) until a full garbage collection, which an idle bridge
    may not run for hours."""
    if not HAS_PROC:
        pytest.skip("needs /proc")
    created = await create_job(grpc_service.stub, job_pb2.JOB_KIND_EXTRACTION)
    announced = 200 * 1024 * 1024
    head = (
        f"POST /api/external/jobs/{created.job.id} HTTP/1.1\r\nHost: t\r\n"
        f"Authorization: Bearer {created.callback_token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {announced}\r\n\r\n"
    ).encode() + b'{"phase": "completed", "data": {"extracted_text": "'
    env = {"JOBWIRE_BODY_TIMEOUT_SECONDS": "1"}
    async with bridge_process(grpc_service.target, tmp_path, **env) as bridge:
        pid = bridge.proc.pid
        before = rss_kib(pid)
        held = [await open_conn(bridge.port) for _ in range(3)]
        for _, writer in held:
            writer.write(head + b"a" * 1024)
        for reader, writer in held:  # each body was being read: its deadline passed
            assert status_of(await read_until_closed(reader, 1 + SLACK)) == 408
            writer.close()
        grown = rss_kib(pid, "VmHWM") - before
        assert grown < 64 * 1024, f"RSS rose by {grown // 1024} MiB for 3 KiB received"

        reader, writer = await open_conn(bridge.port)
        writer.write(head + b"a" * (120 * 1024 * 1024))
        await writer.drain()

        async def arrived() -> bool:
            return rss_kib(pid) - before > 100 * 1024

        await eventually(arrived, what="120 MiB read by the bridge")
        writer.transport.abort()  # the client goes away mid-body

        async def released() -> bool:
            return rss_kib(pid) - before < 64 * 1024

        await eventually(released, timeout=SLACK, what="the cut-off body's memory released")
        assert bridge.alive


async def test_idle_keep_alive_connection_is_closed(grpc_service: Any, tmp_path: Path) -> None:
    async with bridge_process(
        grpc_service.target, tmp_path, JOBWIRE_KEEPALIVE_TIMEOUT_SECONDS="1"
    ) as bridge:
        reader, writer = await open_conn(bridge.port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), SLACK)
        assert status_of(head) == 200
        started = time.monotonic()
        rest = await read_until_closed(reader, 1 + SLACK)  # the body, then EOF
        writer.close()
        assert rest == b'{"status":"ok"}'
        assert time.monotonic() - started >= 0.5


async def test_connections_beyond_the_cap_get_503(grpc_service: Any, tmp_path: Path) -> None:
    env = {"JOBWIRE_MAX_CONNECTIONS": "5", "JOBWIRE_RETRY_AFTER_SECONDS": "3"}
    async with bridge_process(grpc_service.target, tmp_path, **env) as bridge:
        held = [await open_conn(bridge.port) for _ in range(5)]
        # Each held connection is counted once the bridge has accepted it: one request
        # on each proves that.
        for reader, writer in held:
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            assert status_of(await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), SLACK)) == 200
            await asyncio.wait_for(reader.readexactly(15), SLACK)  # {"status":"ok"}
        answer = await raw_exchange(bridge.port, b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        assert status_of(answer) == 503 and b"Retry-After: 3" in answer
        reader, writer = held.pop()
        writer.close()
        await read_until_closed(reader, SLACK)

        async def served() -> None:
            while True:
                request = b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
                if status_of(await raw_exchange(bridge.port, request)) == 200:
                    return
                await asyncio.sleep(0.05)  # the bridge notices the close asynchronously

        await asyncio.wait_for(served(), SLACK)
        assert await metric(bridge.port, "jobwire_bridge_refused_connections_total") >= 1
        for _, writer in held:
            writer.close()


OPENAPI = b"GET /openapi.json HTTP/1.1\r\nHost: t\r\n\r\n"  # no credential, ~36 KB


async def small_window_conn(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection whose client takes little at a time (4 KiB receive buffer)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return await asyncio.open_connection(sock=sock)


async def test_a_client_that_never_reads_its_answers_is_cut(
    grpc_service: Any, tmp_path: Path
) -> None:
    """A client that pipelined requests (none needs a credential) and never read the
    answers held its connection for good: no clock runs while an answer waits to be
    written, the header and keep-alive clocks stood still, and 1000 such connections
    locked every worker out. An answer the client takes nothing of for
    JOBWIRE_BODY_TIMEOUT_SECONDS now ends its connection; one read slowly is not cut."""
    env = {"JOBWIRE_BODY_TIMEOUT_SECONDS": "2"}
    async with bridge_process(grpc_service.target, tmp_path, **env) as bridge:

        async def open_connections() -> float:
            return await metric(bridge.port, "jobwire_bridge_open_connections")

        # Read slowly (64 KiB every 0.05 s, 3.6 MB in all: longer than the timeout).
        reader, writer = await small_window_conn(bridge.port)
        writer.write(OPENAPI * 99 + OPENAPI.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
        taken = []
        async with asyncio.timeout(SLACK * 3):
            while chunk := await reader.read(65536):
                taken.append(chunk)
                await asyncio.sleep(0.05)  # the client's pace, not a synchronisation
        writer.close()
        assert b"".join(taken).count(b"HTTP/1.1 200 OK") == 100

        # Never read: 2000 answers, 72 MB, far beyond what the sockets buffer.
        reader, writer = await small_window_conn(bridge.port)
        writer.write(OPENAPI * 2000)
        await eventually(
            lambda: _equals(open_connections(), 1),  # the metric's own connection
            timeout=2 + SLACK,
            what="the connection whose answers were never read closed",
        )
        writer.close()
        log = bridge.log()
        assert "answer not read" in log and "Traceback" not in log, log[-3000:]
        assert bridge.alive


async def _equals(value: Awaitable[float], expected: float) -> bool:
    return await value == expected


@dataclass
class Answer:
    status: int
    retry_after: str | None
    body: bytes


@contextlib.asynccontextmanager
async def rate_limited_log_reads(
    grpc_service: Any, tmp_path: Path, rate_limit: str
) -> AsyncIterator[Callable[[str], Awaitable[Answer]]]:
    """A bridge with JOBWIRE_RATE_LIMIT=`rate_limit`, and a read of the video worker's
    log with a given API key."""
    async with (
        bridge_process(
            grpc_service.target, tmp_path, JOBWIRE_RATE_LIMIT=rate_limit, API_KEY=API_KEY
        ) as bridge,
        aiohttp.ClientSession() as http,
    ):
        url = f"{bridge.url}/api/log?limit=1"

        async def get(key: str) -> Answer:
            async with http.get(url, headers={"Authorization": f"Bearer {key}"}) as r:
                return Answer(r.status, r.headers.get("Retry-After"), await r.read())

        yield get


async def test_rate_limit_per_credential_429_with_retry_after(
    grpc_service: Any, tmp_path: Path
) -> None:
    async with rate_limited_log_reads(grpc_service, tmp_path, "2/s") as get:

        async def call() -> int:
            answer = await get(API_KEY)
            if answer.status == 429:
                assert answer.retry_after is not None and int(answer.retry_after) >= 1
                assert json.loads(answer.body) == {"error": "Error al procesar la solicitud"}
            return answer.status

        # Eight at once: the burst (2) passes, the rest arrive before any refill.
        statuses = await asyncio.gather(*(call() for _ in range(8)))
        assert statuses.count(200) in (2, 3) and statuses.count(429) >= 5, statuses
        # Another credential: test_guessed_credentials_are_rate_limited_per_address


async def test_rate_limit_per_minute_allows_bursts_of_n(grpc_service: Any, tmp_path: Path) -> None:
    """`N/min` allows bursts of N, as `N/s` does (README): 5/min let one request through
    and answered 429 to a worker's second request of the same second."""
    async with rate_limited_log_reads(grpc_service, tmp_path, "5/min") as get:
        answers = [await get(API_KEY) for _ in range(6)]
        statuses = [a.status for a in answers]
        retry_after = answers[-1].retry_after
        assert statuses == [200] * 5 + [429], statuses
        assert retry_after is not None and 1 <= int(retry_after) <= 12


async def test_guessed_credentials_are_rate_limited_per_address(
    grpc_service: Any, tmp_path: Path
) -> None:
    """Each guessed token had a fresh bucket of its own, so a caller trying a new token
    per request was never limited (nor the service reads a Secretary guess costs).
    Failed authentications now draw on their address's bucket, and a credential not yet
    seen to work waits while it is empty; one that worked keeps its own bucket only."""
    async with rate_limited_log_reads(grpc_service, tmp_path, "3/min") as get:

        async def call(key: str) -> int:
            return (await get(key)).status

        assert await call(API_KEY) == 200  # a success costs its address nothing
        guesses = [await call(f"guess-{i}") for i in range(8)]
        assert guesses == [401, 401, 401] + [429] * 5, guesses
        assert await call(API_KEY) == 200  # it worked before: its own bucket, 2 of 3 left


async def test_a_credential_spelled_differently_or_extra_headers_share_one_bucket(
    grpc_service: Any, tmp_path: Path
) -> None:
    """The bucket's key was a digest of the raw header, so `Bearer` followed by one to
    ten spaces (or `bearer`) gave the same API key a fresh bucket each time, as did a
    random `X-Callback-Token` on AWS Batch (whose secret is in the body: per address)
    or a random non-Bearer `Authorization` beside a Secretary's `X-Callback-Token`.
    The key is now the token as auth parses it, or the address."""
    stub = grpc_service.stub
    batch_job = new_id("rl")
    await create_job(stub, job_pb2.JOB_KIND_BATCH, batch_job)
    secretary = await create_job(stub, job_pb2.JOB_KIND_EXTRACTION)
    async with (
        bridge_process(grpc_service.target, tmp_path, JOBWIRE_RATE_LIMIT="3/min") as bridge,
        aiohttp.ClientSession() as http,
    ):

        async def statuses(
            method: str, path: str, headers: Callable[[int], dict[str, str]], body: Any = None
        ) -> list[int]:
            found = []
            for i in range(8):
                url = bridge.url + path
                async with http.request(method, url, json=body, headers=headers(i)) as r:
                    found.append(r.status)
            return found

        scheme = ["Bearer", "bearer", "BEARER"]
        batch = {
            "jobId": batch_job,
            "status": "failed",
            "error": "x",
            "callbackSecret": BATCH_SECRET,
        }
        found = {
            "video": await statuses(
                "GET",
                "/api/log?limit=1",
                lambda i: {"Authorization": f"{scheme[i % 3]}{' ' * (i + 1)}{API_KEY}"},
            ),
            "batch": await statuses(
                "POST",
                "/api/batch-callback",
                lambda i: {"X-Callback-Token": new_id(), "Authorization": f"Bearer {new_id()}"},
                batch,
            ),
            "secretary": await statuses(
                "POST",
                f"/api/external/jobs/{secretary.job.id}",
                lambda i: {
                    "X-Callback-Token": secretary.callback_token,
                    "Authorization": f"Basic {new_id()}",
                },
                {"phase": "extract_text", "progress": 5},
            ),
            "aurora": await statuses(
                "POST",
                f"/api/transcode-callback/{TRANSCODE_TOKEN}",
                lambda i: {"Authorization": f"Bearer {new_id()}", "X-Callback-Token": new_id()},
                {"code": 0, "msg": "ok", "data": []},
            ),
        }
        assert found == {name: [200] * 3 + [429] * 5 for name in found}


async def test_200_slow_connections_do_not_slow_normal_callbacks(
    grpc_service: Any, tmp_path: Path
) -> None:
    ids = [new_id("slow") for _ in range(120)]
    for job_id in ids:
        await create_job(grpc_service.stub, job_pb2.JOB_KIND_BATCH, job_id)
    env = {"JOBWIRE_HEADER_TIMEOUT_SECONDS": "120"}
    async with (
        bridge_process(grpc_service.target, tmp_path, **env) as bridge,
        aiohttp.ClientSession() as http,
    ):

        async def callbacks(batch: list[str]) -> list[float]:
            times = []
            for job_id in batch:
                body = {
                    "jobId": job_id,
                    "status": "failed",
                    "error": "x",
                    "callbackSecret": BATCH_SECRET,
                }
                started = time.perf_counter()
                async with http.post(f"{bridge.url}/api/batch-callback", json=body) as r:
                    assert r.status == 200, await r.text()
                times.append(time.perf_counter() - started)
            return times

        await callbacks(ids[:20])  # warm-up: connection pool, first-call costs
        baseline = statistics.median(await callbacks(ids[20:70]))

        slow: list[asyncio.StreamWriter] = []
        stop = asyncio.Event()

        async def trickle(writer: asyncio.StreamWriter) -> None:
            head = b"POST /api/batch-callback HTTP/1.1\r\nHost: t\r\nX-Padding: "
            writer.write(head)
            while not stop.is_set():
                writer.write(b"a")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.5)  # one byte every 0.5 s

        readers = []
        for _ in range(200):
            reader, writer = await open_conn(bridge.port)
            readers.append(reader)
            slow.append(writer)
        tricklers = [asyncio.create_task(trickle(w)) for w in slow]
        try:
            await asyncio.sleep(1.0)  # let every slow head get going (a pace, not a sync)
            loaded = statistics.median(await callbacks(ids[70:120]))
            # All 200 are still open: none was answered or closed meanwhile.
            assert not any(r.at_eof() for r in readers)
        finally:
            stop.set()
            await asyncio.gather(*tricklers, return_exceptions=True)
            for w in slow:
                w.close()
        print(
            f"median callback latency: {baseline * 1000:.2f} ms alone, "
            f"{loaded * 1000:.2f} ms with 200 slow connections"
        )
        assert loaded <= max(3 * baseline, baseline + 0.05), (baseline, loaded)
        assert bridge.alive


async def test_head_timer_spans_keep_alive_requests(grpc_service: Any, tmp_path: Path) -> None:
    """The head timer is re-armed lazily (not per request): quick requests on one
    connection for longer than the header timeout are never cut, and a later head
    that trickles on the same connection still gets its 408."""
    async with bridge_process(
        grpc_service.target, tmp_path, JOBWIRE_HEADER_TIMEOUT_SECONDS="1"
    ) as bridge:
        reader, writer = await open_conn(bridge.port)
        started = time.monotonic()
        answered = 0
        while time.monotonic() - started < 2.5:  # 2.5 header timeouts of quick requests
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), SLACK)
            assert status_of(head) == 200, head
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            await asyncio.wait_for(reader.readexactly(length), SLACK)
            answered += 1
            await asyncio.sleep(0.05)  # the client's pace, not a synchronisation
        assert answered > 10

        slow_head = b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Slow: yes"

        async def trickle() -> None:
            for byte in slow_head:  # one byte every 0.1 s: 4.5 s for the whole head
                writer.write(bytes([byte]))
                await asyncio.sleep(0.1)  # the client's pace, not a synchronisation

        sender = asyncio.create_task(trickle())
        trickle_started = time.monotonic()
        try:
            answer = await read_until_closed(reader, 1 + SLACK)
        finally:
            sender.cancel()
            writer.close()
        elapsed = time.monotonic() - trickle_started
        assert status_of(answer) == 408
        assert 0.5 <= elapsed < len(slow_head) * 0.1, f"closed after {elapsed:.1f}s"


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def test_a_refused_compressed_body_is_not_decompressed(
    grpc_service: Any, tmp_path: Path
) -> None:
    """A body answered before it is read (a wrong token) is drained for up to 2 s so
    that the answer is not lost to a reset; a gzip body was decompressed while it was
    drained: 2 MB of zeros on the wire, 2 GB decoded, cost the bridge about a second of
    CPU per request, without a credential. The rest of such a body is now dropped as
    it arrives, undecoded."""
    # 2 GB of zeros in about 2 MB, made from one 128 MiB block: after a full flush a
    # block refers to nothing before it, so its bytes repeat as a valid stream (no
    # trailer: the drain never reaches the end). Compressing 2 GB took 5.7 s.
    gzip = zlib.compressobj(9, zlib.DEFLATED, 31)
    head = gzip.compress(bytes(2**27)) + gzip.flush(zlib.Z_FULL_FLUSH)
    block = gzip.compress(bytes(2**27)) + gzip.flush(zlib.Z_FULL_FLUSH)
    bomb = head + block * 15
    async with bridge_process(grpc_service.target, tmp_path) as bridge:
        assert bridge.proc.pid is not None
        before = _cpu_seconds(bridge.proc.pid)
        reader, writer = await open_conn(bridge.port)
        writer.write(
            b"POST /api/report HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer wrong\r\n"
            b"Content-Type: application/json\r\nContent-Encoding: gzip\r\n"
            b"Content-Length: %d\r\n\r\n" % len(bomb)
        )
        writer.write(bomb)
        answer = b""
        try:
            async with asyncio.timeout(2 + SLACK):
                while chunk := await reader.read(65536):
                    answer += chunk
        except ConnectionResetError:
            pass  # closed with the rest of the body unread, after its 2 s
        finally:
            writer.close()
        assert status_of(answer) == 401, answer[:200]
        spent = _cpu_seconds(bridge.proc.pid) - before
        assert spent < 0.25, f"the bridge spent {spent:.2f} s of CPU on a refused body"
        assert bridge.alive


async def _send_and_half_close(port: int, data: bytes) -> bytes:
    """Sends `data`, then shuts down the sending side (`nc -N`, shutdown(SHUT_WR)):
    everything answered until the bridge closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        writer.write_eof()
        chunks = []
        async with asyncio.timeout(SLACK):
            while chunk := await reader.read(65536):
                chunks.append(chunk)
        return b"".join(chunks)
    finally:
        writer.close()


async def test_a_client_that_half_closes_after_its_request_gets_its_answer(
    grpc_service: Any, tmp_path: Path
) -> None:
    """A client may shut down its sending side once its request is out (`printf ... |
    nc -N`, HTTP/1.0 scripts). aiohttp let the connection close on that end of input,
    so the request was handled (a report applied) and its answer never sent: the
    client saw the connection drop and could not know its report was taken. What was
    sent whole is now answered (pipelined requests too), then the connection closes."""
    vid = new_id("v")
    await create_job(grpc_service.stub, job_pb2.JOB_KIND_VIDEO, vid)
    body = json.dumps({"status": "progress", "message": "m", "videoId": vid, "percent": 5})
    report = (
        f"POST /api/report HTTP/1.1\r\nHost: t\r\n{VIDEO_AUTH}"
        f"Content-Length: {len(body)}\r\n\r\n{body}"
    ).encode()
    async with bridge_process(grpc_service.target, tmp_path) as bridge:
        answer = await _send_and_half_close(bridge.port, report)
        assert status_of(answer) == 200 and answer.endswith(b'{"success":true}'), answer
        answer = await _send_and_half_close(bridge.port, b"GET /healthz HTTP/1.0\r\n\r\n")
        assert status_of(answer) == 200, answer
        two = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n" * 2
        answer = await _send_and_half_close(bridge.port, two)
        assert answer.count(b"HTTP/1.1 200 OK") == 2, answer
        assert bridge.alive
