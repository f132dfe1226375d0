"""Real photos (issue 14, item 5): flat regions, saturated pixels and zero padding give max pools exact
ties, which the last bit of the convolution before them decides. The forward must compute what the
user's model computes on the images as given, so that float64 projections equal autograd on the
model as given, in either memory format; and the native pooling must break exact ties as PyTorch's
does (the first maximum in row-major window order)."""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from conftest import rule_oracle
import deconvcuda
from deconvcuda import ops

torchvision = pytest.importorskip("torchvision")
pytest.importorskip("skimage")


@functools.lru_cache(maxsize=1)
def photos(size: int = 160) -> torch.Tensor:
    """Crops of scikit-image's bundled photos, as AlexNet takes them (float64)."""
    rgb = deconvcuda.data.bundled_photos(size=size, crops_per_photo=1).images
    return deconvcuda.models.IMAGENET.to_model(rgb).double()


@functools.lru_cache(maxsize=1)
def alexnet64() -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.alexnet().eval().double()


def worst_error(actual: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """Per projection, its largest error relative to its largest value."""
    return (actual - expected).flatten(1).abs().amax(1) / expected.flatten(1).abs().amax(1).clamp_min(1e-300)


def test_projections_equal_autograd_on_photos():
    """The top-3 activations of 16 channels of conv5 over the photos (the paper's workload), NCHW as
    the photos come: the switches are the model's own."""
    model, images = alexnet64(), photos()
    layer = "features.11"  # conv5 after its ReLU: three max pools below it
    top = deconvcuda.top_activations(model, images, layer, k=3, progress=False)
    neurons = torch.cat([top.neurons(c) for c in range(0, 256, 16)])
    for rule in ("deconvnet", "guided"):
        error = worst_error(deconvcuda.project(model, images, layer, neurons=neurons, rule=rule),
                            rule_oracle(model, images, layer, neurons=neurons, rule=rule))
        assert float(error.max()) < 1e-9, f"{rule}: {int((error > 1e-9).sum())} of {len(error)} projections differ"


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last],
                         ids=["nchw", "channels_last"])
def test_the_forward_runs_in_the_images_memory_format(memory_format):
    """Channels-last photos go through the convolutions channels-last, as the model runs on them.
    (In channels-last PyTorch's own float64 convolutions round differently for other batches, so the
    oracle here runs on the same batch: one projection per image.)"""
    model, images = alexnet64(), photos().contiguous(memory_format=memory_format)
    for channel in range(0, 256, 32):
        for rule in ("deconvnet", "guided"):
            error = worst_error(deconvcuda.project(model, images, "features.11", channel=channel, rule=rule),
                                rule_oracle(model, images, "features.11", channel=channel, rule=rule))
            assert float(error.max()) < 1e-9, f"channel {channel} {rule}: {int((error > 1e-9).sum())} differ"


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last],
                         ids=["nchw", "channels_last"])
def test_native_pooling_breaks_ties_as_pytorch_does(memory_format):
    """After a ReLU most pooling windows of a photo's map hold exact ties (zeros): the switch of every
    window is PyTorch's index, in both memory formats."""
    model, images = alexnet64(), photos()[:3].contiguous(memory_format=memory_format)
    with torch.no_grad():
        maps = model.features[:2](images)  # conv1 + ReLU
    assert float((maps == 0).double().mean()) > 0.2, "the test needs windows of tied zeros"
    kernel, stride = (3, 3), (2, 2)
    pooled, switches = ops.max_pool2d_switches(maps, kernel, stride)
    expected, flat = F.max_pool2d_with_indices(maps, kernel, stride)
    torch.testing.assert_close(pooled, expected, rtol=0, atol=0)
    width = maps.shape[3]
    rows = torch.arange(pooled.shape[2]).view(1, 1, -1, 1) * stride[0]
    cols = torch.arange(pooled.shape[3]).view(1, 1, 1, -1) * stride[1]
    local = (flat // width - rows) * kernel[1] + (flat % width - cols)
    assert torch.equal(switches.long(), local)
