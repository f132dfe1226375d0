"""The CUDA kernels' arithmetic, checked on the CPU.

The CUDA kernels are grid-stride loops over per-element functions (csrc/cuda/elements.cuh), which
are ``__host__ __device__``. tests/cuda_emulation.cpp runs those same functions on the host, one
call per work item, exactly where the .cu file launches its kernels; this module compiles it with
the host compiler and compares the results with the reference and with PyTorch's autograd on the
cases of test_ops.py, as test_ops.py does for the real ops. So the CUDA kernels' indexing,
summation order and rounding are tested on every machine, GPU or not; what runs only on a GPU (the
launches themselves) is covered by test_ops.py's CUDA half where one is present.
"""
from __future__ import annotations

import os
import shutil

import pytest
import torch

from conftest import FLOAT_DTYPES, assert_bitwise_equal, assert_close_to_oracle, dtype_id
from deconvcuda import reference
from test_ops import (FUSED_CASES, POOL_CASES, _ids, conv_input_gradient, fused_args, fused_inputs, pool_inputs,
                      pool_with_autograd, switches_from_indices, unpool_relu_truth)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
NEEDS_COMPILER = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                    reason="no host C++ compiler to build tests/cuda_emulation.cpp")
pytestmark = NEEDS_COMPILER


@pytest.fixture(scope="module")
def emulated():
    """torch.ops.deconvcuda_cuda_emulation, built once (cached in build/cuda_emulation between runs)."""
    from torch.utils import cpp_extension

    build_directory = os.path.join(ROOT, "build", "cuda_emulation")
    os.makedirs(build_directory, exist_ok=True)
    cpp_extension.load(
        name="deconvcuda_cuda_emulation", sources=[os.path.join(HERE, "cuda_emulation.cpp")],
        extra_include_paths=[os.path.join(ROOT, "csrc")], extra_cflags=["-O2", "-fopenmp"],
        extra_ldflags=["-fopenmp"], build_directory=build_directory, is_python_module=False, verbose=False)
    return torch.ops.deconvcuda_cuda_emulation


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", POOL_CASES, ids=_ids(POOL_CASES))
def test_max_pool2d_switches_element(emulated, dtype, case):
    x, _ = pool_inputs(case, dtype, "cpu", "max_pool2d_switches")
    p = case.pool
    out, switches = emulated.max_pool2d_switches(x, *p.args(), p.ceil_mode)
    torch_out, torch_indices = torch.nn.functional.max_pool2d_with_indices(x, *p.args(), ceil_mode=p.ceil_mode)
    assert_bitwise_equal(out, torch_out, "output vs max_pool2d_with_indices")
    assert_bitwise_equal(switches, switches_from_indices(torch_indices, case.size[1], *p.args()),
                         "switches vs max_pool2d_with_indices")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", POOL_CASES, ids=_ids(POOL_CASES))
def test_unpool_relu_element(emulated, dtype, case):
    x, grad = pool_inputs(case, dtype, "cpu", "unpool_relu")
    p = case.pool
    x64, out64, switches = pool_with_autograd(x, p)
    result = emulated.unpool_relu(grad, switches, case.size, *p.args())
    expected = reference.unpool_relu(grad, switches, case.size, *p.args())
    truth = unpool_relu_truth(x64, out64, grad)
    magnitude = unpool_relu_truth(x64, out64, grad.abs())
    assert_close_to_oracle(result, expected, truth, magnitude=magnitude, msg=f"emulated unpool_relu {case}")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", FUSED_CASES, ids=_ids(FUSED_CASES))
def test_unpool_relu_deconv2d_element(emulated, dtype, case):
    pre_pool, grad, weight, pool_input = fused_inputs(case, dtype, "cpu", "unpool_relu_deconv2d")
    x64, out64, switches = pool_with_autograd(pre_pool, case.pool)
    args = fused_args(case, pool_input)
    result = emulated.unpool_relu_deconv2d(grad, switches, weight, *args)
    expected = reference.unpool_relu_deconv2d(grad, switches, weight, *args)
    truth = conv_input_gradient(unpool_relu_truth(x64, out64, grad), weight, case.size, case.conv)
    magnitude = conv_input_gradient(unpool_relu_truth(x64, out64, grad.abs()), weight.abs(), case.size, case.conv)
    assert_close_to_oracle(result, expected, truth, magnitude=magnitude,
                           msg=f"emulated unpool_relu_deconv2d {case}")


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
