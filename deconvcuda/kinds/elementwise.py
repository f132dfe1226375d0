"""Elementwise arithmetic with broadcasting: the residual addition, and ``*`` / ``/`` (a
squeeze-excitation gate, layer scale, a constant factor). Forward: the model's own call. Reverse: the
gradient, passed to each data operand summed over the dims it was broadcast along: an addition passes
``g`` to both operands, a product ``g`` times the other operand.

On receptive-field windows: operands shaped like the output share its windows; an operand broadcast
over the positions (a gate ``[N, C, 1, 1]``) takes its gradient whole (its sum over the window, where
``g`` is non-zero, is its sum over the map), which the engine pastes in as a full map.
"""
from __future__ import annotations

import operator

import torch

from .base import Kind, is_shape, register

__all__ = ["Elementwise"]

_ADD = (operator.add, operator.iadd, torch.add, "add", "add_")
_SUB = (operator.sub, operator.isub, torch.sub, torch.subtract, "sub", "sub_", "subtract")
_MUL = (operator.mul, operator.imul, torch.mul, torch.multiply, "mul", "mul_", "multiply")
_DIV = (operator.truediv, operator.itruediv, torch.div, torch.divide, torch.true_divide, "div", "div_", "divide",
        "true_divide")


def _reduced(grad: torch.Tensor, shape, g: torch.Tensor) -> torch.Tensor:
    """``grad`` summed over the dims its operand (per-image ``shape``) was broadcast along."""
    target = (g.shape[0],) + tuple(shape)
    return grad if tuple(grad.shape) == target else grad.sum_to_size(target)


def _hashable_in(target, forms) -> bool:
    return any(target is form or target == form for form in forms)


@register
class Elementwise(Kind):
    name = "elementwise"
    functions = tuple(f for f in _ADD + _SUB + _MUL + _DIV if not isinstance(f, str))
    methods = tuple(f for f in _ADD + _SUB + _MUL + _DIV if isinstance(f, str))
    arguments = ("input", "other", "alpha")
    pointwise = True

    def __init__(self, template, operation: str, operands, alpha):
        self.template, self.operation, self.operands, self.alpha = template, operation, operands, alpha
        self.windowed = True  # narrowed by output_shape once the operands' shapes are known
        self.broadcast = [False] * len(operands)
        self.data = [True] * len(operands)

    @classmethod
    def from_call(cls, call):
        target = call.node.target
        operation = next(name for name, forms in (("+", _ADD), ("-", _SUB), ("*", _MUL), ("/", _DIV))
                         if _hashable_in(target, forms))
        operands = [call.operand(call.get(name)) for name in ("input", "other")]
        alpha = call.get("alpha", 1)
        return cls(call.template(), operation, operands, alpha)

    @property
    def label(self) -> str:
        return {"+": "add", "-": "subtract", "*": "multiply", "/": "divide"}[self.operation]

    def outside_table(self):
        """The residual addition of two feature maps of one shape is in the paper's table (as the
        gradient every toolbox agrees on); anything else takes its gradient only outside strict."""
        if self.operation != "+":
            return f"{self.label}s; only the residual sum of two feature maps (+) is in the paper's table"
        if self.alpha != 1 or not all(kind == "input" for kind, _ in self.operands) or not self.same_shapes:
            return "adds a constant, a scaled or a broadcast operand; only the plain sum of two feature maps of one " \
                   "shape (a residual connection) is in the paper's table"
        return None

    def describe_reverse(self, rule):
        return f"its gradient ({self.label})"

    def output_shape(self, *shapes):
        data = [s for s in shapes if is_shape(s)]
        if not data:
            raise ValueError("reads no data input")
        rank = max(len(s) for s in data)
        # broadcast the per-image shapes (values: their shape without the batch dim where they have it)
        per_image = []
        for shape in shapes:
            if is_shape(shape):
                per_image.append(tuple(shape))
            else:
                value = shape.any()
                size = tuple(value.shape) if isinstance(value, torch.Tensor) else ()
                per_image.append(size[1:] if len(size) == rank + 1 else size)
        try:
            out = tuple(torch.broadcast_shapes(*per_image))
        except RuntimeError as error:
            raise ValueError(f"combines operands of shapes {[list(s) for s in per_image]} that do not broadcast "
                             f"({error})") from None
        self.same_shapes = all(tuple(s) == out for s in per_image)
        self.data = [is_shape(shape) for shape in shapes]
        self.broadcast = [tuple(s) != out for s in per_image]
        spatial = len(out) == 3
        # windows: every operand the output's shape, or constant over the positions (size 1 there)
        self.windowed = spatial and all(tuple(s) == out or (len(s) >= 2 and tuple(s[-2:]) == (1, 1)) or len(s) == 0
                                        for s in per_image) and all(
            is_shape(shape) or not self._spatially_full(per_image[i], out) for i, shape in enumerate(shapes))
        return out

    @staticmethod
    def _spatially_full(shape, out) -> bool:
        return len(shape) >= 2 and tuple(shape[-2:]) == tuple(out[-2:]) and tuple(out[-2:]) != (1, 1)

    def forward(self, *inputs):
        return self.template(inputs, self.template.like(inputs))

    def forward_keeping(self, inputs, keeper):
        """What the reverse reads: nothing for a sum (its gradient is g), the values for a product of
        one data operand (g times them), every operand else (maps as rows, for their windows)."""
        out = self.forward(*inputs)
        if self.operation in "+-":
            return out, None
        single = self.operation == "*" and sum(self.data) == 1
        return out, [None if single and self.data[i] else keeper.keep(x) if self.data[i] and not self.broadcast[i]
                     else x for i, x in enumerate(inputs)]

    def input_windows(self, windows, in_shapes):
        return [windows if is_shape(shape) and not self.broadcast[i] else None for i, shape in enumerate(in_shapes)]

    def reverse(self, g, at):
        data = [is_shape(shape) for shape in at.in_shapes]
        if self.operation in "+-":  # g itself (signed, scaled by alpha), summed where it was broadcast
            return [None if not data[i] else _reduced(self._signed(g, i), at.in_shapes[i], g) if self.broadcast[i]
                    else self._signed(g, i) for i in range(len(at.in_shapes))]
        kept = [k if data[i] else at.value(i, k) for i, k in enumerate(at.saved)]
        if self.operation == "*":  # each operand's gradient: g times the other operand
            grads = [None] * len(kept)
            for i in (i for i in range(len(kept)) if data[i]):
                others = [j for j in range(len(kept)) if j != i]
                if not others:  # x * literal
                    grad = g * self._literal()
                elif data[others[0]]:
                    grad = at.multiply(g, kept[others[0]])
                else:
                    other = kept[others[0]]
                    if isinstance(other, torch.Tensor):
                        other = other.to(device=g.device, dtype=torch.promote_types(g.dtype, other.dtype))
                    grad = g * other
                grads[i] = _reduced(grad, at.in_shapes[i], g) if self.broadcast[i] else grad
            return grads
        return at.vjp(self.forward, kept, data, g)

    def _literal(self):
        """The literal factor of ``x * c`` (the operand that is not an input)."""
        return next(value for kind, value in self.operands if kind == "literal")

    def _signed(self, g, index: int):
        """The gradient of a sum or difference at operand ``index``: g, -alpha * g or alpha * g."""
        if index == 0:
            return g
        sign = -self.alpha if self.operation == "-" else self.alpha
        return g if sign == 1 else sign * g
