"""The reference training loop: WSD schedule, checkpoints, resume, faults, and the Monitor as a callback.

Built from small explicit pieces in the spirit of torchtitan: a :class:`TrainConfig`, the model,
the data source, an optimizer, a schedule and an optional :class:`~healthwatch.demo.faults.Fault`.
Monitoring is a callback the loop calls; the loop never depends on it.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from healthwatch.demo.data import SyntheticTokens
from healthwatch.demo.faults import Fault, backward_with_fault
from healthwatch.demo.model import HybridConfig, HybridLM


@dataclass
class TrainConfig:
    """Everything a training run needs, explicit (no globals)."""

    run: str
    store: Path
    precision: str = "nvfp4"
    model: HybridConfig = field(default_factory=HybridConfig)
    batch_size: int = 8
    seq_len: int = 64
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    total_steps: int = 400
    decay_fraction: float = 0.2
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 50
    checkpoint_dir: Path | None = None
    flush_every_steps: int = 10
    parent: str | None = None
    branch_step: int | None = None


def wsd_lr(step: int, cfg: TrainConfig) -> float:
    """Warmup-stable-decay: linear warmup, constant, linear decay over the last ``decay_fraction``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_start = int(cfg.total_steps * (1 - cfg.decay_fraction))
    if step < decay_start:
        return cfg.lr
    frac = min(1.0, (step - decay_start) / max(1, cfg.total_steps - decay_start))
    return cfg.lr * (1 - (1 - cfg.min_lr_ratio) * frac)


class Trainer:
    """Trains :class:`HybridLM` on :class:`SyntheticTokens`, calling an optional Monitor each step."""

    def __init__(self, cfg: TrainConfig, monitor: Any = None, fault: Fault | None = None) -> None:
        self.cfg = cfg
        torch.manual_seed(cfg.seed)
        self.model = HybridLM(dataclasses.replace(cfg.model, precision=cfg.precision))
        self.data = SyntheticTokens(cfg.model.vocab_size, cfg.seq_len, cfg.batch_size, seed=cfg.seed,
                                    extra_tokens=1 + cfg.model.mtp_heads)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, betas=(0.9, 0.95),
                                           weight_decay=cfg.weight_decay)
        self.monitor = monitor
        self.fault = fault
        self.step = 0
        self.tokens = 0
        self.checkpoints: dict[int, Path] = {}
        self.stop_requested = threading.Event()
        self.history: list[tuple[int, float]] = []
        if monitor is not None:
            monitor.watch(self.model)

    # -- checkpoints -------------------------------------------------------------------------
    def checkpoint_path(self, step: int) -> Path:
        """Where the checkpoint of ``step`` lives."""
        base = self.cfg.checkpoint_dir or (Path(self.cfg.store) / "checkpoints" / self.cfg.run)
        return Path(base) / f"step_{step:07d}.pt"

    def save_checkpoint(self) -> Path:
        """Save model, optimizer, data position, counters and monitor state."""
        path = self.checkpoint_path(self.step)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "data": self.data.state_dict(),
            "step": self.step,
            "tokens": self.tokens,
            "monitor": self.monitor.state_dict() if self.monitor is not None else None,
        }
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(path)
        self.checkpoints[self.step] = path
        if self.monitor is not None:
            self.monitor.event("checkpoint", step=self.step, message=str(path))
        return path

    def load_checkpoint(self, path: Path, load_optimizer: bool = True) -> None:
        """Resume from a checkpoint (the monitor state is restored when present)."""
        state = torch.load(path, weights_only=False)
        self.model.load_state_dict(state["model"])
        self.model.reset_faults()
        self.model.set_precision(self.cfg.precision)
        if load_optimizer:
            self.optimizer.load_state_dict(state["optimizer"])
        self.data.load_state_dict(state["data"])
        self.step = int(state["step"])
        self.tokens = int(state["tokens"])
        if self.monitor is not None and state.get("monitor"):
            self.monitor.load_state_dict(state["monitor"])

    # -- loop --------------------------------------------------------------------------------
    def train_step(self) -> torch.Tensor:
        """One optimiser step; returns the (device) train loss without syncing."""
        step = self.step
        if self.fault is not None:
            self.fault.before_step(self.model, step)
        lr = wsd_lr(step, self.cfg) * (self.fault.lr_scale(step) if self.fault is not None else 1.0)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batch = self.data.batch_at(self.data.position)
        self.data.position += 1
        out = self.model(batch)
        mtp = None
        if out.mtp_losses:
            mtp = self.cfg.model.mtp_loss_scale * torch.stack(out.mtp_losses).sum()
        backward_with_fault(self.model, out.loss + out.aux_loss, mtp, self.fault, step)
        if self.monitor is not None:
            # The wgrad norms and the clipping share one read of the gradients.
            self.monitor.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        else:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.tokens += batch.shape[0] * self.cfg.seq_len
        if self.monitor is not None:
            self.monitor.step(step, tokens=self.tokens, loss=out.loss, mtp_losses=out.mtp_losses, lr=lr)
        self.step += 1
        return out.loss.detach()

    def train(
        self,
        until_step: int,
        on_step: Callable[[int, Trainer], None] | None = None,
        diverged: Callable[[float], bool] | None = None,
    ) -> str:
        """Train until ``until_step`` (exclusive), a stop request, or divergence.

        Returns ``"done"``, ``"stopped"`` (an alert callback asked to stop) or ``"diverged"``.
        Checkpoints every ``checkpoint_every`` steps. The loss is read on the host only at
        checkpoint steps (the trainer's own choice; the Monitor never syncs).
        """
        while self.step < until_step:
            if self.stop_requested.is_set():
                return "stopped"
            loss = self.train_step()
            if on_step is not None:
                on_step(self.step, self)
            if self.step % self.cfg.checkpoint_every == 0:
                value = float(loss)
                self.history.append((self.step, value))
                if diverged is not None and (not math.isfinite(value) or diverged(value)):
                    return "diverged"
                self.save_checkpoint()
        return "done"
