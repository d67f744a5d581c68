"""The Monitor's tuning knobs as one validated value: :class:`MonitorConfig`.

A bad value is an error at ``Monitor(...)`` time naming the field and the value, never
silently clamped: ``log_every=0`` used to become 1, which hid a bug in the caller's config.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any


def _int_at_least(name: str, value: Any, low: int) -> None:
    # bool is an int subclass: per_rank=True passed positionally to log_every must not pass as 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"MonitorConfig.{name} must be an integer >= {low}, got {value!r}")
    if value < low:
        raise ValueError(f"MonitorConfig.{name} must be >= {low}, got {value!r}")


def _positive_seconds(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"MonitorConfig.{name} must be a number of seconds > 0, got {value!r}")
    if math.isnan(value) or value <= 0:
        raise ValueError(f"MonitorConfig.{name} must be > 0 seconds (inf = never), got {value!r}")


@dataclass(frozen=True)
class MonitorConfig:
    """How often the Monitor records, flushes and writes; validated on construction.

    Raises ``ValueError`` naming the field and the bad value. Build a variant with
    :meth:`replace` (validated too). ``Monitor(log_every=..., ...)`` keyword arguments are a
    shorthand for the fields of this class.
    """

    log_every: int = 1
    """Record every N-th step (N >= 1); hooks stay idle on the other steps."""

    expert_load_every: int = 100
    """Store the full per-expert load vector every N recorded steps; 0 = never."""

    flush_every_s: float = 5.0
    """Flush at least every this many seconds (> 0; ``math.inf`` = only by steps). Ignored in a
    multi-rank job: every rank must reduce at the same step, so only ``flush_every_steps`` counts."""

    flush_every_steps: int = 100
    """Flush after this many recorded steps (>= 1), whichever of the two cadences comes first."""

    dead_window: int = 100
    """Trailing window in steps (>= 1) over which an expert with no tokens counts as dead."""

    queue_size: int = 64
    """Flushes that may wait for the writer thread (>= 1). Beyond it a flush is dropped and its rows
    are counted in ``monitor/dropped_rows``: a slow store never blocks training."""

    per_rank: bool = False
    """Also write each rank's own, unreduced statistics as run ``<run>.rank<k>`` (k = rank in the
    Monitor's process group), beside the global run that rank 0 writes. For finding the one rank
    whose routing or gradients differ; alert rules skip these runs by default."""

    close_timeout_s: float = 120.0
    """How long ``close()`` (and ``flush(wait=True)``) waits for the writer thread (> 0)."""

    signals: tuple[str, ...] = ("quant", "router", "mamba")
    """Signal families beyond the core five (docs/signals.md): ``quant`` (NVFP4 quantisation health),
    ``router`` (routing entropy, z-loss, max logit, expert-bias range), ``mamba`` (state decay, dt),
    ``update`` (update norm and ratio after ``optimizer.step()``; off by default, ~0.6-1 percentage
    points of the overhead benchmark's CPU step at every step, ``update_every=N`` divides it). Each is a
    no-op on a model without such layers or a trainer that never calls its hook. Every family at every
    step keeps the benchmark's whole figure within +0.5 pp of the five signals' figure before these
    families existed, with the shared clip (``Monitor.clip_grad_norm_``). Costs per family:
    docs/signals.md, BENCHMARKS.md section 1."""

    signals_every: int = 100
    """Activation-side statistics of the ``quant`` and ``router`` families and Mamba's ``dt`` are
    computed on every N-th step (>= 1; the first step included). At every step they cost ~1.3
    percentage points of the overhead benchmark's NVFP4 CPU step (quant most of it; docs/signals.md),
    100 costs ~0.02 pp. Use N = 1 or a small N when rules must see NVFP4 or router faults at once.
    Parameter-side ones (``exp(A_log)``, expert-bias range: 0.06 pp) come with every logged step."""

    update_every: int = 1
    """Compute the update family on every N-th ``after_optimizer_step`` of recorded steps (>= 1):
    ~0.6 / 1.0 pp of the benchmark's NVFP4 / BF16 CPU step when computed at every step, divided by N
    (docs/signals.md)."""

    quant_sample_elems: int = 2048
    """Elements of each quantised operand the ``quant`` family reads for ``fp4_underflow``,
    ``fp4_saturation`` and ``fp4_rel_mse`` (>= 16; whole rows, or 16-element blocks of rows wider
    than this; smaller operands whole). A ratio from 2,048 elements has a standard error below
    1.1 percentage points (0.48 at 5 %); 4,096 halves the variance for 0.8-3.8 ms more a step
    on the overhead benchmark's 79 operand calls (docs/signals.md). ``fp4_amax`` is exact either way."""

    def __post_init__(self) -> None:
        _int_at_least("log_every", self.log_every, 1)
        _int_at_least("expert_load_every", self.expert_load_every, 0)
        _positive_seconds("flush_every_s", self.flush_every_s)
        _int_at_least("flush_every_steps", self.flush_every_steps, 1)
        _int_at_least("dead_window", self.dead_window, 1)
        _int_at_least("queue_size", self.queue_size, 1)
        if not isinstance(self.per_rank, bool):
            raise ValueError(f"MonitorConfig.per_rank must be True or False, got {self.per_rank!r}")
        _positive_seconds("close_timeout_s", self.close_timeout_s)
        from healthwatch.hooks.collector import FAMILIES

        if isinstance(self.signals, str) or not all(isinstance(f, str) for f in self.signals):
            raise ValueError(f"MonitorConfig.signals must be a tuple of family names, got {self.signals!r}")
        unknown = sorted(set(self.signals) - set(FAMILIES))
        if unknown:
            raise ValueError(f"MonitorConfig.signals: unknown families {unknown}; known: {sorted(FAMILIES)}")
        object.__setattr__(self, "signals", tuple(self.signals))
        _int_at_least("update_every", self.update_every, 1)
        _int_at_least("signals_every", self.signals_every, 1)
        _int_at_least("quant_sample_elems", self.quant_sample_elems, 16)

    def replace(self, **changes: Any) -> MonitorConfig:
        """A copy with ``changes`` applied (validated; an unknown field name is a ``ValueError``)."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"MonitorConfig has no field(s) {unknown}; known: {sorted(known)}")
        return dataclasses.replace(self, **changes)
