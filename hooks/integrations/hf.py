"""Hugging Face ``Trainer`` callback: one line to stream health signals from ``trainer.train()``.

>>> trainer = Trainer(model=model, args=args, train_dataset=ds,                       # doctest: +SKIP
...                   callbacks=[hw.integrations.HFCallback(store="hw-store", run="nemotron-h-sft")])

What it does at each point of the Trainer's loop:

* ``on_train_begin``: creates the :class:`~healthwatch.hooks.monitor.Monitor` (unless one was
  given), ``watch``-es the model (adapter picked automatically: NemotronH, Jamba, Qwen3-Next,
  GraniteMoeHybrid, …) and hooks the model's forward to capture its loss, any MTP losses it
  returns (``mtp_losses`` / ``mtp_loss`` in its output) and the tokens of each microbatch.
* ``on_pre_optimizer_step``: ``after_backward()`` (per-layer weight-gradient norms) and the
  step's learning rate. The Trainer
  calls it after gradient clipping, so with ``max_grad_norm`` set the norms are post-clip (HF's
  own logged ``grad_norm`` is the pre-clip total).
* ``on_step_end``: ``step(global_step, tokens=…, loss=…, mtp_losses=…, lr=…)``; losses stay
  device tensors (no ``.item()``). Tokens are cumulative over ranks (``input_ids`` elements x
  world size).
* ``on_train_end``: closes the Monitor it created (flushes the last rows).
"""

from __future__ import annotations

import os
from typing import Any

from transformers import TrainerCallback

from healthwatch.hooks.integrations.common import ForwardCapture


class HFCallback(TrainerCallback):
    """``transformers.TrainerCallback`` feeding a healthwatch Monitor.

    Args:
        store, run: where to write (``Monitor(store=..., run=...)``).
        monitor: an existing Monitor to use instead (it is then not closed at the end).
        token_key: forward argument holding the token ids (counted as tokens).
        **monitor_kwargs: passed to ``Monitor`` (``precision=``, ``parent=``, ``alerts=``, …).
    """

    def __init__(self, store: str | os.PathLike[str] | None = None, run: str = "run", monitor: Any = None,
                 token_key: str = "input_ids", **monitor_kwargs: Any) -> None:
        self.store, self.run = store, run
        self.monitor = monitor
        self._own = monitor is None
        self.token_key = token_key
        self.monitor_kwargs = monitor_kwargs
        self.capture: ForwardCapture | None = None
        self._world = 1
        self._lr_scheduler: Any = None
        self._lr: float | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        """Create the Monitor, watch the model, hook its forward."""
        if model is None:
            raise ValueError("HFCallback needs the model: the Trainer passes it to on_train_begin")
        if self.monitor is None:
            from healthwatch.hooks.monitor import Monitor

            cfg = dict(self.monitor_kwargs.pop("config", None) or {})
            cfg.setdefault("trainer", {"framework": "transformers", "max_steps": args.max_steps,
                                       "learning_rate": args.learning_rate,
                                       "gradient_accumulation_steps": args.gradient_accumulation_steps,
                                       "per_device_train_batch_size": args.per_device_train_batch_size})
            self.monitor = Monitor(store=self.store, run=self.run, config=cfg, **self.monitor_kwargs)
        self.monitor.watch(model)
        if self.capture is not None:
            self.capture.remove()
        self.capture = ForwardCapture(model, self.token_key)
        self._world = max(1, int(getattr(args, "world_size", 1) or 1))
        self._lr_scheduler = kwargs.get("lr_scheduler")

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Gradients are complete: record the per-layer weight-gradient norms and the step's learning rate."""
        if self.monitor is not None:
            self.monitor.after_backward()
        # The rate this optimizer step uses: the scheduler steps before on_step_end.
        sched = kwargs.get("lr_scheduler") or self._lr_scheduler
        self._lr = None
        if sched is not None:
            try:
                self._lr = float(sched.get_last_lr()[0])  # a Python float kept by the scheduler: no sync
            except (AttributeError, IndexError, TypeError):
                self._lr = None

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Close the step in the Monitor with the captured losses, tokens and learning rate."""
        if self.monitor is None or self.capture is None:
            return
        loss, mtp = self.capture.take()
        self.monitor.step(int(state.global_step), tokens=self.capture.tokens * self._world, loss=loss,
                          mtp_losses=mtp or None, lr=self._lr)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Remove the hooks; close the Monitor if this callback created it."""
        if self.capture is not None:
            self.capture.remove()
            self.capture = None
        if self.monitor is not None and self._own:
            self.monitor.close()
            self.monitor = None
