"""Pointwise activations other than the rectifiers (SiLU, GELU, Hardswish, Hardsigmoid, sigmoid, tanh,
LeakyReLU, ELU, Mish, Softplus, ...): the output at a position reads only the input there. Their
forward is the model's own call; their reverse the exact gradient f'(x) * g, autograd's, at the input
the forward kept, on receptive-field windows like any pointwise layer."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Kind, register, vjp

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
        return self.forward(*inputs), (keeper.rows(inputs[0]), list(inputs[1:]))

    def reverse(self, g, at):
        x, rest = at.saved
        rest = [at.value(1 + i, kept) for i, kept in enumerate(rest)]
        (grad,) = vjp(lambda t: self.forward(t, *rest), [at.map_of(x)], g)
        return [grad] + [None] * len(rest)
