"""Pieces shared by the trainer integrations: capturing losses and token counts from a model's
forward passes without a host sync."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

#: Output attributes / keys read as MTP head losses, in order of preference.
MTP_KEYS = ("mtp_losses", "mtp_loss")


def _get(out: Any, key: str) -> Any:
    if isinstance(out, Mapping):
        return out.get(key)
    return getattr(out, key, None)


def _as_list(v: Any) -> list[torch.Tensor]:
    if v is None:
        return []
    if isinstance(v, torch.Tensor):
        return [v] if v.dim() == 0 else list(v.reshape(-1).unbind(0))
    if isinstance(v, Sequence):
        return [x for x in v if isinstance(x, torch.Tensor)]
    return []


class ForwardCapture:
    """Forward hooks on a model that keep, per training step, its loss, MTP losses and tokens.

    Only forward passes in training mode count (evaluation passes are ignored). Values stay
    device tensors (no ``.item()``); tokens come from input shapes (host-known, no sync).
    ``sum_losses``: microbatch losses already divided by the whole step's token count (HF's
    ``num_items_in_batch``) are summed; plain per-microbatch means are averaged. MTP losses are
    taken as per-microbatch mean CEs (the unscaled head losses) and averaged.
    """

    def __init__(self, model: nn.Module, token_key: str = "input_ids") -> None:
        self.token_key = token_key
        self.losses: list[torch.Tensor] = []
        self.mtp: list[list[torch.Tensor]] = []
        self.tokens = 0
        self.sum_losses = False
        self._handles = [
            model.register_forward_pre_hook(self._pre, with_kwargs=True),
            model.register_forward_hook(self._post),
        ]
        self._model = model

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not module.training:
            return
        ids = kwargs.get(self.token_key)
        if ids is None and args and isinstance(args[0], torch.Tensor):
            ids = args[0]
        if isinstance(ids, torch.Tensor):
            self.tokens += int(ids.numel())  # a shape: known on the host, no device sync
        if kwargs.get("num_items_in_batch") is not None:
            self.sum_losses = True

    def _post(self, module: nn.Module, _args: tuple, out: Any) -> None:
        if not module.training:
            return
        loss = _get(out, "loss")
        if isinstance(loss, torch.Tensor):
            self.losses.append(loss.detach())
        for key in MTP_KEYS:
            found = _as_list(_get(out, key))
            if found:
                self.mtp.append([x.detach() for x in found])
                break

    def take(self) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """The step's loss and MTP losses (device tensors), and reset for the next step."""
        loss = None
        if self.losses:
            stacked = torch.stack([x.float().reshape(()) for x in self.losses])
            loss = stacked.sum() if self.sum_losses else stacked.mean()
        mtp: list[torch.Tensor] = []
        if self.mtp:
            heads = min(len(m) for m in self.mtp)
            for h in range(heads):
                col = torch.stack([m[h].float().reshape(()) for m in self.mtp])
                mtp.append(col.mean())  # MTP heads report per-microbatch mean CEs: average them
        self.losses, self.mtp, self.sum_losses = [], [], False
        return loss, mtp

    def remove(self) -> None:
        """Remove the hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []
