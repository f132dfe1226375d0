"""Structure: identities (Dropout in eval, Identity), Flatten, the residual addition and the channel
concatenation. Their reverses are the gradient: an addition passes g to both operands, a
concatenation hands each input its slice of g, a flatten reshapes."""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .base import Kind, numel, register

__all__ = ["Identity", "Flatten", "Add", "Cat"]


@register
class Identity(Kind):
    """Leaves no node: Dropout is the identity in eval mode, and so are these."""

    name = "Identity"
    modules = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
               nn.Identity)
    functions = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout)
    methods = ("contiguous",)
    identity = True


@register
class Flatten(Kind):
    """Flattening to [N, -1]: nn.Flatten(), torch.flatten(x, 1), x.flatten(1), x.view(x.size(0), -1),
    x.reshape(-1, F) and the like."""

    name = "Flatten"
    modules = (nn.Flatten,)
    functions = (torch.flatten, torch.reshape)
    methods = ("flatten", "view", "reshape")
    windowed = False

    def __init__(self, features=None):
        self.features = features  # the feature count a view/reshape asked for, checked against the input

    @classmethod
    def from_module(cls, module, call):
        _check_flatten(call, module.start_dim, module.end_dim)
        call.data("input")
        return cls()

    @classmethod
    def from_call(cls, call):
        node = call.node
        call.data("input")
        if node.target in (torch.flatten, "flatten"):
            _check_flatten(call, node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0),
                           node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1))
            return cls()
        if node.target is torch.reshape:
            shape = node.args[1] if len(node.args) > 1 else node.kwargs.get("shape")
        else:  # Tensor.view / Tensor.reshape: (x, a, b) or (x, (a, b))
            shape = node.args[1:] if len(node.args) > 2 else (node.args[1] if len(node.args) == 2 else
                                                              node.kwargs.get("shape", node.kwargs.get("size")))
        return cls(_flat_features(call, shape))

    def output_shape(self, shape):
        flat = numel(shape)
        if self.features is not None and self.features != flat:
            raise ValueError(f"reshapes to [N, {self.features}], but one image has {flat} values {list(shape)}")
        return (flat,)

    def forward(self, x):
        return x.flatten(1)

    def reverse(self, g, at):
        return [g.reshape((g.shape[0],) + tuple(at.in_shapes[0]))]


def _check_flatten(call, start_dim, end_dim):
    if start_dim != 1 or end_dim not in (-1, 3):
        call.fail(f"flattens dims {start_dim} to {end_dim}; only flattening to [N, -1] (start_dim=1, end_dim=-1) "
                  "is supported")


def _flat_features(call, shape):
    """A view/reshape must flatten to [N, -1]: (x.size(0), -1), (-1, F) or (x.size(0), F). Returns F
    where it is given, to be checked against the input's size."""
    if isinstance(shape, (list, tuple)) and len(shape) == 2:
        batch, features = shape
        batch_is_n = isinstance(batch, fx.Node) and call.reader.is_batch_size(batch)
        if batch_is_n and features == -1:
            return None
        if (batch_is_n or batch == -1) and isinstance(features, int) and features > 0:
            return features
    call.fail(f"reshapes to {shape!r}; only flattening to [N, -1] (x.view(x.size(0), -1)) is supported")


@register
class Add(Kind):
    """A residual addition (``+``, ``+=``, ``torch.add``, ``Tensor.add``): g goes to both operands."""

    name = "add"
    functions = (operator.add, operator.iadd, torch.add)
    methods = ("add", "add_")
    arguments = ("input", "other", "alpha")

    @classmethod
    def from_call(cls, call):
        if call.get("alpha", 1) != 1:
            call.fail(f"adds with alpha={call.get('alpha')}; only a plain sum (alpha=1) is supported")
        for operand in ("input", "other"):
            if not isinstance(call.get(operand), fx.Node):
                call.fail(f"adds the constant {call.get(operand)!r}; only the sum of two feature maps (a residual "
                          "connection) is supported")
            call.data(operand)
        return cls()

    def output_shape(self, a, b):
        if tuple(a) != tuple(b):
            raise ValueError(f"adds maps of different shapes {list(a)} and {list(b)}; broadcasting is not supported")
        return a

    def forward(self, a, b):
        return a + b

    def reverse(self, g, at):
        return [g, g]


@register
class Cat(Kind):
    """``torch.cat`` along channels: each input gets its slice of g."""

    name = "cat"
    functions = (torch.cat, torch.concat, torch.concatenate)
    arguments = ("tensors", "dim")

    @classmethod
    def from_call(cls, call):
        dim = call.get("dim", call.get("axis", 0))
        if dim not in (1, -3, -1):
            call.fail(f"concatenates along dim {dim}; only the channel dim (1) is supported")
        call.data_each("tensors")
        return cls(dim)

    def __init__(self, dim: int):
        self.dim = dim

    def output_shape(self, *shapes):
        first = tuple(shapes[0])
        if self.dim == -3 and len(first) != 3 or self.dim == -1 and len(first) != 1:
            raise ValueError(f"concatenates along dim {self.dim}, which is not the channel dim of "
                             f"[N, {', '.join(map(str, first))}]; only the channel dim is supported")
        for shape in shapes[1:]:
            if len(shape) != len(first) or tuple(shape[1:]) != first[1:]:
                raise ValueError(f"concatenates maps of shapes {[list(s) for s in shapes]}, which differ beyond "
                                 "the channel dim")
        return (sum(shape[0] for shape in shapes),) + first[1:]

    def forward(self, *inputs):
        return torch.cat(inputs, 1)

    def reverse(self, g, at):
        return list(torch.split(g, [shape[0] for shape in at.in_shapes], dim=1))
