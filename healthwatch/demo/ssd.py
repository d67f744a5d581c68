"""Mamba-2 SSD (state space duality) scan in pure PyTorch, plus a sequential reference.

The scan computes, per head ``h`` with scalar decay ``A[h] < 0``::

    state_t = exp(dt_t * A) * state_{t-1} + dt_t * outer(x_t, B_t)      # [p, n]
    y_t     = state_t @ C_t + D * x_t                                    # [p]

``ssd_chunked`` evaluates it the SSD way (Dao & Gu, 2024): quadratic attention-like form
inside chunks of ``chunk_size`` steps, a linear recurrence only between chunks. It is the
algorithm of ``mamba_ssm``'s ``ssd_minimal_discrete``, written as batched matmuls so it runs
fast on CPU, and it takes the same arguments as ``mamba_chunk_scan_combined`` (with ``dt``
already positive, i.e. after bias and softplus). When CUDA and ``mamba_ssm`` are both present,
the Triton kernel is used instead; it is never required.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["mamba_kernel_available", "ssd", "ssd_chunked", "ssd_reference"]


def _check_shapes(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor) -> tuple[int, int]:
    """Validate the argument shapes; return (heads, groups)."""
    b, length, h, _ = x.shape
    if dt.shape != (b, length, h):
        raise ValueError(f"dt must be [batch, seqlen, heads] = {(b, length, h)}, got {tuple(dt.shape)}")
    if A.shape != (h,):
        raise ValueError(f"A must be [heads] = ({h},), got {tuple(A.shape)}")
    if B.shape != C.shape or B.dim() != 4 or B.shape[:2] != (b, length):
        raise ValueError(
            f"B and C must both be [batch, seqlen, groups, state], got {tuple(B.shape)} and {tuple(C.shape)}"
        )
    g = B.shape[2]
    if h % g:
        raise ValueError(f"heads ({h}) must be a multiple of groups ({g})")
    return h, g


def _segsum_exp(a_cumsum: Tensor) -> Tensor:
    """``exp(a_cs[i] - a_cs[j])`` for ``i >= j`` and 0 above the diagonal, over the last dim.

    Differences of a cumulative sum give the decay between two steps in one op; with chunks of
    a few dozen steps in float32 the cancellation error is far below the test tolerance.
    """
    q = a_cumsum.shape[-1]
    diff = a_cumsum.unsqueeze(-1) - a_cumsum.unsqueeze(-2)
    causal = torch.ones(q, q, dtype=torch.bool, device=a_cumsum.device).tril()
    # Masking to -inf before exp (not multiplying after) keeps overflowed upper-triangle terms
    # from turning into inf * 0 = NaN in the backward pass.
    return torch.exp(diff.masked_fill(~causal, float("-inf")))


def ssd_chunked(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int,
    D: Tensor | None = None,
    initial_states: Tensor | None = None,
    return_final_states: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Chunked SSD scan in pure torch.

    Args:
        x: inputs ``[batch, seqlen, heads, headdim]``.
        dt: positive step sizes ``[batch, seqlen, heads]`` (bias and softplus already applied).
        A: per-head decay rates ``[heads]``, negative.
        B, C: input and output projections ``[batch, seqlen, groups, d_state]``; heads are split
            evenly over groups.
        chunk_size: steps per chunk; ``seqlen`` need not be a multiple of it.
        D: optional skip connection ``[heads]`` (``y += D * x``).
        initial_states: optional starting state ``[batch, heads, headdim, d_state]``.
        return_final_states: also return the state after the last step.

    Returns:
        ``y`` of shape ``[batch, seqlen, heads, headdim]``, or ``(y, final_state)``.
    """
    h, g = _check_shapes(x, dt, A, B, C)
    b, length, _, p = x.shape
    n = B.shape[-1]
    hg = h // g
    q = int(chunk_size)
    if q < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    pad = (-length) % q
    if pad:
        # Zero dt past the end means no decay and no input there, so padding cannot leak into
        # real positions (the scan is causal anyway) and leaves the final state untouched.
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
        dt = F.pad(dt, (0, 0, 0, pad))
        B = F.pad(B, (0, 0, 0, 0, 0, pad))
        C = F.pad(C, (0, 0, 0, 0, 0, pad))
    c = (length + pad) // q

    # Mostly the natural [b, chunk, step, group, head-in-group, headdim] layout: heads of a
    # group then share one GEMM with that group's B/C (M = heads*headdim), instead of many
    # tiny per-head GEMMs that would need B/C broadcast-copied to every head.
    xdt = (x * dt.unsqueeze(-1)).view(b, c, q, h, p)
    a_cs = torch.cumsum((dt * A).view(b, c, q, h), dim=2)  # log-decay from chunk start
    Bg = B.view(b, c, q, g, n).transpose(2, 3)  # [b, c, g, q, n]
    Cg = C.view(b, c, q, g, n).transpose(2, 3)

    # 1. Within each chunk: masked "attention" (C_l . B_s) * decay(l <- s) applied to x*dt.
    #    The decay differs per head, so this one product runs per head.
    decay = _segsum_exp(a_cs.transpose(2, 3)).view(b, c, g, hg, q, q)
    scores = (Cg @ Bg.transpose(-1, -2)).unsqueeze(3) * decay
    y = scores @ xdt.view(b, c, q, g, hg, p).permute(0, 1, 3, 4, 2, 5)  # [b, c, g, hg, q, p]
    y = y.permute(0, 1, 4, 2, 3, 5)  # [b, c, q, g, hg, p]

    # 2. State each chunk contributes at its end: [b, c, g, n, hg*p].
    to_end = torch.exp(a_cs[:, :, -1:] - a_cs).unsqueeze(-1)
    states = Bg.transpose(-1, -2) @ (xdt * to_end).view(b, c, q, g, hg * p).transpose(2, 3)
    states = states.view(b, c, g, n, hg, p)

    # 3. Recurrence between chunks: carry = carry * decay(chunk) + chunk state.
    chunk_decay = torch.exp(a_cs[:, :, -1]).view(b, c, g, 1, hg, 1)
    if initial_states is None:
        carry = states.new_zeros(b, g, n, hg, p)
    else:
        carry = initial_states.reshape(b, g, hg, p, n).permute(0, 1, 4, 2, 3).to(states.dtype)
    carried_in = []
    for z in range(c):
        carried_in.append(carry)
        carry = torch.addcmul(states[:, z], carry, chunk_decay[:, z])
    states_in = torch.stack(carried_in, dim=1).view(b, c, g, n, hg * p)

    # 4. Carry-in state read out through C, decayed to each step of the chunk.
    y_off = (Cg @ states_in).view(b, c, g, q, hg, p).transpose(2, 3)  # [b, c, q, g, hg, p]
    y = y + y_off * torch.exp(a_cs).view(b, c, q, g, hg, 1)

    y = y.reshape(b, c * q, h, p)[:, :length]
    if D is not None:
        y = torch.addcmul(y, x[:, :length], D.view(1, 1, h, 1))
    if return_final_states:
        final_state = carry.permute(0, 1, 3, 4, 2).reshape(b, h, p, n)
        return y, final_state
    return y


def ssd_reference(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    initial_states: Tensor | None = None,
    return_final_states: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Naive step-by-step recurrence with the same contract as ``ssd_chunked``; for tests only."""
    h, g = _check_shapes(x, dt, A, B, C)
    b, length, _, p = x.shape
    n = B.shape[-1]
    Bh = B.repeat_interleave(h // g, dim=2)  # [b, l, h, n]
    Ch = C.repeat_interleave(h // g, dim=2)
    state = x.new_zeros(b, h, p, n) if initial_states is None else initial_states.clone()
    ys = []
    for t in range(length):
        decay = torch.exp(dt[:, t] * A).view(b, h, 1, 1)
        inp = (dt[:, t].view(b, h, 1, 1) * x[:, t].unsqueeze(-1)) * Bh[:, t].unsqueeze(-2)
        state = decay * state + inp
        ys.append((state @ Ch[:, t].unsqueeze(-1)).squeeze(-1))
    y = torch.stack(ys, dim=1)
    if D is not None:
        y = y + x * D.view(1, 1, h, 1)
    if return_final_states:
        return y, state
    return y


@functools.cache
def _mamba_kernel() -> Callable[..., Tensor] | None:
    """``mamba_chunk_scan_combined`` when ``mamba_ssm`` imports, else None (cached)."""
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception:  # ImportError, or a CUDA extension that fails to load on this host
        return None
    return mamba_chunk_scan_combined


def mamba_kernel_available() -> bool:
    """True when CUDA is usable and ``mamba_ssm``'s Triton SSD kernel imports."""
    return torch.cuda.is_available() and _mamba_kernel() is not None


def ssd(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int,
    D: Tensor | None = None,
) -> Tensor:
    """SSD scan dispatcher: ``mamba_ssm``'s fused kernel for CUDA tensors when installed, else ``ssd_chunked``."""
    if x.is_cuda and mamba_kernel_available():
        kernel = _mamba_kernel()
        assert kernel is not None
        return kernel(x, dt, A, B, C, chunk_size, D=D)
    out = ssd_chunked(x, dt, A, B, C, chunk_size, D=D)
    assert isinstance(out, Tensor)
    return out
