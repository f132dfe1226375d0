"""The rectifiers: ReLU and ReLU6, reversed by the rule (deconvcuda.rules says how each rule does it).

The forward mask is read from the output (x > 0 exactly where y > 0; 0 < x < 6 where 0 < y < 6), kept
as booleans, and only for the rules that read it. Every other kind reverses by its gradient.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Kind, register
from .pointwise import Pointwise

__all__ = ["Rectifier", "ReLU", "ReLU6"]


class Rectifier(Kind):
    """A rectifier: its reverse is the rule's ``rectifier``; subclasses say how the forward and its
    pass-through mask are computed."""

    pointwise = True
    reversal = "rule"

    def pass_through(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_keeping(self, inputs, keeper):
        y = self.forward(*inputs)
        if not keeper.rule.masked:
            return y, None
        mask = self.pass_through(y)
        return y, keeper.keep(mask)

    def reverse(self, g, at):
        return [at.rule.rectifier(g, lambda g: at.multiply(g, at.saved))]


@register
class ReLU(Rectifier):
    name = "ReLU"
    modules = (nn.ReLU,)
    functions = (F.relu, F.relu_, torch.relu, torch.relu_)
    methods = ("relu", "relu_")

    def forward(self, x):
        return torch.relu(x)  # out of place: an in-place ReLU of the model cannot clobber a kept tensor

    def pass_through(self, y):
        return y > 0


@register
class ReLU6(Rectifier):
    name = "ReLU6"
    modules = (nn.ReLU6, nn.Hardtanh)
    functions = (F.relu6, F.hardtanh, F.hardtanh_)
    arguments = ("input", "min_val", "max_val")

    @classmethod
    def from_module(cls, module, call):
        """hardtanh(0, 6) is ReLU6; any other Hardtanh is a pointwise activation reversed by its gradient."""
        if isinstance(module, nn.Hardtanh) and (module.min_val, module.max_val) != (0.0, 6.0):
            return Pointwise.from_module(module, call)
        return super().from_module(module, call)

    @classmethod
    def from_call(cls, call):
        if call.node.target is not F.relu6 and (call.get("min_val", -1.0), call.get("max_val", 1.0)) != (0.0, 6.0):
            return Pointwise.from_call(call)
        return super().from_call(call)

    def forward(self, x):
        return torch.clamp(x, 0.0, 6.0)

    def pass_through(self, y):
        return (y > 0) & (y < 6)
