"""``healthwatch app`` never leaves an orphaned Streamlit server behind (real processes, Linux /proc)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.apphost import free_port, healthy, wait_for

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")


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


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_stopping_the_launcher_stops_the_server(tmp_path: Path, sig: signal.Signals) -> None:
    port = free_port()
    launcher = subprocess.Popen([sys.executable, "-m", "healthwatch.cli", "app", "--store", str(tmp_path / "s"),
                                 "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    servers: list[int] = []
    try:
        wait_for(lambda: healthy(port), 90, "the server's health endpoint")
        servers = _children(launcher.pid)
        assert servers, "the launcher runs the server as a child process"
        os.kill(launcher.pid, sig)
        launcher.wait(timeout=30)
        wait_for(lambda: not any(_alive(p) for p in servers), 30, "the server to exit with its launcher")
        assert not healthy(port)
    finally:
        for p in [launcher.pid, *servers]:
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
        launcher.wait(timeout=10)
