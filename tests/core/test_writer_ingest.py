"""The live writer's cheaper ingest (issue 15): the step-major sort from a cached pattern, sealed
segments in their own encoding, the sealing merge from memory, and crashes in the middle of it.

Expected values come from DuckDB (``ORDER BY``, counts) or from the rows the test generated,
never from the code under test.
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

import healthwatch.store.writer as writer_mod
from healthwatch.schema import SORT_KEYS, TABLES
from healthwatch.store import StoreWriter
from healthwatch.store.merge import dictionary_columns, sort_table
from healthwatch.store.segments import list_segments, parse_segment, table_dir


def _step_major(steps: list[int], pattern: list[tuple[str, int]], rng: np.random.Generator,
                attempt: int = 1, metric_words: list[str] | None = None) -> pa.Table:
    """Rows step by step, each step the series of ``pattern`` in that order (the Monitor's layout);
    ``metric_words``: the metric column's dictionary (its order, repeats allowed)."""
    n = len(steps) * len(pattern)
    metrics = [m for _ in steps for m, _lay in pattern]
    words = metric_words or list(dict.fromkeys(m for m, _ in pattern))
    idx = [words.index(m) for m in metrics]
    return pa.Table.from_arrays([
        pa.array([attempt] * n, pa.int32()),
        pa.array([s for s in steps for _ in pattern], pa.int64()),
        pa.array([s * 11 for s in steps for _ in pattern], pa.int64()),
        pa.array([lay for _ in steps for _m, lay in pattern], pa.int32()),
        pa.DictionaryArray.from_arrays(pa.array([lay % 2 for _ in steps for _m, lay in pattern], pa.int32()),
                                       pa.array(["moe", "mamba"])),
        pa.DictionaryArray.from_arrays(pa.array(idx, pa.int32()), pa.array(words)),
        pa.array(rng.normal(size=n)),
    ], names=TABLES["layer_stats"].names)


def _plain(t: pa.Table) -> pa.Table:
    return t.select(TABLES["layer_stats"].names).cast(TABLES["layer_stats"])


def _duck_order(t: pa.Table) -> list[tuple]:
    con = duckdb.connect()
    con.register("t", _plain(t))
    return con.sql(f"SELECT metric, layer, step, attempt, value FROM t ORDER BY {', '.join(SORT_KEYS['layer_stats'])}, value").fetchall()


def _keys_and_values(t: pa.Table) -> tuple[list[tuple], list[tuple]]:
    rows = [(r["metric"], r["layer"], r["step"], r["attempt"], r["value"]) for r in _plain(t).to_pylist()]
    return [r[:4] for r in rows], sorted(rows)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st_.integers(0, 2**31 - 1), n_steps=st_.integers(1, 12), layers=st_.integers(1, 5),
       twist=st_.sampled_from(["none", "other_pattern", "duplicate", "descending", "attempt_varies", "words"]))
def test_step_major_sort_equals_sql_order(seed: int, n_steps: int, layers: int, twist: str) -> None:
    """A step-major flush (the cached-pattern sort) and layouts that only look like one (another
    pattern in one step, a series twice, steps going back, attempts varying within a step, a
    dictionary in another order) all sort as DuckDB's ORDER BY sorts them."""
    rng = np.random.default_rng(seed)
    pattern = [(m, lay) for m in ("wgrad", "resid", "alpha") for lay in range(layers)]
    rng.shuffle(pattern)
    pattern = [(str(m), int(lay)) for m, lay in pattern]
    steps = list(range(100, 100 + n_steps))
    t = _step_major(steps, pattern, rng)
    if twist == "other_pattern" and n_steps > 1:
        t2 = _step_major(steps[-1:], pattern[::-1], rng)
        t = pa.concat_tables([_step_major(steps[:-1], pattern, rng), t2]).combine_chunks().unify_dictionaries()
    elif twist == "duplicate":
        t = _step_major(steps, pattern + pattern[:1], rng)
    elif twist == "descending":
        t = _step_major(steps[::-1], pattern, rng)
    elif twist == "attempt_varies" and n_steps > 1:
        att = np.ones(t.num_rows, dtype=np.int32)
        att[:: max(1, len(pattern) - 1)] = 2
        t = t.set_column(0, "attempt", pa.array(att))
    elif twist == "words":
        t = _step_major(steps, pattern, rng, metric_words=["resid", "wgrad", "alpha", "resid"])
    for _ in range(2):  # the second sort of the same layout takes the cached pattern
        got = sort_table(dictionary_columns(t), "layer_stats")
        expected = _duck_order(t)
        keys, values = _keys_and_values(got)
        assert keys == [r[:4] for r in expected]
        assert values == sorted(expected)


def test_repeated_dictionary_words_are_stored_dictionary_encoded(tmp_path: Path) -> None:
    """A producer's dictionary that repeats a word (Parquet would store the column plain) is
    rewritten with distinct words: the segment's column is dictionary-encoded, the strings the same."""
    rng = np.random.default_rng(3)
    pattern = [("m", lay) for lay in range(6)]
    t = _step_major(list(range(10)), pattern, rng)
    types = ["moe", "mamba", "moe", "attention", "moe", "mamba"]  # 3 distinct words, 6 entries
    t = t.set_column(4, "layer_type", pa.DictionaryArray.from_arrays(
        pa.array([i for _ in range(10) for i in range(6)], pa.int32()), pa.array(types)))
    w = StoreWriter(tmp_path / "s", "r")
    path = w.write("layer_stats", t)
    assert path is not None
    meta = pq.ParquetFile(path).metadata
    col = [meta.row_group(0).column(i) for i in range(meta.num_columns)
           if meta.row_group(0).column(i).path_in_schema == "layer_type"][0]
    assert any("DICTIONARY" in e for e in col.encodings), col.encodings
    back = pq.read_table(path).to_pylist()
    assert sorted((r["layer"], r["step"], r["layer_type"]) for r in back) == sorted(
        (lay, s, types[lay]) for s in range(10) for lay in range(6))


def _flushes(n: int, steps: int, layers: int, seed: int = 0) -> list[pa.Table]:
    rng = np.random.default_rng(seed)
    pattern = [(m, lay) for m in ("resid", "wgrad") for lay in range(layers)]
    return [_step_major(list(range(i * steps, (i + 1) * steps)), pattern, rng) for i in range(n)]


def _seen(root: Path) -> tuple[int, int]:
    """(rows, distinct (metric, layer, step)) of the run's live segments, as a reader lists them."""
    files = [str(p) for p in list_segments(table_dir(root, "layer_stats", "r"))]
    con = duckdb.connect()
    return con.sql(f"SELECT count(*), count(DISTINCT (metric, layer, step)) FROM read_parquet({files})").fetchall()[0]


def test_sealed_segment_layout_and_content(tmp_path: Path) -> None:
    """Fan-out 2, seal at 400 rows: the sealed segment holds every row once, sorted as DuckDB
    sorts them, with key statistics, raw pages and delta-encoded step/tokens; it reads back with
    the table's plain types."""
    root = tmp_path / "s"
    w = StoreWriter(root, "r", merge_fanout=2, seal_rows=400, rollups=False)
    flushes = _flushes(8, 10, 3)  # 60 rows a flush: L1 120, L2 240, L3 480 (sealed)
    for t in flushes:
        w.write("layer_stats", t)
        w.compact_own("layer_stats")
    files = list_segments(table_dir(root, "layer_stats", "r"))
    assert [parse_segment(p).level for p in files] == [3]
    pf = pq.ParquetFile(files[0])
    md = pf.metadata
    chunks = {md.row_group(0).column(i).path_in_schema: md.row_group(0).column(i) for i in range(md.num_columns)}
    assert all(c.compression == "UNCOMPRESSED" for c in chunks.values())
    for name in ("step", "tokens"):
        assert "DELTA_BINARY_PACKED" in chunks[name].encodings, chunks[name].encodings
    for name in ("metric", "layer", "step", "attempt"):
        assert chunks[name].is_stats_set and chunks[name].statistics.has_min_max, name
    assert pf.schema_arrow.field("metric").type == pa.string()
    data = pq.read_table(files[0])
    all_rows = pa.concat_tables([_plain(t) for t in flushes])
    assert [(r["metric"], r["layer"], r["step"], r["attempt"], r["value"]) for r in data.to_pylist()] == _duck_order(all_rows)
    assert _seen(root) == (all_rows.num_rows, all_rows.num_rows)


def test_sealing_merge_reads_nothing_back_and_keeps_no_sealed_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the default cache, merging up to the sealed level reads no segment back from disk, and
    the rows kept in memory afterwards are those of the unsealed segments only."""
    def refuse(*_a: object, **_k: object) -> pa.Table:
        raise AssertionError("a merge read a segment back")

    monkeypatch.setattr(writer_mod, "read_segment", refuse)
    root = tmp_path / "s"
    w = StoreWriter(root, "r", merge_fanout=2, seal_rows=400, rollups=False)
    for t in _flushes(9, 10, 3):
        w.write("layer_stats", t)
        w.compact_own("layer_stats")
    levels = sorted(parse_segment(p).level for p in list_segments(table_dir(root, "layer_stats", "r")))
    assert levels == [0, 3]
    assert w._cached == 60  # the one L0 flush; the sealed 480 rows are not held


@pytest.mark.parametrize("where", ["writing", "after_rename"])
def test_crash_in_the_sealing_merge_loses_and_doubles_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             where: str) -> None:
    """The sealing merge fails while writing its target, or dies right after publishing it (before
    retiring its sources): readers see every row exactly once, no partial file is left, and a
    later merge (a fresh writer's recovery for the second case) finishes the job."""
    root = tmp_path / "s"
    w = StoreWriter(root, "r", merge_fanout=2, seal_rows=400, rollups=False)
    flushes = _flushes(8, 10, 3)
    total = sum(t.num_rows for t in flushes)
    real_write = writer_mod.write_parquet
    real_delete = writer_mod._fs.FS.delete if where == "after_rename" else None

    class Died(Exception):
        pass

    def failing_write(table: pa.Table, where_: object, name: str, compress: bool = True) -> None:
        if compress:
            real_write(table, where_, name, compress)  # the target is written, then the process "dies"
            raise Died("killed while writing the sealed segment")
        real_write(table, where_, name, compress)

    calls = {"n": 0}

    def dying_delete(path: str) -> bool:
        if not str(path).endswith("-L2.parquet"):  # other merges of the cascade, the lock: as usual
            assert real_delete is not None
            return real_delete(path)
        calls["n"] += 1
        raise Died("killed after the sealed target was renamed into place")

    if where == "writing":
        monkeypatch.setattr(writer_mod, "write_parquet", failing_write)
    for i, t in enumerate(flushes):
        w.write("layer_stats", t)
        if i == len(flushes) - 1 and where == "after_rename":
            monkeypatch.setattr(writer_mod._fs.FS, "delete", dying_delete)
        try:
            w.compact_own("layer_stats")
        except Died:
            assert i == len(flushes) - 1  # only the sealing merge (the last one) fails
    monkeypatch.undo()
    d = table_dir(root, "layer_stats", "r")
    assert not list(d.glob(".tmp-*")), "a partial merge target was left behind"
    assert _seen(root) == (total, total)
    if where == "after_rename":
        assert calls["n"] == 1
        assert real_delete is not None
        # A new writer of the run (the restarted trainer) recovers under the lock: sources retired.
        w2 = StoreWriter(root, "r", attempt=2, merge_fanout=2, seal_rows=400, rollups=False)
        w2.write("layer_stats", _flushes(1, 10, 3, seed=9)[0].set_column(
            0, "attempt", pa.array([2] * 60, pa.int32())))
        from healthwatch.store.segments import merge_lock, recover_directory

        with merge_lock(d, blocking=True):
            recover_directory(d)
        assert _seen(root)[0] == total + 60
    else:
        w.compact_own("layer_stats")  # the next flush's merge seals what the failed one left
        assert [parse_segment(p).level for p in list_segments(d)] == [3]
        assert _seen(root) == (total, total)


def test_monitor_layout_of_the_benchmark_is_the_row_builders() -> None:
    """The ingest benchmark's Monitor-layout flush has the rows, order and dictionaries of what
    ``RowBuilder.layers`` builds from the same values."""
    from benchmarks.bench_ingest import LAYERS, METRICS, TYPES, monitor_flush
    from healthwatch.hooks.rows import RowBuilder

    scalars, table = monitor_flush(300, steps=4, layers=LAYERS)
    rb = RowBuilder(attempt=1)
    per = len(METRICS) * LAYERS
    values = table.column("value").to_numpy()
    for i, step in enumerate(range(300, 304)):
        for m, metric in enumerate(METRICS):
            lo = i * per + m * LAYERS
            rb.layer_block(step, (step + 1) << 20, list(range(LAYERS)), [TYPES[j % len(TYPES)] for j in range(LAYERS)],
                           metric, values[lo: lo + LAYERS])
    built = rb.layers
    assert built.schema.equals(table.schema)
    assert built.equals(table)
    assert len(scalars["step"]) == 4 * 3 and all(not math.isnan(v) for v in scalars["value"])
