"""The CUDA kernels' arithmetic, checked on the CPU.

The CUDA kernels are grid-stride loops over per-element functions (csrc/cuda/elements.cuh), which
are ``__host__ __device__``. tests/cuda_emulation.cpp runs those same functions on the host, one
call per work item, exactly where the .cu file launches its kernels; this module compiles it with
the host compiler and compares the results with the reference and with PyTorch's autograd on the
cases of test_ops.py, as test_ops.py does for the real ops. So the CUDA kernels' indexing,
summation order and rounding are tested on every machine, GPU or not; what runs only on a GPU (the
launches themselves) is covered by test_ops.py's CUDA half where one is present, and by the tests
at the end of this module, which compare the GPU's results with the emulation's bit for bit.
"""
from __future__ import annotations

import os
import shutil

import pytest
import torch

from conftest import CUDA_AVAILABLE, FLOAT_DTYPES, assert_bitwise_equal, dtype_id
from deconvcuda import reference
from test_ops import (FUSED_CASES, POOL_CASES, _ids, check_max_pool2d_switches, check_unpool_relu,
                      check_unpool_relu_deconv2d, fused_args, fused_inputs, pool_inputs)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
NEEDS_COMPILER = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                    reason="no host C++ compiler to build tests/cuda_emulation.cpp")
pytestmark = NEEDS_COMPILER


@pytest.fixture(scope="module")
def emulated():
    """torch.ops.deconvcuda_cuda_emulation, built once (cached in build/cuda_emulation between runs)."""
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        pytest.skip("ninja is not installed: torch.utils.cpp_extension.load needs it to build tests/cuda_emulation.cpp")
    build_directory = os.path.join(ROOT, "build", "cuda_emulation")
    os.makedirs(build_directory, exist_ok=True)
    cpp_extension.load(
        name="deconvcuda_cuda_emulation", sources=[os.path.join(HERE, "cuda_emulation.cpp")],
        extra_include_paths=[os.path.join(ROOT, "csrc")], extra_cflags=["-O2", "-fopenmp"],
        extra_ldflags=["-fopenmp"], build_directory=build_directory, is_python_module=False, verbose=False)
    return torch.ops.deconvcuda_cuda_emulation


# The same checks as test_ops.py's (against max_pool2d_with_indices, the reference and autograd),
# with the emulated CUDA element functions as the op under test.

@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", POOL_CASES, ids=_ids(POOL_CASES))
def test_max_pool2d_switches_element(emulated, dtype, case):
    check_max_pool2d_switches(emulated.max_pool2d_switches, "cpu", dtype, case)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", POOL_CASES, ids=_ids(POOL_CASES))
def test_unpool_relu_element(emulated, dtype, case):
    check_unpool_relu(emulated.unpool_relu, "cpu", dtype, case)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", FUSED_CASES, ids=_ids(FUSED_CASES))
def test_unpool_relu_deconv2d_element(emulated, dtype, case):
    check_unpool_relu_deconv2d(emulated.unpool_relu_deconv2d, "cpu", dtype, case)


def test_arbitrary_switches_stay_inside(emulated):
    # Switches that name no tap (>= kernel taps) or a tap in the padding must route nothing and
    # read nothing outside the tensors: the reference drops them too.
    torch.manual_seed(0)
    grad = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    switches = torch.randint(0, 256, grad.shape, dtype=torch.uint8)
    weight = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    pool = ((3, 3), (2, 2), (1, 1), (1, 1))
    unpooled = emulated.unpool_relu(grad, switches, (10, 12), *pool)
    torch.testing.assert_close(unpooled, reference.unpool_relu(grad, switches, (10, 12), *pool))
    fused_args_ = ((10, 12), *pool, (1, 1), (1, 1), (1, 1), 1, (10, 12))
    torch.testing.assert_close(emulated.unpool_relu_deconv2d(grad, switches, weight, *fused_args_),
                               reference.unpool_relu_deconv2d(grad, switches, weight, *fused_args_))


def test_fused_multiply_add_is_explicit(emulated):
    """The fused gather accumulates with one rounding per term, as nvcc compiles it (it contracts
    `acc += w * v` into an FMA): -1 * 1 + (1 + 2^-12)^2 is 2^-11 + 2^-24 exactly with fma, and 2^-11
    where the product is rounded first (a tie, to even), as an uncontracted host build would."""
    eps = 2.0 ** -12
    grad = torch.tensor([1.0, 1.0 + eps]).view(1, 2, 1, 1)
    weight = torch.tensor([-1.0, 1.0 + eps]).view(2, 1, 1, 1)
    switches = torch.zeros(1, 2, 1, 1, dtype=torch.uint8)
    ones = (1, 1)
    result = emulated.unpool_relu_deconv2d(grad, switches, weight, ones, ones, ones, (0, 0), ones, ones, (0, 0), ones,
                                           1, ones, rule="gradient")
    assert result.item() == 2.0 ** -11 + 2.0 ** -24


LAUNCH_CASES = FUSED_CASES[:5] + FUSED_CASES[5::9]

# (out_channels_per_chunk, with 32-bit indices): the staging budget's chunk (0), the global-memory
# kernel (-1), and chunks of 1 and 3 output channels, so that groups of 2 to 8 output channels are
# split into several chunks, a last one shorter (8 = 3 + 3 + 2).
CHUNK_VARIANTS = (0, -1, 1, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("case", LAUNCH_CASES, ids=_ids(LAUNCH_CASES))
def test_launch_variants_agree_bit_for_bit(emulated, dtype, case):
    """Whatever the launch picks (32, 16, 4 or 1 input channels per thread; 32- or 64-bit indices;
    taps from global memory, or staged in shared memory in chunks of any size), each output element
    is summed in the same order: the results are the same bits. The staged variants run the staged
    kernel's blocks on the host with a NaN-filled staging buffer between NaN guards, so a read of a
    tap that the block did not stage would also show here, as NaN."""
    pre_pool, grad, weight, pool_input = fused_inputs(case, dtype, "cpu", "launch_variants")
    _, switches = reference.max_pool2d_switches(pre_pool, *case.pool.args(), ceil_mode=case.pool.ceil_mode)
    args = fused_args(case, pool_input)
    default = emulated.unpool_relu_deconv2d(grad, switches, weight, *args, rule="guided", positive=grad > 0)
    for channels in (1, 4, 16, 32):
        for index64, chunks in ((False, CHUNK_VARIANTS), (True, (0, -1))):
            for chunk in chunks:
                variant = emulated.unpool_relu_deconv2d_variant(grad, switches, weight, *args, "guided", grad > 0,
                                                                channels, index64, chunk)
                assert_bitwise_equal(variant, default, f"{channels} channels per thread, index64={index64}, "
                                     f"out_channels_per_chunk={chunk}")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", POOL_CASES[:14] + POOL_CASES[14::6], ids=_ids(POOL_CASES[:14] + POOL_CASES[14::6]))
def test_32_and_64_bit_indices_agree_bit_for_bit(emulated, dtype, case):
    """The elements' 32-bit index paths (what the GPU runs for every tensor under 2^31 elements)
    against their 64-bit twins: max_pool2d_switches and unpool_relu under every rule, and the fused
    op's route pass and gather, the same bits."""
    x, grad = pool_inputs(case, dtype, "cpu", "index_paths")
    p = case.pool
    out32, switches32 = emulated.max_pool2d_switches_indexed(x, *p.args(), p.ceil_mode, False)
    out64, switches64 = emulated.max_pool2d_switches_indexed(x, *p.args(), p.ceil_mode, True)
    assert_bitwise_equal(out32, out64, "max_pool2d_switches output, 32 vs 64-bit indices")
    assert_bitwise_equal(switches32, switches64, "max_pool2d_switches switches, 32 vs 64-bit indices")
    positive = out32 > 0
    for rule, mask in (("deconvnet", None), ("guided", positive), ("gradient", positive), ("gradient", None)):
        unpooled32 = emulated.unpool_relu_indexed(grad, switches32, case.size, *p.args(), rule, mask, False)
        unpooled64 = emulated.unpool_relu_indexed(grad, switches32, case.size, *p.args(), rule, mask, True)
        assert_bitwise_equal(unpooled32, unpooled64, f"unpool_relu rule={rule}, 32 vs 64-bit indices")
    weight = torch.randn(case.c, 3, 3, 3, generator=torch.Generator().manual_seed(1)).to(dtype)
    fused = (case.size, *p.args(), (1, 1), (1, 1), (1, 1), 1, case.size)
    for rule, mask in (("deconvnet", None), ("guided", positive), ("gradient", positive)):
        fused32 = emulated.unpool_relu_deconv2d_variant(grad, switches32, weight, *fused, rule, mask, 0, False, 0)
        fused64 = emulated.unpool_relu_deconv2d_variant(grad, switches32, weight, *fused, rule, mask, 0, True, 0)
        assert_bitwise_equal(fused32, fused64, f"unpool_relu_deconv2d rule={rule}, 32 vs 64-bit indices")


def test_fused_index32_needs_int16_origins(emulated):
    """The fused op runs with 32-bit indices where every tensor has fewer than 2^31 elements and every
    origin (position * conv_stride - conv_padding) and filter span fits int16."""
    index32 = emulated.fused_index32
    ones = (1, 1)
    assert index32(10**6, 10**4, 10**6, 224, 224, (3, 3), ones, ones, ones)
    assert index32(10**6, 10**4, 10**6, 1, 32768, (1, 3), ones, (0, 0), ones)          # origins up to 32767
    assert not index32(10**6, 10**4, 10**6, 1, 32769, (1, 3), ones, (0, 0), ones)      # 32768
    assert index32(10**6, 10**4, 10**6, 8193, 8, (3, 3), (4, 1), ones, ones)           # 8192 * 4 - 1
    assert not index32(10**6, 10**4, 10**6, 8193, 8, (3, 3), (4, 1), (0, 0), ones)     # 8192 * 4
    assert not index32(10**6, 10**4, 10**6, 8, 8, (3, 3), ones, ones, (16384, 1))      # span 32768
    assert not index32(2**31, 10**4, 10**6, 8, 8, (3, 3), ones, ones, ones)            # 2^31 elements
    assert not index32(10**6, 10**4, 2**31, 8, 8, (3, 3), ones, ones, ones)


def test_origins_at_the_int16_limit(emulated):
    """A row 32768 positions long under a 1 x 3 conv: origins reach 32767, the largest int16, and
    pixels lie up to 32769 away from the "nothing routed" origin (-32768): the 32-bit path still
    gives the 64-bit path's bits and the reference's values; one position longer runs 64-bit."""
    gen = torch.Generator().manual_seed(11)
    for width in (32768, 32770):
        pre_pool = torch.randn(1, 2, 1, width, generator=gen, dtype=torch.float64)
        grad = torch.randn(1, 2, 1, width // 2, generator=gen, dtype=torch.float64)
        weight = torch.randn(2, 3, 1, 3, generator=gen, dtype=torch.float64)
        _, switches = reference.max_pool2d_switches(pre_pool, (1, 2), (1, 2))
        args = ((1, width), (1, 2), (1, 2), (0, 0), (1, 1), (1, 1), (0, 0), (1, 1), 1, (1, width + 2))
        assert emulated.fused_index32(grad.numel(), weight.numel(), 3 * (width + 2), 1, width, (1, 3), (1, 1), (0, 0),
                                      (1, 1)) == (width == 32768)
        result = emulated.unpool_relu_deconv2d(grad, switches, weight, *args)
        wide = emulated.unpool_relu_deconv2d_variant(grad, switches, weight, *args, "deconvnet", None, 0, True, 0)
        assert_bitwise_equal(result, wide, f"width {width}: default vs 64-bit indices")
        torch.testing.assert_close(result, reference.unpool_relu_deconv2d(grad, switches, weight, *args))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_staged_blocks_span_images_and_rows(emulated, dtype):
    """A staged block's 256 items run on across output rows and images (13 x 13 pixels, 3 images:
    507 items, two blocks, the second part empty), with groups and a last, partial channel tile
    (6 input channels per group, 4 per thread): every rule, against the reference and bit for bit
    against the global-memory kernel."""
    gen = torch.Generator().manual_seed(7)
    grad = torch.randn(3, 10, 6, 6, generator=gen).to(dtype)
    pre_pool = torch.randn(3, 10, 13, 13, generator=gen).to(dtype)
    weight = torch.randn(10, 6, 3, 3, generator=gen).to(dtype)
    _, switches = reference.max_pool2d_switches(pre_pool, (3, 3), (2, 2))
    args = ((13, 13), (3, 3), (2, 2), (0, 0), (1, 1), (1, 1), (1, 1), (1, 1), 2, (13, 13))
    for rule, positive in (("deconvnet", None), ("guided", grad > 0), ("gradient", grad > 0)):
        expected = reference.unpool_relu_deconv2d(grad.double(), switches, weight.double(), *args, rule=rule,
                                                  positive=positive)
        global_memory = emulated.unpool_relu_deconv2d_variant(grad, switches, weight, *args, rule, positive, 4, False,
                                                              -1)
        for chunk in (0, 2):
            staged = emulated.unpool_relu_deconv2d_variant(grad, switches, weight, *args, rule, positive, 4, False,
                                                           chunk)
            assert_bitwise_equal(staged, global_memory, f"rule={rule}, out_channels_per_chunk={chunk}")
        tolerance = {torch.float16: 2e-2, torch.bfloat16: 1e-1}.get(dtype, 1e-5)
        torch.testing.assert_close(global_memory.double(), expected, rtol=tolerance, atol=tolerance)


STAGED_BUDGET = 24 * 1024  # elements.cuh: kStagedFilterBytes
EMULATED_RESIDENT_THREADS = 132 * 3 * 256  # tests/cuda_emulation.cpp: an H100's staged kernels


def staged_tap_stride(channels, element_size):
    """elements.cuh's staged layout: a filter position's channels consecutive, padded by 16 bytes
    where they fill an even number of 16-byte units (so that neighbouring positions use other banks)."""
    width = channels * element_size
    return channels if width % 16 or (width // 16) % 2 else channels + 16 // element_size


def test_launch_choice(emulated):
    """Which kernel a shape gets (choose_fused_launch): the largest tile of channels per thread whose
    staged chunk fits the budget and that leaves enough work items for the GPU's resident threads, the
    staged kernel with the fewest chunks that fit the budget; one channel per thread where no tile
    leaves enough items; the global-memory kernel for 64-bit indices and for filters too large to
    stage."""
    launch = emulated.fused_launch
    # VGG16's block 5 at batch 64 (512 -> 512 channels, 3 x 3, 14 x 14): 32 channels per thread,
    # 64 * 14 * 14 * 16 = 200,704 items >= 101,376 resident threads
    for element_size, chunk in ((4, 18), (2, 32), (8, 10)):
        channels, out_channels_per_chunk = launch(64, 1, 512, 512, 9, element_size, 14, 14, True)
        assert (channels, out_channels_per_chunk) == (32, chunk)
        per_out_channel = 9 * staged_tap_stride(32, element_size) * element_size
        assert out_channels_per_chunk * per_out_channel <= STAGED_BUDGET
        fits = STAGED_BUDGET // per_out_channel
        assert -(-512 // out_channels_per_chunk) == -(-512 // fits)  # as few chunks as the budget allows
    # at batch 4, 16 channels per thread leave 25,088 items, too few; 4 leave 100,352, still too few
    assert launch(4, 1, 512, 512, 9, 4, 14, 14, True)[0] == 1
    assert launch(8, 1, 512, 512, 9, 4, 14, 14, True)[0] == 4                 # 8 * 196 * 128 = 200,704
    assert launch(64, 1, 512, 512, 9, 4, 14, 14, False) == [1, 0]              # 64-bit indices: global memory
    assert launch(64, 1, 512, 512, 32 * 32, 4, 14, 14, True) == [4, 1]         # 4 x 32 x 32 floats: 16 KiB
    assert launch(64, 1, 512, 512, 64 * 64, 4, 14, 14, True) == [1, 1]         # 16 KiB a channel
    assert launch(64, 1, 512, 512, 64 * 64, 8, 14, 14, True) == [1, 0]         # 32 KiB: global memory
    assert launch(1, 1, 3, 4, 9, 4, 5, 5, True) == [1, 4]                      # a small call: 1 channel, one chunk
    # a first layer (3 input channels): tiles of 4, never more than the next power of two above 3
    assert launch(2304, 1, 3, 64, 121, 4, 163, 163, True)[0] == 4


def test_filters_too_large_to_stage(emulated):
    """A 57 x 57 float64 filter (25 KiB per output and input channel) is read from global memory
    (the default launch) and gives the same bits as the staged kernel forced to chunks of one."""
    gen = torch.Generator().manual_seed(3)
    grad = torch.randn(2, 3, 2, 2, generator=gen, dtype=torch.float64)
    pre_pool = torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64)
    weight = torch.randn(3, 2, 57, 57, generator=gen, dtype=torch.float64)
    _, switches = reference.max_pool2d_switches(pre_pool, (2, 2), (2, 2))
    args = ((4, 4), (2, 2), (2, 2), (0, 0), (1, 1), (1, 1), (28, 28), (1, 1), 1, (4, 4))
    assert emulated.fused_launch(2, 1, 2, 3, 57 * 57, 8, 4, 4, True) == [1, 0]
    result = emulated.unpool_relu_deconv2d(grad, switches, weight, *args)
    torch.testing.assert_close(result, reference.unpool_relu_deconv2d(grad, switches, weight, *args))
    staged = emulated.unpool_relu_deconv2d_variant(grad, switches, weight, *args, "deconvnet", None, 1, False, 1)
    assert_bitwise_equal(staged, result, "staged in chunks of one output channel")


def test_staged_kernel_needs_32_bit_indices(emulated):
    case = FUSED_CASES[0]
    _, grad, weight, pool_input = fused_inputs(case, torch.float32, "cpu", "launch_variants")
    switches = torch.zeros(grad.shape, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="unpool_relu_deconv2d_variant: the staged kernel has 32-bit indices"):
        emulated.unpool_relu_deconv2d_variant(grad, switches, weight, *fused_args(case, pool_input), "deconvnet", None,
                                              1, True, 2)


# --------------------------------------------------------------------------------------------- #
# On a GPU: the kernels against their emulation, bit for bit
# --------------------------------------------------------------------------------------------- #

NEEDS_CUDA = pytest.mark.skipif(not CUDA_AVAILABLE,
                                reason="CUDA not available: the CUDA kernels are compiled but not run here")


def canonical_nan(t: torch.Tensor) -> torch.Tensor:
    """``t`` on the CPU with every NaN replaced by one NaN: the GPU's conversions write other NaN bits
    (0x7FFF for bfloat16 and float16) than the host's (0x7FC0, 0x7E00), and which NaN is not part of
    the kernels' arithmetic."""
    t = t.cpu()
    return torch.where(torch.isnan(t), torch.full_like(t, float("nan")), t) if t.is_floating_point() else t


def assert_same_bits_but_nan(actual: torch.Tensor, expected: torch.Tensor, msg: str) -> None:
    """Bit for bit, NaN where the other has NaN (any NaN)."""
    assert_bitwise_equal(canonical_nan(actual), canonical_nan(expected), msg)


def test_canonical_nan_makes_nan_bits_equal():
    device_like = torch.tensor([0x7FFF, 0x3F80], dtype=torch.int16).view(torch.bfloat16)  # NaN, 1.0
    host_like = torch.tensor([0x7FC0, 0x3F80], dtype=torch.int16).view(torch.bfloat16)
    with pytest.raises(AssertionError):
        assert_bitwise_equal(device_like, host_like, "NaN bits differ")
    assert_same_bits_but_nan(device_like, host_like, "NaN bits canonicalised")
    with pytest.raises(AssertionError):  # NaN against a number still differs
        assert_same_bits_but_nan(device_like, torch.ones(2, dtype=torch.bfloat16), "NaN vs 1.0")


def _assert_device_matches_emulation(emulated, grad, switches, weight, args, msg):
    """ops.unpool_relu_deconv2d on the GPU against the emulation on the CPU, every rule: the same
    bits (the emulation runs the kernels' own element code, with the same explicit fma)."""
    from deconvcuda import ops

    for rule, positive in (("deconvnet", None), ("guided", grad > 0), ("gradient", grad > 0)):
        expected = emulated.unpool_relu_deconv2d(grad, switches, weight, *args, rule=rule, positive=positive)
        on_device = ops.unpool_relu_deconv2d(grad.cuda(), switches.cuda(), weight.cuda(), *args, rule=rule,
                                             positive=None if positive is None else positive.cuda())
        assert_same_bits_but_nan(on_device, expected, f"{msg}, rule={rule}")


@pytest.mark.cuda
@NEEDS_CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("case", LAUNCH_CASES, ids=_ids(LAUNCH_CASES))
def test_device_matches_its_emulation(emulated, dtype, case):
    from deconvcuda import ops

    pre_pool, grad, weight, pool_input = fused_inputs(case, dtype, "cpu", "device_vs_emulation")
    switches = emulated.max_pool2d_switches(pre_pool, *case.pool.args(), case.pool.ceil_mode)[1]
    device_switches = ops.max_pool2d_switches(pre_pool.cuda(), *case.pool.args(), ceil_mode=case.pool.ceil_mode)[1]
    assert_bitwise_equal(device_switches.cpu(), switches, "max_pool2d_switches")
    device_pooled = ops.max_pool2d_switches(pre_pool.cuda(), *case.pool.args(), ceil_mode=case.pool.ceil_mode)[0]
    pooled = emulated.max_pool2d_switches(pre_pool, *case.pool.args(), case.pool.ceil_mode)[0]
    assert_same_bits_but_nan(device_pooled, pooled, "max_pool2d_switches output")
    _assert_device_matches_emulation(emulated, grad, switches, weight, fused_args(case, pool_input), case.name)
    unpooled = ops.unpool_relu(grad.cuda(), switches.cuda(), pool_input, *case.pool.args())
    assert_same_bits_but_nan(unpooled, emulated.unpool_relu(grad, switches, pool_input, *case.pool.args()),
                             "unpool_relu")


def _multi_chunk_inputs(kernel, out_channels, seed):
    """float64, a 2 x 2 pool over 8 x 8, 3 input channels: an 11 x 11 filter stages 22 output
    channels a chunk (968 bytes each), so 64 of them take three chunks; a 57 x 57 one does not fit."""
    gen = torch.Generator().manual_seed(seed)
    grad = torch.randn(2, out_channels, 4, 4, generator=gen, dtype=torch.float64)
    pre_pool = torch.randn(2, out_channels, 8, 8, generator=gen, dtype=torch.float64)
    weight = torch.randn(out_channels, 3, kernel, kernel, generator=gen, dtype=torch.float64)
    _, switches = reference.max_pool2d_switches(pre_pool, (2, 2), (2, 2))
    pad = kernel // 2
    args = ((8, 8), (2, 2), (2, 2), (0, 0), (1, 1), (1, 1), (pad, pad), (1, 1), 1, (8, 8))
    return grad, switches, weight, args


def test_multi_chunk_launch(emulated):
    assert emulated.fused_launch(2, 1, 3, 64, 11 * 11, 8, 8, 8, True) == [1, 22]
    assert emulated.fused_launch(2, 1, 3, 4, 57 * 57, 8, 8, 8, True) == [1, 0]
    grad, switches, weight, args = _multi_chunk_inputs(11, 64, 5)
    torch.testing.assert_close(emulated.unpool_relu_deconv2d(grad, switches, weight, *args),
                               reference.unpool_relu_deconv2d(grad, switches, weight, *args))


@pytest.mark.cuda
@NEEDS_CUDA
@pytest.mark.parametrize("kernel, out_channels", [(11, 64), (57, 4)], ids=["three_chunks", "global_memory"])
def test_device_staged_chunks_match_emulation(emulated, kernel, out_channels):
    """The staged kernel over several chunks (barriers between them), and the global-memory kernel
    where a filter is too large to stage, on the GPU: the emulation's bits."""
    grad, switches, weight, args = _multi_chunk_inputs(kernel, out_channels, 6)
    _assert_device_matches_emulation(emulated, grad, switches, weight, args, f"{kernel} x {kernel} filters")


# --------------------------------------------------------------------------------------------- #
# The build's CUDA switch (setup.py)
# --------------------------------------------------------------------------------------------- #

def _setup_py(env_changes, tmp_path):
    """`python setup.py --name` (which decides what to build, and builds nothing) with nvcc hidden:
    CUDA_HOME points at an empty folder and no PATH entry holds an nvcc."""
    import subprocess
    import sys

    env = dict(os.environ, CUDA_HOME=str(tmp_path / "no-cuda-toolkit"))
    env["PATH"] = os.pathsep.join(d for d in env.get("PATH", "").split(os.pathsep)
                                  if d and not os.path.exists(os.path.join(d, "nvcc")))
    env.pop("DECONVCUDA_CPU_ONLY", None)
    env.pop("DECONVCUDA_FORCE_CUDA", None)
    env.update(env_changes)
    return subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def test_force_cuda_makes_a_missing_nvcc_a_build_error(tmp_path):
    forced = _setup_py({"DECONVCUDA_FORCE_CUDA": "1"}, tmp_path)
    assert forced.returncode != 0, forced.stdout
    assert "DECONVCUDA_FORCE_CUDA=1 but nvcc was not found" in forced.stderr
    # without the switch the same machine builds the CPU kernels only, and says why
    plain = _setup_py({}, tmp_path)
    assert plain.returncode == 0, plain.stderr
    assert "building the CPU kernels only (nvcc was not found)" in plain.stdout
