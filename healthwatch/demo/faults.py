"""Genuine injected faults: real changes to training that make the health signals respond.

Nothing here draws a curve. Each fault changes what the optimiser, the router or the residual
stream actually does from its ``onset`` step, and the Monitor measures the consequences. Each
reproduces ONE mechanism of the reference report; what the loss does without intervention was
measured on the early-warning benchmark's runs (``benchmarks/bench_early_warning.py``,
docs/early-warning.md), not assumed.

* ``lr_excursion`` -- the learning rate ramps to ``factor`` x schedule over ``lr_ramp`` steps.
  Mechanism: optimiser steps far beyond the stable step size. Loss: grad norms and loss rise
  together and the loss leaves its band within ~20-40 steps of onset; nothing upstream of the
  loss moves earlier (the learning rate is the only cause), so no rule is expected to lead it.
* ``router_collapse`` -- a growing logit bias pushes the first MoE layer's tokens onto a few
  experts: its MaxVio climbs to the report's unhealthy level and starved experts die.
  Loss: barely moves (the shared expert and the other layers carry the load): a fault to catch,
  not a divergence to lead.
* ``residual_growth`` -- a few channels of the first quarter of the blocks' residual branches
  grow exponentially (``resid_rate`` per step), as outlier features do in the report's early
  layers. Mechanism: the early-layer residual RMS rises at once; the RMSNorms downstream then
  divide every other channel by the outliers' RMS, squashing the information they carry, and the
  NVFP4 blocks that contain an outlier channel flush their small elements to zero. On its own,
  in the benchmark's 4-block model, this only creeps the loss up (+4 % in 120 steps, seed 11,
  never out of its band): the report's spikes came thousands of steps later in a far larger
  model. AMPLIFIED so that the loss moves within a benchmark run: from
  ``onset + lr_delay`` (default 60) the learning rate ramps like ``lr_excursion`` (x``lr_factor``
  over ``lr_ramp`` steps). Loss: flat while the norms rise, then up by ~0.3-0.5 nats within ~15
  steps of the ramp -- out of its band on only some seeds (docs/early-warning.md has the count;
  Adam and clipping keep a x100 step from blowing up). The time from the norms' rise to the loss
  rise is therefore SET by ``lr_delay``, not emergent: what the benchmark measures is whether the
  pack sees the norms rise, on unseen seeds, within that time. (A milder x8 ramp diverged neither this fault nor a
  healthy run, seed 11: no interaction between outliers and step size could be shown at this size.)
* ``mtp_starvation`` -- the shared output layer's gradient is accumulated main-first in BF16 over
  ``microbatches`` microbatches (one running sum, rounded to BF16 after every add): once the sum
  is ``microbatches`` times larger than one microbatch's term, the MTP heads' x0.05 contributions
  are below half a BF16 ulp of it and round away; the MTP block shares the output layer's
  reduction bucket with a single scale, so its gradients far below the bucket's largest value
  (``bucket_range`` binades) underflow to zero. The MTP block stops learning while the trunk under
  it keeps moving, so the MTP-2 loss rises RELATIVE TO THE TRAIN LOSS (their ratio, on the same
  batches: +3-5 % within 50-70 steps of onset on tuning seeds 11-12, healthy runs within +-2 %). On
  its own, in this small model (MTP weight 0.05 x 2), the train loss did not leave its band on any
  of 8 seeds (11, 12, 1001-1003, 1006-1008; evaluation of 2026-12-02): the report's divergence
  that followed needs the larger model's coupling. AMPLIFIED so that the run then DIVERGES: from
  ``onset + lr_delay`` (default 40) the learning rate ramps like ``lr_excursion`` but to x1000
  (``DEFAULT_LR_FACTOR``; x``lr_factor`` over ``lr_ramp`` = 40 steps). Loss (tuning seeds 11-20,
  no intervention): the train loss holds while the MTP gradient is lost and MTP-2 climbs against
  it (onset +20..+39: MTP-2 +0.03..+0.19 nats over the same seed's healthy run, the train loss
  within +-0.006), then leaves its band 2-4 steps into the ramp (step 122-124 with onset 80) on
  10/10 seeds and diverges -- 10-step means peak at 21-54 nats (single steps 28-94), against ~4.6
  before, and are still 5.3-10 nats over steps 190-199. The earlier amplification (x100 from onset + 80, i.e. step 160 of 200) left the band on only 3/10
  evaluation seeds: at this size x100 drives the model back to about the unigram loss (~4.9),
  inside the wide 128-token band, and left 40 steps for it. The MTP-2 rise and the lost MTP
  gradient come first BY CONSTRUCTION (``lr_delay``): the divergence is the learning rate's, not
  an emergent consequence of the starvation; the benchmark measures whether the pack sees the
  starvation, on unseen seeds, in the 40 steps before the loss moves.
* ``ultra`` -- the reference case: MTP starvation, residual growth and router collapse from the
  onset, then a learning-rate excursion (``lr_delay`` steps later) that diverges the run.

Faults are registered in :data:`REGISTRY` (name -> the parts it switches on); another module can
add one with :func:`register_fault` without editing this file's classes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from healthwatch.demo.model import HybridLM

#: Fault name -> the mechanisms ("parts") it switches on. Extend with :func:`register_fault`.
REGISTRY: dict[str, frozenset[str]] = {
    "lr_excursion": frozenset({"lr_excursion"}),
    "router_collapse": frozenset({"router_collapse"}),
    # The delayed learning-rate ramp amplifies the mechanism into a divergence (module docstring).
    "residual_growth": frozenset({"residual_growth", "lr_excursion"}),
    "mtp_starvation": frozenset({"mtp_starvation", "lr_excursion"}),
    "ultra": frozenset({"mtp_starvation", "residual_growth", "router_collapse", "lr_excursion"}),
}
#: Fault name -> steps from onset to its learning-rate ramp, for faults whose mechanism is
#: amplified into a divergence (module docstring). ``ultra``: 40 steps, as in the demo.
DEFAULT_LR_DELAY: dict[str, int] = {"ultra": 40, "residual_growth": 60, "mtp_starvation": 40}
#: Fault name -> the learning-rate ramp's peak factor where it is not the default x100:
#: ``mtp_starvation`` ramps to x1000 so that the run diverges within a benchmark run (x100 only
#: brings this model back to about its unigram loss; module docstring). ``ultra`` keeps x100.
DEFAULT_LR_FACTOR: dict[str, float] = {"mtp_starvation": 1000.0}
#: The ramp's peak factor of every other fault (and of ``lr_excursion`` itself).
LR_FACTOR = 100.0
#: Names of the built-in faults, in the order the benchmark and docs list them.
FAULTS = tuple(REGISTRY)
#: Part -> ``effect(fault, model, step)`` run by :meth:`Fault.before_step` from the onset on, for
#: parts implemented by other modules (e.g. :mod:`healthwatch.demo.faults_signals`).
PART_EFFECTS: dict[str, Callable[..., None]] = {}


def register_fault(name: str, parts: set[str] | frozenset[str] | None = None) -> None:
    """Register a fault ``name`` made of ``parts`` (default: a part of its own name).

    A part this module does not implement is carried in :attr:`Fault.parts` for the module that
    registered it to act on (e.g. in its own ``before_step``/backward wrapper).
    """
    if not name or not name.replace("_", "").isalnum():
        raise ValueError(f"fault name must be a non-empty identifier, got {name!r}")
    REGISTRY[name] = frozenset(parts or {name})


def fault_names() -> tuple[str, ...]:
    """Every registered fault name (built-in and registered)."""
    return tuple(REGISTRY)


def round_mantissa(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Round ``x`` to ``bits`` explicit mantissa bits (round to nearest), like a narrow accumulator."""
    mant, exp = torch.frexp(x)
    scale = float(2 ** (bits + 1))
    return torch.ldexp(torch.round(mant * scale) / scale, exp)


def bf16_accumulate_main_first(g_main: torch.Tensor, g_mtp: torch.Tensor, microbatches: int) -> torch.Tensor:
    """The output layer's gradient as a BF16 running sum over ``microbatches``, main terms first.

    ``g_main`` and ``g_mtp`` are this step's (mean) main-head and MTP-head contributions; each
    microbatch contributes one of each. The main terms are summed first (the main head's
    backward reaches the output layer first in every microbatch and the sum of equal terms is
    exact up to one rounding), then each microbatch's MTP term is added to the running BF16 sum
    and rounded to BF16 -- real ``torch.bfloat16`` arithmetic, round to nearest even. A term
    below half an ulp of the running sum (relative ~2^-9) is lost. Returns the mean gradient.
    """
    if microbatches < 1:
        raise ValueError(f"microbatches must be >= 1, got {microbatches}")
    acc = (g_main.float() * microbatches).to(torch.bfloat16)
    term = g_mtp.to(torch.bfloat16)
    for _ in range(microbatches):
        acc = acc + term  # bf16 + bf16 -> bf16: the running sum is rounded after every add
    return acc.float() / microbatches


@dataclass
class Fault:
    """A named fault active from ``onset``; the trainer asks it for each step's effects."""

    name: str
    onset: int
    #: Peak multiplier of the learning-rate ramp; ``None``: the fault's default
    #: (:data:`DEFAULT_LR_FACTOR`, else :data:`LR_FACTOR`).
    lr_factor: float | None = None
    lr_ramp: int = 40
    lr_delay: int = 0
    collapse_rate: float = 0.4
    #: residual_growth: growth rate (per step, exponential) of the outlier channels.
    resid_rate: float = 0.05
    #: residual_growth: how many residual channels grow (spread evenly over d_model).
    resid_channels: int = 4
    #: mtp_starvation: terms (microbatches x data-parallel ranks) summed in one BF16 running sum.
    microbatches: int = 256
    #: mtp_starvation: binades below the bucket's largest gradient that still survive.
    bucket_range: int = 4
    parts: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        if self.name not in REGISTRY:
            raise ValueError(f"unknown fault {self.name!r}; choose from {', '.join(REGISTRY)}")
        if self.onset < 0:
            raise ValueError(f"fault onset must be >= 0, got {self.onset}")
        self.parts = set(REGISTRY[self.name])
        if self.lr_delay == 0:
            # Steps from the mechanism's onset to the learning-rate ramp (module docstring); 0 for
            # lr_excursion itself (the ramp IS the fault).
            self.lr_delay = DEFAULT_LR_DELAY.get(self.name, 0)
        if self.lr_factor is None:
            self.lr_factor = DEFAULT_LR_FACTOR.get(self.name, LR_FACTOR)
        if not self.lr_factor >= 1.0:
            raise ValueError(f"lr_factor must be >= 1 (a peak multiplier of the learning rate), got {self.lr_factor}")

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
        factor = LR_FACTOR if self.lr_factor is None else self.lr_factor
        return 1.0 + (factor - 1.0) * min(1.0, t / max(1, self.lr_ramp))

    def residual_channel_scale(self, d_model: int, step: int) -> torch.Tensor:
        """Per-channel multiplier of an early block's residual branch at ``step`` (ones before onset)."""
        scale = torch.ones(d_model)
        t = step - self.onset
        if t >= 0:
            n = max(1, min(self.resid_channels, d_model))
            chans = torch.arange(n) * (d_model // n)
            scale[chans] = math.exp(self.resid_rate * t)
        return scale

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
                    scale = self.residual_channel_scale(model.config.d_model, step).to(block.residual_scale.device)
                    if block.residual_scale.shape != scale.shape:
                        # The buffer is a scalar until a per-channel fault needs a vector; addcmul
                        # broadcasts either over [batch, seq, d_model]. Still non-persistent.
                        block.register_buffer("residual_scale", scale, persistent=False)
                    else:
                        block.residual_scale.copy_(scale)
        for part in sorted(self.parts & PART_EFFECTS.keys()):
            PART_EFFECTS[part](self, model, step)

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
    accumulated main-first in BF16 (:func:`bf16_accumulate_main_first`), so the small MTP
    contribution rounds away, and the MTP block's gradients underflow in the shared bucket."""
    if mtp_loss is None or fault is None or not fault.starves_mtp or not fault.active(step):
        (main_loss if mtp_loss is None else main_loss + mtp_loss).backward()
        return
    weight = model.output.weight
    main_loss.backward(retain_graph=True)
    g_main = weight.grad.detach().clone()
    mtp_loss.backward()
    g_mtp = weight.grad.detach() - g_main
    weight.grad.copy_(bf16_accumulate_main_first(g_main, g_mtp, fault.microbatches))
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


# Faults of the newer signals (NVFP4 scale, Mamba A_log) register themselves; imported last so that
# they can use this module's names.
from healthwatch.demo import faults_signals as _faults_signals  # noqa: E402, F401
