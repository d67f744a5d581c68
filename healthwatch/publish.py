"""Publish a store's sealed segments as Delta Lake tables that Spark, Trino, DuckDB or Daft read.

The segment folders are not a table format: during a merge, a reader that does not honour the
store's merge manifests (Spark, Trino) would count rows twice. The publisher is the store's
**one committer**: each cycle it lists the live segments of every table (the store's own read
rules: published names only, merge manifests applied), compares them with the files of the Delta
table's current snapshot, and commits the difference in **one Delta transaction per table**:
``add`` for each new segment (the immutable file is hard-linked, or copied, into the table
folder), ``remove`` for each segment a merge retired. Every Delta version therefore holds
exactly the rows the store held at one listing: no row twice, none lost. Store compaction never
breaks a Delta reader (the table keeps its own link to every file until ``vacuum``).

Tables (``<out>/<table>``, partitioned by ``run``): ``runs``, ``attempts``, ``scalars``,
``layer_stats``, ``expert_load``, ``events``, ``alerts``. Superseded attempts are expressed by
the published ``attempts`` table and :data:`EFFECTIVE_SQL` (the same rule as the app's
``*_effective`` views). Why Delta and not Iceberg: see docs/scale.md.

Run it once (``healthwatch publish --store S``) or as a daemon (``--follow``). One publisher per
output location: a second one is refused while the first holds the lock.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import pyarrow as pa
import pyarrow.parquet as pq

from healthwatch.schema import TABLES

log = logging.getLogger("healthwatch.publish")

#: Store tables published (rollups are derived data an engine recomputes in one GROUP BY).
PUBLISHED_TABLES = ("runs", "attempts", "scalars", "layer_stats", "expert_load", "events", "alerts")
#: Default output folder inside the store (ignored by the store's own listing).
DELTA_DIR = "_delta"
#: Columns whose min/max go into the Delta file statistics (file skipping in engines).
STAT_COLUMNS = ("attempt", "step", "tokens", "layer", "metric", "name", "bucket")

#: Effective rows of a published attempt table (``{table}``): rows of an attempt at steps at or
#: after a later attempt's ``start_step`` are superseded (a rollback). Plain ANSI SQL: runs as is
#: in Spark SQL, Trino and DuckDB once ``attempts`` and ``{table}`` name the published tables.
EFFECTIVE_SQL = """
WITH bounds AS (
  SELECT a.run, a.attempt, MIN(b.start_step) AS superseded_from
  FROM (SELECT DISTINCT run, attempt FROM {attempts}) a
  LEFT JOIN {attempts} b ON b.run = a.run AND b.attempt > a.attempt
  GROUP BY a.run, a.attempt
)
SELECT t.* FROM {table} t
LEFT JOIN bounds ON t.run = bounds.run AND t.attempt = bounds.attempt
WHERE bounds.superseded_from IS NULL OR t.step < bounds.superseded_from
""".strip()


def effective_sql(table: str, attempts: str = "attempts") -> str:
    """:data:`EFFECTIVE_SQL` for one table (names as the engine knows them, e.g. ``delta.`/path```)."""
    return EFFECTIVE_SQL.format(table=table, attempts=attempts)


class PublishError(RuntimeError):
    """The publisher cannot run (missing store, another publisher holds the lock, …)."""


def table_schema(table: str) -> pa.Schema:
    """Arrow schema of a published table: the stored columns plus the ``run`` partition column."""
    return TABLES[table].append(pa.field("run", pa.string()))


# --------------------------------------------------------------------------------------------
# The one place that depends on the store's layout and read API (adapt here after the store
# package refactor: a listing of live segments per (table, run) and a footer check).


def store_listing(store_root: Path, table: str) -> dict[tuple[str, str], Path]:
    """Live, readable segments of ``table`` as ``{(run, file name): path}`` (the store's read rules)."""
    from healthwatch.store import segment_problem
    from healthwatch.store.segments import iter_run_dirs, list_segments

    out: dict[tuple[str, str], Path] = {}
    for run, rdir in iter_run_dirs(store_root, table):
        for path in list_segments(rdir):
            try:
                problem = segment_problem(path, table)
            except FileNotFoundError:  # retired by a merge since the listing: next cycle
                continue
            if problem:
                log.warning("publisher skips %s: %s", path, problem)
                continue
            out[(run, path.name)] = path
    return out


def check_store(store_root: Path) -> None:
    """Raise a clear error unless ``store_root`` is a healthwatch store this version can read."""
    from healthwatch.schema import check_schema_version
    from healthwatch.store import META_FILE

    if not store_root.is_dir():
        raise PublishError(f"no healthwatch store at {store_root} (directory does not exist)")
    meta_path = store_root / META_FILE
    if meta_path.exists():
        check_schema_version(json.loads(meta_path.read_text()).get("schema_version"), f"store {store_root}")


def publisher_lock(out: Path) -> Any:
    """The single-committer lock of an output folder (a context manager yielding whether it was taken)."""
    from healthwatch.store.segments import merge_lock

    return merge_lock(out, blocking=False)


# --------------------------------------------------------------------------------------------


def _file_stats(meta: Any) -> str:
    """Delta ``stats`` JSON (numRecords, min/max of key columns, null counts) from a Parquet footer."""
    stats: dict[str, Any] = {"numRecords": meta.num_rows, "minValues": {}, "maxValues": {}, "nullCount": {}}
    names = meta.schema.to_arrow_schema().names
    for col in STAT_COLUMNS:
        if col not in names:
            continue
        idx = names.index(col)
        lo = hi = None
        nulls = 0
        for rg in range(meta.num_row_groups):
            st = meta.row_group(rg).column(idx).statistics
            if st is None or not st.has_min_max:
                lo = hi = None
                nulls = -1
                break
            lo = st.min if lo is None else min(lo, st.min)
            hi = st.max if hi is None else max(hi, st.max)
            nulls += st.null_count or 0
        if lo is not None and hi is not None:
            stats["minValues"][col] = lo
            stats["maxValues"][col] = hi
        if nulls >= 0:
            stats["nullCount"][col] = nulls
    return json.dumps(stats, default=str)


def _place(src: Path, dest: Path) -> None:
    """Put the immutable segment ``src`` at ``dest``: a hard link (free), else a copy via a temp name."""
    if dest.exists():
        if dest.stat().st_size == src.stat().st_size:
            return  # placed by an earlier cycle that did not get to commit
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dest)
        return
    except OSError:
        pass
    tmp = dest.with_name(f".tmp-{uuid.uuid4().hex}.partial")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dest)


class _LocalSource:
    """Segments of a store on a local/shared file system; Delta tables in a local folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        check_store(root)

    def default_out(self) -> str:
        return str(self.root / DELTA_DIR)

    def storage_options(self) -> dict[str, str] | None:
        return None

    def listing(self, table: str) -> dict[tuple[str, str], Any]:
        return store_listing(self.root, table)

    def place(self, src: Any, table_uri: str, run: str, name: str) -> tuple[int, str]:
        """Put the segment into the table folder; its size and Delta stats."""
        dest = Path(table_uri) / f"run={run}" / name
        _place(src, dest)
        return dest.stat().st_size, _file_stats(pq.ParquetFile(dest).metadata)

    def ensure_dir(self, uri: str) -> None:
        Path(uri).mkdir(parents=True, exist_ok=True)

    def lock(self, out: str) -> Any:
        Path(out).mkdir(parents=True, exist_ok=True)
        return publisher_lock(Path(out))


class _S3Source:
    """Segments of an ``s3://`` store; Delta tables under the same bucket (server-side copies)."""

    LOCK_STALE_S = 300.0

    def __init__(self, uri: str) -> None:
        from healthwatch.objectstore import S3FS, parse_store_uri

        self.uri = parse_store_uri(uri)
        self.fs = S3FS.for_uri(self.uri)
        self.fs.check_bucket()

    def default_out(self) -> str:
        return str(self.uri) + "/" + DELTA_DIR

    def storage_options(self) -> dict[str, str]:
        """delta-rs options: same endpoint and credentials; commits by conditional PUT (no lock service)."""
        creds = self.fs._session.get_credentials()
        opts = {"AWS_REGION": self.fs.region, "conditional_put": "etag"}
        if creds is not None:
            frozen = creds.get_frozen_credentials()
            opts.update(AWS_ACCESS_KEY_ID=frozen.access_key, AWS_SECRET_ACCESS_KEY=frozen.secret_key)
            if frozen.token:
                opts["AWS_SESSION_TOKEN"] = frozen.token
        if self.fs.endpoint:
            opts["AWS_ENDPOINT_URL"] = self.fs.endpoint
            if self.fs.endpoint.startswith("http://"):
                opts["AWS_ALLOW_HTTP"] = "true"
        return opts

    def listing(self, table: str) -> dict[tuple[str, str], Any]:
        from healthwatch.objectstore import live_listing

        return live_listing(self.fs, self.uri, table)

    def place(self, src: Any, table_uri: str, run: str, name: str) -> tuple[int, str]:
        import pyarrow.parquet as pq_

        from healthwatch.objectstore import split_s3

        bucket, key = split_s3(src)
        dest_bucket, dest_key = split_s3(f"{table_uri}/run={run}/{name}")
        with self.fs._call("copy", src):
            self.fs.stats.count("put")
            self.fs.client.copy_object(Bucket=dest_bucket, Key=dest_key, CopySource={"Bucket": bucket, "Key": key})
        afs = self.fs.arrow_filesystem()
        with afs.open_input_file(f"{dest_bucket}/{dest_key}") as fh:
            meta = pq_.ParquetFile(fh).metadata
            size = fh.size()
        return size, _file_stats(meta)

    def ensure_dir(self, uri: str) -> None:
        pass  # prefixes need no creation

    @contextlib.contextmanager
    def lock(self, out: str) -> Any:
        """A lock object created with a create-only PUT; one left by a dead publisher expires."""
        path = f"{out}/_publisher.lock"
        body = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "at": time.time()}).encode()
        taken = self.fs.create_exclusive(path, body)
        if not taken:
            mtime = self.fs.mtime_ns(path)
            if mtime is not None and time.time() - mtime / 1e9 > self.LOCK_STALE_S:
                self.fs.delete(path)
                taken = self.fs.create_exclusive(path, body)
        try:
            yield taken
        finally:
            if taken:
                self.fs.delete(path)


@dataclass
class TableChange:
    """What one cycle committed to one Delta table."""

    table: str
    version: int | None = None
    added: int = 0
    removed: int = 0
    rows_added: int = 0
    rows_removed: int = 0
    commit_s: float = 0.0


@dataclass
class PublishReport:
    """One publish cycle: per-table changes and the cycle's duration."""

    changes: dict[str, TableChange] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def committed(self) -> int:
        """Tables that got a new Delta version in this cycle."""
        return sum(1 for c in self.changes.values() if c.added or c.removed)


class Publisher:
    """Commits a local store's sealed segments into Delta tables (see the module docstring).

    Args:
        store: the store directory.
        out: where the Delta tables go (default ``<store>/_delta``); one folder per table.
        tables: which store tables to publish.
        runs: only these runs (default all).
    """

    def __init__(
        self,
        store: str | os.PathLike[str],
        out: str | os.PathLike[str] | None = None,
        tables: Iterable[str] = PUBLISHED_TABLES,
        runs: Iterable[str] | None = None,
    ) -> None:
        from healthwatch.objectstore import parse_store_uri

        root = parse_store_uri(store)
        self.source: Any = _S3Source(str(root)) if root.is_s3 else _LocalSource(Path(root.path or store))
        self.store = str(root) if root.is_s3 else Path(root.path or store)
        self.out = str(out).rstrip("/") if out is not None else self.source.default_out()
        self.tables = tuple(tables)
        unknown = [t for t in self.tables if t not in TABLES]
        if unknown:
            raise PublishError(f"unknown table(s) {', '.join(unknown)}; published tables: {', '.join(PUBLISHED_TABLES)}")
        self.runs = None if runs is None else set(runs)
        self.cycles = 0

    def table_uri(self, table: str) -> str:
        """The Delta table location of a store table."""
        return f"{self.out}/{table}"

    def storage_options(self) -> dict[str, str] | None:
        """Options that deltalake (and ``DeltaTable(uri, storage_options=...)``) needs to reach the tables."""
        return self.source.storage_options()

    def _open(self, table: str) -> Any:
        from deltalake import DeltaTable

        uri = self.table_uri(table)
        opts = self.source.storage_options()
        if DeltaTable.is_deltatable(uri, storage_options=opts):
            return DeltaTable(uri, storage_options=opts)
        self.source.ensure_dir(uri)
        return DeltaTable.create(
            uri, schema=table_schema(table), partition_by=["run"], mode="ignore", storage_options=opts,
            name=f"healthwatch_{table}", description=f"healthwatch store table {table}, published from {self.store}",
        )

    def publish_table(self, table: str) -> TableChange:
        """Reconcile one Delta table with the store's live segments; one commit when anything changed."""
        from deltalake.transaction import AddAction, CommitProperties, RemoveAction

        change = TableChange(table)
        live = {k: p for k, p in self.source.listing(table).items() if self.runs is None or k[0] in self.runs}
        dt = self._open(table)
        acts = pa.table(dt.get_add_actions(flatten=True)).to_pydict()  # arro3 table -> pyarrow via the C stream
        published: dict[tuple[str, str], tuple[str, int, int]] = {}
        for path, size, rows in zip(acts.get("path", []), acts.get("size_bytes", []), acts.get("num_records", [])):
            rel = unquote(path)
            part, _, name = rel.partition("/")
            run = part[len("run="):] if part.startswith("run=") else part
            if self.runs is None or run in self.runs:
                published[(run, name)] = (path, int(size or 0), int(rows or 0))
        actions: list[Any] = []
        now_ms = int(time.time() * 1000)
        for (run, name), src in sorted(live.items()):
            if (run, name) in published:
                continue
            rel = f"run={quote(run, safe='')}/{quote(name, safe='')}"
            try:
                size, stats = self.source.place(src, self.table_uri(table), run, name)
            except FileNotFoundError:  # retired by a merge after the listing: its target comes next cycle
                continue
            actions.append(AddAction(rel, size, {"run": run}, now_ms, True, stats))
            change.added += 1
            change.rows_added += json.loads(stats)["numRecords"]
        for key, (path, size, rows) in sorted(published.items()):
            if key in live:
                continue
            actions.append(RemoveAction(path, True, now_ms, size, {"run": key[0]}))
            change.removed += 1
            change.rows_removed += rows
        if actions:
            t0 = time.perf_counter()
            self.cycles += 1
            dt.create_write_transaction(
                actions, mode="append", schema=table_schema(table), partition_by=["run"],
                commit_properties=CommitProperties(custom_metadata={
                    "healthwatch.publisher": "healthwatch publish", "healthwatch.added": str(change.added),
                    "healthwatch.removed": str(change.removed),
                }),
            )
            change.commit_s = time.perf_counter() - t0
            dt.update_incremental()
        change.version = dt.version()
        return change

    def publish_once(self) -> PublishReport:
        """One cycle over every table, holding the single-committer lock."""
        t0 = time.perf_counter()
        report = PublishReport()
        with self.source.lock(self.out) as locked:
            if not locked:
                raise PublishError(f"another publisher is committing to {self.out} (one committer per store)")
            for table in self.tables:
                report.changes[table] = self.publish_table(table)
        report.seconds = time.perf_counter() - t0
        return report

    def follow(self, interval_s: float = 10.0, stop: threading.Event | None = None,
               max_cycles: int | None = None, on_cycle: Any = None) -> int:
        """Publish every ``interval_s`` seconds until ``stop`` is set (or ``max_cycles``); returns cycles run.

        A failed cycle (the store mid-merge, a full disk) is logged and retried next time.
        """
        stop = stop or threading.Event()
        cycles = 0
        while not stop.is_set():
            try:
                report = self.publish_once()
                if on_cycle is not None:
                    on_cycle(report)
            except PublishError:
                raise
            except Exception as exc:  # noqa: BLE001 - a daemon keeps going; the next cycle reconciles
                log.warning("publish cycle failed (retrying in %.0fs): %s", interval_s, exc)
            cycles += 1
            if max_cycles is not None and cycles >= max_cycles:
                break
            stop.wait(interval_s)
        return cycles


def published_files(table_uri: str, storage_options: dict[str, str] | None = None) -> list[str]:
    """Data files of the current snapshot of a published table (for engines without a Delta reader)."""
    from deltalake import DeltaTable

    return DeltaTable(table_uri, storage_options=storage_options).file_uris()


def describe(report: PublishReport) -> str:
    """A one-line summary of a cycle for the CLI."""
    parts = [
        f"{c.table} v{c.version} +{c.added}/-{c.removed} files ({c.rows_added - c.rows_removed:+,} rows)"
        for c in report.changes.values() if c.added or c.removed
    ]
    stamp = _dt.datetime.now().strftime("%H:%M:%S")
    return f"[{stamp}] " + ("; ".join(parts) if parts else "nothing new") + f" ({report.seconds:.2f} s)"
