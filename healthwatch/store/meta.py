"""Store metadata: where a store is, its version file, and the one declaration of runs/attempts rows."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from healthwatch.schema import SCHEMA_VERSION, SchemaError, check_schema_version
from healthwatch.store import fs as _fs

META_FILE = "healthwatch.json"
ENV_STORE = "HEALTHWATCH_STORE"
DEFAULT_STORE = "healthwatch-store"
#: Rollup bucket sizes in steps (Thanos-style downsampling levels), finest first.
ROLLUP_BUCKETS = (100, 1_000, 10_000)


def default_store_path(store: str | os.PathLike[str] | None = None) -> Path:
    """Resolve the store path: explicit argument, then ``$HEALTHWATCH_STORE``, then ``./healthwatch-store``."""
    if store is not None:
        return _fs.root_path(store)  # s3://bucket/prefix too; another scheme is refused by name
    return _fs.root_path(os.environ.get(ENV_STORE) or DEFAULT_STORE)


def read_meta(root: Path) -> dict[str, Any]:
    """The store's metadata file as a dict (``{}`` when there is none yet)."""
    try:
        return json.loads(_fs.FS.read_bytes(str(Path(root) / META_FILE)))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise SchemaError(f"{Path(root) / META_FILE}: unreadable store metadata ({exc})") from exc


def init_store(root: str | os.PathLike[str]) -> Path:
    """Create the store directory and its metadata file if needed; refuse a newer schema."""
    root = _fs.root_path(root)
    remote = _fs.is_remote(root)
    if remote:  # object storage: bucket check + If-None-Match probe before the first write
        _fs.ensure_writable(root)
    meta = read_meta(root) if remote or root.exists() else {}
    check_schema_version(meta.get("schema_version"), f"store {root}")
    if not meta:
        if not remote:
            root.mkdir(parents=True, exist_ok=True)
        _fs.FS.publish_bytes(
            str(root), META_FILE,
            json.dumps({"schema_version": SCHEMA_VERSION, "format": "healthwatch-segments"}).encode(),
        )
    return root


def host_name() -> str:
    """This machine's host name (recorded on every attempt)."""
    return socket.gethostname()


def run_row(
    *,
    parent: str | None = None,
    branch_step: int | None = None,
    branch_tokens: int | None = None,
    precision: str | None = None,
    config: dict[str, Any] | str | None = None,
    created: float | None = None,
) -> dict[str, list[Any]]:
    """The ``runs`` row declaring a run (column dict for :meth:`StoreWriter.write`).

    Every writer of a run (each attempt) declares it; readers keep the first declaration.
    """
    cfg = config if isinstance(config, str) or config is None else json.dumps(config, default=str)
    return {
        "parent": [parent], "branch_step": [branch_step], "branch_tokens": [branch_tokens],
        "precision": [precision], "config": [cfg if cfg is not None else "{}"],
        "created": [time.time() if created is None else float(created)], "schema_version": [SCHEMA_VERSION],
    }


def attempt_row(
    *,
    attempt: int,
    start_step: int,
    started_at: float | None = None,
    host: str | None = None,
    reason: str | None = None,
) -> dict[str, list[Any]]:
    """The ``attempts`` row opening attempt ``attempt`` of a run at ``start_step``.

    Rows of earlier attempts at steps ≥ ``start_step`` are superseded from then on (see
    :mod:`healthwatch.query.timeline`).
    """
    if int(attempt) < 1:
        raise ValueError(f"attempt must be >= 1, got {attempt}")
    return {
        "attempt": [int(attempt)], "start_step": [int(start_step)],
        "started_at": [time.time() if started_at is None else float(started_at)],
        "host": [host_name() if host is None else host], "reason": [reason], "schema_version": [SCHEMA_VERSION],
    }
