"""A job's fan-out is written per client connection under TCP_CORK (service/cork.py):
watched connections are corked while their streams write and uncorked right after;
a connection without enough of the job's watchers (a reporter's) is never held."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from jobwire.v1 import job_service_pb2, job_service_pb2_grpc
from service.cork import MIN_STREAMS, MIN_WATCHERS, Corker, connections, peer_key, supported
from service.store.port import Store
from tests.conftest import start_service
from tests.helpers import create, progress, read

pytestmark = pytest.mark.skipif(not supported(), reason="TCP_CORK and /proc are Linux's")


def corked(fd: int) -> int:
    sock = socket.socket(fileno=fd)
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK)
    finally:
        sock.detach()


def test_peer_key_reads_grpc_peer_strings() -> None:
    assert peer_key("ipv4:127.0.0.1:5123") == ("127.0.0.1", 5123)
    assert peer_key("ipv6:[::1]:5123") == ("::1", 5123)
    assert peer_key("ipv6:%5B::1%5D:5123") == ("::1", 5123)  # as grpcio 1.85 writes it
    # A v4 client on a dual-stack listener: the same key as getpeername() gives.
    assert peer_key("ipv6:[::ffff:10.0.0.7]:80") == ("10.0.0.7", 80)
    assert peer_key("unix:/run/jobwire/feed.sock") is None
    assert peer_key("ipv4:127.0.0.1:port") is None
    assert peer_key("") is None


@dataclass
class Loopback:
    """A listener and client connections to it: the accepted side's fds are what the
    service's connections are to the Corker."""

    listener: socket.socket
    clients: list[socket.socket] = field(default_factory=list)
    accepted: list[socket.socket] = field(default_factory=list)

    @property
    def port(self) -> int:
        return int(self.listener.getsockname()[1])

    def connect(self) -> tuple[tuple[str, int], int]:
        client = socket.create_connection(("127.0.0.1", self.port))
        server, _ = self.listener.accept()
        self.clients.append(client)
        self.accepted.append(server)
        host, port = client.getsockname()[:2]
        return (host, port), server.fileno()


@pytest.fixture
def loopback() -> Iterator[Loopback]:
    listener = socket.create_server(("127.0.0.1", 0))
    lo = Loopback(listener)
    yield lo
    for sock in [*lo.clients, *lo.accepted, listener]:
        sock.close()


class Watcher:
    """Records whether its connection was corked when it was offered the event and when
    its (queued) wake-up ran: there the real stream issues its write."""

    def __init__(self, peer: tuple[str, int] | None, fd: int | None) -> None:
        self.peer = peer
        self.fd = fd
        self.at_offer = -1
        self.at_write = -1
        self.offered = 0

    def offer(self, item: object, watermark: int = 0) -> None:
        self.offered += 1
        if self.fd is not None:
            self.at_offer = corked(self.fd)
            asyncio.get_running_loop().call_soon(self._write)

    def _write(self) -> None:
        assert self.fd is not None
        self.at_write = corked(self.fd)


async def until_queued_callbacks_ran() -> None:
    done = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_soon(done.set_result, None)
    await done


async def test_watched_connections_are_corked_while_their_streams_write(
    loopback: Loopback,
) -> None:
    many_peer, many_fd = loopback.connect()
    few_peer, few_fd = loopback.connect()
    _, reporter_fd = loopback.connect()
    found = connections(loopback.port)
    assert (found[many_peer], found[few_peer]) == (many_fd, few_fd)
    assert sorted(found.values()) == sorted([many_fd, few_fd, reporter_fd])  # no listener
    many = [Watcher(many_peer, many_fd) for _ in range(MIN_STREAMS + 2)]
    few = [Watcher(few_peer, few_fd) for _ in range(MIN_STREAMS - 1)]
    unknown = [Watcher(None, few_fd) for _ in range(MIN_STREAMS)]  # e.g. a unix: peer
    corker = Corker(loopback.port)

    corker.offer([*many, *few, *unknown], ("event", None))

    assert {w.at_offer for w in many} == {1}
    assert corked(reporter_fd) == 0  # no watcher of the job there: never held back
    await until_queued_callbacks_ran()
    assert {w.at_write for w in many} == {1}  # the writes were issued while corked
    assert {w.at_offer for w in [*few, *unknown]} == {0}  # too few, or no address
    assert [corked(fd) for fd in (many_fd, few_fd, reporter_fd)] == [0, 0, 0]
    assert corker.corked == 1


async def test_new_connections_are_found_by_a_bounded_rescan(loopback: Loopback) -> None:
    scans: list[int] = []
    now = [0.0]

    def scan(port: int) -> dict[tuple[str, int], int]:
        scans.append(port)
        now[0] += 0.1  # the scan's own time: the next waits 20 times as long
        return connections(port)

    first_peer, first_fd = loopback.connect()
    corker = Corker(loopback.port, scan, clock=lambda: now[0])
    for _ in range(2):
        corker.offer([Watcher(first_peer, first_fd) for _ in range(MIN_STREAMS)], None)
    assert (len(scans), corker.corked) == (1, 2)  # known after the first scan

    second_peer, second_fd = loopback.connect()
    now[0] = 1.9
    late = [Watcher(second_peer, second_fd) for _ in range(MIN_STREAMS)]
    corker.offer(late, None)  # 1.9 s after a 0.1 s scan: not looked for again yet
    now[0] = 2.0
    soon = [Watcher(second_peer, second_fd) for _ in range(MIN_STREAMS)]
    corker.offer(soon, None)  # past the interval: rescanned and found
    assert len(scans) == 2
    assert ({w.at_offer for w in late}, {w.at_offer for w in soon}) == ({0}, {1})
    await until_queued_callbacks_ran()


async def test_a_connection_gone_since_its_fd_was_reused_is_not_touched(
    loopback: Loopback, tmp_path: Path
) -> None:
    peer, fd = loopback.connect()
    corker = Corker(loopback.port)
    corker.offer([Watcher(peer, fd) for _ in range(MIN_STREAMS)], None)
    await until_queued_callbacks_ran()

    # The connection closes and its fd number now holds a file (still cached).
    with (tmp_path / "f").open("wb") as file:
        loopback.accepted.pop().close()
        os.dup2(file.fileno(), fd)
        try:
            watchers = [Watcher(peer, None) for _ in range(MIN_STREAMS)]
            corker.offer(watchers, None)
            assert {w.offered for w in watchers} == {1}  # every watcher still gets it
            assert corker.corked == 1
            assert os.fstat(fd).st_ino == os.fstat(file.fileno()).st_ino  # left alone
        finally:
            os.close(fd)


async def test_watchers_on_shared_connections_get_every_event_in_order(store: Store) -> None:
    service = await start_service(store)
    corker = service.running.jobs.fanout.corker
    assert corker is not None
    own = [("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.insecure_channel(service.target, options=own) for _ in range(2)]
    try:
        job = (await create(service.stub)).job
        per_channel = MIN_WATCHERS // 2 + 8
        calls = [
            job_service_pb2_grpc.JobServiceStub(ch).WatchJob(
                job_service_pb2.WatchJobRequest(id=job.id)
            )
            for ch in channels
            for _ in range(per_channel)
        ]
        for call in calls:
            assert (await read(call)).HasField("snapshot")
        answers = [await service.stub.ReportEvent(progress(job.id, p)) for p in (10, 20, 30)]

        for call in calls:
            got = [(await read(call)).event.sequence for _ in answers]
            assert got == [a.sequence for a in answers]
        assert corker.corked >= 2 * len(answers)  # each connection, each event
        # Nothing is left corked once the streams have written.
        assert {corked(fd) for fd in connections(service.running.port).values()} == {0}
    finally:
        for ch in channels:
            await ch.close()
        await service.close()


def _ipv6_loopback() -> bool:
    try:
        with socket.create_server(("::1", 0), family=socket.AF_INET6):
            return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
async def test_ipv6_watchers_are_batched_too(store: Store) -> None:
    """gRPC writes an IPv6 peer as `ipv6:%5B::1%5D:port`: its connection is found all
    the same."""
    service = await start_service(store, grpc_addr="[::1]:0")
    corker = service.running.jobs.fanout.corker
    assert corker is not None
    channel = grpc.aio.insecure_channel(f"[::1]:{service.running.port}")
    try:
        stub = job_service_pb2_grpc.JobServiceStub(channel)
        job = (await create(stub)).job
        calls = [
            stub.WatchJob(job_service_pb2.WatchJobRequest(id=job.id)) for _ in range(MIN_WATCHERS)
        ]
        for call in calls:
            assert (await read(call)).HasField("snapshot")
        answer = await stub.ReportEvent(progress(job.id, 10))
        for call in calls:
            assert (await read(call)).event.sequence == answer.sequence
        assert corker.corked == 1
    finally:
        await channel.close()
        await service.close()


async def test_the_cork_can_be_turned_off(store: Store) -> None:
    service = await start_service(store, watch_cork=False)
    try:
        assert service.running.jobs.fanout.corker is None
    finally:
        await service.close()
