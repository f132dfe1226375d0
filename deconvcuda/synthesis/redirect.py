"""Redirected ReLU gradients (Olah et al. 2017, Lucid's ``redirected_relu_grad``): a unit that is off
for an image still gets a direction to come on.

A channel whose map is zero on the start image (a ReLU's output, off everywhere) has a zero gradient,
and plain gradient ascent never moves it: on the embedded VGG16 that is 27 to 57 % of a layer's
channels (conv3_3 to conv5_3, 128 px), and most centre units. Inside :func:`redirected_relus`, every ReLU the forward calls (in
any form: ``nn.ReLU``, ``F.relu``, ``torch.relu``, ``Tensor.relu``, in place or not) computes its usual
output, and its backward is the usual gradient ``g * [x > 0]`` except for an image whose gradient
through that ReLU is zero everywhere: that image gets ``g`` where ``x > 0`` and ``max(g, 0)`` where
``x <= 0`` (only pushes that raise the objective pass a closed unit). Wherever the exact gradient is
not zero, it is what the optimisation follows. The model is not changed: the mode lasts one forward.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from ..fallback import RectifierMode

__all__ = ["redirected_relus"]

class _RedirectedRelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        on = x > 0
        exact = g * on
        if x.dim() == 0:
            return exact
        stuck = exact.flatten(1).abs().amax(dim=1) == 0           # per image: nothing passes this ReLU
        if not bool(stuck.any()):
            return exact
        redirected = torch.where(on, g, g.clamp(min=0))
        return torch.where(stuck.view(-1, *([1] * (x.dim() - 1))), redirected, exact)


class _RedirectMode(RectifierMode):
    """ReLUs with the redirected backward; ReLU6 with its own gradient."""

    def rectify(self, x, top, inplace):
        if top != float("inf"):
            return x.clamp_(0, top) if inplace else x.clamp(0, top)
        return _RedirectedRelu.apply(x)


@contextlib.contextmanager
def redirected_relus() -> Iterator[None]:
    """Every ReLU called inside the block has the redirected backward (out of place; same values)."""
    with _RedirectMode():
        yield
