"""A MongoDB for the tests: MONGODB_URI when set, else FerretDB (SQLite backend) on loopback.

FerretDB v1.24.2 is built once by `bash scripts/install-ferretdb.sh` into
~/.cache/jobwire (override the binary with JOBWIRE_FERRETDB_BIN). Without it the
MongoDB tests are skipped, or fail when CI=true.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from pymongo import MongoClient
from pymongo.errors import PyMongoError

from tests.helpers import free_port, tool_missing

DEFAULT_BIN = Path.home() / ".cache" / "jobwire" / "ferretdb-v1.24.2" / "ferretdb"
START_TIMEOUT_S = 30.0


def ferretdb_binary() -> Path:
    return Path(os.environ.get("JOBWIRE_FERRETDB_BIN") or DEFAULT_BIN).expanduser()


def require_ferretdb() -> Path:
    """The FerretDB binary, or skip (fail under CI=true) saying why."""
    binary = ferretdb_binary()
    if binary.is_file() and os.access(binary, os.X_OK):
        return binary
    tool_missing(
        f"FerretDB not found at {binary}: run `bash scripts/install-ferretdb.sh` "
        "or set MONGODB_URI to test the MongoDB adapter"
    )


class FerretDBProcess:
    """One FerretDB on 127.0.0.1:<port> over a SQLite data directory.

    `stop()` and `start()` may be repeated: the port and the data survive, so a
    test can take the server away and bring the same one back.
    """

    def __init__(
        self,
        binary: Path,
        base_dir: Path | None = None,
        port: int = 0,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.binary = binary
        self.extra_args = list(extra_args)  # e.g. authentication: see `with_user`
        self._own_dir = base_dir is None
        self.base_dir = (
            Path(tempfile.mkdtemp(prefix="jobwire-ferretdb-")) if base_dir is None else base_dir
        )
        self.data_dir = self.base_dir / "data"
        self.state_dir = self.base_dir / "state"
        self.log_path = self.base_dir / "ferretdb.log"
        self.port = port or free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def with_user(cls, binary: Path, user: str, password: str, database: str) -> FerretDBProcess:
        """A FerretDB that requires a login (SCRAM), with one user of `database`."""
        return cls(
            binary,
            extra_args=[
                "--test-enable-new-auth",
                f"--setup-database={database}",
                f"--setup-username={user}",
                f"--setup-password={password}",
            ],
        )

    @property
    def uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/"

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs (for SIGSTOP / SIGCONT)."""
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        if self.running:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        args = [
            str(self.binary),
            "--handler=sqlite",
            f"--sqlite-url=file:{self.data_dir}/",
            f"--listen-addr=127.0.0.1:{self.port}",
            "--debug-addr=-",
            f"--state-dir={self.state_dir}",
            "--telemetry=disable",
            "--log-level=warn",
            *self.extra_args,
        ]
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(
                    f"FerretDB exited with {self._proc.returncode} at start:\n{self.log_tail()}"
                )
            client: MongoClient[dict[str, object]] = MongoClient(
                self.uri, serverSelectionTimeoutMS=250, connectTimeoutMS=250
            )
            try:
                client.admin.command("ping")
                return
            except PyMongoError as exc:
                last_error = exc
            finally:
                client.close()
        self.stop()
        raise RuntimeError(
            f"FerretDB did not answer ping on {self.uri} within {timeout}s ({last_error}):\n"
            f"{self.log_tail()}"
        )

    def stop(self, timeout: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)

    def kill(self) -> None:
        """Stops the server abruptly (SIGKILL), as a crash would."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def cleanup(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def mongo_uri_for_tests() -> Iterator[str]:
    """MONGODB_URI, or a fresh FerretDB for as long as the generator is open."""
    env_uri = os.environ.get("MONGODB_URI")
    if env_uri:
        yield env_uri
        return
    server = FerretDBProcess(require_ferretdb())
    try:
        server.start()
        yield server.uri
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
def mongo_uri() -> Iterator[str]:
    """A MongoDB URI (no database in the path) shared by the whole session."""
    yield from mongo_uri_for_tests()
