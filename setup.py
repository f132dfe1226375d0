"""Build the deconvcuda._C extension: CPU kernels always, CUDA kernels whenever nvcc is found.

Environment switches (read at build time):
  DECONVCUDA_CPU_ONLY=1      build the CPU kernels only, even where nvcc is installed
  TORCH_CUDA_ARCH_LIST       the GPU architectures to build for (default "8.0;9.0+PTX":
                             A100 and H100/H200, with PTX so newer GPUs JIT-compile it)
  MAX_JOBS                   parallel compile jobs (default: the machine's cores)
  DECONVCUDA_DEBUG=1         -O0 -g, for stepping through kernels
Whether a GPU is present never matters: CI compiles the CUDA kernels on machines without one.
"""
import glob
import os
import shutil

from setuptools import find_packages, setup

from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"


def _env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _nvcc_available():
    if CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return True
    return shutil.which("nvcc") is not None


def _extension():
    debug = _env_flag("DECONVCUDA_DEBUG")
    opt = ["-O0", "-g"] if debug else ["-O3"]
    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx_flags = opt + ["-std=c++17", "-fopenmp"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    with_cuda = _nvcc_available() and not _env_flag("DECONVCUDA_CPU_ONLY")
    if not with_cuda:
        reason = "DECONVCUDA_CPU_ONLY is set" if _env_flag("DECONVCUDA_CPU_ONLY") else "nvcc was not found"
        print(f"deconvcuda: building the CPU kernels only ({reason})", flush=True)
        return CppExtension(
            "deconvcuda._C", sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"])
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    print("deconvcuda: building the CPU and CUDA kernels for TORCH_CUDA_ARCH_LIST="
          f"{os.environ['TORCH_CUDA_ARCH_LIST']} with {os.path.join(CUDA_HOME or '', 'bin', 'nvcc')}",
          flush=True)
    nvcc_flags = opt + ["-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"]
    return CUDAExtension(
        "deconvcuda._C", sources, include_dirs=include_dirs,
        define_macros=[("DECONVCUDA_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags}, extra_link_args=["-fopenmp"])


setup(
    packages=find_packages(include=["deconvcuda", "deconvcuda.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
