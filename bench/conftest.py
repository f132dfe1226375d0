"""pytest-benchmark plumbing shared by the benchmark modules: the devices, a registry of timings,
and a summary table of native against reference printed at the end of the session.

A benchmark module times each case twice, ``impl="reference"`` then ``impl="native"``, and calls
``bench_results.record(...)`` after each; the native record gets the ratio (reference median /
native median) and the throughput in its ``benchmark.extra_info``, and the table lists them all.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

import pytest
import torch

CUDA_AVAILABLE = torch.cuda.is_available()

#: Benchmarks run on the CPU, and on CUDA where a GPU is present (skipped, visibly, where not).
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(
        not CUDA_AVAILABLE, reason="CUDA not available: the CUDA kernels are compiled but not run here")),
]


def synchronize(device: str) -> None:
    """Wait for queued kernels, so that a timed function measures them and not their launch."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@dataclasses.dataclass
class Timing:
    device: str
    op: str
    case: str
    impl: str
    median_s: float
    bytes: int
    flops: int

    @property
    def gb_per_s(self) -> float:
        return self.bytes / self.median_s / 1e9

    @property
    def gflop_per_s(self) -> float:
        return self.flops / self.median_s / 1e9


class BenchResults:
    """Median timings of one session, keyed by (device, op, case, impl)."""

    def __init__(self) -> None:
        self.timings: Dict[Tuple[str, str, str, str], Timing] = {}

    def record(self, benchmark, *, device: str, op: str, case: str, impl: str, bytes: int, flops: int) -> None:
        """Store the median of a finished ``benchmark`` and put the throughput (and, for the native
        op, the ratio to the reference timed before it) in ``benchmark.extra_info``."""
        benchmark.extra_info.update(op=op, case=case, impl=impl, device=device, bytes=bytes, flops=flops)
        if benchmark.disabled or benchmark.stats is None:  # --benchmark-disable: the code ran once, untimed
            return
        timing = Timing(device, op, case, impl, benchmark.stats.stats.median, bytes, flops)
        self.timings[(device, op, case, impl)] = timing
        benchmark.extra_info.update({"GB/s": round(timing.gb_per_s, 3), "GFLOP/s": round(timing.gflop_per_s, 3)})
        ratio = self.ratio(device, op, case)
        if impl == "native" and ratio is not None:
            benchmark.extra_info["ratio"] = round(ratio, 3)

    def ratio(self, device: str, op: str, case: str) -> Optional[float]:
        """Reference time / native time: above 1 where the native op is faster."""
        native = self.timings.get((device, op, case, "native"))
        ref = self.timings.get((device, op, case, "reference"))
        return ref.median_s / native.median_s if native and ref else None

    def table(self) -> List[str]:
        rows = sorted({key[:3] for key in self.timings}, key=lambda k: (k[0], k[1], k[2]))
        header = (f"{'device':<6} {'op':<22} {'case':<30} {'reference ms':>12} {'native ms':>10} {'ratio':>7} "
                  f"{'GB/s':>8} {'GFLOP/s':>9}")
        lines = [header, "-" * len(header)]
        for device, op, case in rows:
            native = self.timings.get((device, op, case, "native"))
            ref = self.timings.get((device, op, case, "reference"))
            ratio = self.ratio(device, op, case)
            lines.append(
                f"{device:<6} {op:<22} {case:<30} "
                f"{ref.median_s * 1e3 if ref else float('nan'):>12.3f} "
                f"{native.median_s * 1e3 if native else float('nan'):>10.3f} "
                f"{ratio if ratio is not None else float('nan'):>7.2f} "
                f"{native.gb_per_s if native else float('nan'):>8.1f} "
                f"{native.gflop_per_s if native else float('nan'):>9.2f}")
        return lines


_RESULTS = pytest.StashKey[BenchResults]()


def pytest_configure(config):
    config.stash[_RESULTS] = BenchResults()


@pytest.fixture(scope="session")
def bench_results(request) -> BenchResults:
    """The session's registry of timings (see ``BenchResults.record``)."""
    return request.config.stash[_RESULTS]


def pytest_terminal_summary(terminalreporter, config):
    results = config.stash.get(_RESULTS, None)
    if not results or not results.timings:
        return
    terminalreporter.section("deconvcuda ops: native against reference (medians; GB/s and GFLOP/s of the native)")
    for line in results.table():
        terminalreporter.write_line(line)
    terminalreporter.write_line(
        "ratio = reference time / native time (above 1: native is faster). GB/s counts each input and output "
        "once; GFLOP/s counts the dense work of the op's definition (for unpool_relu_deconv2d, that of the "
        "unpooled map's transposed conv, which the fused kernel skips in part).")
