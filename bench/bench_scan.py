"""The dataset scan: ``top_activations`` of all 13 ReLU outputs of VGG16 in one pass, against one
plain forward of the same data through the same layers (``model.features(x)`` batch by batch under
``torch.no_grad``). The ratio scan / forward is what the per-channel maxima, the on-device top-k
merges and the functional forward cost on top of the forward itself; the target is at most 1.3.

    .venv/bin/python bench/bench_scan.py                       # CPU: 8 images at 112x112, ratio printed
    .venv/bin/python bench/bench_scan.py --device cuda --images 512 --size 224 --batch-size 64
    .venv/bin/python -m pytest bench -o python_files='bench_*.py' --benchmark-only -k scan

Random He weights (a trained network's activations cost the same); both sides see the same tensor
already on the device, in the same batches; CUDA timings are synchronised. Before timing, the scan
is checked: each channel's strongest activation equals the maximum of the forward's output.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Dict, List, Optional

import pytest
import torch
from torch import nn

if __name__ == "__main__":  # run as a script from anywhere: import the package built in place
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import deconvcuda

from conftest import DEVICES

#: Target of issue 8: scanning all 13 ReLU outputs costs at most this many plain forwards.
TARGET_RATIO = 1.3
#: Per device: (images, side, batch size, rounds). The CPU's are small (2 shared cores); the
#: ratio does not depend on the side much, since both the forward and the maxima scale with H x W.
SIZES = {"cpu": (8, 112, 8, 3), "cuda": (512, 224, 64, 10)}


def vgg16_features(device: str) -> nn.Module:
    """torchvision's VGG16 ``features`` (names features.0 .. features.30), He-initialised, in eval
    mode; the 120M-parameter classifier is never built (built on the meta device, dropped)."""
    import torchvision

    with torch.device("meta"):
        full = torchvision.models.vgg16(weights=None)
    model = nn.Sequential()
    model.features = full.features.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(16)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                module.weight.normal_(0.0, (2.0 / module.weight[0].numel()) ** 0.5, generator=generator)
                module.bias.normal_(0.0, 0.01, generator=generator)
    return model.eval().to(device)


def relu_layers(model: nn.Module) -> List[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.ReLU)]


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def plain_forward(model: nn.Module, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    with torch.no_grad():
        for first in range(0, images.shape[0], batch_size):
            out = model.features(images[first:first + batch_size])
    return out


def scan(model: nn.Module, images: torch.Tensor, layers: List[str], batch_size: int):
    return deconvcuda.top_activations(model, images, layers, k=9, batch_size=batch_size, progress=False)


def check(model: nn.Module, images: torch.Tensor, layers: List[str], batch_size: int) -> None:
    """The scan's top-1 of the deepest ReLU is each channel's maximum of the plain forward."""
    deepest = layers[-1]
    top = scan(model, images, [deepest], batch_size)[deepest]
    index = int(deepest.rsplit(".", 1)[1])  # features.29: the plain forward up to it, without the last pool
    with torch.no_grad():
        reference = torch.cat([model.features[:index + 1](images[i:i + batch_size])
                               for i in range(0, images.shape[0], batch_size)])
    best = reference.flatten(2).amax(dim=2).amax(dim=0)  # [C]
    torch.testing.assert_close(top.values[:, 0], best, rtol=1e-3, atol=1e-3 * float(best.abs().max()),
                               msg=lambda m: f"bench_scan: the scan's top-1 is not the forward's maximum\n{m}")


def measure(device: str, count: int, side: int, batch_size: int, rounds: int) -> Dict[str, float]:
    """Median seconds of the plain forward and of the scan, and their ratio."""
    model = vgg16_features(device)
    layers = relu_layers(model)
    assert len(layers) == 13, layers
    images = torch.randn(count, 3, side, side, generator=torch.Generator().manual_seed(0)).to(device)
    check(model, images, layers, batch_size)
    timings: Dict[str, List[float]] = {"forward": [], "scan": []}
    for round_number in range(rounds + 1):  # round 0 warms up (allocator, cuDNN heuristics)
        for name, run in (("forward", lambda: plain_forward(model, images, batch_size)),
                          ("scan", lambda: scan(model, images, layers, batch_size))):
            synchronize(device)
            started = time.perf_counter()
            run()
            synchronize(device)
            if round_number:
                timings[name].append(time.perf_counter() - started)
    median = {name: sorted(values)[len(values) // 2] for name, values in timings.items()}
    median["ratio"] = median["scan"] / median["forward"]
    return median


def report(device: str, count: int, side: int, batch_size: int, result: Dict[str, float]) -> str:
    return (f"VGG16, all 13 ReLU outputs, k = 9, {count} images at {side}x{side}, batches of {batch_size}, "
            f"{device} ({torch.get_num_threads()} threads): plain forward {result['forward'] * 1e3:.1f} ms, scan "
            f"{result['scan'] * 1e3:.1f} ms, ratio {result['ratio']:.3f} (target <= {TARGET_RATIO})")


@pytest.mark.parametrize("device", DEVICES)
def test_scan_against_a_plain_forward(benchmark, device):
    count, side, batch_size, rounds = SIZES[device]
    result = benchmark.pedantic(lambda: measure(device, count, side, batch_size, rounds), rounds=1, iterations=1)
    benchmark.extra_info.update(forward_ms=round(result["forward"] * 1e3, 3), scan_ms=round(result["scan"] * 1e3, 3),
                                ratio=round(result["ratio"], 3))
    print("\n" + report(device, count, side, batch_size, result))


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int)
    parser.add_argument("--size", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--rounds", type=int)
    args = parser.parse_args(argv)
    count, side, batch_size, rounds = SIZES["cuda" if args.device.startswith("cuda") else "cpu"]
    count, side = args.images or count, args.size or side
    batch_size, rounds = args.batch_size or batch_size, args.rounds or rounds
    result = measure(args.device, count, side, batch_size, rounds)
    print(report(args.device, count, side, batch_size, result))
    return 0 if result["ratio"] <= TARGET_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
