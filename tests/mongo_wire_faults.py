"""A loopback relay in front of a MongoDB server that makes it answer chosen writes with a
`writeConcernError`, as a replica set does when the write reached the primary but the
write concern (w=majority, a tag) was not met: no secondary, a failover, a tag unknown.

FerretDB ignores write concerns, so this is how the tests see that answer for real: the
driver and the server are real, only the reply of the commands picked is amended.

With `request_fields` set, the picked commands are sent with those fields added instead
(e.g. a `collation`, which FerretDB does not implement) and FerretDB's own answer, an
error the store does not expect, is relayed as it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct

import bson

_OP_MSG = 2013
_HEADER = struct.Struct("<iiii")  # messageLength, requestID, responseTo, opCode


class WriteConcernFaults:
    """Relays to `upstream_port`; while `command` is set (e.g. ("update", "jobs")), the
    reply to each such command gets `writeConcernError` {code, errmsg} added."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.command: tuple[str, str] | None = None
        self.code = 100  # UnsatisfiableWriteConcern: "Not enough data-bearing nodes"
        self.errmsg = "Not enough data-bearing nodes"
        self.amended = 0
        self.request_fields: dict[str, object] = {}
        self._marked: set[int] = set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    async def start(self) -> WriteConcernFaults:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()

    async def _relay(
        self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter
    ) -> None:
        server_in, server_out = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        for task in (
            asyncio.ensure_future(self._pump(client_in, server_out, requests=True)),
            asyncio.ensure_future(self._pump(server_in, client_out, requests=False)),
        ):
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, requests: bool
    ) -> None:
        with contextlib.suppress(ConnectionError, OSError, asyncio.IncompleteReadError):
            while True:
                header = await reader.readexactly(_HEADER.size)
                length, request_id, response_to, op = _HEADER.unpack(header)
                body = await reader.readexactly(length - _HEADER.size)
                if op == _OP_MSG and requests and self._picked(body) and self.request_fields:
                    body = self._amend_request(body)
                    header = _HEADER.pack(_HEADER.size + len(body), request_id, response_to, op)
                elif op == _OP_MSG and requests and self._picked(body):
                    self._marked.add(request_id)
                elif op == _OP_MSG and not requests and response_to in self._marked:
                    self._marked.discard(response_to)
                    body = self._amend(body)
                    header = _HEADER.pack(_HEADER.size + len(body), request_id, response_to, op)
                writer.write(header + body)
                await writer.drain()
        with contextlib.suppress(ConnectionError, OSError, RuntimeError):
            writer.close()

    def _picked(self, body: bytes) -> bool:
        if self.command is None or body[4] != 0:
            return False
        document = bson.decode(body[5 : 5 + struct.unpack_from("<i", body, 5)[0]])
        name, collection = self.command
        return bool(document.get(name) == collection)

    def _amend(self, body: bytes) -> bytes:
        flags = struct.unpack_from("<I", body)[0] & ~1  # no checksum: the body changes
        document = bson.decode(body[5 : 5 + struct.unpack_from("<i", body, 5)[0]])
        document["writeConcernError"] = {"code": self.code, "errmsg": self.errmsg}
        self.amended += 1
        return struct.pack("<I", flags) + b"\x00" + bson.encode(document)

    def _amend_request(self, body: bytes) -> bytes:
        """The command (section 0) with `request_fields` added; later sections as sent."""
        flags = struct.unpack_from("<I", body)[0] & ~1  # no checksum: the body changes
        size = struct.unpack_from("<i", body, 5)[0]
        document = bson.decode(body[5 : 5 + size]) | self.request_fields
        self.amended += 1
        return struct.pack("<I", flags) + b"\x00" + bson.encode(document) + body[5 + size :]
