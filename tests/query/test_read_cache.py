"""The cheap whole-run readers: coarse rollups, the per-Store section cache, and the reads without SQL.

A whole-run series at few points reads the coarsest rollups that still give ~every drawn bucket
its own minimum and maximum (1,000-step buckets for a million steps at 2,000 points); the rollup
sections of each file are decoded once per open Store; the pyarrow path downsamples (series) and
aggregates (heatmap) in polars/numpy instead of a DuckDB statement. Each must answer exactly what
the SQL over the store's views answers, with NaN, ±Inf and ties in the values, after a rollback,
with a live tail, and after the store changed under an open Store.
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from _flushes import write_flush

from healthwatch import query
from healthwatch.store import Store, StoreWriter, attempt_row, run_row
from healthwatch.store import reader as reader_mod

series_mod = importlib.import_module("healthwatch.query.series")
grid_mod = importlib.import_module("healthwatch.query.grid")

LAYERS = 3


def _write(root: Path, attempt: int, start: int, end: int, seed: int, odd: bool = False) -> dict:
    """Steps [start, end) of ``attempt`` in 100-step flushes with self-merging (a live writer, not
    closed); ``odd`` puts NaN, ±Inf and repeated values in. Returns {(attempt, step, layer): value}."""
    rng = np.random.default_rng(seed)
    w = StoreWriter(root, "r", attempt=attempt, merge_fanout=3)
    if attempt == 1:
        w.write("runs", run_row(precision="bf16", created=1.0))
    w.write("attempts", attempt_row(attempt=attempt, start_step=start, started_at=float(attempt)))
    out = {}
    for a in range(start, end, 100):
        steps = list(range(a, min(end, a + 100)))
        vals = np.round(rng.normal(size=(len(steps), LAYERS)), 1 if odd else 4)  # odd: many ties
        vals[rng.random(vals.shape) < 0.01] *= 50.0
        if odd:
            u = rng.random(vals.shape)
            vals[u < 0.004] = np.nan
            vals[(u >= 0.004) & (u < 0.006)] = np.inf
            vals[(u >= 0.006) & (u < 0.008)] = -np.inf
        write_flush(w, attempt, steps, vals)
        out.update({(attempt, s, lay): float(vals[i, lay]) for i, s in enumerate(steps) for lay in range(LAYERS)})
        w.compact_own("layer_stats")
        w.compact_own("scalars")
    return out


def _view_path(store: Store) -> Store:
    """The same store with the pyarrow path off: every read goes through the DuckDB views."""
    store.scan_run = lambda *a, **k: None  # type: ignore[method-assign]
    return store


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "nan-inf-ties"])
def live(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("cache") / "s"
    rows = _write(root, 1, 0, 24_000, seed=1, odd=request.param)
    rows.update(_write(root, 2, 21_500, 25_750, seed=2, odd=request.param))  # a rollback, then a live tail
    return root, rows


def _same(a: pl.DataFrame, b: pl.DataFrame) -> bool:
    """Frames equal row by row, NaN equal to NaN."""
    if a.columns != b.columns or a.height != b.height or a.dtypes != b.dtypes:
        return False
    for c in a.columns:
        for x, y in zip(a[c].to_list(), b[c].to_list()):
            if not (x == y or (isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y))):
                return False
    return True


@pytest.mark.parametrize("max_points", [20, 40, 60, 400])
@pytest.mark.parametrize("layer", [None, 1])
def test_series_at_any_resolution_equals_the_sql(live: tuple[Path, dict], layer: int | None, max_points: int,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    root, rows = live
    name = "loss/train" if layer is None else "resid_rms"
    store = Store(root)
    fast = series_mod._series_rollup_direct(store, "r", name, layer, max_points, False, None)
    assert fast is not None, "the whole-run read should be answered from pyarrow reads here"
    # The same rows through the SQL downsampling over the frames, and through the store's views.
    monkeypatch.setattr(series_mod, "_downsample_frame", lambda *a, **k: None)
    over_frames = series_mod._series_rollup_direct(Store(root), "r", name, layer, max_points, False, None)
    views = query.series(_view_path(Store(root)), "r", name, layer=layer, max_points=max_points)
    assert over_frames is not None
    assert _same(fast, over_frames) and _same(fast, views)
    # Independent of the store: the effective path's minimum (NaN aside) and maximum (NaN if any,
    # as the SQL orders it) are kept, each at a step that holds that value.
    lay = 0 if layer is None else layer
    eff = {s: v for (a, s, la), v in rows.items() if la == lay and (a == 2 or s < 21_500)}
    kept = dict(zip(fast["step"].to_list(), fast["value"].to_list()))
    low = min(v for v in eff.values() if not math.isnan(v))
    assert any(v == low and eff[s] == low for s, v in kept.items())
    if any(math.isnan(v) for v in eff.values()):
        assert any(math.isnan(v) and math.isnan(eff[s]) for s, v in kept.items())
    else:
        high = max(eff.values())
        assert any(v == high and eff[s] == high for s, v in kept.items())
    assert 0 < fast.height <= max_points


def test_few_points_read_the_coarse_rollups(live: tuple[Path, dict], monkeypatch: pytest.MonkeyPatch) -> None:
    """20 points over 25,750 steps: 1,000-step rollups (25 buckets >= 90 % of 10); 400 points: 100-step ones."""
    root, _rows = live
    sizes: list[int] = []
    real = series_mod._coarse_enough

    def spy(p: object, usable: int, max_points: int) -> bool:
        ok = real(p, usable, max_points)  # type: ignore[arg-type]
        if ok:
            sizes.append(p.size)  # type: ignore[attr-defined]
        return ok

    monkeypatch.setattr(series_mod, "_coarse_enough", spy)
    store = Store(root)
    series_mod._series_rollup_direct(store, "r", "resid_rms", 1, 20, False, None)
    assert sizes == [1000]
    sizes.clear()
    series_mod._series_rollup_direct(store, "r", "resid_rms", 1, 400, False, None)
    assert sizes == []  # fell through to the 100-step rollups


@pytest.mark.parametrize("agg", ["mean", "max", "min", "last"])
def test_heatmap_without_sql_equals_the_sql(live: tuple[Path, dict], agg: str, monkeypatch: pytest.MonkeyPatch) -> None:
    root, rows = live
    calls: list[bool] = []
    real = grid_mod._heatmap_frames

    def spy(*a: object, **k: object) -> object:
        out = real(*a, **k)  # type: ignore[arg-type]
        calls.append(out is not None)
        return out

    monkeypatch.setattr(grid_mod, "_heatmap_frames", spy)
    got = query.heatmap(Store(root), "r", "resid_rms", max_buckets=8, agg=agg)
    assert calls == [True], "the heatmap should be answered without SQL here"
    monkeypatch.setattr(grid_mod, "_heatmap_frames", lambda *a, **k: None)
    over_frames = query.heatmap(Store(root), "r", "resid_rms", max_buckets=8, agg=agg)
    views = query.heatmap(_view_path(Store(root)), "r", "resid_rms", max_buckets=8, agg=agg)
    for want in (over_frames, views):
        assert got.select("layer", "layer_type", "step").equals(want.select("layer", "layer_type", "step"))
        a, b = got["value"].to_numpy(), want["value"].to_numpy()
        assert np.array_equal(np.isnan(a), np.isnan(b))
        fin = ~np.isnan(a)
        assert np.array_equal(np.isinf(a[fin]), np.isinf(b[fin]))
        assert np.allclose(a[fin], b[fin], rtol=1e-12, atol=0)
    # independent check of the max cells against the rows written (NaN above every number)
    if agg == "max":
        w = int(got["step"].unique().sort().diff().drop_nulls().min())
        ref: dict[tuple[int, int], float] = {}
        for (a, s, la), v in rows.items():
            if a == 2 or s < 21_500:
                k = (la, (s // w) * w)
                old = ref.get(k, -math.inf)
                ref[k] = math.nan if math.isnan(old) or math.isnan(v) else max(old, v)
        cells = {(int(la), int(s)): v for la, s, v in got.select("layer", "step", "value").iter_rows()}
        assert cells.keys() == ref.keys()
        assert all((math.isnan(cells[k]) and math.isnan(ref[k])) or cells[k] == ref[k] for k in ref)


def test_an_open_store_sees_new_segments_and_a_rollback(tmp_path: Path) -> None:
    """Cached sections are per listing: a store open before new flushes, rollups and a rollback
    answers what a fresh Store's views answer after them."""
    root = tmp_path / "s"
    _write(root, 1, 0, 12_000, seed=5)
    store = Store(root)
    first = query.series(store, "r", "resid_rms", layer=2, max_points=20)
    first_hm = query.heatmap(store, "r", "resid_rms", max_buckets=4, agg="max")
    assert first.height > 0 and first_hm.height > 0
    _write(root, 2, 9_000, 14_500, seed=6)  # a rollback to 9,000 and more steps, while `store` is open
    for layer in (0, 2):
        got = query.series(store, "r", "resid_rms", layer=layer, max_points=20)
        want = query.series(_view_path(Store(root)), "r", "resid_rms", layer=layer, max_points=20)
        assert _same(got, want)
    got_hm = query.heatmap(store, "r", "resid_rms", max_buckets=4, agg="max")
    want_hm = query.heatmap(_view_path(Store(root)), "r", "resid_rms", max_buckets=4, agg="max")
    assert _same(got_hm, want_hm)
    assert int(got_hm["step"].max()) >= 12_000  # the new steps are in


def test_a_tiny_cache_still_answers_exactly(live: tuple[Path, dict], monkeypatch: pytest.MonkeyPatch) -> None:
    """With room for one section the cache keeps evicting; answers do not change."""
    root, _rows = live
    want = query.series(Store(root), "r", "resid_rms", layer=0, max_points=20)
    monkeypatch.setattr(reader_mod, "_SECTION_CACHE_BYTES", 1)
    store = Store(root)
    for layer in (0, 1, 0, 2, 0):
        got = query.series(store, "r", "resid_rms", layer=layer, max_points=20)
        if layer == 0:
            assert _same(got, want)
    assert len(store._sections) == 1


def test_key_code_is_exact() -> None:
    """The packed key of two key columns tells every pair apart (negative and large values too)."""
    df = pl.DataFrame({"metric": ["a", "b", "a", "b", "a"], "layer": [0, 0, -1, 2**31 - 1, -(2**31)]},
                      schema={"metric": pl.Categorical, "layer": pl.Int32})
    code = reader_mod._key_code(df)
    assert code is not None
    assert df.select(code.n_unique()).item() == 5
    dup = pl.concat([df, df])
    assert dup.filter(code.is_first_distinct()).height == 5
    assert reader_mod._key_code(pl.DataFrame({"a": [1.0]})) is None
