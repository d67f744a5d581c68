"""Rollups: per-bucket min/max/mean/last of ``scalars`` and ``layer_stats``, per attempt.

A rollup row summarises the rows of ONE attempt of a run in one bucket of ``bucket_size`` steps
(100, 1,000 or 10,000). Several rows of the same (attempt, bucket, key) are partial summaries of
disjoint rows and combine exactly (min of minima, max of maxima, count-weighted mean, last by
``step_max``; the step and tokens of the minimum and maximum follow them), so the writer can publish a bucket's rows as they close and a late row as a small
extra partial, and merging rollup segments is a plain union of rows.

Because a row belongs to one attempt and records its ``step_max``, the reader decides exactly
which rollup rows a rollback supersedes (see :mod:`healthwatch.query.rollups`): nothing here
depends on the order of writes, merges, compactions and rollbacks.

Coverage: an attempt's rollups at one level cover every bucket below its highest rolled-up
bucket + 1 (the writer closes buckets in step order); rows after that are read raw.
"""

from __future__ import annotations

from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from healthwatch.schema import TABLES
from healthwatch.store.meta import ROLLUP_BUCKETS

#: Tables that get rollups, with their key columns (besides ``attempt``).
ROLLUP_KEYS: dict[str, tuple[str, ...]] = {"layer_stats": ("metric", "layer"), "scalars": ("name",)}


def _project(table: str) -> str:
    """The rollup columns, in schema order, from an inner query with ``pmin``/``pmax`` structs."""
    cols = []
    for name in TABLES[f"{table}_rollup"].names:
        cols.append({"step_vmin": "pmin.s AS step_vmin", "tokens_vmin": "pmin.t AS tokens_vmin",
                     "step_vmax": "pmax.s AS step_vmax", "tokens_vmax": "pmax.t AS tokens_vmax"}.get(name, name))
    return ", ".join(cols)


def rollup_select(table: str, source: str, size: int) -> str:
    """SQL rolling up ``source`` (rows of ``table``) into buckets of ``size`` steps, per attempt.

    Each bucket also keeps where its minimum and maximum are (step and tokens of one row each),
    so a downsampled chart read from rollups draws a spike at its own step.
    """
    if table == "layer_stats":
        keys, extra = "metric, layer", ", any_value(layer_type) AS layer_type"
    else:
        keys, extra = "name", ""
    inner = (
        f"SELECT {int(size)}::BIGINT AS bucket_size, (step // {int(size)})::BIGINT AS bucket, attempt, {keys}{extra}, "
        "min(step) AS step_min, max(step) AS step_max, min(tokens) AS tokens_min, max(tokens) AS tokens_max, "
        "count(*)::BIGINT AS n, min(value) AS vmin, max(value) AS vmax, avg(value) AS vmean, "
        "arg_max(value, step) AS vlast, arg_min({'s': step, 't': tokens}, value) AS pmin, "
        "arg_max({'s': step, 't': tokens}, value) AS pmax "
        f"FROM {source} GROUP BY bucket, attempt, {keys}"
    )
    return f"SELECT {_project(table)} FROM ({inner})"


def combine_select(table: str, source: str) -> str:
    """SQL combining partial rollup rows of ``source`` per (bucket_size, bucket, attempt, key) exactly."""
    keys = "metric, layer" if table == "layer_stats" else "name"
    extra = ", any_value(layer_type) AS layer_type" if table == "layer_stats" else ""
    inner = (
        f"SELECT bucket_size, bucket, attempt, {keys}{extra}, min(step_min) AS step_min, max(step_max) AS step_max, "
        "min(tokens_min) AS tokens_min, max(tokens_max) AS tokens_max, sum(n)::BIGINT AS n, min(vmin) AS vmin, "
        "max(vmax) AS vmax, sum(vmean * n) / sum(n) AS vmean, arg_max(vlast, step_max) AS vlast, "
        "arg_min({'s': step_vmin, 't': tokens_vmin}, vmin) AS pmin, arg_max({'s': step_vmax, 't': tokens_vmax}, vmax) AS pmax "
        f"FROM {source} GROUP BY bucket_size, bucket, attempt, {keys}"
    )
    return f"SELECT {_project(table)} FROM ({inner})"


class RollupAccumulator:
    """The writer's running rollups of one table: open buckets in memory, closed ones to publish.

    :meth:`add` takes each batch of rows as it is written and returns the rollup rows of the
    buckets that closed (a row at or beyond a bucket's end was seen) plus partials for rows that
    arrived for already closed buckets; :meth:`drain` returns every open bucket (at close).
    """

    def __init__(self, table: str, sizes: tuple[int, ...] = ROLLUP_BUCKETS) -> None:
        if table not in ROLLUP_KEYS:
            raise ValueError(f"no rollups for table {table!r} (only {sorted(ROLLUP_KEYS)})")
        self.table = table
        self.rtable = f"{table}_rollup"
        self.sizes = tuple(sorted(sizes))
        self.schema = TABLES[self.rtable]
        self._open: pa.Table | None = None  # partial rows of open buckets
        self._high = -1  # highest step seen: buckets ending at or below it are closed
        self._pending: list[pa.Table] = []  # batches not folded in yet (no bucket closed since)
        self._con = duckdb.connect()

    def add(self, rows: pa.Table) -> pa.Table | None:
        """Fold ``rows`` (a batch of ``table``) in; returns the rollup rows to publish now, or None.

        Batches are kept as they come until one closes a bucket of the finest size (or holds rows
        of an already closed bucket, which must be published with it): frequent small flushes
        then cost one aggregation per 100 steps, not one per flush.
        """
        if rows.num_rows == 0:
            return None
        lo = int(pc.min(rows["step"]).as_py())
        hi = int(pc.max(rows["step"]).as_py())
        size = self.sizes[0]
        closed_before = (self._high + 1) // size * size  # steps below this are in closed buckets
        self._pending.append(rows)
        if lo >= closed_before and (hi + 1) // size * size <= closed_before:
            self._high = max(self._high, hi)
            return None
        batch = pa.concat_tables(self._pending) if len(self._pending) > 1 else self._pending[0]
        self._pending = []
        return self._fold(batch)

    def _fold(self, rows: pa.Table) -> pa.Table | None:
        con = self._con
        con.register("batch", rows)
        cols = ", ".join(self.schema.names)
        fresh = " UNION ALL ".join(f"({rollup_select(self.table, 'batch', s)})" for s in self.sizes)
        if self._open is not None and self._open.num_rows:
            # One statement: this batch's buckets combined with the open ones (exact: see the module doc).
            con.register("open_rows", self._open)
            fresh = f"SELECT {cols} FROM open_rows UNION ALL SELECT {cols} FROM ({fresh})"
        combined = con.sql(f"SELECT {cols} FROM ({combine_select(self.table, f'({fresh})')})").to_arrow_table()
        combined = combined.cast(self.schema)
        con.unregister("batch")
        if self._open is not None and self._open.num_rows:
            con.unregister("open_rows")
        self._high = max(self._high, int(pc.max(rows["step"]).as_py()))
        closed_mask = pc.less_equal(
            pc.multiply(pc.add(combined["bucket"], 1), combined["bucket_size"]), self._high + 1
        )
        out = combined.filter(closed_mask)
        self._open = combined.filter(pc.invert(closed_mask))
        return out if out.num_rows else None

    def drain(self) -> pa.Table | None:
        """Every open bucket's rows (the attempt ends: its buckets are as complete as they get)."""
        if self._pending:
            batch = pa.concat_tables(self._pending)
            self._pending = []
            closed = self._fold(batch)
            if closed is not None:
                self._open = closed if self._open is None else pa.concat_tables([self._open, closed])
        out, self._open = self._open, None
        return out if out is not None and out.num_rows else None

    def close(self) -> None:
        """Release the accumulator's DuckDB connection."""
        self._con.close()


def describe(row: dict[str, Any]) -> str:
    """A short text for one rollup row (debugging and error messages)."""
    key = row.get("name") or f"{row.get('metric')}[{row.get('layer')}]"
    return f"{key} attempt {row.get('attempt')} bucket {row.get('bucket')}x{row.get('bucket_size')}"
