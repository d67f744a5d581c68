"""Segment names carry their step range, so a bounded read rules segments out from the listing.

The writer names every segment it publishes or merges ``<writer>-<seq>-s<lo>_<hi>-L<level>``;
names without a range (older stores, compaction's own files, foreign files) still parse and are
read through their footers as before. The range in a name must hold every row of the file, or a
bounded reader would miss rows: checked here against the files' own step columns.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from healthwatch import query
from healthwatch.store import Store, StoreWriter, attempt_row, run_row
from healthwatch.store.segments import list_segments, parse_segment, segment_name, table_dir


def test_parse_old_and_new_names() -> None:
    old = parse_segment(Path("a0001r00000xdeadbeef-000000007-L2.parquet"))
    assert (old.writer, old.seq, old.level, old.steps) == ("a0001r00000xdeadbeef", 7, 2, None)
    new = parse_segment(Path(segment_name("a0001r00000xdeadbeef", 7, 2, (1200, 3499))))
    assert (new.writer, new.seq, new.level, new.steps) == ("a0001r00000xdeadbeef", 7, 2, (1200, 3499))
    assert new.path.name.endswith("-L2.parquet")
    # writer ids with dashes parse as the old rsplit did; foreign names stay foreign
    assert parse_segment(Path("zz-not-a-segment-000000001-L0.parquet")).writer == "zz-not-a-segment"
    assert parse_segment(Path("random.parquet")).writer == ""
    # no range for unknown or negative steps (the grammar has no sign)
    assert segment_name("w", 1, 0, None) == "w-000000001-L0.parquet"
    assert segment_name("w", 1, 0, (-5, 10)) == "w-000000001-L0.parquet"


def _write(root: Path, steps: int, fanout: int = 3) -> dict[tuple[int, int], float]:
    """One run, 2 layers, 100-step flushes with self-merging; returns {(step, layer): value}."""
    rng = np.random.default_rng(0)
    w = StoreWriter(root, "r", merge_fanout=fanout)
    w.write("runs", run_row(precision="bf16", created=1.0))
    w.write("attempts", attempt_row(attempt=1, start_step=0, started_at=1.0))
    want = {}
    for a in range(0, steps, 100):
        ss = list(range(a, a + 100))
        vals = rng.normal(size=(100, 2))
        w.write("layer_stats", {
            "attempt": [1] * 200, "step": [s for s in ss for _ in range(2)], "tokens": [s for s in ss for _ in range(2)],
            "layer": [0, 1] * 100, "layer_type": ["moe"] * 200, "metric": ["resid_rms"] * 200,
            "value": vals.reshape(-1).tolist()})
        want.update({(s, lay): float(vals[i, lay]) for i, s in enumerate(ss) for lay in range(2)})
        w.compact_own("layer_stats")
    w.close()
    return want


def test_writer_names_hold_every_row(tmp_path: Path) -> None:
    root = tmp_path / "s"
    _write(root, 2_000)
    files = list_segments(table_dir(root, "layer_stats", "r"))
    levels = {parse_segment(p).level for p in files}
    assert len(files) > 2 and max(levels) >= 1, files  # merged and unmerged segments both present
    for p in files:
        seg = parse_segment(p)
        col = pq.read_table(p, columns=["step"]).column(0).to_numpy()
        assert seg.steps == (int(col.min()), int(col.max())), p.name


def test_bounded_read_opens_only_overlapping_segments(tmp_path: Path) -> None:
    root = tmp_path / "s"
    want = _write(root, 2_000)
    files = list_segments(table_dir(root, "layer_stats", "r"))
    store = Store(root)
    df = query.series(store, "r", "resid_rms", layer=1, step_min=950, step_max=1_049)
    assert [(int(s), float(v)) for s, v in zip(df["step"], df["value"])] == [
        (s, want[(s, 1)]) for s in range(950, 1_050)]
    opened = {Path(k).name for k in store._footers if "table=layer_stats" in k}
    overlapping = {p.name for p in files if not (parse_segment(p).steps[1] < 950 or parse_segment(p).steps[0] > 1_049)}
    assert opened == overlapping and len(opened) < len(files), (opened, [p.name for p in files])
