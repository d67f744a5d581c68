"""``Monitor.clip_grad_norm_``: the wgrad norms and the trainer's clipping share one read of the
gradients, and the result is exactly ``torch.nn.utils.clip_grad_norm_``'s.

Two copies of a real model (same weights, same batches) train side by side: one clips with torch's
function (and records with ``after_backward()``), one with the Monitor's. Gradients, returned
totals and the trained weights must be equal bit for bit, and the stored norms must be the norms of
the gradients *before* clipping, computed here independently of the Monitor.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import healthwatch as hw
from healthwatch.demo.data import SyntheticTokens
from healthwatch.demo.model import HybridConfig, HybridLM

CFG = HybridConfig(vocab_size=256, d_model=64, pattern="M E * E", n_heads=4, n_kv_heads=2, headdim=16,
                   chunk_size=16, num_experts=8, top_k=2, precision="bf16")


def _pair() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    a = HybridLM(CFG)
    return a, copy.deepcopy(a)


def _grads(model: nn.Module) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()]


def _equal(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Bit-equal, NaN in the same places counting as equal."""
    return torch.equal(torch.isnan(x), torch.isnan(y)) and torch.equal(x.nan_to_num(0.0), y.nan_to_num(0.0))


def _same(xs: list[torch.Tensor | None], ys: list[torch.Tensor | None]) -> bool:
    return all((x is None and y is None) or (x is not None and y is not None and _equal(x, y))
               for x, y in zip(xs, ys, strict=True))


def test_equals_torch_clip_and_records_the_norms_before_clipping(store_dir: Path) -> None:
    ref, model = _pair()
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = SyntheticTokens(CFG.vocab_size, 32, 2, seed=0)
    max_norm = 0.05  # below the model's gradient norm, so the gradients really are scaled
    expected_total: list[float] = []
    expected_block: list[list[float]] = []
    clipped = 0
    with hw.Monitor(store=store_dir, run="clip", log_every=1) as mon:
        spec = mon.watch(model)
        for step in range(4):
            ids = data.batch_at(step)
            for m in (ref, model):
                m(ids).total_loss.backward()
            # Independent pre-clip norms: of every gradient, and of each block's parameters.
            pre = {id(p): p.grad.detach().double().norm() for p in model.parameters() if p.grad is not None}
            expected_total.append(math.sqrt(sum(float(v) ** 2 for v in pre.values())))
            expected_block.append([math.sqrt(sum(float(pre[id(p)]) ** 2 for p in b.params if id(p) in pre))
                                   for b in spec.blocks])
            got_ref = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
            got = mon.clip_grad_norm_(model.parameters(), max_norm)
            assert torch.equal(got, got_ref)
            assert _same(_grads(model), _grads(ref))
            clipped += float(got) > max_norm
            opt_ref.step()
            opt.step()
            opt_ref.zero_grad(set_to_none=True)
            opt.zero_grad(set_to_none=True)
            mon.step(step, tokens=64 * (step + 1), loss=torch.tensor(1.0))
    assert clipped == 4, "the check is vacuous unless the gradients were scaled"
    assert all(torch.equal(p, q) for p, q in zip(ref.parameters(), model.parameters(), strict=True))
    st = hw.open_store(store_dir)
    try:
        total = [v for (v,) in st.sql("SELECT value FROM scalars WHERE run='clip' AND name='grad_norm/total' "
                                      "ORDER BY step").fetchall()]
        rows = st.sql("SELECT step, layer, value FROM layer_stats WHERE run='clip' AND metric='wgrad_norm' "
                      "ORDER BY step, layer").fetchall()
    finally:
        st.close()
    assert total == pytest.approx(expected_total, rel=1e-5)
    layers = [b.index for b in spec.blocks]
    got_blocks = [[v for s, layer, v in rows if s == step and layer in layers] for step in range(4)]
    assert got_blocks == [pytest.approx(e, rel=1e-5) for e in expected_block]


@pytest.mark.parametrize("case", ["inf_norm", "unrecorded_step", "frozen_and_extra", "nonfinite", "main_grad"])
def test_fallbacks_and_edges_still_equal_torch(store_dir: Path, case: str) -> None:
    ref, model = _pair()
    extra_ref = nn.Parameter(torch.randn(5))
    extra = nn.Parameter(extra_ref.detach().clone())
    if case == "frozen_and_extra":  # a parameter without a gradient, and one the Monitor does not watch
        next(ref.parameters()).requires_grad_(False)
        next(model.parameters()).requires_grad_(False)
    data = SyntheticTokens(CFG.vocab_size, 32, 2, seed=0)
    with hw.Monitor(store=store_dir, run="edge", log_every=2 if case == "unrecorded_step" else 1) as mon:
        mon.watch(model)
        for step in range(2):
            ids = data.batch_at(step)
            for m, e in ((ref, extra_ref), (model, extra)):
                m.zero_grad(set_to_none=True)
                e.grad = None
                (m(ids).total_loss + (e * e).sum()).backward()
            if case == "nonfinite":
                next(p for p in ref.parameters() if p.grad is not None).grad.view(-1)[0] = float("nan")
                next(p for p in model.parameters() if p.grad is not None).grad.view(-1)[0] = float("nan")
                with pytest.raises(RuntimeError, match="non-finite") as want:
                    torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05, error_if_nonfinite=True)
                with pytest.raises(RuntimeError, match="non-finite") as got:
                    mon.clip_grad_norm_(model.parameters(), 0.05, error_if_nonfinite=True)
                assert str(got.value) == str(want.value)
                assert _same(_grads(model), _grads(ref))  # nothing was scaled by either
                mon.step(step, tokens=64 * (step + 1), loss=torch.tensor(1.0))
                continue
            if case == "main_grad":  # megatron keeps gradients in main_grad: not shared, torch clips p.grad
                for p in model.parameters():
                    if p.grad is not None:
                        p.main_grad = p.grad.clone()
            norm_type = math.inf if case == "inf_norm" else 2.0
            params_ref = [*ref.parameters(), extra_ref]
            params = [*model.parameters(), extra]
            want = torch.nn.utils.clip_grad_norm_(params_ref, 0.05, norm_type=norm_type)
            got = mon.clip_grad_norm_(params, 0.05, norm_type=norm_type)
            assert torch.equal(got, want)
            assert _same(_grads(model), _grads(ref))
            assert torch.equal(extra.grad, extra_ref.grad)
            mon.step(step, tokens=64 * (step + 1), loss=torch.tensor(1.0))
    st = hw.open_store(store_dir)
    try:
        steps = [s for (s,) in st.sql("SELECT DISTINCT step FROM scalars WHERE run='edge' AND name='grad_norm/total' "
                                      "ORDER BY step").fetchall()]
    finally:
        st.close()
    # The wgrad signals were still recorded on every recorded step, through whichever path.
    assert steps == ([0] if case == "unrecorded_step" else [0, 1])


def test_residual_rms_of_a_block_called_twice_with_different_token_counts(store_dir: Path) -> None:
    """A shared block run twice in a step (the MTP heads) on sequences of different lengths: the
    stored RMS is the mean over calls of each call's mean over tokens, the max over all tokens."""

    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            return h + 0.0 * self.lin(h)

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([Scale()])

        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return self.layers[0](a).sum() + self.layers[0](b).sum()

    from healthwatch.hooks.adapters import GenericAdapter

    torch.manual_seed(1)
    a, b = torch.randn(1, 3, 4), torch.randn(1, 7, 4) * 5
    net = Twice()
    with hw.Monitor(store=store_dir, run="twice", log_every=1) as mon:
        mon.watch(net, adapter=GenericAdapter(blocks=r"^layers\.\d+$"))
        net(a, b).backward()
        mon.after_backward()
        mon.step(0, tokens=10, loss=torch.tensor(1.0))
    rms_a = a.pow(2).mean(-1).sqrt().double()
    rms_b = b.pow(2).mean(-1).sqrt().double()
    st = hw.open_store(store_dir)
    try:
        got = dict(st.sql("SELECT metric, value FROM layer_stats WHERE run='twice' AND layer=0").fetchall())
    finally:
        st.close()
    assert got["resid_rms"] == pytest.approx(float((rms_a.mean() + rms_b.mean()) / 2), rel=1e-6)
    assert got["resid_rms_max"] == pytest.approx(float(torch.cat([rms_a, rms_b], -1).max()), rel=1e-6)
