"""Each injected fault moves its target signal in the documented direction (real training, seeded)."""

from __future__ import annotations

from pathlib import Path

import pytest

import healthwatch as hw
from healthwatch.demo.faults import make_fault
from healthwatch.demo.model import HybridConfig
from healthwatch.demo.trainer import TrainConfig, Trainer

SMALL = HybridConfig(d_model=48, pattern="M E * E M E", num_experts=8, top_k=2, moe_latent_dim=24, moe_ffn=48,
                     shared_expert_ffn=64, mlp_ffn=64)


def _train(root: Path, run: str, fault: str | None, steps: int, onset: int, precision: str = "bf16",
           model: HybridConfig = SMALL, seq_len: int = 32, lr_delay: int | None = None) -> hw.Store:
    cfg = TrainConfig(run=run, store=root, precision=precision, model=model, total_steps=400, batch_size=8,
                      seq_len=seq_len, checkpoint_every=10**9)
    f = make_fault(fault, onset)
    if f is not None and lr_delay is not None:
        f.lr_delay = lr_delay  # the mechanism alone, without the fault's delayed LR amplification
    with hw.Monitor(store=root, run=run, precision=precision, flush_every_steps=20, dead_window=10) as mon:
        Trainer(cfg, mon, f).train(steps)
    return hw.open_store(root)


def _mean(st: hw.Store, run: str, sql_filter: str, lo: int, hi: int) -> float:
    q = f"SELECT avg(value) FROM ({sql_filter}) WHERE run = ? AND step >= ? AND step < ?"
    return st.sql(q, [run, lo, hi]).fetchone()[0]


def _scalar(name: str) -> str:
    return f"SELECT run, step, value FROM scalars WHERE name = '{name}'"


def _layer(metric: str, layer: int) -> str:
    return f"SELECT run, step, value FROM layer_stats WHERE metric = '{metric}' AND layer = {layer}"


@pytest.mark.slow
def test_learning_is_real(tmp_path):
    from healthwatch.demo.data import SyntheticTokens

    # The demo's own model and sequence length, over the quick demo's budget of steps.
    st = _train(tmp_path, "healthy", None, 150, 0, model=HybridConfig(), seq_len=64)
    entropy = SyntheticTokens(256, 64, 8, seed=0, extra_tokens=3).unigram_entropy()
    late = _mean(st, "healthy", _scalar("loss/train"), 130, 150)
    assert late < entropy - 0.4, (late, entropy)


@pytest.mark.slow
def test_lr_excursion_raises_loss_and_wgrad_together(tmp_path):
    # The demo's own model: it learns well below the unigram level, so there is room to rise.
    st = _train(tmp_path, "lr", "lr_excursion", 90, 60, model=HybridConfig(), seq_len=64)
    # While the learning rate ramps up (steps 60-100) loss and gradient norm climb together.
    before, after = _mean(st, "lr", _scalar("loss/train"), 35, 60), _mean(st, "lr", _scalar("loss/train"), 65, 90)
    assert after > before + 0.1, (before, after)
    med = "SELECT median(value) FROM scalars WHERE run = 'lr' AND name = 'grad_norm/total' AND step >= ? AND step < ?"
    before, after = st.sql(med, [35, 60]).fetchone()[0], st.sql(med, [65, 90]).fetchone()[0]
    assert after > before * 1.5, (before, after)


@pytest.mark.slow
def test_router_collapse_raises_first_moe_maxvio_and_kills_experts(tmp_path):
    st = _train(tmp_path, "rc", "router_collapse", 110, 40)
    first_moe = 1  # pattern "M E * E M E": block 1 is the first MoE layer
    before, after = _mean(st, "rc", _layer("maxvio", first_moe), 20, 40), _mean(st, "rc", _layer("maxvio", first_moe), 90, 110)
    assert after > 3 * before, (before, after)
    dead = _mean(st, "rc", _layer("dead_experts", first_moe), 100, 110)
    assert dead >= 1.0, dead
    other = _mean(st, "rc", _layer("maxvio", 5), 90, 110)
    assert other < after / 2, (other, after)


@pytest.mark.slow
def test_residual_growth_raises_early_layer_resid_rms(tmp_path):
    st = _train(tmp_path, "rg", "residual_growth", 90, 40, lr_delay=10**6)
    before, after = _mean(st, "rg", _layer("resid_rms", 0), 30, 40), _mean(st, "rg", _layer("resid_rms", 0), 80, 90)
    assert after > 1.3 * before, (before, after)


@pytest.mark.slow
def test_mtp_starvation_raises_mtp_loss_before_train_loss(tmp_path):
    st = _train(tmp_path, "mtp", "mtp_starvation", 130, 30, lr_delay=10**6)
    ctrl = _train(tmp_path, "ctrl", None, 130, 30)
    gap = _mean(st, "mtp", _scalar("loss/mtp_2"), 110, 130) - _mean(ctrl, "ctrl", _scalar("loss/mtp_2"), 110, 130)
    train_gap = _mean(st, "mtp", _scalar("loss/train"), 110, 130) - _mean(ctrl, "ctrl", _scalar("loss/train"), 110, 130)
    # MTP heads starve: their loss rises several times more than the train loss moves.
    assert gap > 0.1 and gap > 1.5 * abs(train_gap), (gap, train_gap)


@pytest.mark.slow
def test_nvfp4_vs_bf16_small_positive_gap(tmp_path):
    base = _train(tmp_path, "base", None, 60, 0, precision="nvfp4")
    del base
    ckpt_cfg = TrainConfig(run="base", store=tmp_path, precision="nvfp4", model=SMALL, batch_size=8, seq_len=32,
                           checkpoint_every=10**9)
    trainer = Trainer(ckpt_cfg)
    trainer.train(60)
    path = trainer.save_checkpoint()
    losses = {}
    for precision in ("nvfp4", "bf16"):
        cfg = TrainConfig(run=f"b-{precision}", store=tmp_path, precision=precision, model=SMALL, batch_size=8,
                          seq_len=32, checkpoint_every=10**9)
        t = Trainer(cfg)
        t.load_checkpoint(path)
        vals = [float(t.train_step()) for _ in range(40)]
        losses[precision] = sum(vals[-20:]) / 20
    gap = (losses["nvfp4"] - losses["bf16"]) / losses["bf16"]
    print(f"NVFP4 vs BF16 relative gap over 20 steps: {gap:.4%}")
    assert 0 < gap < 0.05, gap


def test_bf16_main_first_accumulation_rounds_the_mtp_terms_away() -> None:
    """Real BF16 arithmetic: a term far below half an ulp of the running sum is lost, one that is
    not survives; the main gradient itself comes back to BF16 precision."""
    import torch

    from healthwatch.demo.faults import bf16_accumulate_main_first

    g_main = torch.full((4, 4), 1.0)
    g_mtp = torch.full((4, 4), 0.05)  # the MTP heads' x0.05 share
    # 256 terms: the running sum is 256 (ulp 2, half-ulp 1), each 0.05 term rounds away.
    assert torch.equal(bf16_accumulate_main_first(g_main, g_mtp, 256), g_main)
    # One term: 1.0 + 0.05 is representable to BF16 precision (ulp 2^-7), the MTP term survives.
    one = bf16_accumulate_main_first(g_main, g_mtp, 1)
    assert torch.allclose(one, torch.full((4, 4), 1.0 + 0.05), atol=2**-7)
    with pytest.raises(ValueError, match="microbatches"):
        bf16_accumulate_main_first(g_main, g_mtp, 0)


def test_residual_growth_scales_a_few_channels_and_registry_extends() -> None:
    import math

    from healthwatch.demo.faults import Fault, fault_names, make_fault, register_fault

    f = Fault(name="residual_growth", onset=10)
    assert float(f.residual_channel_scale(64, 5).max()) == 1.0  # before onset: no effect
    scale = f.residual_channel_scale(64, 30)
    grown = (scale > 1).nonzero().flatten().tolist()
    assert grown == [0, 16, 32, 48] and math.isclose(float(scale[0]), math.exp(0.05 * 20), rel_tol=1e-6)
    register_fault("test_only_fault", {"lr_excursion"})
    try:
        assert "test_only_fault" in fault_names()
        assert make_fault("test_only_fault", 5).lr_scale(50) > 1.0
    finally:
        from healthwatch.demo import faults

        faults.REGISTRY.pop("test_only_fault", None)
    with pytest.raises(ValueError, match="unknown fault"):
        make_fault("no_such_fault", 0)


@pytest.mark.parametrize("name", ["mtp_starvation", "residual_growth"])
def test_amplified_faults_ramp_the_learning_rate_only_after_their_delay(name: str) -> None:
    """The mechanism runs alone for ``lr_delay`` steps after onset, then the LR ramps (faults.py docstring)."""
    from healthwatch.demo.faults import DEFAULT_LR_DELAY, Fault

    f = Fault(name=name, onset=80)
    delay = DEFAULT_LR_DELAY[name]
    assert f.lr_delay == delay > 0 and f.active(80)
    assert f.lr_scale(80) == f.lr_scale(80 + delay) == 1.0  # the ramp starts at onset + delay
    assert 1.0 < f.lr_scale(80 + delay + 1) < f.lr_scale(80 + delay + f.lr_ramp) == f.lr_factor
    assert Fault(name=name, onset=80, lr_delay=5).lr_scale(90) > 1.0  # an explicit delay wins


def test_mtp_starvation_ramps_to_its_own_factor_and_the_others_keep_theirs() -> None:
    """mtp_starvation's amplification is x1000 (DEFAULT_LR_FACTOR) from onset + 40; ``ultra`` (which
    contains the starvation part), ``lr_excursion`` and ``residual_growth`` keep the x100 ramp."""
    from healthwatch.demo.faults import DEFAULT_LR_DELAY, DEFAULT_LR_FACTOR, LR_FACTOR, Fault

    f = Fault(name="mtp_starvation", onset=80)
    assert (f.lr_delay, f.lr_factor) == (40, 1000.0) == (DEFAULT_LR_DELAY["mtp_starvation"],
                                                       DEFAULT_LR_FACTOR["mtp_starvation"])
    start = 80 + 40
    # The linear ramp written from its definition: 1 + (factor - 1) * t / ramp, t steps into it.
    for t in (0, 1, 10, 39, 40, 80):
        assert f.lr_scale(start + t) == pytest.approx(1.0 + 999.0 * min(1.0, t / 40))
    for name in ("ultra", "lr_excursion", "residual_growth"):
        other = Fault(name=name, onset=80)
        assert other.lr_factor == LR_FACTOR == 100.0, name
        assert other.lr_scale(80 + other.lr_delay + other.lr_ramp) == 100.0, name
    assert Fault(name="mtp_starvation", onset=80, lr_factor=8.0).lr_scale(start + 40) == 8.0  # explicit wins
    with pytest.raises(ValueError, match="lr_factor"):
        Fault(name="mtp_starvation", onset=80, lr_factor=0.5)


@pytest.mark.slow
def test_mtp_starvation_diverges_only_after_its_amplification(tmp_path):
    """Without intervention: the train loss stays with the healthy run's while only the MTP gradient is
    lost (onset .. onset + lr_delay), then diverges once the x1000 ramp runs (faults.py docstring)."""
    onset = 30
    st = _train(tmp_path, "mtp", "mtp_starvation", 110, onset)
    ctrl = _train(tmp_path, "ctrl", None, 110, onset)
    ramp = onset + 40
    train = _scalar("loss/train")
    starved = _mean(st, "mtp", train, onset, ramp) - _mean(ctrl, "ctrl", train, onset, ramp)
    assert abs(starved) < 0.1, starved  # the trunk is not hurt by the starvation itself
    diverged = _mean(st, "mtp", train, ramp + 20, 110) - _mean(ctrl, "ctrl", train, ramp + 20, 110)
    assert diverged > 1.0, diverged  # well past the unigram loss the x100 ramp stopped at
