"""Device-side accumulation of per-step statistics (no host syncs).

Forward hooks on blocks accumulate residual-stream RMS (mean and max over tokens); forward
hooks on routers accumulate expert counts with ``index_add_`` into a preallocated tensor
(``torch.bincount`` would sync on CUDA); :meth:`StatsCollector.after_backward` computes every
gradient norm with one ``torch._foreach_norm`` and one matrix product. :meth:`take_row` returns
the step's statistics as device tensors and resets the accumulators in place.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from healthwatch.hooks import signals as sig
from healthwatch.hooks.adapters.base import ModelSpec

log = logging.getLogger("healthwatch.monitor")

#: Gradient groups after the per-block norms, in this order.
SPECIAL_GROUPS = ("total", "output", "embedding", "mtp")

#: Signal families beyond the core five, and whether each is on by default (docs/signals.md: the
#: defaults follow the measured per-family costs; "update" is off, 0.7-1.0 pp at every step).
FAMILIES = {"quant": True, "router": True, "mamba": True, "update": False, "attention": False}
_OPERAND = re.compile(r"[^A-Za-z0-9_.:+-]")


def _in_backward() -> bool:
    """True while the autograd engine runs a backward pass (host-side check, no device sync).

    Forward hooks that fire then come from activation recomputation (``torch.utils.checkpoint``,
    HF ``gradient_checkpointing``, megatron ``recompute_granularity``) and must not count twice.
    """
    return torch._C._current_graph_task_id() != -1


@dataclass
class Layout:
    """Where each statistic sits in a step's ``sum`` and ``max`` rows (host-side bookkeeping)."""

    num_blocks: int
    router_layers: list[int]
    router_experts: list[int]
    special: list[str]
    max_experts: int
    scalar_names: list[str] = field(default_factory=list)
    #: Special groups computed (their all-reduces pair up) but not written: another Monitor writes them.
    unrecorded: frozenset[str] = frozenset()
    #: Slots of the extra signals (:class:`healthwatch.hooks.signals.SignalBank`), or None.
    bank: Any = None

    def counts_size(self) -> int:
        """Entries of the expert-count region of a sum row."""
        return len(self.router_layers) * self.max_experts

    @property
    def n_groups(self) -> int:
        """Per-block gradient groups plus the special groups."""
        return self.num_blocks + len(self.special)

    def sum_size(self, n_scalars: int) -> int:
        """Length of a step's sum row: scalars, residual sums, squared grad norms, expert counts."""
        return n_scalars + self.num_blocks + self.n_groups + len(self.router_layers) * self.max_experts


class _QuantStage:
    """A float32 buffer with a slot per quantised operand call of a step, in call order, laid out
    from the calls of the step before (host bookkeeping, built once per change of the calls).

    Padded (the usual case, sample sizes within 25 % of each other): ``buf [2, calls, W]``, call
    ``i``'s sample at the start of row ``i`` and zeros after it (never written), summed by
    :func:`signals.quant_padded_sums`. Otherwise ragged: ``buf [2, blocks, 16]``, the calls' blocks
    one after another (:func:`signals.quant_block_sums`). ``tags[i]`` is call ``i``'s (key, sample
    shape, device) and ``dst[i]`` the (x, q) views of its slot in the sample's shape. ``fast[i]``,
    when the sample was a view of the operands, says how to take it again without re-deriving it:
    the call's raw (layer, operand name, shapes, strides, dtypes, device) and the sample's size,
    strides and storage offsets relative to x and q (None otherwise).
    """

    def __init__(self, sigs: list[tuple], lens: list[int], device: torch.device) -> None:
        self.tags = [t[0] for t in sigs]
        self.fast = [t[1] for t in sigs]
        self.lens = list(lens)
        blk = sig.NVFP4_BLOCK
        width = max(lens) * blk
        self.padded = len(lens) * width <= 1.25 * sum(lens) * blk
        if self.padded:
            self.buf = torch.zeros(2, len(lens), width, dtype=torch.float32, device=device)
            #: Scratch of :func:`signals.quant_padded_sums`, kept (a fresh one costs page faults).
            self.work = torch.empty(4, len(lens), width, dtype=torch.float32, device=device)
        else:
            self.offsets = np.concatenate([[0], np.cumsum(lens)]).astype(int).tolist()
            self.buf = torch.zeros(2, self.offsets[-1], blk, dtype=torch.float32, device=device)
        self.dst = [
            (self.part(i)[0].reshape(-1).view(t[1]), self.part(i)[1].reshape(-1).view(t[1]))
            for i, t in enumerate(self.tags)
        ]

    def sigs_at(self, i: int) -> tuple:
        """Call ``i``'s (tag, fast entry), as the call itself would record it."""
        return self.tags[i], self.fast[i]

    def part(self, i: int) -> torch.Tensor:
        """Call ``i``'s slot, ``[2, its blocks, 16]`` (a view)."""
        if self.padded:
            return self.buf[:, i, : self.lens[i] * sig.NVFP4_BLOCK].view(2, -1, sig.NVFP4_BLOCK)
        return self.buf[:, self.offsets[i] : self.offsets[i + 1]]

    def sums(self, lengths: torch.Tensor, segments: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Per-call sums ``[calls, 6]`` of a buffer every call of the step wrote into."""
        if self.padded:
            return sig.quant_padded_sums(self.buf, lengths, work=self.work)
        return sig.quant_block_sums(self.buf, segments(), lengths)

    @classmethod
    def build(cls, sigs: list[tuple], lens: list[int]) -> _QuantStage | None:
        """The stage for these calls, or None when they are on several devices (stacked copies then)."""
        if not sigs or any(t[0][2] != sigs[0][0][2] for t in sigs):
            return None
        return cls(sigs, lens, sigs[0][0][2])


def _relative_view(v: torch.Tensor, base: torch.Tensor) -> tuple | None:
    """(size, strides, storage offset from ``base``'s) of ``v`` when it is a view of ``base``'s storage."""
    if v is base:
        return tuple(v.shape), v.stride(), 0
    try:
        same = v.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
    except RuntimeError:  # no storage of its own (a wrapper subclass): take the slow path every time
        return None
    return (tuple(v.shape), v.stride(), v.storage_offset() - base.storage_offset()) if same else None


class StatsCollector:
    """Holds the device accumulators and the hooks for one watched model."""

    def __init__(
        self, spec: ModelSpec, device: torch.device, families: Iterable[str] | None = None, update_every: int = 1,
        signals_every: int = 1, quant_sample_elems: int = sig.QUANT_SAMPLE_ELEMS,
    ) -> None:
        self.spec = spec
        self.device = device
        self.active = True
        fam = {f for f, on in FAMILIES.items() if on} if families is None else set(families)
        unknown = fam - set(FAMILIES)
        if unknown:
            raise ValueError(f"unknown signal families {sorted(unknown)}; known: {sorted(FAMILIES)}")
        self.families = fam
        self.update_every = max(1, int(update_every))
        #: Activation-side statistics (quantisation, router health, dt) run on every N-th step only.
        self.signals_every = max(1, int(signals_every))
        #: Elements of each quantised operand read for its ratios (:func:`signals.quant_sample`).
        self.quant_sample_elems = max(sig.NVFP4_BLOCK, int(quant_sample_elems))
        self._steps_taken = 0
        self._sample = True
        self.bank = sig.SignalBank(device)
        self._update_calls = 0
        self._update_done = False
        #: The update family's sampled views and gather buffers, reused from step to step.
        self._update_cache: dict = {}
        self._warned_optim: set[str] = set()
        nb = spec.num_layers
        self.layout = Layout(
            num_blocks=nb,
            router_layers=[r.layer for r in spec.routers],
            router_experts=[r.num_experts for r in spec.routers],
            special=[g for g in SPECIAL_GROUPS if g == "total" or spec.special_params.get(g)],
            max_experts=max((r.num_experts for r in spec.routers), default=0),
            unrecorded=frozenset(spec.recorded_elsewhere),
            bank=self.bank,
        )
        f64 = dict(device=device, dtype=torch.float64)
        self.resid_sum = torch.zeros(nb, **f64)
        self.resid_max = torch.zeros(nb, **f64)
        self.counts = torch.zeros(len(spec.routers), max(1, self.layout.max_experts), **f64)
        self.grad_sq = torch.zeros(self.layout.n_groups, **f64)
        # Python-side counters: incrementing an int never touches the device.
        self.resid_calls = [0] * nb
        self.router_calls = [0] * len(spec.routers)
        #: Kept ones for the expert counts' index_add_, per (token-choice count, device).
        self._ones: dict[tuple[int, torch.device], torch.Tensor] = {}
        #: Residual RMS staged per call (per-token 2-norms) and the call's (block, width); reduced in take_row.
        self._rn: list[torch.Tensor] = []
        self._rn_blocks: list[tuple[int, int]] = []
        self._rn_plan: tuple | None = None
        self.has_wgrad = False
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._params, self._membership = self._build_membership()
        #: (clipped parameters' ids, parameters to norm, index of each clipped one) for after_backward(clip=).
        self._clip_plan: tuple | None = None
        self._zero: torch.Tensor | None = None
        self._position = {b.index: i for i, b in enumerate(spec.blocks)}
        self._module_block: dict[int, int] = {}
        for i, b in enumerate(spec.blocks):
            for m in b.module.modules():
                self._module_block.setdefault(id(m), i)
        #: (block position, module with ``A_log``) of every Mamba mixer found.
        self.mamba = self._find_mamba()
        #: (block position, bias buffer) of routers with an aux-loss-free expert bias.
        self.expert_bias = self._find_expert_bias()
        self._observed: list[nn.Module] = []
        #: Quantisation statistics are staged per call (sampled blocks, amin/amax) and computed for
        #: all of a step's operands at once in take_row (:func:`signals.quant_block_sums`).
        #: Per call: sampled blocks of x and q stacked ``[2, blocks, 16]``, block count, (amin, amax).
        self._qx: list[torch.Tensor] = []
        #: Router health staged per call, computed for all calls at once in take_row: the (sampled)
        #: logits as float32 copies, their max, the call's bank starts, and the cached layout.
        self._rx: list[torch.Tensor] = []
        self._rmax: list[torch.Tensor] = []
        self._rkeys: list[tuple[int, int]] = []
        self._rplan: tuple | None = None
        #: Mamba dt staged per call: (bank starts, element count) and (sum, max, min) of dt.
        self._dtkeys: list[tuple[tuple[int, int], int]] = []
        self._dtv: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._dtplan: tuple | None = None
        #: Sanitised operand name of each name a quantiser reported ("" for none).
        self._opnames: dict[str | None, str] = {}
        self._qlen: list[int] = []
        #: Per call: the operand's ``max |x|`` (0-d tensor, or a float a trainer passed).
        self._qamax: list[torch.Tensor | float] = []
        self._qkeys: list[tuple[int, str | None]] = []
        #: Staging buffer of the sampled blocks, laid out for the calls of the step before (see
        #: :class:`_QuantStage`); a call that matches its slot copies there, others stack a copy.
        self._qstage: _QuantStage | None = None
        #: Per call: ((key, sample shape, device), fast-path entry or None), to lay out the next step's
        #: staging buffer (:class:`_QuantStage`).
        self._qsig: list[tuple] = []
        self._qstarts: dict[tuple[int, str | None], tuple[tuple[int, int], ...]] = {}
        self._qplan: tuple[tuple, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._qseg: tuple[tuple[int, ...], torch.Tensor, torch.Tensor | None] | None = None
        #: (positions, A_log tensors) of the Mamba mixers when all have the same number of heads.
        self._decay_stack = self._stackable([m.A_log for _p, m in self.mamba])
        self._bias_stack = self._stackable([b for _p, b in self.expert_bias])

    # -- hooks -------------------------------------------------------------------------------
    def attach(self) -> None:
        """Register forward hooks on every block and router."""
        for i, block in enumerate(self.spec.blocks):
            if block.residual:
                self._handles.append(block.module.register_forward_hook(self._resid_hook(i)))
        for r, router in enumerate(self.spec.routers):
            self._handles.append(router.module.register_forward_hook(self._router_hook(r)))
        if "mamba" in self.families:
            for pos, mixer in self.mamba:
                in_proj = getattr(mixer, "in_proj", None)
                if isinstance(in_proj, nn.Module):
                    self._handles.append(in_proj.register_forward_hook(self._dt_hook(pos, mixer)))
        if "quant" in self.families:
            # Modules that quantise their GEMM inputs (the demo's QuantLinear, GroupedExperts, or
            # any module with a ``quant_observer`` attribute) report (operand, x, q) to us.
            for i, block in enumerate(self.spec.blocks):
                for m in block.module.modules():
                    if hasattr(m, "quant_observer") and getattr(m, "quant_observer", None) is None:
                        m.quant_observer = self._quant_observer(i)
                        self._observed.append(m)

    def detach(self) -> None:
        """Remove every hook this collector registered."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for m in self._observed:
            m.quant_observer = None
        self._observed.clear()

    # -- discovery of the extra signals' sources ------------------------------------------------
    def _find_mamba(self) -> list[tuple[int, nn.Module]]:
        found = []
        for i, block in enumerate(self.spec.blocks):
            for m in block.module.modules():
                if isinstance(getattr(m, "A_log", None), torch.Tensor):
                    found.append((i, m))
                    break
        return found

    def _find_expert_bias(self) -> list[tuple[int, torch.Tensor]]:
        found = []
        pos = {b.index: i for i, b in enumerate(self.spec.blocks)}
        for r in self.spec.routers:
            for name in ("expert_bias", "e_score_correction_bias"):
                b = getattr(r.module, name, None)
                if isinstance(b, torch.Tensor) and b.numel() > 1:
                    found.append((pos.get(r.layer, r.layer), b))
                    break
        return found

    def block_position(self, layer: int | nn.Module) -> int:
        """Position in the spec of a block given by its stored layer index or by any module inside it."""
        if isinstance(layer, nn.Module):
            found = self._module_block.get(id(layer))
            if found is None:
                raise ValueError(f"module {type(layer).__name__} is not inside any watched block")
            return found
        found = self._position.get(int(layer))
        if found is None:
            raise ValueError(f"layer {layer!r} is not a watched block (layers: {sorted(self._position)})")
        return found

    @staticmethod
    def _stackable(tensors: list[torch.Tensor]) -> bool:
        """Whether ``tensors`` can be read with one ``torch.stack`` (same shape, device; at least one)."""
        return bool(tensors) and all(t.shape == tensors[0].shape and t.device == tensors[0].device for t in tensors)

    def _group(self, key: object, make: Callable[[], tuple[list, list]]) -> tuple[int, int]:
        """The bank range of ``key``; ``make()`` builds its slots only the first time (host work per call)."""
        found = self.bank.lookup(key)
        return found if found is not None else self.bank.group(key, *make())

    # -- extra signals -----------------------------------------------------------------------
    def quant_stats(self, pos: int, operand: str | None, x: torch.Tensor, q: torch.Tensor,
                    amax: torch.Tensor | float | None = None) -> None:
        """Accumulate NVFP4 health of one quantised tensor into block ``pos`` (and ``operand``).

        ``amax`` (``max |x|``, when the quantiser already computed it) replaces the one full read of
        ``x``; the ratios always come from the sampled rows."""
        if x.shape != q.shape:
            raise ValueError(f"quant_stats: x {tuple(x.shape)} and q {tuple(q.shape)} differ in shape")
        if not self.active or not self._sample or "quant" not in self.families or _in_backward():
            return
        i = len(self._qkeys)
        stage = self._qstage
        if stage is not None and i < len(stage.fast):
            fast = stage.fast[i]
            # The usual case: the same GEMM as at this position in the step before, same layout.
            # Its sample is taken again by one as_strided per operand, straight into its slot of
            # the staging buffer (~10 µs of host work a call instead of ~60).
            if fast is not None and fast[0] == (pos, operand, x.shape, x.stride(), q.stride(), x.dtype, q.dtype,
                                                x.device):
                _t, (size, xst, xoff), (_s, qst, qoff), key, nblk = fast
                dx, dq = stage.dst[i]
                # detach(): nothing below records a graph, so no no_grad() context is needed.
                xd, qd = x.detach(), q.detach()
                dx.copy_(xd.as_strided(size, xst, xd.storage_offset() + xoff))
                dq.copy_(qd.as_strided(size, qst, qd.storage_offset() + qoff))
                self._qx.append(None)
                self._qsig.append(stage.sigs_at(i))
                self._qlen.append(nblk)
                self._stage_amax(xd, amax)
                self._qkeys.append(key)
                return
        # Host work per call is most of this family's cost at small operand sizes (~80 calls a step
        # in the benchmark model): the operand's sanitised name and its bank slots are looked up once.
        op = self._opnames.get(operand)
        if op is None:
            op = self._opnames[operand] = _OPERAND.sub("_", str(operand))[:60] if operand else ""
        key = (pos, op or None)
        starts = self._qstarts.get(key)
        if starts is None:
            starts = tuple(self._group(("quant", pos, o), lambda o=o: sig.quant_slots(pos, o))
                           for o in ((None, op) if op else (None,)))
            self._qstarts[key] = starts
        # detach(): nothing below records a graph, so no no_grad() context is needed.
        xd, qd = x.detach(), q.detach()
        if xd.dim() and xd.shape[-1] % sig.NVFP4_BLOCK == 0 and xd.numel() and xd.dtype == qd.dtype:
            xs, qs = sig.quant_sample(xd, qd, self.quant_sample_elems)
            # The sampled rows of x and q are copied now (the operand may change in place, e.g. a
            # weight at optimizer.step(), before take_row): into this call's slot of the staging
            # buffer when the call matches the previous step's call at the same position, so the
            # flush needs no cat and no per-call allocation; otherwise into a stacked copy of its own.
            tag = (key, xs.shape, xs.device)
            if stage is not None and i < len(stage.tags) and stage.tags[i] == tag:
                dx, dq = stage.dst[i]
                dx.copy_(xs)
                dq.copy_(qs)
                self._qx.append(None)
            else:
                self._qx.append(torch.stack([xs, qs]).view(2, -1, sig.NVFP4_BLOCK))
            nblk = xs.numel() // sig.NVFP4_BLOCK
            rx, rq = _relative_view(xs, xd), _relative_view(qs, qd)
            fast = None
            if rx is not None and rq is not None and rx[0] == rq[0]:
                raw = (pos, operand, x.shape, x.stride(), q.stride(), x.dtype, q.dtype, x.device)
                fast = (raw, rx, rq, key, nblk)
            self._qsig.append((tag, fast))
            self._qlen.append(nblk)
            self._stage_amax(xd, amax)
            self._qkeys.append(key)
            return
        # Rows that do not divide into 16-blocks (rare): computed at once, whole tensor.
        sums, amax = sig.quant_terms(xd, qd)
        for start in starts:
            self.bank.add(start, sums, amax)

    def _stage_amax(self, xd: torch.Tensor, amax: torch.Tensor | float | None) -> None:
        """Stage the operand's ``max |x|``: the quantiser's when given, else one full read of ``x``."""
        if amax is None:
            lo, hi = torch.aminmax(xd)
            self._qamax.append(torch.maximum(hi, -lo))
        elif isinstance(amax, torch.Tensor):
            # Shape, dtype and device are unified at the flush (one stack, one copy).
            self._qamax.append(amax.detach() if amax.dim() == 0 else amax.detach().reshape(()))
        else:
            self._qamax.append(float(amax))

    def _quant_flush(self) -> None:
        """Compute the staged operands' quantisation statistics in one pass and add them to the bank."""
        if not self._qkeys:
            return
        keys = tuple(self._qkeys)
        plan = self._qplan
        if plan is None or plan[0] != keys:
            # Where each operand's six sums and its amax go: its layer aggregate and its operand
            # group. Cached: the same GEMMs report in the same order step after step.
            rep, spos, mpos = [], [], []
            for i, key in enumerate(keys):
                for s_start, m_start in self._qstarts[key]:
                    rep.append(i)
                    spos.extend(range(s_start, s_start + 6))
                    mpos.append(m_start)
            dev = self.device
            plan = (keys, torch.tensor(rep, device=dev), torch.tensor(spos, device=dev), torch.tensor(mpos, device=dev))
            self._qplan = plan
        _keys, rep, spos, mpos = plan
        lens = tuple(self._qlen)
        if self._qseg is None or self._qseg[0] != lens:
            # Blocks per operand, copied once per shape change; the operand index of every block
            # (ragged layout only) is made on the host (numpy) when first needed.
            self._qseg = (lens, torch.tensor(lens, device=self._qsig[0][0][2]), None)
        lengths = self._qseg[1]

        def segments() -> torch.Tensor:
            found = self._qseg[2]  # type: ignore[index]
            if found is None:
                found = torch.from_numpy(np.repeat(np.arange(len(lens)), lens)).to(lengths.device)
                self._qseg = (lens, lengths, found)
            return found

        stage = self._qstage
        with torch.no_grad():
            if stage is not None and len(self._qx) == len(stage.tags) and all(t is None for t in self._qx):
                sums = stage.sums(lengths, segments)  # every call copied into its slot: one buffer
            else:
                parts = [stage.part(i) if t is None else t.float() for i, t in enumerate(self._qx)]  # type: ignore[union-attr]
                both = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
                sums = sig.quant_block_sums(both, segments(), lengths)
                # Lay the buffer out for this step's calls: the next step makes the same ones.
                self._qstage = _QuantStage.build(self._qsig, self._qlen)
            amax = self._stack_amax(self._qamax)
            self.bank.sums.index_add_(0, spos, sums.to(self.device).index_select(0, rep).reshape(-1))
            self.bank.maxes.scatter_reduce_(0, mpos, amax.index_select(0, rep), reduce="amax")
        self._qx, self._qlen, self._qamax, self._qkeys, self._qsig = [], [], [], [], []

    def _stack_amax(self, found: list[torch.Tensor | float]) -> torch.Tensor:
        """The staged amaxes as one float64 tensor ``[calls]`` on the collector's device."""
        floats = [i for i, a in enumerate(found) if not isinstance(a, torch.Tensor)]
        if floats:  # floats a trainer passed: one host-to-device copy for all of them
            vals = torch.tensor([float(found[i]) for i in floats], dtype=torch.float32, device=self.device)
            found = list(found)
            for k, i in enumerate(floats):
                found[i] = vals[k]
        tensors: list[torch.Tensor] = found  # type: ignore[assignment]
        try:
            return torch.stack(tensors).to(self.device, torch.float64)
        except RuntimeError:  # amaxes of several devices or dtypes
            return torch.stack([a.to(self.device, torch.float64) for a in tensors])

    def _quant_observer(self, pos: int) -> Callable[[str, torch.Tensor, torch.Tensor], None]:
        def observe(operand: str, x: torch.Tensor, q: torch.Tensor, amax: torch.Tensor | None = None) -> None:
            self.quant_stats(pos, operand, x, q, amax=amax)

        return observe

    def _dt_hook(self, pos: int, mixer: nn.Module):  # noqa: ANN202 - returns a torch hook
        heads = int(mixer.A_log.numel())

        def hook(module: nn.Module, inputs: tuple, output: object) -> None:
            if not self.active or not self._sample or not module.training or _in_backward():
                return
            out = output[0] if isinstance(output, (tuple, list)) else output
            if not isinstance(out, torch.Tensor) or out.dim() == 0 or out.shape[-1] < heads:
                return
            self._dt_stats(pos, out[..., -heads:], getattr(mixer, "dt_bias", None))

        return hook

    def _dt_stats(self, pos: int, dt_raw: torch.Tensor, dt_bias: torch.Tensor | None) -> None:
        """Stage dt statistics of Mamba block ``pos`` (its ``in_proj`` output's dt columns).

        Four device ops per call (``dt = softplus(dt_raw + dt_bias)``, its sum and its min/max, the
        same definitions as :func:`signals.dt_terms`); the bank is updated for all calls at once in
        take_row (:meth:`_dt_flush`), where each call used to add its own slots (~14 ops a call)."""
        d = dt_raw.detach().float()
        if not d.numel():
            return
        if dt_bias is not None:
            d = d + dt_bias.detach().float()
        dt = torch.nn.functional.softplus(d)
        lo, hi = torch.aminmax(dt)
        self._dtkeys.append((self._group(("dt", pos), lambda: sig.dt_slots(pos)), dt.numel()))
        self._dtv.append((dt.sum(), hi, lo))

    def _dt_flush(self) -> None:
        """Add the staged dt statistics of the step to the bank (a few ops for all Mamba calls)."""
        if not self._dtkeys:
            return
        keys = tuple(self._dtkeys)
        plan = self._dtplan
        if plan is None or plan[0] != keys:
            # Bank positions of each call's [sum, count] and [max, -min], and the counts (host ints).
            dev = self.device
            spos = torch.tensor([start[0] + k for start, _n in keys for k in (0, 1)], device=dev)
            mpos = torch.tensor([start[1] + k for start, _n in keys for k in (0, 1)], device=dev)
            counts = torch.tensor([float(n) for _s, n in keys], dtype=torch.float64, device=dev)
            plan = self._dtplan = (keys, spos, mpos, counts)
        _keys, spos, mpos, counts = plan
        with torch.no_grad():
            vals = torch.stack([torch.stack(v) for v in self._dtv]).to(self.device, torch.float64)  # [calls, 3]
            self.bank.sums.index_add_(0, spos, torch.stack([vals[:, 0], counts], 1).reshape(-1))
            self.bank.maxes.scatter_reduce_(0, mpos, torch.stack([vals[:, 1], -vals[:, 2]], 1).reshape(-1),
                                            reduce="amax")
        self._dtkeys, self._dtv = [], []

    def attention_logits(self, pos: int, logits: torch.Tensor) -> None:
        """Fold the maximum of ``logits`` (pre-softmax attention scores of block ``pos``) into ``attn_logit_max``."""
        if not self.active or not self._sample or "attention" not in self.families or _in_backward():
            return
        if not isinstance(logits, torch.Tensor) or not logits.numel():
            return
        with torch.no_grad():
            peak = logits.detach().amax().reshape(1)
        self.bank.add(self._group(("attention", pos), lambda: sig.attention_slots(pos)), None, peak)

    def router_ratio(self, pos: int, metric: str, num: torch.Tensor | float, den: torch.Tensor | float) -> None:
        """Accumulate a ratio statistic (e.g. ``token_drop_rate`` = dropped / routed) of block ``pos``."""
        if not self.active:
            return
        start = self.bank.group(("ratio", pos, metric), [sig.RatioSlot(pos, metric)])
        vals = [v if isinstance(v, torch.Tensor) else torch.full((), float(v), device=self.device) for v in (num, den)]
        self.bank.add(start, torch.stack([v.detach().reshape(()).to(self.device, torch.float64) for v in vals]))

    def after_optimizer_step(self, optimizer: Any) -> None:
        """Accumulate per-block update norm and ``||dθ|| / ||θ||`` of the step just taken (device ops only)."""
        if not self.active or "update" not in self.families or not self._params or self._update_done:
            return
        self._update_done = True  # one update per step: the post-step hook and an explicit call agree
        self._update_calls += 1
        if (self._update_calls - 1) % self.update_every:
            return
        got = sig.adam_update_sq(optimizer, self._params, cache=self._update_cache)
        if got is None:
            kind = type(optimizer).__name__
            if kind not in self._warned_optim:
                self._warned_optim.add(kind)
                log.warning("healthwatch: update_ratio needs torch Adam/AdamW state; %s is not supported "
                            "(no update signals are recorded)", kind)
            return
        upd, nrm = got
        nb = self.spec.num_layers
        with torch.no_grad():
            member = self._membership[:nb]
            u_blk = member @ upd.to(self.device, torch.float64)
            n_blk = member @ nrm.to(self.device, torch.float64)
            vec = torch.stack([u_blk, torch.ones_like(u_blk), u_blk, n_blk], dim=1).reshape(-1)
        slots = [s for b in range(nb) for s in sig.update_slots(b)]
        self.bank.add(self.bank.group(("update",), slots), vec)

    def _decay_slots_all(self) -> tuple[list, list]:
        """Slots of every Mamba block's decay stats, block after block (the stacked layout)."""
        ratios: list = []
        maxes: list = []
        for pos, _m in self.mamba:
            r, m = sig.decay_slots(pos)
            ratios.extend(r)
            maxes.extend(m)
        return ratios, maxes

    def _param_stats(self) -> None:
        """Statistics read from parameters and buffers once per recorded step (Mamba decay, expert bias).

        One stacked computation for all blocks when their tensors have the same shape (the usual
        case), instead of a handful of small ops per block.
        """
        with torch.no_grad():
            if "mamba" in self.families and self.mamba:
                if self._decay_stack:
                    # [blocks, heads] (Mamba-1's A_log is [d_inner, d_state]: flattened per block).
                    a = torch.stack([m.A_log.detach() for _p, m in self.mamba]).float().exp().flatten(1)
                    heads = torch.full((a.shape[0],), float(a[0].numel()), dtype=torch.float64, device=a.device)
                    sums = torch.stack([a.sum(-1).to(torch.float64), heads], 1).reshape(-1)
                    maxes = torch.stack([-a.amin(-1), a.amax(-1)], 1).to(torch.float64).reshape(-1)
                    start = self._group(("decay",), self._decay_slots_all)
                    self.bank.add(start, sums, maxes)
                else:
                    for pos, mixer in self.mamba:
                        sums, maxes = sig.decay_terms(mixer.A_log)
                        self.bank.add(self._group(("decay", pos), lambda pos=pos: sig.decay_slots(pos)), sums, maxes)
            if "router" in self.families and self.expert_bias:
                if self._bias_stack:
                    b = torch.stack([t.detach() for _p, t in self.expert_bias]).float()
                    rng = (b.amax(-1) - b.amin(-1)).to(torch.float64)
                    start = self._group(("bias",), lambda: (
                        [], [sig.MaxSlot(pos, "expert_bias_range") for pos, _b in self.expert_bias]))
                    self.bank.add(start, None, rng)
                else:
                    for pos, bias in self.expert_bias:
                        start = self._group(("bias", pos), lambda pos=pos: ([], [sig.MaxSlot(pos, "expert_bias_range")]))
                        self.bank.add(start, None, sig.bias_range(bias))

    def _resid_hook(self, i: int):  # noqa: ANN202 - returns a torch hook
        extract = self.spec.blocks[i].hidden

        def hook(module: nn.Module, inputs: tuple, output: object) -> None:
            # Evaluation passes would mix validation data into training statistics; a forward run
            # inside backward is activation recomputation (checkpointing) of a pass already counted.
            if not self.active or not module.training or _in_backward():
                return
            h = extract(module, inputs, output)
            if not isinstance(h, torch.Tensor) or h.dim() == 0 or h.numel() == 0:
                return
            # One read of h and a [tokens] result: the per-token 2-norm (accumulated in float32
            # whatever h's dtype). Its mean and max over tokens are taken for all of a step's
            # calls at once in take_row (_resid_flush). Squaring h into a temporary of h's size,
            # as before, cost ~5x as much in the trainer's loop (a fresh buffer each call).
            self._rn.append(torch.linalg.vector_norm(h.detach(), dim=-1, dtype=torch.float32))
            self._rn_blocks.append((i, h.shape[-1]))
            self.resid_calls[i] += 1

        return hook

    def _resid_flush(self) -> None:
        """Mean and max over tokens of each staged call's residual RMS, added to its block's accumulators.

        RMS = ‖h‖₂ / √d per token. Calls of equal token count (the usual case) are reduced as one
        ``[calls, tokens]`` stack: ~6 device ops a step instead of ~8 a call."""
        norms, blocks = self._rn, self._rn_blocks
        self._rn, self._rn_blocks = [], []
        shapes = tuple(t.shape for t in norms)
        plan = self._rn_plan
        if plan is None or plan[0] != (tuple(blocks), shapes):
            inv = torch.tensor([w ** -0.5 for _b, w in blocks], dtype=torch.float64, device=self.device)
            idx = torch.tensor([b for b, _w in blocks], device=self.device)
            uniform = all(s == shapes[0] for s in shapes) and all(t.device == norms[0].device for t in norms)
            plan = self._rn_plan = ((tuple(blocks), shapes), inv, idx, uniform)
        _key, inv, idx, uniform = plan
        with torch.no_grad():
            if uniform:
                stacked = torch.stack(norms).reshape(len(norms), -1)
                means, maxes = stacked.mean(1), stacked.amax(1)
            else:
                means = torch.stack([t.reshape(-1).mean().to(self.device) for t in norms])
                maxes = torch.stack([t.reshape(-1).amax().to(self.device) for t in norms])
            self.resid_sum.index_add_(0, idx, means.to(self.device, torch.float64) * inv)
            self.resid_max.scatter_reduce_(0, idx, maxes.to(self.device, torch.float64) * inv, reduce="amax")

    def _router_hook(self, r: int):  # noqa: ANN202 - returns a torch hook
        spec = self.spec.routers[r]
        experts = spec.num_experts
        health = "router" in self.families
        pos = {b.index: i for i, b in enumerate(self.spec.blocks)}.get(spec.layer, spec.layer)

        row = self.counts[r, :experts]  # a view: take_row zeroes counts in place

        def hook(module: nn.Module, inputs: tuple, output: object) -> None:
            if not self.active or not module.training or _in_backward():
                return
            # detach(): nothing below records a graph, so no no_grad() context (~5 µs) is needed.
            decision = spec.extract(module, inputs, output).detach()
            if decision.dtype == torch.bool or (decision.is_floating_point() and decision.shape[-1] == experts):
                row.add_(decision.reshape(-1, experts).to(torch.float64).sum(0))
            else:
                idx = decision.reshape(-1)
                if idx.dtype != torch.long:
                    idx = idx.long()
                # Ones of the call's size are kept (a fresh tensor a call cost ~40 µs on CPU);
                # bincount would be one op but sizes its output from the data: a sync on CUDA.
                n = idx.shape[0]
                ones = self._ones.get((n, idx.device))
                if ones is None:
                    if len(self._ones) >= 32:  # varying batch shapes: keep the cache small
                        self._ones.clear()
                    ones = self._ones[(n, idx.device)] = torch.ones(n, device=idx.device, dtype=torch.float64)
                row.index_add_(0, idx, ones)
            if health and self._sample:
                self._router_health(pos, spec, module, inputs, output)
            self.router_calls[r] += 1

        return hook

    def _router_health(self, pos: int, spec: Any, module: nn.Module, inputs: tuple, output: object) -> None:
        """Stage routing entropy, z-loss and max logit of the MoE layer at block ``pos`` for take_row.

        Two device ops per call: a float32 copy of the (token-sampled) logits and their max; the
        entropy and z-loss of all of a step's router calls are computed at once in take_row
        (:meth:`_router_flush`), where one call each used to cost ~20 small ops."""
        logits = self._router_logits(spec, module, inputs, output)
        if logits is None:
            return
        lg = logits.detach().reshape(-1, logits.shape[-1])
        if not lg.shape[0]:
            return
        self._rkeys.append(self._group(("router", pos), lambda: sig.router_slots(pos)))
        self._rx.append(sig.router_sample(lg))
        self._rmax.append(lg.amax())

    def _router_flush(self) -> None:
        """Compute the staged router calls' entropy and z-loss in one pass per expert count; add them to the bank."""
        if not self._rkeys:
            return
        shape = (tuple(self._rkeys), tuple(t.shape for t in self._rx))
        plan = self._rplan
        if plan is None or plan[0] != shape:
            # Per expert count E: the calls, the call of each row (host numpy), rows per call, and
            # where each call's four sums go. Cached: the same routers report in the same order.
            by_width: dict[int, list[int]] = {}
            for i, t in enumerate(self._rx):
                by_width.setdefault(t.shape[1], []).append(i)
            dev = self.device
            groups = []
            for calls in by_width.values():
                lens = [self._rx[i].shape[0] for i in calls]
                seg = torch.from_numpy(np.repeat(np.arange(len(calls)), lens)).to(self._rx[calls[0]].device)
                spos = torch.tensor([self._rkeys[i][0] + k for i in calls for k in range(4)], device=dev)
                groups.append((calls, seg, torch.tensor(lens, device=seg.device), spos))
            mpos = torch.tensor([k[1] for k in self._rkeys], device=dev)
            plan = self._rplan = (shape, groups, mpos)
        _shape, groups, mpos = plan
        with torch.no_grad():
            for calls, seg, lens, spos in groups:
                x = torch.cat([self._rx[i] for i in calls]) if len(calls) > 1 else self._rx[calls[0]]
                sums = sig.router_block_sums(x, seg, lens)
                self.bank.sums.index_add_(0, spos, sums.to(self.device).reshape(-1))
            mx = torch.stack(self._rmax).to(self.device, torch.float64)
            self.bank.maxes.scatter_reduce_(0, mpos, mx, reduce="amax")
        self._rx, self._rmax, self._rkeys = [], [], []

    def _router_logits(self, spec: Any, module: nn.Module, inputs: tuple, output: object) -> torch.Tensor | None:
        """Router logits ``[..., E]``: ``module.last_logits`` (reference model), a ``logits`` extractor
        on the RouterSpec, or the router's first floating output of width E (HF routers return
        logits first). Megatron routers return probabilities: no logits, no router health."""
        experts = spec.num_experts
        found = getattr(module, "last_logits", None)
        if found is None and callable(getattr(spec, "logits", None)):
            found = spec.logits(module, inputs, output)
        if found is None and self.spec.adapter != "megatron":
            cand = output[0] if isinstance(output, (tuple, list)) and output else output
            if isinstance(cand, torch.Tensor) and cand.is_floating_point() and cand.dim() and cand.shape[-1] == experts:
                found = cand
        if not isinstance(found, torch.Tensor) or found.dim() == 0 or found.shape[-1] != experts:
            return None
        return found

    # -- gradients ---------------------------------------------------------------------------
    def _build_membership(self) -> tuple[list[nn.Parameter], torch.Tensor]:
        """Parameters to norm and a ``[groups, params]`` 0/1 matrix mapping them to groups."""
        spec = self.spec
        params: list[nn.Parameter] = []
        index: dict[int, int] = {}

        def idx(p: nn.Parameter) -> int:
            if id(p) not in index:
                index[id(p)] = len(params)
                params.append(p)
            return index[id(p)]

        pairs: list[tuple[int, int]] = []
        for b, block in enumerate(spec.blocks):
            pairs.extend((b, idx(p)) for p in block.params)
        for g, name in enumerate(self.layout.special):
            group = spec.all_params if name == "total" else spec.special_params.get(name, [])
            pairs.extend((spec.num_layers + g, idx(p)) for p in group)
        member = torch.zeros(self.layout.n_groups, max(1, len(params)), dtype=torch.float64)
        scale = getattr(spec, "grad_scale", None) or {}
        for g, p in pairs:
            member[g, p] = scale.get(id(params[p]), 1.0)
        return params, member.to(self.device)

    def after_backward(self, clip: Sequence[torch.Tensor] | None = None) -> torch.Tensor | None:
        """Accumulate squared gradient norms per block and per special group (device ops only).

        With ``clip`` (parameters the trainer clips), the same single ``_foreach_norm`` also gives
        their total 2-norm, returned as :func:`torch.nn.utils.get_total_norm` computes it (the
        stack of per-tensor norms, in parameter order, normed again), so the trainer's clipping
        needs no second read of the gradients. Parameters without a gradient are left out of it.
        Returns None, having recorded nothing, when the total cannot come from this pass: gradients
        in ``main_grad`` (megatron: the trainer's clip reads those) or of a tensor subclass
        (``DTensor``: sharded, the total needs a reduction); the caller then falls back.
        """
        if clip is None:
            grads = []
            for p in self._params:
                g = getattr(p, "main_grad", None)
                grads.append(p.grad if g is None else g)
            return self._grad_norms(grads, None)
        key = tuple(map(id, clip))
        plan = self._clip_plan
        if plan is None or plan[0] != key:
            index = {id(p): i for i, p in enumerate(self._params)}
            extra = [p for p in clip if id(p) not in index]
            for p in extra:
                index.setdefault(id(p), len(index))
            every = self._params + extra
            # Checked when the parameter list changes (megatron attaches main_grad once, at wrap time).
            main = any(getattr(p, "main_grad", None) is not None for p in every)
            plan = self._clip_plan = (key, every, [index[id(p)] for p in clip], main)
        _key, params, clip_idx, main = plan
        if main:
            return None
        grads = [p.grad for p in params]
        if any(g is not None and type(g) is not torch.Tensor for g in grads):
            return None
        return self._grad_norms(grads, clip_idx)

    def _grad_norms(self, grads: list[torch.Tensor | None], clip_idx: list[int] | None) -> torch.Tensor | None:
        """One ``_foreach_norm`` over ``grads`` (None: no gradient, counts 0): the watched parameters'
        (the first ``len(self._params)``) squared norms into ``grad_sq``; the total 2-norm of those at
        ``clip_idx`` returned (None without ``clip_idx``)."""
        if not grads:
            return None
        present = [g is not None for g in grads]
        if not all(present):
            if self._zero is None:
                self._zero = torch.zeros(1, device=self.device)
            grads = [self._zero if g is None else g for g in grads]
        with torch.no_grad():  # no graph is recorded, so the grads need no per-tensor detach()
            norms = torch._foreach_norm(grads)  # type: ignore[arg-type]
            n_own = len(self._params)
            if n_own:
                own = norms[:n_own]
                try:
                    # One stack and one cast instead of a cast per parameter (~2 µs each on the host).
                    stacked = torch.stack(own).to(device=self.device, dtype=torch.float64)
                except RuntimeError:  # norms on several devices
                    stacked = torch.stack([n.to(device=self.device, dtype=torch.float64) for n in own])
                self.grad_sq.copy_(self._membership @ stacked.pow(2))
                self.has_wgrad = True
            if clip_idx is None:
                return None
            chosen = [norms[i] for i in clip_idx if present[i]]
            if not chosen:
                return torch.tensor(0.0)
            first = chosen[0].device
            return torch.linalg.vector_norm(torch.stack([n.to(first) for n in chosen]), 2.0)

    # -- per step ----------------------------------------------------------------------------
    def take_row(self, scalars: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, list[int], list[int], bool]:
        """The step's (sum row, max row, residual calls, router calls, has_wgrad); resets accumulators."""
        if self.active:
            self._param_stats()
        if self._qkeys:
            if self.active:
                self._quant_flush()
            else:  # an unrecorded step: drop what was staged
                self._qx, self._qlen, self._qamax, self._qkeys, self._qsig = [], [], [], [], []
        if self._rkeys:
            if self.active:
                self._router_flush()
            else:
                self._rx, self._rmax, self._rkeys = [], [], []
        if self._dtkeys:
            if self.active:
                self._dt_flush()
            else:
                self._dtkeys, self._dtv = [], []
        if self._rn:
            if self.active:
                self._resid_flush()
            else:
                self._rn, self._rn_blocks = [], []
        parts = [*(s.reshape(1) for s in scalars), self.resid_sum, self.grad_sq]
        if self.spec.routers:
            parts.append(self.counts.reshape(-1))
        max_parts = [self.resid_max]
        if not self.bank.empty:
            bank_sums, bank_max = self.bank.take()
            parts.append(bank_sums)
            max_parts.append(bank_max)
        sum_row = torch.cat(parts)
        max_row = torch.cat(max_parts) if len(max_parts) > 1 else self.resid_max.clone()
        resid_calls, router_calls, has_wgrad = self.resid_calls, self.router_calls, self.has_wgrad
        self.resid_sum.zero_()
        self.resid_max.zero_()
        self.grad_sq.zero_()
        self.counts.zero_()
        self.resid_calls = [0] * len(resid_calls)
        self.router_calls = [0] * len(router_calls)
        self.has_wgrad = False
        self._update_done = False
        self._steps_taken += 1
        self._sample = self._steps_taken % self.signals_every == 0
        return sum_row, max_row, resid_calls, router_calls, has_wgrad
