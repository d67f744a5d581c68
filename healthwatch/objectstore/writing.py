"""Writing segments to object storage: keys that cannot collide, one create-only PUT each."""

from __future__ import annotations

import contextlib
import threading
import uuid

import pyarrow as pa

from healthwatch.objectstore.errors import ObjectStoreError
from healthwatch.objectstore.s3fs import S3FS
from healthwatch.objectstore.uri import StoreURI, parse_store_uri


def new_writer_id(attempt: int, rank: int) -> str:
    """Writer id in the store's format (``a<attempt>r<rank>x<random>``): unique per process start."""
    return f"a{attempt:04d}r{rank:05d}x{uuid.uuid4().hex[:8]}"


def segment_key(root: StoreURI, table: str, run: str, writer_id: str, seq: int, level: int = 0) -> str:
    """The key of one segment: ``<prefix>/table=<t>/run=<r>/<writer>-<seq>-L<level>.parquet``.

    Same layout as on disk (hive partitions read by DuckDB, Spark, Trino). The file name starts
    with the writer id, so the writers of one run occupy distinct key ranges that S3 can split
    into separate partitions when the request rate of a run's prefix grows (see docs/scale.md).
    """
    parts = [root.prefix] if root.prefix else []
    parts += [f"table={table}", f"run={run}", f"{writer_id}-{seq:09d}-L{level}.parquet"]
    return "/".join(parts)


def table_bytes(table: pa.Table) -> bytes:
    """A table as Parquet bytes (zstd), as the store writes segments."""
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", row_group_size=128_000)
    return sink.getvalue().to_pybytes()


class S3SegmentWriter:
    """Publishes the segments of one writer (run x attempt x rank) to an ``s3://`` store.

    Each :meth:`write` is one create-only PUT of a new key (writer id + sequence number). Call
    :meth:`start` once (bucket check + conditional-write probe) before the first write.
    """

    def __init__(self, fs: S3FS, root: str | StoreURI, run: str, attempt: int = 1, rank: int = 0) -> None:
        from healthwatch.schema import validate_run_name

        self.fs = fs
        self.root = root if isinstance(root, StoreURI) else parse_store_uri(root)
        self.run = validate_run_name(run)
        self.writer_id = new_writer_id(attempt, rank)
        self.seq = 0

    def start(self) -> None:
        """Check the bucket and that the server enforces create-only PUTs (raises a clear error if not)."""
        self.fs.probe(self.root.prefix)

    def write(self, table: str, data: pa.Table) -> str | None:
        """Publish ``data`` (schema of ``table``) as one new segment; returns its ``s3://`` path."""
        from healthwatch.schema import TABLES

        data = data.select(TABLES[table].names).cast(TABLES[table])
        if data.num_rows == 0:
            return None
        self.seq += 1
        key = segment_key(self.root, table, self.run, self.writer_id, self.seq)
        path = self.fs.uri(key)
        self.fs.put_create_only(path, table_bytes(data))
        return path


class BackgroundUploader:
    """A bounded queue and one thread that uploads: :meth:`submit` never blocks the caller.

    This is the Monitor writer's contract (drop, count, never block) for an ``s3://`` writer:
    when the queue is full, or an upload fails (server down, timeouts), the rows of that flush
    are counted in :attr:`dropped_rows` and writing goes on with the next flush.
    """

    def __init__(self, writer: S3SegmentWriter, max_queue: int = 8) -> None:
        import queue

        self.writer = writer
        self._queue: queue.Queue[tuple[str, pa.Table] | None] = queue.Queue(maxsize=max_queue)
        self.dropped_rows = 0
        self.written_rows = 0
        self.failures = 0
        self.last_error: BaseException | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="healthwatch-s3-writer", daemon=True)
        self._thread.start()

    def submit(self, table: str, data: pa.Table) -> bool:
        """Queue one flush; False (rows counted as dropped) when the queue is full."""
        import queue

        try:
            self._queue.put_nowait((table, data))
            return True
        except queue.Full:
            with self._lock:
                self.dropped_rows += data.num_rows
            return False

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            table, data = item
            try:
                self.writer.write(table, data)
                with self._lock:
                    self.written_rows += data.num_rows
            except (ObjectStoreError, OSError) as exc:
                with self._lock:
                    self.dropped_rows += data.num_rows
                    self.failures += 1
                    self.last_error = exc

    def close(self, timeout: float = 60.0) -> None:
        """Upload what is queued (within ``timeout``) and stop the thread."""
        import queue

        with contextlib.suppress(queue.Full):  # a wedged upload: the daemon thread dies with the process
            self._queue.put(None, timeout=timeout)
        self._thread.join(timeout)


# --------------------------------------------------------------------------------------------
