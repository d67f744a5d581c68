"""The store: Parquet segments per (table, run, writer), read with DuckDB.

Modules, from the ground up (none imports one above it):

* :mod:`~healthwatch.store.fs` — the only door to storage (list, publish, read, delete);
* :mod:`~healthwatch.store.timeline` — which rows a later attempt supersedes (pure rule);
* :mod:`~healthwatch.store.meta` — store location, metadata file, runs/attempts row helpers;
* :mod:`~healthwatch.store.segments` — segment names, atomic publish, listing, merge locks;
* :mod:`~healthwatch.store.merge` — merging segments into sorted ones (DuckDB);
* :mod:`~healthwatch.store.rollup` — per-attempt bucket rollups and their running accumulator;
* :mod:`~healthwatch.store.writer` — :class:`StoreWriter` (segments, live rollups, self-merging);
* :mod:`~healthwatch.store.reader` — :class:`Store`, lazy DuckDB views over the segments;
* :mod:`~healthwatch.store.compact` — compaction and rollup backfill.

Queries live in :mod:`healthwatch.query`, the only reader of these views.
"""

from healthwatch.store.compact import END_EVENT, compact_run, compact_store, write_rollups
from healthwatch.store.merge import merge_files
from healthwatch.store.meta import (
    DEFAULT_STORE,
    ENV_STORE,
    META_FILE,
    ROLLUP_BUCKETS,
    attempt_row,
    default_store_path,
    host_name,
    init_store,
    read_meta,
    run_row,
)
from healthwatch.store.reader import Result, Store, open_store
from healthwatch.store.segments import segment_problem
from healthwatch.store.writer import StoreWriter

__all__ = [
    "DEFAULT_STORE", "ENV_STORE", "END_EVENT", "META_FILE", "ROLLUP_BUCKETS", "Result", "Store", "StoreWriter",
    "attempt_row", "compact_run", "compact_store", "default_store_path", "host_name", "init_store",
    "merge_files", "open_store", "read_meta", "run_row", "segment_problem", "write_rollups",
]
