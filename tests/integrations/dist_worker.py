"""Worker for ``test_distributed.py``, run under ``torchrun --nproc-per-node 2`` (gloo, CPU).

Each rank routes *different* tokens (forced routing drawn from a per-rank, per-step seed), mimics
DDP by averaging gradients itself, feeds the Monitor, and writes what it saw (its own expert
counts, loss, residual RMS and gradient norms) to ``OUT/rank<k>.json`` so that the test can compute
the global statistics independently from the store.

Usage: ``python -m torch.distributed.run --nproc-per-node 2 dist_worker.py STORE OUT [STEPS]``
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import healthwatch as hw

EXPERTS, TOP_K, TOKENS, DIM, VOCAB = 8, 2, 12, 8, 32
MOE_LAYERS = (1, 3)


class ForcedRouter(nn.Module):
    """Returns ``(logits, weights, indices)`` like a transformers router, with indices set from outside."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(DIM, EXPERTS, bias=False)
        self.num_experts, self.top_k = EXPERTS, TOP_K
        self.assign = torch.zeros(TOKENS, TOP_K, dtype=torch.long)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self.proj(x)
        idx = self.assign[: x.shape[0]]
        return logits, torch.softmax(logits, -1).gather(-1, idx), idx


class Block(nn.Module):
    """Residual block; with ``moe`` it calls a forced router and scales its mixer by the route weights."""

    def __init__(self, moe: bool) -> None:
        super().__init__()
        self.mix = nn.Linear(DIM, DIM)
        self.router = ForcedRouter() if moe else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = self.mix(h)
        if self.router is not None:
            _logits, w, _idx = self.router(h.reshape(-1, DIM))
            out = out * w.sum(-1).reshape(h.shape[:-1] + (1,))
        return h + torch.tanh(out)


class TinyLM(nn.Module):
    """embedding → 4 blocks (MoE at 1 and 3) → output."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList([Block(i in MOE_LAYERS) for i in range(4)])
        self.output = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embedding(ids)
        for layer in self.layers:
            h = layer(h)
        return self.output(h)


def assignment(rank: int, step: int, layer: int) -> torch.Tensor:
    """Per-rank routing: rank 0 never uses the last two experts, rank 1 never the first; expert 6 is
    used by rank 1 only (alive globally, dead on rank 0), expert 7 by nobody at layer 1."""
    g = torch.Generator().manual_seed(1000 * rank + 10 * step + layer)
    pool = list(range(0, EXPERTS - 2)) if rank == 0 else list(range(1, EXPERTS - (1 if layer == 1 else 0)))
    rows = [torch.tensor(pool)[torch.randperm(len(pool), generator=g)[:TOP_K]] for _ in range(TOKENS)]
    return torch.stack(rows)


def main() -> None:
    store, out = sys.argv[1], Path(sys.argv[2])
    steps = int(sys.argv[3]) if len(sys.argv) > 3 else 5
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # same weights on every rank, as DDP would broadcast
    model = TinyLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    # HW_PER_RANK=1 (test_per_rank.py): every rank also writes its own stats as ``dist.rank<k>``.
    mon = hw.Monitor(store=store, run="dist", flush_every_steps=2, expert_load_every=1, flush_every_s=1e9,
                     per_rank=os.environ.get("HW_PER_RANK") == "1")
    spec = mon.watch(model)
    seen: dict[str, dict] = {"counts": {}, "loss": {}, "resid_mean": {}, "resid_max": {}, "wgrad": {},
                             "layers": [b.layer_type for b in spec.blocks]}
    torch.manual_seed(100 + rank)  # different data per rank
    for step in range(steps):
        for i in MOE_LAYERS:
            model.layers[i].router.assign = assignment(rank, step, i)
        resid: dict[int, torch.Tensor] = {}
        handles = [
            layer.register_forward_hook(
                lambda _m, _i, o, k=k, into=resid: into.__setitem__(k, o.detach().pow(2).mean(-1).sqrt())
            )
            for k, layer in enumerate(model.layers)
        ]
        ids = torch.randint(0, VOCAB, (1, TOKENS))
        loss = nn.functional.cross_entropy(model(ids).view(-1, VOCAB), ids.view(-1))
        for h in handles:
            h.remove()
        loss.backward()
        for p in model.parameters():  # what DDP does: every rank ends with the mean gradient
            dist.all_reduce(p.grad)
            p.grad /= world
        mon.after_backward()
        seen["wgrad"][step] = [
            sum(float(p.grad.double().pow(2).sum()) for p in layer.parameters()) ** 0.5 for layer in model.layers
        ]
        opt.step()
        opt.zero_grad()
        mon.step(step, tokens=(step + 1) * TOKENS * world, loss=loss.detach())
        seen["counts"][step] = {
            i: torch.bincount(model.layers[i].router.assign.reshape(-1), minlength=EXPERTS).tolist() for i in MOE_LAYERS
        }
        seen["loss"][step] = float(loss.detach())
        seen["resid_mean"][step] = [float(resid[k].double().mean()) for k in range(len(model.layers))]
        seen["resid_max"][step] = [float(resid[k].max()) for k in range(len(model.layers))]
    mon.close()
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "world": world, "pid": os.getpid(), **seen}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
