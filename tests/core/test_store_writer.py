"""The live writer's own machinery: NumPy rollups, the sort-free merge, tiered self-merging.

Expected values come from DuckDB SQL (``rollup_select``, ``ORDER BY``) or plain Python over the
rows the test generated, never from the code under test.
"""

from __future__ import annotations

import math
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st_

from healthwatch.schema import SORT_KEYS, TABLES
from healthwatch.store import StoreWriter, compact_store
from healthwatch.store.merge import dictionary_columns, merge_tables, sort_table
from healthwatch.store.rollup import RollupAccumulator, combine_select, rollup_select
from healthwatch.store.segments import list_segments, parse_segment, table_dir

METRICS = ("b_metric", "a_metric")


def _layer_rows(steps: list[int], layers: int, rng: np.random.Generator, attempt: int = 1,
                specials: bool = True) -> pa.Table:
    """Step-major rows (as the Monitor emits them), with NaN, inf and ties when ``specials``."""
    rows = []
    for s in steps:
        for m in METRICS:
            for lay in range(layers):
                v = float(rng.normal())
                if specials:
                    r = rng.random()
                    v = math.nan if r < 0.02 else math.inf if r < 0.03 else float(round(v)) if r < 0.1 else v
                rows.append((attempt, s, s * 7, lay, "moe", m, v))
    cols = list(zip(*rows)) if rows else [[] for _ in TABLES["layer_stats"]]
    return pa.Table.from_arrays([pa.array(c, f.type) for c, f in zip(cols, TABLES["layer_stats"])],
                                schema=TABLES["layer_stats"])


def _tuples(t: pa.Table) -> list[tuple]:
    # NaN != NaN: compare a printable form.
    return [tuple("nan" if isinstance(v, float) and math.isnan(v) else v for v in r.values()) for r in t.to_pylist()]


def _duck_sorted(t: pa.Table, table: str) -> pa.Table:
    con = duckdb.connect()
    con.register("t", t.cast(TABLES[table]))
    order = ", ".join(SORT_KEYS[table])
    return con.sql(f"SELECT * FROM t ORDER BY {order}").to_arrow_table()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st_.integers(0, 2**31 - 1), n_parts=st_.integers(1, 6), shuffle=st_.booleans(),
       overlap=st_.booleans())
def test_merge_equals_sql_order(seed: int, n_parts: int, shuffle: bool, overlap: bool) -> None:
    """A merge of a writer's sorted segments (sort-free path) and of segments in any order or with
    overlapping steps (sorting path) both give DuckDB's ORDER BY of all the rows."""
    rng = np.random.default_rng(seed)
    parts, start = [], 0
    for _ in range(n_parts):
        n = int(rng.integers(1, 40))
        first = max(0, start - int(rng.integers(0, 10))) if overlap else start
        parts.append(sort_table(dictionary_columns(_layer_rows(list(range(first, first + n)), 3, rng)), "layer_stats"))
        start = first + n
    if shuffle:
        parts = parts[::-1]
    merged = merge_tables(parts, "layer_stats")
    expected = _duck_sorted(pa.concat_tables([p.cast(TABLES["layer_stats"]) for p in parts]), "layer_stats")
    assert [r[:6] for r in _tuples(merged.cast(TABLES["layer_stats"]))] == [r[:6] for r in _tuples(expected)]
    # values: equal per (metric, layer, step) (ties in the order keys may order values either way)
    got = sorted(_tuples(merged.cast(TABLES["layer_stats"])), key=str)
    assert got == sorted(_tuples(expected), key=str)


def _reference_rollups(raw: pa.Table) -> dict:
    con = duckdb.connect()
    con.register("raw", raw)
    sql = " UNION ALL ".join(f"({rollup_select('layer_stats', 'raw', s)})" for s in (100, 1000, 10000))
    return {(r["bucket_size"], r["bucket"], r["attempt"], r["metric"], r["layer"]): r
            for r in con.sql(sql).to_arrow_table().to_pylist()}


def _combined(parts: list[pa.Table]) -> dict:
    con = duckdb.connect()
    con.register("got", pa.concat_tables(parts))
    return {(r["bucket_size"], r["bucket"], r["attempt"], r["metric"], r["layer"]): r
            for r in con.sql(combine_select("layer_stats", "got")).to_arrow_table().to_pylist()}


def _same(a: object, b: object) -> bool:
    if isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or a == b or abs(a - b) <= 1e-9 * max(1.0, abs(b))
    return a == b


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st_.integers(0, 2**31 - 1), cuts=st_.lists(st_.integers(1, 900), min_size=1, max_size=8),
       late=st_.booleans())
def test_accumulated_rollups_equal_sql_rollups(seed: int, cuts: list[int], late: bool) -> None:
    """Rollups accumulated batch by batch (any batch sizes, NaN/inf/ties, a late batch of old
    steps) and combined equal DuckDB's rollup of all the rows; a late batch is flagged, and the
    step of each minimum and maximum holds that value."""
    rng = np.random.default_rng(seed)
    acc = RollupAccumulator("layer_stats")
    out, batches, start = [], [], 0
    for n in cuts:
        batches.append(_layer_rows(list(range(start, start + n)), 2, rng))
        start += n
    if late and start > 150:
        batches.append(_layer_rows([3, 5], 2, rng))  # old steps: their buckets closed long ago
    for i, b in enumerate(batches):
        got = acc.add(b)
        if late and start > 150 and i == len(batches) - 1:
            assert acc.late
        if got is not None:
            out.append(got)
    rest = acc.drain()
    if rest is not None:
        out.append(rest)
    raw = pa.concat_tables(batches)
    ref = _reference_rollups(raw)
    got = _combined(out)
    assert got.keys() == ref.keys()
    values: dict[tuple, list[float]] = {}  # a late batch rewrites some steps: several values a step
    for r in raw.to_pylist():
        values.setdefault((r["metric"], r["layer"], r["step"]), []).append(r["value"])
    for k, r in ref.items():
        for col, v in r.items():
            if col in ("step_vmin", "tokens_vmin", "step_vmax", "tokens_vmax"):
                continue  # ties: any row holding the extreme
            assert _same(got[k][col], v), (k, col, got[k][col], v)
        for sc, vc in (("step_vmin", "vmin"), ("step_vmax", "vmax")):
            assert any(_same(v, got[k][vc]) for v in values[(k[3], k[4], got[k][sc])])


def test_tiered_self_merge_bounds_files_and_keeps_segments_sorted(tmp_path: Path) -> None:
    """Fan-out 4, seal at 2,000 rows: the writer's files stay few, sealed ones are not rewritten,
    every segment is sorted, and all rows are there once."""
    root = tmp_path / "s"
    w = StoreWriter(root, "r", merge_fanout=4, seal_rows=2_000, cache_rows=500)
    rng = np.random.default_rng(0)
    written = []
    for f in range(64):
        t = _layer_rows(list(range(f * 10, f * 10 + 10)), 3, rng, specials=False)  # 60 rows a flush
        written.append(t)
        w.write("layer_stats", t)
        w.compact_own("layer_stats")
    w.close()
    d = table_dir(root, "layer_stats", "r")
    files = list_segments(d)
    levels = sorted(parse_segment(p).level for p in files)
    # 64 flushes of 60 rows: L1 = 240, L2 = 960, L3 = 3,840 rows (sealed at >= 2,000): one L3 file.
    assert levels == [3], levels
    assert pq.ParquetFile(files[0]).metadata.num_rows == 64 * 60
    data = pq.read_table(files[0])
    expected = _duck_sorted(pa.concat_tables(written), "layer_stats")
    assert _tuples(data.cast(TABLES["layer_stats"])) == _tuples(expected)
    # the file reads back with the table's plain types (no dictionary or schema blob)
    assert pq.read_schema(files[0]).field("metric").type == pa.string()


def test_self_merge_after_compaction_took_its_segments(tmp_path: Path) -> None:
    """A compaction (another process) that merged the writer's segments away leaves the writer
    merging only what is left, with no row lost or doubled."""
    root = tmp_path / "s"
    w = StoreWriter(root, "r", merge_fanout=2)
    rng = np.random.default_rng(1)
    total = 0
    for f in range(9):
        t = _layer_rows(list(range(f * 5, f * 5 + 5)), 2, rng, specials=False)
        total += t.num_rows
        w.write("layer_stats", t)
        if f == 4:
            compact_store(root)
        w.compact_own("layer_stats")
    w.close()
    con = duckdb.connect()
    files = [str(p) for p in list_segments(table_dir(root, "layer_stats", "r"))]
    n, distinct = con.sql(f"SELECT count(*), count(DISTINCT (metric, layer, step)) FROM read_parquet({files})").fetchall()[0]
    assert (n, distinct) == (total, total)


def test_closed_writer_refuses_writes(tmp_path: Path) -> None:
    w = StoreWriter(tmp_path / "s", "r")
    w.close()
    with pytest.raises(ValueError, match="closed"):
        w.write("layer_stats", _layer_rows([1], 1, np.random.default_rng(0)))


def test_bad_writer_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="merge_fanout"):
        StoreWriter(tmp_path / "s", "r", merge_fanout=1)
    with pytest.raises(ValueError, match="seal_rows"):
        StoreWriter(tmp_path / "s", "r", seal_rows=0)
