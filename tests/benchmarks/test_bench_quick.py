"""The benchmarks must keep running: `python -m benchmarks --quick` end to end (not timed).

The suite runs quick mode at its smallest sizes and leaves out the early-warning job, whose quick mode
has its own test (tests/benchmarks/test_bench_early_warning.py): this checks that every job runs and
reports, not what it measures, so each job gets the fewest rounds, steps, processes and page loads
that still run every phase of its code once (``--param``, :func:`benchmarks.__main__.apply_params`):
one A/B round of every overhead variant, 2 writer processes instead of 8 (ingest) or 2 x 2 instead of
64 (fleet), 1 repeat of each timed query, one warm page load. The same paths run as at full size;
only counts shrink.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
#: Every benchmark job but early-warning (tested on its own).
SUITE_JOBS = ("overhead", "peers", "ingest", "query", "render", "metrics", "fleet")
#: The smallest sizes that still run every phase of every job once (see the module docstring).
SMALLEST = ("--overhead-pairs", "1", "--overhead-batch", "1", "--query-steps", "1000", "--peer-steps", "10",
            "--param", "overhead.warmup=0", "--param", "overhead.attrib_steps=1", "--param", "overhead.sync_steps=1",
            "--param", "query.repeats=1", "--param", "query.heat_repeats=1",
            "--param", "ingest.segments=2", "--param", "ingest.procs=2", "--param", "ingest.segments_per_proc=1",
            "--param", "ingest.live_steps=[1000]", "--param", "render.steps=2000", "--param", "render.warm=1",
            "--param", "metrics.runs=2", "--param", "metrics.steps=20", "--param", "metrics.scrapes=2",
            "--param", "metrics.refreshes=1", "--param", "fleet.runs=2", "--param", "fleet.stages=2",
            "--param", "fleet.flushes=1", "--param", "fleet:s3query.steps=1000", "--param", "fleet:s3query.repeat=1")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_quick_benchmarks_run_and_write_a_report(tmp_path: Path) -> None:
    out = tmp_path / "BENCHMARKS.md"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--no-progress", "--out", str(out),
         "--workdir", str(tmp_path / "work"), "--only", ",".join(SUITE_JOBS), *SMALLEST],
        cwd=REPO, capture_output=True, text=True, timeout=880,
    )
    assert out.exists(), proc.stderr[-4000:]
    text = out.read_text()
    assert "## Summary" in text and "| # | what | budget | measured | verdict | note |" in text
    for heading in ("Hook overhead", "Logging cost against peers", "Ingest into the store", "Queries at scale",
                    "Run page in the browser", "Prometheus /metrics", "Fleet on object storage"):
        assert heading in text, heading
    assert "python -m benchmarks --quick" in text
    # Every benchmark produced numbers, not an error (optional peers may be skipped, never fail).
    assert "**Error:**" not in text, text[text.index("**Error:**") - 200:][:1200]
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_suite_runs_every_benchmark_job() -> None:
    """A benchmark added to ``python -m benchmarks`` is run by this suite (here or in its own test)."""
    from benchmarks.__main__ import BENCHES

    assert set(BENCHES) == set(SUITE_JOBS) | {"early-warning"}
