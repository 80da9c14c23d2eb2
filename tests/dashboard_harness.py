"""The real dashboard as its own process (`jobwire dashboard`) and Debian's chromium
driven by Playwright, for the browser tests and the dashboard bench."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from tests.helpers import free_port, tool_missing

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "test-dashboard-token-0123456789"
SCREENSHOTS = ROOT / "docs" / "screenshots"
LAPTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}


def chromium_path() -> str:
    """Debian's chromium; a test that needs it fails under CI=true when it is missing."""
    found = os.environ.get("JOBWIRE_CHROMIUM") or shutil.which("chromium") or ""
    if not found and Path("/usr/bin/chromium").exists():
        found = "/usr/bin/chromium"
    return found or tool_missing(
        "chromium not installed (make test installs it: apt-get install -y chromium)"
    )


@dataclass
class DashboardProcess:
    """`python -m cli dashboard` on a fixed free port; restart() keeps the port."""

    service_target: str
    port: int = field(default_factory=free_port)
    extra_env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "JOBWIRE_DASHBOARD_ADDR": f"127.0.0.1:{self.port}",
                "JOBWIRE_DASHBOARD_TOKEN": TOKEN,
                "JOBWIRE_SERVICE_TARGET": self.service_target,
                "JOBWIRE_ENV_FILE": os.devnull,
                "JOBWIRE_PUBLIC_URL": "http://127.0.0.1:8080",
                **self.extra_env,
            }
        )
        env.pop("JOBWIRE_GENERATE_SECRETS", None)
        return env

    async def start(self, timeout: float = 30.0) -> None:
        self.proc = await asyncio.to_thread(
            subprocess.Popen, [sys.executable, "-m", "cli", "dashboard"], cwd=ROOT, env=self.env()
        )
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as http:
            while True:
                if self.proc.poll() is not None:
                    raise AssertionError(f"dashboard exited with {self.proc.returncode}")
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(self.url + "/healthz") as reply:
                        if reply.status == 200:
                            return
                if time.monotonic() > deadline:
                    raise AssertionError("dashboard did not answer /healthz")
                await asyncio.sleep(0.1)  # polling a process that is starting, not a sync point

    async def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(self.proc.wait, 10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                await asyncio.to_thread(self.proc.wait)
        self.proc = None


@contextlib.asynccontextmanager
async def running_dashboard(
    service_target: str, **extra_env: str
) -> AsyncIterator[DashboardProcess]:
    dash = DashboardProcess(service_target, extra_env=dict(extra_env))
    await dash.start()
    try:
        yield dash
    finally:
        await dash.stop()


@contextlib.asynccontextmanager
async def chromium() -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    path = chromium_path()
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=path, args=["--no-sandbox", "--disable-dev-shm-usage"]
        )
        try:
            yield browser
        finally:
            await browser.close()


async def login(context: Any, base_url: str, token: str = TOKEN) -> Any:
    """Logs in through the form; returns the page, now on the jobs page."""
    page = await context.new_page()
    await page.goto(base_url + "/jobs")
    await page.fill("input[name=token]", token)
    async with page.expect_navigation():
        await page.click("button[type=submit]")
    return page
