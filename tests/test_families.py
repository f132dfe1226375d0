"""Every model a user brings (issue 14): one model of each of torchvision's classification families and
several of timm's, at a block and at the class logits, under every rule, against the oracle (autograd
with every rectifier's backward swapped for the rule's, every other op its own gradient), in float64
to 1e-7 of the largest value; token layers; a model torch.fx cannot trace; strict=True; describe().
"""
from __future__ import annotations

import functools
import re
import warnings
import zlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import forward_to_layer, randomize_batch_norms, rule_oracle
import deconvcuda
from deconvcuda.fallback import FallbackWarning

torchvision = pytest.importorskip("torchvision")

RULES = ["deconvnet", "guided", "gradient"]
TOLERANCE = 1e-7

# (family: a small model of it, a block output, the image size it takes). Every family of
# torchvision's classification models; the image sizes are the smallest each architecture takes.
FAMILIES = {
    "alexnet": ("alexnet", "features.7", 64),
    "convnext": ("convnext_tiny", "features.3", 32),
    "densenet": ("densenet121", "features.transition1", 32),
    "efficientnet": ("efficientnet_b0", "features.3", 32),
    "efficientnet_v2": ("efficientnet_v2_s", "features.2", 32),
    "googlenet": ("googlenet", "inception3a", 32),
    "inception": ("inception_v3", "Mixed_5b", 80),
    "maxvit": ("maxvit_t", "blocks.0", 224),
    "mnasnet": ("mnasnet0_5", "layers.8", 32),
    "mobilenet_v2": ("mobilenet_v2", "features.4", 32),
    "mobilenet_v3": ("mobilenet_v3_small", "features.4", 32),
    "regnet_x": ("regnet_x_400mf", "trunk_output.block1", 32),
    "regnet_y": ("regnet_y_400mf", "trunk_output.block2", 32),
    "resnet": ("resnet18", "layer2", 32),
    "resnext": ("resnext50_32x4d", "layer1", 32),
    "wide_resnet": ("wide_resnet50_2", "layer1.1", 32),
    "shufflenet_v2": ("shufflenet_v2_x0_5", "stage2", 32),
    "squeezenet": ("squeezenet1_1", "features.6", 32),
    "swin": ("swin_t", "features.3", 32),
    "swin_v2": ("swin_v2_t", "features.1", 32),
    "vgg": ("vgg11_bn", "features.10", 32),
    "vit": ("vit_b_16", "encoder.layers.encoder_layer_1", 32),
}


@functools.lru_cache(maxsize=1)
def family_model(name: str) -> nn.Module:
    """A float64 model with random weights (seeded), BatchNorm statistics away from 0 and 1, and no
    parameter left at zero (ViT's head starts at zero: its logits would be zero)."""
    torch.manual_seed(zlib.crc32(name.encode()))
    options = {"googlenet": {"aux_logits": False, "init_weights": False},
               "inception_v3": {"aux_logits": False, "init_weights": False},
               "vit_b_16": {"image_size": 32}}.get(name, {})
    model = randomize_batch_norms(getattr(torchvision.models, name)(**options).eval(), seed=1).double()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.numel() and float(parameter.abs().max()) == 0:
                parameter.normal_(0, 0.05)
    return model


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """The largest error of any projection, relative to the largest |value| of all of them."""
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-300))


def strongest_channel(out: torch.Tensor) -> int:
    """A channel (feature, unit) that fires: the one with the largest activation."""
    if out.dim() == 3:  # tokens [N, T, D]
        return int(out.amax(dim=(0, 1)).argmax())
    return int(out.flatten(2).amax(dim=2).amax(dim=0).argmax()) if out.dim() == 4 else int(out.amax(0).argmax())


@pytest.fixture
def measured_once(monkeypatch):
    """The dispatcher's first choice instead of timing candidates: both are exact, and timing every new
    shape of twenty-two families costs minutes on two cores (tests/test_dispatch.py times them)."""
    from deconvcuda import dispatch

    monkeypatch.setattr(dispatch, "AUTOTUNE", False)


def has_rectifiers(model: nn.Module, layer: str, shape) -> bool:
    """Whether a rectifier lies on the path (else every rule is the gradient: one oracle serves all)."""
    return any(step.reversal == "rule" for step in deconvcuda.describe(model, layer, shape).steps)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_torchvision_family_equals_the_oracle(family, measured_once):
    name, block, size = FAMILIES[family]
    model = family_model(name)
    images = torch.randn(1, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(size))
    for layer in (block, ""):
        with torch.no_grad():
            channel = strongest_channel(forward_to_layer(model, images, layer))
        # without a rectifier on the path the rules are one computation (describe shows none is
        # reversed by the rule): one projection stands for all three
        rules = RULES if has_rectifiers(model, layer, tuple(images.shape[1:])) else RULES[:1]
        for rule in rules:
            with warnings.catch_warnings():
                warnings.simplefilter("error", FallbackWarning)  # every family is read by the graph engine
                actual = deconvcuda.project(model, images, layer, channel=channel, rule=rule)
            expected = rule_oracle(model, images, layer, channel=channel, rule=rule)
            assert expected.abs().max() > 0, f"{name} {layer or 'logits'} {rule}: the oracle is zero"
            error = relative_error(actual, expected)
            assert error < TOLERANCE, f"{name} {layer or 'logits'} {rule}: {error:.2e}"


TIMM = {  # timm's models (timm's own blocks: BatchNormAct, LayerNorm2d, DropPath, attention)
    "regnetx_002": ("s2", 32),
    "resnet18": ("layer2", 32),
    "efficientnet_b0": ("blocks.2", 32),
    "convnext_atto": ("stages.1", 32),
    "mobilenetv3_small_050": ("blocks.2", 32),
    "vit_tiny_patch16_224": ("blocks.1", 32),
}


@pytest.mark.parametrize("name", list(TIMM))
def test_timm_models_equal_the_oracle(name, measured_once):
    timm = pytest.importorskip("timm")
    block, size = TIMM[name]
    torch.manual_seed(zlib.crc32(name.encode()))
    options = {"img_size": size} if name.startswith("vit") else {}
    model = randomize_batch_norms(timm.create_model(name, pretrained=False, **options).eval(), seed=2).double()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.numel() and float(parameter.abs().max()) == 0:
                parameter.normal_(0, 0.05)
    images = torch.randn(1, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    for layer in (block, ""):
        with torch.no_grad():
            channel = strongest_channel(forward_to_layer(model, images, layer))
        for rule in ("deconvnet", "guided"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FallbackWarning)  # timm's ViT moves the batch: the autograd path
                actual = deconvcuda.project(model, images, layer, channel=channel, rule=rule)
            expected = rule_oracle(model, images, layer, channel=channel, rule=rule)
            assert relative_error(actual, expected) < TOLERANCE, f"timm {name} {layer or 'logits'} {rule}"


# --------------------------------------------------------------------------------------------- #
# Token layers
# --------------------------------------------------------------------------------------------- #

def test_token_layers_select_features_and_tokens():
    model = family_model("vit_b_16")
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    layer = "encoder.layers.encoder_layer_2"
    with torch.no_grad():
        out = forward_to_layer(model, images, layer)
    assert out.dim() == 3  # [N, T, D]
    feature = strongest_channel(out)
    selections = [dict(channel=feature), dict(channel=feature, position=2),
                  dict(neurons=torch.tensor([[1, feature, 0, 0], [0, 7, 4, 0], [1, 3, 2, 0]])), {}]
    for selection in selections:
        for rule in ("deconvnet", "gradient"):
            actual = deconvcuda.project(model, images, layer, rule=rule, **selection)
            expected = rule_oracle(model, images, layer, rule=rule, **selection)
            assert relative_error(actual, expected) < TOLERANCE, f"{selection} {rule}"
    top = deconvcuda.top_activations(model, images, layer, k=2, progress=False)
    assert top.values.shape == (out.shape[2], 2)
    best = out.amax(dim=1)  # [N, D]
    assert torch.equal(top.image_index[:, 0], best.argmax(dim=0))
    tokens = out[top.image_index[:, 0], :, torch.arange(out.shape[2])].argmax(dim=1)
    assert torch.equal(top.y[:, 0], tokens) and bool((top.x == 0).all())
    with pytest.raises(TypeError, match=r"position must be a token index \(an int\)"):
        deconvcuda.project(model, images, layer, channel=0, position=(1, 2))
    with pytest.raises(IndexError, match=r"position must be a token in \[0, 5\)"):
        deconvcuda.project(model, images, layer, channel=0, position=5)
    with pytest.raises(IndexError, match=r"feature \(channel\) must be in \[0, 768\)"):
        deconvcuda.project(model, images, layer, channel=768)


# --------------------------------------------------------------------------------------------- #
# A model torch.fx cannot trace
# --------------------------------------------------------------------------------------------- #

class Branchy(nn.Module):
    """A forward that branches on the data (torch.fx cannot trace it), in-place ReLUs, a reused one."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 8, 3, padding=1))
        self.block = nn.Conv2d(8, 6, 3)
        self.act = nn.SiLU()
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        x = self.features(x)
        if x.mean() > -100:
            x = F.relu(x, inplace=True)
        x = torch.relu(self.block(x))
        return self.fc(self.act(x).mean((2, 3)))


@functools.lru_cache(maxsize=1)
def branchy() -> nn.Module:
    torch.manual_seed(0)
    return Branchy().double().eval()


def test_an_untraceable_model_is_projected_exactly_with_one_warning():
    model, images = branchy(), torch.randn(3, 3, 16, 16, dtype=torch.float64)
    neurons = torch.tensor([[0, 1, 2, 3], [2, 5, 0, 0], [0, 1, 2, 3]])
    for rule in RULES:
        for layer, selection in (("block", dict(channel=1)), ("features.3", dict(neurons=neurons)), ("", {})):
            with pytest.warns(FallbackWarning, match=r"project: the graph engine's fast path is not used for Branchy "
                                                     r"\(torch\.fx cannot trace Branchy's forward"):
                actual = deconvcuda.project(model, images, layer, rule=rule, **selection)
            expected = rule_oracle(model, images, layer, rule=rule, **selection)
            assert relative_error(actual, expected) < TOLERANCE, f"{layer} {rule}"
    with pytest.raises(ValueError, match=r"strict=True needs the model's graph"):
        deconvcuda.project(model, images, "block", channel=0, strict=True)
    assert all(not m._forward_hooks for m in model.modules()) and not model.training


def test_an_untraceable_model_works_with_the_rest_of_the_package(tmp_path):
    model, images = branchy(), torch.randn(4, 3, 16, 16, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FallbackWarning)
        names = [info.name for info in deconvcuda.layers(model, (3, 16, 16))]
        assert names[:2] == ["features", "features.0"] and "block" in names and "fc" in names
        top = deconvcuda.top_activations(model, images, "block", k=2, progress=False)
        with torch.no_grad():
            out = model.block(F.relu(model.features(images)))
        assert torch.equal(top.image_index[:, 0], out.flatten(2).amax(2).argmax(0))
        field = deconvcuda.receptive_field(model, "block", input_size=(16, 16))
        assert (field.size, field.stride, field.offset) == ((12, 12), (2, 2), (-3, -3))
        occluded = deconvcuda.occlusion(model, images, "block", window=4, stride=4)
        assert occluded.shape == (4, 4, 4)
        distances = deconvcuda.invariance(model, images, ["block"], "rotate", [0, 10])["block"]
        assert distances.shape == (4, 2) and bool((distances[:, 0] == 0).all())
        run = deconvcuda.visualize(model, images, ["block"], channels=[0, 1], k=2, out=tmp_path / "gallery")
        assert run.index.exists()
    description = deconvcuda.describe(model, "block", (3, 16, 16))
    assert description.fallback and "torch.fx cannot trace" in str(description)


# --------------------------------------------------------------------------------------------- #
# strict=True and describe()
# --------------------------------------------------------------------------------------------- #

def test_strict_refuses_what_the_paper_does_not_reverse_and_keeps_what_it_does():
    model = family_model("efficientnet_b0")
    images = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with pytest.raises(ValueError) as raised:
        deconvcuda.project(model, images, "features.1", channel=0, strict=True)
    message = str(raised.value)
    for pattern in (r"SiLU module 'features\.0\.2'", r"in module 'features\.0'", r"strict=True",
                    r"its exact gradient", r"supported: .*Conv2d"):
        assert re.search(pattern, message), f"{pattern!r} not in: {message}"
    chain = family_model("alexnet")
    images = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    torch.testing.assert_close(deconvcuda.project(chain, images, "features.7", channel=3, strict=True),
                               deconvcuda.project(chain, images, "features.7", channel=3), rtol=0, atol=0)


def test_describe_names_how_each_op_is_reversed():
    description = deconvcuda.describe(family_model("efficientnet_b0"), "features.1", (3, 32, 32), rule="guided")
    by_name = {step.name: step for step in description.steps}
    assert by_name["features.0.0"].reversal == "kernel" and "deconv2d" in by_name["features.0.0"].reverse
    assert by_name["features.0.2"].reverse.startswith("its gradient") and not by_name["features.0.2"].in_table
    assert description.gradient_ops() == ["SiLU", "Sigmoid", "multiply"]
    text = str(description)
    assert "features.1.0.block.1.fc1" in text and "[8, 1, 1]" in text
    alexnet = deconvcuda.describe(family_model("alexnet"), "features.7", (3, 64, 64), rule="guided")
    pools = [step for step in alexnet.steps if step.op == "MaxPool2d"]
    assert pools and all("unpool_relu_deconv2d" in step.reverse for step in pools)
    relus = [step for step in alexnet.steps if step.op == "ReLU"]
    assert all(step.reverse.startswith("the rule (guided)") for step in relus)
    assert alexnet.gradient_ops() == []
    with pytest.raises(ValueError, match=r"describe: input_shape must be one image's shape"):
        deconvcuda.describe(family_model("alexnet"), "features.7", 64)
