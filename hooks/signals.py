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

    def lookup(self, key: object) -> tuple[int, int] | None:
        """The group's start if it was allocated, else None (no allocation)."""
        return self._groups.get(key)

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

    * underflow: elements with ``x != 0`` and ``q == 0``, over the non-zero elements; counted as
      ``nnz(x) - nnz(q)``, which assumes what every rounding quantiser does: ``x == 0`` gives ``q == 0``;
    * saturated: elements clipped at the top of their block's grid, i.e. ``|x|`` above the largest
      ``|q|`` of its ``block``-element block along the last dimension (the format maximum 6 x block
      scale); blocks of the whole tensor when the last dimension does not divide into blocks. A
      value above its block's top can only round to that top, so this is "clipped"; an all-zero
      block has no top (its values underflowed, they did not clip);
    * ``err_sq = ||q - x||^2`` and ``x_sq = ||x||^2`` (relative MSE = their ratio).

    About 10 memory passes over the operand (the first version took ~22: boolean masks combined
    with ``&`` and a materialised per-element block top); docs/signals.md has the measured cost.
    """
    with torch.no_grad():
        xf = x.detach().float()
        qf = q.detach().float()
        dev = xf.device
        if not xf.numel():
            zero = torch.zeros((), dtype=torch.float64, device=dev)
            return torch.stack([zero, zero, zero, zero, zero, zero]), torch.zeros(1, dtype=torch.float64, device=dev)
        ax = xf.abs()
        aq = qf.abs()
        if xf.dim() and xf.shape[-1] % block == 0:
            top = aq.reshape(-1, block).amax(-1, keepdim=True)
            ax_b = ax.reshape(-1, block)
        else:
            top = aq.amax().reshape(1, 1)
            ax_b = ax.reshape(1, -1)
        # An all-zero block (top 0) never counts as clipped: +inf is above every |x|.
        top = top.masked_fill(top == 0, math.inf)
        sat = torch.count_nonzero(ax_b > top)
        nz = torch.count_nonzero(xf)
        under = nz - torch.count_nonzero(qf)
        err, xn = torch._foreach_norm([qf - xf, xf])
        sums = torch.stack([
            under, nz, sat,
            torch.full((), xf.numel(), dtype=torch.int64, device=dev),
        ]).to(torch.float64)
        sq = torch.stack([err, xn]).to(torch.float64).pow(2)
        amax = ax.amax().reshape(1).to(torch.float64)
    return torch.cat([sums, sq]), amax


#: Elements of one quantised operand that the Monitor's collector reads for underflow, saturation
#: and relative MSE (the default of ``MonitorConfig.quant_sample_elems``): larger operands are read
#: on evenly strided whole rows (blocks stay intact), which bounds the per-call cost; ``fp4_amax``
#: is exact (the quantiser's, or one read of the whole operand). A ratio estimated from 2^11
#: elements has a standard error below 1.1 percentage points (0.48 at 5 %; docs/signals.md). 2^12
#: halves the error's variance; it cost 0.8-3.8 ms more a step on the benchmark model's 79 operand
#: calls (two alternating pairs, quant observers + step()).
QUANT_SAMPLE_ELEMS = 1 << 11


def quant_sample(x: Tensor, q: Tensor, cap: int = QUANT_SAMPLE_ELEMS) -> tuple[Tensor, Tensor]:
    """Evenly strided whole rows (last dimension) of ``x`` and ``q``, about ``cap`` elements (views).

    Operands of at most ``cap`` elements come back whole. Rows of ``cap`` elements or more (a hidden
    size of 2,048+ at the default cap, the usual case at scale) are sampled by evenly strided ``NVFP4_BLOCK``-element
    blocks instead of whole rows: a block is the unit NVFP4 scales, so each sampled block is
    quantised exactly as in the full tensor, and the read stays at ~``cap`` elements however wide
    the GEMM (a whole-row sample there would read the operand in full).
    """
    n = x.numel()
    if n <= cap or x.dim() == 0:
        return x, q
    k = x.shape[-1]
    rows = n // max(1, k)
    if k == 0:
        return x, q
    if k >= cap:
        if k % NVFP4_BLOCK:
            return x, q
        stride = -(-n // cap)  # ceil, in blocks: at most ~cap elements
        return x.reshape(-1, NVFP4_BLOCK)[::stride], q.reshape(-1, NVFP4_BLOCK)[::stride]
    stride = -(-rows * k // cap)  # ceil: at most ~cap elements
    return x.reshape(rows, k)[::stride], q.reshape(rows, k)[::stride]


def quant_block_sums(both: Tensor, segments: Tensor, lengths: Tensor, block: int = NVFP4_BLOCK) -> Tensor:
    """Per-operand sums ``[underflow, nonzero, saturated, numel, err_sq, x_sq]`` (float64 ``[n, 6]``)
    of ``n`` operands given as the concatenation of their ``block``-element blocks, ``both[0]`` the
    blocks of x and ``both[1]`` those of q (``[2, NB, block]`` float32), ``lengths [n]`` blocks each,
    ``segments [NB]`` the operand of each block (``repeat(arange(n), lengths)``, built by the caller on
    the host: ``repeat_interleave`` on a device tensor would sync). The same definitions as
    :func:`quant_terms`, for all of a step's operands in one pass.

    The five per-element quantities (``x != 0``, ``q != 0``, clipped, ``(q - x)^2``, ``x^2``) are
    written into one ``[5, NB, block]`` float32 buffer and summed per block by one matrix-vector
    product: a reduction over a 16-wide inner dimension is several times slower per element on CPU
    than the product, and bool-to-float sums cost a conversion pass each (measured 2x faster in all
    than five separate ``sum(-1)``). Counts stay exact in float32 (below 2^24 per block)."""
    with torch.no_grad():
        nb = both.shape[1]
        f32 = torch.float32
        feats = torch.empty(5, nb, block, dtype=f32, device=both.device)
        x, q = both[0], both[1]
        torch.ne(both, 0, out=feats[0:2])
        ax = torch.abs(x, out=feats[2])
        # The top of each block's grid: max |q| of the block (a 16-wide max-pool, ~2x amax(-1) on CPU).
        top = torch.nn.functional.max_pool1d(q.abs().reshape(1, 1, -1), block, block).reshape(-1, 1)
        # An all-zero block (top 0) never counts as clipped: +inf is above every |x|.
        top.masked_fill_(top == 0, math.inf)
        torch.gt(ax, top, out=feats[2])
        torch.sub(q, x, out=feats[3]).square_()
        torch.mul(x, x, out=feats[4])
        per_block = (feats.view(-1, block) @ feats.new_ones(block)).view(5, nb).t()
        seg = per_block.new_zeros(lengths.shape[0], 5).index_add_(0, segments, per_block).to(torch.float64)
        numel = lengths.to(torch.float64).mul(block).unsqueeze(1)
        # [nnz(x) - nnz(q), nnz(x), saturated, numel, err_sq, x_sq]
        return torch.cat([seg[:, 0:1] - seg[:, 1:2], seg[:, 0:1], seg[:, 2:3], numel, seg[:, 3:5]], dim=1)


def quant_padded_sums(both: Tensor, lengths: Tensor, block: int = NVFP4_BLOCK, work: Tensor | None = None) -> Tensor:
    """:func:`quant_block_sums` for operands laid out one per row: ``both [2, n, W]`` (x, then q),
    operand ``i``'s sampled elements first in its row and zeros after them (``W`` a multiple of
    ``block``), ``lengths [n]`` its blocks. Zero padding adds nothing to any sum: a zero is not
    non-zero, its all-zero block has no top (never clipped), its error and square are 0.

    With whole rows per operand, the per-operand sums are plain row reductions: the three counts
    (``x != 0``, ``q != 0``, clipped) written into one buffer and summed per row, the squared error and
    ``||x||^2`` as row norms (one read each, squared in float64). No per-block reduction and no
    segment index (measured ~3x faster than :func:`quant_block_sums` on the benchmark model's 79
    operands). ``work``: a float32 ``[4, n, W]`` scratch buffer the caller keeps from call to call (a
    fresh one each call costs page faults on CPU: ~1 ms a step for the benchmark model's 5 MB)."""
    with torch.no_grad():
        n, w = both.shape[1], both.shape[2]
        if work is None or work.shape != (4, n, w) or work.device != both.device:
            work = torch.empty(4, n, w, dtype=torch.float32, device=both.device)
        counts = work[:3]
        x, q = both[0], both[1]
        torch.ne(both, 0, out=counts[0:2])
        ax = torch.abs(x, out=counts[2])
        # The top of each block's grid: max |q| of the block (a 16-wide max-pool).
        aq = torch.abs(q, out=work[3])
        top = torch.nn.functional.max_pool1d(aq.reshape(1, n, w), block, block).reshape(n, w // block, 1)
        # An all-zero block (top 0) never counts as clipped: +inf is above every |x|.
        top.masked_fill_(top == 0, math.inf)
        torch.gt(ax.view(n, w // block, block), top, out=counts[2].view(n, w // block, block))
        seg = counts.view(3 * n, w).sum(-1).view(3, n).t().to(torch.float64)
        err = torch.linalg.vector_norm(torch.sub(q, x, out=work[3]), dim=-1).to(torch.float64).square()
        xsq = torch.linalg.vector_norm(x, dim=-1).to(torch.float64).square()
        numel = lengths.to(torch.float64).mul(block).unsqueeze(1)
        # [nnz(x) - nnz(q), nnz(x), saturated, numel, err_sq, x_sq]
        return torch.cat([seg[:, 0:1] - seg[:, 1:2], seg[:, 0:1], seg[:, 2:3], numel, err.unsqueeze(1),
                          xsq.unsqueeze(1)], dim=1)


def quant_slots(layer: int, operand: str | None) -> tuple[list[RatioSlot], list[MaxSlot]]:
    """Slots of one layer's quantisation stats (``operand`` None: the layer aggregate)."""
    suffix = f"/{operand}" if operand else ""
    ratios = [RatioSlot(layer, m + suffix) for m in QUANT_RATIOS]
    return ratios, [MaxSlot(layer, "fp4_amax" + suffix)]


# -- router health ------------------------------------------------------------------------------
def router_terms(logits: Tensor) -> tuple[Tensor, Tensor]:
    """Sums ``[entropy_sum, tokens, zloss_sum, tokens]`` and max ``[max logit]`` of router logits ``[..., E]``.

    Entropy is per token, of ``softmax(logits)``, divided by ``log E`` (0 = one expert takes all
    probability, 1 = uniform). z-loss is ``logsumexp(logits)^2`` per token. Computed from one
    ``logsumexp``: with ``lse`` per token, ``H = lse - sum_e p_e * logit_e`` (``sum_e p_e = 1``).
    """
    with torch.no_grad():
        lg = logits.detach().float().reshape(-1, logits.shape[-1])
        e = lg.shape[-1]
        if not lg.numel():
            zero = torch.zeros((), dtype=torch.float64, device=lg.device)
            return torch.stack([zero, zero, zero, zero]), lg.new_full((1,), -math.inf, dtype=torch.float64)
        lse = torch.logsumexp(lg, -1)
        p = (lg - lse.unsqueeze(-1)).exp_()
        ent = lse.sum() - torch.dot(p.reshape(-1), lg.reshape(-1))
        ent = ent / math.log(e) if e > 1 else ent * 0.0
        n = torch.full((), float(lg.shape[0]), dtype=torch.float32, device=lg.device)
        sums = torch.stack([ent, n, torch.dot(lse, lse), n]).to(torch.float64)
        mx = lg.amax().reshape(1).to(torch.float64)
    return sums, mx


#: Tokens of one router call whose logits the collector reads for entropy and z-loss: larger calls
#: are read on evenly strided tokens (both are means over tokens; with 1,024 tokens the standard
#: error of the mean normalised entropy is at most 0.5 / 32 ≈ 0.016, the bound for a value in
#: [0, 1], docs/signals.md). The max logit always reads every token.
ROUTER_SAMPLE_TOKENS = 1 << 10


def router_sample(logits: Tensor, cap: int = ROUTER_SAMPLE_TOKENS) -> Tensor:
    """A float32 copy of evenly strided rows (tokens) of ``logits [T, E]``, at most ``cap`` of them."""
    rows = logits if logits.shape[0] <= cap else logits[:: -(-logits.shape[0] // cap)]
    return rows.to(torch.float32, copy=True)


def router_block_sums(logits: Tensor, segments: Tensor, lengths: Tensor) -> Tensor:
    """Sums ``[entropy_sum, tokens, zloss_sum, tokens]`` per call (float64 ``[n, 4]``) of ``n`` router
    calls whose logits rows are concatenated in ``logits [T, E]`` (one expert count E), ``segments [T]``
    the call of each row and ``lengths [n]`` the rows of each call. The same definitions as
    :func:`router_terms`, for all of a step's routers in ~10 device ops."""
    with torch.no_grad():
        e = logits.shape[-1]
        lse = torch.logsumexp(logits, -1)
        p = (logits - lse.unsqueeze(-1)).exp_()
        ent = lse - p.mul_(logits).sum(-1)
        ent = ent / math.log(e) if e > 1 else ent * 0.0
        per = torch.stack([ent, lse * lse], 1)
        seg = per.new_zeros(lengths.shape[0], 2).index_add_(0, segments, per).to(torch.float64)
        n = lengths.to(torch.float64)
        return torch.stack([seg[:, 0], n, seg[:, 1], n], 1)


def router_slots(layer: int) -> tuple[list[RatioSlot], list[MaxSlot]]:
    """Slots of one MoE layer's router stats."""
    return [RatioSlot(layer, m) for m in ROUTER_RATIOS], [MaxSlot(layer, "router_max_logit")]


def bias_range(bias: Tensor) -> Tensor:
    """``max - min`` of an expert-bias vector (aux-loss-free balancing), as ``[1]`` float64."""
    with torch.no_grad():
        b = bias.detach().float()
        return (b.amax() - b.amin()).reshape(1).to(torch.float64)


# -- attention health ---------------------------------------------------------------------------
def attention_slots(layer: int) -> tuple[list[RatioSlot], list[MaxSlot]]:
    """Slot of one attention block's maximum pre-softmax logit (``attn_logit_max``)."""
    return [], [MaxSlot(layer, "attn_logit_max")]


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
        d = d + dt_bias.detach().float() if dt_bias is not None else d
        dt = torch.nn.functional.softplus(d)
        lo, hi = torch.aminmax(dt)
        n = torch.full((), float(dt.numel()), dtype=torch.float32, device=dt.device)
        sums = torch.stack([dt.sum(), n]).to(torch.float64)
        maxes = torch.stack([hi, -lo]).to(torch.float64)
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


#: Elements of each parameter (and of its Adam moments) read for the update family: larger tensors
#: are read on an evenly strided sample of about this many elements and their sums of squares
#: scaled by numel / sampled (an estimate with a relative standard error of ~3 % per tensor for
#: Gaussian-like values; tensors up to this size are read whole, exactly).
UPDATE_SAMPLE_ELEMS = 1 << 11


#: Contiguous run of elements read together by the update family's sample: one element every k
#: would touch one cache line (or GPU sector) per element, costing as much as reading everything.
SAMPLE_CHUNK = 64


def _sample_view(t: Tensor, cap: int) -> Tensor:
    """An evenly strided sample of about ``cap`` elements of ``t``, read in contiguous chunks of
    :data:`SAMPLE_CHUNK` elements, as a view (``[rows, SAMPLE_CHUNK]`` or flat; ``t`` contiguous).

    Tensors of at most ``cap`` elements come back whole. Never more than ``cap`` elements."""
    flat = t.reshape(-1)
    n = flat.numel()
    if n <= cap:
        return flat
    if n % SAMPLE_CHUNK == 0:
        rows = flat.view(-1, SAMPLE_CHUNK)
        return rows[:: -(-rows.shape[0] * SAMPLE_CHUNK // cap)]
    return flat[:: -(-n // cap)]


class _Gather:
    """Copies the samples of many tensors into the rows of one preallocated ``[rows, width]``
    float32 buffer with one ``torch._foreach_copy_`` (row ``i`` holds tensor ``i``'s sample in
    its first elements and ``pad`` after them), so per-tensor sums are row sums: no per-tensor
    op, no per-element segment index on the hot path."""

    def __init__(self, views: Sequence[Tensor], width: int, pad: float, device: torch.device) -> None:
        self.views = list(views)
        self.buf = torch.full((len(views), width), pad, dtype=torch.float32, device=device)
        self.dst = [self.buf[i, : v.numel()].view(v.shape) for i, v in enumerate(self.views)]

    def __call__(self) -> Tensor:
        if self.views:
            torch._foreach_copy_(self.dst, self.views)
        return self.buf


class _UpdatePlan:
    """What :func:`adam_update_sq` reads, built once and reused while the optimizer's state tensors
    stay the same objects at the same addresses (torch's Adam updates them in place): the sampled
    views of every parameter and of its moments, their gather buffers, the scale of each sample.
    ``key`` says what it was built for; a new parameter, a new state tensor, a parameter that got or
    lost its gradient, or a changed ``lr``/``betas`` *type* rebuilds it (host work only)."""

    def __init__(self, key: tuple, params: Sequence[Tensor], groups: list[tuple[dict, list[int], list[dict]]],
                 sample: int, dev: torch.device) -> None:
        self.key = key
        views = [_sample_view(p.detach(), sample) for p in params]
        counts = [v.numel() for v in views]
        width = max(1, max(counts, default=1))
        #: numel / sampled of each parameter (sums of squares are scaled by it).
        self.scale = torch.tensor([p.numel() / max(1, c) for p, c in zip(params, counts)], dtype=torch.float64,
                                  device=dev)
        self.theta = _Gather(views, width, 0.0, dev)
        self.groups = []
        for group, idx, states in groups:
            amsgrad = bool(group.get("amsgrad"))
            ms = [_sample_view(st["exp_avg"], sample) for st in states]
            vs = [_sample_view(st["max_exp_avg_sq"] if amsgrad else st["exp_avg_sq"], sample) for st in states]
            # Padding: m = 0 and v = 1 make a padded element's update exactly 0 whatever eps is.
            gv = _Gather(vs, width, 1.0, dev)
            # Per group: rows, gathers of m and v, step counters, whether its rows are all
            # parameters in order (no index_select of θ), and the work buffer the update is computed in.
            self.groups.append((
                group, torch.tensor(idx, device=dev), _Gather(ms, width, 0.0, dev), gv,
                [st["step"] for st in states], idx == list(range(len(params))), torch.empty_like(gv.buf),
            ))


def _addr(t: Tensor) -> int:
    """Storage address of ``t`` (a host attribute, no device read); ``id(t)`` for a tensor subclass
    without storage of its own (e.g. a sharded wrapper), whose views cannot be cached by address."""
    try:
        return t.data_ptr()
    except RuntimeError:
        return id(t)


def _updated_states(optimizer: torch.optim.Optimizer, want: dict[int, int]) -> list[tuple[dict, list[tuple]]]:
    """Per param group: the group and ``(index in params, parameter, its state, its v)`` of each watched
    parameter this step updated (a gradient and Adam state; ``v`` the AMSGrad max when used). Host only."""
    out: list[tuple[dict, list[tuple]]] = []
    for group in optimizer.param_groups:
        amsgrad = bool(group.get("amsgrad"))
        rows = []
        for p in group["params"]:
            i = want.get(id(p))
            st = optimizer.state.get(p)
            if i is None or p.grad is None or not st or "exp_avg" not in st:
                continue
            v = st.get("max_exp_avg_sq") if amsgrad else st.get("exp_avg_sq")
            if v is not None:
                rows.append((i, p, st, v))
        out.append((group, rows))
    return out


def _plan_key(selected: list[tuple[dict, list[tuple]]]) -> tuple:
    """Identity of everything an :class:`_UpdatePlan` holds views of (host attributes only, no device read)."""
    key: list = []
    for _group, rows in selected:
        key.extend((i, _addr(p), _addr(st["exp_avg"]), _addr(v), id(st["step"])) for i, p, st, v in rows)
        key.append(None)  # group boundary
    return tuple(key)


def adam_update_sq(optimizer: torch.optim.Optimizer, params: Sequence[Tensor],
                   sample: int = UPDATE_SAMPLE_ELEMS, cache: dict | None = None) -> tuple[Tensor, Tensor] | None:
    """``(||dθ_i||^2, ||θ_i||^2)`` per parameter of ``params`` just after an Adam/AdamW step.

    Rebuilt from the optimizer's state, not from a copy of the parameters. With ``u`` the Adam
    step ``lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)`` (``v`` the AMSGrad max when used):
    Adam (L2 weight decay inside ``m``): ``dθ = -u``; AdamW (decoupled decay ``λ``):
    ``θ_new = θ_old (1 - lr λ) - u`` so ``dθ = -(u + lr λ θ_new) / (1 - lr λ)``. A parameter with
    no gradient this step was not updated (``dθ = 0``). Must run before ``zero_grad`` and before
    the learning-rate scheduler changes ``lr`` (the post-step hook does).

    Cost: every tensor is read on an evenly strided sample of at most ``sample`` elements
    (:data:`UPDATE_SAMPLE_ELEMS`; smaller tensors whole) and sums of squares are scaled by
    numel / sampled. The samples are copied into the rows of preallocated ``[tensors, sample]``
    buffers with one ``_foreach_copy_`` per kind (θ, m, v), and the update is computed on those
    with ~20 device ops in all (5 passes over the buffers), whatever the number of parameters. ``cache`` (a dict the caller
    keeps) holds the views and buffers from step to step: without it they are rebuilt per call
    (the same values, more host work). Memory: the buffers, 3 x 4 bytes x ``sample`` per
    parameter tensor at most. Returns None for optimizers it does not know.
    """
    if not is_adam(optimizer):
        return None
    n = len(params)
    dev = params[0].device if n else torch.device("cpu")
    if not n:
        z = torch.zeros(0, dtype=torch.float64, device=dev)
        return z, z.clone()
    want = {id(p): i for i, p in enumerate(params)}
    selected = _updated_states(optimizer, want)
    key = (tuple(_addr(p) for p in params), sample, _plan_key(selected))
    plan: _UpdatePlan | None = cache.get("plan") if cache is not None else None
    if plan is None or plan.key != key:
        groups = [(group, [r[0] for r in rows], [r[2] for r in rows]) for group, rows in selected]
        plan = _UpdatePlan(key, params, groups, sample, dev)
        if cache is not None:
            cache["plan"] = plan
    decoupled_default = isinstance(optimizer, torch.optim.AdamW)
    f32, f64 = torch.float32, torch.float64
    with torch.no_grad():
        # ||θ||^2 of every parameter, updated this step or not, from the same kind of sample.
        theta_all = plan.theta()
        # Row norms (one read, no write) squared in float64: ||θ||^2 of each sample.
        nrm = torch.linalg.vector_norm(theta_all, dim=1).to(f64).square() * plan.scale
        upd = torch.zeros(n, dtype=f64, device=dev)
        for group, sel, gm, gv, steps, sel_all, work in plan.groups:
            if not steps:
                continue
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group.get("weight_decay", 0.0)
            decoupled = group.get("decoupled_weight_decay", decoupled_default)
            # Bias corrections as tensor ops on the step counters (on CPU unless capturable/fused):
            # reading a counter's value would be a host read.
            try:
                stepv = torch.stack(steps).reshape(-1, 1).to(dev, f64)
            except RuntimeError:  # counters of several shapes or devices
                stepv = torch.stack([c.reshape(()).to(dev, f64) for c in steps]).reshape(-1, 1)
            lr_t = torch.as_tensor(lr, dtype=f64, device=dev)
            # r = lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps) = s * u with u = m / (sqrt(v) + eps sqrt(bc2)) and
            # the per-row s = lr / bc1 * sqrt(bc2): the row scales go onto the [rows] sums in float64, so
            # the [rows, sample] buffer sees 4 passes (sqrt, add, div, norm) instead of 9.
            sqrt_bc2 = (1 - float(beta2) ** stepv).sqrt()
            s = lr_t / (1 - float(beta1) ** stepv) * sqrt_bc2
            u = torch.sqrt(gv(), out=work)
            u.add_((float(eps) * sqrt_bc2).to(f32))
            torch.div(gm(), u, out=u)
            factor = s.square().reshape(-1)
            if decoupled and wd:
                # AdamW: dθ (1 - lr λ) = -(r + lr λ θ_new) = -s (u + lr λ / s θ_new); s = 0 only when lr = 0.
                lam = lr_t * float(wd)
                theta = theta_all if sel_all else theta_all.index_select(0, sel)
                u.addcmul_(theta, (lam / s.masked_fill(s == 0, 1.0)).to(f32))
                factor = factor / (1 - lam).square()
            sq = torch.linalg.vector_norm(u, dim=1).to(f64).square() * factor
            upd.index_copy_(0, sel, sq * plan.scale.index_select(0, sel))
    return upd, nrm
