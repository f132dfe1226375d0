"""The contract every layer kind keeps, checked on one sample per kind (adding a kind is one class in
deconvcuda/kinds and one entry in SAMPLES below; the first test fails until it has one):

- its reverse on whole maps is the op's exact gradient, torch.func.vjp of its forward (for the
  rectifiers under rule="gradient", which is their plain gradient);
- where it keeps receptive-field windows, its reverse on windows equals its reverse of the same
  gradient on whole maps, cropped to the input windows;
- where it grows windows, the grown input window holds every input position the output window reads
  (brute force: where autograd's gradient of the window's sum is non-zero), and no more for dense
  weights (the geometry is tight).
"""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deconvcuda import engine, kinds, rules
from deconvcuda.graph import trace
from deconvcuda.kinds import At, Keeper
from deconvcuda.windows import Windows


class Op(nn.Module):
    """One op on the images (and, where it takes two, on the images and a convolution of them)."""

    def __init__(self, op, second: bool = False, channels: int = 4):
        super().__init__()
        self.op, self.second = op, second
        self.other = nn.Conv2d(channels, channels, 1) if second else None

    def forward(self, x):
        return self.op(x, self.other(x)) if self.second else self.op(x)


def _scale_param():
    module = Op(lambda x: x)
    module.scale = nn.Parameter(torch.rand(4, 1, 1) + 0.5)
    module.op = lambda x: x * module.scale
    return module


#: kind -> (a model whose output node is that kind, one image's shape). Every registered kind, and the
#: kinds the graph reader makes itself (Split, General).
SAMPLES = {
    kinds.ReLU: (lambda: Op(F.relu), (4, 7, 6)),
    kinds.ReLU6: (lambda: Op(lambda x: F.relu6(3 * x)), (4, 7, 6)),
    kinds.Pointwise: (lambda: Op(F.silu), (4, 7, 6)),
    kinds.Conv: (lambda: nn.Conv2d(4, 5, 3, stride=2, padding=1, dilation=1), (4, 9, 8)),
    kinds.Elementwise: (lambda: Op(lambda a, b: a * torch.sigmoid(b.mean((2, 3), keepdim=True)), second=True),
                        (4, 7, 6)),
    kinds.Linear: (lambda: nn.Sequential(nn.Flatten(), nn.Linear(4 * 5 * 5, 3)), (4, 5, 5)),
    kinds.BatchNorm: (lambda: nn.Sequential(_batch_norm()), (4, 7, 6)),
    kinds.LayerNorm: (lambda: nn.Sequential(nn.LayerNorm([7, 6])), (4, 7, 6)),
    kinds.LocalResponseNorm: (lambda: nn.Sequential(nn.LocalResponseNorm(3)), (4, 7, 6)),
    kinds.MaxPool: (lambda: nn.MaxPool2d(3, stride=2, padding=1), (4, 9, 8)),
    kinds.AvgPool: (lambda: nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False), (4, 9, 8)),
    kinds.AdaptiveAvgPool: (lambda: nn.AdaptiveAvgPool2d((3, 2)), (4, 7, 6)),
    kinds.SpatialMean: (lambda: Op(lambda x: x.mean((2, 3))), (4, 7, 6)),
    kinds.Reshape: (lambda: Op(lambda x: x.reshape(x.shape[0], 2, -1)), (4, 7, 6)),
    kinds.Permute: (lambda: Op(lambda x: x.permute(0, 2, 3, 1)), (4, 7, 6)),
    kinds.Pad: (lambda: Op(lambda x: F.pad(x, (1, 2, 0, 1))), (4, 7, 6)),
    kinds.Interpolate: (lambda: Op(lambda x: F.interpolate(x, scale_factor=2, mode="bilinear")), (4, 7, 6)),
    kinds.Cat: (lambda: Op(lambda a, b: torch.cat([a, b], dim=1), second=True), (4, 7, 6)),
    kinds.Identity: (lambda: nn.Dropout(0.5), (4, 7, 6)),
    kinds.Split: (lambda: Op(lambda x: x.chunk(2, dim=1)[1]), (4, 7, 6)),
    kinds.General: (lambda: Op(lambda x: torch.softmax(x, dim=1)), (4, 7, 6)),
}


def _batch_norm():
    module = nn.BatchNorm2d(4).eval()
    with torch.no_grad():
        module.running_mean.normal_()
        module.running_var.uniform_(0.5, 2)
        module.weight.normal_()
        module.bias.normal_()
    return module


def test_every_kind_has_a_sample():
    missing = [kind.__name__ for kind in kinds.KINDS if kind not in SAMPLES]
    assert not missing, f"kinds without a sample in tests/test_kinds.py: {missing}"


def _node(model, shape):
    graph = trace(model, "", caller="test")
    shapes = graph.node_shapes(shape, "test", dtype=torch.float64)
    return graph, graph.targets[""], shapes


def _graph_and_inputs(kind_class):
    factory, shape = SAMPLES[kind_class]
    torch.manual_seed(sorted(SAMPLES, key=lambda k: k.__name__).index(kind_class))
    model = factory().double().eval()
    graph, node, shapes = _node(model, shape)
    images = torch.randn((3,) + shape, dtype=torch.float64)
    with torch.no_grad():
        values = {graph.input: images}
        for n in graph.nodes[1:]:
            values[n] = n.kind.forward(*[values[i] for i in n.inputs])
    return model, graph, node, shapes, values


@pytest.mark.parametrize("kind_class", list(SAMPLES), ids=lambda k: k.__name__)
def test_reverse_is_the_vjp_on_whole_maps(kind_class):
    model, graph, node, shapes, values = _graph_and_inputs(kind_class)
    if kind_class is kinds.Identity:
        assert node is graph.input, "an identity leaves no node"
        return
    assert isinstance(node.kind, kind_class), f"the sample's output is a {type(node.kind).__name__}"
    kernels = engine._Kernels("auto", "test")
    rule = rules.get("gradient", "test")
    keeper = Keeper(kernels, rule, "gradient")
    inputs = [values[i] for i in node.inputs]
    out, saved = node.kind.forward_keeping(inputs, keeper)
    torch.testing.assert_close(out, values[node], rtol=0, atol=0, msg="forward_keeping's output is the forward's")
    g = torch.randn_like(out)
    images = torch.arange(out.shape[0])
    at = At([shapes[i] for i in node.inputs], shapes[node], saved, images, None, rule, "gradient", kernels,
            graph.values_at(node, out.shape[0], shapes, out))
    grads = node.kind.reverse(g, at)
    data = [k for k, i in enumerate(node.inputs) if i.data]
    _, pullback = torch.func.vjp(lambda *xs: node.kind.forward(*_with(inputs, data, xs)), *[inputs[k] for k in data])
    expected = pullback(g)
    for k, want in zip(data, expected):
        torch.testing.assert_close(grads[k], want, rtol=1e-10, atol=1e-12, msg=f"{kind_class.__name__} input {k}")


def _with(inputs, data, replacements):
    full = list(inputs)
    for k, x in zip(data, replacements):
        full[k] = x
    return full


WINDOWED = [k for k in SAMPLES if k not in (kinds.Identity,)]


@pytest.mark.parametrize("kind_class", WINDOWED, ids=lambda k: k.__name__)
def test_reverse_on_windows_equals_whole_maps_and_grow_is_the_field(kind_class):
    model, graph, node, shapes, values = _graph_and_inputs(kind_class)
    out_shape = shapes[node]
    if not node.kind.windowed or len(out_shape) != 3:
        pytest.skip(f"{kind_class.__name__} works on whole maps")
    kernels = engine._Kernels("auto", "test")
    rule = rules.get("gradient", "test")
    keeper = Keeper(kernels, rule, "gradient")
    inputs = [values[i] for i in node.inputs]
    out, saved = node.kind.forward_keeping(inputs, keeper)
    in_shapes = [shapes[i] for i in node.inputs]
    rng = random.Random(kind_class.__name__)
    c, h, w = out_shape
    # windows at corners and inside, reaching past the map's edges
    height, width = min(2, h), min(3, w)
    tops = torch.tensor([-1, 0, h - height, rng.randrange(h)])
    lefts = torch.tensor([0, -1, w - width + 1, rng.randrange(w)])
    windows = Windows(tops, lefts, height, width)
    images = torch.tensor([0, 1, 2, 1])
    g = torch.randn(4, c, height, width, dtype=torch.float64)
    g = windows.zero_outside(g, (h, w))  # the engine's windows hold zeros outside the map
    at = At(in_shapes, out_shape, saved, images, windows, rule, "gradient", kernels)
    on_windows = node.kind.reverse(g, at)
    full_g = windows.paste(g, (h, w))
    at_full = At(in_shapes, out_shape, saved, images, None, rule, "gradient", kernels)
    on_maps = node.kind.reverse(full_g, at_full)
    for k, (grad, want, in_windows) in enumerate(zip(on_windows, on_maps, node.kind.input_windows(windows, in_shapes))):
        if not node.inputs[k].data:
            continue
        if in_windows is None:
            torch.testing.assert_close(grad, want, rtol=1e-10, atol=1e-12, msg=f"input {k} (whole)")
            continue
        pasted = in_windows.paste(grad, in_shapes[k][1:])
        torch.testing.assert_close(pasted, want, rtol=1e-10, atol=1e-12, msg=f"input {k} on windows")
        # grow: every input position the window reads lies in the grown window (brute force by autograd)
        x = inputs[k][images].clone().requires_grad_(True)
        full = _with([i[images] if i is not None and torch.is_tensor(i) and i.dim() and i.shape[0] == 3
                      else i for i in inputs], [k], [x])
        with torch.enable_grad():
            y = node.kind.forward(*full)
            mask = windows.paste(torch.ones(4, c, height, width, dtype=torch.float64), (h, w))
            (reach,) = torch.autograd.grad((y * mask).sum(), x)
        inside = (in_windows.paste(torch.ones_like(grad), in_shapes[k][1:]) > 0).any(1)  # per position
        touched = (reach != 0).any(1)
        assert not (touched & ~inside).any(), f"input {k}: the window reads positions outside the grown window"
        # tight where the geometry alone decides (dense weights, no mask, no switch): every in-map
        # position of the grown window is read
        if kind_class in (kinds.Conv, kinds.AvgPool) or not (node.kind.pointwise or kind_class is kinds.MaxPool):
            assert (touched | ~inside).all(), f"input {k}: the grown window is larger than what the window reads"
