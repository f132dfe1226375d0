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

from conftest import FLOAT_DTYPES, dtype_id
from deconvcuda import reference
from test_ops import (FUSED_CASES, POOL_CASES, _ids, check_max_pool2d_switches, check_unpool_relu,
                      check_unpool_relu_deconv2d)

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
