"""Fixtures for the app tests."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tests_app_store import write_run  # noqa: E402

from healthwatch.store import StoreWriter  # noqa: E402


@pytest.fixture
def app_store(tmp_path) -> Path:
    """Store with main (2 attempts), two BF16 branches, and one firing alert."""
    root = tmp_path / "store"
    write_run(root, "main", range(0, 200))
    write_run(root, "main", range(150, 300), attempt=2)
    write_run(root, "main-bf16-a", range(100, 160), parent="main", branch_step=100)
    write_run(root, "main-bf16-b", range(200, 260), parent="main", branch_step=200)
    w = StoreWriter(root, "main", attempt=0, rank=7)
    w.write("alerts", {"alert": ["MaxVioHigh"], "group": ["moe"], "state": ["firing"], "severity": ["warning"],
                       "step": [180], "tokens": [180 * 512], "layer": [1], "value": [12.0], "labels": ["{}"],
                       "annotations": ["{}"], "fingerprint": ["fp1"], "evaluator": ["t"], "wall_time": [time.time()]})
    return root
