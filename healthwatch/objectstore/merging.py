"""Merging segments on object storage with the store's manifest protocol, under merge leases."""

from __future__ import annotations

import contextlib
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from healthwatch.objectstore.errors import ObjectStoreError
from healthwatch.objectstore.leases import MergeSkipped, S3Lease, owner_leases, segment_owner
from healthwatch.objectstore.s3fs import S3FS
from healthwatch.store.segments import live_names


def merge_s3(directory: str, sources: list[str], target_name: str, table: str,
             merge: Callable[[Any, list[Any], str, str], Any], manifest_prefix: str = "_merge-",
             leases: dict[str, S3Lease] | None = None) -> str:
    """Merge segments of one ``s3://`` directory into ``target_name``, with the store's merge protocol.

    Every merger on object storage (a writer merging its own segments, ``healthwatch compact``) holds
    the **merge lease of each source's owner** (:func:`owner_leases`; the writer id in the segment
    name) while it merges: ``leases`` when the caller took them (the compactor), else this function
    takes them without waiting and raises :class:`MergeSkipped` when one is held by a live merger (a
    writer never blocks; it merges at a later flush). Holding the leases, it lists the directory
    again and raises :class:`MergeSkipped` unless every source is still live (a merger that held them
    before may have merged them), after finishing merges that died after publishing (:func:`recover_s3`).

    The sources are downloaded to a local temp folder and merged there by ``merge`` (the writer
    passes :func:`healthwatch.store.merge.merge_files`: the same DuckDB sort and chunking as on disk;
    passed in, because the store's lower layers import this module), with the leases renewed in the
    background. Then, each step after a lease check (renewal by conditional PUT; :class:`LeaseLost`
    if a lease was broken): the manifest naming target and sources is PUT first, the target second
    (create-only), the sources are deleted third and the manifest last. A reader that lists the
    target also lists the manifest (LIST is strongly consistent on S3) and hides the sources, so it
    never counts a row twice; until the target is visible it reads the sources, which are deleted
    only after. A merger killed in between leaves either an unused manifest (target never published:
    ignored) or target + manifest + some sources (hidden by the manifest; finished by the next
    merger's :func:`recover_s3`). Returns the target's path.
    """
    import json

    from healthwatch.store import fs as _fs

    fs = _fs.fs_for(directory)
    assert isinstance(fs, S3FS)
    directory = str(directory).rstrip("/")
    names = [str(s).rsplit("/", 1)[-1] for s in sources]
    owners = {segment_owner(n) for n in names}
    with contextlib.ExitStack() as stack:
        held = leases if leases is not None else stack.enter_context(
            owner_leases(directory, owners, segment_owner(target_name) or f"merger{uuid.uuid4().hex[:8]}"))
        if missing := owners - set(held):
            raise MergeSkipped(f"{directory}: the merge leases of {sorted(missing)} are held by another merger")
        mine = [held[o] for o in sorted(owners)]
        names_now = set(fs.list(directory))
        live, finished = live_names(directory, names_now)
        if finished:
            _finish(fs, directory, finished)  # the sources they hide are deleted: the live set stays as it is
        if gone := [n for n in names if n not in live]:
            raise MergeSkipped(f"{directory}: {len(gone)} of the {len(names)} sources were merged or removed "
                               f"meanwhile (e.g. {gone[0]})")
        with contextlib.ExitStack() as beating, tempfile.TemporaryDirectory(prefix="hw-merge-") as tmp:
            # The whole publish runs inside the temp folder: the merged target is streamed from disk.
            for lease in mine:
                beating.enter_context(lease.keep_alive())
            local = []
            for src in sources:
                name = str(src).rsplit("/", 1)[-1]
                fs.download(f"{directory}/{name}", Path(tmp) / name)
                local.append(Path(tmp) / name)
            data = Path(merge(Path(tmp), local, target_name, table))
            for src in local:  # the sources' copies are no longer needed: free the disk before the upload
                with contextlib.suppress(OSError):
                    src.unlink()
            for lease in mine:
                lease.check()
            manifest = fs.publish_bytes(directory, f"{manifest_prefix}{uuid.uuid4().hex}.json",
                                        json.dumps({"target": target_name, "sources": names}).encode())
            try:
                for lease in mine:
                    lease.check()
            except BaseException:
                with contextlib.suppress(ObjectStoreError):
                    fs.delete(manifest)  # unused (no target): harmless, but tidy
                raise
            target = fs.publish_bytes(directory, target_name, data)
        for name in names:
            fs.delete(f"{directory}/{name}")
        fs.delete(manifest)
    return target


# --------------------------------------------------------------------------------------------


def recover_s3(directory: str) -> int:
    """Finish merges that died after publishing their target: delete their sources, then the manifest.

    Safe beside a live merger of the same manifest (both delete the same hidden sources; the
    manifest goes last, so no source is ever visible beside its target). Must run before a merge
    that may retire such a target: once the target is gone, its manifest would no longer hide the
    sources and their rows would count twice. Returns the number of manifests finished.
    """
    from healthwatch.store import fs as _fs

    fs = _fs.fs_for(directory)
    assert isinstance(fs, S3FS)
    directory = directory.rstrip("/")
    _live, done = live_names(directory, set(fs.list(directory)))
    _finish(fs, directory, done)
    return len(done)


def _finish(fs: S3FS, directory: str, done: dict[str, dict[str, Any]]) -> None:
    """Delete the sources each completed merge of ``done`` names, then its manifest (in that order:
    a source is never visible without the manifest that hides it)."""
    for name, manifest in done.items():
        for src in manifest.get("sources", []):
            fs.delete(f"{directory}/{src}")
        fs.delete(f"{directory}/{name}")
