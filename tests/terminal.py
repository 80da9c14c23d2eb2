"""A command in a tmux pane of a fixed size, read back as a person would see it: the
screen's rows (`capture-pane`) and the pane's title. Each Terminal runs its own tmux
server on a socket in the test's directory."""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from tests.helpers import tool_missing


def tmux_path() -> str:
    """tmux (`make tmux` installs it); a test that needs it fails under CI=true."""
    return shutil.which("tmux") or tool_missing("tmux is missing (make tmux)")


class Terminal:
    def __init__(self, tmp_path: Path, width: int = 80, height: int = 12) -> None:
        self.tmux = tmux_path()
        self.socket = str(tmp_path / "tmux.sock")
        self.width, self.height = width, height

    def _run(self, *args: str, env: dict[str, str] | None = None) -> str:
        done = subprocess.run(
            [self.tmux, "-S", self.socket, "-f", "/dev/null", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=10,
            check=True,
        )
        return done.stdout

    def start(self, command: list[str], env: dict[str, str]) -> None:
        """Runs `command`, then prints its exit status and keeps the pane open."""
        # `trap : INT`: Ctrl-C reaches the command (a handler, unlike an ignored signal,
        # is not inherited) and the shell lives on to print the status (130 for SIGINT).
        shell = f'trap : INT; {shlex.join(command)}; echo "[exit $?]"; sleep 600'
        self._run(
            "new-session", "-d", "-x", str(self.width), "-y", str(self.height),
            "-s", "t", shell, env={**os.environ, **env, "TERM": "xterm-256color"},
        )  # fmt: skip

    def send_keys(self, *keys: str) -> None:
        """Keys as tmux names them (`C-c` is Ctrl-C: SIGINT to the foreground group)."""
        self._run("send-keys", "-t", "t", *keys)

    def screen(self) -> list[str]:
        """The visible rows, trailing blanks removed (a wide character is one entry)."""
        return [row.rstrip() for row in self._run("capture-pane", "-p", "-t", "t").split("\n")]

    def title(self) -> str:
        return self._run("display-message", "-p", "-t", "t", "#{pane_title}").strip()

    async def wait_for(self, seen: Callable[[str], bool], timeout: float = 20.0) -> list[str]:
        """The screen once `seen(text of the screen)` holds; fails after `timeout`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            rows = self.screen()
            if seen("\n".join(rows)):
                return rows
            assert loop.time() < deadline, "not on screen in time:\n" + "\n".join(rows)
            await asyncio.sleep(0.05)  # tmux announces no redraws: poll the screen

    def close(self) -> None:
        subprocess.run([self.tmux, "-S", self.socket, "kill-server"], capture_output=True)
