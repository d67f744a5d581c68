"""One-line trainer integrations: Hugging Face ``Trainer`` and PyTorch Lightning callbacks.

``hw.integrations.HFCallback(store=..., run=...)`` and ``hw.integrations.LightningCallback(...)``
wrap a :class:`~healthwatch.hooks.monitor.Monitor`. The frameworks are optional extras
(``pip install healthwatch[hf]`` / ``[lightning]``): each class is imported only when asked for,
so ``import healthwatch`` never imports transformers or lightning.
"""

from __future__ import annotations

from typing import Any

__all__ = ["HFCallback", "LightningCallback"]


def __getattr__(name: str) -> Any:
    if name == "HFCallback":
        from healthwatch.hooks.integrations.hf import HFCallback

        return HFCallback
    if name == "LightningCallback":
        from healthwatch.hooks.integrations.lightning import LightningCallback

        return LightningCallback
    raise AttributeError(f"module 'healthwatch.hooks.integrations' has no attribute {name!r}")
