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


def test_generated_store_is_live_with_rollups_and_checks_pass(tmp_path: Path) -> None:
    """The benchmark store is written through the writer path: live rollups exist without any
    compaction, and the raw-SQL reference checks accept the named queries' answers."""
    import healthwatch as hw
    from healthwatch import query

    info = bench_query.generate_store(tmp_path / "s", steps=1_250, layers=4)
    assert info["flushes"] == 13 and info["ingest_rows"] == 1_250 * (4 * 3 + 3)
    st = hw.open_store(tmp_path / "s")
    assert st.files("layer_stats_rollup", bench_query.RUN), "the writer keeps rollups while live"
    p = query.plan(st, bench_query.RUN, "layer_stats", query.timeline(st, bench_query.RUN), 100)
    # A live writer publishes its closed rollup buckets once per 1,000 steps: 10 buckets are
    # rolled up, the 2 closed since and the open one are read raw.
    assert p.limits == ((1, 1_000),)
    hm = query.heatmap(st, bench_query.RUN, "resid_rms", max_buckets=5)
    assert bench_query._check_heatmap(st, hm, "resid_rms", 5)
    df = query.series(st, bench_query.RUN, "resid_rms", layer=2, max_points=50)
    assert bench_query._check_series(st, df, "layer_stats", "metric = 'resid_rms' AND layer = ?", [bench_query.RUN, 2])
    wrong = df.with_columns(df["value"] * 2)
    assert not bench_query._check_series(st, wrong, "layer_stats", "metric = 'resid_rms' AND layer = ?",
                                         [bench_query.RUN, 2])
    st.close()


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


def test_process_tree_cpu_counts_the_root_and_keeps_an_exited_child() -> None:
    """The Run-page benchmark's meter: the root process's own CPU counts (``include_root``), and a
    descendant that exits keeps the CPU it had at the last reading (the total never goes back)."""
    import subprocess
    import time

    from benchmarks.bench_common import descendant_cpu_seconds
    from benchmarks.bench_render import ProcessTreeCpu

    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\n"
    root = subprocess.Popen([sys.executable, "-c", burn + "import sys, subprocess\n"
                             f"c = subprocess.Popen([sys.executable, '-c', {burn!r} + 'time.sleep(2)'])\n"
                             "c.wait(); time.sleep(60)"])
    try:
        meter = ProcessTreeCpu(root.pid)
        deadline = time.monotonic() + 60
        while len(descendant_cpu_seconds(root.pid, include_root=True)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert root.pid in descendant_cpu_seconds(root.pid, include_root=True)
        assert root.pid not in descendant_cpu_seconds(root.pid)
        while descendant_cpu_seconds(root.pid) and time.monotonic() < deadline:  # the child burns, then exits
            meter.total()
            time.sleep(0.05)
        # Root and child each burned >= 0.3 s of CPU; the exited child's share is kept.
        assert meter.total() >= 0.55
    finally:
        root.kill()
        root.wait()


def test_report_renders_tables() -> None:
    from benchmarks.__main__ import render

    sec = Section("x", "9. Example", intro="intro", tables=[Table("t", ["a", "b"], [["1", "x|y"]])])
    meta = {"command": "python -m benchmarks --quick", "started": "now", "wall_s": 1.0, "quick": True,
            "machine": {"cpu": "cpu", "cores": 2, "usable_cores": 2, "ram_gib": 1.0, "os": "os", "python": "3",
                        "commit": "abc"},
            "versions": {"torch": "2"}, "load": ["0", "0"], "timeline": [], "findings": ["f"]}
    text = render([sec], meta)
    assert "| a | b |" in text and "x\\|y" in text and "Quick mode" in text


def test_param_settings_reach_the_jobs_that_have_them_and_typos_are_errors(tmp_path: Path) -> None:
    """``--param BENCH.KEY=VALUE`` sets a parameter in every job of a benchmark that has it, or in
    one job named by its key; the value is JSON when it parses, text otherwise; a benchmark not
    selected, a parameter no job has, or a malformed setting is an error naming it."""
    from benchmarks import bench_fleet
    from benchmarks.__main__ import apply_params

    plan = [("query", bench_query.jobs(True, tmp_path, 1000)), ("fleet", bench_fleet.jobs(True, tmp_path))]
    apply_params(plan, ["query.steps=500", "fleet:s3query.steps=700", "fleet.runs=2", "query.layout=direct",
                        "query.seed=[1, 2]"])
    jobs = {j.key: j.params for _name, js in plan for j in js}
    assert jobs["query:generate"]["steps"] == jobs["query:live"]["steps"] == 500
    assert jobs["fleet:s3query"]["steps"] == 700 and jobs["fleet"]["runs"] == 2 and "steps" not in jobs["fleet"]
    assert jobs["query:live"]["layout"] == "direct" and jobs["query:live"]["seed"] == [1, 2]
    with pytest.raises(ValueError, match=r"'render'.*selected jobs: query:generate, query:live, fleet, "):
        apply_params(plan, ["render.steps=1"])
    with pytest.raises(ValueError, match=r"'fleet' has no parameter 'stepz' \(it has: .*stages"):
        apply_params(plan, ["fleet.stepz=1"])
    for bad in ("fleet.runs", "runs=2", ".runs=2", "fleet.=2"):
        with pytest.raises(ValueError, match="expected BENCH.KEY=VALUE"):
            apply_params(plan, [bad])


def test_a_bad_param_stops_the_command_before_any_job(tmp_path: Path) -> None:
    """``python -m benchmarks --param`` with a parameter no selected job has: exit 2, nothing run or written."""
    from benchmarks.__main__ import main

    out, work = tmp_path / "B.md", tmp_path / "work"
    assert main(["--quick", "--no-progress", "--only", "metrics", "--out", str(out), "--workdir", str(work),
                 "--param", "metrics.nope=1"]) == 2
    assert not out.exists() and not (work / "jobs").exists()
