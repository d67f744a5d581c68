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

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from healthwatch.schema import TABLES
from healthwatch.store.merge import dictionary_columns, group_code, memory_schema, sort_table_code
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


def _first_match(values: np.ndarray, target: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Index of the first element of each group (``starts``/``counts``) equal to the group's
    ``target`` (NaN matches NaN); every group has one, since its target is one of its values."""
    rep = np.repeat(target, counts)
    eq = values == rep
    nan = np.isnan(target)
    if nan.any():
        eq |= np.isnan(values) & np.repeat(nan, counts)
    pos = np.flatnonzero(eq)
    grp = np.searchsorted(starts, pos, side="right") - 1
    first = np.ones(pos.size, dtype=bool)
    first[1:] = grp[1:] != grp[:-1]
    return pos[first]


def _np(table: pa.Table, name: str) -> np.ndarray:
    col = table.column(name)
    if pa.types.is_floating(col.type) and col.null_count:
        col = pc.fill_null(col, float("nan"))
    return col.to_numpy()


def _partials(table: str, keys: pa.Table, bucket_size: int | np.ndarray, cols: dict[str, np.ndarray]) -> pa.Table:
    """A table of partial rollup rows (the writer's in-memory schema) from key rows and arrays."""
    schema = memory_schema(f"{table}_rollup")
    n = keys.num_rows
    data: dict[str, Any] = dict(cols)
    data["bucket_size"] = np.broadcast_to(np.asarray(bucket_size, dtype=np.int64), (n,))
    for k in (*ROLLUP_KEYS[table], "layer_type", "attempt"):
        if k in keys.column_names:
            data[k] = keys.column(k)
    return pa.Table.from_arrays([pa.array(data[f.name], f.type) if isinstance(data[f.name], np.ndarray)
                                 else data[f.name].cast(f.type) for f in schema], schema=schema)


def rollup_rows(rows: pa.Table, table: str, size: int, presorted: bool = False,
                code: np.ndarray | None = None) -> pa.Table:
    """Partial rollup rows of ``rows`` (rows of ``table``) in buckets of ``size`` steps, per attempt.

    NumPy over the rows sorted by series and step (``presorted`` when the caller sorted them with
    :func:`healthwatch.store.merge.sort_table`; ``code``: their series codes from
    :func:`~healthwatch.store.merge.sort_table_code`): each (series, attempt, bucket) run of rows is one
    partial row. Same values as :func:`rollup_select` in DuckDB: ``min`` ignores NaN unless all are
    NaN, ``max`` is NaN when one is (DuckDB orders NaN above every number), the step and tokens of
    the minimum and maximum are those of their first row in step order, ``last`` is the value at the
    highest step.
    """
    if not presorted:
        rows, code = sort_table_code(dictionary_columns(rows), table)
    n = rows.num_rows
    step, tokens, value, attempt = (_np(rows, c) for c in ("step", "tokens", "value", "attempt"))
    if code is None:
        code, _ = group_code(rows, ROLLUP_KEYS[table])
    bucket = step // size
    brk = np.flatnonzero((code[1:] != code[:-1]) | (bucket[1:] != bucket[:-1]) | (attempt[1:] != attempt[:-1])) + 1
    starts = np.concatenate(([0], brk)).astype(np.int64)
    counts = np.diff(np.concatenate((starts, [n])))
    imin = _first_match(value, np.fmin.reduceat(value, starts), starts, counts)
    imax = _first_match(value, np.maximum.reduceat(value, starts), starts, counts)
    last = starts + counts - 1  # rows ascend by step within a run
    keys = rows.take(starts)
    return _partials(table, keys, size, {
        "bucket": bucket[starts], "step_min": np.minimum.reduceat(step, starts),
        "step_max": np.maximum.reduceat(step, starts), "tokens_min": np.minimum.reduceat(tokens, starts),
        "tokens_max": np.maximum.reduceat(tokens, starts), "n": counts.astype(np.int64),
        "vmin": value[imin], "vmax": value[imax], "vmean": np.add.reduceat(value, starts) / counts,
        "vlast": value[last], "step_vmin": step[imin], "tokens_vmin": tokens[imin],
        "step_vmax": step[imax], "tokens_vmax": tokens[imax],
    })


def combine_rows(parts: pa.Table, table: str) -> pa.Table:
    """Partial rollup rows combined per (bucket_size, bucket, attempt, key), exactly (the NumPy twin
    of :func:`combine_select`): min of minima, max of maxima, count-weighted mean, last by step_max."""
    if parts.num_rows == 0:
        return parts
    code, _ = group_code(parts, ("bucket_size", "bucket", "attempt", *ROLLUP_KEYS[table]))
    smax = _np(parts, "step_max")
    order = np.lexsort((smax, code))
    c = code[order]
    starts = np.concatenate(([0], np.flatnonzero(c[1:] != c[:-1]) + 1)).astype(np.int64)
    counts = np.diff(np.concatenate((starts, [c.size])))
    col = {k: _np(parts, k)[order] for k in ("step_min", "tokens_min", "tokens_max", "n", "vmin", "vmax", "vmean",
                                             "vlast", "step_vmin", "tokens_vmin", "step_vmax", "tokens_vmax")}
    smax = smax[order]
    vmin_t = np.fmin.reduceat(col["vmin"], starts)
    vmax_t = np.maximum.reduceat(col["vmax"], starts)
    imin = _first_match(col["vmin"], vmin_t, starts, counts)
    imax = _first_match(col["vmax"], vmax_t, starts, counts)
    n = np.add.reduceat(col["n"], starts)
    last = starts + counts - 1
    keys = parts.take(order[starts])
    return _partials(table, keys, _np(keys, "bucket_size"), {
        "bucket": _np(keys, "bucket"), "step_min": np.minimum.reduceat(col["step_min"], starts),
        "step_max": smax[last], "tokens_min": np.minimum.reduceat(col["tokens_min"], starts),
        "tokens_max": np.maximum.reduceat(col["tokens_max"], starts), "n": n,
        "vmin": vmin_t, "vmax": vmax_t, "vmean": np.add.reduceat(col["vmean"] * col["n"], starts) / n,
        "vlast": col["vlast"][last], "step_vmin": col["step_vmin"][imin], "tokens_vmin": col["tokens_vmin"][imin],
        "step_vmax": col["step_vmax"][imax], "tokens_vmax": col["tokens_vmax"][imax],
    })


def _with_buckets(parts: pa.Table, size: int) -> pa.Table:
    """Partial rows of a finer bucket size re-labelled with the buckets of ``size`` they fall in."""
    bucket = _np(parts, "bucket") * _np(parts, "bucket_size") // size
    parts = parts.set_column(parts.schema.get_field_index("bucket_size"), "bucket_size",
                             pa.array(np.full(parts.num_rows, size, dtype=np.int64)))
    return parts.set_column(parts.schema.get_field_index("bucket"), "bucket", pa.array(bucket))


_NEVER = 1 << 62


def _first_end(parts: pa.Table, size: int) -> int:
    """The earliest end (exclusive step) of the buckets of ``size`` that rows of ``parts`` fall in."""
    return (int((_np(parts, "bucket") * _np(parts, "bucket_size")).min()) // size + 1) * size


def _closed(parts: pa.Table, size: int, high: int) -> np.ndarray:
    """Which rows of ``parts`` fall in buckets of ``size`` that end at or below step ``high``."""
    return (_np(parts, "bucket") * _np(parts, "bucket_size") // size + 1) * size <= high + 1


class RollupAccumulator:
    """The writer's running rollups of one table: open buckets in memory, closed ones to publish.

    :meth:`add` takes each batch of rows as it is written and returns the rollup rows of the
    buckets that closed (a row at or beyond a bucket's end was seen) plus partials for rows that
    arrived for already closed buckets; :meth:`drain` returns every open bucket (at close).

    NumPy, no DuckDB: a batch is reduced once into partial rows of the finest size; the partial
    rows of each closed bucket wait in the next size's queue, which is combined only when one of
    its buckets closes (every 1,000 steps for the 1,000-step size, or at once for a late row of an
    already closed bucket). A flush costs one pass over its rows and a few small array operations.
    """

    def __init__(self, table: str, sizes: tuple[int, ...] = ROLLUP_BUCKETS) -> None:
        if table not in ROLLUP_KEYS:
            raise ValueError(f"no rollups for table {table!r} (only {sorted(ROLLUP_KEYS)})")
        self.table = table
        self.rtable = f"{table}_rollup"
        self.sizes = tuple(sorted(sizes))
        if not self.sizes or any(b % a for a, b in zip(self.sizes, self.sizes[1:])):
            raise ValueError(f"rollup bucket sizes must each divide the next, got {self.sizes}")
        self.schema = TABLES[self.rtable]
        # Per size: partial rows not combined yet (finest size: of this size; coarser sizes: the
        # closed rows of the size below, to be combined into this size when one of its buckets closes).
        self._queue: list[list[pa.Table]] = [[] for _ in self.sizes]
        self._first_end = [_NEVER for _ in self.sizes]  # per size: the earliest end of a queued row's bucket
        self._high = -1  # highest step seen: buckets ending at or below it are closed
        self._emitted_end = [-1 for _ in self.sizes]  # per size: the latest bucket end returned so far
        self.late = False
        """Whether the last :meth:`add` returned rows for a bucket that had been returned before
        (a late row): publish them at once, or readers of that bucket miss the row."""
        self.coarse = False
        """Whether the last :meth:`add` closed a bucket bigger than the finest size."""

    def add(self, rows: pa.Table, presorted: bool = False, code: np.ndarray | None = None) -> pa.Table | None:
        """Fold ``rows`` (a batch of ``table``) in; returns the rollup rows to publish now, or None.

        ``presorted``: the rows are already sorted by :func:`healthwatch.store.merge.sort_table`
        with dictionary-encoded strings (the writer's segments are), ``code`` their series codes.
        """
        self.late = self.coarse = False
        if rows.num_rows == 0:
            return None
        fine = rollup_rows(rows, self.table, self.sizes[0], presorted=presorted, code=code)
        self._high = max(self._high, int(_np(fine, "step_max").max()))
        out: list[pa.Table] = []
        incoming = fine
        for level, size in enumerate(self.sizes):
            queue = self._queue[level]
            if incoming is not None and incoming.num_rows:
                queue.append(incoming)
                self._first_end[level] = min(self._first_end[level], _first_end(incoming, size))
            incoming = None
            # Combine this size's queue only when one of its buckets closed (at once for a late row).
            if not queue or self._first_end[level] > self._high + 1:
                continue
            if level == 0 and len(queue) == 1:
                combined = queue[0]  # one batch's partials: nothing to combine
            else:
                parts = pa.concat_tables(queue)
                combined = combine_rows(parts if level == 0 else _with_buckets(parts, size), self.table)
            closed = _closed(combined, size, self._high)
            done = combined.filter(pa.array(closed))
            rest = combined.filter(pa.array(~closed))
            self._queue[level] = [rest] if rest.num_rows else []
            self._first_end[level] = _first_end(rest, size) if rest.num_rows else _NEVER
            if done.num_rows:
                ends = (_np(done, "bucket") + 1) * size
                self.late |= int(ends.min()) <= self._emitted_end[level]
                self._emitted_end[level] = max(self._emitted_end[level], int(ends.max()))
                self.coarse |= level > 0
                out.append(done)
            incoming = done
        if not out:
            return None
        return pa.concat_tables(out).cast(self.schema)

    def drain(self) -> pa.Table | None:
        """Every open bucket's rows (the attempt ends: its buckets are as complete as they get)."""
        out: list[pa.Table] = []
        for level, size in enumerate(self.sizes):
            queue = self._queue[level]
            self._queue[level] = []
            self._first_end[level] = _NEVER
            # What the size below still held open also belongs to this size's open buckets.
            below = out[-1] if out else None
            parts = [*queue, below] if below is not None else queue
            if not parts:
                continue
            cat = pa.concat_tables(parts)
            out.append(combine_rows(cat if level == 0 else _with_buckets(cat, size), self.table))
        out = [t for t in out if t.num_rows]
        return pa.concat_tables(out).cast(self.schema) if out else None

    def close(self) -> None:
        """Nothing to release (kept for callers of the DuckDB-based accumulator it replaced)."""


def describe(row: dict[str, Any]) -> str:
    """A short text for one rollup row (debugging and error messages)."""
    key = row.get("name") or f"{row.get('metric')}[{row.get('layer')}]"
    return f"{key} attempt {row.get('attempt')} bucket {row.get('bucket')}x{row.get('bucket_size')}"
