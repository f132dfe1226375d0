"""Layer outputs for the analyses: one forward, every requested layer's output, the model unchanged."""
from __future__ import annotations

from typing import Dict, List, Sequence, Union

import torch
from torch import nn

from ..checks import as_list, resolve_layer

__all__ = ["layer_list", "layer_outputs"]


def layer_list(model: nn.Module, layers: Union[str, Sequence[str]], caller: str) -> List[str]:
    """``layers`` as a non-empty list of names from ``model.named_modules()`` ("" is the model's output)."""

    layers = as_list(layers, (str, nn.Module), "layers", "a layer name or a list of them", caller)
    return list(dict.fromkeys(resolve_layer(model, layer, caller) for layer in layers))


def layer_outputs(model: nn.Module, images: torch.Tensor, layers: Sequence[str], caller: str) -> Dict[str, torch.Tensor]:
    """{layer: its output on ``images``}, from one forward in eval semantics without autograd."""
    from ..forward import LayerForward

    return LayerForward(model, list(layers), caller).run(images)
