"""The write side: one :class:`StoreWriter` per run x attempt x rank.

It publishes immutable segments, keeps the 100/1,000/10,000-step rollups of ``scalars`` and
``layer_stats`` current as it writes (:mod:`healthwatch.store.rollup`), and merges its own small
segments level by level so a live run of a million steps stays at a bounded number of files and
never needs a manual compaction to be fast.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

from healthwatch.schema import TABLES, validate_run_name
from healthwatch.store import fs as _fs
from healthwatch.store.merge import merge_files
from healthwatch.store.meta import init_store
from healthwatch.store.rollup import ROLLUP_KEYS, RollupAccumulator
from healthwatch.store.segments import list_segments, merge_lock, parse_segment, table_dir, write_segment


class StoreWriter:
    """Publishes segments of one writer (run x attempt x rank), its live rollups, and merges its own files.

    Not thread-safe: one writer belongs to one thread (the Monitor's background writer).
    ``rollups`` keeps the rollups of ``scalars``/``layer_stats`` current (closed buckets are
    published with the rows that close them; :meth:`close` publishes the rest).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        run: str,
        attempt: int = 1,
        rank: int = 0,
        merge_fanout: int = 8,
        rollups: bool = True,
    ) -> None:
        self.root = _fs.root_path(root)
        self.run = validate_run_name(run)
        self.attempt = int(attempt)
        self.rank = rank
        self.writer_id = f"a{attempt:04d}r{rank:05d}x{uuid.uuid4().hex[:8]}"
        self.merge_fanout = max(2, merge_fanout)
        self._seq = 0
        self._initialised = False
        self._rollups: dict[str, RollupAccumulator] = (
            {t: RollupAccumulator(t) for t in ROLLUP_KEYS} if rollups else {}
        )
        self._closed = False

    def _ensure_init(self) -> None:
        if not self._initialised:
            _fs.ensure_writable(self.root)  # s3://: refuse a server that ignores If-None-Match (once per process)
            init_store(self.root)
            self._initialised = True

    def _publish(self, table: str, data: pa.Table) -> Path:
        self._ensure_init()
        self._seq += 1
        name = f"{self.writer_id}-{self._seq:09d}-L0.parquet"
        return write_segment(table_dir(self.root, table, self.run), name, data)

    def write(self, table: str, data: pa.Table | dict[str, Sequence[Any]]) -> Path | None:
        """Publish one segment of ``table`` (an Arrow table or column dict); returns its path.

        For ``scalars``/``layer_stats`` the rollup buckets these rows close are published right
        after them (a reader that finds a bucket in the rollups finds all of its rows there).
        """
        if table not in TABLES:
            raise ValueError(f"unknown table {table!r} (tables: {', '.join(TABLES)})")
        schema = TABLES[table]
        if isinstance(data, dict):
            missing = [f.name for f in schema if f.name not in data]
            if missing:
                raise ValueError(f"{table}: missing column(s) {', '.join(missing)}")
            data = pa.Table.from_pydict({f.name: data[f.name] for f in schema}, schema=schema)
        else:
            data = data.select(schema.names).cast(schema)
        if data.num_rows == 0:
            return None
        path = self._publish(table, data)
        acc = self._rollups.get(table)
        if acc is not None:
            closed = acc.add(data)
            if closed is not None:
                self._publish(acc.rtable, closed)
        return path

    def flush_rollups(self) -> int:
        """Publish the open rollup buckets (the attempt ends); returns the rollup rows published."""
        n = 0
        for acc in self._rollups.values():
            rest = acc.drain()
            if rest is not None:
                self._publish(acc.rtable, rest)
                n += rest.num_rows
        return n

    def close(self) -> None:
        """Publish the open rollup buckets and merge what is left. Idempotent; no writes after it."""
        if self._closed:
            return
        self._closed = True
        self.flush_rollups()
        for acc in self._rollups.values():
            self.compact_own(acc.rtable)
            acc.close()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def compact_own(self, table: str) -> int:
        """Merge this writer's segments level by level (``merge_fanout`` files of a level -> one).

        Returns the number of merges done. Skips silently when another process holds the lock.
        Merging ``scalars``/``layer_stats`` also merges their rollups (a handful of small files).
        """
        merges = self._compact_own(table)
        if table in self._rollups:
            merges += self._compact_own(f"{table}_rollup")
        return merges

    def _compact_own(self, table: str) -> int:
        directory = table_dir(self.root, table, self.run)
        merges = 0
        remote = _fs.is_remote(directory)
        # On object storage a writer merges only its own segments without the directory lock: no
        # compaction runs there (``compact_store`` refuses s3:// roots), so no one else merges them.
        with contextlib.nullcontext(True) if remote else merge_lock(directory, blocking=False) as locked:
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
                if remote:
                    from healthwatch.objectstore import merge_s3

                    merge_s3(str(directory), [str(s.path) for s in group], target, table)
                else:
                    merge_files(directory, [s.path for s in group], target, table)
                merges += 1
