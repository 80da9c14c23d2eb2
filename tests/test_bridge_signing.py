"""Standard Webhooks v1 signatures: the specification's published vector, and the
bridge refusing a reformatted body, a stale timestamp and a retired key, accepting a
rotation, deduplicating by webhook-id; the worker CLI signs."""

# ruff: noqa: F811  (pytest fixtures imported from tests.bridge_harness)
from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from http_bridge import signing
from jobwire.v1 import job_pb2
from jobwire.v1 import job_service_pb2 as svc
from tests.bridge_harness import (
    API_KEY,
    BATCH_SECRET,
    TEST_CONFIG,
    VIDEO_AUTH,
    Bridge,
    create_job,
    get_job,
    new_id,
    running_bridge,
    stub,  # noqa: F401
)
from tests.test_bridge_common import run_cli

# https://github.com/standard-webhooks/standard-webhooks/blob/main/spec/standard-webhooks.md
VECTOR_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
VECTOR_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
VECTOR_TS = 1614265330
VECTOR_BODY = b'{"test": 2432232314}'
VECTOR_SIG = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="

OLD_SECRET = signing.new_secret()
NEW_SECRET = signing.new_secret()


def test_published_vector() -> None:
    key = signing.decode_secret(VECTOR_SECRET)
    assert signing.sign(key, VECTOR_ID, VECTOR_TS, VECTOR_BODY) == VECTOR_SIG
    signing.verify([key], VECTOR_ID, str(VECTOR_TS), VECTOR_SIG, VECTOR_BODY, now=VECTOR_TS)
    # The same JSON, reformatted: the signature is over bytes, so it fails.
    with pytest.raises(ValueError, match="does not match"):
        signing.verify(
            [key], VECTOR_ID, str(VECTOR_TS), VECTOR_SIG, b'{"test":2432232314}', now=VECTOR_TS
        )
    with pytest.raises(ValueError, match="5 minutes"):
        signing.verify(
            [key], VECTOR_ID, str(VECTOR_TS), VECTOR_SIG, VECTOR_BODY, now=VECTOR_TS + 301
        )
    # Several signatures (a sender mid-rotation): any one valid is enough.
    both = f"v1,AAAA {VECTOR_SIG} v2,whatever"
    signing.verify([key], VECTOR_ID, str(VECTOR_TS), both, VECTOR_BODY, now=VECTOR_TS)
    with pytest.raises(ValueError):
        signing.decode_secret("whsec_not base64!")


@pytest.fixture
async def signed_bridge(grpc_service: Any) -> AsyncIterator[Bridge]:
    keys = {
        "video_worker": (signing.decode_secret(NEW_SECRET),),
        "aws_batch": (signing.decode_secret(NEW_SECRET),),
    }
    config = dataclasses.replace(
        TEST_CONFIG, service_target=grpc_service.target, signing_secrets=keys
    )
    async with running_bridge(config) as b:
        yield b


def report(video_id: str, message: str = "m") -> bytes:
    body = {"status": "progress", "message": message, "videoId": video_id, "percent": 10}
    return orjson.dumps(body, option=orjson.OPT_INDENT_2)


async def test_bridge_checks_signatures_on_raw_bytes(signed_bridge: Any, stub: Any) -> None:
    vid = new_id("sv")
    await create_job(stub, job_pb2.JOB_KIND_VIDEO, vid)
    new = signing.decode_secret(NEW_SECRET)
    old = signing.decode_secret(OLD_SECRET)
    body = report(vid)

    # Unsigned: 401 with the contract's body and a challenge.
    async with signed_bridge.http.post(
        signed_bridge.url + "/api/report", data=body, headers=VIDEO_AUTH
    ) as resp:
        assert resp.status == 401
        assert await resp.json() == {"error": "No autorizado"}
        assert resp.headers["WWW-Authenticate"].startswith('Bearer realm="jobwire"')

    # The same JSON reformatted after signing: refused.
    headers = signing.signature_headers([new], body)
    compact = orjson.dumps(orjson.loads(body))
    status, _ = await signed_bridge.post_raw(
        "/api/report", compact, headers={**VIDEO_AUTH, **headers}
    )
    assert status == 401
    # Stale timestamp (10 minutes ago), correctly signed: refused.
    stale = signing.signature_headers([new], body, timestamp=int(time.time()) - 600)
    status, _ = await signed_bridge.post_raw("/api/report", body, headers={**VIDEO_AUTH, **stale})
    assert status == 401
    # Signed only with the retired key: refused.
    retired = signing.signature_headers([old], body)
    status, _ = await signed_bridge.post_raw("/api/report", body, headers={**VIDEO_AUTH, **retired})
    assert status == 401
    assert (await get_job(stub, vid)).state == job_pb2.JOB_STATE_QUEUED  # nothing applied

    # Rotation: signed with the old and the new key: accepted.
    rotated = signing.signature_headers([old, new], body)
    status, answer = await signed_bridge.post_raw(
        "/api/report", body, headers={**VIDEO_AUTH, **rotated}
    )
    assert (status, answer) == (200, {"success": True})

    # A redelivery under the same webhook-id (fresh timestamp and signature, and a
    # body that differs in its message) is applied once: webhook-id is the key.
    again = signing.signature_headers([new], report(vid, "other"), msg_id=rotated["webhook-id"])
    status, _ = await signed_bridge.post_raw(
        "/api/report", report(vid, "other"), headers={**VIDEO_AUTH, **again}
    )
    assert status == 200
    events = await stub.ListJobEvents(svc.ListJobEventsRequest(job_id=vid))
    progress = [e for e in events.events if e.HasField("progress")]
    assert [e.progress.message for e in progress] == ["m"]

    # GET routes of a signed contract are signed too (over an empty body).
    get_headers = {**VIDEO_AUTH, **signing.signature_headers([new], b"")}
    assert (await signed_bridge.get("/api/log?limit=1", headers=get_headers))[0] == 200
    assert (await signed_bridge.get("/api/log?limit=1", headers=VIDEO_AUTH))[0] == 401
    # Contracts without a secret are unaffected.
    status, _ = await signed_bridge.post(
        "/api/transcode-callback",
        {"code": 0, "msg": "ok", "data": [{"task_id": new_id("st"), "status": "failed"}]},
        headers={"Authorization": "Bearer test-transcode-token"},
    )
    assert status == 200


async def test_an_aws_batch_signature_is_checked_before_the_body_is_parsed(
    signed_bridge: Any,
) -> None:
    """The README says signatures are checked on the raw bytes before any parsing; the
    AWS Batch route parsed the body first (its secret is in it): an unsigned body
    reached the JSON parser, and malformed JSON got a 400 describing it, not a 401."""
    refused = await signed_bridge.post(
        "/api/batch-callback", {"jobId": "j", "status": "success", "callbackSecret": BATCH_SECRET}
    )
    assert refused[0] == 401
    for body in (b"{not json", b'{"jobId": 1}', b"[" * 100):
        assert await signed_bridge.post_raw("/api/batch-callback", body) == refused, body


async def test_a_long_webhook_id_is_a_key_the_service_takes(signed_bridge: Any, stub: Any) -> None:
    """A webhook-id may be 256 characters; with the contract's prefix the key was past the
    service's 256 and a validly signed callback got 400. Two such ids that differ only
    at the end stay two keys, and a redelivery of either is still applied once."""
    vid = new_id("lw")
    await create_job(stub, job_pb2.JOB_KIND_VIDEO, vid)
    new = signing.decode_secret(NEW_SECRET)
    for msg_id, message in (("m" * 255 + "1", "first"), ("m" * 255 + "2", "second")):
        for _ in range(2):
            headers = signing.signature_headers([new], report(vid, message), msg_id=msg_id)
            status, answer = await signed_bridge.post_raw(
                "/api/report", report(vid, message), headers={**VIDEO_AUTH, **headers}
            )
            assert (status, answer) == (200, {"success": True})
    events = await stub.ListJobEvents(svc.ListJobEventsRequest(job_id=vid))
    assert [e.progress.message for e in events.events] == ["first", "second"]


async def test_worker_cli_signs(signed_bridge: Any, stub: Any) -> None:
    vid, job = new_id("cv"), new_id("cb")
    await create_job(stub, job_pb2.JOB_KIND_VIDEO, vid)
    await create_job(stub, job_pb2.JOB_KIND_BATCH, job)
    env = {"JOBWIRE_BRIDGE_URL": signed_bridge.url, "API_KEY": API_KEY}
    signed = {**env, "JOBWIRE_SIGNING_SECRET_VIDEO_WORKER": NEW_SECRET}
    args = ("callback", "video", "report", vid, "progress", "half", "--percent", "50")
    assert await run_cli(*args, env=env) == 1  # unsigned: 401
    assert await run_cli(*args, env=signed) == 0
    assert (await get_job(stub, vid)).progress.percent == 50
    assert await run_cli("callback", "video", "pending", env=signed) == 0
    benv = {
        "NEXT_PUBLIC_APP_URL": signed_bridge.url,
        "BATCH_CALLBACK_SECRET": BATCH_SECRET,
        "JOBWIRE_SIGNING_SECRET_AWS_BATCH": f"{OLD_SECRET} {NEW_SECRET}",
    }
    assert await run_cli("callback", "batch", job, "success", "out/x.mp4", env=benv) == 0
    assert (await get_job(stub, job)).result.output_key == "out/x.mp4"
