"""Rollup extremes break ties one way everywhere, whatever order the rows come in.

A bucket whose extreme value occurs several times (equal finite maxima, several NaN, several
±Inf) records the earliest step of that value (smallest ``(step, tokens)``), and NaN orders above
+Inf (healthwatch/store/rollup.py, docs/store.md). The producers checked here against an
independent NumPy computation over the generated rows, with the rows fed in shuffled orders:
the SQL rollup (``rollup_select``, which compaction runs), the writer's live accumulator
(``RollupAccumulator``, partial rows combined by ``combine_select``), the real ``StoreWriter``
with live rollups, and ``compact_store``'s rollup backfill of a store written without them.
"""

from __future__ import annotations

import math
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from healthwatch.schema import TABLES
from healthwatch.store import StoreWriter, compact_store
from healthwatch.store.compact import END_EVENT
from healthwatch.store.rollup import RollupAccumulator, combine_select, rollup_select
from healthwatch.store.segments import list_segments, table_dir

STEPS = 2_500  # 100-step buckets 0..24, 1,000-step buckets 0..2, one 10,000-step bucket
LAYERS = 2
SIZES = (100, 1_000, 10_000)
EXTREMES = ("vmin", "step_vmin", "tokens_vmin", "vmax", "step_vmax", "tokens_vmax")


def _tokens(step: np.ndarray) -> np.ndarray:
    return step * 64 + 7


def _values(rng: np.random.Generator) -> dict[int, np.ndarray]:
    """Per layer, one value per step, full of ties: small integers (equal finite minima and
    maxima in every bucket), a few NaN or ±Inf in some buckets, an all-NaN bucket, a constant one."""
    out = {}
    for layer in range(LAYERS):
        v = rng.integers(0, 3, STEPS).astype(np.float64)
        for b in range(STEPS // 100):
            lo = b * 100
            at = lo + rng.choice(100, 4, replace=False)
            if b % 4 == 1:
                v[at[:2]] = math.nan
            elif b % 4 == 2:
                v[at[:2]] = math.inf
                v[at[2:]] = -math.inf
            elif b % 4 == 3:
                v[at[:3]] = math.nan
                v[at[3]] = math.inf
        v[700 + 100 * layer: 800 + 100 * layer] = math.nan  # every value NaN: min and max are NaN
        v[1_900:2_000] = 1.0  # constant: min and max at the bucket's first step
        out[layer] = v
    return out


def _rows(values: dict[int, np.ndarray], order: np.ndarray) -> pa.Table:
    """The rows of ``values`` (metric ``m``, attempt 1) in the row order ``order``."""
    step = np.tile(np.arange(STEPS, dtype=np.int64), LAYERS)
    layer = np.repeat(np.arange(LAYERS, dtype=np.int32), STEPS)
    value = np.concatenate([values[i] for i in range(LAYERS)])
    step, layer, value = step[order], layer[order], value[order]
    n = step.size
    cols = {"attempt": np.ones(n, dtype=np.int32), "step": step, "tokens": _tokens(step), "layer": layer,
            "layer_type": ["moe"] * n, "metric": ["m"] * n, "value": value}
    schema = TABLES["layer_stats"]
    return pa.Table.from_arrays([pa.array(cols[f.name], f.type) for f in schema], schema=schema)


def _expected(values: dict[int, np.ndarray]) -> dict[tuple[int, int, int], dict[str, float]]:
    """Independent NumPy answer per (bucket_size, bucket, layer): NaN above +Inf, earliest step."""
    out = {}
    for layer, v in values.items():
        for size in SIZES:
            for b in range(-(-STEPS // size)):
                steps = np.arange(b * size, min((b + 1) * size, STEPS))
                x = v[steps]
                nan = np.isnan(x)
                if nan.any():  # NaN is the largest value
                    vmax, smax = math.nan, int(steps[nan][0])
                else:
                    vmax = float(x.max())
                    smax = int(steps[x == vmax][0])
                if nan.all():  # the smallest value is NaN only when there is nothing else
                    vmin, smin = math.nan, int(steps[0])
                else:
                    vmin = float(np.nanmin(x))
                    smin = int(steps[x == vmin][0])
                out[(size, b, layer)] = {"vmin": vmin, "step_vmin": smin, "tokens_vmin": int(_tokens(np.int64(smin))),
                                         "vmax": vmax, "step_vmax": smax, "tokens_vmax": int(_tokens(np.int64(smax)))}
    return out


def _extremes(rollup_rows: pa.Table, combine: bool) -> dict[tuple[int, int, int], dict[str, float]]:
    """Extremes per (bucket_size, bucket, layer) of rollup rows (partial rows combined first)."""
    con = duckdb.connect()
    con.register("r", rollup_rows)
    sql = combine_select("layer_stats", "r") if combine else "SELECT * FROM r"
    out: dict[tuple[int, int, int], dict[str, float]] = {}
    for row in con.sql(sql).to_arrow_table().to_pylist():
        key = (row["bucket_size"], row["bucket"], row["layer"])
        assert key not in out, f"two rollup rows for {key}"
        out[key] = {c: row[c] for c in EXTREMES}
    return out


def _check(got: dict, expected: dict, what: str) -> None:
    assert got.keys() == expected.keys(), what
    bad = []
    for key, exp in expected.items():
        for col, want in exp.items():
            have = got[key][col]
            same = (math.isnan(have) and math.isnan(want)) if isinstance(want, float) and math.isnan(want) else have == want
            if not same:
                bad.append(f"{key} {col}: got {have}, expected {want}")
    assert not bad, f"{what}: {len(bad)} mismatches, e.g. {bad[:5]}"


def _data(seed: int) -> tuple[dict[int, np.ndarray], dict]:
    values = _values(np.random.default_rng(seed))
    expected = _expected(values)
    # The data really has ties: most 100-step buckets hold their extreme more than once.
    tied = sum(int(np.sum(values[0][b * 100:(b + 1) * 100] == 2.0) > 1) for b in range(STEPS // 100))
    assert tied >= 10
    return values, expected


def _shuffles(seed: int, n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed + 1)
    total = STEPS * LAYERS
    return [np.arange(total)[::-1], *(rng.permutation(total) for _ in range(n))]


@pytest.mark.parametrize("seed", [0, 1])
def test_sql_rollup_ties_are_order_independent(seed: int) -> None:
    """``rollup_select`` (compaction's rollups) over the same rows in shuffled orders, as one table
    and as several partial tables combined by ``combine_select``, equals the NumPy answer."""
    values, expected = _data(seed)
    for order in _shuffles(seed, 3):
        rows = _rows(values, order)
        con = duckdb.connect()
        con.register("raw", rows)
        union = " UNION ALL ".join(f"({rollup_select('layer_stats', 'raw', s)})" for s in SIZES)
        _check(_extremes(con.sql(union).to_arrow_table(), combine=False), expected, "rollup_select")
        # Partial rollups of interleaved, overlapping chunks (as late rows and merges make), combined.
        parts = []
        for i, chunk in enumerate(np.array_split(np.arange(rows.num_rows), 5)):
            con.register(f"c{i}", rows.take(pa.array(chunk)))
            parts += [con.sql(rollup_select("layer_stats", f"c{i}", s)).to_arrow_table() for s in SIZES]
        _check(_extremes(pa.concat_tables(parts), combine=True), expected, "combine_select of partials")


@pytest.mark.parametrize("seed", [0, 1])
def test_live_accumulator_ties_equal_sql_and_numpy(seed: int) -> None:
    """The writer's ``RollupAccumulator`` fed the rows in shuffled batches (buckets closed, then
    late rows for them) gives, once its partial rows are combined, the NumPy answer; its own
    coarse rows (1,000/10,000 steps, combined in NumPy) need no SQL combine when one row a bucket."""
    values, expected = _data(seed)
    for order in _shuffles(seed, 3):
        rows = _rows(values, order)
        acc = RollupAccumulator("layer_stats", SIZES)
        out = []
        for chunk in np.array_split(np.arange(rows.num_rows), 7):
            got = acc.add(rows.take(pa.array(chunk)))
            if got is not None:
                out.append(got)
        rest = acc.drain()
        if rest is not None:
            out.append(rest)
        _check(_extremes(pa.concat_tables(out), combine=True), expected, "RollupAccumulator")


def _rollup_files(root: Path) -> pa.Table:
    files = list_segments(table_dir(root, "layer_stats_rollup", "r"))
    assert files, "no rollup segment written"
    return pa.concat_tables([pq.read_table(f, schema=TABLES["layer_stats_rollup"]) for f in files])


def test_writer_and_compaction_rollups_agree_on_ties(tmp_path: Path) -> None:
    """A real ``StoreWriter`` with live rollups and ``compact_store``'s rollup backfill (a store
    written without rollups), each fed the same rows in a different shuffled order, publish
    rollups whose extremes equal the NumPy answer."""
    values, expected = _data(3)
    live_order, later_order = _shuffles(3, 2)[1:]
    for name, order, live in (("live", live_order, True), ("compacted", later_order, False)):
        root = tmp_path / name
        rows = _rows(values, order)
        w = StoreWriter(root, "r", attempt=1, rollups=live)
        for chunk in np.array_split(np.arange(rows.num_rows), 6):
            w.write("layer_stats", rows.take(pa.array(chunk)))
        # The attempt's end event, as Monitor.close() writes it: compaction backfills ended attempts.
        w.write("events", {"attempt": [1], "step": [STEPS - 1], "tokens": [int(_tokens(np.int64(STEPS - 1)))],
                           "kind": [END_EVENT], "message": [""], "wall_time": [0.0]})
        w.close()
        if not live:
            compact_store(root)
        _check(_extremes(_rollup_files(root), combine=True), expected, f"{name} store rollups")
