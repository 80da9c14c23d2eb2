"""A loopback TCP relay that can drop its connections the hard way.

While `hold` is set, what the service sends back is kept from the client; `cut()`
then aborts every relayed connection (both sockets reset) without delivering it. A
client thus sees exactly what a dropped connection does after its request reached
the service and before the reply came back. Used by tests/test_client.py.
"""

from __future__ import annotations

import asyncio
import contextlib


class TcpCutter:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.hold = False
        # When set: `hold` turns on by itself once these bytes pass towards the service
        # (e.g. a MongoDB command name), so that request's reply is held, not earlier ones.
        self.hold_after: bytes | None = None
        # Likewise, but the replies are kept, not dropped: `release()` delivers them.
        self.pause_after: bytes | None = None
        self.paused = False
        self._kept: dict[asyncio.StreamWriter, bytearray] = {}
        self.connections = 0
        self._open: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = []
        self._stalled: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> TcpCutter:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def cut(self) -> None:
        """Resets every relayed connection; later ones are relayed normally."""
        self.hold = False
        for client, service in self._open:
            client.transport.abort()
            service.transport.abort()
        self._open.clear()

    def release(self) -> None:
        """Delivers the replies `pause_after` kept back, and relays normally again."""
        self.paused = False
        for writer, data in self._kept.items():
            writer.write(bytes(data))
        self._kept.clear()

    def stall_open(self) -> None:
        """The connections open now go silent (nothing more reaches their clients, and
        nothing tells them so), as a dead NAT entry or a hung proxy does; later ones are
        relayed normally."""
        self._stalled.update(client for client, _ in self._open)

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()

    async def _relay(
        self, from_client: asyncio.StreamReader, to_client: asyncio.StreamWriter
    ) -> None:
        from_service, to_service = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self.connections += 1
        self._open.append((to_client, to_service))
        for task in (
            asyncio.ensure_future(self._pump(from_client, to_service, held=False)),
            asyncio.ensure_future(self._pump(from_service, to_client, held=True)),
        ):
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, held: bool
    ) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                if held and (self.hold or writer in self._stalled):
                    continue  # kept from the client; cut() drops the connection
                if held and self.paused:
                    self._kept.setdefault(writer, bytearray()).extend(data)
                    continue
                writer.write(data)
                await writer.drain()
                if not held and self.hold_after is not None and self.hold_after in data:
                    self.hold_after, self.hold = None, True
                if not held and self.pause_after is not None and self.pause_after in data:
                    self.pause_after, self.paused = None, True
        with contextlib.suppress(ConnectionError, OSError, RuntimeError):
            writer.close()
