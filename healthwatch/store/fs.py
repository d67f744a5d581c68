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
import os
import uuid
from collections.abc import Callable
from typing import Protocol


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

    def read_bytes(self, path: str) -> bytes:
        """The whole content of ``path`` (raises ``FileNotFoundError`` when absent)."""
        ...

    def open_input(self, path: str) -> str:
        """Something pyarrow and DuckDB open for reading ``path`` (a local path or a URI)."""
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


#: The file system used by the store (one process-wide instance; tests may swap it).
FS: FileSystem = LocalFS()
