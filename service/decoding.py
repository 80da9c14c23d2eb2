"""Requests that cannot be parsed get INVALID_ARGUMENT, not UNKNOWN.

grpc.aio parses a request before any handler or interceptor runs; when protobuf
refuses the bytes (malformed, or messages nested deeper than its recursion limit of
100, e.g. a deep `google.protobuf.Struct` in a result's metadata), it answers UNKNOWN
"Unexpected DecodeError" and logs a traceback at ERROR, as for a bug of ours. So each
method's deserializer is wrapped once, at registration:

- a single request that cannot be parsed becomes an `Undecodable`, which the
  servicer's decorators (service/servicer.py) answer with INVALID_ARGUMENT naming the
  message type, on the service and on a watch worker alike;
- in a request stream (UploadArtifact) the message is read inside the handler, so the
  wrapper raises the DomainError there, which the handler's decorator answers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from google.protobuf.message import DecodeError

from .domain.errors import Code, DomainError
from .grpc_handlers import Handler, replace_behavior


class Undecodable:
    """Stands for a request protobuf could not parse."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


def require_parsed(request: object) -> None:
    """Raises the caller's mistake when `request` stands for bytes protobuf refused."""
    if isinstance(request, Undecodable):
        raise DomainError(Code.INVALID_ARGUMENT, request.message)


def _problem(type_name: str) -> str:
    return (
        f"request is not a valid {type_name}: malformed bytes, or messages nested deeper "
        "than protobuf's limit of 100 levels (e.g. a deep Struct)"
    )


def tolerant(handler: Handler, type_name: str) -> Handler:
    """`handler` with a deserializer that does not raise on bytes protobuf refuses."""
    h: Any = handler
    parse: Callable[[bytes], Any] = h.request_deserializer
    problem = _problem(type_name)

    def single(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError:
            return Undecodable(problem)

    def in_stream(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError:
            raise DomainError(Code.INVALID_ARGUMENT, problem) from None

    deserializer = in_stream if h.request_streaming else single
    return replace_behavior(handler, lambda _kind, behavior: behavior, deserializer)
