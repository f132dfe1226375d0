"""Projections by autograd, for the models the graph engine cannot read: a forward torch.fx cannot
trace (it branches on the data, or runs Python fx cannot follow), or a graph whose tensors leave the
batch in dim 0. The model runs as it is, in eval mode (every module's flag restored), under a
``TorchFunctionMode`` that swaps every rectifier's backward for the rule's, whatever its form
(``nn.ReLU``, ``F.relu``, ``torch.relu``, ``Tensor.relu``, in place or not, ``nn.ReLU6``,
``F.relu6``, ``hardtanh(0, 6)``); the layer's output is taken by a forward hook that is removed
afterwards; every other op reverses by autograd's own gradient. That is the projection's definition
(docs/DESIGN.md, section 1), so the results are exact; it costs what batched autograd costs (one forward
row per projection), not what the graph engine does.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .capture import capture
from .rules import Rule

__all__ = ["RectifierMode", "RuleMode", "StraightThrough", "FallbackWarning", "ROWS_PER_CHUNK", "warn"]

#: Projections (forward rows) per autograd pass: bounds the memory autograd keeps for the backward.
ROWS_PER_CHUNK = 32


class FallbackWarning(UserWarning):
    """The graph engine's fast path is not used for a model (the warning says why)."""


def warn(caller: str, model: nn.Module, why: Exception, instead: str, stacklevel: int = 3) -> None:
    """The one warning of a call that does not use the graph engine: why, and what it does ``instead``
    (``stacklevel``: the frames between the user's call and this one, as ``warnings.warn`` counts)."""
    import warnings

    reason = str(why)
    if reason.startswith(f"{caller}: "):
        reason = reason[len(caller) + 2:]
    warnings.warn(f"{caller}: the graph engine's fast path is not used for {type(model).__name__} ({reason}); "
                  f"{instead}", FallbackWarning, stacklevel=stacklevel)


class _Rectifier(torch.autograd.Function):
    """clamp(x, 0, top) forward; the rule's reverse backward (the mask of where the forward passed
    kept only for a masked rule: the others never read it)."""

    @staticmethod
    def forward(ctx, x, top: float, rule: Rule, inplace: bool):
        ctx.rule = rule
        ctx.save_for_backward((x > 0) & (x < top) if rule.masked else None)
        if inplace:
            ctx.mark_dirty(x)
            return x.clamp_(0, top) if top != float("inf") else x.clamp_(min=0)
        return x.clamp(0, top) if top != float("inf") else x.clamp(min=0)

    @staticmethod
    def backward(ctx, g):
        (passed,) = ctx.saved_tensors
        return ctx.rule.rectifier(g, passed), None, None, None


class StraightThrough(torch.autograd.Function):
    """``apply(x, value)``: the forward's ``value``, the identity backward to ``x`` (LocalResponseNorm
    with lrn="identity"; a rectifier whose masks must not cut a path, for receptive fields)."""

    @staticmethod
    def forward(ctx, x, value):
        return value

    @staticmethod
    def backward(ctx, g):
        return g, None


_RELUS = {F.relu: False, torch.relu: False, torch.Tensor.relu: False, F.relu_: True, torch.relu_: True,
          torch.Tensor.relu_: True}
_HARDTANHS = {F.hardtanh: False, F.hardtanh_: True}


def _argument(args, kwargs, index: int, name: str, default):
    return args[index] if len(args) > index else kwargs.get(name, default)


class RectifierMode(torch.overrides.TorchFunctionMode):
    """Catches every rectifier a forward can call, in every form (``nn.ReLU`` calls ``F.relu``,
    ``nn.ReLU6`` ``F.hardtanh``; methods come as ``Tensor.relu`` and ``Tensor.relu_``; in place or not;
    ``hardtanh(0, 6)`` is ReLU6) and computes it with ``rectify(x, top, inplace)`` (top: inf for ReLU,
    6 for ReLU6); every other call runs as it is. Subclasses say what the rectifier's backward is."""

    def rectify(self, x: torch.Tensor, top: float, inplace: bool) -> torch.Tensor:
        raise NotImplementedError

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _RELUS:
            x = _argument(args, kwargs, 0, "input", None)
            return self.rectify(x, float("inf"), _RELUS[func] or bool(_argument(args, kwargs, 1, "inplace", False)))
        if func is F.relu6:
            x = _argument(args, kwargs, 0, "input", None)
            return self.rectify(x, 6.0, bool(_argument(args, kwargs, 1, "inplace", False)))
        if func in _HARDTANHS:
            bounds = (_argument(args, kwargs, 1, "min_val", -1.0), _argument(args, kwargs, 2, "max_val", 1.0))
            if tuple(bounds) == (0.0, 6.0):
                x = _argument(args, kwargs, 0, "input", None)
                return self.rectify(x, 6.0, _HARDTANHS[func] or bool(_argument(args, kwargs, 3, "inplace", False)))
        return self.other(func, args, kwargs)

    def other(self, func, args, kwargs):
        """Any call that is not a rectifier: as it is."""
        return func(*args, **kwargs)


class RuleMode(RectifierMode):
    """Runs every rectifier with the rule's backward (and LocalResponseNorm with the identity backward
    where ``lrn="identity"``); every other call as it is."""

    def __init__(self, rule: Rule, lrn: str = "gradient"):
        super().__init__()
        self.rule, self.lrn = rule, lrn

    def rectify(self, x, top, inplace):
        return _Rectifier.apply(x, top, self.rule, inplace)

    def other(self, func, args, kwargs):
        if func is F.local_response_norm and self.lrn == "identity":
            x = _argument(args, kwargs, 0, "input", None)
            return StraightThrough.apply(x, func(*args, **kwargs).detach())
        return func(*args, **kwargs)


def layer_output_with_rule(model: nn.Module, x: torch.Tensor, layer: str, rule: Rule, lrn: str,
                           caller: str) -> torch.Tensor:
    """``layer``'s output on ``x`` (which requires grad) in eval mode, every rectifier's backward the
    rule's; autograd's graph kept for the backward."""
    with torch.enable_grad(), RuleMode(rule, lrn):
        outputs, _ = capture(model, x, [layer], caller, stop_early=layer != "")
    return outputs[layer]


def gradient_at_input(model: nn.Module, x: torch.Tensor, layer: str, rule: Rule, lrn: str, caller: str,
                      seeds) -> torch.Tensor:
    """The input-gradient of ``layer``'s output on the rows ``x``, seeded by ``seeds(output)`` (a map
    shaped like the output), every rectifier reversed by ``rule``."""
    x = x.detach().requires_grad_(True)
    out = layer_output_with_rule(model, x, layer, rule, lrn, caller)
    (grad,) = torch.autograd.grad(out, x, seeds(out.detach()), allow_unused=True)
    return torch.zeros_like(x) if grad is None else grad


def output_shape(model: nn.Module, images: torch.Tensor, layer: str, caller: str) -> Optional[tuple]:
    """The per-image shape of ``layer``'s output, from one image through the model (no gradient)."""
    with torch.no_grad():
        outputs, _ = capture(model, images[:1], [layer], caller, stop_early=False)
    return tuple(outputs[layer].shape[1:])
