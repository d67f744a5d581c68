"""The benchmarks must keep running: `python -m benchmarks --quick` end to end (not timed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_quick_benchmarks_run_and_write_a_report(tmp_path: Path) -> None:
    out = tmp_path / "BENCHMARKS.md"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--no-progress", "--out", str(out),
         "--workdir", str(tmp_path / "work")],
        cwd=REPO, capture_output=True, text=True, timeout=880,
    )
    assert out.exists(), proc.stderr[-4000:]
    text = out.read_text()
    assert "## Summary" in text and "| # | what | budget | measured | verdict | note |" in text
    for heading in ("Hook overhead", "Logging cost against peers", "Ingest into the store", "Queries at scale",
                    "Run page in the browser"):
        assert heading in text, heading
    assert "python -m benchmarks --quick" in text
    # Every benchmark produced numbers, not an error (optional peers may be skipped, never fail).
    assert "**Error:**" not in text, text[text.index("**Error:**") - 200:][:1200]
    assert proc.returncode == 0, proc.stderr[-4000:]
