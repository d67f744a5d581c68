"""The write side: one :class:`StoreWriter` per run x attempt x rank.

It publishes immutable segments, keeps the 100/1,000/10,000-step rollups of ``scalars`` and
``layer_stats`` current as it writes (:mod:`healthwatch.store.rollup`), and merges its own small
segments level by level so a live run of a million steps stays at a bounded number of files and
never needs a manual compaction to be fast.

Where the CPU goes, and why it is cheap (``python -m benchmarks --only ingest``, BENCHMARKS.md
section 3): each batch is sorted once by series (a Monitor flush, step-major with the same series
every step, from one step's cached pattern and a strided index; anything else by a radix sort of
a small series code, :func:`~healthwatch.store.merge.sort_table`), its strings dictionary-encoded
once, and that sorted batch serves the segment, the rollups (NumPy over contiguous runs; Arrow
rows built once per published rollup file) and later merges. The writer remembers its own
segments (name, level, rows, steps) and keeps every unsealed one in memory (``cache_rows``), so a
flush that triggers no merge lists and locks nothing, and no merge, the sealing one included,
reads a segment back. Merging is tiered: ``merge_fanout`` segments of one level become one of the
next, until a segment holds ``seal_rows`` rows; sealed segments are never rewritten by the writer
(nor kept in memory), so each row is written about ``1 + log_fanout(seal_rows / rows_per_flush)``
times (3 for 108 layers x 3 metrics flushed every 100 steps) and a 1M-step run holds a few dozen
segments of ~8M rows (``healthwatch compact`` merges them further). Flushes that share one series
layout (a Monitor's) merge by a NumPy reshape (:func:`~healthwatch.store.merge.merge_sorted`); every
file stores its NULL-free columns REQUIRED (no definition levels to encode). The sealing merge writes its
result straight from zero-copy slices of its sources, with raw pages and delta-encoded
step/tokens (:func:`~healthwatch.store.merge.write_parquet`): about 8 bytes a ``layer_stats`` row.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from healthwatch.schema import TABLES, validate_run_name
from healthwatch.store import fs as _fs
from healthwatch.store.merge import (
    SERIES_KEYS,
    as_schema,
    dictionary_columns,
    memory_schema,
    merge_files,
    merge_tables,
    read_segment,
    sort_table,
    sort_table_code,
    write_parquet,
)
from healthwatch.store.meta import init_store
from healthwatch.store.rollup import ROLLUP_KEYS, RollupAccumulator
from healthwatch.store.segments import (
    MANIFEST_PREFIX,
    list_segments,
    merge_lock,
    parse_segment,
    publish_merge,
    segment_name,
    step_range,
    table_dir,
    union_steps,
    write_segment,
)


@dataclass
class _Own:
    """One of the writer's own live segments."""

    name: str
    seq: int
    level: int
    rows: int
    steps: tuple[int, int] | None = None  # (min, max) step of its rows, None when unknown


def _steps(data: pa.Table) -> tuple[int, int] | None:
    """:func:`~healthwatch.store.segments.step_range` of ``data``, through NumPy when the step column
    is one chunk without nulls (a flush's is): a compute kernel call costs more than the min/max."""
    if "step" not in data.column_names or data.num_rows == 0:
        return None
    col = data.column("step")
    if col.num_chunks == 1 and not col.null_count:
        arr = col.chunk(0).to_numpy()
        lo, hi = int(arr.min()), int(arr.max())
        return (lo, hi) if 0 <= lo <= hi else None
    return step_range(data)


class StoreWriter:
    """Publishes segments of one writer (run x attempt x rank), its live rollups, and merges its own files.

    Not thread-safe: one writer belongs to one thread (the Monitor's background writer).
    ``rollups`` keeps the rollups of ``scalars``/``layer_stats`` current (closed buckets are
    published with the rows that close them; :meth:`close` publishes the rest).
    ``merge_fanout`` segments of one level merge into one of the next; a segment of at least
    ``seal_rows`` rows is not merged again by its writer; unsealed segments of up to ``cache_rows``
    rows in all stay in memory until merged (about 40 bytes a row), so merging them reads nothing
    back. The default holds every unsealed segment of a 108-layer Monitor (up to 15 + 15 segments
    of 518,400 and 32,400 rows: ~8.3M rows, ~0.33 GB per table at its peak just before a seal);
    a smaller value trades memory for reading the rest back (~100 ns a row).
    Memory: the cached rows, plus during a merge its result (the sealing merge's result is slices
    of its cached sources, not a copy; an L1 merge copies ~0.5M rows), in the writer's thread.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        run: str,
        attempt: int = 1,
        rank: int = 0,
        merge_fanout: int = 16,
        rollups: bool = True,
        seal_rows: int = 4_000_000,
        cache_rows: int = 10_000_000,
    ) -> None:
        if int(merge_fanout) < 2:
            raise ValueError(f"merge_fanout must be >= 2, got {merge_fanout}")
        if int(seal_rows) < 1 or int(cache_rows) < 0:
            raise ValueError(f"seal_rows must be >= 1 and cache_rows >= 0, got {seal_rows}, {cache_rows}")
        self.root = _fs.root_path(root)
        self.run = validate_run_name(run)
        self.attempt = int(attempt)
        self.rank = rank
        self.writer_id = f"a{attempt:04d}r{rank:05d}x{uuid.uuid4().hex[:8]}"
        self.merge_fanout = int(merge_fanout)
        self.seal_rows = int(seal_rows)
        self.cache_rows = int(cache_rows)
        self._seq = 0
        self._initialised = False
        self._rollups: dict[str, RollupAccumulator] = (
            {t: RollupAccumulator(t) for t in ROLLUP_KEYS} if rollups else {}
        )
        # Closed rollup rows not published yet, as NumPy partial rows: an Arrow table is built once
        # per published file (every 1,000 steps), not once per flush.
        self._rollup_pending: dict[str, list[dict[str, Any]]] = {}
        self._own: dict[str, list[_Own]] = {}  # table -> this writer's live segments, by seq
        self._cache: dict[tuple[str, str], pa.Table] = {}  # (table, name) -> its rows (sorted)
        self._cached = 0
        self._dirs: dict[str, Path] = {}
        self._closed = False

    def _ensure_init(self) -> None:
        if not self._initialised:
            _fs.ensure_writable(self.root)  # s3://: refuse a server that ignores If-None-Match (once per process)
            init_store(self.root)
            self._initialised = True

    def _publish(self, table: str, data: pa.Table, presorted: bool = False) -> Path:
        """Publish ``data`` as this writer's next level-0 segment of ``table`` (``presorted``: by
        :func:`~healthwatch.store.merge.sort_table`, strings dictionary-encoded)."""
        self._ensure_init()
        self._seq += 1
        steps = _steps(data)
        name = segment_name(self.writer_id, self._seq, 0, steps)  # step range: readers skip it unopened
        directory = self._dir(table)
        if table not in SERIES_KEYS:
            return write_segment(directory, name, data)
        if not presorted:
            data = sort_table(dictionary_columns(data), table)
        path = Path(_fs.FS.publish(str(directory), name, lambda tmp: write_parquet(data, tmp, table, compress=False)))
        self._track(table, _Own(name, self._seq, 0, data.num_rows, steps), data)
        return path

    def _dir(self, table: str) -> Path:
        """The folder of this run's segments of ``table`` (built once: pathlib joins cost ~30 us each,
        several per flush)."""
        directory = self._dirs.get(table)
        if directory is None:
            directory = self._dirs[table] = table_dir(self.root, table, self.run)
        return directory

    def _track(self, table: str, seg: _Own, data: pa.Table | None) -> None:
        self._own.setdefault(table, []).append(seg)
        self._own[table].sort(key=lambda s: s.seq)
        # Sealed segments are never merged again by this writer: keeping them would only hold memory.
        if data is not None and seg.rows < self.seal_rows and self._cached + data.num_rows <= self.cache_rows:
            self._cache[(table, seg.name)] = data
            self._cached += data.num_rows

    def _uncache(self, table: str, name: str) -> pa.Table | None:
        data = self._cache.pop((table, name), None)
        if data is not None:
            self._cached -= data.num_rows
        return data

    def write(self, table: str, data: pa.Table | dict[str, Sequence[Any]]) -> Path | None:
        """Publish one segment of ``table`` (an Arrow table or column dict); returns its path.

        For ``scalars``/``layer_stats`` the rollup buckets these rows close are published right
        after them (a reader that finds a bucket in the rollups finds all of its rows there).
        """
        if table not in TABLES:
            raise ValueError(f"unknown table {table!r} (tables: {', '.join(TABLES)})")
        if self._closed:
            raise ValueError(f"writer of run {self.run!r} attempt {self.attempt} is closed")
        schema = TABLES[table]
        if isinstance(data, dict):
            missing = [f.name for f in schema if f.name not in data]
            if missing:
                raise ValueError(f"{table}: missing column(s) {', '.join(missing)}")
            data = pa.Table.from_pydict({f.name: data[f.name] for f in schema}, schema=schema)
        else:
            missing = [n for n in schema.names if n not in data.column_names]
            if missing:
                raise ValueError(f"{table}: missing column(s) {', '.join(missing)}")
            # Series tables keep (or get) their strings dictionary-encoded: a producer that built
            # them so (the Monitor's row builder) saves the writer hashing every string.
            data = as_schema(data, memory_schema(table) if table in SERIES_KEYS else schema)
        if data.num_rows == 0:
            return None
        acc = self._rollups.get(table)
        if acc is None:
            return self._publish(table, data)
        # Sorted once: the segment and the rollups share the sorted rows and their series codes.
        data, code = sort_table_code(dictionary_columns(data), table)
        path = self._publish(table, data, presorted=True)
        closed = acc.add_parts(data, presorted=True, code=code)
        if closed is not None:
            # Closed buckets are published in batches (a file per 1,000 steps rather than per flush;
            # readers read the rows after the last published bucket raw), except a late row's
            # partial, which must follow its raw row at once.
            pending = self._rollup_pending.setdefault(acc.rtable, [])
            pending.append(closed)
            if acc.late or acc.coarse:
                self._publish_rollups(acc.rtable)
        return path

    def _publish_rollups(self, rtable: str) -> int:
        pending = self._rollup_pending.pop(rtable, [])
        data = self._rollups[rtable.removesuffix("_rollup")].to_table(pending) if pending else None
        if data is None:
            return 0
        self._publish(rtable, data)
        return data.num_rows

    def flush_rollups(self) -> int:
        """Publish the open rollup buckets (the attempt ends); returns the rollup rows published."""
        n = 0
        for acc in self._rollups.values():
            rest = acc.drain_parts()
            if rest is not None:
                self._rollup_pending.setdefault(acc.rtable, []).append(rest)
            n += self._publish_rollups(acc.rtable)
        return n

    def close(self) -> None:
        """Publish the open rollup buckets and merge what is left. Idempotent; no writes after it."""
        if self._closed:
            return
        self.flush_rollups()
        self._closed = True
        for acc in self._rollups.values():
            self.compact_own(acc.rtable)
            acc.close()
        self._cache.clear()
        self._cached = 0

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def compact_own(self, table: str) -> int:
        """Merge this writer's segments level by level (``merge_fanout`` files of a level -> one).

        Returns the number of merges done. Skips silently when another process holds the lock.
        Merging ``scalars``/``layer_stats`` also merges their rollups (a handful of small files).
        Costs nothing when no level is full: the writer knows its own segments without listing.
        """
        merges = self._compact_own(table)
        if table in self._rollups:
            merges += self._compact_own(f"{table}_rollup")
        return merges

    def _due(self, table: str) -> list[_Own] | None:
        """The oldest ``merge_fanout`` unsealed segments of the lowest full level, or None."""
        by_level: dict[int, list[_Own]] = {}
        for seg in self._own.get(table, []):
            if seg.rows < self.seal_rows:
                by_level.setdefault(seg.level, []).append(seg)
        level = next((lv for lv in sorted(by_level) if len(by_level[lv]) >= self.merge_fanout), None)
        return None if level is None else by_level[level][: self.merge_fanout]

    def _compact_own(self, table: str) -> int:
        directory = self._dir(table)
        if _fs.is_remote(directory):
            return self._compact_remote(directory, table)
        if table not in SERIES_KEYS:
            return self._compact_listed(directory, table)
        merges = 0
        while self._due(table) is not None:
            with merge_lock(directory, blocking=False) as locked:
                if not locked:
                    return merges
                # Compaction (another process) may have merged some of them away meanwhile.
                live = {p.name for p in list_segments(directory)}
                for seg in [s for s in self._own.get(table, []) if s.name not in live]:
                    self._own[table].remove(seg)
                    self._uncache(table, seg.name)
                group = self._due(table)
                if group is None:
                    return merges
                self._merge(directory, table, group)
                merges += 1
        return merges

    def _merge(self, directory: Path, table: str, group: list[_Own]) -> None:
        """Merge ``group`` (caller holds the lock) into one segment of the next level."""
        parts = []
        for seg in group:
            data = self._cache.get((table, seg.name))
            parts.append(data if data is not None else read_segment(directory / seg.name, table))
        sealed = sum(seg.rows for seg in group) >= self.seal_rows
        # A sealed result is written once and never merged again by this writer: its long runs
        # stay zero-copy slices of the sources (no contiguous copy of ~8M rows).
        merged = merge_tables(parts, table, contiguous=not sealed)
        level = group[-1].level + 1
        known = [seg.steps for seg in group]
        # The merge's step range is the union of its sources' (known without a pass over the rows).
        steps = (min(st[0] for st in known if st), max(st[1] for st in known if st)) if all(known) else step_range(merged)
        target = segment_name(self.writer_id, group[-1].seq, level, steps)
        tmp = directory / f".tmp-{uuid.uuid4().hex}.partial"
        try:
            write_parquet(merged, tmp, table, compress=sealed)
            publish_merge(directory, [directory / s.name for s in group], tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        for seg in group:
            self._own[table].remove(seg)
            self._uncache(table, seg.name)
        self._track(table, _Own(target, group[-1].seq, level, merged.num_rows, steps), merged)

    def _compact_listed(self, directory: Path, table: str) -> int:
        """Level-by-level merge of a table the writer does not track (DuckDB, by listing)."""
        merges = 0
        with merge_lock(directory, blocking=False) as locked:
            if not locked:
                return 0
            while (group := self._listed_group(directory)) is not None:
                level = group[-1].level
                target = segment_name(self.writer_id, group[-1].seq, level + 1, union_steps(group))
                merge_files(directory, [s.path for s in group], target, table)
                merges += 1
        return merges

    def _listed_group(self, directory: Path) -> list | None:
        mine = [s for s in map(parse_segment, list_segments(directory)) if s.writer == self.writer_id]
        by_level: dict[int, list] = {}
        for seg in mine:
            by_level.setdefault(seg.level, []).append(seg)
        level = next((lv for lv in sorted(by_level) if len(by_level[lv]) >= self.merge_fanout), None)
        return None if level is None else sorted(by_level[level], key=lambda s: s.seq)[: self.merge_fanout]

    def _compact_remote(self, directory: Path, table: str) -> int:
        # On object storage a merger holds the merge lease of its sources' owner (merge_s3 takes this
        # writer's own, without waiting): while ``healthwatch compact`` holds it, merging waits a flush.
        from healthwatch.objectstore import LeaseLost, MergeSkipped, merge_s3

        merges = 0
        while (group := self._listed_group(directory)) is not None:
            target = segment_name(self.writer_id, group[-1].seq, group[-1].level + 1, union_steps(group))
            try:
                merge_s3(str(directory), [str(s.path) for s in group], target, table,
                         merge=merge_files, manifest_prefix=MANIFEST_PREFIX)
            except (MergeSkipped, LeaseLost):
                break
            merges += 1
        self._own.pop(table, None)  # the listing is the truth there
        for key in [k for k in self._cache if k[0] == table]:
            self._uncache(*key)
        return merges
