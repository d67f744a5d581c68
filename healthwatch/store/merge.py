"""Merging segments: many sorted-or-not Parquet files of one (table, run) into one sorted file.

Two ways, one sort order (``healthwatch.schema.SORT_KEYS``) and one publish protocol
(:mod:`healthwatch.store.segments`: manifest, publish, retire, so readers never see a row twice
or miss one):

* :func:`merge_files` (compaction, object storage): DuckDB with a bounded memory budget, any
  number of writers' files, any order of rows.
* :func:`sort_table` / :func:`merge_tables` / :func:`write_parquet` (a live writer merging its own
  segments): Arrow + NumPy in the writer's thread, no DuckDB connection. A writer's segments are
  each sorted and cover increasing steps, so a merge is one stable radix sort of a small integer
  series code (``metric, layer`` -> one int16), checked, and a ``take``; rows that break the
  expected order fall back to a full lexicographic sort, so the result is sorted whatever came in.

Layout written by a live writer (what readers can rely on): every segment sorted by
``SORT_KEYS`` (e.g. ``layer_stats`` by metric, layer, step, attempt), row groups of
``ROW_GROUP_ROWS`` rows (in a sealed segment cut where the series key changes, so a group holds
one series: :func:`key_groups`; older stores' sealed groups may straddle series), low-cardinality strings (metric, layer_type, name) and small integer keys
dictionary-encoded, min/max statistics on the key columns (``STAT_COLUMNS``), no Arrow schema blob
(a file reads back with the table's plain types), columns without NULLs REQUIRED (read back as
non-nullable fields; older segments have every column OPTIONAL: cast to ``TABLES`` to compare).
"""

from __future__ import annotations

import functools
import os
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from healthwatch.schema import SORT_KEYS, TABLES
from healthwatch.store.segments import publish_merge


def sql_str(value: str) -> str:
    """A SQL string literal (for file names in ``read_parquet``; never for user values)."""
    return "'" + value.replace("'", "''") + "'"


_sql_str = sql_str


#: A merge of more rows than this sorts one chunk of leading sort keys at a time (see merge_files);
#: also the target size of a chunk (~1 GB of sort memory at 16M rows).
MERGE_CHUNK_ROWS = 16_000_000
#: Leading sort keys that cut a table into chunks sorted independently.
MERGE_CHUNK_KEYS: dict[str, tuple[str, ...]] = {
    "layer_stats": ("metric", "layer"),
    "scalars": ("name",),
    "expert_load": ("layer",),
}
#: Memory DuckDB may use for one merge before it spills to the temp directory.
MERGE_MEMORY_LIMIT = os.environ.get("HEALTHWATCH_MERGE_MEMORY", "2GB")


def _parquet_rows(paths: Sequence[Path]) -> int:
    total = 0
    for p in paths:
        try:
            total += pq.ParquetFile(p).metadata.num_rows
        except (OSError, pa.ArrowException):
            return -1  # unknown: take the general path
    return total


def merge_files(directory: Path, sources: list[Path], target_name: str, table: str) -> Path:
    """Merge ``sources`` into one sorted segment ``target_name`` (caller holds the merge lock).

    DuckDB does the merge with a bounded memory budget (``HEALTHWATCH_MERGE_MEMORY``, spilling to
    the temp directory beyond it). A merge of more than ``MERGE_CHUNK_ROWS`` rows of a table with
    chunk keys (``layer_stats``: metric, layer) sorts and appends one chunk of consecutive keys
    (about ``MERGE_CHUNK_ROWS`` rows) at a time: sources written by earlier merges are already
    sorted, so a chunk reads mostly its own row groups, and memory stays at one chunk instead of
    the whole table (one ORDER BY over 3 x 10^8 rows took more than 20 GB).
    """
    tmp = directory / f".tmp-{uuid.uuid4().hex}.partial"
    cols = ", ".join(f'"{c}"' for c in TABLES[table].names)
    order = ", ".join(f'"{c}"' for c in SORT_KEYS.get(table, []))
    files = "[" + ", ".join(_sql_str(str(p)) for p in sources) + "]"
    src = f"read_parquet({files}, hive_partitioning = false, union_by_name = true)"
    spill = Path(tempfile.gettempdir()) / f"healthwatch-duckdb-{os.getpid()}"
    con = duckdb.connect(config={"memory_limit": MERGE_MEMORY_LIMIT, "temp_directory": str(spill)})
    try:
        con.execute("SET preserve_insertion_order = false")
        keys = MERGE_CHUNK_KEYS.get(table)
        if keys and order and _parquet_rows(sources) > MERGE_CHUNK_ROWS:
            _merge_chunked(con, src, cols, order, keys, tmp, table)
        else:
            con.execute(
                f"COPY (SELECT {cols} FROM {src}{' ORDER BY ' + order if order else ''}) TO {_sql_str(str(tmp))} "
                "(FORMAT parquet, COMPRESSION zstd, ROW_GROUP_SIZE 122880)"
            )
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        con.close()
    return publish_merge(directory, sources, tmp, target_name)


def _merge_chunks(counts: list[tuple[Any, ...]], nkeys: int) -> list[tuple[str, list[Any]]]:
    """Pack consecutive key groups ``(k1[, k2], rows)`` into chunks of ~MERGE_CHUNK_ROWS rows.

    Returns ``(where_clause, params)`` per chunk, in sort order; a chunk never spans two values of
    the first key when there are two keys, and NULL keys get chunks of their own.
    """
    chunks: list[tuple[str, list[Any]]] = []
    group: list[tuple[Any, ...]] = []
    size = 0

    def close() -> None:
        nonlocal group, size
        if not group:
            return
        if nkeys == 1:
            vals = [g[0] for g in group]
            if vals == [None]:
                chunks.append(("k1 IS NULL", []))
            else:
                chunks.append((f"k1 IN ({', '.join('?' * len(vals))})", vals))
        else:
            first, vals = group[0][0], [g[1] for g in group]
            head = "k1 IS NULL" if first is None else "k1 = ?"
            hp = [] if first is None else [first]
            if vals == [None]:
                chunks.append((f"{head} AND k2 IS NULL", hp))
            else:
                chunks.append((f"{head} AND k2 IN ({', '.join('?' * len(vals))})", hp + vals))
        group, size = [], 0

    for row in counts:
        keys, n = row[:-1], int(row[-1])
        boundary = group and (
            (nkeys == 2 and keys[0] != group[-1][0]) or None in keys or None in group[-1]
            or size + n > MERGE_CHUNK_ROWS
        )
        if boundary:
            close()
        group.append(keys)
        size += n
    close()
    return chunks


def _merge_chunked(con: Any, src: str, cols: str, order: str, keys: tuple[str, ...], tmp: Path, table: str) -> None:
    """Write the merge chunk by chunk, in sort order, into one Parquet file."""
    klist = ", ".join(f'"{k}"' for k in keys)
    counts = con.execute(f"SELECT {klist}, count(*) FROM {src} GROUP BY ALL ORDER BY {klist} NULLS LAST").fetchall()
    schema = TABLES[table]
    with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
        for where, params in _merge_chunks(counts, len(keys)):
            where = where.replace("k1", f'"{keys[0]}"').replace("k2", f'"{keys[-1]}"')
            rel = con.sql(f"SELECT {cols} FROM {src} WHERE {where} ORDER BY {order}", params=params)
            for batch in rel.to_arrow_reader(122_880):
                writer.write_table(pa.Table.from_batches([batch]).cast(schema), row_group_size=122_880)


# --------------------------------------------------------------------------------------------
# the live writer's merge: Arrow + NumPy

#: Rows per Parquet row group in segments a live writer writes (DuckDB's own row group size).
ROW_GROUP_ROWS = 122_880
#: Row groups of rollup files: small, so that their key statistics prune a one-series read to a few
#: thousand rows (a rollup file holds every series' buckets of its steps, sorted by key).
ROLLUP_ROW_GROUP_ROWS = 8_192
#: String columns with few distinct values: dictionary-encoded in memory and in Parquet (hashing
#: them once at write time is the price; every later merge, sort and rollup reuses the codes).
DICT_COLUMNS = frozenset({"metric", "layer_type", "name"})
#: Integer columns with few distinct values: dictionary-encoded in Parquet (a few bytes per file).
INT_DICT_COLUMNS = frozenset({"attempt", "layer", "bucket_size"})
#: Columns that get Parquet min/max statistics (what readers prune row groups and files on).
STAT_COLUMNS = frozenset({
    "attempt", "step", "tokens", "layer", "layer_type", "metric", "name", "bucket_size", "bucket",
    "step_min", "step_max", "tokens_min", "tokens_max",
})
#: Tables a live writer sorts and merges with :func:`sort_table`: how many leading ``SORT_KEYS``
#: name one series (the rest, e.g. step and attempt, already ascend within a writer's segment).
SERIES_KEYS: dict[str, int] = {
    "layer_stats": 2, "scalars": 1, "expert_load": 1, "layer_stats_rollup": 3, "scalars_rollup": 2,
}


def _distinct_words(chunk: pa.DictionaryArray) -> pa.DictionaryArray:
    """``chunk`` with a dictionary of distinct words (a producer's dictionary may repeat a word;
    Parquet then stores the whole column chunk plain: ~10x the bytes and the CPU)."""
    words = chunk.dictionary.to_pylist()
    if len(set(words)) == len(words):
        return chunk
    pos: dict[Any, int] = {}
    lookup = np.array([pos.setdefault(w, len(pos)) for w in words], dtype=np.int32)
    idx = chunk.indices
    new = lookup[idx.fill_null(0).to_numpy()] if len(words) else idx.to_numpy(zero_copy_only=False)
    mask = idx.is_null().to_numpy(zero_copy_only=False) if idx.null_count else None
    return pa.DictionaryArray.from_arrays(pa.array(new, idx.type, mask=mask), pa.array(list(pos), chunk.dictionary.type))


def dictionary_columns(table: pa.Table) -> pa.Table:
    """``table`` with its ``DICT_COLUMNS`` dictionary-encoded (columns already encoded are kept,
    their dictionaries made distinct)."""
    for i, field in enumerate(table.schema):
        if field.name in DICT_COLUMNS and (pa.types.is_string(field.type) or pa.types.is_large_string(field.type)):
            table = table.set_column(i, field.name, pc.dictionary_encode(table.column(i)))
        elif field.name in DICT_COLUMNS and pa.types.is_dictionary(field.type):
            col = table.column(i)
            fixed = [_distinct_words(c) for c in col.chunks]
            if any(f is not c for f, c in zip(fixed, col.chunks)):
                table = table.set_column(i, field.name, pa.chunked_array(fixed, field.type))
    return table


@functools.cache
def memory_schema(table: str) -> pa.Schema:
    """The schema of ``table`` as a live writer holds it: ``DICT_COLUMNS`` as dictionaries."""
    fields = []
    for f in TABLES[table]:
        if f.name in DICT_COLUMNS:
            f = pa.field(f.name, pa.dictionary(pa.int32(), f.type), f.nullable)
        fields.append(f)
    return pa.schema(fields)


def _string_ranks(col: pa.ChunkedArray) -> tuple[np.ndarray, int]:
    """Ranks of a string (or dictionary of strings) column in byte order, nulls last."""
    if not pa.types.is_dictionary(col.type):
        col = pc.dictionary_encode(col)
    chunks = col.chunks
    dicts = [c.dictionary.to_pylist() for c in chunks]
    # Python orders str by code point, which is UTF-8 byte order: DuckDB's VARCHAR order.
    uniq = sorted(set().union(*dicts) - {None})
    pos = {v: i for i, v in enumerate(uniq)}
    null = len(uniq)
    out = []
    for c, d in zip(chunks, dicts):
        lookup = np.array([pos.get(v, null) for v in d] + [null], dtype=np.int64)
        idx = c.indices
        if idx.null_count:
            idx = pc.fill_null(idx, len(d))
        out.append(lookup[idx.to_numpy(zero_copy_only=False)])
    ranks = np.concatenate(out) if len(out) != 1 else out[0]
    return ranks, null + 1


def _int_ranks(col: pa.ChunkedArray) -> tuple[np.ndarray, int]:
    """Ranks of an integer column (dense when its values are sparse), nulls last."""
    if col.null_count:
        hi = pc.max(col).as_py()
        col = pc.fill_null(col, (hi if hi is not None else 0) + 1)
    arr = col.to_numpy().astype(np.int64, copy=False)
    if arr.size == 0:
        return arr, 1
    lo, hi = int(arr.min()), int(arr.max())
    if hi - lo + 1 <= 4 * arr.size + 64:
        return arr - lo, hi - lo + 1
    uniq, inv = np.unique(arr, return_inverse=True)
    return inv.astype(np.int64, copy=False), int(uniq.size)


def column_ranks(col: pa.ChunkedArray) -> tuple[np.ndarray, int]:
    """Integer ranks of ``col`` that sort as the column sorts (nulls last), and their range."""
    t = col.type
    if pa.types.is_dictionary(t) or pa.types.is_string(t) or pa.types.is_large_string(t):
        return _string_ranks(col)
    if pa.types.is_integer(t):
        return _int_ranks(col)
    arr = col.to_numpy(zero_copy_only=False).astype(np.float64)
    uniq, inv = np.unique(arr, return_inverse=True)  # NaN (and nulls, as NaN) sort last
    return inv.astype(np.int64, copy=False), int(uniq.size)


def group_code(table: pa.Table, keys: Sequence[str]) -> tuple[np.ndarray, int]:
    """One int64 per row ordering rows as ``keys`` do (lexicographically), and the codes' range."""
    code = np.zeros(table.num_rows, dtype=np.int64)
    size = 1
    for k in keys:
        ranks, n = column_ranks(table.column(k))
        if size * n >= 1 << 62:  # re-densify before the product could overflow
            uniq, inv = np.unique(code, return_inverse=True)
            code, size = inv.astype(np.int64, copy=False), int(uniq.size)
        code = code * n + ranks
        size *= n
    return code, size


def _ascending_within(table: pa.Table, keys: Sequence[str], code: np.ndarray, idx: np.ndarray | None) -> bool:
    """Whether, in order ``idx`` (None: as they are), rows of one group (same ``code``) ascend by ``keys``."""
    c = code if idx is None else code[idx]
    undecided = c[1:] == c[:-1]
    for k in keys:
        col = table.column(k)
        if col.null_count:
            return False
        lo, hi = pc.min_max(col).values()
        if lo.as_py() == hi.as_py():
            continue  # constant (e.g. the writer's attempt): decides nothing
        v = col.to_numpy() if idx is None else col.to_numpy()[idx]
        d = v[1:] - v[:-1]
        if bool((undecided & (d < 0)).any()):
            return False
        undecided &= d == 0
        if not undecided.any():
            break
    return True


def _periodic_order(table: pa.Table, order_keys: Sequence[str], code: np.ndarray) -> np.ndarray | None:
    """The sorting permutation of a step-major batch, without a sort, or None if it is not one.

    The Monitor's row builder emits a flush step by step, each step the same series in the same
    order (every layer's metrics): ``code`` is then one pattern of K series codes repeated per step,
    and the order keys (step, attempt) are constant within a step and ascend across steps. Sorting
    the K codes once and striding over the steps gives the permutation in O(rows).
    """
    if order_keys[:1] != ["step"] or table.num_rows < 2:
        return None
    if any(table.column(k).null_count for k in order_keys):
        return None
    step = table.column("step").to_numpy()
    k = int(np.argmax(step != step[0])) if step[-1] != step[0] else step.size
    n = step.size
    if k < 1 or n % k or k == n:
        return None
    grid = code.reshape(n // k, k)
    if not bool((grid == grid[0]).all()):
        return None
    steps = step.reshape(n // k, k)
    if not bool((steps == steps[:, :1]).all()) or not bool((steps[1:, 0] > steps[:-1, 0]).all()):
        return None
    for key in order_keys[1:]:  # e.g. attempt: must be constant within a step (ties then keep order)
        v = table.column(key).to_numpy().reshape(n // k, k)
        if not bool((v == v[:, :1]).all()):
            return None
    pattern = np.argsort(grid[0], kind="stable")
    if bool((grid[0][pattern][1:] == grid[0][pattern][:-1]).any()):
        return None  # a series twice within one step: leave it to the general sort
    return (pattern[:, None] + k * np.arange(n // k, dtype=np.int64)[None, :]).ravel()


def _key_values(col: pa.ChunkedArray) -> tuple[np.ndarray, tuple[Any, ...]] | None:
    """A key column's values as NumPy (dictionary indices, or integers) and what they are relative
    to (the dictionary's words; nothing for integers); None for other columns, nulls or several chunks."""
    if col.num_chunks != 1 or col.null_count:
        return None
    chunk = col.chunk(0)
    if pa.types.is_dictionary(chunk.type):
        return chunk.indices.to_numpy(), tuple(chunk.dictionary.to_pylist())
    if pa.types.is_integer(chunk.type):
        return chunk.to_numpy(), ()
    return None


#: Step-major layouts seen lately: (table, step rows, the key values of one step) -> (the sorting
#: permutation of one step's rows, their sorted series codes). A Monitor flushes the same layout
#: every time: the sort of a flush is then a few comparisons and one strided index.
_LAYOUTS: dict[tuple[Any, ...], tuple[np.ndarray, np.ndarray]] = {}


def _step_major_order(table: pa.Table, name: str, keys: Sequence[str],
                      lead: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The sort of a step-major batch (the Monitor's row builder: step by step, each step the same
    series in the same order), from one step's rows; None when the batch is not laid out so.

    Checked on every row, not assumed: each step's rows repeat the first step's key values, steps
    are constant within a step's rows and ascend across them, the other order keys (attempt) are
    constant within a step, and no series appears twice in a step. The permutation sorts one
    step's rows by series (cached per layout) and strides over the steps: each series' rows end up
    in step order, as :func:`sorted_order` sorts them.
    """
    n = table.num_rows
    order_keys = keys[lead:]
    if order_keys[:1] != ["step"] or n < 2:
        return None
    steps = _key_values(table.column("step"))
    if steps is None:
        return None
    step = steps[0]
    k = int(np.argmax(step != step[0])) if step[-1] != step[0] else n
    if n % k:
        return None
    m = n // k
    grid = step.reshape(m, k)
    if not bool((grid == grid[:, :1]).all()) or (m > 1 and not bool((grid[1:, 0] > grid[:-1, 0]).all())):
        return None
    sig: list[Any] = [name, k]
    for key in keys[:lead]:
        vals = _key_values(table.column(key))
        if vals is None:
            return None
        v, words = vals
        if m > 1 and not bool((v.reshape(m, k) == v[:k]).all()):
            return None
        sig += [v.dtype.str, v[:k].tobytes(), words]
    for key in order_keys[1:]:
        vals = _key_values(table.column(key))
        if vals is None:
            return None
        v = vals[0].reshape(m, k)
        if not bool((v == v[:, :1]).all()):
            return None
    cache_key = tuple(sig)
    hit = _LAYOUTS.get(cache_key)
    if hit is None:
        code, _ = group_code(table.slice(0, k), keys[:lead])
        pattern = np.argsort(code, kind="stable")
        scode = code[pattern]
        if bool((scode[1:] == scode[:-1]).any()):
            return None  # a series twice within one step: leave it to the general sort
        if len(_LAYOUTS) >= 64:
            _LAYOUTS.clear()
        hit = _LAYOUTS[cache_key] = (pattern, scode)
    pattern, scode = hit
    perm = (pattern[:, None] + k * np.arange(m, dtype=np.int64)[None, :]).ravel()
    return perm, np.repeat(scode, m)


def sorted_order(table: pa.Table, name: str) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The permutation sorting ``table`` (rows of table ``name``) by ``SORT_KEYS`` (None when it is
    sorted already), and, for ``SERIES_KEYS`` tables, each row's series code in that order.

    Fast path (``SERIES_KEYS`` tables): a stable radix sort of the series code keeps each series'
    rows in their input order, which is the sort order when they ascend by step there (a writer's
    rows do); that is checked, and a full lexicographic sort is done when it does not hold.
    """
    keys = [k for k in SORT_KEYS.get(name, []) if k in table.column_names]
    if not keys or table.num_rows < 2:
        lead = SERIES_KEYS.get(name, 0)
        return None, (group_code(table, keys[:lead])[0] if lead and keys else None)
    lead = SERIES_KEYS.get(name, 0)
    code: np.ndarray | None = None
    if lead:
        fast = _step_major_order(table, name, keys, lead)
        if fast is not None:
            return fast
        code, size = group_code(table, keys[:lead])
        if size <= 1 << 15:
            small = code.astype(np.int16)
        elif size <= 1 << 31:
            small = code.astype(np.int32)
        else:
            small = code
        periodic = _periodic_order(table, keys[lead:], small)
        if periodic is not None:
            return periodic, code[periodic]
        if bool((small[1:] >= small[:-1]).all()):
            # Already grouped (a writer's sorted segment): a stable sort would not move a row.
            if _ascending_within(table, keys[lead:], code, None):
                return None, code
        else:
            idx = np.argsort(small, kind="stable")  # a radix sort for int16
            if _ascending_within(table, keys[lead:], code, idx):
                return idx, code[idx]
    ranks = [column_ranks(table.column(k))[0] for k in keys]
    idx = np.lexsort(ranks[::-1])
    if bool((idx[1:] > idx[:-1]).all()):
        return None, code
    return idx, (None if code is None else code[idx])


def sort_permutation(table: pa.Table, name: str) -> np.ndarray | None:
    """The permutation sorting ``table`` by the ``SORT_KEYS`` of ``name``; None if it is sorted."""
    return sorted_order(table, name)[0]


def sort_table(table: pa.Table, name: str) -> pa.Table:
    """``table`` sorted by the ``SORT_KEYS`` of table ``name`` (see :func:`sorted_order`)."""
    idx, _ = sorted_order(table, name)
    return table if idx is None else table.take(idx)


def sort_table_code(table: pa.Table, name: str) -> tuple[pa.Table, np.ndarray | None]:
    """:func:`sort_table` and the sorted rows' series codes (for the rollups of the same rows)."""
    idx, code = sorted_order(table, name)
    return (table if idx is None else table.take(idx)), code


def _runs(table: pa.Table, keys: Sequence[str],
          step_key: str) -> tuple[np.ndarray, list[tuple[np.ndarray, list[Any] | None]], np.ndarray] | None:
    """Series runs of a table grouped by ``keys``: run starts; per key, each run's value (integer)
    or dictionary index with the dictionary's words (string); the ``step_key`` of each run's first
    and last row. None when a key has nulls or is not a string/integer column."""
    change = np.zeros(max(0, table.num_rows - 1), dtype=bool)
    firsts: list[tuple[np.ndarray, list[Any] | None]] = []
    for k in keys:
        col = table.column(k)
        if col.null_count:
            return None
        if pa.types.is_dictionary(col.type):
            if not col.chunks:
                return None
            words = col.chunk(0).dictionary
            if any(not c.dictionary.equals(words) for c in col.chunks[1:]):
                return None  # indices of different dictionaries do not compare
            codes = pa.chunked_array([c.indices for c in col.chunks], col.type.index_type).to_numpy()
            firsts.append((codes, words.to_pylist()))
        elif pa.types.is_integer(col.type):
            codes = col.to_numpy()
            firsts.append((codes, None))
        else:
            return None
        change |= codes[1:] != codes[:-1]
    starts = np.concatenate(([0], np.flatnonzero(change) + 1)).astype(np.int64)
    key_vals = [(codes[starts], words) for codes, words in firsts]
    if step_key not in table.column_names or table.column(step_key).null_count:
        return None
    step = table.column(step_key).to_numpy()
    ends = np.concatenate((starts[1:], [table.num_rows])) - 1
    return starts, key_vals, np.stack((step[starts], step[ends]), axis=1)


#: Runs shorter than this on average: :func:`merge_sorted` gathers rows with one ``take`` instead of
#: slicing (measured: 100-row runs 72 vs 294 ns a row, 1,600-row runs 56 vs 27 ns a row).
_MIN_RUN_ROWS = 500


def _plain_columns(table: pa.Table, dicts: dict[str, pa.Array]) -> list[np.ndarray] | None:
    """Each column of ``table`` as one NumPy array (dictionary columns: their indices, with the
    dictionary recorded in ``dicts`` or checked equal to the one there); None when a column has
    several chunks, NULLs, another type, or a dictionary that differs."""
    out = []
    for field, col in zip(table.schema, table.columns):
        if col.num_chunks != 1 or col.null_count:
            return None
        chunk = col.chunk(0)
        if pa.types.is_dictionary(chunk.type):
            known = dicts.setdefault(field.name, chunk.dictionary)
            if known is not chunk.dictionary and not known.equals(chunk.dictionary):
                return None
            out.append(chunk.indices.to_numpy())
        elif pa.types.is_integer(chunk.type) or pa.types.is_floating(chunk.type):
            out.append(chunk.to_numpy())
        else:
            return None
    return out


def _merge_uniform(tables: Sequence[pa.Table], keys: Sequence[str], step_key: str) -> pa.Table | None:
    """:func:`merge_sorted` of segments with one series layout, or None when they do not have one.

    A Monitor's flushes do: every flush holds the same series (same key columns, row for row, same
    dictionaries), each series the same number of rows. The merge is then, per column, a NumPy
    reshape to ``(series, table, rows)``: no run search per table, no gather index, one copy.
    Checked on every row, not assumed (the key columns compared whole); the step order at each seam
    is checked as in :func:`merge_sorted`.
    """
    if len(tables) < 2:
        return None
    n = tables[0].num_rows
    names = tables[0].column_names
    if n == 0 or any(t.num_rows != n or t.column_names != names for t in tables) or step_key not in names:
        return None
    dicts: dict[str, pa.Array] = {}
    arrays = []
    for t in tables:
        cols = _plain_columns(t, dicts)
        if cols is None:
            return None
        arrays.append(cols)
    kidx = [names.index(k) for k in keys]
    if any(not np.array_equal(cols[i], arrays[0][i]) for cols in arrays[1:] for i in kidx):
        return None
    change = np.zeros(n - 1, dtype=bool)
    for i in kidx:
        change |= arrays[0][i][1:] != arrays[0][i][:-1]
    starts = np.concatenate(([0], np.flatnonzero(change) + 1))
    runs = starts.size
    width = n // runs
    if runs * width != n or not bool((np.diff(starts) == width).all()):
        return None
    si = names.index(step_key)
    for a, b in zip(arrays, arrays[1:]):  # series by series, steps never go back from one table to the next
        if bool((b[si][starts] < a[si][starts + width - 1]).any()):
            return None
    out = []
    for i, field in enumerate(tables[0].schema):
        merged = np.stack([cols[i].reshape(runs, width) for cols in arrays], axis=1).reshape(-1)
        if field.name in dicts:
            out.append(pa.DictionaryArray.from_arrays(pa.array(merged), dicts[field.name]))
        else:
            out.append(pa.array(merged, field.type))
    return pa.Table.from_arrays(out, schema=tables[0].schema)


def merge_sorted(tables: Sequence[pa.Table], name: str, contiguous: bool = True) -> pa.Table | None:
    """Merge a writer's own sorted segments without a sort, or None when it cannot.

    Each table must be sorted by ``SORT_KEYS`` (segments written by :func:`write_parquet` after
    :func:`sort_table` are) and, series by series, cover steps no lower than the table before it
    (a writer's segments in sequence order do). The result lays the tables' series runs end to
    end in series order (one ``take`` built from run boundaries: a few ns a row); the step order
    at each seam is checked, and None tells the caller to sort instead. ``contiguous=False``
    leaves long runs as zero-copy slices (one chunk per run) instead of copying them into
    contiguous columns: a table that is only written out once (a sealed segment) needs no copy.
    """
    lead = SERIES_KEYS.get(name, 0)
    keys = SORT_KEYS.get(name, [])[:lead]
    if not lead or not tables or any(k not in t.column_names for t in tables for k in keys):
        return None
    step_key = "bucket" if name.endswith("_rollup") else "step"
    if contiguous:
        uniform = _merge_uniform(tables, keys, step_key)
        if uniform is not None:
            return uniform
    found = []
    offset = 0
    for t in tables:
        runs = _runs(t, keys, step_key)
        if runs is None:
            return None
        found.append(runs)
        offset += t.num_rows
    # Per key, every run's rank in the key's own order (strings: the sorted union of the tables'
    # dictionaries, code point = UTF-8 byte order, as DuckDB sorts VARCHAR; integers: themselves).
    ranks = []
    for k in range(len(keys)):
        if found[0][1][k][1] is None:
            ranks.append(np.concatenate([r[1][k][0].astype(np.int64) for r in found]))
            continue
        union = sorted(set().union(*(r[1][k][1] for r in found)))
        pos = {w: i for i, w in enumerate(union)}
        ranks.append(np.concatenate([np.array([pos[w] for w in r[1][k][1]], dtype=np.int64)[r[1][k][0]]
                                     for r in found]))
    tab = np.concatenate([np.full(r[0].size, ti, dtype=np.int64) for ti, r in enumerate(found)])
    bases = np.concatenate(([0], np.cumsum([t.num_rows for t in tables])[:-1]))
    start = np.concatenate([bases[ti] + r[0] for ti, r in enumerate(found)])
    length = np.concatenate([np.diff(np.concatenate((r[0], [t.num_rows]))) for r, t in zip(found, tables)])
    first = np.concatenate([r[2][:, 0] for r in found])
    last = np.concatenate([r[2][:, 1] for r in found])
    o = np.lexsort((tab, *ranks[::-1]))
    tab_s = tab[o]
    same = np.ones(o.size - 1, dtype=bool)
    for r in ranks:
        same &= r[o][1:] == r[o][:-1]
    # Within one series: one run per table, and steps that never go back from one table to the next.
    if bool((same & ((tab_s[1:] == tab_s[:-1]) | (first[o][1:] < last[o][:-1]))).any()):
        return None
    if offset < _MIN_RUN_ROWS * len(o):  # short runs: one gather is cheaper than many slices
        starts_a, lens = start[o], length[o]
        idx = np.repeat(starts_a - (np.cumsum(lens) - lens), lens) + np.arange(offset, dtype=np.int64)
        data = pa.concat_tables(tables).unify_dictionaries().combine_chunks()
        return data if bool((idx[1:] > idx[:-1]).all()) else data.take(idx)
    # Long runs: zero-copy slices laid end to end, then (contiguous) one copy into contiguous columns.
    pieces = [tables[t].slice(int(s - bases[t]), int(n)) for t, s, n in zip(tab[o], start[o], length[o])]
    out = pa.concat_tables(pieces).unify_dictionaries()
    return out.combine_chunks() if contiguous else out


def as_schema(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table``'s columns of ``schema``, cast to it; ``table`` itself when it has that schema already
    (a cast of an equal schema still costs a compute call per column: ~15 us, on every flush)."""
    if table.schema.equals(schema):
        return table
    return table.select(schema.names).cast(schema)


def merge_tables(tables: Sequence[pa.Table], name: str, contiguous: bool = True) -> pa.Table:
    """One table sorted by the ``SORT_KEYS`` of ``name`` from ``tables`` (same columns, any order).

    A writer's own segments take the zero-copy path (:func:`merge_sorted`; ``contiguous=False``:
    its long runs may stay slices of the inputs); anything else is concatenated and sorted.
    """
    schema = memory_schema(name)
    parts = [as_schema(t, schema) for t in tables]
    parts = [t for t in parts if t.num_rows]
    # One attempt in all (a writer's own segments): ties on step need no attempt order.
    attempts = {(m["min"].as_py(), m["max"].as_py()) for m in (pc.min_max(t.column("attempt")) for t in parts)}
    if len(attempts) == 1 and len(next(iter(attempts))) == 2 and len(set(next(iter(attempts)))) == 1 and all(
        t.column("attempt").null_count == 0 for t in parts
    ):
        fast = merge_sorted(parts, name, contiguous)
        if fast is not None:
            return fast
    data = pa.concat_tables(parts).unify_dictionaries().combine_chunks()
    return sort_table(data, name)


def read_segment(path: str | os.PathLike[str], name: str) -> pa.Table:
    """A segment of table ``name`` as a live writer holds it (strings as dictionaries), one thread."""
    schema = memory_schema(name)
    dict_cols = [f.name for f in schema if pa.types.is_dictionary(f.type)]
    data = pq.read_table(path, read_dictionary=dict_cols, use_threads=False)
    # One dictionary for all row groups: dictionary indices then compare across chunks.
    return data.select(schema.names).cast(schema).unify_dictionaries()


def required_columns(table: pa.Table) -> pa.Table:
    """``table`` with every column that holds no NULL declared non-nullable (zero-copy).

    Parquet then stores the column REQUIRED: no definition levels to encode (about a third of the
    CPU of writing a raw-page segment) nor to decode. Readers see the same values; a reader that
    wants the table's nullable schema casts to it (:func:`read_segment` does, DuckDB and polars
    make no difference).
    """
    fields = [f.with_nullable(False) if f.nullable and table.column(i).null_count == 0 else f
              for i, f in enumerate(table.schema)]
    if all(f is g for f, g in zip(fields, table.schema)):
        return table
    return pa.Table.from_arrays(table.columns, schema=pa.schema(fields, table.schema.metadata))


def write_parquet(table: pa.Table, where: str | os.PathLike[str], name: str, compress: bool = True) -> None:
    """Write ``table`` (rows of table ``name``) as one Parquet file in the live writer's layout.

    ``compress``: a segment that stays (sealed): statistics on every key column, ``step`` and
    ``tokens`` delta-encoded (``DELTA_BINARY_PACKED``: a series' steps ascend by one, so they cost
    next to nothing), other pages stored raw. About 8.3 bytes a ``layer_stats`` row (snappy over
    plain pages: 14.8) for less CPU than snappy, and faster to decode with pyarrow; DuckDB reads
    one series as fast (measured: BENCHMARKS.md section 3). Without it (small segments merged
    again soon) pages are stored raw and only the step columns get statistics (what lets a
    reader skip the file; metric and layer span all series in such a file): cheapest to write.
    Either way a column without NULLs is stored REQUIRED (:func:`required_columns`): no definition
    levels, ~30 ns a row less to write.
    """
    cols = table.column_names
    if name not in SERIES_KEYS:
        stats: bool | list[str] = True
    elif compress or name.endswith("_rollup"):
        # Rollup files are read by key on every chart (a series, a heatmap) and never grow large
        # enough to seal: without key statistics a one-layer series scanned every rollup row.
        stats = [c for c in cols if c in STAT_COLUMNS]
    else:
        stats = [c for c in cols if c in ("step", "bucket", "step_min", "step_max")]
    delta = {c: "DELTA_BINARY_PACKED" for c in ("step", "tokens")
             if compress and c in cols and pa.types.is_int64(table.schema.field(c).type)}
    options: dict[str, Any] = {
        "compression": "none",
        # Small integer keys are dictionary-encoded only in segments that stay (a few ns a row).
        "use_dictionary": [c for c in cols if c in DICT_COLUMNS or (compress and c in INT_DICT_COLUMNS)],
        "write_statistics": stats, "store_schema": False, "column_encoding": delta or None,
    }
    groups = key_groups(table, name) if compress and not name.endswith("_rollup") else None
    table = required_columns(table)
    if groups is None:
        pq.write_table(table, str(where), row_group_size=ROLLUP_ROW_GROUP_ROWS if name.endswith("_rollup")
                       else ROW_GROUP_ROWS, **options)
        return
    with pq.ParquetWriter(str(where), table.schema, **options) as writer:
        for start, length in groups:
            # One write per group: each call closes its own row group(s), so a group never holds
            # rows of two series and its min == max statistics on the key columns name the series.
            writer.write_table(table.slice(start, length), row_group_size=length)
        # The rows are in SORT_KEYS order (key_groups' precondition: merge_tables sorts them): said
        # in the footer for the series keys, a reader bisects the groups' statistics for one series
        # (~30 looked at in a sealed layer_stats file, not ~430).
        writer.add_key_value_metadata({SORTED_BY_KEY: ",".join(SORT_KEYS[name][:SERIES_KEYS[name]])})


#: Footer key-value entry of a segment whose rows (across row groups, not only within each, which
#: is all Parquet's ``sorting_columns`` says) ascend by the comma-separated columns it names.
SORTED_BY_KEY = "healthwatch.sorted_by"


#: Row groups of a sealed segment are cut where the series key changes (:func:`key_groups`), but a
#: group smaller than this takes the next series too (tiny series: not thousands of groups whose
#: footer would cost more to read than their rows).
KEY_GROUP_MIN_ROWS = 8_192


def key_groups(table: pa.Table, name: str) -> list[tuple[int, int]] | None:
    """``(start, rows)`` of each row group of a sealed segment of ``name`` with the series layout.

    The table is sorted by ``SORT_KEYS``: a group ends where the series key (the leading
    ``SERIES_KEYS[name]`` sort keys, e.g. metric and layer) changes, so a one-series read picks its
    groups from the footer's statistics alone (min == max on metric and layer) and decodes no other
    series' rows. A series longer than ``ROW_GROUP_ROWS`` is cut into groups of that size; series
    shorter than ``KEY_GROUP_MIN_ROWS`` share a group with the next. None when the table has no
    series key to cut on (the caller writes fixed-size groups).
    """
    lead = SERIES_KEYS.get(name, 0)
    keys = SORT_KEYS.get(name, [])[:lead]
    if not lead or table.num_rows == 0 or any(k not in table.column_names for k in keys):
        return None
    found = _runs(table, keys, "step")
    if found is None:
        return None
    starts = found[0].tolist()
    ends = [*starts[1:], table.num_rows]
    out: list[tuple[int, int]] = []
    cur, cur_n = 0, 0  # the open group: first row, rows
    for s, e in zip(starts, ends):
        n = e - s
        if cur_n and (cur_n >= KEY_GROUP_MIN_ROWS or n >= KEY_GROUP_MIN_ROWS or cur_n + n > ROW_GROUP_ROWS):
            out.append((cur, cur_n))
            cur, cur_n = s, 0
        if cur_n == 0:
            cur = s
        # A long series: whole groups of ROW_GROUP_ROWS, the remainder stays open.
        while cur_n + n > ROW_GROUP_ROWS:
            take = ROW_GROUP_ROWS - cur_n
            out.append((cur, ROW_GROUP_ROWS))
            cur, n, cur_n = cur + ROW_GROUP_ROWS, n - take, 0
        cur_n += n
        if e - s >= KEY_GROUP_MIN_ROWS:  # a long series' last group holds no other series
            out.append((cur, cur_n))
            cur_n = 0
    if cur_n:
        out.append((cur, cur_n))
    return out
