"""Compaction: merge every table of a run into one sorted segment each, and backfill rollups.

Live writers keep their own segments merged and their rollups current
(:mod:`healthwatch.store.writer`), so compaction is optional housekeeping: it merges what
several writers left, and computes rollups for attempts written without them (a store from an
older version, or an import). Safe beside live writers and readers: merges publish first and
retire second, and rollups are computed only for attempts that can no longer grow.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import duckdb

from healthwatch.schema import TABLES, check_schema_version
from healthwatch.store import fs as _fs
from healthwatch.store.merge import merge_files, sql_str
from healthwatch.store.meta import ROLLUP_BUCKETS, read_meta
from healthwatch.store.rollup import ROLLUP_KEYS, rollup_select
from healthwatch.store.segments import (
    iter_run_dirs,
    list_segments,
    merge_lock,
    publish_merge,
    recover_directory,
    segment_problem,
    table_dir,
)

log = logging.getLogger("healthwatch.store")

#: Kind of the event a closing Monitor records ("finished"); an attempt with it can no longer grow.
END_EVENT = "close"


def _mergeable(paths: list[Path], table: str) -> list[Path]:
    """The readable segments of ``table`` among ``paths``; a stray or corrupt file is left in place.

    A rollup segment of an older format (no ``attempt`` column) is derived data that can no longer
    be used exactly after a rollback: it is deleted, and :func:`write_rollups` recomputes it.
    """
    out = []
    for path in paths:
        try:
            problem = segment_problem(path, table)
        except FileNotFoundError:
            continue
        if problem and table.endswith("_rollup") and "no column 'attempt'" in problem:
            log.warning("compaction drops old-format rollup %s (recomputed per attempt)", path)
            _fs.FS.delete(str(path))
            continue
        if problem:
            log.warning("compaction leaves %s alone: %s", path, problem)
            continue
        out.append(path)
    return out


def compact_run(root: Path, run: str, rollups: bool = True, min_files: int = 2) -> dict[str, int]:
    """Merge every table of one run (rollups included) into one sorted segment each.

    Returns ``{table: files_before}`` for the tables it merged. With ``rollups``, first computes
    the rollups missing for finished attempts (:func:`write_rollups`).
    """
    root = Path(root)
    if rollups:
        write_rollups(root, run)
    merged: dict[str, int] = {}
    for table in TABLES:
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
    return merged


def _files_sql(paths: Sequence[Path]) -> str:
    return "[" + ", ".join(sql_str(_fs.FS.open_input(str(p))) for p in paths) + "]"


def write_rollups(root: Path, run: str) -> dict[str, list[int]]:
    """Compute rollups for the attempts of ``run`` that have none and can no longer grow.

    An attempt can no longer grow when a later attempt exists or its writer recorded an
    ``close`` event. A live attempt is left alone: its writer publishes its own rollups (computing
    them here too would count its rows twice). Returns ``{table: [attempts rolled up]}``.
    """
    root = Path(root)
    done: dict[str, list[int]] = {}
    con = duckdb.connect(config={"temp_directory": str(Path(tempfile.gettempdir()) / f"healthwatch-duckdb-{os.getpid()}")})
    try:
        att_files = _mergeable(list_segments(table_dir(root, "attempts", run)), "attempts")
        ev_files = _mergeable(list_segments(table_dir(root, "events", run)), "events")
        attempts = {int(r[0]) for r in con.sql(f"SELECT DISTINCT attempt FROM read_parquet({_files_sql(att_files)})")
                    .fetchall()} if att_files else set()
        ended = {int(r[0]) for r in con.sql(
            f"SELECT DISTINCT attempt FROM read_parquet({_files_sql(ev_files)}) WHERE kind = '{END_EVENT}'"
        ).fetchall()} if ev_files else set()
        for table in ROLLUP_KEYS:
            sources = _mergeable(list_segments(table_dir(root, table, run)), table)
            if not sources:
                continue
            rtable = f"{table}_rollup"
            rdir = table_dir(root, rtable, run)
            rfiles = _mergeable(list_segments(rdir), rtable)
            have = {int(r[0]) for r in con.sql(
                f"SELECT DISTINCT attempt FROM read_parquet({_files_sql(rfiles)})").fetchall()} if rfiles else set()
            src = f"read_parquet({_files_sql(sources)}, union_by_name = true)"
            present = {int(r[0]) for r in con.sql(f"SELECT DISTINCT attempt FROM {src}").fetchall()}
            latest = max(attempts | present, default=0)
            todo = sorted(a for a in present - have if a in ended or a < latest)
            if not todo:
                continue
            marks = ", ".join(str(int(a)) for a in todo)
            body = f"(SELECT * FROM {src} WHERE attempt IN ({marks}))"
            union = " UNION ALL ".join(f"({rollup_select(table, body, b)})" for b in ROLLUP_BUCKETS)
            cols = ", ".join(f'"{c}"' for c in TABLES[rtable].names)
            name = f"rollup{uuid.uuid4().hex[:8]}-{int(time.time()):012d}-L0.parquet"

            def write(tmp: str, union: str = union, cols: str = cols) -> None:
                con.execute(f"COPY (SELECT {cols} FROM ({union})) TO {sql_str(tmp)} "
                            "(FORMAT parquet, COMPRESSION zstd, ROW_GROUP_SIZE 122880)")

            with merge_lock(rdir, blocking=True) as locked:
                if not locked:
                    continue
                _fs.FS.publish(str(rdir), name, write)
            done[table] = todo
    finally:
        con.close()
    return done


def compact_store(
    root: str | os.PathLike[str], runs: Sequence[str] | None = None, rollups: bool = True
) -> dict[str, dict[str, int]]:
    """Compact every run of a store (or the given runs). Returns ``{run: {table: files_before}}``."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no healthwatch store at {root}")
    check_schema_version(read_meta(root).get("schema_version"), f"store {root}")
    found: set[str] = set()
    for table in TABLES:
        found.update(r for r, _ in iter_run_dirs(root, table))
    out: dict[str, dict[str, int]] = {}
    for run in sorted(found if runs is None else set(runs) & found):
        out[run] = compact_run(root, run, rollups=rollups)
    return out


__all__ = ["END_EVENT", "compact_run", "compact_store", "publish_merge", "write_rollups"]
