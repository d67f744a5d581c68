"""Stores on S3: root URIs, the create-only probe, clear errors, and bit-exact reads through DuckDB.

Every test talks to a real S3 server on 127.0.0.1 (SeaweedFS ``weed mini``; moto behind a
header-dropping proxy for the server that ignores ``If-None-Match``), never a mock of the client.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from s3servers import ADMIN, READER, SeaweedS3, moto_behind_ignoring_proxy

from healthwatch import objectstore
from healthwatch.objectstore import (
    S3FS,
    AccessDeniedError,
    BucketNotFoundError,
    ConditionalWriteUnsupportedError,
    CredentialsError,
    EndpointUnreachableError,
    KeyCollisionError,
    S3SegmentWriter,
    S3Settings,
    StoreURIError,
    parse_store_uri,
    segment_key,
)
from healthwatch.schema import TABLES
from healthwatch.store import open_store

BUCKET = "hwstore"


# -- URIs -------------------------------------------------------------------------------------


def test_store_roots_parse_as_uris(tmp_path: Path) -> None:
    local = parse_store_uri(str(tmp_path / "s"))
    assert not local.is_s3 and local.path == tmp_path / "s"
    assert parse_store_uri(tmp_path).path == tmp_path
    assert parse_store_uri(f"file://{tmp_path}/x").path == tmp_path / "x"
    s3 = parse_store_uri("s3://my-bucket/team/runs/")
    assert (s3.is_s3, s3.bucket, s3.prefix, str(s3)) == (True, "my-bucket", "team/runs", "s3://my-bucket/team/runs")
    assert parse_store_uri("s3://my-bucket").prefix == ""


@pytest.mark.parametrize(
    ("uri", "words"),
    [
        ("gs://bucket/x", "unsupported store URI scheme 'gs'"),
        ("http://host/x", "unsupported store URI scheme 'http'"),
        ("s3:///prefix", "has no bucket"),
        ("s3://ab/x", "3-63 characters"),
        ("s3://bucket/a/../b", "'..'"),
        ("file://otherhost/x", "names host"),
        ("", "empty store root"),
    ],
)
def test_bad_store_uris_get_one_clear_error(uri: str, words: str) -> None:
    with pytest.raises(StoreURIError, match=words.replace("(", r"\(").replace(".", r"\.")):
        parse_store_uri(uri)


def test_segment_keys_spread_by_writer_and_cannot_collide() -> None:
    root = parse_store_uri("s3://b-k/p")
    a = segment_key(root, "layer_stats", "r1", "a0001r00003xdeadbeef", 7)
    assert a == "p/table=layer_stats/run=r1/a0001r00003xdeadbeef-000000007-L0.parquet"
    # Two writers of the same run and sequence number never share a key.
    assert a != segment_key(root, "layer_stats", "r1", "a0001r00004xdeadbeef", 7)


# -- the probe and create-only writes ---------------------------------------------------------


def test_probe_accepts_a_server_that_enforces_if_none_match(s3_env: SeaweedS3) -> None:
    fs = S3FS(BUCKET)
    fs.probe("probe-ok")
    assert fs.stats.snapshot()["put"] == 2  # the probe PUT twice; the second was refused with 412
    assert fs.list(f"s3://{BUCKET}/probe-ok/_probe") == []  # and cleaned up after itself


def test_probe_refuses_a_server_that_ignores_if_none_match(monkeypatch: pytest.MonkeyPatch) -> None:
    with moto_behind_ignoring_proxy(monkeypatch, BUCKET) as (port, proxy):
        direct = S3FS(BUCKET, S3Settings(endpoint_url=f"http://127.0.0.1:{port}"))
        fs = S3FS(BUCKET, S3Settings(endpoint_url=proxy.endpoint))
        with pytest.raises(ConditionalWriteUnsupportedError) as err:
            fs.probe("p")
        msg = str(err.value)
        assert proxy.endpoint in msg and "ignores If-None-Match" in msg and "412" in msg
        # The same server without the header-dropping proxy passes (moto enforces it one at a time).
        direct.probe("p")


def test_create_only_put_never_replaces_an_object(s3_root: str) -> None:
    fs = S3FS.for_uri(s3_root)
    path = f"{s3_root}/table=scalars/run=r/a0001r00000x00000000-000000001-L0.parquet"
    fs.put_create_only(path, b"first")
    fs.put_create_only(path, b"first")  # a retried PUT of the same bytes is not a collision
    with pytest.raises(KeyCollisionError, match="already exists"):
        fs.put_create_only(path, b"other")
    assert fs.read_bytes(path) == b"first"
    assert fs.create_exclusive(path, b"x") is False
    assert fs.list(f"{s3_root}/table=scalars") == ["run=r"]
    assert fs.exists(path) and fs.mtime_ns(path) is not None
    assert fs.delete(path) is True and fs.delete(path) is False and not fs.exists(path)


def test_list_signed_is_one_list_with_the_same_signature_and_names(s3_root: str) -> None:
    # The store's refresh asks a run folder's signature and names: one LIST, agreeing with the
    # two separate calls (mtime_ns of a prefix, list) it replaces.
    fs = S3FS.for_uri(s3_root)
    directory = f"{s3_root}/table=scalars/run=r"
    assert fs.list_signed(directory) == (None, [])
    fs.publish_bytes(directory, "b.parquet", b"22")
    fs.publish_bytes(directory, "a.parquet", b"1")
    fs.publish_bytes(f"{directory}/sub", "c.json", b"333")  # a deeper key: listed as its folder
    before = fs.stats.snapshot()["list"]
    sig, names = fs.list_signed(directory)
    assert fs.stats.snapshot()["list"] - before == 1
    assert names == sorted(fs.list(directory)) == ["a.parquet", "b.parquet", "sub"]
    assert sig == fs.mtime_ns(directory) and sig is not None
    fs.publish_bytes(directory, "d.parquet", b"4444")
    assert fs.list_signed(directory)[0] != sig
    # pathlib's "s3:/" spelling, as the store joins paths, gives the same answer.
    assert fs.list_signed(str(Path(s3_root) / "table=scalars" / "run=r"))[1] == ["a.parquet", "b.parquet", "d.parquet", "sub"]


def test_store_code_that_joins_paths_works_on_s3_roots(s3_root: str) -> None:
    # Store code builds paths with pathlib, which folds "s3://" into "s3:/": both spellings work.
    fs = S3FS.for_uri(s3_root)
    directory = Path(s3_root) / "table=scalars" / "run=r"
    assert fs.mtime_ns(str(directory)) is None  # nothing there yet
    fs.publish_bytes(str(directory), "a.parquet", b"1")
    first = fs.mtime_ns(str(directory))  # a prefix: a signature of its listing
    assert first is not None and fs.list(str(directory)) == ["a.parquet"]
    assert fs.mtime_ns(str(directory)) == first  # unchanged listing, same signature
    fs.publish(str(directory), "b.parquet", lambda tmp: Path(tmp).write_bytes(b"22"))
    assert fs.mtime_ns(str(directory)) != first
    assert fs.read_bytes(str(directory / "b.parquet")) == b"22"
    assert fs.arrow_path(str(directory / "b.parquet")) == f"{BUCKET}/{s3_root[len('s3://' + BUCKET) + 1:]}/table=scalars/run=r/b.parquet"
    with fs.open_input(str(directory / "b.parquet")) as fh:  # what pyarrow reads (footers, schemas)
        assert fh.read() == b"22"
    with pytest.raises(FileNotFoundError):
        fs.open_input(str(directory / "gone.parquet"))


# -- bad input: one clear error each ------------------------------------------------------------


def test_missing_bucket_is_a_clear_error(s3_env: SeaweedS3) -> None:
    with pytest.raises(BucketNotFoundError, match="bucket 'no-such-bucket' does not exist at http://127.0.0.1"):
        S3FS("no-such-bucket").probe()
    with pytest.raises(BucketNotFoundError, match="no-such-bucket"):
        open_store("s3://no-such-bucket/x")


@pytest.mark.parametrize("creds", [(ADMIN[0], "wrong-secret"), ("nobody", "nothing")])
def test_wrong_credentials_are_a_clear_error(s3_env: SeaweedS3, monkeypatch: pytest.MonkeyPatch, creds) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", creds[0])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", creds[1])
    fs = S3FS(BUCKET)
    with pytest.raises(CredentialsError, match="rejected the credentials"):
        fs.put_create_only(f"s3://{BUCKET}/creds/x", b"1")
    with pytest.raises(CredentialsError):
        fs.list(f"s3://{BUCKET}/creds")


def test_no_credentials_at_all_is_a_clear_error(s3_env: SeaweedS3, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(CredentialsError, match="no AWS credentials"):
        S3FS(BUCKET).probe()


def test_missing_permission_is_a_clear_error(s3_env: SeaweedS3, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", READER[0])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", READER[1])
    fs = S3FS(BUCKET)
    fs.check_bucket()  # reading is allowed
    with pytest.raises(AccessDeniedError, match="denied put"):
        fs.probe("perm")


def test_unreachable_endpoint_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    monkeypatch.setenv("HEALTHWATCH_S3_ENDPOINT", f"http://127.0.0.1:{port}")
    fs = S3FS(BUCKET, S3Settings(connect_timeout_s=1, max_attempts=1))
    with pytest.raises(EndpointUnreachableError, match=f"cannot reach the S3 endpoint http://127.0.0.1:{port}"):
        fs.probe()


# -- round trip through DuckDB --------------------------------------------------------------------


def _layer_rows(run_steps: np.ndarray, layers: int, values: np.ndarray) -> pa.Table:
    n = run_steps.size * layers
    return pa.table(
        {
            "attempt": pa.array(np.ones(n, np.int32)),
            "step": pa.array(np.repeat(run_steps, layers)),
            "tokens": pa.array(np.repeat(run_steps, layers) * 4096),
            "layer": pa.array(np.tile(np.arange(layers, dtype=np.int32), run_steps.size)),
            "layer_type": pa.array(["moe"] * n),
            "metric": pa.array(["maxvio"] * n),
            "value": pa.array(values),
        },
        schema=TABLES["layer_stats"],
    )


def test_segments_round_trip_bit_exact_through_duckdb(s3_root: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(objectstore.reading, "IN_MEMORY_BYTES", 0)  # read from S3 at every query, not held in memory
    monkeypatch.setenv("HEALTHWATCH_S3_CACHE_BYTES", "0")  # no local copies: the HTTP scan path
    rng = np.random.default_rng(7)
    layers, steps = 6, np.arange(0, 300, dtype=np.int64)
    values = rng.normal(size=steps.size * layers) * 1e3
    specials = np.array([np.nan, np.inf, -np.inf, -0.0, 5e-324, np.finfo(np.float64).max, 1e-300])
    values[: specials.size] = specials
    fs = S3FS.for_uri(s3_root)
    writer = S3SegmentWriter(fs, s3_root, "run-a")
    writer.start()
    # Three flushes of 100 steps: three create-only PUTs.
    for part in range(3):
        sl = slice(part * 100 * layers, (part + 1) * 100 * layers)
        writer.write("layer_stats", _layer_rows(steps[part * 100 : (part + 1) * 100], layers, values[sl]))
    tables = open_store(s3_root)  # the one reader, on the s3:// root
    assert len(tables.files("layer_stats")) == 3
    got = {k: v.to_numpy() for k, v in zip(["step", "layer", "value"], tables.sql(
        "SELECT step, layer, value FROM layer_stats WHERE run = 'run-a' ORDER BY step, layer"
    ).arrow().columns, strict=True)}
    assert np.array_equal(got["step"], np.repeat(steps, layers))
    assert np.array_equal(got["value"].view(np.uint64), values.view(np.uint64))  # NaN, ±Inf, -0.0 included
    # Column and row filters are pushed into the pyarrow scan of the S3 objects.
    plan = "\n".join(r[1] for r in tables.sql(
        "EXPLAIN SELECT value FROM layer_stats WHERE run = 'run-a' AND layer = 3 AND step >= 200"
    ).fetchall())
    scan = plan[plan.index("ARROW_SCAN"):]
    # Filters and the projection reach the pyarrow scanner (row groups and columns skipped on S3).
    assert '"layer" = 3' in scan and '"step" >= 200' in scan and "Projections: value" in scan
    sub = tables.sql(
        "SELECT value FROM layer_stats WHERE run = 'run-a' AND layer = 3 AND step >= 200 ORDER BY step"
    ).arrow()["value"].to_numpy()
    assert np.array_equal(sub.view(np.uint64), values.reshape(-1, layers)[200:, 3].view(np.uint64))
    tables.close()


def test_segment_cache_reads_local_copies_bit_exact(s3_root: str, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """With the segment cache (the default), the reader downloads each live segment once and DuckDB
    reads the local copies: same bits as written, no download on a second open, retired segments
    dropped from the views, and a table larger than the budget read over HTTP instead."""
    cache_dir = tmp_path / "cache"
    monkeypatch.setenv("HEALTHWATCH_S3_CACHE_DIR", str(cache_dir))
    rng = np.random.default_rng(11)
    layers, steps = 4, np.arange(0, 200, dtype=np.int64)
    values = rng.normal(size=steps.size * layers)
    values[:3] = [np.nan, -0.0, np.inf]
    fs = S3FS.for_uri(s3_root)
    writer = S3SegmentWriter(fs, s3_root, "run-c")
    writer.start()
    keys = [writer.write("layer_stats", _layer_rows(steps[i * 50:(i + 1) * 50], layers,
                                                    values[i * 50 * layers:(i + 1) * 50 * layers])) for i in range(4)]
    query = "SELECT step, layer, value FROM layer_stats WHERE run = 'run-c' ORDER BY step, layer"

    def read(st: Any) -> np.ndarray:
        return st.sql(query).arrow()["value"].to_numpy()

    st = open_store(s3_root)
    got = read(st)
    assert np.array_equal(got.view(np.uint64), values.view(np.uint64))
    cache = st.segment_cache
    assert cache is not None and cache.downloads == 4  # one GET per live segment, nothing else
    plan = "\n".join(r[1] for r in st.sql("EXPLAIN " + query).fetchall())
    assert "READ_PARQUET" in plan and "ARROW_SCAN" not in plan  # DuckDB reads the local copies
    copies = sorted(cache_dir.rglob("*.parquet"))
    assert len(copies) == 4 and all("table=layer_stats" in str(c) and "run=run-c" in str(c) for c in copies)
    st.close()
    # A second reader (a new process would do the same) finds every copy: no download.
    st2 = open_store(s3_root)
    assert np.array_equal(read(st2).view(np.uint64), values.view(np.uint64))
    assert st2.segment_cache.downloads == 0
    # A segment retired (as a merge retires its sources): the next view leaves its copy out.
    assert keys[0] is not None
    fs.delete(keys[0] if keys[0].startswith("s3://") else fs.uri(keys[0]))
    st2.refresh(force=True)
    assert np.array_equal(read(st2).view(np.uint64), values[50 * layers:].view(np.uint64))
    st2.close()
    # A budget smaller than the table: no copies, the HTTP scan serves the same rows.
    monkeypatch.setenv("HEALTHWATCH_S3_CACHE_BYTES", "1000")
    st3 = open_store(s3_root)
    assert np.array_equal(read(st3).view(np.uint64), values[50 * layers:].view(np.uint64))
    assert st3.segment_cache.downloads == 0
    plan = "\n".join(r[1] for r in st3.sql("EXPLAIN " + query).fetchall())
    assert "ARROW_SCAN" in plan or "SEQ_SCAN" in plan
    st3.close()
