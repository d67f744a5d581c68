"""Start the Streamlit server on the app, bound to loopback unless told otherwise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
        "--", "--store", str(Path(store).resolve()),
    ]


def launch(store: Path, port: int = 8501, host: str = "127.0.0.1") -> int:
    """Serve the app on ``store`` until interrupted; returns the server's exit code."""
    env = dict(os.environ, HEALTHWATCH_STORE=str(Path(store).resolve()))
    print(f"healthwatch app on http://{host}:{port}  (store {Path(store).resolve()}; Ctrl-C to stop)", flush=True)
    try:
        return subprocess.call(streamlit_command(store, port, host), env=env)
    except KeyboardInterrupt:
        return 0
