"""Multi-process reduction: two gloo ranks route different tokens; the store holds the global stats.

Launches ``torchrun --nproc-per-node 2`` on ``dist_worker.py`` and checks, against what each
rank saw, that MaxVio / dead experts / expert load come from the *summed* counts, residual RMS
is the mean (and its max the max) over ranks, the loss the mean, and that only rank 0 wrote.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from launch import run_torchrun

import healthwatch as hw

HERE = Path(__file__).parent
STEPS = 5


def _maxvio(c: np.ndarray) -> float:
    mean = c.sum() / c.size
    return float((c.max() - mean) / mean)


@pytest.mark.slow
def test_two_ranks_reduce_to_global_stats(tmp_path: Path) -> None:
    store_dir, out = tmp_path / "store", tmp_path / "out"
    run_torchrun(HERE / "dist_worker.py", [str(store_dir), str(out), str(STEPS)])
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["world"] == 2

    store = hw.open_store(store_dir)
    layers = store.sql("SELECT step, layer, metric, value FROM layer_stats WHERE run = 'dist'").pl()
    got = {(r["metric"], r["step"], r["layer"]): r["value"] for r in layers.iter_rows(named=True)}
    load = store.sql("SELECT step, layer, counts FROM expert_load WHERE run = 'dist'").pl()
    got_load = {(r["step"], r["layer"]): list(r["counts"]) for r in load.iter_rows(named=True)}
    cumulative: dict[str, np.ndarray] = {}
    for step in range(STEPS):
        s = str(step)
        for layer in ("1", "3"):
            summed = sum(np.asarray(rk["counts"][s][layer], dtype=float) for rk in ranks)
            own = [np.asarray(rk["counts"][s][layer], dtype=float) for rk in ranks]
            assert not np.array_equal(own[0], own[1])  # the ranks really route differently
            assert got[("maxvio", step, int(layer))] == pytest.approx(_maxvio(summed), rel=1e-9)
            assert got_load[(step, int(layer))] == summed.astype(int).tolist()
            cumulative[layer] = cumulative.get(layer, 0) + summed
            assert got[("dead_experts", step, int(layer))] == float((cumulative[layer] == 0).sum())
        for k in range(4):
            mean = (ranks[0]["resid_mean"][s][k] + ranks[1]["resid_mean"][s][k]) / 2
            assert got[("resid_rms", step, k)] == pytest.approx(mean, rel=1e-5)
            mx = max(ranks[0]["resid_max"][s][k], ranks[1]["resid_max"][s][k])
            assert got[("resid_rms_max", step, k)] == pytest.approx(mx, rel=1e-5)
            # Gradients were averaged as DDP does, so every rank holds the same norm.
            assert got[("wgrad_norm", step, k)] == pytest.approx(ranks[0]["wgrad"][s][k], rel=1e-5)
    # Layer 1: expert 7 is used by no rank; expert 6 only by rank 1 — alive globally.
    assert got[("dead_experts", STEPS - 1, 1)] == 1.0
    assert got[("dead_experts", STEPS - 1, 3)] == 0.0

    scalars = store.sql("SELECT step, tokens, name, value FROM scalars WHERE run = 'dist' AND name = 'loss/train'").pl()
    loss = {r["step"]: (r["tokens"], r["value"]) for r in scalars.iter_rows(named=True)}
    for step in range(STEPS):
        mean = (ranks[0]["loss"][str(step)] + ranks[1]["loss"][str(step)]) / 2
        assert loss[step] == (pytest.approx((step + 1) * 24), pytest.approx(mean, rel=1e-6))
    assert store.sql("SELECT count(*) FROM attempts WHERE run = 'dist'").fetchone()[0] == 1
    store.close()

    # Only rank 0 wrote: every segment belongs to a rank-0 writer (``a<attempt>r<rank>x…``).
    files = [p.name for p in store_dir.rglob("*.parquet")]
    assert files and all("r00000x" in name for name in files), files
