"""The store's only door to storage: a small file-system interface and its local implementation.

Every byte the store lists, publishes, reads or deletes goes through a :class:`FileSystem`, so an
object-storage backend (S3: list = ``ListObjectsV2``, publish = one create-only ``PUT`` with
``If-None-Match: *``, delete = ``DeleteObject``) plugs in by implementing these few methods.
Paths are plain strings (``root/table=<t>/run=<r>/<name>``); directories are prefixes.

Contract (what the segment protocol relies on):

* :meth:`publish` makes a complete file visible under its final name at once, or not at all; it
  never replaces an existing name (segment names are unique; a merge target is new).
* :meth:`list` returns the names directly under a directory (``[]`` when it does not exist).
* :meth:`create_exclusive` creates a small file only if the name is free (lock files).
* A reader never sees a partial file: names starting with ``.`` are temporary.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol


class FileSystem(Protocol):
    """What the store needs from storage (see the module docstring for the contract)."""

    def list(self, directory: str) -> list[str]:
        """Names directly under ``directory``; ``[]`` when it does not exist."""
        ...

    def exists(self, path: str) -> bool:
        """Whether ``path`` exists."""
        ...

    def mtime_ns(self, path: str) -> int | None:
        """Modification time of ``path`` in ns (a cheap change signature), or None if absent."""
        ...

    def list_signed(self, directory: str) -> tuple[int | None, list[str]]:
        """``(mtime_ns(directory), list(directory))`` from one look at it where storage allows (one
        LIST on object storage instead of two), so the signature and the names agree."""
        ...

    def read_bytes(self, path: str) -> bytes:
        """The whole content of ``path`` (raises ``FileNotFoundError`` when absent)."""
        ...

    def open_input(self, path: str) -> Any:
        """Something pyarrow opens for reading ``path`` (a local path, which DuckDB opens too, or an open file)."""
        ...

    def publish(self, directory: str, name: str, write: Callable[[str], None]) -> str:
        """Atomically publish ``directory/name``: ``write(tmp)`` fills a temp file, then it appears whole."""
        ...

    def publish_bytes(self, directory: str, name: str, data: bytes) -> str:
        """:meth:`publish` of a small byte string (manifests, metadata)."""
        ...

    def create_exclusive(self, path: str, data: bytes) -> bool:
        """Create ``path`` with ``data`` only if it does not exist; False when it does."""
        ...

    def delete(self, path: str) -> bool:
        """Remove ``path``; False when it was already gone."""
        ...


class LocalFS:
    """:class:`FileSystem` on a local or shared POSIX file system (temp name + rename)."""

    def list(self, directory: str) -> list[str]:
        """Names directly under ``directory``; ``[]`` when it does not exist."""
        try:
            return os.listdir(directory)
        except (FileNotFoundError, NotADirectoryError):
            return []

    def exists(self, path: str) -> bool:
        """Whether ``path`` exists."""
        return os.path.exists(path)

    def mtime_ns(self, path: str) -> int | None:
        """Modification time of ``path`` in ns, or None if absent."""
        try:
            return os.stat(path).st_mtime_ns
        except (FileNotFoundError, NotADirectoryError):
            return None

    def list_signed(self, directory: str) -> tuple[int | None, list[str]]:
        """The directory's mtime (None if absent) and its names: a stat and a listdir."""
        return self.mtime_ns(directory), self.list(directory)

    def read_bytes(self, path: str) -> bytes:
        """The whole content of ``path``."""
        with open(path, "rb") as fh:
            return fh.read()

    def open_input(self, path: str) -> str:
        """A local path is opened by pyarrow and DuckDB directly."""
        return str(path)

    def tmp_name(self, directory: str) -> str:
        """A fresh temporary name in ``directory`` (never listed as a segment)."""
        return os.path.join(directory, f".tmp-{uuid.uuid4().hex}.partial")

    def publish(self, directory: str, name: str, write: Callable[[str], None]) -> str:
        """Write to a temp name in ``directory``, then rename it to ``name`` (atomic on POSIX)."""
        os.makedirs(directory, exist_ok=True)
        tmp = self.tmp_name(directory)
        try:
            write(tmp)
            final = os.path.join(directory, name)
            os.rename(tmp, final)
            return final
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def publish_bytes(self, directory: str, name: str, data: bytes) -> str:
        """:meth:`publish` of a byte string."""

        def write(tmp: str) -> None:
            with open(tmp, "wb") as fh:
                fh.write(data)

        return self.publish(directory, name, write)

    def create_exclusive(self, path: str, data: bytes) -> bool:
        """Create ``path`` holding ``data`` unless it exists.

        The content is written to a temp file first and hard-linked into place (atomic, fails
        when the name exists), so a process killed at any moment never leaves an empty file; on
        a file system without hard links, an exclusive create followed by the write.
        """
        tmp = self.tmp_name(os.path.dirname(path))
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
            try:
                os.link(tmp, path)
                return True
            except FileExistsError:
                return False
            except OSError:
                pass
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        return True

    def delete(self, path: str) -> bool:
        """Remove ``path``; False when it was already gone."""
        try:
            os.unlink(path)
            return True
        except FileNotFoundError:
            return False


def is_remote(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` lies on object storage (``s3://…``, or ``s3:/…`` as ``pathlib.Path`` spells it)."""
    return os.fspath(path).startswith(("s3:/", "s3a:/"))


class RootedFS:
    """The store's :class:`FileSystem`, chosen per path by its root: ``s3://`` -> S3, else local.

    Store code joins paths with ``pathlib`` (``root / "table=t" / "run=r"``), which folds
    ``s3://bucket/prefix`` into ``s3:/bucket/prefix``; both spellings route to one
    :class:`healthwatch.objectstore.S3FS` per (bucket, endpoint, credentials) seen in the
    environment when it was first needed, so a process may read and write local and ``s3://``
    stores side by side. Everything else goes to :class:`LocalFS`.
    """

    def __init__(self) -> None:
        self.local = LocalFS()
        self._s3: dict[tuple[str | None, ...], FileSystem] = {}
        self._lock = threading.Lock()

    def for_path(self, path: str | os.PathLike[str]) -> FileSystem:
        """The file system that holds ``path``."""
        if not is_remote(path):
            return self.local
        from healthwatch.objectstore.s3fs import S3FS, endpoint_from_env
        from healthwatch.objectstore.uri import split_s3

        bucket, _key = split_s3(os.fspath(path).replace("s3a:/", "s3:/", 1))
        # Tests and tools point one process at several servers in turn: the environment is part of the key.
        secret = hashlib.sha256(os.environ.get("AWS_SECRET_ACCESS_KEY", "").encode()).hexdigest()
        key = (bucket, endpoint_from_env(), os.environ.get("AWS_ACCESS_KEY_ID"), secret, os.environ.get("AWS_PROFILE"))
        with self._lock:
            fs = self._s3.get(key)
            if fs is None:
                fs = self._s3[key] = S3FS(bucket)
            return fs

    def list(self, directory: str) -> list[str]:
        """Names directly under ``directory``; ``[]`` when it does not exist."""
        return self.for_path(directory).list(directory)

    def exists(self, path: str) -> bool:
        """Whether ``path`` exists."""
        return self.for_path(path).exists(path)

    def mtime_ns(self, path: str) -> int | None:
        """Modification time (a change signature) of ``path``, or None if absent."""
        return self.for_path(path).mtime_ns(path)

    def list_signed(self, directory: str) -> tuple[int | None, list[str]]:
        """``(mtime_ns(directory), list(directory))``, in one LIST on object storage."""
        return self.for_path(directory).list_signed(directory)

    def read_bytes(self, path: str) -> bytes:
        """The whole content of ``path``."""
        return self.for_path(path).read_bytes(path)

    def open_input(self, path: str) -> Any:
        """Something pyarrow opens for reading ``path`` (see the file system's own ``open_input``)."""
        return self.for_path(path).open_input(path)

    def publish(self, directory: str, name: str, write: Callable[[str], None]) -> str:
        """Atomically publish ``directory/name`` (see :meth:`FileSystem.publish`)."""
        return self.for_path(directory).publish(directory, name, write)

    def publish_bytes(self, directory: str, name: str, data: bytes) -> str:
        """:meth:`publish` of a byte string."""
        return self.for_path(directory).publish_bytes(directory, name, data)

    def create_exclusive(self, path: str, data: bytes) -> bool:
        """Create ``path`` with ``data`` only if it does not exist."""
        return self.for_path(path).create_exclusive(path, data)

    def delete(self, path: str) -> bool:
        """Remove ``path``; False when it was already gone."""
        return self.for_path(path).delete(path)


def store_exists(root: str | os.PathLike[str]) -> bool:
    """Whether a store lives at ``root``: a directory on disk; its metadata object or any table on S3."""
    if not is_remote(root):
        return os.path.isdir(root)
    # One LIST answers it (and its error names a missing bucket or rejected credentials; a HEAD's cannot).
    names = FS.list(os.fspath(root).rstrip("/"))
    return "healthwatch.json" in names or any(n.startswith("table=") for n in names)


def root_path(store: str | os.PathLike[str]) -> Path:
    """A store root as the ``Path`` the store code joins: a local path, or ``s3://b/p`` (spelled ``s3:/b/p``).

    Raises ``StoreURIError`` (a ``ValueError``) naming the root for another scheme (``gs://``,
    ``http://``) or an ``s3://`` URI without a valid bucket. ``file:///x`` becomes ``/x``.
    """
    if isinstance(store, Path):
        return store
    text = os.fspath(store)
    if "://" not in text:
        return Path(text)
    from healthwatch.objectstore.uri import parse_store_uri

    uri = parse_store_uri(text)
    return Path(f"s3://{uri.bucket}/{uri.prefix}".rstrip("/")) if uri.is_s3 else Path(str(uri.path))


def root_uri(root: str | os.PathLike[str]) -> str:
    """How to show (and pass on) a store root: ``s3://bucket/prefix``, or the absolute local path."""
    text = os.fspath(root)
    if is_remote(text):
        rest = text.split(":/", 1)[1].lstrip("/")
        return "s3://" + rest.rstrip("/")
    return str(Path(text).resolve())


_probed: set[str] = set()


def ensure_writable(root: str | os.PathLike[str]) -> None:
    """Before the first write to an ``s3://`` store in this process: check the bucket and probe that the
    server enforces create-only PUTs (``S3FS.probe``; raises a clear ``ObjectStoreError`` if not).

    Done once per root and process; a local root needs nothing.
    """
    if not is_remote(root):
        return
    from healthwatch.objectstore.s3fs import endpoint_from_env

    uri = root_uri(root)
    if f"{uri}@{endpoint_from_env()}" in _probed:
        return
    from healthwatch.objectstore.uri import parse_store_uri

    fs = FS.for_path(root) if isinstance(FS, RootedFS) else FS
    fs.probe(parse_store_uri(uri).prefix)  # type: ignore[attr-defined]
    _probed.add(f"{uri}@{endpoint_from_env()}")


def fs_for(path: str | os.PathLike[str]) -> FileSystem:
    """The file system holding ``path`` (``s3://`` roots: their bucket's S3 file system)."""
    return FS.for_path(path) if isinstance(FS, RootedFS) else FS


#: The file system used by the store: routes each path by its root (tests may swap it for a LocalFS).
FS: FileSystem = RootedFS()
