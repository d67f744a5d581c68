"""megatron-core: a tiny GPTModel with MoE and MTP trained on CPU/gloo through megatron's own DDP,
schedule and optimizer, at world size 1 and 2 (expert parallel 2).

Everything healthwatch stores is checked against megatron's own numbers: its per-expert token
counter (``local_tokens_per_expert``) summed over ranks, its global grad norm, its MTP loss
tracker, and per-layer ``main_grad`` norms that add expert shards held by different ranks.
The megatron processes run under torchrun, so its global state and the test-only CUDA shims
(``megatron_shims.py``) never touch the pytest process.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("megatron.core", reason="megatron-core not installed (pip install 'healthwatch[megatron]')")

from launch import run_torchrun  # noqa: E402

import healthwatch as hw  # noqa: E402

HERE = Path(__file__).parent
STEPS, TOP_K, TOKENS_PER_RANK = 3, 2, 2 * 2 * 16  # microbatches × micro-batch size × sequence


def _maxvio(c: np.ndarray) -> float:
    mean = c.sum() / c.size
    return float((c.max() - mean) / mean)


def _check_run(tmp_path: Path, ep: int, world: int) -> None:
    store_dir, out = tmp_path / "store", tmp_path / "out"
    run_torchrun(HERE / "megatron_worker.py", [str(store_dir), str(out), str(ep), str(STEPS)], nproc=world,
                 timeout=420)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    r0 = ranks[0]
    # Detection through megatron's DDP wrapper: global indices, types, MTP after the decoder.
    assert [tuple(x) for x in r0["layers"]] == [
        (0, "attention", "decoder.layers.0"), (1, "moe", "decoder.layers.1"), (2, "moe", "decoder.layers.2"),
        (3, "mtp", "mtp.layers.0"), (4, "mtp", "mtp.layers.1")]
    assert [tuple(x) for x in r0["routers"]] == [
        (1, "decoder.layers.1.mlp.router"), (2, "decoder.layers.2.mlp.router"),
        (3, "mtp.layers.0.mlp.router"), (4, "mtp.layers.1.mlp.router")]
    assert r0["special"] == ["embedding", "mtp", "output"]

    run = f"megatron-ep{ep}"
    store = hw.open_store(store_dir)
    ls = store.sql("SELECT step, layer, layer_type, metric, value FROM layer_stats WHERE run = ?", [run]).pl()
    got = {(r["metric"], r["step"], r["layer"]): r["value"] for r in ls.iter_rows(named=True)}
    load = store.sql("SELECT step, layer, counts FROM expert_load WHERE run = ?", [run]).pl()
    got_load = {(r["step"], r["layer"]): list(r["counts"]) for r in load.iter_rows(named=True)}
    sc = store.sql("SELECT step, name, value FROM scalars WHERE run = ?", [run]).pl()
    scal = {(r["name"], r["step"]): r["value"] for r in sc.iter_rows(named=True)}
    for step in range(STEPS):
        s = str(step)
        for layer in (1, 2, 3, 4):
            # megatron's own counter, summed over the data/expert-parallel ranks.
            summed = sum(np.asarray(rk["counts"][s][str(layer)]) for rk in ranks)
            assert summed.sum() == world * TOKENS_PER_RANK * TOP_K
            assert got_load[(step, layer)] == summed.astype(int).tolist()
            assert got[("maxvio", step, layer)] == pytest.approx(_maxvio(summed), rel=1e-9)
        for pos in range(5):
            rep = r0["wgrad"][s][pos][0]  # replicated params: identical on every rank after DDP
            for rk in ranks[1:]:
                assert rk["wgrad"][s][pos][0] == pytest.approx(rep, rel=1e-6)
            experts = sum(rk["wgrad"][s][pos][1] for rk in ranks)  # expert shards live on different ranks
            assert got[("wgrad_norm", step, pos)] == pytest.approx((rep + experts) ** 0.5, rel=1e-5), (step, pos)
            assert got[("resid_rms", step, pos)] > 0
        # megatron's global grad norm (its optimizer's, across expert-parallel ranks) = ours.
        assert scal[("grad_norm/total", step)] == pytest.approx(r0["grad_norm"][s], rel=1e-5)
        assert scal[("loss/train", step)] == pytest.approx(np.mean([rk["loss"][s] for rk in ranks]), rel=1e-6)
        for head in (1, 2):
            tracker = np.mean([rk["mtp_tracker"][s][head - 1] for rk in ranks]) / 2  # 2 microbatches
            assert scal[(f"loss/mtp_{head}", step)] == pytest.approx(tracker, rel=1e-6)
        assert {("grad_norm/output", step), ("grad_norm/embedding", step), ("grad_norm/mtp", step)} <= set(scal)
    types = dict(set(zip(ls["layer"], ls["layer_type"])))
    assert types == {0: "attention", 1: "moe", 2: "moe", 3: "mtp", 4: "mtp"}
    store.close()
    files = [p.name for p in store_dir.rglob("*.parquet")]
    assert files and all("r00000x" in name for name in files)


@pytest.mark.slow
def test_gpt_moe_mtp_world1(tmp_path: Path) -> None:
    _check_run(tmp_path, ep=1, world=1)


@pytest.mark.slow
def test_gpt_moe_mtp_world2_expert_parallel2(tmp_path: Path) -> None:
    _check_run(tmp_path, ep=2, world=2)


def test_adapter_ignores_other_models() -> None:
    import torch

    from healthwatch.hooks.adapters.megatron import MegatronAdapter

    assert not MegatronAdapter().matches(torch.nn.Linear(2, 2))
    assert not MegatronAdapter().matches(torch.nn.ModuleList([torch.nn.Linear(2, 2)]))
