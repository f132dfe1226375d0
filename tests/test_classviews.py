"""Grad-CAM and guided Grad-CAM: against autograd written here, against Captum, on graph models, with
both kinds of target, the model left as it was, and clear errors."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deconvcuda
from deconvcuda.checks import OutOfRangeError

torch.set_num_threads(2)


class SmallNet(nn.Module):
    """conv -> in-place ReLU -> pool -> conv -> in-place ReLU -> mean -> linear: Grad-CAM's layers are
    the convolutions, whose outputs the next in-place ReLU overwrites."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                                      nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(inplace=True))
        self.classifier = nn.Linear(8, classes)

    def forward(self, x):
        return self.classifier(self.features(x).mean((2, 3)))


class GuidedReLU(torch.autograd.Function):
    """ReLU whose backward is guided backpropagation's: max(g, 0) where the input was positive."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g.clamp_min(0) * (x > 0)


def by_hand(model: SmallNet, x: torch.Tensor, conv: int, target: torch.Tensor, relu=torch.relu):
    """SmallNet's forward written out: (the output of features[conv], the class scores)."""
    f = model.features
    a1 = f[0](x)
    cut = a1 if conv == 0 else None
    h = F.max_pool2d(relu(a1), 2)
    a2 = f[3](h)
    cut = a2 if conv == 3 else cut
    scores = model.classifier(relu(a2).mean((2, 3)))
    return cut, scores


def gradcam_by_hand(model: SmallNet, x: torch.Tensor, conv: int, target: torch.Tensor, mode: str) -> torch.Tensor:
    activations, scores = by_hand(model, x, conv, target)
    (g,) = torch.autograd.grad(scores.gather(1, target[:, None]).sum(), activations)
    cam = torch.relu((g.mean((2, 3), keepdim=True) * activations).sum(1, keepdim=True)).detach()
    return F.interpolate(cam, size=x.shape[-2:], mode=mode, align_corners=False if mode == "bilinear" else None)


def photos(size: int = 32, count: int = 4) -> torch.Tensor:
    images = deconvcuda.data.bundled_photos(size=size, crops_per_photo=1).images[:count]
    return (images - images.mean(dim=(0, 2, 3), keepdim=True)).to(torch.float64)


@pytest.fixture(scope="module")
def small() -> SmallNet:
    torch.manual_seed(0)
    return SmallNet().double().eval()


@pytest.mark.parametrize("conv", [0, 3])
@pytest.mark.parametrize("as_tensor", [False, True], ids=["int", "tensor"])
def test_gradcam_equals_autograd_by_hand(small, conv, as_tensor):
    x = photos()
    target = torch.tensor([2, 0, 4, 1]) if as_tensor else 3
    ours = deconvcuda.gradcam(small, x, f"features.{conv}", target)
    expected = gradcam_by_hand(small, x, conv, target if as_tensor else torch.full((4,), 3), "bilinear")[:, 0]
    assert ours.shape == (4, 32, 32) and ours.dtype == torch.float64
    assert ours.abs().max() > 0
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12)


def test_gradcam_nearest_and_the_batch_equals_one_image_at_a_time(small):
    x = photos()
    target = torch.tensor([1, 3, 0, 2])
    whole = deconvcuda.gradcam(small, x, "features.3", target, upsample="nearest")
    torch.testing.assert_close(whole, gradcam_by_hand(small, x, 3, target, "nearest")[:, 0], rtol=1e-10, atol=1e-12)
    singles = torch.cat([deconvcuda.gradcam(small, x[i:i + 1], "features.3", int(target[i]), upsample="nearest")
                         for i in range(4)])
    torch.testing.assert_close(whole, singles, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("as_tensor", [False, True], ids=["int", "tensor"])
def test_guided_gradcam_equals_autograd_by_hand(small, as_tensor):
    x = photos()
    target = torch.tensor([4, 1, 1, 0]) if as_tensor else 2
    targets = target if as_tensor else torch.full((4,), 2)
    ours = deconvcuda.guided_gradcam(small, x, "features.3", target)
    pixels = x.clone().requires_grad_()
    _, scores = by_hand(small, pixels, 3, targets, relu=GuidedReLU.apply)
    (guided,) = torch.autograd.grad(scores.gather(1, targets[:, None]).sum(), pixels)
    expected = guided * gradcam_by_hand(small, x, 3, targets, "nearest")
    assert ours.shape == x.shape and ours.abs().max() > 0
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-14)


def captum_gradcam(model, x, layer, target):
    from captum.attr import LayerAttribution, LayerGradCam

    cam = LayerGradCam(model, model.get_submodule(layer)).attribute(x, target=target, relu_attributions=True)
    return LayerAttribution.interpolate(cam, tuple(x.shape[-2:]), "bilinear")[:, 0]


def captum_guided_gradcam(model, x, layer, target):
    from captum.attr import GuidedGradCam

    return GuidedGradCam(model, model.get_submodule(layer)).attribute(x, target=target)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("layer", ["features.0", "features.4"])
def test_captum_agrees_on_a_conv_net_with_in_place_relus(small, layer):
    pytest.importorskip("captum")
    x = photos()
    target = torch.tensor([0, 4, 2, 2])
    torch.testing.assert_close(deconvcuda.gradcam(small, x, layer, target), captum_gradcam(small, x, layer, target),
                               rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(deconvcuda.guided_gradcam(small, x, layer, 3), captum_guided_gradcam(small, x, layer, 3),
                               rtol=1e-9, atol=1e-14)


@pytest.fixture(scope="module")
def resnet18():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).double().eval()


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("layer", ["layer3", "layer4.1.conv2"])
def test_captum_agrees_on_resnet18(resnet18, layer):
    pytest.importorskip("captum")
    torch.manual_seed(1)
    x = torch.randn(2, 3, 40, 40, dtype=torch.float64)
    target = torch.tensor([7, 1])
    ours = deconvcuda.gradcam(resnet18, x, layer, target)
    assert ours.abs().max() > 0
    torch.testing.assert_close(ours, captum_gradcam(resnet18, x, layer, target), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(deconvcuda.guided_gradcam(resnet18, x, layer, 5),
                               captum_guided_gradcam(resnet18, x, layer, 5), rtol=1e-9, atol=1e-14)


def test_float32_follows_float64(small):
    x = photos()
    expected = deconvcuda.guided_gradcam(small, x, "features.3", 1)
    ours = deconvcuda.guided_gradcam(copy.deepcopy(small).float(), x.float(), "features.3", 1)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), expected, rtol=1e-3, atol=1e-6 * float(expected.abs().max()))


class Branchy(nn.Module):
    """A forward that branches on the data: torch.fx cannot trace it, Grad-CAM still runs it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        if x.mean() > 0:
            x = x * 2
        return self.head(x.mean((2, 3)))


def test_gradcam_runs_models_fx_cannot_trace():
    torch.manual_seed(0)
    model = Branchy().double()
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    activations = model.conv(x)
    h = torch.relu(activations)
    scores = model.head((h * 2 if h.mean() > 0 else h).mean((2, 3)))
    (g,) = torch.autograd.grad(scores[:, 2].sum(), activations)
    expected = torch.relu((g.mean((2, 3), keepdim=True) * activations).sum(1)).detach()
    torch.testing.assert_close(deconvcuda.gradcam(model, x, "conv", 2), expected, rtol=1e-10, atol=1e-12)


def snapshot(model: nn.Module):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(n, p.requires_grad, p.grad) for n, p in model.named_parameters()],
            [m.training for m in model.modules()])


def assert_untouched(model: nn.Module, before) -> None:
    state, grads, flags = before
    after = model.state_dict()
    assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state)
    assert [(n, p.requires_grad, p.grad) for n, p in model.named_parameters()] == grads
    assert [m.training for m in model.modules()] == flags
    for module in model.modules():
        assert not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                    or module._backward_pre_hooks), f"a hook was left on {module}"


def test_the_model_is_not_changed():
    torch.manual_seed(0)
    model = SmallNet().double().train()
    model.classifier.eval()
    model.features[0].weight.requires_grad_(False)
    before = snapshot(model)
    x = photos()
    deconvcuda.gradcam(model, x, "features.3", 1)
    deconvcuda.guided_gradcam(model, x, "features.0", torch.tensor([0, 1, 2, 3]))
    assert_untouched(model, before)


def test_frozen_models_and_inference_mode_images(small):
    frozen = SmallNet().double().eval().requires_grad_(False)
    frozen.load_state_dict(small.state_dict())
    x = photos()
    expected = deconvcuda.gradcam(small, x, "features.3", 2)
    with torch.inference_mode():
        inside = x.clone()
        ours = deconvcuda.gradcam(frozen, inside, "features.3", 2)
    torch.testing.assert_close(ours, expected)


class Unused(SmallNet):
    """SmallNet with a convolution the forward runs but the class scores never read, and one it never runs."""

    def __init__(self):
        super().__init__()
        self.side = nn.Conv2d(3, 2, 3)
        self.spare = nn.Conv2d(3, 2, 3)

    def forward(self, x):
        self.side(x)
        return super().forward(x)


@pytest.mark.parametrize("function", [deconvcuda.gradcam, deconvcuda.guided_gradcam])
def test_bad_input_is_a_clear_error(small, function):
    name = function.__name__
    x = photos(count=2)
    with pytest.raises(OutOfRangeError, match=rf"{name}: target class 5 is out of range.*5 classes"):
        function(small, x, "features.3", 5)
    with pytest.raises(OutOfRangeError, match=rf"{name}: target class -1"):
        function(small, x, "features.3", torch.tensor([0, -1]))
    with pytest.raises(ValueError, match=rf"{name}: target as a tensor must hold one class per image, shape \[2\]"):
        function(small, x, "features.3", torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match=rf"{name}: target must be an int or a LongTensor"):
        function(small, x, "features.3", torch.tensor([0.0, 1.0]))
    with pytest.raises(TypeError, match=rf"{name}: target must be an int or a LongTensor"):
        function(small, x, "features.3", "cat")
    with pytest.raises(ValueError, match=rf"{name}: layer must be a layer inside the model"):
        function(small, x, "", 0)
    with pytest.raises(ValueError, match=rf"{name}: layer 'classifier' has output \[2, 5\]; Grad-CAM needs a layer "
                                         r"with a spatial output"):
        function(small, x, "classifier", 0)
    with pytest.raises(ValueError, match=rf"{name}: unknown layer 'features.9'"):
        function(small, x, "features.9", 0)
    features_only = small.features
    with pytest.raises(ValueError, match=rf"{name}: the model's output must be class scores \[N, classes\] with "
                                         r"N = 2.*got \[2, 8, 16, 16\]"):
        function(features_only, x, "3", 0)
    unused = Unused().double()
    with pytest.raises(ValueError, match=rf"{name}: the model's output does not depend on layer 'side'"):
        function(unused, x, "side", 0)
    with pytest.raises(ValueError, match=rf"{name}: layer 'spare' is never called"):
        function(unused, x, "spare", 0)
    with pytest.raises(TypeError, match=rf"{name}: images must be a tensor"):
        function(small, x.tolist(), "features.3", 0)


def test_bad_upsample_is_a_clear_error(small):
    with pytest.raises(ValueError, match="gradcam: upsample must be one of 'bilinear'"):
        deconvcuda.gradcam(small, photos(count=1), "features.3", 0, upsample="linear")
