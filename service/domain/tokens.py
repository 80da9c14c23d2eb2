"""Per-job callback tokens: issued once, stored only as a hash, compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
import secrets


def issue() -> tuple[str, bytes]:
    """A fresh token and the hash to store in its place."""
    token = secrets.token_urlsafe(32)
    return token, digest(token)


def digest(token: str) -> bytes:
    # Tokens carry 256 random bits, so a plain SHA-256 (no salt, no stretching)
    # cannot be brute-forced and keeps verification cheap on the hot path.
    return hashlib.sha256(token.encode("utf-8")).digest()


def matches(token: str, stored_hash: bytes) -> bool:
    return bool(stored_hash) and hmac.compare_digest(digest(token), stored_hash)
