"""Fast checks of the benchmark helpers (no timing)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks import bench_query  # noqa: E402
from benchmarks.bench_common import (  # noqa: E402
    CPUMeter,
    Section,
    Table,
    bootstrap_ci,
    fmt_rate,
    fmt_time,
    median,
    percentile,
    trimmed_mean,
)


def test_level_plan_matches_a_live_writers_self_merges() -> None:
    plan = bench_query.level_plan(1_000_000)
    # 10,000 flushes of 100 steps = 2·8^4 + 3·8^3 + 4·8^2 + 2·8 + 0 in base 8
    counts = {lv: sum(1 for p in plan if p[0] == lv) for lv in range(5)}
    assert counts == {4: 2, 3: 3, 2: 4, 1: 2, 0: 0}
    assert plan[0][1] == 0 and plan[-1][2] == 1_000_000
    assert all(a[2] == b[1] for a, b in zip(plan, plan[1:]))  # contiguous, no gaps or overlaps
    assert bench_query.level_plan(250) == [(0, 0, 100, 0), (0, 100, 200, 1), (0, 200, 250, 2)]


def test_generated_store_is_queryable(tmp_path: Path) -> None:
    import healthwatch as hw
    from healthwatch import query

    info = bench_query.generate_store(tmp_path / "s", steps=1_700, layers=6)
    assert info["layer_rows"] == 1_700 * 6 * 3
    st = hw.open_store(tmp_path / "s")
    n = st.sql("SELECT count(*) FROM layer_stats WHERE run = ?", [bench_query.RUN]).fetchone()[0]
    assert n == info["layer_rows"]
    steps = st.sql("SELECT count(DISTINCT step) FROM layer_stats WHERE run = ? AND metric = 'resid_rms' "
                   "AND layer = 3", [bench_query.RUN]).fetchone()[0]
    assert steps == 1_700
    df = query.series(st, bench_query.RUN, "resid_rms", layer=3, max_points=200)
    assert 0 < df.height <= 200
    ref = st.sql("SELECT parent FROM runs WHERE run = ?", [bench_query.REF_RUN]).fetchone()[0]
    assert ref == bench_query.RUN
    st.close()


def test_statistics_and_formatting() -> None:
    xs = [1.0, 2.0, 3.0, 4.0, 100.0]
    assert median(xs) == 3.0
    assert percentile(xs, 0) == 1.0 and percentile(xs, 100) == 100.0
    assert trimmed_mean(list(range(10)), 0.1) == pytest.approx(4.5)
    lo, hi = bootstrap_ci(xs)
    assert lo <= median(xs) <= hi
    assert fmt_time(12.3e-6) == "12.3 µs" and fmt_time(1.5) == "1.50 s"
    assert fmt_rate(2_500_000) == "2.50 M rows/s"


def test_cpu_meter_counts_this_process() -> None:
    meter = CPUMeter(interval_s=0.05).start()
    x = 0
    for i in range(300_000):
        x += i * i
    out = meter.stop()
    assert out["total_s"] > 0 and out["self_s"] > 0


def test_report_renders_tables() -> None:
    from benchmarks.__main__ import render

    sec = Section("x", "9. Example", intro="intro", tables=[Table("t", ["a", "b"], [["1", "x|y"]])])
    meta = {"command": "python -m benchmarks --quick", "started": "now", "wall_s": 1.0, "quick": True,
            "machine": {"cpu": "cpu", "cores": 2, "usable_cores": 2, "ram_gib": 1.0, "os": "os", "python": "3",
                        "commit": "abc"},
            "versions": {"torch": "2"}, "load": ["0", "0"], "timeline": [], "findings": ["f"]}
    text = render([sec], meta)
    assert "| a | b |" in text and "x\\|y" in text and "Quick mode" in text
