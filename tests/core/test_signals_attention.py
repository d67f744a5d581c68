"""The optional ``attention`` family: ``attn_logit_max``, the largest pre-softmax attention score.

A small model with eager causal attention hands its own ``q·kᵀ/√d`` scores to
``Monitor.attention_logits`` from inside its forward; the stored value of each step must equal the
maximum of the scores that step's forward computed (recorded by the test independently, on the
host, after the step). Off by default: the same run without the family stores no such row.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

import healthwatch as hw


class EagerAttentionBlock(nn.Module):
    """Residual causal self-attention that materialises its scores (and reports them)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.report = None  # set by the test: called with the masked scores
        self.seen: list[torch.Tensor] = []  # the test's own record of every score tensor

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        mask = torch.ones(scores.shape[-2:], dtype=torch.bool).tril()
        scores = scores.masked_fill(~mask, float("-inf"))
        self.seen.append(scores.detach().clone())
        if self.report is not None:
            self.report(self, scores)
        return h + self.out(torch.softmax(scores, dim=-1) @ v)


class TinyAttentionLM(nn.Module):
    """embedding -> 2 eager attention blocks -> output."""

    def __init__(self, vocab: int = 32, dim: int = 16) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList([EagerAttentionBlock(dim), EagerAttentionBlock(dim)])
        self.output = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embedding(ids)
        for layer in self.layers:
            h = layer(h)
        return self.output(h)


def _train(store: Path, families: tuple[str, ...], steps: int = 5) -> tuple[TinyAttentionLM, list[list[float]]]:
    torch.manual_seed(0)
    model = TinyAttentionLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)  # large steps: the scores change step to step
    mon = hw.Monitor(store=store, run="attn", flush_every_steps=2, expert_load_every=0,
                     monitor_config=hw.MonitorConfig(signals=families, signals_every=1))
    mon.watch(model)
    for block in model.layers:
        block.report = lambda blk, scores: mon.attention_logits(blk, scores)
    expected: list[list[float]] = []
    ids = (torch.arange(24).reshape(2, 12) * 7) % 32
    for step in range(steps):
        for block in model.layers:
            block.seen.clear()
        loss = nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.roll(-1, 1).flatten())
        loss.backward()
        mon.after_backward()
        opt.step()
        opt.zero_grad()
        mon.step(step, tokens=(step + 1) * ids.numel(), loss=loss.detach())
        # The reference: the maximum finite score each block computed this step (masked ones are -inf).
        expected.append([max(float(s[torch.isfinite(s)].max()) for s in block.seen) for block in model.layers])
    mon.close()
    return model, expected


def test_attn_logit_max_is_the_largest_score_of_each_step(tmp_path: Path) -> None:
    _model, expected = _train(tmp_path / "on", ("attention",))
    st = hw.open_store(tmp_path / "on")
    rows = st.sql("SELECT step, layer, value FROM layer_stats WHERE run = 'attn' AND metric = 'attn_logit_max' "
                  "ORDER BY step, layer").fetchall()
    assert [(s, layer) for s, layer, _ in rows] == [(s, layer) for s in range(len(expected)) for layer in (0, 1)]
    for s, layer, value in rows:
        assert value == pytest.approx(expected[s][layer], rel=1e-6), (s, layer)
    # The values really move (the check is not one constant).
    assert len({round(v, 6) for _, _, v in rows}) > 2


def test_attention_family_is_off_by_default_and_bad_layers_are_named(tmp_path: Path) -> None:
    _train(tmp_path / "off", ("quant", "router", "mamba"))
    st = hw.open_store(tmp_path / "off")
    assert st.sql("SELECT count(*) FROM layer_stats WHERE metric = 'attn_logit_max'").fetchone()[0] == 0
    assert "attention" not in hw.MonitorConfig().signals
    mon = hw.Monitor(store=tmp_path / "bad", run="bad", monitor_config=hw.MonitorConfig(signals=("attention",)))
    mon.watch(TinyAttentionLM())
    with pytest.raises(ValueError, match="not a watched block"):
        mon.attention_logits(7, torch.zeros(2, 2))
    mon.close()
