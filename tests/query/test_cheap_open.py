"""A cheap open: opening a store and reading one series touches only that run's folder of that table.

The bounded series read goes through :meth:`Store.scan_run` (pyarrow over the run's own segments,
no DuckDB connection); its answer must equal the SQL path's and a reference computed from the rows
written, and anything it cannot read exactly (a foreign file in the run's folder) sends it to the
SQL path, which skips the file with its warning.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from _flushes import write_flush

from healthwatch import query
from healthwatch.store import Store, StoreWriter, attempt_row, run_row
from healthwatch.store import reader as reader_mod

LAYERS = 4


def _write_attempt(root: Path, run: str, attempt: int, start: int, end: int, seed: int, merge: bool) -> list[tuple]:
    """Write steps [start, end) of ``attempt`` in 100-step flushes; returns (attempt, step, tokens, layer, value)."""
    rng = np.random.default_rng(seed)
    w = StoreWriter(root, run, attempt=attempt, merge_fanout=3)
    if attempt == 1:
        w.write("runs", run_row(precision="bf16", created=1.0))
    w.write("attempts", attempt_row(attempt=attempt, start_step=start, started_at=float(attempt)))
    rows = []
    for a in range(start, end, 100):
        steps = list(range(a, min(end, a + 100)))
        vals = np.round(rng.normal(size=(len(steps), LAYERS)), 4)
        write_flush(w, attempt, steps, vals)
        rows += [(attempt, s, 7 * s, lay, float(vals[i, lay])) for i, s in enumerate(steps) for lay in range(LAYERS)]
        if merge:
            w.compact_own("layer_stats")
    w.close()
    return rows


@pytest.fixture
def store_root(tmp_path: Path) -> tuple[Path, list[tuple]]:
    root = tmp_path / "s"
    rows = _write_attempt(root, "r", 1, 0, 3000, seed=1, merge=True)
    rows += _write_attempt(root, "r", 2, 1800, 2600, seed=2, merge=False)  # a rollback to step 1800
    _write_attempt(root, "other", 1, 0, 500, seed=3, merge=False)
    return root, rows


def _poison(root: Path, table: str, run: str) -> Path:
    """A file in ``run``'s folder of ``table`` that is not a segment (garbage bytes named .parquet)."""
    bad = root / f"table={table}" / f"run={run}" / "zz-not-a-segment-000000001-L0.parquet"
    bad.parent.mkdir(parents=True, exist_ok=True)
    bad.write_bytes(b"this is not parquet")
    return bad


def test_bounded_series_reads_no_sql_and_nothing_of_other_runs_or_tables(store_root: tuple[Path, list[tuple]]) -> None:
    root, rows = store_root
    # Unreadable files where the cheap path must not look: another run, other tables.
    _poison(root, "layer_stats", "other")
    _poison(root, "scalars", "r")
    _poison(root, "expert_load", "r")
    store = Store(root)
    df = query.series(store, "r", "resid_rms", layer=2, step_min=1500, step_max=2199, max_points=2000)
    assert store._con is None  # no DuckDB connection: answered by the per-run scan
    assert store.bad_files == set()  # and it never opened the unrelated files
    want = sorted((s, v) for a, s, _t, lay, v in rows if lay == 2 and 1500 <= s <= 2199 and (a == 2 or s < 1800))
    assert list(zip(df["step"].to_list(), df["value"].to_list())) == want
    assert dict(df.schema) == {"step": pl.Int64, "tokens": pl.Int64, "value": pl.Float64, "attempt": pl.Int32,
                               "superseded": pl.Boolean}


def test_scan_equals_sql_path_including_ghosts_and_older_paths(store_root: tuple[Path, list[tuple]]) -> None:
    root, _rows = store_root
    store = Store(root)
    for attempt in (None, 1, 2):
        for ghosts in (False, True):
            kw = dict(layer=1, step_min=1000, step_max=2999, max_points=5000, attempt=attempt,
                      include_superseded=ghosts)
            fast = query.series(store, "r", "resid_rms", **kw)
            # The same rows through SQL, with the rule's SQL form (superseded_expr).
            params: list = ["r", "resid_rms", 1, 1000, 2999]
            path = query.timeline(store, "r", attempt)
            sup = path.superseded_expr(sp := [])
            ref = store.sql(f"SELECT step, tokens, value, attempt, {sup} AS superseded FROM layer_stats WHERE run = ? "
                            "AND metric = ? AND layer = ? AND step BETWEEN ? AND ?", sp + params).pl()
            if not ghosts:
                ref = ref.filter(~ref["superseded"])
            assert fast.sort("superseded", "step", "attempt").rows() == ref.sort("superseded", "step", "attempt").rows()
            assert fast.schema == ref.select(fast.columns).schema


def test_a_foreign_file_in_the_runs_folder_sends_the_read_to_sql(store_root: tuple[Path, list[tuple]],
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    root, rows = store_root
    bad = _poison(root, "layer_stats", "r")
    # A readable Parquet file with the wrong columns is refused too.
    pq.write_table(pa.table({"step": [1600], "value": [1e9]}), bad.with_name("zz-foreign-000000002-L0.parquet"))
    store = Store(root)
    assert store.scan_run("layer_stats", "r", ["step"], {"step": (0, 10)}) is None
    df = query.series(store, "r", "resid_rms", layer=0, step_min=1500, step_max=1700, max_points=2000)
    want = sorted((s, v) for a, s, _t, lay, v in rows if lay == 0 and 1500 <= s <= 1700 and (a == 2 or s < 1800))
    assert list(zip(df["step"].to_list(), df["value"].to_list())) == want
    assert str(bad) in store.bad_files


def test_more_rows_than_points_is_downsampled_by_sql(store_root: tuple[Path, list[tuple]]) -> None:
    root, rows = store_root
    store = Store(root)
    df = query.series(store, "r", "loss/train", step_min=0, step_max=2999, max_points=50)
    eff = [v for a, s, _t, lay, v in rows if lay == 0 and (a == 2 or s < 1800)]
    assert df.height <= 50
    assert (df["value"].min(), df["value"].max()) == (min(eff), max(eff))


def test_scan_run_rejects_unknown_names(store_root: tuple[Path, list[tuple]]) -> None:
    store = Store(store_root[0])
    with pytest.raises(ValueError, match="unknown table"):
        store.scan_run("nope", "r", ["step"])
    with pytest.raises(ValueError, match="no column"):
        store.scan_run("scalars", "r", ["stepp"])


def test_sql_readers_of_one_run_list_only_that_runs_folders(store_root: tuple[Path, list[tuple]]) -> None:
    """Whole-run readers (SQL over rollups and raw rows) list and check only the run's own folders;
    the first store-wide query widens the views to every run (and then meets the other run's file)."""
    root, rows = store_root
    bad = [_poison(root, "layer_stats", "other"), _poison(root, "scalars", "other"),
           _poison(root, "attempts", "other")]
    store = Store(root)
    hm = query.heatmap(store, "r", "resid_rms", max_buckets=6, agg="max")
    ser = query.series(store, "r", "loss/train", max_points=10**6)
    ov = query.run_overview(store, "r")
    assert store.bad_files == set()  # nothing of run 'other' was listed or opened
    eff = [(a, s, lay, v) for a, s, _t, lay, v in rows if a == 2 or s < 1800]
    assert ov["last_step"] == 2999 and ov["attempts"] == 2
    assert sorted(zip(ser["step"].to_list(), ser["value"].to_list())) == sorted((s, v) for _a, s, lay, v in eff if lay == 0)
    width = query.display_width(0, 2999, 6)
    want: dict = {}
    for _a, s, lay, v in eff:
        k = (lay, s // width * width)
        want[k] = max(want.get(k, v), v)
    assert {(r["layer"], r["step"]): r["value"] for r in hm.iter_rows(named=True)} == want
    # A store-wide query lists every run: now the other run's unreadable files are found (and skipped).
    names = [r["run"] for r in query.runs_overview(store).iter_rows(named=True)]
    assert sorted(names) == ["other", "r"]
    assert {str(bad[1]), str(bad[2])} <= store.bad_files
    # and the per-run readers still answer the same over the widened views
    assert query.heatmap(store, "r", "resid_rms", max_buckets=6, agg="max").equals(hm)


def test_run_overview_from_footers_equals_sql(store_root: tuple[Path, list[tuple]]) -> None:
    """The run header's first/last step, tokens and last write come from footer statistics; they equal
    the rows written, and a folder with a foreign file falls back to SQL (which skips the file)."""
    root, rows = store_root
    store = Store(root)
    ov = query.run_overview(store, "r")
    steps = [s for _a, s, _t, lay, _v in rows if lay == 0]
    assert (ov["first_step"], ov["last_step"], ov["last_tokens"]) == (min(steps), max(steps), 7 * max(steps))
    assert ov["last_write"] == 0.0 and ov["several_steps"] is True
    assert store.run_extremes("scalars", "r", ["step"]) == {"step": (min(steps), max(steps))}
    assert store.run_extremes("scalars", "nobody", ["step"]) == {"step": (None, None)}
    _poison(root, "scalars", "r")
    store2 = Store(root)
    assert store2.run_extremes("scalars", "r", ["step"]) is None
    ov2 = query.run_overview(store2, "r")
    assert (ov2["first_step"], ov2["last_step"], ov2["last_tokens"]) == (ov["first_step"], ov["last_step"],
                                                                        ov["last_tokens"])


def test_profile_at_a_step_far_after_the_last_logged_one(tmp_path: Path) -> None:
    """The nearest logged step is searched in a window below the asked step first; a gap wider than the
    window still finds the step before it (the whole history is read then)."""
    root = tmp_path / "s"
    w = StoreWriter(root, "g", attempt=1)
    w.write("runs", run_row(precision="bf16"))
    w.write("attempts", attempt_row(attempt=1, start_step=0))
    steps = [5, 6, 50_000]
    w.write("layer_stats", {"attempt": [1] * 6, "step": [s for s in steps for _ in range(2)],
                            "tokens": [s for s in steps for _ in range(2)], "layer": [0, 1] * 3,
                            "layer_type": ["moe"] * 6, "metric": ["m"] * 6, "value": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]})
    w.close()
    prof = query.layer_profiles(Store(root), "g", "m", (30_000, 50_000, 4))
    got = {(r["asked"], r["layer"]): (r["step"], r["value"]) for r in prof.iter_rows(named=True)}
    assert got == {(30_000, 0): (6, 3.0), (30_000, 1): (6, 4.0), (50_000, 0): (50_000, 5.0), (50_000, 1): (50_000, 6.0)}


def test_one_open_store_keeps_footers_and_sees_appends_merges_and_rewrites(tmp_path: Path) -> None:
    """Footers are cached per open Store (bounded reads re-read none of them), yet every read equals
    the rows written while a live writer appends, self-merges (retiring files) and a file changes."""
    root = tmp_path / "s"
    rows = _write_attempt(root, "r", 1, 0, 1000, seed=5, merge=True)
    store = Store(root)

    def want(layer: int, lo: int, hi: int) -> list[tuple[int, float]]:
        return sorted((s, v) for _a, s, _t, lay, v in rows if lay == layer and lo <= s <= hi)

    def got(layer: int, lo: int, hi: int) -> list[tuple[int, float]]:
        df = query.series(store, "r", "resid_rms", layer=layer, step_min=lo, step_max=hi, max_points=5000)
        return list(zip(df["step"].to_list(), df["value"].to_list()))

    assert got(1, 0, 999) == want(1, 0, 999)
    cached = dict(store._footers)
    assert {str(p) for p in store.files("layer_stats", "r")} <= set(cached)
    reads: list[str] = []
    real = reader_mod._read_footer

    def counting(path: str) -> object:
        reads.append(str(path))
        return real(path)

    reader_mod._read_footer = counting  # type: ignore[assignment]
    try:
        assert got(3, 250, 749) == want(3, 250, 749)
        assert [r for r in reads if "layer_stats" in r] == []  # every footer of the table was known
        # The live writer appends 1,000 steps with self-merges: retired files leave the listing,
        # merged ones are read once each.
        w = StoreWriter(root, "r", attempt=1, merge_fanout=3)
        rng = np.random.default_rng(6)
        for a in range(1000, 2000, 100):
            steps = list(range(a, a + 100))
            vals = np.round(rng.normal(size=(100, LAYERS)), 4)
            w.write("layer_stats", {
                "attempt": [1] * (100 * LAYERS), "step": [s for s in steps for _ in range(LAYERS)],
                "tokens": [7 * s for s in steps for _ in range(LAYERS)],
                "layer": [lay for _ in steps for lay in range(LAYERS)], "layer_type": ["moe"] * (100 * LAYERS),
                "metric": ["resid_rms"] * (100 * LAYERS), "value": vals.reshape(-1).tolist()})
            rows.extend((1, s, 7 * s, lay, float(vals[i, lay])) for i, s in enumerate(steps) for lay in range(LAYERS))
            w.compact_own("layer_stats")
            assert got(0, a - 150, a + 99) == want(0, a - 150, a + 99)
        w.close()
        live = {str(p) for p in store.files("layer_stats", "r")}
        assert got(2, 0, 1999) == want(2, 0, 1999)
        ls_reads = [r for r in reads if "layer_stats" in r]
        assert ls_reads and len(ls_reads) == len(set(ls_reads))  # new files read once each, none again
        # A file replaced under the same name (a different size and mtime) is read again, not trusted.
        victim = sorted(live)[-1]
        t = pq.read_table(victim)
        keep = t.filter(pc.not_equal(t["layer"], 2))
        pq.write_table(keep, victim)
        gone = {(int(s), int(lay)) for s, lay in zip(t["step"].to_pylist(), t["layer"].to_pylist()) if lay == 2}
        n = len(reads)
        assert got(2, 0, 1999) == [(s, v) for s, v in want(2, 0, 1999) if (s, 2) not in gone]
        assert reads[n:].count(victim) == 1
    finally:
        reader_mod._read_footer = real  # type: ignore[assignment]


def test_raw_read_of_other_attempts_is_skipped_only_when_no_file_holds_one(tmp_path: Path) -> None:
    """A whole series over rollups leaves out the raw "rows of other attempts" part only while no
    segment holds such rows; a live rollback's first rows (no rollups yet) are read again at once."""
    from healthwatch.query.rollups import plan

    root = tmp_path / "s"
    rows = _write_attempt(root, "r", 1, 0, 3000, seed=7, merge=True)
    store = Store(root)
    path = query.timeline(store, "r")
    p = plan(store, "r", "layer_stats", path, 100, " AND metric = ? AND layer = ?", ["resid_rms", 1])
    assert p.used and p.others is False and store.attempts_present("layer_stats", "r") == {1}
    df = query.series(store, "r", "resid_rms", layer=1, max_points=200)
    vals = [v for _a, _s, _t, lay, v in rows if lay == 1]
    assert (df["value"].min(), df["value"].max()) == (min(vals), max(vals))
    # A rollback: attempt 2 from step 2500, 50 steps written by a live writer (no rollup yet), one spike.
    w = StoreWriter(root, "r", attempt=2)
    w.write("attempts", attempt_row(attempt=2, start_step=2500, started_at=2.0))
    steps = list(range(2500, 2550))
    w.write("layer_stats", {
        "attempt": [2] * (50 * LAYERS), "step": [s for s in steps for _ in range(LAYERS)],
        "tokens": [7 * s for s in steps for _ in range(LAYERS)],
        "layer": [lay for _ in steps for lay in range(LAYERS)], "layer_type": ["moe"] * (50 * LAYERS),
        "metric": ["resid_rms"] * (50 * LAYERS),
        "value": [1000.0 if (s, lay) == (2520, 1) else 0.5 for s in steps for lay in range(LAYERS)]})
    try:
        path = query.timeline(store, "r")
        p = plan(store, "r", "layer_stats", path, 100, " AND metric = ? AND layer = ?", ["resid_rms", 1])
        assert p.others is True and store.attempts_present("layer_stats", "r") == {1, 2}
        df = query.series(store, "r", "resid_rms", layer=1, max_points=200)
        eff = [v for _a, s, _t, lay, v in rows if lay == 1 and s < 2500] + [1000.0, 0.5]
        assert (df["value"].min(), df["value"].max()) == (min(eff), max(eff))
        assert df.filter(pl.col("value") == 1000.0)["step"].to_list() == [2520]
    finally:
        w.close()
