"""Immutable Parquet segments: atomic publish, listing, and crash-safe merging.

Protocol (no cross-process lock is needed to write):

* A segment is written to ``.tmp-<uuid>.partial`` and published with ``os.rename`` to
  ``<writer>-<seq>-L<level>.parquet``, or ``<writer>-<seq>-s<lo>_<hi>-L<level>.parquet`` when the
  writer knows the smallest and largest ``step`` of its rows (:func:`segment_name`): a bounded
  reader then rules a segment out from the listing alone, without opening its footer (a name
  without a range is read as before). Readers only ever list ``*.parquet`` names that do not
  start with a dot, so they never see a partial file.
* A merge writes its target to a temp name, then a manifest ``_merge-<id>.json`` naming the
  target and its sources, then renames the target into place, deletes the sources and finally
  the manifest. A lister that sees a manifest whose target exists drops the sources from its
  listing, so a reader never sees a row twice; a reader whose file vanished between listing and
  reading retries with a fresh listing.
* Merges of one (table, run) directory are serialised by a lock file taken with ``O_EXCL``
  (stale after ``LOCK_STALE_S``, or at once when its holder was a process of this machine that
  no longer exists, e.g. a trainer killed with -9 mid-merge); writers never need it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from healthwatch.schema import TABLES
from healthwatch.store import fs as _fs

LOCK_NAME = ".compact.lock"
LOCK_STALE_S = 300.0
TMP_STALE_S = 3600.0
MANIFEST_PREFIX = "_merge-"


def table_dir(root: Path, table: str, run: str) -> Path:
    """Directory holding the segments of one table for one run."""
    return root / f"table={table}" / f"run={run}"


@dataclass(frozen=True)
class Segment:
    """A published segment file: its path, writer id, sequence number and merge level, and the
    ``(min, max)`` of its rows' ``step`` when its name carries them (None: unknown, read the footer)."""

    path: Path
    writer: str
    seq: int
    level: int
    steps: tuple[int, int] | None = None


#: ``<writer>-<seq>[-s<lo>_<hi>]-L<level>``: the writer id is everything before the last fields
#: (as the old ``rsplit("-", 2)`` parse read it), so old names parse exactly as before.
_NAME = re.compile(r"^(?P<writer>.+)-(?P<seq>[0-9]+)(?:-s(?P<lo>[0-9]+)_(?P<hi>[0-9]+))?-L(?P<level>[0-9]+)$")


def parse_segment(path: Path) -> Segment | None:
    """Parse ``<writer>-<seq>[-s<lo>_<hi>]-L<level>.parquet``; foreign names get writer ``""``."""
    m = _NAME.match(path.name[: -len(".parquet")])
    if m is None:
        return Segment(path, "", 0, 0)
    lo, hi = m.group("lo"), m.group("hi")
    steps = (int(lo), int(hi)) if lo is not None and hi is not None and int(lo) <= int(hi) else None
    return Segment(path, m.group("writer"), int(m.group("seq")), int(m.group("level")), steps)


def segment_name(writer: str, seq: int, level: int, steps: tuple[int, int] | None = None) -> str:
    """The file name of a segment; ``steps`` (the smallest and largest ``step`` of *every* row) goes
    into the name so that bounded readers skip the segment from the listing. Left out when None or
    negative (the name grammar has no sign)."""
    rng = f"-s{int(steps[0])}_{int(steps[1])}" if steps is not None and 0 <= steps[0] <= steps[1] else ""
    return f"{writer}-{int(seq):09d}{rng}-L{int(level)}.parquet"


def step_range(table: pa.Table) -> tuple[int, int] | None:
    """``(min, max)`` of ``table``'s ``step`` column for :func:`segment_name`; None when it has no
    such column, no rows, or a NULL step (a name range must hold every row)."""
    if "step" not in table.column_names or table.num_rows == 0:
        return None
    col = table.column("step")
    if col.null_count:
        return None
    import pyarrow.compute as pc

    mm = pc.min_max(col).as_py()
    return None if mm["min"] is None else (int(mm["min"]), int(mm["max"]))


def union_steps(segments: list[Segment]) -> tuple[int, int] | None:
    """The step range of a merge of ``segments``: the union of theirs, None if any is unknown."""
    if not segments or any(s.steps is None for s in segments):
        return None
    return (min(s.steps[0] for s in segments if s.steps), max(s.steps[1] for s in segments if s.steps))


def overlaps(steps: tuple[int, int] | None, lo: Any, hi: Any) -> bool:
    """Whether a segment of step range ``steps`` (None: unknown) may hold a step in ``[lo, hi]``."""
    return steps is None or not (steps[1] < lo or steps[0] > hi)


def write_segment(directory: Path, name: str, table: pa.Table, row_group_size: int = 128_000) -> Path:
    """Write ``table`` to ``directory/name`` atomically (temp file + rename) and return the path."""
    return Path(_fs.FS.publish(
        str(directory), name, lambda tmp: pq.write_table(table, tmp, row_group_size=row_group_size, compression="zstd")
    ))


def completed_merges(directory: Path | str, names: set[str]) -> dict[str, dict[str, Any]]:
    """The merge manifests of ``directory`` (``names``: its listing) whose target is published, by name.

    Their sources are superseded: readers hide them, and a recovery may delete them, then the
    manifest. A manifest whose target is not listed is an unfinished merge and hides nothing.
    Works for any root the store's file system routes (a local folder, ``s3://``).
    """
    base = str(directory).rstrip("/")
    done: dict[str, dict[str, Any]] = {}
    for name in names:
        if not name.startswith(MANIFEST_PREFIX):
            continue
        try:
            manifest = json.loads(_fs.FS.read_bytes(f"{base}/{name}"))
        except (OSError, ValueError):
            continue
        if manifest.get("target") in names:
            done[name] = manifest
    return done


def live_names(directory: Path | str, names: set[str]) -> tuple[set[str], dict[str, dict[str, Any]]]:
    """The live segment names of a directory listing ``names`` (published, not superseded by a
    completed merge) and the completed merges' manifests (:func:`completed_merges`)."""
    done = completed_merges(directory, names)
    hidden = {src for m in done.values() for src in m.get("sources", [])}
    return {n for n in names if n.endswith(".parquet") and not n.startswith(".") and n not in hidden}, done


def list_segments(directory: Path, listed: Iterable[str] | None = None) -> list[Path]:
    """Live segments of one directory: published, not superseded by a completed merge.

    ``listed``: the directory's names when the caller has just listed it (e.g. with
    :meth:`~healthwatch.store.fs.RootedFS.list_signed`); None lists it here.
    """
    names = set(_fs.FS.list(str(directory)) if listed is None else listed)
    if not names:
        return []
    live, _done = live_names(directory, names)
    # Names sorted as strings (the order Path sorting gives within one directory), ~10x cheaper.
    return [directory / n for n in sorted(live)]


def iter_run_dirs(root: Path, table: str) -> Iterator[tuple[str, Path]]:
    """Yield ``(run, directory)`` for every run that has a directory for ``table``."""
    tdir = root / f"table={table}"
    entries = sorted(_fs.FS.list(str(tdir)))
    for entry in entries:
        if entry.startswith("run="):
            yield entry[4:], tdir / entry


def _machine_id() -> str:
    """Host, boot and PID namespace of this process: PIDs are comparable only within one."""
    parts = [socket.gethostname()]
    with contextlib.suppress(OSError):
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
        parts.append(os.readlink("/proc/self/ns/pid"))
    return "|".join(parts) if len(parts) == 3 else ""


def _holder_is_dead(path: Path) -> bool:
    """True only when the lock at ``path`` was taken by a process of this machine that has exited."""
    try:
        pid_text, _, machine = path.read_text().partition(" ")
        pid = int(pid_text)
    except (OSError, ValueError):
        return False
    here = _machine_id()
    if not here or machine.strip() != here or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # e.g. EPERM: it exists
        return False
    return False


def _create_lock(path: Path) -> None:
    """Create the lock file at ``path`` holding ``"<pid> <machine>"``; ``FileExistsError`` if taken.

    :meth:`~healthwatch.store.fs.FileSystem.create_exclusive` writes the content before the name
    appears, so a process killed at any moment never leaves an empty lock whose holder is unknown
    (such a lock could only expire after ``LOCK_STALE_S``).
    """
    content = f"{os.getpid()} {_machine_id()}\n".encode()
    if not _fs.FS.create_exclusive(str(path), content):
        raise FileExistsError(str(path))


def _lock_is_stale(path: Path) -> bool:
    """Whether the lock at ``path`` is older than ``LOCK_STALE_S`` or held by a dead local process."""
    try:
        return time.time() - path.stat().st_mtime > LOCK_STALE_S or _holder_is_dead(path)
    except OSError:
        return False


def _break_lock(path: Path) -> bool:
    """Remove a stale lock without ever removing a live one that replaced it meanwhile.

    The lock is first renamed aside (atomic: exactly one breaker gets it) and checked again there;
    if what was taken turns out to be live, it is linked back unless a new lock already exists.
    """
    grave = path.with_name(f"{path.name}.stale-{uuid.uuid4().hex}")
    try:
        os.rename(path, grave)
    except OSError:
        return False  # another process broke or released it first: just retry the create
    try:
        if not _lock_is_stale(grave):
            with contextlib.suppress(OSError):
                os.link(grave, path)  # put a live lock back (fails if a new one exists)
            return False
        return True
    finally:
        with contextlib.suppress(OSError):
            grave.unlink()


@contextlib.contextmanager
def merge_lock(directory: Path, blocking: bool = False, timeout: float = 30.0) -> Iterator[bool]:
    """Hold the per-directory merge lock; yields False when not acquired (non-blocking mode)."""
    path = directory / LOCK_NAME
    deadline = time.monotonic() + timeout
    acquired = False
    while True:
        try:
            _create_lock(path)
            acquired = True
            break
        except FileExistsError:
            if _lock_is_stale(path) and _break_lock(path):
                continue  # a merger died holding it
            if not blocking or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        except OSError:
            break
    try:
        yield acquired
    finally:
        if acquired:
            with contextlib.suppress(OSError):
                _fs.FS.delete(str(path))


def recover_directory(directory: Path) -> None:
    """Finish or undo merges interrupted by a crash and remove stale temp files (hold the lock)."""
    names = set(_fs.FS.list(str(directory)))
    now = time.time()
    for name in names:
        path = directory / name
        if name.startswith(MANIFEST_PREFIX):
            try:
                manifest = json.loads(_fs.FS.read_bytes(str(path)))
            except (OSError, ValueError):
                manifest = {}
            if manifest.get("target") in names:
                for src in manifest.get("sources", []):
                    with contextlib.suppress(OSError):
                        _fs.FS.delete(str(directory / src))
            with contextlib.suppress(OSError):
                _fs.FS.delete(str(path))
        elif name.startswith(".tmp-"):
            with contextlib.suppress(OSError):
                if now - path.stat().st_mtime > TMP_STALE_S:
                    path.unlink()


def publish_merge(directory: Path, sources: list[Path], tmp_target: Path, target_name: str) -> Path:
    """Publish ``tmp_target`` as ``target_name`` replacing ``sources`` (caller holds the lock)."""
    manifest = _fs.FS.publish_bytes(
        str(directory), f"{MANIFEST_PREFIX}{uuid.uuid4().hex}.json",
        json.dumps({"target": target_name, "sources": [s.name for s in sources]}).encode(),
    )
    final = directory / target_name
    os.rename(tmp_target, final)  # the merge target was written locally by DuckDB (see merge.py)
    for src in sources:
        _fs.FS.delete(str(src))
    _fs.FS.delete(manifest)
    return final


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
        schema = pq.read_schema(_fs.FS.open_input(str(path)))
    except FileNotFoundError:
        raise
    except (OSError, pa.ArrowException, ValueError) as exc:
        return f"not a readable Parquet file ({str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__})"
    return schema_problem(schema, table)


def schema_problem(schema: pa.Schema, table: str) -> str | None:
    """Why a file with this Arrow ``schema`` is not a segment of ``table`` (``None`` when it is one).

    The rule of :func:`segment_problem`, for a reader that already holds the footer.
    """
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


def full_read_problem(path: str) -> str | None:
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
