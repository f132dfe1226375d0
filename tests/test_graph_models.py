"""Graph models (issue: graph engine): torchvision's ResNet, ResNeXt, Wide ResNet, DenseNet, GoogLeNet,
Inception v3, SqueezeNet, MobileNetV2 and VGG-BN, at block outputs, under every rule and selection
mode, against the autograd oracle that swaps every rectifier's backward (conftest.rule_oracle):
float32 projections within 2e-4 of the largest value of the float64 oracle. Then windows against
full maps on graph models, receptive fields through branches, layers(), and the errors."""
from __future__ import annotations

import functools
import re
import zlib

import pytest
import torch
from torch import nn

from conftest import DEVICES, case_rng, forward_to_layer, randomize_batch_norms, rule_oracle
import deconvcuda
from deconvcuda import engine

torchvision = pytest.importorskip("torchvision")

RULES = ["deconvnet", "guided", "gradient"]

# (torchvision model, layer, image size): block outputs through residual additions, concatenations,
# grouped and depthwise convolutions, ReLU6, ceil_mode and functional pools, a reused nn.ReLU.
GRAPH_CASES = [
    ("resnet18", "layer2", 48),
    ("resnet50", "layer2.0", 40),
    ("resnext50_32x4d", "layer1", 40),
    ("wide_resnet50_2", "layer1.1", 32),
    ("densenet121", "features.transition1", 40),
    ("googlenet", "inception3b", 48),
    ("inception_v3", "Mixed_5b", 80),
    ("squeezenet1_1", "features.6", 48),
    ("mobilenet_v2", "features.5", 40),
    ("vgg11_bn", "features.13", 40),
    ("resnet18", "", 40),  # the logits: flat, through the global pool and fc
]


@functools.lru_cache(maxsize=None)
def graph_model(name: str) -> nn.Module:
    """A torchvision model with random weights (seeded) and BatchNorm statistics away from 0 and 1."""
    torch.manual_seed(zlib.crc32(name.encode()))  # not hash(): that changes from one process to the next
    kwargs = {"aux_logits": False, "init_weights": False} if name in ("googlenet", "inception_v3") else {}
    return randomize_batch_norms(getattr(torchvision.models, name)(**kwargs).eval(), seed=len(name))


@functools.lru_cache(maxsize=None)
def graph_model64(name: str) -> nn.Module:
    import copy
    return copy.deepcopy(graph_model(name)).double()


def graph_images(size: int, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(size))


def graph_selections(out: torch.Tensor, rng) -> dict:
    """The four modes; points at corners (windows reach past the map) and in the middle."""
    if out.dim() == 2:
        units = out.abs().amax(0).topk(3).indices.tolist()
        return {"channel": dict(channel=units[0]),
                "neurons": dict(neurons=torch.tensor([[1, units[1], 0, 0], [0, units[2], 0, 0]])), "whole map": {}}
    c, h, w = out.shape[1:]

    def strongest(image, y, x):
        return int(out[image, :, y, x].argmax())

    alive = [ch for ch in range(c) if out[:, ch].max() > 0] or list(range(c))
    rows = [[1, strongest(1, 0, 0), 0, 0], [0, strongest(0, h - 1, w - 1), h - 1, w - 1],
            [1, strongest(1, h // 2, w // 2), h // 2, w // 2], [0, rng.randrange(c), rng.randrange(h), rng.randrange(w)]]
    return {"channel": dict(channel=rng.choice(alive)),
            "channel+position": dict(channel=strongest(0, 0, w - 1), position=(0, w - 1)),
            "neurons": dict(neurons=torch.tensor(rows)), "whole map": {}}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """The largest error of any projection, relative to that projection's largest |value|."""
    expected = expected.to(actual.device, torch.float64)
    error = (actual.double() - expected).flatten(1).abs().amax(1)
    return float((error / expected.flatten(1).abs().amax(1).clamp_min(1e-30)).max()) if error.numel() else 0.0


def assert_close_to_largest(actual: torch.Tensor, expected: torch.Tensor, rtol: float, msg: str) -> None:
    """Each projection within ``rtol`` of the largest |value| of the oracle's projection."""
    assert actual.shape == expected.shape, f"{msg}: shape {list(actual.shape)} != {list(expected.shape)}"
    expected = expected.to(actual.device, torch.float64)
    error = (actual.double() - expected).flatten(1).abs().amax(1)
    scale = expected.flatten(1).abs().amax(1)
    assert bool((scale > 0).any()), f"{msg}: the oracle projects to zero everywhere; the case tests nothing"
    bad = error > rtol * scale.clamp_min(1e-30)
    assert not bool(bad.any()), (f"{msg}: projection {int(bad.nonzero()[0, 0])} is off by "
                                 f"{float(error[bad][0]):.3g}, its largest |value| is {float(scale[bad][0]):.3g}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name, layer, size", GRAPH_CASES, ids=[f"{n}-{l or 'logits'}" for n, l, _ in GRAPH_CASES])
def test_graph_model_matches_the_rule_oracle(device, name, layer, size):
    model = graph_model(name).to(device)
    images = graph_images(size)
    with torch.no_grad():
        out = forward_to_layer(graph_model64(name), images.double(), layer)
    for turn, rule in enumerate(RULES):
        every = list(graph_selections(out, case_rng("graph", name, layer, rule)).items())
        # two modes per rule, in turn, so each case sees every rule and every mode
        for mode, selection in (every[(2 * turn) % len(every)], every[(2 * turn + 1) % len(every)]):
            seed = "one" if mode == "neurons" else "value"
            expected = rule_oracle(graph_model64(name), images, layer, **selection, rule=rule, seed=seed)
            moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in selection.items()}
            what = f"{name} {layer!r} {rule} {mode}"
            # float64 throughout: the same forward as the oracle's, so only the summation order differs
            exact = deconvcuda.project(graph_model64(name).to(device), images.double().to(device), layer, **moved,
                                       rule=rule, seed=seed)
            assert_close_to_largest(exact, expected, 1e-8, what + " (float64)")
            # float32: within 2e-4 of the largest value, or as close as autograd itself gets in float32
            # (a float32 forward can flip a near-zero ReLU mask against float64, in any implementation)
            actual = deconvcuda.project(model, images.to(device), layer, **moved, rule=rule, seed=seed)
            assert actual.dtype == torch.float32 and actual.device.type == device
            if relative_error(actual, expected) > 2e-4:
                autograd32 = rule_oracle(graph_model(name), images, layer, **selection, rule=rule, seed=seed,
                                         dtype=torch.float32)
                assert_close_to_largest(actual, expected, 2 * relative_error(autograd32, expected),
                                        what + " (float32, as close as autograd in float32)")
                assert_close_to_largest(actual, autograd32.double(), 2e-4, what + " (float32 vs autograd in float32)")
    model.cpu()
    graph_model64(name).cpu()


def test_the_rules_differ_on_a_graph_model():
    """The oracle comparison above can fail: the three rules give three different projections."""
    images = graph_images(48)
    results = [deconvcuda.project(graph_model("resnet18"), images, "layer2", channel=3, rule=rule) for rule in RULES]
    for a in range(3):
        for b in range(a + 1, 3):
            assert not torch.allclose(results[a], results[b], rtol=1e-3, atol=0), f"{RULES[a]} == {RULES[b]}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name, layer, size", [("resnet18", "layer2", 96), ("densenet121", "features.denseblock1", 64),
                                               ("googlenet", "inception3a", 96), ("mobilenet_v2", "features.6", 96)])
@pytest.mark.parametrize("rule", RULES)
def test_windows_equal_full_maps_on_graph_models(device, name, layer, size, rule, monkeypatch):
    """Point projections cropped to receptive-field windows (united where branches meet) equal the
    same kernels on full maps; and the windows path was taken."""
    model = graph_model(name).to(device)
    images = graph_images(size).to(device)
    with torch.no_grad():
        out = forward_to_layer(model, images, layer)
    neurons = graph_selections(out, case_rng("windows", name, layer))["neurons"]["neurons"].to(device)
    real = engine._schedule
    taken = []

    def spy(program, crop):
        windowed, peak = real(program, crop)
        taken.append(any(windowed))
        return windowed, peak

    monkeypatch.setattr(engine, "_schedule", spy)
    cropped = deconvcuda.project(model, images, layer, neurons=neurons, rule=rule)
    assert taken == [True], f"{name} {layer}: no node ran on windows"
    monkeypatch.setattr(engine, "_schedule", lambda program, crop: real(program, False))
    full = deconvcuda.project(model, images, layer, neurons=neurons, rule=rule)
    assert_close_to_largest(cropped, full.double(), 1e-5, f"{name} {layer} {rule}: windows vs full maps")
    model.cpu()


def test_reference_backend_on_a_graph_model():
    model = graph_model("squeezenet1_1")
    images = graph_images(48)
    with torch.no_grad():
        channel = int(forward_to_layer(model, images, "features.9").amax(dim=(0, 2, 3)).argmax())  # a live map
    for rule in RULES:
        native = deconvcuda.project(model, images, "features.9", channel=channel, rule=rule)
        reference = deconvcuda.reference.project(model, images, "features.9", channel=channel, rule=rule)
        assert_close_to_largest(native, reference.double(), 1e-5, f"native vs reference, {rule}")


@pytest.mark.parametrize("name, layer, size, field", [("resnet18", "layer2", 64, 99), ("resnet18", "layer1.0", 64, 27),
                                                      ("squeezenet1_1", "features.3", 64, 15)])
def test_receptive_field_through_branches(name, layer, size, field):
    """The union of every path's field (a residual block's identity path is narrower than its convs),
    and every non-zero pixel of a projection lies inside its box."""
    model = graph_model(name)
    found = deconvcuda.receptive_field(model, layer)
    assert found.size == (field, field)
    images = graph_images(size, n=1)
    with torch.no_grad():
        out = forward_to_layer(model, images, layer)
    h, w = out.shape[2:]
    for y, x in [(0, 0), (h - 1, w - 1), (h // 2, w // 3)]:
        channel = int(out[0, :, y, x].argmax())
        r = deconvcuda.project(model, images, layer, neurons=torch.tensor([[0, channel, y, x]]), rule="gradient")
        top, left, bottom, right = found.box(y, x)
        nonzero = r[0].abs().sum(0).nonzero()
        assert nonzero.numel() > 0
        assert int(nonzero[:, 0].min()) >= top and int(nonzero[:, 0].max()) < bottom
        assert int(nonzero[:, 1].min()) >= left and int(nonzero[:, 1].max()) < right


def test_layers_lists_nameable_layers_in_forward_order():
    listed = deconvcuda.layers(graph_model("resnet18"), (3, 64, 64))
    names = [entry.name for entry in listed]
    assert names.index("conv1") < names.index("layer1.0") < names.index("layer2") < names.index("fc")
    assert "layer1.0.relu" not in names  # called twice per block: no single output
    by_name = {entry.name: entry for entry in listed}
    assert by_name["layer2"].kind == "Sequential" and by_name["layer2"].shape == (128, 8, 8)
    assert by_name["fc"].shape == (1000,)


def test_a_module_called_twice_is_a_clear_error():
    with pytest.raises(ValueError, match=r"layer1\.0\.relu.*called 2 times.*relu"):
        deconvcuda.project(graph_model("resnet18"), graph_images(48), "layer1.0.relu", channel=0)


def test_unknown_rule_is_a_clear_error():
    with pytest.raises(ValueError, match=r"project: rule must be one of 'deconvnet', 'guided', 'gradient', got 'lrp'"):
        deconvcuda.project(graph_model("resnet18"), graph_images(48), "layer1", channel=0, rule="lrp")


class _GeluNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3)
        self.mix = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 2, 3)

    def forward(self, x):
        x = self.stem(x)
        return self.head(x + torch.nn.functional.gelu(self.mix(x)))


def test_a_function_outside_the_table_takes_its_gradient_or_strict_names_it():
    torch.manual_seed(0)
    model, images = _GeluNet().eval(), torch.randn(1, 3, 12, 12, dtype=torch.float64)
    with pytest.raises(ValueError) as raised:
        deconvcuda.project(model, images, "head", channel=0, strict=True)
    message = str(raised.value)
    for pattern in (r"F\.gelu", r"_GeluNet\.forward", r"layer 'head'", r"supported: .*ReLU", r"strict=True"):
        assert re.search(pattern, message), f"{pattern!r} not in: {message}"
    # a layer before the function is fine with strict=True
    assert deconvcuda.project(model, images, "mix", channel=0, strict=True).shape == (1, 3, 12, 12)
    # without strict, GELU takes its gradient: the oracle's
    for rule in RULES:
        expected = rule_oracle(model.double(), images, "head", channel=0, rule=rule)
        actual = deconvcuda.project(model, images, "head", channel=0, rule=rule)
        assert relative_error(actual, expected) < 1e-10, rule



class _InPlaceInputs(nn.Module):
    """A tensor changed in place (``a.relu_()``, not reassigned) and then read by a pointwise function's
    product and a concatenation: each op after it reads the changed tensor once, as one input. With
    ``in_place=False`` the same function written with a new tensor, for the oracle (whose rectifier
    mode returns a new tensor for ``relu_``)."""

    def __init__(self, in_place: bool = True):
        super().__init__()
        self.in_place = in_place
        self.left, self.right = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Conv2d(8, 2, 3)

    def forward(self, x):
        a, b = self.left(x), self.right(x)
        if self.in_place:
            a.relu_()
        else:
            a = torch.relu(a)
        b = torch.nn.functional.silu(b) * a
        return self.head(torch.cat([a, b], 1))


def test_tensors_changed_in_place_are_read_once_by_the_ops_after():
    torch.manual_seed(0)
    model, images = _InPlaceInputs().eval(), torch.randn(2, 3, 12, 12, dtype=torch.float64)
    written_anew = _InPlaceInputs(in_place=False).eval()
    written_anew.load_state_dict(model.state_dict())
    for rule in RULES:
        for selection in ({"channel": 1}, {"channel": 0, "position": (4, 3)}):
            expected = rule_oracle(written_anew.double(), images, "head", **selection, rule=rule)
            actual = deconvcuda.project(model, images, "head", **selection, rule=rule)
            assert relative_error(actual, expected) < 1e-10, (rule, selection)


def test_build_knows_the_graph_families_and_their_default_layers():
    from deconvcuda import models

    for name in ("resnet18", "densenet121", "googlenet", "inception_v3", "squeezenet1_1", "mobilenet_v2",
                 "resnext50_32x4d", "wide_resnet50_2"):
        model = models.build(name)
        assert model.preprocessing == models.IMAGENET and not model.training
        names = dict(model.named_modules())
        defaults = models.default_layers(model)
        assert len(defaults) >= 3 and all(layer in names for layer in defaults), (name, defaults)


def test_layers_command_prints_the_listing(capsys):
    from deconvcuda.cli import main

    assert main(["layers", "--model", "squeezenet1_1", "--image-size", "64"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("layer") and "64x64" in lines[0]
    by_name = {line.split()[0]: line for line in lines[1:]}
    assert "Fire" in by_name["features.3"] and "128 x 15 x 15" in by_name["features.3"]
    assert by_name["features.12"].rstrip().endswith("*")  # a default layer is marked


# SqueezeNet's and VGG-BN's ReLUs are nn.ReLU modules, each called once: Captum's module hooks see
# every one, so its NeuronDeconvolution and NeuronGuidedBackprop are the two rules with seed="one".
CAPTUM_GRAPH_CASES = [("squeezenet1_1", "features.7", 48), ("vgg11_bn", "features.10", 40)]


@pytest.mark.filterwarnings("ignore::UserWarning")  # Captum warns that it sets requires_grad and hooks
@pytest.mark.parametrize("name, layer, size", CAPTUM_GRAPH_CASES, ids=[c[0] for c in CAPTUM_GRAPH_CASES])
def test_agrees_with_captum_deconvolution_and_guided_backprop(name, layer, size):
    captum_attr = pytest.importorskip("captum.attr")
    model64 = graph_model64(name)
    images = graph_images(size).double()
    with torch.no_grad():
        out = forward_to_layer(model64, images, layer)
    h, w = out.shape[2:]
    for y, x in [(0, 0), (h // 2, w - 1)]:
        channel = int(out[0, :, y, x].argmax())
        for rule, method in (("deconvnet", captum_attr.NeuronDeconvolution),
                             ("guided", captum_attr.NeuronGuidedBackprop)):
            attribution = method(model64, model64.get_submodule(layer)).attribute(
                images.clone(), neuron_selector=(channel, y, x))
            ours = deconvcuda.project(model64, images, layer, channel=channel, position=(y, x), rule=rule, seed="one")
            assert_close_to_largest(ours, attribution, 1e-9, f"{name} {layer} ({channel}, {y}, {x}) {rule} vs Captum")
        assert not any(module._forward_hooks or module._backward_hooks for module in model64.modules()), \
            "Captum left hooks behind"
