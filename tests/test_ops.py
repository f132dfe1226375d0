"""The four deconvcuda ops against deconvcuda.reference and against PyTorch's own autograd.

Oracles, for every op and case:
  * ``deconvcuda.reference`` (pure PyTorch), in the dtype under test: its error against the float64
    truth sets the tolerance (``conftest.assert_close_to_oracle``);
  * the float64 truth from PyTorch's autograd: ``max_pool2d_with_indices`` and its backward (the
    gradient, ReLU'd) for the pooling ops, the input-gradient of ``conv2d`` (cross-checked against
    ``conv_transpose2d``) for ``deconv2d``, and the two chained for the fused op.

Cases are drawn from generators seeded by the test name and case number (``conftest.case_rng``), so
they are the same in every run; ``FIXED_*`` cases pin the layers that matter (AlexNet's overlapping
3x3 stride-2 pools, VGG's 2x2 pools, ceil_mode, the 16x16 switch limit).
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from typing import Tuple

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from conftest import (CUDA_AVAILABLE, DEVICES, FLOAT_DTYPES, assert_bitwise_equal, assert_close_to_oracle,
                      case_rng, dtype_id, guarded, noncontiguous, random_tensor, torch_generator, transposed)
from deconvcuda import ops, reference

pytestmark = pytest.mark.parametrize("device", DEVICES)

Pair = Tuple[int, int]


# --------------------------------------------------------------------------------------------- #
# Geometry helpers (independent of the package: PyTorch's formulas, written out)
# --------------------------------------------------------------------------------------------- #

def pool_output_size(size, kernel, stride, padding, dilation, ceil_mode):
    """PyTorch's pooling_output_shape along one axis."""
    span = size + 2 * padding - dilation * (kernel - 1) - 1
    out = (span + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


def conv_output_size(size, kernel, stride, padding, dilation):
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def deconv_smallest_size(size, kernel, stride, padding, dilation):
    return (size - 1) * stride - 2 * padding + dilation * (kernel - 1) + 1


def switches_from_indices(indices: torch.Tensor, input_width: int, kernel: Pair, stride: Pair, padding: Pair,
                          dilation: Pair) -> torch.Tensor:
    """max_pool2d_with_indices' plane-flat indices as window-local uint8 switches ky * kernel_w + kx,
    where ky = (iy - (oy * stride - padding)) / dilation (exactly: the index must be a tap)."""
    iy, ix = indices // input_width, indices % input_width
    oy = torch.arange(indices.shape[2], device=indices.device).view(-1, 1)
    ox = torch.arange(indices.shape[3], device=indices.device).view(1, -1)
    dy, dx = iy - (oy * stride[0] - padding[0]), ix - (ox * stride[1] - padding[1])
    assert bool((dy % dilation[0] == 0).all() and (dx % dilation[1] == 0).all()), "index is not a tap"
    ky, kx = dy // dilation[0], dx // dilation[1]
    assert bool(((ky >= 0) & (ky < kernel[0]) & (kx >= 0) & (kx < kernel[1])).all()), "index outside its window"
    return (ky * kernel[1] + kx).to(torch.uint8)


def pool_with_autograd(x: torch.Tensor, pool: "Pool"):
    """PyTorch's pooled output and switches, and the float64 input with the graph for its backward."""
    x64 = x.detach().to(torch.float64).requires_grad_(True)
    out64, indices = F.max_pool2d_with_indices(x64, pool.kernel, pool.stride, pool.padding, pool.dilation,
                                               pool.ceil_mode)
    switches = switches_from_indices(indices, x.shape[3], pool.kernel, pool.stride, pool.padding, pool.dilation)
    return x64, out64, switches


#: (rule, whether positive is passed): every rule with the forward's mask, "gradient" also without
#: one (max_pool2d's own backward), "deconvnet" also with one (which it must ignore).
RULE_VARIANTS = [("deconvnet", False), ("deconvnet", True), ("guided", True), ("gradient", True),
                 ("gradient", False)]


def rule_kwargs(rule: str, masked: bool, out64: torch.Tensor, device) -> dict:
    """The ops' rule arguments: positive = whether the forward pool's output was > 0."""
    return dict(rule=rule, positive=(out64 > 0).to(device) if masked else None)


def unpool_relu_truth(x64, out64, grad: torch.Tensor, rule: str = "deconvnet", positive=None) -> torch.Tensor:
    """max_pool2d's input-gradient (float64; overlapping windows sum) under ``rule``: "guided" and
    "gradient" seed it with ``grad`` where ``positive`` (ReLU's backward at the switch), and every
    rule but "gradient" ends with the ReLU."""
    seed = grad.to(torch.float64)
    if rule != "deconvnet" and positive is not None:
        seed = torch.where(positive.to(seed.device), seed, torch.zeros_like(seed))
    (grad_input,) = torch.autograd.grad(out64, x64, seed, retain_graph=True)
    return grad_input if rule == "gradient" else torch.relu(grad_input)


def conv_input_gradient(grad: torch.Tensor, weight: torch.Tensor, input_size: Pair, conv: "Conv") -> torch.Tensor:
    """The input-gradient of conv2d (float64): what deconv2d computes."""
    grad, weight = grad.to(torch.float64), weight.to(torch.float64)
    x = torch.zeros(grad.shape[0], weight.shape[1] * conv.groups, *input_size, dtype=torch.float64,
                    device=grad.device, requires_grad=True)
    y = F.conv2d(x, weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
    assert y.shape == grad.shape, f"conv2d of {input_size} gives {tuple(y.shape)}, grad is {tuple(grad.shape)}"
    (grad_input,) = torch.autograd.grad(y, x, grad)
    return grad_input


# --------------------------------------------------------------------------------------------- #
# Cases
# --------------------------------------------------------------------------------------------- #

@dataclasses.dataclass(frozen=True)
class Pool:
    kernel: Pair
    stride: Pair
    padding: Pair = (0, 0)
    dilation: Pair = (1, 1)
    ceil_mode: bool = False

    def smallest_input(self, axis: int) -> int:
        return max(1, self.dilation[axis] * (self.kernel[axis] - 1) + 1 - 2 * self.padding[axis])

    def pooled(self, size: Pair) -> Pair:
        return tuple(pool_output_size(size[a], self.kernel[a], self.stride[a], self.padding[a], self.dilation[a],
                                      self.ceil_mode) for a in range(2))

    def args(self):
        """Positional arguments after the size argument, as the wrappers take them."""
        return self.kernel, self.stride, self.padding, self.dilation


@dataclasses.dataclass(frozen=True)
class Conv:
    kernel: Pair
    stride: Pair = (1, 1)
    padding: Pair = (0, 0)
    dilation: Pair = (1, 1)
    groups: int = 1

    def output(self, size: Pair) -> Pair:
        return tuple(conv_output_size(size[a], self.kernel[a], self.stride[a], self.padding[a], self.dilation[a])
                     for a in range(2))

    def smallest_deconv(self, size: Pair) -> Pair:
        return tuple(deconv_smallest_size(size[a], self.kernel[a], self.stride[a], self.padding[a],
                                          self.dilation[a]) for a in range(2))


@dataclasses.dataclass(frozen=True)
class PoolCase:
    """A max pool over an [n, c, *size] input."""
    name: str
    n: int
    c: int
    size: Pair
    pool: Pool
    integers: bool = False        # small integer values: ties in most windows
    nan_fraction: float = 0.0


@dataclasses.dataclass(frozen=True)
class DeconvCase:
    """The reverse of a conv from [n, c_in, *size] to [n, c_out, *conv.output(size)]; output_size is
    ``size``, or None (the smallest) where ``default_output_size``."""
    name: str
    n: int
    c_in: int
    c_out: int
    size: Pair
    conv: Conv
    default_output_size: bool = False


@dataclasses.dataclass(frozen=True)
class FusedCase:
    """The reverse of conv -> relu -> maxpool: conv [n, c_in, *size] -> [n, c_out, *pool_input],
    pooled by ``pool``."""
    name: str
    n: int
    c_in: int
    c_out: int
    size: Pair
    conv: Conv
    pool: Pool
    integers: bool = False


def _kernel(rng, largest=11) -> Pair:
    kh = rng.randint(1, largest)
    return (kh, kh) if rng.random() < 0.5 else (kh, rng.randint(1, largest))


def _pair_from(rng, low, high) -> Pair:
    a = rng.randint(low, high)
    return (a, a) if rng.random() < 0.6 else (a, rng.randint(low, high))


def random_pool(rng) -> Pool:
    kernel = _kernel(rng)
    stride = _pair_from(rng, 1, 4)
    padding = tuple(rng.randint(0, k // 2) for k in kernel)
    dilation = _pair_from(rng, 1, 3) if rng.random() < 0.3 else (1, 1)
    return Pool(kernel, stride, padding, dilation, ceil_mode=rng.random() < 0.5)


def random_pool_case(index: int) -> PoolCase:
    rng = case_rng("pool", index)
    pool = random_pool(rng)
    size = tuple(pool.smallest_input(a) + rng.randint(0, 12) for a in range(2))
    kind = rng.random()
    return PoolCase(f"random{index}", rng.randint(1, 3), rng.randint(1, 4), size, pool, integers=kind < 0.4,
                    nan_fraction=0.1 if 0.4 <= kind < 0.55 else 0.0)


def random_conv(rng, c_in_per_group=None) -> Tuple[Conv, int, int]:
    groups = rng.choice([1, 1, 2, 3])
    kernel = _kernel(rng)
    dilation = _pair_from(rng, 1, 3) if rng.random() < 0.3 else (1, 1)
    stride = _pair_from(rng, 1, 4)
    # padding up to the span of the kernel and a little beyond (windows entirely in the padding)
    padding = tuple(rng.randint(0, (dilation[a] * (kernel[a] - 1) + 1) // 2 + (rng.random() < 0.1))
                    for a in range(2))
    c_in = groups * (c_in_per_group or rng.randint(1, 3))
    c_out = groups * rng.randint(1, 3)
    return Conv(kernel, stride, padding, dilation, groups), c_in, c_out


def random_deconv_case(index: int) -> DeconvCase:
    rng = case_rng("deconv", index)
    conv, c_in, c_out = random_conv(rng)
    size = tuple(max(1, conv.dilation[a] * (conv.kernel[a] - 1) + 1 - 2 * conv.padding[a]) + rng.randint(0, 10)
                 for a in range(2))
    # with padding beyond the kernel the smallest transposed-conv output can be < 1: name the size then
    smallest_is_valid = min(conv.smallest_deconv(conv.output(size))) >= 1
    return DeconvCase(f"random{index}", rng.randint(1, 2), c_in, c_out, size, conv,
                      default_output_size=smallest_is_valid and rng.random() < 0.2)


def random_fused_case(index: int) -> FusedCase:
    rng = case_rng("fused", index)
    pool = random_pool(rng)
    pool_input = tuple(pool.smallest_input(a) + rng.randint(0, 8) for a in range(2))
    conv, c_in, c_out = random_conv(rng)
    # the conv's padding must leave a positive smallest deconv size for this pool input
    padding = tuple(min(conv.padding[a], ((pool_input[a] - 1) * conv.stride[a]
                                          + conv.dilation[a] * (conv.kernel[a] - 1)) // 2) for a in range(2))
    conv = dataclasses.replace(conv, padding=padding)
    # any forward input size in [smallest, smallest + stride - 1] convolves to pool_input
    size = tuple(s + rng.randint(0, conv.stride[a] - 1) for a, s in enumerate(conv.smallest_deconv(pool_input)))
    assert conv.output(size) == pool_input
    return FusedCase(f"random{index}", rng.randint(1, 2), c_in, c_out, size, conv, pool, integers=rng.random() < 0.3)


ALEXNET_POOL = Pool((3, 3), (2, 2))
VGG_POOL = Pool((2, 2), (2, 2))

FIXED_POOL_CASES = [
    PoolCase("alexnet_3x3s2_overlap", 2, 3, (27, 27), ALEXNET_POOL),
    PoolCase("alexnet_3x3s2_overlap_ties", 2, 3, (13, 13), ALEXNET_POOL, integers=True),
    PoolCase("vgg_2x2s2_odd", 2, 3, (15, 15), VGG_POOL),
    PoolCase("3x3s2_pad1_ceil", 1, 2, (10, 11), Pool((3, 3), (2, 2), (1, 1), ceil_mode=True)),
    PoolCase("2x2s2_ceil_odd", 1, 2, (7, 9), Pool((2, 2), (2, 2), ceil_mode=True)),
    PoolCase("rect_1x11_s1x4", 1, 2, (5, 23), Pool((1, 11), (1, 4), (0, 5))),
    PoolCase("3x3_dilation2_pad1", 1, 2, (12, 12), Pool((3, 3), (1, 1), (1, 1), (2, 2))),
    PoolCase("16x16_limit", 1, 2, (20, 17), Pool((16, 16), (4, 3), (8, 8))),
    PoolCase("1x1", 1, 2, (4, 5), Pool((1, 1), (1, 1))),
    PoolCase("nan_everywhere", 1, 2, (9, 9), ALEXNET_POOL, nan_fraction=0.5),
    # the CPU kernel's loops: long NCHW rows by the row loop (strides 2, 1 and 3), short rows with many
    # channels pooled channels-last
    PoolCase("long_rows", 1, 3, (5, 90), ALEXNET_POOL, nan_fraction=0.05),
    PoolCase("long_rows_stride1_pad1", 1, 2, (4, 70), Pool((3, 3), (1, 1), (1, 1)), integers=True),
    PoolCase("long_rows_stride3_ceil", 1, 2, (6, 100), Pool((2, 2), (3, 3), ceil_mode=True)),
    PoolCase("short_rows_many_channels", 2, 20, (13, 13), ALEXNET_POOL, integers=True),
]
FIXED_DECONV_CASES = [
    DeconvCase("alexnet_conv1_11x11s4", 1, 3, 4, (35, 35), Conv((11, 11), (4, 4), (2, 2))),
    DeconvCase("vgg_3x3p1", 2, 4, 5, (9, 8), Conv((3, 3), (1, 1), (1, 1))),
    DeconvCase("zfnet_7x7s2p1", 1, 3, 4, (24, 25), Conv((7, 7), (2, 2), (1, 1))),
    DeconvCase("grouped_5x5_dilated", 1, 4, 6, (13, 12), Conv((5, 5), (2, 3), (2, 1), (2, 1), groups=2)),
    DeconvCase("depthwise_3x3", 2, 3, 3, (7, 7), Conv((3, 3), (2, 2), (1, 1), groups=3)),
    DeconvCase("1x1", 1, 3, 2, (5, 6), Conv((1, 1))),
    DeconvCase("stride_beyond_kernel", 1, 2, 2, (11, 10), Conv((2, 3), (4, 4))),
]
FIXED_FUSED_CASES = [
    FusedCase("alexnet_conv5_pool5", 1, 6, 8, (13, 13), Conv((3, 3), (1, 1), (1, 1)), ALEXNET_POOL),
    FusedCase("vgg_conv_pool", 2, 4, 5, (14, 14), Conv((3, 3), (1, 1), (1, 1)), VGG_POOL),
    FusedCase("vgg_conv_pool_odd_ceil", 1, 3, 4, (9, 9), Conv((3, 3), (1, 1), (1, 1)),
              Pool((2, 2), (2, 2), ceil_mode=True)),
    FusedCase("zfnet_conv1_pool1", 1, 3, 4, (31, 31), Conv((7, 7), (2, 2), (1, 1)), Pool((3, 3), (2, 2), (1, 1))),
    FusedCase("grouped_ties", 1, 4, 6, (12, 12), Conv((3, 3), (1, 1), (1, 1), groups=2), ALEXNET_POOL,
              integers=True),
    # the CPU kernel's two ways of pass 3: rows of 11 taps scattered (3 input channels), rows of 19
    # (more than one vector), and a 64-wide block of 40 channels gathered
    FusedCase("alexnet_conv1_pool1", 2, 3, 8, (67, 67), Conv((11, 11), (4, 4), (2, 2)), ALEXNET_POOL),
    FusedCase("long_filter_rows", 1, 2, 3, (9, 40), Conv((3, 19), (1, 2), (1, 9)), VGG_POOL),
    FusedCase("wide_channel_block", 1, 40, 6, (11, 11), Conv((3, 3), (1, 1), (1, 1)), VGG_POOL),
]

N_RANDOM = 45  # per op and dtype: with the fixed cases, a few hundred per op over the four dtypes
POOL_CASES = FIXED_POOL_CASES + [random_pool_case(i) for i in range(N_RANDOM)]
DECONV_CASES = FIXED_DECONV_CASES + [random_deconv_case(i) for i in range(N_RANDOM)]
FUSED_CASES = FIXED_FUSED_CASES + [random_fused_case(i) for i in range(N_RANDOM)]


def _ids(cases):
    return [case.name for case in cases]


# --------------------------------------------------------------------------------------------- #
# Inputs for a case
# --------------------------------------------------------------------------------------------- #

def pool_inputs(case: PoolCase, dtype, device, key):
    gen = torch_generator(case_rng(key, case.name))
    x = random_tensor((case.n, case.c, *case.size), dtype=dtype, device=device, generator=gen,
                      integers=case.integers, nan_fraction=case.nan_fraction)
    grad = random_tensor((case.n, case.c, *case.pool.pooled(case.size)), dtype=dtype, device=device, generator=gen)
    return x, grad


def deconv_inputs(case: DeconvCase, dtype, device, key):
    gen = torch_generator(case_rng(key, case.name))
    out_size = case.conv.output(case.size)
    grad = random_tensor((case.n, case.c_out, *out_size), dtype=dtype, device=device, generator=gen)
    weight = random_tensor((case.c_out, case.c_in // case.conv.groups, *case.conv.kernel), dtype=dtype,
                           device=device, generator=gen)
    output_size = case.conv.smallest_deconv(out_size) if case.default_output_size else case.size
    return grad, weight, output_size


def fused_inputs(case: FusedCase, dtype, device, key):
    """grad at the pool's output, the switches of a pool over a random pre-pool map, the weight."""
    gen = torch_generator(case_rng(key, case.name))
    pool_input = case.conv.output(case.size)
    pre_pool = random_tensor((case.n, case.c_out, *pool_input), dtype=dtype, device=device, generator=gen,
                             integers=case.integers)
    grad = random_tensor((case.n, case.c_out, *case.pool.pooled(pool_input)), dtype=dtype, device=device,
                         generator=gen)
    weight = random_tensor((case.c_out, case.c_in // case.conv.groups, *case.conv.kernel), dtype=dtype,
                           device=device, generator=gen)
    return pre_pool, grad, weight, pool_input


def fused_args(case: FusedCase, pool_input):
    p, c = case.pool, case.conv
    return (pool_input, p.kernel, p.stride, p.padding, p.dilation, c.stride, c.padding, c.dilation, c.groups,
            case.size)


# --------------------------------------------------------------------------------------------- #
# Each op against the reference and autograd, every dtype
# --------------------------------------------------------------------------------------------- #

# Each check takes the op under test as its first argument, so that tests/test_cuda_emulation.py
# runs the same checks on the CUDA kernels' element functions executed on the host.

def check_max_pool2d_switches(max_pool2d_switches, device, dtype, case):
    x, _ = pool_inputs(case, dtype, device, "max_pool2d_switches")
    p = case.pool
    out, switches = max_pool2d_switches(x, *p.args(), ceil_mode=p.ceil_mode)
    ref_out, ref_switches = reference.max_pool2d_switches(x, *p.args(), ceil_mode=p.ceil_mode)
    torch_out, torch_indices = F.max_pool2d_with_indices(x, *p.args(), ceil_mode=p.ceil_mode)
    expected_switches = switches_from_indices(torch_indices, case.size[1], *p.args())

    assert out.dtype == dtype and out.device == x.device and switches.dtype == torch.uint8
    assert out.shape == switches.shape == (case.n, case.c, *p.pooled(case.size))
    # a max is exact in every dtype: values, NaN and switches compare bit for bit
    assert_bitwise_equal(out, torch_out, "output vs max_pool2d_with_indices")
    assert_bitwise_equal(switches, expected_switches, "switches vs max_pool2d_with_indices")
    assert_bitwise_equal(out, ref_out, "output vs reference")
    assert_bitwise_equal(switches, ref_switches, "switches vs reference")


def check_unpool_relu(unpool_relu, device, dtype, case):
    x, grad = pool_inputs(case, dtype, device, "unpool_relu")
    p = case.pool
    x64, out64, switches = pool_with_autograd(x, p)
    default = unpool_relu(grad, switches, case.size, *p.args())
    for rule, masked in RULE_VARIANTS:
        kwargs = rule_kwargs(rule, masked, out64, device)
        result = unpool_relu(grad, switches, case.size, *p.args(), **kwargs)
        expected = reference.unpool_relu(grad, switches, case.size, *p.args(), **kwargs)
        truth = unpool_relu_truth(x64, out64, grad, **kwargs)
        # sum of |terms|: the scale of rounding errors
        magnitude = unpool_relu_truth(x64, out64, grad.abs(), **kwargs)
        assert result.shape == (case.n, case.c, *case.size)
        assert_close_to_oracle(result, expected, truth, magnitude=magnitude,
                               msg=f"unpool_relu rule={rule} masked={masked} {case}")
        if rule == "deconvnet":  # the default, and positive is not read
            assert_bitwise_equal(result, default, f"unpool_relu deconvnet masked={masked} vs the default")


def check_unpool_relu_deconv2d(unpool_relu_deconv2d, device, dtype, case):
    pre_pool, grad, weight, pool_input = fused_inputs(case, dtype, device, "unpool_relu_deconv2d")
    x64, out64, switches = pool_with_autograd(pre_pool, case.pool)
    args = fused_args(case, pool_input)
    default = unpool_relu_deconv2d(grad, switches, weight, *args)
    for rule, masked in RULE_VARIANTS:
        kwargs = rule_kwargs(rule, masked, out64, device)
        result = unpool_relu_deconv2d(grad, switches, weight, *args, **kwargs)
        expected = reference.unpool_relu_deconv2d(grad, switches, weight, *args, **kwargs)
        # autograd, chained: max_pool2d's backward under the rule, then conv2d's input-gradient
        truth = conv_input_gradient(unpool_relu_truth(x64, out64, grad, **kwargs), weight, case.size, case.conv)
        magnitude = conv_input_gradient(unpool_relu_truth(x64, out64, grad.abs(), **kwargs), weight.abs(),
                                        case.size, case.conv)
        assert result.shape == (case.n, case.c_in, *case.size)
        assert_close_to_oracle(result, expected, truth, magnitude=magnitude,
                               msg=f"unpool_relu_deconv2d rule={rule} masked={masked} {case}")
        if rule == "deconvnet":
            assert_bitwise_equal(result, default, f"unpool_relu_deconv2d deconvnet masked={masked} vs the default")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", POOL_CASES, ids=_ids(POOL_CASES))
def test_max_pool2d_switches(device, dtype, case):
    check_max_pool2d_switches(ops.max_pool2d_switches, device, dtype, case)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", POOL_CASES, ids=_ids(POOL_CASES))
def test_unpool_relu(device, dtype, case):
    check_unpool_relu(ops.unpool_relu, device, dtype, case)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", DECONV_CASES, ids=_ids(DECONV_CASES))
def test_deconv2d(device, dtype, case):
    grad, weight, output_size = deconv_inputs(case, dtype, device, "deconv2d")
    c = case.conv
    call = dict(stride=c.stride, padding=c.padding, dilation=c.dilation, groups=c.groups)
    if case.default_output_size:
        result = ops.deconv2d(grad, weight, **call)
    else:
        result = ops.deconv2d(grad, weight, **call, output_size=output_size)
    expected = reference.deconv2d(grad, weight, **call, output_size=output_size)
    truth = conv_input_gradient(grad, weight, output_size, c)
    # conv_transpose2d is a second, independent statement of the same truth
    output_padding = tuple(output_size[a] - c.smallest_deconv(grad.shape[2:])[a] for a in range(2))
    transposed_truth = F.conv_transpose2d(grad.double(), weight.double(), None, c.stride, c.padding,
                                          output_padding, c.groups, c.dilation)
    torch.testing.assert_close(truth, transposed_truth)
    magnitude = conv_input_gradient(grad.abs(), weight.abs(), output_size, c)
    assert result.shape == (case.n, case.c_in, *output_size)
    assert_close_to_oracle(result, expected, truth, magnitude=magnitude, msg=f"deconv2d {case}")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", FUSED_CASES, ids=_ids(FUSED_CASES))
def test_unpool_relu_deconv2d(device, dtype, case):
    check_unpool_relu_deconv2d(ops.unpool_relu_deconv2d, device, dtype, case)


# --------------------------------------------------------------------------------------------- #
# Semantics, by hand
# --------------------------------------------------------------------------------------------- #

def test_switches_by_hand(device):
    nan = float("nan")
    x = torch.tensor([[1., 5., 2., 2.],
                      [3., 4., 2., 2.],
                      [9., nan, -1., -3.],
                      [0., 9., -2., -1.]], device=device).view(1, 1, 4, 4)
    out, switches = ops.max_pool2d_switches(x, 2)
    # window-local ky * kernel_w + kx; ties take the first maximum in row-major order; NaN is a maximum
    assert switches.tolist() == [[[[1, 0], [1, 0]]]]
    assert torch.equal(out[0, 0, 0], torch.tensor([5., 2.], device=device))
    assert out[0, 0, 1, 0].isnan() and out[0, 0, 1, 1].item() == -1.0

    _, switches = ops.max_pool2d_switches(x[..., :3, :3].nan_to_num(0.0), 3, stride=1, padding=1)
    # 3x3 windows centred on each pixel of [[1, 5, 2], [3, 4, 2], [9, 0, -1]]; padding is never a maximum
    assert switches.tolist() == [[[[5, 4, 3], [7, 6, 0], [4, 3, 0]]]]


def test_overlapping_windows_sum_before_the_relu(device):
    # 3x3 stride-2 windows over 5x5: all four windows pick the centre pixel
    x = torch.zeros(1, 1, 5, 5, device=device)
    x[0, 0, 2, 2] = 1.0
    _, switches = ops.max_pool2d_switches(x, 3, 2)
    assert switches.tolist() == [[[[8, 6], [2, 0]]]]
    grad = torch.tensor([[1.0, 2.0], [3.0, -0.5]], device=device).view(1, 1, 2, 2)
    unpooled = ops.unpool_relu(grad, switches, (5, 5), 3, 2)
    expected = torch.zeros(1, 1, 5, 5, device=device)
    expected[0, 0, 2, 2] = 5.5
    assert torch.equal(unpooled, expected)
    # the ReLU applies to the sum, not to each contribution: 1 + 2 + 3 - 6.5 < 0
    grad[0, 0, 1, 1] = -6.5
    assert torch.equal(ops.unpool_relu(grad, switches, (5, 5), 3, 2), torch.zeros_like(expected))
    # the fused op sums the same way (nn.MaxUnpool2d would keep one of the four: it is not a reference)
    weight = torch.ones(1, 1, 1, 1, device=device)
    fused = ops.unpool_relu_deconv2d(grad.abs(), switches, weight, (5, 5), 3, 2)
    assert fused[0, 0, 2, 2].item() == 1.0 + 2.0 + 3.0 + 6.5 and fused.count_nonzero() == 1


def test_nan_gradients_propagate(device):
    case = FIXED_POOL_CASES[0]
    x, grad = pool_inputs(case, torch.float32, device, "nan_gradients")
    grad[0, 0, 0, 0] = float("nan")
    x64, out64, switches = pool_with_autograd(x, case.pool)
    result = ops.unpool_relu(grad, switches, case.size, *case.pool.args())
    truth = unpool_relu_truth(x64, out64, grad)
    assert torch.equal(result.isnan(), truth.isnan()) and result.isnan().sum() == 1
    assert_close_to_oracle(result, reference.unpool_relu(grad, switches, case.size, *case.pool.args()), truth)


def test_wrapper_defaults(device):
    x = torch.randn(2, 3, 9, 10, device=device)
    out, switches = ops.max_pool2d_switches(x, 3)  # stride defaults to the kernel size
    out_pairs, switches_pairs = ops.max_pool2d_switches(x, (3, 3), (3, 3), (0, 0), (1, 1), False)
    assert torch.equal(out, out_pairs) and torch.equal(switches, switches_pairs)
    # input_size: a pair or the pool input's full size
    unpooled = ops.unpool_relu(out, switches, x.shape, 3)
    assert torch.equal(unpooled, ops.unpool_relu(out, switches, (9, 10), (3, 3), (3, 3)))
    weight = torch.randn(3, 2, 3, 3, device=device)
    # output_size defaults to the smallest size; a full [N, C, H, W] size is accepted too
    assert ops.deconv2d(out, weight, stride=2).shape == (2, 2, 7, 7)
    assert ops.deconv2d(out, weight, stride=2, output_size=torch.Size([2, 2, 8, 8])).shape == (2, 2, 8, 8)
    fused = ops.unpool_relu_deconv2d(out, switches, weight, (9, 10), 3)
    assert fused.shape == (2, 2, 11, 12)
    torch.testing.assert_close(fused, ops.deconv2d(unpooled, weight))


# --------------------------------------------------------------------------------------------- #
# Layouts, empty tensors, determinism
# --------------------------------------------------------------------------------------------- #

LAYOUTS = {
    "channels_last": lambda t: t.contiguous(memory_format=torch.channels_last),
    "transposed": transposed,
    "strided": noncontiguous,
    # contiguous, but not at the start of its storage
    "storage_offset": lambda t: torch.cat([t, t]).narrow(0, t.shape[0], t.shape[0]),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layouts_give_the_same_answers(device, layout):
    to_layout = LAYOUTS[layout]
    case = FIXED_FUSED_CASES[0]
    pre_pool, grad, weight, pool_input = fused_inputs(case, torch.float32, device, "layouts")
    p = case.pool

    out, switches = ops.max_pool2d_switches(pre_pool, *p.args())
    out_l, switches_l = ops.max_pool2d_switches(to_layout(pre_pool), *p.args())
    assert_bitwise_equal(out_l, out, f"max_pool2d_switches output, {layout}")
    assert_bitwise_equal(switches_l, switches, f"max_pool2d_switches switches, {layout}")
    if layout == "channels_last":  # kept, as by max_pool2d (a channels-last forward stays so)
        assert out_l.is_contiguous(memory_format=torch.channels_last), out_l.stride()
        assert switches_l.is_contiguous(memory_format=torch.channels_last), switches_l.stride()

    unpooled = ops.unpool_relu(grad, switches, pool_input, *p.args())
    unpooled_l = ops.unpool_relu(to_layout(grad), to_layout(switches), pool_input, *p.args())
    assert_bitwise_equal(unpooled_l, unpooled, f"unpool_relu, {layout}")

    c = case.conv
    conv = dict(stride=c.stride, padding=c.padding, dilation=c.dilation, groups=c.groups, output_size=case.size)
    deconv = ops.deconv2d(unpooled, weight, **conv)
    deconv_l = ops.deconv2d(to_layout(unpooled), to_layout(weight), **conv)
    # the backend may pick another algorithm for another layout: equal up to float32 rounding
    torch.testing.assert_close(deconv_l, deconv, msg=lambda m: f"deconv2d, {layout}: {m}")

    fused = ops.unpool_relu_deconv2d(grad, switches, weight, *fused_args(case, pool_input))
    fused_l = ops.unpool_relu_deconv2d(to_layout(grad), to_layout(switches), to_layout(weight),
                                       *fused_args(case, pool_input))
    torch.testing.assert_close(fused_l, fused, msg=lambda m: f"unpool_relu_deconv2d, {layout}: {m}")


@pytest.mark.parametrize("capability", ["avx2", "default"])
def test_narrower_instruction_sets(device, capability):
    """The CPU kernel's AVX2 and plain loops, which a CPU with AVX-512 would never pick: PyTorch's
    ATEN_CPU_CAPABILITY caps its kernels and ours, so every fused-op case runs again under it."""
    if device != "cpu":
        pytest.skip("instruction sets are a CPU matter")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                          "test_unpool_relu_deconv2d and cpu and (float32 or float64)"],
                         env=env, capture_output=True, text=True, cwd=os.path.dirname(__file__))
    assert run.returncode == 0 and " passed" in run.stdout, f"under ATEN_CPU_CAPABILITY={capability}:\n" \
                                                            f"{run.stdout[-4000:]}{run.stderr[-2000:]}"


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_deterministic(device, dtype):
    """Gather, not scatter with atomics: two runs give the same bits."""
    # large enough that the kernels split the work across threads / blocks
    case = FusedCase("determinism", 4, 16, 32, (57, 57), Conv((3, 3), (1, 1), (1, 1)), ALEXNET_POOL)
    pre_pool, grad, weight, pool_input = fused_inputs(case, dtype, device, "determinism")
    p = case.pool

    def run():
        out, switches = ops.max_pool2d_switches(pre_pool, *p.args())
        return {
            "max_pool2d_switches output": out,
            "max_pool2d_switches switches": switches,
            "unpool_relu": ops.unpool_relu(grad, switches, pool_input, *p.args()),
            "deconv2d": ops.deconv2d(pre_pool, weight, padding=1),
            "unpool_relu_deconv2d": ops.unpool_relu_deconv2d(grad, switches, weight, *fused_args(case, pool_input)),
        }

    first, second = run(), run()
    for name in first:
        assert_bitwise_equal(second[name], first[name], f"{name}, {dtype}")


@pytest.mark.parametrize("case", [
    # one image: pass 2 splits its channels among the threads; four: it goes image by image
    FusedCase("one_image", 1, 16, 32, (57, 57), Conv((3, 3), (1, 1), (1, 1)), ALEXNET_POOL),
    FusedCase("four_images", 4, 16, 32, (29, 29), Conv((3, 3), (1, 1), (1, 1)), VGG_POOL),
    FusedCase("first_layer", 2, 3, 16, (67, 67), Conv((11, 11), (4, 4), (2, 2)), ALEXNET_POOL),
], ids=lambda case: case.name)
def test_cpu_bits_do_not_depend_on_the_thread_count(device, case):
    """Each output element is added up by one task in a fixed order, whatever the number of threads."""
    if device != "cpu":
        pytest.skip("threads are the CPU's")
    pre_pool, grad, weight, pool_input = fused_inputs(case, torch.float32, device, "threads")
    out, switches = ops.max_pool2d_switches(pre_pool, *case.pool.args())
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(ops.unpool_relu_deconv2d(grad, switches, weight, *fused_args(case, pool_input)))
    finally:
        torch.set_num_threads(before)
    for threads, result in zip((2, 3), results[1:]):
        assert_bitwise_equal(result, results[0], f"unpool_relu_deconv2d on {threads} threads vs 1, {case.name}")


EMPTY_SHAPES = {"batch0": (0, 3), "channels0": (2, 0), "both0": (0, 0)}


@pytest.mark.parametrize("empty", list(EMPTY_SHAPES))
def test_empty_tensors(device, empty):
    n, c = EMPTY_SHAPES[empty]
    pool = Pool((3, 3), (2, 2), (1, 1), ceil_mode=True)
    x = torch.randn(n, c, 9, 8, device=device)
    out, switches = ops.max_pool2d_switches(x, *pool.args(), ceil_mode=True)
    ref_out, ref_switches = reference.max_pool2d_switches(x, *pool.args(), ceil_mode=True)
    assert out.shape == switches.shape == ref_out.shape == (n, c, *pool.pooled((9, 8)))
    assert out.dtype == x.dtype and switches.dtype == torch.uint8

    unpooled = ops.unpool_relu(out, switches, (9, 8), *pool.args())
    assert unpooled.shape == (n, c, 9, 8)
    assert torch.equal(unpooled, reference.unpool_relu(ref_out, ref_switches, (9, 8), *pool.args()))

    # the forward conv had c outputs (possibly none) and 4 inputs: deconv of no channels is zero
    weight = torch.randn(c, 4, 3, 3, device=device)
    deconv = ops.deconv2d(unpooled, weight, stride=2, padding=1, output_size=(18, 16))
    assert deconv.shape == (n, 4, 18, 16)
    assert torch.equal(deconv, reference.deconv2d(unpooled, weight, stride=2, padding=1, output_size=(18, 16)))
    assert not deconv.any()  # c == 0 or n == 0

    fused = ops.unpool_relu_deconv2d(out, switches, weight, (9, 8), *pool.args(), conv_stride=2, conv_padding=1,
                                     output_size=(18, 16))
    assert fused.shape == (n, 4, 18, 16) and not fused.any()


def test_deconv2d_under_per_operator_precision_flags(device):
    """PyTorch's per-operator float32 precision flags, set differently for conv and rnn, make the
    operator-less TF32 question raise ("... without a specific operator name"): deconv2d must ask
    for the convolution's own flag, on every device."""
    flags = getattr(torch.backends.cudnn, "conv", None), getattr(torch.backends.cudnn, "rnn", None)
    if flags[0] is None or not hasattr(flags[0], "fp32_precision"):
        pytest.skip("this torch has no per-operator fp32_precision flags")
    saved = flags[0].fp32_precision, flags[1].fp32_precision
    grad, weight = torch.randn(1, 2, 5, 5, device=device), torch.randn(2, 3, 3, 3, device=device)
    try:
        torch.backends.cudnn.conv.fp32_precision = "tf32"
        torch.backends.cudnn.rnn.fp32_precision = "ieee"
        result = ops.deconv2d(grad, weight, padding=1)
        unpooled = torch.randn(1, 2, 4, 4, device=device)
        _, switches = ops.max_pool2d_switches(unpooled, 2)
        fused = ops.unpool_relu_deconv2d(torch.randn(1, 2, 2, 2, device=device), switches, weight, (4, 4), 2)
    finally:
        torch.backends.cudnn.conv.fp32_precision, torch.backends.cudnn.rnn.fp32_precision = saved
    torch.testing.assert_close(result, F.conv_transpose2d(grad, weight, padding=1), rtol=1e-3, atol=1e-3)
    assert fused.shape == (1, 3, 6, 6)


def test_deconv2d_to_no_channels(device):
    # a forward conv with no input channels: the weight is [C_out, 0, kh, kw], the result [N, 0, H, W]
    grad = torch.randn(2, 3, 5, 5, device=device)
    weight = torch.randn(3, 0, 3, 3, device=device)
    assert ops.deconv2d(grad, weight).shape == (2, 0, 7, 7)


# --------------------------------------------------------------------------------------------- #
# Switch values outside their window are ignored, never followed
# --------------------------------------------------------------------------------------------- #

@pytest.mark.parametrize("index", range(12))
def test_arbitrary_switches_are_safe(device, index):
    """Any uint8 (255 included) may arrive as a switch: one that names no tap, or a tap in the
    padding or beyond the input, contributes nothing; the result equals the reference's. The
    inputs sit inside NaN-filled storage, so a read past them would show as NaN in the result."""
    case = FIXED_FUSED_CASES[3] if index == 0 else random_fused_case(1000 + index)
    _, grad, weight, pool_input = fused_inputs(case, torch.float64, device, "arbitrary_switches")
    gen = torch_generator(case_rng("arbitrary_switches", index))
    if index % 3 == 0:
        switches = torch.full(grad.shape, 255, dtype=torch.uint8)
    else:
        switches = torch.randint(0, 256, grad.shape, generator=gen, dtype=torch.uint8)
    grad, switches, weight = guarded(grad), guarded(switches.to(device)), guarded(weight)
    p = case.pool
    unpooled = ops.unpool_relu(grad, switches, pool_input, *p.args())
    torch.testing.assert_close(unpooled, reference.unpool_relu(grad, switches, pool_input, *p.args()))
    args = fused_args(case, pool_input)
    fused = ops.unpool_relu_deconv2d(grad, switches, weight, *args)
    torch.testing.assert_close(fused, reference.unpool_relu_deconv2d(grad, switches, weight, *args))
    if index % 3 == 0:  # 255 names no tap of a kernel under 16x16: nothing is routed anywhere
        assert not unpooled.any() and not fused.any()


# --------------------------------------------------------------------------------------------- #
# torch.library.opcheck: schema, fake kernels, torch.compile
# --------------------------------------------------------------------------------------------- #

def _pool_sample(shape, pool, ceil_mode=False, dtype=torch.float32, channels_last=False):
    """max_pool2d_switches, unpool_relu, deconv2d and unpool_relu_deconv2d on one pool input."""
    def build(device):
        x = torch.randn(*shape, dtype=dtype, device=device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out, switches = ops.max_pool2d_switches(x, *pool, ceil_mode=ceil_mode)
        size = list(x.shape[2:])
        weight = torch.randn(x.shape[1], 2, 3, 3, dtype=dtype, device=device)
        positive = out > 0
        return {
            "max_pool2d_switches": (x, *pool, ceil_mode),
            "unpool_relu": (out, switches, size, *pool),
            "unpool_relu:guided": (out, switches, size, *pool, "guided", positive),
            "unpool_relu:gradient": (out, switches, size, *pool, "gradient", None),
            # 3x3, stride 1, padding 1: the same size back
            "deconv2d": (x, weight, [1, 1], [1, 1], [1, 1], 1, size),
            # 3x3, stride 1, no padding: two more
            "unpool_relu_deconv2d": (out, switches, weight, size, *pool, [1, 1], [0, 0], [1, 1], 1,
                                     [s + 2 for s in size]),
            "unpool_relu_deconv2d:gradient": (out, switches, weight, size, *pool, [1, 1], [0, 0], [1, 1], 1,
                                              [s + 2 for s in size], "gradient", positive),
        }
    return build


OPCHECK_INPUTS = {
    "plain": _pool_sample((2, 3, 7, 9), ([3, 3], [2, 2], [1, 1], [1, 1]), ceil_mode=True),
    "float64_dilated": _pool_sample((1, 2, 9, 9), ([2, 3], [1, 2], [1, 0], [2, 1]), dtype=torch.float64),
    "float16": _pool_sample((1, 2, 6, 6), ([2, 2], [2, 2], [0, 0], [1, 1]), dtype=torch.float16),
    "bfloat16_channels_last": _pool_sample((2, 3, 6, 6), ([2, 2], [2, 2], [0, 0], [1, 1]), dtype=torch.bfloat16,
                                           channels_last=True),
    "empty": _pool_sample((0, 3, 6, 6), ([2, 2], [2, 2], [0, 0], [1, 1])),
}
# "op:variant": the op with its rule arguments
OPCHECK_SAMPLES = [(op, inputs) for inputs in OPCHECK_INPUTS
                   for op in ["max_pool2d_switches", "unpool_relu", "unpool_relu:guided", "unpool_relu:gradient",
                              "deconv2d", "unpool_relu_deconv2d", "unpool_relu_deconv2d:gradient"]]


@pytest.mark.parametrize("op, inputs", OPCHECK_SAMPLES, ids=[f"{op}-{inputs}" for op, inputs in OPCHECK_SAMPLES])
def test_opcheck(device, op, inputs):
    args = OPCHECK_INPUTS[inputs](device)[op]
    torch.library.opcheck(getattr(torch.ops.deconvcuda, op.split(":")[0]), args)


def test_opcheck_grouped_strided_deconv2d(device):
    # 4 -> 6 channels in 2 groups; rows: stride 2, padding 1, dilation 2; columns: stride 3, output padding 1
    grad = torch.randn(2, 4, 5, 5, device=device)
    weight = torch.randn(4, 3, 3, 2, device=device)
    torch.library.opcheck(torch.ops.deconvcuda.deconv2d, (grad, weight, [2, 3], [1, 0], [2, 1], 2, [12, 15]))


# --------------------------------------------------------------------------------------------- #
# Bad input: clear errors, the same from the C++ checks and from the fake kernels
# --------------------------------------------------------------------------------------------- #

@dataclasses.dataclass
class BadInput:
    """One bad call: ``build(device)`` returns the (wrapper, args, kwargs) to call; ``other`` is the
    device of the mismatched tensor, where the case is about devices."""
    name: str
    build: object
    match: str
    needs_other_device: bool = False


def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.zeros(*shape, dtype=dtype, device=device)


def _u8(*shape, device="cpu"):
    return torch.zeros(*shape, dtype=torch.uint8, device=device)


def _b(*shape, device="cpu"):
    return torch.zeros(*shape, dtype=torch.bool, device=device)


def _other(device):
    return "cpu" if device.startswith("cuda") else "cuda"


POOL_X = (1, 2, 8, 8)      # pooled by 2x2 windows to 4x4
POOLED = (1, 2, 4, 4)
W = (2, 3, 3, 3)            # a conv from 3 to 2 channels


def _pool(d, *args, **kw):
    return ops.max_pool2d_switches, (_t(*POOL_X, device=d), *args), kw


def _unpool(d, grad=None, switches=None, input_size=(8, 8), kernel=2, **kw):
    grad = _t(*POOLED, device=d) if grad is None else grad
    switches = _u8(*POOLED, device=d) if switches is None else switches
    return ops.unpool_relu, (grad, switches, input_size, kernel), kw


def _deconv(d, x=None, weight=None, **kw):
    x = _t(1, 2, 5, 5, device=d) if x is None else x
    weight = _t(*W, device=d) if weight is None else weight
    return ops.deconv2d, (x, weight), kw


def _fused(d, grad=None, switches=None, weight=None, input_size=(8, 8), kernel=2, **kw):
    grad = _t(*POOLED, device=d) if grad is None else grad
    switches = _u8(*POOLED, device=d) if switches is None else switches
    weight = _t(*W, device=d) if weight is None else weight
    return ops.unpool_relu_deconv2d, (grad, switches, weight, input_size, kernel), kw


BAD_INPUTS = [
    # max_pool2d_switches
    BadInput("pool-3d-input", lambda d: (ops.max_pool2d_switches, (_t(2, 8, 8, device=d), 2), {}),
             r"max_pool2d_switches: input must be 4-D \[N, C, H, W\], got 3-D with shape \[2, 8, 8\]"),
    BadInput("pool-int-input", lambda d: (ops.max_pool2d_switches, (_t(*POOL_X, dtype=torch.int64, device=d), 2),
                                          {}),
             r"max_pool2d_switches: input must be float32, float64, float16 or bfloat16, got torch\.int64"),
    BadInput("pool-zero-kernel", lambda d: _pool(d, (0, 2)),
             r"max_pool2d_switches: kernel_size must be positive, got \[0, 2\]"),
    BadInput("pool-negative-stride", lambda d: _pool(d, 2, -1),
             r"max_pool2d_switches: stride must be positive, got \[-1, -1\]"),
    BadInput("pool-zero-stride", lambda d: _pool(d, 2, (1, 0)),
             r"max_pool2d_switches: stride must be positive, got \[1, 0\]"),
    BadInput("pool-negative-padding", lambda d: _pool(d, 3, 1, -1),
             r"max_pool2d_switches: padding must be non-negative, got \[-1, -1\]"),
    BadInput("pool-zero-dilation", lambda d: _pool(d, 3, 1, 0, 0),
             r"max_pool2d_switches: dilation must be positive, got \[0, 0\]"),
    BadInput("pool-padding-over-half", lambda d: _pool(d, 3, 1, (0, 2)),
             r"max_pool2d_switches: padding must be at most half of kernel_size \[3, 3\], got \[0, 2\]"),
    BadInput("pool-kernel-17x17", lambda d: (ops.max_pool2d_switches, (_t(1, 1, 20, 20, device=d), 17), {}),
             r"max_pool2d_switches: kernel_size must have at most 256 taps \(16x16\) .*got \[17, 17\]"),
    BadInput("pool-kernel-16x17", lambda d: (ops.max_pool2d_switches, (_t(1, 1, 20, 20, device=d), (16, 17)), {}),
             r"max_pool2d_switches: kernel_size must have at most 256 taps \(16x16\) .*got \[16, 17\]"),
    # the product of these overflows int64 (2^64 wraps to 0): the check must not multiply
    BadInput("pool-kernel-overflowing-product",
             lambda d: (ops.max_pool2d_switches, (_t(1, 1, 20, 20, device=d), (2**32, 2**32)), {}),
             r"max_pool2d_switches: kernel_size must have at most 256 taps \(16x16\) .*got \[4294967296, 4294967296\]"),
    BadInput("pool-input-too-small", lambda d: (ops.max_pool2d_switches, (_t(1, 2, 2, 8, device=d), 3), {}),
             r"max_pool2d_switches: input of spatial size \[2, 8\] is too small for kernel_size \[3, 3\]"),
    # unpool_relu
    BadInput("unpool-3d-grad", lambda d: _unpool(d, grad=_t(2, 4, 4, device=d)),
             r"unpool_relu: grad must be 4-D \[N, C, H, W\], got 3-D"),
    BadInput("unpool-int-grad", lambda d: _unpool(d, grad=_t(*POOLED, dtype=torch.int32, device=d)),
             r"unpool_relu: grad must be float32, float64, float16 or bfloat16, got torch\.int32"),
    BadInput("unpool-int64-switches", lambda d: _unpool(d, switches=_t(*POOLED, dtype=torch.int64, device=d)),
             r"unpool_relu: switches must be uint8, got torch\.int64"),
    BadInput("unpool-switches-shape", lambda d: _unpool(d, switches=_u8(1, 2, 4, 3, device=d)),
             r"unpool_relu: switches must have the shape of grad \[1, 2, 4, 4\], got \[1, 2, 4, 3\]"),
    BadInput("unpool-switches-device", lambda d: _unpool(d, switches=_u8(*POOLED, device=_other(d))),
             r"unpool_relu: switches must be on the device of grad \(\w+(:\d+)?\), got \w+", True),
    BadInput("unpool-zero-kernel", lambda d: _unpool(d, kernel=0),
             r"unpool_relu: kernel_size must be positive, got \[0, 0\]"),
    BadInput("unpool-kernel-17x17", lambda d: _unpool(d, kernel=17, input_size=(68, 68)),
             r"unpool_relu: kernel_size must have at most 256 taps"),
    BadInput("unpool-padding-over-half", lambda d: _unpool(d, kernel=2, padding=(2, 0)),
             r"unpool_relu: padding must be at most half of kernel_size \[2, 2\], got \[2, 0\]"),
    BadInput("unpool-zero-input-size", lambda d: _unpool(d, input_size=(0, 8)),
             r"unpool_relu: input_size must be positive, got \[0, 8\]"),
    BadInput("unpool-wrong-input-size", lambda d: _unpool(d, input_size=(8, 11)),
             r"unpool_relu: input_size \[8, 11\] pools to 5 \(ceil_mode: 6\) along dim 3, but grad has 4"),
    BadInput("unpool-unknown-rule", lambda d: _unpool(d, rule="lrp"),
             r'unpool_relu: rule must be "deconvnet", "guided" or "gradient", got "lrp"'),
    BadInput("unpool-float-positive", lambda d: _unpool(d, rule="guided", positive=_t(*POOLED, device=d)),
             r"unpool_relu: positive must be bool \(whether the pool's forward output was > 0\), got torch\.float32"),
    BadInput("unpool-positive-shape", lambda d: _unpool(d, rule="gradient", positive=_b(1, 2, 4, 3, device=d)),
             r"unpool_relu: positive must have the shape of grad \[1, 2, 4, 4\], got \[1, 2, 4, 3\]"),
    # checked under "deconvnet" too, which does not read it
    BadInput("unpool-positive-shape-deconvnet", lambda d: _unpool(d, positive=_b(1, 2, 4, device=d)),
             r"unpool_relu: positive must have the shape of grad \[1, 2, 4, 4\], got \[1, 2, 4\]"),
    BadInput("unpool-positive-device", lambda d: _unpool(d, rule="guided", positive=_b(*POOLED, device=_other(d))),
             r"unpool_relu: positive must be on the device of grad \(\w+(:\d+)?\), got \w+", True),
    # deconv2d
    BadInput("deconv-3d-input", lambda d: _deconv(d, x=_t(2, 5, 5, device=d)),
             r"deconv2d: input must be 4-D \[N, C, H, W\], got 3-D with shape \[2, 5, 5\]"),
    BadInput("deconv-int-input", lambda d: _deconv(d, x=_t(1, 2, 5, 5, dtype=torch.uint8, device=d)),
             r"deconv2d: input must be float32, float64, float16 or bfloat16, got torch\.uint8"),
    BadInput("deconv-3d-weight", lambda d: _deconv(d, weight=_t(2, 3, 3, device=d)),
             r"deconv2d: weight must be 4-D \[C_out, C_in / groups, kh, kw\], got 3-D"),
    BadInput("deconv-weight-dtype", lambda d: _deconv(d, weight=_t(*W, dtype=torch.float64, device=d)),
             r"deconv2d: weight must have the dtype of input \(torch\.float32\), got torch\.float64"),
    BadInput("deconv-weight-device", lambda d: _deconv(d, weight=_t(*W, device=_other(d))),
             r"deconv2d: weight must be on the device of input \(\w+(:\d+)?\), got \w+", True),
    BadInput("deconv-zero-groups", lambda d: _deconv(d, groups=0), r"deconv2d: groups must be positive, got 0"),
    BadInput("deconv-groups-not-dividing", lambda d: _deconv(d, groups=3),
             r"deconv2d: weight\.size\(0\) \(2\) must be divisible by groups \(3\)"),
    BadInput("deconv-channels", lambda d: _deconv(d, x=_t(1, 3, 5, 5, device=d)),
             r"deconv2d: input must have weight\.size\(0\) = 2 channels \(the forward conv's C_out\), got 3"),
    BadInput("deconv-zero-stride", lambda d: _deconv(d, stride=0), r"deconv2d: stride must be positive, got \[0, 0\]"),
    BadInput("deconv-negative-padding", lambda d: _deconv(d, padding=(0, -1)),
             r"deconv2d: padding must be non-negative, got \[0, -1\]"),
    BadInput("deconv-zero-dilation", lambda d: _deconv(d, dilation=(0, 1)),
             r"deconv2d: dilation must be positive, got \[0, 1\]"),
    BadInput("deconv-zero-output-size", lambda d: _deconv(d, output_size=(0, 7)),
             r"deconv2d: output_size must be positive, got \[0, 7\]"),
    BadInput("deconv-output-size-too-small", lambda d: _deconv(d, output_size=(6, 7)),
             r"deconv2d: output_size \[6, 7\] cannot be reached along dim 2: a transposed conv of 5 positions "
             r"gives 7 to 7"),
    BadInput("deconv-output-size-too-large", lambda d: _deconv(d, stride=2, output_size=(11, 13)),
             r"deconv2d: output_size \[11, 13\] cannot be reached along dim 3: a transposed conv of 5 positions "
             r"gives 11 to 12"),
    # unpool_relu_deconv2d
    BadInput("fused-3d-grad", lambda d: _fused(d, grad=_t(2, 4, 4, device=d)),
             r"unpool_relu_deconv2d: grad must be 4-D \[N, C, H, W\], got 3-D"),
    BadInput("fused-half-weight", lambda d: _fused(d, weight=_t(*W, dtype=torch.float16, device=d)),
             r"unpool_relu_deconv2d: weight must have the dtype of grad \(torch\.float32\), got torch\.float16"),
    BadInput("fused-int64-switches", lambda d: _fused(d, switches=_t(*POOLED, dtype=torch.int64, device=d)),
             r"unpool_relu_deconv2d: switches must be uint8, got torch\.int64"),
    BadInput("fused-switches-shape", lambda d: _fused(d, switches=_u8(1, 2, 3, 4, device=d)),
             r"unpool_relu_deconv2d: switches must have the shape of grad"),
    BadInput("fused-switches-device", lambda d: _fused(d, switches=_u8(*POOLED, device=_other(d))),
             r"unpool_relu_deconv2d: switches must be on the device of grad", True),
    BadInput("fused-weight-device", lambda d: _fused(d, weight=_t(*W, device=_other(d))),
             r"unpool_relu_deconv2d: weight must be on the device of grad", True),
    BadInput("fused-kernel-16x17", lambda d: _fused(d, kernel=(16, 17), input_size=(64, 68)),
             r"unpool_relu_deconv2d: kernel_size must have at most 256 taps"),
    BadInput("fused-negative-padding", lambda d: _fused(d, padding=-1),
             r"unpool_relu_deconv2d: padding must be non-negative, got \[-1, -1\]"),
    BadInput("fused-wrong-input-size", lambda d: _fused(d, input_size=(20, 8)),
             r"unpool_relu_deconv2d: input_size \[20, 8\] pools to 10 \(ceil_mode: 10\) along dim 2, but grad has 4"),
    BadInput("fused-channels", lambda d: _fused(d, weight=_t(3, 3, 3, 3, device=d)),
             r"unpool_relu_deconv2d: grad must have weight\.size\(0\) = 3 channels \(the forward conv's C_out\), "
             r"got 2"),
    BadInput("fused-zero-conv-stride", lambda d: _fused(d, conv_stride=(1, 0)),
             r"unpool_relu_deconv2d: conv_stride must be positive, got \[1, 0\]"),
    BadInput("fused-negative-conv-padding", lambda d: _fused(d, conv_padding=-2),
             r"unpool_relu_deconv2d: conv_padding must be non-negative, got \[-2, -2\]"),
    BadInput("fused-zero-conv-dilation", lambda d: _fused(d, conv_dilation=0),
             r"unpool_relu_deconv2d: conv_dilation must be positive, got \[0, 0\]"),
    BadInput("fused-unreachable-output-size", lambda d: _fused(d, output_size=(12, 10)),
             r"unpool_relu_deconv2d: output_size \[12, 10\] cannot be reached along dim 2: a transposed conv of 8 "
             r"positions gives 10 to 10"),
    BadInput("fused-groups-not-dividing", lambda d: _fused(d, groups=4),
             r"unpool_relu_deconv2d: weight\.size\(0\) \(2\) must be divisible by groups \(4\)"),
    BadInput("fused-unknown-rule", lambda d: _fused(d, rule="Guided"),
             r'unpool_relu_deconv2d: rule must be "deconvnet", "guided" or "gradient", got "Guided"'),
    BadInput("fused-uint8-positive", lambda d: _fused(d, rule="gradient", positive=_u8(*POOLED, device=d)),
             r"unpool_relu_deconv2d: positive must be bool \(whether the pool's forward output was > 0\), "
             r"got torch\.uint8"),
    BadInput("fused-positive-shape", lambda d: _fused(d, rule="guided", positive=_b(2, 2, 4, 4, device=d)),
             r"unpool_relu_deconv2d: positive must have the shape of grad \[1, 2, 4, 4\], got \[2, 2, 4, 4\]"),
    BadInput("fused-positive-device", lambda d: _fused(d, rule="guided", positive=_b(*POOLED, device=_other(d))),
             r"unpool_relu_deconv2d: positive must be on the device of grad", True),
]


def _error_message(call) -> str:
    fn, args, kwargs = call
    with pytest.raises(RuntimeError) as info:
        fn(*args, **kwargs)
    return str(info.value).splitlines()[0]


@pytest.mark.parametrize("bad", BAD_INPUTS, ids=[b.name for b in BAD_INPUTS])
def test_bad_input_raises(device, bad):
    if bad.needs_other_device and not CUDA_AVAILABLE:
        pytest.skip("CUDA not available: a device mismatch needs two devices (the fake-kernel test covers it)")
    fn, args, kwargs = bad.build(device)
    with pytest.raises(RuntimeError, match=bad.match):
        fn(*args, **kwargs)


@pytest.mark.parametrize("bad", BAD_INPUTS, ids=[b.name for b in BAD_INPUTS])
def test_fake_kernels_raise_the_same_errors(device, bad):
    """Under FakeTensorMode (torch.compile's tracing) the fake kernels raise what the C++ checks
    raise: the same pattern here, the very same message wherever both can run."""
    with FakeTensorMode():
        fake_call = bad.build(device)
        with pytest.raises(RuntimeError, match=bad.match):
            fake_call[0](*fake_call[1], **fake_call[2])
        fake_message = _error_message(fake_call)
    if bad.needs_other_device and not CUDA_AVAILABLE:
        return
    assert _error_message(bad.build(device)) == fake_message


@pytest.mark.parametrize("call, match", [
    (lambda d: ops.max_pool2d_switches(_t(*POOL_X, device=d), (2, 2, 2)),
     r"max_pool2d_switches: kernel_size must be an int or a pair of ints, got \(2, 2, 2\)"),
    (lambda d: ops.max_pool2d_switches(_t(*POOL_X, device=d), 2, stride=1.5),
     r"max_pool2d_switches: stride must be an int or a pair of ints, got 1\.5"),
    (lambda d: ops.max_pool2d_switches(_t(*POOL_X, device=d), True),
     r"max_pool2d_switches: kernel_size must be an int or a pair of ints, got True"),
    (lambda d: ops.unpool_relu(_t(*POOLED, device=d), _u8(*POOLED, device=d), (8, 8, 8), 2),
     r"unpool_relu: input_size must be an int or a pair of ints, got \(8, 8, 8\)"),
    (lambda d: ops.unpool_relu(_t(*POOLED, device=d), _u8(*POOLED, device=d), (8, 8), 2, dilation="1"),
     r"unpool_relu: dilation must be an int or a pair of ints, got '1'"),
    (lambda d: ops.deconv2d(_t(1, 2, 5, 5, device=d), _t(*W, device=d), padding=(1, 1, 1)),
     r"deconv2d: padding must be an int or a pair of ints, got \(1, 1, 1\)"),
    (lambda d: ops.deconv2d(_t(1, 2, 5, 5, device=d), _t(*W, device=d), output_size=(7.0, 7)),
     r"deconv2d: output_size must be an int or a pair of ints, got \(7\.0, 7\)"),
    (lambda d: ops.unpool_relu_deconv2d(_t(*POOLED, device=d), _u8(*POOLED, device=d), _t(*W, device=d), (8, 8),
                                        2, conv_stride=None),
     r"unpool_relu_deconv2d: conv_stride must be an int or a pair of ints, got None"),
], ids=["pool-kernel-3-tuple", "pool-float-stride", "pool-bool-kernel", "unpool-input-size-3-tuple",
        "unpool-str-dilation", "deconv-padding-3-tuple", "deconv-float-output-size", "fused-none-conv-stride"])
def test_wrappers_reject_bad_sizes(device, call, match):
    with pytest.raises(TypeError, match=match):
        call(device)
