"""Store: round trip, attempts, concurrent reads during writes and compaction, schema, downsampling."""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import healthwatch as hw
from healthwatch import query
from healthwatch.schema import NewerSchemaError, validate_run_name
from healthwatch.store import StoreWriter, compact_store

sys.path.insert(0, str(Path(__file__).parent))


def _meta(w: StoreWriter, attempt: int, start: int) -> None:
    w.write("runs", {"parent": [None], "branch_step": [None], "branch_tokens": [None], "precision": ["nvfp4"],
                     "config": ["{}"], "created": [time.time()], "schema_version": ["1.0"]})
    w.write("attempts", {"attempt": [attempt], "start_step": [start], "started_at": [time.time()],
                         "host": ["h"], "reason": ["start"], "schema_version": ["1.0"]})


def test_round_trip_2000_steps_300_values_with_nonfinite(store_dir):
    rng = np.random.default_rng(0)
    names = [f"sig/{i:03d}" for i in range(300)]
    values = rng.normal(size=(2000, 300))
    values[5, 0], values[6, 1], values[7, 2] = np.nan, np.inf, -np.inf
    w = StoreWriter(store_dir, "rt")
    _meta(w, 1, 0)
    for chunk in range(0, 2000, 100):
        steps = np.repeat(np.arange(chunk, chunk + 100), 300)
        w.write("scalars", {"attempt": np.ones(steps.size, dtype=np.int32), "step": steps, "tokens": steps * 4096,
                            "name": names * 100, "value": values[chunk:chunk + 100].reshape(-1),
                            "wall_time": np.zeros(steps.size)})
        w.compact_own("scalars")
    st = hw.open_store(store_dir)
    df = st.sql("SELECT step, name, value FROM scalars ORDER BY step, name").pl()
    assert df.height == 2000 * 300
    got = df["value"].to_numpy().reshape(2000, 300)
    np.testing.assert_array_equal(got, values)  # NaN == NaN in array_equal with equal positions
    assert math.isnan(got[5, 0]) and got[6, 1] == math.inf and got[7, 2] == -math.inf
    # The writer merged its own segments: 20 flushes stay well below 20 files.
    assert len(st.files("scalars")) < 10


def test_effective_view_hides_superseded_rows(store_dir):
    w1 = StoreWriter(store_dir, "main", attempt=1)
    _meta(w1, 1, 0)
    steps = np.arange(0, 100)
    w1.write("scalars", {"attempt": [1] * 100, "step": steps, "tokens": steps * 10, "name": ["loss/train"] * 100,
                         "value": np.full(100, 1.0), "wall_time": np.zeros(100)})
    w2 = StoreWriter(store_dir, "main", attempt=2)
    _meta(w2, 2, 60)
    s2 = np.arange(60, 120)
    w2.write("scalars", {"attempt": [2] * 60, "step": s2, "tokens": s2 * 10, "name": ["loss/train"] * 60,
                         "value": np.full(60, 2.0), "wall_time": np.zeros(60)})
    st = hw.open_store(store_dir)
    eff = st.sql("SELECT step, attempt, value FROM scalars_effective WHERE run='main' ORDER BY step").fetchall()
    assert [s for s, _, _ in eff] == list(range(120))
    assert all(a == 1 for s, a, _ in eff if s < 60) and all(a == 2 for s, a, _ in eff if s >= 60)
    ghost = st.sql("SELECT count(*) FROM scalars_all WHERE superseded").fetchone()
    assert ghost == (40,)
    # Superseded rows are kept as evidence and shown ghosted by series(include_superseded=True).
    df = query.series(st, "main", "loss/train", include_superseded=True, max_points=10_000)
    assert df.filter(df["superseded"]).height == 40


def _writer_proc(root: str, n: int) -> None:
    w = StoreWriter(root, "live", attempt=1)
    for i in range(n):
        steps = np.arange(i * 50, (i + 1) * 50)
        w.write("scalars", {"attempt": [1] * 50, "step": steps, "tokens": steps, "name": ["x"] * 50,
                            "value": steps.astype(float), "wall_time": np.zeros(50)})
        w.compact_own("scalars")


def _compactor_proc(root: str, stop_at: float) -> None:
    while time.time() < stop_at:
        compact_store(root, rollups=False)


def test_reader_survives_concurrent_writer_and_compaction(store_dir):
    w = StoreWriter(store_dir, "live")
    _meta(w, 1, 0)
    ctx = mp.get_context("spawn")
    writer = ctx.Process(target=_writer_proc, args=(str(store_dir), 120))
    compactor = ctx.Process(target=_compactor_proc, args=(str(store_dir), time.time() + 60))
    writer.start()
    compactor.start()
    st = hw.open_store(store_dir)
    reads = 0
    try:
        while writer.is_alive() or reads < 5:
            n, s, mx = st.sql("SELECT count(*), coalesce(sum(value), 0), coalesce(max(step), -1) FROM scalars").fetchone()
            # Segments are whole batches of 50 contiguous steps: any partial or doubled file breaks this.
            assert n % 50 == 0 and n == mx + 1 and s == n * (n - 1) / 2, (n, s, mx)
            reads += 1
    finally:
        writer.join(60)
        compactor.terminate()
        compactor.join(10)
    assert writer.exitcode == 0
    assert st.sql("SELECT count(*) FROM scalars").fetchone() == (6000,)
    assert reads > 5


def test_compaction_rollups_and_heatmap(store_dir):
    w = StoreWriter(store_dir, "big")
    _meta(w, 1, 0)
    steps = np.arange(0, 5000)
    layers = 4
    for metric in ("maxvio", "resid_rms"):
        s = np.repeat(steps, layers)
        lay = np.tile(np.arange(layers), steps.size)
        w.write("layer_stats", {"attempt": [1] * s.size, "step": s, "tokens": s * 10, "layer": lay,
                                "layer_type": ["moe"] * s.size, "metric": [metric] * s.size,
                                "value": (lay + 1) * 1.0 + (s == 2345) * 100.0})
    st = hw.open_store(store_dir)
    raw = query.heatmap(st, "big", "maxvio", max_buckets=50, agg="max")
    raw_mean = query.heatmap(st, "big", "resid_rms", max_buckets=10, agg="mean")
    compact_store(store_dir)
    assert st.sql("SELECT count(*) FROM layer_stats_rollup").fetchone()[0] > 0
    rolled = query.heatmap(st, "big", "maxvio", max_buckets=50, agg="max")
    assert rolled.height == raw.height == 4 * 50
    assert rolled["value"].to_list() == raw["value"].to_list()
    # The spike at step 2345 survives bucketing as the bucket max.
    assert rolled["value"].max() == pytest.approx(104.0)
    mean = query.heatmap(st, "big", "resid_rms", max_buckets=10, agg="mean")
    np.testing.assert_allclose(mean["value"].to_numpy(), raw_mean["value"].to_numpy())
    # Each layer's mean is layer+1 except the bucket holding the spike (+100 over 500 steps).
    assert mean.filter(mean["step"] == 2000)["value"].round(6).to_list() == [1.2, 2.2, 3.2, 4.2]


def test_downsampling_keeps_single_step_spike(store_dir):
    w = StoreWriter(store_dir, "long")
    _meta(w, 1, 0)
    n = 1_000_000
    steps = np.arange(n)
    values = np.sin(steps / 5000.0)
    values[777_777] = 50.0
    values[123_456] = -50.0
    w.write("scalars", {"attempt": np.ones(n, dtype=np.int32), "step": steps, "tokens": steps * 4096,
                        "name": ["loss/train"] * n, "value": values, "wall_time": np.zeros(n)})
    st = hw.open_store(store_dir)
    df = query.series(st, "long", "loss/train", max_points=2000)
    assert df.height <= 2000
    assert 777_777 in df["step"].to_list() and 123_456 in df["step"].to_list()
    assert df["value"].max() == 50.0 and df["value"].min() == -50.0


def test_series_from_rollups_keeps_every_extreme(store_dir):
    """After compaction a whole long series reads the 100-step rollups (+ raw rows after them):
    the spike, the dip and a NaN survive, each at its own step (rollups keep where extremes are), and a rollback after
    the compaction makes the superseded steps come from the raw effective rows again."""
    w = StoreWriter(store_dir, "long")
    _meta(w, 1, 0)
    n = 200_000
    steps = np.arange(n)
    values = np.sin(steps / 5000.0)
    values[150_001], values[12_345], values[99_999] = 50.0, -50.0, np.nan
    w.write("scalars", {"attempt": np.ones(n, dtype=np.int32), "step": steps, "tokens": steps * 4096,
                        "name": ["loss/train"] * n, "value": values, "wall_time": np.zeros(n)})
    compact_store(store_dir)
    tail = np.arange(n, n + 150)  # logged after the compaction: read raw
    w.write("scalars", {"attempt": np.ones(tail.size, dtype=np.int32), "step": tail, "tokens": tail * 4096,
                        "name": ["loss/train"] * tail.size, "value": np.where(tail == n + 77, 60.0, 0.0),
                        "wall_time": np.zeros(tail.size)})
    st = hw.open_store(store_dir)
    raw = query.series(st, "long", "loss/train", max_points=2000, use_rollups=False)
    fast = query.series(st, "long", "loss/train", max_points=2000)
    assert fast.height <= 2000 and fast["attempt"].null_count() > 0  # the rollup path was taken
    for df in (raw, fast):
        v = df["value"]
        assert v.is_nan().sum() >= 1 and v.filter(~v.is_nan()).max() == 60.0 and v.min() == -50.0
    steps_of = {val: fast.filter(fast["value"] == val)["step"].to_list() for val in (50.0, -50.0, 60.0)}
    assert 150_001 in steps_of[50.0] and 12_345 in steps_of[-50.0] and n + 77 in steps_of[60.0]
    assert 99_999 in fast.filter(fast["value"].is_nan())["step"].to_list()
    # A rollback to step 100,000 after the compaction: the rollups stop there; the new attempt's
    # rows (a dip of -70 at 120,000) replace the superseded ones, which no longer show.
    w2 = StoreWriter(store_dir, "long", attempt=2)
    _meta(w2, 2, 100_000)
    redo = np.arange(100_000, 130_000)
    w2.write("scalars", {"attempt": np.full(redo.size, 2, dtype=np.int32), "step": redo, "tokens": redo * 4096,
                         "name": ["loss/train"] * redo.size, "value": np.where(redo == 120_000, -70.0, 0.5),
                         "wall_time": np.zeros(redo.size)})
    st.refresh()
    # attempt 1's rollups serve its rows up to the rollback; attempt 2's writer rolled up its own
    # complete buckets as it wrote (its last step 129,999 closes the bucket ending there)
    assert query.plan(st, "long", "scalars", query.timeline(st, "long")).limits == ((1, 100_000), (2, 130_000))
    fast = query.series(st, "long", "loss/train", max_points=2000)
    raw = query.series(st, "long", "loss/train", max_points=2000, use_rollups=False)
    for df in (raw, fast):
        assert df["value"].min() == -70.0 and 50.0 not in df["value"].to_list()
        assert 120_000 in df.filter(df["value"] == -70.0)["step"].to_list()
    st.close()


def test_bad_run_names_refused(store_dir):
    for bad in ["a/b", "..", "x/../y", "a\x00b", "", "x" * 300, "../etc", "ümlaut\udcff"]:
        with pytest.raises(ValueError, match="invalid run name"):
            validate_run_name(bad)
        with pytest.raises(ValueError, match="invalid run name"):
            hw.Monitor(store=store_dir, run=bad)


def test_newer_schema_is_refused(store_dir):
    store_dir.mkdir()
    (store_dir / "healthwatch.json").write_text(json.dumps({"schema_version": "9.0"}))
    with pytest.raises(NewerSchemaError, match="schema 9.0"):
        hw.open_store(store_dir)


def test_unwritable_store_counts_drops_and_training_continues(tmp_path, caplog):
    import torch
    from tests_core_helpers import tiny_model  # type: ignore[import-not-found]

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    store = blocker / "store"  # cannot be created: its parent is a file (works as root too)
    model = tiny_model()
    with caplog.at_level("WARNING", logger="healthwatch.monitor"):
        mon = hw.Monitor(store=store, run="ro", flush_every_steps=2)
        mon.watch(model)
        for i in range(10):
            out = model(torch.randint(0, 32, (1, 8))).sum()
            out.backward()
            mon.after_backward()
            mon.step(i, loss=out)
        mon.close()
    assert mon.dropped_rows > 0
    warnings = [r for r in caplog.records if "healthwatch" in r.getMessage()]
    assert len(warnings) == 1
