"""Whole-run reads answered from rows read with pyarrow (``Store.scan_run``) equal the view path.

``series`` of a whole run and ``heatmap`` read the key's rollup rows and the raw live tail with
pyarrow and run the view path's own SQL over just those rows (``Store.sql_over``). Here they must
return exactly what the same functions return over the store's DuckDB views (the reader with its
scan disabled), after a rollback and with a live tail past the rollups, and the rows they keep must
match a reference computed from the rows written.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from _flushes import write_flush

from healthwatch import query
from healthwatch.store import Store, StoreWriter, attempt_row, run_row

series_mod = importlib.import_module("healthwatch.query.series")
grid_mod = importlib.import_module("healthwatch.query.grid")

LAYERS = 3


def _write(root: Path, attempt: int, start: int, end: int, seed: int) -> dict[tuple[int, int, int], float]:
    """Steps [start, end) of ``attempt`` in 100-step flushes with self-merging; {(attempt, step, layer): value}."""
    rng = np.random.default_rng(seed)
    w = StoreWriter(root, "r", attempt=attempt, merge_fanout=3)
    if attempt == 1:
        w.write("runs", run_row(precision="bf16", created=1.0))
    w.write("attempts", attempt_row(attempt=attempt, start_step=start, started_at=float(attempt)))
    out = {}
    for a in range(start, end, 100):
        steps = list(range(a, min(end, a + 100)))
        vals = np.round(rng.normal(size=(len(steps), LAYERS)), 4)
        vals[rng.random(vals.shape) < 0.01] *= 50.0  # spikes the downsampling must keep
        write_flush(w, attempt, steps, vals)
        out.update({(attempt, s, lay): float(vals[i, lay]) for i, s in enumerate(steps) for lay in range(LAYERS)})
        w.compact_own("layer_stats")
        w.compact_own("scalars")
    # not closed: a live writer; its last rollup batch is still unpublished (a raw tail)
    return out


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("direct") / "s"
    rows = _write(root, 1, 0, 24_000, seed=1)
    rows.update(_write(root, 2, 21_500, 25_750, seed=2))  # a rollback to 21,500, then a live tail
    return root, rows


def _view_path(store: Store) -> Store:
    """The same store with the pyarrow path off: every read goes through the DuckDB views."""
    store.scan_run = lambda *a, **k: None  # type: ignore[method-assign]
    return store


@pytest.mark.parametrize("layer", [None, 0, 2])
def test_whole_series_direct_equals_view_path(live: tuple[Path, dict], layer: int | None) -> None:
    root, rows = live
    name = "loss/train" if layer is None else "resid_rms"
    store = Store(root)
    direct = series_mod._series_rollup_direct(store, "r", name, layer, 400, False, None)
    assert direct is not None, "the whole-run read should be answered from pyarrow reads here"
    got = query.series(store, "r", name, layer=layer, max_points=400)
    want = query.series(_view_path(Store(root)), "r", name, layer=layer, max_points=400)
    assert got.equals(direct) and got.equals(want)
    # independent check: the effective path's extremes are kept, at their own steps
    lay = 0 if layer is None else layer
    eff = {s: v for (a, s, la), v in rows.items() if la == lay and (a == 2 or s < 21_500)}
    lo_step = min(eff, key=lambda s: (eff[s], s))
    hi_step = max(eff, key=lambda s: (eff[s], -s))
    kept = dict(zip(got["step"].to_list(), got["value"].to_list()))
    assert kept.get(lo_step) == eff[lo_step] and kept.get(hi_step) == eff[hi_step]
    assert 0 < got.height <= 400


@pytest.mark.parametrize("agg", ["mean", "max", "last"])
def test_heatmap_direct_equals_view_path(live: tuple[Path, dict], agg: str) -> None:
    root, rows = live
    store = Store(root)
    got = query.heatmap(store, "r", "resid_rms", max_buckets=8, agg=agg)
    want = query.heatmap(_view_path(Store(root)), "r", "resid_rms", max_buckets=8, agg=agg)
    assert got.select("layer", "layer_type", "step").equals(want.select("layer", "layer_type", "step"))
    assert np.allclose(got["value"].to_numpy(), want["value"].to_numpy(), rtol=1e-12, atol=0)
    # independent check of the cells against the rows written
    eff = {(s, la): v for (a, s, la), v in rows.items() if a == 2 or s < 21_500}
    w = int(got["step"].unique().sort().diff().drop_nulls().min())
    ref: dict[tuple[int, int], list[tuple[int, float]]] = {}
    for (s, la), v in eff.items():
        ref.setdefault((la, (s // w) * w), []).append((s, v))
    red = {"mean": lambda xs: sum(v for _, v in xs) / len(xs), "max": lambda xs: max(v for _, v in xs),
           "last": lambda xs: max(xs)[1]}[agg]
    cells = {(int(la), int(s)): v for la, s, v in got.select("layer", "step", "value").iter_rows()}
    assert cells.keys() == ref.keys()
    assert all(abs(cells[k] - red(ref[k])) <= 1e-9 * max(1.0, abs(red(ref[k]))) for k in ref)


def test_direct_heatmap_path_is_taken(live: tuple[Path, dict]) -> None:
    root, _rows = live
    out = grid_mod._heatmap_direct(Store(root), "r", "resid_rms", 8, "mean", None)
    assert isinstance(out, pl.DataFrame) and out.height > 0
