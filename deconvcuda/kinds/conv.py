"""Conv2d: forward by F.conv2d as the model calls it; reverse by the transposed convolution of the same
(tied) filters."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..geometry import conv_output_size, extent, pair
from .base import Kind, register

__all__ = ["Conv"]


@register
class Conv(Kind):
    name = "Conv2d"
    modules = (nn.Conv2d,)
    functions = (F.conv2d, torch.conv2d)
    arguments = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    reversal = "kernel"

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], stride, padding, dilation, groups: int,
                 padding_argument=None):
        self.weight, self.bias = weight, bias  # the model's own tensors, by reference
        self.stride, self.padding, self.dilation, self.groups = pair(stride), pair(padding), pair(dilation), groups
        # the forward passes the padding as the model does ("same" included), so it computes the same
        self.padding_argument = self.padding if padding_argument is None else padding_argument

    @classmethod
    def from_module(cls, module, call):
        if module.padding_mode != "zeros":
            call.unsupported(f"pads with padding_mode={module.padding_mode!r}; only zero padding is reversed natively")
        call.data("input")
        return cls(module.weight, module.bias, module.stride,
                   _padding(call, module.padding, module.kernel_size, module.dilation), module.dilation, module.groups,
                   module.padding)

    @classmethod
    def from_call(cls, call):
        call.data("input")
        weight = call.parameter("weight")
        dilation = call.get("dilation", 1)
        padding = call.get("padding", 0)
        return cls(weight, call.parameter("bias", optional=True), call.get("stride", 1),
                   _padding(call, padding, tuple(weight.shape[2:]), dilation), dilation, int(call.get("groups", 1)),
                   padding)

    def describe_reverse(self, rule):
        return "native kernel (deconv2d: the transposed convolution of the same filters)"

    @property
    def kernel_size(self):
        return (self.weight.shape[2], self.weight.shape[3])

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1] * self.groups

    def input_channels(self):
        return self.in_channels

    def output_shape(self, shape):
        self.need_spatial(shape)
        if shape[0] != self.in_channels:
            raise ValueError(f"expects {self.in_channels} input channels, got {shape[0]}")
        size = tuple(conv_output_size(shape[1 + i], self.kernel_size[i], self.stride[i], self.padding[i],
                                      self.dilation[i]) for i in range(2))
        if min(size) < 1:
            raise ValueError(f"its input of spatial size {list(shape[1:])} is smaller than its kernel "
                             f"{list(self.kernel_size)} (dilation {list(self.dilation)}, padding {list(self.padding)})")
        return (self.weight.shape[0],) + size

    def forward(self, x):
        return F.conv2d(x, self.cast(self.weight, x), self.cast(self.bias, x), self.stride, self.padding_argument,
                        self.dilation, self.groups)

    def forward_unpadded(self, x, windows=None, rows=None, in_size=None):
        return F.conv2d(x, self.cast(self.weight, x), self.cast(self.bias, x), self.stride, 0, self.dilation,
                        self.groups)

    def grow(self, windows):
        return windows.grow(extent(self.kernel_size, self.dilation), self.stride, self.padding)

    def cone(self, cones, size):
        return None if cones[0] is None else cones[0].through(extent(self.kernel_size, self.dilation), self.stride,
                                                               self.padding, size)

    def reverse(self, g, at):
        weight = self.cast(self.weight, g)
        if at.windows is None and g.device.type == "cpu":  # oneDNN's transposed convolutions of whole maps
            g = g.contiguous(memory_format=torch.channels_last)  # run two to four times faster so
        if at.windows is None:
            return [at.kernels.deconv2d(g, weight, self.stride, self.padding, self.dilation, self.groups,
                                        at.in_shapes[0][1:])]
        grown = self.grow(at.windows)
        g = at.kernels.deconv2d(g, weight, self.stride, 0, self.dilation, self.groups, (grown.height, grown.width))
        return [grown.zero_outside(g, at.in_shapes[0][1:])]  # there the forward read its zero padding


def _padding(call, padding, kernel_size, dilation):
    if padding == "valid":
        return (0, 0)
    if padding == "same":
        total = [pair(dilation)[i] * (pair(kernel_size)[i] - 1) for i in range(2)]
        if any(t % 2 for t in total):
            call.unsupported("uses padding='same' with an even kernel extent, which pads asymmetrically; only "
                             "symmetric zero padding is reversed natively")
        return (total[0] // 2, total[1] // 2)
    return pair(padding)
