"""Per-shape dispatch by measurement (deconvcuda.dispatch): every candidate computes the op's numbers;
the choice is cached per shape; AUTOTUNE=False always runs the native op (bit-reproducible runs)."""
from __future__ import annotations

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
    fake_ops = type("Ops", (), {"deconv2d": staticmethod(counted), "max_pool2d_switches": ops.max_pool2d_switches,
                                "unpool_relu": ops.unpool_relu, "unpool_relu_deconv2d": ops.unpool_relu_deconv2d})
    kernels = dispatch.Dispatcher(fake_ops)
    x, w = torch.randn(2, 4, 5, 5), torch.randn(4, 3, 3, 3)
    first = kernels.deconv2d(x, w, 1, 1, 1, 1, None)
    assert calls.count("op") == 1 and len(dispatch.CHOICES) == 1  # timed once, then the choice is kept
    again = kernels.deconv2d(x, w, 1, 1, 1, 1, None)
    assert calls.count("op") in (1, 2) and len(dispatch.CHOICES) == 1
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
