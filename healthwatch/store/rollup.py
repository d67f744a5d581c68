"""Rollups: per-bucket min/max/mean/last of ``scalars`` and ``layer_stats``, per attempt.

A rollup row summarises the rows of ONE attempt of a run in one bucket of ``bucket_size`` steps
(100, 1,000 or 10,000). Several rows of the same (attempt, bucket, key) are partial summaries of
disjoint rows and combine exactly (min of minima, max of maxima, count-weighted mean, last by
``step_max``; the step and tokens of the minimum and maximum follow them), so the writer can publish a bucket's rows as they close and a late row as a small
extra partial, and merging rollup segments is a plain union of rows.

Extremes and ties (one rule for every producer: :func:`rollup_select` for compaction,
:func:`combine_select`, and the writer's :class:`RollupAccumulator`): values are ordered with NaN
above +Inf (DuckDB's order; so ``vmax`` is NaN when the bucket holds a NaN, ``vmin`` only when
every value is NaN); SQL takes a NULL value only when there is nothing else, the writer's
accumulator reads a NULL as NaN (the Monitor never writes NULL values). Among the
rows that share the bucket's extreme value, ``step_vmin``/``tokens_vmin`` and
``step_vmax``/``tokens_vmax`` are those of the one with the smallest ``(step, tokens)``: the
earliest occurrence, whatever order the rows came in. The same rule picks a downsampled series'
points (:mod:`healthwatch.query.series`), so a chart read from rollups places a tied spike where
one read from raw rows does.

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
from healthwatch.store.merge import dictionary_columns, group_code, sort_table_code
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


def _pick(step: str, tokens: str, value: str, step_hi: str = "", tokens_hi: str = "", value_hi: str = "") -> str:
    """``pmin``/``pmax`` structs ``{s, t}`` of a bucket's extremes, ties to the smallest (step, tokens).

    A bare ``arg_min(x, value)`` returns whichever tied row DuckDB's (parallel) aggregation met
    first, so the ordering key carries the tie-break: NULLs last, then the value (NaN above +Inf,
    as DuckDB orders doubles), then the earliest step, then the fewest tokens.
    """
    step_hi, tokens_hi, value_hi = step_hi or step, tokens_hi or tokens, value_hi or value
    return (f"arg_min({{'s': {step}, 't': {tokens}}}, ({value} IS NULL, {value}, {step}, {tokens})) AS pmin, "
            f"arg_max({{'s': {step_hi}, 't': {tokens_hi}}}, "
            f"({value_hi} IS NOT NULL, {value_hi}, -{step_hi}, -{tokens_hi})) AS pmax")


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
        f"arg_max(value, step) AS vlast, {_pick('step', 'tokens', 'value')} "
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
        f"{_pick('step_vmin', 'tokens_vmin', 'vmin', 'step_vmax', 'tokens_vmax', 'vmax')} "
        f"FROM {source} GROUP BY bucket_size, bucket, attempt, {keys}"
    )
    return f"SELECT {_project(table)} FROM ({inner})"


def _first_match(values: np.ndarray, target: np.ndarray, starts: np.ndarray, counts: np.ndarray,
                 step: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """Per group (``starts``/``counts``), the index of the element equal to the group's ``target``
    (NaN matches NaN) with the smallest ``(step, tokens)``: the module's tie rule, independent of
    the order of the rows. Every group has one, since its target is one of its values."""
    rep = np.repeat(target, counts)
    eq = values == rep
    nan = np.isnan(target)
    if nan.any():
        eq |= np.isnan(values) & np.repeat(nan, counts)
    pos = np.flatnonzero(eq)
    grp = np.searchsorted(starts, pos, side="right") - 1
    if pos.size != starts.size:  # some group has a tie: earliest (step, tokens) first within it
        order = np.lexsort((tokens[pos], step[pos], grp))
        pos, grp = pos[order], grp[order]
    first = np.ones(pos.size, dtype=bool)
    first[1:] = grp[1:] != grp[:-1]
    return pos[first]


def _np(table: pa.Table, name: str) -> np.ndarray:
    col = table.column(name)
    if pa.types.is_floating(col.type) and col.null_count:
        col = pc.fill_null(col, float("nan"))
    return col.to_numpy()


#: The value columns of a partial rollup row (everything but the bucket, attempt and series key).
_VALUES = ("step_min", "step_max", "tokens_min", "tokens_max", "n", "vmin", "vmax", "vmean", "vlast",
           "step_vmin", "tokens_vmin", "step_vmax", "tokens_vmax")
_NEVER = 1 << 62


def _cat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return parts[0] if len(parts) == 1 else {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _take(parts: dict[str, np.ndarray], idx: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[idx] for k, v in parts.items()}


def _combine(parts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Partial rows (NumPy columns, series as ids ``sid``) combined per (bucket_size, bucket,
    attempt, sid): the NumPy twin of :func:`combine_select` (min of minima, max of maxima,
    count-weighted mean, last by step_max; the step and tokens of the extremes follow them)."""
    order = np.lexsort((parts["step_max"], parts["sid"], parts["attempt"], parts["bucket"], parts["bucket_size"]))
    p = _take(parts, order)
    change = np.zeros(order.size - 1, dtype=bool)
    for k in ("bucket_size", "bucket", "attempt", "sid"):
        change |= p[k][1:] != p[k][:-1]
    starts = np.concatenate(([0], np.flatnonzero(change) + 1)).astype(np.int64)
    counts = np.diff(np.concatenate((starts, [order.size])))
    last = starts + counts - 1
    vmin = np.fmin.reduceat(p["vmin"], starts)
    vmax = np.maximum.reduceat(p["vmax"], starts)
    imin = _first_match(p["vmin"], vmin, starts, counts, p["step_vmin"], p["tokens_vmin"])
    imax = _first_match(p["vmax"], vmax, starts, counts, p["step_vmax"], p["tokens_vmax"])
    n = np.add.reduceat(p["n"], starts)
    # Partials holding +inf and -inf have no mean: NaN is the answer, not a warning (as in _raw).
    with np.errstate(invalid="ignore", over="ignore"):
        vmean = np.add.reduceat(p["vmean"] * p["n"], starts) / n
    return {
        "bucket_size": p["bucket_size"][starts], "bucket": p["bucket"][starts], "attempt": p["attempt"][starts],
        "sid": p["sid"][starts], "step_min": np.minimum.reduceat(p["step_min"], starts), "step_max": p["step_max"][last],
        "tokens_min": np.minimum.reduceat(p["tokens_min"], starts),
        "tokens_max": np.maximum.reduceat(p["tokens_max"], starts), "n": n, "vmin": vmin, "vmax": vmax,
        "vmean": vmean, "vlast": p["vlast"][last],
        "step_vmin": p["step_vmin"][imin], "tokens_vmin": p["tokens_vmin"][imin],
        "step_vmax": p["step_vmax"][imax], "tokens_vmax": p["tokens_vmax"][imax],
    }


def _ends(parts: dict[str, np.ndarray], size: int) -> np.ndarray:
    """The end (exclusive step) of the bucket of ``size`` each partial row falls in."""
    return (parts["bucket"] * parts["bucket_size"] // size + 1) * size


class RollupAccumulator:
    """The writer's running rollups of one table: open buckets in memory, closed ones to publish.

    :meth:`add` takes each batch of rows as it is written and returns the rollup rows of the
    buckets that closed (a row at or beyond a bucket's end was seen) plus partials for rows that
    arrived for already closed buckets; :meth:`drain` returns every open bucket (at close).

    NumPy, no DuckDB: a batch is reduced once into partial rows of the finest size (series as
    small integer ids); the partial rows of each closed bucket wait in the next size's queue, which
    is combined only when one of its buckets closes (every 1,000 steps for the 1,000-step size, or
    at once for a late row of an already closed bucket). A flush costs one pass over its rows and a
    few small array operations; Arrow tables are built only for the rows returned.
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
        self._key_cols = (*ROLLUP_KEYS[table], *(("layer_type",) if "layer_type" in self.schema.names else ()))
        self._sid: dict[tuple[Any, ...], int] = {}  # series key -> id
        self._keys: list[tuple[Any, ...]] = []  # id -> key + layer_type
        self._code_cache: tuple[Any, np.ndarray, np.ndarray] | None = None
        # The key columns' dictionaries (one word per series id), rebuilt only when a series is new:
        # built per batch they cost more than the rollup arithmetic (a Python list per key column).
        self._words: tuple[int, dict[str, pa.Array]] = (0, {})
        # Per size: partial rows not combined yet (finest size: of this size; coarser sizes: the
        # closed rows of the size below, to be combined into this size when one of its buckets closes).
        self._queue: list[list[dict[str, np.ndarray]]] = [[] for _ in self.sizes]
        self._first_end = [_NEVER for _ in self.sizes]  # per size: the earliest end of a queued row's bucket
        self._high = -1  # highest step seen: buckets ending at or below it are closed
        self._emitted_end = [-1 for _ in self.sizes]  # per size: the latest bucket end returned so far
        self.late = False
        """Whether the last :meth:`add` returned rows for a bucket that had been returned before
        (a late row): publish them at once, or readers of that bucket miss the row."""
        self.coarse = False
        """Whether the last :meth:`add` closed a bucket bigger than the finest size."""

    def _basis(self, rows: pa.Table) -> tuple[Any, ...] | None:
        """What the batch's series codes are relative to (each key's dictionary or lowest value):
        two batches with the same basis give a series the same code. None when unknown."""
        basis: list[Any] = []
        for k in ROLLUP_KEYS[self.table]:
            col = rows.column(k)
            if pa.types.is_dictionary(col.type) and col.num_chunks == 1:
                basis.append(tuple(col.chunk(0).dictionary.to_pylist()))
            elif pa.types.is_integer(col.type) and not col.null_count:
                if col.num_chunks == 1:  # NumPy: a compute kernel call costs more than the pass
                    arr = col.chunk(0).to_numpy()
                    lo, hi = int(arr.min()), int(arr.max())
                else:
                    lo, hi = (v.as_py() for v in pc.min_max(col).values())
                if hi - lo + 1 > 4 * len(col) + 64:
                    return None  # group_code ranks such values densely: codes depend on the values present
                basis.append((lo, hi))
            else:
                return None
        return tuple(basis)

    def _series_ids(self, rows: pa.Table, code: np.ndarray, starts: np.ndarray) -> np.ndarray:
        """Stable ids of the series of the runs starting at ``starts``.

        A series is its key (metric, layer or name); its ``layer_type`` is the first one seen (the
        SQL rollup takes any value). The code -> id map of the last batch is reused when the next
        batch has the same basis (a Monitor's flushes do), else one dict lookup per series.
        """
        run_codes = code[starts]
        basis = self._basis(rows)
        cached = self._code_cache
        if basis is not None and cached is not None and cached[0] == basis:
            ucode, ids = cached[1], cached[2]
            pos = np.searchsorted(ucode, run_codes)
            pos[pos >= ucode.size] = 0
            if bool((ucode[pos] == run_codes).all()):
                return ids[pos]
        ucode, first = np.unique(run_codes, return_index=True)
        at = pa.array(starts[first])
        vals = [rows.column(k).take(at) for k in self._key_cols]
        vals = [v.cast(v.type.value_type) if pa.types.is_dictionary(v.type) else v for v in vals]
        nkey = len(ROLLUP_KEYS[self.table])
        ids = np.empty(ucode.size, dtype=np.int64)
        for i, full in enumerate(zip(*(v.to_pylist() for v in vals))):
            sid = self._sid.get(full[:nkey])
            if sid is None:
                sid = self._sid[full[:nkey]] = len(self._keys)
                self._keys.append(full)
            ids[i] = sid
        self._code_cache = (basis, ucode, ids) if basis is not None else None
        return ids[np.searchsorted(ucode, run_codes)]

    def _raw(self, rows: pa.Table, code: np.ndarray) -> dict[str, np.ndarray]:
        """Partial rows of the finest size from ``rows`` sorted by series then step."""
        size = self.sizes[0]
        n = rows.num_rows
        step, tokens, value, attempt = (_np(rows, c) for c in ("step", "tokens", "value", "attempt"))
        bucket = step // size
        brk = np.flatnonzero((code[1:] != code[:-1]) | (bucket[1:] != bucket[:-1]) | (attempt[1:] != attempt[:-1])) + 1
        starts = np.concatenate(([0], brk)).astype(np.int64)
        counts = np.diff(np.concatenate((starts, [n])))
        vmin = np.fmin.reduceat(value, starts)
        vmax = np.maximum.reduceat(value, starts)
        imin = _first_match(value, vmin, starts, counts, step, tokens)
        imax = _first_match(value, vmax, starts, counts, step, tokens)
        last = starts + counts - 1  # rows ascend by step within a run
        # A bucket holding both +inf and -inf has no mean: NaN is the answer, not a warning to print.
        with np.errstate(invalid="ignore", over="ignore"):
            vmean = np.add.reduceat(value, starts) / counts
        return {
            "bucket_size": np.full(starts.size, size, dtype=np.int64), "bucket": bucket[starts],
            "attempt": attempt[starts].astype(np.int64), "sid": self._series_ids(rows, code, starts),
            "step_min": step[starts], "step_max": step[last], "tokens_min": np.minimum.reduceat(tokens, starts),
            "tokens_max": np.maximum.reduceat(tokens, starts), "n": counts.astype(np.int64), "vmin": vmin,
            "vmax": vmax, "vmean": vmean, "vlast": value[last],
            "step_vmin": step[imin], "tokens_vmin": tokens[imin], "step_vmax": step[imax], "tokens_vmax": tokens[imax],
        }

    def _table(self, parts: dict[str, np.ndarray]) -> pa.Table:
        """Rows of the rollup table's schema from partial rows."""
        sid = parts["sid"]
        cols: dict[str, Any] = {k: parts[k] for k in ("bucket_size", "bucket", *_VALUES)}
        cols["attempt"] = parts["attempt"]
        ids = pa.array(sid.astype(np.int32))
        if self._words[0] != len(self._keys):
            self._words = (len(self._keys), {
                f.name: pa.array([key[self._key_cols.index(f.name)] for key in self._keys], f.type)
                for f in self.schema if f.name in self._key_cols})
        arrays = []
        for f in self.schema:
            if f.name in self._key_cols:  # the series' key values: a dictionary over all series seen
                arrays.append(pa.DictionaryArray.from_arrays(ids, self._words[1][f.name]).cast(f.type))
            else:
                arrays.append(pa.array(cols[f.name], f.type))
        return pa.Table.from_arrays(arrays, schema=self.schema)

    def to_table(self, parts: list[dict[str, np.ndarray]]) -> pa.Table | None:
        """The rollup table's rows of partial rows returned by :meth:`add_parts`/:meth:`drain_parts`
        (None when there are none). The writer builds it once per published file, not per batch."""
        parts = [p for p in parts if p["n"].size]
        return self._table(_cat(parts)) if parts else None

    def add(self, rows: pa.Table, presorted: bool = False, code: np.ndarray | None = None) -> pa.Table | None:
        """Fold ``rows`` (a batch of ``table``) in; returns the rollup rows to publish now, or None.

        ``presorted``: the rows are already sorted by :func:`healthwatch.store.merge.sort_table`
        (the writer's segments are), ``code`` their series codes
        (:func:`~healthwatch.store.merge.sort_table_code`).
        """
        parts = self.add_parts(rows, presorted, code)
        return None if parts is None else self.to_table([parts])

    def add_parts(self, rows: pa.Table, presorted: bool = False,
                  code: np.ndarray | None = None) -> dict[str, np.ndarray] | None:
        """:meth:`add`, returning the closed rollup rows as NumPy partial rows (for :meth:`to_table`)."""
        self.late = self.coarse = False
        if rows.num_rows == 0:
            return None
        if not presorted:
            rows, code = sort_table_code(dictionary_columns(rows), self.table)
        if code is None:
            code, _ = group_code(rows, ROLLUP_KEYS[self.table])
        incoming: dict[str, np.ndarray] | None = self._raw(rows, code)
        self._high = max(self._high, int(incoming["step_max"].max()))
        out: list[dict[str, np.ndarray]] = []
        for level, size in enumerate(self.sizes):
            queue = self._queue[level]
            if incoming is not None and incoming["n"].size:
                queue.append(incoming)
                self._first_end[level] = min(self._first_end[level], int(_ends(incoming, size).min()))
            incoming = None
            # Combine this size's queue only when one of its buckets closed (at once for a late row).
            if not queue or self._first_end[level] > self._high + 1:
                continue
            if level == 0 and len(queue) == 1:
                combined = queue[0]  # one batch's partials: nothing to combine
            else:
                cat = _cat(queue)
                if level:
                    cat = dict(cat, bucket=cat["bucket"] * cat["bucket_size"] // size,
                               bucket_size=np.full(cat["n"].size, size, dtype=np.int64))
                combined = _combine(cat)
            ends = _ends(combined, size)
            closed = ends <= self._high + 1
            rest = _take(combined, ~closed)
            self._queue[level] = [rest] if rest["n"].size else []
            self._first_end[level] = int(ends[~closed].min()) if rest["n"].size else _NEVER
            if closed.any():
                done = _take(combined, closed)
                self.late |= int(ends[closed].min()) <= self._emitted_end[level]
                self._emitted_end[level] = max(self._emitted_end[level], int(ends[closed].max()))
                self.coarse |= level > 0
                out.append(done)
                incoming = done
        return _cat(out) if out else None

    def drain(self) -> pa.Table | None:
        """Every open bucket's rows (the attempt ends: its buckets are as complete as they get)."""
        parts = self.drain_parts()
        return None if parts is None else self.to_table([parts])

    def drain_parts(self) -> dict[str, np.ndarray] | None:
        """:meth:`drain`, returning NumPy partial rows (for :meth:`to_table`)."""
        out: list[dict[str, np.ndarray]] = []
        below: dict[str, np.ndarray] | None = None
        for level, size in enumerate(self.sizes):
            queue = self._queue[level]
            self._queue[level] = []
            self._first_end[level] = _NEVER
            # What the size below still held open also belongs to this size's open buckets.
            parts = [*queue, below] if below is not None else list(queue)
            below = None
            if not parts:
                continue
            cat = _cat(parts)
            if level:
                cat = dict(cat, bucket=cat["bucket"] * cat["bucket_size"] // size,
                           bucket_size=np.full(cat["n"].size, size, dtype=np.int64))
            below = _combine(cat)
            out.append(below)
        out = [p for p in out if p["n"].size]
        return _cat(out) if out else None

    def close(self) -> None:
        """Nothing to release (kept for callers of the DuckDB-based accumulator it replaced)."""


def describe(row: dict[str, Any]) -> str:
    """A short text for one rollup row (debugging and error messages)."""
    key = row.get("name") or f"{row.get('metric')}[{row.get('layer')}]"
    return f"{key} attempt {row.get('attempt')} bucket {row.get('bucket')}x{row.get('bucket_size')}"
