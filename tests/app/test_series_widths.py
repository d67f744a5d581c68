"""The SeriesCache's bucket ladder reaches the 1,000-step rollups: a chart whose display buckets are
1,000 steps wide reads them (a tenth of the 100-step rows) and still draws every bucket's exact
maximum at its own step, the same as a read of the raw rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from healthwatch import query
from healthwatch.app import data as D
from healthwatch.store import Store, StoreWriter, compact_store

STEPS, LAYERS = 200_000, 3


def _write(root: Path) -> np.ndarray:
    rng = np.random.default_rng(7)
    steps = np.arange(STEPS, dtype=np.int64)
    vals = rng.random((LAYERS, STEPS)) + np.arange(LAYERS)[:, None]
    vals[1, 123_457] = 500.0  # a one-step spike in one layer
    vals[0, 7] = 300.0
    w = StoreWriter(root, "r")
    for layer in range(LAYERS):
        w.write("layer_stats", {"attempt": np.ones(STEPS, dtype=np.int32), "step": steps, "tokens": steps * 4,
                                "layer": np.full(STEPS, layer, dtype=np.int32), "layer_type": ["moe"] * STEPS,
                                "metric": ["maxvio"] * STEPS, "value": vals[layer]})
    w.write("attempts", {"attempt": [1], "start_step": [0], "started_at": [0.0], "host": ["h"], "reason": ["t"],
                         "schema_version": ["1.0"]})
    return vals


def test_widths_reach_each_rollup_size() -> None:
    # Every decade of the ladder starts at a rollup size, and within a decade each width nests in the next.
    for size in (100, 1_000, 10_000):
        assert size in D.WIDTHS
    for a, b in zip(D.WIDTHS, D.WIDTHS[1:]):
        assert b > a and (b % a == 0 or len(str(b)) > len(str(a)))


def test_thousand_step_buckets_keep_exact_maxima(tmp_path: Path) -> None:
    root = tmp_path / "s"
    vals = _write(root)
    compact_store(root)
    store = Store(root)
    # 200 display buckets (max_points 400) over 200,000 steps: 1,000-step buckets, one 1,000-step rollup each.
    cache = D.SeriesCache(max_points=400)
    pts = cache.get(store, "r", [D.Signal("maxvio", "max")])
    state = cache.state((str(root), "r", (D.Signal("maxvio", "max"),), None, True))
    assert state.width == 1_000
    assert query.plan(store, "r", "layer_stats", query.timeline(store, "r"), 1_000).limits == ((1, STEPS),)
    got = (pts.filter(~pl.col("superseded")).group_by((pl.col("step") // 1_000).alias("b"))
           .agg(pl.col("value").max()).sort("b"))
    per_step = vals.max(axis=0)  # the reference: max over layers per step, then per 1,000-step bucket
    ref = per_step.reshape(-1, 1_000).max(axis=1)
    assert got["b"].to_list() == list(range(STEPS // 1_000))
    assert np.allclose(got["value"].to_numpy(), ref, rtol=0, atol=0)
    # Spikes sit at their own step.
    assert pts.filter(pl.col("value") == 500.0)["step"].to_list() == [123_457]
    assert pts.filter(pl.col("value") == 300.0)["step"].to_list() == [7]
    assert pts.height <= 400
    # The same envelope as the raw rows read before any rollup existed, bucket by bucket.
    raw_root = tmp_path / "raw"
    _write(raw_root)
    raw = D.SeriesCache(max_points=400).get(Store(raw_root), "r", [D.Signal("maxvio", "max")])
    raw_max = raw.group_by((pl.col("step") // 1_000).alias("b")).agg(pl.col("value").max()).sort("b")
    assert raw_max["value"].to_list() == got["value"].to_list()


def test_live_tail_beyond_the_rollups_is_read(tmp_path: Path) -> None:
    # Rollups cover the first 200,000 steps; a live tail written after them holds a spike. The raw part
    # of the read is skipped only when the footers say no row lies beyond the rollups: here one does.
    root = tmp_path / "s"
    _write(root)
    compact_store(root)
    n = 5_000
    steps = np.arange(STEPS, STEPS + n, dtype=np.int64)
    v = np.full(n, 0.5)
    v[1_234] = 900.0
    StoreWriter(root, "r").write("layer_stats", {
        "attempt": np.ones(n, dtype=np.int32), "step": steps, "tokens": steps * 4,
        "layer": np.full(n, 2, dtype=np.int32), "layer_type": ["moe"] * n, "metric": ["maxvio"] * n, "value": v})
    store = Store(root)
    pts = D.SeriesCache(max_points=400).get(store, "r", [D.Signal("maxvio", "max")])
    assert pts.filter(pl.col("value") == 900.0)["step"].to_list() == [STEPS + 1_234]
    assert int(pts["step"].max()) >= STEPS + n - 1_000  # the tail's last bucket is drawn


def test_growth_across_a_decade_coarsens_or_reloads(tmp_path: Path) -> None:
    # One refresh taking a series from 400-step buckets past 800 into the next decade (1,000): the
    # nested step 400 -> 800 is not enough and 800 -> 1,000 is not nested, so the cache reloads in full.
    root = tmp_path / "s"
    rng = np.random.default_rng(3)
    cache = D.SeriesCache(max_points=400)
    store = None
    for a, b in ((0, 70_000), (70_000, 190_000), (190_000, 260_000)):
        steps = np.arange(a, b, dtype=np.int64)
        w = StoreWriter(root, "r")
        w.write("scalars", {"attempt": np.ones(steps.size, dtype=np.int32), "step": steps, "tokens": steps,
                            "name": ["loss/train"] * steps.size, "value": rng.standard_normal(steps.size),
                            "wall_time": np.zeros(steps.size)})
        store = store or Store(root)
        inc = cache.get(store, "r", [D.Signal("loss/train")])
        full = D.SeriesCache(max_points=400).get(store, "r", [D.Signal("loss/train")])
        assert inc.height <= 400, f"after steps {a}..{b}"
        assert inc.select("step", "value").equals(full.select("step", "value")), f"after steps {a}..{b}"
