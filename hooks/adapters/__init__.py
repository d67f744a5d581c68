"""Adapters that describe a model to the Monitor; :func:`auto_adapter` picks one for a model."""

from __future__ import annotations

import logging

from torch import nn

from healthwatch import plugins
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

    for mod in ("huggingface", "megatron"):
        try:
            importlib.import_module(f"healthwatch.hooks.adapters.{mod}")
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("healthwatch.hooks.adapters"):
                continue
            raise


_broken_plugins: set[str] = set()


def _plugin_adapters() -> list[Adapter]:
    """Adapters contributed through :data:`healthwatch.plugins.ADAPTERS` (e.g. the demo model's).

    They are tried before the built-in ones. One that cannot be imported is skipped with a
    warning (once): a broken optional plugin must not stop watching a model it does not describe.
    """
    out: list[Adapter] = []
    for name in plugins.names(plugins.ADAPTERS):
        try:
            out.append(plugins.resolve(plugins.ADAPTERS, name)())
        except ImportError as exc:
            if name not in _broken_plugins:
                _broken_plugins.add(name)
                logging.getLogger("healthwatch.monitor").warning("healthwatch: adapter plugin skipped: %s", exc)
    return out


def auto_adapter(model: nn.Module) -> Adapter:
    """The first adapter that matches ``model``, else the generic adapter.

    Tried in order: plugin adapters (:data:`healthwatch.plugins.ADAPTERS`, e.g. the demo's
    reference adapter), then those registered with :func:`register_adapter` (Hugging Face,
    megatron-core, yours). Raises :class:`UnsupportedModelError` when nothing recognises the
    model, listing what each adapter looked for.
    """
    _load_builtin()
    candidates = _plugin_adapters() + registered_adapters()
    for adapter in candidates:
        if adapter.matches(model):
            return adapter
    generic = GenericAdapter()
    if generic.matches(model):
        return generic
    tried = ", ".join(a.name for a in candidates) or "none registered"
    raise UnsupportedModelError(
        f"no adapter recognises {type(model).__name__}: tried [{tried}] and the generic adapter "
        f"(no module name matches {generic.blocks!r}). Pass mon.watch(model, adapter=GenericAdapter(blocks=...))."
    )
