"""The quant family's staged fast path (issue 17's overhead budget) gives the per-operand definitions.

From the second step on, each quantised operand call copies its sampled rows straight into its slot
of a staging buffer laid out from the step before, and the flush sums whole rows
(:func:`quant_padded_sums`). These tests pin that path to the per-tensor definitions
(:func:`quant_terms`, hand-computed in test_signals_quant.py) over several steps, including operands
changed in place after the call, calls that change order or shape, non-contiguous and sampled
operands, and the fused weight quantiser's amax hand-over.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from healthwatch.demo.nvfp4 import (
    fake_quant_nvfp4_many,
    fake_quant_nvfp4_many_amax,
    quantize_nvfp4,
    quantize_nvfp4_many,
)
from healthwatch.hooks.adapters import GenericAdapter
from healthwatch.hooks.collector import StatsCollector
from healthwatch.hooks.signals import (
    decode_bank,
    quant_block_sums,
    quant_padded_sums,
    quant_sample,
    quant_terms,
)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(16, 16), nn.Linear(16, 16)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers[1](self.layers[0](x))


def _collector() -> StatsCollector:
    spec = GenericAdapter(blocks=r"^layers\.\d+$").inspect(_Net())
    return StatsCollector(spec, torch.device("cpu"), families=("quant",))


def _decode(col: StatsCollector) -> dict[tuple[int, str], float]:
    sums, maxes, *_ = col.take_row([])
    n_core = len(sums) - len(col.bank.sums)
    got = decode_bank(sums[n_core:].numpy(), maxes[-len(col.bank.maxes):].numpy(), col.bank.ratio_slots,
                      col.bank.max_slots)
    return {(layer, m): v for layer, m, v in got}


def _operand(shape: tuple[int, ...], seed: int, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3
    x.view(-1)[:5] = 0.0                             # exact zeros: not counted as underflow
    return x, quantize_nvfp4(x, scale)


def _expected(ops: list[tuple[int, str, torch.Tensor, torch.Tensor]]) -> dict[tuple[int, str], float]:
    """Per-operand and per-layer values from quant_terms on the sampled rows (independent of the stage)."""
    out: dict[tuple[int, str], float] = {}
    pooled: dict[int, tuple[torch.Tensor, float]] = {}
    for pos, op, x, q in ops:
        xs, qs = quant_sample(x, q)
        s, _ = quant_terms(xs.contiguous(), qs.contiguous())
        amax = float(x.abs().max())
        out[(pos, f"fp4_underflow/{op}")] = float(s[0] / s[1])
        out[(pos, f"fp4_saturation/{op}")] = float(s[2] / s[3])
        out[(pos, f"fp4_rel_mse/{op}")] = float(s[4] / s[5])
        out[(pos, f"fp4_amax/{op}")] = amax
        prev = pooled.get(pos)
        pooled[pos] = (s, amax) if prev is None else (prev[0] + s, max(prev[1], amax))
    for pos, (s, amax) in pooled.items():
        out[(pos, "fp4_underflow")] = float(s[0] / s[1])
        out[(pos, "fp4_saturation")] = float(s[2] / s[3])
        out[(pos, "fp4_rel_mse")] = float(s[4] / s[5])
        out[(pos, "fp4_amax")] = amax
    return out


def _check(got: dict[tuple[int, str], float], want: dict[tuple[int, str], float]) -> None:
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-5, abs=1e-12), k


def test_padded_sums_equal_block_sums_on_ragged_operands():
    g = torch.Generator().manual_seed(11)
    lens = [3, 1, 4, 4, 2]
    width = max(lens) * 16
    padded = torch.zeros(2, len(lens), width)
    parts = []
    for i, n in enumerate(lens):
        x = torch.randn(n * 16, generator=g) * 4
        x[:3] = 0.0
        q = quantize_nvfp4(x.view(n, 16), 0.5).view(-1)  # a shrunken scale: values clip
        if i == 2:
            q[16:32] = 0.0                               # an all-zero block of q: nothing clipped there
        padded[0, i, : n * 16], padded[1, i, : n * 16] = x, q
        parts.append(torch.stack([x, q]).view(2, n, 16))
    lengths = torch.tensor(lens)
    ragged = torch.cat(parts, dim=1)
    seg = torch.from_numpy(np.repeat(np.arange(len(lens)), lens))
    want = quant_block_sums(ragged, seg, lengths)
    got = quant_padded_sums(padded, lengths)
    assert want[:, 2].sum() > 0                          # saturation is exercised
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
    # Against the per-tensor definition too (not only the other batched path).
    for i, part in enumerate(parts):
        s, _ = quant_terms(part[0], part[1])
        torch.testing.assert_close(got[i], s, rtol=1e-6, atol=1e-9)
    # A kept scratch buffer gives the same numbers.
    work = torch.full((4, len(lens), width), float("nan"))
    torch.testing.assert_close(quant_padded_sums(padded, lengths, work=work), want, rtol=1e-6, atol=1e-9)


RAGGED = [(0, "act", (8, 32)), (0, "weight", (4, 16)), (1, "act", (512, 32)), (1, "weight", (6, 48))]
EVEN = [(0, "act", (8, 32)), (0, "weight", (16, 16)), (1, "act", (2, 2, 64)), (1, "weight", (2, 128))]


@pytest.mark.parametrize(("shapes", "padded"), [(RAGGED, False), (EVEN, True)])
def test_staged_steps_equal_the_definitions_and_copy_at_call_time(shapes, padded):
    col = _collector()
    for step in range(3):
        ops = []
        for k, (pos, op, shape) in enumerate(shapes):
            x, q = _operand(shape, seed=100 * step + k, scale=0.5 if op == "weight" else 1.0)
            ops.append((pos, op, x, q))
        want = _expected(ops)
        for pos, op, x, q in ops:
            col.quant_stats(pos, op, x, q, amax=x.abs().max() if op == "act" else None)
        if step:
            # The fast path ran: every call copied into its slot of the staging buffer.
            assert col._qx == [None] * len(ops) and col._qstage is not None and col._qstage.padded == padded
        for _pos, _op, x, q in ops:          # e.g. optimizer.step() on a weight before take_row
            x.mul_(-7.0).add_(1.0)
            q.zero_()
        _check(_decode(col), want)


def test_changed_calls_fall_back_and_relayout():
    col = _collector()
    a = [(0, "act", (8, 32)), (1, "weight", (4, 16))]
    b = [(1, "weight", (4, 16)), (0, "act", (2, 8, 32)), (0, "grad", (3, 32)), (1, "act", (4096, 16))]
    for step, shapes in enumerate([a, a, b, b, a]):
        ops = [(pos, op, *_operand(shape, seed=10 * step + k)) for k, (pos, op, shape) in enumerate(shapes)]
        for pos, op, x, q in ops:
            col.quant_stats(pos, op, x, q)
        if step in (1, 3):
            assert col._qx == [None] * len(ops)      # same calls as the step before: staged
        if step in (2, 4):
            assert any(t is not None for t in col._qx)   # changed: stacked copies, then a new layout
        _check(_decode(col), _expected(ops))


def test_non_contiguous_and_bf16_operands_over_steps():
    col = _collector()
    for step in range(3):
        base, _ = _operand((32, 64), seed=step)
        x = base.t()                                   # [64, 32], not contiguous: sampled by a copy
        q = quantize_nvfp4(x)
        xb, _ = _operand((40, 32), seed=50 + step)
        xb = xb.to(torch.bfloat16)
        qb = quantize_nvfp4(xb)
        ops = [(0, "act", x, q), (1, "act", xb, qb)]
        for pos, op, xx, qq in ops:
            col.quant_stats(pos, op, xx, qq)
        want = _expected([(p, o, xx.float(), qq.float()) for p, o, xx, qq in ops])
        _check(_decode(col), want)


def test_fused_weight_quantiser_hands_over_each_amax():
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(8, 32, generator=g) * 5, torch.randn(4, 16, generator=g), torch.randn(3, 5, generator=g),
          torch.randn(2, 16, generator=g).to(torch.bfloat16)]
    xs[1][0, 3] = -40.0
    qs, amax = fake_quant_nvfp4_many_amax(xs)
    assert [float(a) for a in amax] == [float(x.float().abs().max()) for x in xs]
    # The quantised tensors are those of the fused pass without amaxes (training is unchanged).
    for got, old, x in zip(qs, quantize_nvfp4_many(xs), xs):
        assert torch.equal(got, old) and torch.equal(got, quantize_nvfp4(x))
    leaves = [x.clone().requires_grad_(True) for x in xs[:2]]
    outs, _ = fake_quant_nvfp4_many_amax(leaves)
    sum((o * (i + 2)).sum() for i, o in enumerate(outs)).backward()
    assert [float(x.grad.mean()) for x in leaves] == [2.0, 3.0]    # straight through
    assert all(torch.equal(a, b) for a, b in zip(fake_quant_nvfp4_many(xs), qs))
    assert fake_quant_nvfp4_many_amax([]) == ([], [])


def test_demo_model_weights_pass_their_amax_to_the_monitor():
    from healthwatch.demo.model import HybridConfig, HybridLM

    torch.manual_seed(0)
    model = HybridLM(HybridConfig(vocab_size=64, d_model=32, pattern="M E *", num_experts=4, top_k=2,
                                  precision="nvfp4"))
    seen: list[tuple[str, torch.Tensor, torch.Tensor | None]] = []
    for _name, m in model.quantizable_modules():
        m.quant_observer = lambda operand, x, q, amax=None: seen.append((operand, x.detach().clone(), amax))
    model(torch.randint(0, 64, (2, 17)))
    weights = [(x, a) for op, x, a in seen if op == "weight"]
    assert weights and all(a is not None for _x, a in weights)
    assert all(float(a) == float(x.abs().max()) for x, a in weights)
