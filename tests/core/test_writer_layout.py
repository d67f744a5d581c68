"""The live writer's cheaper writes (issue 15, ingest budget): REQUIRED Parquet columns, the merge
of flushes that share one series layout.

Expected values come from the rows the test generated, or DuckDB (``ORDER BY``), never from the code under test.
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st_

from healthwatch.schema import SORT_KEYS, TABLES
from healthwatch.store import StoreWriter
from healthwatch.store.merge import (
    SERIES_KEYS,
    _merge_uniform,
    dictionary_columns,
    memory_schema,
    merge_tables,
    sort_table,
)
from healthwatch.store.segments import list_segments, table_dir

METRICS = ("resid_rms", "wgrad_norm", "maxvio")


def _flush(first: int, steps: int, layers: int, rng: np.random.Generator, metrics: tuple[str, ...] = METRICS) -> pa.Table:
    """One Monitor-shaped flush of ``layer_stats``: step by step, each step every metric's layers."""
    per = len(metrics) * layers
    st = np.arange(first, first + steps, dtype=np.int64)
    return pa.Table.from_arrays([
        pa.array(np.ones(steps * per, dtype=np.int32)),
        pa.array(np.repeat(st, per)),
        pa.array(np.repeat((st + 1) * 64, per)),
        pa.array(np.tile(np.arange(layers, dtype=np.int32), steps * len(metrics))),
        pa.DictionaryArray.from_arrays(pa.array(np.tile(np.arange(layers, dtype=np.int32) % 2, steps * len(metrics))),
                                       pa.array(["moe", "mamba"])),
        pa.DictionaryArray.from_arrays(pa.array(np.tile(np.repeat(np.arange(len(metrics), dtype=np.int32), layers), steps)),
                                       pa.array(list(metrics))),
        pa.array(rng.normal(size=steps * per)),
    ], names=TABLES["layer_stats"].names)


def _rows(t: pa.Table, table: str = "layer_stats") -> list[tuple]:
    return sorted(tuple(r.values()) for r in t.select(TABLES[table].names).cast(TABLES[table]).to_pylist())


def _duck_sorted(t: pa.Table, table: str) -> list[tuple]:
    con = duckdb.connect()
    con.register("t", t.select(TABLES[table].names).cast(TABLES[table]))
    return con.sql(f"SELECT * FROM t ORDER BY {', '.join(SORT_KEYS[table])}").fetchall()


def test_segments_have_required_columns_and_read_back_every_row(tmp_path: Path) -> None:
    """Every file the writer publishes (flushes, merges, the sealed segment, rollups) declares the
    columns without NULLs REQUIRED and holds exactly the rows written; a column with a NULL stays
    OPTIONAL and its NULL reads back as NULL, through pyarrow and DuckDB."""
    rng = np.random.default_rng(7)
    w = StoreWriter(tmp_path, "r", merge_fanout=2, seal_rows=400)
    written = []
    for i in range(12):
        t = _flush(i * 10, 10, 4, rng)
        w.write("layer_stats", t)
        w.compact_own("layer_stats")
        written.append(t)
    # A producer other than the Monitor may send a NULL value: that file keeps the column optional.
    holey = _flush(120, 10, 4, rng)
    holey = holey.set_column(6, "value", pa.array([None] + holey.column("value").to_pylist()[1:], pa.float64()))
    w.write("layer_stats", holey)
    written.append(holey)
    w.close()
    files = list_segments(table_dir(tmp_path, "layer_stats", "r"))
    assert len(files) >= 2 and any("-L" in f.name and not f.name.endswith("-L0.parquet") for f in files)
    nulls_seen = 0
    for f in files:
        schema = pq.read_schema(f)
        data = pq.read_table(f)
        for field in schema:
            has_null = data.column(field.name).null_count > 0
            assert field.nullable == has_null, (f.name, field.name)
            nulls_seen += has_null
    assert nulls_seen == 1
    got = pa.concat_tables([pq.read_table(f).cast(TABLES["layer_stats"]) for f in files])
    assert _rows(got) == _rows(pa.concat_tables([t.cast(TABLES["layer_stats"]) for t in written]))
    con = duckdb.connect()
    listed = ", ".join(f"'{f}'" for f in files)
    n, null_values = con.sql(f"SELECT count(*), count(*) - count(value) FROM read_parquet([{listed}], "
                             "union_by_name = true)").fetchall()[0]
    assert (n, null_values) == (13 * 10 * 4 * len(METRICS), 1)
    for f in list_segments(table_dir(tmp_path, "layer_stats_rollup", "r")):
        assert not any(field.nullable for field in pq.read_schema(f))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layers=st_.integers(1, 5), steps=st_.integers(1, 12), flushes=st_.integers(2, 6),
       gap=st_.integers(0, 3), seed=st_.integers(0, 2**31 - 1))
def test_merge_of_one_layout_equals_sql_order(layers: int, steps: int, flushes: int, gap: int, seed: int) -> None:
    """Flushes with one series layout (the Monitor's) merge by reshaping, and the result is DuckDB's
    ORDER BY of all their rows; scalars too."""
    rng = np.random.default_rng(seed)
    parts = [sort_table(dictionary_columns(_flush(i * (steps + gap), steps, layers, rng)).cast(memory_schema("layer_stats")),
                        "layer_stats") for i in range(flushes)]
    keys = SORT_KEYS["layer_stats"][:SERIES_KEYS["layer_stats"]]
    assert _merge_uniform(parts, keys, "step") is not None  # the reshaping path is the one tested here
    merged = merge_tables(parts, "layer_stats")
    assert [tuple(r.values()) for r in merged.cast(TABLES["layer_stats"]).to_pylist()] == \
        _duck_sorted(pa.concat_tables(parts).unify_dictionaries(), "layer_stats")
    names = ["loss/train", "loss/mtp_1"]
    sc = [sort_table(dictionary_columns(pa.table({
        "attempt": pa.array([1] * steps * len(names), pa.int32()),
        "step": pa.array([s for s in range(i * steps, (i + 1) * steps) for _ in names], pa.int64()),
        "tokens": pa.array([s * 8 for s in range(i * steps, (i + 1) * steps) for _ in names], pa.int64()),
        "name": names * steps, "value": rng.normal(size=steps * len(names)),
        "wall_time": rng.normal(size=steps * len(names))})).cast(memory_schema("scalars")), "scalars") for i in range(flushes)]
    assert [tuple(r.values()) for r in merge_tables(sc, "scalars").cast(TABLES["scalars"]).to_pylist()] == \
        _duck_sorted(pa.concat_tables(sc).unify_dictionaries(), "scalars")


def test_merge_of_different_layouts_takes_the_general_path() -> None:
    """A flush missing a series, a flush with another dictionary, or steps that go back at a seam:
    no reshaping, and the merge is still DuckDB's order."""
    rng = np.random.default_rng(3)
    keys = SORT_KEYS["layer_stats"][:SERIES_KEYS["layer_stats"]]

    def prep(t: pa.Table) -> pa.Table:
        return sort_table(dictionary_columns(t).cast(memory_schema("layer_stats")), "layer_stats")

    a = prep(_flush(0, 5, 3, rng))
    cases = {
        "missing series": prep(_flush(5, 5, 2, rng)),
        "other dictionary": prep(_flush(5, 5, 3, rng, metrics=("a", "b", "c"))),
        "steps go back": prep(_flush(2, 5, 3, rng)),
    }
    for label, b in cases.items():
        assert _merge_uniform([a, b], keys, "step") is None, label
        merged = merge_tables([a, b], "layer_stats")
        got = [tuple(r.values()) for r in merged.cast(TABLES["layer_stats"]).to_pylist()]
        expected = _duck_sorted(pa.concat_tables([a, b]).unify_dictionaries(), "layer_stats")
        # rows tie on every sort key where steps go back (two values at one step): compare as sets there
        assert (sorted(got, key=str) == sorted(expected, key=str)) if label == "steps go back" else got == expected, label
