"""Fixtures for the comparison tests."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tests_compare_store import curve, scaled, write_run  # noqa: E402


@pytest.fixture
def gap_store(tmp_path) -> Path:
    """An NVFP4 parent (3 steps per log, 2048 tokens/step) and three BF16 branches (7 steps per log,
    1000 tokens/step) cut at three points, with known gaps 0.20 %, 0.30 % and 0.35 %."""
    root = tmp_path / "store"
    write_run(root, "nvfp4", range(0, 30_000, 3), 2048, config={"precision": "nvfp4", "opt": {"lr": 3e-4}},
              extra={"loss/mtp_2": lambda t: curve(t) + 0.1}, layers=4)
    for bstep, k in ((5_001, 1 / 1.002), (10_002, 1 / 1.003), (16_002, 1 / 1.0035)):
        btok = bstep * 2048
        # The branch continues from the parent's tokens with its own step size and logging interval.
        write_run(root, f"bf16-s{bstep}", range(bstep, bstep + 14_001, 7), 1000, scaled(k), precision="bf16",
                  parent="nvfp4", branch_step=bstep, branch_tokens=btok, token_offset=btok, step0=bstep,
                  config={"precision": "bf16", "opt": {"lr": 3e-4}},
                  extra={"loss/mtp_2": lambda t, k=k: k * (curve(t) + 0.1)}, layers=4)
    return root
