"""The app's data layer: SQL downsampling keeps spikes, incremental reads equal full reads, an idle
refresh reads nothing, timelines of attempts, the divergence statistics."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from healthwatch import query
from healthwatch.app import data as D
from healthwatch.store import Store, StoreWriter, compact_store


def _scalars(root: Path, run: str, steps: np.ndarray, values: np.ndarray, attempt: int = 1,
             name: str = "loss/train") -> None:
    w = StoreWriter(root, run, attempt=attempt)
    n = steps.size
    w.write("scalars", {"attempt": np.full(n, attempt, dtype=np.int32), "step": steps, "tokens": steps * 10,
                        "name": [name] * n, "value": values, "wall_time": np.full(n, time.time())})


def _attempt(root: Path, run: str, attempt: int, start: int) -> None:
    StoreWriter(root, run, attempt=attempt).write(
        "attempts", {"attempt": [attempt], "start_step": [start], "started_at": [time.time()], "host": ["h"],
                     "reason": ["test"], "schema_version": ["1.0"]})


def test_spike_and_nan_survive_downsampling(tmp_path: Path) -> None:
    root = tmp_path / "s"
    steps = np.arange(200_000, dtype=np.int64)
    v = 2.0 + 0.01 * np.sin(steps / 500.0)
    v[123_457] = 50.0
    v[150_001] = np.nan
    v[170_002] = -7.0
    _scalars(root, "r", steps, v)
    pts = D.SeriesCache(max_points=2000).get(Store(root), "r", [D.Signal("loss/train")])
    assert 0 < pts.height <= 2000
    assert 50.0 in pts["value"].to_list() and -7.0 in pts["value"].to_list()
    assert pts["value"].is_nan().sum() == 1
    assert pts.filter(pl.col("value") == 50.0)["step"][0] == 123_457


def test_incremental_reads_equal_full_reads_and_idle_reads_nothing(tmp_path: Path) -> None:
    root = tmp_path / "s"
    rng = np.random.default_rng(0)
    store = Store(root) if root.exists() else None
    cache = D.SeriesCache(max_points=400)
    # Chunks cross every kind of width change, including the non-nested 64 -> 100 step of the ladder.
    bounds = [0, 150, 1_000, 9_000, 30_000, 90_000, 130_000]
    for a, b in zip(bounds, bounds[1:]):
        steps = np.arange(a, b, dtype=np.int64)
        _scalars(root, "r", steps, rng.standard_normal(steps.size))
        store = store or Store(root)
        inc = cache.get(store, "r", [D.Signal("loss/train")])
        full = D.SeriesCache(max_points=400).get(store, "r", [D.Signal("loss/train")])
        assert inc.select("step", "value").equals(full.select("step", "value")), f"after steps {a}..{b}"
        assert inc.height <= 400
    state = cache.state((str(root), "r", (D.Signal("loss/train"),), None, True))
    reads = state.reads
    cache.get(store, "r", [D.Signal("loss/train")])
    assert state.reads == reads  # nothing new on disk: no SQL at all


def test_layer_aggregates_exact_and_from_rollups(tmp_path: Path) -> None:
    root = tmp_path / "s"
    n, layers = 150_000, 3
    steps = np.arange(n, dtype=np.int64)
    w = StoreWriter(root, "r")
    for layer in range(layers):
        v = 1.0 + 0.1 * layer + 0.001 * np.sin(steps / 100.0)
        if layer == 1:
            v[77_777] = 99.0  # a one-step spike in one layer
        w.write("layer_stats", {"attempt": np.ones(n, dtype=np.int32), "step": steps, "tokens": steps,
                                "layer": np.full(n, layer, dtype=np.int32), "layer_type": ["moe"] * n,
                                "metric": ["maxvio"] * n, "value": v})
    _attempt(root, "r", 1, 0)
    raw = D.SeriesCache().get(Store(root), "r", [D.Signal("maxvio", "max")])
    compact_store(root)
    store = Store(root)
    assert query.plan(store, "r", "layer_stats", query.timeline(store, "r")).limits == ((1, n),)
    rolled = D.SeriesCache().get(store, "r", [D.Signal("maxvio", "max")])
    for pts in (raw, rolled):
        assert pts.height <= D.MAX_POINTS
        assert pts["value"].max() == 99.0
        assert abs(pts.filter(pl.col("value") == 99.0)["step"][0] - 77_777) < 100  # within its rollup bucket


def test_small_series_are_exact(app_store: Path) -> None:
    store = Store(app_store)
    pts = D.SeriesCache().get(store, "main", [D.Signal("maxvio", "max"), D.Signal("loss/train")])
    raw = store.sql("SELECT step, max(value) AS value FROM layer_stats_effective WHERE run = 'main' "
                    "AND metric = 'maxvio' GROUP BY step ORDER BY step").pl()
    mine = pts.filter((pl.col("sig") == "maxvio:max") & ~pl.col("superseded")).select("step", "value")
    assert mine.equals(raw.with_columns(pl.col("step").cast(pl.Int64)))


def test_rollback_rows_are_flagged_not_dropped(app_store: Path) -> None:
    store = Store(app_store)
    pts = D.SeriesCache().get(store, "main", [D.Signal("loss/train")])
    ghost = pts.filter(pl.col("superseded"))
    assert ghost["step"].min() == 100 and ghost["step"].max() == 199
    assert set(ghost["attempt"].to_list()) == {1}
    eff = pts.filter(~pl.col("superseded"))
    assert eff["step"].n_unique() == 300 and eff.filter(pl.col("step") >= 100)["attempt"].unique().to_list() == [2]
    # The diverged timeline of attempt 1: its own rows everywhere, the rows of attempt 2 are off it.
    diverged = D.SeriesCache().get(store, "main", [D.Signal("loss/train")], attempt=1)
    assert diverged.filter(~pl.col("superseded"))["attempt"].unique().to_list() == [1]


def test_bucket_means_on_a_timeline(app_store: Path) -> None:
    store = Store(app_store)
    df = D.bucket_means(store, "main", [D.Signal("loss/train"), D.Signal("resid_rms", "max")], 1, 0, 199, 50)
    assert set(df["sig"].unique()) == {"loss/train", "resid_rms:max"}
    assert df.filter(pl.col("sig") == "loss/train").height == 50
    ck = D.last_checkpoint_before(store, "main", 1, 116)
    assert ck is not None and ck["step"] == 100


def test_trailing_z_and_first_crossing() -> None:
    rng = np.random.default_rng(1)
    x = 1.0 + 0.01 * rng.standard_normal(300)
    x[200:] += np.linspace(0, 3, 100)  # a rise from bucket 200 (0.03 per bucket, 3 sigma)
    x[250] = np.inf
    z = D.trailing_z(x, 30)
    assert np.isnan(z[:30]).all() and np.isposinf(z[250])
    assert np.abs(z[30:190]).max() < 6
    c = D.first_crossing(np.arange(300), np.arange(300) * 10, z, 6.0, 3, "x")
    assert c is not None and 200 <= c.step <= 215 and c.direction == "up" and c.tokens == c.step * 10
    assert D.first_crossing(np.arange(300), np.arange(300), np.zeros(300), 6.0, 3, "flat") is None
    flat = D.trailing_z(np.full(100, 3e-4), 20)  # a constant signal (the learning rate) never crosses
    assert np.nanmax(np.abs(flat)) == 0


def test_lineage_order_handles_missing_parents_and_cycles() -> None:
    df = pl.DataFrame({"run": ["a", "b", "c", "d", "e", "f"], "parent": [None, "a", "a", "zz", "f", "e"],
                       "branch_tokens": [None, 20, 10, 5, 1, 1], "created": [1.0, 2, 3, 4, 5, 6]})
    order = D.tree_order(df)
    assert order[:3] == [("a", 0), ("c", 1), ("b", 1)]
    assert ("d", 0) in order and {r for r, _ in order} == set(df["run"])


@pytest.mark.parametrize("attempt,expect", [(None, {(1, 0, 99), (2, 100, 299)}), (1, {(1, 0, 199)})])
def test_timeline_predicates(app_store: Path, attempt: int | None, expect: set) -> None:
    store = Store(app_store)
    path = D.path_for(D.attempts(store, "main"), attempt)
    params: list = ["main"]
    pred = path.predicate(params)
    got = store.sql(f"SELECT attempt, min(step), max(step) FROM scalars WHERE run = ?{pred} GROUP BY attempt",
                    params).fetchall()
    assert set(got) == expect
