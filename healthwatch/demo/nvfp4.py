"""NVFP4 fake quantisation for the demo trainer.

NVFP4 stores each value as a 4-bit E2M1 float, in blocks of 16 elements along the last
(reduction) dimension. Each block carries a scale in FP8 E4M3, and the whole tensor carries one
FP32 scale chosen so that the largest block scale lands exactly on the top of the E4M3 range:

    s_tensor = amax(x) / (6 * 448)
    s_block  = e4m3(amax(block) / 6 / s_tensor) * s_tensor
    q        = rne_e2m1(x / s_block) * s_block

The functions here *simulate* that format in float32 ("fake quantisation"): values come back
dequantised, with the same shape and dtype, so the rest of the model runs unchanged and sees
exactly the rounding error real NVFP4 GEMM inputs would carry. Gradients pass straight through.

What the full NVFP4 training recipe adds and this demo leaves out, because it is about gradient
noise on very large runs rather than the forward-pass error we want to exhibit: random Hadamard
transforms on weight-gradient GEMM inputs, stochastic rounding of gradients, and 16x16 2-D block
scales for weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "BLOCK_SIZE",
    "E2M1_MAX",
    "E2M1_VALUES",
    "E4M3_MAX",
    "QuantLinear",
    "fake_quant_nvfp4",
    "fake_quant_nvfp4_amax",
    "fake_quant_nvfp4_many",
    "fake_quant_nvfp4_many_amax",
    "observe_quant",
    "quantize_nvfp4",
    "quantize_nvfp4_amax",
    "quantize_nvfp4_many",
    "quantize_nvfp4_many_amax",
    "round_to_e2m1",
    "round_to_e4m3",
]

#: Elements that share one E4M3 block scale.
BLOCK_SIZE = 16
#: Non-negative magnitudes an E2M1 value can take.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
#: Largest E2M1 magnitude.
E2M1_MAX = 6.0
#: Largest finite FP8 E4M3 (``float8_e4m3fn``) magnitude.
E4M3_MAX = 448.0

_FLT_MIN = torch.finfo(torch.float32).tiny
_EXPONENT_BITS = 0x7F800000
_ONE_BITS = 0x3F800000  # float32 1.0
# Adding 1.5 * 2**23 * step to a float and subtracting it again rounds it to a multiple of
# ``step`` (ties to even): the sum's last mantissa bit is worth exactly ``step``. Added to the
# bits of a power of two p, this gives the bits of 1.5 * 2**22 * p, the magic for step p/2.
_MAGIC_BITS = (22 << 23) | 0x400000


def _round_e2m1_(y: Tensor) -> Tensor:
    """In place: round a contiguous float32 tensor already clamped to [-6, 6] onto the E2M1 grid.

    The E2M1 grid is uniform within each binade: step 0.5 below 2, 1 in [2, 4), 2 in [4, 6], i.e.
    half the power of two at or below ``|y|`` (at least 0.5). That power of two is read straight
    from the exponent bits, and the rounding to its half is done by adding and subtracting a
    magic number: IEEE round-to-nearest-even, in 5 cheap passes with no ``where``/``bucketize``
    (10-50x more expensive per element on CPU). A tie on a binade edge, such as 1.75, resolves
    to the same value from either side.
    """
    magic = (y.view(torch.int32) & _EXPONENT_BITS).clamp_(min=_ONE_BITS).add_(_MAGIC_BITS).view(torch.float32)
    return y.add_(magic).sub_(magic)


def round_to_e2m1(x: Tensor) -> Tensor:
    """Round ``x`` to the nearest E2M1 value, ties to even, saturating at ±6 (float32 result)."""
    return _round_e2m1_(
        x.to(torch.float32).clone(memory_format=torch.contiguous_format).clamp_(-E2M1_MAX, E2M1_MAX)
    )


def round_to_e4m3(x: Tensor) -> Tensor:
    """Round non-negative ``x`` to the nearest FP8 E4M3 value (ties to even), in float32.

    Saturates at 448 rather than producing NaN: ``float8_e4m3fn`` has no infinity, and a scale
    that overflows must clip, not poison the block. Subnormals (down to 2**-9) are kept and
    smaller scales flush to zero, as the hardware does.
    """
    return x.clamp(max=E4M3_MAX).to(torch.float8_e4m3fn).to(torch.float32)


def _tensor_scale(amax: Tensor) -> Tensor:
    """FP32 per-tensor scale that maps the tensor's amax onto the top of the E4M3 block-scale range."""
    # The floor keeps an all-zero tensor from dividing 0 by 0 (its blocks all get scale 0);
    # 1e-30 is far below any real activation yet gives a normal float32 scale.
    return amax.clamp(min=1e-30) / (E2M1_MAX * E4M3_MAX)


def _scale_and_round(blocks: Tensor, amax_block: Tensor, s_tensor: Tensor) -> Tensor:
    """Dequantised NVFP4 values of ``blocks [N, 16]`` with block maxima ``amax_block [N, 1]``.

    ``s_tensor`` is the per-tensor scale, a scalar or one value per block ``[N, 1]``.
    Written as few full-size passes as possible, in place where it can: at demo sizes this is
    most of the cost NVFP4 adds to a training step on CPU.
    """
    s_block = round_to_e4m3(amax_block / (E2M1_MAX * s_tensor)).mul_(s_tensor)
    # A block whose scale underflowed E4M3 (or is all zeros) must flush to zero, never to NaN:
    # dividing by the smallest normal float instead gives 0 or a value the clamp caps at 6 (even
    # if it overflowed to inf), and the multiply by the zero scale then zeroes it. Dividing (not
    # multiplying by a reciprocal) keeps exactly representable inputs exact.
    y = (blocks / s_block.clamp(min=_FLT_MIN)).clamp_(-E2M1_MAX, E2M1_MAX)
    return _round_e2m1_(y).mul_(s_block)


def _block_amax(abs_blocks: Tensor) -> Tensor:
    """Max of each row of a contiguous ``[N, 16]`` tensor, as ``[N, 1]``; NaN propagates."""
    # A 16-wide max-pool is about twice as fast as amax(dim=1) on CPU for this shape.
    return F.max_pool1d(abs_blocks.view(1, 1, -1), BLOCK_SIZE, BLOCK_SIZE).view(-1, 1)


def _quantize_blocks(x: Tensor, scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """Quantise-dequantise a contiguous float32 tensor whose last dim is a multiple of ``BLOCK_SIZE``.

    Returns the result and the tensor's ``max |x|`` (the per-tensor scale's amax, computed anyway).
    """
    blocks = x.reshape(-1, BLOCK_SIZE)
    amax_block = _block_amax(blocks.abs())
    amax = amax_block.max()
    s_tensor = _tensor_scale(amax)
    if scale != 1.0:
        s_tensor = s_tensor * scale
    return _scale_and_round(blocks, amax_block, s_tensor).reshape(x.shape), amax


@torch.no_grad()
def quantize_nvfp4(x: Tensor, scale: float = 1.0) -> Tensor:
    """Return ``x`` rounded through NVFP4 and dequantised (same shape and dtype, no gradient).

    Blocks of 16 run along the last dimension; a last dimension that is not a multiple of 16
    is zero-padded for the computation (zeros never raise a block's amax) and cut back after.
    ``scale`` multiplies the per-tensor FP32 scale (1 = the recipe's); below 1 it models a stale
    or wrong amax (e.g. delayed scaling's amax history lagging a growing tensor): block scales
    that would exceed E4M3's 448 saturate there and their largest values clip at ±6.
    """
    return quantize_nvfp4_amax(x, scale)[0]


@torch.no_grad()
def quantize_nvfp4_amax(x: Tensor, scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """:func:`quantize_nvfp4` and ``max |x|`` (float32 scalar; NaN if ``x`` holds one; 0 when empty).

    Every NVFP4 recipe computes the operand's amax for its per-tensor scale; handing it to the
    Monitor (``quant_stats(..., amax=)``) spares the Monitor a second full read of the operand.
    """
    if x.numel() == 0:
        return x.clone(), torch.zeros((), dtype=torch.float32, device=x.device)
    xf = x.to(torch.float32).contiguous()
    k = xf.shape[-1]
    pad = (-k) % BLOCK_SIZE
    if pad:
        xf = F.pad(xf, (0, pad))
    q, amax = _quantize_blocks(xf, scale)
    if pad:
        q = q[..., :k]
    return q.to(x.dtype), amax


@torch.no_grad()
def quantize_nvfp4_many(xs: Sequence[Tensor]) -> list[Tensor]:
    """``[quantize_nvfp4(x) for x in xs]`` (each with its own per-tensor scale), in one fused pass.

    Meant for the weights of a model, which are all quantised once per step: one pass over
    their concatenation costs far less on CPU than dozens of small calls. Results are
    bit-identical to quantising each tensor alone.
    """
    return quantize_nvfp4_many_amax(xs)[0]


@torch.no_grad()
def quantize_nvfp4_many_amax(xs: Sequence[Tensor]) -> tuple[list[Tensor], Tensor]:
    """:func:`quantize_nvfp4_many` and every input's ``max |x|`` as one float32 tensor ``[len(xs)]``.

    The amaxes are the per-tensor scales' own (computed anyway); handing them to the Monitor
    (``quant_stats(..., amax=)``) spares it a full read of every weight each step.
    """
    out: list[Tensor | None] = [None] * len(xs)
    amaxes: list[Tensor | None] = [None] * len(xs)
    fused = [
        i
        for i, x in enumerate(xs)
        if x.dtype == torch.float32
        and x.device == xs[0].device
        and x.numel()
        and x.shape[-1] % BLOCK_SIZE == 0
    ]
    for i in set(range(len(xs))) - set(fused):
        out[i], amaxes[i] = quantize_nvfp4_amax(xs[i])
    if fused:
        n_blocks = [xs[i].numel() // BLOCK_SIZE for i in fused]
        blocks = torch.cat([xs[i].reshape(-1) for i in fused]).view(-1, BLOCK_SIZE)
        amax_block = _block_amax(blocks.abs())
        amax = torch.stack([part.max() for part in amax_block.split(n_blocks)])
        repeats = torch.tensor(n_blocks, device=blocks.device)
        s_tensor = _tensor_scale(amax).repeat_interleave(repeats, output_size=blocks.shape[0]).unsqueeze(1)
        q = _scale_and_round(blocks, amax_block, s_tensor).view(-1)
        for k, (i, part) in enumerate(zip(fused, q.split([n * BLOCK_SIZE for n in n_blocks]))):
            out[i] = part.view(xs[i].shape)
            amaxes[i] = amax[k]
    qs = [t for t in out if t is not None]
    found = [a.float().reshape(()) for a in amaxes if a is not None]
    return qs, torch.stack(found) if found else torch.zeros(0)


class _FakeQuantSTE(torch.autograd.Function):
    """Quantise in forward, pass the gradient through unchanged in backward.

    Equivalent to ``x + (quantize_nvfp4(x) - x).detach()`` but records a single autograd node
    instead of the whole quantiser, which matters for CPU step time at demo sizes.
    """

    @staticmethod
    def forward(ctx, x: Tensor, scale: float = 1.0) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        q, amax = quantize_nvfp4_amax(x, scale)
        ctx.mark_non_differentiable(amax)
        return q, amax

    @staticmethod
    def backward(ctx, grad: Tensor, _grad_amax: Tensor | None) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad, None


class _FakeQuantManySTE(torch.autograd.Function):
    """Straight-through estimator over ``quantize_nvfp4_many_amax``: the quantised tensors, then
    their amaxes ``[len(xs)]`` as a last, non-differentiable output."""

    @staticmethod
    def forward(ctx, *xs: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        qs, amax = quantize_nvfp4_many_amax(xs)
        ctx.mark_non_differentiable(amax)
        return (*qs, amax)

    @staticmethod
    def backward(ctx, *grads: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        return grads[:-1]


def fake_quant_nvfp4(x: Tensor, scale: float = 1.0) -> Tensor:
    """NVFP4 fake quantisation with a straight-through estimator: forward rounds, backward is identity.

    ``scale`` multiplies the per-tensor scale (see :func:`quantize_nvfp4`).
    """
    return fake_quant_nvfp4_amax(x, scale)[0]


def fake_quant_nvfp4_amax(x: Tensor, scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """:func:`fake_quant_nvfp4` and the operand's ``max |x|`` (no gradient), which the quantiser computes anyway."""
    q, amax = _FakeQuantSTE.apply(x, scale) if scale != 1.0 else _FakeQuantSTE.apply(x)
    return q, amax


def observe_quant(module: nn.Module, operand: str, x: Tensor, q: Tensor, amax: Tensor | None = None) -> None:
    """Report one quantised GEMM operand to ``module.quant_observer`` when a monitor set one.

    The healthwatch Monitor sets ``quant_observer`` on every module that has the attribute
    (``QuantLinear``, ``GroupedExperts``); with no monitor this is one attribute read. ``amax``:
    ``max |x|`` when the quantiser has it (:func:`fake_quant_nvfp4_amax`); the Monitor then skips
    its own full read of ``x``.
    """
    observer = getattr(module, "quant_observer", None)
    if observer is not None:
        if amax is None:
            observer(operand, x, q)
        else:
            observer(operand, x, q, amax)


def fake_quant_nvfp4_many(xs: Sequence[Tensor]) -> list[Tensor]:
    """``fake_quant_nvfp4`` of several tensors in one fused pass (see ``quantize_nvfp4_many``)."""
    return fake_quant_nvfp4_many_amax(xs)[0]


def fake_quant_nvfp4_many_amax(xs: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """:func:`fake_quant_nvfp4_many` and each input's ``max |x|`` (0-d, no gradient), computed anyway
    for the per-tensor scales."""
    if not xs:
        return [], []
    *qs, amax = _FakeQuantManySTE.apply(*xs)
    return list(qs), list(amax.unbind())


class QuantLinear(nn.Linear):
    """``nn.Linear`` whose GEMM inputs (activations and weight) are NVFP4 fake-quantised when ``quantize``.

    Both operands are quantised along the reduction dimension (``in_features``), matching how an
    NVFP4 GEMM consumes them. Gradients flow through the straight-through estimator, so the
    backward GEMMs and the optimizer state stay in high precision. The bias is added in high
    precision, as it is in real kernels' epilogues.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        quantize: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        #: Whether forward fake-quantises to NVFP4; toggled by ``HybridLM.set_precision``.
        self.quantize: bool = quantize
        #: Already fake-quantised weights for the current forward, by parameter name, filled by
        #: an owner that quantises all its weights in one pass; empty means "quantise here".
        self.prequantized: dict[str, Tensor] = {}
        #: Called as ``quant_observer(operand, x, q[, amax])`` for each quantised operand (set by a monitor).
        self.quant_observer = None
        #: Multiplier on the per-tensor NVFP4 scale of this module's operands (fault injection; 1 = recipe).
        self.quant_scale: float = 1.0

    def forward(self, x: Tensor, input_quantized: bool = False) -> Tensor:
        """Apply the (optionally NVFP4 fake-quantised) affine map.

        ``input_quantized=True`` says the caller already passed ``x`` through
        ``fake_quant_nvfp4`` (one input feeding several GEMMs is then quantised once, as a real
        NVFP4 pipeline would keep one FP4 copy of it).
        """
        if self.quantize:
            if input_quantized:
                xq = x
            else:
                xq, amax = fake_quant_nvfp4_amax(x, self.quant_scale)
                observe_quant(self, "act", x, xq, amax)
            wq = self.prequantized.get("weight")
            if wq is None:
                wq, amax = fake_quant_nvfp4_amax(self.weight, self.quant_scale)
                observe_quant(self, "weight", self.weight, wq, amax)
            return F.linear(xq, wq, self.bias)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        """Show the quantisation flag next to the usual shape information."""
        return f"{super().extra_repr()}, quantize={self.quantize}"
