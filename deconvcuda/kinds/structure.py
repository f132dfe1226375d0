"""Identities: layers that leave no node, since in eval mode their output is their input (Dropout in
every form, Identity, stochastic depth, clone). Their reverse is the identity: nothing to do."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Kind, register

__all__ = ["Identity"]


def _stochastic_depth_functions():
    """torchvision's stochastic depth (a function torch.fx keeps whole), where torchvision is installed."""
    try:
        from torchvision.ops import stochastic_depth
    except ImportError:
        return ()
    return (stochastic_depth,)


@register
class Identity(Kind):
    """Leaves no node: Dropout is the identity in eval mode, and so are these."""

    name = "Identity"
    modules = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
               nn.Identity)
    functions = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
                 torch.clone) + _stochastic_depth_functions()
    methods = ("clone",)
    arguments = ("input", "p", "training")
    identity = True
    pointwise = True

    @classmethod
    def from_call(cls, call):
        if call.node.target in _stochastic_depth_functions():
            if call.node.args[3] if len(call.node.args) > 3 else call.node.kwargs.get("training", True):
                call.unsupported("drops paths at random (training=True)")
        elif call.node.target in (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
                                  F.feature_alpha_dropout) and call.get("training", True):
            call.unsupported("drops values at random (training=True)")
        return super().from_call(call)
