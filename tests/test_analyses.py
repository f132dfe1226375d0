"""The paper's other experiments against brute force: occlusion (every occluder position, each image
occluded and run through the model itself), invariance (each transformed image through the model),
evolution (each checkpoint loaded into a model, its top-1 found by scanning every image's map, and
projected); their figures; bad input."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deconvcuda
from conftest import DEVICES, forward_to_layer, randomize_batch_norms, small_cnn
from deconvcuda.figures import plots


# --------------------------------------------------------------------------------------------- #
# Models: a chain with every geometry subtlety, a residual net, a net that concatenates
# --------------------------------------------------------------------------------------------- #

class Chain(nn.Module):
    """Strided, padded and dilated convs, a ceil_mode max pool with padding, an average pool without
    counting the padding (ceil_mode), one with a divisor override, BatchNorm, LRN; then a classifier."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 5, stride=2, padding=2), nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True),
            nn.Conv2d(6, 8, 3, padding=2, dilation=2), nn.BatchNorm2d(8), nn.ReLU(),
            nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False),
            nn.Conv2d(8, 8, 1), nn.LocalResponseNorm(3), nn.ReLU(inplace=True),
            nn.AvgPool2d(2, stride=1, divisor_override=3))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class Block(nn.Module):
    def __init__(self, channels_in, channels_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels_out)
        self.relu = nn.ReLU(inplace=True)  # called twice, as in torchvision's ResNet
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels_out)
        self.shortcut = (nn.Conv2d(channels_in, channels_out, 1, stride, bias=False)
                         if stride != 1 or channels_in != channels_out else nn.Identity())

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return self.relu(out)


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.layer1 = Block(6, 6, 1)
        self.layer2 = Block(6, 8, 2)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(x.mean((2, 3)))


class Fire(nn.Module):
    def __init__(self, channels_in, squeeze, expand):
        super().__init__()
        self.squeeze = nn.Conv2d(channels_in, squeeze, 1)
        self.expand1 = nn.Conv2d(squeeze, expand, 1)
        self.expand3 = nn.Conv2d(squeeze, expand, 3, padding=1)

    def forward(self, x):
        x = F.relu(self.squeeze(x))
        return torch.cat([F.relu(self.expand1(x)), torch.relu(self.expand3(x))], 1)


class Concatenating(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), Fire(8, 4, 5),
                                      nn.MaxPool2d(3, 2, ceil_mode=True), Fire(10, 4, 6))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(12 * 6 * 5, 3))

    def forward(self, x):
        return self.classifier(self.features(x))


class Geometry(nn.Module):
    """Asymmetric kernels, strides, paddings and dilations; a grouped conv; a dilated ceil_mode max
    pool; a 3x3 stride-3 conv (inputs that no output reads); average pools counting the padding with
    ceil_mode and with a divisor override; an add and a cat of branches of different geometry."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, (3, 5), stride=(1, 2), padding=(2, 1), dilation=(2, 1), groups=3)
        self.p = nn.MaxPool2d((3, 2), stride=(2, 3), padding=(1, 1), dilation=(2, 1), ceil_mode=True)
        self.b = nn.Conv2d(6, 6, 3, stride=3, padding=1)
        self.b2 = nn.Conv2d(6, 6, 3, stride=3, padding=1)
        self.q = nn.AvgPool2d((3, 2), stride=(1, 2), padding=1, ceil_mode=True, count_include_pad=True)
        self.r = nn.AvgPool2d(2, stride=2, padding=1, ceil_mode=True, divisor_override=5)
        self.c = nn.Conv2d(12, 4, 1, stride=2)

    def forward(self, x):
        z = self.p(torch.relu(self.a(x)))
        branch = self.b(z)
        return self.c(self.r(torch.cat([self.q(branch + self.b2(z)), self.q(branch)], 1)))


def build(name: str) -> nn.Module:
    torch.manual_seed(7)
    model = {"chain": Chain, "residual": Residual, "concatenating": Concatenating, "geometry": Geometry}[name]()
    return randomize_batch_norms(model, 3).double().eval()


# --------------------------------------------------------------------------------------------- #
# Occlusion
# --------------------------------------------------------------------------------------------- #

def brute_force_occlusion(model, images, layer, channel, window, stride, fill, reduce="sum", softmax=False):
    """Every occluder position: the image with the square set to ``fill``, through the model itself."""
    (wh, ww), (sh, sw) = window, stride
    n, c, height, width = images.shape
    rows, cols = (height - wh) // sh + 1, (width - ww) // sw + 1
    fill = torch.as_tensor(fill, dtype=images.dtype).to(images.device).reshape(-1, 1, 1).expand(c, wh, ww)
    with torch.no_grad():
        plain = forward_to_layer(model, images, layer)
        if channel is None:
            if plain.dim() == 2:
                channel = plain.argmax(dim=1)
            else:
                per_channel = plain.flatten(2).sum(2) if reduce == "sum" else plain.flatten(2).amax(2)
                channel = per_channel.argmax(dim=1)
        channel = torch.as_tensor(channel).to(images.device).expand(n)
        values = torch.empty(n, rows, cols, dtype=images.dtype, device=images.device)
        for image in range(n):
            occluded = images[image:image + 1].repeat(rows * cols, 1, 1, 1)  # one copy per position
            for i in range(rows):
                for j in range(cols):
                    occluded[i * cols + j, :, i * sh:i * sh + wh, j * sw:j * sw + ww] = fill
            outputs = forward_to_layer(model, occluded, layer)
            for i in range(rows):
                for j in range(cols):
                    out = outputs[i * cols + j]
                    if out.dim() == 1:
                        out = torch.softmax(out, 0) if softmax else out
                        values[image, i, j] = out[channel[image]]
                    else:
                        m = out[channel[image]]
                        values[image, i, j] = m.sum() if reduce == "sum" else m.max()
    return values


CASES = [
    # model, layer, image size, window, stride, options
    ("chain", "features.1", (21, 26), (6, 6), (4, 5), {}),
    ("chain", "features.6", (21, 26), (7, 5), (3, 2), {"reduce": "max", "fill": "per-channel"}),
    ("chain", "features.10", (21, 26), (5, 9), (4, 3), {"channel": "per-image"}),
    ("chain", "", (21, 26), (6, 6), (3, 3), {"softmax": True, "fill": "per-channel"}),
    ("chain", "fc", (21, 26), (8, 8), (5, 6), {"channel": 2}),
    ("residual", "layer1", (20, 18), (4, 4), (2, 3), {"fill": "per-channel"}),
    ("residual", "layer2.conv2", (20, 18), (5, 3), (3, 3), {"channel": "per-image", "reduce": "max"}),
    ("residual", "", (20, 18), (6, 6), (4, 4), {"softmax": True}),
    ("concatenating", "features.2", (25, 23), (5, 5), (2, 3), {"fill": "per-channel"}),
    ("concatenating", "features.4", (25, 23), (6, 4), (4, 3), {"channel": 7}),
    ("concatenating", "", (25, 23), (7, 7), (3, 4), {"softmax": True, "channel": "per-image"}),
    ("geometry", "p", (23, 31), (9, 2), (2, 3), {"reduce": "max"}),
    ("geometry", "", (30, 17), (3, 4), (5, 7), {"fill": "per-channel"}),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,layer,size,window,stride,options", CASES,
                         ids=[f"{c[0]}-{c[1] or 'output'}-{i}" for i, c in enumerate(CASES)])
def test_occlusion_equals_brute_force(name, layer, size, window, stride, options, device):
    model = build(name).to(device)
    before = copy.deepcopy(model.state_dict())
    generator = torch.Generator().manual_seed(11)
    images = torch.randn(2, 3, *size, generator=generator, dtype=torch.float64).to(device)
    options = dict(options)
    if options.get("fill") == "per-channel":
        options["fill"] = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64, device=device)
    channel = options.pop("channel", None)
    if channel == "per-image":
        n_channels = forward_to_layer(model, images, layer).shape[1]
        channel = torch.tensor([n_channels - 1, 1])
    expected = brute_force_occlusion(model, images, layer, channel, window, stride, options.get("fill", 0.0),
                                     options.get("reduce", "sum"), options.get("softmax", False))
    # by difference (the default) in batches that split an image's positions and in one for
    # everything; and the plain recompute
    for method, batch_size in (("difference", 5), ("difference", 1000), ("recompute", 7)):
        actual = deconvcuda.occlusion(model, images, layer, channel, window=window, stride=stride,
                                      batch_size=batch_size, method=method, **options)
        assert actual.shape == expected.shape and actual.dtype == images.dtype and actual.device == images.device
        torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-9, msg=lambda m: f"{method}: {m}")
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())
    assert not model.training


def test_most_probable_class_equals_brute_force():
    from deconvcuda.analyses.occlusion import most_probable_class

    model = build("residual")
    images = torch.randn(2, 3, 20, 18, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    logits = [brute_force_occlusion(model, images, "", unit, (8, 6), (4, 4), 0.0) for unit in range(4)]
    expected = torch.stack(logits).argmax(0)  # per image and position, the class with the largest logit
    assert torch.equal(most_probable_class(model, images, window=(8, 6), stride=4, method="difference"), expected)
    with pytest.raises(ValueError, match="is not flat"):
        most_probable_class(model, images, "layer1", window=4, stride=4)


def test_occlusion_torchvision_graph_models_float32():
    """torchvision's ResNet (one ReLU module called twice per block) and SqueezeNet (cat, ceil_mode)."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    images = torch.randn(1, 3, 32, 32)
    for model, layer in ((torchvision.models.resnet18(num_classes=4), "layer2.1"),
                         (torchvision.models.squeezenet1_1(num_classes=4), "features.6")):
        model = randomize_batch_norms(model, 1).eval()
        expected = brute_force_occlusion(model, images, layer, None, (12, 12), (10, 10), 0.0)
        actual = deconvcuda.occlusion(model, images, layer, window=12, stride=10, method="difference")
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-3 * float(expected.abs().max()))


def test_occlusion_window_default_geometry_and_grid_shape():
    model = build("chain")
    images = torch.randn(3, 3, 40, 33, dtype=torch.float64)
    values = deconvcuda.occlusion(model, images, "features.3")
    assert values.shape == (3, (40 - 16) // 8 + 1, (33 - 16) // 8 + 1)
    # a square the size of the image: one position, the image is all fill
    whole = deconvcuda.occlusion(model, images, "features.3", channel=1, window=(40, 33), fill=0.25)
    flat = torch.full_like(images[:1], 0.25)
    assert whole.shape == (3, 1, 1)
    torch.testing.assert_close(whole[:, 0, 0], forward_to_layer(model, flat, "features.3")[0, 1].sum().expand(3))


@pytest.mark.parametrize("arguments,error,match", [
    ({"window": 30}, ValueError, "larger than the images"),
    ({"window": (10, 27)}, ValueError, "larger than the images"),
    ({"stride": 0}, ValueError, "stride must be a positive int"),
    ({"window": (4, 0)}, ValueError, "window must be a positive int"),
    ({"channel": 8}, ValueError, "channel 8 is out of range; the layer has 8 channels"),
    ({"channel": -1}, ValueError, "out of range"),
    ({"channel": torch.tensor([0, 9])}, ValueError, "channel 9 is out of range"),
    ({"channel": torch.tensor([0, 1, 2])}, ValueError, r"one channel per image, shape \[2\]"),
    ({"channel": 1.5}, TypeError, "channel must be an int"),
    ({"fill": torch.zeros(4)}, ValueError, r"one value per input channel \(C = 3\)"),
    ({"fill": "gray"}, TypeError, "fill must be a float"),
    ({"reduce": "mean"}, ValueError, "reduce must be 'sum'"),
    ({"softmax": True}, ValueError, "softmax=True needs a flat layer"),
    ({"layer": "features.99"}, ValueError, "unknown layer 'features.99'"),
    ({"batch_size": 0}, ValueError, "batch_size must be a positive int"),
    ({"method": "fast"}, ValueError, "method must be one of 'difference', 'recompute'"),
])
def test_occlusion_bad_input(arguments, error, match):
    model = build("chain")
    images = torch.randn(2, 3, 21, 26, dtype=torch.float64)
    arguments = dict(arguments)
    layer = arguments.pop("layer", "features.5")
    with pytest.raises(error, match=match):
        deconvcuda.occlusion(model, images, layer, arguments.pop("channel", None), window=arguments.pop("window", 8),
                             stride=arguments.pop("stride", 4), **arguments)


def test_occlusion_bad_images():
    model = build("chain")
    with pytest.raises(ValueError, match=r"images must be a tensor \[N, C, H, W\]"):
        deconvcuda.occlusion(model, torch.randn(3, 21, 26, dtype=torch.float64), "features.1")
    with pytest.raises(TypeError, match="floating point"):
        deconvcuda.occlusion(model, torch.zeros(1, 3, 21, 26, dtype=torch.long), "features.1")
    with pytest.raises(ValueError, match="3 channels"):
        deconvcuda.occlusion(model, torch.randn(1, 4, 21, 26, dtype=torch.float64), "features.1", window=8)


# --------------------------------------------------------------------------------------------- #
# Invariance
# --------------------------------------------------------------------------------------------- #

@pytest.mark.parametrize("transform,amounts", [("translate", [0, -3, 2.5, 7]), ("scale", [1.0, 0.6, 1.3]),
                                               ("rotate", [0, 30, -45, 180])])
def test_invariance_equals_brute_force(transform, amounts):
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2.functional import affine

    model = build("residual")
    images = torch.randn(3, 3, 20, 18, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    layers = ["layer1.conv1", "layer2", ""]
    actual = deconvcuda.invariance(model, images, layers, transform, amounts)
    assert list(actual) == layers
    for layer in layers:
        plain = forward_to_layer(model, images, layer).flatten(1)
        expected = torch.empty(3, len(amounts), dtype=torch.float64)
        for column, amount in enumerate(amounts):
            arguments = {"translate": dict(angle=0.0, translate=[0, amount], scale=1.0),
                         "scale": dict(angle=0.0, translate=[0, 0], scale=amount),
                         "rotate": dict(angle=amount, translate=[0, 0], scale=1.0)}[transform]
            moved = affine(images, shear=[0.0, 0.0], interpolation=InterpolationMode.BILINEAR, fill=0, **arguments)
            with torch.no_grad():
                expected[:, column] = (forward_to_layer(model, moved, layer).flatten(1) - plain).norm(dim=1)
        assert actual[layer].shape == (3, len(amounts)) and actual[layer].dtype == torch.float64
        torch.testing.assert_close(actual[layer], expected, rtol=1e-9, atol=1e-9)
    assert float(actual["layer2"][:, 1:].min()) > 0  # the transforms do move the features


def test_invariance_bad_input():
    model = build("residual")
    images = torch.randn(1, 3, 20, 18, dtype=torch.float64)
    with pytest.raises(ValueError, match="unknown transform 'shear'; expected one of 'translate', 'scale', 'rotate'"):
        deconvcuda.invariance(model, images, ["layer1"], "shear", [1, 2])
    with pytest.raises(ValueError, match="amounts is empty"):
        deconvcuda.invariance(model, images, ["layer1"], "rotate", [])
    with pytest.raises(ValueError, match="scale amounts must be positive"):
        deconvcuda.invariance(model, images, ["layer1"], "scale", [1, 0])
    with pytest.raises(ValueError, match="unknown layer 'layer9'"):
        deconvcuda.invariance(model, images, ["layer9"], "rotate", [10])


# --------------------------------------------------------------------------------------------- #
# Evolution
# --------------------------------------------------------------------------------------------- #

def test_evolution_equals_brute_force_and_leaves_the_model_alone(tmp_path):
    model = small_cnn().double()
    model.train()  # evolution must neither run it in train mode nor leave it changed
    original = copy.deepcopy(model.state_dict())
    images = torch.randn(6, 3, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    states = []
    for seed in range(3):
        torch.manual_seed(100 + seed)
        states.append({key: value.double() for key, value in small_cnn().state_dict().items()})
    torch.save(states[1], tmp_path / "epoch1.pt")
    checkpoints = [states[0], tmp_path / "epoch1.pt", str(tmp_path / "epoch1.pt"), states[2]]
    channels = [4, 0, 5]
    actual = deconvcuda.evolution(model, checkpoints, images, "features.1", channels)
    assert actual.shape == (4, 3, 3, 12, 12) and actual.dtype == torch.float64
    for step, state in enumerate([states[0], states[1], states[1], states[2]]):
        reference = small_cnn().double()
        reference.load_state_dict(state)
        with torch.no_grad():
            maps = forward_to_layer(reference, images, "features.1")
        for row, channel in enumerate(channels):
            per_image = maps[:, channel].flatten(1).amax(1)
            image = int(per_image.argmax())  # the first image on ties
            position = int(maps[image, channel].flatten().argmax())
            y, x = divmod(position, maps.shape[3])
            expected = deconvcuda.reference.project(reference, images[image:image + 1], "features.1", channel=channel,
                                                    position=(y, x))[0]
            torch.testing.assert_close(actual[step, row], expected, rtol=1e-9, atol=1e-12)
    assert model.training
    assert all(torch.equal(original[key], value) for key, value in model.state_dict().items())
    assert not torch.equal(actual[0], actual[3])  # different weights, different projections


def test_evolution_bad_checkpoints(tmp_path):
    model = small_cnn()
    images = torch.randn(2, 3, 12, 12)
    other = nn.Sequential(nn.Conv2d(3, 4, 3))
    torch.save(other.state_dict(), tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"checkpoint 1 \('.*other.pt'\) does not fit the model.*missing keys: "
                                         r"features.0.weight.*unexpected keys: 0.weight, 0.bias"):
        deconvcuda.evolution(model, [model.state_dict(), tmp_path / "other.pt"], images, "features.1", [0])
    shapes = dict(model.state_dict())
    shapes["fc.weight"] = torch.zeros(5, 7)
    with pytest.raises(ValueError, match=r"checkpoint 0 does not fit.*shapes \(file vs model\): fc.weight \[5, 7\]"):
        deconvcuda.evolution(model, [shapes], images, "features.1", [0])
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match=r"cannot read checkpoint 0 \('.*corrupt.pt'\)") as corrupt:
        deconvcuda.evolution(model, [tmp_path / "corrupt.pt"], images, "features.1", [0])
    # the message models.build gives for the same file, not torch.load's
    with pytest.raises(ValueError) as as_weights:
        deconvcuda.models.build("zfnet", weights=tmp_path / "corrupt.pt")
    explanation = "it is not a PyTorch weights file: neither the zip archive torch.save writes nor a pickle"
    for error in (corrupt, as_weights):
        assert explanation in str(error.value) and "torch.save(model.state_dict(), path)" in str(error.value)
        assert "Check the documentation of torch.load" not in str(error.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        deconvcuda.evolution(model, [tmp_path / "missing.pt"], images, "features.1", [0])
    with pytest.raises(ValueError, match=r"channel 8 is out of range; layer 'features.1' has 8 channels"):
        deconvcuda.evolution(model, [model.state_dict()], images, "features.1", [0, 8])
    with pytest.raises(TypeError, match="wrap it in a list"):
        deconvcuda.evolution(model, model.state_dict(), images, "features.1", [0])
    with pytest.raises(ValueError, match="checkpoints is empty"):
        deconvcuda.evolution(model, [], images, "features.1", [0])


# --------------------------------------------------------------------------------------------- #
# Figures
# --------------------------------------------------------------------------------------------- #

def _assert_drawn(path, min_width=200):
    from PIL import Image

    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    assert pixels.shape[1] >= min_width
    assert pixels.std() > 10, f"{path} looks blank"
    return pixels


def test_figures_are_drawn(tmp_path):
    pytest.importorskip("matplotlib")
    torch.manual_seed(0)
    image = torch.rand(3, 40, 48)
    values = torch.rand(4, 5)
    path = plots.occlusion_figure(tmp_path / "occlusion.png", image, values, window=16, stride=8, layer="features.5",
                                    channel=3, projection=torch.rand(3, 40, 48), probabilities=torch.rand(4, 5),
                                    classes=torch.randint(0, 3, (4, 5)), true_class=1,
                                    class_names=["cat", "dog", "car"])
    wide = _assert_drawn(path)
    narrow = _assert_drawn(plots.occlusion_figure(tmp_path / "plain.png", image, values, window=16, stride=8))
    assert wide.shape[1] > narrow.shape[1]  # the classifier's panels are there
    _assert_drawn(plots.invariance_figure(tmp_path / "invariance.png", "rotate", [0, 10, 20],
                                            {"layer1": torch.rand(2, 3), "": torch.rand(2, 3)},
                                            probabilities=torch.rand(2, 3), image_names=["a", "b"]))
    _assert_drawn(plots.evolution_figure(tmp_path / "evolution.png", torch.rand(3, 2, 3, 12, 12),
                                           ["epoch 1", "epoch 2", "epoch 3"], ["map 0", "map 4"]), min_width=150)


# --------------------------------------------------------------------------------------------- #
# The command line
# --------------------------------------------------------------------------------------------- #

@pytest.fixture
def photo_folder(tmp_path):
    from PIL import Image

    directory = tmp_path / "images"
    directory.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)).save(directory / name)
    return directory


def run_command(capsys, *argv):
    from deconvcuda import cli

    code = cli.main([*map(str, argv), "--no-progress", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def test_cli_occlusion_and_invariance_share_the_gallery(photo_folder, tmp_path, capsys):
    out_dir = tmp_path / "gallery"
    common = ("--model", "zfnet", "--images", photo_folder, "--image-size", "64", "--out", out_dir)
    code, out, err = run_command(capsys, "occlusion", *common, "--layer", "features.1", "--window", "32",
                                 "--stride", "16")
    assert code == 0, err
    assert f"wrote 2 occlusion figure(s) to {out_dir / 'occlusion'}" in out
    figures = sorted((out_dir / "occlusion").iterdir())
    assert [p.name for p in figures] == ["00_a.png", "01_b.png"]
    _assert_drawn(figures[0], min_width=1000)  # five panels: zfnet is a classifier
    code, out, err = run_command(capsys, "invariance", *common, "--transforms", "rotate", "--amounts", "0,45,90")
    assert code == 0, err
    assert sorted(p.name for p in (out_dir / "invariance").iterdir()) == ["rotate.png"]
    code, out, err = run_command(capsys, "occlusion", *common, "--layer", "features.1", "--window", "64",
                                 "--max-images", "1")  # again: its section and figures are replaced
    assert code == 0, err
    assert [p.name for p in (out_dir / "occlusion").iterdir()] == ["00_a.png"]
    index = (out_dir / "index.html").read_text(encoding="utf-8")
    assert index.count('id="analysis-occlusion"') == 1 and index.count('id="analysis-invariance"') == 1
    for link in ("occlusion/00_a.png", "invariance/rotate.png"):
        assert f'src="{link}"' in index
    assert "occlusion/01_b.png" not in index


@pytest.mark.parametrize("argv,message", [
    (["occlusion", "--layer", "features.99"], "--layers: unknown layer(s) features.99"),
    (["occlusion", "--channel", "500", "--layer", "features.1"], "--channel: layer features.1 has 96 channels"),
    (["occlusion", "--window", "65"], "--window: the square (65) is larger than the images (64)"),
    (["invariance", "--transforms", "rotate,scale", "--amounts", "1,2"], "--amounts: name one transform"),
    (["evolution", "--checkpoints", "missing.pt"], "--checkpoints: no such file: missing.pt"),
])
def test_cli_usage_errors_exit_2(photo_folder, tmp_path, capsys, argv, message):
    code, out, err = run_command(capsys, *argv, "--model", "zfnet", "--images", photo_folder, "--image-size", "64",
                                 "--out", tmp_path / "out")
    assert code == 2 and message in err, err


def test_cli_evolution_end_to_end_and_a_foreign_checkpoint(photo_folder, tmp_path, capsys):
    """A checkpoint of the model itself draws the figure; one of another model is a usage error that names keys."""
    from deconvcuda import models

    torch.manual_seed(0)
    model = models.build("zfnet")
    mine, foreign = tmp_path / "mine.pt", tmp_path / "foreign.pt"
    torch.save(model.state_dict(), mine)
    torch.save(nn.Conv2d(3, 4, 3).state_dict(), foreign)
    common = ("evolution", "--model", "zfnet", "--images", photo_folder, "--image-size", "64", "--layer",
              "features.1", "--channels", "0-2", "--out", tmp_path / "out")
    code, out, err = run_command(capsys, *common, "--checkpoints", mine, foreign)
    assert code == 2 and "does not fit the model" in err and "unexpected keys: weight, bias" in err, err
    code, out, err = run_command(capsys, *common, "--checkpoints", mine, mine)
    assert code == 0, err
    _assert_drawn(tmp_path / "out" / "evolution" / "features.1.png", min_width=150)
    assert 'src="evolution/features.1.png"' in (tmp_path / "out" / "index.html").read_text(encoding="utf-8")
