"""Merge leases on object storage: who may merge which segments (lock objects, conditional PUTs)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator

from healthwatch.objectstore.errors import ObjectStoreError
from healthwatch.objectstore.s3fs import S3FS

#: Seconds a merge lease stays valid without renewal (env ``HEALTHWATCH_S3_LEASE_S``): how long a
#: merger that died holding one blocks the merges of those segments.
LEASE_S = float(os.environ.get("HEALTHWATCH_S3_LEASE_S", 60.0))
#: Both times of a staleness check have one-second resolution (``Last-Modified``, ``Date``).
LEASE_SLACK_S = 2.0
#: Name of the lease that serialises compactors' rollup backfill in one ``table=…/run=…`` folder.
COMPACT_LEASE = ".compact.lock"


def owner_lease_name(owner: str) -> str:
    """The lease object (in a segment's folder) that every merger of ``owner``'s segments must hold."""
    return f".merge-{owner or '_foreign'}.lock"


#: ``<writer>-<seq>[-s<lo>_<hi>]-L<level>``, as ``healthwatch.store.segments.parse_segment`` reads it
#: (not imported: the store's lower layers import this module).
_SEGMENT_NAME = re.compile(r"^(?P<writer>.+)-[0-9]+(?:-s[0-9]+_[0-9]+)?-L[0-9]+$")


def segment_owner(path: str) -> str:
    """The writer id in a segment name ``<writer>-<seq>[-s<lo>_<hi>]-L<level>.parquet`` (``""``: foreign)."""
    m = _SEGMENT_NAME.match(str(path).rsplit("/", 1)[-1].removesuffix(".parquet"))
    return m.group("writer") if m else ""


class LeaseLost(ObjectStoreError):
    """A merger no longer holds its lease (it expired and another merger took it over)."""


class MergeSkipped(ObjectStoreError):
    """A merge on object storage was not done: its lease is held by someone else, or its sources changed."""


class S3Lease:
    """A lease on one lock object, taken and kept with conditional PUTs (no lock service needed).

    * **take**: ``PUT If-None-Match: *`` of a body that names the holder, a fresh nonce and the lease
      length. The nonce makes every write's entity tag unique, so no two holders ever share a tag.
    * **break a stale lease**: GET the lock; it is stale when the server's ``Date`` minus its
      ``Last-Modified`` exceeds the lease length it states (one clock: the server's). Then
      ``PUT If-Match: <that tag>``: of several breakers exactly one succeeds, the others get 412.
    * **keep**: :meth:`renew` is ``PUT If-Match: <own tag>`` with a new nonce; 412 means the lease
      was broken and :class:`LeaseLost` is raised. A merger renews before each publish step and
      a :meth:`keep_alive` thread renews every third of the lease during long downloads and merges.
    * **release**: ``DELETE If-Match: <own tag>`` (never removes a successor's lease).
    """

    def __init__(self, fs: S3FS, path: str, holder: str, lease_s: float | None = None) -> None:
        self.fs = fs
        self.path = path
        self.holder = holder
        self.lease_s = float(LEASE_S if lease_s is None else lease_s)
        self.etag: str | None = None
        #: ``time.monotonic()`` when the last successful take/renew was sent (the lease runs from there).
        self.since = 0.0
        self.broke: str | None = None  # holder of the stale lease this one replaced, if any
        self._lock = threading.Lock()
        self._lost = False

    @property
    def held(self) -> bool:
        """Whether this lease was taken and not released or lost."""
        return self.etag is not None and not self._lost

    def _body(self) -> bytes:
        return json.dumps({"holder": self.holder, "nonce": uuid.uuid4().hex, "lease_s": self.lease_s,
                           "host": socket.gethostname(), "pid": os.getpid()}).encode()

    def remaining(self) -> float:
        """Seconds the lease surely still runs (local monotonic clock; <= 0 when it may have expired)."""
        return self.lease_s - (time.monotonic() - self.since) if self.held else 0.0

    def acquire(self) -> bool:
        """Take the lease if it is free or stale; False (at once) when a live holder has it."""
        for _ in range(3):
            sent = time.monotonic()
            etag = self.fs.put_conditional(self.path, self._body())
            if etag is not None:
                self.etag, self.since, self._lost = etag, sent, False
                return True
            got = self.fs.get_versioned(self.path)
            if got is None:
                continue  # released between our PUT and GET: try to take it again
            body, tag, modified, now = got
            try:
                info = json.loads(body)
                lease_s = float(info.get("lease_s", LEASE_S))
                holder = str(info.get("holder", "?"))
            except (ValueError, TypeError, AttributeError):
                lease_s, holder = LEASE_S, "?"  # unreadable lock: still honour a default lease
            if now - modified <= lease_s + LEASE_SLACK_S:
                return False  # live
            sent = time.monotonic()
            etag = self.fs.put_conditional(self.path, self._body(), if_match=tag)
            if etag is None:
                return False  # another breaker (or the holder's renewal) won
            self.etag, self.since, self._lost, self.broke = etag, sent, False, holder
            logging.getLogger("healthwatch.store").warning(
                "took over the stale merge lease %s of %s (%.0f s without renewal)", self.path, holder, now - modified)
            return True
        return False

    def acquire_within(self, wait_s: float, every_s: float = 0.5) -> bool:
        """:meth:`acquire`, retried every ``every_s`` for up to ``wait_s`` seconds while a live holder has it."""
        deadline = time.monotonic() + wait_s
        while not self.acquire():
            if time.monotonic() >= deadline:
                return False
            time.sleep(every_s)
        return True

    def renew(self) -> None:
        """Extend the lease (conditional overwrite of our own version); :class:`LeaseLost` if it was broken."""

        with self._lock:
            if self.etag is None or self._lost:
                raise LeaseLost(f"merge lease {self.path} is not held by {self.holder}")
            sent = time.monotonic()
            etag = self.fs.put_conditional(self.path, self._body(), if_match=self.etag)
            if etag is None:
                self._lost = True
                raise LeaseLost(f"merge lease {self.path} of {self.holder} was taken over by another merger "
                                f"(it went {self.lease_s:g} s without renewal)")
            self.etag, self.since = etag, sent

    def check(self, margin: float = 0.5) -> None:
        """Renew, and require that at least ``margin`` of the lease is left afterwards.

        Called right before each publish step: a process stalled so long that its own renewal took
        more than half the lease is too close to losing it to publish anything.
        """
        self.renew()
        if self.remaining() < self.lease_s * margin:
            raise LeaseLost(f"merge lease {self.path}: renewal took too long ({self.lease_s - self.remaining():.1f} s "
                            f"of a {self.lease_s:g} s lease); not publishing")

    def release(self) -> None:
        """Give the lease back (only our own version of the lock object is deleted)."""
        with self._lock:
            etag, self.etag = self.etag, None
            if etag is None or self._lost:
                return
        with contextlib.suppress(ObjectStoreError):  # an unreleased lease just expires
            self.fs.delete_if_match(self.path, etag)

    @contextlib.contextmanager
    def keep_alive(self) -> Iterator[None]:
        """Renew every third of the lease in a background thread for the duration of the block."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.lease_s / 3):
                try:
                    self.renew()
                except (ObjectStoreError, OSError):
                    return  # lost (or the server is away): the next check() raises

        thread = threading.Thread(target=beat, name="healthwatch-lease", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()


@contextlib.contextmanager
def owner_leases(directory: str, owners: set[str], holder: str, wait_s: float = 0.0,
                 lease_s: float | None = None) -> Iterator[dict[str, S3Lease]]:
    """Take the merge leases of ``owners`` in ``directory``; yields ``{owner: lease}`` of those taken.

    Retries the ones held by live mergers for up to ``wait_s`` seconds (a writer's own merge is short);
    releases every lease taken when the block ends.
    """

    from healthwatch.store import fs as _fs

    fs = _fs.fs_for(directory)
    assert isinstance(fs, S3FS)
    held: dict[str, S3Lease] = {}
    deadline = time.monotonic() + wait_s
    try:
        while True:
            for owner in sorted(owners - set(held)):
                lease = S3Lease(fs, f"{directory.rstrip('/')}/{owner_lease_name(owner)}", holder, lease_s)
                if lease.acquire():
                    held[owner] = lease
            if len(held) == len(owners) or time.monotonic() >= deadline:
                break
            time.sleep(0.5)
        yield held
    finally:
        for lease in held.values():
            lease.release()


