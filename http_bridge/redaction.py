"""What of a request may reach a log line: its path, with tokens redacted.

- The AuroraCloud token may travel as a path segment: everything after
  `/transcode-callback/` goes.
- A Secretary path shows its job id and, below it, only `artifacts/<name>` (the one
  route there): anything else after the id goes. A worker that builds its callback URL
  wrongly puts its per-job token there (`/api/external/jobs/<id>/<token>`, a 404), and
  the bridge cannot know that token to redact it as it does the secrets it holds.
- Any segment shaped like a callback token (43 or more of `[A-Za-z0-9_-]` with both
  upper and lower case letters: what `secrets.token_urlsafe(32)` makes, which CreateJob
  issues) goes, wherever it is. UUIDs, hex digests and readable ids stay.
"""

from __future__ import annotations

import re

from aiohttp.web_request import BaseRequest

# Everything after the prefix goes: a token with an encoded slash (`%2F`) decodes to
# two segments, and a path that missed the route (`//api/...`) may still hold one.
_TOKEN_PATH = re.compile(r"(/transcode-callback/).+", re.DOTALL | re.IGNORECASE)
_SECRETARY_BELOW_JOB = re.compile(
    r"(/api/external/jobs/[^/]+/)(?!artifacts/[^/]+\Z).+", re.DOTALL | re.IGNORECASE
)
_TOKEN_SHAPED = re.compile(
    r"(?<![^/])(?=[\w-]*[a-z])(?=[\w-]*[A-Z])[A-Za-z0-9_-]{43,}(?![^/])", re.ASCII
)


def redact(path: str) -> str:
    path = _TOKEN_PATH.sub(r"\1***", path, count=1)
    path = _SECRETARY_BELOW_JOB.sub(r"\1***", path, count=1)
    return _TOKEN_SHAPED.sub("***", path)


def loggable_path(request: BaseRequest) -> str:
    """The decoded path without its query, tokens redacted. (The log formatter escapes
    control characters: the path is decoded.)"""
    return redact(request.path)
