"""Launching test workers under ``torchrun`` (gloo, CPU) with a time limit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def run_torchrun(script: Path, args: list[str], nproc: int = 2, timeout: float = 240,
                 env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``script`` under ``python -m torch.distributed.run --standalone``; fail the test with the
    workers' output if it fails or runs past ``timeout`` seconds."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHDYNAMO_DISABLE": "1",
                "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo"), **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(script), *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=HERE)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"")[-4000:] if isinstance(exc.stdout, bytes) else (exc.stdout or "")[-4000:]
        pytest.fail(f"torchrun {script.name} timed out after {timeout}s:\n{out}")
    if proc.returncode != 0:
        pytest.fail(f"torchrun {script.name} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc
