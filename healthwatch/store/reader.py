"""The read side: :class:`Store`, a DuckDB connection with views over the live segments.

Views (``runs``, ``attempts``, ``scalars``, ``layer_stats``, ``expert_load``, ``events``,
``alerts``, the rollups, and the ``*_effective``/``*_all`` views generated from
:mod:`healthwatch.query.timeline`) are built lazily: a query lists and checks only the tables it
names, so opening a store and reading one series never touches unrelated tables. A table's view
is rebuilt when its directories changed. Queries retry when compaction retired a file between
listing and reading, and skip (with one warning naming it) a file that is not a readable segment.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import functools
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import duckdb
import pyarrow as pa

from healthwatch.schema import ATTEMPT_TABLES, TABLES, check_schema_version
from healthwatch.store import duck as _duck
from healthwatch.store import fs as _fs
from healthwatch.store.merge import SORTED_BY_KEY
from healthwatch.store.merge import sql_str as _sql_str
from healthwatch.store.meta import default_store_path, read_meta
from healthwatch.store.segments import (
    full_read_problem,
    iter_run_dirs,
    list_segments,
    overlaps,
    parse_segment,
    schema_problem,
    segment_problem,
    table_dir,
)
from healthwatch.store.timeline import view_sql

log = logging.getLogger("healthwatch.store")

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


def _polars_type(t: pa.DataType) -> Any:
    """The polars type of a store column's Arrow type (an empty Arrow table would import pandas)."""
    import polars as pl

    if pa.types.is_list(t):
        return pl.List(_polars_type(t.value_type))
    return {"int32": pl.Int32, "int64": pl.Int64, "double": pl.Float64, "string": pl.Utf8}.get(str(t), pl.Utf8)


def _key_code(df: Any) -> Any:
    """One exact Int64 per row of ``df``'s (at most two) key columns, as a polars expression, or None.

    Distinct rows of a 122,880-row group by this code cost ~1 ms against ~5 ms for a multi-column
    ``unique`` (a fresh process's first bounded read pays it for every candidate group). Exact, not
    a hash: categorical codes (< 2**31) and integers of at most 32 bits are packed side by side.
    """
    import polars as pl

    narrow = {pl.Int8, pl.Int16, pl.Int32, pl.UInt8, pl.UInt16}
    parts = []
    for c, t in df.schema.items():
        if t == pl.Categorical:
            parts.append(pl.col(c).to_physical().cast(pl.Int64))
        elif t in narrow:
            parts.append(pl.col(c).cast(pl.Int64) + (1 << 31))  # into [0, 2**32)
        else:
            return None
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 2:
        return parts[0] * (1 << 32) + parts[1]
    return None


#: A statistic of :class:`_Footer` not made plain Python yet.
_UNREAD: Any = object()


class _Footer:
    """One segment's Parquet footer, kept per open :class:`Store` (segments are immutable), with
    each column's per-row-group ``(min, max)`` made plain Python once, on first use.

    A bounded read (the last N steps of one series) then picks the row groups to decode from
    cached tuples instead of re-reading ~40 footers and making a pyarrow call per row group and
    column each time.
    """

    __slots__ = ("meta", "index", "_bounds", "attempts", "keys", "stamp", "sorted_by")

    def __init__(self, meta: Any, stamp: tuple[int, int] = (0, 0)) -> None:
        self.meta = meta
        self.stamp = stamp  # the file's (size, mtime_ns) when the footer was read
        self.index = {meta.schema.column(i).name: i for i in range(meta.num_columns)}
        self._bounds: dict[str, list[tuple[Any, Any] | None]] = {}
        self.attempts: frozenset[Any] | None = None  # the file's attempt values, once known
        #: per tuple of key columns: {row group: the distinct key values it holds} (see Store._groups_with)
        self.keys: dict[tuple[str, ...], dict[int, frozenset[tuple[Any, ...]]]] = {}
        # Columns the file's rows ascend by, across row groups (a sealed segment says so in its
        # footer: merge.SORTED_BY_KEY); () when it does not say.
        kv = meta.metadata or {}
        said = kv.get(SORTED_BY_KEY.encode(), b"").decode()
        self.sorted_by: tuple[str, ...] = tuple(c for c in said.split(",") if c) if said else ()

    def bounds(self, col: str) -> list[tuple[Any, Any] | None]:
        """Per row group, the exact ``(min, max)`` of ``col``, or None where the statistics are
        missing, inexact or the group holds NULLs (such a group is neither ruled out nor inside)."""
        return [self.bound(col, g) for g in range(self.meta.num_row_groups)]

    def bound(self, col: str, group: int) -> tuple[Any, Any] | None:
        """:meth:`bounds` of one row group, made plain Python on first use (a sealed segment has
        hundreds of groups and a one-series read needs the step bounds of one or two: each
        statistic costs a few pyarrow objects)."""
        out = self._bounds.get(col)
        if out is None:
            out = self._bounds[col] = [_UNREAD] * self.meta.num_row_groups
        b = out[group]
        if b is _UNREAD:
            i = self.index.get(col)
            stats = None if i is None else self.meta.row_group(group).column(i).statistics
            if stats is None or not stats.has_min_max or stats.null_count or \
                    not getattr(stats, "is_max_value_exact", True) or \
                    not getattr(stats, "is_min_value_exact", True):
                b = None
            else:
                b = (stats.min, stats.max)
            out[group] = b
        return b  # type: ignore[no-any-return]

    def candidates(self, ranges: dict[str, tuple[Any, Any]]) -> Sequence[int]:
        """The row groups that may hold rows in ``ranges`` (a superset: :meth:`fit` decides each).

        Every group, unless the file declares its order (:attr:`sorted_by`) and ``ranges`` bounds its
        leading sort columns: then the groups are bisected on their statistics, one sort column at a
        time, as deep as the columns are asked for one value (a sealed segment's 324 groups: ~30
        statistics made plain for one series, not ~430 in a linear pass).
        """
        n = self.meta.num_row_groups
        lo_g, hi_g, edges = 0, n, []
        for col in self.sorted_by:
            if col not in ranges or lo_g >= hi_g:
                break
            lo, hi = ranges[col]
            # Within [lo_g, hi_g) every group holds one value of the earlier sort columns, so its
            # rows ascend by ``col``: a group's max is its last row's, its min its first row's,
            # both non-decreasing from group to group.
            first = self._first(col, lo_g, hi_g, lambda b, lo=lo: b[1] >= lo)
            end = self._first(col, first, hi_g, lambda b, hi=hi: b[0] > hi) if first is not None else None
            if first is None or end is None:
                return range(n)  # a statistic is missing: no bisection
            lo_g, hi_g = first, end
            if lo != hi:
                break
            # Only groups wholly at this value ascend by the next column: a group that also holds
            # another value (tiny series share a group) sits at either end and stays a candidate.
            while lo_g < hi_g and self.bound(col, lo_g) != (lo, lo):
                edges.append(lo_g)
                lo_g += 1
            while hi_g > lo_g and self.bound(col, hi_g - 1) != (lo, lo):
                edges.append(hi_g - 1)
                hi_g -= 1
        if not edges:
            return range(lo_g, hi_g)
        return sorted({*edges, *range(lo_g, hi_g)})

    def _first(self, col: str, lo: int, hi: int, past: Callable[[tuple[Any, Any]], bool]) -> int | None:
        """The first group in ``[lo, hi)`` whose ``col`` bounds satisfy ``past`` (monotone there),
        ``hi`` if none; None when a group looked at has no exact statistics."""
        while lo < hi:
            mid = (lo + hi) // 2
            b = self.bound(col, mid)
            if b is None:
                return None
            if past(b):
                hi = mid
            else:
                lo = mid + 1
        return lo

    def fit(self, group: int, ranges: dict[str, tuple[Any, Any]]) -> set[str] | None:
        """Which ``ranges`` columns hold only values in ``[lo, hi]`` in row group ``group``, from its
        statistics; ``None`` when the statistics rule the group out (no row can match)."""
        inside: set[str] = set()
        for col, (lo, hi) in ranges.items():
            b = self.bound(col, group)
            if b is None:
                continue
            if b[1] < lo or b[0] > hi:
                return None
            if b[0] >= lo and b[1] <= hi:
                inside.add(col)
        return inside


#: The run whose rows the queries of a :func:`per_run` function read (None: any run).
_RUN_SCOPE: contextvars.ContextVar[str | None] = contextvars.ContextVar("healthwatch_run_scope", default=None)

_F = TypeVar("_F", bound=Callable[..., Any])


def per_run(fn: _F) -> _F:
    """Mark a query function ``fn(store, run, ...)`` whose every query reads only ``run``'s rows.

    While it runs, the store lists and reads only ``run``'s folders of the tables its queries name
    (a cheap open: no listing or footer of another run); a view so built grows by a run at a time,
    and covers every run from the first store-wide query on.
    """

    @functools.wraps(fn)
    def scoped(store: Any, run: str, *args: Any, **kwargs: Any) -> Any:
        token = _RUN_SCOPE.set(str(run))
        try:
            return fn(store, run, *args, **kwargs)
        finally:
            _RUN_SCOPE.reset(token)

    return scoped  # type: ignore[return-value]


@contextlib.contextmanager
def run_scope(run: str) -> Iterator[None]:
    """Within the block, queries read only ``run``'s rows (as inside a :func:`per_run` function)."""
    token = _RUN_SCOPE.set(str(run))
    try:
        yield
    finally:
        _RUN_SCOPE.reset(token)


_FILE_IN_ERROR = re.compile(r"""(?:file|File)\s+["']?([^"'\s]+\.parquet)""")


#: Candidate rows of one file above which :meth:`Store.scan_run` decodes the filtered columns first
#: and the others only for row groups with a match (a 122,880-row group of a sealed segment).
_TWO_PHASE_ROWS = 100_000


def _numpy_of(col: Any) -> Any:
    """A NULL-free fixed-width Arrow (chunked) array as one NumPy array, read from its buffers.

    Not ``to_numpy()``: pyarrow's conversions import pandas on first use (~0.5 s of a fresh
    process), which a 2,000-row read must not pay.
    """
    import numpy as np

    dtype = np.dtype(col.type.to_pandas_dtype())
    parts = [np.frombuffer(ch.buffers()[1], dtype=dtype, count=ch.offset + len(ch))[ch.offset:]
             for ch in getattr(col, "chunks", [col]) if len(ch)]
    if not parts:
        return np.zeros(0, dtype=dtype)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _read_footer(path: str) -> Any:
    """The Parquet footer of the local segment ``path``.

    From a memory map, not the path: pyarrow resolves a path's file system on each call (~0.5 ms;
    a fresh process's one-series read opens two files twice), and a mapped file is read without
    copies into pyarrow's buffers. (Segments are immutable; a merge that retires one unlinks it,
    which leaves a mapping readable.)
    """
    import pyarrow.parquet as pq

    with pa.memory_map(path) as src:
        return pq.read_metadata(src)


class _NotFast(Exception):
    """:meth:`Store.scan_arrays` cannot filter a segment exactly with NumPy: ask :meth:`Store.scan_run`."""


#: Bytes of decoded segment sections one open Store keeps for ``scan_run(cache=...)`` (least
#: recently used dropped first): the 1,000-step rollups of three metrics of a 1M x 108 run are ~25 MB.
_SECTION_CACHE_BYTES = int(float(os.environ.get("HEALTHWATCH_READ_CACHE_MB", "256")) * 2**20)

#: ``s3://`` segments of at most this many bytes are read by the direct paths (scan_run, footers) from a
#: whole local copy (SegmentCache, per file); larger ones by ranged GETs of their footer and the row
#: groups a read needs (env ``HEALTHWATCH_S3_COPY_BYTES``): a rollup file is read whole in one GET, a
#: sealed 20 MiB raw segment of which a one-series read needs one row group is not downloaded.
_S3_COPY_BYTES = int(os.environ.get("HEALTHWATCH_S3_COPY_BYTES", 8 * 2**20))

#: How often a query is retried when files were retired (or found unreadable) under it.
_QUERY_TRIES = 20


def _side_by_side(fn: Callable[[Any], None], items: Sequence[Any], parallel: bool = True) -> None:
    """``fn`` on every item: on up to 8 threads when ``parallel`` and there are several (object-storage
    reads, each waiting on the network), else one after another."""
    if parallel and len(items) > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(8, len(items))) as pool:
            list(pool.map(fn, items))
    else:
        for item in items:
            fn(item)


def _vanished_object(exc: OSError) -> bool:
    """Whether ``exc`` says a listed object is gone (retired by a merge), not that it is unreadable."""
    return isinstance(exc, FileNotFoundError) or "NOT_FOUND" in str(exc) or "NoSuchKey" in str(exc)


class _Vanished(Exception):
    """A listed file disappeared before it could be checked (compaction retired it): list again."""


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
        self.root = _fs.root_path(root)
        self.auto_refresh = auto_refresh
        if not _fs.store_exists(self.root):
            raise FileNotFoundError(f"no healthwatch store at {self.root} (directory does not exist)")
        meta = read_meta(self.root)
        check_schema_version(meta.get("schema_version"), f"store {self.root}")
        self._con: Any = None  # DuckDB, connected at the first SQL query (see con)
        self._lock = threading.RLock()
        self._sigs: dict[str, tuple[Any, ...]] = {}  # per built table: its directories' signature
        self._scope: dict[str, frozenset[str] | None] = {}  # per built table: the runs its view covers (None: all)
        self._bad_files: set[str] = set()
        self._warned: set[str] = set()
        self._checked: set[str] = set()  # files whose footer was checked (segments are immutable)
        self._footers: dict[str, tuple[tuple[int, int], _Footer]] = {}  # scan_run/run_extremes footers
        # scan_run(cache=...): decoded sections of segments, least recently used first (see _section)
        self._sections: collections.OrderedDict[tuple[Any, ...], Any] = collections.OrderedDict()
        self._section_bytes = 0
        self._joins: dict[tuple[Any, ...], Any] = {}  # scan_run(cache=...): sections joined per listing
        self._read_ok: set[str] = set()  # files read in full once after a query failed on corrupt data
        self._s3_cache: dict[str, dict[str, Any]] = {}  # s3:// roots, per table: footers (small tables: rows)
        self._segment_cache: Any = False  # s3:// roots: local copies of segments (objectstore.SegmentCache)
        self._tails: dict[str, bytes] = {}  # s3:// roots: last bytes (footers) of segments read by ranged GETs
        self.version = 0  # bumps whenever a built table's listing changed; apps cache on it
        self._refreshed_at = float("-inf")

    @property
    def con(self) -> Any:
        """The DuckDB connection with the store's views, connected at first use.

        Opening a store costs no DuckDB connection (tens of ms in a fresh process): a question the
        store answers without SQL (:meth:`scan_run`) never pays for one.
        """
        if self._con is None:
            with self._lock:
                if self._con is None:
                    self._connect()
        return self._con

    def _connect(self) -> None:
        # A cursor of the process-wide database (~30 µs; a connect costs ~80-100 ms): the views
        # are TEMP views, so each store's names stay its own.
        con = _duck.cursor()
        try:
            # DuckDB plans an ASOF join as a nested loop when it guesses the left side is tiny
            # (≤ 64 rows); its estimates over filtered Parquet views are that low, so a token-aligned
            # join of 1M x 100k rows became a 10^11-row nested loop. Always use the real ASOF join.
            con.execute("SET asof_loop_join_threshold = 0")
        except duckdb.Error:  # older DuckDB without the setting: it has no nested-loop ASOF either
            pass
        try:
            # Segments are immutable (a merge publishes a new name), so caching their Parquet footers
            # is safe; a compacted 1M-step file has ~2,700 row groups whose metadata cost ~80 ms a query.
            con.execute("SET parquet_metadata_cache = true")
        except duckdb.Error:  # an older DuckDB without the setting is only slower
            pass
        self._con = con
        # Every view exists from the start over no rows (no I/O); a query lists and builds the
        # tables it names (see _needed), so a cheap open touches nothing it does not read.
        for table in TABLES:
            con.execute(f"CREATE OR REPLACE TEMP VIEW {self._view_name(table)} AS {_empty_select(table)}")
        self._derived_views()

    # -- listing / views ---------------------------------------------------------------------
    @staticmethod
    def _view_name(table: str) -> str:
        return "runs_raw" if table == "runs" else table

    def _derived_views(self) -> None:
        """Views defined over the base views: ``runs`` (first declaration wins) and the timeline views."""
        # First definition of a run wins: a resumed attempt does not redefine lineage.
        self.con.execute(
            "CREATE OR REPLACE TEMP VIEW runs AS SELECT * FROM runs_raw "
            "QUALIFY row_number() OVER (PARTITION BY run ORDER BY created) = 1"
        )
        for table in ATTEMPT_TABLES:
            for name, body in view_sql(table).items():
                self.con.execute(f"CREATE OR REPLACE TEMP VIEW {name} AS {body}")

    @staticmethod
    def _needed(query: str) -> set[str]:
        """Base tables a query reads, from the view names it mentions."""
        words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", query))
        need = set()
        for table in TABLES:
            if table in words or f"{table}_raw" in words:
                need.add(table)
            if table in ATTEMPT_TABLES and (f"{table}_effective" in words or f"{table}_all" in words):
                need.update((table, "attempts"))
        return need

    def _listing(self, scopes: dict[str, frozenset[str] | None]) -> tuple[dict[str, list[Path]], dict[str, tuple[Any, ...]], int]:
        """Live segments of each table of ``scopes`` (of the runs named, or all runs for None), each
        table's directories' signature, and how many files were new.

        New files get their footer checked after every directory is listed (see
        :func:`segment_problem`); the caller lists again when there were any, so that the time
        between listing and querying stays short while compaction retires files.
        """
        files: dict[str, list[Path]] = {}
        sigs: dict[str, tuple[Any, ...]] = {}
        fresh: list[tuple[str, Path]] = []
        for table, runs in scopes.items():
            if runs is None:  # every run: the table folder's listing
                sig: list[Any] = [_fs.FS.mtime_ns(str(self.root / f"table={table}"))]
                dirs = list(iter_run_dirs(self.root, table))
            else:  # only these runs' folders: nothing of other runs is listed or read
                sig = ["runs"]
                dirs = [(r, table_dir(self.root, table, r)) for r in sorted(runs)]
            paths: list[Path] = []
            for _run, rdir in dirs:
                # The folder's signature and its names from one look (one LIST on object storage).
                mt, names = _fs.FS.list_signed(str(rdir))
                if mt is None:
                    if runs is not None:
                        sig.append((rdir.name, None))  # a run folder that appears later changes the signature
                    continue
                sig.append((rdir.name, mt))
                for p in list_segments(rdir, names):
                    key = str(p)
                    if key in self._bad_files:
                        continue
                    if key not in self._checked:
                        fresh.append((table, p))
                    paths.append(p)
            files[table] = paths
            sigs[table] = tuple(sig)
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
        return files, sigs, len(fresh)

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

    def refresh(self, force: bool = False, tables: Sequence[str] | None = None) -> bool:
        """Rebuild the views of ``tables`` (default: those built so far) whose directories changed.

        A table built for some runs only (queries of :func:`per_run` functions) stays so; a table
        named here that was never built is built over every run. Returns True if any view was rebuilt.
        """
        want = sorted(set(self._sigs) if tables is None else set(tables))
        return self._refresh({t: self._scope.get(t) for t in want}, force)

    def _refresh(self, scopes: dict[str, frozenset[str] | None], force: bool = False) -> bool:
        """Rebuild the views of the tables of ``scopes`` (each over the runs named, or all) whose
        directories changed. Returns True if any view was rebuilt."""
        with self._lock:
            self._refreshed_at = time.monotonic()
            want = sorted(scopes)
            if not want:
                return False
            relisted = False
            for attempt in range(20):
                if attempt > 1:  # files keep changing under us: let the writer or compactor finish
                    time.sleep(min(0.05, 0.002 * attempt))
                try:
                    files, sigs, fresh = self._listing({t: scopes[t] for t in want})
                except _Vanished:  # compaction retired a file while it was being checked
                    force = True
                    continue
                if fresh and not relisted:  # checking new files took time: list again, quickly
                    relisted = True
                    continue
                changed = [t for t in want if force or self._sigs.get(t) != sigs[t]]
                self._scope.update({t: scopes[t] for t in want if t not in changed})
                if not changed:
                    return False
                try:
                    self._build_views({t: files[t] for t in changed})
                except (duckdb.IOException, duckdb.InvalidInputException) as exc:
                    # A file retired by compaction between listing and binding: list again.
                    self._handle_read_error(exc)
                    force = True
                    continue
                except OSError as exc:
                    # Object storage: the small tables are read while their views are built, so a
                    # segment a merge retired after the LIST surfaces here (pyarrow: NOT_FOUND).
                    if not _vanished_object(exc):
                        raise
                    force = True
                    continue
                self._sigs.update({t: sigs[t] for t in changed})
                self._scope.update({t: scopes[t] for t in changed})
                # Forget retired files of the listed tables (a long-lived app sees many come and go).
                seen = {str(p) for t in want for p in files[t]}
                prefixes = tuple(str(self.root / f"table={t}") + os.sep for t in want)
                self._checked = {k for k in self._checked if k in seen or not k.startswith(prefixes)}
                self._read_ok = {k for k in self._read_ok if k in seen or not k.startswith(prefixes)}
                self.version += 1
                return True
            raise RuntimeError(f"store {self.root} keeps changing; could not build a consistent listing")

    def _build_views(self, files: dict[str, list[Path]]) -> None:
        for table, paths in files.items():
            cols = ", ".join(f'"{f.name}"' for f in TABLES[table])
            if paths and _fs.is_remote(paths[0]):
                paths = self._local_copies(paths)
            if paths and _fs.is_remote(paths[0]):
                # Object storage without local copies: DuckDB cannot open s3:// offline; it scans a
                # pyarrow dataset (pushdown), each footer fetched once.
                from healthwatch.objectstore import s3_table_source

                self.con.register(f"_s3_{table}", s3_table_source([str(p) for p in paths], TABLES[table],
                                                                    self._s3_cache.setdefault(table, {})))
                body = f"SELECT run, {cols} FROM _s3_{table}"
            elif paths:
                flist = "[" + ", ".join(_sql_str(_fs.FS.open_input(str(p))) for p in paths) + "]"
                body = (
                    f"SELECT run, {cols} FROM read_parquet({flist}, hive_partitioning = true, "
                    "hive_types = {'run': VARCHAR, 'table': VARCHAR})"
                )
            else:
                body = _empty_select(table)
            self.con.execute(f"CREATE OR REPLACE TEMP VIEW {self._view_name(table)} AS {body}")

    def _local_copies(self, paths: list[Path]) -> list[Path]:
        """``paths`` (``s3://`` segments) as local copies (:class:`~healthwatch.objectstore.SegmentCache`),
        or unchanged when the cache is off or the table does not fit in it."""
        from healthwatch.objectstore import S3FS

        cache = self._cache()
        if cache is None:
            return paths
        fs = _fs.fs_for(str(paths[0]))
        if not isinstance(fs, S3FS):
            return paths
        local = cache.fetch(fs, [str(p) for p in paths])
        return paths if local is None else local

    def _cache(self) -> Any:
        """The :class:`~healthwatch.objectstore.SegmentCache` of ``s3://`` reads, made on first use
        from the environment (None: turned off)."""
        if self._segment_cache is False:
            from healthwatch.objectstore import SegmentCache

            self._segment_cache = SegmentCache.from_env()
        return self._segment_cache

    @property
    def segment_cache(self) -> Any:
        """The local cache of ``s3://`` segments this store reads through (None: off or a local store)."""
        return self._segment_cache or None

    def files(self, table: str, run: str | None = None) -> list[Path]:
        """Live segment files of ``table`` (optionally of one run)."""
        out: list[Path] = []
        for r, rdir in iter_run_dirs(self.root, table):
            if run is None or r == run:
                out.extend(list_segments(rdir))
        return out

    def scan_run(self, table: str, run: str, columns: Sequence[str],
                 ranges: dict[str, tuple[Any, Any]] | None = None, cache: Sequence[str] = ()) -> Any:
        """Rows of one run's ``table`` whose ``ranges`` columns lie in ``[lo, hi]`` (inclusive), as polars.

        The cheap path for a small, exact question (one series over a step range, a run's
        attempts): it lists only ``table=<t>/run=<r>/``, skips the segments whose names carry a step
        range outside ``ranges["step"]`` (unopened), reads the footers of the others and decodes
        only the row groups whose min/max statistics can hold matching rows. No
        DuckDB connection, no views, nothing of other runs or tables. Returns ``None`` when it
        cannot answer exactly here — a root that is not a local directory, a segment that is not
        a readable segment of the table, files retired by a merge while it read — and the caller
        takes the SQL path, which handles all of those.

        ``cache`` names columns of ``ranges`` (e.g. ``("bucket_size", "metric")``) whose section of
        each file is decoded once and kept per open Store (segments are immutable; bounded by
        ``HEALTHWATCH_READ_CACHE_MB``, default 256): the other ranges are then filters over the kept
        rows. For reads that come back for other keys of one section (the app's charts of layer
        after layer, each heatmap refresh): a one-layer read is a filter over memory instead of a
        decode of every rollup file's row groups.
        """
        import polars as pl
        import pyarrow.parquet as pq

        if table not in TABLES:
            raise ValueError(f"unknown table {table!r} (tables: {', '.join(TABLES)})")
        unknown = [c for c in (*columns, *(ranges or {})) if c not in TABLES[table].names]
        if unknown:
            raise ValueError(f"table {table!r} has no column(s) {', '.join(unknown)}")
        if not self._local_root:
            return None  # object storage: the SQL path (pyarrow datasets over S3) serves it
        ranges = dict(ranges or {})
        schema = pa.schema([TABLES[table].field(c) for c in columns])
        # Filter with polars, not pyarrow.compute: the latter imports pandas on first use (~1 s).
        strings = [f.name for f in TABLES[table] if pa.types.is_string(f.type)]
        cond = {c: pl.col(c) == pl.lit(lo) if c in strings and lo == hi else
                pl.col(c).cast(pl.Utf8).is_between(pl.lit(lo), pl.lit(hi)) if c in strings else
                pl.col(c).is_between(pl.lit(lo), pl.lit(hi)) for c, (lo, hi) in ranges.items()}
        steps = ranges.get("step")
        eq = {c: lo for c, (lo, hi) in ranges.items() if lo == hi}  # key columns asked for one value
        for _try in range(3):  # a merge may retire a listed file between listing and reading: list again
            try:
                parts = []
                sections: list[tuple[tuple[Any, ...], Any]] = []
                for path in list_segments(table_dir(self.root, table, run)):
                    if steps is not None and not overlaps(parse_segment(path).steps, *steps):
                        continue  # its name says no row is in the step range: not even its footer is read
                    fo = self._checked_footer(str(path), table)
                    if fo is None:
                        return None  # the SQL path skips it, with its warning
                    if cache:
                        sections.append(self._section(str(path), fo, table, columns, ranges, tuple(cache)))
                        continue
                    fits = [(g, f) for g in fo.candidates(ranges) if (f := fo.fit(g, ranges)) is not None]
                    indexed = False
                    if fits and eq:
                        held = self._groups_with(str(path), fo, eq, [g for g, _ in fits], self._source(str(path)))
                        if held is not None:
                            fits, indexed = [(g, f) for g, f in fits if g in held], True
                    if not fits:
                        continue
                    groups = [g for g, _ in fits]
                    # Columns whose statistics put every candidate group inside their range are
                    # neither decoded nor filtered (a sorted segment's group is often one key).
                    open_ = [c for c in ranges if any(c not in f for _, f in fits)]
                    rest = [c for c in columns if c not in open_]
                    big = sum(fo.meta.row_group(g).num_rows for g in groups) >= _TWO_PHASE_ROWS
                    # A file's groups are read in one call. In big groups strings stay dictionary-encoded
                    # (categoricals): a key column's filter compares codes, not 10^5 decoded strings.
                    src = self._source(str(path))
                    pf = pq.ParquetFile(src, metadata=fo.meta, read_dictionary=strings if big else None,
                                        pre_buffer=not isinstance(src, str))
                    if not open_ or not big or indexed:
                        # One read (a rollup file's few small groups: a second call costs more
                        # than decoding the rows it would spare).
                        df = pl.from_arrow(pf.read_row_groups(groups, columns=[*rest, *open_], use_threads=False))
                        assert isinstance(df, pl.DataFrame)
                        parts.append(df.filter([cond[c] for c in open_]).select(list(columns)) if open_ else df)
                        continue
                    # Two phases: the key columns asked for one value first (dictionary codes: cheap),
                    # then every column of the groups holding a match. A group whose statistics
                    # straddle two keys (metric a's last layers, metric b's first: every layer) is
                    # ruled out there without decoding its values or steps.
                    first = [c for c in open_ if c in eq] or open_
                    keys = pl.from_arrow(pf.read_row_groups(groups, columns=first, use_threads=False))
                    assert isinstance(keys, pl.DataFrame)
                    mask = keys.select(pl.all_horizontal([cond[c] for c in first]).alias("m")).to_series()
                    hit, off = [], 0
                    for g in groups:
                        n = fo.meta.row_group(g).num_rows
                        if mask.slice(off, n).any():
                            hit.append(g)
                        off += n
                    if not hit:
                        continue
                    # Threads here: a 122,880-row group's columns decode side by side (the CPU is the
                    # same; a fresh process's one-series read waits about half as long on two cores).
                    df = pl.from_arrow(pf.read_row_groups(hit, columns=[*rest, *open_], use_threads=True))
                    assert isinstance(df, pl.DataFrame)
                    parts.append(df.filter([cond[c] for c in open_]).select(list(columns)))
                empty = pl.DataFrame(schema={f.name: _polars_type(f.type) for f in schema})
                if cache:
                    # One frame per listing (kept while the listing holds): a read is one filter,
                    # not one per file (~0.2 ms of polars each, 25 rollup files).
                    rest_ = [cond[c] for c in ranges if c not in cache]
                    whole = self._joined(sections)
                    return (whole.filter(rest_) if rest_ else whole).select(list(columns)).cast(dict(empty.schema))
                if not parts:
                    return empty
                return pl.concat([p.cast(dict(empty.schema)) for p in parts])
            except FileNotFoundError:
                continue
            except (OSError, pa.ArrowException, ValueError):
                return None  # unreadable: the SQL path finds out which file and skips it
        return None

    def scan_arrays(self, table: str, run: str, columns: Sequence[str],
                    ranges: dict[str, tuple[Any, Any]] | None = None) -> dict[str, Any] | None:
        """:meth:`scan_run` as one NumPy array per column, filtered with NumPy (no polars query).

        For a small exact read in a fresh process (one series over 2,000 steps): polars' first
        query of a process costs a few ms of CPU (its thread pool) and each later one ~0.5 ms, more
        than filtering a few row groups' columns with NumPy. Same files, footers, statistics and
        row groups as :meth:`scan_run`; where this cannot filter exactly (a column with NULLs, a
        non-numeric column asked for, a string range that is not one value, a segment read in two
        phases) it asks :meth:`scan_run` and converts. None where :meth:`scan_run` returns None.
        """

        if table not in TABLES:
            raise ValueError(f"unknown table {table!r} (tables: {', '.join(TABLES)})")
        fields = TABLES[table]
        unknown = [c for c in (*columns, *(ranges or {})) if c not in fields.names]
        if unknown:
            raise ValueError(f"table {table!r} has no column(s) {', '.join(unknown)}")
        ranges = dict(ranges or {})
        strings = {f.name for f in fields if pa.types.is_string(f.type)}

        def numeric(c: str) -> bool:
            t = fields.field(c).type
            return pa.types.is_integer(t) or pa.types.is_floating(t)

        fast = self._local_root and all(numeric(c) for c in columns) and all(
            numeric(c) or (c in strings and lo == hi) for c, (lo, hi) in ranges.items())
        if fast:
            try:
                return self._scan_arrays(table, run, columns, ranges, strings)
            except _NotFast:
                pass
        df = self.scan_run(table, run, columns, ranges)
        if df is None or any(df[c].null_count() for c in columns):
            return None
        return {c: df[c].to_numpy() for c in columns}

    def _scan_arrays(self, table: str, run: str, columns: Sequence[str], ranges: dict[str, tuple[Any, Any]],
                     strings: set[str]) -> dict[str, Any] | None:
        """The NumPy path of :meth:`scan_arrays`; raises :class:`_NotFast` where it cannot be exact."""
        import numpy as np
        import pyarrow.parquet as pq

        steps = ranges.get("step")
        eq = {c: lo for c, (lo, hi) in ranges.items() if lo == hi}
        # Key columns asked for one value first: in a sealed segment (row groups cut at series
        # keys) every group spans the file's steps, and the key rules out all but one or two.
        ranges = {**{c: ranges[c] for c in eq}, **ranges}
        dtypes = {c: TABLES[table].field(c).type.to_pandas_dtype() for c in columns}
        for _try in range(3):  # a merge may retire a listed file between listing and reading: list again
            try:
                parts: list[dict[str, Any]] = []
                for path in list_segments(table_dir(self.root, table, run)):
                    if steps is not None and not overlaps(parse_segment(path).steps, *steps):
                        continue
                    fo = self._checked_footer(str(path), table)
                    if fo is None:
                        return None
                    fits = [(g, f) for g in fo.candidates(ranges) if (f := fo.fit(g, ranges)) is not None]
                    if fits and eq:
                        held = self._groups_with(str(path), fo, eq, [g for g, _ in fits], self._source(str(path)))
                        if held is not None:
                            fits = [(g, f) for g, f in fits if g in held]
                    if not fits:
                        continue
                    open_ = [c for c in ranges if any(c not in f for _, f in fits)]
                    want = list(dict.fromkeys([*columns, *open_]))
                    # A memory map, not the path: see _read_footer.
                    with self._opened(str(path)) as src:
                        pf = pq.ParquetFile(src, metadata=fo.meta, read_dictionary=[c for c in open_ if c in strings],
                                            pre_buffer=not isinstance(src, pa.MemoryMappedFile))
                        t = pf.read_row_groups([g for g, _ in fits], columns=want, use_threads=False)
                    if any(t.column(c).null_count for c in want):
                        raise _NotFast
                    mask = None
                    for c in open_:
                        lo, hi = ranges[c]
                        col = t.column(c)
                        if c in strings:
                            ms = []
                            for ch in col.chunks:
                                if not pa.types.is_dictionary(ch.type):
                                    raise _NotFast
                                words = ch.dictionary.to_pylist()
                                ms.append(_numpy_of(ch.indices) == words.index(lo) if lo in words
                                          else np.zeros(len(ch), dtype=bool))
                            m = np.concatenate(ms) if ms else np.zeros(0, dtype=bool)
                        else:
                            v = _numpy_of(col)
                            m = (v >= lo) & (v <= hi)
                        mask = m if mask is None else mask & m
                    part = {}
                    for c in columns:
                        v = _numpy_of(t.column(c))
                        part[c] = (v if mask is None else v[mask]).astype(dtypes[c], copy=False)
                    parts.append(part)
                return {c: np.concatenate([p[c] for p in parts]) if parts else np.zeros(0, dtype=dtypes[c])
                        for c in columns}
            except FileNotFoundError:
                continue
            except (OSError, pa.ArrowException, ValueError):
                return None  # unreadable: the SQL path finds out which file and skips it
        return None

    def _joined(self, sections: list[tuple[tuple[Any, ...], Any]]) -> Any:
        """The concatenation of ``(key, frame)`` sections of :meth:`_section`, kept per list of keys."""
        import polars as pl

        jkey = tuple(k for k, _ in sections)
        with self._lock:
            hit = self._joins.get(jkey)
            if hit is not None:
                return hit
        # Not rechunked: the join shares the sections' buffers (no second copy in memory).
        whole = pl.concat([f for _, f in sections], how="vertical_relaxed", rechunk=False)
        with self._lock:
            if len(self._joins) >= 64:  # listings of the past (a live run's files come and go)
                self._joins.clear()
            self._joins[jkey] = whole
        return whole

    def _section(self, key: str, fo: _Footer, table: str, columns: Sequence[str],
                 ranges: dict[str, tuple[Any, Any]], cache: tuple[str, ...]) -> tuple[tuple[Any, ...], Any]:
        """``(cache key, rows)``: the rows of one segment whose ``cache`` columns lie in their
        ``ranges``, with ``columns`` and the other ranges' columns, decoded once per open Store
        (see :meth:`scan_run`)."""
        import polars as pl
        import pyarrow.parquet as pq

        sect = {c: ranges[c] for c in cache if c in ranges}
        want = tuple(sorted({*columns, *(c for c in ranges if c not in sect)}))
        ckey = (key, fo.stamp, tuple(sorted(sect.items())), want)
        with self._lock:
            hit = self._sections.get(ckey)
            if hit is not None:
                self._sections.move_to_end(ckey)
                return ckey, hit
        strings = [f.name for f in TABLES[table] if pa.types.is_string(f.type)]
        fits = [(g, f) for g in fo.candidates(sect) if (f := fo.fit(g, sect)) is not None]
        eq = {c: lo for c, (lo, hi) in sect.items() if lo == hi}
        if fits and eq:
            held = self._groups_with(key, fo, eq, [g for g, _ in fits], self._source(key))
            if held is not None:
                fits = [(g, f) for g, f in fits if g in held]
        open_ = [c for c in sect if any(c not in f for _, f in fits)]
        if not fits:
            out = pl.DataFrame(schema={c: _polars_type(TABLES[table].field(c).type) for c in want})
        else:
            src = self._source(key)
            pf = pq.ParquetFile(src, metadata=fo.meta, pre_buffer=not isinstance(src, str))
            df = pl.from_arrow(pf.read_row_groups([g for g, _ in fits], columns=[*want, *(c for c in open_ if c not in want)],
                                                  use_threads=False))
            assert isinstance(df, pl.DataFrame)
            conds = [pl.col(c) == pl.lit(lo) if c in strings and lo == hi else
                     pl.col(c).is_between(pl.lit(lo), pl.lit(hi)) for c, (lo, hi) in sect.items() if c in open_]
            out = (df.filter(conds) if conds else df).select(list(want))
        size = int(out.estimated_size())
        with self._lock:
            if ckey in self._sections:  # another thread decoded it meanwhile: count it once
                return ckey, self._sections[ckey]
            self._sections[ckey] = out
            self._section_bytes += size
            while self._section_bytes > _SECTION_CACHE_BYTES and len(self._sections) > 1:
                _k, old = self._sections.popitem(last=False)
                self._section_bytes -= int(old.estimated_size())
                self._joins.clear()  # joins may hold the dropped section: let them go too
        return ckey, out

    @staticmethod
    def _groups_with(key: str, fo: _Footer, eq: dict[str, Any], groups: list[int],
                     source: Any = None) -> set[int] | None:
        """Which of ``groups`` of a segment hold a row whose ``eq`` columns equal those values.

        Statistics cannot rule out a group that straddles keys (metric a's last layers and metric
        b's first span every layer): in a rollup segment two of every three groups a one-layer
        read decoded held none of its rows. So each group's distinct keys are read once (the key
        columns only, dictionary codes: cheap) the first time a read considers it, and kept per
        open Store (segments are immutable). None when a key column is missing. ``source``: what
        to open instead of the path ``key`` (an ``s3://`` segment: see :meth:`_source`).
        """
        import polars as pl
        import pyarrow.parquet as pq

        cols = tuple(sorted(eq))
        if any(c not in fo.index for c in cols):
            return None
        known = fo.keys.setdefault(cols, {})
        missing = [g for g in groups if g not in known]
        if missing:
            # A group of one series (a sealed segment cut at key changes: merge.key_groups) says
            # its key in its statistics (min == max on every key column): nothing to decode.
            for g in missing:
                one = [fo.bound(c, g) for c in cols]
                if all(b is not None and b[0] == b[1] for b in one):
                    known[g] = frozenset({tuple(b[0] for b in one)})  # type: ignore[index]
            missing = [g for g in missing if g not in known]
        if missing:
            strings = [c for c in cols if fo.meta.schema.column(fo.index[c]).physical_type == "BYTE_ARRAY"]
            t = pq.ParquetFile(source or key, metadata=fo.meta, read_dictionary=strings,
                               pre_buffer=source is not None and not isinstance(source, str)).read_row_groups(
                missing, columns=list(cols), use_threads=False)
            df = pl.from_arrow(t)
            assert isinstance(df, pl.DataFrame)
            cats = [pl.col(c).cast(pl.Utf8) for c in cols if df.schema[c] == pl.Categorical]
            code = _key_code(df)
            off = 0
            for g in missing:
                # Group by group (slices: no copy); distinct keys first, decoded to strings after.
                # (A numpy group-id column made polars import numpy.ma: ~35 ms of a fresh process.)
                n = fo.meta.row_group(g).num_rows
                part = df.slice(off, n)
                first = part.filter(code.is_first_distinct()) if code is not None else part.unique()
                known[g] = frozenset(first.with_columns(cats).iter_rows())
                off += n
        want = tuple(eq[c] for c in cols)
        return {g for g in groups if want in known[g]}

    @property
    def _local_root(self) -> bool:
        """Whether the footer paths (``scan_run``, ``run_extremes``, ``attempts_present``) answer here:
        a local directory, or an ``s3://`` root (each selected segment read through :meth:`_source`:
        its footer and needed row groups by ranged GETs, or a small one as a cached local copy)."""
        if not isinstance(self.root, Path):
            return False
        if not _fs.is_remote(str(self.root)):
            return True
        from healthwatch.objectstore import S3FS

        return isinstance(_fs.fs_for(str(self.root)), S3FS)

    def _remote(self, key: str) -> tuple[Any, str, int] | None:
        """``(S3FS, uri, size)`` of an ``s3://`` segment ``key`` as listed, or None for a local file."""
        if not _fs.is_remote(key):
            return None
        fs = _fs.fs_for(key)
        uri = fs.uri(fs._key(key))
        size = fs.sizes.get(uri)
        if size is None:  # not seen in a listing of this process: the object is gone or never was
            raise FileNotFoundError(key)
        return fs, uri, size

    def _source(self, key: str) -> Any:
        """What ``pyarrow.parquet`` opens for segment ``key``: the path of a local file (or of the
        :class:`~healthwatch.objectstore.SegmentCache` copy of a small or already copied ``s3://``
        segment), else an :class:`~healthwatch.objectstore.RangeFile` (ranged GETs). Raises
        ``FileNotFoundError`` for an object retired by a merge (the callers list again)."""
        remote = self._remote(key)
        if remote is None:
            return key
        fs, _uri, size = remote
        from healthwatch.objectstore import RangeFile

        cache = self._cache()
        if cache is not None:
            local = cache.local_path(fs, key)
            if local.exists():  # copied already (a SQL view of its table, or an earlier read)
                return str(local)
            if size <= _S3_COPY_BYTES:
                got = cache.fetch(fs, [key])
                if got:
                    return str(got[0])
        return RangeFile(fs, key, size, tails=self._tails)

    def _prefetch(self, keys: Sequence[str]) -> None:
        """Fetch what :meth:`_checked_footer` will read of the ``s3://`` segments ``keys`` side by side:
        small ones whole into the segment cache (one parallel fetch), the tails (footers) of the others
        (the walk over a run's footers otherwise waits on one GET after another). Local keys: nothing."""
        remote = [k for k in keys if _fs.is_remote(k) and k not in self._footers and k not in self._bad_files]
        if not remote:
            return
        from healthwatch.objectstore import RangeFile

        cache = self._cache()
        small: list[str] = []
        big: list[Any] = []
        for k in remote:
            got = self._remote(k)
            assert got is not None
            fs, _uri, size = got
            if cache is not None and (size <= _S3_COPY_BYTES or cache.local_path(fs, k).exists()):
                small.append(k)
            elif k not in self._tails:
                big.append(RangeFile(fs, k, size, tails=self._tails))
        if small and cache is not None:
            cache.fetch(_fs.fs_for(small[0]), small)

        def tail(f: Any) -> None:
            f.seek(-8, 2)
            f.read(8)

        _side_by_side(tail, big)

    def _opened(self, key: str) -> Any:
        """A context manager giving ``key`` opened for ``pyarrow.parquet``: a memory map of a local
        file (see :func:`_read_footer`), or an :class:`~healthwatch.objectstore.RangeFile`."""
        src = self._source(key)
        return pa.memory_map(src) if isinstance(src, str) else contextlib.nullcontext(src)

    def _checked_footer(self, key: str, table: str) -> _Footer | None:
        """The segment's footer (cached while the file's size and mtime stay the same) with its
        schema checked once, or None for a known-bad or wrong-schema file (the caller then asks
        SQL, which skips the file with its warning)."""
        if key in self._bad_files:
            return None
        remote = self._remote(key)
        if remote is None:
            st = os.stat(key)
            stamp = (st.st_size, st.st_mtime_ns)
        else:  # an object's size and entity tag from the listing (no HEAD): a new object, a new stamp
            fs, uri, size = remote
            stamp = (size, int.from_bytes(fs.etags.get(uri, "").encode()[:8].ljust(8, b"\0"), "big"))
        hit = self._footers.get(key)
        if hit is not None and hit[0] == stamp:
            fo = hit[1]
        else:
            if remote is None:
                meta = _read_footer(key)
            else:
                import pyarrow.parquet as pq

                with self._opened(key) as src:
                    meta = pq.read_metadata(src)
            fo = _Footer(meta, stamp)
            if len(self._footers) >= 4096:  # files retired by merges: forget them all now and then
                self._footers.clear()
            self._footers[key] = (stamp, fo)
        if key not in self._checked:
            if schema_problem(fo.meta.schema.to_arrow_schema(), table):
                return None
            self._checked.add(key)
        return fo

    def attempts_present(self, table: str, run: str) -> frozenset[Any] | None:
        """The ``attempt`` values of every row of one run's ``table``, or None when it cannot tell here
        (object storage, an unreadable or foreign file: then assume any attempt may be there).

        From footer statistics where every row group holds one attempt (sealed segments); a file
        without them (a live writer's unsealed segments keep statistics on step columns only) has its
        ``attempt`` column read once per open Store (segments are immutable). Readers use it to skip
        a raw read of "rows of other attempts" that no file holds (see :class:`~healthwatch.query.rollups.RollupPlan`).
        """
        import polars as pl
        import pyarrow.parquet as pq

        if table not in ATTEMPT_TABLES:
            raise ValueError(f"table {table!r} has no attempts (tables with attempts: {', '.join(ATTEMPT_TABLES)})")
        if not self._local_root:
            return None
        def read_attempts(item: tuple[Path, _Footer]) -> None:
            path, fo = item
            # ParquetFile, not pq.read_table: the latter imports pyarrow.dataset and
            # with it pandas (~0.9 s of a process's first whole-run series).
            # An s3:// segment: its column chunks are fetched side by side (pre_buffer:
            # ranged GETs on pyarrow's I/O threads), not one GET after another.
            src = self._source(str(path))
            remote = not isinstance(src, str)
            col = pl.from_arrow(pq.ParquetFile(src, metadata=fo.meta, pre_buffer=remote).read(
                columns=["attempt"], use_threads=remote).column(0))
            assert isinstance(col, pl.Series)
            fo.attempts = frozenset(col.unique().to_list())

        for _try in range(3):  # a merge may retire a listed file while it is read: list again
            try:
                out: set[Any] = set()
                paths = list_segments(table_dir(self.root, table, run))
                self._prefetch([str(p) for p in paths])
                pending: list[tuple[Path, _Footer]] = []
                for path in paths:
                    fo = self._checked_footer(str(path), table)
                    if fo is None:
                        return None
                    if fo.attempts is None:
                        b = fo.bounds("attempt")
                        if all(x is not None and x[0] == x[1] for x in b):
                            fo.attempts = frozenset(int(x[0]) for x in b)  # type: ignore[index]
                        else:  # NULLs or several attempts per group, or no statistics: read the column
                            pending.append((path, fo))
                            continue
                    out |= fo.attempts
                # Object storage: each read waits on the network; read the files side by side.
                _side_by_side(read_attempts, pending, parallel=bool(pending) and _fs.is_remote(str(pending[0][0])))
                for _path, fo in pending:
                    out |= fo.attempts or frozenset()
                return frozenset(out)
            except FileNotFoundError:
                continue
            except (OSError, pa.ArrowException, ValueError):
                return None
        return None

    def run_extremes(self, table: str, run: str, columns: Sequence[str]) -> dict[str, tuple[Any, Any]] | None:
        """``{column: (min, max)}`` over every row of one run's ``table``, from Parquet footers only.

        No row is decoded: the minimum and maximum of each row group's statistics (exact: the
        writers keep full statistics; NULLs are ignored as SQL's ``min``/``max`` do). A run without
        rows maps every column to ``(None, None)``. Returns ``None`` when a file lacks exact
        statistics for a column (a live writer's unsealed segments keep them on step columns only)
        or cannot be read: then ask SQL. Float columns: Parquet statistics leave NaN out.
        """
        if table not in TABLES:
            raise ValueError(f"unknown table {table!r} (tables: {', '.join(TABLES)})")
        unknown = [c for c in columns if c not in TABLES[table].names]
        if unknown:
            raise ValueError(f"table {table!r} has no column(s) {', '.join(unknown)}")
        if not self._local_root:
            return None
        out: dict[str, tuple[Any, Any]] = {c: (None, None) for c in columns}
        for _try in range(3):
            try:
                out = {c: (None, None) for c in columns}
                paths = list_segments(table_dir(self.root, table, run))
                self._prefetch([str(p) for p in paths])
                for path in paths:
                    fo = self._checked_footer(str(path), table)
                    if fo is None:
                        return None
                    meta, idx = fo.meta, fo.index
                    for g in range(meta.num_row_groups):
                        group = meta.row_group(g)
                        for c in columns:
                            chunk = group.column(idx[c])
                            stats = chunk.statistics
                            if stats is None or not stats.has_null_count:
                                return None
                            if not stats.has_min_max:
                                if stats.null_count == chunk.num_values:
                                    continue  # all NULL: nothing to count
                                return None
                            if not getattr(stats, "is_max_value_exact", True) or \
                                    not getattr(stats, "is_min_value_exact", True):
                                return None
                            lo, hi = out[c]
                            out[c] = (stats.min if lo is None else min(lo, stats.min),
                                      stats.max if hi is None else max(hi, stats.max))
                return out
            except FileNotFoundError:
                continue
            except (OSError, pa.ArrowException, ValueError, KeyError):
                return None
        return None

    # -- queries -----------------------------------------------------------------------------
    def sql_over(self, frames: dict[str, Any], query: str, params: Sequence[Any] | None = None) -> Any:
        """``query`` with each name of ``frames`` bound to that polars (or Arrow) table instead of the
        store's view of that name (see :class:`FrameStore`); the result as polars."""
        with FrameStore(self, frames, copy=False) as fs:  # one query: scanning the Arrow tables once is cheaper
            return fs.sql(query, params).pl()

    def sql(self, query: str, params: Sequence[Any] | dict[str, Any] | None = None) -> Result:
        """A parameterised query over the store's views; call ``.pl()``/``.arrow()``/``.fetchall()``."""
        return Result(self, query, params)

    def _execute(self, query: str, params: Any, fn: str) -> Any:
        with self._lock:
            need = self._needed(query)
            run = _RUN_SCOPE.get()
            # Each table's view covers the runs queried so far (all of them once a store-wide query came).
            scopes = {t: None if run is None or (t in self._sigs and self._scope.get(t) is None)
                      else frozenset((self._scope.get(t) or frozenset()) | {run}) for t in need}
            missing = {t: sc for t, sc in scopes.items() if t not in self._sigs or sc != self._scope.get(t)}
            if self.auto_refresh:
                self._refresh(scopes)
            elif missing:  # first use of a table (or of a run in it): build its view once
                self._refresh(missing)
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
        for table in list(self._sigs):
            for path in self.files(table):
                key = str(path)
                if key in self._bad_files or key in self._read_ok:
                    continue
                problem = full_read_problem(key)
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
            problem = full_read_problem(path)
            if problem:
                self._skip(path, f"{problem}; {msg.splitlines()[0][:200]}")

    @property
    def bad_files(self) -> set[str]:
        """Files skipped because they were not readable segments."""
        return set(self._bad_files)

    def close(self) -> None:
        """Close the DuckDB connection (if one was opened)."""
        if self._con is not None:
            self._con.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _FrameResult:
    """A query over a :class:`FrameStore`, materialised like :class:`Result`."""

    def __init__(self, cur: Any, query: str, params: Any) -> None:
        self._cur, self._query, self._params = cur, query, params

    def pl(self) -> Any:
        """Result as a polars DataFrame."""
        return self._cur.sql(self._query, params=self._params).pl()

    def arrow(self) -> pa.Table:
        """Result as an Arrow table."""
        rel = self._cur.sql(self._query, params=self._params)
        return rel.to_arrow_table() if hasattr(rel, "to_arrow_table") else rel.arrow()

    def fetchall(self) -> list[tuple[Any, ...]]:
        """Result as a list of tuples."""
        return self._cur.execute(self._query, self._params).fetchall()

    def fetchone(self) -> tuple[Any, ...] | None:
        """First row of the result, or None."""
        rows = self.fetchall()
        return rows[0] if rows else None


class FrameStore:
    """A read-only stand-in for a :class:`Store` whose views are frames already read (polars or Arrow).

    For a reader that has read the few rows a question needs with :meth:`Store.scan_run`: the query
    functions run their own SQL on it unchanged, only the sources shrink from views over every
    segment to those rows, so the answer is the same by construction as long as each frame holds
    every row the queries' conditions select (a frame may hold more). A view not given is an error
    (DuckDB: no such table), never a silent read of something else. ``attempts_present`` is the
    store's. Use as a context manager (the cursor and its registered frames are its own).
    """

    def __init__(self, store: Store, frames: dict[str, Any], copy: bool = True,
                 consts: dict[str, str] | None = None) -> None:
        """Bind ``frames`` (view name -> polars or Arrow table) on a cursor of its own; ``copy`` puts
        each into a TEMP table (for several queries), else each query scans the Arrow table.
        ``consts`` (with ``copy``): string columns of one value each (``run``, a key) that a frame
        lacks, added by DuckDB rather than carried as 10^5 equal strings."""
        self.root = store.root
        self._store = store
        self._cur = _duck.cursor()
        for name, df in frames.items():
            arrow = df.to_arrow() if hasattr(df, "to_arrow") else df
            if not copy:
                self._cur.register(name, arrow)
                continue
            # Copied into a TEMP table once: DuckDB scans a registered Arrow table through a
            # pyarrow scanner built per query (~10x slower for the several queries of one reader).
            extra = {c: v for c, v in (consts or {}).items() if c not in arrow.column_names}
            cols = "".join(f'?::VARCHAR AS "{c}", ' for c in extra)
            self._cur.register("_frame", arrow)
            self._cur.execute(f'CREATE TEMP TABLE "{name}" AS SELECT {cols}* FROM _frame', list(extra.values()))
            self._cur.unregister("_frame")

    def sql(self, query: str, params: Sequence[Any] | None = None) -> _FrameResult:
        """A parameterised query over the frames; call ``.pl()``/``.arrow()``/``.fetchall()``."""
        return _FrameResult(self._cur, query, params)

    def attempts_present(self, table: str, run: str) -> frozenset[Any] | None:
        """The store's :meth:`Store.attempts_present`."""
        return self._store.attempts_present(table, run)

    def close(self) -> None:
        """Close the cursor (its registered frames go with it)."""
        self._cur.close()

    def __enter__(self) -> FrameStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_store(path: str | os.PathLike[str] | None = None) -> Store:
    """Open a store for reading (DuckDB views over its segments). ``None`` uses the default path."""
    return Store(default_store_path(path))



