"""Standard Webhooks v1 signatures (https://www.standardwebhooks.com), per contract.

When `JOBWIRE_SIGNING_SECRET_<CONTRACT>` holds a `whsec_<base64 key>`, each request of
that contract must carry `webhook-id`, `webhook-timestamp` (Unix seconds, within
+-5 minutes) and `webhook-signature` (space-separated `v1,<base64 HMAC-SHA256>`).
The signed content is `{id}.{timestamp}.{raw body}`: the bytes as received, never
re-serialised JSON. Any one matching `v1` signature (and any configured key) is
enough, so a key can be rotated without downtime. The verified `webhook-id` is the
event's idempotency key: a redelivery is applied once.

The worker side (`jobwire callback`) signs with the same functions; the bridge checks
requests with edge.check_signature. Stdlib only, so a worker needs nothing more.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Iterable

PREFIX = "whsec_"
TOLERANCE_SECONDS = 5 * 60
_ID = re.compile(r"[\x21-\x7e]{1,256}")
_TIMESTAMP = re.compile(r"\d{1,12}")


def decode_secret(secret: str) -> bytes:
    """The raw key of a `whsec_...` secret (the prefix is optional)."""
    text = secret.strip().removeprefix(PREFIX)
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("a signing secret is whsec_ followed by base64") from None
    if not key:
        raise ValueError("the signing secret is empty")
    return key


def new_secret() -> str:
    return PREFIX + base64.b64encode(secrets.token_bytes(32)).decode("ascii")


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes | bytearray) -> str:
    """`v1,<base64 signature>` of one message."""
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode(), hashlib.sha256)
    mac.update(body)
    return "v1," + base64.b64encode(mac.digest()).decode("ascii")


def signature_headers(
    keys: Iterable[bytes], body: bytes, msg_id: str = "", timestamp: int | None = None
) -> dict[str, str]:
    """The three headers a sender adds; one signature per key (rotation)."""
    msg_id = msg_id or "msg_" + secrets.token_urlsafe(18)
    ts = int(time.time()) if timestamp is None else timestamp
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": " ".join(sign(k, msg_id, ts, body) for k in keys),
    }


def verify(
    keys: Iterable[bytes],
    msg_id: str,
    timestamp: str,
    signatures: str,
    body: bytes | bytearray,
    now: float | None = None,
) -> None:
    """Raises ValueError naming what is wrong; returns when one signature matches."""
    if not _ID.fullmatch(msg_id):
        raise ValueError("webhook-id header required (1-256 visible ASCII characters)")
    if not _TIMESTAMP.fullmatch(timestamp):
        raise ValueError("webhook-timestamp header required (Unix seconds)")
    ts = int(timestamp)
    current = time.time() if now is None else now
    if abs(current - ts) > TOLERANCE_SECONDS:
        raise ValueError("webhook-timestamp is more than 5 minutes away from now")
    given = [
        part[3:].encode("ascii", "replace") for part in signatures.split() if part.startswith("v1,")
    ]
    if not given:
        raise ValueError("webhook-signature header required (v1,<base64>)")
    matched = False
    for key in keys:
        expected = sign(key, msg_id, ts, body)[3:].encode("ascii")
        for candidate in given:
            # Every comparison runs: no early exit reveals which one matched.
            matched |= hmac.compare_digest(candidate, expected)
    if not matched:
        raise ValueError("webhook-signature does not match")
