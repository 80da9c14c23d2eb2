"""Watch workers: more processes serving WatchJob streams on the service's own port.

Every message written to a stream costs the process that holds the stream about 30 µs
of CPU (gRPC's C core, one sendmsg per message), so one process fans an event out to
10,000 streams in about 300 ms, on one core. With JOBWIRE_WATCH_WORKERS=N the service
starts N worker processes (`jobwire watch-worker`, service/watch_worker.py) that bind the
same port with
SO_REUSEPORT: the kernel spreads client connections over all N + 1 processes. A worker
serves WatchJob itself and forwards every other call to this process, which stays the
only writer. Both go over a Unix socket in a private (0700) directory:

- the feed: a private stream (`/jobwire.internal.Feed/Events`, answered only on that
  socket) carries every event this process publishes, in order, once per worker; an
  empty first message says the subscription exists, after which the worker serves
  watchers (each reads its snapshot from here after subscribing locally, so nothing
  committed in between is missed);
- everything else: the worker passes the call's bytes and metadata through unchanged.

When a worker's feed breaks, the worker ends its watch streams with UNAVAILABLE (the
client resumes from its last sequence, losing nothing) and refuses new ones until the
feed is back. A worker that dies is restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import grpc

from jobwire.v1 import job_service_pb2

from .config import Settings
from .fanout import Fanout, SubscriptionClosed
from .grpc_handlers import Handler

log = logging.getLogger("jobwire.watch_workers")

FEED_SERVICE = "jobwire.internal.Feed"
FEED_METHOD = f"/{FEED_SERVICE}/Events"
PRIMARY_ENV = "JOBWIRE_WATCH_WORKER_PRIMARY"  # the primary's Unix socket, for a worker
PARENT_ENV = "JOBWIRE_WATCH_WORKER_PARENT"  # the primary's pid
# The primary's Jobs.resync_seconds: events it gets from other replicas may be lost on
# the way (its feed relay), and so a worker's watchers heal from the ring as its own do.
RESYNC_ENV = "JOBWIRE_WATCH_WORKER_RESYNC"
# A worker's feed is one subscription carrying every event: room for bursts of a
# commit or two, so that it is not coalesced or closed when this process is busy.
FEED_CAPACITY = 16_384
RESTART_DELAY_S = 1.0


def feed_handler(fanout: Fanout) -> grpc.GenericRpcHandler:
    """The feed of every event this process publishes, for its watch workers."""

    async def events(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if not context.peer().startswith("unix:"):
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED, "the watch workers' feed is internal"
            )
        sub = fanout.subscribe(capacity=FEED_CAPACITY)
        try:
            yield b""  # subscribed: from here on, every published event follows
            while True:
                batch = await sub.next_batch()
                response = job_service_pb2.ListJobEventsResponse(events=[e for e, _ in batch])
                yield response.SerializeToString()
        except SubscriptionClosed as err:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(err))
        finally:
            fanout.unsubscribe(sub)

    handler: Handler = grpc.unary_stream_rpc_method_handler(events)
    return grpc.method_handlers_generic_handler(FEED_SERVICE, {"Events": handler})


class WatchWorkers:
    """Starts, restarts and stops the watch worker processes of this service."""

    def __init__(self, count: int) -> None:
        self.count = count
        self._dir = Path(tempfile.mkdtemp(prefix="jobwire-watch-"))  # mode 0700
        self.socket = self._dir / "primary.sock"
        self._procs: list[subprocess.Popen[bytes] | None] = [None] * count
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    @property
    def internal_target(self) -> str:
        return f"unix:{self.socket}"

    def start(self, settings: Settings, public_addr: str, resync_seconds: float = 0.0) -> None:
        """`public_addr`: the port bound (JOBWIRE_GRPC_ADDR may say port 0);
        `resync_seconds`: the service's Jobs.resync_seconds."""
        env = {
            **os.environ,
            PRIMARY_ENV: self.internal_target,
            PARENT_ENV: str(os.getpid()),
            RESYNC_ENV: repr(resync_seconds),
            # What a worker serves with: this process's settings, whatever their source.
            "JOBWIRE_GRPC_ADDR": public_addr,
            "JOBWIRE_GRPC_TOKEN": settings.grpc_token,
            "JOBWIRE_GRPC_TLS_CERT": settings.grpc_tls_cert,
            "JOBWIRE_GRPC_TLS_KEY": settings.grpc_tls_key,
            "JOBWIRE_GRPC_TLS_CLIENT_CA": settings.grpc_tls_client_ca,
            "JOBWIRE_MAX_WATCHERS": str(settings.max_watchers),
            "JOBWIRE_WATCH_BUFFER": str(settings.watch_buffer),
            "JOBWIRE_SHUTDOWN_GRACE_SECONDS": str(settings.shutdown_grace_seconds),
        }
        loop = asyncio.get_running_loop()
        for i in range(self.count):
            self._spawn(i, env)  # all started on return
        self._tasks = [
            loop.create_task(self._keep(i, env), name=f"watch-worker-{i}")
            for i in range(self.count)
        ]

    def _spawn(self, index: int, env: dict[str, str]) -> None:
        # Popen with close_fds=False spawns with posix_spawn (Python's descriptors are
        # not inheritable, gRPC's are close-on-exec): a fork() would run gRPC's fork
        # handlers, which log that other threads are busy in gRPC.
        argv = [sys.executable, "-m", "cli", "watch-worker"]
        self._procs[index] = subprocess.Popen(argv, env=env, close_fds=False)

    async def _keep(self, index: int, env: dict[str, str]) -> None:
        """Waits for the worker to exit and starts it again, until stop()."""
        loop = asyncio.get_running_loop()
        while True:
            proc = self._procs[index]
            assert proc is not None
            # Woken by the kernel when it exits (a pidfd becomes readable): no thread
            # blocked in wait() per worker.
            pidfd = os.pidfd_open(proc.pid)
            exited: asyncio.Future[None] = loop.create_future()
            loop.add_reader(pidfd, _resolve, exited)
            try:
                await exited
            finally:
                loop.remove_reader(pidfd)
                os.close(pidfd)
            code = proc.wait()
            if self._stopping:
                return
            log.error("watch worker %d exited with %s; restarting it", index, code)
            await asyncio.sleep(RESTART_DELAY_S)
            if self._stopping:
                return
            self._spawn(index, env)

    async def stop(self, grace: float) -> None:
        """SIGTERM to every worker (they end their streams with UNAVAILABLE), then
        SIGKILL to any still running after `grace`."""
        self._stopping = True
        for proc in self._procs:
            if proc is not None and proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        if self._tasks:  # each ends when its worker has exited
            _, late = await asyncio.wait(self._tasks, timeout=grace)
            if late:
                for proc in self._procs:
                    if proc is not None and proc.poll() is None:
                        proc.kill()
                await asyncio.wait(late, timeout=5)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        shutil.rmtree(self._dir, ignore_errors=True)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
