r"""The generic adapter: any ``nn.Module`` stack described by module-name patterns.

Example::

    GenericAdapter(blocks=r"^layers\.\d+$", routers=r"\.router$",
                   layer_types={r"\.mixer$": "mamba", r"\.attn$": "attention"})
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from healthwatch.hooks.adapters.base import (
    BlockSpec,
    ModelSpec,
    RouterSpec,
    RoutingExtractor,
    UnsupportedModelError,
    params_by_block,
)

_EXPERT_ATTRS = ("num_experts", "n_routed_experts", "num_local_experts", "num_moe_experts", "n_experts")
_TOPK_ATTRS = ("top_k", "topk", "num_experts_per_tok", "moe_router_topk", "k")


def guess_num_experts(router: nn.Module) -> int | None:
    """Experts of a router from common attribute names, its config, or its weight's first dim."""
    for holder in (router, getattr(router, "config", None)):
        for attr in _EXPERT_ATTRS:
            value = getattr(holder, attr, None) if holder is not None else None
            if isinstance(value, int) and value > 0:
                return value
    if isinstance(router, nn.Linear):
        return router.out_features
    weight = getattr(router, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return int(weight.shape[0])
    return None


def guess_top_k(module: nn.Module) -> int | None:
    """Top-k of a router (or its parent MoE block) from common attribute names or its config."""
    for holder in (module, getattr(module, "config", None)):
        for attr in _TOPK_ATTRS:
            value = getattr(holder, attr, None) if holder is not None else None
            if isinstance(value, int) and value > 0:
                return value
    return None


def auto_routing(top_k: int | None) -> RoutingExtractor:
    """Extractor that finds the routing decision in whatever a router returns.

    An integer tensor in the output is taken as top-k indices, a bool tensor as a routing map,
    and a lone float ``[tokens, experts]`` tensor as logits (top-k applied, ``top_k`` required).
    """

    def extract(_m: nn.Module, _i: tuple[Any, ...], output: Any) -> torch.Tensor:
        items = list(output) if isinstance(output, (tuple, list)) else [output]
        tensors = [t for t in items if isinstance(t, torch.Tensor)]
        for t in tensors:
            if not t.is_floating_point() and t.dtype != torch.bool:
                return t
        for t in tensors:
            if t.dtype == torch.bool:
                return t
        if top_k is None:
            raise UnsupportedModelError(
                "router returned logits only and its top-k is unknown: pass top_k= to the adapter"
            )
        logits = tensors[0]
        logits = logits.reshape(-1, logits.shape[-1])
        return torch.topk(logits.detach(), top_k, dim=-1).indices

    return extract


def classify_block(module: nn.Module, has_router: bool) -> str:
    """Guess a block's layer type from the class names inside it."""
    if has_router:
        return "moe"
    names = " ".join(type(m).__name__.lower() for m in module.modules())
    if "mamba" in names or "ssm" in names or "mixer2" in names:
        return "mamba"
    if "attention" in names or "attn" in names:
        return "attention"
    return "mlp"


@dataclass
class GenericAdapter:
    """Describe a model by regular expressions over ``named_modules()`` names.

    ``blocks`` matches the blocks of the stack in order; ``routers`` matches router modules,
    each attributed to the block whose name prefixes it. ``layer_types`` maps a regex over a
    block's name (or a child's name) to a type; blocks not matched are classified by the class
    names they contain. ``mtp`` names blocks that are multi-token-prediction heads.
    """

    blocks: str = r"(^|\.)(layers|blocks|h|layer)\.\d+$"
    routers: str = r"\.(router|gate)$"
    layer_types: dict[str, str] = field(default_factory=dict)
    output: str = r"(^|\.)(lm_head|output|output_layer)$"
    embedding: str = r"(^|\.)(embed_tokens|embedding|embeddings|wte|tok_embeddings)$"
    mtp: str = r"(^|\.)mtp(\.|$)"
    top_k: int | None = None
    num_experts: int | None = None
    routing: RoutingExtractor | None = None
    name: str = "generic"

    def matches(self, model: nn.Module) -> bool:
        """The generic adapter is the fallback: it matches anything with blocks."""
        rx = re.compile(self.blocks)
        return any(rx.search(n) for n, _ in model.named_modules())

    def inspect(self, model: nn.Module) -> ModelSpec:
        """Find blocks, routers and special parameters by pattern; raise naming what is missing."""
        named = list(model.named_modules())
        block_rx, router_rx = re.compile(self.blocks), re.compile(self.routers)
        block_names = [(n, m) for n, m in named if n and block_rx.search(n)]
        # Nested matches (a block inside a block) keep the outermost.
        block_names = [
            (n, m) for n, m in block_names if not any(n != o and n.startswith(o + ".") for o, _ in block_names)
        ]
        if not block_names:
            raise UnsupportedModelError(
                f"{type(model).__name__}: no blocks found (no module name matches {self.blocks!r}). "
                "Pass GenericAdapter(blocks=...) with a pattern for your block names, e.g. r'^model\\.layers\\.\\d+$'."
            )
        routers_by_block: dict[str, list[tuple[str, nn.Module]]] = {}
        for n, m in named:
            if router_rx.search(n) and not isinstance(m, nn.ModuleList):
                owner = next((b for b, _ in block_names if n.startswith(b + ".")), None)
                if owner is not None:
                    routers_by_block.setdefault(owner, []).append((n, m))
        mtp_rx = re.compile(self.mtp)
        blocks: list[BlockSpec] = []
        routers: list[RouterSpec] = []
        problems: list[str] = []
        for i, (bname, module) in enumerate(block_names):
            rlist = routers_by_block.get(bname, [])
            ltype = None
            for pattern, typ in self.layer_types.items():
                rx = re.compile(pattern)
                if rx.search(bname) or any(rx.search(c) for c, _ in module.named_modules(prefix=bname)):
                    ltype = typ
                    break
            if ltype is None:
                ltype = "mtp" if mtp_rx.search(bname) else classify_block(module, bool(rlist))
            blocks.append(BlockSpec(index=i, layer_type=ltype, module=module, name=bname))
            for rname, router in rlist[:1]:
                experts = self.num_experts or guess_num_experts(router)
                top_k = self.top_k or guess_top_k(router) or guess_top_k(_parent(model, rname))
                if experts is None:
                    problems.append(f"router {rname}: number of experts unknown (pass num_experts=)")
                    continue
                routers.append(
                    RouterSpec(
                        layer=i,
                        module=router,
                        num_experts=experts,
                        extract=self.routing or auto_routing(top_k),
                        layer_type=ltype,
                        name=rname,
                    )
                )
        if problems:
            raise UnsupportedModelError(f"{type(model).__name__}: " + "; ".join(problems))
        params_by_block(model, blocks)
        special: dict[str, list[nn.Parameter]] = {}
        for group, pattern in (("output", self.output), ("embedding", self.embedding)):
            rx = re.compile(pattern)
            ps = [p for n, m in named if rx.search(n) for p in m.parameters() if p.requires_grad]
            if ps:
                special[group] = _dedup(ps)
        mtp_params = [p for b in blocks if b.layer_type == "mtp" for p in b.params]
        if mtp_params:
            special["mtp"] = mtp_params
        return ModelSpec(
            blocks=blocks,
            routers=routers,
            special_params=special,
            all_params=[p for p in model.parameters() if p.requires_grad],
            adapter=self.name,
        )


def _parent(model: nn.Module, name: str) -> nn.Module:
    parent = name.rsplit(".", 1)[0] if "." in name else ""
    return model.get_submodule(parent) if parent else model


def _dedup(params: list[nn.Parameter]) -> list[nn.Parameter]:
    seen: set[int] = set()
    out = []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out
