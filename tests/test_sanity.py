"""The sanity check (Adebayo et al. 2018): the table's shape and first column, the measures against
scipy and scikit-image, the gradient decorrelating, the model and the random state untouched, the
same seed the same table, and clear errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import deconvcuda
from deconvcuda.checks import OutOfRangeError
from deconvcuda.sanity import randomizable_layers
from deconvcuda.similarity import saliency_maps, spearman, ssim

torch.set_num_threads(2)


def small_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                         nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(), nn.Conv2d(12, 16, 3, padding=1)).double().eval()


def photos(size: int = 24, count: int = 3) -> torch.Tensor:
    images = deconvcuda.data.bundled_photos(size=size, crops_per_photo=1).images[:count]
    return (images - images.mean(dim=(0, 2, 3), keepdim=True)).to(torch.float64)


@pytest.fixture(scope="module")
def table():
    model = small_net()
    model[1].running_mean.uniform_(-0.5, 0.5)
    model[1].running_var.uniform_(0.5, 2.0)
    return model, deconvcuda.sanity_check(model, photos(), "6")


def test_the_table(table):
    _, result = table
    assert result.layers == ("6", "4", "1", "0")  # every layer with weights, from the top down; BatchNorm too
    assert result.rules == ("deconvnet", "guided", "gradient")
    assert result.spearman.shape == result.ssim.shape == (3, 5)
    assert result.spearman_per_image.shape == result.ssim_per_image.shape == (3, 5, 3)
    assert torch.equal(result.spearman[:, 0], torch.ones(3, dtype=torch.float64))
    assert torch.equal(result.ssim[:, 0], torch.ones(3, dtype=torch.float64))
    assert result.projections.shape == (3, 5, 3, 24, 24)
    torch.testing.assert_close(result.spearman, result.spearman_per_image.mean(dim=2))


def test_images_in_batches_give_the_same_table(table):
    model, whole = table
    batched = deconvcuda.sanity_check(model, photos(), "6", rules=["guided"], batch_size=2)
    for name in ("spearman_per_image", "ssim_per_image", "projections"):   # guided is the fixture's second row
        torch.testing.assert_close(getattr(batched, name), getattr(whole, name)[1:2], rtol=1e-9, atol=1e-12, msg=name)
    assert torch.equal(batched.neurons, whole.neurons) and torch.equal(batched.regions, whole.regions)


def test_the_neurons_are_each_images_strongest_activation_and_projected_as_project_does(table):
    model, result = table
    x = photos()
    with torch.no_grad():
        output = model(x)                                                  # [3, 16, 12, 12]
    field = deconvcuda.receptive_field(model, "6")                        # 10 x 10, stride 2, offset -2
    for (image, channel, y, x_), region in zip(result.neurons.tolist(), result.regions.tolist()):
        assert output[image, channel, y, x_] == output[image].max()
        top, left, bottom, right = field.box(y, x_)
        top, left, bottom, right = max(top, 0), max(left, 0), min(bottom, 24), min(right, 24)
        assert region[2] - region[0] == max(bottom - top, 11) and region[3] - region[1] == max(right - left, 11)
        assert region[0] <= top and region[1] <= left and region[2] >= bottom and region[3] >= right
    for row, rule in enumerate(result.rules):
        expected = deconvcuda.project(model, x, "6", neurons=result.neurons[:1], rule=rule, seed="one")[0]
        torch.testing.assert_close(result.projections[row, 0], expected)


def adebayo_map(projection: np.ndarray) -> np.ndarray:
    """The paper's code (abs_grayscale_norm on [H, W, C]): sum |p| over channels, clip at the 99th percentile."""
    image = np.abs(projection.transpose(1, 2, 0)).sum(axis=2)
    low, high = image.min(), np.percentile(image, 99)
    return np.clip((image - low) / (high - low), 0, 1)


def test_the_measures_are_scipys_and_scikit_images(table):
    stats = pytest.importorskip("scipy.stats")
    metrics = pytest.importorskip("skimage.metrics")
    _, result = table
    top, left, bottom, right = result.regions[0].tolist()
    for row in range(3):
        original = adebayo_map(result.projections[row, 0, :, top:bottom, left:right].numpy())
        for step in range(1, 5):
            randomized = adebayo_map(result.projections[row, step, :, top:bottom, left:right].numpy())
            rho = stats.spearmanr(original.ravel(), randomized.ravel())[0]
            index = metrics.structural_similarity(original, randomized, data_range=1.0, gaussian_weights=True,
                                                  use_sample_covariance=False)
            assert float(result.spearman_per_image[row, step, 0]) == pytest.approx(rho, abs=1e-9)
            assert float(result.ssim_per_image[row, step, 0]) == pytest.approx(index, abs=1e-9)


def test_tiny_images_use_a_smaller_ssim_window():
    result = deconvcuda.sanity_check(small_net(), photos(size=8, count=2), "4", rules=["gradient"])
    assert result.regions.tolist() == [[0, 0, 8, 8], [0, 0, 8, 8]] and result.ssim[0, 0] == 1.0
    a, b = saliency_maps(torch.randn(2, 3, 8, 9, dtype=torch.float64)).numpy()
    taps = np.exp(-np.arange(-3, 4) ** 2 / (2 * 1.5 ** 2))
    weights = np.outer(taps, taps) / taps.sum() ** 2                # the 7 x 7 Gaussian window that fits
    values = []
    for y in range(8 - 6):
        for x in range(9 - 6):
            p, q = a[y:y + 7, x:x + 7], b[y:y + 7, x:x + 7]
            mp, mq = (weights * p).sum(), (weights * q).sum()
            vp, vq = (weights * (p - mp) ** 2).sum(), (weights * (q - mq) ** 2).sum()
            cov = (weights * (p - mp) * (q - mq)).sum()
            values.append((2 * mp * mq + 1e-4) * (2 * cov + 9e-4) / ((mp ** 2 + mq ** 2 + 1e-4) * (vp + vq + 9e-4)))
    ours = ssim(torch.from_numpy(a)[None], torch.from_numpy(b)[None])
    assert float(ours) == pytest.approx(np.mean(values), abs=1e-12)


def test_spearman_and_ssim_on_their_own():
    stats = pytest.importorskip("scipy.stats")
    generator = torch.Generator().manual_seed(0)
    a = torch.randint(0, 5, (3, 200), generator=generator).double()    # many ties
    b = a + torch.randn(3, 200, generator=generator, dtype=torch.float64) * 2
    expected = [stats.spearmanr(x.numpy(), y.numpy())[0] for x, y in zip(a, b)]
    torch.testing.assert_close(spearman(a, b), torch.tensor(expected, dtype=torch.float64))
    assert torch.equal(spearman(a, a), torch.ones(3, dtype=torch.float64))
    assert spearman(torch.zeros(1, 5), torch.arange(5.0)[None]).item() == 0.0
    maps = saliency_maps(torch.randn(2, 3, 16, 16, generator=generator))
    assert maps.min() == 0 and maps.max() == 1
    assert torch.equal(ssim(maps, maps), torch.ones(2, dtype=torch.float64))


def test_the_gradient_decorrelates_and_guided_backpropagation_less():
    """On real photo crops, even with random weights to start from: full randomization leaves the
    gradient's map far from the original, while guided backpropagation keeps more of it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(32, 32, 3, padding=1)).double().eval()
    result = deconvcuda.sanity_check(model, photos(size=32, count=2), "6", rules=["guided", "gradient"], seed=1)
    assert result.layers == ("6", "3", "0")
    guided, gradient = result.spearman[:, -1]
    assert gradient < 0.8 and gradient < guided


def test_the_model_and_the_random_state_are_untouched():
    model = small_net().train()
    model[4].eval()
    model[0].bias.requires_grad_(False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    requires = [p.requires_grad for p in model.parameters()]
    random_state = torch.get_rng_state()
    first = deconvcuda.sanity_check(model, photos(count=2), "4", rules="gradient", seed=3)
    assert torch.equal(torch.get_rng_state(), random_state)
    after = model.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state)
    assert [m.training for m in model.modules()] == flags
    assert [p.requires_grad for p in model.parameters()] == requires
    assert all(p.grad is None for p in model.parameters())
    for module in model.modules():
        assert not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks)
    again = deconvcuda.sanity_check(model, photos(count=2), "4", rules="gradient", seed=3)
    other = deconvcuda.sanity_check(model, photos(count=2), "4", rules="gradient", seed=4)
    assert torch.equal(first.spearman, again.spearman) and torch.equal(first.ssim, again.ssim)
    assert torch.equal(first.projections, again.projections)
    assert not torch.equal(first.spearman[:, 1:], other.spearman[:, 1:])


def test_a_chosen_channel_and_a_flat_output():
    model = small_net()
    x = photos(count=2)
    result = deconvcuda.sanity_check(model, x, "4", rules=["deconvnet"], channel=torch.tensor([3, 7]))
    with torch.no_grad():
        output = model[:5](x)
    for image, channel, y, x_ in result.neurons.tolist():
        assert channel == [3, 7][image] and output[image, channel, y, x_] == output[image, channel].max()
    classifier = nn.Sequential(small_net(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4)).double().eval()
    flat = deconvcuda.sanity_check(classifier, x, "", rules=["gradient"], channel=2)
    assert flat.layers == ("3", "0.6", "0.4", "0.1", "0.0")
    assert flat.neurons.tolist() == [[0, 2, 0, 0], [1, 2, 0, 0]]


class Unused(nn.Module):
    def __init__(self):
        super().__init__()
        self.pool = nn.MaxPool2d(2)
        self.conv = nn.Conv2d(3, 4, 3)
        self.spare = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(self.pool(x))


class Twice(nn.Module):
    """One convolution and one ReLU, each called twice."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.conv(self.relu(self.conv(x))))


def test_bad_input_is_a_clear_error():
    model = small_net()
    x = photos(count=2)
    with pytest.raises(ValueError, match=r"sanity_check: rules must be one of 'deconvnet', 'guided', 'gradient', "
                                         r"got 'saliency'"):
        deconvcuda.sanity_check(model, x, "4", rules=["guided", "saliency"])
    with pytest.raises(ValueError, match="sanity_check: rules is empty"):
        deconvcuda.sanity_check(model, x, "4", rules=[])
    with pytest.raises(ValueError, match="sanity_check: rules names 'guided' more than once"):
        deconvcuda.sanity_check(model, x, "4", rules=["guided", "guided"])
    with pytest.raises(TypeError, match="sanity_check: rules must be a rule name or a sequence"):
        deconvcuda.sanity_check(model, x, "4", rules=3)
    with pytest.raises(OutOfRangeError, match=r"sanity_check: channel 12 is out of range; the layer has 12 channels"):
        deconvcuda.sanity_check(model, x, "4", channel=12)
    with pytest.raises(TypeError, match="sanity_check: channel must be an int, a LongTensor"):
        deconvcuda.sanity_check(model, x, "4", channel=1.5)
    with pytest.raises(ValueError, match=r"sanity_check: channel as a tensor or list must hold one channel per image"):
        deconvcuda.sanity_check(model, x, "4", channel=torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="sanity_check: seed must be an int"):
        deconvcuda.sanity_check(model, x, "4", seed=0.5)
    with pytest.raises(ValueError, match="sanity_check: batch_size must be a positive int, got 0"):
        deconvcuda.sanity_check(model, x, "4", batch_size=0)
    with pytest.raises(ValueError, match="sanity_check: unknown layer '9'"):
        deconvcuda.sanity_check(model, x, "9")
    with pytest.raises(TypeError, match="sanity_check: images must be a tensor"):
        deconvcuda.sanity_check(model, x.numpy(), "4")
    unused = Unused().double()
    with pytest.raises(ValueError, match="sanity_check: no layer with weights runs before layer 'pool'"):
        deconvcuda.sanity_check(unused, x, "pool")
    with pytest.raises(ValueError, match="sanity_check: .*'spare'"):
        deconvcuda.sanity_check(unused, x, "spare")
    assert randomizable_layers(unused, x, "conv") == ("conv",)
    with pytest.raises(ValueError, match="sanity_check: layer 'relu' is called 2 times in the model's forward, so it "
                                         "has no single output"):
        deconvcuda.sanity_check(Twice().double(), x, "relu")


def test_the_figure(table, tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    from deconvcuda.figures import sanity_figure

    _, result = table
    path = sanity_figure(tmp_path / "sanity.png", result, image=torch.rand(3, 24, 24))
    with Image.open(path) as picture:
        width, height = picture.size
    assert width > height > 100
