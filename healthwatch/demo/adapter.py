"""Adapter for the reference trainer's model (:class:`healthwatch.demo.model.HybridLM`).

It lives with the demo because it knows the demo model; the hooks never import it. ``auto_adapter``
finds it through the ``"reference"`` entry of :data:`healthwatch.plugins.ADAPTERS` (wired in
``healthwatch/__init__``), so ``mon.watch(HybridLM(...))`` needs no ``adapter=``.
"""

from __future__ import annotations

from torch import nn

from healthwatch.hooks.adapters.base import (
    BlockSpec,
    ModelSpec,
    RouterSpec,
    output_item,
    params_by_block,
)


class ReferenceAdapter:
    """Blocks ``model.blocks[i]`` (with ``layer_type``), MTP blocks after them (type ``mtp``),
    routers at ``block.mixer.router`` returning ``(probs, topk_weights, topk_indices)``."""

    name = "reference"

    def matches(self, model: nn.Module) -> bool:
        """True for the demo's HybridLM (checked without importing it unless the class name fits)."""
        if type(model).__name__ != "HybridLM":
            return False
        from healthwatch.demo.model import HybridLM

        return isinstance(model, HybridLM)

    def inspect(self, model: nn.Module) -> ModelSpec:
        """Describe the stack, its routers and the output/embedding/MTP parameter groups."""
        blocks: list[BlockSpec] = []
        routers: list[RouterSpec] = []
        stack = [(b, b.layer_type, f"blocks.{i}") for i, b in enumerate(model.blocks)]
        if model.mtp is not None:
            # The MTP block runs once per depth; its statistics average over the depths of a step.
            stack += [(b, "mtp", f"mtp.blocks.{j}") for j, b in enumerate(model.mtp.blocks)]
        for index, (block, ltype, name) in enumerate(stack):
            blocks.append(BlockSpec(index=index, layer_type=ltype, module=block, name=name))
            router = block.router
            if router is not None:
                routers.append(RouterSpec(layer=index, module=router, num_experts=router.num_experts,
                                          extract=output_item(2), layer_type=ltype, name=f"{name}.mixer.router"))
        params_by_block(model, blocks)
        special = {
            "output": list(model.output.parameters()),
            "embedding": list(model.embedding.parameters()),
        }
        if model.mtp is not None:
            special["mtp"] = [p for p in model.mtp.parameters() if p.requires_grad]
        return ModelSpec(blocks=blocks, routers=routers, special_params=special,
                         all_params=[p for p in model.parameters() if p.requires_grad], adapter=self.name)

