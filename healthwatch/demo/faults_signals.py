"""Demo faults that move the newer signals for real: an NVFP4 scale gone wrong, a Mamba decay drifting away.

Registered into :data:`healthwatch.demo.faults.REGISTRY` on import (``faults`` imports this
module), so ``make_fault("quant_scale_shrink", onset)`` and the demo's ``--fault`` options know
them. As for the built-in faults, nothing draws a curve: each changes what the model computes
from its ``onset`` and the Monitor measures the consequences.

* ``quant_scale_shrink`` -- the per-tensor NVFP4 scale of every GEMM operand in one block
  (:data:`QUANT_LAYER`) shrinks by a factor of 2 every :data:`QUANT_HALVING` steps, down to
  :data:`QUANT_FLOOR`. Mechanism: the FP32 tensor scale is computed from a stale or wrong amax
  (e.g. delayed scaling's amax history lagging a growing tensor); block scales that would need
  more than E4M3's 448 saturate there, and the values of those blocks above 6 x scale clip. Signals:
  that block's ``fp4_saturation`` and ``fp4_rel_mse`` rise at once while every other block stays
  put. Loss: the clipped largest activations and weights are the ones that carry the most signal,
  so the block's output degrades and the train loss climbs above its healthy trend, slowly (the
  other blocks and the residual path carry on), without leaving its band. Measured without any
  intervention (demo trainer, seed 0, onset 60, the same run without the fault as reference; mean
  train loss per 20-step window): +0.06 % / +0.6 % / +1.5 % / +2.5 % / +3.4 % over steps 60-80 /
  80-100 / 100-120 / 120-140 / 140-160; the band exit (``healthwatch.band``) did not happen by step
  159. Block 0's saturation went 3.3 % -> 11 % / 54 % / 83 % and its relative MSE 0.85 % -> 5 % /
  47 % / 84 % over the first three windows. The same shrink on *every* quantised block costs more
  (+2.4 % / +2.8 % / +4.2 % / +5.9 % from step 80) and still stays inside the band: the loss drifts
  up rather than jumping, and the band follows a drift. Only acts where the block runs NVFP4 (not
  in a BF16 branch).
* ``alog_drift`` -- the ``A_log`` parameters of one Mamba block (:data:`MAMBA_LAYER`-th Mamba
  block) are pushed down by :data:`ALOG_RATE` per step (a spurious constant update, as from a
  gradient with a constant bias or decay applied with the wrong sign). ``A = -exp(A_log) -> 0``:
  the SSM state stops decaying (``exp(dt * A) -> 1``) and the block turns into an accumulator over
  the sequence. Signals: ``ssm_decay_min``/``ssm_decay_mean`` of that block fall exponentially from
  the onset. Loss: none measurable in this model. Measured without intervention (seed 0, onset 60,
  reference without the fault): block 0's ``ssm_decay_min`` 3.9 -> 2.4 / 0.88 / 0.32 over steps
  60-80 / 80-100 / 100-120, and the train loss within 0.1 % of the reference in every 20-step
  window up to step 160 -- also with every Mamba block drifting at twice the rate. Why: with
  64-token sequences and dt <= 0.1 an accumulator still sums a short prefix, and the mixer's gated
  RMSNorm rescales the summed state before ``out_proj``, so the block's output keeps its size. On
  long sequences (thousands of tokens) the unnormalised state grows with the prefix and overflows
  BF16 -- the Inf/NaN end the issue describes -- which this CPU demo does not train long enough to
  reach. The decay signal is the warning; there is no loss movement here to lead.

Default pack on those runs (``healthwatch alerts backtest``, statistics at every step): under
``quant_scale_shrink`` FP4SaturationHigh and FP4RelMSEHigh fire first, at step 90 (30 steps after
onset), in block 0 only; under ``alog_drift`` MambaDecayCollapsing fires at step 110 (50 steps
after onset), block 0 only. Neither run's train loss left its band (to step 159), so neither has a
lead over the band exit to report: both faults are faults to catch, as ``router_collapse`` is
(``mtp_starvation`` is amplified into a divergence, see ``faults``). Both need the activation-side statistics at every step to show this
quickly: run the Monitor with ``MonitorConfig(signals_every=1)`` (see docs/signals.md for what
that costs).
"""

from __future__ import annotations

from typing import Any

import torch

from healthwatch.demo.faults import PART_EFFECTS, register_fault

#: Block whose GEMM operands get the shrunken scale (0: the first block, quantised in NVFP4).
QUANT_LAYER = 0
#: Steps per halving of the scale.
QUANT_HALVING = 10
#: Smallest scale multiplier reached.
QUANT_FLOOR = 2.0**-8
#: Which Mamba block drifts (0: the first one).
MAMBA_LAYER = 0
#: Decrease of A_log per step.
ALOG_RATE = 0.05

FAULTS_SIGNALS = ("quant_scale_shrink", "alog_drift")


def quant_scale_at(t: int) -> float:
    """Scale multiplier ``t`` steps after onset: halves every ``QUANT_HALVING`` steps, floored."""
    return max(QUANT_FLOOR, 2.0 ** -(1 + t // QUANT_HALVING))


def _shrink_quant_scale(fault: Any, model: Any, step: int) -> None:
    """Set ``quant_scale`` on every quantising module of block ``QUANT_LAYER`` (reset by ``model.reset_faults``)."""
    block = model.blocks[QUANT_LAYER]
    scale = quant_scale_at(step - fault.onset)
    for m in block.modules():
        if hasattr(m, "quant_scale"):
            m.quant_scale = scale


def _drift_alog(fault: Any, model: Any, step: int) -> None:
    """Push the chosen Mamba block's ``A_log`` down by ``ALOG_RATE`` (a parameter change: it persists)."""
    mixers = [b.mixer for b in model.blocks if getattr(b, "layer_type", "") == "mamba"]
    if len(mixers) <= MAMBA_LAYER:
        return
    with torch.no_grad():
        mixers[MAMBA_LAYER].A_log.sub_(ALOG_RATE)


register_fault("quant_scale_shrink")
register_fault("alog_drift")
PART_EFFECTS["quant_scale_shrink"] = _shrink_quant_scale
PART_EFFECTS["alog_drift"] = _drift_alog
