"""Genuine injected faults: real changes to training that make the health signals respond.

Nothing here draws a curve. Each fault changes what the optimiser, the router or the residual
stream actually does from its ``onset`` step, and the Monitor measures the consequences.

* ``lr_excursion`` — the learning rate ramps to ``factor`` × schedule: loss and wgrad norms rise
  together (the reference report's divergence signature).
* ``router_collapse`` — a growing logit bias pushes the first MoE layer's tokens onto a few
  experts: its MaxVio climbs (4.8 → ≈12 in the report) and starved experts die.
* ``residual_growth`` — the residual branches of the first quarter of the layers are scaled up a
  little more each step: early-layer residual RMS rises long before the loss moves.
* ``mtp_starvation`` — the shared output layer and the MTP block share one low-precision
  gradient bucket with a single scale (as in bucketed low-precision gradient reduction): the
  output layer accumulates main-first with a few mantissa bits, so the MTP heads' small (×0.05)
  contributions round away, and MTP-block gradients far below the bucket's largest value
  underflow to zero. The MTP block stops learning while the trunk under it keeps moving: the MTP
  losses rise while the train loss still falls.
* ``ultra`` — the reference case: MTP starvation, residual growth and router collapse from the
  onset, then a learning-rate excursion that diverges the run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from healthwatch.demo.model import HybridLM

FAULTS = ("lr_excursion", "router_collapse", "residual_growth", "mtp_starvation", "ultra")


def round_mantissa(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Round ``x`` to ``bits`` explicit mantissa bits (round to nearest), like a narrow accumulator."""
    mant, exp = torch.frexp(x)
    scale = float(2 ** (bits + 1))
    return torch.ldexp(torch.round(mant * scale) / scale, exp)


@dataclass
class Fault:
    """A named fault active from ``onset``; the trainer asks it for each step's effects."""

    name: str
    onset: int
    lr_factor: float = 100.0
    lr_ramp: int = 40
    lr_delay: int = 0
    collapse_rate: float = 0.4
    resid_rate: float = 0.02
    accum_bits: int = 3
    bucket_range: int = 4
    parts: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        if self.name not in FAULTS:
            raise ValueError(f"unknown fault {self.name!r}; choose from {', '.join(FAULTS)}")
        self.parts = {"mtp_starvation", "residual_growth", "router_collapse", "lr_excursion"} if self.name == "ultra" else {self.name}
        if self.name == "ultra" and self.lr_delay == 0:
            self.lr_delay = 40

    def active(self, step: int) -> bool:
        """True from the onset on."""
        return step >= self.onset

    def lr_scale(self, step: int) -> float:
        """Multiplier on the scheduled learning rate."""
        if "lr_excursion" not in self.parts:
            return 1.0
        t = step - self.onset - self.lr_delay
        if t < 0:
            return 1.0
        return 1.0 + (self.lr_factor - 1.0) * min(1.0, t / max(1, self.lr_ramp))

    def before_step(self, model: HybridLM, step: int) -> None:
        """Apply router and residual effects for this step (buffers on the model)."""
        t = step - self.onset
        if t < 0:
            return
        with torch.no_grad():
            if "router_collapse" in self.parts:
                first = next((r for _b, r in model.routers()), None)
                if first is not None:
                    bias = torch.zeros_like(first.logit_bias)
                    bias[: first.top_k] = self.collapse_rate * t
                    first.logit_bias.copy_(bias)
            if "residual_growth" in self.parts:
                n = max(1, len(model.blocks) // 4)
                for block in list(model.blocks)[:n]:
                    block.residual_scale.fill_(1.0 + self.resid_rate * t)

    @property
    def starves_mtp(self) -> bool:
        """Whether the output layer's gradient must be accumulated in low precision."""
        return "mtp_starvation" in self.parts


def backward_with_fault(
    model: HybridLM,
    main_loss: torch.Tensor,
    mtp_loss: torch.Tensor | None,
    fault: Fault | None,
    step: int,
) -> None:
    """Backward of ``main_loss + mtp_loss``; under MTP starvation the output layer's gradient is
    accumulated main-first in a narrow format, so the small MTP contribution is rounded away."""
    if mtp_loss is None or fault is None or not fault.starves_mtp or not fault.active(step):
        (main_loss if mtp_loss is None else main_loss + mtp_loss).backward()
        return
    weight = model.output.weight
    main_loss.backward(retain_graph=True)
    g_main = weight.grad.detach().clone()
    mtp_loss.backward()
    g_mtp = weight.grad.detach() - g_main
    # The accumulator holds the running sum at low precision: adding a much smaller term
    # to it changes nothing, which is exactly how the report's MTP heads lost their signal.
    weight.grad.copy_(round_mantissa(round_mantissa(g_main, fault.accum_bits) + g_mtp, fault.accum_bits))
    if model.mtp is None:
        return
    # One bucket, one scale: anything below amax * 2^-range underflows in the narrow format.
    bucket = [weight.grad] + [p.grad for p in model.mtp.parameters() if p.grad is not None]
    amax = torch.stack([g.abs().max() for g in bucket]).max()
    floor = amax * 2.0 ** -fault.bucket_range
    for p in model.mtp.parameters():
        if p.grad is not None:
            p.grad.masked_fill_(p.grad.abs() < floor, 0.0)


FaultFactory = Callable[[int], Fault]


def make_fault(name: str | None, onset: int) -> Fault | None:
    """Build a fault by name (``None`` or ``"none"`` for a healthy run)."""
    if name in (None, "", "none"):
        return None
    return Fault(name=name, onset=onset)
