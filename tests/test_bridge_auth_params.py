"""HTTP conventions at the edge: every 401 carries WWW-Authenticate (RFC 9110 11.6.1,
RFC 6750 3) with the contract's own body; every numeric query parameter out of range
is a 400 naming it; bytes that are not text in a header are a 4xx, never a 500."""

# ruff: noqa: F811  (pytest fixtures imported from tests.bridge_harness)
from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from jobwire.v1 import job_pb2
from tests.bridge_harness import VIDEO_AUTH, bridge, create_job, get_job, stub  # noqa: F401
from tests.bridge_process import raw_exchange, status_of

PLAIN = 'Bearer realm="jobwire"'
INVALID = 'Bearer realm="jobwire", error="invalid_token"'


async def test_401_carries_www_authenticate_and_the_contract_body(bridge: Any, stub: Any) -> None:
    cases: list[tuple[str, str, Any, dict[str, str], Any]] = [
        ("POST", "/api/batch-callback", {"jobId": "j", "status": "failed"}, {}, None),
        ("GET", "/api/pending", None, {}, {"error": "No autorizado"}),
        ("POST", "/api/report", {}, {}, {"error": "No autorizado"}),
        ("GET", "/api/log", None, {}, {"error": "No autorizado"}),
        ("POST", "/api/transcode-callback", {}, {}, None),
        ("GET", "/api/external/jobs/abc", None, {}, None),
    ]
    for method, path, body, headers, expected in cases:
        async with bridge.http.request(method, bridge.url + path, json=body, headers=headers) as r:
            assert r.status == 401, path
            assert r.headers["WWW-Authenticate"] == PLAIN, path
            if expected is not None:
                assert await r.json() == expected
    wrong = {"Authorization": "Bearer wrong"}
    created = await create_job(stub, job_pb2.JOB_KIND_EXTRACTION)
    cases[-1] = ("GET", f"/api/external/jobs/{created.job.id}", None, {}, None)
    for method, path, body, _, _ in cases[1:]:
        async with bridge.http.request(method, bridge.url + path, json=body, headers=wrong) as r:
            assert r.status == 401, path
            assert r.headers["WWW-Authenticate"] == INVALID, path
    batch = {"jobId": "j", "status": "failed", "callbackSecret": "wrong"}
    async with bridge.http.post(bridge.url + "/api/batch-callback", json=batch) as r:
        assert r.status == 401 and r.headers["WWW-Authenticate"] == INVALID
        assert await r.json() == {"error": "Ungültiger oder fehlender Authentifizierungsschlüssel"}
    async with bridge.http.post(bridge.url + "/api/transcode-callback/wrong", json={}) as r:
        assert r.status == 401 and r.headers["WWW-Authenticate"] == INVALID


# Signs that int() refuses (`--5`, `-+5`) passed the check and raised: 500. The rest
# are what int() would take but a query integer is not (`_`, non-ASCII digits, inner
# space). Percent-encoded: `+` in a query is a space.
NOT_INTEGERS = ["--5", "-+5", "%2B-5", "%2B%2B5", "5_000", "%D9%A3", "%EF%BC%95", "5%205", "1e3"]


# An empty `limit=` is not given (the default 50), as every empty optional video field:
# test_bridge_video.py::test_empty_log_query_parameters_are_not_given.
@pytest.mark.parametrize(
    "value", ["-5", "0", "1001", "99999999999999999999", "abc", "1.5", " ", *NOT_INTEGERS]
)
async def test_log_limit_out_of_range_is_400_naming_it(bridge: Any, value: str) -> None:
    status, body = await bridge.get(f"/api/log?limit={value}", headers=VIDEO_AUTH)
    assert status == 400
    assert body == {"error": "Parámetros inválidos: limit must be an integer from 1 to 1000"}


async def test_log_limit_edges_and_level(bridge: Any) -> None:
    assert (await bridge.get("/api/log?limit=1", headers=VIDEO_AUTH))[0] == 200
    assert (await bridge.get("/api/log?limit=1000", headers=VIDEO_AUTH))[0] == 200
    assert (await bridge.get("/api/log?limit=%2B5", headers=VIDEO_AUTH))[0] == 200
    assert (await bridge.get("/api/log?limit=%205%20", headers=VIDEO_AUTH))[0] == 200
    status, body = await bridge.get("/api/log?level=LOUD", headers=VIDEO_AUTH)
    assert status == 400 and "level" in body["error"]


@pytest.mark.parametrize("value", ["-1", "0", "10001", "x", *NOT_INTEGERS])
async def test_secretary_poll_limit_out_of_range_is_400_naming_it(
    bridge: Any, stub: Any, value: str
) -> None:
    created = await create_job(stub, job_pb2.JOB_KIND_EXTRACTION)
    auth = {"Authorization": f"Bearer {created.callback_token}"}
    path = f"/api/external/jobs/{created.job.id}?limit={value}"
    status, body = await bridge.get(path, headers=auth)
    assert (status, body) == (
        400,
        {"status": "error", "error": "limit must be an integer from 1 to 10000"},
    )


async def test_non_utf8_header_bytes_are_4xx_on_every_route(bridge: Any, stub: Any) -> None:
    """The reported case (Authorization: Bearer \\xe4\\xf6 -> 500) and its relatives."""
    port = int(bridge.url.rsplit(":", 1)[1])
    created = await create_job(stub, job_pb2.JOB_KIND_EXTRACTION)
    token = created.callback_token.encode()
    jid = created.job.id.encode()
    good_video = b"Authorization: Bearer test-api-key\r\n"
    requests = [
        b"GET /api/pending HTTP/1.1\r\nAuthorization: Bearer \xe4\xf6\r\n",
        b"GET /api/log HTTP/1.1\r\nAuthorization: Bearer \xe4\xf6\r\n",
        b"GET /api/pending HTTP/1.1\r\n" + good_video + b"X-Worker: \xff\xfe\r\n",
        b"POST /api/report HTTP/1.1\r\n" + good_video + b"Idempotency-Key: \xff\r\n",
        b"GET /api/external/jobs/" + jid + b" HTTP/1.1\r\nAuthorization: Bearer \xe4\xf6\r\n",
        b"GET /api/external/jobs/" + jid + b" HTTP/1.1\r\nX-Callback-Token: \xe4\r\n",
        b"POST /api/external/jobs/"
        + jid
        + b" HTTP/1.1\r\nAuthorization: Bearer "
        + token
        + b"\r\nIdempotency-Key: \xc0\xc1\r\n",
        b"POST /api/transcode-callback/%ff%fe HTTP/1.1\r\n",
        b"POST /api/transcode-callback HTTP/1.1\r\nX-Callback-Token: \xe4\xf6\r\n",
        b"POST /api/batch-callback HTTP/1.1\r\nExpect: \xe4\r\n",
        b"GET /healthz HTTP/1.1\r\nExpect: \xe4\r\n",
    ]
    body = b'{"status":"progress","message":"m","videoId":"v","phase":"p","progress":1}'
    answers = await asyncio.gather(
        *(
            raw_exchange(
                port,
                r
                + b"Host: t\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
                + body,
            )
            for r in requests
        )
    )
    statuses = [status_of(a) for a in answers]
    assert all(s is not None and 400 <= s < 500 for s in statuses), statuses
    assert statuses[:2] == [401, 401] and statuses[2:4] == [400, 400]


async def test_a_header_that_is_not_text_is_named_in_the_video_contracts_body(
    bridge: Any,
) -> None:
    """`X-Worker: w\\xff` on GET /api/pending answered the 400 of POST /api/report's
    body ("Faltan campos requeridos: status, videoId, message"), naming fields that
    request has none of; the same for a bad `Idempotency-Key` on the report."""
    port = int(bridge.url.rsplit(":", 1)[1])
    auth = b"Authorization: Bearer test-api-key\r\nHost: t\r\nConnection: close\r\n"
    report = b'{"status":"progress","message":"m","videoId":"v"}'
    cases = [
        (b"GET /api/pending HTTP/1.1\r\nX-Worker: w\xff\r\n" + auth + b"\r\n", "X-Worker"),
        (
            b"POST /api/report HTTP/1.1\r\nIdempotency-Key: k\xff\r\n"
            + auth
            + b"Content-Length: %d\r\n\r\n" % len(report)
            + report,
            "Idempotency-Key",
        ),
    ]
    for request, header in cases:
        answer = await raw_exchange(port, request)
        assert status_of(answer) == 400, answer
        body = orjson.loads(answer.split(b"\r\n\r\n", 1)[1])
        assert body == {"error": f"Solicitud inválida: {header} header is not valid UTF-8"}
    # Valid UTF-8 holding a character that is not text (a tab, a zero-width space) is
    # named as such: it was "not valid UTF-8 text" too, the wrong reason.
    for value, code in ((b"k\tk", "U+0009"), ("k\u200bk".encode(), "U+200B")):
        answer = await raw_exchange(port, cases[1][0].replace(b"k\xff", value))
        assert status_of(answer) == 400, answer
        body = orjson.loads(answer.split(b"\r\n\r\n", 1)[1])
        problem = f"Idempotency-Key header holds a character that is not printable text ({code})"
        assert body == {"error": f"Solicitud inválida: {problem}"}, body


async def _expecting_continue(port: int, head: bytes) -> tuple[bytes, bytes]:
    """Sends `head` (Expect: 100-continue) and, as a client does, no body until the
    bridge's first answer: that answer's head, and all the bridge sends until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
        if b" 100 " in first.split(b"\r\n", 1)[0]:
            return first, b""
        async with asyncio.timeout(5.0):
            rest = await reader.read()  # to the close: the body is not awaited
        return first, rest
    finally:
        writer.close()


async def test_100_continue_comes_only_after_the_credential_is_checked(
    bridge: Any, stub: Any
) -> None:
    """aiohttp answered `100 Continue` as soon as the route was known, before the
    handler checked the credential: a client with a wrong token was invited to send
    its body (up to 256 MiB for the Secretary), and the 401 came after it. Now a
    request refused before its body is read gets its refusal instead of the 100,
    and the connection closes (the client will not send that body); one that passes
    gets the 100 when its body is wanted."""
    port = int(bridge.url.rsplit(":", 1)[1])
    created = await create_job(stub, job_pb2.JOB_KIND_EXTRACTION)
    jid = created.job.id.encode()
    big = b"Content-Length: %d\r\n" % (100 * 1024 * 1024)
    refused = [
        (b"POST /api/report", b"Authorization: Bearer wrong\r\n" + big, 401),
        (b"POST /api/log", big, 401),
        (b"POST /api/transcode-callback/wrong", big, 401),
        (b"POST /api/external/jobs/" + jid, b"Authorization: Bearer wrong\r\n" + big, 401),
        (
            b"POST /api/external/jobs/no-such-job",
            b"X-Callback-Token: " + b"x" * 43 + b"\r\n" + big,
            404,
        ),
        (b"POST /api/report", b"Authorization: Bearer test-api-key\r\n" + big, 413),
    ]
    answers = await asyncio.gather(
        *(
            _expecting_continue(
                port,
                target + b" HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\n" + headers + b"\r\n",
            )
            for target, headers, _ in refused
        )
    )
    for (target, _, status), (first, rest) in zip(refused, answers, strict=True):
        assert status_of(first) == status, (target, first)
        assert b"Connection: close" in first, first
        assert rest.count(b"HTTP/1.1 ") == 0 and rest.startswith(b"{"), rest

    # A request that passes its checks gets the 100, then its answer.
    body = b'{"level":"INFO","message":"m","timestamp":"2024-01-01T00:00:00Z"}'
    head = (
        b"POST /api/log HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nConnection: close\r\n"
        b"Authorization: Bearer test-api-key\r\nContent-Length: %d\r\n\r\n" % len(body)
    )
    assert status_of(await _continued(port, head, body)) == 200


async def _continued(port: int, head: bytes, body: bytes) -> bytes:
    """Sends `head`, waits for `100 Continue` (asserted), sends `body`: the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n", interim
        writer.write(body)
        return await asyncio.wait_for(reader.read(), 5.0)
    finally:
        writer.close()


async def test_100_continue_waits_for_the_secretary_token_at_any_body_size(
    bridge: Any, stub: Any
) -> None:
    """A Secretary callback's token was checked before the 100 only for a body past
    JOBWIRE_MAX_BODY_BYTES: a small one with a wrong token got `100 Continue`, sent its
    body, then the 401. The token is checked first for every size now; the job's own
    token still gets the 100, then its answer."""
    port = int(bridge.url.rsplit(":", 1)[1])
    created = await create_job(stub, job_pb2.JOB_KIND_EXTRACTION)
    path = b"POST /api/external/jobs/" + created.job.id.encode() + b" HTTP/1.1\r\n"
    body = b'{"phase":"extracting","progress":10}'
    head = path + b"Host: t\r\nExpect: 100-continue\r\nContent-Length: %d\r\n" % len(body)
    first, rest = await _expecting_continue(port, head + b"Authorization: Bearer wrong\r\n\r\n")
    assert status_of(first) == 401 and b"Connection: close" in first, first
    assert rest.startswith(b"{") and b"HTTP/1.1 " not in rest, rest

    token = created.callback_token.encode()
    whole = head + b"Connection: close\r\nAuthorization: Bearer " + token + b"\r\n\r\n"
    assert status_of(await _continued(port, whole, body)) == 200
    assert (await get_job(stub, created.job.id)).sequence == 1


async def test_openapi_documents_the_edge(bridge: Any) -> None:
    _, doc = await bridge.get("/openapi.json")
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            if not path.startswith("/api/"):
                continue
            where = f"{method.upper()} {path}"
            assert "WWW-Authenticate" in op["responses"]["401"]["headers"], where
            assert "Retry-After" in op["responses"]["429"]["headers"], where
            assert "408" in op["responses"], where
            names = {p["name"] for p in op["parameters"]}
            assert {"webhook-id", "webhook-timestamp", "webhook-signature"} <= names, where
    limit = doc["paths"]["/api/log"]["get"]["parameters"][0]
    assert limit["schema"]["maximum"] == 1000
