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

from conftest import FLOAT_DTYPES, assert_bitwise_equal, dtype_id
from deconvcuda import reference
from test_ops import (FUSED_CASES, POOL_CASES, _ids, check_max_pool2d_switches, check_unpool_relu,
                      check_unpool_relu_deconv2d, fused_args, fused_inputs)

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("case", LAUNCH_CASES, ids=_ids(LAUNCH_CASES))
def test_launch_variants_agree_bit_for_bit(emulated, dtype, case):
    """Whatever the launch picks (8, 4 or 1 input channels per thread; 32- or 64-bit indices), each
    output element is summed in the same order: the results are the same bits."""
    pre_pool, grad, weight, pool_input = fused_inputs(case, dtype, "cpu", "launch_variants")
    _, switches = reference.max_pool2d_switches(pre_pool, *case.pool.args(), ceil_mode=case.pool.ceil_mode)
    args = fused_args(case, pool_input)
    default = emulated.unpool_relu_deconv2d(grad, switches, weight, *args, rule="guided", positive=grad > 0)
    for channels in (1, 4, 8):
        for index64 in (False, True):
            variant = emulated.unpool_relu_deconv2d_variant(grad, switches, weight, *args, "guided", grad > 0,
                                                            channels, index64)
            assert_bitwise_equal(variant, default, f"{channels} channels per thread, index64={index64}")
    unpooled = emulated.unpool_relu(grad, switches, pool_input, *case.pool.args())
    unpooled64 = emulated.unpool_relu_indexed(grad, switches, pool_input, *case.pool.args(), "deconvnet", None, True)
    assert_bitwise_equal(unpooled64, unpooled, "unpool_relu, 64-bit indices")


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
