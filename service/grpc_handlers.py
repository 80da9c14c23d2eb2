"""Rebuilding a gRPC method handler around a new behaviour (for server interceptors)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc

if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]
else:
    Handler = grpc.RpcMethodHandler

_KINDS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")


def replace_behavior(
    handler: Handler,
    make: Callable[[str, Any], Any],
    request_deserializer: Callable[[bytes], Any] | None = None,
) -> Handler:
    """The same handler (same (de)serialisers, unless `request_deserializer` is given)
    with its behaviour replaced by `make(kind, behaviour)`, where kind is e.g.
    "unary_stream"."""
    h: Any = handler
    for kind in _KINDS:
        behavior = getattr(h, kind)
        if behavior is None:
            continue
        factory = getattr(grpc, f"{kind}_rpc_method_handler")
        result: Handler = factory(
            make(kind, behavior),
            request_deserializer=request_deserializer or h.request_deserializer,
            response_serializer=h.response_serializer,
        )
        return result
    return handler
