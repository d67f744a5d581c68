"""The fleet benchmark's arithmetic and report (its run is `python -m benchmarks --only fleet`)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.bench_fleet import S3_PUT_PER_PREFIX, extrapolate, section  # noqa: E402


def test_extrapolation_for_1000_writers() -> None:
    x = extrapolate(writers=1_000, flush_s=5.0, tables_per_flush=2, objects_per_writer_table=20)
    assert x["put_per_s"] == 400.0  # 1,000 x 2 / 5
    assert abs(x["put_per_s_with_merges"] - 400 * 8 / 7) < 1e-9
    assert abs(x["put_per_s_per_table_run_prefix"] - 200 * 8 / 7) < 1e-9
    assert x["put_per_s_per_table_run_prefix"] < S3_PUT_PER_PREFIX
    assert x["list_per_refresh"] == 4 * 20 + 3  # 20,000 objects per big table: 20 pages each


def _result(dup: int = 0) -> dict:
    tab = {"written": 100, "store": 100 + dup, "store_distinct": 100, "delta": 100, "delta_distinct": 100}
    return {"runs": 8, "stages": 8, "flushes": 2, "writers": 64, "segment_puts": 256, "put_per_s": 3.0,
            "put_latency_p50_s": 0.5, "put_latency_p99_s": 2.0, "rows_written": 200, "rows_per_s": 10.0,
            "write_wall_s": 20.0, "reader_refreshes": 1, "reader_errors": 0, "list_per_refresh_median": 9,
            "list_per_refresh_max": 9, "final_objects": 256, "refresh_s_median": 1.0, "publisher_commits": 2,
            "commit_s_median": 0.05, "commit_s_max": 0.06, "files_per_commit_max": 128, "failed_rows": 0,
            "layer_stats": tab, "scalars": dict(tab, store=100)}


def test_section_counts_lost_and_duplicated_rows() -> None:
    ok = section({"fleet": _result()})
    assert ok.budgets[0].verdict == "pass"
    bad = section({"fleet": _result(dup=3)})
    assert "3 duplicated" in bad.budgets[0].measured
    assert bad.budgets[0].verdict != ok.budgets[0].verdict
    err = section({"fleet": {"error": "boom"}})
    assert err.errors == ["boom"]
