"""Start the real app on a free local port and drive Debian's Chromium with Playwright (no browser download)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(home: Path, log_path: Path, timeout: float) -> tuple[subprocess.Popen, str | None]:
    """Start the server on a port the OS just gave out; (process, URL), or URL None if it exited early."""
    port = free_port()
    env = dict(os.environ, ZIMAGE_HOME=str(home), PYTHONUNBUFFERED="1")
    cmd = [
        sys.executable, "-m", "streamlit", "run", str(ROOT / "Home.py"),
        "--server.port", str(port), "--server.address", "127.0.0.1", "--server.headless", "true",
        "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none",
    ]  # fmt: skip
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            pass
        time.sleep(0.5)
    return proc, None


@contextmanager
def streamlit_server(home: Path, log_path: Path, timeout: float = 90.0):
    """Yield the base URL of `streamlit run Home.py` serving ZIMAGE_HOME=home; stop it afterwards.

    Streamlit needs its port on the command line, so the OS picks a free one first; should another process
    take it in between (the server then exits at once), a new port is tried.
    """
    for _ in range(3):
        proc, url = _start(home, log_path, timeout)
        if url is not None or proc.poll() is None:
            break
    try:
        if url is None:
            raise RuntimeError(f"streamlit did not start; see {log_path}")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


def settle(page, timeout: float = 20.0) -> None:
    """Wait until the app's rerun is over: no status widget ("Running...") and no stale elements left."""
    page.wait_for_timeout(500)  # Streamlit shows its status widget only after a short delay
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        busy = page.locator("[data-testid='stStatusWidget']").count() or page.locator("[data-stale='true']").count()
        if not busy:
            return
        page.wait_for_timeout(200)
    raise AssertionError(f"the app kept running for more than {timeout} s")
