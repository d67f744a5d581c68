"""Spark (pyspark, local mode) reads the published Delta tables and gets the app's numbers.

Offline, Spark has no Delta connector (delta-spark's jars come from Maven at session start), so
it reads the Parquet data files of each table's *current Delta snapshot* (``file_uris()``, with
the ``run=`` partition folders as its base path): exactly the files one Delta version holds,
never a half-merged segment folder. With the connector, ``spark.read.format("delta").load(path)``
gives the same rows. Superseded attempts are removed by the documented join
(:data:`healthwatch.publish.EFFECTIVE_SQL`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from _deps import require
from scale_store import BRANCHES, LAYERS, PARENT, write_lineage

pyspark = require("pyspark", "pyspark (pip install -e '.[dev]')")
require("java", "a Java runtime for Spark (Debian openjdk-17-jre-headless)")
require("deltalake", "Delta Lake publisher (pip install -e '.[dev]')")

from healthwatch import compare, query  # noqa: E402
from healthwatch.publish import Publisher, effective_sql, published_files  # noqa: E402
from healthwatch.store import compact_store, open_store  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def spark() -> Iterator[object]:
    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", os.sys.executable)
    session = (
        SparkSession.builder.master("local[2]").appName("healthwatch-test")
        .config("spark.ui.enabled", "false")
        .config("spark.driver.bindAddress", "127.0.0.1").config("spark.driver.host", "127.0.0.1")
        .config("spark.sql.shuffle.partitions", "2")
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("ERROR")
    try:
        yield session
    finally:
        session.stop()


def _register(spark, pub: Publisher, table: str) -> None:
    uri = pub.table_uri(table)
    files = published_files(uri)
    spark.read.option("basePath", uri).parquet(*files).createOrReplaceTempView(table)


def test_spark_on_published_tables_equals_the_query_layer(spark, tmp_path: Path) -> None:
    root = tmp_path / "store"
    write_lineage(root, last_step=9990)
    compact_store(root)  # the app then reads rollups; Spark reads the merged files: same numbers
    pub = Publisher(root, tables=("runs", "attempts", "scalars", "layer_stats"))
    pub.publish_once()
    for table in pub.tables:
        _register(spark, pub, table)
    spark.sql(effective_sql("layer_stats")).createOrReplaceTempView("layer_stats_effective")
    spark.sql(effective_sql("scalars")).createOrReplaceTempView("scalars_effective")

    # 1. Per-layer MaxVio max and median per 1,000-step bucket of the NVFP4 run.
    rows = spark.sql(f"""
        SELECT layer, CAST(FLOOR(step / 1000) * 1000 AS BIGINT) AS bucket,
               MAX(value) AS vmax, PERCENTILE(value, 0.5) AS vmed
        FROM layer_stats_effective WHERE run = '{PARENT}' AND metric = 'maxvio'
        GROUP BY layer, FLOOR(step / 1000)""").collect()
    got_max = {(r.layer, r.bucket): r.vmax for r in rows}
    got_med = {(r.layer, r.bucket): r.vmed for r in rows}
    assert len(got_max) == LAYERS * 10
    with open_store(root) as st:
        hm = query.heatmap(st, PARENT, "maxvio", agg="max", max_buckets=10)  # 1,000-step buckets
        want_max = {(r["layer"], r["step"]): r["value"] for r in hm.iter_rows(named=True)}
        med = st.sql(
            "SELECT layer, (step // 1000) * 1000 AS b, median(value) FROM layer_stats_effective "
            "WHERE run = ? AND metric = 'maxvio' GROUP BY ALL", [PARENT]).fetchall()
        want_med = {(layer, b): v for layer, b, v in med}
        summary = compare.gap_summary(st, parent=PARENT)
    assert got_max == want_max  # exact: max is max, from raw rows or rollups
    assert got_med.keys() == want_med.keys()
    for key, v in want_med.items():
        assert math.isclose(got_med[key], v, rel_tol=1e-12), key
    # The superseded, diverged attempt (values + 5) is out of both.
    assert max(got_max.values()) < 5.0

    # 2. NVFP4-vs-BF16 relative gap per branch (both runs log at the same tokens here, so the
    #    query layer's interpolation is an equality join; see docs/scale.md for other grids).
    gaps = spark.sql(f"""
        WITH low AS (SELECT tokens, value FROM scalars_effective WHERE run = '{PARENT}' AND name = 'loss/train'),
             ref AS (SELECT run AS branch, tokens, value FROM scalars_effective
                     WHERE run IN ({", ".join(f"'{b}'" for b in BRANCHES)}) AND name = 'loss/train'),
             j AS (SELECT ref.branch, low.tokens, (low.value - ref.value) / ref.value AS gap
                   FROM low JOIN ref ON low.tokens = ref.tokens)
        SELECT branch, AVG(gap) AS mean_gap, MAX_BY(gap, tokens) AS last_gap, MAX(gap) AS max_gap,
               COUNT(*) AS points
        FROM j GROUP BY branch""").collect()
    got = {r.branch: r for r in gaps}
    assert set(got) == set(BRANCHES) == set(summary["branch"].to_list())
    for row in summary.iter_rows(named=True):
        g = got[row["branch"]]
        assert g.points == row["points"]
        for col in ("mean_gap", "last_gap", "max_gap"):
            assert math.isclose(getattr(g, col), row[col], rel_tol=1e-9, abs_tol=1e-15), (row["branch"], col)
    # The branch across the rollback compares against the parent's effective attempt (no +0.5 spike).
    assert max(r.max_gap for r in gaps) < 0.05
