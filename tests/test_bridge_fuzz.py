"""Byte-level fuzzing of the running bridge process: raw HTTP/1.1 requests with random
and mutated header values, paths, query strings, bodies and chunked encodings, at
every route. Schemathesis (test_bridge_common) only sends well-formed strings; this
sends bytes. Asserted: no 5xx, no traceback in the bridge's log, the process alive,
and a well-formed request served after every round.

JOBWIRE_FUZZ_CASES (default 600) and JOBWIRE_FUZZ_SEED (default: random, printed)
set the size and make a failure reproducible.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
from pathlib import Path
from typing import Any

import orjson

from jobwire.v1 import job_pb2
from tests.bridge_harness import API_KEY, BATCH_SECRET, TRANSCODE_TOKEN, create_job, new_id
from tests.bridge_process import BridgeProcess, bridge_process, http_get, raw_exchange, status_of

CASES = int(os.environ.get("JOBWIRE_FUZZ_CASES", "600"))
SEED = int(os.environ.get("JOBWIRE_FUZZ_SEED", str(random.randrange(2**32))))
CONCURRENCY = 16


class Route:
    def __init__(self, method: str, path: str, headers: dict[str, bytes], body: Any = None):
        self.method = method
        self.path = path
        self.headers = headers
        # JSON for the bridge's contracts; bytes as they are (a form, for the dashboard).
        self.body = body if isinstance(body, bytes) else b"" if body is None else orjson.dumps(body)


def routes(video_id: str, sec_id: str, sec_token: str) -> list[Route]:
    video = {"Authorization": f"Bearer {API_KEY}".encode()}
    sec = {"Authorization": f"Bearer {sec_token}".encode()}
    aurora = {"Authorization": f"Bearer {TRANSCODE_TOKEN}".encode()}
    task = {"task_id": new_id("fz"), "status": "succeeded", "output": "oss://b/o.mp4"}
    return [
        Route(
            "POST",
            "/api/batch-callback",
            {},
            {
                "jobId": "nope",
                "status": "success",
                "outputKey": "o",
                "callbackSecret": BATCH_SECRET,
            },
        ),
        Route("GET", "/api/pending", video),
        Route(
            "POST",
            "/api/report",
            video,
            {"status": "progress", "message": "m", "videoId": video_id, "percent": 5},
        ),
        Route(
            "POST",
            "/api/log",
            video,
            {"level": "INFO", "message": "m", "timestamp": "2023-05-01T12:00:00Z"},
        ),
        Route("GET", "/api/log?limit=5&level=INFO", video),
        Route("POST", "/api/transcode-callback", aurora, {"code": 0, "msg": "ok", "data": [task]}),
        Route(
            "POST",
            f"/api/transcode-callback/{TRANSCODE_TOKEN}",
            {},
            {"code": 0, "msg": "ok", "data": [task]},
        ),
        Route("POST", f"/api/external/jobs/{sec_id}", sec, {"phase": "ocr", "progress": 10}),
        Route(
            "POST",
            f"/api/external/jobs/{sec_id}",
            sec,
            {"phase": "failed", "error": {"code": "E", "message": "m", "details": {"a": [1]}}},
        ),
        Route("GET", f"/api/external/jobs/{sec_id}?limit=3", sec),
        Route("GET", f"/api/external/jobs/{sec_id}/artifacts/metadata.json", sec),
        Route("GET", "/healthz", {}),
        Route("GET", "/readyz", {}),
        Route("GET", "/openapi.json", {}),
        Route("GET", "/metrics", {}),
    ]


HEADER_NAMES = [
    b"Authorization",
    b"X-Callback-Token",
    b"Idempotency-Key",
    b"X-Worker",
    b"X-Request-ID",
    b"Content-Type",
    b"webhook-id",
    b"webhook-timestamp",
    b"webhook-signature",
    b"Accept",
    b"Host",
    b"Content-Length",
    b"Transfer-Encoding",
    b"Expect",
    b"Connection",
]


def junk(rng: random.Random, n: int | None = None) -> bytes:
    n = rng.choice([0, 1, 2, 5, 17, 100, 1000]) if n is None else n
    kind = rng.randrange(5)
    if kind == 0:  # any byte but CR/LF (which would end the header)
        return bytes(rng.choice([b for b in range(256) if b not in (10, 13)]) for _ in range(n))
    if kind == 1:  # invalid UTF-8
        return bytes(rng.choice(b"\x80\xbf\xc0\xc1\xe4\xf6\xfe\xff") for _ in range(n))
    if kind == 2:  # valid but exotic UTF-8
        return "".join(rng.choice("äöü€𝄞\u202e\u0000\ufeff\ud7ff") for _ in range(n)).encode(
            "utf-8", "surrogatepass"
        )
    if kind == 3:
        return rng.choice([b"Bearer ", b"Bearer", b"bearer  \xe4\xf6", b"Basic \xff", b""]) + bytes(
            rng.randrange(33, 127) for _ in range(n)
        )
    return rng.choice([b"-1", b"0", b"99999999999999999999", b"1e309", b"NaN", b"%00", b" "])


def mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    if not data:
        return junk(rng)
    b = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        op = rng.randrange(4)
        i = rng.randrange(len(b) + 1)
        if op == 0 and b:
            b[min(i, len(b) - 1)] = rng.randrange(256)
        elif op == 1:
            b[i:i] = junk(rng, rng.choice([1, 3, 10]))
        elif op == 2 and b:
            del b[i : i + rng.randint(1, 8)]
        else:
            b[i:i] = rng.choice([b'"', b"{", b"[", b"\\u", b"\\ud800", b"1e999", b"null", b"-"])
    return bytes(b)


WRONG_SHAPES = [
    b"[]",
    b'"x"',
    b"1",
    b"null",
    b'{"status": 1}',
    b'{"data": "x"}',
    b'{"phase": "completed", "data": {"metadata": {"a": 1000000000000000000000000000000}}}',
    b'{"phase": "completed", "data": {"metadata": {"a": 1e308, "b": -0.0}}}',
    b'{"phase": "completed", "data": {"images_archive_data": "@@@@"}}',
    b'{"phase": "completed", "data": {"extracted_text": "\\u0000x"}}',
    b'{"phase": "failed", "error": {"code": "", "message": 1}}',
    b'{"code": 0, "msg": "m", "data": [{"task_id": "\\u0000", "status": "failed"}]}',
    b'{"code": 0, "msg": "m", "data": [{"task_id": "a", "status": "failed", "error_code": 1e300}]}',
    b'{"status": "progress", "message": "m", "videoId": "v", "percent": 1e400}',
    b'{"status": "progress", "message": "m", "videoId": "v", "currentTime": "999:59:59.9"}',
    b'{"level": "ERROR", "message": "m", "timestamp": "9999-12-31T23:59:59Z"}',
]


def mutate_body(rng: random.Random, body: bytes) -> bytes:
    choice = rng.randrange(6)
    if choice == 0:
        return mutate_bytes(rng, body)
    if choice == 1:
        return junk(rng, rng.choice([1, 64, 4096]))
    if choice == 2:  # valid JSON of the wrong shape
        return rng.choice(WRONG_SHAPES)
    if choice == 3:  # deep nesting
        depth = rng.choice([40, 200, 2000])
        return b'{"phase":"failed","error":{"code":"E","message":"m","details":' + (
            b'{"a":' * depth + b"1" + b"}" * depth + b"}}"
        )
    if choice == 4:
        return body + junk(rng, 3)
    return body


def mutate_path(rng: random.Random, path: str) -> bytes:
    raw = path.encode()
    choice = rng.randrange(6)
    if choice == 0:
        return raw + b"%" + junk(rng, 2)
    if choice == 1:
        return raw.replace(b"/api/", b"/api/%ff%fe/") if rng.random() < 0.5 else raw + b"/%c0%ae"
    if choice == 2:
        sep = b"&" if b"?" in raw else b"?"
        param = rng.choice([b"limit", b"level", b"token", b"x"])
        value = rng.choice(
            [
                b"-5",
                b"0",
                b"100000",
                b"abc",
                b"1.5",
                b"%ff",
                b"",
                b"1e3",
                b"\xe4",
                b"+3",
                b"99" * 20,
            ]
        )
        return raw + sep + param + b"=" + value + rng.choice([b"", b"&limit=2", b"&&=", b"#x"])
    if choice == 3:
        return raw + b"/" + b"a" * rng.choice([10, 300, 9000])
    if choice == 4:
        return mutate_bytes(rng, raw).replace(b" ", b"").replace(b"\r", b"").replace(b"\n", b"")
    return raw


def build(rng: random.Random, route: Route, names: list[bytes] = HEADER_NAMES) -> bytes:
    method = route.method.encode()
    if rng.random() < 0.05:
        method = rng.choice([b"PUT", b"DELETE", b"G\xe4T", b"POST", b"GET", b"OPTIONS"])
    path = mutate_path(rng, route.path) if rng.random() < 0.4 else route.path.encode()
    headers: list[tuple[bytes, bytes]] = [(b"Host", b"fuzz")]
    headers += [(k.encode(), v) for k, v in route.headers.items()]
    for _ in range(rng.choice([0, 1, 1, 2, 4])):
        name = rng.choice(names)
        op = rng.randrange(4)
        if op == 0:  # replace
            headers = [(k, v) for k, v in headers if k.lower() != name.lower()]
            headers.append((name, junk(rng)))
        elif op == 1:  # repeat
            headers.append((name, junk(rng)))
        elif op == 2:  # empty
            headers.append((name, b""))
        else:  # oversized
            headers.append((name, b"A" * rng.choice([1000, 8000, 9000, 70000])))
    if rng.random() < 0.03:  # a flood of repeated headers (aiohttp allows 128)
        headers += [(rng.choice(names), junk(rng, 3))] * rng.choice([50, 200])
    if rng.random() < 0.03:  # a header name that is not a token
        headers.append((rng.choice([b"X-\xe4", b"Bad Name", b"", b":x", b"X\x00"]), b"v"))
    body = mutate_body(rng, route.body) if rng.random() < 0.6 else route.body
    if route.method == "GET" and rng.random() < 0.8:
        body = b""
    framing = rng.randrange(8)
    if framing == 0 and body:  # chunked, well-formed
        size = max(1, len(body) // 3)
        parts = [body[i : i + size] for i in range(0, len(body), size)]
        payload = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
        headers.append((b"Transfer-Encoding", b"chunked"))
    elif framing == 1:  # chunked, broken
        payload = rng.choice(
            [
                b"zz\r\n" + body + b"\r\n0\r\n\r\n",
                b"%x\r\n" % (len(body) + 5) + body + b"\r\n0\r\n\r\n",
                b"5;ext=\xff\r\nhello\r\n0\r\n\r\n",
                b"fffffffffffffffff\r\n",
                b"0\r\nTrailer: \xff\r\n\r\n",
            ]
        )
        headers.append((b"Transfer-Encoding", b"chunked"))
    elif framing == 2:  # Content-Length that lies (shorter than sent: the rest is junk)
        headers.append((b"Content-Length", b"%d" % max(0, len(body) - rng.randint(1, 5))))
        payload = body
    elif framing == 3:  # both framings
        headers.append((b"Content-Length", b"%d" % len(body)))
        headers.append((b"Transfer-Encoding", b"chunked"))
        payload = body
    else:
        headers.append((b"Content-Length", b"%d" % len(body)))
        payload = body
    headers.append((b"Connection", b"close"))
    head = method + b" " + path + b" HTTP/1.1\r\n"
    head += b"".join(k + b": " + v + b"\r\n" for k, v in headers)
    return head + b"\r\n" + payload


def json_or_empty(answer: bytes) -> bool:
    """An error answer is JSON (what every contract documents) or has no body at all,
    and its Content-Length is its body's."""
    head, _, body = answer.partition(b"\r\n\r\n")
    fields = {}
    for line in head.lower().split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        fields[name] = value.strip()
    if fields.get(b"content-length", b"%d" % len(body)) != b"%d" % len(body):
        return False  # framed wrong: the next response on the connection would be garbage
    return not body or fields.get(b"content-type", b"").startswith(b"application/json")


async def run_cases(
    bridge: BridgeProcess,
    rng: random.Random,
    table: list[Route],
    count: int,
    seen: dict[int | None, int],
) -> list[str]:
    failures: list[str] = []
    sem = asyncio.Semaphore(CONCURRENCY)

    async def one(n: int, request: bytes) -> None:
        async with sem:
            try:
                answer = await raw_exchange(bridge.port, request, timeout=20)
            except (ConnectionResetError, BrokenPipeError):
                return  # the bridge may hang up on garbage: not a 5xx
            status = status_of(answer)
            seen[status] = seen.get(status, 0) + 1
            if status is not None and status >= 500:
                failures.append(f"case {n}: {status} for {request[:300]!r}: {answer[-300:]!r}")
            elif status is not None and status >= 400 and not json_or_empty(answer):
                failures.append(f"case {n}: {status} not JSON for {request[:300]!r}: {answer!r}")

    requests = [build(rng, rng.choice(table)) for _ in range(count)]
    await asyncio.gather(*(one(n, r) for n, r in enumerate(requests)))
    return failures


async def test_fuzzed_bytes_never_5xx_never_traceback(grpc_service: Any, tmp_path: Path) -> None:
    print(f"fuzz seed {SEED} ({CASES} cases); JOBWIRE_FUZZ_SEED={SEED} reproduces")
    rng = random.Random(SEED)
    video = await create_job(
        grpc_service.stub,
        job_pb2.JOB_KIND_VIDEO,
        new_id("fv"),
        video=job_pb2.Video(url="https://example.test/v.mp4"),
    )
    sec = await create_job(grpc_service.stub, job_pb2.JOB_KIND_EXTRACTION)
    table = routes(video.job.id, sec.job.id, sec.callback_token)
    env = {
        "JOBWIRE_HEADER_TIMEOUT_SECONDS": "2",
        "JOBWIRE_BODY_TIMEOUT_SECONDS": "1",
        "JOBWIRE_ACCESS_LOG": "all",
        # One contract signed, so fuzzed webhook-* headers reach the signature check.
        "JOBWIRE_SIGNING_SECRET_AWS_BATCH": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    }
    async with bridge_process(grpc_service.target, tmp_path, **env) as bridge:
        failures: list[str] = []
        seen: dict[int | None, int] = {}
        rounds = 6
        for _ in range(rounds):
            failures += await run_cases(bridge, rng, table, max(1, CASES // rounds), seen)
            assert bridge.alive, bridge.log()[-3000:]
            # The next well-formed request is served.
            assert await http_get(bridge.port, "/healthz") == 200
            auth = f"Authorization: Bearer {API_KEY}\r\n"
            assert await http_get(bridge.port, "/api/log?limit=1", auth) == 200
        log = bridge.log()
    print("statuses:", dict(sorted(seen.items(), key=lambda kv: str(kv[0]))))
    assert not failures, "\n".join(failures[:10])
    assert "Traceback" not in log, log[log.index("Traceback") - 500 :][:4000]
    assert "unexpected error" not in log
    # Access log lines end "<status> <size> <time>ms": none of them a 5xx.
    assert not re.findall(r" 5\d\d \d+ [\d.]+ms$", log, re.MULTILINE)
