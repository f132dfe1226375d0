"""Pointwise activations other than the rectifiers (SiLU, GELU, Hardswish, Hardsigmoid, sigmoid, tanh,
LeakyReLU, ELU, Mish, Softplus, ...): the output at a position reads only the input there. Their
forward is the model's own call; their reverse the exact gradient g * f'(x), with f'(x) autograd's,
taken once in the forward, on receptive-field windows like any pointwise layer."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Kind, register

__all__ = ["Pointwise"]


@register
class Pointwise(Kind):
    name = "activation"
    modules = (nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU, nn.Mish,
               nn.Softplus, nn.SELU, nn.CELU, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid, nn.Hardshrink,
               nn.Softshrink, nn.PReLU, nn.RReLU, nn.Threshold)
    functions = (F.silu, F.gelu, F.hardswish, F.hardsigmoid, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh,
                 F.leaky_relu, F.leaky_relu_, F.elu, F.elu_, F.mish, F.softplus, F.selu, F.celu, F.softsign,
                 F.tanhshrink, F.logsigmoid, F.hardshrink, F.softshrink, F.prelu, F.rrelu, F.threshold,
                 torch.exp, torch.sigmoid_, torch.tanh_, torch.erf, torch.square, torch.abs, torch.neg)
    methods = ("sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "exp_", "erf", "square", "abs", "neg")
    pointwise = True
    paper = False

    def __init__(self, template, label: str):
        self.template, self.label = template, label

    @classmethod
    def from_module(cls, module, call):
        call.data("input")
        return cls(call.template(), type(module).__name__)

    @classmethod
    def from_call(cls, call):
        call.data("input")
        template = call.template()
        return cls(template, template.describe())

    def describe_reverse(self, rule):
        return f"its gradient ({self.label})"

    def forward(self, *inputs):
        return self.template(inputs, self.template.like(inputs))

    def forward_keeping(self, inputs, keeper):
        """The forward and its derivative f'(x), from one autograd pass over the images: the reverse
        is then g * f'(x), with nothing recomputed per projection."""
        with torch.enable_grad():
            x = inputs[0].detach().requires_grad_(True)
            y = self.forward(x, *inputs[1:])
            (derivative,) = torch.autograd.grad(y, x, torch.ones_like(y))
        return y.detach(), keeper.keep(derivative)

    def reverse(self, g, at):
        return [at.multiply(g, at.saved)] + [None] * (len(at.in_shapes) - 1)
