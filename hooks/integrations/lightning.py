"""PyTorch Lightning callback: one line to stream health signals from ``trainer.fit()``.

>>> trainer = L.Trainer(callbacks=[hw.integrations.LightningCallback(store="hw-store", run="pl-run")])  # doctest: +SKIP

* ``setup``: creates the :class:`~healthwatch.hooks.monitor.Monitor` (unless one was given) and
  ``watch``-es the model: ``model=`` (an attribute name of the LightningModule, or a module), or
  by default the first direct child a model adapter recognises (e.g. ``self.model`` holding a
  Hugging Face NemotronH), else the LightningModule itself.
* ``on_before_optimizer_step``: ``after_backward()``: gradients are complete and, in Lightning,
  not yet clipped.
* ``on_train_batch_end``: adds the microbatch's loss (``outputs["loss"]``, already divided by
  ``accumulate_grad_batches``, so the step's sum is the loss backward saw) and tokens; when the
  optimizer stepped (``global_step`` advanced), ``step(global_step, tokens, loss, mtp_losses, lr)``.
  MTP losses are read from ``outputs["mtp_losses"]`` when ``training_step`` returns them.
* ``teardown``: closes the Monitor it created.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from healthwatch.hooks.adapters import GenericAdapter, UnsupportedModelError, auto_adapter


def _tokens_of(batch: Any, key: str) -> int:
    """Token count of a batch from shapes only (no device sync)."""
    if isinstance(batch, Mapping):
        v = batch.get(key)
        return int(v.numel()) if isinstance(v, torch.Tensor) else 0
    if isinstance(batch, torch.Tensor):
        return int(batch.numel())
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return int(batch[0].numel())
    return 0


def pick_model(module: nn.Module, model: str | nn.Module | None = None) -> nn.Module:
    """The module to watch inside a LightningModule (see the module docstring)."""
    if isinstance(model, nn.Module):
        return model
    if isinstance(model, str):
        try:
            return module.get_submodule(model)
        except AttributeError as exc:
            raise ValueError(f"LightningCallback(model={model!r}): {type(module).__name__} has no submodule {model!r}") from exc
    fallback: nn.Module | None = None
    errors: list[str] = []
    for _name, child in [*module.named_children(), ("", module)]:
        try:
            adapter = auto_adapter(child)
        except UnsupportedModelError as exc:
            errors.append(str(exc))
            continue
        if not isinstance(adapter, GenericAdapter):
            return child
        fallback = fallback or child
    if fallback is not None:
        return fallback
    raise UnsupportedModelError(
        f"no healthwatch adapter recognises {type(module).__name__} or its children; pass "
        f"LightningCallback(model='<attribute>') or adapter=...: {'; '.join(errors)[:500]}"
    )


class LightningCallback(pl.Callback):
    """``lightning.pytorch.Callback`` feeding a healthwatch Monitor.

    Args:
        store, run: where to write (``Monitor(store=..., run=...)``).
        monitor: an existing Monitor to use instead (then not closed at the end).
        model: what to watch (attribute name or module; default: see :func:`pick_model`).
        adapter: an adapter to use instead of the automatic choice.
        token_key: batch key holding the token ids (counted as tokens).
        **monitor_kwargs: passed to ``Monitor`` (``precision=``, ``parent=``, ``alerts=``, …).
    """

    def __init__(self, store: str | os.PathLike[str] | None = None, run: str = "run", monitor: Any = None,
                 model: str | nn.Module | None = None, adapter: Any = None, token_key: str = "input_ids",
                 **monitor_kwargs: Any) -> None:
        super().__init__()
        self.store, self.run, self.monitor = store, run, monitor
        self._own = monitor is None
        self.model, self.adapter, self.token_key = model, adapter, token_key
        self.monitor_kwargs = monitor_kwargs
        self._losses: list[torch.Tensor] = []
        self._mtp: list[list[torch.Tensor]] = []
        self._tokens = 0
        self._last_step = 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Create the Monitor and watch the model (fit only)."""
        if stage != "fit":
            return
        if self.monitor is None:
            from healthwatch.hooks.monitor import Monitor

            cfg = dict(self.monitor_kwargs.pop("config", None) or {})
            cfg.setdefault("trainer", {"framework": "lightning", "max_steps": trainer.max_steps,
                                       "accumulate_grad_batches": trainer.accumulate_grad_batches})
            self.monitor = Monitor(store=self.store, run=self.run, config=cfg, **self.monitor_kwargs)
        self.monitor.watch(pick_model(pl_module, self.model), adapter=self.adapter)
        self._last_step = trainer.global_step

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        """Gradients complete (before clipping): per-layer weight-gradient norms."""
        if self.monitor is not None:
            self.monitor.after_backward()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Accumulate the microbatch; close the step in the Monitor when the optimizer stepped."""
        if self.monitor is None:
            return
        self._tokens += _tokens_of(batch, self.token_key) * max(1, trainer.world_size)
        if isinstance(outputs, Mapping):
            loss = outputs.get("loss")
            if isinstance(loss, torch.Tensor):
                self._losses.append(loss.detach().float().reshape(()))
            mtp = outputs.get("mtp_losses")
            if isinstance(mtp, (list, tuple)) and mtp:
                self._mtp.append([m.detach().float().reshape(()) for m in mtp if isinstance(m, torch.Tensor)])
        elif isinstance(outputs, torch.Tensor):
            self._losses.append(outputs.detach().float().reshape(()))
        step = int(trainer.global_step)
        if step == self._last_step:
            return  # still accumulating
        self._last_step = step
        loss_t = torch.stack(self._losses).sum() if self._losses else None
        mtp_t = [torch.stack([m[h] for m in self._mtp]).sum() for h in range(min(map(len, self._mtp)))] if self._mtp else None
        lr = None
        if trainer.optimizers:
            lr = float(trainer.optimizers[0].param_groups[0]["lr"])
        self.monitor.step(step, tokens=self._tokens, loss=loss_t, mtp_losses=mtp_t, lr=lr)
        self._losses, self._mtp = [], []

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Close the Monitor this callback created (flushes the last rows)."""
        if stage == "fit" and self.monitor is not None and self._own:
            self.monitor.close()
            self.monitor = None
