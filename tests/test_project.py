"""deconvcuda.project (native, backend="auto") and deconvcuda.reference.project against oracles.

Oracles:
  * ``deconvcuda.reference.project`` (full maps, pure PyTorch): the native backend must match it on
    torchvision's AlexNet, VGG11 and VGG11-BN, on ZFNet and on small custom nets, for every
    selection mode (channel, channel + position, neurons, the whole map), both seeds and both LRN
    modes. The native backend crops point seeds to their receptive fields ("windows"); the
    reference never does, so this comparison is also windows against full maps.
  * an autograd oracle written here (``deconv_oracle``): the model's own forward, run with autograd
    in float64 under a TorchFunctionMode that replaces every ReLU's backward by ``relu(g)``
    (nn.ReLU, F.relu, torch.relu, Tensor.relu, in place or not), seeded with the seed map. It is the
    docs/DESIGN.md's definition of a projection, independent of deconvcuda's fx plan and of its kernels.
  * Captum's NeuronDeconvolution (a test dependency only) on models whose ReLUs are nn.ReLU modules:
    seed="one" equals its attribution, seed="value" equals it times the activation's value.

Float64 images are used wherever the tolerance should be tight: the engine casts the (float32)
model's parameters to the images' dtype, so the float64 oracles see exactly the same weights.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import re
from typing import Dict

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from conftest import (DEVICES, FLOAT_DTYPES, assert_bitwise_equal, assert_close_to_oracle, case_rng, dtype_id,
                      forward_to_layer, random_tensor, randomize_batch_norms, rule_seed_map, torch_generator)
import deconvcuda
from deconvcuda import engine, reference

torchvision = pytest.importorskip("torchvision")


# --------------------------------------------------------------------------------------------- #
# The autograd oracle: the model's forward with every ReLU's backward replaced by relu(g)
# --------------------------------------------------------------------------------------------- #

class _OracleReLU(torch.autograd.Function):
    """relu in the forward; in the backward relu(g) ("rectify", the DeconvNet's rule) or g
    ("identity", used only to show that a case is sensitive to the rule). In place where the
    model's ReLU is, so that code relying on the mutation (``x.relu_()`` with its result unused)
    still sees it."""

    @staticmethod
    def forward(ctx, x, inplace: bool, rectify: bool):
        ctx.rectify = rectify
        if inplace:
            ctx.mark_dirty(x)
            return x.clamp_min_(0)
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx, g):
        return (g.clamp_min(0) if ctx.rectify else g), None, None


class _StraightThrough(torch.autograd.Function):
    """``fn(x)`` in the forward, identity in the backward: LocalResponseNorm with lrn="identity"."""

    @staticmethod
    def forward(ctx, x, fn):
        return fn(x)

    @staticmethod
    def backward(ctx, g):
        return g, None


_OUT_OF_PLACE_RELUS = {F.relu, torch.relu, torch.Tensor.relu}
_IN_PLACE_RELUS = {F.relu_, torch.relu_, torch.Tensor.relu_}


class _DeconvMode(TorchFunctionMode):
    """Intercepts every ReLU a forward can call (nn.ReLU calls F.relu; methods come as Tensor.relu
    and Tensor.relu_) and, with lrn="identity", F.local_response_norm. relu_backward="mask" leaves
    the ReLUs alone: plain autograd."""

    def __init__(self, relu_backward: str = "rectify", lrn: str = "gradient"):
        super().__init__()
        self.relu_backward, self.lrn = relu_backward, lrn

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.relu_backward != "mask" and (func in _OUT_OF_PLACE_RELUS or func in _IN_PLACE_RELUS):
            x = args[0] if args else kwargs["input"]
            inplace = func in _IN_PLACE_RELUS or bool(kwargs.get("inplace", args[1] if len(args) > 1 else False))
            return _OracleReLU.apply(x, inplace, self.relu_backward == "rectify")
        if self.lrn == "identity" and func is F.local_response_norm:
            return _StraightThrough.apply(args[0], lambda t: func(t, *args[1:], **kwargs))
        return func(*args, **kwargs)




seed_map = rule_seed_map  # docs/DESIGN.md's seed, shared with the graph models' oracle (conftest)


def deconv_oracle(model64: nn.Module, images: torch.Tensor, layer: str, channel=None, position=None, neurons=None, *,
                  seed: str = "value", lrn: str = "gradient", relu_backward: str = "rectify") -> torch.Tensor:
    """The projection by autograd, in float64 on the CPU: the input-gradient of ``layer``'s output
    seeded with the seed map, every ReLU's backward replaced by relu(g). ``model64`` is a float64
    eval-mode copy on the CPU. With ``neurons`` the images are repeated per row, so each row gets its own
    backward (rows are independent in eval mode)."""
    x = images.detach().to("cpu", torch.float64)
    if neurons is not None:
        neurons = neurons.cpu()
        x = x[neurons[:, 0]]
    x = x.clone().requires_grad_(True)
    with torch.enable_grad(), _DeconvMode(relu_backward, lrn):
        out = forward_to_layer(model64, x, layer)
    (grad,) = torch.autograd.grad(out, x, seed_map(out, channel, position, neurons, seed))
    return grad


# --------------------------------------------------------------------------------------------- #
# Models
# --------------------------------------------------------------------------------------------- #

class GeometryNet(nn.Module):
    """Every reverse the engine has, with the geometry windows get wrong: stride 2 and padded convs,
    a dilated grouped conv, an overlapping padded ceil_mode max pool, a dilated max pool, average
    pools with and without count_include_pad (one with ceil_mode), BatchNorm, a strong LRN (so that
    its gradient differs from the identity), an adaptive average pool, Flatten and Linear."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 5, stride=2, padding=2),                                         # 0
            nn.BatchNorm2d(8),                                                               # 1
            nn.ReLU(inplace=True),                                                           # 2
            nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True),                            # 3
            nn.Conv2d(8, 12, 3, padding=2, dilation=2, groups=4),                            # 4
            nn.ReLU(),                                                                       # 5
            nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False),   # 6
            nn.Conv2d(12, 16, 3, padding=1),                                                 # 7
            nn.LocalResponseNorm(3, alpha=0.5, beta=0.75, k=1.0),                            # 8
            nn.ReLU(),                                                                       # 9
            nn.MaxPool2d(2, stride=1, dilation=2),                                           # 10
            nn.Conv2d(16, 16, 3, stride=2, padding=1),                                       # 11
            nn.ReLU(),                                                                       # 12
            nn.AvgPool2d(2, stride=1, padding=1, count_include_pad=True),                    # 13
            nn.Conv2d(16, 8, 1),                                                             # 14
        )
        self.pool = nn.AdaptiveAvgPool2d((3, 2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(48, 10))

    def forward(self, x):
        return self.head(self.pool(self.features(x)))


class ConvReluPoolNet(nn.Module):
    """conv -> ReLU -> max pool blocks (the fused reverse), nn.ReLU modules only: Captum hooks them."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, stride=2),               # 0 1 2
            nn.Conv2d(6, 10, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True),        # 3 4 5
            nn.Conv2d(10, 12, 3), nn.ReLU(),                                                   # 6 7
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(12 * 3 * 3, 20), nn.ReLU(), nn.Linear(20, 5))

    def forward(self, x):
        return self.classifier(self.features(x))


class PoolNet(nn.Module):
    """Functional and less common geometry: padding="same", non-square kernels, strides and
    dilations, a padded dilated ceil_mode F.max_pool2d, AvgPool2d with divisor_override, a padded
    ceil_mode F.avg_pool2d without count_include_pad, and an AdaptiveAvgPool2d in the middle that
    keeps the width (output_size (7, None))."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding="same")
        self.conv2 = nn.Conv2d(6, 6, (3, 5), stride=(2, 1), padding=(1, 2))
        self.avg = nn.AvgPool2d(3, stride=1, padding=1, divisor_override=5)
        self.adapt = nn.AdaptiveAvgPool2d((7, None))
        self.conv3 = nn.Conv2d(6, 8, 3, dilation=(1, 2))

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(x, (2, 3), stride=(2, 1), padding=(1, 1), dilation=(1, 2), ceil_mode=True)
        x = self.avg(torch.relu(self.conv2(x)))
        x = F.avg_pool2d(x, 2, ceil_mode=True, count_include_pad=False, padding=1)
        return self.conv3(self.adapt(x))


def _seeded(seed: int, build):
    """``build()`` with torch's generator seeded, without disturbing the generator of the test that
    happens to build the model first."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


BUILDERS = {
    "alexnet": lambda: torchvision.models.alexnet(weights=None).eval(),
    "vgg11": lambda: torchvision.models.vgg11(weights=None).eval(),
    "vgg11_bn": lambda: randomize_batch_norms(torchvision.models.vgg11_bn(weights=None).eval(), 1),
    "zfnet": lambda: deconvcuda.models.zfnet(),
    "geometry": lambda: randomize_batch_norms(GeometryNet().eval(), 2),
    "convrelupool": lambda: ConvReluPoolNet().eval(),
    "wide": lambda: randomize_batch_norms(GeometryNet().eval(), 3),  # with wide, low images
    "poolnet": lambda: PoolNet().eval(),
}

#: Per model, the (H, W) of its test images: small, so the module stays fast, but large enough that
#: point seeds of early and middle layers run on windows smaller than the maps.
IMAGE_SIZES = {"alexnet": (131, 131), "vgg11": (64, 64), "vgg11_bn": (64, 64), "zfnet": (99, 99),
               "geometry": (93, 77), "convrelupool": (19, 19), "wide": (20, 150),
               "poolnet": (29, 23)}


@functools.lru_cache(maxsize=None)
def model_named(name: str) -> nn.Module:
    """The model (float32, eval mode, random weights from a fixed seed), built once per session:
    VGG's classifier alone takes seconds to initialise. Tests must not change it."""
    return _seeded(sum(map(ord, name)), BUILDERS[name])


@functools.lru_cache(maxsize=None)
def float64_copy(name: str) -> nn.Module:
    """A float64 copy of ``model_named(name)`` for the autograd oracle and Captum."""
    return copy.deepcopy(model_named(name)).double().eval()


@functools.lru_cache(maxsize=None)
def _cuda_copy(name: str) -> nn.Module:
    return copy.deepcopy(model_named(name)).cuda()


@functools.lru_cache(maxsize=None)
def _cuda_float64_copy(name: str) -> nn.Module:
    return copy.deepcopy(float64_copy(name)).cuda()


#: Models whose float64 copy the tests use for float64 images: the oracles need it anyway, and the
#: engine then casts nothing (casting AlexNet's or ZFNet's classifier to float64 in every call takes
#: most of the call's time). VGG stays float32 (its float64 copies would take 2 GB), which also
#: covers images whose dtype differs from the model's.
FLOAT64_MODELS = {"alexnet", "zfnet", "geometry", "convrelupool", "wide", "poolnet"}


def model_on(name: str, device: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model to project with images of ``dtype`` on ``device``."""
    if dtype == torch.float64 and name in FLOAT64_MODELS:
        return float64_copy(name) if device == "cpu" else _cuda_float64_copy(name)
    return model_named(name) if device == "cpu" else _cuda_copy(name)


def images_for(name: str, device: str, dtype=torch.float64, n: int = 2) -> torch.Tensor:
    """``n`` standard-normal images of the model's test size, the same on every device."""
    h, w = IMAGE_SIZES[name]
    generator = torch_generator(case_rng("images", name, n))
    return random_tensor((n, 3, h, w), dtype=dtype, device=device, generator=generator)


def layer_output(model: nn.Module, images: torch.Tensor, layer: str) -> torch.Tensor:
    """``layer``'s output on ``images`` (returned on the CPU in float64), read from a forward of the
    model on its own device and dtype (not from deconvcuda's plan)."""
    parameter = next(model.parameters())
    with torch.no_grad():
        out = forward_to_layer(model, images.to(parameter.device, parameter.dtype), layer)
    return out.detach().to("cpu", torch.float64)


@pytest.fixture(scope="module", autouse=True)
def release_models():
    """The models are cached for this module only (VGG's alone hold 1 GB)."""
    yield
    for cache in (model_named, float64_copy, _cuda_copy, _cuda_float64_copy, relu_net):
        cache.cache_clear()


# --------------------------------------------------------------------------------------------- #
# Selections and comparisons
# --------------------------------------------------------------------------------------------- #

def selections(out: torch.Tensor, rng) -> Dict[str, dict]:
    """The four selection modes for a layer whose output on the (two) test images is ``out``.
    Positions include the corners, so that windows reach past the map's edges, and the neurons
    repeat a row and name the images out of order. At a corner, the channel is one whose activation
    there is the largest (after a ReLU most are zero, and a zero seed projects to nothing)."""
    if out.dim() == 2:
        alive = [u for u in range(out.shape[1]) if out[:, u].max() > 0] or [0]  # after a ReLU many are 0
        u0, u1, u2 = rng.choice(alive), rng.choice(alive), rng.randrange(out.shape[1])
        rows = [[1, u1, 0, 0], [0, u2, 0, 0], [1, u1, 0, 0], [0, u0, 0, 0]]
        return {"channel": dict(channel=u0), "neurons": dict(neurons=torch.tensor(rows)), "whole map": {}}
    c, h, w = out.shape[1:]

    def active(image, y, x):
        return int(out[image, :, y, x].argmax())

    alive = [ch for ch in range(c) if out[:, ch].max() > 0] or list(range(c))  # maps that are not all zero
    c0, c1 = rng.choice(alive), rng.randrange(c)
    rows = [[1, active(1, 0, 0), 0, 0], [0, active(0, h - 1, w - 1), h - 1, w - 1], [1, active(1, 0, 0), 0, 0],
            [0, active(0, 0, w - 1), 0, w - 1], [1, active(1, h - 1, 0), h - 1, 0], [1, c1, h // 2, w // 2],
            [0, c0, rng.randrange(h), rng.randrange(w)]]
    return {
        "channel": dict(channel=c0),
        "channel+position": dict(channel=active(0, h - 1, w - 1), position=(h - 1, w - 1)),
        "neurons": dict(neurons=torch.tensor(rows)),
        "whole map": {},
    }


def on_device(selection: dict, device: str) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in selection.items()}


def assert_projections_close(actual: torch.Tensor, expected: torch.Tensor, *, rtol: float, msg: str = "",
                             nonzero: bool = True) -> None:
    """Each projection (row) of ``actual`` within ``rtol`` of the largest |value| of that row of
    ``expected`` (rows span many orders of magnitude: a deep layer's projection of a random net is
    tiny). Rows that are tiny compared with the largest row get the tolerance of 1e-3 of it. Shape
    equal; where ``nonzero``, ``expected`` must not be all zeros (a comparison of zeros proves nothing)."""
    assert actual.shape == expected.shape, f"{msg}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if expected.shape[0] == 0:
        return
    actual, expected = actual.detach().cpu().double(), expected.detach().cpu().double()
    assert torch.isfinite(actual).all(), f"{msg}: non-finite values"
    scale = expected.flatten(1).abs().amax(dim=1)
    largest = scale.max().item()
    if nonzero:
        assert largest > 0, f"{msg}: the expected projections are all zero; the case tests nothing"
    error = (actual - expected).flatten(1).abs().amax(dim=1)
    tolerance = rtol * torch.maximum(scale, torch.full_like(scale, 1e-3 * largest))
    bad = error > tolerance
    assert not bool(bad.any()), (
        f"{msg}: projection {int(bad.nonzero()[0, 0])} differs by {error[bad][0].item():.3g}, tolerance "
        f"{tolerance[bad][0].item():.3g} (its largest |value| {scale[bad][0].item():.3g})")


#: float64: a different summation order only (native kernels, windows); float32: the same through a
#: dozen layers, sums of thousands of products that partly cancel.
RTOL = {torch.float64: 1e-9, torch.float32: 2e-3}


@contextlib.contextmanager
def recording_schedules(monkeypatch):
    """Records, per projection call, which reverse steps ran on windows (engine._schedule's answer),
    so that a test meant for the windows path can check it took it."""
    schedules = []
    real = engine._schedule

    def spy(program, crop):
        windowed, peak = real(program, crop)
        schedules.append(list(windowed))
        return windowed, peak

    monkeypatch.setattr(engine, "_schedule", spy)
    yield schedules


# --------------------------------------------------------------------------------------------- #
# 1 and 7. native == reference, every selection mode, several models and layers
# --------------------------------------------------------------------------------------------- #

# (model, layer, seed, lrn, dtype of the images, selection modes, whether point seeds run partly on
# windows). Each model sees every mode and both seeds; not every product, to keep the module fast.
# Modes: c = channel (each image's strongest activation), p = channel + position (the last row and
# column), n = neurons (corners, a repeated row, images out of order), m = the whole map.
CASES = [
    ("alexnet", "features.0", "value", "gradient", torch.float64, "pn", True),    # conv1 11x11/4, padding 2
    ("alexnet", "features.5", "one", "gradient", torch.float64, "cn", True),      # pool2: overlapping 3x3/2
    ("alexnet", "features.10", "value", "gradient", torch.float64, "nm", True),   # conv5, the last conv block
    ("alexnet", "features.12", "one", "gradient", torch.float64, "p", True),      # pool5
    ("alexnet", "classifier.1", "value", "gradient", torch.float64, "cnm", False),  # fc6, after AdaptiveAvgPool
    ("vgg11", "features.3", "one", "gradient", torch.float64, "cm", True),
    ("vgg11", "features.18", "value", "gradient", torch.float64, "pn", True),     # conv5_2, the last conv block
    ("vgg11", "classifier.0", "one", "gradient", torch.float32, "cn", False),     # float32: 100M weights
    ("vgg11_bn", "features.1", "value", "gradient", torch.float64, "pn", True),   # BatchNorm output
    ("vgg11_bn", "features.13", "one", "gradient", torch.float64, "cm", True),
    ("vgg11_bn", "features.26", "value", "gradient", torch.float64, "n", True),   # the last BatchNorm
    ("zfnet", "features.3", "value", "gradient", torch.float64, "pn", True),      # LRN1 (ceil_mode pool below)
    ("zfnet", "features.3", "one", "identity", torch.float64, "cm", True),
    ("zfnet", "features.8", "one", "gradient", torch.float64, "nm", True),        # conv3, two LRNs below
    ("zfnet", "features.8", "value", "identity", torch.float64, "cp", True),
    ("zfnet", "features.14", "value", "gradient", torch.float64, "n", False),     # pool5, ceil_mode
    ("zfnet", "classifier.4", "one", "identity", torch.float64, "cn", False),     # fc7
    ("geometry", "features.3", "one", "gradient", torch.float64, "cpnm", True),
    ("geometry", "features.7", "value", "gradient", torch.float64, "cpnm", True),
    ("geometry", "features.10", "one", "gradient", torch.float64, "cpnm", True),
    ("geometry", "features.14", "value", "identity", torch.float64, "cpnm", True),
    ("geometry", "features.14", "one", "gradient", torch.float64, "cpnm", True),
    ("geometry", "pool", "value", "gradient", torch.float64, "cpnm", False),
    ("geometry", "head.1", "one", "gradient", torch.float64, "cnm", False),
    ("convrelupool", "features.7", "value", "gradient", torch.float64, "cpnm", True),
]

MODE_LETTERS = {"c": "channel", "p": "channel+position", "n": "neurons", "m": "whole map"}


def _case_id(case):
    name, layer, seed, lrn, dtype, modes, _ = case
    return f"{name}-{layer}-{seed}-{lrn}-{dtype_id(dtype)}-{modes}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_native_matches_reference(device, case, monkeypatch):
    name, layer, seed, lrn, dtype, modes, windows = case
    model = model_on(name, device, dtype)
    images = images_for(name, device, dtype)
    out = layer_output(model, images, layer)
    shape = tuple(out.shape[1:])
    every = selections(out, case_rng("select", *case[:4]))
    with recording_schedules(monkeypatch) as schedules:
        for mode in (MODE_LETTERS[letter] for letter in modes):
            selection = on_device(every[mode], device)
            schedules.clear()
            native = deconvcuda.project(model, images, layer, seed=seed, lrn=lrn, **selection)
            expected = reference.project(model, images, layer, seed=seed, lrn=lrn, **selection)
            msg = f"{name} {layer} {mode} seed={seed} lrn={lrn}"
            assert native.dtype == dtype and native.device == images.device, msg
            rows = selection["neurons"].shape[0] if "neurons" in selection else images.shape[0]
            assert native.shape == (rows,) + tuple(images.shape[1:]), msg
            assert_projections_close(native, expected, rtol=RTOL[dtype], msg=msg)
            if mode in ("channel+position", "neurons") and len(shape) == 3:
                # the reference never crops, so this is the windows path against full maps
                assert any(schedules[0]) == windows, f"{msg}: windows used per step {schedules[0]}"
            assert_no_hooks(model, msg)


def assert_no_hooks(model: nn.Module, msg: str = "") -> None:
    for name, module in model.named_modules():
        for kind in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            assert not getattr(module, kind), f"{msg}: {kind} left on module {name!r}"


# --------------------------------------------------------------------------------------------- #
# The reference (and the native backend) against the autograd oracle
# --------------------------------------------------------------------------------------------- #

# (model, layer, seed, lrn, modes): the oracle checks that the reference itself is right; a wrong
# reference would make test_native_matches_reference pass with a wrong engine.
ORACLE_CASES = [
    ("alexnet", "features.5", "value", "gradient", "pn"),
    ("alexnet", "classifier.2", "one", "gradient", "c"),     # the ReLU after fc6: a flat layer
    ("zfnet", "features.8", "value", "gradient", "pc"),
    ("zfnet", "features.8", "one", "identity", "nm"),
    ("geometry", "features.7", "one", "gradient", "cpnm"),
    ("geometry", "features.14", "value", "identity", "cpnm"),
    ("geometry", "head.1", "value", "gradient", "cnm"),
    ("wide", "features.14", "value", "gradient", "cpnm"),     # windows taller than the map
    ("poolnet", "avg", "value", "gradient", "cpnm"),
    ("poolnet", "conv3", "one", "gradient", "cpnm"),
    ("convrelupool", "", "one", "gradient", "cnm"),            # layer "": the model's output
    ("convrelupool", "features", "value", "gradient", "cpnm"),  # a container: its output
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ORACLE_CASES, ids=["-".join(c[:4]) + "-" + c[4] for c in ORACLE_CASES])
def test_projection_matches_autograd_oracle(device, case):
    name, layer, seed, lrn, modes = case
    model, model64 = model_on(name, device, torch.float64), float64_copy(name)
    images = images_for(name, device)
    every = selections(layer_output(model, images, layer), case_rng("oracle", *case))
    for mode in (MODE_LETTERS[letter] for letter in modes):
        selection = every[mode]
        truth = deconv_oracle(model64, images, layer, seed=seed, lrn=lrn, **selection)
        for backend in ("reference", "auto"):
            result = deconvcuda.project(model, images, layer, seed=seed, lrn=lrn, backend=backend,
                                        **on_device(selection, device))
            assert_projections_close(result, truth, rtol=1e-9, msg=f"{name} {layer} {mode} {backend}")


def test_oracle_is_sensitive_to_the_rules():  # the oracle runs on the CPU only: no device parameter
    """The cases above can fail: on the same selection, rectifying ReLU gradients, masking them
    (plain autograd) and passing them through give different projections, and so do the two LRN
    modes and the two seeds."""
    model64 = float64_copy("geometry")
    images = images_for("geometry", "cpu")
    out = layer_output(model64, images, "features.14")
    neurons = selections(out, case_rng("sensitive"))["neurons"]["neurons"]
    variants = [("rectify", "gradient", "value"), ("mask", "gradient", "value"), ("identity", "gradient", "value"),
                ("rectify", "identity", "value"), ("rectify", "gradient", "one")]
    results = {f"relu={rule} lrn={lrn} seed={seed}": deconv_oracle(model64, images, "features.14", neurons=neurons,
                                                                    relu_backward=rule, lrn=lrn, seed=seed)
               for rule, lrn, seed in variants}
    keys = list(results)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            difference = (results[a] - results[b]).abs().max() / results[a].abs().max()
            assert difference > 1e-3, f"{a} and {b} give the same projections: the tests could not tell them apart"


# --------------------------------------------------------------------------------------------- #
# 2. Captum's NeuronDeconvolution
# --------------------------------------------------------------------------------------------- #

# (model, layer whose output is >= 0, so that seed="value" is the attribution times the value: the
# reverse is positively homogeneous, not linear). Captum hooks nn.ReLU modules; it handles
# AlexNet's and ZFNet's in-place ones (checked here against the plain gradient, which differs).
CAPTUM_CASES = [
    ("alexnet", "features.4"),      # the ReLU after conv2, in place
    ("alexnet", "classifier.2"),    # the ReLU after fc6: a flat layer, neuron_selector (unit,)
    ("zfnet", "features.9"),        # the ReLU after conv3: both LRNs below, by their gradient
    ("convrelupool", "features.7"),
]


@pytest.mark.filterwarnings("ignore::UserWarning")  # Captum warns that it sets requires_grad and hooks
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name, layer", CAPTUM_CASES, ids=["-".join(c) for c in CAPTUM_CASES])
def test_agrees_with_captum_neuron_deconvolution(device, name, layer):
    captum_attr = pytest.importorskip("captum.attr")
    model, model64 = model_on(name, device, torch.float64), float64_copy(name)
    images = images_for(name, device)
    out = layer_output(model64, images, layer)
    rows = selections(out, case_rng("captum", name, layer))["neurons"]["neurons"]
    # two neurons, each projected in both images: the last row and column's, and one inside
    chosen = [rows[1], rows[6]] if out.dim() == 4 else [rows[0], rows[3]]
    positive = 0
    for row in chosen:
        channel = int(row[1])
        position = None if out.dim() == 2 else (int(row[2]), int(row[3]))
        selector = (channel,) if position is None else (channel,) + position
        attribution = captum_attr.NeuronDeconvolution(model64, model64.get_submodule(layer)).attribute(
            images.detach().cpu().clone(), neuron_selector=selector)
        assert_no_hooks(model64, "Captum")
        value = out[(slice(None), channel) + (() if position is None else position)]
        positive += int((value > 0).sum())
        msg = f"{name} {layer} neuron {selector}"
        one = deconvcuda.project(model, images, layer, channel=channel, position=position, seed="one")
        assert_projections_close(one, attribution, rtol=1e-9, msg=msg + " seed=one")
        by_value = deconvcuda.project(model, images, layer, channel=channel, position=position, seed="value")
        assert_projections_close(by_value, attribution * value.view(-1, 1, 1, 1), rtol=1e-9,
                                 msg=msg + " seed=value", nonzero=False)
        if row is chosen[0]:
            # Captum really rectified: its attribution is not the plain gradient
            x = images.detach().cpu().clone().requires_grad_(True)
            with torch.enable_grad():
                plain = forward_to_layer(model64, x, layer)[(slice(None), channel) + (() if position is None
                                                                                    else position)]
                (gradient,) = torch.autograd.grad(plain.sum(), x)
            assert not torch.allclose(gradient, attribution), f"{msg}: Captum returned the plain gradient"
    assert positive > 0, f"{name} {layer}: every chosen activation is zero; seed='value' is not tested"


# --------------------------------------------------------------------------------------------- #
# 3. Every form of ReLU rectifies
# --------------------------------------------------------------------------------------------- #

RELU_FORMS = ["nn.ReLU", "nn.ReLU(inplace=True)", "nn.ReLU(inplace=True) (result unused)", "nn.ReLU reused",
              "F.relu", "F.relu(inplace=True)", "F.relu(inplace=True) (result unused)", "F.relu_", "torch.relu",
              "torch.relu_", "Tensor.relu", "Tensor.relu_", "Tensor.relu_ (result unused)"]


class OneReluFormNet(nn.Module):
    """conv -> ReLU -> conv -> ReLU -> overlapping max pool -> conv -> ReLU -> conv, every ReLU in
    the one ``form`` (for "nn.ReLU reused": the same module, called three times)."""

    def __init__(self, form: str):
        super().__init__()
        self.form = form
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 8, 3)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv4 = nn.Conv2d(8, 5, 3)
        self.relus = nn.ModuleList([nn.ReLU(inplace=form.startswith("nn.ReLU(inplace=True)")) for _ in range(3)])
        self.shared = nn.ReLU()

    def relu(self, x, i: int):
        form = self.form
        if form in ("nn.ReLU", "nn.ReLU(inplace=True)"):
            return self.relus[i](x)
        if form == "nn.ReLU reused":
            return self.shared(x)
        if form == "F.relu":
            return F.relu(x)
        if form == "F.relu(inplace=True)":
            return F.relu(x, inplace=True)
        if form == "F.relu_":
            return F.relu_(x)
        if form == "torch.relu":
            return torch.relu(x)
        if form == "torch.relu_":
            return torch.relu_(x)
        if form == "Tensor.relu":
            return x.relu()
        if form == "Tensor.relu_":
            return x.relu_()
        # the mutation is the only trace of these ReLUs
        if form == "Tensor.relu_ (result unused)":
            x.relu_()
            return x
        if form == "F.relu(inplace=True) (result unused)":
            F.relu(x, inplace=True)
            return x
        if form == "nn.ReLU(inplace=True) (result unused)":
            self.relus[i](x)
            return x
        raise AssertionError(form)

    def forward(self, x):
        x = self.relu(self.conv2(self.relu(self.conv1(x), 0)), 1)
        x = F.max_pool2d(x, 3, stride=2)
        return self.conv4(self.relu(self.conv3(x), 2))


class MixedReluNet(nn.Module):
    """Every ReLU form in one forward, beside functional pools and a view-flatten; conv2's output
    is rectified in place after the call (``x.relu_()``), which must not change conv2's own
    activations (the layer's output is what the module returned)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 8, 3, padding=1)
        self.conv3, self.conv4 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3)
        self.conv5 = nn.Conv2d(8, 6, 3, padding=1)
        self.shared, self.inplace = nn.ReLU(), nn.ReLU(inplace=True)
        self.fc = nn.Linear(6 * 4 * 4, 7)

    def forward(self, x):
        x = self.shared(self.conv1(x))
        x = self.conv2(x)
        x.relu_()
        x = F.max_pool2d(x, 2, ceil_mode=True)
        x = torch.relu(self.conv3(x)).relu()
        x = self.inplace(self.conv4(x))
        x = F.avg_pool2d(x, 3, stride=2, padding=1)
        x = self.shared(F.relu(self.conv5(x), inplace=True))
        return self.fc(x.view(x.size(0), -1))


@functools.lru_cache(maxsize=None)
def relu_net(form: str) -> nn.Module:
    """A float64 eval-mode net (random weights from a fixed seed) with ReLUs in ``form``."""
    return _seeded(7, lambda: (MixedReluNet() if form == "mixed" else OneReluFormNet(form)).double().eval())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", RELU_FORMS + ["mixed"])
def test_every_relu_form_rectifies(device, form):
    model = relu_net(form)
    layers = ["conv2", "conv5", ""] if form == "mixed" else ["conv4"]
    size = (17, 17) if form == "mixed" else (21, 19)
    images = random_tensor((2, 3) + size, dtype=torch.float64, device=device,
                           generator=torch_generator(case_rng("relu forms", form)))
    device_model = copy.deepcopy(model).to(device)
    for layer in layers:
        out = layer_output(model, images, layer)
        for mode, selection in selections(out, case_rng("relu forms", form, layer)).items():
            truth = deconv_oracle(model, images, layer, **selection)
            for backend in ("auto", "reference"):
                result = deconvcuda.project(device_model, images, layer, backend=backend,
                                            **on_device(selection, device))
                assert_projections_close(result, truth, rtol=1e-9, msg=f"{form} {layer} {mode} {backend}")
        # the case can fail: an engine that masked these ReLUs (autograd's rule) or passed the
        # gradient through them would be off
        neurons = selections(out, case_rng("relu forms", form, layer))["neurons"]["neurons"]
        rectified = deconv_oracle(model, images, layer, neurons=neurons)
        for rule in ("mask", "identity"):
            other = deconv_oracle(model, images, layer, neurons=neurons, relu_backward=rule)
            assert (other - rectified).abs().max() > 1e-3 * rectified.abs().max(), f"{form}: insensitive to {rule}"


# --------------------------------------------------------------------------------------------- #
# 4. The model is left untouched, and projected with eval semantics
# --------------------------------------------------------------------------------------------- #

class TrainModeNet(nn.Module):
    """BatchNorm and Dropout before the layers projected (in train mode they would change the
    forward: batch statistics, random zeros), an in-place ReLU, LRN, a flat head."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.Dropout(0.5),   # 0-3
            nn.MaxPool2d(3, stride=2), nn.LocalResponseNorm(3, alpha=0.5),                              # 4 5
            nn.Conv2d(8, 10, 3, padding=1), nn.ReLU(), nn.Dropout2d(0.5),                                # 6-8
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(10 * 7 * 7, 6))

    def forward(self, x):
        return self.classifier(self.features(x))


def model_state(model: nn.Module):
    """Everything project must leave as it was: parameters and buffers (their bits), requires_grad,
    .grad, every module's training flag and its hooks."""
    return {
        "tensors": {name: t.detach().clone() for name, t in model.state_dict(keep_vars=True).items()},
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "grads": {name: p.grad for name, p in model.named_parameters()},
        "training": {name: m.training for name, m in model.named_modules()},
        "hooks": {name: {kind: dict(getattr(m, kind)) for kind in ("_forward_hooks", "_forward_pre_hooks",
                                                                 "_backward_hooks", "_backward_pre_hooks")}
                  for name, m in model.named_modules()},
    }


@pytest.mark.parametrize("device", DEVICES)
def test_model_is_left_untouched_and_projected_in_eval_mode(device):
    torch.manual_seed(11)
    model = randomize_batch_norms(TrainModeNet(), 11).to(device)
    model.features[0].weight.requires_grad_(False)  # a mix of frozen and trainable parameters
    eval_copy = copy.deepcopy(model).eval()
    model64 = copy.deepcopy(model).double().eval().cpu()  # the oracle's (it runs the model: no hooks on it)
    calls = []
    model.features[1].register_forward_hook(lambda *args: calls.append("forward hook"))
    model.features[6].register_forward_pre_hook(lambda *args: calls.append("forward pre-hook"))
    model.features[7].register_full_backward_hook(lambda *args: calls.append("backward hook"))
    model.train()
    before = model_state(model)
    images = random_tensor((2, 3, 15, 15), device=device, generator=torch_generator(case_rng("untouched")))
    images_before = images.clone()

    for layer in ("features.8", "classifier.2"):
        out = layer_output(model64, images, layer)
        for mode, selection in selections(out, case_rng("untouched", layer)).items():
            selection = on_device(selection, device)
            for backend in ("auto", "reference"):
                msg = f"{layer} {mode} {backend}"
                result = deconvcuda.project(model, images, layer, backend=backend, **selection)
                # eval semantics: the same as projecting the eval-mode copy, bit for bit (the same
                # computation, and native results are deterministic), and as the eval-mode oracle
                assert_bitwise_equal(result, deconvcuda.project(eval_copy, images, layer, backend=backend,
                                                                **selection), msg)
                assert_projections_close(result, deconv_oracle(model64, images, layer, **selection), rtol=1e-4,
                                         msg=msg)
                assert torch.is_grad_enabled(), f"{msg}: grad mode not restored"

    after = model_state(model)
    assert model.training and after["training"] == before["training"], "training flags changed"
    assert after["requires_grad"] == before["requires_grad"], "requires_grad flags changed"
    assert all(g is None for g in after["grads"].values()), "project left .grad on parameters"
    assert after["hooks"] == before["hooks"], "hooks added or removed"
    for name, tensor in before["tensors"].items():
        assert_bitwise_equal(after["tensors"][name], tensor, f"{name} changed")  # incl. BN running stats
    assert calls == [], f"project ran the model itself ({calls}): its hooks fired"
    assert_bitwise_equal(images, images_before, "the images changed")


# --------------------------------------------------------------------------------------------- #
# 5. Bad input: clear errors
# --------------------------------------------------------------------------------------------- #

class Block(nn.Module):
    """A submodule whose forward applies ``op`` (a function call the plan cannot reverse)."""

    def __init__(self, op: str):
        super().__init__()
        self.op = op
        self.conv = nn.Conv2d(6, 6, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        if self.op == "torch.tanh":
            return torch.tanh(y)
        if self.op == "F.silu":
            return F.silu(y)
        if self.op == "scaled residual":
            return x + 0.5 * y
        if self.op == "spatial cat":
            return torch.cat([x, y], dim=2)
        raise AssertionError(self.op)


class UnsupportedNet(nn.Module):
    """conv -> ``middle`` -> conv -> ReLU -> ``tail``: ``middle`` is before the layer "head",
    ``tail`` after it."""

    def __init__(self, middle: nn.Module, tail: nn.Module, head_in: int = 6):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), middle)
        self.head = nn.Conv2d(head_in, 4, 3)
        self.tail = tail

    def forward(self, x):
        return self.tail(F.relu(self.head(self.stem(x))))


def _bad_calls():
    """(id, call(model, images) -> result, exception type, patterns the message must contain)."""
    longs = lambda rows: torch.tensor(rows, dtype=torch.long)  # noqa: E731
    return [
        ("unknown layer", lambda m, x: deconvcuda.project(m, x, "features.99", channel=0), ValueError,
         [r"'features\.99'", r"'features\.0'", r"'classifier\.1'"]),  # the valid names are listed
        ("channel too large", lambda m, x: deconvcuda.project(m, x, "features.7", channel=12), IndexError,
         [r"channel", r"\[0, 12\)", r"12"]),
        ("channel negative", lambda m, x: deconvcuda.project(m, x, "features.7", channel=-1), IndexError,
         [r"channel", r"-1"]),
        ("channel not an int", lambda m, x: deconvcuda.project(m, x, "features.7", channel=1.5), TypeError,
         [r"channel", r"int"]),
        ("position row", lambda m, x: deconvcuda.project(m, x, "features.7", channel=0, position=(3, 0)),
         IndexError, [r"position", r"3x3", r"\(3, 0\)"]),
        ("position column", lambda m, x: deconvcuda.project(m, x, "features.7", channel=0, position=(0, -1)),
         IndexError, [r"position", r"\(0, -1\)"]),
        ("position not a pair", lambda m, x: deconvcuda.project(m, x, "features.7", channel=0, position=(1,)),
         TypeError, [r"position", r"pair"]),
        ("position on a flat layer", lambda m, x: deconvcuda.project(m, x, "classifier.1", channel=0,
                                                                     position=(0, 0)),
         ValueError, [r"position", r"flat"]),
        ("position without channel", lambda m, x: deconvcuda.project(m, x, "features.7", position=(0, 0)),
         ValueError, [r"position", r"channel"]),
        ("channel and neurons", lambda m, x: deconvcuda.project(m, x, "features.7", channel=0,
                                                                neurons=longs([[0, 0, 0, 0]])),
         ValueError, [r"channel", r"neurons"]),
        ("neurons image", lambda m, x: deconvcuda.project(m, x, "features.7", neurons=longs([[0, 0, 0, 0],
                                                                                             [2, 0, 0, 0]])),
         IndexError, [r"neurons row 1", r"\[2, 0, 0, 0\]", r"\[2, 12, 3, 3\]"]),
        ("neurons channel", lambda m, x: deconvcuda.project(m, x, "features.7", neurons=longs([[1, 12, 0, 0]])),
         IndexError, [r"neurons row 0", r"\[1, 12, 0, 0\]"]),
        ("neurons y", lambda m, x: deconvcuda.project(m, x, "features.7", neurons=longs([[1, 0, 3, 0]])),
         IndexError, [r"neurons row 0"]),
        ("neurons x negative", lambda m, x: deconvcuda.project(m, x, "features.7", neurons=longs([[1, 0, 0, -1]])),
         IndexError, [r"neurons row 0"]),
        ("neurons y on a flat layer", lambda m, x: deconvcuda.project(m, x, "classifier.1",
                                                                      neurons=longs([[0, 1, 1, 0]])),
         IndexError, [r"neurons row 0", r"flat"]),
        ("neurons int32", lambda m, x: deconvcuda.project(m, x, "features.7",
                                                          neurons=torch.zeros(1, 4, dtype=torch.int32)),
         TypeError, [r"neurons", r"LongTensor", r"int32"]),
        ("neurons float", lambda m, x: deconvcuda.project(m, x, "features.7", neurons=torch.zeros(1, 4)),
         TypeError, [r"neurons", r"LongTensor", r"float32"]),
        ("neurons [P, 3]", lambda m, x: deconvcuda.project(m, x, "features.7", neurons=longs([[0, 0, 0]])),
         ValueError, [r"neurons", r"\[P, 4\]", r"\[1, 3\]"]),
        ("neurons 1-D", lambda m, x: deconvcuda.project(m, x, "features.7", neurons=longs([0, 0, 0, 0])),
         ValueError, [r"neurons", r"\[P, 4\]", r"\[4\]"]),
        ("neurons a list", lambda m, x: deconvcuda.project(m, x, "features.7", neurons=[[0, 0, 0, 0]]),
         TypeError, [r"neurons", r"LongTensor", r"list"]),
        ("images 3-D", lambda m, x: deconvcuda.project(m, x[0], "features.7", channel=0), ValueError,
         [r"images", r"4-D", r"\[3, 19, 19\]"]),
        ("images 5-D", lambda m, x: deconvcuda.project(m, x[None], "features.7", channel=0), ValueError,
         [r"images", r"4-D"]),
        ("images with 1 channel", lambda m, x: deconvcuda.project(m, x[:, :1], "features.7", channel=0),
         ValueError, [r"images", r"3 channels", r"got 1", r"features\.0"]),
        ("images too small", lambda m, x: deconvcuda.project(m, x[:, :, :4, :4], "features.7", channel=0),
         ValueError, [r"\[N, 3, 4, 4\]", r"features\.\d"]),
        ("integer images", lambda m, x: deconvcuda.project(m, (x * 100).to(torch.int64), "features.7", channel=0),
         TypeError, [r"images", r"floating", r"int64"]),
        ("images a list", lambda m, x: deconvcuda.project(m, x.tolist(), "features.7", channel=0),
         TypeError, [r"images", r"Tensor"]),
        ("model not a module", lambda m, x: deconvcuda.project(lambda t: t, x, "features.7", channel=0),
         TypeError, [r"model", r"nn\.Module"]),
        ("seed", lambda m, x: deconvcuda.project(m, x, "features.7", channel=0, seed="max"), ValueError,
         [r"seed", r"'value', 'one'", r"'max'"]),
        ("lrn", lambda m, x: deconvcuda.project(m, x, "features.7", channel=0, lrn="skip"), ValueError,
         [r"lrn", r"'gradient', 'identity'", r"'skip'"]),
        ("backend", lambda m, x: deconvcuda.project(m, x, "features.7", channel=0, backend="cuda"), ValueError,
         [r"backend", r"'auto', 'reference'", r"'cuda'"]),
    ]


BAD_CALLS = _bad_calls()


# every bad call through deconvcuda.project and through reference.project, which shares the checks
# and must raise the same
BAD_PROJECT_CALLS = [pytest.param(bad, project, id=f"{bad[0]}-{label}") for bad in BAD_CALLS
                     for project, label in ((deconvcuda.project, "native"), (reference.project, "reference"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad, project", BAD_PROJECT_CALLS)
def test_bad_input_raises_a_clear_error(device, bad, project, monkeypatch):
    name, call, error, patterns = bad
    monkeypatch.setattr(deconvcuda, "project", project)
    model = model_on("convrelupool", device)
    images = images_for("convrelupool", device, torch.float32)
    with pytest.raises(error) as raised:
        call(model, images)
    message = str(raised.value)
    assert message.startswith("project: "), f"{name}: the message does not say who raised it: {message}"
    for pattern in patterns:
        assert re.search(pattern, message), f"{name}: {pattern!r} not in the message: {message}"


# (id, the module between the two convs, patterns the message must contain: what, and where)
UNSUPPORTED = [
    ("nn.Sigmoid", lambda: nn.Sigmoid(), [r"Sigmoid module 'stem\.1'", r"in module 'stem' \(Sequential\)",
                                          r"layer 'head'", r"supported: .*ReLU"]),
    ("nn.Tanh", lambda: nn.Tanh(), [r"Tanh module 'stem\.1'", r"layer 'head'"]),
    ("torch.tanh", lambda: Block("torch.tanh"), [r"torch\.tanh", r"in module 'stem\.1' \(Block\)", r"layer 'head'"]),
    ("F.silu", lambda: Block("F.silu"), [r"F\.silu", r"in module 'stem\.1' \(Block\)", r"layer 'head'"]),
    ("scaled residual", lambda: Block("scaled residual"), [r"operator\.mul", r"in module 'stem\.1' \(Block\)",
                                                           r"layer 'head'", r"supported: .*add"]),
    ("spatial cat", lambda: Block("spatial cat"), [r"cat", r"in module 'stem\.1' \(Block\)", r"dim 2",
                                                   r"channel dim", r"layer 'head'"]),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("name, middle, patterns", UNSUPPORTED, ids=[u[0] for u in UNSUPPORTED])
def test_ops_outside_the_table_take_their_gradient_or_strict_names_them(device, backend, name, middle, patterns):
    """Without strict, an op outside the paper's table takes its exact gradient (the oracle's); with
    strict=True it is refused, the message naming the op, where it sits and what is supported."""
    torch.manual_seed(5)
    model = UnsupportedNet(middle(), nn.Identity(), head_in=6).eval().to(device)
    images = random_tensor((2, 3, 9, 9), dtype=torch.float64, device=device)
    with pytest.raises(ValueError) as raised:
        deconvcuda.project(model, images, "head", channel=0, backend=backend, strict=True)
    message = str(raised.value)
    for pattern in patterns + [r"strict=True"]:
        assert re.search(pattern, message), f"{name}: {pattern!r} not in the message: {message}"
    # a layer before the op is fine with strict=True too
    assert deconvcuda.project(model, images, "stem.0", channel=0, backend=backend, strict=True).abs().max() > 0
    model64 = copy.deepcopy(model).double().cpu()
    for selection in ({"channel": 0}, {}):
        truth = deconv_oracle(model64, images, "head", **selection)
        result = deconvcuda.project(model, images, "head", backend=backend, **selection)
        assert_projections_close(result, truth, rtol=1e-5, msg=f"{name} {selection}")


@pytest.mark.parametrize("device", DEVICES)
def test_a_layer_called_several_times_is_ambiguous(device):
    model = copy.deepcopy(relu_net("nn.ReLU reused")).to(device)
    images = random_tensor((1, 3, 21, 19), dtype=torch.float64, device=device)
    with pytest.raises(ValueError, match=r"layer 'shared' is called 3 times"):
        deconvcuda.project(model, images, "shared", channel=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tail", ["nn.Sigmoid", "torch.cat", "residual"])
def test_unsupported_layer_after_the_target_does_not_matter(device, tail):
    torch.manual_seed(6)
    tails = {"nn.Sigmoid": lambda: nn.Sigmoid(), "torch.cat": lambda: TailCat(), "residual": lambda: TailResidual()}
    model64 = UnsupportedNet(nn.ReLU(), tails[tail]()).double().eval()
    model = copy.deepcopy(model64).to(device)
    images = random_tensor((2, 3, 11, 11), dtype=torch.float64, device=device,
                           generator=torch_generator(case_rng("after", tail)))
    for mode, selection in selections(layer_output(model64, images, "head"), case_rng("after", tail)).items():
        truth = deconv_oracle(model64, images, "head", **selection)
        for backend in ("auto", "reference"):
            result = deconvcuda.project(model, images, "head", backend=backend, **on_device(selection, device))
            assert_projections_close(result, truth, rtol=1e-9, msg=f"{tail} {mode} {backend}")


class TailCat(nn.Module):
    def forward(self, x):
        return torch.cat([x, torch.sigmoid(x)], dim=1)


class TailResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return x + torch.tanh(self.conv(x))


# --------------------------------------------------------------------------------------------- #
# 6. dtype, device, shape; half precision; determinism; empty selections; layouts
# --------------------------------------------------------------------------------------------- #

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("name, layer", [("geometry", "features.14"), ("geometry", "head.1"),
                                         ("zfnet", "features.8")], ids=["geometry-conv", "geometry-flat", "zfnet"])
def test_every_dtype(device, dtype, name, layer):
    """The result has the images' dtype, device and shape. Its error against the float64 projection
    of the same (rounded) images is at most twice the reference's in the same dtype, plus a few
    roundings (conftest.assert_close_to_oracle): in half precision the forward's own rounding
    dominates and both backends share it. ZFNet's LRN has no half-precision CPU kernel in PyTorch."""
    model = model_named(name) if device == "cpu" else _cuda_copy(name)  # float32: the engine casts
    images = images_for(name, device, dtype)
    out = layer_output(model, images, layer)
    for mode, selection in selections(out, case_rng("dtypes", name, layer)).items():
        selection = on_device(selection, device)
        msg = f"{name} {layer} {mode} {dtype_id(dtype)}"
        native = deconvcuda.project(model, images, layer, **selection)
        rows = selection["neurons"].shape[0] if "neurons" in selection else images.shape[0]
        assert native.shape == (rows,) + tuple(images.shape[1:]), msg
        assert native.dtype == dtype and native.device == images.device, msg
        expected = reference.project(model, images, layer, **selection)
        truth = reference.project(float64_copy(name), images.cpu().double(), layer, **on_device(selection, "cpu"))
        assert truth.abs().max() > 0, msg
        assert_close_to_oracle(native, expected, truth.to(device), msg=msg)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=dtype_id)
def test_native_results_are_deterministic(device, dtype):
    """Bit for bit, run to run: overlapping pools (AlexNet's 3x3/2) sum by gathering, not with atomics."""
    model = model_on("alexnet", device)
    images = images_for("alexnet", device, dtype)
    selection = on_device(selections(layer_output(model, images, "features.10"), case_rng("deterministic"))["neurons"],
                          device)
    for kwargs in (selection, {}):
        first = deconvcuda.project(model, images, "features.10", **kwargs)
        assert_bitwise_equal(deconvcuda.project(model, images, "features.10", **kwargs), first, str(kwargs.keys()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("layer", ["features.5", "classifier.1"])
def test_empty_selections_give_empty_results(device, backend, layer):
    """No neurons rows, or no images: [0, C_in, H, W] in the images' dtype and device."""
    model = model_on("convrelupool", device)
    images = images_for("convrelupool", device, torch.float16)
    calls = {"no neurons": (images, dict(neurons=torch.zeros(0, 4, dtype=torch.long, device=device))),
             "no images, channel": (images[:0], dict(channel=1)), "no images, whole map": (images[:0], {})}
    for what, (batch, selection) in calls.items():
        result = deconvcuda.project(model, batch, layer, backend=backend, **selection)
        assert result.shape == (0,) + tuple(images.shape[1:]), what
        assert result.dtype == images.dtype and result.device == images.device, what


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name, layer", [("geometry", "features.14"), ("geometry", "head.1")])
def test_projections_in_chunks(device, name, layer, monkeypatch):
    """Projections are computed chunk by chunk (engine.CHUNK_ELEMENTS bounds the memory of one):
    chunks of one projection give the same results as one chunk of all."""
    model = model_on(name, device, torch.float64)
    images = images_for(name, device, n=3)
    every = selections(layer_output(model, images, layer), case_rng("chunks", layer))
    expected = {mode: deconvcuda.project(model, images, layer, **on_device(selection, device))
                for mode, selection in every.items()}
    monkeypatch.setattr(engine, "CHUNK_ELEMENTS", 1)
    for mode, selection in every.items():
        chunked = deconvcuda.project(model, images, layer, **on_device(selection, device))
        assert_projections_close(chunked, expected[mode], rtol=1e-12, msg=f"{layer} {mode}")


@pytest.mark.parametrize("device", DEVICES)
def test_neurons_repeat_the_channel_selection(device):
    """A neurons row is the same projection as channel + position on its image (in another batch
    and order), and the channel mode's position is the first maximum of the map, row-major."""
    model = model_on("geometry", device, torch.float64)
    images = images_for("geometry", device, n=3)
    out = layer_output(model, images, "features.10")
    channel = int(out[:, :, 1:-1, 1:-1].amax(dim=(0, 2, 3)).argmax())  # a channel with a strongest activation
    strongest = out[:, channel].flatten(1).argmax(dim=1)
    ys, xs = strongest // out.shape[3], strongest % out.shape[3]
    by_channel = deconvcuda.project(model, images, "features.10", channel=channel)
    neurons = torch.tensor([[i, channel, int(ys[i]), int(xs[i])] for i in (2, 0, 1, 2)], device=device)
    by_neurons = deconvcuda.project(model, images, "features.10", neurons=neurons)
    assert_projections_close(by_neurons, by_channel[[2, 0, 1, 2]], rtol=1e-12, msg="neurons vs channel")
    for i in range(3):
        by_position = deconvcuda.project(model, images[i:i + 1], "features.10", channel=channel,
                                         position=(int(ys[i]), int(xs[i])))
        assert_projections_close(by_position, by_channel[i:i + 1], rtol=1e-12, msg=f"position, image {i}")
    # a different position of the same map gives a different projection: the comparison can fail
    other = deconvcuda.project(model, images[:1], "features.10", channel=channel,
                               position=(int(ys[0] + 1) % out.shape[2], int(xs[0])))
    assert not torch.allclose(other, by_channel[:1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["channels_last", "non-contiguous", "requires_grad"])
def test_image_layouts_give_the_same_projection(device, layout):
    model = model_on("zfnet", device, torch.float64)
    images = images_for("zfnet", device)
    if layout == "channels_last":
        other = images.contiguous(memory_format=torch.channels_last)
    elif layout == "non-contiguous":
        wide = torch.zeros(*images.shape[:3], 2 * images.shape[3], dtype=images.dtype, device=device)
        wide[..., ::2] = images
        other = wide[..., ::2]
    else:
        other = images.clone().requires_grad_(True)
    selection = on_device(selections(layer_output(model, images, "features.8"), case_rng("layouts"))["neurons"], device)
    for kwargs in (selection, {"channel": 3}):
        expected = deconvcuda.project(model, images, "features.8", **kwargs)
        result = deconvcuda.project(model, other, "features.8", **kwargs)
        assert_projections_close(result, expected, rtol=1e-12, msg=f"{layout} {list(kwargs)}")
        assert not result.requires_grad, "the projection is not differentiable; it must not pretend to be"


# --------------------------------------------------------------------------------------------- #
# 7. The windows path (receptive-field crops) against the full-map path of the same backend
# --------------------------------------------------------------------------------------------- #

WINDOW_CASES = [("geometry", "features.10"), ("geometry", "features.14"), ("wide", "features.14"),
                ("poolnet", "avg"), ("alexnet", "features.5"), ("zfnet", "features.8")]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name, layer", WINDOW_CASES, ids=["-".join(c) for c in WINDOW_CASES])
def test_windows_equal_full_maps(device, name, layer, monkeypatch):
    """The native backend with its windows, and with every step forced onto full maps (the same
    kernels otherwise): point seeds at the corners, whose windows reach past the map's edges,
    through padded, strided, dilated and grouped convs, ceil_mode and overlapping pools, average
    pools, BatchNorm and LRN."""
    model = model_on(name, device, torch.float64)
    images = images_for(name, device)
    every = selections(layer_output(model, images, layer), case_rng("windows", name, layer))
    real = engine._schedule
    for mode in ("channel", "channel+position", "neurons"):
        selection = on_device(every[mode], device)
        with recording_schedules(monkeypatch) as schedules:
            windowed = deconvcuda.project(model, images, layer, **selection)
        assert any(schedules[0]), f"{name} {layer} {mode}: no step ran on windows {schedules[0]}"
        monkeypatch.setattr(engine, "_schedule", lambda program, crop: real(program, False))
        full = deconvcuda.project(model, images, layer, **selection)
        monkeypatch.setattr(engine, "_schedule", real)
        assert_projections_close(windowed, full, rtol=1e-12, msg=f"{name} {layer} {mode}")
