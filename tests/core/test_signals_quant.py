"""NVFP4 quantisation health equals hand-computed numbers: the math on tiny tensors, and end to end
through the demo's fake quantiser, a Monitor and the store (docs/signals.md)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import healthwatch as hw
from healthwatch.demo.nvfp4 import QuantLinear, quantize_nvfp4
from healthwatch.hooks.adapters import GenericAdapter
from healthwatch.hooks.signals import SignalBank, decode_bank, quant_slots, quant_terms


def test_quant_terms_by_hand():
    # Last dim 4 does not divide into 16-blocks: the top of the grid is the tensor's max |q| (6).
    x = torch.tensor([0.1, 0.0, 1.0, 7.0])
    q = torch.tensor([0.0, 0.0, 1.0, 6.0])
    sums, amax = quant_terms(x, q)
    under, nonzero, sat, numel, err, xsq = sums.tolist()
    assert (under, nonzero) == (1.0, 3.0)          # 0.1 -> 0 among the 3 non-zero values
    assert (sat, numel) == (1.0, 4.0)              # 7 clipped at the top (6)
    assert err == pytest.approx(0.1**2 + 1.0**2)
    assert xsq == pytest.approx(0.1**2 + 1.0 + 49.0)
    assert amax.tolist() == [7.0]


def test_saturation_is_per_block_top():
    # Two 16-blocks: block 0 tops at 6 (7 clipped there), block 1 tops at 3 and 3.5 -> 3 is clipped
    # at its block's top; 2.9 -> 2 is below |x| but not at the top, so not saturated.
    x = torch.zeros(2, 16)
    q = torch.zeros(2, 16)
    x[0, :2], q[0, :2] = torch.tensor([7.0, 5.0]), torch.tensor([6.0, 6.0])
    x[1, :2], q[1, :2] = torch.tensor([3.5, 2.9]), torch.tensor([3.0, 2.0])
    sums, _ = quant_terms(x, q)
    assert sums[2].item() == 2.0 and sums[3].item() == 32.0


def test_bank_decodes_ratios_and_maxima():
    bank = SignalBank(torch.device("cpu"))
    ratios, maxes = quant_slots(3, "act")
    start = bank.group("k", ratios, maxes)
    bank.add(start, torch.tensor([1.0, 4.0, 0.0, 8.0, 2.0, 10.0]), torch.tensor([5.0]))
    bank.add(start, torch.tensor([1.0, 4.0, 1.0, 8.0, 0.0, 10.0]), torch.tensor([3.0]))
    sums, mx = bank.take()
    got = {m: v for _layer, m, v in decode_bank(sums.numpy(), mx.numpy(), bank.ratio_slots, bank.max_slots)}
    assert got == {"fp4_underflow/act": 2 / 8, "fp4_saturation/act": 1 / 16, "fp4_rel_mse/act": 2 / 20,
                   "fp4_amax/act": 5.0}
    # After take() nothing is observed: no rows rather than zeros.
    s2, m2 = bank.take()
    assert decode_bank(s2.numpy(), m2.numpy(), bank.ratio_slots, bank.max_slots) == []


# -- end to end ---------------------------------------------------------------------------------
# One 16-element block: amax 12. With the recipe's scale the block scale is exactly 2 (12/6), so
# the grid is {0, 1, 2, 3, 4, 6, 8, 12}; with the per-tensor scale halved (the fault) the block
# scale would be 4 but saturates E4M3 at 448 * s_tensor = 1: the grid is {0, .5, ..., 6} and
# everything above 6 clips.
VALUES = [12.0, 7.0, 5.0, 0.2] + [0.0] * 12


class QBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = QuantLinear(16, 1, bias=False, quantize=True)
        with torch.no_grad():
            self.lin.weight.copy_(torch.tensor([VALUES]))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.lin(h).sum() * 0.0


class QNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([QBlock(), nn.Linear(16, 16)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers[1](self.layers[0](x))


def test_quantiser_grid_matches_the_hand_computation():
    x = torch.tensor(VALUES)
    assert quantize_nvfp4(x).tolist()[:4] == [12.0, 8.0, 4.0, 0.0]
    assert quantize_nvfp4(x, scale=0.5).tolist()[:4] == [6.0, 6.0, 4.0, 0.0]


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_fake_quantiser_reports_through_the_monitor(store_dir, scale):
    net = QNet()
    net.layers[0].lin.quant_scale = scale
    with hw.Monitor(store=store_dir, run="q") as mon:
        mon.watch(net, adapter=GenericAdapter(blocks=r"^layers\.\d+$"))
        net(torch.tensor([VALUES]))
        mon.step(0, loss=1.0)
        net.eval()                      # evaluation passes are not training statistics
        net(torch.tensor([VALUES]) * 100)
        net.train()
    st = hw.open_store(store_dir)
    got = {(layer, m): v for layer, m, v in st.sql("SELECT layer, metric, value FROM layer_stats").fetchall()}
    if scale == 1.0:
        # 0.2 -> 0 (below 0.25 * block scale 2); 7 -> 8 and 5 -> 4 round, nothing clips.
        err, sat = (1.0 + 1.0 + 0.04), 0.0
    else:
        # 12 -> 6 and 7 -> 6 clip at the top; 5 -> 4 (tie to even); 0.2 -> 0.
        err, sat = (36.0 + 1.0 + 1.0 + 0.04), 2 / 16
    xsq = 144 + 49 + 25 + 0.04
    for op in ("act", "weight"):                 # input and weight hold the same 16 values
        assert got[(0, f"fp4_underflow/{op}")] == pytest.approx(1 / 4)
        assert got[(0, f"fp4_saturation/{op}")] == pytest.approx(sat)
        assert got[(0, f"fp4_rel_mse/{op}")] == pytest.approx(err / xsq)
        assert got[(0, f"fp4_amax/{op}")] == pytest.approx(12.0)
    # The layer aggregate pools both operands: the same ratios.
    assert got[(0, "fp4_underflow")] == pytest.approx(1 / 4)
    assert got[(0, "fp4_rel_mse")] == pytest.approx(err / xsq)
    # The unquantised layer 1 has no quantisation rows (documented no-op).
    assert not [k for k in got if k[0] == 1 and k[1].startswith("fp4_")]
    assert math.isfinite(got[(0, "fp4_amax")])
