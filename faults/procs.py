"""The service and the bridge as real processes (`python -m cli serve|bridge`) on free
loopback ports, restartable on the same port and data, killable by PID."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

START_TIMEOUT = 60.0
API_KEY = "faults-api-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Process:
    """One child process; `start()` again after `kill()` restarts it the same way."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log: Path) -> None:
        self.name = name
        self.args = args
        self.env = env
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def spawn(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.args, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )  # fmt: skip

    def signal(self, sig: signal.Signals) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.signal(signal.SIGCONT)  # a frozen process cannot handle SIGTERM
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


class Service(Process):
    def __init__(self, workdir: Path, data_dir: Path, mongodb_uri: str = "") -> None:
        self.port = free_port()
        env = {
            **os.environ,
            "JOBWIRE_GRPC_ADDR": f"127.0.0.1:{self.port}",
            "JOBWIRE_DATA_DIR": str(data_dir),
            "MONGODB_URI": mongodb_uri,
            "JOBWIRE_METRICS_ADDR": "",
            "JOBWIRE_EVENT_FEED": "off",
            # Every event of a run stays listable, so each one can be counted.
            "JOBWIRE_EVENT_RETENTION": "1000000",
        }
        super().__init__("service", [sys.executable, "-m", "cli", "serve"], env,
                         workdir / "service.log")  # fmt: skip

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self.spawn()
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"service exited at start:\n{self.log_tail()}")
            try:
                with grpc.insecure_channel(self.target) as channel:
                    reply = health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(), timeout=1
                    )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)  # polling a process that is starting
        raise RuntimeError(f"service not healthy within {START_TIMEOUT}s:\n{self.log_tail()}")


class Bridge(Process):
    def __init__(self, workdir: Path, service_target: str, rpc_timeout: float) -> None:
        self.port = free_port()
        env = {
            **os.environ,
            "JOBWIRE_HTTP_ADDR": f"127.0.0.1:{self.port}",
            "JOBWIRE_SERVICE_TARGET": service_target,
            "JOBWIRE_ENV_FILE": str(workdir / "none.env"),
            "API_KEY": API_KEY,
            "JOBWIRE_RPC_TIMEOUT_SECONDS": str(rpc_timeout),
            "JOBWIRE_RETRY_AFTER_SECONDS": "1",
            "JOBWIRE_HTTP_WORKERS": "1",
        }
        super().__init__("bridge", [sys.executable, "-m", "cli", "bridge"], env,
                         workdir / "bridge.log")  # fmt: skip

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.spawn()
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"bridge exited at start:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=1) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)  # polling a process that is starting
        raise RuntimeError(f"bridge not up within {START_TIMEOUT}s:\n{self.log_tail()}")
