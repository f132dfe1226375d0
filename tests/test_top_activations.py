"""deconvcuda.top_activations (streaming top-k) against a brute-force top-k computed independently.

The oracle (``brute_force_top``, in conftest) runs the model itself up to the layer (a forward hook on the
layer's module, which stops the forward there), then per image and channel takes the spatial
maximum (NaN ignored) and its first position in row-major order, and ranks the images of every
channel with Python's stable sort, so ties keep the earlier image. It shares no code with the
package: not the plan, not the functional forward, not the merge of batches. Exact comparisons
feed float64 data (the forward runs in the data's dtype), so that no two images' maxima are
rounding-close and swap places; float32 is checked as "a valid top-k up to rounding".

Models: a small custom CNN (conv, ReLU, max pool, strided conv, Flatten, Linear), torchvision's
AlexNet and VGG11 with random weights at small input sizes, and ``deconvcuda.models.zfnet()``
(LRN and ceil-mode pools). Every test runs on each of ``DEVICES`` (CUDA skipped visibly without a GPU).
"""
from __future__ import annotations

import copy
from typing import Dict

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import deconvcuda
from conftest import DEVICES, assert_top_equals, brute_force_top, forward_to_layer, small_cnn
from deconvcuda import batches

pytestmark = pytest.mark.parametrize("device", DEVICES)

INF = float("inf")


# --------------------------------------------------------------------------------------------- #
# Models (built once per module: the torchvision ones take seconds to initialise)
# --------------------------------------------------------------------------------------------- #

def he_initialised(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Normal He weights and small biases for every conv and linear layer, so that activations
    keep their scale through VGG's depth (and differ: no accidental ties)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                fan_in = module.weight[0].numel()
                module.weight.normal_(0.0, (2.0 / fan_in) ** 0.5, generator=generator)
                module.bias.normal_(0.0, 0.1, generator=generator)
    return model


def vgg11_features_only() -> nn.Module:
    """torchvision's VGG11 (layer names features.0 .. features.20) without its 120M-parameter
    classifier, which these tests never reach and whose initialisation alone takes seconds: built
    on the meta device, the classifier replaced by an identity, the features He-initialised."""
    import torchvision

    with torch.device("meta"):
        model = torchvision.models.vgg11(weights=None)
    model.classifier = nn.Identity()
    model = model.to_empty(device="cpu")
    return he_initialised(model, torch.Generator().manual_seed(11)).eval()


def alexnet() -> nn.Module:
    import torchvision

    torch.manual_seed(1)  # module-scoped fixtures run before the autouse per-test seed
    return torchvision.models.alexnet(weights=None).eval()


def zfnet() -> nn.Module:
    torch.manual_seed(2)
    return deconvcuda.models.zfnet()


BUILDERS = {"small": small_cnn, "alexnet": alexnet, "vgg11": vgg11_features_only, "zfnet": zfnet}
#: The (C, H, W) each model gets: small, so the whole module stays fast on 2 CPU cores.
INPUT_SHAPES = {"small": (3, 12, 12), "alexnet": (3, 95, 95), "vgg11": (3, 32, 32), "zfnet": (3, 71, 71)}


@pytest.fixture(scope="module")
def models() -> Dict:
    """Models by name, each built on first use (CPU, eval mode, float32) and shared by the module's
    tests, which must not change them; ``models[name, torch.float64]`` is a float64 copy for the
    oracle."""
    class Models(dict):
        def __missing__(self, key):
            if isinstance(key, tuple):
                name, dtype = key
                self[key] = copy.deepcopy(self[name]).to(dtype)
            else:
                self[key] = BUILDERS[key]()
            return self[key]

    return Models()


def model_on(models, name: str, device: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A shared CPU model, or a copy of it on ``device`` (the shared ones must stay on the CPU)."""
    model = models[name] if dtype == torch.float32 else models[name, dtype]
    return model if device == "cpu" else copy.deepcopy(model).to(device)


def images_for(name: str, count: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, *INPUT_SHAPES[name], generator=generator, dtype=torch.float64).to(dtype)


# --------------------------------------------------------------------------------------------- #
# The oracle
# --------------------------------------------------------------------------------------------- #

def layer_output(model: nn.Module, images: torch.Tensor, layer: str) -> torch.Tensor:
    """The output of module ``layer`` when ``model`` itself runs on ``images`` (in whatever mode the
    model is in), without autograd."""
    with torch.no_grad():
        return forward_to_layer(model, images, layer).detach()


# --------------------------------------------------------------------------------------------- #
# Against the brute force: several models and kinds of layer
# --------------------------------------------------------------------------------------------- #

LAYER_CASES = [
    ("small", "features.0"),    # a conv: negative maxima
    ("small", "features.1"),    # ReLU: exact zeros, so ties
    ("small", "features.2"),    # max pool
    ("small", "features.4"),    # after a strided conv, 3x3 map
    ("small", "fc"),            # flat Linear: y = x = 0
    ("alexnet", "features.2"),  # overlapping 3x3 stride-2 pool
    ("alexnet", "features.10"),
    ("alexnet", "features.12"),
    ("alexnet", "classifier.1"),  # flat, through the adaptive pool and Dropout
    ("vgg11", "features.9"),
    ("vgg11", "features.20"),   # 1x1 map
    ("zfnet", "features.3"),    # LocalResponseNorm after a ceil-mode pool
    ("zfnet", "features.13"),
]


@pytest.mark.parametrize("name, layer", LAYER_CASES, ids=[f"{n}-{l}" for n, l in LAYER_CASES])
def test_matches_brute_force(models, name, layer, device):
    # float64 images into the float32 model: the forward runs in the data's dtype (the weights are
    # cast), so the oracle runs a float64 copy of the model and the comparison can be exact.
    images = images_for(name, 7, seed=len(layer) + 7 * len(name), dtype=torch.float64).to(device)
    # batch_size 3: three batches (3, 3, 1), so the running top-k is merged across batches
    top = deconvcuda.top_activations(model_on(models, name, device), images, layer, k=4, batch_size=3,
                                     progress=False)
    expected = brute_force_top(layer_output(model_on(models, name, device, torch.float64), images, layer), k=4)
    assert top.layer == layer
    assert_top_equals(top, expected, device=device, msg=f"{name} {layer}")
    if layer in ("fc", "classifier.1"):
        assert bool((top.y == 0).all() and (top.x == 0).all()), "a flat layer reports y = x = 0"


FLOAT32_CASES = [("small", "features.1"), ("alexnet", "features.10"), ("vgg11", "features.20"),
                 ("zfnet", "features.7"), ("alexnet", "classifier.2")]


@pytest.mark.parametrize("name, layer", FLOAT32_CASES, ids=[f"{n}-{l}" for n, l in FLOAT32_CASES])
def test_float32_is_a_valid_top_k(models, name, layer, device):
    """In float32 (TF32 on a GPU) roundings may swap near-tied images, so instead of equality:
    every entry is, up to a rounding tolerance, its image's maximum at the reported place, no image
    left out is stronger than the weakest kept, strongest first, k distinct images per channel."""
    images = images_for(name, 7, seed=21 + len(layer)).to(device)
    top = deconvcuda.top_activations(model_on(models, name, device), images, layer, k=3, batch_size=2,
                                     progress=False)
    assert top.values.dtype == torch.float32
    truth = layer_output(model_on(models, name, device, torch.float64), images.double(), layer).cpu()
    if truth.dim() == 2:
        assert bool((top.y == 0).all() and (top.x == 0).all()), "a flat layer reports y = x = 0"
        truth = truth[:, :, None, None]
    # CPU float32: a few roundings of the largest activation; TF32 keeps 10 mantissa bits
    tol = (1e-2 if device == "cuda" else 1e-4) * truth.abs().max().item()
    values, index, ys, xs = (t.cpu() for t in (top.values.double(), top.image_index, top.y, top.x))
    channels = truth.shape[1]
    best = truth.flatten(2).max(dim=2).values.t()  # [C, N]: each image's maximum per channel
    at = truth[index, torch.arange(channels)[:, None], ys, xs]  # [C, k]: the truth at the reported places
    assert bool((values[:, :-1] >= values[:, 1:]).all()), "strongest first"
    assert bool((index.sort(dim=1).values.diff(dim=1) > 0).all()), "k distinct images per channel"
    assert (at - values).abs().max().item() <= tol, "a value is not the activation at its place"
    assert (best.gather(1, index) - at).max().item() <= tol, "a place is not its image's maximum"
    left_out = best.scatter(1, index, -INF).max(dim=1).values
    assert bool((left_out <= values[:, -1] + tol).all()), "an image left out is stronger than one kept"


def test_strongest_first_and_distinct_images(models, device):
    """Each channel's entries are in descending order and name k different images (each image
    contributes at most its one strongest activation per channel)."""
    model = model_on(models, "small", device)
    images = images_for("small", 9, seed=3).to(device)
    top = deconvcuda.top_activations(model, images, "features.0", k=5, batch_size=2, progress=False)
    values = top.values.cpu()
    assert bool((values[:, :-1] >= values[:, 1:]).all()), "values must be sorted strongest first"
    for c in range(values.shape[0]):
        assert len(set(top.image_index[c].tolist())) == 5, f"channel {c} names an image twice"


# --------------------------------------------------------------------------------------------- #
# Data forms
# --------------------------------------------------------------------------------------------- #

N_IMAGES = 7


def data_forms(images: torch.Tensor):
    """Ways of passing the same 7 images, in the same order, each with its batch_size."""
    singles = list(images.unbind(0))
    labels = torch.arange(images.shape[0])
    return {
        "tensor-batch1": (images, 1),
        "tensor-batch3": (images, 3),              # 3 does not divide 7: a short last batch
        "tensor-batch-larger-than-n": (images, 100),
        "list-unequal-batches": ([images[:2], images[2:6], images[6:]], 64),
        "list-with-empty-batch": ([images[:3], images[3:3], images[3:]], 64),
        "list-of-single-images": (singles, 3),
        "mixed-singles-and-batches": ([singles[0], images[1:4], singles[4], singles[5], images[6:]], 2),
        "dataloader-pairs": (DataLoader(TensorDataset(images, labels), batch_size=3, shuffle=False), 64),
        "generator": ((images[i:i + 2] for i in range(0, images.shape[0], 2)), 64),
    }


FORMS = list(data_forms(torch.zeros(N_IMAGES, 1, 1, 1)))


@pytest.mark.parametrize("form", FORMS)
def test_data_forms_agree(models, form, device):
    # float64 data (the forward runs in the data's dtype): different batch splits cannot round
    # differently, so every form must give the very same result, bit for bit.
    model = model_on(models, "small", device)
    images = images_for("small", N_IMAGES, seed=5, dtype=torch.float64)
    data, batch_size = data_forms(images)[form]
    top = deconvcuda.top_activations(model, data, "features.4", k=3, batch_size=batch_size, progress=False)
    expected = brute_force_top(layer_output(model_on(models, "small", device, torch.float64), images.to(device),
                                            "features.4"), k=3)
    assert_top_equals(top, expected, device=device, msg=form)
    reference = deconvcuda.top_activations(model, images, "features.4", k=3, batch_size=N_IMAGES, progress=False)
    for field in ("values", "image_index", "y", "x"):
        assert torch.equal(getattr(top, field), getattr(reference, field)), f"{form}: {field} differs from one batch"


# --------------------------------------------------------------------------------------------- #
# k
# --------------------------------------------------------------------------------------------- #

def test_k_larger_than_the_data(models, device):
    model = model_on(models, "small", device)
    images = images_for("small", 3, seed=6, dtype=torch.float64).to(device)
    top = deconvcuda.top_activations(model, images, "features.2", k=5, batch_size=2, progress=False)
    expected = brute_force_top(layer_output(model_on(models, "small", device, torch.float64), images,
                                            "features.2"), k=5)
    assert_top_equals(top, expected, device=device, msg="k=5 > 3 images")
    # the documented filling of the entries past the data's 3 images
    assert bool((top.image_index[:, 3:] == -1).all() and (top.y[:, 3:] == -1).all() and (top.x[:, 3:] == -1).all())
    assert bool((top.values[:, 3:] == -INF).all())
    assert bool((top.image_index[:, :3] >= 0).all()), "every image is ranked in every channel"


def test_k_one(models, device):
    model = model_on(models, "small", device)
    images = images_for("small", 6, seed=7, dtype=torch.float64).to(device)
    top1 = deconvcuda.top_activations(model, images, "features.1", k=1, batch_size=4, progress=False)
    expected = brute_force_top(layer_output(model_on(models, "small", device, torch.float64), images,
                                            "features.1"), k=1)
    assert_top_equals(top1, expected, device=device, msg="k=1")
    top4 = deconvcuda.top_activations(model, images, "features.1", k=4, batch_size=4, progress=False)
    for field in ("values", "image_index", "y", "x"):
        assert torch.equal(getattr(top1, field), getattr(top4, field)[:, :1]), f"k=1 is not the first of k=4: {field}"


@pytest.mark.parametrize("k", [0, -1, 2.5, True, "3", None], ids=repr)
def test_bad_k(models, k, device):
    model = model_on(models, "small", device)
    with pytest.raises(ValueError, match=r"top_activations: k must be a positive int"):
        deconvcuda.top_activations(model, images_for("small", 2, seed=0).to(device), "features.1", k=k,
                                   progress=False)


# --------------------------------------------------------------------------------------------- #
# Ties and NaN: a model that is one ReLU, so the activations are exactly the data made non-negative
# --------------------------------------------------------------------------------------------- #

def relu_model(device) -> nn.Module:
    return nn.Sequential(nn.ReLU()).to(device).eval()


def test_ties_keep_the_earlier_image(device):
    images = torch.full((5, 3, 2, 3), -1.0)  # channel 0 stays negative everywhere: dead, all zero after ReLU
    images[:, 1] = 0.5
    for i, (y, x) in ((1, (1, 2)), (3, (0, 1)), (4, (0, 0))):  # channel 1: maximum 2 in images 1, 3, 4
        images[i, 1, y, x] = 2.0
    images[3, 1, 1, 0] = 2.0  # and twice in image 3: the first in row-major order, (0, 1), wins
    images[:, 2] = torch.arange(5.0)[:, None, None]  # channel 2: a constant map per image, 0 .. 4
    # batch_size 2: the tied images 1, 3 and 4 arrive in different batches
    top = deconvcuda.top_activations(relu_model(device), images, "0", k=4, batch_size=2, progress=False)
    assert_top_equals(top, brute_force_top(torch.relu(images), k=4), device=device, dtype=torch.float32, msg="ties")
    # the same, written out: a dead channel ranks images 0.. at (0, 0)
    assert top.image_index.tolist() == [[0, 1, 2, 3], [1, 3, 4, 0], [4, 3, 2, 1]]
    assert top.y.tolist() == [[0, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    assert top.x.tolist() == [[0, 0, 0, 0], [2, 1, 0, 0], [0, 0, 0, 0]]
    assert top.values.tolist() == [[0.0] * 4, [2.0, 2.0, 2.0, 0.5], [4.0, 3.0, 2.0, 1.0]]


@pytest.mark.parametrize("batch_size", [50, 7])
def test_many_ties_keep_data_order(batch_size, device):
    """50 images, one dead channel: every image ties at 0. The merge must be a stable sort (an
    unstable one reorders ties from about 40 elements on, on the CPU too)."""
    images = -torch.rand(50, 2, 3, 3, generator=torch.Generator().manual_seed(13))  # all dead after the ReLU
    images[:, 1, 2, 2] = torch.rand(50, generator=torch.Generator().manual_seed(14)).mul(4).round()  # few levels
    top = deconvcuda.top_activations(relu_model(device), images, "0", k=45, batch_size=batch_size, progress=False)
    assert_top_equals(top, brute_force_top(torch.relu(images), k=45), device=device, dtype=torch.float32,
                      msg="many ties")
    assert top.image_index[0].tolist() == list(range(45))


def test_nan_activations_are_never_ranked(device):
    nan = float("nan")
    images = torch.zeros(4, 2, 2, 2)
    images[0, 0] = nan                                 # a map that is NaN everywhere: nothing to rank
    images[1, 0] = torch.tensor([[nan, 1.0], [nan, 0.5]])  # NaN beside a real maximum 1 at (0, 1)
    images[2, 0] = torch.tensor([[0.0, 0.0], [3.0, nan]])  # maximum 3 at (1, 0)
    images[3, 0] = torch.tensor([[nan, nan], [nan, 2.0]])
    images[:, 1] = nan                                 # channel 1: NaN in every image
    top = deconvcuda.top_activations(relu_model(device), images, "0", k=4, batch_size=3, progress=False)
    assert_top_equals(top, brute_force_top(torch.relu(images), k=4), device=device, dtype=torch.float32, msg="NaN")
    assert top.image_index.tolist() == [[2, 3, 1, -1], [-1, -1, -1, -1]]
    assert top.y.tolist() == [[1, 1, 0, -1], [-1, -1, -1, -1]]
    assert top.x.tolist() == [[0, 1, 1, -1], [-1, -1, -1, -1]]
    assert top.values.tolist() == [[3.0, 2.0, 1.0, -INF], [-INF] * 4]
    assert top.neurons().tolist() == [[2, 0, 1, 0], [3, 0, 1, 1], [1, 0, 0, 1]], "missing entries left out"


def test_nan_only_maps_do_not_displace_later_images(device):
    """All-NaN maps in the first batches must not take the places of the top-k that later, real
    images deserve, nor come before them: even a real activation of -inf outranks a missing entry."""
    images = torch.full((5, 1, 1, 2), float("nan"))
    images[2, 0, 0, 0] = -INF  # a real (if odd) activation, beside a NaN
    images[3, 0, 0, 1] = 7.0
    model = nn.Sequential(nn.MaxPool2d(1)).to(device).eval()  # identity: -inf stays -inf
    top = deconvcuda.top_activations(model, images, "0", k=3, batch_size=1, progress=False)
    assert_top_equals(top, brute_force_top(images, k=3), device=device, dtype=torch.float32, msg="NaN-only maps")
    assert top.image_index.tolist() == [[3, 2, -1]]
    assert top.values.tolist() == [[7.0, -INF, -INF]]


# --------------------------------------------------------------------------------------------- #
# The model is left untouched, and runs in eval semantics
# --------------------------------------------------------------------------------------------- #

def batchnorm_dropout_model() -> nn.Module:
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Dropout(0.5), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(6 * 3 * 3, 4), nn.Dropout(0.5))
    with torch.no_grad():  # running statistics far from the batch's own, so train mode would show
        model[1].running_mean.uniform_(-1.0, 1.0)
        model[1].running_var.uniform_(0.5, 3.0)
        model[1].weight.uniform_(0.5, 2.0)
        model[1].bias.uniform_(-0.5, 0.5)
    return model


def hooks_of(model: nn.Module):
    return {name: (dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._backward_hooks),
                   dict(getattr(m, "_backward_pre_hooks", {})))
            for name, m in model.named_modules()}


@pytest.mark.parametrize("layer", ["4", "6"])
def test_model_in_train_mode_is_untouched_and_gets_eval_semantics(layer, device):
    model = batchnorm_dropout_model().to(device).train()
    state = {key: value.clone() for key, value in model.state_dict().items()}
    training = {name: m.training for name, m in model.named_modules()}
    hooks = hooks_of(model)
    images = torch.randn(6, 3, 8, 8, dtype=torch.float64).to(device)

    top = deconvcuda.top_activations(model, images, layer, k=3, batch_size=4, progress=False)

    assert {name: m.training for name, m in model.named_modules()} == training, "training flags changed"
    for key, value in model.state_dict().items():  # BatchNorm's running stats and num_batches_tracked too
        assert torch.equal(value, state[key]), f"{key} changed"
    assert all(p.grad is None for p in model.parameters()), "gradients were computed"
    assert hooks_of(model) == hooks, "hooks left behind"
    # eval semantics: the running statistics, no Dropout
    expected = brute_force_top(layer_output(copy.deepcopy(model).eval().double(), images, layer), k=3)
    assert_top_equals(top, expected, device=device, msg=f"train-mode model, layer {layer}")


# --------------------------------------------------------------------------------------------- #
# Bad data
# --------------------------------------------------------------------------------------------- #

BAD_DATA = {
    "empty-tensor": (lambda: torch.zeros(0, 3, 12, 12), ValueError, "no images"),
    "empty-list": (lambda: [], ValueError, "no images"),
    "empty-dataloader": (lambda: DataLoader(TensorDataset(torch.zeros(0, 3, 12, 12)), batch_size=2), ValueError,
                         "no images"),
    "shapes-differ-between-batches": (lambda: [torch.zeros(2, 3, 12, 12), torch.zeros(2, 3, 14, 12)], ValueError,
                                      "shape of the first"),
    "shapes-differ-between-single-images": (lambda: [torch.zeros(3, 12, 12), torch.zeros(3, 12, 13)], ValueError,
                                            "shape of the first"),
    "integer-images": (lambda: torch.zeros(2, 3, 12, 12, dtype=torch.uint8), TypeError, "floating point"),
    "wrong-channel-count": (lambda: torch.zeros(2, 4, 12, 12), ValueError, "3 channels"),
    "too-small-for-the-model": (lambda: torch.zeros(2, 3, 1, 1), ValueError, "do not fit"),
    "not-iterable": (lambda: 5, TypeError, "data must be"),
    "none": (lambda: None, TypeError, "data must be"),
    "2d-tensor": (lambda: torch.zeros(3, 12), ValueError, r"\[N, C, H, W\]"),
    "list-of-strings": (lambda: ["a.png"], TypeError, "each item of data"),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_raises_a_clear_error(models, case, device):
    make, error, words = BAD_DATA[case]
    with pytest.raises(error, match=rf"^top_activations: .*{words}"):
        deconvcuda.top_activations(model_on(models, "small", device), make(), "features.4", k=3, progress=False)


@pytest.mark.parametrize("batch_size", [0, -2, 1.5, True])
def test_bad_batch_size(models, batch_size, device):
    with pytest.raises(ValueError, match=r"^top_activations: batch_size must be a positive int"):
        deconvcuda.top_activations(model_on(models, "small", device), images_for("small", 2, seed=0), "features.4",
                                   batch_size=batch_size, progress=False)


def test_unknown_layer(models, device):
    with pytest.raises(ValueError, match=r"^top_activations: unknown layer 'features.9'"):
        deconvcuda.top_activations(model_on(models, "small", device), images_for("small", 2, seed=0), "features.9",
                                   progress=False)


# --------------------------------------------------------------------------------------------- #
# Progress bar
# --------------------------------------------------------------------------------------------- #

def test_progress_false_prints_nothing(models, device, capsys):
    deconvcuda.top_activations(model_on(models, "small", device), images_for("small", 5, seed=8), "features.4",
                               k=2, batch_size=2, progress=False)
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


def test_progress_true_shows_a_bar_on_stderr(models, device, capsys):
    deconvcuda.top_activations(model_on(models, "small", device), images_for("small", 5, seed=8), "features.4",
                               k=2, batch_size=2, progress=True)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "top-2 features.4" in captured.err and "5/5" in captured.err, captured.err


# --------------------------------------------------------------------------------------------- #
# neurons() rows feed project()
# --------------------------------------------------------------------------------------------- #

def test_neurons_feed_project(models, device):
    model = model_on(models, "small", device)
    images = images_for("small", 5, seed=9).to(device)
    layer, k = "features.4", 3
    top = deconvcuda.top_activations(model, images, layer, k=k, batch_size=2, progress=False)
    rows = top.neurons()
    channels = top.values.shape[0]
    assert rows.dtype == torch.long and rows.shape == (channels * k, 4)
    # channel-major, strongest first: row c * k + r is (image_index[c, r], c, y[c, r], x[c, r])
    expected_rows = torch.stack([top.image_index, torch.arange(channels, device=rows.device)[:, None].expand(-1, k),
                                 top.y, top.x], dim=-1).reshape(-1, 4)
    assert torch.equal(rows, expected_rows)
    assert torch.equal(top.neurons(channel=2), expected_rows[2 * k:3 * k])

    # each row names the activation whose value top reports: read it off the model's own forward
    activations = layer_output(model, images, layer)
    at_rows = activations[rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3]]
    torch.testing.assert_close(at_rows, top.values.reshape(-1), rtol=1e-5, atol=1e-6)

    # and project accepts the rows as they are: with seed="value" each projection is the value
    # times the one with seed="one" (a ReLU layer: values >= 0, and the reverse is positively
    # homogeneous)
    by_value = deconvcuda.project(model, images, layer, neurons=rows)
    by_one = deconvcuda.project(model, images, layer, neurons=rows, seed="one")
    assert by_value.shape == (rows.shape[0],) + tuple(images.shape[1:])
    assert bool((by_one.flatten(1).abs().amax(dim=1)[top.values.reshape(-1) > 0] > 0).all()), \
        "a positive activation projected to nothing"
    torch.testing.assert_close(by_value, top.values.reshape(-1, 1, 1, 1) * by_one, rtol=1e-4, atol=1e-6)

    # the figure's workflow with streamed data: fetch just the images the rows name from a
    # DataLoader, renumber the rows' image column to those, and project the same pixels
    loader = DataLoader(TensorDataset(images.cpu(), torch.zeros(len(images))), batch_size=2)
    wanted = torch.unique(rows[:, 0]).cpu()
    picked = batches.gather_images(loader, wanted, batch_size=2).to(device)
    assert torch.equal(picked, images[wanted.to(device)])
    renumbered = rows.clone()
    renumbered[:, 0] = torch.searchsorted(wanted.to(device), rows[:, 0].contiguous())
    torch.testing.assert_close(deconvcuda.project(model, picked, layer, neurons=renumbered), by_value)


def test_neurons_leave_out_missing_entries(models, device):
    top = deconvcuda.top_activations(model_on(models, "small", device), images_for("small", 2, seed=10),
                                     "features.2", k=4, progress=False)
    rows = top.neurons()
    assert rows.shape == (8 * 2, 4) and bool((rows[:, 0] >= 0).all())
    assert top.neurons(channel=5).tolist() == [[int(top.image_index[5, r]), 5, int(top.y[5, r]), int(top.x[5, r])]
                                              for r in range(2)]


# --------------------------------------------------------------------------------------------- #
# Device and dtype
# --------------------------------------------------------------------------------------------- #

def test_runs_on_the_models_device_by_default(models, device):
    """Data on the CPU, model on ``device``: the result is on the model's device (the batches were
    moved there); ``device=`` names it explicitly; values keep the data's dtype."""
    model = model_on(models, "small", device)
    images = images_for("small", 4, seed=12)  # on the CPU whatever the device
    top = deconvcuda.top_activations(model, images, "features.4", k=2, progress=False)
    assert all(t.device.type == torch.device(device).type for t in (top.values, top.image_index, top.y, top.x))
    explicit = deconvcuda.top_activations(model, images, "features.4", k=2, device=device, progress=False)
    assert torch.equal(explicit.image_index, top.image_index) and explicit.values.device == top.values.device
    top64 = deconvcuda.top_activations(model, images.double(), "features.4", k=2, progress=False)
    assert top64.values.dtype == torch.float64 and top.values.dtype == torch.float32
