"""Occlusion by difference against a batched full recompute (Zeiler & Fergus Fig. 7's experiment).

Case (the issue's): VGG16 conv3_3 after its ReLU (``features.15`` of torchvision's vgg16, random
weights) at 112x112, a 16 px square at stride 8 (13 x 13 = 169 positions per image), the default
reduce (total activation of each image's strongest map).

- recompute: ``deconvcuda.occlusion(..., method="recompute")``: every occluded image through the
  whole forward to the layer (the traced graph's functional forward), 64 occluded images per batch:
  what Captum's Occlusion does, for an intermediate layer;
- difference: ``deconvcuda.occlusion(..., method="difference")``: the unoccluded forward once, then per position only each
  layer's cone of influence on top of it (256 positions per batch).

Both results are compared (float32, relative 1e-4 of the largest value) before the ratio is
printed, so neither can be fast by being wrong. The target is >= 3x on the CPU.

    python bench/bench_occlusion.py                  # prints both times and the ratio
    make bench                                       # with the other benchmarks (pytest-benchmark)
"""
from __future__ import annotations

import os
import sys
import time

import pytest
import torch

if __name__ == "__main__":  # run as a script from the repository root or from bench/
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import deconvcuda  # noqa: E402

LAYER, SIZE, WINDOW, STRIDE, IMAGES = "features.15", 112, 16, 8, 2
TARGET_RATIO = 3.0


def vgg16(device: str) -> torch.nn.Module:
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.vgg16(weights=None).eval().to(device)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(function, device: str):
    synchronize(device)
    started = time.perf_counter()
    result = function()
    synchronize(device)
    return result, time.perf_counter() - started


def compare(device: str = "cpu"):
    """(seconds by difference, seconds by recompute, ratio), both results checked equal first."""
    model = vgg16(device)
    images = torch.randn(IMAGES, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1)).to(device)
    options = dict(window=WINDOW, stride=STRIDE)
    deconvcuda.occlusion(model, images[:1], LAYER, window=SIZE // 2, stride=SIZE // 2)  # warm-up: trace, allocator
    by_difference, difference_seconds = timed(lambda: deconvcuda.occlusion(model, images, LAYER, method="difference",
                                                                           **options), device)
    by_recompute, recompute_seconds = timed(lambda: deconvcuda.occlusion(model, images, LAYER, method="recompute",
                                                                         batch_size=64, **options), device)
    scale = float(by_recompute.abs().max())
    worst = float((by_difference - by_recompute).abs().max())
    assert worst <= 1e-4 * scale, f"by difference differs from the recompute by {worst:.3g} (largest value {scale:.3g})"
    return difference_seconds, recompute_seconds, recompute_seconds / difference_seconds


def report(device: str, difference_seconds: float, recompute_seconds: float, ratio: float) -> str:
    positions = ((SIZE - WINDOW) // STRIDE + 1) ** 2 * IMAGES
    return (f"occlusion of VGG16 {LAYER} at {SIZE}px, {WINDOW}px square, stride {STRIDE} ({positions} positions, "
            f"{device}, {torch.get_num_threads()} threads): by difference {difference_seconds:.2f} s, batched "
            f"full recompute {recompute_seconds:.2f} s, ratio {ratio:.1f}x (target >= {TARGET_RATIO:g}x on the CPU)")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA not available"))])
def test_occlusion_by_difference_against_recompute(benchmark, device):
    pytest.importorskip("torchvision")
    results = benchmark.pedantic(compare, args=(device,), rounds=1, iterations=1)
    difference_seconds, recompute_seconds, ratio = results
    benchmark.extra_info.update(by_difference_s=difference_seconds, recompute_s=recompute_seconds, ratio=ratio)
    print("\n" + report(device, *results))
    if device == "cpu":
        assert ratio >= TARGET_RATIO, report(device, *results)


if __name__ == "__main__":
    device = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    print(report(device, *compare(device)))
