"""relative_gap: token alignment across different step sizes and log intervals, smoothing, rollbacks."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
from tests_compare_store import curve, scaled, write_run

from healthwatch.compare import (
    GAP_SCHEMA,
    MissingRunError,
    NoOverlapError,
    align,
    relative_gap,
    smooth_series,
)
from healthwatch.store import open_store


@pytest.fixture
def pair(store_dir):
    """ref: every 7 steps at 1000 tokens/step; low: every 3 steps at 2048 tokens/step, 0.30 % above."""
    write_run(store_dir, "ref", range(0, 40_001, 7), 1000, precision="bf16")
    write_run(store_dir, "low", range(0, 20_001, 3), 2048, scaled(1.003), precision="nvfp4")
    with open_store(store_dir) as st:
        yield st


def test_known_gap_to_four_significant_digits(pair):
    df = relative_gap(pair, "low", "ref")
    assert list(df.columns) == list(GAP_SCHEMA)
    assert df.height > 6_000
    # Every aligned point, not just the mean, carries the 0.30 % gap to 4 significant digits.
    assert (df["gap"] - 0.003).abs().max() < 5e-7
    assert f"{df['gap'].mean():.4g}" == "0.003"
    # Only the overlap: the low run (to 40.96M tokens) is cut where the reference ends (39.998M).
    assert df["tokens"].min() == 0 and df["tokens"].max() <= 39_998_000
    assert df["tokens"].is_sorted() and df["gap_smooth"].equals(df["gap"], check_names=False)
    # step_ref is the reference's logged step at or before the tokens.
    row = df.filter(pl.col("tokens") == 3 * 2048).row(0, named=True)
    assert row["step_low"] == 3 and row["step_ref"] == 0


def test_asof_join_is_biased_interpolation_is_not(pair):
    asof = relative_gap(pair, "low", "ref", method="asof")
    interp = relative_gap(pair, "low", "ref")
    assert asof.height == interp.height
    # The last reference value at or before the tokens lags a falling loss: the gap reads low.
    assert (asof["gap"] - 0.003).abs().max() > 1e-5
    assert asof["gap"].min() < interp["gap"].min()


def test_reference_covering_a_middle_span(store_dir):
    # A branch-like reference from 20M to 34M tokens: only the low run's points inside are compared.
    write_run(store_dir, "low", range(0, 30_000, 3), 2048, scaled(1.003))
    write_run(store_dir, "ref", range(0, 14_001, 7), 1000, token_offset=20_000_000)
    with open_store(store_dir) as st:
        df = relative_gap(st, "low", "ref")
    tok = np.arange(0, 30_000, 3) * 2048
    inside = tok[(tok >= 20_000_000) & (tok <= 34_000_000)]
    assert df["tokens"].to_list() == inside.tolist()
    assert (df["gap"] - 0.003).abs().max() < 5e-7


def test_rollback_superseded_rows_are_not_compared(store_dir):
    write_run(store_dir, "ref", range(0, 6_001, 7), 1000)
    # Attempt 1 diverges after step 1500 (gap 5 %); attempt 2 resumes from step 1500 at 0.30 %.
    write_run(store_dir, "low", range(0, 1500, 3), 2048, scaled(1.003))
    write_run(store_dir, "low", range(1500, 2700, 3), 2048, scaled(1.05))
    write_run(store_dir, "low", range(1500, 2900, 3), 2048, scaled(1.003), attempt=2, start_step=1500)
    with open_store(store_dir) as st:
        df = relative_gap(st, "low", "ref")
    assert (df["gap"] - 0.003).abs().max() < 5e-7
    assert df["step_low"].n_unique() == df.height  # one row per step: the superseded path is gone


def test_nonfinite_loss_is_kept_and_does_not_poison_smoothing(store_dir):
    write_run(store_dir, "ref", range(0, 2_001, 7), 1000)

    def with_nan(t: np.ndarray) -> np.ndarray:
        v = 1.003 * curve(t)
        v[100] = np.nan
        return v

    write_run(store_dir, "low", range(0, 900, 3), 2048, with_nan)
    with open_store(store_dir) as st:
        df = relative_gap(st, "low", "ref", smooth="ema", span=5)
    assert df["gap"].is_nan().sum() == 1
    assert df["gap_smooth"].is_finite().all()
    assert (df["gap_smooth"] - 0.003).abs().max() < 5e-7


@pytest.mark.parametrize("smooth", ["ema", "window"])
@pytest.mark.parametrize("unit,span", [("points", 10), ("tokens", 50_000), ("steps", 40)])
def test_smoothing_keeps_a_constant_gap_and_damps_noise(store_dir, smooth, unit, span):
    write_run(store_dir, "ref", range(0, 4_001, 7), 1000)
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 0.002, 10_000)

    def noisy(t: np.ndarray) -> np.ndarray:
        return (1.003 + noise[: t.size]) * curve(t)

    write_run(store_dir, "low", range(0, 2_000, 3), 2048, noisy)
    with open_store(store_dir) as st:
        df = relative_gap(st, "low", "ref", smooth=smooth, span=span, unit=unit)
    tail = df.tail(df.height // 2)
    assert tail["gap_smooth"].std() < 0.5 * tail["gap"].std()
    assert abs(tail["gap_smooth"].mean() - 0.003) < 5e-4


def test_smoothing_definitions_on_a_tiny_series():
    df = pl.DataFrame({"tokens": [0, 1000, 3000, 3500], "step_low": [0, 1, 3, 4], "gap": [1.0, 2.0, 3.0, 4.0]})
    # Trailing window over tokens: rows with tokens in (t - 2000, t].
    win = smooth_series(df, "gap", "window", 2000, "tokens").to_list()
    assert win == [1.0, 1.5, 3.0, 3.5]
    # EMA over points with the pandas span convention: alpha = 2 / (span + 1), bias-corrected.
    ema = smooth_series(df, "gap", "ema", 3, "points").to_list()
    assert ema[1] == pytest.approx((2.0 + 0.5 * 1.0) / 1.5)
    # EMA over tokens with a half-life of 1000 tokens: one half-life -> equal weights.
    assert smooth_series(df, "gap", "ema", 1000, "tokens").to_list()[1] == pytest.approx(1.5)
    assert smooth_series(df, "gap", None, 1, "points").to_list() == [1.0, 2.0, 3.0, 4.0]
    with pytest.raises(ValueError, match="smooth must be"):
        smooth_series(df, "gap", "median", 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unit must be"):
        smooth_series(df, "gap", "ema", 3, "seconds")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="span must be positive"):
        smooth_series(df, "gap", "ema", 0)


def test_clear_errors_for_missing_runs_metrics_and_no_overlap(store_dir):
    write_run(store_dir, "early", range(0, 100), 1000)
    write_run(store_dir, "late", range(0, 100), 1000, token_offset=10_000_000)
    with open_store(store_dir) as st:
        with pytest.raises(MissingRunError, match="run 'nope' is not in the store") as exc:
            relative_gap(st, "early", "nope")
        assert isinstance(exc.value, LookupError)
        with pytest.raises(MissingRunError, match="run 'early' has no 'loss/mtp_9' values"):
            relative_gap(st, "early", "late", "loss/mtp_9")
        with pytest.raises(NoOverlapError, match="no overlapping tokens") as exc2:
            relative_gap(st, "early", "late")
        assert isinstance(exc2.value, ValueError)
        msg = str(exc2.value)
        assert "'early' (tokens 0–99k)" in msg and "'late' (tokens 10M–10.1M)" in msg
        # An incremental caller's empty token window is an empty frame, not an error.
        empty = relative_gap(st, "early", "late", token_min=0, token_max=50_000)
        assert empty.height == 0 and list(empty.columns) == list(GAP_SCHEMA)
        with pytest.raises(ValueError, match="method must be"):
            align(st, "early", "late", method="nearest")  # type: ignore[arg-type]


def test_token_window_and_duplicate_tokens(store_dir):
    write_run(store_dir, "ref", range(0, 1_001, 7), 1000)
    write_run(store_dir, "low", range(0, 400, 3), 2048, scaled(1.003))
    # A run that logged the same tokens at two steps (e.g. tokens frozen while a loader warms up)
    # contributes one point: its later step.
    write_run(store_dir, "low", [999], 0, scaled(1.003), token_offset=6144, attempt=1)
    with open_store(store_dir) as st:
        df = relative_gap(st, "low", "ref", token_min=4096, token_max=20_480)
    assert df["tokens"].to_list() == [6144, 12288, 18432]
    assert df.filter(pl.col("tokens") == 6144)["step_low"].item() == 999
    assert all(math.isclose(g, 0.003, abs_tol=5e-7) for g in df["gap"])


def test_effective_filter_matches_the_effective_view(store_dir):
    # Three attempts, two rollbacks (the second to before the first): the per-run condition the
    # gap query uses instead of the view must keep exactly the view's rows.
    from healthwatch.compare import _effective

    write_run(store_dir, "r", range(0, 300, 3), 2048)
    write_run(store_dir, "r", range(150, 400, 3), 2048, scaled(1.1), attempt=2, start_step=150)
    write_run(store_dir, "r", range(90, 200, 3), 2048, scaled(1.2), attempt=3, start_step=90)
    write_run(store_dir, "other", range(0, 50), 1000)
    with open_store(store_dir) as st:
        view = st.sql("SELECT attempt, step, value FROM scalars_effective WHERE run = 'r' ORDER BY step").fetchall()
        eff, params = _effective(st, "r")
        mine = st.sql(f"SELECT attempt, step, value FROM scalars WHERE run = ?{eff} ORDER BY step", ["r", *params]).fetchall()
    assert mine == view and len(params) == 4
    assert {a for a, _, _ in mine} == {1, 3}  # attempt 2 fully superseded by the rollback to step 90
