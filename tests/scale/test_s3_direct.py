"""The direct read path (``Store.scan_run``/``scan_arrays``/``run_extremes``) on an ``s3://`` store.

A one-series read on object storage fetches only the selected segments of that run's table (their
footers and needed row groups by ranged GETs, or a small one whole through the segment cache), never
the whole table the SQL path's view would download; it returns the raw rows, and a segment retired
between the LIST and the GETs makes it list again. Real SeaweedFS (tests/scale/conftest.py), no mocks:
the GETs are counted where they are made (the S3 file system's ranged-read call, which still sends them).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from polars.testing import assert_frame_equal
from scale_store import BRANCHES, PARENT, write_lineage

from healthwatch.objectstore import S3FS
from healthwatch.store import open_store
from healthwatch.store import reader as _reader
from healthwatch.store.fs import fs_for

COLS = ["step", "attempt", "value"]


def _upload(root: Path, s3_root: str) -> dict[str, int]:
    """Every store object under the same key; returns ``{relative key: bytes}``."""
    fs = S3FS.for_uri(s3_root)
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and not path.name.startswith(".") and not rel.startswith("_delta"):
            fs.put_create_only(f"{s3_root}/{rel}", path.read_bytes())
            out[rel] = path.stat().st_size
    return out


def _raw_rows(root: Path, run: str, layer: int, lo: int, hi: int, skip: set[str] = frozenset()) -> pl.DataFrame:
    """The expected rows, read independently: every local layer_stats file of ``run`` whole, filtered."""
    files = sorted((root / "table=layer_stats" / f"run={run}").glob("*.parquet"))
    assert files
    frames = [pl.from_arrow(pq.read_table(f, columns=["metric", "layer", *COLS])) for f in files if f.name not in skip]
    df = pl.concat(frames)
    return (df.filter((pl.col("metric") == "maxvio") & (pl.col("layer") == layer) & pl.col("step").is_between(lo, hi))
            .select(COLS).sort(COLS))


def _count_gets(monkeypatch: pytest.MonkeyPatch) -> tuple[list[str], list[int]]:
    """Record the key of every ranged GET and every whole-object GET the store makes (then sends them)."""
    keys: list[str] = []
    sizes: list[int] = []
    real_range, real_bytes = S3FS.read_range, S3FS.read_bytes

    def read_range(self: S3FS, path: str, start: int, end: int) -> bytes:
        keys.append(str(path))
        sizes.append(end - start)
        return real_range(self, path, start, end)

    def read_bytes(self: S3FS, path: str) -> bytes:
        data = real_bytes(self, path)
        keys.append(str(path))
        sizes.append(len(data))
        return data

    monkeypatch.setattr(S3FS, "read_range", read_range)
    monkeypatch.setattr(S3FS, "read_bytes", read_bytes)
    return keys, sizes


@pytest.mark.timeout(600)
@pytest.mark.parametrize("copy_bytes", [0, 8 * 2**20], ids=["ranged-gets", "small-files-copied"])
def test_one_series_on_s3_gets_only_that_runs_files(tmp_path: Path, s3_root: str, copy_bytes: int,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_reader, "_S3_COPY_BYTES", copy_bytes)
    monkeypatch.setenv("HEALTHWATCH_S3_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "store"
    write_lineage(root, last_step=9990)
    objects = _upload(root, s3_root)
    run = next(iter(BRANCHES))
    mine = {k: v for k, v in objects.items() if k.startswith(f"table=layer_stats/run={run}/") and k.endswith(".parquet")}
    others = sum(v for k, v in objects.items() if k.startswith("table=layer_stats/") and k not in mine)
    assert mine and others > 0
    keys, sizes = _count_gets(monkeypatch)
    with open_store(s3_root) as store:
        keys.clear()  # opening read the store's healthwatch.json: count from the read on
        sizes.clear()
        lo, hi = 2000, 4000
        got = store.scan_run("layer_stats", run, COLS, {"metric": ("maxvio", "maxvio"), "layer": (3, 3), "step": (lo, hi)})
        assert got is not None, "the direct path must answer on s3://"
        expected = _raw_rows(root, run, 3, lo, hi)
        assert expected.height > 100
        assert_frame_equal(got.sort(COLS), expected, check_dtypes=False)
        first, first_bytes = list(keys), sum(sizes)
        # Equal to the SQL path too (built afterwards: the direct read above built no view).
        assert store._con is None and not store._sigs
        sql = store.sql("SELECT step, attempt, value FROM layer_stats WHERE run = ? AND metric = 'maxvio' "
                        "AND layer = 3 AND step BETWEEN ? AND ?", [run, lo, hi]).pl()
        assert_frame_equal(sql.sort(COLS), expected, check_dtypes=False)
        arrays = store.scan_arrays("layer_stats", run, ["step", "value"],
                                   {"metric": ("maxvio", "maxvio"), "layer": (3, 3), "step": (lo, hi)})
        assert arrays is not None
        order = np.argsort(arrays["step"], kind="stable")
        np.testing.assert_array_equal(arrays["step"][order], expected.sort("step")["step"].to_numpy())
        ext = store.run_extremes("layer_stats", run, ["step"])
        steps = pl.concat([pl.from_arrow(pq.read_table(root / k, columns=["step"])) for k in mine])["step"]
        assert ext == {"step": (steps.min(), steps.max())}
    # The direct read GOT only files of this run's layer_stats folder (the SQL query after it read more).
    assert first, "the direct read made no GET"
    assert len(keys) > len(first)
    for k in first:
        assert f"/table=layer_stats/run={run}/" in k, k
    assert {k.rsplit("/", 1)[-1] for k in first} <= {k.rsplit("/", 1)[-1] for k in mine}
    if copy_bytes == 0:  # ranged GETs: fewer bytes than the run's files, none of other runs
        assert first_bytes < sum(mine.values())


@pytest.mark.timeout(600)
def test_segment_retired_between_list_and_get_relists(tmp_path: Path, s3_root: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_reader, "_S3_COPY_BYTES", 0)
    monkeypatch.setenv("HEALTHWATCH_S3_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "store"
    write_lineage(root, last_step=9990)
    objects = _upload(root, s3_root)
    run = PARENT
    mine = sorted(k for k in objects if k.startswith(f"table=layer_stats/run={run}/") and k.endswith(".parquet"))
    assert len(mine) >= 2
    victim = mine[0]
    fs = S3FS.for_uri(s3_root)
    real_list = S3FS.list
    retired: list[str] = []

    def list_then_retire(self: S3FS, directory: str) -> list[str]:
        names = real_list(self, directory)
        if not retired and f"run={run}" in str(directory) and "layer_stats" in str(directory):
            # A merge retires a listed segment after this LIST and before the reader's GETs.
            assert fs.delete(f"{s3_root}/{victim}")
            retired.append(victim)
        return names

    monkeypatch.setattr(S3FS, "list", list_then_retire)
    with open_store(s3_root) as store:
        assert isinstance(fs_for(str(store.root)), S3FS)
        got = store.scan_run("layer_stats", run, COLS, {"metric": ("maxvio", "maxvio"), "layer": (1, 1)})
    assert retired == [victim]
    assert got is not None
    expected = _raw_rows(root, run, 1, 0, 10**9, skip={victim.rsplit("/", 1)[-1]})
    assert expected.height > 0
    assert_frame_equal(got.sort(COLS), expected, check_dtypes=False)
