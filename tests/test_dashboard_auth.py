"""Dashboard access without a browser: closed by default, the trusted proxy header,
forged or expired cookies, CSRF for header-authenticated users, token generation."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import html
import os
import re
import stat
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from dashboard.app import create_app
from dashboard.auth import COOKIE, Auth
from dashboard.config import DashboardConfig, load_config
from jobwire.v1 import job_pb2, job_service_pb2
from tests.helpers import create

TOKEN = "auth-test-token-abcdefghijklmnop"


@contextlib.asynccontextmanager
async def serve(config: DashboardConfig) -> AsyncIterator[str]:
    runner = web.AppRunner(create_app(config), handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        yield session


def config(grpc_service: Any, **kw: Any) -> DashboardConfig:
    return dataclasses.replace(DashboardConfig(service_target=grpc_service.target), **kw)


async def test_closed_without_a_token(grpc_service: Any, http: aiohttp.ClientSession) -> None:
    async with serve(config(grpc_service)) as url:
        async with http.get(url + "/api/jobs") as reply:
            assert reply.status == 401
        async with http.post(url + "/login", data={"token": ""}) as reply:
            assert reply.status == 401
            assert "closed" in await reply.text()
            assert COOKIE not in reply.cookies
        async with http.get(url + "/healthz") as reply:
            assert reply.status == 200


async def test_trusted_user_header_only_when_configured(
    grpc_service: Any, http: aiohttp.ClientSession
) -> None:
    created = await grpc_service.stub.CreateJob(
        job_service_pb2.CreateJobRequest(job=job_pb2.Job(kind=job_pb2.JOB_KIND_GENERIC))
    )
    job_id = created.job.id
    user = {"X-Forwarded-User": "alice@example.com"}
    async with (
        serve(config(grpc_service, token=TOKEN)) as url,
        http.get(url + "/api/jobs", headers=user) as reply,
    ):
        assert reply.status == 401, "the header means nothing unless configured"
    cfg = config(grpc_service, trusted_user_header="X-Forwarded-User")
    async with serve(cfg) as url:
        async with http.get(url + "/api/jobs") as reply:
            assert reply.status == 401
        async with http.get(f"{url}/jobs/{job_id}", headers=user) as reply:
            assert reply.status == 200
            page = await reply.text()
        async with http.post(f"{url}/jobs/{job_id}/cancel", headers=user, data={}) as reply:
            assert reply.status == 403
        get = job_service_pb2.GetJobRequest(id=job_id)
        assert (await grpc_service.stub.GetJob(get)).state == job_pb2.JOB_STATE_QUEUED
        csrf = page.split('name="csrf" value="', 1)[1].split('"', 1)[0]
        form = {"csrf": csrf}
        async with http.post(
            f"{url}/jobs/{job_id}/cancel", headers=user, data=form, allow_redirects=False
        ) as reply:
            assert reply.status == 303
        assert (await grpc_service.stub.GetJob(get)).state == job_pb2.JOB_STATE_CANCELLED


async def test_forged_and_expired_cookies_are_refused(
    grpc_service: Any, http: aiohttp.ClientSession
) -> None:
    cfg = config(grpc_service, token=TOKEN)
    auth = Auth(cfg)
    good = auth.new_session()
    payload, _, signature = good.rpartition(".")
    session_id, _, _ = payload.partition(".")
    expired = Auth(dataclasses.replace(cfg, session_seconds=-10)).new_session()
    other_key = Auth(dataclasses.replace(cfg, token="another-token-entirely")).new_session()
    forged_expiry = f"{session_id}.{int(time.time()) + 10**6}.{signature}"
    async with serve(cfg) as url:
        async with http.get(url + "/api/jobs", headers={"Cookie": f"{COOKIE}={good}"}) as r:
            assert r.status == 200
        for cookie in (expired, other_key, forged_expiry, "garbage", good + "x"):
            async with http.get(url + "/api/jobs", headers={"Cookie": f"{COOKIE}={cookie}"}) as r:
                assert r.status == 401, cookie


async def test_a_csrf_token_is_never_a_session_cookie(
    grpc_service: Any, http: aiohttp.ClientSession
) -> None:
    """Token and proxy header both set: a proxy user named "x.<digits>" got a CSRF token
    that, sent as the cookie, was a session until the year 5138, without the header."""
    cfg = config(grpc_service, token=TOKEN, trusted_user_header="X-Forwarded-User")
    user = "mallory.99999999999"
    async with serve(cfg) as url:
        async with http.get(url + "/jobs", headers={"X-Forwarded-User": user}) as reply:
            assert reply.status == 200
            page = await reply.text()
        csrf = page.split('name="csrf" value="', 1)[1].split('"', 1)[0]
        cookie = {"Cookie": f"{COOKIE}=csrf:user:{user}.{csrf}"}
        async with http.get(url + "/api/jobs", headers=cookie) as reply:
            assert reply.status == 401


async def test_wrong_tokens_are_limited_per_client_address(
    grpc_service: Any, http: aiohttp.ClientSession
) -> None:
    """Login form and Bearer alike: a guesser tried thousands of tokens a second. Past
    the limit every token from that address is refused unread (the right one too, so a
    429 tells nothing), sessions already open go on, other addresses are not affected."""
    cfg = config(grpc_service, token=TOKEN, login_rate=3 / 60, login_burst=3)
    async with serve(cfg) as url:
        async with http.post(url + "/login", data={"token": TOKEN}, allow_redirects=False) as r:
            assert r.status == 303
            session = {"Cookie": f"{COOKIE}={r.cookies[COOKIE].value}"}
        for guess in ("guess-1", "guess-2"):
            async with http.post(url + "/login", data={"token": guess}) as reply:
                assert reply.status == 401
        async with http.get(url + "/api/jobs", headers={"Authorization": "Bearer g3"}) as reply:
            assert reply.status == 401
        async with http.post(url + "/login", data={"token": TOKEN}, allow_redirects=False) as r:
            assert r.status == 429, "the right token too, once the address is past its limit"
            assert 1 <= int(r.headers["Retry-After"]) <= 20
            assert COOKIE not in r.cookies
            assert "Too many wrong tokens" in await r.text()
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        async with http.get(url + "/api/jobs", headers=bearer) as reply:
            assert reply.status == 429
            assert "Retry-After" in reply.headers
            assert "too many wrong tokens" in (await reply.json())["error"]
        async with http.get(url + "/jobs", headers={"Authorization": "Bearer g4"}) as reply:
            assert reply.status == 429
            assert reply.content_type == "text/html"
        async with http.get(url + "/api/jobs", headers=session) as reply:
            assert reply.status == 200, "a session opened before goes on"
        elsewhere = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
        async with (
            aiohttp.ClientSession(connector=elsewhere) as other,
            other.post(url + "/login", data={"token": TOKEN}, allow_redirects=False) as r,
        ):
            assert r.status == 303, "another address logs in"


async def test_an_open_stream_ends_with_its_session(
    grpc_service: Any, http: aiohttp.ClientSession
) -> None:
    """A session lasts `session_seconds`, but a stream opened with it went on for ever
    (heartbeats kept it open): a tab, or whoever held the cookie, kept watching."""
    created = await grpc_service.stub.CreateJob(
        job_service_pb2.CreateJobRequest(job=job_pb2.Job(kind=job_pb2.JOB_KIND_GENERIC))
    )
    cfg = config(grpc_service, token=TOKEN, session_seconds=2, heartbeat_seconds=0.2)
    async with serve(cfg) as url:
        async with http.post(url + "/login", data={"token": TOKEN}, allow_redirects=False) as r:
            session = {"Cookie": f"{COOKIE}={r.cookies[COOKIE].value}"}

        async def to_the_end(path: str) -> None:
            async with http.get(url + path, headers=session) as reply:
                assert reply.status == 200
                async for _ in reply.content.iter_any():
                    pass

        async with asyncio.timeout(10):  # the session has at most 2 s left
            await asyncio.gather(
                to_the_end("/events/jobs"), to_the_end(f"/events/jobs/{created.job.id}")
            )
        async with http.get(url + "/events/jobs", headers=session) as reply:
            assert reply.status == 401


def test_make_run_generates_the_token_and_never_prints_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env_file = tmp_path / "jobwire.env"
    env = {"JOBWIRE_ENV_FILE": str(env_file)}
    generated = load_config(env, generate=True)
    assert len(generated.token) >= 32
    assert stat.S_IMODE(os.stat(env_file).st_mode) == 0o600
    assert f"JOBWIRE_DASHBOARD_TOKEN={generated.token}" in env_file.read_text()
    out = capsys.readouterr()
    assert generated.token not in out.out + out.err
    assert "JOBWIRE_DASHBOARD_TOKEN" in out.out
    # Read back, not generated again; the environment wins over the file.
    assert load_config(env, generate=True).token == generated.token
    assert load_config({**env, "JOBWIRE_DASHBOARD_TOKEN": "from-env"}).token == "from-env"
    # A deployed dashboard (no generate) without a token stays closed.
    assert load_config({"JOBWIRE_ENV_FILE": str(tmp_path / "none.env")}).closed


async def test_cookie_is_secure_behind_https_and_assets_cache(
    grpc_service: Any, http: aiohttp.ClientSession
) -> None:
    async with serve(config(grpc_service, token=TOKEN)) as url:
        form = {"token": TOKEN, "next": "//evil.example/x"}
        async with http.post(url + "/login", data=form, allow_redirects=False) as reply:
            assert reply.status == 303
            assert reply.headers["Location"] == "/jobs", "no open redirect"
            cookie = reply.headers["Set-Cookie"]
            assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
            assert "Secure" not in cookie
        headers = {"X-Forwarded-Proto": "https"}
        async with http.post(
            url + "/login", data=form, headers=headers, allow_redirects=False
        ) as reply:
            assert "Secure" in reply.headers["Set-Cookie"]
        async with http.get(url + "/login") as reply:
            page = await reply.text()
            assert "script-src 'self'" in reply.headers["Content-Security-Policy"]
            assert reply.headers["X-Frame-Options"] == "DENY"
        script = page.split('<script type="module" src="', 1)[1].split('"', 1)[0]
        assert "?v=" in script
        async with http.get(url + script) as reply:
            assert reply.status == 200
            assert reply.content_type == "text/javascript"
            assert "immutable" in reply.headers["Cache-Control"]
            etag = reply.headers["ETag"]
        async with http.get(url + script, headers={"If-None-Match": etag}) as reply:
            assert reply.status == 304


async def test_logout_needs_csrf_and_clears_the_cookie(
    grpc_service: Any, http: aiohttp.ClientSession
) -> None:
    async with serve(config(grpc_service, token=TOKEN)) as url:
        async with http.post(url + "/login", data={"token": TOKEN}, allow_redirects=False) as reply:
            session = reply.cookies[COOKIE].value
        cookie = {"Cookie": f"{COOKIE}={session}"}
        async with http.get(url + "/jobs", headers=cookie) as reply:
            page = await reply.text()
        csrf = page.split('name="csrf" value="', 1)[1].split('"', 1)[0]
        async with http.post(url + "/logout", headers=cookie, data={}) as reply:
            assert reply.status == 403
        async with http.post(
            url + "/logout", headers=cookie, data={"csrf": csrf}, allow_redirects=False
        ) as reply:
            assert reply.status == 303
            assert reply.cookies[COOKIE].value == ""


async def test_the_jobs_pages_resync_query_keeps_a_label_filter_whole(
    grpc_service: Any, http: aiohttp.ClientSession
) -> None:
    """After a reconnect the jobs page re-reads its rows from `/api/jobs?<data-query>`.
    That query must be the one the page was asked with, still percent-encoded: decoded,
    a label value holding `&`, `+` or `%` became another filter."""
    tag = uuid.uuid4().hex[:8]
    wanted = await create(grpc_service.stub, job_id=f"amp-{tag}", team=f"{tag}&b+c%d")
    await create(grpc_service.stub, job_id=f"plain-{tag}", team=tag)
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    async with serve(config(grpc_service, token=TOKEN)) as url:
        query = f"label=team%3D{tag}%26b%2Bc%25d"
        async with http.get(f"{url}/jobs?{query}", headers=bearer) as reply:
            assert reply.status == 200
            page = await reply.text()
        found = re.search(r'data-query="([^"]*)"', page)
        assert found is not None
        resync = html.unescape(found.group(1))
        assert resync == query
        async with http.get(f"{url}/api/jobs?{resync}", headers=bearer) as reply:
            assert reply.status == 200, await reply.text()
            ids = [job["id"] for job in (await reply.json())["jobs"]]
        # The scheme in any case, as HTTP reads it (`bearer` was a 401).
        lower = {"Authorization": f"bearer {TOKEN}"}
        async with http.get(f"{url}/api/jobs?{resync}", headers=lower) as reply:
            assert reply.status == 200, await reply.text()
    assert ids == [wanted.job.id]


def test_a_short_token_is_warned_about_at_start() -> None:
    assert DashboardConfig().warnings() == [
        "dashboard is closed: set JOBWIRE_DASHBOARD_TOKEN to open it"
    ]
    (short,) = DashboardConfig(token="hunter2").warnings()
    assert "JOBWIRE_DASHBOARD_TOKEN is 7 characters" in short and "hunter2" not in short
    assert DashboardConfig(token=TOKEN).warnings() == []
    proxied = DashboardConfig(trusted_user_header="X-Forwarded-User")
    (rebinding,) = proxied.warnings()
    assert "without JOBWIRE_DASHBOARD_ALLOWED_HOSTS" in rebinding
    named = dataclasses.replace(proxied, allowed_hosts=frozenset({"dash.example.com"}))
    assert named.warnings() == []


async def test_a_host_not_allowed_is_refused_before_anyone_is_logged_in(
    grpc_service: Any, http: aiohttp.ClientSession
) -> None:
    """DNS rebinding: a page of evil.example whose name was pointed at the dashboard is
    same-origin for that page's script, which can set the trusted user header itself;
    it was logged in as whoever it named. With JOBWIRE_DASHBOARD_ALLOWED_HOSTS a Host
    not listed gets 421, before authentication; probes answer whatever the Host."""
    user = {"X-Forwarded-User": "alice@example.com"}
    allowed = frozenset({"dash.example.com", "127.0.0.1:8443"})
    cfg = config(grpc_service, trusted_user_header="X-Forwarded-User", allowed_hosts=allowed)
    async with serve(cfg) as url:

        async def status(path: str, host: str, **kw: Any) -> tuple[int, str]:
            async with http.get(url + path, headers={**user, "Host": host}, **kw) as reply:
                return reply.status, await reply.text()

        code, body = await status("/api/jobs", "evil.example")
        assert code == 421 and "does not answer to the host 'evil.example'" in body
        code, body = await status("/jobs", "evil.example:8081")
        assert code == 421 and "evil.example:8081" in body and "alice" not in body
        assert (await status("/api/jobs", "DASH.example.com"))[0] == 200  # any case
        assert (await status("/api/jobs", "dash.example.com:8081"))[0] == 200  # any port
        assert (await status("/api/jobs", "127.0.0.1:8443"))[0] == 200
        assert (await status("/api/jobs", "127.0.0.1:8081"))[0] == 421  # not that port
        assert (await status("/api/jobs", "dash.example.com.evil.example"))[0] == 421
        assert (await status("/healthz", "10.0.0.7:8081"))[0] == 200
        # A Host of bytes that are no text: refused, named with the bytes escaped.
        reader, writer = await asyncio.open_connection(*url.removeprefix("http://").split(":"))
        writer.write(
            b"GET /api/jobs HTTP/1.1\r\nHost: d\xffx\r\nX-Forwarded-User: a\r\n"
            b"Connection: close\r\n\r\n"
        )
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 421 ")
        assert b"does not answer to the host" in answer and b"\xff" not in answer


def test_allowed_hosts_are_checked_at_start(tmp_path: Path) -> None:
    none = {"JOBWIRE_ENV_FILE": str(tmp_path / "none.env")}
    env = {**none, "JOBWIRE_DASHBOARD_ALLOWED_HOSTS": " Dash.Example.com, [::1]:8081 ,"}
    assert load_config(env).allowed_hosts == {"dash.example.com", "[::1]:8081"}
    assert load_config(none).allowed_hosts == frozenset()
    for bad in ("https://dash.example.com", "dash.example.com/jobs", "dash example", "-x"):
        with pytest.raises(SystemExit, match="JOBWIRE_DASHBOARD_ALLOWED_HOSTS must list"):
            load_config({**none, "JOBWIRE_DASHBOARD_ALLOWED_HOSTS": bad})


async def test_pages_about_jobs_are_never_stored_by_a_cache(
    grpc_service: Any, http: aiohttp.ClientSession
) -> None:
    """Every page and API answer behind the login carries `Cache-Control: no-store`: they
    had no Cache-Control, so a browser kept them (Back after logging out showed the jobs
    again) and a shared proxy could have served them to someone else. The assets keep
    their long cache."""
    job_id = f"nocache-{uuid.uuid4().hex[:8]}"
    await create(grpc_service.stub, job_id=job_id)
    async with serve(config(grpc_service, token=TOKEN)) as url:
        async with http.post(url + "/login", data={"token": TOKEN}, allow_redirects=False) as r:
            cookie = {"Cookie": f"{COOKIE}={r.cookies[COOKIE].value}"}
        for path in (
            "/jobs",
            f"/jobs/{job_id}",
            "/api/jobs",
            f"/api/jobs/{job_id}",
            "/jobs/no-such-job",
            "/api/jobs?state=bogus",
        ):
            async with http.get(url + path, headers=cookie) as reply:
                assert reply.status < 500, path
                assert "no-store" in reply.headers.get("Cache-Control", ""), path
        for path in ("/login", "/jobs"):  # the login form, also as a 401 answer
            async with http.get(url + path) as reply:
                assert "no-store" in reply.headers.get("Cache-Control", ""), path
        async with http.get(url + "/static/dashboard.css") as reply:
            assert "no-store" not in reply.headers["Cache-Control"]


async def test_cancelling_a_job_that_just_ended_leads_back_to_it(
    grpc_service: Any, http: aiohttp.ClientSession
) -> None:
    """Cancel on a page opened before the job ended: the service refuses (a terminal state
    is final), and the error page only led back to the jobs list. It says the job has
    already ended, in words rather than the enum, and links back to the job."""
    job_id = f"ended-{uuid.uuid4().hex[:8]}"
    await create(grpc_service.stub, job_id=job_id)
    await grpc_service.stub.CancelJob(job_service_pb2.CancelJobRequest(id=job_id, reason="x"))
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    async with (
        serve(config(grpc_service, token=TOKEN)) as url,
        http.post(f"{url}/jobs/{job_id}/cancel", headers=bearer) as reply,
    ):
        page = await reply.text()
        assert reply.status == 409
        assert f'<a href="/jobs/{job_id}">' in page, page
        assert "already ended" in page and "CANCELLED" in page, page


async def test_a_bearer_cancel_needs_no_csrf_token_a_cookie_one_does(
    grpc_service: Any, http: aiohttp.ClientSession
) -> None:
    """What the README says: a Bearer header is no ambient credential (a browser never
    adds it to a cross-site form), so a script's Cancel needs no CSRF token; a session
    cookie is, and without the page's token its Cancel is 403 and changes nothing."""
    tag = uuid.uuid4().hex[:8]
    by_cookie = await create(grpc_service.stub, job_id=f"csrf-cookie-{tag}")
    by_bearer = await create(grpc_service.stub, job_id=f"csrf-bearer-{tag}")
    async with serve(config(grpc_service, token=TOKEN)) as url:
        async with http.post(url + "/login", data={"token": TOKEN}, allow_redirects=False) as r:
            cookie = {"Cookie": f"{COOKIE}={r.cookies[COOKIE].value}"}
        cancel = f"{url}/jobs/{by_cookie.job.id}/cancel"
        async with http.post(cancel, headers=cookie, allow_redirects=False) as reply:
            assert reply.status == 403
        cancel = f"{url}/jobs/{by_bearer.job.id}/cancel"
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        async with http.post(cancel, headers=bearer, allow_redirects=False) as reply:
            assert reply.status < 400, await reply.text()
    request = job_service_pb2.GetJobRequest
    got = await grpc_service.stub.GetJob(request(id=by_cookie.job.id))
    assert got.state == job_pb2.JOB_STATE_QUEUED
    got = await grpc_service.stub.GetJob(request(id=by_bearer.job.id))
    assert got.state == job_pb2.JOB_STATE_CANCELLED


async def test_a_page_token_of_the_other_order_is_named_as_the_dashboard_calls_it(
    grpc_service: Any, http: aiohttp.ClientSession
) -> None:
    """A page_token from `order=newest` sent with `order=oldest` said "pass newest_first
    as in the call that returned it", the gRPC field; the dashboard's parameter is
    `order`, and the error now says which order the token is from."""
    tag = uuid.uuid4().hex[:8]
    for i in range(3):
        await create(grpc_service.stub, job_id=f"order-{tag}-{i}", team=tag)
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    async with serve(config(grpc_service, token=TOKEN)) as url:
        listing = f"{url}/api/jobs?label=team%3D{tag}&page_size=1"
        async with http.get(listing, headers=bearer) as reply:
            token = (await reply.json())["next_page_token"]
        for order, other in (("oldest", "newest"), ("newest", "oldest")):
            if order == "newest":  # a token from an oldest-first listing
                async with http.get(listing + "&order=oldest", headers=bearer) as reply:
                    token = (await reply.json())["next_page_token"]
            query = f"&order={order}&page_token={token}"
            async with http.get(listing + query, headers=bearer) as reply:
                assert reply.status == 400
                error = (await reply.json())["error"]
            assert error == (
                f"page_token is from a listing with order={other}: pass order={other},"
                " as in the request that returned it"
            ), error
