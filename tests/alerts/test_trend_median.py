"""``trend`` with ``smooth_by: median``: each end of the trend is the median of ``smooth`` steps.

Checked on real store files (Parquet segments through the store and DuckDB) against an independent
numpy computation, per scalar and per layer, with outlier batches, a NaN and a missing step; the
incremental evaluation (live, flush after flush, and from any cursor) equals one evaluation of the
whole run; the snapshot path equals the store path; a bad option is refused with a clear error.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from alerts_helpers import layers, rules_yaml, scalars, writer

from healthwatch.alerts.detectors import NEVER, Snapshot, Sources, evaluate, evaluate_many
from healthwatch.alerts.rules import Expr
from healthwatch.store import StoreWriter, open_store

N = 200
SMOOTH, WINDOW = 10, 30


def _expr(**kw: object) -> Expr:
    body = {"metric": "grad_norm/total", "window": WINDOW, "rise": 0.5, "smooth": SMOOTH, "smooth_by": "median"}
    body.update(kw)
    return Expr.model_validate({"trend": body})


def numpy_trend(steps: np.ndarray, values: np.ndarray, smooth: int, window: int, how: str) -> dict[int, float]:
    """Per logged step t: f(v over steps t-smooth+1..t) / f(v over steps t-window-smooth+1..t-window) - 1,
    f = median or mean over the finite values there (steps, not rows: a missing step is just absent).
    Written from the option's definition, independently of the SQL."""
    f = np.median if how == "median" else np.mean
    ok = np.isfinite(values)
    out: dict[int, float] = {}
    for t in steps:
        now = values[ok & (steps > t - smooth) & (steps <= t)]
        then = values[ok & (steps > t - window - smooth) & (steps <= t - window)]
        if now.size and then.size and f(then) != 0:
            out[int(t)] = float((f(now) - f(then)) / abs(f(then)))
    return out


def _series(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Steps 0..N-1 without step 77; a heavy-tailed grad norm with outlier batches, one NaN and a
    level change x1.8 from step 150."""
    rng = np.random.default_rng(seed)
    steps = np.array([s for s in range(N) if s != 77])
    g = np.exp(0.1 * rng.standard_normal(steps.size))
    g[np.isin(steps, [60, 61, 112])] *= [8.0, 12.0, 30.0]
    g[steps == 95] = math.nan
    g[steps >= 150] *= 1.8
    return steps, g


@pytest.fixture
def store(tmp_path: Path):
    """A run with the grad norm above and a per-layer metric (3 layers, each its own noise)."""
    root = tmp_path / "store"
    w = writer(root, "r")
    steps, g = _series(7)
    scalars(w, "grad_norm/total", steps.tolist(), g.tolist())
    layers(w, "resid_rms", steps.tolist(), {i: _series(100 + i)[1].tolist() for i in range(3)}, layer_type="mamba")
    st = open_store(root)
    yield st
    st.close()


def _values(df: pl.DataFrame) -> dict[int, float]:
    return {s: v for s, v in zip(df["step"].to_list(), df["value"].to_list()) if v is not None}


@pytest.mark.parametrize("how", ["median", "mean"])
def test_scalar_trend_equals_numpy(store, how: str) -> None:
    steps, g = _series(7)
    df = evaluate(store, _expr(smooth_by=how), {"r": NEVER})
    assert df["step"].to_list() == steps.tolist()  # one observation per logged step
    got, want = _values(df), numpy_trend(steps, g, SMOOTH, WINDOW, how)
    assert set(got) == set(want)
    for t, v in want.items():
        assert got[t] == pytest.approx(v, rel=1e-9, abs=1e-12), t
    # active exactly where the independent value reaches `rise`
    assert df.filter(pl.col("active"))["step"].to_list() == sorted(t for t, v in want.items() if v >= 0.5)


def test_median_ignores_outlier_batches_the_mean_does_not(store) -> None:
    """Why the option exists: the outlier batches (8x, 12x at 60-61, 30x at 112) lift a 10-step mean
    by +50 % or more, not a 10-step median; the level change at 150 lifts both."""
    steps, g = _series(7)
    med = numpy_trend(steps, g, SMOOTH, WINDOW, "median")
    mean = numpy_trend(steps, g, SMOOTH, WINDOW, "mean")
    # the inputs make the point (numpy): the mean crosses +50 % before 150, the median does not
    assert any(v >= 0.5 for t, v in mean.items() if t < 150)
    assert not any(v >= 0.5 for t, v in med.items() if t < 150)
    median_active = evaluate(store, _expr(), {"r": NEVER}).filter(pl.col("active"))["step"].to_list()
    mean_active = evaluate(store, _expr(smooth_by="mean"), {"r": NEVER}).filter(pl.col("active"))["step"].to_list()
    assert [t for t in median_active if t < 150] == [] and [t for t in mean_active if t < 150]
    assert median_active and min(median_active) >= 150


def test_per_layer_median_trend_equals_numpy(store) -> None:
    e = _expr(metric="resid_rms", rise=0.3)
    df = evaluate(store, e, {"r": NEVER})
    assert sorted(df["layer"].unique().to_list()) == [0, 1, 2]
    steps = _series(0)[0]
    for i in range(3):
        got = _values(df.filter(pl.col("layer") == i))
        want = numpy_trend(steps, _series(100 + i)[1], SMOOTH, WINDOW, "median")
        assert set(got) == set(want)
        for t, v in want.items():
            assert got[t] == pytest.approx(v, rel=1e-9, abs=1e-12), (i, t)
    # aggregated over the layers first (median of the per-step mean), then the median trend
    agg = evaluate(store, _expr(metric="resid_rms", rise=0.3, aggregate="mean"), {"r": NEVER})
    # every layer has its NaN at step 95: their mean is NaN there in numpy as in SQL, and skipped
    mean_series = np.vstack([_series(100 + i)[1] for i in range(3)]).mean(axis=0)
    want = numpy_trend(steps, mean_series, SMOOTH, WINDOW, "median")
    got = _values(agg)
    assert set(got) == set(want)
    for t, v in want.items():
        assert got[t] == pytest.approx(v, rel=1e-9, abs=1e-12), t


def test_incremental_from_any_cursor_equals_one_shot(store) -> None:
    e = _expr()
    full = evaluate(store, e, {"r": NEVER})
    for cut in (0, 39, 76, 77, 111, 149, 160):
        part = evaluate(store, e, {"r": cut})
        expect = full.filter(pl.col("step") > cut)
        assert part.select("step", "value", "active").equals(expect.select("step", "value", "active")), cut


def test_snapshot_equals_store(store) -> None:
    e = _expr()
    snap = Snapshot()
    try:
        snap.load(store, {"r": NEVER}, None, Sources())
        (got,) = evaluate_many(snap, [(e, {"r": 120})])
    finally:
        snap.close()
    assert got.equals(evaluate(store, e, {"r": 120}))


def test_live_evaluation_flush_by_flush_equals_one_shot(tmp_path: Path) -> None:
    """A rule on the median trend evaluated by the engine after each of four flushes makes the
    same transitions as one evaluation of the whole run (the windows reach back across flushes)."""
    from healthwatch.alerts.engine import Evaluator

    rule = rules_yaml(
        "      - alert: GN\n"
        "        expr:\n"
        "          trend: {metric: grad_norm/total, window: 30, rise: 0.5, smooth: 10, smooth_by: median}\n"
        "        for: 3\n")
    (tmp_path / "r.yaml").write_text(rule)
    steps, g = _series(11)

    def transitions(ev: Evaluator) -> list[tuple[str, int]]:
        return [(t.state, int(t.step)) for t in ev.evaluate_once() if t.alert == "GN"]

    one = tmp_path / "one"
    scalars(writer(one, "r"), "grad_norm/total", steps.tolist(), g.tolist())
    ev = Evaluator(one, tmp_path / "r.yaml", runs=["r"], record=False, evaluator_id="t")
    try:
        whole = transitions(ev)
    finally:
        ev.close()
    # the level change at 150 fires it (pending first, firing `for` steps later)
    assert [s for s, _ in whole][:2] == ["pending", "firing"] and 150 <= whole[0][1] and whole[1][1] - whole[0][1] == 3
    inc = tmp_path / "inc"
    ev = Evaluator(inc, tmp_path / "r.yaml", runs=["r"], record=False, evaluator_id="t")
    got: list[tuple[str, int]] = []
    try:
        for k, (lo, hi) in enumerate(((0, 100), (100, 152), (152, 160), (160, N))):
            w = writer(inc, "r") if k == 0 else StoreWriter(inc, "r", attempt=1)
            sel = (steps >= lo) & (steps < hi)
            scalars(w, "grad_norm/total", steps[sel].tolist(), g[sel].tolist())
            got += transitions(ev)
    finally:
        ev.close()
    assert got == whole


def test_bad_smooth_by_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="smooth_by"):
        _expr(smooth_by="mode")
