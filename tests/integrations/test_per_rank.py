"""``Monitor(per_rank=True)``: each rank also writes its own, unreduced stats as run ``<run>.rank<k>``.

Two gloo ranks route different tokens (``dist_worker.py``); the global run still holds the summed
statistics, and each ``dist.rank<k>`` run holds exactly what that rank saw on its own.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from launch import run_torchrun

import healthwatch as hw

HERE = Path(__file__).parent
STEPS = 4


def _maxvio(c: np.ndarray) -> float:
    mean = c.sum() / c.size
    return float((c.max() - mean) / mean)


@pytest.mark.slow
def test_per_rank_runs_hold_each_ranks_own_stats(tmp_path: Path) -> None:
    store_dir, out = tmp_path / "store", tmp_path / "out"
    run_torchrun(HERE / "dist_worker.py", [str(store_dir), str(out), str(STEPS)], env={"HW_PER_RANK": "1"})
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    store = hw.open_store(store_dir)

    def layer_stats(run: str) -> dict[tuple[str, int, int], float]:
        rows = store.sql("SELECT metric, step, layer, value FROM layer_stats WHERE run = ?", [run]).fetchall()
        return {(m, s, layer): v for m, s, layer, v in rows}

    glob = layer_stats("dist")
    for r, seen in enumerate(ranks):
        run = f"dist.rank{r}"
        own = layer_stats(run)
        load = {(s, layer): list(c) for s, layer, c in
                store.sql("SELECT step, layer, counts FROM expert_load WHERE run = ?", [run]).fetchall()}
        loss = dict(store.sql("SELECT step, value FROM scalars WHERE run = ? AND name = 'loss/train'", [run]).fetchall())
        cumulative: dict[str, np.ndarray] = {}
        for step in range(STEPS):
            s = str(step)
            for layer in ("1", "3"):
                counts = np.asarray(seen["counts"][s][layer], dtype=float)
                summed = sum(np.asarray(rk["counts"][s][layer], dtype=float) for rk in ranks)
                assert own[("maxvio", step, int(layer))] == pytest.approx(_maxvio(counts), rel=1e-9)
                assert glob[("maxvio", step, int(layer))] == pytest.approx(_maxvio(summed), rel=1e-9)
                assert load[(step, int(layer))] == counts.astype(int).tolist()
                cumulative[layer] = cumulative.get(layer, 0) + counts
                assert own[("dead_experts", step, int(layer))] == float((cumulative[layer] == 0).sum())
            for k in range(4):
                assert own[("resid_rms", step, k)] == pytest.approx(seen["resid_mean"][s][k], rel=1e-5)
                assert own[("resid_rms_max", step, k)] == pytest.approx(seen["resid_max"][s][k], rel=1e-5)
            assert loss[step] == pytest.approx(seen["loss"][s], rel=1e-6)
        # Rank 0 never routes to experts 6 and 7: dead on its own, while expert 6 is alive globally.
        if r == 0:
            assert own[("dead_experts", STEPS - 1, 1)] == 2.0 and glob[("dead_experts", STEPS - 1, 1)] == 1.0
        parent, config = store.sql("SELECT parent, config FROM runs WHERE run = ?", [run]).fetchone()
        assert parent is None
        assert json.loads(config)["per_rank"] == {"run": "dist", "rank": r, "world": 2}
        # Each rank's run is written by that rank's own writer (``a<attempt>r<rank>x…`` segment names).
        files = [p.name for p in store_dir.rglob("*.parquet") if f"run={run}" in str(p)]
        assert files and all(f"r{r:05d}x" in name for name in files), files
    # Events and the global run stay rank 0's alone.
    files = [p.name for p in store_dir.rglob("*.parquet") if "run=dist/" in p.as_posix()]
    assert files and all("r00000x" in name for name in files), files
    store.close()
