"""pytest-benchmark plumbing shared by the benchmark modules: the devices, a registry of timings,
the correctness gate every benchmark passes before it is timed, and summary tables printed at the
end of the session.

A benchmark module times each case once per implementation, in a fixed order (``impl="autograd"``
where there is such a baseline, then ``"reference"``, then ``"native"``), and calls
``bench_results.record(...)`` after each; the native record gets the ratios (reference median /
native median, and autograd median / native median) and the throughput in its
``benchmark.extra_info``, and the tables list them all: one for the ops, one for the projections.

Under ``--benchmark-disable`` (the smoke mode, ``pytest bench -o python_files='bench_*.py'
--benchmark-disable``) every benchmark still checks its result against the reference and runs its
timed function once, untimed; no table is printed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import importlib.util
import os
import platform
import sys
from typing import Callable, Dict, Hashable, List, Optional, Tuple

import pytest
import torch

# `python -m pytest` from the repository root imports the extension built in place; plain `pytest`
# does not put the root on sys.path, so do it here unless deconvcuda is installed.
if importlib.util.find_spec("deconvcuda") is None:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CUDA_AVAILABLE = torch.cuda.is_available()

#: Benchmarks run on the CPU, and on CUDA where a GPU is present (skipped, visibly, where not).
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[
        pytest.mark.cuda,
        pytest.mark.skipif(not CUDA_AVAILABLE,
                           reason="CUDA not available: the CUDA kernels are compiled but not run here"),
    ]),
]

#: Implementations, in the order a module times them (so that the ratios exist when native is recorded).
IMPLS = ("autograd", "reference", "native")

#: Rounds per benchmark: (warm-up rounds, timed rounds). The CPU runs few rounds of small problems
#: (its numbers are indicative); CUDA runs many rounds of realistic ones.
ROUNDS = {"cpu": (1, 3), "cuda": (5, 30)}


def synchronize(device: str) -> None:
    """Wait for queued kernels, so that a timed function measures them and not their launch."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_timed(benchmark, device: str, function: Callable[[], object], rounds: Optional[int] = None,
              warmup_rounds: Optional[int] = None):
    """Time ``function()`` with ``benchmark.pedantic``: warm-up rounds first (CUDA context, cuDNN
    heuristics, allocator caches), then timed rounds of one call each, every call followed by a
    device synchronisation inside the timed region. Returns the function's last result. Under
    ``--benchmark-disable`` the function runs once."""
    default_warmup, default_rounds = ROUNDS["cuda" if device.startswith("cuda") else "cpu"]

    def timed():
        result = function()
        synchronize(device)
        return result

    return benchmark.pedantic(timed, rounds=rounds or default_rounds,
                              warmup_rounds=default_warmup if warmup_rounds is None else warmup_rounds,
                              iterations=1)


@contextlib.contextmanager
def full_float32():
    """TF32 off for cuDNN convolutions and matmuls, for the correctness checks: the results compared
    with the reference are then rounded in float32 only, and a projection through 13 layers stays
    within 1e-5 of it whatever the algorithms. The timed calls keep the session's settings
    (PyTorch's defaults: TF32 convolutions on), through the same code paths."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def tolerance(device: str, cpu: float = 1e-4, cuda: float = 1e-3) -> float:
    """Relative tolerance of a float32 comparison against the reference (checked under
    ``full_float32``). Wide enough for another summation order, or for TF32 where a kernel uses
    it regardless (about 1e-4 of the largest value per layer); a wrong kernel is off by O(1)."""
    return cuda if device.startswith("cuda") else cpu


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, rel: float, what: str) -> None:
    """``actual`` equals ``expected`` (shape, dtype, device) within ``rel`` of the largest
    |expected| (absolute) and ``rel`` relative: so a wrong kernel cannot time a fast number."""
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * max(scale, 1e-30),
                               msg=lambda m: f"{what}: the result does not match the reference\n{m}")


class LastCase:
    """A one-entry cache: a case's inputs and reference result are built once and shared by the
    consecutive benchmarks of that case (one per implementation), then dropped for the next case,
    so GPU memory holds one case at a time."""

    def __init__(self) -> None:
        self.key: Optional[Hashable] = None
        self.value = None

    def get(self, key: Hashable, build: Callable[[], object]):
        if key != self.key:
            self.key, self.value = None, None  # release the previous case before building this one
            if CUDA_AVAILABLE:
                torch.cuda.empty_cache()
            self.value = build()
            self.key = key
        return self.value


@dataclasses.dataclass
class Timing:
    device: str
    op: str
    case: str
    impl: str
    median_s: float
    bytes: int
    flops: int
    count: Optional[int] = None  # projections computed by one call (project benchmarks)

    @property
    def gb_per_s(self) -> float:
        return self.bytes / self.median_s / 1e9

    @property
    def gflop_per_s(self) -> float:
        return self.flops / self.median_s / 1e9

    @property
    def us_per_item(self) -> Optional[float]:
        return self.median_s * 1e6 / self.count if self.count else None


def _nan(value: Optional[float], scale: float = 1.0) -> float:
    return float("nan") if value is None else value * scale


class BenchResults:
    """Median timings of one session, keyed by (device, op, case, impl)."""

    def __init__(self) -> None:
        self.timings: Dict[Tuple[str, str, str, str], Timing] = {}

    def record(self, benchmark, *, device: str, op: str, case: str, impl: str, bytes: int, flops: int,
               count: Optional[int] = None) -> None:
        """Store the median of a finished ``benchmark`` and put the throughput (and, for the native
        op, the ratios to the reference and to the autograd baseline timed before it) in
        ``benchmark.extra_info``. ``count``: projections per call, for microseconds per projection."""
        benchmark.extra_info.update(op=op, case=case, impl=impl, device=device, bytes=bytes, flops=flops)
        if count is not None:
            benchmark.extra_info["projections"] = count
        if benchmark.disabled or benchmark.stats is None:  # --benchmark-disable: the code ran once, untimed
            return
        timing = Timing(device, op, case, impl, benchmark.stats.stats.median, bytes, flops, count)
        self.timings[(device, op, case, impl)] = timing
        benchmark.extra_info.update({"GB/s": round(timing.gb_per_s, 3), "GFLOP/s": round(timing.gflop_per_s, 3)})
        if timing.us_per_item is not None:
            benchmark.extra_info["us_per_projection"] = round(timing.us_per_item, 3)
        if impl == "native":
            for baseline, key in (("reference", "ratio"), ("autograd", "ratio_vs_autograd")):
                ratio = self.ratio(device, op, case, baseline)
                if ratio is not None:
                    benchmark.extra_info[key] = round(ratio, 3)

    def ratio(self, device: str, op: str, case: str, baseline: str = "reference") -> Optional[float]:
        """Baseline time / native time (baseline: "reference" or "autograd"): above 1 where the
        native op is faster."""
        native = self.timings.get((device, op, case, "native"))
        base = self.timings.get((device, op, case, baseline))
        return base.median_s / native.median_s if native and base else None

    def _rows(self, with_autograd: bool) -> List[Tuple[str, str, str]]:
        """(device, op, case) of the rows of one table: those with an autograd timing, or those without."""
        rows = {key[:3] for key in self.timings}
        has_autograd = {key[:3] for key in self.timings if key[3] == "autograd"}
        chosen = (rows & has_autograd) if with_autograd else (rows - has_autograd)
        return sorted(chosen)

    def table(self) -> List[str]:
        """The ops table: native against the reference."""
        header = (f"{'device':<6} {'op':<22} {'case':<34} {'reference ms':>12} {'native ms':>10} {'ratio':>7} "
                  f"{'GB/s':>8} {'GFLOP/s':>9}")
        lines = [header, "-" * len(header)]
        for device, op, case in self._rows(with_autograd=False):
            native = self.timings.get((device, op, case, "native"))
            ref = self.timings.get((device, op, case, "reference"))
            lines.append(
                f"{device:<6} {op:<22} {case:<34} "
                f"{_nan(ref and ref.median_s, 1e3):>12.3f} "
                f"{_nan(native and native.median_s, 1e3):>10.3f} "
                f"{_nan(self.ratio(device, op, case)):>7.2f} "
                f"{_nan(native and native.gb_per_s):>8.1f} "
                f"{_nan(native and native.gflop_per_s):>9.2f}")
        return lines

    def projection_table(self) -> List[str]:
        """The projections table: native against the reference and the batched-autograd baseline."""
        header = (f"{'device':<6} {'case':<36} {'proj':>5} {'autograd ms':>11} {'reference ms':>12} "
                  f"{'native ms':>10} {'vs ref':>7} {'vs autograd':>11} {'native us/proj':>14} {'GFLOP/s':>8}")
        lines = [header, "-" * len(header)]
        for device, op, case in self._rows(with_autograd=True):
            impls = {impl: self.timings.get((device, op, case, impl)) for impl in IMPLS}
            native = impls["native"]
            count = next((t.count for t in impls.values() if t is not None and t.count), None)
            lines.append(
                f"{device:<6} {case:<36} {count or 0:>5} "
                f"{_nan(impls['autograd'] and impls['autograd'].median_s, 1e3):>11.3f} "
                f"{_nan(impls['reference'] and impls['reference'].median_s, 1e3):>12.3f} "
                f"{_nan(native and native.median_s, 1e3):>10.3f} "
                f"{_nan(self.ratio(device, op, case, 'reference')):>7.2f} "
                f"{_nan(self.ratio(device, op, case, 'autograd')):>11.2f} "
                f"{_nan(native and native.us_per_item):>14.1f} "
                f"{_nan(native and native.gflop_per_s):>8.2f}")
        return lines


def environment() -> str:
    """One line naming what the numbers were measured on."""
    if CUDA_AVAILABLE:
        device = f"{torch.cuda.get_device_name()} (cuDNN {torch.backends.cudnn.version()}, TF32 conv " \
                 f"{torch.backends.cudnn.allow_tf32}, TF32 matmul {torch.backends.cuda.matmul.allow_tf32})"
    else:
        device = "no GPU"
    cpu = platform.processor() or platform.machine()
    return (f"{datetime.date.today().isoformat()}  torch {torch.__version__}  CPU {cpu}, "
            f"{torch.get_num_threads()} threads of {os.cpu_count()} cores  GPU: {device}")


_RESULTS = pytest.StashKey[BenchResults]()


def pytest_configure(config):
    config.stash[_RESULTS] = BenchResults()


@pytest.fixture(scope="session")
def bench_results(request) -> BenchResults:
    """The session's registry of timings (see ``BenchResults.record``)."""
    return request.config.stash[_RESULTS]


@pytest.fixture(autouse=True)
def _seeded():
    """Every benchmark starts from the same generator state, whichever ran before it."""
    torch.manual_seed(0)


def pytest_terminal_summary(terminalreporter, config):
    results = config.stash.get(_RESULTS, None)
    if not results or not results.timings:
        return
    terminalreporter.section("deconvcuda benchmarks (medians)")
    terminalreporter.write_line(environment())
    if results._rows(with_autograd=False):
        terminalreporter.write_line("")
        terminalreporter.write_line("ops: native against reference (GB/s and GFLOP/s of the native)")
        for line in results.table():
            terminalreporter.write_line(line)
        terminalreporter.write_line(
            "ratio = reference time / native time (above 1: native is faster). GB/s counts each input and output "
            "once; GFLOP/s counts the dense work of the op's definition (for unpool_relu_deconv2d, that of the "
            "unpooled map's transposed conv, which the fused kernel skips in part; for max_pool2d_switches, one "
            "comparison per window tap).")
    if results._rows(with_autograd=True):
        terminalreporter.write_line("")
        terminalreporter.write_line("projections: native project against reference.project and batched autograd")
        for line in results.projection_table():
            terminalreporter.write_line(line)
        terminalreporter.write_line(
            "proj = projections per call; vs ref / vs autograd = that implementation's time / native time (above 1: "
            "native is faster); native us/proj = native time per projection. GFLOP/s counts the dense definition: "
            "the forward of the images the projections name, plus one full-map reverse per projection.")
