"""deconvcuda.receptive_field and deconvcuda.crop_patches.

Oracles:
  * the geometry, computed here the other way round: the interval of input rows (columns) an
    activation sees, pulled back layer by layer from the target to the input
    (``field_by_pulling_back``), plus well-known published values hard-coded (VGG16 conv5_3 sees
    196 pixels at stride 16, AlexNet pool5 195 at stride 32);
  * the projections themselves: every non-zero pixel of ``project(..., seed="one")`` of an
    activation lies inside its box, clipped to the image (the pure-PyTorch reference backend,
    which computes full maps and never crops by receptive field, so the check is not circular);
    for a model with positive weights and no max pool, the non-zero pixels reach every edge of
    the clipped box (the box is tight);
  * ``crop_by_hand``: a pixel-by-pixel loop for ``crop_patches``.

Models with random weights are built on the meta device and materialised without their
classifiers (which the tests never reach), so that building them costs nothing.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import pytest
import torch
from torch import nn

import deconvcuda
from conftest import DEVICES
from deconvcuda import crop_patches, receptive_field
from deconvcuda.graph import trace


def pair(value) -> Tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


# --------------------------------------------------------------------------------------------- #
# Models
# --------------------------------------------------------------------------------------------- #

def geometry_only(builder):
    """A model for its layer geometry alone: built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        return builder()


def he_initialised(model: nn.Module, seed: int) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                module.weight.normal_(0.0, (2.0 / module.weight[0].numel()) ** 0.5, generator=generator)
                if module.bias is not None:
                    module.bias.normal_(0.0, 0.1, generator=generator)
            elif isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.5, generator=generator)
                module.running_var.uniform_(0.5, 2.0, generator=generator)
                module.weight.uniform_(-1.5, 1.5, generator=generator)  # negative gammas too
                module.bias.normal_(0.0, 0.1, generator=generator)
    return model


def features_with_random_weights(builder, seed: int) -> nn.Module:
    """A torchvision-style model (``features`` ...) with random conv weights and no classifier."""
    model = geometry_only(builder)
    if hasattr(model, "classifier"):
        model.classifier = nn.Identity()
    return he_initialised(model.to_empty(device="cpu"), seed).eval()


def torchvision_model(name: str):
    import torchvision

    return lambda: getattr(torchvision.models, name)(weights=None)


def odd_geometry() -> nn.Sequential:
    """Every kind of geometry receptive_field follows, on a non-square input: stride, padding,
    dilation, ceil_mode, anisotropic kernels and strides, avg pools with padding, BatchNorm and
    LRN (pointwise in space), an even adaptive pool."""
    return nn.Sequential(
        nn.Conv2d(3, 6, 5, stride=2, padding=2),                        # 0
        nn.ReLU(),                                                      # 1
        nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True),           # 2
        nn.Conv2d(6, 8, 3, padding=2, dilation=2),                      # 3
        nn.BatchNorm2d(8),                                              # 4
        nn.ReLU(),                                                      # 5
        nn.AvgPool2d(3, stride=1, padding=1),                           # 6
        nn.MaxPool2d(2, stride=1, dilation=2),                          # 7
        nn.LocalResponseNorm(3),                                        # 8
        nn.Conv2d(8, 8, (3, 1), stride=(1, 2), padding=(1, 0)),         # 9
        nn.ReLU(),                                                      # 10
        nn.AdaptiveAvgPool2d((2, None)),                                # 11: even on this input (4 rows)
    )


ODD_INPUT = (3, 29, 35)


# --------------------------------------------------------------------------------------------- #
# The geometry oracle
# --------------------------------------------------------------------------------------------- #

def module_chain(model: nn.Module, layer: str) -> List[nn.Module]:
    """The modules from the input to ``layer`` (inclusive), for models that are a plain chain of
    modules (nn.Sequential, or torchvision's features, which come first)."""
    chain = []
    for name, module in model.named_modules():
        if len(list(module.children())) == 0:
            chain.append(module)
        if name == layer:
            return chain
    raise KeyError(layer)


def field_by_pulling_back(modules: Sequence[nn.Module], spatial=None):
    """(size, stride, offset) per axis, computed top-down: the input interval [first, last] that
    output positions 0 and 1 of the last module see, pulled back through each module (a window
    at output i covers input i * s - p .. i * s - p + d * (k - 1)). ``spatial`` (H, W) is needed
    only for adaptive pools, which are plain pools when the sizes divide."""
    geometry = []
    shape = list(spatial) if spatial is not None else None
    for module in modules:
        if isinstance(module, nn.Conv2d):
            g = (module.kernel_size, module.stride, module.padding, module.dilation)
        elif isinstance(module, nn.MaxPool2d):
            g = (pair(module.kernel_size), pair(module.stride or module.kernel_size), pair(module.padding),
                 pair(module.dilation))
        elif isinstance(module, nn.AvgPool2d):
            g = (pair(module.kernel_size), pair(module.stride or module.kernel_size), pair(module.padding), (1, 1))
        elif isinstance(module, nn.AdaptiveAvgPool2d):
            out = [shape[a] if pair(module.output_size)[a] is None else pair(module.output_size)[a] for a in range(2)]
            assert all(shape[a] % out[a] == 0 for a in range(2)), "only even adaptive pools are plain pools"
            window = tuple(shape[a] // out[a] for a in range(2))
            g = (window, window, (0, 0), (1, 1))
        else:
            continue
        geometry.append(g)
        if shape is not None:
            kernel, stride, padding, dilation = g
            ceil = isinstance(module, nn.MaxPool2d) and module.ceil_mode
            for a in range(2):  # PyTorch's output size; a ceil-mode window may not start in the end padding
                size_in = shape[a]
                span = size_in + 2 * padding[a] - dilation[a] * (kernel[a] - 1) - 1
                shape[a] = (span + (stride[a] - 1 if ceil else 0)) // stride[a] + 1
                if ceil and (shape[a] - 1) * stride[a] >= size_in + padding[a]:
                    shape[a] -= 1

    def pull_back(position: int, axis: int) -> Tuple[int, int]:
        first = last = position
        for kernel, stride, padding, dilation in reversed(geometry):
            first = first * stride[axis] - padding[axis]
            last = last * stride[axis] - padding[axis] + dilation[axis] * (kernel[axis] - 1)
        return first, last

    size, stride, offset = [], [], []
    for axis in range(2):
        first0, last0 = pull_back(0, axis)
        first1, _ = pull_back(1, axis)
        size.append(last0 - first0 + 1)
        stride.append(first1 - first0)
        offset.append(first0)
    return tuple(size), tuple(stride), tuple(offset)


def assert_field(field, size, stride, offset, msg=""):
    assert (field.size, field.stride, field.offset) == (tuple(size), tuple(stride), tuple(offset)), (
        f"{msg}: got size {field.size}, stride {field.stride}, offset {field.offset}; expected size "
        f"{tuple(size)}, stride {tuple(stride)}, offset {tuple(offset)}")


# --------------------------------------------------------------------------------------------- #
# Exact geometry
# --------------------------------------------------------------------------------------------- #

GEOMETRY_MODELS = {
    "vgg16": torchvision_model("vgg16"),
    "vgg16_hed": lambda: deconvcuda.models.vgg16_hed(pretrained=False),
    "alexnet": torchvision_model("alexnet"),
    "zfnet": deconvcuda.models.ZFNet,
    "vgg11_bn": torchvision_model("vgg11_bn"),
}


@pytest.mark.parametrize("name", list(GEOMETRY_MODELS))
def test_every_feature_layer_matches_the_pulled_back_interval(name):
    model = geometry_only(GEOMETRY_MODELS[name])
    layers = [f"features.{i}" for i in range(len(model.features))]
    for layer in layers:
        expected = field_by_pulling_back(module_chain(model, layer))
        assert_field(receptive_field(model, layer), *expected, msg=f"{name} {layer}")


# Published values (and their neighbours), per layer: (size, stride, offset), square.
KNOWN = {
    "vgg16": {
        "features.0": (3, 1, -1),      # conv1_1
        "features.2": (5, 1, -2),      # conv1_2
        "features.4": (6, 2, -2),      # pool1
        "features.9": (16, 4, -6),     # pool2
        "features.16": (44, 8, -18),   # pool3
        "features.23": (100, 16, -42),  # pool4
        "features.28": (196, 16, -90),  # conv5_3
        "features.29": (196, 16, -90),  # its ReLU: the same field
        "features.30": (212, 32, -90),  # pool5
    },
    "alexnet": {
        "features.0": (11, 4, -2),
        "features.2": (19, 8, -2),
        "features.5": (67, 16, -18),
        "features.10": (163, 16, -66),  # conv5
        "features.12": (195, 32, -66),  # pool5
    },
    "zfnet": {
        "features.0": (7, 2, -1),      # conv1 7x7 stride 2
        "features.2": (11, 4, -1),
        "features.4": (27, 8, -1),     # conv2 5x5 stride 2
        "features.12": (139, 16, -49),  # conv5
        "features.14": (171, 32, -49),  # pool5
    },
}
KNOWN["vgg16_hed"] = KNOWN["vgg16"]


@pytest.mark.parametrize("name, layer", [(n, l) for n in KNOWN for l in KNOWN[n]])
def test_known_values(name, layer):
    size, stride, offset = KNOWN[name][layer]
    field = receptive_field(geometry_only(GEOMETRY_MODELS[name]), layer)
    assert_field(field, (size, size), (stride, stride), (offset, offset), msg=f"{name} {layer}")


def test_odd_geometry_matches_the_pulled_back_interval():
    model = geometry_only(odd_geometry)
    for index in range(len(model)):
        layer = str(index)
        expected = field_by_pulling_back(module_chain(model, layer), spatial=ODD_INPUT[1:])
        assert_field(receptive_field(model, layer, input_size=ODD_INPUT[1:]), *expected, msg=f"layer {layer}")
        if index < 11:  # without input_size too: only the adaptive pool needs it
            assert_field(receptive_field(model, layer), *expected, msg=f"layer {layer} without input_size")
    # stride 2 * 2 * (1, 2) and anisotropic kernels: the axes differ
    field = receptive_field(model, "9")
    assert field.stride == (4, 8) and field.size[0] != field.size[1]


def test_box_and_boxes():
    field = receptive_field(geometry_only(odd_geometry), "9")
    (h, w), (sh, sw), (oy, ox) = field.size, field.stride, field.offset
    assert field.box(0, 0) == (oy, ox, oy + h, ox + w)
    assert field.box(2, 3) == (oy + 2 * sh, ox + 3 * sw, oy + 2 * sh + h, ox + 3 * sw + w)
    ys, xs = torch.tensor([0, 2, 1]), torch.tensor([0, 3, 4])
    boxes = field.boxes(ys, xs)
    assert boxes.dtype == torch.long and boxes.shape == (3, 4)
    assert boxes.tolist() == [list(field.box(int(y), int(x))) for y, x in zip(ys, xs)]
    assert [int(v) for v in field.box(ys, xs)[2]] == boxes[:, 2].tolist(), "box() takes tensors too"


# --------------------------------------------------------------------------------------------- #
# Flat layers and adaptive pools
# --------------------------------------------------------------------------------------------- #

def flat_model() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5), nn.ReLU())


@pytest.mark.parametrize("layer", ["2", "3", "4"])
def test_flat_layers_see_the_whole_image(layer):
    model = geometry_only(flat_model)
    with pytest.raises(ValueError, match=r"^receptive_field: .*whole image.*input_size"):
        receptive_field(model, layer)
    field = receptive_field(model, layer, input_size=(8, 8))
    assert_field(field, (8, 8), (0, 0), (0, 0), msg=layer)
    assert field.box(0, 0) == (0, 0, 8, 8)
    # the conv before it is an ordinary field, input_size or not
    assert_field(receptive_field(model, "0", input_size=(8, 8)), (3, 3), (1, 1), (0, 0))


def adaptive_model(output_size) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(output_size), nn.Conv2d(4, 4, 1))


@pytest.mark.parametrize("input_size, output_size, window", [
    ((9, 13), (2, 3), (2, 2)),       # conv: 4 x 6 -> windows 2 x 2
    ((9, 13), (4, 1), (1, 6)),       # 4 x 6 -> windows 1 x 6
    ((9, 13), (None, 2), (1, 3)),    # None keeps the rows: windows 1 x 3
    ((9, 13), (4, 6), (1, 1)),       # the identity
])
def test_even_adaptive_pools_count_as_plain_pools(input_size, output_size, window):
    plain = geometry_only(lambda: nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.AvgPool2d(window),
                                                nn.Conv2d(4, 4, 1)))
    model = geometry_only(lambda: adaptive_model(output_size))
    for layer in ("2", "3"):
        expected = receptive_field(plain, layer)
        assert expected.size != input_size
        assert receptive_field(model, layer, input_size=input_size) == expected, layer
        with pytest.raises(ValueError, match=r"^receptive_field: .*input_size"):
            receptive_field(model, layer)  # the windows depend on the input size, which is unknown


@pytest.mark.parametrize("input_size, output_size", [((9, 13), (3, 3)), ((11, 13), (2, 3)), ((9, 13), (5, 6))])
def test_uneven_adaptive_pools_see_the_whole_image(input_size, output_size):
    model = geometry_only(lambda: adaptive_model(output_size))
    for layer in ("2", "3"):
        assert_field(receptive_field(model, layer, input_size=input_size), input_size, (0, 0), (0, 0), msg=layer)


def test_alexnet_avgpool_is_plain_at_224_and_the_whole_image_at_127():
    model = geometry_only(GEOMETRY_MODELS["alexnet"])
    assert receptive_field(model, "avgpool", input_size=(224, 224)) == receptive_field(model, "features.12")
    assert_field(receptive_field(model, "avgpool", input_size=(127, 127)), (127, 127), (0, 0), (0, 0))
    assert_field(receptive_field(model, "classifier.1", input_size=(224, 200)), (224, 200), (0, 0), (0, 0))


@pytest.mark.parametrize("input_size, words", [((0, 5), "positive"), ((5,), "pair"), ((2, 2), "does not fit")])
def test_bad_input_size(input_size, words):
    with pytest.raises(ValueError, match=rf"^receptive_field: .*{words}"):
        receptive_field(geometry_only(odd_geometry), "9", input_size=input_size)


def test_unknown_layer_names_receptive_field():
    with pytest.raises(ValueError, match=r"^receptive_field: unknown layer 'no.such.layer'"):
        receptive_field(geometry_only(odd_geometry), "no.such.layer")


# --------------------------------------------------------------------------------------------- #
# The box holds the projection
# --------------------------------------------------------------------------------------------- #

def clipped(box, height: int, width: int):
    top, left, bottom, right = (int(v) for v in box)
    return max(top, 0), max(left, 0), min(bottom, height), min(right, width)


def support_bounds(projection: torch.Tensor):
    """(top, left, bottom, right) of the non-zero pixels of one projection [C, H, W], half-open;
    None where it is all zero."""
    nonzero = projection.abs().sum(dim=0) != 0
    if not bool(nonzero.any()):
        return None
    rows, cols = nonzero.any(dim=1).nonzero().flatten(), nonzero.any(dim=0).nonzero().flatten()
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def every_position(model, images, layer, channel, borders_only=False):
    """neurons rows naming ``channel`` at every position of ``layer`` in every image, so corners
    and edges (where the box reaches past the image) are all there; ``borders_only``: the first
    two, the middle and the last two rows and columns, to keep big maps quick."""
    _, height, width = trace(model, layer).shapes(tuple(images.shape[1:]))[layer]

    def positions(size):
        if not borders_only:
            return torch.arange(size)
        return torch.tensor(sorted({0, 1, size // 2, size - 2, size - 1} & set(range(size))))

    image, y, x = torch.meshgrid(torch.arange(images.shape[0]), positions(height), positions(width), indexing="ij")
    return torch.stack([image.flatten(), torch.full_like(image.flatten(), channel), y.flatten(), x.flatten()], dim=1)


def containment_models():
    return {
        "odd": (lambda: he_initialised(odd_geometry(), 1).eval(), ODD_INPUT, ["2", "5", "7", "9", "11"]),
        "alexnet": (lambda: features_with_random_weights(torchvision_model("alexnet"), 2), (3, 67, 67),
                    ["features.2", "features.5", "features.10"]),
        "zfnet": (lambda: features_with_random_weights(deconvcuda.models.ZFNet, 3), (3, 71, 71),
                  ["features.3", "features.7"]),
        "vgg16_hed": (lambda: deconvcuda.models.vgg16_hed(pretrained=False), (3, 36, 36),
                      ["features.4", "features.16"]),
    }


CONTAINMENT = containment_models()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(CONTAINMENT))
def test_the_box_holds_every_nonzero_pixel_of_the_projection(name, device):
    build, shape, layers = CONTAINMENT[name]
    model = build().to(device)
    images = torch.randn(2, *shape, generator=torch.Generator().manual_seed(4)).to(device)
    height, width = shape[1:]
    for layer in layers:
        field = receptive_field(model, layer, input_size=(height, width))
        rows = every_position(model, images, layer, channel=1, borders_only=True)
        # seed="one": every activation seeds 1, so few projections vanish; the reference backend
        # works on full maps, so it cannot hide pixels outside the box by cropping
        projections = deconvcuda.project(model, images, layer, neurons=rows.to(device), seed="one",
                                         backend="reference").cpu()
        nonzero = 0
        past_the_border = 0
        for row, projection in zip(rows.tolist(), projections):
            box = field.box(row[2], row[3])
            past_the_border += box[0] < 0 or box[1] < 0 or box[2] > height or box[3] > width
            bounds = support_bounds(projection)
            if bounds is None:
                continue
            nonzero += 1
            top, left, bottom, right = clipped(box, height, width)
            assert top <= bounds[0] and left <= bounds[1] and bounds[2] <= bottom and bounds[3] <= right, (
                f"{name} {layer} row {row}: non-zero pixels span {bounds}, outside the box {box}")
        assert nonzero >= len(rows) // 2, f"{name} {layer}: only {nonzero} of {len(rows)} projections are non-zero"
        assert past_the_border > 0, f"{name} {layer}: no box reaches past the image, the borders went untested"


@pytest.mark.parametrize("device", DEVICES)
def test_one_border_activation_through_channel_and_position(device):
    """The same with project's channel/position form, for a corner activation of AlexNet's conv2,
    whose box starts in the padding."""
    model = features_with_random_weights(torchvision_model("alexnet"), 5).to(device)
    images = torch.randn(3, 3, 67, 67, generator=torch.Generator().manual_seed(5)).to(device)
    field = receptive_field(model, "features.4")
    for y, x in ((0, 0), (6, 6), (0, 6)):  # features.4 is 7 x 7 here
        box = field.box(y, x)
        assert box[0] < 0 or box[2] > 67, "a border activation's box reaches past the image"
        projection = deconvcuda.project(model, images, "features.4", channel=3, position=(y, x), seed="one").cpu()
        top, left, bottom, right = clipped(box, 67, 67)
        outside = projection.clone()
        outside[:, :, top:bottom, left:right] = 0
        assert bool((outside == 0).all()), f"({y}, {x}): non-zero pixels outside the box {box}"
        assert bool((projection != 0).any()), f"({y}, {x}): the projection is empty, the test proves nothing"


def positive_model() -> nn.Sequential:
    """Positive weights, no max pool: every tap of every reverse step is positive, so a
    projection covers its field (without dilation, whose gaps at a border would leave the box's
    padded edge uncovered)."""
    model = nn.Sequential(
        nn.Conv2d(3, 4, 5, stride=2, padding=2), nn.ReLU(),
        nn.AvgPool2d(3, stride=2, padding=1),
        nn.Conv2d(4, 4, (3, 2), stride=(1, 2), padding=(1, 0)), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d((3, 2)),  # even on TIGHT_INPUT: 6 x 4 -> windows 2 x 2
        nn.Conv2d(4, 3, 2, padding=1),
    )
    generator = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                module.weight.uniform_(0.1, 1.0, generator=generator)
            elif isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 2.0, generator=generator)
    return model.eval()


TIGHT_INPUT = (3, 23, 29)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layer", ["0", "2", "5", "6", "7"])
def test_the_box_is_tight(layer, device):
    model = positive_model().to(device)
    height, width = TIGHT_INPUT[1:]
    images = (torch.rand(1, *TIGHT_INPUT, generator=torch.Generator().manual_seed(7)) + 0.1).to(device)
    field = receptive_field(model, layer, input_size=(height, width))
    assert field.stride != (0, 0), "the adaptive pool must be even here, or the field is just the image"
    rows = every_position(model, images, layer, channel=0)
    projections = deconvcuda.project(model, images, layer, neurons=rows.to(device), seed="one").cpu()
    for row, projection in zip(rows.tolist(), projections):
        assert support_bounds(projection) == clipped(field.box(row[2], row[3]), height, width), (
            f"layer {layer} row {row}: the non-zero pixels span {support_bounds(projection)}, the box "
            f"{field.box(row[2], row[3])}")


# --------------------------------------------------------------------------------------------- #
# crop_patches
# --------------------------------------------------------------------------------------------- #

def crop_by_hand(images: torch.Tensor, boxes, fill) -> torch.Tensor:
    """Pixel by pixel: patch p's pixel (i, j) is its image's pixel (top + i, left + j), or fill."""
    images = images.cpu()
    if images.dim() == 3:
        images = images[None]
    top, left, bottom, right = boxes[0]
    h, w = bottom - top, right - left
    patches = torch.full((len(boxes), images.shape[1], h, w), fill, dtype=images.dtype)
    for p, (top, left, _, _) in enumerate(boxes):
        image = images[p if images.shape[0] > 1 else 0]
        for i in range(h):
            for j in range(w):
                if 0 <= top + i < image.shape[1] and 0 <= left + j < image.shape[2]:
                    patches[p, :, i, j] = image[:, top + i, left + j]
    return patches


BOXES = [(0, 0, 4, 5), (-2, -3, 2, 2), (5, 6, 9, 11), (3, -1, 7, 4), (-10, -10, -6, -5), (8, 9, 12, 14)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fill", [0.0, -1.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.uint8], ids=str)
def test_crop_patches_one_image_per_box(device, fill, dtype):
    if dtype == torch.uint8:  # an image as stored: fill must be a uint8 too, and not among the pixels
        images = torch.randint(10, 256, (len(BOXES), 2, 9, 11), dtype=dtype)
        fill = 0 if fill == 0 else 7
    else:
        images = torch.randn(len(BOXES), 2, 9, 11, dtype=dtype)
    patches = crop_patches(images.to(device), BOXES, fill=fill)
    assert patches.shape == (len(BOXES), 2, 4, 5) and patches.dtype == dtype
    assert patches.device.type == torch.device(device).type
    assert torch.equal(patches.cpu(), crop_by_hand(images, BOXES, fill))
    # the box wholly outside the image is all fill; the one inside has none (images hold no fill values)
    assert bool((patches[4] == fill).all()) and not bool((patches[0] == fill).any())


@pytest.mark.parametrize("device", DEVICES)
def test_crop_patches_single_image_broadcasts(device):
    image = torch.randn(3, 9, 11)
    expected = crop_by_hand(image, BOXES, 0.25)
    for images in (image, image[None]):  # [C, H, W] and [1, C, H, W]
        as_tensor = torch.tensor(BOXES).to(device)
        assert torch.equal(crop_patches(images.to(device), as_tensor, fill=0.25).cpu(), expected)
        assert torch.equal(crop_patches(images.to(device), BOXES, fill=0.25).cpu(), expected)


@pytest.mark.parametrize("device", DEVICES)
def test_crop_patches_of_receptive_fields(device):
    """The patches a figure shows: boxes from ReceptiveField.boxes, border ones padded."""
    model = geometry_only(torchvision_model("alexnet"))
    field = receptive_field(model, "features.2")  # 19 x 19 at stride 8, offset -2
    images = torch.randn(4, 3, 40, 40)
    ys, xs = torch.tensor([0, 1, 4, 2]), torch.tensor([0, 3, 4, 0])
    boxes = field.boxes(ys, xs)
    patches = crop_patches(images.to(device), boxes.to(device))
    assert patches.shape == (4, 3, 19, 19)
    assert torch.equal(patches.cpu(), crop_by_hand(images, boxes.tolist(), 0.0))
    assert bool((patches[0, :, :2, :] == 0).all()), "the two rows above the image are padding"


BAD_CROPS = {
    "unequal-sizes": (lambda: torch.zeros(3, 8, 8), [(0, 0, 2, 2), (0, 0, 3, 3)], "same positive size"),
    "empty-box": (lambda: torch.zeros(3, 8, 8), [(2, 2, 2, 4)], "same positive size"),
    "inverted-box": (lambda: torch.zeros(3, 8, 8), [(4, 4, 2, 2)], "same positive size"),
    "three-numbers": (lambda: torch.zeros(3, 8, 8), [(0, 0, 2)], r"\[P, 4\]"),
    "ragged": (lambda: torch.zeros(3, 8, 8), [(0, 0, 2, 2), (0, 0, 2)], r"\[P, 4\]"),
    "one-flat-box": (lambda: torch.zeros(3, 8, 8), torch.tensor([0, 0, 2, 2]), r"\[P, 4\]"),
    "3d-boxes": (lambda: torch.zeros(3, 8, 8), torch.zeros(2, 2, 4, dtype=torch.long), r"\[P, 4\]"),
    "not-boxes": (lambda: torch.zeros(3, 8, 8), 5, r"\[P, 4\]"),
    "images-2d": (lambda: torch.zeros(8, 8), [(0, 0, 2, 2)], "images must be"),
    "images-5d": (lambda: torch.zeros(1, 1, 3, 8, 8), [(0, 0, 2, 2)], "images must be"),
    "images-not-a-tensor": (lambda: [[0.0]], [(0, 0, 2, 2)], "images must be"),
    "images-count-differs": (lambda: torch.zeros(3, 3, 8, 8), [(0, 0, 2, 2), (1, 1, 3, 3)], "one image per box"),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(BAD_CROPS))
def test_crop_patches_rejects_bad_input(case, device):
    make_images, boxes, words = BAD_CROPS[case]
    images = make_images()
    if isinstance(images, torch.Tensor):
        images = images.to(device)
    with pytest.raises(ValueError, match=rf"^crop_patches: .*{words}"):
        crop_patches(images, boxes)


# --------------------------------------------------------------------------------------------- #
# Window operations: zeroing outside the map and adding windows into maps, against their definitions
# --------------------------------------------------------------------------------------------- #

def random_windows(device, count=40, height=7, width=5, size=(9, 11), seed=0):
    """Windows that lie inside the map, leave it on each side, and lie wholly outside it."""
    gen = torch.Generator().manual_seed(seed)
    top = torch.randint(-height - 2, size[0] + 2, (count,), generator=gen)
    left = torch.randint(-width - 2, size[1] + 2, (count,), generator=gen)
    top[:4] = torch.tensor([1, -height, size[0], -2])  # inside, above, below, across the top edge
    left[:4] = torch.tensor([2, 0, 0, -width - 1])
    return deconvcuda.windows.Windows(top.to(device), left.to(device), height, width)


@pytest.mark.parametrize("device", DEVICES)
def test_zero_outside_and_add_into_match_their_definitions(device):
    size = (9, 11)
    windows = random_windows(device, size=size)
    g = torch.randn(len(windows.top), 3, windows.height, windows.width, device=device)
    rows = windows.top[:, None] + torch.arange(windows.height, device=device)
    cols = windows.left[:, None] + torch.arange(windows.width, device=device)
    inside = (((rows >= 0) & (rows < size[0]))[:, None, :, None] & ((cols >= 0) & (cols < size[1]))[:, None, None, :])
    assert torch.equal(windows.zero_outside(g.clone(), size), g * inside)

    out = torch.randn(len(windows.top), 3, *size, device=device)
    expected = out.clone()
    for p in range(len(windows.top)):  # the definition: each inside position gets its window's value
        for y in range(windows.height):
            for x in range(windows.width):
                my, mx = int(rows[p, y]), int(cols[p, x])
                if 0 <= my < size[0] and 0 <= mx < size[1]:
                    expected[p, :, my, mx] += g[p, :, y, x]
    torch.testing.assert_close(windows.add_into(out, g), expected, rtol=0, atol=1e-6)
