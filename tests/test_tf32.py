"""TF32: what the ops promise when cuDNN may use tensor cores in TF32 (PyTorch's default for
convolutions on a GPU), with tolerances derived from TF32's format rather than picked.

TF32 keeps float32's 8-bit exponent and 10 of its 23 mantissa bits. A convolution in TF32 rounds each
float32 operand to that (relative error at most 2^-11 rounding to nearest, 2^-10 if a kernel truncates),
multiplies the rounded operands exactly and adds the products in float32. So each product is off by at
most 2 * 2^-10 + 2^-20 of its size, and a sum of K products by at most that plus K float32 roundings,
relative to the sum of the products' absolute values (the "magnitude": the same op on |inputs|):

    |result - exact| <= (2^-9 + 2^-20 + K * 2^-24) * magnitude

Every other test of the suite runs with TF32 off (conftest.full_float32_precision); these ask for it
with the ``tf32`` fixture. On the CPU TF32 changes nothing and the bound holds with room to spare; the
CUDA half is where it is tested.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICES, assert_bitwise_equal, case_rng, random_tensor, tf32_mode, torch_generator
from deconvcuda import dispatch, ops, reference

TF32_MANTISSA_BITS = 10
FLOAT32_UNIT = 2.0 ** -24


def tf32_tolerance(magnitude: torch.Tensor, terms: int) -> torch.Tensor:
    """The bound above, elementwise, for sums of ``terms`` products whose absolute values add up to
    ``magnitude``."""
    operand = 2.0 ** -TF32_MANTISSA_BITS  # one operand's rounding, truncating kernels included
    return (2 * operand + operand ** 2 + terms * FLOAT32_UNIT) * magnitude


def tf32_round(x: torch.Tensor) -> torch.Tensor:
    """``x`` (float32) with its mantissa rounded to TF32's 10 bits, to nearest, ties to even."""
    bits = x.to(torch.float32).contiguous().view(torch.int32)
    drop = 23 - TF32_MANTISSA_BITS
    half, low = 1 << (drop - 1), bits & ((1 << drop) - 1)
    round_up = (low > half) | ((low == half) & (((bits >> drop) & 1) == 1))
    rounded = (bits & ~((1 << drop) - 1)) + (round_up.to(torch.int32) << drop)
    return rounded.view(torch.float32)


def _deconv_case(device: str, index: int):
    """A VGG-like 3x3 reverse conv with many terms per output (C_out * 9), float32 inputs, and the
    same in float64 for the exact result and the magnitude."""
    rng = case_rng("tf32", index)
    c_out, c_in = rng.choice([(64, 32), (128, 64), (256, 16)])
    gen = torch_generator(rng)
    grad = random_tensor((2, c_out, 12, 12), device=device, generator=gen)
    weight = random_tensor((c_out, c_in, 3, 3), device=device, generator=gen) / (9 * c_out) ** 0.5
    return grad, weight, c_out * 9


def test_tf32_rounding_is_within_its_bound():
    """The derivation, checked without a GPU: a float64 transposed convolution of TF32-rounded
    float32 operands (exact products, exact sums) differs from the exact one within the product
    part of the bound."""
    for index in range(4):
        grad, weight, terms = _deconv_case("cpu", index)
        exact = F.conv_transpose2d(grad.double(), weight.double(), padding=1)
        rounded = F.conv_transpose2d(tf32_round(grad).double(), tf32_round(weight).double(), padding=1)
        magnitude = F.conv_transpose2d(grad.double().abs(), weight.double().abs(), padding=1)
        error = (rounded - exact).abs()
        assert bool((error <= tf32_tolerance(magnitude, 0)).all()), "TF32 rounding beyond its bound"
        # the rounding is TF32's: operands move by up to 2^-11 of themselves, and the result by far more
        # than float32's own rounding moves it
        change = ((tf32_round(grad).double() - grad.double()).abs() / grad.double().abs()).max()
        assert 2.0 ** -12 < float(change) <= 2.0 ** -11
        float32_error = (F.conv_transpose2d(grad, weight, padding=1).double() - exact).abs()
        assert float(error.max()) > 10 * float(float32_error.max())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index", range(3))
def test_deconv2d_with_tf32_within_the_bound(tf32, device, index):
    grad, weight, terms = _deconv_case(device, index)
    result = ops.deconv2d(grad, weight, padding=1)
    exact = F.conv_transpose2d(grad.double().cpu(), weight.double().cpu(), padding=1)
    magnitude = F.conv_transpose2d(grad.double().abs().cpu(), weight.double().abs().cpu(), padding=1)
    error = (result.double().cpu() - exact).abs()
    bound = tf32_tolerance(magnitude, terms)
    assert bool((error <= bound).all()), f"max error {float(error.max()):.3g} over the TF32 bound"


def _fused_case(device: str):
    """conv -> relu -> 2x2 max pool reversed, VGG16-like: 64 -> 32 channels, 3x3, 16x16."""
    gen = torch.Generator().manual_seed(5)
    pre_pool = torch.relu(torch.randn(2, 64, 16, 16, generator=gen)).to(device)
    grad = torch.randn(2, 64, 8, 8, generator=gen).to(device)
    weight = (torch.randn(64, 32, 3, 3, generator=gen) / 24).to(device)
    _, switches = ops.max_pool2d_switches(pre_pool, 2)
    args = ((16, 16), 2, 2, 0, 1, 1, 1, 1, 1, (16, 16))
    return grad, switches, weight, args


@pytest.mark.parametrize("device", DEVICES)
def test_dense_path_with_tf32_within_the_bound(tf32, device):
    """unpool_relu + deconv2d (the dispatcher's dense candidate), under TF32, against float64."""
    grad, switches, weight, args = _fused_case(device)
    unpooled = ops.unpool_relu(grad, switches, args[0], 2, 2)
    result = ops.deconv2d(unpooled, weight, 1, 1, output_size=args[-1])
    exact = reference.unpool_relu_deconv2d(grad.double().cpu(), switches.cpu(), weight.double().cpu(), *args)
    magnitude = F.conv_transpose2d(unpooled.double().abs().cpu(), weight.double().abs().cpu(), padding=1)
    error = (result.double().cpu() - exact).abs()
    assert bool((error <= tf32_tolerance(magnitude, 64 * 9)).all())


@pytest.mark.parametrize("device", DEVICES)
def test_fused_gather_ignores_tf32(tf32, device):
    """The fused kernel multiplies in float32 FMAs, never on tensor cores: TF32 on or off, the same
    bits."""
    grad, switches, weight, args = _fused_case(device)
    with_tf32 = ops.unpool_relu_deconv2d(grad, switches, weight, *args)
    with tf32_mode(False):
        without = ops.unpool_relu_deconv2d(grad, switches, weight, *args)
    assert_bitwise_equal(with_tf32, without, "unpool_relu_deconv2d with TF32 on vs off")


@pytest.mark.parametrize("device", DEVICES)
def test_dispatcher_with_tf32_within_the_bound(tf32, device, monkeypatch):
    """Whichever path the dispatcher times as faster under TF32, its result is within the bound (the
    fused path is within float32's, which is smaller)."""
    monkeypatch.setattr(dispatch, "CHOICES", {})
    grad, switches, weight, args = _fused_case(device)
    result = dispatch.Dispatcher(ops).unpool_relu_deconv2d(grad, switches, weight, *args)
    exact = reference.unpool_relu_deconv2d(grad.double().cpu(), switches.cpu(), weight.double().cpu(), *args)
    unpooled = reference.unpool_relu(grad.double().cpu(), switches.cpu(), args[0], 2, 2)
    magnitude = F.conv_transpose2d(unpooled.abs(), weight.double().abs().cpu(), padding=1)
    error = (result.double().cpu() - exact).abs()
    assert bool((error <= tf32_tolerance(magnitude, 64 * 9)).all())
