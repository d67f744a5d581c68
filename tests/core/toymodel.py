"""A tiny model whose routing is forced to known counts, for exact signal checks."""

from __future__ import annotations

import torch
from torch import nn


class ForcedRouter(nn.Module):
    """Router that sends token t to experts ``assign[t]`` (fixed), returning (logits, weights, indices)."""

    def __init__(self, dim: int, num_experts: int, assign: torch.Tensor) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, num_experts, bias=False)
        self.num_experts = num_experts
        self.top_k = assign.shape[-1]
        self.register_buffer("assign", assign)

    def forward(self, x: torch.Tensor):
        logits = self.proj(x)
        idx = self.assign[: x.shape[0]]
        return logits, torch.softmax(logits, -1).gather(-1, idx), idx


class MoEBlock(nn.Module):
    """Residual block with a forced router and a linear 'expert' mixer."""

    def __init__(self, dim: int, num_experts: int, assign: torch.Tensor) -> None:
        super().__init__()
        self.router = ForcedRouter(dim, num_experts, assign)
        self.mix = nn.Linear(dim, dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        flat = h.reshape(-1, h.shape[-1])
        _logits, w, _idx = self.router(flat)
        return h + self.mix(h) * w.sum(-1).reshape(h.shape[:-1] + (1,))


class DenseBlock(nn.Module):
    """Residual block with a linear mixer (classified as 'mlp')."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mix = nn.Linear(dim, dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.mix(h)


class ToyLM(nn.Module):
    """embedding -> [dense, moe, dense, moe] -> output, with forced routing."""

    def __init__(self, vocab: int = 32, dim: int = 8, num_experts: int = 4, tokens: int = 8) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim)
        # Layer 1: tokens to experts [0,1] always; layer 3: spread.
        a1 = torch.tensor([[0, 1]] * tokens)
        a3 = torch.tensor([[t % num_experts, (t + 1) % num_experts] for t in range(tokens)])
        self.layers = nn.ModuleList([DenseBlock(dim), MoEBlock(dim, num_experts, a1), DenseBlock(dim),
                                     MoEBlock(dim, num_experts, a3)])
        self.output = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embedding(ids)
        for layer in self.layers:
            h = layer(h)
        return self.output(h)
