"""Ops that move values without computing with them: reshapes (flatten, view, reshape, squeeze, ...),
permutations (permute, transpose, ...), concatenation, splitting (chunk, split, unbind, and the item
taken from them), padding and interpolation. Their forward is the model's own call; their reverse the
gradient: a reshape reshapes ``g`` back, a concatenation hands each input its slice, the others (all
linear) take autograd's gradient of the call at zeros. Concatenating and splitting along the channels
of a map keep receptive-field windows; the rest works on whole maps."""
from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .base import Kind, is_shape, linear_vjp, register
from .general import General, per_image_shape

__all__ = ["Reshape", "Permute", "Cat", "LinearCall", "Pad", "Interpolate", "Split"]


@register
class Reshape(Kind):
    """Reshapes that keep the order of the values: nn.Flatten(), torch.flatten(x, 1), x.view(x.size(0), -1),
    x.reshape(n, c, -1), unflatten, squeeze, unsqueeze. Flattening to [N, -1] is in the paper's table."""

    name = "reshape"
    modules = (nn.Flatten, nn.Unflatten)
    functions = (torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.unflatten, torch.ravel)
    methods = ("flatten", "view", "reshape", "squeeze", "unsqueeze", "unflatten", "view_as", "reshape_as", "ravel",
               "contiguous")
    windowed = False

    def __init__(self, template, flattens: bool):
        self.template, self.flattens = template, flattens

    @classmethod
    def from_module(cls, module, call):
        call.data("input")
        flattens = isinstance(module, nn.Flatten) and module.start_dim == 1 and module.end_dim in (-1, 3)
        return cls(call.template(), flattens)

    @classmethod
    def from_call(cls, call):
        call.data("input")
        return cls(call.template(), _flattens(call))

    @property
    def label(self) -> str:
        return "Flatten" if self.flattens else self.template.describe()

    def outside_table(self):
        return None if self.flattens else "reshapes other than flattening to [N, -1] (x.view(x.size(0), -1))"

    def output_shape(self, *shapes):
        out = per_image_shape(self.forward, shapes, self.label)
        if self.flattens and len(out) != 1:
            self.flattens = False
        return out

    def forward(self, *inputs):
        return self.template(inputs, self.template.like(inputs))

    def reverse(self, g, at):
        return [g.reshape((g.shape[0],) + tuple(at.in_shapes[0]))] + [None] * (len(at.in_shapes) - 1)


def _flattens(call) -> bool:
    """Whether the call flattens one image to a vector: flatten(x, 1), x.view(x.size(0), -1),
    x.reshape(-1, F) and the like."""
    node = call.node
    if node.target in (torch.flatten, "flatten"):
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        return start == 1 and end in (-1, 3)
    if node.target in (torch.reshape, "view", "reshape"):
        if node.target is torch.reshape:
            shape = node.args[1] if len(node.args) > 1 else node.kwargs.get("shape")
        else:  # Tensor.view / Tensor.reshape: (x, a, b) or (x, (a, b))
            shape = node.args[1:] if len(node.args) > 2 else (node.args[1] if len(node.args) == 2 else
                                                              node.kwargs.get("shape", node.kwargs.get("size")))
        if isinstance(shape, (list, tuple)) and len(shape) == 2:
            batch, features = shape
            batch_is_n = isinstance(batch, fx.Node) and call.reader.is_batch_size(batch)
            return (batch_is_n and features == -1) or ((batch_is_n or batch == -1) and isinstance(features, int)
                                                        and features > 0)
    return False


class LinearCall(General):
    """A call that is linear in its data inputs: its gradient is autograd's at zeros, so the forward
    keeps nothing but its value inputs. Subclasses list the forms."""

    paper = False

    def output_shape(self, *shapes):
        self.in_shapes = shapes
        return super().output_shape(*shapes)

    def forward_keeping(self, inputs, keeper):
        return self.forward(*inputs), [None if is_shape(shape) else value
                                       for value, shape in zip(inputs, self.in_shapes)]

    def reverse(self, g, at):
        values = [None if is_shape(shape) else at.value(i, kept)
                  for i, (kept, shape) in enumerate(zip(at.saved, at.in_shapes))]
        shapes = [tuple(shape) if at.windows is None or len(shape) != 3 else (shape[0],) + tuple(g.shape[2:])
                  for shape in at.in_shapes if is_shape(shape)]  # on windows: the window's size
        data = [i for i, shape in enumerate(at.in_shapes) if is_shape(shape)]
        result = [None] * len(at.in_shapes)
        for i, shape in zip(data, shapes):  # one input at a time: the others at zero add nothing
            def call(x, i=i):
                full = [v if v is not None else g.new_zeros((g.shape[0],) + tuple(at.in_shapes[j]))
                        for j, v in enumerate(values)]
                full[i] = x
                return self.forward(*full)
            result[i] = linear_vjp(call, shape, g)
        return result


@register
class Permute(LinearCall):
    """permute, transpose, swapaxes, movedim: the values move, the batch stays in dim 0."""

    name = "permute"
    functions = (torch.permute, torch.transpose, torch.swapaxes, torch.swapdims, torch.movedim, torch.moveaxis,
                 torch.t)
    methods = ("permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis", "t")


@register
class Pad(LinearCall):
    name = "pad"
    modules = (nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d, nn.ConstantPad1d,
               nn.ZeroPad1d, nn.ReflectionPad1d, nn.ReplicationPad1d)
    functions = (F.pad,)


@register
class Interpolate(LinearCall):
    name = "interpolate"
    modules = (nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d)
    functions = (F.interpolate, F.upsample, F.upsample_nearest, F.upsample_bilinear)


class Split(LinearCall):
    """One item of a split (``x.chunk(2, 1)[0]``, ``torch.split(x, 16)[1]``, ``x.unbind(0)[2]``): the
    graph reader makes the split and the item taken from it one node. Along the channels of a map it
    keeps receptive-field windows."""

    name = "split"
    splits = (torch.split, torch.chunk, torch.unbind, torch.tensor_split, "split", "chunk", "unbind",
              "tensor_split", "split_with_sizes")

    def __init__(self, template, label: str, dim, op: Optional[str] = None):
        super().__init__(template, label, op)
        self.dim = dim
        self.windowed = dim in (1, -3)  # along a map's channels; output_shape knows for sure

    def output_shape(self, *shapes):
        out = super().output_shape(*shapes)
        first = shapes[0]
        self.windowed = (is_shape(first) and len(first) == 3 and len(out) == 3 and self.dim in (1, -3)
                         and tuple(out[1:]) == tuple(first[1:]))
        return out


@register
class Cat(Kind):
    """torch.cat: each input gets its slice of g. Along the channels of maps (docs/DESIGN.md, section 1) it keeps
    receptive-field windows; along other dims (tokens after a class token) it works on whole maps."""

    name = "cat"
    functions = (torch.cat, torch.concat, torch.concatenate)
    arguments = ("tensors", "dim")

    def __init__(self, template, dim: int):
        self.template, self.dim = template, dim
        self.windowed = dim in (1, -3)  # along a map's channels; output_shape knows for sure

    @classmethod
    def from_call(cls, call):
        dim = call.get("dim", call.get("axis", 0))
        items = call.get("tensors")
        if not isinstance(items, (list, tuple)) or not items:
            call.fail(f"takes tensors={items!r}; a list of tensors is expected")
        return cls(call.template(), dim)  # the template takes every graph node among the tensors as an input

    def outside_table(self):
        if not self.channels:
            return f"concatenates along dim {self.dim}; only the channel dim (1) is in the paper's table"
        return None if self.all_data else "concatenates a tensor not computed from the images"

    def output_shape(self, *shapes):
        self.all_data = all(is_shape(s) for s in shapes)
        data = [s for s in shapes if is_shape(s)]
        rank = len(data[0])
        dim = self.dim + rank + 1 if self.dim < 0 else self.dim
        if dim == 0:
            raise ValueError("concatenates along the batch dim; the engine needs one image per row")
        self.axis = dim  # in the [N, ...] tensor
        self.channels = dim == 1 and rank in (1, 3)
        out = per_image_shape(self.forward, shapes, "torch.cat")
        self.sizes = [s[dim - 1] if is_shape(s) else s.any().shape[dim] for s in shapes]
        self.windowed = self.channels and rank == 3 and self.all_data
        return out

    def forward(self, *inputs):
        return self.template(inputs, self.template.like(inputs))

    def reverse(self, g, at):
        pieces = torch.split(g, self.sizes, dim=self.axis)
        return [piece if is_shape(shape) else None for piece, shape in zip(pieces, at.in_shapes)]
