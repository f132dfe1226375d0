"""Conv2d: forward by F.conv2d; reverse by the transposed convolution of the same (tied) filters."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..geometry import conv_output_size
from ..windows import extent
from .base import Kind, pair, register

__all__ = ["Conv"]


@register
class Conv(Kind):
    name = "Conv2d"
    modules = (nn.Conv2d,)
    functions = (F.conv2d, torch.conv2d)
    arguments = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], stride, padding, dilation, groups: int):
        self.weight, self.bias = weight, bias  # the model's own tensors, by reference
        self.stride, self.padding, self.dilation, self.groups = pair(stride), pair(padding), pair(dilation), groups

    @classmethod
    def from_module(cls, module, call):
        if module.padding_mode != "zeros":
            call.fail(f"pads with padding_mode={module.padding_mode!r}; only zero padding is supported")
        call.data("input")
        return cls(module.weight, module.bias, module.stride,
                   _padding(call, module.padding, module.kernel_size, module.dilation), module.dilation, module.groups)

    @classmethod
    def from_call(cls, call):
        call.data("input")
        weight = call.parameter("weight")
        dilation = call.get("dilation", 1)
        return cls(weight, call.parameter("bias", optional=True), call.get("stride", 1),
                   _padding(call, call.get("padding", 0), tuple(weight.shape[2:]), dilation), dilation,
                   int(call.get("groups", 1)))

    @property
    def kernel_size(self):
        return (self.weight.shape[2], self.weight.shape[3])

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1] * self.groups

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
        return F.conv2d(x, self.cast(self.weight, x), self.cast(self.bias, x), self.stride, self.padding,
                        self.dilation, self.groups)

    def grow(self, windows):
        return windows.grow(extent(self.kernel_size, self.dilation), self.stride, self.padding)

    def reverse(self, g, at):
        weight = self.cast(self.weight, g)
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
            call.fail("uses padding='same' with an even kernel extent, which pads asymmetrically; only symmetric "
                      "zero padding is supported")
        return (total[0] // 2, total[1] // 2)
    return pair(padding)
