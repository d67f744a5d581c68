"""Optimizer update health, the public quant_stats hook, the heartbeat and bad input (docs/signals.md)."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import nn

import healthwatch as hw
from healthwatch.hooks.adapters import GenericAdapter

#: The update family is off by default (its cost: docs/signals.md).
ON = hw.MonitorConfig(signals=("quant", "router", "mamba", "update"))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(2, 1, bias=False), nn.Linear(1, 1, bias=False)])
        with torch.no_grad():
            self.layers[0].weight.copy_(torch.tensor([[1.0, -2.0]]))
            self.layers[1].weight.fill_(3.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers[1](self.layers[0](x))


def _one_step(mon: hw.Monitor, net: Net, opt: torch.optim.Optimizer, explicit: bool) -> None:
    # Layer 0 gets gradient [0.5, 0.5]; layer 1 gets no gradient (not updated by Adam).
    net.layers[0].weight.grad = torch.tensor([[0.5, 0.5]])
    net.layers[1].weight.grad = None
    mon.after_backward()
    opt.step()
    if explicit:
        mon.after_optimizer_step(opt)
    opt.zero_grad()
    mon.step(0, loss=1.0)


def _layer_metrics(store_dir: object) -> dict[tuple[int, str], float]:
    st = hw.open_store(store_dir)
    rows = st.sql("SELECT layer, metric, value FROM layer_stats WHERE metric LIKE 'update%'").fetchall()
    return {(layer, m): v for layer, m, v in rows}


@pytest.mark.parametrize("explicit", [True, False])
def test_adam_update_by_hand(store_dir, explicit):
    # First Adam step: m = 0.1 g, v = 0.001 g^2, bias-corrected m/sqrt(v) = sign(g) = 1, so each
    # element moves by lr = 0.1: theta [1, -2] -> [0.9, -2.1]; ||dθ|| = 0.1 sqrt 2.
    net = Net()
    opt = torch.optim.Adam(net.parameters(), lr=0.1, eps=1e-12)
    with hw.Monitor(store=store_dir, run="adam", monitor_config=ON) as mon:
        mon.watch(net, adapter=GenericAdapter(blocks=r"^layers\.\d+$"), optimizer=None if explicit else opt)
        _one_step(mon, net, opt, explicit)
    got = _layer_metrics(store_dir)
    assert got[(0, "update_norm")] == pytest.approx(0.1 * math.sqrt(2), rel=1e-6)
    assert got[(0, "update_ratio")] == pytest.approx(0.1 * math.sqrt(2) / math.sqrt(0.81 + 4.41), rel=1e-6)
    assert got[(1, "update_norm")] == 0.0                  # no gradient: not updated
    assert got[(1, "update_ratio")] == 0.0


def test_adamw_decoupled_decay_by_hand(store_dir):
    # AdamW, lr 0.1, weight decay 0.5: theta * (1 - 0.05) - 0.1 * sign(g):
    # [1, -2] -> [0.85, -2.0]: dθ = [-0.15, 0]; the layer-1 weight has no grad and does not move.
    net = Net()
    opt = torch.optim.AdamW(net.parameters(), lr=0.1, weight_decay=0.5, eps=1e-12)
    with hw.Monitor(store=store_dir, run="adamw", monitor_config=ON) as mon:
        mon.watch(net, adapter=GenericAdapter(blocks=r"^layers\.\d+$"), optimizer=opt)
        _one_step(mon, net, opt, explicit=False)
    got = _layer_metrics(store_dir)
    assert net.layers[0].weight.detach().tolist()[0] == pytest.approx([0.85, -2.0])
    assert got[(0, "update_norm")] == pytest.approx(0.15, rel=1e-5)
    assert got[(0, "update_ratio")] == pytest.approx(0.15 / math.sqrt(0.85**2 + 4.0), rel=1e-5)


def test_unknown_optimizer_is_a_logged_no_op(store_dir, caplog):
    net = Net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with caplog.at_level(logging.WARNING, logger="healthwatch.monitor"):
        with hw.Monitor(store=store_dir, run="sgd", monitor_config=ON) as mon:
            mon.watch(net, adapter=GenericAdapter(blocks=r"^layers\.\d+$"), optimizer=opt)
            _one_step(mon, net, opt, explicit=True)
    assert _layer_metrics(store_dir) == {}
    assert "SGD is not supported" in caplog.text


def test_update_family_off_and_missing_optimizer(store_dir):
    net = Net()
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    with hw.Monitor(store=store_dir, run="off") as mon:          # the default: update family off
        mon.watch(net, adapter=GenericAdapter(blocks=r"^layers\.\d+$"), optimizer=opt)
        _one_step(mon, net, opt, explicit=True)
    assert _layer_metrics(store_dir) == {}
    # A bare after_optimizer_step() before any optimizer stepped the model: a no-op (warned once);
    # after one did, the Monitor knows it (found by a global post-step hook, then removed).
    with hw.Monitor(store=store_dir, run="noopt", monitor_config=ON) as mon:
        mon.watch(net, adapter=GenericAdapter(blocks=r"^layers\.\d+$"))
        mon.after_optimizer_step()
        net.layers[0].weight.grad = torch.tensor([[0.5, 0.5]])
        opt.step()
        mon.after_optimizer_step()
        mon.step(0, loss=1.0)
    assert ("update_norm" in {m for _layer, m in _layer_metrics(store_dir)})
    with pytest.raises(ValueError, match="unknown families"):
        hw.MonitorConfig(signals=("quant", "everything"))


def test_public_quant_stats_hook_and_heartbeat(store_dir):
    net = Net()
    x = torch.tensor([0.1, 0.0, 1.0, 7.0])
    q = torch.tensor([0.0, 0.0, 1.0, 6.0])
    with hw.Monitor(store=store_dir, run="pub") as mon:
        with pytest.raises(ValueError, match="before watch"):
            mon.quant_stats(0, "weight", x, q)
        mon.watch(net, adapter=GenericAdapter(blocks=r"^layers\.\d+$"))
        mon.quant_stats(1, "grad", x, q)                      # by stored layer index
        mon.quant_stats(net.layers[1], "grad", x, q)          # by a module inside the block
        with pytest.raises(ValueError, match="not a watched block"):
            mon.quant_stats(7, "weight", x, q)
        with pytest.raises(ValueError, match="differ in shape"):
            mon.quant_stats(1, "weight", x, q[:2])
        mon.router_drops(0, 3.0, 12.0)
        mon.step(0, loss=1.0)
    st = hw.open_store(store_dir)
    got = {(layer, m): v for layer, m, v in st.sql("SELECT layer, metric, value FROM layer_stats").fetchall()}
    assert got[(1, "fp4_underflow/grad")] == pytest.approx(1 / 3)
    assert got[(1, "fp4_saturation")] == pytest.approx(1 / 4)
    assert got[(1, "fp4_rel_mse")] == pytest.approx(1.01 / 50.01)
    assert got[(1, "fp4_amax/grad")] == 7.0
    assert got[(0, "token_drop_rate")] == pytest.approx(0.25)
    beats = st.sql("SELECT step, value, wall_time FROM scalars WHERE name = 'monitor/heartbeat'").fetchall()
    assert len(beats) == 1 and beats[0][0] == 0 and beats[0][1] >= beats[0][2]


def test_two_monitors_find_their_optimizers_without_breaking_optimizer_step(store_dir):
    """Each Monitor's optimizer discovery is a global post-step hook; removing one while torch
    iterates them used to raise "OrderedDict mutated during iteration" inside ``opt.step()``."""
    nets = [Net(), Net()]
    opts = [torch.optim.Adam(n.parameters(), lr=0.1) for n in nets]
    mons = [hw.Monitor(store=store_dir, run=f"two{i}", monitor_config=ON) for i in range(2)]
    try:
        for mon, net in zip(mons, nets):
            mon.watch(net, adapter=GenericAdapter(blocks=r"^layers\.\d+$"))
        for step in range(2):
            for mon, net, opt in zip(mons, nets, opts):
                net.layers[0].weight.grad = torch.tensor([[0.5, 0.5]])
                net.layers[1].weight.grad = None
                opt.step()  # both discovery hooks run here, for each optimizer
                opt.zero_grad()
                mon.step(step, loss=1.0)
        assert all(m._optimizer is o and m._discovery is None for m, o in zip(mons, opts))
    finally:
        for mon in mons:
            mon.close()
    st = hw.open_store(store_dir)
    rows = st.sql("SELECT run, step, value FROM layer_stats WHERE metric = 'update_norm' AND layer = 0 "
                  "ORDER BY run, step").fetchall()
    st.close()
    # Adam's first steps move each weight by lr (bias-corrected m / sqrt(v) = 1 per element): ||dθ|| = 0.1 * sqrt(2).
    assert [(r, s) for r, s, _v in rows] == [("two0", 0), ("two0", 1), ("two1", 0), ("two1", 1)]
    assert [v for _r, _s, v in rows] == pytest.approx([0.1 * math.sqrt(2)] * 4, rel=1e-4)


def test_large_tensors_are_read_on_a_sample_close_to_the_exact_update():
    """Above UPDATE_SAMPLE_ELEMS a tensor's sums of squares are estimated on a strided sample,
    scaled by numel / sampled; the exact value (everything read) is the independent reference."""
    from healthwatch.hooks.signals import UPDATE_SAMPLE_ELEMS, adam_update_sq

    torch.manual_seed(0)
    lin = nn.Linear(256, 256)                      # 65,536 weights: 16x the sample
    opt = torch.optim.AdamW(lin.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        lin(torch.randn(8, 256)).pow(2).mean().backward()
        opt.step()
    params = list(lin.parameters())
    upd, nrm = adam_update_sq(opt, params)
    exact_u, exact_n = adam_update_sq(opt, params, sample=10**9)
    assert lin.weight.numel() > UPDATE_SAMPLE_ELEMS
    assert upd[0].item() == pytest.approx(exact_u[0].item(), rel=0.1)
    assert nrm[0].item() == pytest.approx(exact_n[0].item(), rel=0.1)
    assert (upd[1].item(), nrm[1].item()) == pytest.approx((exact_u[1].item(), exact_n[1].item()))  # bias: whole
    # The exact path agrees with the parameter change itself (θ_before kept here only for the check).
    before = lin.weight.detach().clone()
    lin(torch.randn(8, 256)).pow(2).mean().backward()
    opt.step()
    u, _ = adam_update_sq(opt, params, sample=10**9)
    assert u[0].item() == pytest.approx((lin.weight.detach() - before).pow(2).sum().item(), rel=1e-4)


def test_all_families_on_a_model_without_their_layers_is_a_no_op(store_dir):
    """Every family on, at every step, on a model with no quantised layer, router or Mamba block,
    trained with SGD by a loop that never calls quant_stats / after_optimizer_step / router_drops:
    training runs, the core signals are stored, no family writes a row (the unsupported optimizer
    is said once in the log)."""
    net = Net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    cfg = hw.MonitorConfig(signals=("quant", "router", "mamba", "update"), signals_every=1)
    with hw.Monitor(store=store_dir, run="plain", monitor_config=cfg) as mon:
        spec = mon.watch(net, adapter=GenericAdapter(blocks=r"^layers\.\d+$"))
        assert not spec.routers
        for step in range(3):
            net(torch.ones(4, 2)).pow(2).mean().backward()
            mon.after_backward()
            opt.step()
            opt.zero_grad()
            mon.step(step, loss=1.0)
    st = hw.open_store(store_dir)
    metrics = {m for (m,) in st.sql("SELECT DISTINCT metric FROM layer_stats WHERE run = 'plain'").fetchall()}
    st.close()
    assert metrics == {"wgrad_norm", "resid_rms", "resid_rms_max"}  # the core signals only


def test_cached_plan_equals_the_parameter_change_over_groups_amsgrad_and_a_skipped_parameter():
    """adam_update_sq reuses its gathered views from step to step (``cache``); each step must still
    equal the parameter change itself (θ before the step kept here only for the check), with two
    parameter groups (AMSGrad + decoupled decay, plain), and a parameter that has no gradient on one
    step (not updated: 0). The plan is rebuilt when that parameter loses and regains its gradient."""
    from healthwatch.hooks.signals import adam_update_sq

    torch.manual_seed(1)
    a, b = nn.Linear(8, 8), nn.Linear(8, 4)
    opt = torch.optim.AdamW([{"params": a.parameters(), "lr": 1e-2, "weight_decay": 0.1, "amsgrad": True},
                             {"params": b.parameters(), "lr": 3e-3, "weight_decay": 0.0}])
    params = [*a.parameters(), *b.parameters()]
    cache: dict = {}
    plans = []
    for step in range(4):
        b(a(torch.randn(5, 8))).pow(2).mean().backward()
        if step == 2:
            b.bias.grad = None                                # skipped by AdamW this step
        before = [p.detach().clone() for p in params]
        opt.step()
        upd, nrm = adam_update_sq(opt, params, cache=cache)
        exact = [(p.detach() - q).pow(2).sum().item() for p, q in zip(params, before)]
        assert upd.tolist() == pytest.approx(exact, rel=1e-4, abs=1e-14)
        assert nrm.tolist() == pytest.approx([p.detach().pow(2).sum().item() for p in params], rel=1e-5)
        if step == 2:
            assert upd[3].item() == 0.0
        plans.append(cache["plan"])
        opt.zero_grad()
    assert plans[1] is plans[0]                               # same state tensors: reused
    assert plans[2] is not plans[1] and plans[3] is not plans[2]
