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
from healthwatch.hooks.signals import (
    QUANT_SAMPLE_ELEMS,
    SignalBank,
    decode_bank,
    quant_sample,
    quant_slots,
    quant_terms,
)


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


# -- the collector's batched path -----------------------------------------------------------------
def _collected(operands: list[tuple[int, str, torch.Tensor, torch.Tensor]]) -> dict[tuple[int, str], float]:
    """Feed ``operands`` through a real collector's staged path; decoded (layer, metric) -> value."""
    from healthwatch.hooks.collector import StatsCollector

    net = QNet()
    spec = GenericAdapter(blocks=r"^layers\.\d+$").inspect(net)
    col = StatsCollector(spec, torch.device("cpu"), families=("quant",))
    for pos, op, x, q in operands:
        col.quant_stats(pos, op, x, q)
    sums, maxes, *_ = col.take_row([])
    n_core = len(sums) - len(col.bank.sums)
    return {(layer, m): v for layer, m, v in decode_bank(sums[n_core:].numpy(), maxes[-len(col.bank.maxes):].numpy(),
                                                         col.bank.ratio_slots, col.bank.max_slots)}


def test_batched_path_equals_quant_terms_per_operand_and_pooled():
    torch.manual_seed(3)
    ops = []
    for pos, op, shape, scale in [(0, "act", (8, 32), 1.0), (0, "weight", (4, 16), 0.25), (1, "act", (3, 48), 0.5),
                                  (1, "act", (5, 48), 1.0)]:
        x = torch.randn(shape) * 3
        x[0, :5] = 0.0
        ops.append((pos, op, x, quantize_nvfp4(x, scale)))
    got = _collected(ops)
    for pos in (0, 1):
        mine = [(x, q) for p, _op, x, q in ops if p == pos]
        # Independent reference: the per-tensor definitions, pooled by hand over the layer's operands.
        s = sum(quant_terms(x, q)[0] for x, q in mine)
        assert got[(pos, "fp4_underflow")] == pytest.approx(float(s[0] / s[1]))
        assert got[(pos, "fp4_saturation")] == pytest.approx(float(s[2] / s[3]))
        assert got[(pos, "fp4_rel_mse")] == pytest.approx(float(s[4] / s[5]), rel=1e-5)
        assert got[(pos, "fp4_amax")] == pytest.approx(max(float(x.abs().max()) for x, _q in mine))
    w = ops[1]
    s, amax = quant_terms(w[2], w[3])
    assert got[(0, "fp4_saturation/weight")] == pytest.approx(float(s[2] / s[3])) and s[2] > 0
    assert got[(0, "fp4_amax/weight")] == pytest.approx(float(amax))


def test_large_operands_are_sampled_on_whole_rows_amax_exact():
    # 4096 x 64 = 262,144 elements, 128x the sampling cap: ratios are estimates on every 128th row.
    torch.manual_seed(4)
    x = torch.randn(4096, 64) * torch.linspace(0.01, 4, 64)
    x[1, 7] = 500.0                                  # an outlier in a row the sample skips
    q = quantize_nvfp4(x)
    got = _collected([(0, "act", x, q)])
    full, _ = quant_terms(x, q)
    assert got[(0, "fp4_underflow")] == pytest.approx(float(full[0] / full[1]), abs=0.02)
    assert got[(0, "fp4_saturation")] == pytest.approx(float(full[2] / full[3]), abs=0.02)
    assert got[(0, "fp4_amax")] == 500.0            # amax reads the whole operand
    xs, _qs = quant_sample(x, q)
    assert xs.shape == (QUANT_SAMPLE_ELEMS // 64, 64) and xs.numel() <= QUANT_SAMPLE_ELEMS


def test_wide_rows_are_sampled_by_blocks_not_read_whole():
    # Rows of 8,192 elements (a hidden size at scale) are longer than the sampling cap: the sample is
    # evenly strided 16-blocks (views, ~cap elements), not the whole operand.
    torch.manual_seed(5)
    x = torch.randn(64, 8192) * torch.linspace(0.01, 4, 8192)
    q = quantize_nvfp4(x)
    xs, qs = quant_sample(x, q)
    assert xs.numel() <= QUANT_SAMPLE_ELEMS and xs.shape[-1] == 16 and xs.data_ptr() == x.data_ptr()
    stride = xs.stride(0) // 16                      # blocks between two sampled blocks
    assert torch.equal(xs, x.reshape(-1, 16)[::stride]) and torch.equal(qs, q.reshape(-1, 16)[::stride])
    got = _collected([(0, "act", x, q)])
    full, _ = quant_terms(x, q)
    assert got[(0, "fp4_underflow")] == pytest.approx(float(full[0] / full[1]), abs=0.03)
    assert got[(0, "fp4_rel_mse")] == pytest.approx(float(full[4] / full[5]), rel=0.25)
    assert got[(0, "fp4_amax")] == pytest.approx(float(x.abs().max()))


def test_an_amax_the_quantiser_already_has_replaces_the_full_read(store_dir):
    """``quant_stats(..., amax=)``: a trainer whose quantiser computed the operand's max |x| passes it
    and the Monitor stores it as given (no read of the whole operand); the ratios still come from the
    sampled rows, equal to quant_terms. Without it, fp4_amax is the operand's own max |x|."""
    torch.manual_seed(6)
    x = torch.randn(8, 32) * 2
    x[3, 5] = -9.5
    q = quantize_nvfp4(x)
    with hw.Monitor(store=store_dir, run="qa", monitor_config=hw.MonitorConfig(signals_every=1)) as mon:
        mon.watch(QNet(), adapter=GenericAdapter(blocks=r"^layers\.\d+$"))
        mon.quant_stats(1, "act", x, q, amax=torch.tensor(9.5))
        mon.quant_stats(1, "weight", x, q, amax=11.0)      # stored as given: proves x was not read for it
        mon.quant_stats(1, "grad", x, q)
        mon.step(0, loss=1.0)
    st = hw.open_store(store_dir)
    got = {m: v for m, v in st.sql("SELECT metric, value FROM layer_stats WHERE layer = 1").fetchall()}
    st.close()
    sums, _ = quant_terms(x, q)
    assert got["fp4_amax/act"] == 9.5 and got["fp4_amax/weight"] == 11.0 and got["fp4_amax/grad"] == 9.5
    assert got["fp4_amax"] == 11.0                          # the layer aggregate: max over operands
    for op in ("act", "weight", "grad"):
        assert got[f"fp4_underflow/{op}"] == pytest.approx(float(sums[0] / sums[1]))
        assert got[f"fp4_rel_mse/{op}"] == pytest.approx(float(sums[4] / sums[5]), rel=1e-5)


def test_demo_quantiser_hands_its_amax_to_the_observer():
    """The demo quantiser returns the ``max |x|`` it computes for the per-tensor scale and passes it to
    the Monitor's observer (which then skips its own full read): equal to ``x.abs().max()``, NaN kept,
    0 for an empty operand, and the same with a shrunken scale (the fault changes q, not x)."""
    from healthwatch.demo.nvfp4 import quantize_nvfp4_amax

    g = torch.Generator().manual_seed(3)
    for x in (torch.randn(4, 40, generator=g) * 7, torch.randn(3, 32, generator=g).to(torch.bfloat16)):
        for scale in (1.0, 0.25):
            q, amax = quantize_nvfp4_amax(x, scale)
            assert torch.equal(q, quantize_nvfp4(x, scale))
            assert float(amax) == float(x.float().abs().max())
    nan = torch.tensor([[1.0, float("nan")] + [0.5] * 14])
    assert math.isnan(float(quantize_nvfp4_amax(nan)[1]))
    assert float(quantize_nvfp4_amax(torch.zeros(0, 16))[1]) == 0.0

    seen: list[tuple[str, float | None]] = []
    lin = QuantLinear(16, 4, quantize=True)
    lin.quant_observer = lambda operand, x, q, amax=None: seen.append(
        (operand, None if amax is None else float(amax)))
    x = torch.tensor([VALUES]) * -3
    lin(x)
    assert dict(seen) == {"act": float(x.abs().max()), "weight": float(lin.weight.detach().abs().max())}
