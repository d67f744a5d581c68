"""The store: a directory of Parquet segments per (table, run, writer), queried with DuckDB.

Write side: :class:`StoreWriter` (one per run x attempt x rank) publishes immutable segments and
merges its own small segments in the background of the writer thread (log-structured levels,
so a run of a million steps stays at a bounded number of files).

Read side: :func:`open_store` returns a :class:`Store`, a DuckDB connection whose views
(``runs``, ``attempts``, ``scalars``, ``layer_stats``, ``expert_load``, ``events``, ``alerts``,
the ``*_effective`` views and the rollups) are rebuilt from a fresh directory listing whenever the
store changed. Queries retry when compaction retired a file between listing and reading, and skip
(with one warning naming it) a file that is not a readable segment.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from healthwatch.schema import (
    ATTEMPT_TABLES,
    SCHEMA_VERSION,
    SORT_KEYS,
    TABLES,
    SchemaError,
    check_schema_version,
    validate_run_name,
)
from healthwatch.segments import (
    iter_run_dirs,
    list_segments,
    merge_lock,
    parse_segment,
    publish_merge,
    recover_directory,
    table_dir,
    write_segment,
)

log = logging.getLogger("healthwatch.store")

META_FILE = "healthwatch.json"
ENV_STORE = "HEALTHWATCH_STORE"
DEFAULT_STORE = "healthwatch-store"
ROLLUP_BUCKETS = (100, 1_000, 10_000)


def default_store_path(store: str | os.PathLike[str] | None = None) -> Path:
    """Resolve the store path: explicit argument, then ``$HEALTHWATCH_STORE``, then ``./healthwatch-store``."""
    if store is not None:
        return Path(store)
    return Path(os.environ.get(ENV_STORE) or DEFAULT_STORE)


def _sql_str(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _read_meta(root: Path) -> dict[str, Any]:
    try:
        return json.loads((root / META_FILE).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise SchemaError(f"{root / META_FILE}: unreadable store metadata ({exc})") from exc


def init_store(root: str | os.PathLike[str]) -> Path:
    """Create the store directory and its metadata file if needed; refuse a newer schema."""
    root = Path(root)
    meta = _read_meta(root) if root.exists() else {}
    check_schema_version(meta.get("schema_version"), f"store {root}")
    if not meta:
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".tmp-{uuid.uuid4().hex}.partial"
        tmp.write_text(json.dumps({"schema_version": SCHEMA_VERSION, "format": "healthwatch-segments"}))
        os.replace(tmp, root / META_FILE)
    return root


# --------------------------------------------------------------------------------------------
# write side


class StoreWriter:
    """Publishes segments of one writer (run x attempt x rank) and merges its own small ones.

    Not thread-safe: one writer belongs to one thread (the Monitor's background writer).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        run: str,
        attempt: int = 1,
        rank: int = 0,
        merge_fanout: int = 8,
    ) -> None:
        self.root = Path(root)
        self.run = validate_run_name(run)
        self.attempt = attempt
        self.rank = rank
        self.writer_id = f"a{attempt:04d}r{rank:05d}x{uuid.uuid4().hex[:8]}"
        self.merge_fanout = max(2, merge_fanout)
        self._seq = 0
        self._initialised = False

    def _ensure_init(self) -> None:
        if not self._initialised:
            init_store(self.root)
            self._initialised = True

    def write(self, table: str, data: pa.Table | dict[str, Sequence[Any]]) -> Path | None:
        """Publish one segment of ``table`` (an Arrow table or column dict); returns its path."""
        schema = TABLES[table]
        if isinstance(data, dict):
            data = pa.Table.from_pydict({f.name: data[f.name] for f in schema}, schema=schema)
        else:
            data = data.select(schema.names).cast(schema)
        if data.num_rows == 0:
            return None
        self._ensure_init()
        self._seq += 1
        name = f"{self.writer_id}-{self._seq:09d}-L0.parquet"
        return write_segment(table_dir(self.root, table, self.run), name, data)

    def compact_own(self, table: str) -> int:
        """Merge this writer's segments level by level (``merge_fanout`` files of a level -> one).

        Returns the number of merges done. Skips silently when another process holds the lock.
        """
        directory = table_dir(self.root, table, self.run)
        merges = 0
        with merge_lock(directory, blocking=False) as locked:
            if not locked:
                return 0
            while True:
                mine = [s for s in map(parse_segment, list_segments(directory)) if s.writer == self.writer_id]
                by_level: dict[int, list] = {}
                for seg in mine:
                    by_level.setdefault(seg.level, []).append(seg)
                level = next((lv for lv in sorted(by_level) if len(by_level[lv]) >= self.merge_fanout), None)
                if level is None:
                    return merges
                group = sorted(by_level[level], key=lambda s: s.seq)[: self.merge_fanout]
                target = f"{self.writer_id}-{group[-1].seq:09d}-L{level + 1}.parquet"
                merge_files(directory, [s.path for s in group], target, table)
                merges += 1


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
    import pyarrow.parquet as pq

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
    import pyarrow.parquet as pq

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
# read side


def _empty_select(table: str) -> str:
    cols = ["NULL::VARCHAR AS run"]
    for field in TABLES[table]:
        cols.append(f'NULL::{_duck_type(field.type)} AS "{field.name}"')
    return "SELECT " + ", ".join(cols) + " WHERE false"


def _duck_type(t: pa.DataType) -> str:
    if pa.types.is_int32(t):
        return "INTEGER"
    if pa.types.is_int64(t):
        return "BIGINT"
    if pa.types.is_floating(t):
        return "DOUBLE"
    if pa.types.is_list(t):
        return _duck_type(t.value_type) + "[]"
    return "VARCHAR"


_FILE_IN_ERROR = re.compile(r"""(?:file|File)\s+["']?([^"'\s]+\.parquet)""")


#: How often a query is retried when files were retired (or found unreadable) under it.
_QUERY_TRIES = 20


class _Vanished(Exception):
    """A listed file disappeared before it could be checked (compaction retired it): list again."""


def _compatible(found: pa.DataType, expected: pa.DataType) -> bool:
    """Whether a column of type ``found`` reads as ``expected`` without a lossy or failing cast."""
    if pa.types.is_integer(expected):
        return pa.types.is_integer(found) and found.bit_width == expected.bit_width
    if pa.types.is_floating(expected):
        return pa.types.is_floating(found)
    if pa.types.is_string(expected) or pa.types.is_large_string(expected):
        return pa.types.is_string(found) or pa.types.is_large_string(found)
    if pa.types.is_list(expected):
        return (pa.types.is_list(found) or pa.types.is_large_list(found)) and _compatible(
            found.value_type, expected.value_type
        )
    return found.equals(expected)


def segment_problem(path: str | os.PathLike[str], table: str) -> str | None:
    """Why ``path`` is not a readable segment of ``table`` (``None`` when it is one).

    Reads only the Parquet footer. A file that is not Parquet, lacks a column of the table, has a
    column of an incompatible type, or carries its own ``run`` column (the run comes from the
    directory) is refused, so a stray or foreign file can neither break a query nor pass its rows
    off as the table's. Raises ``FileNotFoundError`` when the file vanished.
    """
    try:
        schema = pq.read_schema(path)
    except FileNotFoundError:
        raise
    except (OSError, pa.ArrowException, ValueError) as exc:
        return f"not a readable Parquet file ({str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__})"
    if "run" in schema.names:
        return "has its own 'run' column (a segment's run comes from its directory)"
    for field in TABLES[table]:
        idx = schema.get_field_index(field.name)
        if idx < 0:
            return f"no column {field.name!r} (not a {table} segment)"
        found = schema.field(idx).type
        if not _compatible(found, field.type):
            return f"column {field.name!r} is {found}, expected {field.type}"
    return None


def _full_read_problem(path: str) -> str | None:
    """Why a file named in a query error is unreadable (footer, schema and every page), or None."""
    table_part = Path(path).parent.parent.name
    table = table_part[len("table="):] if table_part.startswith("table=") else None
    try:
        if table in TABLES:
            problem = segment_problem(path, table)
            if problem:
                return problem
        for _batch in pq.ParquetFile(path).iter_batches(batch_size=65_536):
            pass
    except FileNotFoundError:
        return None
    except (OSError, pa.ArrowException, ValueError) as exc:
        return f"unreadable ({str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__})"
    return None


class Result:
    """A lazily executed query; materialise it with :meth:`pl`, :meth:`arrow`, :meth:`fetchall`, :meth:`df`.

    Execution retries when the store changed underneath (a segment retired by compaction).
    """

    def __init__(self, store: Store, query: str, params: Sequence[Any] | dict[str, Any] | None) -> None:
        self._store = store
        self._query = query
        self._params = params

    def _run(self, fn: str) -> Any:
        return self._store._execute(self._query, self._params, fn)

    def pl(self) -> Any:
        """Result as a polars DataFrame."""
        return self._run("pl")

    def arrow(self) -> pa.Table:
        """Result as an Arrow table."""
        return self._run("arrow")

    def df(self) -> Any:
        """Result as a pandas DataFrame (pandas must be installed)."""
        return self._run("df")

    def fetchall(self) -> list[tuple[Any, ...]]:
        """Result as a list of tuples."""
        return self._run("fetchall")

    def fetchone(self) -> tuple[Any, ...] | None:
        """First row of the result, or None."""
        rows = self._run("fetchall")
        return rows[0] if rows else None


class Store:
    """Read-side handle on a store: a DuckDB connection with views over the live segments.

    Thread-safe: queries are serialised on one connection (DuckDB connections are not
    re-entrant across threads).
    """

    def __init__(self, root: str | os.PathLike[str], auto_refresh: bool = True) -> None:
        """Open the store at ``root``.

        ``auto_refresh`` re-lists the segment directories before every query (always current).
        Off, the views change only at :meth:`refresh` (or when a query meets a retired file):
        an app that refreshes once per page run saves a directory listing per query (~50 a page).
        """
        self.root = Path(root)
        self.auto_refresh = auto_refresh
        if not self.root.is_dir():
            raise FileNotFoundError(f"no healthwatch store at {self.root} (directory does not exist)")
        meta = _read_meta(self.root)
        check_schema_version(meta.get("schema_version"), f"store {self.root}")
        self.con = duckdb.connect()
        try:
            # DuckDB plans an ASOF join as a nested loop when it guesses the left side is tiny
            # (≤ 64 rows); its estimates over filtered Parquet views are that low, so a token-aligned
            # join of 1M x 100k rows became a 10^11-row nested loop. Always use the real ASOF join.
            self.con.execute("SET asof_loop_join_threshold = 0")
        except duckdb.Error:  # older DuckDB without the setting: it has no nested-loop ASOF either
            pass
        try:
            # Segments are immutable (a merge publishes a new name), so caching their Parquet footers
            # is safe; a compacted 1M-step file has ~2,700 row groups whose metadata cost ~80 ms a query.
            self.con.execute("SET parquet_metadata_cache = true")
        except duckdb.Error:  # an older DuckDB without the setting is only slower
            pass
        self._lock = threading.RLock()
        self._signature: tuple[Any, ...] | None = None
        self._bad_files: set[str] = set()
        self._warned: set[str] = set()
        self._checked: set[str] = set()  # files whose footer was checked (segments are immutable)
        self._read_ok: set[str] = set()  # files read in full once after a query failed on corrupt data
        self.version = 0  # bumps whenever the listing changed; apps cache on it
        self._refreshed_at = float("-inf")
        self.refresh()

    # -- listing / views ---------------------------------------------------------------------
    def _listing(self) -> tuple[dict[str, list[Path]], tuple[Any, ...], int]:
        """Live segments per table, the directories' signature, and how many files were new.

        New files get their footer checked after every directory is listed (see
        :func:`segment_problem`); the caller lists again when there were any, so that the time
        between listing and querying stays short while compaction retires files.
        """
        files: dict[str, list[Path]] = {}
        sig: list[Any] = []
        seen: set[str] = set()
        fresh: list[tuple[str, Path]] = []
        for table in TABLES:
            tdir = self.root / f"table={table}"
            try:
                sig.append((table, tdir.stat().st_mtime_ns))
            except FileNotFoundError:
                sig.append((table, None))
            paths: list[Path] = []
            for _run, rdir in iter_run_dirs(self.root, table):
                try:
                    sig.append((str(rdir), rdir.stat().st_mtime_ns))
                except FileNotFoundError:
                    continue
                for p in list_segments(rdir):
                    key = str(p)
                    if key in self._bad_files:
                        continue
                    if key not in self._checked:
                        fresh.append((table, p))
                    seen.add(key)
                    paths.append(p)
            files[table] = paths
        for table, p in fresh:
            try:
                problem = segment_problem(p, table)
            except FileNotFoundError as exc:
                raise _Vanished(str(p)) from exc
            if problem:
                self._skip(str(p), problem)
                files[table].remove(p)
            else:
                self._checked.add(str(p))
        self._checked &= seen  # forget retired files (a long-lived app sees many come and go)
        self._read_ok &= seen
        return files, tuple(sig), len(fresh)

    def _skip(self, path: str, why: str) -> None:
        """Leave ``path`` out of every view from now on, with one warning naming it."""
        self._bad_files.add(path)
        if path not in self._warned:
            self._warned.add(path)
            log.warning("skipping unreadable segment %s: %s", path, why)

    def refresh_if_older(self, max_age_s: float) -> bool:
        """:meth:`refresh` unless the last listing is younger than ``max_age_s`` seconds."""
        if time.monotonic() - self._refreshed_at < max_age_s:
            return False
        return self.refresh()

    def refresh(self, force: bool = False) -> bool:
        """Rebuild the views if the store's directories changed; returns True if rebuilt."""
        with self._lock:
            self._refreshed_at = time.monotonic()
            relisted = False
            for attempt in range(20):
                if attempt > 1:  # files keep changing under us: let the writer or compactor finish
                    time.sleep(min(0.05, 0.002 * attempt))
                try:
                    files, sig, fresh = self._listing()
                except _Vanished:  # compaction retired a file while it was being checked
                    force = True
                    continue
                if fresh and not relisted:  # checking new files took time: list again, quickly
                    relisted = True
                    continue
                if not force and sig == self._signature:
                    return False
                try:
                    self._build_views(files)
                except (duckdb.IOException, duckdb.InvalidInputException) as exc:
                    # A file retired by compaction between listing and binding: list again.
                    self._handle_read_error(exc)
                    force = True
                    continue
                self._signature = sig
                self.version += 1
                return True
            raise RuntimeError(f"store {self.root} keeps changing; could not build a consistent listing")

    def _build_views(self, files: dict[str, list[Path]]) -> None:
        for table, paths in files.items():
            cols = ", ".join(f'"{f.name}"' for f in TABLES[table])
            if paths:
                flist = "[" + ", ".join(_sql_str(str(p)) for p in paths) + "]"
                body = (
                    f"SELECT run, {cols} FROM read_parquet({flist}, hive_partitioning = true, "
                    "hive_types = {'run': VARCHAR, 'table': VARCHAR})"
                )
            else:
                body = _empty_select(table)
            name = f"{table}_raw" if table in ("runs",) else table
            self.con.execute(f"CREATE OR REPLACE VIEW {name} AS {body}")
        # First definition of a run wins: a resumed attempt does not redefine lineage.
        self.con.execute(
            "CREATE OR REPLACE VIEW runs AS SELECT * FROM runs_raw "
            "QUALIFY row_number() OVER (PARTITION BY run ORDER BY created) = 1"
        )
        self.con.execute(
            "CREATE OR REPLACE VIEW attempt_bounds AS "
            "SELECT a.run, a.attempt, a.start_step, "
            "(SELECT min(b.start_step) FROM attempts b WHERE b.run = a.run AND b.attempt > a.attempt) "
            "AS superseded_from FROM attempts a"
        )
        for table in ATTEMPT_TABLES:
            self.con.execute(
                f"CREATE OR REPLACE VIEW {table}_all AS SELECT t.*, "
                "coalesce(t.step >= b.superseded_from, false) AS superseded "
                f"FROM {table} t LEFT JOIN attempt_bounds b ON t.run = b.run AND t.attempt = b.attempt"
            )
            self.con.execute(
                f"CREATE OR REPLACE VIEW {table}_effective AS SELECT t.* FROM {table} t "
                "LEFT JOIN attempt_bounds b ON t.run = b.run AND t.attempt = b.attempt "
                "WHERE b.superseded_from IS NULL OR t.step < b.superseded_from"
            )

    def files(self, table: str, run: str | None = None) -> list[Path]:
        """Live segment files of ``table`` (optionally of one run)."""
        out: list[Path] = []
        for r, rdir in iter_run_dirs(self.root, table):
            if run is None or r == run:
                out.extend(list_segments(rdir))
        return out

    # -- queries -----------------------------------------------------------------------------
    def sql(self, query: str, params: Sequence[Any] | dict[str, Any] | None = None) -> Result:
        """A parameterised query over the store's views; call ``.pl()``/``.arrow()``/``.fetchall()``."""
        return Result(self, query, params)

    def _execute(self, query: str, params: Any, fn: str) -> Any:
        with self._lock:
            if self.auto_refresh:
                self.refresh()
            last: Exception | None = None
            for attempt in range(_QUERY_TRIES):
                if attempt:  # a file was retired under us: give the compactor's publish a moment
                    time.sleep(min(0.05, 0.002 * attempt))
                try:
                    if fn == "fetchall":
                        return self.con.execute(query, params).fetchall()
                    rel = self.con.sql(query, params=params)
                    if fn == "pl":
                        return rel.pl()
                    if fn == "arrow":
                        return rel.to_arrow_table() if hasattr(rel, "to_arrow_table") else rel.arrow()
                    return rel.df()
                except (duckdb.IOException, duckdb.InvalidInputException, duckdb.HTTPException) as exc:
                    last = exc
                    self._handle_read_error(exc)
                    self.refresh(force=True)
                except duckdb.Error as exc:
                    # A corrupt data page surfaces as a bare duckdb.Error naming no file
                    # ("TProtocolException: Invalid data"); SQL mistakes have their own subclasses.
                    if type(exc) is not duckdb.Error or not self._scan_for_corrupt_files(exc):
                        raise
                    last = exc
                    self.refresh(force=True)
            assert last is not None
            raise last

    def _scan_for_corrupt_files(self, exc: Exception) -> bool:
        """Read every listed file not yet fully read once; skip the unreadable ones. True if any was."""
        found = False
        for table in TABLES:
            for path in self.files(table):
                key = str(path)
                if key in self._bad_files or key in self._read_ok:
                    continue
                problem = _full_read_problem(key)
                if problem:
                    self._skip(key, f"{problem}; {str(exc).splitlines()[0][:200]}")
                    found = True
                else:
                    self._read_ok.add(key)
        return found

    def _handle_read_error(self, exc: Exception) -> None:
        """Skip a file that exists but is not a readable segment; a vanished one just relists."""
        msg = str(exc)
        for match in _FILE_IN_ERROR.finditer(msg):
            path = match.group(1)
            if path in self._bad_files or not os.path.exists(path):
                continue
            # An error may name a good file too ("... was read from the original file X"):
            # only a file that really fails to read is skipped.
            problem = _full_read_problem(path)
            if problem:
                self._skip(path, f"{problem}; {msg.splitlines()[0][:200]}")

    @property
    def bad_files(self) -> set[str]:
        """Files skipped because they were not readable segments."""
        return set(self._bad_files)

    def close(self) -> None:
        """Close the DuckDB connection."""
        self.con.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_store(path: str | os.PathLike[str] | None = None) -> Store:
    """Open a store for reading (DuckDB views over its segments). ``None`` uses the default path."""
    return Store(default_store_path(path))


# --------------------------------------------------------------------------------------------
# compaction


def _rollup_sql(table: str, run: str, bucket: int) -> str:
    if table == "layer_stats":
        src = "layer_stats_effective"
        keys = "layer, any_value(layer_type) AS layer_type, metric"
        group = "bucket, layer, metric"
    else:
        src = "scalars_effective"
        keys = "name"
        group = "bucket, name"
    return (
        f"SELECT {bucket}::BIGINT AS bucket_size, (step // {bucket})::BIGINT AS bucket, {keys}, "
        "min(step) AS step_min, max(step) AS step_max, min(tokens) AS tokens_min, max(tokens) AS tokens_max, "
        "count(*) AS n, min(value) AS vmin, max(value) AS vmax, avg(value) AS vmean, "
        f"arg_max(value, step) AS vlast FROM {src} WHERE run = {_sql_str(run)} GROUP BY {group}"
    )


def _mergeable(paths: list[Path], table: str) -> list[Path]:
    """The readable segments of ``table`` among ``paths``; a stray or corrupt file is left in place."""
    out = []
    for path in paths:
        try:
            problem = segment_problem(path, table)
        except FileNotFoundError:
            continue
        if problem:
            log.warning("compaction leaves %s alone: %s", path, problem)
            continue
        out.append(path)
    return out


def compact_run(root: Path, run: str, rollups: bool = True, min_files: int = 2) -> dict[str, int]:
    """Merge every table of one run into one sorted segment each and rewrite its rollups.

    Returns ``{table: files_before}`` for the tables it merged. Safe to run beside live writers
    and readers (merges publish first, retire second).
    """
    merged: dict[str, int] = {}
    for table in TABLES:
        if table.endswith("_rollup"):
            continue
        directory = table_dir(root, table, run)
        if not directory.is_dir():
            continue
        with merge_lock(directory, blocking=True) as locked:
            if not locked:
                continue
            recover_directory(directory)
            sources = _mergeable(list_segments(directory), table)
            if len(sources) >= min_files:
                target = f"compact{uuid.uuid4().hex[:8]}-{int(time.time()):012d}-L99.parquet"
                merge_files(directory, sources, target, table)
                merged[table] = len(sources)
    if rollups:
        write_rollups(root, run)
    return merged


def write_rollups(root: Path, run: str) -> None:
    """Recompute the per-bucket min/max/mean/last rollups of one run from its effective rows."""
    store = Store(root)
    try:
        for table in ("layer_stats", "scalars"):
            if not store.files(table, run):
                continue
            rtable = f"{table}_rollup"
            directory = table_dir(root, rtable, run)
            directory.mkdir(parents=True, exist_ok=True)
            with merge_lock(directory, blocking=True) as locked:
                if not locked:
                    continue
                recover_directory(directory)
                old = list_segments(directory)
                tmp = directory / f".tmp-{uuid.uuid4().hex}.partial"
                order = "bucket_size, metric, layer, bucket" if table == "layer_stats" else "bucket_size, name, bucket"
                union = " UNION ALL ".join(f"({_rollup_sql(table, run, b)})" for b in ROLLUP_BUCKETS)
                cols = ", ".join(f'"{c}"' for c in TABLES[rtable].names)
                with store._lock:
                    store.refresh()
                    store.con.execute(
                        f"COPY (SELECT {cols} FROM ({union}) ORDER BY {order}) TO {_sql_str(str(tmp))} "
                        "(FORMAT parquet, COMPRESSION zstd, ROW_GROUP_SIZE 122880)"
                    )
                publish_merge(directory, old, tmp, f"rollup{uuid.uuid4().hex[:8]}-{int(time.time()):012d}-L99.parquet")
    finally:
        store.close()


def compact_store(root: str | os.PathLike[str], runs: Sequence[str] | None = None, rollups: bool = True) -> dict[str, dict[str, int]]:
    """Compact every run of a store (or the given runs). Returns ``{run: {table: files_before}}``."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no healthwatch store at {root}")
    check_schema_version(_read_meta(root).get("schema_version"), f"store {root}")
    found: set[str] = set()
    for table in TABLES:
        found.update(r for r, _ in iter_run_dirs(root, table))
    out: dict[str, dict[str, int]] = {}
    for run in sorted(found if runs is None else set(runs) & found):
        out[run] = compact_run(root, run, rollups=rollups)
    return out


def host_name() -> str:
    """This machine's host name (recorded on every attempt)."""
    return socket.gethostname()
