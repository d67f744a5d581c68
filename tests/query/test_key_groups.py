"""Sealed segments cut at series keys, and the NumPy one-series read over them.

A sealed segment's row groups never hold two (metric, layer) series (``merge.key_groups``), so a
one-series read picks its groups from min == max statistics alone. Checked against the rows
written (not the store's statistics): every group's rows are read back and must hold one series;
``Store.scan_arrays`` and ``query.series`` must equal a reference computed from the written rows,
on sealed (key-cut) segments, unsealed ones and files in the old fixed-size layout; and the
bounded read of a fresh process imports no pandas.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from healthwatch import query
from healthwatch.schema import TABLES
from healthwatch.store import Store, StoreWriter, attempt_row, run_row
from healthwatch.store import merge as merge_mod
from healthwatch.store.segments import list_segments, table_dir

LAYERS = 6
METRICS = ("act_max", "resid_rms", "zz_tiny")


def _write(root: Path, run: str, steps: int, seed: int, attempt: int = 1, start: int = 0) -> list[tuple]:
    """Steps [start, steps) of ``attempt`` in 100-step flushes, merged live; ``zz_tiny`` only every
    50th step (a short series that shares a group). Returns (attempt, step, tokens, metric, layer, value)."""
    rng = np.random.default_rng(seed)
    w = StoreWriter(root, run, attempt=attempt, merge_fanout=2, seal_rows=6_000)
    if attempt == 1:
        w.write("runs", run_row(precision="bf16", created=1.0))
    w.write("attempts", attempt_row(attempt=attempt, start_step=start, started_at=float(attempt)))
    out = []
    for a in range(start, steps, 100):
        cols: dict[str, list] = {k: [] for k in ("attempt", "step", "tokens", "layer", "layer_type", "metric", "value")}
        for s in range(a, min(steps, a + 100)):
            for m in METRICS:
                if m == "zz_tiny" and s % 50:
                    continue
                for lay in range(LAYERS):
                    v = float(np.round(rng.normal(), 4))
                    for k, x in zip(cols, (attempt, s, 3 * s, lay, "moe", m, v)):
                        cols[k].append(x)
                    out.append((attempt, s, 3 * s, m, lay, v))
        w.write("layer_stats", cols)
        w.compact_own("layer_stats")
    w.close()
    return out


@pytest.fixture
def small_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    """Row groups of 1,000 rows, series under 300 rows share one: the cuts happen at test size."""
    monkeypatch.setattr(merge_mod, "ROW_GROUP_ROWS", 1_000)
    monkeypatch.setattr(merge_mod, "KEY_GROUP_MIN_ROWS", 300)


def test_sealed_groups_hold_one_series(tmp_path: Path, small_groups: None) -> None:
    root = tmp_path / "s"
    rows = _write(root, "r", 4_000, seed=1)
    sealed = [p for p in list_segments(table_dir(root, "layer_stats", "r"))
              if pq.read_metadata(p).num_rows >= 6_000]
    assert sealed, "the writer sealed no segment: the test checks nothing"
    for path in sealed:
        meta = pq.read_metadata(path)
        pf = pq.ParquetFile(path)
        shared = 0
        for g in range(meta.num_row_groups):
            t = pf.read_row_group(g, columns=["metric", "layer", "step"])
            keys = set(zip(t.column("metric").to_pylist(), t.column("layer").to_pylist()))
            assert t.num_rows <= 1_000
            if len(keys) > 1:
                # Only short series share a group (``zz_tiny``: every 50th step), never a long one.
                assert {m for m, _ in keys} == {"zz_tiny"}, (path.name, g, keys)
                shared += 1
            else:
                i = meta.schema.names.index("metric")
                st = meta.row_group(g).column(i).statistics
                assert st.min == st.max == next(iter(keys))[0]
        assert shared < meta.num_row_groups
    # Nothing lost or doubled: the sealed and unsealed files hold exactly the rows written.
    store = Store(root)
    got = store.sql("SELECT count(*), sum(value) FROM layer_stats WHERE run = 'r'").fetchone()
    assert got[0] == len(rows)
    assert got[1] == pytest.approx(sum(r[5] for r in rows))


def test_key_groups_cuts() -> None:
    """Cuts from the sort key alone: long series split at ROW_GROUP_ROWS, short ones packed."""
    n_long = merge_mod.ROW_GROUP_ROWS + 10
    metric = ["a"] * n_long + ["b"] * 5 + ["c"] * 7 + ["d"] * 20_000
    t = pa.table({"attempt": pa.array([1] * len(metric), pa.int32()), "step": pa.array(range(len(metric)), pa.int64()),
                  "layer": pa.array([0] * len(metric), pa.int32()), "metric": pa.array(metric).dictionary_encode()})
    assert merge_mod.key_groups(t, "layer_stats") == [
        (0, merge_mod.ROW_GROUP_ROWS), (merge_mod.ROW_GROUP_ROWS, 10),
        (n_long, 12),  # "b" and "c": both short, one group
        (n_long + 12, 20_000)]
    assert merge_mod.key_groups(t.slice(0, 0), "layer_stats") is None


def _old_layout(root: Path, run: str) -> None:
    """Rewrite the run's layer_stats segments as the writer did before key cuts: fixed 700-row
    groups that straddle series (same rows, same names)."""
    for path in list_segments(table_dir(root, "layer_stats", run)):
        t = pq.read_table(path)
        pq.write_table(t, path, row_group_size=700, write_statistics=True)


@pytest.mark.parametrize("layout", ["key-cut", "old"])
def test_scan_arrays_and_series_equal_reference(tmp_path: Path, small_groups: None, layout: str) -> None:
    root = tmp_path / "s"
    rows = _write(root, "r", 4_000, seed=2)
    rows += _write(root, "r", 3_000, seed=3, attempt=2, start=2_500)  # a rollback to step 2,500
    if layout == "old":
        _old_layout(root, "r")
    store = Store(root)
    rng = np.random.default_rng(7)
    for _ in range(12):
        m = METRICS[int(rng.integers(len(METRICS)))]
        lay = int(rng.integers(LAYERS))
        lo = int(rng.integers(0, 3_800))
        hi = lo + int(rng.integers(0, 1_500))
        want = sorted((r[1], r[2], r[5], r[0]) for r in rows if r[3] == m and r[4] == lay and lo <= r[1] <= hi)
        arrs = store.scan_arrays("layer_stats", "r", ["step", "tokens", "value", "attempt"],
                                 {"step": (lo, hi), "metric": (m, m), "layer": (lay, lay)})
        assert arrs is not None
        got = sorted(zip(arrs["step"].tolist(), arrs["tokens"].tolist(), arrs["value"].tolist(), arrs["attempt"].tolist()))
        assert got == want
        assert arrs["step"].dtype == np.int64 and arrs["attempt"].dtype == np.int32
        # query.series: the effective path (attempt 2 from step 2,500 on), in step order.
        eff = sorted((s, t, v) for s, t, v, a in want if (a == 2) == (s >= 2_500))
        df = query.series(store, "r", m, layer=lay, step_min=lo, step_max=hi, max_points=10_000)
        assert list(zip(df["step"], df["tokens"], df["value"])) == eff
        assert not df["superseded"].any()
        assert dict(df.schema) == {"step": pl_types()[0], "tokens": pl_types()[0], "value": pl_types()[1],
                                   "attempt": pl_types()[2], "superseded": pl_types()[3]}
        full = query.series(store, "r", m, layer=lay, step_min=lo, step_max=hi, max_points=10_000,
                            include_superseded=True)
        assert full.height == len(want)
        assert full["superseded"].to_list() == sorted(full["superseded"].to_list())  # kept rows first


def pl_types() -> tuple:
    """polars dtypes of a series answer: Int64, Float64, Int32, Boolean."""
    import polars as pl

    return pl.Int64, pl.Float64, pl.Int32, pl.Boolean


def test_scan_arrays_bad_input(tmp_path: Path) -> None:
    _write(tmp_path / "s", "r", 100, seed=5)
    store = Store(tmp_path / "s")
    with pytest.raises(ValueError, match="unknown table"):
        store.scan_arrays("nope", "r", ["step"])
    with pytest.raises(ValueError, match="no column"):
        store.scan_arrays("layer_stats", "r", ["stepp"])


_CHILD = r"""
import json, sys
import polars, pyarrow.parquet, duckdb  # the benchmark's imports, before the timed part
from healthwatch import query
from healthwatch.store import open_store
before = "pandas" in sys.modules
df = query.series(open_store(sys.argv[1]), "r", "resid_rms", layer=2, step_min=100, step_max=1099, max_points=2000)
print(json.dumps({"before": before, "after": "pandas" in sys.modules, "rows": df.height}))
"""


def test_fresh_bounded_read_imports_no_pandas(tmp_path: Path, small_groups: None) -> None:
    """pyarrow's NumPy conversions import pandas (~0.5 s of a fresh process): the read avoids them."""
    root = tmp_path / "s"
    _write(root, "r", 2_000, seed=4)
    out = subprocess.run([sys.executable, "-c", _CHILD, str(root)], check=True, capture_output=True, text=True, timeout=300)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r == {"before": False, "after": False, "rows": 1000}


def test_tables_used_here_are_numeric() -> None:
    """scan_arrays' NumPy path needs the series columns to be fixed-width numbers."""
    f = TABLES["layer_stats"]
    for c in ("step", "tokens", "value", "attempt", "layer"):
        assert pa.types.is_integer(f.field(c).type) or pa.types.is_floating(f.field(c).type)
