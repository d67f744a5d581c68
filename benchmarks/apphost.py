"""Run the app server and a headless browser from Python: for screenshots, benchmarks and tests.

A harness, not part of the app: it lives in the source checkout's ``benchmarks/`` (not in the
wheel) and starts the app only as a user would, through ``python -m healthwatch.cli app``.
Importable as ``benchmarks.apphost`` from the repository root (pytest adds it to ``sys.path``).

>>> from benchmarks.apphost import app_server, headless_chromium       # doctest: +SKIP
>>> with app_server("hw-store") as url, headless_chromium() as driver:  # doctest: +SKIP
...     driver.get(url + "/run?run=main")

The browser needs Debian ``chromium`` + ``chromium-driver`` and ``selenium`` (the ``[dev]`` extra);
it is imported only when :func:`headless_chromium` is called.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

#: Chromium and its WebDriver as Debian installs them (found on PATH first).
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
DRIVER = shutil.which("chromedriver") or ("/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists() else None)


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(cond: Callable[[], Any], timeout: float, what: str, every: float = 0.1) -> Any:
    """Poll ``cond`` until it returns something truthy and return that; after ``timeout`` seconds
    raise :class:`TimeoutError` naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def healthy(port: int, proc: subprocess.Popen | None = None) -> bool:
    """Whether the Streamlit server on ``port`` answers its health check (raises if ``proc`` exited)."""
    if proc is not None and proc.poll() is not None:
        raise RuntimeError(f"the app server exited with {proc.returncode}")
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2).status == 200
    except OSError:
        return False


def start_app(store: str | Path, port: int | None = None, log: Path | None = None,
              timeout: float = 120.0, env: dict[str, str] | None = None,
              cwd: Path | None = None) -> tuple[subprocess.Popen, str]:
    """Start ``healthwatch app --store S --port P`` as a child process; returns it and its URL once healthy.

    ``env`` replaces the child's environment and ``cwd`` its directory (another source tree is served
    with ``PYTHONPATH`` and ``cwd`` both pointing at it: ``python -m`` puts the directory first on the path).

    With ``port`` None a free port is picked; another process may take it between the pick and the
    server's bind (a busy machine running several servers does), so a server that exits saying its port
    is in use is started again on a new port (three tries). Any other early exit raises with the tail of
    the server's output.
    """
    for attempt in range(3):
        chosen = port or free_port()
        own_log = log is None
        path = Path(tempfile.mkstemp(prefix="hw-app-", suffix=".log")[1]) if own_log else log
        out = open(path, "ab")  # noqa: SIM115 - the child keeps its own copy
        proc = subprocess.Popen([sys.executable, "-m", "healthwatch.cli", "app", "--store", str(store),
                                 "--port", str(chosen)], stdout=out, stderr=subprocess.STDOUT, env=env,
                                cwd=cwd)
        out.close()
        try:
            wait_for(lambda c=chosen, p=proc: healthy(c, p), timeout, "the Streamlit server's health endpoint")
        except RuntimeError as exc:  # the server exited before answering
            stop(proc)
            tail = path.read_text(errors="replace")[-2000:] if path.exists() else ""
            if own_log:
                path.unlink(missing_ok=True)
            if port is None and attempt < 2 and ("is not available" in tail or "already in use" in tail):
                continue  # the picked port was taken meanwhile: pick another
            raise RuntimeError(f"{exc}; its output ended with:\n{tail}") from None
        except BaseException:
            stop(proc)
            if own_log:
                path.unlink(missing_ok=True)
            raise
        if own_log:
            path.unlink(missing_ok=True)  # the child's descriptor keeps writing to the unlinked file
        return proc, f"http://127.0.0.1:{chosen}"
    raise AssertionError("unreachable")  # every path of the loop returns or raises


def stop(proc: subprocess.Popen) -> None:
    """Terminate a process we started (kill it after 20 s) and wait for it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@contextmanager
def app_server(store: str | Path, log: Path | None = None) -> Iterator[str]:
    """The app server on ``store`` for the duration of the block; yields its URL."""
    proc, url = start_app(store, log=log)
    try:
        yield url
    finally:
        stop(proc)


@contextmanager
def headless_chromium(size: tuple[int, int] = (1400, 1000), profile: Path | None = None) -> Iterator[Any]:
    """A selenium driver for headless Chromium with a fresh profile (or ``profile``), no background traffic."""
    if not (CHROMIUM and DRIVER):
        raise RuntimeError("needs Debian chromium and chromium-driver (apt-get install -y chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    tmp = None
    if profile is None:
        tmp = tempfile.mkdtemp(prefix="hw-chrome-")
        profile = Path(tmp)
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                "--hide-scrollbars", f"--window-size={size[0]},{size[1]}", f"--user-data-dir={profile}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(options=opts, service=Service(DRIVER))
    try:
        yield driver
    finally:
        driver.quit()
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
