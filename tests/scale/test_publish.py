"""The Delta Lake publisher: exactly the store's rows at every version, across merges and live writers."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from _deps import require
from scale_store import LAYERS, PARENT, ROLLBACK_AT, write_lineage

deltalake = require("deltalake", "Delta Lake publisher (pip install -e '.[dev]')")

from healthwatch.publish import (  # noqa: E402
    EFFECTIVE_SQL,
    Publisher,
    PublishError,
    effective_sql,
    publisher_lock,
)
from healthwatch.schema import TABLES  # noqa: E402
from healthwatch.store import StoreWriter, compact_store, open_store  # noqa: E402


def _delta_rows(uri: str, version: int | None = None) -> pa.Table:
    dt = deltalake.DeltaTable(uri) if version is None else deltalake.DeltaTable(uri, version=version)
    return dt.to_pyarrow_dataset().to_table()


def _keys(t: pa.Table) -> list[tuple]:
    cols = [c for c in ("run", "attempt", "step", "layer", "metric", "name") if c in t.column_names]
    return sorted(zip(*(t.column(c).to_pylist() for c in cols)))


def test_publish_mirrors_the_store_and_survives_compaction(tmp_path: Path) -> None:
    root = tmp_path / "store"
    write_lineage(root, last_step=2990)
    pub = Publisher(root)
    first = pub.publish_once()
    # One commit per table per cycle, however many segments (4 flushes x 2 writers here).
    assert first.changes["layer_stats"].added == 8 and first.changes["layer_stats"].version == 1
    again = pub.publish_once()
    assert again.committed == 0  # nothing new: no empty commits
    v1 = _delta_rows(pub.table_uri("layer_stats"))
    # Expected rows from the inputs: parent attempt 1 (steps 0..2990) and the branch at 2k (2000..2990).
    expected = 300 * LAYERS + 100 * LAYERS  # parent 0..2990 + bf16-at-2k 2000..2990
    assert v1.num_rows == expected == len(set(_keys(v1)))
    compact_store(root)  # merges: every table's segments -> one file, sources retired
    merged = pub.publish_once()
    assert merged.changes["layer_stats"].removed == 8 and merged.changes["layer_stats"].added == 2
    v2 = _delta_rows(pub.table_uri("layer_stats"))
    assert _keys(v2) == _keys(v1)  # same rows, none twice, none lost
    # The older version still reads (the table links its own files; compaction deleted the store's).
    assert _keys(_delta_rows(pub.table_uri("layer_stats"), version=1)) == _keys(v1)
    with open_store(root) as st:
        store_vals = st.sql("SELECT run, attempt, step, layer, value FROM layer_stats ORDER BY ALL").fetchall()
    import duckdb

    ds = deltalake.DeltaTable(pub.table_uri("layer_stats")).to_pyarrow_dataset()
    con = duckdb.connect()
    con.register("ls", ds)
    assert con.sql("SELECT run, attempt, step, layer, value FROM ls ORDER BY ALL").fetchall() == store_vals


def test_effective_sql_hides_superseded_attempts(tmp_path: Path) -> None:
    import duckdb

    root = tmp_path / "store"
    write_lineage(root, last_step=6990)
    pub = Publisher(root, tables=("attempts", "layer_stats"))
    pub.publish_once()
    con = duckdb.connect()
    con.register("attempts", deltalake.DeltaTable(pub.table_uri("attempts")).to_pyarrow_dataset())
    con.register("layer_stats", deltalake.DeltaTable(pub.table_uri("layer_stats")).to_pyarrow_dataset())
    eff = con.sql(f"SELECT attempt, step FROM ({effective_sql('layer_stats')}) WHERE run = '{PARENT}'").fetchall()
    # Expected from the inputs: attempt 1 below the rollback step, attempt 2 from it on.
    assert {(a, s) for a, s in eff} == (
        {(1, s) for s in range(0, ROLLBACK_AT, 10)} | {(2, s) for s in range(ROLLBACK_AT, 7000, 10)}
    )
    assert len(eff) == len({(a, s) for a, s in eff}) * LAYERS
    assert "{table}" in EFFECTIVE_SQL and "{attempts}" in EFFECTIVE_SQL


def test_live_writers_compaction_and_follow_never_lose_or_double_rows(tmp_path: Path) -> None:
    root = tmp_path / "store"
    steps_written: list[int] = []
    stop = threading.Event()

    def write() -> None:  # a live writer: one segment per "flush", its own merges as it goes
        w = StoreWriter(root, "live", merge_fanout=4)
        for i in range(60):
            s = np.arange(i * 10, i * 10 + 10, dtype=np.int64)
            w.write("scalars", pa.table({"attempt": np.ones(10, np.int32), "step": s, "tokens": s,
                                         "name": ["loss/train"] * 10, "value": s / 3.0,
                                         "wall_time": np.zeros(10)}, schema=TABLES["scalars"]))
            steps_written.extend(s.tolist())
            w.compact_own("scalars")
            if i == 30:
                compact_store(root, rollups=False)

    StoreWriter(root, "live").write("scalars", pa.table(
        {"attempt": [1], "step": [-1], "tokens": [0], "name": ["loss/train"], "value": [0.0], "wall_time": [0.0]},
        schema=TABLES["scalars"]))
    steps_written.append(-1)
    pub = Publisher(root, tables=("scalars",))
    t = threading.Thread(target=write)
    t.start()
    follower = threading.Thread(target=pub.follow, kwargs={"interval_s": 0.05, "stop": stop})
    follower.start()
    t.join(300)
    stop.set()
    follower.join(300)
    pub.publish_once()
    dt = deltalake.DeltaTable(pub.table_uri("scalars"))
    assert dt.version() >= 3  # it published while the writer wrote and merged
    for version in range(1, dt.version() + 1):
        steps = _delta_rows(pub.table_uri("scalars"), version).column("step").to_pylist()
        assert len(steps) == len(set(steps))  # never a row twice, at any version
    final = sorted(_delta_rows(pub.table_uri("scalars")).column("step").to_pylist())
    assert final == sorted(steps_written)  # and nothing lost


def test_one_committer_and_clear_errors(tmp_path: Path) -> None:
    root = tmp_path / "store"
    write_lineage(root, last_step=990)
    pub = Publisher(root)
    Path(pub.out).mkdir(parents=True)
    with publisher_lock(Path(pub.out)) as held:
        assert held
        with pytest.raises(PublishError, match="another publisher is committing"):
            pub.publish_once()
    with pytest.raises(PublishError, match="no healthwatch store"):
        Publisher(tmp_path / "missing")
    with pytest.raises(PublishError, match="unknown table"):
        Publisher(root, tables=("nope",))


def test_publish_cli(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from healthwatch.cli import app

    root = tmp_path / "store"
    write_lineage(root, last_step=990)
    res = CliRunner().invoke(app, ["publish", "--store", str(root), "--out", str(tmp_path / "delta")])
    assert res.exit_code == 0, res.output
    assert "layer_stats v1 +" in res.output
    assert deltalake.DeltaTable(str(tmp_path / "delta" / "layer_stats")).version() == 1
    bad = CliRunner().invoke(app, ["publish", "--store", str(tmp_path / "missing")])
    assert bad.exit_code == 2 and "no healthwatch store" in bad.output


def test_publish_an_s3_store_to_delta_on_s3(s3_root: str) -> None:
    from healthwatch.objectstore import S3FS, S3SegmentWriter

    fs = S3FS.for_uri(s3_root)
    expected: list[int] = []
    for rank in range(3):  # three writers (pipeline stages) of one run
        w = S3SegmentWriter(fs, s3_root, "s3run", rank=rank)
        w.start()
        for flush in range(4):
            s = np.arange(flush * 100 + rank * 10_000, flush * 100 + rank * 10_000 + 100, dtype=np.int64)
            w.write("scalars", pa.table({"attempt": np.ones(100, np.int32), "step": s, "tokens": s,
                                         "name": ["loss/train"] * 100, "value": s * 0.5,
                                         "wall_time": np.zeros(100)}, schema=TABLES["scalars"]))
            expected += s.tolist()
    pub = Publisher(s3_root, tables=("scalars",))
    rep = pub.publish_once()
    assert rep.changes["scalars"].added == 12 and pub.out == f"{s3_root}/_delta"
    assert pub.publish_once().committed == 0
    dt = deltalake.DeltaTable(pub.table_uri("scalars"), storage_options=pub.storage_options())
    got = dt.to_pyarrow_dataset().to_table()
    assert sorted(got.column("step").to_pylist()) == sorted(expected)
    assert set(got.column("run").to_pylist()) == {"s3run"}
    # The lock object is gone after the cycle; a second publisher may take over.
    assert not fs.exists(f"{pub.out}/_publisher.lock")
