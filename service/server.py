"""Builds and runs the grpc.aio server: servicer, health, reflection, graceful stop."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .admission import WatchAdmission, server_options
from .config import Settings
from .cork import Corker
from .cork import supported as cork_supported
from .domain.errors import StorageUnavailable
from .fanout import Fanout
from .jobs import Jobs
from .operations import Operations, start_operations, with_port
from .retention import Retention
from .security import server_credentials
from .servicer import SERVICE, JobServicer, add_to_server
from .store.factory import open_store
from .store.port import Store
from .tasks import stop_within
from .tracing import server_interceptors
from .watch_workers import WatchWorkers, feed_handler

log = logging.getLogger("jobwire.server")
SERVICE_NAME = SERVICE.full_name
SWEEPER_STOP_SECONDS = 2.0
STORE_CLOSE_SECONDS = 3.0


@dataclass
class RunningService:
    server: grpc.aio.Server
    port: int
    jobs: Jobs
    store: Store
    health: health.aio.HealthServicer
    sweeper: asyncio.Task[None]
    ops: Operations | None = None
    workers: WatchWorkers | None = None
    # JOBWIRE_JOB_RETENTION's sweep and its task (None: jobs are kept for ever).
    retention: Retention | None = None
    retention_sweeper: asyncio.Task[None] | None = None

    async def stop(self, grace: float) -> None:
        """Stops accepting calls, lets in-flight ones finish, ends watch streams cleanly."""
        await self.health.enter_graceful_shutdown()
        # Not waiting on PyMongo; a delete cut short is finished by the next sweep.
        await stop_within([self.sweeper, self.retention_sweeper], SWEEPER_STOP_SECONDS)
        if self.workers is not None:  # their watchers, too, resume elsewhere
            await self.workers.stop(grace)
        # Watchers get UNAVAILABLE after draining their buffers, so they reconnect
        # (to another replica, or to this one after a restart) with no gap.
        self.jobs.fanout.close_all()
        await self.server.stop(grace)
        await self.jobs.close()
        # Every acknowledged write is durable by now: a store that cannot be reached
        # (MongoDB hung: closing its client waited for timeouts, 16 s seen on top of
        # the grace) must not keep the process from exiting.
        try:
            async with asyncio.timeout(STORE_CLOSE_SECONDS):
                if self.ops is not None:
                    await self.ops.stop()
                await self.store.close()
        except TimeoutError:
            log.warning(
                "the store did not close within %.0f s (unreachable?); stopping anyway:"
                " every acknowledged write is durable",
                STORE_CLOSE_SECONDS,
            )


async def start(settings: Settings, store: Store | None = None) -> RunningService:
    # Read before the store opens: TLS files that cannot be used stop it now, naming
    # the variable; so does a port open to other hosts that authenticates no caller.
    creds = tls_credentials(settings)
    open_to_others = unauthenticated_beyond_this_host(settings)
    if open_to_others and not settings.grpc_insecure:
        raise SystemExit(refused_open(settings.grpc_addr))
    store = store if store is not None else open_store(settings)
    await store.start()
    jobs = Jobs(store, Fanout(settings.watch_buffer), store.policy, settings.public_url)
    await jobs.start()
    admission = WatchAdmission(settings.max_watchers)
    ops = await start_operations(settings, store, jobs, admission)

    # SO_REUSEPORT only when watch workers share the port: otherwise a second service
    # started by mistake on the same port would silently take half the connections.
    workers = WatchWorkers(settings.watch_workers) if settings.watch_workers else None
    reuse = 1 if workers is not None else 0
    options = [
        ("grpc.so_reuseport", reuse),
        *server_options(settings.max_watchers, settings.min_ping_seconds),
    ]
    # Tracing (when on) outermost, so its span covers the metrics and auth interceptors.
    interceptors = [*server_interceptors(), *ops.interceptors]
    server = grpc.aio.server(options=options, interceptors=interceptors)
    add_to_server(JobServicer(jobs, admission), server)
    health_servicer = add_health_and_reflection(server)
    port = listen(server, settings, creds)
    if open_to_others:  # on purpose: JOBWIRE_GRPC_INSECURE
        log.warning(
            "JOBWIRE_GRPC_INSECURE is on: the service listens on %s without"
            " JOBWIRE_GRPC_TOKEN or client certificates; any client that reaches this port"
            " can create, cancel, delete and read every job and artifact",
            settings.grpc_addr,
        )
    jobs.fanout.corker = corker_for(settings, port)
    if workers is not None:
        server.add_generic_rpc_handlers((feed_handler(jobs.fanout),))
        server.add_insecure_port(workers.internal_target)  # a 0700 directory's socket
    await server.start()
    if workers is not None:
        workers.start(settings, with_port(settings.grpc_addr, port), jobs.resync_seconds)
    await set_health(health_servicer, serving=True)
    sweeper = asyncio.get_running_loop().create_task(
        jobs.sweep_leases_forever(settings.lease_sweep_seconds), name="lease-sweeper"
    )
    retention, retention_sweeper = None, None
    if settings.job_retention_seconds > 0:
        retention = Retention(
            store,
            int(settings.job_retention_seconds * 1e9),
            settings.job_retention_sweep_seconds,
            publish=jobs.publish_deleted,
        )
        retention_sweeper = asyncio.get_running_loop().create_task(
            retention.run_forever(), name="retention-sweeper"
        )
    return RunningService(
        server,
        port,
        jobs,
        store,
        health_servicer,
        sweeper,
        ops,
        workers,
        retention,
        retention_sweeper,
    )


def corker_for(settings: Settings, port: int) -> Corker | None:
    """Per-connection batching of large fan-outs, where the platform has TCP_CORK."""
    return Corker(port) if settings.watch_cork and cork_supported() else None


def add_health_and_reflection(server: grpc.aio.Server) -> health.aio.HealthServicer:
    """The standard health service and reflection, as every process on the port has."""
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    return health_servicer


async def set_health(servicer: health.aio.HealthServicer, serving: bool) -> None:
    """The overall status ("") and JobService's."""
    status = health_pb2.HealthCheckResponse
    for name in ("", SERVICE_NAME):
        await servicer.set(name, status.SERVING if serving else status.NOT_SERVING)


def tls_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """JOBWIRE_GRPC_TLS_*: the server's credentials, or None for plaintext."""
    return server_credentials(
        settings.grpc_tls_cert, settings.grpc_tls_key, settings.grpc_tls_client_ca
    )


def unauthenticated_beyond_this_host(settings: Settings) -> bool:
    """Whether other hosts may reach the port and nothing identifies a caller: no
    JOBWIRE_GRPC_TOKEN and no client certificates (JOBWIRE_GRPC_TLS_CLIENT_CA)."""
    authenticated = bool(settings.grpc_token or settings.grpc_tls_client_ca)
    return not authenticated and not local_only(settings.grpc_addr)


def refused_open(addr: str) -> str:
    """The one line a service open to every host stops with ("No endpoint is open by
    default", DESIGN.md): the image and the manifests listen on 0.0.0.0."""
    return (
        f"jobwire: JOBWIRE_GRPC_TOKEN is not set and JOBWIRE_GRPC_ADDR={addr} is reachable"
        " from other hosts: set JOBWIRE_GRPC_TOKEN to a random secret (e.g. python3 -c"
        " 'import secrets; print(secrets.token_urlsafe(32))') and give the bridge and the"
        " dashboard the same, or require client certificates (JOBWIRE_GRPC_TLS_CLIENT_CA),"
        " or set JOBWIRE_GRPC_INSECURE=1 to serve it open on a private network"
        ' (README "TLS and internal auth")'
    )


def local_only(addr: str) -> bool:
    """Whether a listen address takes connections from this host alone (loopback or a
    Unix socket): any other is open to whoever reaches it."""
    if addr.startswith(("unix:", "unix-abstract:")):
        return True
    host = addr.rsplit(":", 1)[0].strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name (or 0.0.0.0's spelling as "")


def listen(
    server: grpc.aio.Server, settings: Settings, creds: grpc.ServerCredentials | None
) -> int:
    """Binds JOBWIRE_GRPC_ADDR, with TLS when `creds`; the port bound."""
    try:
        if creds is None:
            port = server.add_insecure_port(settings.grpc_addr)
        else:
            port = server.add_secure_port(settings.grpc_addr, creds)
    except RuntimeError:  # grpcio raises where older versions returned 0
        port = 0
    if port == 0:
        raise SystemExit(f"cannot listen on JOBWIRE_GRPC_ADDR={settings.grpc_addr}")
    return port


async def serve(settings: Settings) -> None:
    """Runs until SIGTERM or SIGINT, then shuts down gracefully."""
    try:
        running = await start(settings)
    except StorageUnavailable as err:  # the store's own words: path and problem
        log.error("cannot start: %s", err.message)
        raise SystemExit(1) from None
    store_name = "MongoDB" if settings.mongodb_uri else f"embedded store in {settings.data_dir}"
    # The port bound: JOBWIRE_GRPC_ADDR's port 0 said ":0".
    where = with_port(settings.grpc_addr, running.port)
    log.info("jobwire service listening on %s (%s)", where, store_name)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down (grace %.0fs)", settings.shutdown_grace_seconds)
    await running.stop(settings.shutdown_grace_seconds)
    log.info("service stopped")
