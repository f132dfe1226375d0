"""Linear: forward F.linear (over the last dim, so also on tokens [N, T, D] and channels-last maps);
reverse W^T g."""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .base import Kind, register

__all__ = ["Linear"]


@register
class Linear(Kind):
    name = "Linear"
    modules = (nn.Linear,)
    functions = (F.linear,)
    arguments = ("input", "weight", "bias")
    windowed = False

    def __init__(self, weight, bias):
        self.weight, self.bias = weight, bias  # [out_features, in_features], by reference

    @classmethod
    def from_module(cls, module, call):
        call.data("input")
        return cls(module.weight, module.bias)

    @classmethod
    def from_call(cls, call):
        call.data("input")
        return cls(call.parameter("weight"), call.parameter("bias", optional=True))

    def output_shape(self, shape):
        if len(shape) < 1 or shape[-1] != self.weight.shape[1]:
            raise ValueError(f"expects {self.weight.shape[1]} input features in its last dim, got "
                             f"[N, {', '.join(map(str, shape))}]")
        return tuple(shape[:-1]) + (self.weight.shape[0],)

    def forward(self, x):
        return F.linear(x, self.cast(self.weight, x), self.cast(self.bias, x))

    def reverse(self, g, at):
        return [g @ self.cast(self.weight, g)]  # W^T g for each row
