"""Errors aiohttp answers itself (a request it cannot parse; an unknown path, method or
Expect) get a JSON error that every contract's error schema accepts, not aiohttp's own
text/plain page (which no contract documents)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from typing import Any
from urllib.parse import urlsplit

import jsonschema  # type: ignore[import-untyped]
import orjson
import pytest

from http_bridge.openapi import build_document
from tests.bridge_harness import API_KEY, TEST_CONFIG, bridge, running_bridge  # noqa: F401
from tests.bridge_process import raw_exchange, status_of

SECRET = "sEcReT-tOkEn-in-the-path"
LONG = "A" * 9000  # aiohttp's line and field limit is 8190 bytes
AUTH = f"Authorization: Bearer {API_KEY}\r\n"

CASES = {
    "request line too long": (
        f"GET /api/external/jobs/j1?limit={LONG} HTTP/1.1\r\nHost: t\r\n",
        "too long",
    ),
    "header too long": (f"GET /api/log HTTP/1.1\r\nHost: t\r\nX-Big: {LONG}\r\n", "too long"),
    "method not a token": ("G\u00e4T /api/log HTTP/1.1\r\nHost: t\r\n", "method"),
    "header name not a token": ("GET /api/log HTTP/1.1\r\nHost: t\r\nBad Name: v\r\n", "header"),
    # aiohttp's own messages, not llhttp's: they were a bare "malformed HTTP request".
    "too many headers": (
        "GET /api/log HTTP/1.1\r\nHost: t\r\n" + "".join(f"X-H{i}: v\r\n" for i in range(200)),
        "Too many headers received",
    ),
    "no Host": ("GET /api/log HTTP/1.1\r\n", "Missing 'Host' header"),
    "two Hosts": ("GET /api/log HTTP/1.1\r\nHost: a\r\nHost: b\r\n", "Duplicate 'Host' header"),
    # llhttp takes these: they were served, answered `HTTP/2.0 200 OK` on HTTP/1 framing.
    "HTTP/2.0": ("GET /api/log HTTP/2.0\r\nHost: t\r\n", "HTTP version"),
    "HTTP/0.9": ("GET /api/log HTTP/0.9\r\nHost: t\r\n", "HTTP version"),
    "broken chunk size": (
        f"POST /api/transcode-callback/{SECRET} HTTP/1.1\r\nHost: t\r\n"
        "Transfer-Encoding: chunked\r\n\r\nzz\r\n{{}}\r\n0\r\n",
        "chunk size",  # llhttp's reason; the bytes it quotes are not passed on
    ),
}


def _error_schemas() -> dict[str, Any]:
    doc = build_document()
    schemas = doc["components"]["schemas"]
    names = ("BatchError", "VideoError", "AuroraAck", "SecretaryError")
    return {name: schemas[name] for name in names}


def _split(answer: bytes) -> tuple[dict[str, str], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")[1:]
    headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines)}
    return headers, body


@pytest.mark.parametrize("case", sorted(CASES))
async def test_unparseable_request_gets_a_json_error_every_contract_accepts(
    bridge: Any,  # noqa: F811
    case: str,
) -> None:
    request, named = CASES[case]
    head = request if "\r\n\r\n" in request else request + AUTH + "Connection: close\r\n\r\n"
    port = urlsplit(bridge.url).port or 0
    answer = await raw_exchange(port, head.encode())
    assert status_of(answer) == 400, answer[:300]
    assert answer.startswith((b"HTTP/1.0 ", b"HTTP/1.1 ")), answer[:300]
    headers, body = _split(answer)
    assert headers["content-type"].startswith("application/json"), headers
    doc = orjson.loads(body)
    assert named in doc["error"], doc
    for schema in _error_schemas().values():
        jsonschema.validate(doc, schema)
    assert SECRET.encode() not in answer  # the bytes are named, never quoted

    # The connection's failure changes nothing: the next request is served.
    healthz = b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    assert status_of(await raw_exchange(port, healthz)) == 200


@pytest.mark.parametrize(
    ("method", "path", "headers", "status", "named"),
    [
        ("GET", "/api/no-such-thing", {}, 404, "no such path"),
        ("DELETE", "/api/log", {}, 405, "method not allowed"),
        ("POST", "/readyz", {}, 405, "method not allowed"),
        ("POST", "/api/log", {"Expect": "fly-me-to-the-moon"}, 417, "Expect"),
    ],
)
async def test_router_errors_are_json_and_keep_the_connection_framed(
    bridge: Any,  # noqa: F811
    method: str,
    path: str,
    headers: dict[str, str],
    status: int,
    named: str,
) -> None:
    auth = {"Authorization": f"Bearer {API_KEY}"}
    for _ in range(2):  # twice on one keep-alive connection: a wrong length breaks the second
        async with bridge.http.request(
            method, bridge.url + path, headers={**auth, **headers}, data=b"{}"
        ) as resp:
            assert resp.status == status
            assert resp.content_type == "application/json"
            doc = orjson.loads(await resp.read())
            assert resp.content_length == len(orjson.dumps(doc))
        assert named in doc["error"], doc
        for schema in _error_schemas().values():
            jsonschema.validate(doc, schema)
    status_ok, _ = await bridge.get("/healthz")
    assert status_ok == 200


@pytest.mark.parametrize(
    "body",
    [b"2\r\n{}\r\n0\r\n\r\n", b"54\r\n" + b"x" * 79],  # whole; a chunk cut short
    ids=["whole-body", "unfinished-body"],
)
async def test_an_early_417_is_the_connections_only_answer(grpc_service: Any, body: bytes) -> None:
    """aiohttp answers an unknown Expect before any middleware runs, then lingers to
    read the rest of the body. The connection watchdog took that for a slow next head
    and wrote a 408 after the 417: two answers to one request (the fuzz test found it
    with a chunk that announced 84 bytes and sent 79)."""
    config = dataclasses.replace(
        TEST_CONFIG, service_target=grpc_service.target, header_timeout_seconds=0.3
    )
    request = (
        b"POST /api/report HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer "
        + API_KEY.encode()
        + b"\r\nExpect: \xff\xfe\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        + body
    )
    async with running_bridge(config) as b:
        answer = await raw_exchange(urlsplit(b.url).port or 0, request)
    assert status_of(answer) == 417, answer
    assert answer.count(b"HTTP/1.1 ") == 1, answer
    headers, rest = _split(answer)
    assert int(headers["content-length"]) == len(rest), answer


async def _answer_then_trickle(port: int, head: bytes, trickle: int, every: float) -> bytes:
    """Sends `head`, waits for the bridge's answer, then sends `trickle` more body bytes
    one at a time `every` seconds apart (the pacing is the stimulus, not a wait for
    an event); returns everything answered until the bridge closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        await writer.drain()
        async with asyncio.timeout(5):
            answer = await reader.readuntil(b"\r\n\r\n")
        for _ in range(trickle):
            await asyncio.sleep(every)  # the client's pace, not a synchronisation
            if writer.is_closing() or reader.at_eof():
                break
            writer.write(b"x")
            with contextlib.suppress(ConnectionError):
                await writer.drain()
        async with asyncio.timeout(10):
            with contextlib.suppress(ConnectionError):
                while chunk := await reader.read(65536):
                    answer += chunk
        return answer
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


@pytest.mark.parametrize("early", ["417 unknown Expect", "401 before the body is read"])
async def test_a_body_trickled_after_an_early_answer_draws_no_408(
    grpc_service: Any, early: str
) -> None:
    """After answering before the body was read, aiohttp reads and drops the rest of
    the body for up to its lingering time. Those bytes are not the next request's
    head: with a head timeout shorter than the lingering time, the watchdog took them
    for one and wrote a 408 after the first answer."""
    config = dataclasses.replace(
        TEST_CONFIG, service_target=grpc_service.target, header_timeout_seconds=0.3
    )
    token = b"wrong" if early.startswith("401") else API_KEY.encode()
    expect = b"Expect: fly-me-to-the-moon\r\n" if early.startswith("417") else b""
    head = (
        b"POST /api/report HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer "
        + token
        + b"\r\n"
        + expect
        + b"Content-Type: application/json\r\nContent-Length: 4000\r\n\r\n{"
    )
    async with running_bridge(config) as b:
        answer = await _answer_then_trickle(urlsplit(b.url).port or 0, head, 12, 0.1)
    assert status_of(answer) == int(early[:3]), answer
    assert answer.count(b"HTTP/1.1 ") == 1, answer


H2C = (
    b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
    b"HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n"
)
NEXT = b"GET /openapi.json HTTP/1.1\r\nHost: t\r\n\r\n"


@pytest.mark.parametrize(
    "first",
    [
        b"GET /healthz HTTP/1.1\r\nHost: t\r\n" + H2C + b"\r\n",
        b"POST /api/log HTTP/1.1\r\nHost: t\r\n" + H2C + b"Content-Length: 2\r\n\r\n{}",
    ],
    ids=["GET", "POST with a body"],
)
async def test_a_declined_upgrade_closes_its_connection(grpc_service: Any, first: bytes) -> None:
    """aiohttp's parser stops at the end of a request asking to upgrade to a protocol
    it does not take (`Upgrade: h2c`, curl --http2 on http://) and drops the bytes after
    it that came with it: a pipelined request there was never answered, its connection
    held open until the keep-alive timeout (30 s). The upgrade request is now answered
    with `Connection: close`, so the client resends the rest on a new connection at
    once (RFC 9112 9.3.2) instead of waiting."""
    config = dataclasses.replace(
        TEST_CONFIG, service_target=grpc_service.target, keepalive_timeout_seconds=30
    )
    async with running_bridge(config) as b:
        port = urlsplit(b.url).port or 0
        answer = await raw_exchange(port, first + NEXT, timeout=5)
        assert answer.count(b"HTTP/1.1 ") == 1, answer
        headers, _ = _split(answer)
        assert headers["connection"].lower() == "close", answer
        # Sent on its own later, after the answer, the next request is still served.
        assert await raw_exchange(port, NEXT.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
