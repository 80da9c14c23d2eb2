"""Every secret a caller can guess at is compared in constant time on equal-length
digests: hmac.compare_digest of strings of different lengths returns at once, so the
time of a wrong guess told the secret's length. Real servers on loopback; the only
thing added is a recorder around hmac.compare_digest (it still does the comparing)."""

from __future__ import annotations

import dataclasses
import hmac
from collections.abc import Callable
from typing import Any

import aiohttp
import grpc
import pytest

from dashboard.auth import COOKIE
from dashboard.config import DashboardConfig
from jobwire.v1 import job_service_pb2
from service.store.embedded import EmbeddedStore
from tests.bridge_harness import API_KEY, TEST_CONFIG, running_bridge
from tests.conftest import make_policy, start_service
from tests.test_dashboard_auth import serve

GRPC_TOKEN = "grpc-secret-token-0123456789"
DASH_TOKEN = "dashboard-secret-token-0123456789"
GUESSES = ("x", "y" * 300)  # shorter and longer than every secret


@pytest.fixture
def lengths(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    seen: list[tuple[int, int]] = []
    real: Callable[[Any, Any], bool] = hmac.compare_digest

    def recording(a: Any, b: Any) -> bool:
        seen.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", recording)
    return seen


async def test_guessed_secrets_are_compared_as_equal_length_digests(
    tmp_path: Any, lengths: list[tuple[int, int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JOBWIRE_GRPC_TOKEN", GRPC_TOKEN)  # the bridge's and dashboard's
    service = await start_service(
        EmbeddedStore(tmp_path / "data", make_policy()), grpc_token=GRPC_TOKEN
    )
    try:
        for guess in GUESSES:  # JOBWIRE_GRPC_TOKEN
            channel = grpc.aio.insecure_channel(service.target)
            stub = service.stub.__class__(channel)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.GetJob(
                    job_service_pb2.GetJobRequest(id="j"),
                    metadata=(("authorization", f"Bearer {guess}"),),
                )
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            await channel.close()

        config = dataclasses.replace(TEST_CONFIG, service_target=service.target)
        async with running_bridge(config) as bridge, aiohttp.ClientSession() as http:
            for guess in GUESSES:
                # API_KEY (header), TRANSCODE_CALLBACK_TOKEN (path), BATCH_CALLBACK_SECRET (body)
                auth = {"Authorization": f"Bearer {guess}"}
                assert (await bridge.get("/api/pending", headers=auth))[0] == 401
                assert (await bridge.post(f"/api/transcode-callback/{guess}", {}))[0] == 401
                body = {"jobId": "b", "status": "failed", "callbackSecret": guess}
                assert (await bridge.post("/api/batch-callback", body))[0] == 401
            assert (await bridge.get("/api/pending", headers={"Authorization": "Bearer"}))[0] == 401
            assert API_KEY  # the right key still works (the comparison still compares)
            ok = await bridge.get("/api/pending", headers={"Authorization": f"Bearer {API_KEY}"})
            assert ok[0] in (200, 204)

        dashboard = DashboardConfig(service_target=service.target, token=DASH_TOKEN)
        jar = aiohttp.DummyCookieJar()
        async with serve(dashboard) as url, aiohttp.ClientSession(cookie_jar=jar) as http:
            for guess in GUESSES:  # JOBWIRE_DASHBOARD_TOKEN: login form and Bearer
                async with http.post(url + "/login", data={"token": guess}) as reply:
                    assert reply.status == 401
                auth = {"Authorization": f"Bearer {guess}", "Accept": "application/json"}
                async with http.get(url + "/api/jobs", headers=auth) as reply:
                    assert reply.status == 401
                cookie = {"Cookie": f"{COOKIE}=abc.9999999999.{guess}"}
                async with http.get(url + "/api/jobs", headers={**cookie, **auth}) as reply:
                    assert reply.status == 401
            async with http.post(
                url + "/login", data={"token": DASH_TOKEN}, allow_redirects=False
            ) as reply:
                assert reply.status == 303
                session = reply.cookies[COOKIE].value
            for guess in GUESSES:  # the CSRF token of a state-changing form
                async with http.post(
                    url + "/logout",
                    data={"csrf": guess},
                    headers={"Cookie": f"{COOKIE}={session}"},
                ) as reply:
                    assert reply.status == 403
    finally:
        await service.close()
    unequal = [pair for pair in lengths if pair[0] != pair[1]]
    assert lengths and not unequal, unequal
