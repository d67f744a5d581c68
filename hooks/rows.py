"""Turn one flushed buffer of step statistics into store rows (runs in the writer thread).

Everything here is NumPy on host memory: MaxVio, dead experts over the trailing window, the
square roots of squared gradient norms and the per-token averages are computed after the one
device-to-host copy of the flush, never on the training hot path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from healthwatch.hooks.collector import Layout
from healthwatch.hooks.signals import decode_bank
from healthwatch.schema import TABLES


@dataclass
class StepMeta:
    """Host-side facts about one step, recorded by ``Monitor.step`` without touching the device."""

    step: int
    tokens: int
    wall_time: float
    scalar_names: list[str]
    host_scalars: dict[str, float]
    resid_calls: list[int]
    router_calls: list[int]
    has_wgrad: bool
    sum_offset: int
    sum_len: int
    max_offset: int


@dataclass
class ExtraMeta:
    """Scalars logged with ``Monitor.log``: device values are at ``offset`` in the extras region."""

    step: int
    tokens: int
    wall_time: float
    device_names: list[str]
    host_scalars: dict[str, float]
    offset: int


@dataclass
class DeadExpertWindow:
    """Rolling per-router expert counts over the trailing ``window`` steps (for dead experts)."""

    window: int
    experts: list[int]
    ring: list[np.ndarray] = field(default_factory=list)
    total: list[np.ndarray] = field(default_factory=list)
    pos: int = 0
    filled: int = 0

    def __post_init__(self) -> None:
        if not self.ring:
            self.ring = [np.zeros((self.window, e), dtype=np.float64) for e in self.experts]
            self.total = [np.zeros(e, dtype=np.float64) for e in self.experts]

    def push(self, counts: list[np.ndarray]) -> list[int]:
        """Add one step's counts per router; return dead experts per router over the window."""
        dead = []
        for r, c in enumerate(counts):
            self.total[r] += c - self.ring[r][self.pos]
            self.ring[r][self.pos] = c
            dead.append(int(np.count_nonzero(self.total[r] <= 0.5)))
        self.pos = (self.pos + 1) % self.window
        self.filled = min(self.window, self.filled + 1)
        return dead

    def state_dict(self) -> dict[str, Any]:
        """Serializable state (carried through checkpoints)."""
        return {"window": self.window, "experts": list(self.experts), "ring": [r.copy() for r in self.ring],
                "pos": self.pos, "filled": self.filled}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state saved by :meth:`state_dict` (ignored if the router layout changed)."""
        if list(state.get("experts", [])) != list(self.experts) or int(state.get("window", -1)) != self.window:
            return
        self.ring = [np.asarray(r, dtype=np.float64).copy() for r in state["ring"]]
        self.total = [r.sum(0) for r in self.ring]
        self.pos = int(state["pos"])
        self.filled = int(state["filled"])


def maxvio(counts: np.ndarray) -> float:
    """``(max_e c_e - mean_e c_e) / mean_e c_e`` with mean = total assignments / E; NaN if none routed."""
    total = float(counts.sum())
    if counts.size == 0 or total <= 0:
        return float("nan")
    mean = total / counts.size
    return float((counts.max() - mean) / mean)


class RowBuilder:
    """Accumulates column lists for the scalars, layer_stats and expert_load tables of one flush.

    Scalars are kept as per-step chunks (names + a float64 vector) and turned into columns once,
    with numpy: the writer thread holds the GIL while it builds rows, and appending ~30,000
    logged values one Python object at a time stalled the training thread's own Python.
    """

    def __init__(self, attempt: int) -> None:
        self.attempt = attempt
        self._chunks: list[tuple[int, int, float, list[str], np.ndarray]] = []
        self._n_scalars = 0
        # One chunk per (step, metric): the writer gets one Arrow table built from NumPy at the end
        # (a flush of 100 steps x 108 layers x 3 metrics is ~32,000 rows: a Python object per
        # value cost more than the store write itself).
        self._layer_chunks: list[tuple[int, int, np.ndarray, list[str], str, np.ndarray]] = []
        self._n_layers = 0
        self.load: dict[str, list[Any]] = {k: [] for k in ("attempt", "step", "tokens", "layer", "counts")}

    def scalar(self, step: int, tokens: int, wall: float, name: str, value: float) -> None:
        """Add one scalar row."""
        self.scalars_block(step, tokens, wall, [name], np.array([value], dtype=np.float64))

    def scalars_block(self, step: int, tokens: int, wall: float, names: list[str], values: np.ndarray) -> None:
        """Add many scalars of one step at once."""
        self._chunks.append((step, tokens, wall, list(names), np.asarray(values, dtype=np.float64)))
        self._n_scalars += len(names)

    @property
    def scalars(self) -> dict[str, Any]:
        """The scalars table's columns (numpy arrays; ``name`` a list of str)."""
        if not self._chunks:
            return {k: [] for k in ("attempt", "step", "tokens", "name", "value", "wall_time")}
        sizes = np.fromiter((len(c[3]) for c in self._chunks), dtype=np.int64, count=len(self._chunks))
        names: list[str] = []
        for c in self._chunks:
            names.extend(c[3])
        return {
            "attempt": np.full(int(sizes.sum()), self.attempt, dtype=np.int32),
            "step": np.repeat(np.fromiter((c[0] for c in self._chunks), dtype=np.int64), sizes),
            "tokens": np.repeat(np.fromiter((c[1] for c in self._chunks), dtype=np.int64), sizes),
            "name": names,
            "value": np.concatenate([c[4] for c in self._chunks]),
            "wall_time": np.repeat(np.fromiter((c[2] for c in self._chunks), dtype=np.float64), sizes),
        }

    def layer_block(self, step: int, tokens: int, layers: list[int], types: list[str], metric: str, values: np.ndarray) -> None:
        """Add one metric for many layers at one step."""
        if len(layers) != len(types) or len(layers) != len(values):
            raise ValueError(f"layer_block {metric!r}: {len(layers)} layers, {len(types)} types, {len(values)} values")
        self._layer_chunks.append((step, tokens, np.asarray(layers, dtype=np.int32), list(types), metric,
                                   np.asarray(values, dtype=np.float64)))
        self._n_layers += len(layers)

    @property
    def layers(self) -> pa.Table:
        """The layer_stats table's rows (step-major, as added), strings dictionary-encoded."""
        ch = self._layer_chunks
        if not ch:
            return pa.Table.from_pydict({k: [] for k in TABLES["layer_stats"].names}, schema=TABLES["layer_stats"])
        sizes = np.fromiter((c[2].size for c in ch), dtype=np.int64, count=len(ch))
        n = int(sizes.sum())
        types: dict[str, int] = {}
        type_idx = np.concatenate([np.fromiter((types.setdefault(t, len(types)) for t in c[3]), dtype=np.int32,
                                               count=len(c[3])) for c in ch])
        metrics: dict[str, int] = {}
        metric_idx = np.repeat(np.fromiter((metrics.setdefault(c[4], len(metrics)) for c in ch), dtype=np.int32,
                                           count=len(ch)), sizes)
        return pa.Table.from_arrays([
            pa.array(np.full(n, self.attempt, dtype=np.int32)),
            pa.array(np.repeat(np.fromiter((c[0] for c in ch), dtype=np.int64, count=len(ch)), sizes)),
            pa.array(np.repeat(np.fromiter((c[1] for c in ch), dtype=np.int64, count=len(ch)), sizes)),
            pa.array(np.concatenate([c[2] for c in ch])),
            pa.DictionaryArray.from_arrays(pa.array(type_idx), pa.array(list(types), pa.string())),
            pa.DictionaryArray.from_arrays(pa.array(metric_idx), pa.array(list(metrics), pa.string())),
            pa.array(np.concatenate([c[5] for c in ch])),
        ], names=TABLES["layer_stats"].names)

    @property
    def n_rows(self) -> int:
        """Rows accumulated so far (all tables)."""
        return self._n_scalars + self._n_layers + len(self.load["step"])


def build_rows(
    flat: np.ndarray,
    steps: list[StepMeta],
    extras: list[ExtraMeta],
    extras_offset: int,
    layout: Layout,
    block_types: list[str],
    residual_mask: list[bool],
    dead: DeadExpertWindow | None,
    attempt: int,
    world: int,
    expert_load_every: int,
    layer_ids: list[int] | None = None,
) -> RowBuilder:
    """Decode a flushed buffer into rows. ``world`` divides summed values back into means.

    ``layer_ids`` gives the stored ``layer`` of each block position (``BlockSpec.index``: the
    global index, which differs from the position on a pipeline stage); default the position.
    """
    out = RowBuilder(attempt)
    nb = layout.num_blocks
    layers = list(range(nb))
    ids = list(layer_ids) if layer_ids is not None else layers
    r_layers = layout.router_layers
    r_ids = [ids[i] for i in r_layers]
    r_types = [block_types[i] for i in r_layers]
    # Each step's max row runs to the next step's (or to the extras region): its tail past the
    # residual maxima holds the extra signals' maxima (docs/signals.md).
    max_ends = [s.max_offset for s in steps[1:]] + [extras_offset]
    bank = layout.bank
    n_counts = layout.counts_size()
    for meta, max_end in zip(steps, max_ends):
        row = flat[meta.sum_offset : meta.sum_offset + meta.sum_len]
        mx = flat[meta.max_offset : meta.max_offset + nb]
        ns = len(meta.scalar_names)
        st, tk, wt = meta.step, meta.tokens, meta.wall_time
        for name, v in zip(meta.scalar_names, row[:ns]):
            out.scalar(st, tk, wt, name, float(v) / world)
        for name, v in meta.host_scalars.items():
            out.scalar(st, tk, wt, name, float(v))
        calls = np.asarray(meta.resid_calls, dtype=np.float64)
        seen = [i for i in layers if residual_mask[i] and calls[i] > 0]
        if seen:
            resid = row[ns : ns + nb][seen] / calls[seen] / world
            seen_ids = [ids[i] for i in seen]
            out.layer_block(st, tk, seen_ids, [block_types[i] for i in seen], "resid_rms", resid)
            out.layer_block(st, tk, seen_ids, [block_types[i] for i in seen], "resid_rms_max", mx[seen])
        gsq = row[ns + nb : ns + nb + layout.n_groups] / world
        if meta.has_wgrad:
            out.layer_block(st, tk, ids, block_types, "wgrad_norm", np.sqrt(gsq[:nb]))
            for g, name in enumerate(layout.special):
                if name not in layout.unrecorded:
                    out.scalar(st, tk, wt, f"grad_norm/{name}", float(np.sqrt(gsq[nb + g])))
        if r_layers:
            base = ns + nb + layout.n_groups
            counts = row[base : base + n_counts].reshape(len(r_layers), layout.max_experts)
            per_router = [counts[r, : layout.router_experts[r]] for r in range(len(r_layers))]
            if any(meta.router_calls):
                mv = np.array([maxvio(c) for c in per_router])
                out.layer_block(st, tk, r_ids, r_types, "maxvio", mv)
                if dead is not None:
                    out.layer_block(st, tk, r_ids, r_types, "dead_experts", np.asarray(dead.push(per_router), dtype=np.float64))
                if expert_load_every > 0 and st % expert_load_every == 0:
                    for r, c in enumerate(per_router):
                        out.load["attempt"].append(attempt)
                        out.load["step"].append(st)
                        out.load["tokens"].append(tk)
                        out.load["layer"].append(r_ids[r])
                        out.load["counts"].append(np.rint(c).astype(np.int64).tolist())
        if bank is not None:
            extra_sums = row[ns + nb + layout.n_groups + n_counts :]
            extra_max = flat[meta.max_offset + nb : max_end]
            by_metric: dict[str, tuple[list[int], list[float]]] = {}
            for pos, metric, value in decode_bank(extra_sums, extra_max, bank.ratio_slots, bank.max_slots):
                entry = by_metric.setdefault(metric, ([], []))
                entry[0].append(pos)
                entry[1].append(value)
            for metric, (poss, vals) in by_metric.items():
                out.layer_block(st, tk, [ids[p] for p in poss], [block_types[p] for p in poss], metric,
                                np.asarray(vals, dtype=np.float64))
    for meta in extras:
        n = len(meta.device_names)
        if n:
            # Bulk extends, not a row at a time: this runs in the writer thread while holding the
            # GIL, and a flush of 100 steps x ~300 logged values one append at a time held it for
            # ~30 ms, stalling the training thread's own Python (the in-loop p99 of `log`).
            vals = flat[extras_offset + meta.offset : extras_offset + meta.offset + n]
            out.scalars_block(meta.step, meta.tokens, meta.wall_time, meta.device_names, vals)
        for name, v in meta.host_scalars.items():
            out.scalar(meta.step, meta.tokens, meta.wall_time, name, float(v))
    return out
