"""What of a request may reach a log line: its path, with the path token redacted."""

from __future__ import annotations

import re

from aiohttp.web_request import BaseRequest

# The AuroraCloud token may travel as a path segment; it must never reach a log.
# Everything after the prefix goes: a token with an encoded slash (`%2F`) decodes to
# two segments, and a path that missed the route (`//api/...`) may still hold one.
_TOKEN_PATH = re.compile(r"(/transcode-callback/).+", re.DOTALL)


def redact(path: str) -> str:
    return _TOKEN_PATH.sub(r"\1***", path, count=1)


def loggable_path(request: BaseRequest) -> str:
    """The decoded path without its query, the path token redacted. (The log
    formatter escapes control characters: the path is decoded.)"""
    return redact(request.path)
