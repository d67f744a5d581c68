"""Start the Streamlit server on the app, bound to loopback unless told otherwise."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from pathlib import Path

from healthwatch.store.fs import root_uri  # an absolute path, or s3://bucket/prefix as given

MAIN = Path(__file__).with_name("main.py")


def streamlit_command(store: Path, port: int = 8501, host: str = "127.0.0.1") -> list[str]:
    """The ``streamlit run`` command line for ``store`` (loopback by default, no telemetry)."""
    return [
        sys.executable, "-m", "streamlit", "run", str(MAIN),
        "--server.address", host,
        "--server.port", str(int(port)),
        "--server.headless", "true",
        "--browser.gatherUsageStats", "false",
        "--server.fileWatcherType", "none",
        "--", "--store", root_uri(store),
    ]


def _die_with_parent() -> None:
    """In the child: ask Linux to SIGTERM the server if the launcher dies, even by SIGKILL."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the signal forwarding below still applies
        pass


def launch(store: Path, port: int = 8501, host: str = "127.0.0.1") -> int:
    """Serve the app on ``store`` until interrupted; returns the server's exit code.

    The server is a child process; SIGTERM/SIGHUP sent to the launcher are forwarded to it, and on
    Linux it is also tied to the launcher's life, so stopping ``healthwatch app`` never leaves an
    orphaned server holding the port.
    """
    env = dict(os.environ, HEALTHWATCH_STORE=root_uri(store))
    print(f"healthwatch app on http://{host}:{port}  (store {root_uri(store)}; Ctrl-C to stop)", flush=True)
    preexec = _die_with_parent if sys.platform.startswith("linux") else None
    proc = subprocess.Popen(streamlit_command(store, port, host), env=env, preexec_fn=preexec)  # noqa: PLW1509
    previous = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            previous[sig] = signal.signal(sig, lambda signum, _frame: proc.send_signal(signum))
        except ValueError:  # not the main thread: leave handlers alone
            pass
    try:
        while True:
            try:
                return proc.wait()
            except KeyboardInterrupt:  # the terminal sent SIGINT to the whole group; let the server finish
                try:
                    proc.wait(timeout=10)
                except (subprocess.TimeoutExpired, KeyboardInterrupt):
                    proc.kill()
                return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
