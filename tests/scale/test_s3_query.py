"""The query layer runs unchanged on an ``s3://`` store and gives the local store's answers.

The same store (written and compacted locally, then uploaded object by object with create-only
PUTs under the same keys) is read both ways: ``healthwatch.query`` and ``healthwatch.compare``
must return identical frames from ``open_store(<local dir>)`` and ``open_store("s3://…")`` (the
one reader, :class:`~healthwatch.store.Store`, over pyarrow datasets of the S3 objects).
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal
from scale_store import BRANCHES, PARENT, write_lineage

from healthwatch import compare, objectstore, query
from healthwatch.objectstore import S3FS
from healthwatch.store import compact_store, open_store


def _upload(root: Path, s3_root: str) -> int:
    fs = S3FS.for_uri(s3_root)
    n = 0
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and not path.name.startswith(".") and not rel.startswith("_delta"):
            fs.put_create_only(f"{s3_root}/{rel}", path.read_bytes())
            n += 1
    return n


@pytest.mark.timeout(600)
@pytest.mark.parametrize("in_memory_bytes", [0, None], ids=["scan-s3", "small-tables-in-memory"])
def test_query_layer_on_s3_equals_local(tmp_path: Path, s3_root: str, in_memory_bytes: int | None,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    if in_memory_bytes is not None:  # 0: every table is scanned on S3 at each query, none held in memory
        monkeypatch.setattr(objectstore.reading, "IN_MEMORY_BYTES", in_memory_bytes)
    root = tmp_path / "store"
    write_lineage(root, last_step=9990)
    # Rollup validity compares attempt start times with the rollup file's age (1 s slack); the
    # upload gives the objects a later age than the local files, so keep the two on the same side.
    time.sleep(1.5)
    compact_store(root, runs=[PARENT])  # the parent reads rollups; the branches raw segments
    assert _upload(root, s3_root) > 10
    with open_store(root) as local, open_store(s3_root) as remote:
        assert str(remote.root).startswith("s3:/")
        assert remote.sql("SELECT count(*) FROM layer_stats").fetchone() == local.sql(
            "SELECT count(*) FROM layer_stats").fetchone()
        for agg in ("max", "mean", "min", "last"):
            assert_frame_equal(query.heatmap(remote, PARENT, "maxvio", agg=agg, max_buckets=50),
                               query.heatmap(local, PARENT, "maxvio", agg=agg, max_buckets=50))
        # The same rollup limits. `others` (may rows of attempts without rollups be there?) is read from
        # footers (on S3 by ranged GETs: Store.attempts_present); were it unknown there, the plan would keep
        # that raw part (a conservative superset: the series and heatmaps below still equal the local ones).
        p_remote = query.plan(remote, PARENT, "layer_stats", query.timeline(remote, PARENT))
        p_local = query.plan(local, PARENT, "layer_stats", query.timeline(local, PARENT))
        assert dataclasses.replace(p_remote, others=p_local.others) == p_local
        assert p_remote.others or not p_local.others
        for kwargs in ({}, {"layer": 3, "max_points": 100}, {"include_superseded": True}):
            name = "maxvio" if "layer" in kwargs else "loss/train"
            # A rollup bucket gives its min and max at the bucket's first step, in no fixed order.
            assert_frame_equal(query.series(remote, PARENT, name, **kwargs).sort(pl.all()),
                               query.series(local, PARENT, name, **kwargs).sort(pl.all()))
        assert_frame_equal(query.layer_aggregate(remote, PARENT, "maxvio", "median"),
                           query.layer_aggregate(local, PARENT, "maxvio", "median"))
        assert_frame_equal(compare.gap_summary(remote, parent=PARENT), compare.gap_summary(local, parent=PARENT))
        over_r = query.runs_overview(remote).drop("last_write", strict=False).sort("run")
        over_l = query.runs_overview(local).drop("last_write", strict=False).sort("run")
        assert_frame_equal(over_r, over_l)
        assert isinstance(over_r, pl.DataFrame) and over_r.height == 3
    if in_memory_bytes is None:
        # `healthwatch compare --store s3://…` writes the same table as on the local copy.
        for where, store in (("local", str(root)), ("s3", s3_root)):
            res = subprocess.run([sys.executable, "-m", "healthwatch.cli", "compare", "--store", store, "--runs",
                                  PARENT, *BRANCHES, "--out", str(tmp_path / f"{where}.csv")],
                                 capture_output=True, text=True, timeout=300)
            assert res.returncode == 0, res.stderr
        assert_frame_equal(pl.read_csv(tmp_path / "s3.csv"), pl.read_csv(tmp_path / "local.csv"))
