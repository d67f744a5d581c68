"""The benchmarks must keep running: `python -m benchmarks --quick` end to end (not timed).

The suite runs quick mode at its smallest sizes (the fewest A/B rounds, a 2,000-step query store, 50 peer
steps) and leaves out the early-warning job, whose quick mode has its own test
(tests/benchmarks/test_bench_early_warning.py): this checks that every job runs and reports, not what
it measures, and keeps the suite within its time on 2 cores.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
#: Every benchmark job but early-warning (tested on its own).
SUITE_JOBS = ("overhead", "peers", "ingest", "query", "render", "metrics", "fleet")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_quick_benchmarks_run_and_write_a_report(tmp_path: Path) -> None:
    out = tmp_path / "BENCHMARKS.md"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--no-progress", "--out", str(out),
         "--workdir", str(tmp_path / "work"), "--only", ",".join(SUITE_JOBS),
         "--overhead-pairs", "1", "--query-steps", "2000", "--peer-steps", "50"],
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


def test_suite_runs_every_benchmark_job() -> None:
    """A benchmark added to ``python -m benchmarks`` is run by this suite (here or in its own test)."""
    from benchmarks.__main__ import BENCHES

    assert set(BENCHES) == set(SUITE_JOBS) | {"early-warning"}
