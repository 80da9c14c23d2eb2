"""The dashboard's edge against bytes, not only valid strings: credentials, cookies,
CSRF tokens and forms that are not ASCII (or not UTF-8, or not well formed) get a
4xx, never a 500 and never a traceback. Raw bytes over a real socket, because an HTTP
client library would refuse to send most of them."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest

from dashboard.auth import COOKIE, Auth
from dashboard.config import DashboardConfig
from dashboard.server import runner_for, site_for
from jobwire.v1 import job_service_pb2
from tests.bridge_process import raw_exchange, status_of, trickle_head
from tests.helpers import create
from tests.test_dashboard_auth import serve

TOKEN = "hostile-test-token-abcdefghijklmnop"
FORM = b"Content-Type: application/x-www-form-urlencoded\r\n"


def _request(line: bytes, headers: bytes = b"", body: bytes = b"") -> bytes:
    length = b"Content-Length: %d\r\n" % len(body) if body else b""
    return line + b"\r\nHost: t\r\n" + headers + b"Connection: close\r\n" + length + b"\r\n" + body


def _cases(session: str) -> dict[str, tuple[bytes, int]]:
    cookie = f"Cookie: {COOKIE}={session}\r\n".encode()
    return {
        "bearer not UTF-8": (
            _request(b"GET /api/jobs HTTP/1.1", b"Authorization: Bearer \xff\xfe\r\n"),
            401,
        ),
        "bearer not ASCII": (
            _request(b"GET /api/jobs HTTP/1.1", "Authorization: Bearer é\r\n".encode()),
            401,
        ),
        "cookie signature not ASCII": (
            _request(b"GET /api/jobs HTTP/1.1", f"Cookie: {COOKIE}=a.9999999999.éé\r\n".encode()),
            401,
        ),
        "cookie not UTF-8": (
            _request(
                b"GET /api/jobs HTTP/1.1", f"Cookie: {COOKIE}=a.9999999999.".encode() + b"\xff\r\n"
            ),
            401,
        ),
        "CSRF header not ASCII": (
            _request(b"POST /logout HTTP/1.1", cookie + "X-CSRF-Token: é\r\n".encode()),
            403,
        ),
        "CSRF header not UTF-8": (
            _request(b"POST /logout HTTP/1.1", cookie + b"X-CSRF-Token: \xff\r\n"),
            403,
        ),
        "CSRF form field not ASCII": (
            _request(b"POST /logout HTTP/1.1", cookie + FORM, b"csrf=%C3%A9"),
            403,
        ),
        "form body not UTF-8": (
            _request(b"POST /logout HTTP/1.1", cookie + FORM, b"csrf=\xff\xfe"),
            400,
        ),
        "multipart form broken": (
            _request(
                b"POST /login HTTP/1.1",
                b"Content-Type: multipart/form-data; boundary=xx\r\n",
                b"--xx\r\ngarbage",
            ),
            400,
        ),
        "login token not ASCII": (_request(b"POST /login HTTP/1.1", FORM, b"token=%C3%A9"), 401),
    }


@pytest.mark.parametrize("case", sorted(_cases("x")))
async def test_hostile_credentials_and_forms_get_a_4xx(
    grpc_service: Any, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = DashboardConfig(service_target=grpc_service.target, token=TOKEN)
    request, expected = _cases(Auth(cfg).new_session())[case]
    with caplog.at_level(logging.ERROR):
        async with serve(cfg) as url:
            answer = await raw_exchange(urlsplit(url).port or 0, request)
    assert status_of(answer) == expected, answer[:400]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text[-2000:]


@pytest.mark.parametrize(
    "user", [b"\xff\xfeop", "op\u200bs".encode()], ids=["not UTF-8", "not printable"]
)
async def test_a_garbled_trusted_user_header_is_not_a_user(
    grpc_service: Any, user: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """Behind a proxy that names the user: a value that is not printable text is
    refused (401), as if the proxy had not named anyone."""
    cfg = DashboardConfig(service_target=grpc_service.target, trusted_user_header="X-User")
    cfg = dataclasses.replace(cfg, token="")
    with caplog.at_level(logging.ERROR):
        async with serve(cfg) as url:
            port = urlsplit(url).port or 0
            bad = await raw_exchange(
                port, _request(b"GET /api/jobs HTTP/1.1", b"X-User: " + user + b"\r\n")
            )
            good = await raw_exchange(
                port, _request(b"GET /api/jobs HTTP/1.1", "X-User: José\r\n".encode())
            )
    assert status_of(bad) == 401, bad[:400]
    assert status_of(good) == 200, good[:400]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text[-2000:]


@contextlib.asynccontextmanager
async def guarded(cfg: DashboardConfig) -> AsyncIterator[int]:
    """The dashboard as `jobwire dashboard` serves it (runner and site), on a free port."""
    cfg = dataclasses.replace(cfg, host="127.0.0.1", port=0)
    runner = runner_for(cfg)
    await runner.setup()
    await site_for(runner, cfg).start()
    try:
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


async def test_a_trickled_head_gets_408_and_a_held_stream_is_unaffected(
    grpc_service: Any,
) -> None:
    """The bridge's watchdog guards the dashboard too: a head not complete within the
    head timeout is cut with 408 while it is still trickling, while a live stream
    (a server-sent events request, open far longer) goes on."""
    cfg = DashboardConfig(
        service_target=grpc_service.target, token=TOKEN, header_timeout_seconds=0.5
    )
    async with guarded(cfg) as port:
        stream_reader, stream_writer = await asyncio.open_connection("127.0.0.1", port)
        stream_writer.write(
            _request(b"GET /events/jobs HTTP/1.1", f"Authorization: Bearer {TOKEN}\r\n".encode())
        )
        async with asyncio.timeout(5):
            assert b" 200 " in await stream_reader.readuntil(b"\r\n\r\n")
        head = b"GET /jobs HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer x"
        # One byte every 0.1 s: 5 s for the whole head.
        answer, elapsed = await trickle_head(port, head, 0.1, 5)
        assert status_of(answer) == 408, answer
        assert elapsed < len(head) * 0.1
        assert not stream_reader.at_eof()  # the stream outlived the head timeout
        stream_writer.close()


async def test_connections_past_the_cap_get_503(grpc_service: Any) -> None:
    cfg = DashboardConfig(service_target=grpc_service.target, token=TOKEN, max_connections=2)
    async with guarded(cfg) as port:
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        answer = await raw_exchange(port, _request(b"GET /healthz HTTP/1.1"))
        assert status_of(answer) == 503, answer
        assert b"Retry-After: 5" in answer
        for _, writer in held:
            writer.close()


async def test_a_form_that_never_finishes_gets_408(grpc_service: Any) -> None:
    """A login form announced at 100 bytes, 10 sent: answered 408 at the head timeout
    (it used to wait for the rest for as long as the client held the connection)."""
    cfg = DashboardConfig(
        service_target=grpc_service.target, token=TOKEN, header_timeout_seconds=0.5
    )
    head = b"POST /login HTTP/1.1\r\nHost: t\r\n" + FORM + b"Content-Length: 100\r\n\r\n"
    async with guarded(cfg) as port:
        started = time.monotonic()
        answer = await raw_exchange(port, head + b"token=abcd", timeout=5)
    assert status_of(answer) == 408, answer[:300]
    assert time.monotonic() - started < 4


async def test_numbers_in_other_scripts_are_not_numbers(grpc_service: Any) -> None:
    """`str.isdigit` accepts digits of every script ("١٢" is 12 to int()): a page size
    or Last-Event-ID must be ASCII digits."""
    cfg = DashboardConfig(service_target=grpc_service.target, token=TOKEN)
    auth = f"Authorization: Bearer {TOKEN}\r\n".encode()
    async with guarded(cfg) as port:
        size = await raw_exchange(
            port, _request(b"GET /api/jobs?page_size=%D9%A1%D9%A2 HTTP/1.1", auth)
        )
        event = await raw_exchange(
            port, _request(b"GET /events/jobs/x HTTP/1.1", auth + "Last-Event-ID: ١٢\r\n".encode())
        )
    assert status_of(size) == 400 and b"page_size" in size, size[:400]
    assert status_of(event) == 400 and b"Last-Event-ID" in event, event[:400]


@pytest.mark.parametrize(
    "target",
    ["/\t/evil.example/x", "/\n/evil.example", "/\r/evil.example", "/ /evil.example", "/\\evil"],
    ids=["tab", "newline", "CR", "space", "backslash"],
)
async def test_login_never_redirects_off_site(grpc_service: Any, target: str) -> None:
    """Browsers drop tabs and newlines from a Location before resolving it, so "/\\t/host"
    became "//host": an open redirect past the "//" check. A newline also made the
    Location header itself fail (a 500). Only a plain path of printable ASCII is kept."""
    from urllib.parse import quote

    cfg = DashboardConfig(service_target=grpc_service.target, token=TOKEN)
    body = f"token={TOKEN}&next={quote(target, safe='')}".encode()
    async with guarded(cfg) as port:
        answer = await raw_exchange(port, _request(b"POST /login HTTP/1.1", FORM, body))
    assert status_of(answer) == 303, answer[:300]
    assert b"\r\nLocation: /jobs\r\n" in answer, answer[:400]


async def test_unknown_paths_and_methods_get_the_dashboards_own_answers(
    grpc_service: Any,
) -> None:
    """Served as `jobwire dashboard` serves it (the bridge's connection watchdog): a path no
    route has, or a method it does not take, got the bridge's callback error body
    (`{"status": "error", "error": "no such path", "ack": false}`) as raw JSON in the
    browser. Pages answer with the dashboard's error page, /api/ and /events/ with its
    JSON error shape."""
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    async with (
        aiohttp.ClientSession() as http,
        guarded(DashboardConfig(service_target=grpc_service.target, token=TOKEN)) as port,
    ):
        url = f"http://127.0.0.1:{port}"
        for path in ("/nope", "/jobs/", "/jobs/a/b/c", "/jobs/some-job/artifacts/"):
            async with http.get(url + path, headers=bearer) as reply:
                body = await reply.text()
                assert reply.status == 404, path
                assert reply.content_type == "text/html", (path, body)
                assert "Error 404" in body and '<a href="/jobs">' in body, body
                assert reply.headers["X-Frame-Options"] == "DENY"
        for path in ("/api/nope", "/events/nope"):
            async with http.get(url + path, headers=bearer) as reply:
                assert reply.status == 404
                assert set(await reply.json()) == {"error"}, path
        async with http.get(url + "/jobs/some-job/cancel", headers=bearer) as reply:
            assert reply.status == 405
            assert reply.headers["Allow"] == "POST"
            assert reply.content_type == "text/html" and "Error 405" in await reply.text()
        async with http.head(url + "/nope", headers=bearer) as reply:
            assert reply.status == 404
        # Without a login, any path is the login page (what is there is not revealed).
        async with http.get(url + "/nope") as reply:
            assert reply.status == 401 and 'name="token"' in await reply.text()


async def _head_then_get(port: int, path: str) -> bytes:
    """HEAD `path`, then GET /healthz on the same connection: what came back in 5 s."""
    auth = f"Authorization: Bearer {TOKEN}\r\n".encode()
    head = b"HEAD " + path.encode() + b" HTTP/1.1\r\nHost: t\r\n" + auth + b"\r\n"
    get = b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    chunks = []
    try:
        writer.write(head + get)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                while chunk := await reader.read(65536):
                    chunks.append(chunk)
    finally:
        writer.close()
    return b"".join(chunks)


async def test_head_answers_headers_only(grpc_service: Any) -> None:
    """HEAD on a stream or a download sent the body anyway (the stream's events, the
    artifact's bytes): on a kept-alive connection the next answer then began inside it
    (or never came, behind an endless stream). Now the headers only, the next request
    answered right after them."""
    stub = grpc_service.stub
    job_id = f"head-{time.monotonic_ns()}"
    await create(stub, job_id=job_id)

    async def parts() -> AsyncIterator[job_service_pb2.UploadArtifactRequest]:
        header = job_service_pb2.ArtifactHeader(
            job_id=job_id, name="out.txt", content_type="text/plain"
        )
        yield job_service_pb2.UploadArtifactRequest(header=header)
        yield job_service_pb2.UploadArtifactRequest(data=b"artifact bytes")

    await stub.UploadArtifact(parts())
    cfg = DashboardConfig(service_target=grpc_service.target, token=TOKEN)
    async with guarded(cfg) as port:
        for path, content_type in (
            (f"/jobs/{job_id}/artifacts/out.txt", b"text/plain"),
            (f"/events/jobs/{job_id}", b"text/event-stream"),
            ("/events/jobs", b"text/event-stream"),
            ("/jobs", b"text/html"),
        ):
            answer = await _head_then_get(port, path)
            head, _, rest = answer.partition(b"\r\n\r\n")
            assert status_of(head) == 200 and content_type in head, (path, head)
            assert rest.startswith(b"HTTP/1.1 200 OK\r\n") and rest.endswith(b"\r\n\r\nok\n"), (
                path,
                rest[:300],
            )
