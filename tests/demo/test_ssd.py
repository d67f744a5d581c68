"""The chunked SSD scan against the naive step-by-step recurrence (and mamba_ssm when on CUDA)."""

import pytest
import torch
import torch.nn.functional as F

from healthwatch.demo.ssd import mamba_kernel_available, ssd, ssd_chunked, ssd_reference


def _inputs(b: int, length: int, h: int, p: int, g: int, n: int, seed: int = 0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    x = r(b, length, h, p)
    dt = F.softplus(r(b, length, h) - 1.0)
    A = -torch.exp(r(h) * 0.5)
    B, C = r(b, length, g, n), r(b, length, g, n)
    D = r(h)
    return x, dt, A, B, C, D


@pytest.mark.parametrize("chunk_size", [1, 4, 16, 32, 64])
@pytest.mark.parametrize("length", [64, 37, 5])
@pytest.mark.parametrize("groups", [1, 2])
def test_chunked_matches_sequential_reference(chunk_size: int, length: int, groups: int) -> None:
    x, dt, A, B, C, D = _inputs(2, length, 4, 8, groups, 16, seed=length + chunk_size)
    y, state = ssd_chunked(x, dt, A, B, C, chunk_size, D=D, return_final_states=True)
    y_ref, state_ref = ssd_reference(x, dt, A, B, C, D=D, return_final_states=True)
    assert y.shape == x.shape
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(state, state_ref, atol=1e-4, rtol=1e-4)


def test_initial_state_and_splitting_a_sequence() -> None:
    # Scanning two halves, passing the state across, equals scanning the whole.
    x, dt, A, B, C, D = _inputs(2, 48, 4, 8, 1, 16, seed=7)
    y_full = ssd_chunked(x, dt, A, B, C, 16, D=D)
    y1, s1 = ssd_chunked(x[:, :20], dt[:, :20], A, B[:, :20], C[:, :20], 16, D=D, return_final_states=True)
    y2 = ssd_chunked(x[:, 20:], dt[:, 20:], A, B[:, 20:], C[:, 20:], 16, D=D, initial_states=s1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y_full, atol=1e-4, rtol=1e-4)
    y2_ref = ssd_reference(x[:, 20:], dt[:, 20:], A, B[:, 20:], C[:, 20:], D=D, initial_states=s1)
    torch.testing.assert_close(y2, y2_ref, atol=1e-4, rtol=1e-4)


def test_gradients_match_reference() -> None:
    args = _inputs(2, 37, 4, 8, 2, 8, seed=3, dtype=torch.float64)
    args_ref = [a.clone().requires_grad_(True) for a in args]
    args_chk = [a.clone().requires_grad_(True) for a in args]
    g = torch.randn(2, 37, 4, 8, dtype=torch.float64)
    x, dt, A, B, C, D = args_chk
    (ssd_chunked(x, dt, A, B, C, 16, D=D) * g).sum().backward()
    x, dt, A, B, C, D = args_ref
    (ssd_reference(x, dt, A, B, C, D=D) * g).sum().backward()
    for a, b in zip(args_chk, args_ref):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-8, rtol=1e-7)


def test_strong_decay_stays_finite() -> None:
    # Large dt * |A| makes exp(segment sums) underflow to 0; masking must not create NaN.
    x, dt, A, B, C, D = _inputs(1, 40, 2, 4, 1, 4, seed=5)
    x.requires_grad_(True)
    y = ssd_chunked(x, dt * 50, A * 20, B, C, 16, D=D)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    torch.testing.assert_close(y, ssd_reference(x, dt * 50, A * 20, B, C, D=D), atol=1e-4, rtol=1e-4)


def test_shape_errors_are_clear() -> None:
    x, dt, A, B, C, D = _inputs(1, 8, 4, 4, 1, 4)
    with pytest.raises(ValueError, match="dt must be"):
        ssd_chunked(x, dt[:, :4], A, B, C, 4)
    with pytest.raises(ValueError, match="multiple of groups"):
        B3, C3 = torch.randn(1, 8, 3, 4), torch.randn(1, 8, 3, 4)
        ssd_chunked(x, dt, A, B3, C3, 4)


def test_dispatcher_uses_pure_torch_on_cpu() -> None:
    x, dt, A, B, C, D = _inputs(1, 20, 2, 4, 1, 4)
    torch.testing.assert_close(ssd(x, dt, A, B, C, 8, D=D), ssd_chunked(x, dt, A, B, C, 8, D=D))


@pytest.mark.skipif(not mamba_kernel_available(), reason="needs CUDA and mamba_ssm")
def test_matches_mamba_ssm_kernel() -> None:
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    x, dt, A, B, C, D = (t.cuda() for t in _inputs(2, 100, 8, 16, 2, 16, seed=11))
    want = mamba_chunk_scan_combined(x, dt, A, B, C, 32, D=D)
    got = ssd_chunked(x, dt, A, B, C, 32, D=D)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(
        got.cpu(), ssd_reference(*(t.cpu() for t in (x, dt, A, B, C)), D=D.cpu()), atol=1e-3, rtol=1e-3
    )
