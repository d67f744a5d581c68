"""The adapter protocol: what the Monitor needs to know about a model, and how adapters are found.

An adapter turns a model into a :class:`ModelSpec`: its blocks (index, type, module, parameters),
its routers and how to read routing decisions from their outputs, and the special parameter
groups (output layer, embedding, MTP). Adapters never touch the Monitor; the Monitor calls them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

#: Reads routing decisions from a router call: ``(module, inputs, output) -> Tensor`` returning either
#: top-k expert indices (integer tensor of any shape) or a routing map ``[tokens, experts]`` (bool/float).
RoutingExtractor = Callable[[nn.Module, tuple[Any, ...], Any], torch.Tensor]

#: Reads the residual stream ``[..., hidden]`` from a block call: ``(module, inputs, output) -> Tensor``.
HiddenExtractor = Callable[[nn.Module, tuple[Any, ...], Any], torch.Tensor]


def first_tensor(_module: nn.Module, _inputs: tuple[Any, ...], output: Any) -> torch.Tensor:
    """The block output itself, or its first element when the block returns a tuple (megatron, HF)."""
    while isinstance(output, (tuple, list)):
        output = output[0]
    if hasattr(output, "last_hidden_state"):
        output = output.last_hidden_state
    return output


def output_item(index: int) -> RoutingExtractor:
    """Extractor taking element ``index`` of a router's tuple output (e.g. top-k indices at 2)."""

    def extract(_m: nn.Module, _i: tuple[Any, ...], output: Any) -> torch.Tensor:
        return output[index]

    extract.__name__ = f"output_item_{index}"
    return extract


def topk_of_logits(top_k: int, index: int | None = None) -> RoutingExtractor:
    """Extractor computing top-k indices from router logits (output, or ``output[index]``)."""

    def extract(_m: nn.Module, _i: tuple[Any, ...], output: Any) -> torch.Tensor:
        logits = output if index is None else output[index]
        if logits.dim() > 2:
            logits = logits.reshape(-1, logits.shape[-1])
        return torch.topk(logits.detach(), top_k, dim=-1).indices

    extract.__name__ = f"topk_of_logits_{top_k}"
    return extract


@dataclass
class BlockSpec:
    """One block of the stack: global ``index``, ``layer_type``, module, and its parameters."""

    index: int
    layer_type: str
    module: nn.Module
    name: str = ""
    params: list[nn.Parameter] = field(default_factory=list)
    hidden: HiddenExtractor = first_tensor
    #: False for blocks whose output is not the residual stream (then no residual norm is logged).
    residual: bool = True


@dataclass
class RouterSpec:
    """A router of MoE layer ``layer`` with ``num_experts`` experts and how to read its decisions."""

    layer: int
    module: nn.Module
    num_experts: int
    extract: RoutingExtractor
    layer_type: str = "moe"
    name: str = ""


@dataclass
class ModelSpec:
    """Everything the Monitor hooks: blocks, routers and special parameter groups."""

    blocks: list[BlockSpec]
    routers: list[RouterSpec] = field(default_factory=list)
    #: ``output``, ``embedding``, ``mtp`` → parameters; each gives a ``grad_norm/<group>`` scalar.
    special_params: dict[str, list[nn.Parameter]] = field(default_factory=dict)
    all_params: list[nn.Parameter] = field(default_factory=list)
    adapter: str = ""
    #: Optional callable returning per-MTP-head losses logged by the framework itself (megatron).
    mtp_loss_reader: Callable[[], Sequence[torch.Tensor]] | None = None
    #: ``id(param)`` → factor on that parameter's squared gradient norm. Under model parallelism a
    #: parameter split into N shards across the Monitor's process group needs N, because the group
    #: reduction averages squared norms over ranks (megatron tensor/expert-parallel weights).
    grad_scale: dict[int, float] = field(default_factory=dict)
    #: Special groups (``total``, ``embedding`` …) whose global norm this Monitor computes but another
    #: Monitor of the same run records: under pipeline parallelism every stage computes the global
    #: ``grad_norm/total`` (its all-reduce must pair up on every stage), and only the first stage writes
    #: it, so the run holds one row per step, not one per stage.
    recorded_elsewhere: frozenset[str] = frozenset()

    @property
    def num_layers(self) -> int:
        """Number of blocks (including MTP blocks)."""
        return len(self.blocks)


class UnsupportedModelError(TypeError):
    """The model could not be understood by any adapter; the message lists what was missing."""


@runtime_checkable
class Adapter(Protocol):
    """What an adapter implements. ``matches`` must be cheap; ``inspect`` may raise
    :class:`UnsupportedModelError` naming what it could not find."""

    name: str

    def matches(self, model: nn.Module) -> bool:
        """True when this adapter recognises ``model``."""
        ...

    def inspect(self, model: nn.Module) -> ModelSpec:
        """Describe ``model`` for the Monitor."""
        ...


_REGISTRY: list[Callable[[], Adapter]] = []


def register_adapter(factory: Callable[[], Adapter], first: bool = False) -> None:
    """Register an adapter factory consulted by :func:`auto_adapter` (in registration order)."""
    if first:
        _REGISTRY.insert(0, factory)
    else:
        _REGISTRY.append(factory)


def registered_adapters() -> list[Adapter]:
    """Instances of every registered adapter, in the order they are tried."""
    return [f() for f in _REGISTRY]


def params_by_block(model: nn.Module, blocks: list[BlockSpec]) -> None:
    """Fill each block's ``params`` with the trainable parameters of its module (deduplicated).

    Parameters shared by several blocks (e.g. MTP heads sharing weights) count once, in the
    first block that owns them.
    """
    seen: set[int] = set()
    for block in blocks:
        if block.params:
            seen.update(id(p) for p in block.params)
            continue
        own = []
        for p in block.module.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                own.append(p)
        block.params = own
