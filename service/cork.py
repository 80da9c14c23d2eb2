"""Batches a large fan-out's writes per client connection with TCP_CORK (Linux).

gRPC writes each stream message with its own `sendmsg`, and with TCP_NODELAY each one
leaves at once as its own segment; on loopback the sender's system call also runs the
receiver's TCP input. An event for 10,000 watchers over 100 connections was 10,000
segments. Here the connections of a job's watchers are corked while the event is
offered to them, and each is uncorked once its streams have written (a callback queued
behind their wake-ups), so its ~100 messages leave in a few full segments: the service
spends less per message and the receivers far less (README "Watchers").

Only connections that carry at least `MIN_STREAMS` of the job's watchers are corked,
and never one that carries none: a reporter's answer is not held back. A connection
is found by the peer address gRPC reports for the stream (`context.peer()`), matched to
this process's sockets through /proc/self/fd, rescanned when a peer is not known yet.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol
from urllib.parse import unquote

# Fewer streams than this on one connection: one cork and one uncork cost more than
# the segments they save.
MIN_STREAMS = 4
# A job with fewer watchers is offered as before, without looking at connections.
MIN_WATCHERS = 64
RESCAN_SECONDS = 1.0
_MAPPED = "::ffff:"


class Offered(Protocol):
    peer: tuple[str, int] | None

    def offer(self, item: Any, watermark: int = ...) -> None: ...


def supported() -> bool:
    return (
        sys.platform == "linux" and hasattr(socket, "TCP_CORK") and os.path.isdir("/proc/self/fd")
    )


def peer_key(peer: str) -> tuple[str, int] | None:
    """gRPC's `ipv4:1.2.3.4:5` / `ipv6:%5B::1%5D:5` as (host, port); None for unix:
    and anything else."""
    kind, _, address = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return None
    host, _, port = unquote(address).rpartition(":")  # gRPC writes [ and ] as %5B, %5D
    try:
        return _host(host.strip("[]")), int(port)
    except ValueError:
        return None


def _host(host: str) -> str:
    return host[len(_MAPPED) :] if host.startswith(_MAPPED) else host


def connections(port: int) -> dict[tuple[str, int], int]:
    """This process's accepted TCP connections on `port`, by peer address: fd."""
    found: dict[tuple[str, int], int] = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            sock = socket.socket(fileno=int(name))
        except (OSError, ValueError):
            continue  # not a socket, or closed since the listing
        try:
            if sock.type != socket.SOCK_STREAM or sock.family not in (
                socket.AF_INET,
                socket.AF_INET6,
            ):
                continue
            if sock.getsockname()[1] != port:
                continue
            peer = sock.getpeername()  # the listener has none: OSError
            found[(_host(peer[0]), peer[1])] = sock.fileno()
        except OSError:
            continue
        finally:
            sock.detach()  # the fd stays gRPC's
    return found


def _set_cork(fd: int, on: int) -> bool:
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return False  # closed, or no longer a socket
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, on)
        return True
    except OSError:
        return False
    finally:
        sock.detach()


def _uncork(fd: int) -> None:
    _set_cork(fd, 0)


class Corker:
    """Offers an item to a job's watchers grouped by connection, each connection
    corked from before its streams wake until after they have written."""

    def __init__(
        self,
        port: int,
        scan: Callable[[int], dict[tuple[str, int], int]] = connections,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.port = port
        self._scan = scan
        self._clock = clock
        self._fds: dict[tuple[str, int], int] = {}
        self._next_scan = float("-inf")
        self.corked = 0  # connections corked so far (tests, debugging)

    def offer(self, subs: Iterable[Offered], item: object) -> None:
        groups: dict[tuple[str, int] | None, list[Offered]] = {}
        for sub in subs:
            groups.setdefault(sub.peer, []).append(sub)
        loop = asyncio.get_running_loop()
        for peer, group in groups.items():
            fd = self._fd(peer) if len(group) >= MIN_STREAMS else None
            if fd is not None and not _set_cork(fd, 1):
                fd = None
            self.corked += fd is not None
            for sub in group:
                sub.offer(item)
            if fd is not None:
                # Runs after the wake-ups just queued: those streams' sends are issued.
                loop.call_soon(_uncork, fd)

    def _fd(self, peer: tuple[str, int] | None) -> int | None:
        if peer is None:
            return None
        fd = self._fds.get(peer)
        if fd is None and self._clock() >= self._next_scan:
            # A new connection. The scan walks every fd of the process on the loop's
            # thread, so it runs at most once a second and at most 5% of the time.
            started = self._clock()
            self._fds = self._scan(self.port)
            took = self._clock() - started
            self._next_scan = started + max(RESCAN_SECONDS, 20 * took)
            fd = self._fds.get(peer)
        return fd
