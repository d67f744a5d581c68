"""Signals equal hand-computed values on a tiny model whose routing and activations are forced."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import healthwatch as hw
from healthwatch.hooks.adapters import GenericAdapter, UnsupportedModelError


class ConstBlock(nn.Module):
    """Returns a fixed residual stream (per token), plus a linear layer whose grads the test sets."""

    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("value", value)
        self.lin = nn.Linear(4, 4)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.value.expand_as(h) + 0.0 * self.lin(h)


class Router(nn.Module):
    """Top-1 router with assignments set by the test before each step."""

    def __init__(self, num_experts: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = 1
        self.assign = torch.zeros(8, 1, dtype=torch.long)
        self.w = nn.Linear(4, num_experts, bias=False)

    def forward(self, x: torch.Tensor):
        logits = self.w(x)
        return logits, torch.ones_like(self.assign, dtype=x.dtype), self.assign


class MoE(nn.Module):
    """Block with a router; output = input (residual unchanged)."""

    def __init__(self) -> None:
        super().__init__()
        self.router = Router(4)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        _l, w, _i = self.router(h.reshape(-1, 4))
        return h * w.mean()


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        tok = torch.tensor([1.0, 2.0]).repeat_interleave(4).reshape(1, 8, 1).expand(1, 8, 4).clone()
        self.layers = nn.ModuleList([ConstBlock(torch.full((1, 8, 4), 3.0)), MoE(), ConstBlock(tok)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def test_exact_signals(store_dir):
    net = Net()
    adapter = GenericAdapter(blocks=r"^layers\.\d+$", routers=r"\.router$")
    # Step 0: experts [0,0,0,1,1,2,0,0] -> counts [5,2,1,0]; step 1: [3]*8 -> counts [0,0,0,8].
    assignments = [[0, 0, 0, 1, 1, 2, 0, 0], [3] * 8, [0] * 8]
    with hw.Monitor(store=store_dir, run="exact", dead_window=2, expert_load_every=1) as mon:
        spec = mon.watch(net, adapter=adapter)
        assert [b.layer_type for b in spec.blocks] == ["mlp", "moe", "mlp"]
        for step, assign in enumerate(assignments):
            net.layers[1].router.assign = torch.tensor(assign).reshape(8, 1)
            net(torch.zeros(1, 8, 4))
            for p in net.parameters():
                p.grad = torch.ones_like(p)
            mon.after_backward()
            mon.step(step, tokens=8 * (step + 1), loss=torch.tensor(2.5), mtp_losses=[torch.tensor(3.0)], lr=1e-3)
    st = hw.open_store(store_dir)
    rows = st.sql("SELECT step, layer, metric, value FROM layer_stats ORDER BY step, layer, metric").fetchall()
    got = {(s, layer, m): v for s, layer, m, v in rows}
    # MaxVio = (max - mean)/mean with mean = total/E.
    assert got[(0, 1, "maxvio")] == pytest.approx((5 - 2) / 2)
    assert got[(1, 1, "maxvio")] == pytest.approx((8 - 2) / 2)
    assert got[(2, 1, "maxvio")] == pytest.approx((8 - 2) / 2)
    # Dead experts over a trailing window of 2 steps: step0 {3}, step0+1 {}, step1+2 {1,2}.
    assert [got[(s, 1, "dead_experts")] for s in range(3)] == [1.0, 0.0, 2.0]
    # Residual RMS: layer 0 all 3.0; layer 2 tokens of 1.0 and 2.0 -> mean 1.5, max 2.0.
    assert got[(0, 0, "resid_rms")] == pytest.approx(3.0)
    assert got[(0, 0, "resid_rms_max")] == pytest.approx(3.0)
    assert got[(0, 2, "resid_rms")] == pytest.approx(1.5)
    assert got[(0, 2, "resid_rms_max")] == pytest.approx(2.0)
    # wgrad: Linear(4,4) = 20 params of grad 1 -> sqrt(20); MoE router 16 params -> 4.
    assert got[(0, 0, "wgrad_norm")] == pytest.approx(math.sqrt(20))
    assert got[(0, 1, "wgrad_norm")] == pytest.approx(4.0)
    scal = dict(st.sql("SELECT name, value FROM scalars WHERE step = 0").fetchall())
    assert scal["loss/train"] == pytest.approx(2.5)
    assert scal["loss/mtp_1"] == pytest.approx(3.0)
    assert scal["lr"] == pytest.approx(1e-3)
    assert scal["grad_norm/total"] == pytest.approx(math.sqrt(20 + 16 + 20))
    loads = st.sql("SELECT step, counts FROM expert_load ORDER BY step").fetchall()
    assert loads[0] == (0, [5, 2, 1, 0])
    assert loads[1] == (1, [0, 0, 0, 8])


def test_eval_passes_are_not_counted(store_dir):
    net = Net()
    with hw.Monitor(store=store_dir, run="evalpass") as mon:
        mon.watch(net, adapter=GenericAdapter(blocks=r"^layers\.\d+$"))
        net.layers[1].router.assign = torch.zeros(8, 1, dtype=torch.long)
        net(torch.zeros(1, 8, 4))
        net.eval()
        net.layers[1].router.assign = torch.full((8, 1), 3, dtype=torch.long)
        net(torch.zeros(1, 8, 4))
        net.train()
        mon.step(0, loss=1.0)
    st = hw.open_store(store_dir)
    assert st.sql("SELECT counts FROM expert_load").fetchone() == ([8, 0, 0, 0],)


def test_unsupported_model_names_what_is_missing():
    model = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(UnsupportedModelError, match="no blocks found"):
        GenericAdapter(blocks=r"^stack\.\d+$").inspect(model)
    with pytest.raises(UnsupportedModelError, match="no adapter recognises Sequential"):
        from healthwatch.hooks.adapters import auto_adapter

        auto_adapter(model)


def test_state_dict_carries_dead_expert_window(store_dir):
    net = Net()
    adapter = GenericAdapter(blocks=r"^layers\.\d+$")
    with hw.Monitor(store=store_dir, run="resume", dead_window=4) as mon:
        mon.watch(net, adapter=adapter)
        net.layers[1].router.assign = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]).reshape(8, 1)
        net(torch.zeros(1, 8, 4))
        mon.step(0, loss=1.0)
        state = mon.state_dict()
    with hw.Monitor(store=store_dir, run="resume", dead_window=4, reason="resume") as mon2:
        mon2.load_state_dict(state)
        mon2.watch(net, adapter=adapter)
        net.layers[1].router.assign = torch.zeros(8, 1, dtype=torch.long)
        net(torch.zeros(1, 8, 4))
        mon2.step(1, loss=1.0)
    st = hw.open_store(store_dir)
    # With the window restored, step 0's traffic keeps experts 1-3 alive at step 1.
    assert st.sql("SELECT value FROM layer_stats WHERE metric='dead_experts' AND step=1").fetchone() == (0.0,)
    assert st.sql("SELECT max(attempt) FROM attempts").fetchone() == (2,)
