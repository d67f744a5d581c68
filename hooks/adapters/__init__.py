"""Adapters that describe a model to the Monitor; :func:`auto_adapter` picks one for a model."""

from __future__ import annotations

from torch import nn

from healthwatch.hooks.adapters.base import (
    Adapter,
    BlockSpec,
    ModelSpec,
    RouterSpec,
    UnsupportedModelError,
    first_tensor,
    output_item,
    register_adapter,
    registered_adapters,
    topk_of_logits,
)
from healthwatch.hooks.adapters.generic import GenericAdapter

__all__ = [
    "Adapter",
    "BlockSpec",
    "GenericAdapter",
    "ModelSpec",
    "RouterSpec",
    "UnsupportedModelError",
    "auto_adapter",
    "first_tensor",
    "output_item",
    "register_adapter",
    "registered_adapters",
    "topk_of_logits",
]


def _load_builtin() -> None:
    # Framework adapters register themselves on import; missing optional modules are fine.
    import importlib

    for mod in ("reference", "huggingface", "megatron"):
        try:
            importlib.import_module(f"healthwatch.hooks.adapters.{mod}")
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("healthwatch.hooks.adapters"):
                continue
            raise


def auto_adapter(model: nn.Module) -> Adapter:
    """The first registered adapter that matches ``model``, else the generic adapter.

    Raises :class:`UnsupportedModelError` when nothing recognises the model, listing what each
    adapter looked for.
    """
    _load_builtin()
    for adapter in registered_adapters():
        if adapter.matches(model):
            return adapter
    generic = GenericAdapter()
    if generic.matches(model):
        return generic
    tried = ", ".join(a.name for a in registered_adapters()) or "none registered"
    raise UnsupportedModelError(
        f"no adapter recognises {type(model).__name__}: tried [{tried}] and the generic adapter "
        f"(no module name matches {generic.blocks!r}). Pass mon.watch(model, adapter=GenericAdapter(blocks=...))."
    )
