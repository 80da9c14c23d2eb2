"""Request bodies' Content-Encoding, decoded by the bridge (RFC 9110 8.4).

aiohttp's parser decoded one `gzip`, `deflate`, `br` or `zstd` itself, and only those
exact values: `x-gzip` (which RFC 9110 8.4.1.3 says to take as gzip) and stacked
codings (`gzip, gzip`) reached the contract undecoded, a misleading "malformed JSON";
`br` and `zstd`, whose libraries are not installed, failed in the parser, a generic
400 and a closed connection. The bridge's runner turns aiohttp's decoding off
(`auto_decompress=False`) and `read_body` decodes here instead: `gzip`, `x-gzip` and
`deflate`, stacked up to MAX_CODINGS deep, each bounded by the body limit as it
inflates (a gzip bomb stops at the limit, 413); any other coding is 415 naming it
(RFC 9110 15.5.16), before its body is read.
"""

from __future__ import annotations

import zlib

from aiohttp import hdrs, web

from .errors import BridgeError, RequestProblem

# zlib's wbits: gzip's header and trailer; deflate's zlib wrapper (RFC 9110 8.4.1.2),
# or none for the raw deflate some clients send (aiohttp took both too).
_GZIP = 16 + zlib.MAX_WBITS
_ZLIB = zlib.MAX_WBITS
_RAW = -zlib.MAX_WBITS
DECODED = {"gzip": "gzip", "x-gzip": "gzip", "deflate": "deflate"}
# `gzip, gzip` is legal; a dozen layers is no client's, only work for nothing.
MAX_CODINGS = 3


def codings(request: web.BaseRequest) -> list[str]:
    """The codings applied to the body, in the order applied (RFC 9110 8.4: the
    header's list, every Content-Encoding line joined), `identity` left out.
    415 for one the bridge does not decode, naming it."""
    found = [
        coding.strip().lower()
        for line in request.headers.getall(hdrs.CONTENT_ENCODING, ())
        for coding in line.split(",")
    ]
    found = [coding for coding in found if coding not in ("", "identity")]
    for coding in found:
        if coding not in DECODED:
            shown = coding if coding.isascii() and coding.isprintable() else "(not text)"
            raise RequestProblem(
                f"unsupported Content-Encoding {shown[:40]!r} (gzip, x-gzip and deflate"
                " are decoded)",
                status=415,
            )
    if len(found) > MAX_CODINGS:
        raise RequestProblem(
            f"Content-Encoding stacks {len(found)} codings (at most {MAX_CODINGS})", status=415
        )
    return found


class _Layer:
    """One coding undone, its output bounded."""

    __slots__ = ("_coding", "_inflate", "_started")

    def __init__(self, coding: str) -> None:
        self._coding = coding
        self._started = False
        self._inflate = zlib.decompressobj(_GZIP if coding == "gzip" else _ZLIB)

    def feed(self, data: bytes, room: int) -> bytes:
        """`data` decoded, at most `room` + 1 bytes of it (past `room`: over the limit)."""
        if not data:
            return b""
        if not self._started:
            self._started = True
            if self._coding == "deflate" and data[0] & 0x0F != 8:  # no zlib header
                self._inflate = zlib.decompressobj(_RAW)
        out = b""
        try:
            while data:
                out += self._inflate.decompress(data, room + 1 - len(out))
                if len(out) > room:
                    return out
                data = self._inflate.unconsumed_tail
                if self._inflate.eof:
                    rest = self._inflate.unused_data + data
                    if not rest:
                        break
                    if self._coding != "gzip":  # bytes after the deflate stream
                        raise zlib.error("data after the end of the stream")
                    self._inflate = zlib.decompressobj(_GZIP)  # the next gzip member
                    data = rest
        except zlib.error:
            raise self.undecodable() from None
        return out

    def finish(self) -> None:
        """The input ended: the coded stream must have ended with it."""
        if self._started and not self._inflate.eof:
            raise self.undecodable()

    def undecodable(self) -> RequestProblem:
        # The connection closes: the rest of the body is not worth reading.
        return RequestProblem(
            f"request body does not decode as Content-Encoding {self._coding}",
            close_connection=True,
        )


class BodyDecoder:
    """Undoes a body's codings (last applied first) as its bytes arrive; 413 once the
    decoded body passes `limit`, before inflating further."""

    __slots__ = ("_layers", "_limit", "_size")

    def __init__(self, applied: list[str], limit: int) -> None:
        self._layers = [_Layer(DECODED[coding]) for coding in reversed(applied)]
        self._limit = limit
        self._size = 0

    def feed(self, data: bytes) -> bytes:
        room = self._limit - self._size
        for layer in self._layers:
            data = layer.feed(data, room)
            if len(data) > room:
                raise BridgeError(413, f"request body exceeds {self._limit} bytes")
        self._size += len(data)
        return data

    def finish(self) -> None:
        for layer in self._layers:
            layer.finish()
