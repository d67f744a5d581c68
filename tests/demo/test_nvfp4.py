"""NVFP4 fake quantisation checked against blocks worked out by hand.

Most tests put 10.5 somewhere in the tensor: it makes the per-tensor scale
10.5 / (6 * 448) = 2**-8 exactly, so every block scale is an E4M3 value times 2**-8 and the
expected outputs below are exact binary fractions.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from healthwatch.demo.nvfp4 import (
    E2M1_VALUES,
    QuantLinear,
    fake_quant_nvfp4,
    fake_quant_nvfp4_many,
    quantize_nvfp4,
    quantize_nvfp4_many,
    round_to_e2m1,
    round_to_e4m3,
)


def _row(values: list[float]) -> torch.Tensor:
    """A 16-element block: ``values`` then zeros."""
    return torch.tensor(values + [0.0] * (16 - len(values)))


def test_e2m1_rounding_is_nearest_with_ties_to_even() -> None:
    x = torch.tensor(
        [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.3, 1.1, 2.6, 4.9, 5.1, 7.0, 100.0, -0.75, -5.0]
    )
    want = torch.tensor([0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 0.5, 1.0, 3.0, 4.0, 6.0, 6.0, 6.0, -1.0, -4.0])
    assert torch.equal(round_to_e2m1(x), want)


def test_e4m3_rounding_matches_hand_values() -> None:
    # [128, 256) has step 16; 213.33 -> 208; ties 216 and 232 go to the even mantissa (224 both);
    # 2**-10 is halfway between 0 and the smallest subnormal 2**-9 and goes to 0; above 448 clips.
    x = torch.tensor([5.0 / 6.0 * 256.0, 216.0, 232.0, 2.0**-10, 3 * 2.0**-10, 1000.0])
    want = torch.tensor([208.0, 224.0, 224.0, 0.0, 2.0**-8, 448.0])
    assert torch.equal(round_to_e4m3(x), want)


def test_representable_values_come_back_exactly() -> None:
    grid = [v for v in E2M1_VALUES] + [-v for v in E2M1_VALUES[1:]]
    x = torch.stack([_row([10.5]), torch.tensor(grid + [0.0])])
    # Block 1: amax 6 -> 6 / 6 / 2**-8 = 256, an exact E4M3 value -> scale exactly 1.
    # Block 0: amax 10.5 -> 448 -> scale 1.75, and 10.5 = 6 * 1.75.
    assert torch.equal(quantize_nvfp4(x), x)
    # Scaled copies of the grid are representable too.
    y = torch.stack([_row([10.5]), torch.tensor(grid + [0.0]) * 0.25])
    assert torch.equal(quantize_nvfp4(y), y)


def test_block_scale_rounded_to_e4m3() -> None:
    block = [5.0, 1.0, 2.0, -3.0, 0.2, 0.25, 0.6, 4.0]
    x = torch.stack([_row([10.5]), _row(block)])
    # amax 5 -> 5/6 * 256 = 213.33 in E4M3 units -> rounds down to 208 -> scale 208/256 = 0.8125.
    # Then x / 0.8125 = [6.15, 1.23, 2.46, -3.69, 0.246, 0.308, 0.738, 4.92]
    #        -> E2M1 [6 (clipped), 1, 2, -4, 0, 0.5, 0.5, 4] -> times 0.8125:
    want = _row([4.875, 0.8125, 1.625, -3.25, 0.0, 0.40625, 0.40625, 3.25])
    got = quantize_nvfp4(x)
    assert torch.equal(got[1], want)
    assert torch.equal(got[0], _row([10.5]))


def test_all_zero_blocks_give_zeros_not_nan() -> None:
    z = torch.zeros(4, 32)
    assert torch.equal(quantize_nvfp4(z), z)
    x = torch.stack([_row([10.5]), torch.zeros(16)])
    got = quantize_nvfp4(x)
    assert torch.isfinite(got).all()
    assert torch.equal(got[1], torch.zeros(16))


def test_outlier_block_flushes_small_values() -> None:
    # One huge value sets the block scale to 10.5 / 6 = 1.75; the others are measured in 1.75s:
    # 0.4 -> 0.23 -> 0; 0.9 -> 0.51 -> 0.5; -1.5 -> 0.86 -> 1; 0.1 -> 0; 2 -> 1.14 -> 1;
    # -0.875 -> exactly 0.5; 3 -> 1.71 -> 1.5.
    x = _row([10.5, 0.4, 0.9, -1.5, 0.1, 2.0, -0.875, 3.0]).unsqueeze(0)
    want = _row([10.5, 0.0, 0.875, -1.75, 0.0, 1.75, -0.875, 2.625])
    assert torch.equal(quantize_nvfp4(x)[0], want)


def test_block_scale_underflow_flushes_whole_block() -> None:
    # Tensor amax 2688 gives a tensor scale of exactly 1. A block with amax 0.001 needs a scale
    # of 0.001/6 = 1.7e-4, below half the smallest E4M3 subnormal (2**-9): the block is zero.
    # A block with amax 0.01 gets the subnormal scale 2**-9; 0.01 / 2**-9 = 5.12 -> 6.
    x = torch.stack([_row([2688.0]), _row([0.001, -0.0005, 0.0002]), _row([0.01, 0.004])])
    got = quantize_nvfp4(x)
    assert torch.isfinite(got).all()
    assert torch.equal(got[1], torch.zeros(16))
    # 0.004 / 2**-9 = 2.048 -> 2.
    assert torch.equal(got[2], _row([6 * 2.0**-9, 2 * 2.0**-9]))


def test_error_is_bounded_on_random_data() -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 128)
    q = quantize_nvfp4(x)
    blocks, qb = x.view(-1, 16), q.view(-1, 16)
    amax = blocks.abs().amax(1, keepdim=True)
    # Worst case: half of the widest E2M1 step (2) at a scale at most 1/16 above amax/6.
    assert ((qb - blocks).abs() <= amax / 6 * (1 + 1 / 16) + 1e-6).all()
    rel = (q - x).norm() / x.norm()
    assert 0.02 < rel < 0.2


def test_last_dim_not_multiple_of_16_is_padded() -> None:
    torch.manual_seed(1)
    x = torch.randn(3, 5, 20)
    q = quantize_nvfp4(x)
    assert q.shape == x.shape
    want = quantize_nvfp4(F.pad(x, (0, 12)))[..., :20]
    assert torch.equal(q, want)


def test_dtype_is_preserved() -> None:
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    q = quantize_nvfp4(x)
    assert q.dtype == torch.bfloat16 and q.shape == x.shape


def test_ste_gradient_is_identity() -> None:
    torch.manual_seed(2)
    x = torch.randn(8, 48, requires_grad=True)
    g = torch.randn(8, 48)
    y = fake_quant_nvfp4(x)
    assert torch.equal(y.detach(), quantize_nvfp4(x.detach()))
    (y * g).sum().backward()
    assert torch.equal(x.grad, g)


def test_quant_linear_off_is_plain_linear_and_on_quantises_both_operands() -> None:
    torch.manual_seed(3)
    lin = QuantLinear(32, 24)
    x = torch.randn(10, 32, requires_grad=True)
    assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))
    lin.quantize = True
    out = lin(x)
    want = F.linear(quantize_nvfp4(x.detach()), quantize_nvfp4(lin.weight.detach()), lin.bias.detach())
    torch.testing.assert_close(out.detach(), want, rtol=0, atol=0)
    assert not torch.equal(out.detach(), F.linear(x, lin.weight, lin.bias).detach())
    # Straight-through: gradients are the high-precision GEMMs of the upstream gradient with
    # the other (quantised) operand.
    g = torch.randn(10, 24)
    out.backward(g)
    torch.testing.assert_close(lin.weight.grad, g.t() @ quantize_nvfp4(x.detach()))
    torch.testing.assert_close(x.grad, g @ quantize_nvfp4(lin.weight.detach()))
    torch.testing.assert_close(lin.bias.grad, g.sum(0))


@pytest.mark.parametrize("scale", [1e-6, 1.0, 1e6])
def test_scale_invariance_up_to_a_power_of_two(scale: float) -> None:
    # Multiplying by a power of two moves every scale by the same power of two: same result.
    torch.manual_seed(4)
    x = torch.randn(16, 64)
    p2 = 2.0 ** round(math.log2(scale))
    torch.testing.assert_close(quantize_nvfp4(x * p2), quantize_nvfp4(x) * p2, rtol=0, atol=0)


def test_many_tensors_in_one_pass_equal_one_at_a_time() -> None:
    torch.manual_seed(5)
    xs = [
        torch.randn(40, 64),
        torch.randn(3, 16) * 100,  # its own tensor scale, far from the others'
        torch.zeros(2, 32),
        torch.randn(5, 20),  # not a multiple of 16: falls back to the padded path
        torch.randn(16, 8, 32) * 1e-3,
    ]
    for q, x in zip(quantize_nvfp4_many(xs), xs):
        assert q.shape == x.shape and torch.equal(q, quantize_nvfp4(x))
    leaves = [x.clone().requires_grad_(True) for x in xs]
    outs = fake_quant_nvfp4_many(leaves)
    sum((o * (i + 1)).sum() for i, o in enumerate(outs)).backward()
    for i, leaf in enumerate(leaves):
        assert torch.equal(leaf.grad, torch.full_like(leaf, float(i + 1)))


def test_e2m1_rounding_matches_brute_force_nearest_even() -> None:
    grid = torch.tensor(E2M1_VALUES)
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    near = torch.cat(
        [torch.nextafter(ties, torch.zeros(7)), ties, torch.nextafter(ties, torch.full((7,), 9.0))]
    )
    x = torch.cat([torch.linspace(0, 7, 70001), near, torch.tensor([1e-40, 6.5, 1e30, float("inf")])])
    x = torch.cat([x, -x])
    dist = (x.abs().clamp(max=6).unsqueeze(1) - grid).abs()
    nearest = dist == dist.min(1, keepdim=True).values
    # Among equally near grid points take the one with an even code (even index in E2M1_VALUES).
    code = torch.where(nearest, torch.arange(8) % 2 * 10 + torch.arange(8), torch.full((8,), 99)).argmin(1)
    assert torch.equal(round_to_e2m1(x), grid[code] * x.sign())
