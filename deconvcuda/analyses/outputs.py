"""Layer outputs for the analyses: one forward, every requested layer's output, the model unchanged."""
from __future__ import annotations

from typing import Dict, List, Sequence, Union

import torch
from torch import nn

__all__ = ["layer_list", "layer_outputs"]


def as_list(value, single, what: str, caller: str) -> list:
    """``value`` as a non-empty list; one ``single`` (a type or tuple of types) becomes ``[value]``.
    what: how errors name the argument, e.g. "layers (a layer name or a list of them)"."""
    if isinstance(value, single):
        return [value]
    if isinstance(value, torch.Tensor):
        value = value.flatten().tolist()
    try:
        value = list(value)
    except TypeError:
        raise TypeError(f"{caller}: expected {what}, got {type(value).__name__}") from None
    if not value:
        raise ValueError(f"{caller}: {what.split(' ')[0]} is empty; pass at least one")
    return value


def layer_list(model: nn.Module, layers: Union[str, Sequence[str]], caller: str) -> List[str]:
    """``layers`` as a non-empty list of names from ``model.named_modules()`` ("" is the model's output)."""
    from ..checks import resolve_layer

    layers = as_list(layers, (str, nn.Module), "layers (a layer name or a list of them)", caller)
    return list(dict.fromkeys(resolve_layer(model, layer, caller) for layer in layers))


def layer_outputs(model: nn.Module, images: torch.Tensor, layers: Sequence[str], caller: str) -> Dict[str, torch.Tensor]:
    """{layer: its output on ``images``}, from one forward in eval semantics without autograd."""
    from ..forward import LayerForward

    return LayerForward(model, list(layers), caller).run(images)
