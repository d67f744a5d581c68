"""``healthwatch app`` never leaves an orphaned Streamlit server behind (real processes, Linux /proc)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(cond: Callable[[], bool], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _healthy(port: int) -> bool:
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2).status == 200
    except OSError:
        return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_stopping_the_launcher_stops_the_server(tmp_path: Path, sig: signal.Signals) -> None:
    port = _free_port()
    launcher = subprocess.Popen([sys.executable, "-m", "healthwatch.cli", "app", "--store", str(tmp_path / "s"),
                                 "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    servers: list[int] = []
    try:
        _wait(lambda: _healthy(port), 90, "the server's health endpoint")
        servers = _children(launcher.pid)
        assert servers, "the launcher runs the server as a child process"
        os.kill(launcher.pid, sig)
        launcher.wait(timeout=30)
        _wait(lambda: not any(_alive(p) for p in servers), 30, "the server to exit with its launcher")
        assert not _healthy(port)
    finally:
        for p in [launcher.pid, *servers]:
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
        launcher.wait(timeout=10)
