"""The four deconvcuda ops, native (``deconvcuda.ops``) against the pure-PyTorch reference
(``deconvcuda.reference``, same signatures), on the layer shapes a projection of VGG16 or AlexNet
runs them on: the ends of VGG16's blocks (2x2 pools of [N, 64, 224, 224] and [N, 512, 28, 28],
3x3 convs), AlexNet's overlapping 3x3 stride-2 pools and its 11x11 stride-4 first conv.

What one timed call measures: the op on contiguous float32 NCHW tensors already on the device,
synchronised (CUDA), nothing else; PyTorch's default settings (on CUDA: TF32 convolutions). Before
a native op is timed, its result is compared with the reference's (pools: values and switches
equal; the rest within a relative tolerance, both computed in full float32), so a wrong kernel
cannot produce a fast number. Batches: 64 on CUDA (realistic); 1 to 16 on the CPU, so
that the CPU run stays short (its numbers are indicative only).

Floors, per op (B = bytes moved, each input and output once; F = dense FLOPs):
- max_pool2d_switches: B = 4 |x| + 4 |y| + 1 |y| (uint8 switches); memory-bound, floor B / DRAM
  bandwidth (about 3.3 TB/s on an H100 SXM). F counts one comparison per window tap.
- unpool_relu: B = 4 |g| + 1 |g| + 4 |out|; memory-bound, floor B / bandwidth. F = |g| adds + |out| maxes.
- deconv2d: F = 2 N C_out (C_in / groups) kh kw H_out W_out of the forward conv (its input-gradient);
  compute-bound for 3x3 convs at 28x28 and above, floor F / peak (H100: about 67 TFLOP/s FP32,
  about 490 TFLOP/s dense TF32), where cuDNN is the bar the reference sets.
- unpool_relu_deconv2d: F = that of deconv2d on the unpooled map (dense), plus unpool_relu's; the
  fused kernel gathers one tap per pooled value, so it does 1 / (pool area) of the dense
  multiply-adds (a quarter for 2x2 pools) and never writes the unpooled map: its GFLOP/s are
  "effective" and can exceed the hardware's peak.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import pytest
import torch

import deconvcuda
from deconvcuda import reference

from conftest import DEVICES, LastCase, assert_matches, full_float32, run_timed, tolerance

IMPLEMENTATIONS = {"reference": reference, "native": deconvcuda.ops}
IMPLS = ["reference", "native"]  # in this order: the native record computes the ratio to the reference
FLOAT32 = 4

_CASE = LastCase()


@dataclass(frozen=True)
class PoolCase:
    """A max pool of [N, channels, size, size] with a square kernel."""

    name: str
    channels: int
    size: int
    kernel: int
    stride: int
    batch: Tuple[int, int]  # (CPU, CUDA)

    def pooled(self) -> int:
        return (self.size - self.kernel) // self.stride + 1


@dataclass(frozen=True)
class ConvCase:
    """A forward Conv2d of [N, in_channels, size, size]; its reverse is the benchmarked deconv."""

    name: str
    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    padding: int
    size: int
    batch: Tuple[int, int]  # (CPU, CUDA)

    def out_size(self) -> int:
        return (self.size + 2 * self.padding - self.kernel) // self.stride + 1


@dataclass(frozen=True)
class FusedCase:
    """conv -> relu -> max pool: the fused op reverses the three."""

    name: str
    conv: ConvCase
    pool_kernel: int
    pool_stride: int
    batch: Tuple[int, int]  # (CPU, CUDA)

    def pool(self) -> PoolCase:
        return PoolCase(self.name, self.conv.out_channels, self.conv.out_size(), self.pool_kernel, self.pool_stride,
                        self.batch)


POOLS = [
    PoolCase("vgg16 pool1 64x224x224 k2s2", 64, 224, 2, 2, batch=(2, 64)),
    PoolCase("vgg16 pool4 512x28x28 k2s2", 512, 28, 2, 2, batch=(4, 64)),
    PoolCase("alexnet pool1 64x55x55 k3s2", 64, 55, 3, 2, batch=(8, 64)),
    PoolCase("alexnet pool5 256x13x13 k3s2", 256, 13, 3, 2, batch=(16, 64)),
]

CONV1_2 = ConvCase("vgg16 conv1_2 64>64 3x3 @224", 64, 64, 3, 1, 1, 224, batch=(1, 64))
CONV4_3 = ConvCase("vgg16 conv4_3 512>512 3x3 @28", 512, 512, 3, 1, 1, 28, batch=(2, 64))
ALEX_CONV1 = ConvCase("alexnet conv1 3>64 11x11 s4 @224", 3, 64, 11, 4, 2, 224, batch=(4, 64))
ALEX_CONV5 = ConvCase("alexnet conv5 256>256 3x3 @13", 256, 256, 3, 1, 1, 13, batch=(16, 64))
DECONVS = [CONV1_2, CONV4_3, ALEX_CONV1, ALEX_CONV5]

FUSED = [
    FusedCase("vgg16 conv1_2+pool1 @224", CONV1_2, 2, 2, batch=(1, 64)),
    FusedCase("vgg16 conv4_3+pool4 @28", CONV4_3, 2, 2, batch=(2, 64)),
    FusedCase("alexnet conv1+pool1 @224", ALEX_CONV1, 3, 2, batch=(4, 64)),
    FusedCase("alexnet conv5+pool5 @13", ALEX_CONV5, 3, 2, batch=(16, 64)),
]


def _batch(case, device: str) -> int:
    return case.batch[1 if device.startswith("cuda") else 0]


def _label(case, device: str) -> str:
    return f"{case.name} N={_batch(case, device)}"


def _ids(cases):
    return [case.name.replace(" ", "-") for case in cases]


def _post_relu(shape, device: str) -> torch.Tensor:
    """Activations as a max pool sees them: rectified, about half of them exactly 0 (so windows of
    zeros tie, and the first-maximum rule matters as in a real network)."""
    return torch.relu(torch.randn(shape, device=device))


def _weight(conv: ConvCase, device: str) -> torch.Tensor:
    """He-initialised forward weights [C_out, C_in, k, k]."""
    fan_in = conv.in_channels * conv.kernel * conv.kernel
    return torch.randn(conv.out_channels, conv.in_channels, conv.kernel, conv.kernel, device=device) * (2 / fan_in) ** 0.5


def _benchmark(benchmark, bench_results, device: str, impl: str, op: str, case, build, call, check,
               bytes: int, flops: int) -> None:
    """Build the case's inputs and reference result (once per case), check the native result
    against it, then time ``call(ops, inputs)`` and record it."""
    with full_float32():
        inputs, expected = _CASE.get((op, case.name, device), build)
        ops = IMPLEMENTATIONS[impl]
        if impl == "native":
            check(call(ops, inputs), expected)
    benchmark.group = f"{op} {_label(case, device)} {device}"  # pytest-benchmark's table: one group per case
    run_timed(benchmark, device, lambda: call(ops, inputs))
    bench_results.record(benchmark, device=device, op=op, case=_label(case, device), impl=impl, bytes=bytes,
                         flops=flops)


# --------------------------------------------------------------------------------------------- #
# max_pool2d_switches
# --------------------------------------------------------------------------------------------- #

@pytest.mark.parametrize("impl", IMPLS)  # the innermost loop: one case's implementations run back to back
@pytest.mark.parametrize("case", POOLS, ids=_ids(POOLS))
@pytest.mark.parametrize("device", DEVICES)
def test_max_pool2d_switches(benchmark, bench_results, device, case, impl):
    """max_pool2d with uint8 switches, [N, C, H, W] -> two [N, C, H', W'] tensors. Memory-bound:
    floor = (4 |x| + 5 |y|) bytes / bandwidth. The reference is PyTorch's max_pool2d_with_indices
    (int64 indices, 8 bytes each) plus the conversion of its indices into switches."""
    n, p = _batch(case, device), case.pooled()

    def build():
        x = _post_relu((n, case.channels, case.size, case.size), device)
        return x, reference.max_pool2d_switches(x, case.kernel, case.stride)

    def call(ops, x):
        return ops.max_pool2d_switches(x, case.kernel, case.stride)

    def check(actual, expected):
        assert torch.equal(actual[0], expected[0]), f"{case.name}: pooled values differ from the reference"
        assert torch.equal(actual[1], expected[1]), f"{case.name}: switches differ from the reference"

    inputs = n * case.channels * case.size * case.size
    outputs = n * case.channels * p * p
    _benchmark(benchmark, bench_results, device, impl, "max_pool2d_switches", case, build, call, check,
               bytes=FLOAT32 * inputs + (FLOAT32 + 1) * outputs, flops=outputs * case.kernel * case.kernel)


# --------------------------------------------------------------------------------------------- #
# unpool_relu
# --------------------------------------------------------------------------------------------- #

@pytest.mark.parametrize("impl", IMPLS)  # the innermost loop: one case's implementations run back to back
@pytest.mark.parametrize("case", POOLS, ids=_ids(POOLS))
@pytest.mark.parametrize("device", DEVICES)
def test_unpool_relu(benchmark, bench_results, device, case, impl):
    """relu of the summed switch unpooling, [N, C, H', W'] gradient + switches -> [N, C, H, W].
    Memory-bound: floor = (5 |g| + 4 |out|) bytes / bandwidth. The reference scatter-adds in
    float64 into a zeroed map, then rectifies and casts."""
    n, p = _batch(case, device), case.pooled()
    size = (case.size, case.size)

    def build():
        _, switches = reference.max_pool2d_switches(_post_relu((n, case.channels, case.size, case.size), device),
                                                    case.kernel, case.stride)
        grad = torch.randn(switches.shape, device=device)
        return (grad, switches), reference.unpool_relu(grad, switches, size, case.kernel, case.stride)

    def call(ops, inputs):
        return ops.unpool_relu(*inputs, size, case.kernel, case.stride)

    def check(actual, expected):
        assert_matches(actual, expected, tolerance(device, cpu=1e-6, cuda=1e-6), case.name)

    pooled = n * case.channels * p * p
    unpooled = n * case.channels * case.size * case.size
    _benchmark(benchmark, bench_results, device, impl, "unpool_relu", case, build, call, check,
               bytes=(FLOAT32 + 1) * pooled + FLOAT32 * unpooled, flops=pooled + unpooled)


# --------------------------------------------------------------------------------------------- #
# deconv2d
# --------------------------------------------------------------------------------------------- #

def _deconv_flops(conv: ConvCase, n: int) -> int:
    out = conv.out_size()
    return 2 * n * conv.out_channels * conv.in_channels * conv.kernel * conv.kernel * out * out


@pytest.mark.parametrize("impl", IMPLS)  # the innermost loop: one case's implementations run back to back
@pytest.mark.parametrize("case", DECONVS, ids=_ids(DECONVS))
@pytest.mark.parametrize("device", DEVICES)
def test_deconv2d(benchmark, bench_results, device, case, impl):
    """The transposed conv with the forward conv's weight: [N, C_out, H', W'] -> [N, C_in, H, W].
    F = 2 N C_out C_in kh kw H' W'; floor = F / peak (or the bytes of input, weight and output /
    bandwidth for the thin AlexNet conv1 reverse, 3 output channels). The reference is
    F.conv_transpose2d (cuDNN on CUDA, oneDNN on the CPU)."""
    n, out = _batch(case, device), case.out_size()
    size = (case.size, case.size)

    def build():
        grad = torch.randn(n, case.out_channels, out, out, device=device)
        weight = _weight(case, device)
        return (grad, weight), reference.deconv2d(grad, weight, case.stride, case.padding, output_size=size)

    def call(ops, inputs):
        return ops.deconv2d(*inputs, case.stride, case.padding, output_size=size)

    def check(actual, expected):
        assert_matches(actual, expected, tolerance(device), case.name)

    elements = n * case.out_channels * out * out + case.out_channels * case.in_channels * case.kernel ** 2 \
        + n * case.in_channels * case.size * case.size
    _benchmark(benchmark, bench_results, device, impl, "deconv2d", case, build, call, check,
               bytes=FLOAT32 * elements, flops=_deconv_flops(case, n))


# --------------------------------------------------------------------------------------------- #
# unpool_relu_deconv2d
# --------------------------------------------------------------------------------------------- #

@pytest.mark.parametrize("impl", IMPLS)  # the innermost loop: one case's implementations run back to back
@pytest.mark.parametrize("case", FUSED, ids=_ids(FUSED))
@pytest.mark.parametrize("device", DEVICES)
def test_unpool_relu_deconv2d(benchmark, bench_results, device, case, impl):
    """The reverse of conv -> relu -> max pool in one op: pooled gradient [N, C_out, H'', W''] +
    switches -> [N, C_in, H, W]. Dense definition F = unpool_relu's + 2 N C_out C_in kh kw H' W'
    (H' = the conv's output, the pool's input); the native kernel needs only 1 / (pool area) of
    those multiply-adds (floor: F / (pool area) / peak, or the bytes of gradient, switches, weight
    and output / bandwidth). The reference runs unpool_relu, writes the unpooled map, then
    F.conv_transpose2d on it."""
    conv, pool = case.conv, case.pool()
    n, mid, p = _batch(case, device), conv.out_size(), pool.pooled()
    size, mid_size = (conv.size, conv.size), (mid, mid)
    args = dict(kernel_size=pool.kernel, stride=pool.stride, conv_stride=conv.stride, conv_padding=conv.padding,
                output_size=size)

    def build():
        _, switches = reference.max_pool2d_switches(_post_relu((n, conv.out_channels, mid, mid), device),
                                                    pool.kernel, pool.stride)
        grad = torch.randn(switches.shape, device=device)
        weight = _weight(conv, device)
        expected = reference.unpool_relu_deconv2d(grad, switches, weight, mid_size, **args)
        return (grad, switches, weight), expected

    def call(ops, inputs):
        grad, switches, weight = inputs
        return ops.unpool_relu_deconv2d(grad, switches, weight, mid_size, **args)

    def check(actual, expected):
        assert_matches(actual, expected, tolerance(device), case.name)

    pooled = n * conv.out_channels * p * p
    unpooled = n * conv.out_channels * mid * mid
    elements = pooled + conv.out_channels * conv.in_channels * conv.kernel ** 2 + n * conv.in_channels * conv.size ** 2
    _benchmark(benchmark, bench_results, device, impl, "unpool_relu_deconv2d", case, build, call, check,
               bytes=FLOAT32 * elements + pooled, flops=pooled + unpooled + _deconv_flops(conv, n))
