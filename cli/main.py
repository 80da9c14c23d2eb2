"""The `jobwire` command: run the service and bridge, and talk to a running service."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jobwire.client.channel import TLS, open_sync_channel
from jobwire.client.client import check_target
from jobwire.client.errors import ClientConfigError
from jobwire.v1 import job_pb2, log_pb2
from service.config import Settings
from service.logs import configure as configure_logging

from . import client_commands


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        # A usage error, so on stderr as argparse's own (it went to stdout, with status 2).
        parser.print_help(sys.stderr)
        raise SystemExit(2)
    configure_logging()  # JOBWIRE_LOG_FORMAT (json|text), JOBWIRE_LOG_LEVEL; redacted
    _die_with_parent()
    try:
        code = args.func(args)
    except BrokenPipeError:
        # `jobwire jobs list | head`: the reader has what it wanted. Quiet, as `cat` is;
        # stdout goes to /dev/null so the interpreter's final flush raises nothing more.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        raise SystemExit(141) from None  # 128 + SIGPIPE, what a shell reports for `cat`
    except KeyboardInterrupt:
        # Ctrl-C in a client command (the servers handle SIGINT themselves): no
        # traceback, and the process ends as killed by SIGINT, so a calling shell
        # script stops too instead of running on.
        sys.stdout.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        raise SystemExit(130) from None  # where SIGINT does not end the process
    raise SystemExit(code)


def add_kind_and_states(p: argparse.ArgumentParser, state_help: str) -> None:
    p.add_argument(
        "--state",
        action="append",
        default=[],
        choices=_names(job_pb2.JobState, "JOB_STATE_"),
        help=state_help,
    )
    p.add_argument(
        "--kind", default="", choices=_names(job_pb2.JobKind, "JOB_KIND_"), help="only this kind"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jobwire", description=__doc__)
    sub = parser.add_subparsers(metavar="COMMAND")
    target = os.environ.get("JOBWIRE_SERVICE_TARGET", "127.0.0.1:50051")

    def add_target(p: argparse.ArgumentParser) -> None:
        help_ = f"the service's gRPC address (JOBWIRE_SERVICE_TARGET; now {target})"
        p.add_argument("--target", default=target, help=help_)

    p = sub.add_parser("serve", help="run the gRPC service")
    p.set_defaults(func=_serve)
    p = sub.add_parser("bridge", help="run the HTTP bridge")
    p.set_defaults(func=_bridge)
    p = sub.add_parser("run", help="run the service, the HTTP bridge and the dashboard together")
    p.set_defaults(func=_run)
    p = sub.add_parser("dashboard", help="run the web dashboard (JOBWIRE_DASHBOARD_ADDR)")
    p.set_defaults(func=_dashboard)
    p = sub.add_parser("watch-worker", help="(started by serve for JOBWIRE_WATCH_WORKERS)")
    p.set_defaults(func=_watch_worker)

    p = sub.add_parser("healthcheck", help="exit 0 when the service (or bridge) is healthy")
    add_target(p)
    p.add_argument("--http", default="", help="check this bridge URL instead (e.g. /readyz)")
    p.set_defaults(func=_healthcheck)

    p = sub.add_parser("watch", help="follow a job's progress until it ends")
    p.add_argument("job_id")
    add_target(p)
    p.add_argument(
        "--from-sequence",
        type=whole(0, INT64_MAX),
        default=0,
        help="resume after this event (0: from the start)",
    )
    p.add_argument(
        "--created",
        type=aware_time,
        default=None,
        metavar="TIME",
        help="the watched job's create time, as a watch stopped early prints it: a job"
        " made again under the id since then is refused, not followed as its continuation",
    )
    p.set_defaults(func=lambda a: asyncio.run(client_commands.watch(a)))

    jobs = sub.add_parser(
        "jobs", help="create, get, list, cancel and delete jobs; their events; tail them all"
    ).add_subparsers(metavar="ACTION", dest="action", required=True)
    p = jobs.add_parser("create", help="create a job; prints it with its callback token")
    p.add_argument("--kind", required=True, choices=_names(job_pb2.JobKind, "JOB_KIND_"))
    p.add_argument("--id", default="", help="the job id (default: a random UUID the client makes)")
    p.add_argument("--label", action=Labels, default={}, metavar="KEY=VALUE", help="repeatable")
    p.add_argument("--video-url", default="", help="the video to fetch (required for VIDEO jobs)")
    p.add_argument("--title", default="")
    p.add_argument("--playlist", default="")
    p.add_argument("--subtitle", default="")
    add_target(p)
    p.set_defaults(func=_create(p))
    p = jobs.add_parser("get", help="print one job")
    p.add_argument("job_id")
    add_target(p)
    p.set_defaults(func=lambda a: asyncio.run(client_commands.get(a)))
    p = jobs.add_parser("events", help="print a job's retained events, oldest first")
    p.add_argument("job_id")
    p.add_argument(
        "--from-sequence", type=whole(0, INT64_MAX), default=0, help="only events after this one"
    )
    add_target(p)
    p.set_defaults(func=lambda a: asyncio.run(client_commands.events(a)))
    p = jobs.add_parser("cancel", help="cancel a job that has not ended; prints it")
    p.add_argument("job_id")
    p.add_argument("--reason", default="", help="kept with the job and shown on it")
    add_target(p)
    p.set_defaults(func=lambda a: asyncio.run(client_commands.cancel(a)))
    p = jobs.add_parser(
        "delete",
        help="delete a job that has ended, with its events, logs and artifacts; prints its id",
    )
    p.add_argument("job_id")
    add_target(p)
    p.set_defaults(func=lambda a: asyncio.run(client_commands.delete(a)))
    p = jobs.add_parser(
        "tail", help="print every job's events as they happen, one JSON line each (Ctrl-C ends)"
    )
    add_kind_and_states(p, "only events leaving a job in this state (repeatable: any of them)")
    p.add_argument(
        "--after",
        default="",
        metavar="POSITION",
        help='resume after a printed position ("0": the service\'s whole retained window)',
    )
    add_target(p)
    p.set_defaults(func=lambda a: asyncio.run(client_commands.tail(a)))
    p = jobs.add_parser("list", help="list jobs, oldest first (--newest-first: the other way)")
    add_kind_and_states(p, "only jobs in this state (repeatable: any of them)")
    p.add_argument(
        "--label",
        action=Labels,
        default={},
        metavar="KEY=VALUE",
        help="only jobs with this label (repeatable: all of them)",
    )
    p.add_argument("--page-size", type=whole(1, 1000), default=50, help="jobs per page (1-1000)")
    # One or the other: --all started from the first page, the token ignored unsaid.
    pages = p.add_mutually_exclusive_group()
    pages.add_argument("--page-token", default="", help="next_page_token of the previous page")
    pages.add_argument("--all", action="store_true", help="every page (--page-size per call)")
    p.add_argument(
        "--newest-first", action="store_true", help="newest jobs first (default: oldest first)"
    )
    add_target(p)
    p.set_defaults(func=lambda a: asyncio.run(client_commands.list_jobs(a)))

    p = sub.add_parser("logs", help="print log lines, newest first")
    p.add_argument("--job", default="", help="only this job's lines")
    p.add_argument(
        "--level",
        default="",
        choices=_names(log_pb2.LogLevel, "LOG_LEVEL_"),
        help="only lines of this level",
    )
    p.add_argument(
        "--limit", type=whole(1, 1000), default=50, help="at most this many lines (1-1000)"
    )
    add_target(p)
    p.set_defaults(func=lambda a: asyncio.run(client_commands.logs(a)))

    try:
        from http_bridge.worker_cli import register
    except ImportError:  # the bridge package is optional for the service image
        pass
    else:
        register(sub)
    return parser


def _create(p: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        # Refused by the service too (INVALID_ARGUMENT, job.video.url); said here as the
        # usage error it is, naming the option, before anything is sent.
        if args.kind == "VIDEO" and not args.video_url:
            p.error("--video-url is required for --kind VIDEO")
        if not args.video_url and (args.title or args.playlist or args.subtitle):
            # They were dropped without a word, the job made without them.
            p.error("--title, --playlist and --subtitle go with --video-url (a VIDEO job's)")
        return asyncio.run(client_commands.create(args))

    return run


# -- processes ---------------------------------------------------------------


def _serve(_: argparse.Namespace) -> int:
    from service.server import serve

    from .tracing import setup_service

    setup_service()  # OTLP traces when OTEL_EXPORTER_OTLP_ENDPOINT is set
    _install_uvloop()
    _freeze_startup_objects()
    asyncio.run(serve(Settings.from_env()))
    return 0


def _watch_worker(_: argparse.Namespace) -> int:
    from service.watch_worker import run_worker

    _install_uvloop()
    _freeze_startup_objects()
    run_worker()
    return 0


def _dashboard(_: argparse.Namespace) -> int:
    from dashboard.config import ensure_token
    from dashboard.server import main as dashboard_main

    _redact_env_file_secrets(ensure_token)
    dashboard_main()
    return 0


def _bridge(_: argparse.Namespace) -> int:
    from http_bridge.config import ensure_secrets
    from http_bridge.server import main as bridge_main

    from .tracing import setup_bridge

    _redact_env_file_secrets(ensure_secrets)
    setup_bridge()  # OTLP traces when OTEL_EXPORTER_OTLP_ENDPOINT is set
    bridge_main()
    return 0


def _redact_env_file_secrets(
    generate: Callable[[Path, Mapping[str, str]], dict[str, str]],
) -> None:
    """The bridge and the dashboard take a secret the environment lacks from the env file
    (JOBWIRE_ENV_FILE, ./jobwire.env), which JOBWIRE_GENERATE_SECRETS=1 first fills in
    with `generate`. The log filter is set up again to redact those values too: it knew
    only the environment's, so a key from the file reached the access log in clear."""
    from http_bridge.config import merged_env

    env_file, merged = merged_env()
    if os.environ.get("JOBWIRE_GENERATE_SECRETS") == "1":
        merged.update(generate(env_file, merged))  # the process's config reads them back
    # The log settings are theirs too: read from the environment alone, a level or
    # format in the file was ignored, a bad one without a word.
    configure_logging(
        fmt=merged.get("JOBWIRE_LOG_FORMAT"), level=merged.get("JOBWIRE_LOG_LEVEL"), environ=merged
    )


def _run(_: argparse.Namespace) -> int:
    """Service and bridge as two processes; the bridge starts once the service is healthy."""
    settings = Settings.from_env()
    env = dict(os.environ)
    env.setdefault("JOBWIRE_SERVICE_TARGET", settings.grpc_addr)
    try:
        # One its health check can never reach ("" from a template, a port past 65535)
        # was waited on for the whole start bound; the bridge refuses it the same way.
        check_target(env["JOBWIRE_SERVICE_TARGET"])
    except ClientConfigError as err:
        raise SystemExit(f"jobwire: JOBWIRE_SERVICE_TARGET: {err}") from None
    if _answers(env["JOBWIRE_SERVICE_TARGET"]):
        # Another service there (a second run on the same address) passed the health
        # check below, so the bridge and the dashboard started against it before this
        # run's own service failed to bind and took them down. Refused before any spawn.
        raise SystemExit(
            f"jobwire: a service already answers at {env['JOBWIRE_SERVICE_TARGET']}"
            " (another jobwire run or serve?); started nothing: stop it, or give this"
            " run another JOBWIRE_GRPC_ADDR"
        )
    env.update(_local_secrets(env, settings))
    env[RUN_PARENT] = str(os.getpid())  # the children stop when this process dies
    cmd = [sys.executable, "-m", "cli"]
    stopping = False

    def on_signal(*_: Any) -> None:
        nonlocal stopping
        stopping = True

    # Before the first child: a signal in between killed this process and left it.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    # Each child in a session of its own: a terminal's Ctrl-C (SIGINT to its foreground
    # group) reaches this process alone, which then stops the bridge and the dashboard
    # before the service; the service stopped at the same moment, so callbacks in flight
    # got 503. A child still stops when this process dies (_die_with_parent).
    def spawn(command: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen([*cmd, command], env=env, start_new_session=True)

    service = spawn("serve")
    children = {"service": service}
    bound = settings.service_start_timeout_seconds
    deadline = time.monotonic() + bound
    # Waited for as long as the service runs, up to the bound: a fixed 30 s gave up on
    # a large embedded store's recovery. Its exit ends the wait at once, named.
    while not _healthy(env["JOBWIRE_SERVICE_TARGET"], min(2.0, bound)):
        if stopping:
            _stop_children(children)
            return 0
        if service.poll() is not None:
            _stop_children(children)
            print(
                f"jobwire: the service exited ({_describe_exit(service.returncode)}) before"
                " it became healthy; its log above says why",
                file=sys.stderr,
            )
            return _exit_status(service.returncode) or 1
        if time.monotonic() > deadline:
            _stop_children(children)
            print(
                f"jobwire: the service did not become healthy within {bound:g} s"
                " (JOBWIRE_SERVICE_START_TIMEOUT_SECONDS); stopped it; its log above"
                " says what it was doing",
                file=sys.stderr,
            )
            return 1
        with contextlib.suppress(subprocess.TimeoutExpired):
            service.wait(0.2)  # returns as soon as the service exits
    children["bridge"] = spawn("bridge")
    children["dashboard"] = spawn("dashboard")
    while not stopping and all(child.poll() is None for child in children.values()):
        time.sleep(0.2)
    died = {name: c.returncode for name, c in children.items() if c.returncode is not None}
    codes = _stop_children(children)
    if died and not stopping:
        # One died on its own (a crash, the OOM killer): say which, and fail, so that a
        # supervisor restarts the lot; a signal's death is 128 + its number, as a shell says.
        name, code = next(iter(died.items()))
        print(
            f"jobwire: the {name} exited ({_describe_exit(code)}); stopped the others",
            file=sys.stderr,
        )
        return _exit_status(code) or 1
    # Killed by the SIGTERM sent here (or the terminal's SIGINT) while on its way out
    # anyway: a normal stop.
    normal = (0, -signal.SIGTERM, -signal.SIGINT)
    failed = {name: code for name, code in codes.items() if code not in normal}
    for name, code in failed.items():
        print(f"jobwire: the {name} stopped with {_describe_exit(code)}", file=sys.stderr)
    return max((_exit_status(code) for code in failed.values()), default=0)


RUN_PARENT = "JOBWIRE_RUN_PARENT"  # the pid of the `jobwire run` that started a child
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent() -> None:
    """A child of `jobwire run` is sent SIGTERM when run dies, even by SIGKILL (Linux's
    parent-death signal): a killed run left its service, bridge and dashboard running,
    holding the ports and the data directory's lock. The variable goes with this
    process: the service's own children (watch workers) have another parent."""
    parent = os.environ.pop(RUN_PARENT, "")
    if not parent or not sys.platform.startswith("linux"):
        return
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if str(os.getppid()) != parent:  # run died before the line above could tell
        raise SystemExit("jobwire: the jobwire run that started this process is gone")


def _stop_children(children: dict[str, subprocess.Popen[bytes]]) -> dict[str, int]:
    """SIGTERM to the bridge and the dashboard first, then (once they finished their
    requests in flight, which need the service) to the service; their exit codes."""
    front = [c for name, c in children.items() if name != "service"]
    for group in (front, [children["service"]]):
        for child in group:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in group:
            child.wait()
    return {name: child.returncode for name, child in children.items()}


def _exit_status(code: int) -> int:
    return 128 - code if code < 0 else code


def _describe_exit(code: int) -> str:
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"status {code}"


GRPC_TOKEN = "JOBWIRE_GRPC_TOKEN"


def _local_secrets(env: dict[str, str], settings: Settings) -> dict[str, str]:
    """The bridge's secrets and the dashboard's token for `jobwire run`: from jobwire.env,
    generated into it when missing. They are handed to the children in their
    environment, because each process's log filter redacts the secret values its
    environment holds: one read from the file would otherwise reach a log unredacted.

    JOBWIRE_GRPC_TOKEN goes to all three children when set, the service included (it
    reads only its environment). It is generated only when the service listens beyond
    loopback with nothing else closing it: on loopback, as `jobwire serve`, the service
    runs without one, and the CLI's commands against it need none."""
    from dashboard.config import TOKEN_VAR, ensure_token
    from http_bridge.config import GENERATED_SECRETS, ensure_secrets, generate_missing, merged_env
    from service.server import unauthenticated_beyond_this_host

    env_file, merged = merged_env(env)
    merged.update(ensure_secrets(env_file, merged))
    merged.update(ensure_token(env_file, merged))
    with_file_token = replace(settings, grpc_token=merged.get(GRPC_TOKEN, ""))
    if unauthenticated_beyond_this_host(with_file_token) and not settings.grpc_insecure:
        what = "the service's gRPC token (it listens beyond loopback)"
        merged.update(generate_missing(env_file, merged, [GRPC_TOKEN], what))
    names = (*GENERATED_SECRETS, TOKEN_VAR, GRPC_TOKEN)
    return {name: merged[name] for name in names if merged.get(name)}


def _healthy(target: str, timeout: float = 2.0) -> bool:
    try:
        with open_sync_channel(target, tls=_tls_from_env()) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout)
            return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
    except grpc.RpcError:
        return False


def _answers(target: str, timeout: float = 1.0) -> bool:
    """Whether a gRPC server answers the health check at `target` at all, whatever it
    says (SERVING, NOT_SERVING while it stops, UNAUTHENTICATED): nobody listening is
    UNAVAILABLE, a listener that never answers runs out the timeout."""
    try:
        with open_sync_channel(target, tls=_tls_from_env()) as channel:
            health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout
            )
            return True
    except grpc.RpcError as err:
        silent = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        return err.code() not in silent


def _tls_from_env() -> TLS | None:
    try:
        return TLS.from_env()  # a CA that is not PEM: named, not gRPC's errors
    except ClientConfigError as err:
        raise SystemExit(f"jobwire: {err}") from None


def _healthcheck(args: argparse.Namespace) -> int:
    if args.http:
        import urllib.request

        _check_http_url(args.http)
        try:
            with urllib.request.urlopen(args.http, timeout=3) as reply:
                return 0 if reply.status == 200 else 1
        except OSError:
            return 1
    try:
        # gRPC dials a port past 65535 modulo 65536: 127.0.0.1:115587 was reported
        # healthy for the service on 50051. Checked as the client library checks it.
        check_target(args.target)
    except ClientConfigError as err:
        raise SystemExit(f"jobwire: {err}") from None
    return 0 if _healthy(args.target) else 1


def _check_http_url(url: str) -> None:
    """`healthcheck --http` takes an http(s) URL. One without its scheme
    (`127.0.0.1:8080/readyz`, in JOBWIRE_HEALTHCHECK_ARGS say) was reported unhealthy
    without a word, for ever, and an unclosed `[` ended in a traceback."""
    from http_bridge.worker_cli import is_http_url

    if not is_http_url(url):
        example = "http://127.0.0.1:8080/readyz"
        raise SystemExit(f"jobwire: --http wants an http(s) URL such as {example}, got {url!r}")


def _freeze_startup_objects() -> None:
    """Moves what the imports allocated out of the collector's generations: it lives
    as long as the process, and full collections then have far less to walk."""
    import gc

    gc.collect()
    gc.freeze()
    # Thousands of open watch streams are long-lived objects the young generations
    # keep re-walking: fewer collections cut the service's CPU per fan-out by a
    # quarter (README "Watchers"); garbage cycles are rare here.
    gc.set_threshold(50_000, 20, 20)


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    uvloop.install()


INT64_MAX = 2**63 - 1  # a sequence number is an int64 on the wire


class Labels(argparse.Action):
    """--label KEY=VALUE, repeatable, into a dict. A job holds one value per key, so a
    key given twice with two values is a usage error: the last one silently won
    (`jobs list --label team=a --label team=b`, "all of them", listed team=b's jobs)."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        key, sep, value = str(values).partition("=")
        if not sep or not key:
            parser.error(f"argument --label: wants KEY=VALUE, got {values!r}")
        labels = dict(getattr(namespace, self.dest) or {})
        if labels.get(key, value) != value:
            parser.error(
                f"argument --label: {key!r} given twice ({labels[key]!r} and {value!r});"
                " a job has one value per label"
            )
        labels[key] = value
        setattr(namespace, self.dest, labels)


def whole(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: a whole number from `low` to `high`, else a usage error naming
    the range (a sequence past int64 raised a ValueError traceback from protobuf, and
    --page-size 0 was sent, the service's default taken in its place)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be {low}-{high}, got {text}")
        return value

    return parse


def aware_time(text: str) -> datetime:
    """An argparse type: an ISO 8601 time with its UTC offset (a naive one would be
    taken as UTC, and a local time silently hours off)."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be an ISO 8601 time such as 2026-01-31T12:00:00.123456+00:00, got {text!r}"
        ) from None
    if value.utcoffset() is None:
        raise argparse.ArgumentTypeError(f"must give its UTC offset (+00:00 or Z), got {text!r}")
    return value


def _names(enum_type: Any, prefix: str) -> list[str]:
    return [n.removeprefix(prefix) for n in enum_type.keys() if not n.endswith("UNSPECIFIED")]  # noqa: SIM118 - protobuf enum wrappers iterate values


if __name__ == "__main__":
    main()
