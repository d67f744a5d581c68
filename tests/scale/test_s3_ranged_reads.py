"""``S3FS.read_range``: ranged GETs through pyarrow's S3 client (one handle per object, reused), the
same bytes as a local slice, each GET counted, a missing or retired object a ``FileNotFoundError``, and
errors other than a missing object still this store's clear ones. Real SeaweedFS (tests/scale/conftest.py).
"""

from __future__ import annotations

import numpy as np
import pytest

from healthwatch.objectstore import S3FS, EndpointUnreachableError, S3Settings


def _object(s3_root: str, n: int = 300_000, seed: int = 0) -> tuple[S3FS, str, bytes]:
    fs = S3FS.for_uri(s3_root)
    data = np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()
    path = f"{s3_root}/table=layer_stats/run=r/a0001r00000x00000000-000000001-L0.parquet"
    fs.put_create_only(path, data)
    return fs, path, data


def test_ranged_reads_are_the_same_bytes_and_each_one_get(s3_root: str) -> None:
    fs, path, data = _object(s3_root)
    before = fs.stats.snapshot()
    ranges = [(0, 4), (len(data) - 8, len(data)), (1234, 1235), (17, 200_017), (0, len(data))]
    for a, b in ranges * 2:  # the second round reuses the object's handle
        assert fs.read_range(path, a, b) == data[a:b]
    assert len(fs._handles) == 1  # one handle for the object, not one per read
    after = fs.stats.snapshot()
    assert after["get"] - before["get"] == 2 * len(ranges)
    assert after["head"] - before["head"] == 1  # the handle's open, once
    with pytest.raises(ValueError, match="empty or negative"):
        fs.read_range(path, 5, 5)


def test_missing_and_retired_objects_are_file_not_found(s3_root: str) -> None:
    fs, path, data = _object(s3_root, n=10_000, seed=1)
    with pytest.raises(FileNotFoundError):
        fs.read_range(path + ".absent", 0, 10)
    assert fs.read_range(path, 100, 200) == data[100:200]  # the handle is now cached
    assert fs.delete(path) is True  # a merge retires it after a reader opened it
    with pytest.raises(FileNotFoundError):
        fs.read_range(path, 0, 10)
    assert fs._key(path) not in fs._handles


def test_a_recreated_longer_object_is_read_whole(s3_root: str) -> None:
    """A cached handle knows the old size; a read past it is short and is made again (boto3)."""
    fs, path, data = _object(s3_root, n=1_000, seed=2)
    assert fs.read_range(path, 0, 1_000) == data
    fs.delete(path)
    longer = np.random.default_rng(3).integers(0, 256, 5_000, dtype=np.uint8).tobytes()
    fs.put_create_only(path, longer)
    assert fs.read_range(path, 500, 4_000) == longer[500:4_000]


def test_unreachable_endpoint_is_still_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    fs = S3FS("hwstore", S3Settings(endpoint_url=f"http://127.0.0.1:{port}", max_attempts=1,
                                    connect_timeout_s=2, read_timeout_s=2))
    with pytest.raises(EndpointUnreachableError, match="cannot reach"):
        fs.read_range("s3://hwstore/x.parquet", 0, 10)
