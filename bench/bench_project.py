"""Projections end to end: native ``deconvcuda.project`` (backend="auto": receptive-field windows,
fused kernels) against ``deconvcuda.reference.project`` (full maps, one reference op per layer)
and a batched-autograd baseline written here (the model run forward with autograd, every ReLU's
backward replaced by ``relu(grad)``, one backward for the whole batch of seeds: what a careful user
of autograd, or Captum's NeuronDeconvolution batched, would do).

What one timed call measures: images already on the device -> projections in pixel space, forward
included (each implementation runs its own forward to the layer and picks its seeds), synchronised
(CUDA). Not included: building the model, the top-k scan that picks the neurons (untimed setup,
``deconvcuda.top_activations``); PyTorch's default settings (on CUDA: TF32 convolutions). Before
native and the baseline are timed, their projections are compared with the reference's (in full
float32), so neither can produce a fast number by being wrong.

Cases (random weights; AlexNet from torchvision, VGG16 in deconvcuda.models' torchvision layout):
- each image's strongest activation of one channel of the last conv block (AlexNet features.12,
  VGG16 features.30, both the output of the block's max pool);
- top-9 of several channels of a middle layer from ``neurons=`` rows (AlexNet conv5 after its
  ReLU, features.11; VGG16 conv4_3 after its ReLU, features.22): several projections per image.
CUDA uses docs/DESIGN.md's anchor sizes (batch 64 at 224x224; 512 images, top-9 of all 256 AlexNet
conv5 channels = 2,304 projections); the CPU uses a few small images, so its numbers are indicative.

Floor: the dense definition costs F = F_img (N_forward + P) FLOPs (a forward of the images, one
full-map reverse per projection, which costs about what the forward does); the native engine
does the forward and then only each projection's receptive-field window of every reverse layer,
so its floor is the forward, F_img N_forward / peak (see docs/DESIGN.md's anchors, section 3: the forward scan is
8.5 ms for 512 AlexNet images on an H100, 16 ms for 64 VGG16 images).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
from torch import nn

import deconvcuda

from conftest import DEVICES, LastCase, assert_matches, full_float32, run_timed, tolerance

IMPLS = ["autograd", "reference", "native"]  # in this order: native's record gets both ratios
FLOAT32 = 4

_CASE = LastCase()


# --------------------------------------------------------------------------------------------- #
# The batched-autograd baseline
# --------------------------------------------------------------------------------------------- #

class _DeconvReLUFunction(torch.autograd.Function):
    """relu forward; backward relu(grad), ignoring the forward mask (the DeconvNet rule)."""

    @staticmethod
    def forward(ctx, x):
        return torch.relu(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.relu(grad)


class DeconvReLU(nn.Module):
    def forward(self, x):
        return _DeconvReLUFunction.apply(x)


class _Stop(Exception):
    """Raised by the target layer's forward hook: nothing after the layer needs to run."""


class AutogradDeconvNet:
    """Projections by autograd: a copy of the model (the user's is not touched) whose ReLU modules
    are replaced by ``DeconvReLU``, parameters frozen (only the input gradient is computed),
    run forward to ``layer`` on one row per projection; the seeds (each selected activation's
    value) go through one ``torch.autograd.grad``. Max pools, convs and the rest reverse by their
    own autograd gradients, which are the DeconvNet's (docs/DESIGN.md, section 1)."""

    def __init__(self, model: nn.Module, layer: str):
        self.model = copy.deepcopy(model).eval()
        for name, module in list(self.model.named_modules()):
            if isinstance(module, nn.ReLU):
                parent, _, child = name.rpartition(".")
                setattr(self.model.get_submodule(parent) if parent else self.model, child, DeconvReLU())
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.layer = self.model.get_submodule(layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The output of ``layer`` (the rest of the model does not run)."""
        captured = []

        def hook(module, inputs, output):
            captured.append(output)
            raise _Stop

        handle = self.layer.register_forward_hook(hook)
        try:
            self.model(x)
        except _Stop:
            pass
        finally:
            handle.remove()
        return captured[0]

    def project(self, images: torch.Tensor, channel: Optional[int] = None,
                neurons: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``channel``: each image's strongest activation of that map (first maximum, row-major);
        ``neurons`` [P, 4] (image, channel, y, x): one forward row per projection."""
        # the images as given, as the model runs on them (and as deconvcuda's forward does): the
        # memory format decides how a convolution rounds, and so near-ties in the max pools
        x = images if neurons is None else images.index_select(0, neurons[:, 0])
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            out = self.forward(x)
            rows = torch.arange(x.shape[0], device=x.device)
            if neurons is None:
                strongest = out[:, channel].detach().flatten(1).argmax(dim=1)
                channels = torch.full_like(rows, channel)
                ys, xs = strongest // out.shape[3], strongest % out.shape[3]
            else:
                channels, ys, xs = neurons[:, 1], neurons[:, 2], neurons[:, 3]
            seed = torch.zeros_like(out)
            seed[rows, channels, ys, xs] = out.detach()[rows, channels, ys, xs]
            (grad,) = torch.autograd.grad(out, x, seed)
        return grad


# --------------------------------------------------------------------------------------------- #
# Cases
# --------------------------------------------------------------------------------------------- #

@dataclass(frozen=True)
class Sizes:
    images: int
    size: int
    channels: int = 0  # top-9 cases: how many channels (0: one channel, each image's strongest)


@dataclass(frozen=True)
class ProjectionCase:
    name: str
    model: str  # "alexnet" or "vgg16"
    layer: str
    cpu: Sizes
    cuda: Sizes
    k: int = 9

    def sizes(self, device: str) -> Sizes:
        return self.cuda if device.startswith("cuda") else self.cpu

    @property
    def top(self) -> bool:
        return self.cpu.channels > 0

    def label(self, device: str) -> str:
        s = self.sizes(device)
        if self.top:
            return f"{self.name} {s.images}x{s.size} {s.channels}ch"
        return f"{self.name} N={s.images} @{s.size}"


CASES = [
    ProjectionCase("alexnet pool5 strongest", "alexnet", "features.12",
                   cpu=Sizes(4, 224), cuda=Sizes(64, 224)),
    ProjectionCase("vgg16 pool5 strongest", "vgg16", "features.30",
                   cpu=Sizes(2, 64), cuda=Sizes(64, 224)),
    ProjectionCase("alexnet conv5 top-9", "alexnet", "features.11",
                   cpu=Sizes(16, 224, channels=2), cuda=Sizes(512, 224, channels=256)),
    ProjectionCase("vgg16 conv4_3 top-9", "vgg16", "features.22",
                   cpu=Sizes(4, 64, channels=2), cuda=Sizes(64, 224, channels=16)),
]


def _model(name: str, device: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "alexnet":
        import torchvision

        model = torchvision.models.alexnet(weights=None)
    else:
        model = deconvcuda.models.vgg16_hed(pretrained=False)
    return model.eval().to(device)


def _conv_flops_per_image(model: nn.Module, layer: str, size: int, device: str) -> int:
    """Dense multiply-add FLOPs (x2) of the convs and linears up to ``layer`` for one image."""
    total = 0

    def count(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            total += 2 * output.numel() * (module.in_channels // module.groups) * module.kernel_size[0] \
                * module.kernel_size[1]
        elif isinstance(module, nn.Linear):
            total += 2 * output.numel() * module.in_features

    handles = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            AutogradDeconvNet(model, layer).forward(torch.zeros(1, 3, size, size, device=device))
    finally:
        for handle in handles:
            handle.remove()
    return total


@dataclass
class Prepared:
    """A case built on its device: the model, the baseline, the images and the selection."""

    model: nn.Module
    layer: str
    baseline: AutogradDeconvNet
    images: torch.Tensor
    channel: Optional[int]
    neurons: Optional[torch.Tensor]
    distinct: int  # images the forward needs
    expected: Optional[torch.Tensor] = None  # the reference's projections
    flops: int = 0

    @property
    def count(self) -> int:
        return self.expected.shape[0]

    def run(self, impl: str) -> torch.Tensor:
        if impl == "autograd":
            return self.baseline.project(self.images, self.channel, self.neurons)
        project = deconvcuda.reference.project if impl == "reference" else deconvcuda.project
        if self.neurons is not None:
            return project(self.model, self.images, self.layer, neurons=self.neurons)
        return project(self.model, self.images, self.layer, channel=self.channel)

    def expected_for(self, impl: str) -> torch.Tensor:
        """What ``run(impl)`` must give: the reference's projections. For the autograd baseline with
        ``neurons``, the reference run on the baseline's own batch (one row per projection), since
        convolutions of a differently composed batch may round differently (another algorithm) and
        flip a near-tie of a max pool, which moves a value by a pixel; on the same batch the
        forwards agree bit for bit, and the check tests the reverse alone."""
        if impl != "autograd" or self.neurons is None:
            return self.expected
        rows = torch.arange(self.neurons.shape[0], device=self.neurons.device)
        return deconvcuda.reference.project(self.model, self.images.index_select(0, self.neurons[:, 0]), self.layer,
                                            neurons=torch.cat([rows[:, None], self.neurons[:, 1:]], dim=1))


def _prepare(case: ProjectionCase, device: str) -> Prepared:
    sizes = case.sizes(device)
    model = _model(case.model, device)
    images = torch.randn(sizes.images, 3, sizes.size, sizes.size, device=device)
    channel = neurons = None
    if case.top:
        top = deconvcuda.top_activations(model, images, case.layer, k=case.k, progress=False)
        # the channels whose 9th activation is strongest: live maps with nine non-zero projections
        channels = top.values[:, -1].argsort(descending=True, stable=True)[:sizes.channels]
        neurons = torch.cat([top.neurons(int(c)) for c in channels.tolist()]).to(device)
        distinct = int(neurons[:, 0].unique().numel())
    else:
        # the channel with the largest mean activation over the batch: non-zero seeds in every image
        with torch.no_grad():
            out = AutogradDeconvNet(model, case.layer).forward(images)
        channel = int(out.mean(dim=(0, 2, 3)).argmax())
        distinct = sizes.images
    prepared = Prepared(model, case.layer, AutogradDeconvNet(model, case.layer), images, channel, neurons, distinct)
    prepared.expected = prepared.run("reference")
    prepared.flops = _conv_flops_per_image(model, case.layer, sizes.size, device) * (distinct + prepared.count)
    return prepared


# --------------------------------------------------------------------------------------------- #
# The benchmark
# --------------------------------------------------------------------------------------------- #

@pytest.mark.parametrize("impl", IMPLS)  # the innermost loop: one case's implementations run back to back
@pytest.mark.parametrize("case", CASES, ids=[c.name.replace(" ", "-") for c in CASES])
@pytest.mark.parametrize("device", DEVICES)
def test_project(benchmark, bench_results, device, case, impl):
    """One call projecting a batch of seeds to pixels (forward included). Native and the autograd
    baseline are checked against the reference first. extra_info: projections, us_per_projection,
    and on native the ratios to the reference and to autograd."""
    with full_float32():
        prepared: Prepared = _CASE.get((case.name, device), lambda: _prepare(case, device))
        if impl != "reference":
            assert_matches(prepared.run(impl), prepared.expected_for(impl), tolerance(device),
                           f"{case.label(device)} ({impl})")
    benchmark.group = f"project {case.label(device)} {device}"
    run_timed(benchmark, device, lambda: prepared.run(impl))
    sizes = case.sizes(device)
    bytes = FLOAT32 * (prepared.distinct + prepared.count) * 3 * sizes.size * sizes.size
    bench_results.record(benchmark, device=device, op="project", case=case.label(device), impl=impl, bytes=bytes,
                         flops=prepared.flops, count=prepared.count)
