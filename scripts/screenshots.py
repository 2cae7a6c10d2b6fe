"""What the screenshot scripts share: a server of their own on a free loopback port, polled until
it answers and stopped with all its processes, and a page of headless Chromium.

The browser is Debian's `chromium` (`apt-get install chromium`), driven by playwright
(`pip install playwright`), which downloads no browser of its own this way.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(command: list[str], log: Path, env: Mapping[str, str]) -> subprocess.Popen:
    """`command` with `env` added to this environment, its output in `log`; in a session of its
    own, so that `stop` ends the server and its workers together."""
    out = open(log, "w")
    return subprocess.Popen(
        command, stdout=out, stderr=out, env={**os.environ, **env}, start_new_session=True
    )


def wait_for(base: str, server: subprocess.Popen, what: str, timeout: float) -> None:
    """Until `base`/health answers; RuntimeError naming `what` if the server exits first or
    `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and server.poll() is None:
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{what} at {base} did not come up")


def stop(server: subprocess.Popen, timeout: float) -> None:
    """SIGTERM the server's process group, SIGKILL it after `timeout` seconds."""
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)


@contextmanager
def browser_page(width: int, height: int) -> Iterator[Any]:
    """A new page of headless Chromium with a `width` x `height` viewport (a playwright Page)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise RuntimeError("needs playwright: pip install playwright") from None
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise RuntimeError("chromium not found (Debian: apt-get install chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        try:
            yield browser.new_page(viewport={"width": width, "height": height})
        finally:
            browser.close()
