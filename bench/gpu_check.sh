#!/usr/bin/env bash
# The whole GPU check of deconvcuda in one run, for a short lease on a GPU machine (H100 / H200:
# torch 2.11.0+cu130 and nvcc 13.0 already installed, Python 3.12, no network, no .venv).
#
#   bash bench/gpu_check.sh            # from the repository root; writes to $OUT, else ./gpu_check_out
#
# Stages, each with its own time limit, each recorded whatever happens, the next one run anyway:
#   1 env       GPU, driver, python3, torch, nvcc, compute-sanitizer
#   2 build     setup.py build_ext --inplace against this machine's own python3 and torch (not the
#               Makefile: its .venv needs the package index), sm_90 only, DECONVCUDA_FORCE_CUDA=1 so a
#               missing nvcc fails loudly instead of building the CPU kernels only
#   3 tests     the CUDA half of the tests (pytest -m cuda): the ops first, then the rest, then the
#               kernels against their host emulation bit for bit (tests/test_cuda_emulation.py)
#   4 memcheck  compute-sanitizer memcheck on a small CUDA subset of the op tests; racecheck and
#               synccheck on the fused op's staged kernel (shared memory, barriers)
#   5 bench     bench/bench_kernels.py on CUDA, batch 64, fp32 / tf32 / bf16: every op against the
#               reference and PyTorch's chain (max_pool2d backward + relu + conv_transpose2d), the
#               fused op against the dense path, unpool_relu against copy bandwidth
#   6 workloads bench/workloads.py --only top9 on CUDA: the paper's top-9 projections end to end
# Files (at most 8): env.txt build.log tests.log memcheck.log bench.txt bench.json workloads.json summary.txt.
# The whole run stays under 8 minutes: each stage gets at most what is left of that.
set -u

cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-./gpu_check_out}"
mkdir -p "$OUT_DIR"
PYTHON="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
START=$(date +%s)
TOTAL_S=${GPU_CHECK_TOTAL_S:-470}   # 7 min 50 s for everything
SUMMARY="$OUT_DIR/summary.txt"
: >"$SUMMARY"

# Seconds a stage may take: its own cap, or what is left of the total, whichever is less.
budget() {
  local cap=$1 left=$((TOTAL_S - ($(date +%s) - START)))
  if [ "$left" -lt "$cap" ]; then cap=$left; fi
  if [ "$cap" -lt 5 ]; then cap=5; fi
  echo "$cap"
}

# stage NAME CAP LOG COMMAND...: runs COMMAND under a time limit, appends its output to LOG and a
# line to the summary; never stops the script.
stage() {
  local name=$1 cap=$2 log=$3
  shift 3
  local limit t0 rc
  limit=$(budget "$cap")
  t0=$(date +%s)
  echo "=== $name (limit ${limit}s): $*" >>"$log"
  timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
  rc=$?
  local status="ok"
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status="TIMEOUT"; elif [ "$rc" -ne 0 ]; then status="FAILED (exit $rc)"; fi
  printf '%-10s %-16s %4ss  %s\n' "$name" "$status" "$(($(date +%s) - t0))" "$*" | tee -a "$SUMMARY"
  echo "=== $name: $status after $(($(date +%s) - t0))s" >>"$log"
  return 0
}

# 1. What this machine is.
{
  date -u
  nvidia-smi || echo "nvidia-smi failed"
  "$PYTHON" - <<'EOF' || echo "python3 / torch failed"
import sys, torch
print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
print("gpu", torch.cuda.is_available() and torch.cuda.get_device_name(), torch.cuda.device_count())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("multiprocessors", p.multi_processor_count, "memory GiB", round(p.total_memory / 2**30, 1))
EOF
  command -v nvcc && nvcc --version | tail -2
  command -v compute-sanitizer || echo "compute-sanitizer not on PATH"
  nproc
} >"$OUT_DIR/env.txt" 2>&1
echo "env        $(grep -m1 '^torch' "$OUT_DIR/env.txt")  $(grep -m1 '^gpu' "$OUT_DIR/env.txt")" | tee -a "$SUMMARY"

# 2. Build against this machine's python3 and torch, for Hopper only (the lease is short).
stage build 240 "$OUT_DIR/build.log" env DECONVCUDA_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" \
  MAX_JOBS="$(nproc)" "$PYTHON" setup.py build_ext --inplace
stage import 30 "$OUT_DIR/build.log" "$PYTHON" -c \
  "import torch, deconvcuda.ops as o; x = torch.randn(1, 1, 4, 4, device='cuda'); print(o.max_pool2d_switches(x, 2)[1].cpu())"

# 3. The CUDA half of the tests: the ops (the kernels under test) first, then everything else.
stage tests-ops 120 "$OUT_DIR/tests.log" "$PYTHON" -m pytest -m cuda -q -ra -p no:cacheprovider tests/test_ops.py
stage tests-rest 90 "$OUT_DIR/tests.log" "$PYTHON" -m pytest -m cuda -q -ra -p no:cacheprovider tests \
  --ignore=tests/test_ops.py --ignore=tests/test_cuda_emulation.py
# The GPU's bits against the host emulation's (builds tests/cuda_emulation.cpp first: about 30 s).
stage tests-emulation 75 "$OUT_DIR/tests.log" "$PYTHON" -m pytest -m cuda -q -ra -p no:cacheprovider \
  tests/test_cuda_emulation.py

# 4. memcheck on a few fused and unpooling cases (overlapping and 2x2 pools, every rule inside each
#    check), float32 and bfloat16, and on the fused op's staged kernel over three chunks and its
#    global-memory kernel: out-of-bounds reads or writes in the kernels fail the stage.
if command -v compute-sanitizer >/dev/null 2>&1; then
  stage memcheck 90 "$OUT_DIR/memcheck.log" compute-sanitizer --tool memcheck --error-exitcode 3 \
    "$PYTHON" -m pytest -m cuda -q -p no:cacheprovider tests/test_ops.py tests/test_cuda_emulation.py \
    -k "((alexnet_conv5_pool5 or vgg_conv_pool or grouped_ties or arbitrary_switches) and (float32 or bfloat16 or arbitrary)) or test_device_staged_chunks"
  # The staged kernel of unpool_relu_deconv2d is the one kernel with shared memory and barriers:
  # races on the staged taps (a missing __syncthreads) and barriers not every thread reaches. Its
  # three-chunk case and one test_ops case; the emulation module was built by tests-emulation.
  for tool in racecheck synccheck; do
    stage "$tool" 45 "$OUT_DIR/memcheck.log" compute-sanitizer --tool "$tool" --error-exitcode 3 \
      "$PYTHON" -m pytest -m cuda -q -p no:cacheprovider tests/test_cuda_emulation.py tests/test_ops.py \
      -k "three_chunks or (test_unpool_relu_deconv2d and vgg_conv_pool and not odd and float32)"
  done
else
  echo "memcheck   SKIPPED: compute-sanitizer not on PATH" | tee -a "$SUMMARY"
fi

# 5. Benchmarks: VGG16's five pool boundaries and AlexNet's at batch 64, three precisions.
stage bench 150 "$OUT_DIR/bench.txt" "$PYTHON" bench/bench_kernels.py --device cuda --batch 64 \
  --precisions fp32,tf32,bf16 --rounds 20 --json "$OUT_DIR/bench.json"

# 6. The paper's workloads end to end, with whatever time is left: top-9 projections against batched
#    autograd and Captum, DESIGN.md's anchor (AlexNet conv5, 512 images, 2,304 projections) among them.
stage workloads 90 "$OUT_DIR/bench.txt" "$PYTHON" bench/workloads.py --device cuda --only top9 --runs 5 \
  --json "$OUT_DIR/workloads.json"

echo "total      $(($(date +%s) - START))s; files in $OUT_DIR" | tee -a "$SUMMARY"
tail -n 40 "$OUT_DIR/bench.txt" 2>/dev/null
exit 0
