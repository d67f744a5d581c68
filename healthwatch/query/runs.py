"""Runs: the list, one run's facts and status, lineage, attempts, events, markers and alert history."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from typing import Any

import polars as pl

from healthwatch.query.timeline import Timeline
from healthwatch.store import END_EVENT, Store
from healthwatch.store import fs as _fs
from healthwatch.store.reader import per_run

#: A run whose last row was written this recently (and whose writer did not close) counts as live.
LIVE_S = 120.0


#: On object storage a folder's signature is a LIST walk (no directory mtimes there): signatures asked for
#: within this many seconds share one walk per table (env ``HEALTHWATCH_S3_SIGNATURE_TTL_S``; 0 = none).
SIGNATURE_TTL_S = float(os.environ.get("HEALTHWATCH_S3_SIGNATURE_TTL_S", 1.0))
_walks: dict[str, tuple[float, dict[str, int]]] = {}
_walks_lock = threading.Lock()


def _remote_table_sig(table_dir: str) -> dict[str, int]:
    """``{"": whole table, "run=<r>": that run}`` change signatures of an ``s3://`` table folder, from one walk.

    A signature is a hash of the keys and sizes listed (what ``S3FS.mtime_ns`` of a prefix is), so it
    changes when a segment is published, merged or retired. Before this, every signature paid one
    LIST walk per ``table=/run=`` prefix: a warm Run page on S3 made 721 LIST calls (docs/scale.md).
    """
    now = time.monotonic()
    with _walks_lock:
        hit = _walks.get(table_dir)
        if hit is not None and now - hit[0] < SIGNATURE_TTL_S:
            return hit[1]
    fs = _fs.fs_for(table_dir)
    listing = sorted(fs.walk(table_dir))  # type: ignore[attr-defined]  # S3FS: one paginated LIST
    prefix = table_dir.rstrip("/") + "/"
    groups: dict[str, list[tuple[str, int]]] = {"": listing}
    for path, size in listing:
        folder = path[len(prefix):].split("/", 1)[0] if path.startswith(prefix) else ""
        if folder.startswith("run="):
            groups.setdefault(folder, []).append((path, size))
    sigs = {k: int.from_bytes(hashlib.blake2b(repr(v).encode(), digest_size=8).digest(), "big") >> 1
            for k, v in groups.items() if v}
    with _walks_lock:
        _walks[table_dir] = (now, sigs)
    return sigs


def _table_root(store: Store, table: str) -> str:
    root = str(store.root).rstrip("/")
    if _fs.is_remote(root):  # pathlib spells s3://b/p as s3:/b/p; S3FS.walk lists as s3://
        root = _fs.root_uri(root)
    return f"{root}/table={table}"


def run_signature(store: Store, run: str, tables: tuple[str, ...] = ("scalars", "layer_stats", "attempts")) -> tuple:
    """A cheap cache key for ``run``: its table directories' modification times.

    Changes exactly when segments are published, merged or retired for that run, so a writer
    appending to run A never invalidates run B's cached results. On an ``s3://`` store: one LIST
    walk per table, shared by every signature asked for within ``SIGNATURE_TTL_S`` (so a signature
    may lag a new segment by that long).
    """
    if _fs.is_remote(str(store.root)):
        return (str(store.root), run, *(_remote_table_sig(_table_root(store, t)).get(f"run={run}") for t in tables))
    return (str(store.root), run, *(_fs.FS.mtime_ns(f"{str(store.root).rstrip('/')}/table={t}/run={run}") for t in tables))


def store_signature(store: Store) -> tuple:
    """A cheap cache key for store-wide results: the table and run directories' modification times.

    The run directories count too: a segment published into an existing ``run=`` folder changes that
    folder's mtime, not the table folder's (a stale Alerts page under the soak test showed it).
    On an ``s3://`` store: one shared LIST walk per table, as in :func:`run_signature`.
    """
    from healthwatch.schema import TABLES

    key: list = [str(store.root)]
    if _fs.is_remote(str(store.root)):
        for t in TABLES:
            sigs = _remote_table_sig(_table_root(store, t))
            key.append(sigs.get(""))
            key.extend(sorted((k, v) for k, v in sigs.items() if k))
        return tuple(key)
    for t in TABLES:
        table_dir = f"{str(store.root).rstrip('/')}/table={t}"
        key.append(_fs.FS.mtime_ns(table_dir))
        key.extend((name, _fs.FS.mtime_ns(f"{table_dir}/{name}")) for name in sorted(_fs.FS.list(table_dir)))
    return tuple(key)


@per_run
def attempts(store: Store, run: str) -> pl.DataFrame:
    """Attempts of ``run`` as ``(attempt, start_step, started_at, reason, superseded_from)``."""
    df = store.sql(
        "SELECT attempt, min(start_step) AS start_step, min(started_at) AS started_at, any_value(reason) AS reason "
        "FROM attempts WHERE run = ? GROUP BY attempt ORDER BY attempt", [run]
    ).pl()
    later = [min((s for a2, s in zip(df["attempt"], df["start_step"]) if a2 > a), default=None)
             for a in df["attempt"]]
    return df.with_columns(pl.Series("superseded_from", later, dtype=pl.Int64))


@per_run
def timeline(store: Store, run: str, attempt: int | None = None) -> Timeline:
    """The :class:`Timeline` of ``attempt`` of ``run`` (None: the effective path)."""
    rows = store.sql("SELECT attempt, start_step FROM attempts WHERE run = ?", [run]).fetchall()
    return Timeline.of(rows, attempt)


def path_for(att: pl.DataFrame, attempt: int | None = None) -> Timeline:
    """The :class:`Timeline` of ``attempt`` from an :func:`attempts` frame (None: effective path)."""
    if att.height == 0:
        return Timeline(attempt)
    return Timeline.of(zip(att["attempt"].to_list(), att["start_step"].to_list()), attempt)


def scanned_path(store: Store, run: str, attempt: int | None = None) -> tuple[Any, pl.DataFrame, Timeline] | None:
    """``(store.scan_run, the run's attempts rows, the Timeline of attempt)`` for the direct (pyarrow)
    reads, the attempts read by the same scan; None when the store cannot scan (then SQL answers)."""
    scan = getattr(store, "scan_run", None)
    if scan is None:
        return None
    att = scan("attempts", run, ["attempt", "start_step"])
    if att is None:
        return None
    return scan, att, path_for(att, attempt)


def scanned_timeline(store: Store, run: str, attempt: int | None = None) -> tuple[Any, Timeline] | None:
    """``(store.scan_arrays, the Timeline of attempt)`` for the direct NumPy reads of a fresh
    process (no polars query: the attempts rows come as arrays); None when the store cannot scan."""
    scan = getattr(store, "scan_arrays", None)
    if scan is None:
        return None
    att = scan("attempts", run, ["attempt", "start_step"])
    if att is None:
        return None
    # No attempts rows: Timeline.of gives the bare path, as path_for does.
    return scan, Timeline.of(zip(att["attempt"].tolist(), att["start_step"].tolist()), attempt)


@per_run
def finished(store: Store, run: str) -> bool:
    """Whether ``run``'s latest attempt was closed by its writer (a ``close`` event)."""
    row = store.sql(
        "SELECT (SELECT max(attempt) FROM events WHERE run = ? AND kind = ?) >= "
        "coalesce((SELECT max(attempt) FROM attempts WHERE run = ?), 0)", [run, END_EVENT, run]
    ).fetchone()
    return bool(row and row[0])


def heartbeats(store: Store, runs: list[str]) -> dict[str, tuple[int, float, int | None]]:
    """Per run of ``runs`` on its effective path: ``(last step, its heartbeat wall time, last close step)``.

    The facts a stall rule needs: the newest ``monitor/heartbeat`` and the newest ``close`` event
    (``None`` when the writer never closed). Runs without a heartbeat are absent.
    """
    if not runs:
        return {}
    closed = dict(store.sql(
        "SELECT run, max(step) FROM events_effective WHERE kind = ? AND list_contains(?::VARCHAR[], run) GROUP BY run",
        [END_EVENT, runs]).fetchall())
    beats = store.sql(
        "SELECT run, max(step), arg_max(value, step) FROM scalars_effective WHERE name = 'monitor/heartbeat' "
        "AND list_contains(?::VARCHAR[], run) GROUP BY run", [runs]).fetchall()
    return {run: (int(step), float(beat), None if closed.get(run) is None else int(closed[run]))
            for run, step, beat in beats if step is not None and beat is not None}


def status(last_write: float | None, is_finished: bool, now: float | None = None) -> str:
    """``finished`` (its Monitor closed), ``live`` (written within ``LIVE_S``), ``idle`` or ``empty``."""
    if is_finished:
        return "finished"
    if last_write is None:
        return "empty"
    return "live" if (time.time() if now is None else now) - last_write < LIVE_S else "idle"


def runs_overview(store: Store) -> pl.DataFrame:
    """One row per run: lineage, precision, attempts, last step/tokens/write and ``status``."""
    df = store.sql(
        """
        WITH last AS (
            SELECT run, max(step) AS last_step, max(tokens) AS last_tokens, max(wall_time) AS last_write
            FROM scalars GROUP BY run
        ),
        att AS (SELECT run, count(DISTINCT attempt) AS attempts, max(attempt) AS last_attempt FROM attempts GROUP BY run),
        ended AS (SELECT run, max(attempt) AS ended_attempt FROM events WHERE kind = ? GROUP BY run)
        SELECT r.run, r.parent, r.branch_step, r.branch_tokens, r.precision, r.created,
               coalesce(att.attempts, 0) AS attempts, last.last_step, last.last_tokens, last.last_write,
               coalesce(ended.ended_attempt >= coalesce(att.last_attempt, 0), false) AS finished
        FROM runs r LEFT JOIN last USING (run) LEFT JOIN att USING (run) LEFT JOIN ended USING (run)
        ORDER BY r.created, r.run
        """, [END_EVENT]
    ).pl()
    now = time.time()
    return df.with_columns(pl.struct("last_write", "finished").map_elements(
        lambda r: status(r["last_write"], bool(r["finished"]), now), return_dtype=pl.Utf8).alias("status")
        if df.height else pl.lit(None, dtype=pl.Utf8).alias("status"))


@per_run
def run_overview(store: Store, run: str) -> dict[str, Any]:
    """One run's facts for a page header: lineage, precision, attempts, first/last step and tokens, status."""
    meta = store.sql("SELECT parent, branch_step, branch_tokens, precision FROM runs WHERE run = ?", [run]).fetchone()
    # From the Parquet footers of the run's scalars when they carry exact statistics (no row decoded:
    # a 1M-step run has 10^7 scalar rows); else the same aggregates in SQL.
    ext = store.run_extremes("scalars", run, ["step", "tokens", "wall_time"]) if hasattr(store, "run_extremes") else None
    if ext is not None:
        (s0, s1), (_t0, t1), (_w0, w1) = ext["step"], ext["tokens"], ext["wall_time"]
        last: tuple | None = (s0, s1, t1, w1, None if s0 is None else s0 < s1)
    else:
        last = store.sql(
            "SELECT min(step), max(step), max(tokens), max(wall_time), min(step) < max(step) FROM scalars WHERE run = ?",
            [run]).fetchone()
    att = attempts(store, run)
    done = finished(store, run)
    return {
        "run": run,
        "parent": meta[0] if meta else None,
        "branch_step": meta[1] if meta else None,
        "branch_tokens": meta[2] if meta else None,
        "precision": meta[3] if meta else None,
        "attempts": att.height,
        "rollbacks": int(att.filter(pl.col("superseded_from").is_not_null()).height),
        "first_step": None if last is None else last[0],
        "last_step": None if last is None else last[1],
        "last_tokens": None if last is None else last[2],
        "last_write": None if last is None else last[3],
        "several_steps": bool(last and last[4]),
        "finished": done,
        "status": status(None if last is None else last[3], done),
    }


def run_names(store: Store) -> list[str]:
    """Runs of the store, oldest first (reads only the ``runs`` table)."""
    return [r[0] for r in store.sql("SELECT run FROM runs GROUP BY run ORDER BY min(created), run").fetchall()]


@per_run
def events(store: Store, run: str, include_superseded: bool = True) -> pl.DataFrame:
    """Events of a run (checkpoints, rollbacks, notes) with a ``superseded`` flag."""
    src = "events_all" if include_superseded else "events_effective"
    sup = "superseded" if include_superseded else "false AS superseded"
    return store.sql(
        f"SELECT step, tokens, attempt, kind, message, wall_time, {sup} FROM {src} WHERE run = ? ORDER BY step",
        [run],
    ).pl()


@per_run
def markers(store: Store, run: str) -> pl.DataFrame:
    """Vertical lines for a run's charts: events (not the Monitor's ``close``) and alert transitions,
    as ``(kind, step, tokens, label, superseded)``."""
    ev = store.sql(
        "SELECT kind, step, tokens, coalesce(message, '') AS label, superseded FROM events_all WHERE run = ? "
        "AND kind <> ? ORDER BY step", [run, END_EVENT]).pl()
    al = store.sql(
        "SELECT 'alert ' || state AS kind, step, tokens, alert || ' (' || severity || ')' || "
        "CASE WHEN layer IS NULL THEN '' ELSE ', layer ' || layer END AS label, false AS superseded "
        "FROM alerts WHERE run = ? AND state IN ('firing', 'resolved') ORDER BY step", [run]).pl()
    return pl.concat([ev, al.cast(ev.schema)]) if al.height else ev


def alert_transitions(store: Store, run: str | None = None) -> pl.DataFrame:
    """Every alert state transition (event-sourced rows), oldest first."""
    where, params = ("WHERE run = ?", [run]) if run else ("", [])
    return store.sql(
        "SELECT run, alert, \"group\", state, severity, step, tokens, layer, value, labels, annotations, fingerprint, "
        f"wall_time FROM alerts {where} ORDER BY wall_time, step", params).pl()


def lineage(store: Store, run: str) -> pl.DataFrame:
    """The whole tree containing ``run``: its root ancestor and every descendant, with ``depth``.

    A parent that is named but absent from the store appears with ``missing_parent = true``.
    """
    return store.sql(
        """
        WITH RECURSIVE up(run, parent, depth) AS (
            SELECT run, parent, 0 FROM runs WHERE run = ?
            UNION ALL
            SELECT r.run, r.parent, up.depth + 1 FROM runs r JOIN up ON r.run = up.parent WHERE up.depth < 64
        ),
        root AS (SELECT run FROM up ORDER BY depth DESC LIMIT 1),
        down(run, parent, depth) AS (
            SELECT run, parent, 0 FROM runs WHERE run = (SELECT run FROM root)
            UNION ALL
            SELECT r.run, r.parent, down.depth + 1 FROM runs r JOIN down ON r.parent = down.run WHERE down.depth < 64
        )
        SELECT d.run, d.parent, d.depth, r.precision, r.branch_step, r.branch_tokens,
               d.parent IS NOT NULL AND d.parent NOT IN (SELECT run FROM runs) AS missing_parent
        FROM down d JOIN runs r USING (run) ORDER BY d.depth, d.run
        """,
        [run],
    ).pl()


def tree_order(df: pl.DataFrame) -> list[tuple[str, int]]:
    """Runs in depth-first lineage order as ``(run, depth)``: roots by creation time, each
    branch under its parent by branch point. A branch whose parent is missing is a root."""
    names = set(df["run"].to_list())
    children: dict[str | None, list[dict]] = {}
    for row in df.sort("created").iter_rows(named=True):
        parent = row["parent"] if row["parent"] in names and row["parent"] != row["run"] else None
        children.setdefault(parent, []).append(row)
    out: list[tuple[str, int]] = []
    seen: set[str] = set()

    def walk(parent: str | None, depth: int) -> None:
        kids = children.get(parent, [])  # roots: by creation time; branches: by branch point
        if parent is not None:
            kids = sorted(kids, key=lambda r: (r["branch_tokens"] is None, r["branch_tokens"] or 0, r["created"] or 0))
        for row in kids:
            if row["run"] in seen:  # a cycle in recorded lineage must not hang the page
                continue
            seen.add(row["run"])
            out.append((row["run"], depth))
            walk(row["run"], depth + 1)

    walk(None, 0)
    out += [(r, 0) for r in df["run"].to_list() if r not in seen]
    return out
