"""Adapter for Hugging Face ``transformers`` hybrid Mixture-of-Experts models.

Supported explicitly (verified on transformers 5.23, CPU, in ``tests/integrations``):

=====================  =========================  ================================================
model_type             blocks                     router (module → output)
=====================  =========================  ================================================
``nemotron_h``         ``model.layers[i]``        ``mixer.gate`` → ``(logits, weights, indices)``
``jamba``              ``model.layers[i]``        ``feed_forward.router`` → same
``qwen3_next``         ``model.layers[i]``        ``mlp.gate`` → same
``granitemoehybrid``   ``model.layers[i]``        ``block_sparse_moe.router`` → same
=====================  =========================  ================================================

Other ``transformers`` decoder models whose blocks sit in a ``layers`` list and whose MoE
routers follow one of these conventions (Mixtral, Qwen2/3-MoE, OLMoE, GraniteMoe, …) are
recognised too, as long as a router is found.

Older transformers releases had routers that returned only logits (a bare ``nn.Linear``) or
a sorted-dispatch tuple; the routing extractor handles both by taking the top-k of the router
logits, which is what those MoE blocks did themselves. Where a router returns top-k indices
(all current ones) those are used as they are, because the top-k of the logits can differ
from the real decision (Nemotron-H adds a correction bias and group-limits the choice).

Layer types: a block with a router is ``moe`` (its MaxVio and dead experts belong to it, and
alert rules select MoE layers by type), even where the block also holds a Mamba or attention
mixer (Jamba, GraniteMoeHybrid, Qwen3-Next). Linear-time recurrent mixers (Mamba-2, and
Qwen3-Next's Gated DeltaNet, which transformers calls ``linear_attention``) map to ``mamba``.

Only attribute access and class/module names are used to recognise a model, so importing
this module never imports ``transformers``.
"""

from __future__ import annotations

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
    register_adapter,
)

#: model_type → router path inside a block, for the families checked by the tests.
KNOWN_ROUTERS: dict[str, tuple[str, ...]] = {
    "nemotron_h": ("mixer.gate",),
    "jamba": ("feed_forward.router",),
    "qwen3_next": ("mlp.gate",),
    "granitemoehybrid": ("block_sparse_moe.router",),
}

#: Router paths tried, in order, for any other transformers model.
ROUTER_PATHS: tuple[str, ...] = (
    "mixer.gate",
    "feed_forward.router",
    "mlp.gate",
    "mlp.router",
    "block_sparse_moe.router",
    "block_sparse_moe.gate",
    "feed_forward.gate",
    "moe.gate",
    "moe.router",
)

# Block-type strings seen across transformers versions (``block_type``/``layer_types`` values and
# the legacy ``hybrid_override_pattern`` letters) → healthwatch layer types.
_TYPE_NAMES: dict[str, str] = {
    "mamba": "mamba",
    "mamba2": "mamba",
    "m": "mamba",
    "linear_attention": "mamba",
    "ssm": "mamba",
    "attention": "attention",
    "full_attention": "attention",
    "sliding_attention": "attention",
    "chunked_attention": "attention",
    "*": "attention",
    "moe": "moe",
    "e": "moe",
    "mlp": "mlp",
    "-": "mlp",
    "dense": "mlp",
}

_STACK_OWNERS = ("model", "backbone", "transformer", "decoder")


def _unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside DDP (``.module``) or ``torch.compile`` (``._orig_mod``) wrappers."""
    for _ in range(4):
        inner = getattr(model, "_orig_mod", None) or (
            model.module if type(model).__name__ in ("DistributedDataParallel", "DataParallel") else None
        )
        if not isinstance(inner, nn.Module):
            break
        model = inner
    return model


def _is_transformers_model(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return type(model).__module__.startswith("transformers.") and isinstance(
        getattr(config, "model_type", None), str
    )


def find_layers(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The decoder-layer list of a transformers model and its dotted name, or ``None``."""
    candidates: list[tuple[str, nn.Module]] = [("", model)]
    for owner in _STACK_OWNERS:
        sub = getattr(model, owner, None)
        if isinstance(sub, nn.Module):
            candidates.append((owner, sub))
            # e.g. ForConditionalGeneration → model.language_model.layers
            lm = getattr(sub, "language_model", None)
            if isinstance(lm, nn.Module):
                candidates.append((f"{owner}.language_model", lm))
    for prefix, holder in candidates:
        layers = getattr(holder, "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return (f"{prefix}.layers" if prefix else "layers"), layers
    return None


def _is_router(parent: nn.Module | None, router: nn.Module | None) -> bool:
    # A dense MLP may name a projection ``gate``; a real router sits next to its experts.
    return isinstance(router, nn.Module) and parent is not None and hasattr(parent, "experts")


def find_router(layer: nn.Module, paths: tuple[str, ...]) -> tuple[str, nn.Module] | None:
    """The first ``paths`` entry that names a router (a module whose parent holds ``experts``)."""
    for path in paths:
        parent_path, _, leaf = path.rpartition(".")
        parent = _get(layer, parent_path) if parent_path else layer
        router = getattr(parent, leaf, None) if parent is not None else None
        if _is_router(parent, router):
            return path, router  # type: ignore[return-value]
    return None


def _get(module: nn.Module, path: str) -> nn.Module | None:
    for part in path.split("."):
        module = getattr(module, part, None)  # type: ignore[assignment]
        if not isinstance(module, nn.Module):
            return None
    return module


def _config_int(config: Any, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def router_experts_and_topk(router: nn.Module, moe: nn.Module | None, config: Any) -> tuple[int | None, int | None]:
    """Routed experts and top-k of a router, from the router, its MoE block, or the model config."""
    experts = _config_int(router, "num_experts", "n_routed_experts", "num_local_experts")
    if experts is None and moe is not None:
        experts = _config_int(moe, "num_experts", "n_routed_experts", "num_local_experts")
    if experts is None:
        if isinstance(router, nn.Linear):
            experts = router.out_features
        elif isinstance(getattr(router, "weight", None), torch.Tensor) and router.weight.dim() == 2:
            experts = int(router.weight.shape[0])
    if experts is None:
        experts = _config_int(config, "n_routed_experts", "num_local_experts", "num_experts")
    top_k = _config_int(router, "top_k", "topk", "num_experts_per_tok")
    if top_k is None and moe is not None:
        top_k = _config_int(moe, "top_k", "topk", "num_experts_per_tok")
    if top_k is None:
        top_k = _config_int(config, "num_experts_per_tok", "moe_topk", "top_k")
    return experts, top_k


def hf_routing(top_k: int, num_experts: int, name: str) -> RoutingExtractor:
    """Routing extractor for transformers routers of any recent or older convention.

    Takes an integer ``[..., top_k]`` tensor in the output (top-k indices) when there is one;
    otherwise the top-k of a ``[..., num_experts]`` float tensor (router logits), which is how
    routers that returned only logits were used by their MoE block.
    """

    def extract(_m: nn.Module, _i: tuple[Any, ...], output: Any) -> torch.Tensor:
        items = output if isinstance(output, (tuple, list)) else (output,)
        logits = None
        for t in items:
            if not isinstance(t, torch.Tensor) or t.dim() == 0:
                continue
            if not t.is_floating_point() and t.dtype != torch.bool:
                if t.dim() >= 2 and t.shape[-1] == top_k:
                    return t
            elif logits is None and t.is_floating_point() and t.shape[-1] == num_experts:
                logits = t
        if logits is not None:
            flat = logits.detach().reshape(-1, num_experts)
            return torch.topk(flat, top_k, dim=-1).indices
        shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in items]
        raise UnsupportedModelError(
            f"router {name}: output {shapes} holds neither top-k indices [tokens, {top_k}] nor logits "
            f"[tokens, {num_experts}]; pass mon.watch(model, adapter=GenericAdapter(..., routing=...))"
        )

    extract.__name__ = f"hf_routing_{top_k}_of_{num_experts}"
    return extract


def _map_type(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    key = value.strip().lower()
    if key in _TYPE_NAMES:
        return _TYPE_NAMES[key]
    # Unknown future names: go by what they say they are.
    for words, typ in ((("mamba", "ssm", "linear", "delta", "recurrent"), "mamba"),
                       (("attention", "attn"), "attention"), (("moe", "expert"), "moe"),
                       (("mlp", "dense", "ffn"), "mlp")):
        if any(w in key for w in words):
            return typ
    return None


def _config_type(config: Any, index: int) -> Any:
    for name in ("layers_block_type", "layer_types", "block_types"):
        types = getattr(config, name, None)
        if isinstance(types, (list, tuple)) and index < len(types):
            return types[index]
    pattern = getattr(config, "hybrid_override_pattern", None)
    if isinstance(pattern, str) and index < len(pattern):
        return pattern[index]
    return None


def block_type(layer: nn.Module, index: int, config: Any, routed: bool) -> str:
    """healthwatch layer type of decoder layer ``index`` (see the module docstring for the rules)."""
    if routed:
        return "moe"
    for attr in ("block_type", "layer_type"):
        typ = _map_type(getattr(layer, attr, None))
        if typ is not None:
            return typ
    typ = _map_type(_config_type(config, index))
    if typ is not None and typ != "moe":  # a config saying "moe" for a layer without a router: look closer
        return typ
    # Jamba keeps no type string on its layers: the mixer's attribute name tells.
    for child, typ in (("mamba", "mamba"), ("linear_attn", "mamba"), ("self_attn", "attention"),
                       ("attention", "attention")):
        if isinstance(getattr(layer, child, None), nn.Module):
            return typ
    names = " ".join(type(m).__name__.lower() for m in layer.modules())
    if "mamba" in names or "deltanet" in names:
        return "mamba"
    if "attention" in names:
        return "attention"
    return "mlp"


class HuggingFaceAdapter:
    """Describes a transformers hybrid MoE decoder: its layers, their types, routers, output and embedding."""

    name = "huggingface"

    def matches(self, model: nn.Module) -> bool:
        """True for the supported families, and for other transformers decoders with a router we can find."""
        model = _unwrap(model)
        if not _is_transformers_model(model):
            return False
        found = find_layers(model)
        if found is None:
            return False
        if model.config.model_type in KNOWN_ROUTERS:
            return True
        # An unknown family is only claimed when it is a MoE we understand; dense models fall through
        # to the generic adapter.
        return any(find_router(layer, ROUTER_PATHS) is not None for layer in found[1])

    def inspect(self, model: nn.Module) -> ModelSpec:
        """Blocks ``<base>.layers[i]`` with types, routers with their extractors, and parameter groups."""
        model = _unwrap(model)
        config = getattr(model, "config", None)
        found = find_layers(model)
        if found is None:
            raise UnsupportedModelError(
                f"{type(model).__name__}: no decoder layer list found at "
                f"{', '.join(o + '.layers' for o in ('', *_STACK_OWNERS))}"
            )
        stack_name, layers = found
        model_type = getattr(config, "model_type", "")
        paths = KNOWN_ROUTERS.get(model_type, ()) + ROUTER_PATHS
        blocks: list[BlockSpec] = []
        routers: list[RouterSpec] = []
        problems: list[str] = []
        for i, layer in enumerate(layers):
            name = f"{stack_name}.{i}"
            hit = find_router(layer, paths)
            ltype = block_type(layer, i, config, routed=hit is not None)
            blocks.append(BlockSpec(index=i, layer_type=ltype, module=layer, name=name))
            if hit is None:
                if model_type in KNOWN_ROUTERS and _map_type(_config_type(config, i)) == "moe":
                    problems.append(f"layer {i} is a MoE layer in the config but has no router at {paths[0]}")
                continue
            rpath, router = hit
            moe = _get(layer, rpath.rpartition(".")[0])
            experts, top_k = router_experts_and_topk(router, moe, config)
            if experts is None or top_k is None:
                problems.append(f"router {name}.{rpath}: experts={experts} top_k={top_k} (one is unknown)")
                continue
            routers.append(RouterSpec(layer=i, module=router, num_experts=experts,
                                      extract=hf_routing(top_k, experts, f"{name}.{rpath}"),
                                      layer_type=ltype, name=f"{name}.{rpath}"))
        if problems:
            raise UnsupportedModelError(f"{type(model).__name__} ({model_type}): " + "; ".join(problems))
        params_by_block(model, blocks)
        special: dict[str, list[nn.Parameter]] = {}
        for group, getter in (("output", "get_output_embeddings"), ("embedding", "get_input_embeddings")):
            module = getattr(model, getter, lambda: None)()
            if isinstance(module, nn.Module):
                ps = [p for p in module.parameters() if p.requires_grad]
                if ps:
                    special[group] = ps
        return ModelSpec(
            blocks=blocks,
            routers=routers,
            special_params=special,
            all_params=[p for p in model.parameters() if p.requires_grad],
            adapter=f"{self.name}:{model_type}",
        )


register_adapter(HuggingFaceAdapter)
