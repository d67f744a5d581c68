"""Merging segments: many sorted-or-not Parquet files of one (table, run) into one sorted file.

DuckDB does the merge with a bounded memory budget; the result is published with the segment
protocol of :mod:`healthwatch.store.segments` (manifest, publish, retire), so readers never see a
row twice or miss one.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
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
