"""Device-side math and accumulators of the signals beyond the core five (no host syncs).

* NVFP4 quantisation health (:func:`quant_terms`): underflow, saturation, relative MSE, amax of a
  tensor ``x`` and its fake- or real-quantised-then-dequantised copy ``q``.
* Router health (:func:`router_terms`): normalised per-token routing entropy, router z-loss
  ``mean(logsumexp(logits)^2)``, max router logit.
* Mamba health (:func:`decay_terms`, :func:`dt_terms`): ``exp(A_log)`` (the state-decay rate
  magnitude) and ``dt`` statistics.
* Optimizer update health (:func:`adam_update_sq`): ``||dtheta||^2`` per parameter rebuilt from
  Adam/AdamW state after ``optimizer.step()``, without a copy of the parameters.

Every value is accumulated into a :class:`SignalBank`: append-only slots of *ratio* statistics
(a numerator and a denominator, both summed over calls, microbatches and ranks, divided on the
host after the flush) and *max* statistics (maximum over calls and ranks; a minimum is stored as
the maximum of the negation). Sums and maxima travel in the same flat buffer and the same two
reductions (SUM, MAX) as the core signals. Exact definitions: ``docs/signals.md``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

#: Elements per NVFP4 block scale (along the last dimension).
NVFP4_BLOCK = 16

#: Transform applied to a ratio slot's ``(num, den)`` at decode time.
RATIO = "ratio"  # num / den
SQRT_RATIO = "sqrt_ratio"  # sqrt(num / den)

#: Quantisation metrics stored per layer (and per operand as ``<metric>/<operand>``).
QUANT_RATIOS = ("fp4_underflow", "fp4_saturation", "fp4_rel_mse")
#: Router metrics stored per MoE layer.
ROUTER_RATIOS = ("router_entropy", "router_zloss")


@dataclass(frozen=True)
class RatioSlot:
    """A ratio statistic ``metric`` of the block at position ``layer``: sums at ``2*i, 2*i+1``."""

    layer: int
    metric: str
    transform: str = RATIO


@dataclass(frozen=True)
class MaxSlot:
    """A max (``sign=1``) or min (``sign=-1``, stored negated) statistic of block ``layer``."""

    layer: int
    metric: str
    sign: float = 1.0


class SignalBank:
    """Append-only device accumulators for ratio and max statistics, grouped by a host-side key.

    A group (e.g. the quantisation stats of one layer and operand) is allocated once, the first
    time it is used, as a contiguous range, so one call adds its whole vector with one op. Slots
    only ever grow: a flush records how many entries each step's rows hold, and decoding reads
    that prefix of the slot lists (safe while the training thread appends more).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.ratio_slots: list[RatioSlot] = []
        self.max_slots: list[MaxSlot] = []
        self._groups: dict[object, tuple[int, int]] = {}
        self.sums = torch.zeros(0, dtype=torch.float64, device=device)
        self.maxes = torch.zeros(0, dtype=torch.float64, device=device)

    def group(self, key: object, ratios: Sequence[RatioSlot], maxes: Sequence[MaxSlot] = ()) -> tuple[int, int]:
        """Start of the group's sum range (2 entries per ratio) and max range; allocated on first use."""
        found = self._groups.get(key)
        if found is not None:
            return found
        start = (2 * len(self.ratio_slots), len(self.max_slots))
        self.ratio_slots.extend(ratios)
        self.max_slots.extend(maxes)
        with torch.no_grad():
            if ratios:
                self.sums = torch.cat([self.sums, self.sums.new_zeros(2 * len(ratios))])
            if maxes:
                self.maxes = torch.cat([self.maxes, self.maxes.new_full((len(maxes),), -math.inf)])
        self._groups[key] = start
        return start

    def add(self, start: tuple[int, int], sums: Tensor | None, maxes: Tensor | None = None) -> None:
        """Add ``sums`` (``[num0, den0, num1, den1, ...]``) and fold ``maxes`` into a group's slots."""
        with torch.no_grad():
            if sums is not None and sums.numel():
                self.sums[start[0] : start[0] + sums.numel()].add_(sums.to(self.device, torch.float64))
            if maxes is not None and maxes.numel():
                seg = self.maxes[start[1] : start[1] + maxes.numel()]
                torch.maximum(seg, maxes.to(self.device, torch.float64), out=seg)

    @property
    def empty(self) -> bool:
        """True while no statistic was ever registered."""
        return not self.ratio_slots and not self.max_slots

    def take(self) -> tuple[Tensor, Tensor]:
        """The accumulated (sums, maxes) as new tensors; resets the accumulators in place."""
        s, m = self.sums.clone(), self.maxes.clone()
        self.sums.zero_()
        self.maxes.fill_(-math.inf)
        return s, m


def decode_bank(
    sums: np.ndarray, maxes: np.ndarray, ratio_slots: Sequence[RatioSlot], max_slots: Sequence[MaxSlot]
) -> list[tuple[int, str, float]]:
    """``(layer position, metric, value)`` of every slot that saw data (host side, after the flush).

    A ratio with a zero denominator (nothing observed this step) and a max still at ``-inf`` are
    skipped: no row rather than a made-up zero.
    """
    out: list[tuple[int, str, float]] = []
    for i, slot in enumerate(ratio_slots[: len(sums) // 2]):
        num, den = float(sums[2 * i]), float(sums[2 * i + 1])
        if den == 0 or math.isnan(den):
            continue
        v = num / den
        if slot.transform == SQRT_RATIO:
            v = math.sqrt(v) if v >= 0 else float("nan")
        out.append((slot.layer, slot.metric, v))
    for i, slot in enumerate(max_slots[: len(maxes)]):
        v = float(maxes[i])
        if v == -math.inf:
            continue
        out.append((slot.layer, slot.metric, slot.sign * v))
    return out


# -- NVFP4 quantisation health ------------------------------------------------------------------
def quant_terms(x: Tensor, q: Tensor, block: int = NVFP4_BLOCK) -> tuple[Tensor, Tensor]:
    """Sums ``[underflow, nonzero, saturated, numel, err_sq, x_sq]`` and max ``[amax]`` of one tensor.

    * underflow: elements with ``x != 0`` and ``q == 0``, over the non-zero elements;
    * saturated: elements clipped at the top of their block's grid, i.e. ``|x| > |q|`` where
      ``|q|`` equals the largest ``|q|`` of the ``block``-element block along the last dimension
      (the format maximum 6 x block scale); blocks of the whole tensor when the last dimension does
      not divide into blocks. With E2M1 the grid step below 6 is 2, so an unclipped value that
      rounds to its block's top is never above it: only clipped values count;
    * ``err_sq = ||q - x||^2`` and ``x_sq = ||x||^2`` (relative MSE = their ratio).
    """
    with torch.no_grad():
        xf = x.detach().float()
        qf = q.detach().float()
        ax, aq = xf.abs(), qf.abs()
        nz = xf != 0
        under = (nz & (qf == 0)).sum()
        if xf.dim() and xf.shape[-1] % block == 0 and xf.numel():
            top = aq.reshape(-1, block).amax(-1, keepdim=True).expand(-1, block).reshape(aq.shape)
        else:
            top = aq.amax() if aq.numel() else aq.new_zeros(())
        sat = ((ax > aq) & (aq == top) & (aq > 0)).sum()
        diff = qf - xf
        sums = torch.stack([
            under.to(torch.float64),
            nz.sum().to(torch.float64),
            sat.to(torch.float64),
            torch.full((), float(xf.numel()), dtype=torch.float64, device=xf.device),
            diff.pow(2).sum().to(torch.float64),
            xf.pow(2).sum().to(torch.float64),
        ])
        amax = ax.amax().reshape(1).to(torch.float64) if ax.numel() else torch.zeros(1, dtype=torch.float64, device=xf.device)
    return sums, amax


def quant_slots(layer: int, operand: str | None) -> tuple[list[RatioSlot], list[MaxSlot]]:
    """Slots of one layer's quantisation stats (``operand`` None: the layer aggregate)."""
    suffix = f"/{operand}" if operand else ""
    ratios = [RatioSlot(layer, m + suffix) for m in QUANT_RATIOS]
    return ratios, [MaxSlot(layer, "fp4_amax" + suffix)]


# -- router health ------------------------------------------------------------------------------
def router_terms(logits: Tensor) -> tuple[Tensor, Tensor]:
    """Sums ``[entropy_sum, tokens, zloss_sum, tokens]`` and max ``[max logit]`` of router logits ``[..., E]``.

    Entropy is per token, of ``softmax(logits)``, divided by ``log E`` (0 = one expert takes all
    probability, 1 = uniform). z-loss is ``logsumexp(logits)^2`` per token.
    """
    with torch.no_grad():
        lg = logits.detach().float().reshape(-1, logits.shape[-1])
        e = lg.shape[-1]
        logp = torch.log_softmax(lg, -1)
        ent = -(logp.exp() * logp).sum(-1)
        ent = ent / math.log(e) if e > 1 else ent * 0.0
        lse = torch.logsumexp(lg, -1)
        n = torch.full((), float(lg.shape[0]), dtype=torch.float64, device=lg.device)
        sums = torch.stack([ent.sum().to(torch.float64), n, lse.pow(2).sum().to(torch.float64), n])
        mx = lg.amax().reshape(1).to(torch.float64) if lg.numel() else lg.new_full((1,), -math.inf, dtype=torch.float64)
    return sums, mx


def router_slots(layer: int) -> tuple[list[RatioSlot], list[MaxSlot]]:
    """Slots of one MoE layer's router stats."""
    return [RatioSlot(layer, m) for m in ROUTER_RATIOS], [MaxSlot(layer, "router_max_logit")]


def bias_range(bias: Tensor) -> Tensor:
    """``max - min`` of an expert-bias vector (aux-loss-free balancing), as ``[1]`` float64."""
    with torch.no_grad():
        b = bias.detach().float()
        return (b.amax() - b.amin()).reshape(1).to(torch.float64)


# -- Mamba health -------------------------------------------------------------------------------
def decay_terms(a_log: Tensor) -> tuple[Tensor, Tensor]:
    """Sums ``[sum exp(A_log), heads]`` and maxes ``[-min exp(A_log), max exp(A_log)]`` of one Mamba block.

    ``A = -exp(A_log)`` is the state-decay rate: the state is multiplied by ``exp(dt * A)`` per
    token, so ``exp(A_log) -> 0`` means no decay (an accumulator).
    """
    with torch.no_grad():
        a = a_log.detach().float().exp()
        n = torch.full((), float(a.numel()), dtype=torch.float64, device=a.device)
        sums = torch.stack([a.sum().to(torch.float64), n])
        maxes = torch.stack([(-a.amin()).to(torch.float64), a.amax().to(torch.float64)])
    return sums, maxes


def decay_slots(layer: int) -> tuple[list[RatioSlot], list[MaxSlot]]:
    """Slots of one Mamba block's decay stats."""
    return [RatioSlot(layer, "ssm_decay_mean")], [MaxSlot(layer, "ssm_decay_min", -1.0), MaxSlot(layer, "ssm_decay_max")]


def dt_terms(dt_raw: Tensor, dt_bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """Sums ``[sum dt, count]`` and maxes ``[max dt, -min dt]`` of ``dt = softplus(dt_raw + dt_bias)``."""
    with torch.no_grad():
        d = dt_raw.detach().float()
        if dt_bias is not None:
            d = d + dt_bias.detach().float()
        dt = torch.nn.functional.softplus(d)
        n = torch.full((), float(dt.numel()), dtype=torch.float64, device=dt.device)
        sums = torch.stack([dt.sum().to(torch.float64), n])
        maxes = torch.stack([dt.amax().to(torch.float64), (-dt.amin()).to(torch.float64)])
    return sums, maxes


def dt_slots(layer: int) -> tuple[list[RatioSlot], list[MaxSlot]]:
    """Slots of one Mamba block's dt stats."""
    return [RatioSlot(layer, "ssm_dt_mean")], [MaxSlot(layer, "ssm_dt_max"), MaxSlot(layer, "ssm_dt_min", -1.0)]


# -- optimizer update health --------------------------------------------------------------------
def update_slots(layer: int) -> list[RatioSlot]:
    """Slots of one block's update stats: ``[||dθ||^2, calls]`` and ``[||dθ||^2, ||θ||^2]``."""
    return [RatioSlot(layer, "update_norm", SQRT_RATIO), RatioSlot(layer, "update_ratio", SQRT_RATIO)]


def is_adam(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` is torch's Adam or AdamW (whose update can be rebuilt from its state)."""
    return isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))


def adam_update_sq(optimizer: torch.optim.Optimizer, params: Sequence[Tensor]) -> tuple[Tensor, Tensor] | None:
    """``(||dθ_i||^2, ||θ_i||^2)`` per parameter of ``params`` just after an Adam/AdamW step.

    Rebuilt from the optimizer's state, not from a copy of the parameters. With ``u`` the Adam
    step ``lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)`` (``v`` the AMSGrad max when used):
    Adam (L2 weight decay inside ``m``): ``dθ = -u``; AdamW (decoupled decay ``λ``):
    ``θ_new = θ_old (1 - lr λ) - u`` so ``dθ = -(u + lr λ θ_new) / (1 - lr λ)``. A parameter with
    no gradient this step was not updated (``dθ = 0``). Must run before ``zero_grad`` and before
    the learning-rate scheduler changes ``lr`` (the post-step hook does). Transient memory: one
    parameter-sized buffer per optimizer group chunk; time: about four elementwise passes over
    the parameters. Returns None for optimizers it does not know.
    """
    if not is_adam(optimizer):
        return None
    want = {id(p): i for i, p in enumerate(params)}
    n = len(params)
    dev = params[0].device if n else torch.device("cpu")
    upd = [torch.zeros((), dtype=torch.float64, device=dev) for _ in range(n)]
    decoupled_default = isinstance(optimizer, torch.optim.AdamW)
    with torch.no_grad():
        for group in optimizer.param_groups:
            idx, ps, ms, vs, steps = [], [], [], [], []
            for p in group["params"]:
                i = want.get(id(p))
                st = optimizer.state.get(p)
                if i is None or p.grad is None or not st or "exp_avg" not in st:
                    continue
                v = st.get("max_exp_avg_sq") if group.get("amsgrad") else st["exp_avg_sq"]
                idx.append(i)
                ps.append(p.detach())
                ms.append(st["exp_avg"])
                vs.append(v)
                steps.append(st["step"])
            if not idx:
                continue
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group.get("weight_decay", 0.0)
            decoupled = group.get("decoupled_weight_decay", decoupled_default)
            # Bias corrections as tensor ops on the step counters (on CPU unless capturable/fused):
            # reading a counter's value would be a host read.
            stepv = torch.stack([s.reshape(()).to(torch.float64) for s in steps])
            bc1 = 1 - torch.pow(torch.as_tensor(float(beta1), dtype=torch.float64), stepv)
            bc2 = 1 - torch.pow(torch.as_tensor(float(beta2), dtype=torch.float64), stepv)
            lr_t = torch.as_tensor(lr, dtype=torch.float64)
            step_size = (lr_t / bc1).unbind()
            sqrt_bc2 = bc2.sqrt().unbind()
            for j, i in enumerate(idx):
                denom = vs[j].float().sqrt().div_(sqrt_bc2[j].to(vs[j].device, torch.float32)).add_(eps)
                u = ms[j].float().div(denom).mul_(step_size[j].to(ms[j].device, torch.float32))
                if decoupled and wd:
                    lam = lr_t * float(wd)
                    u = u.add_(ps[j].float() * lam.to(u.device, torch.float32)).div_((1 - lam).to(u.device, torch.float32))
                upd[i] = u.pow(2).sum().to(dev, torch.float64)
        # ||θ|| of every parameter, updated this step or not (one fused op).
        norms = torch._foreach_norm([p.detach() for p in params]) if n else []
        try:
            nrm = torch.stack(norms).to(dev, torch.float64).pow(2)
        except RuntimeError:  # norms on several devices
            nrm = torch.stack([t.to(dev, torch.float64) for t in norms]).pow(2)
    return torch.stack(upd), nrm
