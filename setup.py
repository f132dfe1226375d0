"""Build the deconvcuda._C extension: CPU kernels always, CUDA kernels whenever nvcc is found.

Environment switches (read at build time):
  DECONVCUDA_CPU_ONLY=1      build the CPU kernels only, even where nvcc is installed
  DECONVCUDA_FORCE_CUDA=1    build the CUDA kernels or fail: a missing nvcc is an error instead of a
                             silent CPU-only build (torchvision's FORCE_CUDA); for GPU machines and CI
  TORCH_CUDA_ARCH_LIST       the GPU architectures to build for (default "8.0;9.0+PTX":
                             A100 and H100/H200, with PTX so newer GPUs JIT-compile it)
  MAX_JOBS                   parallel compile jobs (default: the machine's cores)
  DECONVCUDA_DEBUG=1         -O0 -g, for stepping through kernels
  DECONVCUDA_PTXAS_VERBOSE=1 ptxas reports each kernel's registers, shared memory and spills (-Xptxas=-v)
                             into the build's output: bench/gpu_check.sh's build log keeps them
Whether a GPU is present never matters: CI compiles the CUDA kernels on machines without one.
"""
import glob
import os
import re
import shutil
import subprocess
import tempfile

from setuptools import find_packages, setup


def _toolkit_root_from_nvcc():
    """The CUDA toolkit's root folder as nvcc itself reports it (its `TOP`), or None.

    torch.utils.cpp_extension guesses CUDA_HOME as the parent of the folder `nvcc` is found in; where
    that nvcc is a wrapper script (/usr/local/bin/nvcc -> /usr/local/cuda-13.0/bin/nvcc on the CI
    machines), the guess is /usr/local, which has no libcudart, and linking fails. So unless the user
    set CUDA_HOME or CUDA_PATH, ask nvcc where its toolkit is before torch looks.
    """
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, "probe.cu")
        open(source, "w").close()
        try:
            dryrun = subprocess.run([nvcc, "--dryrun", "-c", source, "-o", os.path.join(folder, "probe.o")],
                                    capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return None
    match = re.search(r"^#\$ TOP=(.+)$", dryrun.stdout + dryrun.stderr, re.MULTILINE)
    return os.path.realpath(match.group(1).strip()) if match else None


if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")):
    _root = _toolkit_root_from_nvcc()
    if _root is not None:
        os.environ["CUDA_HOME"] = _root

from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"


def _env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _nvcc_available():
    if CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return True
    return shutil.which("nvcc") is not None


def _torch_cuda_version():
    import torch

    return torch.version.cuda or "none: a CPU-only torch"


def _extension():
    debug = _env_flag("DECONVCUDA_DEBUG")
    opt = ["-O0", "-g"] if debug else ["-O3"]
    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    # No -std flag: torch.utils.cpp_extension adds the standard the installed torch's headers need
    # (C++20 for the torch here, C++17 for older ones), so one setup.py builds against either.
    cxx_flags = opt + ["-fopenmp"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    cpu_only, force_cuda = _env_flag("DECONVCUDA_CPU_ONLY"), _env_flag("DECONVCUDA_FORCE_CUDA")
    if cpu_only and force_cuda:
        raise SystemExit("deconvcuda: DECONVCUDA_CPU_ONLY and DECONVCUDA_FORCE_CUDA are both set; unset one of them")
    with_cuda = _nvcc_available() and not cpu_only
    if force_cuda and not with_cuda:
        raise SystemExit(
            "deconvcuda: DECONVCUDA_FORCE_CUDA=1 but nvcc was not found (CUDA_HOME="
            f"{CUDA_HOME!r}, and none on PATH): install the CUDA toolkit that matches torch.version.cuda "
            f"({_torch_cuda_version()}), or set CUDA_HOME to it, or unset DECONVCUDA_FORCE_CUDA for a CPU-only build")
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
    nvcc_flags = opt + ["--expt-relaxed-constexpr", "-lineinfo"]
    if _env_flag("DECONVCUDA_PTXAS_VERBOSE"):
        nvcc_flags.append("-Xptxas=-v")
    return CUDAExtension(
        "deconvcuda._C", sources, include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags}, extra_link_args=["-fopenmp"])


setup(
    packages=find_packages(include=["deconvcuda", "deconvcuda.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
