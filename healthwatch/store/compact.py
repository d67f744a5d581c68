"""Compaction: merge every table of a run into one sorted segment each, and backfill rollups.

Live writers keep their own segments merged and their rollups current
(:mod:`healthwatch.store.writer`), so compaction is optional housekeeping: it merges what
several writers left, and computes rollups for attempts written without them (a store from an
older version, or an import). Safe beside live writers and readers: merges publish first and
retire second, and rollups are computed only for attempts that can no longer grow.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import duckdb

from healthwatch.schema import TABLES, check_schema_version
from healthwatch.store import fs as _fs
from healthwatch.store.merge import merge_files, sql_str
from healthwatch.store.meta import ROLLUP_BUCKETS, read_meta
from healthwatch.store.rollup import ROLLUP_KEYS, rollup_select
from healthwatch.store.segments import (
    MANIFEST_PREFIX,
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
    if _fs.is_remote(root):
        return _compact_run_s3(root, run, rollups=rollups, min_files=min_files)
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


#: Seconds ``healthwatch compact`` waits for a live writer's merge lease on S3 before leaving its
#: segments for the next compaction (a writer's own merge takes seconds).
LEASE_WAIT_S = 30.0


def _compact_run_s3(root: Path, run: str, rollups: bool = True, min_files: int = 2,
                    wait_s: float = LEASE_WAIT_S) -> dict[str, int]:
    """:func:`compact_run` on an ``s3://`` store: the same merges, under merge leases (docs/scale.md).

    For each table, the compactor takes the merge lease of every owner (writer id) of the table's
    live segments, waiting up to ``wait_s`` for live writers' own merges; segments whose owner's
    lease it could not get are left for the next compaction. Holding the leases, it lists again
    and merges what is live (:func:`healthwatch.objectstore.merge_s3`: recovery of merges that died,
    lease checks before each publish step). Returns ``{table: files_before}`` like on disk.
    """
    from healthwatch.objectstore import LeaseLost, MergeSkipped, merge_s3, owner_leases, segment_owner

    if rollups:
        write_rollups(root, run)
    holder = f"compact{uuid.uuid4().hex[:8]}"
    merged: dict[str, int] = {}
    for table in TABLES:
        directory = table_dir(root, table, run)
        listed = list_segments(directory)
        if len(listed) < min_files:
            continue
        owners = {segment_owner(str(p)) for p in listed}
        with owner_leases(str(directory), owners, holder, wait_s=wait_s) as held:
            if len(held) < len(owners):
                log.info("compaction of %s leaves the segments of %d writer(s) whose merge lease is held",
                         directory, len(owners) - len(held))
            sources = _mergeable([p for p in list_segments(directory) if segment_owner(str(p)) in held], table)
            if len(sources) < min_files:
                continue
            target = f"{holder}-{int(time.time()):012d}-L99.parquet"
            try:
                merge_s3(str(directory), [str(p) for p in sources], target, table, merge=merge_files,
                         manifest_prefix=MANIFEST_PREFIX, leases=held)
            except (MergeSkipped, LeaseLost) as exc:
                log.warning("compaction of %s skipped: %s", directory, exc)
                continue
            merged[table] = len(sources)
    return merged


def _files_sql(paths: Sequence[Path]) -> str:
    return "[" + ", ".join(sql_str(_fs.FS.open_input(str(p))) for p in paths) + "]"


@contextlib.contextmanager
def _rollup_lock(rdir: Path, holder: str, wait_s: float = LEASE_WAIT_S) -> Iterator[Callable[[], None] | None]:
    """Serialise compactors' rollup backfill of one rollup folder; yields a pre-publish check, or None.

    On disk: the folder's merge lock (blocking). On S3: the folder's compactor lease
    (:data:`healthwatch.objectstore.COMPACT_LEASE`), waited for up to ``wait_s``; the yielded check
    renews it (:class:`~healthwatch.objectstore.LeaseLost` when it was broken meanwhile).
    """
    if not _fs.is_remote(rdir):
        rdir.mkdir(parents=True, exist_ok=True)  # the first rollups of a run: the lock file needs its folder
        with merge_lock(rdir, blocking=True) as locked:
            yield (lambda: None) if locked else None
        return
    from healthwatch.objectstore import COMPACT_LEASE, S3Lease

    fs = _fs.fs_for(rdir)
    lease = S3Lease(fs, f"{rdir}/{COMPACT_LEASE}", holder)  # type: ignore[arg-type]
    if not lease.acquire_within(wait_s):
        yield None
        return
    try:
        with lease.keep_alive():
            yield lease.check
    finally:
        lease.release()


def write_rollups(root: Path, run: str) -> dict[str, list[int]]:
    """Compute rollups for the attempts of ``run`` that have none and can no longer grow.

    An attempt can no longer grow when a later attempt exists or its writer recorded an
    ``close`` event. A live attempt is left alone: its writer publishes its own rollups (computing
    them here too would count its rows twice). Which attempts already have rollups is read while
    holding the rollup folder's lock (two compactors never both add the same attempt's). On an
    ``s3://`` store the segments read are downloaded to a temp folder first (DuckDB reads local
    files; its S3 extension is not available offline). Returns ``{table: [attempts rolled up]}``.
    """
    root = Path(root)
    remote = _fs.is_remote(root)
    holder = f"rollup{uuid.uuid4().hex[:8]}"
    done: dict[str, list[int]] = {}
    con = duckdb.connect(config={"temp_directory": str(Path(tempfile.gettempdir()) / f"healthwatch-duckdb-{os.getpid()}")})
    with tempfile.TemporaryDirectory(prefix="hw-rollups-") as tmp:

        def local(paths: list[Path]) -> list[Path]:
            if not remote:
                return paths
            out = []
            for p in paths:
                parts = Path(str(p)).parts  # …/table=<t>/run=<r>/<name>: keep the folders apart
                dest = Path(tmp, *parts[-3:])
                if not dest.exists():
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    _fs.fs_for(str(p)).download(str(p), dest)  # type: ignore[attr-defined]  # S3FS: streamed
                out.append(dest)
            return out

        def attempts_in(paths: list[Path], where: str = "") -> set[int]:
            if not paths:
                return set()
            return {int(r[0]) for r in con.sql(
                f"SELECT DISTINCT attempt FROM read_parquet({_files_sql(local(paths))}, union_by_name = true) {where}"
            ).fetchall()}

        try:
            attempts = attempts_in(_mergeable(list_segments(table_dir(root, "attempts", run)), "attempts"))
            ended = attempts_in(_mergeable(list_segments(table_dir(root, "events", run)), "events"),
                                f"WHERE kind = '{END_EVENT}'")
            for table in ROLLUP_KEYS:
                if not list_segments(table_dir(root, table, run)):
                    continue
                rtable = f"{table}_rollup"
                rdir = table_dir(root, rtable, run)
                with _rollup_lock(rdir, holder) as check:
                    if check is None:
                        continue
                    # Listed under the lock: a merge may have replaced the files meanwhile (same rows).
                    sources = local(_mergeable(list_segments(table_dir(root, table, run)), table))
                    have = attempts_in(_mergeable(list_segments(rdir), rtable))
                    present = attempts_in(sources)
                    latest = max(attempts | present, default=0)
                    todo = sorted(a for a in present - have if a in ended or a < latest)
                    if not todo:
                        continue
                    marks = ", ".join(str(int(a)) for a in todo)
                    src = f"read_parquet({_files_sql(sources)}, union_by_name = true)"
                    body = f"(SELECT * FROM {src} WHERE attempt IN ({marks}))"
                    union = " UNION ALL ".join(f"({rollup_select(table, body, b)})" for b in ROLLUP_BUCKETS)
                    cols = ", ".join(f'"{c}"' for c in TABLES[rtable].names)
                    name = f"{holder}-{int(time.time()):012d}-L0.parquet"

                    built = Path(tmp, f"built-{name}")
                    con.execute(f"COPY (SELECT {cols} FROM ({union})) TO {sql_str(str(built))} "
                                "(FORMAT parquet, COMPRESSION zstd, ROW_GROUP_SIZE 122880)")
                    check()  # right before the publish: still the one compactor of this folder
                    _fs.FS.publish(str(rdir), name, lambda dest, built=built: shutil.copyfile(built, dest))
                    done[table] = todo
        finally:
            con.close()
    return done


def check_s3_compaction(root: str | os.PathLike[str]) -> None:
    """Before compacting an ``s3://`` store: the server enforces ``If-None-Match`` and ``If-Match``.

    Raises :class:`healthwatch.objectstore.ConditionalWriteUnsupportedError` naming the endpoint
    otherwise (merge leases need both; docs/scale.md).
    """
    from healthwatch.objectstore import parse_store_uri

    _fs.ensure_writable(root)
    fs = _fs.fs_for(root)
    fs.probe_if_match(parse_store_uri(_fs.root_uri(root)).prefix)  # type: ignore[attr-defined]


def compact_store(
    root: str | os.PathLike[str], runs: Sequence[str] | None = None, rollups: bool = True
) -> dict[str, dict[str, int]]:
    """Compact every run of a store (or the given runs). Returns ``{run: {table: files_before}}``.

    An ``s3://`` root (``s3://bucket/prefix``) is compacted under merge leases (docs/scale.md); the
    server must enforce ``If-Match`` on PUT (checked first, a clear error otherwise).
    """
    remote = _fs.is_remote(root)
    root = _fs.root_path(os.fspath(root)) if remote else Path(root)
    if not _fs.store_exists(root):
        raise FileNotFoundError(f"no healthwatch store at {_fs.root_uri(root) if remote else root}")
    check_schema_version(read_meta(root).get("schema_version"), f"store {root}")
    if remote:
        check_s3_compaction(root)
    found: set[str] = set()
    for table in TABLES:
        found.update(r for r, _ in iter_run_dirs(root, table))
    out: dict[str, dict[str, int]] = {}
    for run in sorted(found if runs is None else set(runs) & found):
        out[run] = compact_run(root, run, rollups=rollups)
    return out


__all__ = ["END_EVENT", "check_s3_compaction", "compact_run", "compact_store", "publish_merge", "write_rollups"]
