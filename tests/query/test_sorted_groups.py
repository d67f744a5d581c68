"""Sealed segments declare their row order; a one-series read bisects their row groups.

``merge.write_parquet`` writes ``healthwatch.sorted_by`` (the series keys) into a sealed segment's
footer; ``_Footer.candidates`` then bisects the groups' statistics instead of looking at every
group. Checked against the rows read back from each group (not the statistics the code under test
reads): every group holding a matching row is a candidate, on random tables with long series cut
into several groups and tiny series sharing a group; a file without the declaration (the old
layout, unsealed segments) is searched whole; and the bisection makes few statistics plain.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from healthwatch.store import Store, StoreWriter, attempt_row, run_row
from healthwatch.store import merge as merge_mod
from healthwatch.store.reader import _Footer
from healthwatch.store.segments import list_segments, table_dir

METRICS = ("act_max", "resid_rms", "wgrad_norm", "zz_tiny")


def _table(lengths: dict[tuple[str, int], int]) -> pa.Table:
    """A sealed ``layer_stats`` table in SORT_KEYS order: per (metric, layer), steps 0..n-1."""
    cols: dict[str, list] = {k: [] for k in ("attempt", "step", "tokens", "layer", "layer_type", "metric", "value")}
    for (m, lay), n in sorted(lengths.items()):
        for s in range(n):
            for k, x in zip(cols, (1, s, 7 * s, lay, "moe", m, float(hash((m, lay, s)) % 997))):
                cols[k].append(x)
    schema = merge_mod.memory_schema("layer_stats")
    return pa.table({f.name: pa.array(cols[f.name]).cast(f.type) if not pa.types.is_dictionary(f.type)
                     else pa.array(cols[f.name]).dictionary_encode().cast(f.type) for f in schema
                     if f.name in cols})


def _groups_holding(path: Path, metric: str, layer: int, lo: int, hi: int) -> set[int]:
    """Row groups with a row of (metric, layer) in steps [lo, hi], from the rows read back."""
    pf = pq.ParquetFile(path)
    out = set()
    for g in range(pf.metadata.num_row_groups):
        t = pf.read_row_group(g, columns=["metric", "layer", "step"])
        m = np.array(t.column("metric").to_pylist(), dtype=object)
        lay, s = np.array(t.column("layer").to_pylist()), np.array(t.column("step").to_pylist())
        if ((m == metric) & (lay == layer) & (s >= lo) & (s <= hi)).any():
            out.add(g)
    return out


@pytest.fixture
def small_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    """Row groups of 50 rows, series under 20 rows share one: many groups at test size."""
    monkeypatch.setattr(merge_mod, "ROW_GROUP_ROWS", 50)
    monkeypatch.setattr(merge_mod, "KEY_GROUP_MIN_ROWS", 20)


_LENGTHS = st.dictionaries(st.tuples(st.sampled_from(METRICS), st.integers(0, 5)), st.integers(1, 130),
                           min_size=1, max_size=14)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lengths=_LENGTHS, probes=st.lists(st.tuples(st.sampled_from(METRICS), st.integers(0, 5), st.integers(0, 140),
                                                   st.integers(0, 140)), min_size=1, max_size=8))
def test_candidates_cover_every_group_with_a_match(tmp_path_factory: pytest.TempPathFactory, small_groups: None,
                                                    lengths: dict[tuple[str, int], int],
                                                    probes: list[tuple[str, int, int, int]]) -> None:
    path = tmp_path_factory.mktemp("f") / "sealed.parquet"
    merge_mod.write_parquet(_table(lengths), path, "layer_stats", compress=True)
    fo = _Footer(pq.read_metadata(path))
    assert fo.sorted_by == ("metric", "layer")
    for metric, layer, a, b in probes:
        lo, hi = min(a, b), max(a, b)
        ranges = {"step": (lo, hi), "metric": (metric, metric), "layer": (layer, layer)}
        cand = list(fo.candidates(ranges))
        assert cand == sorted(set(cand))
        picked = {g for g in cand if fo.fit(g, ranges) is not None}
        assert _groups_holding(path, metric, layer, lo, hi) <= picked
        # A metric alone (a heatmap's section): every group of it.
        whole = {g for g in fo.candidates({"metric": (metric, metric)})}
        assert _groups_holding(path, metric, layer, 0, 10**9) <= whole


def test_bisection_looks_at_few_statistics(tmp_path: Path, small_groups: None) -> None:
    """A file of 4 metrics x 6 layers x 3 groups: one series' read makes a few dozen statistics plain."""
    path = tmp_path / "sealed.parquet"
    merge_mod.write_parquet(_table({(m, lay): 140 for m in METRICS for lay in range(6)}), path, "layer_stats",
                            compress=True)
    fo = _Footer(pq.read_metadata(path))
    n = fo.meta.num_row_groups
    assert n == 4 * 6 * 3
    ranges = {"step": (60, 70), "metric": ("resid_rms", "resid_rms"), "layer": (4, 4)}
    got = [g for g in fo.candidates(ranges) if fo.fit(g, ranges) is not None]
    assert got == sorted(_groups_holding(path, "resid_rms", 4, 60, 70)) and len(got) == 1
    plain = sum(1 for col in fo._bounds.values() for b in col if b is not merge_mod_unread())
    assert plain < n // 2, (plain, n)


def merge_mod_unread() -> object:
    """The reader's marker of a statistic not made plain yet."""
    from healthwatch.store import reader

    return reader._UNREAD


def test_undeclared_file_is_searched_whole(tmp_path: Path, small_groups: None) -> None:
    """Unsealed segments and the old layout declare no order: every group stays a candidate."""
    t = _table({("resid_rms", lay): 60 for lay in range(3)})
    merge_mod.write_parquet(t, tmp_path / "unsealed.parquet", "layer_stats", compress=False)
    pq.write_table(t, tmp_path / "old.parquet", row_group_size=25)
    for name in ("unsealed.parquet", "old.parquet"):
        fo = _Footer(pq.read_metadata(tmp_path / name))
        assert fo.sorted_by == ()
        ranges = {"metric": ("resid_rms", "resid_rms"), "layer": (1, 1)}
        assert list(fo.candidates(ranges)) == list(range(fo.meta.num_row_groups))


def test_store_reads_equal_written_rows(tmp_path: Path, small_groups: None) -> None:
    """Through the writer (live merges, sealing) and Store.scan_arrays / scan_run: the rows written."""
    root = tmp_path / "s"
    w = StoreWriter(root, "r", attempt=1, merge_fanout=2, seal_rows=1_500)
    w.write("runs", run_row(precision="bf16", created=1.0))
    w.write("attempts", attempt_row(attempt=1, start_step=0, started_at=1.0))
    rows = []
    rng = np.random.default_rng(3)
    for a in range(0, 800, 40):
        cols: dict[str, list] = {k: [] for k in ("attempt", "step", "tokens", "layer", "layer_type", "metric", "value")}
        for s in range(a, a + 40):
            for m in METRICS:
                if m == "zz_tiny" and s % 25:
                    continue
                for lay in range(3):
                    v = float(np.round(rng.normal(), 3))
                    for k, x in zip(cols, (1, s, 2 * s, lay, "moe", m, v)):
                        cols[k].append(x)
                    rows.append((s, m, lay, v))
        w.write("layer_stats", cols)
        w.compact_own("layer_stats")
    w.close()
    sealed = [p for p in list_segments(table_dir(root, "layer_stats", "r"))
              if _Footer(pq.read_metadata(p)).sorted_by]
    assert sealed, "no sealed segment declares its order: the test checks nothing"
    store = Store(root)
    for m, lay, lo, hi in (("resid_rms", 1, 0, 799), ("zz_tiny", 2, 100, 500), ("act_max", 0, 390, 410),
                           ("wgrad_norm", 2, 799, 799), ("nope", 0, 0, 799)):
        want = sorted((s, v) for s, mm, ll, v in rows if mm == m and ll == lay and lo <= s <= hi)
        ranges = {"step": (lo, hi), "metric": (m, m), "layer": (lay, lay)}
        arrs = store.scan_arrays("layer_stats", "r", ["step", "value"], ranges)
        assert arrs is not None
        assert sorted(zip(arrs["step"].tolist(), arrs["value"].tolist())) == want
        df = store.scan_run("layer_stats", "r", ["step", "value"], ranges)
        assert df is not None and sorted(df.iter_rows()) == want
