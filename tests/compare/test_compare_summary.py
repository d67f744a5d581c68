"""gap_summary per branch (the report's Figure 3), pairs, orientation, messages, figures."""

from __future__ import annotations

import polars as pl
import pytest
from tests_compare_store import scaled, write_run

from healthwatch.compare import (
    SUMMARY_SCHEMA,
    MissingRunError,
    comparison_figure,
    comparison_table,
    format_tokens,
    gap_figure,
    gap_summary,
    orient,
    resolve_pairs,
    summary_figure,
)
from healthwatch.store import open_store

BRANCHES = ["bf16-s5001", "bf16-s10002", "bf16-s16002"]


def test_summary_over_three_branches(gap_store):
    with open_store(gap_store) as st:
        df = gap_summary(st, "nvfp4")
    assert list(df.columns) == list(SUMMARY_SCHEMA)
    assert df["branch"].to_list() == BRANCHES  # ordered by where they were cut
    assert df["low_run"].to_list() == ["nvfp4"] * 3 and df["ref_run"].to_list() == BRANCHES
    assert df["precision_low"].to_list() == ["nvfp4"] * 3 and df["precision_ref"].to_list() == ["bf16"] * 3
    assert df["branch_step"].to_list() == [5001, 10002, 16002]
    assert df["branch_tokens"].to_list() == [5001 * 2048, 10002 * 2048, 16002 * 2048]
    for col in ("mean_gap", "last_gap", "max_gap"):
        assert [f"{v:.4g}" for v in df[col]] == ["0.002", "0.003", "0.0035"]
    assert df["message"].null_count() == 3
    # Compared over each branch's own span: 14M tokens of the branch, on the parent's points inside it.
    for row in df.iter_rows(named=True):
        assert row["tokens_from"] >= row["branch_tokens"]
        assert row["tokens_to"] <= row["branch_tokens"] + 14_000 * 1000
        assert row["tokens_compared"] > 13_990_000 and row["points"] == pytest.approx(14e6 / 6144, abs=2)
    assert df["mean_gap"].mean() < 0.004  # the report's "< 0.4 % on average"


def test_branch_filter_pairs_and_smoothing(gap_store):
    with open_store(gap_store) as st:
        one = gap_summary(st, "nvfp4", branches=["bf16-s10002"])
        pairs = gap_summary(st, pairs=[("nvfp4", "bf16-s5001"), ("bf16-s5001", "bf16-s10002")])
        smooth = gap_summary(st, "nvfp4", smooth="ema", span=2e6, unit="tokens")
        with pytest.raises(ValueError, match="needs a parent run or a list"):
            gap_summary(st)
    assert one["branch"].to_list() == ["bf16-s10002"]
    assert pairs["low_run"].to_list() == ["nvfp4", "bf16-s5001"]
    assert pairs["parent"].to_list() == ["nvfp4", "nvfp4"]
    assert f"{pairs['mean_gap'][0]:.4g}" == "0.002"
    # Two branches overlap on tokens: the 5T branch against the 10T one is a valid free pair.
    assert pairs["points"][1] > 0 and pairs["message"][1] is None
    assert [f"{v:.4g}" for v in smooth["last_gap"]] == ["0.002", "0.003", "0.0035"]


def test_orientation_follows_precision():
    assert orient("p", "b", "nvfp4", "bf16") == ("p", "b")
    assert orient("p", "b", "bf16", "fp8") == ("b", "p")  # an FP8 branch of a BF16 parent is the low run
    assert orient("p", "b", None, "bf16") == ("p", "b")
    assert orient("p", "b", "weird", "bf16") == ("p", "b")


def test_branch_with_missing_parent_gets_a_message(store_dir):
    write_run(store_dir, "orphan", range(0, 100, 7), 1000, precision="bf16", parent="gone", branch_step=10,
              branch_tokens=10_000)
    with open_store(store_dir) as st:
        df = gap_summary(st, "gone")
        assert df.height == 1
        row = df.row(0, named=True)
        assert row["message"] == "parent 'gone' of branch 'orphan' is missing from the store"
        assert row["mean_gap"] is None and row["points"] == 0
        with pytest.raises(MissingRunError, match="run 'nowhere' is not in the store"):
            gap_summary(st, "nowhere")
        # A free pair with the missing parent names it in the message too.
        pair = gap_summary(st, pairs=[("gone", "orphan")])
        assert "run 'gone' is not in the store" in pair["message"][0]


def test_branch_without_overlap_gets_a_message(store_dir):
    write_run(store_dir, "main", range(0, 300, 3), 2048, config={"a": 1})
    # Recorded as branched at step 200 but it logged tokens far past the parent's end.
    write_run(store_dir, "far", range(0, 100, 7), 1000, precision="bf16", parent="main", branch_step=200,
              branch_tokens=409_600, token_offset=50_000_000)
    write_run(store_dir, "near", range(200, 300, 7), 1000, scaled(1 / 1.003), precision="bf16", parent="main",
              branch_step=200, branch_tokens=409_600, token_offset=409_600, step0=200)
    with open_store(store_dir) as st:
        df = gap_summary(st, "main")
    by = {r["branch"]: r for r in df.iter_rows(named=True)}
    assert "no overlapping tokens" in by["far"]["message"] and by["far"]["mean_gap"] is None
    assert f"{by['near']['mean_gap']:.4g}" == "0.003" and by["near"]["message"] is None


def test_parent_without_branches_is_an_empty_summary(store_dir):
    write_run(store_dir, "solo", range(0, 30), 1000)
    with open_store(store_dir) as st:
        df = gap_summary(st, "solo")
        assert df.height == 0 and list(df.columns) == list(SUMMARY_SCHEMA)
        with pytest.raises(ValueError, match="has no branches"):
            resolve_pairs(st, ["solo"])


def test_resolve_pairs_and_comparison_table(gap_store):
    with open_store(gap_store) as st:
        assert resolve_pairs(st, ["nvfp4"]) == [("nvfp4", b) for b in BRANCHES]
        assert resolve_pairs(st, ["nvfp4", "bf16-s5001", "bf16-s5001"]) == [("nvfp4", "bf16-s5001")]
        with pytest.raises(ValueError, match="at least one run"):
            resolve_pairs(st, [])
        with pytest.raises(LookupError, match="not in the store"):
            resolve_pairs(st, ["ghost"])
        table = comparison_table(st, resolve_pairs(st, ["nvfp4"]))
    assert table.columns[:2] == ["low_run", "ref_run"]
    assert table["ref_run"].unique(maintain_order=True).to_list() == BRANCHES
    means = table.group_by("ref_run", maintain_order=True).agg(pl.col("gap").mean())["gap"].to_list()
    assert [f"{v:.4g}" for v in means] == ["0.002", "0.003", "0.0035"]


def test_figures(gap_store):
    with open_store(gap_store) as st:
        summary = gap_summary(st, "nvfp4")
        table = comparison_table(st, resolve_pairs(st, ["nvfp4"]), smooth="window", span=5)
    bars = summary_figure(summary)
    assert [round(v, 6) for v in bars.data[0].y] == [0.2, 0.3, 0.35]
    assert "@ 10.2M tokens" in bars.data[0].x[0]
    gap = gap_figure(table, smoothed=True)
    assert len(gap.data) == 6  # raw (faint) + smoothed per branch
    shapes = {round(abs(s.y0), 3) for s in gap.layout.shapes if s.y0 is not None}
    assert {0.4, 1.0} <= shapes  # the 0.4 % and 1 % bands
    combo = comparison_figure(table)
    assert len(combo.data) == 1 + 3 + 3  # parent, three references, three gaps
    assert format_tokens(5e12) == "5T" and format_tokens(74e9) == "74B" and format_tokens(None) == "-"
