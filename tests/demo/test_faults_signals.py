"""The newer faults move their target signals, and only in their own block (real training, seeded)."""

from __future__ import annotations

from pathlib import Path

import healthwatch as hw
from healthwatch.demo.faults import fault_names, make_fault
from healthwatch.demo.faults_signals import QUANT_LAYER, quant_scale_at
from healthwatch.demo.model import HybridConfig
from healthwatch.demo.trainer import TrainConfig, Trainer

TINY = HybridConfig(d_model=32, pattern="M E * M", num_experts=8, top_k=2, moe_latent_dim=16, moe_ffn=32,
                    shared_expert_ffn=32, headdim=16, n_heads=2, n_kv_heads=1, mtp_heads=1, quant_fraction=1.0)
STEPS, ONSET = 16, 6


def _train(root: Path, fault: str) -> dict[tuple[int, int, str], float]:
    cfg = TrainConfig(run=fault, store=root, precision="nvfp4", model=TINY, total_steps=100, batch_size=2,
                      seq_len=16, checkpoint_every=10**9)
    with hw.Monitor(store=root, run=fault, flush_every_steps=50, monitor_config=hw.MonitorConfig(signals_every=1)) as mon:
        Trainer(cfg, mon, make_fault(fault, ONSET)).train(STEPS)
    st = hw.open_store(root)
    rows = st.sql("SELECT step, layer, metric, value FROM layer_stats WHERE run = ?", [fault]).fetchall()
    st.close()
    return {(s, layer, m): v for s, layer, m, v in rows}


def test_registered():
    assert {"quant_scale_shrink", "alog_drift"} <= set(fault_names())
    assert quant_scale_at(0) == 0.5 and quant_scale_at(10) == 0.25 and quant_scale_at(10**6) == 2.0**-8


def test_quant_scale_shrink_saturates_one_block(tmp_path):
    got = _train(tmp_path, "quant_scale_shrink")
    before = [got[(s, QUANT_LAYER, "fp4_saturation")] for s in range(ONSET)]
    after = [got[(s, QUANT_LAYER, "fp4_saturation")] for s in range(ONSET + 2, STEPS)]
    # Halving the tensor scale clips the largest block(s) of every operand: well above the healthy level.
    assert min(after) > 1.5 * max(before)
    mse_before = max(got[(s, QUANT_LAYER, "fp4_rel_mse")] for s in range(ONSET))
    assert min(got[(s, QUANT_LAYER, "fp4_rel_mse")] for s in range(ONSET + 2, STEPS)) > mse_before
    # The other quantised blocks are untouched by the fault (their saturation stays at its level).
    other = [got[(s, 2, "fp4_saturation")] for s in range(STEPS)]
    assert max(other) < min(after)


def test_alog_drift_drops_the_decay_of_one_mamba_block(tmp_path):
    got = _train(tmp_path, "alog_drift")
    first = [got[(s, 0, "ssm_decay_min")] for s in range(STEPS)]
    # exp(A_log) shrinks by exp(-0.05) per step from the onset: 10 steps -> x0.61 (optimizer noise aside).
    assert first[STEPS - 1] < 0.7 * first[ONSET - 1]
    second = [got[(s, 3, "ssm_decay_min")] for s in range(STEPS)]
    assert second[STEPS - 1] > 0.9 * second[ONSET - 1]


def test_quant_scale_shrink_degrades_the_blocks_output():
    """The loss mechanism without training noise: on the same weights and input, block 0's residual
    branch with the scale at the fault's floor is much further from the unquantised branch than
    with the recipe's scale (the clipped largest values carry the most signal)."""
    import torch

    from healthwatch.demo.data import SyntheticTokens
    from healthwatch.demo.faults_signals import QUANT_FLOOR
    from healthwatch.demo.model import HybridLM

    torch.manual_seed(0)
    model = HybridLM(TINY)
    ids = SyntheticTokens(TINY.vocab_size, 32, 4, seed=0).batch_at(0)
    block = model.blocks[QUANT_LAYER]

    def branch(scale: float | None) -> torch.Tensor:
        model.set_precision("bf16" if scale is None else "nvfp4")
        for m in block.modules():
            if hasattr(m, "quant_scale"):
                m.quant_scale = 1.0 if scale is None else scale
        with torch.no_grad():
            h = model.embedding(ids[:, :32])
            return block(h) - h

    ref = branch(None)
    err = {s: float((branch(s) - ref).norm() / ref.norm()) for s in (1.0, QUANT_FLOOR)}
    assert err[1.0] < 0.5                       # NVFP4 with the recipe's scale: a rounding error
    assert err[QUANT_FLOOR] > 3 * err[1.0], err  # clipped at the floor: the branch is mostly lost
