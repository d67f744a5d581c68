"""The alert state machine: inactive -> pending -> firing -> resolved, with durations in steps.

One :class:`InstanceState` per alert instance (rule x run x layer). :func:`advance` feeds it a
series of observations (steps and whether the condition held) and returns the transitions, in
order. It works on *segments* of equal condition rather than on every row, finding the step at
which a duration elapses by binary search, so a backfill over a million steps costs one Python
iteration per change of the condition, not per step.

Semantics (all durations in training steps):

* ``for``: the condition must hold on every observation from the step it started until a step at
  least ``for`` later; then pending -> firing. ``for: 0`` fires at once (no pending record).
* a pending alert whose condition clears goes back to ``inactive``.
* ``keep_firing_for``: a firing alert resolves at the first observation where the condition does
  not hold and at least ``keep_firing_for`` steps have passed since it last held.
* ``cooldown``: after resolving, observations with the condition true are ignored until
  ``cooldown`` steps after the resolution (no flapping notifications).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

STATES = ("inactive", "pending", "firing", "resolved")


@dataclass(frozen=True)
class Timing:
    """A rule's durations in steps."""

    for_: int = 0
    keep_firing_for: int = 0
    cooldown: int = 0


@dataclass
class InstanceState:
    """Where one alert instance stands (mutable; owned by one evaluator)."""

    state: str = "inactive"
    pending_since: int | None = None
    last_true: int | None = None
    resolved_at: int | None = None

    @property
    def active(self) -> bool:
        """True while pending or firing."""
        return self.state in ("pending", "firing")


def _active_segment(st: InstanceState, t: Timing, seg: np.ndarray, off: int, out: list[tuple[str, int]]) -> None:
    i = 0
    if st.state in ("inactive", "resolved"):
        if st.state == "resolved" and t.cooldown > 0 and st.resolved_at is not None:
            i = int(np.searchsorted(seg, st.resolved_at + t.cooldown, side="left"))
            if i >= len(seg):
                return
        st.pending_since = int(seg[i])
        if t.for_ == 0:
            st.state = "firing"
            st.last_true = int(seg[-1])
            out.append(("firing", off + i))
            return
        st.state = "pending"
        out.append(("pending", off + i))
    if st.state == "pending":
        assert st.pending_since is not None
        j = max(i, int(np.searchsorted(seg, st.pending_since + t.for_, side="left")))
        if j >= len(seg):
            return
        st.state = "firing"
        out.append(("firing", off + j))
    st.last_true = int(seg[-1])


def _inactive_segment(st: InstanceState, t: Timing, seg: np.ndarray, off: int, out: list[tuple[str, int]]) -> None:
    if st.state == "pending":
        st.state = "inactive"
        st.pending_since = None
        out.append(("inactive", off))
        return
    if st.state == "firing":
        last = st.last_true if st.last_true is not None else int(seg[0])
        j = int(np.searchsorted(seg, last + t.keep_firing_for, side="left"))
        if j >= len(seg):
            return
        st.state = "resolved"
        st.resolved_at = int(seg[j])
        st.pending_since = None
        out.append(("resolved", off + j))


def advance(st: InstanceState, timing: Timing, steps: np.ndarray, active: np.ndarray) -> list[tuple[str, int]]:
    """Feed observations (strictly increasing ``steps``, boolean ``active``) to ``st``.

    Returns ``[(new_state, row_index), …]`` in order; ``st`` is updated in place.
    """
    n = len(steps)
    out: list[tuple[str, int]] = []
    if n == 0:
        return out
    steps = np.asarray(steps, dtype=np.int64)
    active = np.asarray(active, dtype=bool)
    change = np.flatnonzero(active[1:] != active[:-1]) + 1
    starts = np.concatenate(([0], change))
    ends = np.concatenate((change, [n]))
    for a, b in zip(starts.tolist(), ends.tolist()):
        seg = steps[a:b]
        if active[a]:
            _active_segment(st, timing, seg, a, out)
        else:
            _inactive_segment(st, timing, seg, a, out)
    return out
