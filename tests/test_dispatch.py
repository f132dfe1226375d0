"""Per-shape dispatch by measurement (deconvcuda.dispatch): every candidate computes the op's numbers;
the choice is cached per shape; AUTOTUNE=False always runs the native op (bit-reproducible runs)."""
from __future__ import annotations

import time

import pytest
import torch

from conftest import DEVICES, case_rng, random_tensor
import deconvcuda
from deconvcuda import dispatch, ops


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", range(12))
def test_gemm_deconv_equals_the_op(device, case):
    rng = case_rng("gemm deconv", case)
    groups = rng.choice([1, 1, 2, 3])
    c_out, c_in = groups * rng.randint(1, 4), groups * rng.randint(1, 4)
    k = (rng.randint(1, 5), rng.randint(1, 5))
    stride, padding, dilation = (rng.randint(1, 3), rng.randint(1, 3)), (rng.randint(0, 2), rng.randint(0, 2)), \
        (rng.randint(1, 2), rng.randint(1, 2))
    x = random_tensor((rng.randint(1, 3), c_out, rng.randint(1, 6), rng.randint(1, 6)), dtype=torch.float64,
                      device=device)
    w = random_tensor((c_out, c_in // groups) + k, dtype=torch.float64, device=device)
    smallest = [(x.shape[2 + i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (k[i] - 1) + 1 for i in range(2)]
    if min(smallest) < 1:
        pytest.skip("no output for this geometry")
    size = [smallest[i] + rng.randint(0, stride[i] - 1) for i in range(2)]  # an output padding
    expected = ops.deconv2d(x, w, stride, padding, dilation, groups, size)
    actual = dispatch.deconv2d_gemm(x, w, stride, padding, dilation, groups, size)
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


def test_choices_are_cached_per_shape_and_autotune_off_runs_the_op(monkeypatch):
    calls = []
    real = ops.deconv2d

    def counted(*args):
        calls.append("op")
        return real(*args)

    monkeypatch.setattr(dispatch, "CHOICES", {})
    monkeypatch.setattr(dispatch, "TIMED_RUNS", 3)
    monkeypatch.setattr(dispatch, "CPU_MEASURE_BUDGET_S", 60.0)  # every timed run fits
    fake_ops = type("Ops", (), {"deconv2d": staticmethod(counted), "max_pool2d_switches": ops.max_pool2d_switches,
                                "unpool_relu": ops.unpool_relu, "unpool_relu_deconv2d": ops.unpool_relu_deconv2d})
    kernels = dispatch.Dispatcher(fake_ops)
    x, w = torch.randn(2, 4, 5, 5), torch.randn(4, 3, 3, 3)
    first = kernels.deconv2d(x, w, 1, 1, 1, 1, None)
    assert calls.count("op") == 1 + 3 and len(dispatch.CHOICES) == 1  # warmed up, timed 3 times, choice kept
    again = kernels.deconv2d(x, w, 1, 1, 1, 1, None)
    assert calls.count("op") in (4, 5) and len(dispatch.CHOICES) == 1
    torch.testing.assert_close(first, again)
    kernels.deconv2d(torch.randn(1, 4, 5, 5), w, 1, 1, 1, 1, None)
    assert len(dispatch.CHOICES) == 2  # batch sizes count by powers of two: 1 and 2 differ ...
    kernels.deconv2d(torch.randn(3, 4, 5, 5), w, 1, 1, 1, 1, None)
    kernels.deconv2d(torch.randn(4, 4, 5, 5), w, 1, 1, 1, 1, None)
    assert len(dispatch.CHOICES) == 3  # ... and 3 and 4 share one choice
    monkeypatch.setattr(dispatch, "AUTOTUNE", False)
    calls.clear()
    kernels.deconv2d(torch.randn(5, 4, 5, 5), w, 1, 1, 1, 1, None)
    assert calls == ["op"] and len(dispatch.CHOICES) == 3  # nothing measured, nothing kept



def test_gemm_is_a_candidate_only_where_its_columns_fit(monkeypatch):
    """The GEMM + col2im candidate is timed only for small windows whose column buffer (positions
    times output taps) keeps within GEMM_MAX_COLUMN_BYTES: timing it elsewhere would add that buffer
    to the run's peak memory."""
    timed = []
    monkeypatch.setattr(dispatch, "CHOICES", {})
    monkeypatch.setattr(dispatch, "measure", lambda candidate, device: (timed.append(candidate) or 0.0, candidate()))
    kernels = dispatch.Dispatcher(ops)
    w = torch.randn(8, 4, 5, 5)
    small = torch.randn(2, 8, 6, 6)             # 72 positions x 100 taps x 4 bytes: 28.8 KB of columns
    kernels.deconv2d(small, w, 1, 2, 1, 1, None)
    assert len(timed) == 2                      # the op and the GEMM
    timed.clear()
    monkeypatch.setattr(dispatch, "GEMM_MAX_COLUMN_BYTES", 72 * 100 * 4 - 1)
    kernels.deconv2d(torch.randn(2, 8, 6, 7), w, 1, 2, 1, 1, None)  # a new shape, a new choice
    assert len(timed) == 0                      # one candidate left: run, not timed
    assert dispatch._gemm_column_bytes(small, w, 1) == 72 * 100 * 4
    assert dispatch._gemm_column_bytes(torch.randn(2, 8, 6, 6), torch.randn(8, 2, 5, 5), 2) == 72 * 100 * 4

class _Timed:
    """A candidate that sleeps the given seconds on its successive calls (the last one from then on)
    and returns a tensor naming itself."""

    def __init__(self, name: float, seconds):
        self.name, self.seconds, self.calls = name, list(seconds), 0

    def __call__(self):
        time.sleep(self.seconds[min(self.calls, len(self.seconds) - 1)])
        self.calls += 1
        return torch.tensor([self.name])


def _choice(monkeypatch, candidates) -> float:
    monkeypatch.setattr(dispatch, "CHOICES", {})
    kernels = dispatch.Dispatcher(ops)
    return kernels._choose("test", candidates, ("shape",), torch.zeros(1)).item()


def test_a_slow_first_call_is_not_held_against_a_candidate(monkeypatch):
    """A candidate whose first call builds something (0.3 s here, as cuDNN's plans or a cache) and
    whose later calls are fast wins over one that is always moderately slow: the warm-up is not timed."""
    monkeypatch.setattr(dispatch, "CPU_MEASURE_BUDGET_S", 1.0)
    cold_start = _Timed(1.0, [0.3, 0.005])
    steady = _Timed(2.0, [0.05])
    assert _choice(monkeypatch, {"cold start": cold_start, "steady": steady}) == 1.0
    assert cold_start.calls == 1 + dispatch.TIMED_RUNS


def test_the_median_ignores_one_slow_run(monkeypatch):
    """One run disturbed (a time slice lost to another process) does not decide: the median counts."""
    monkeypatch.setattr(dispatch, "CPU_MEASURE_BUDGET_S", 1.0)
    disturbed = _Timed(1.0, [0.005, 0.005, 0.005, 0.3, 0.005])
    steady = _Timed(2.0, [0.04])
    assert _choice(monkeypatch, {"disturbed": disturbed, "steady": steady}) == 1.0


def test_first_calls_stay_cheap_on_the_cpu(monkeypatch):
    """On the CPU a candidate that takes longer than the measuring budget runs twice (warm-up and one
    timed run), not TIMED_RUNS + 1 times; the call returns the chosen candidate's last result."""
    monkeypatch.setattr(dispatch, "CPU_MEASURE_BUDGET_S", 0.02)
    slow, fast = _Timed(1.0, [0.06]), _Timed(2.0, [0.03])
    assert _choice(monkeypatch, {"slow": slow, "fast": fast}) == 2.0
    assert slow.calls == 2 and fast.calls == 2


def test_project_is_bit_reproducible_with_autotune_off(monkeypatch):
    monkeypatch.setattr(dispatch, "AUTOTUNE", False)
    model = deconvcuda.models.build("alexnet")
    images = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(3))
    first = deconvcuda.project(model, images, "features.11", channel=4)
    second = deconvcuda.project(model, images, "features.11", channel=4)
    assert torch.equal(first, second)
    monkeypatch.setattr(dispatch, "AUTOTUNE", True)
    tuned = deconvcuda.project(model, images, "features.11", channel=4)
    torch.testing.assert_close(tuned, first, rtol=1e-4, atol=1e-6 * float(first.abs().max()))
