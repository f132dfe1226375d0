"""Layer outputs for the analyses: one forward, every requested layer's output, the model unchanged."""
from __future__ import annotations

from typing import Dict, List, Sequence, Union

import torch
from torch import nn

__all__ = ["layer_list", "layer_outputs"]


def layer_list(model: nn.Module, layers: Union[str, Sequence[str]], caller: str) -> List[str]:
    """``layers`` as a non-empty list of names from ``model.named_modules()`` ("" is the model's output)."""
    if isinstance(layers, str):
        layers = [layers]
    try:
        layers = list(layers)
    except TypeError:
        raise TypeError(f"{caller}: layers must be a layer name or a list of them, got {type(layers).__name__}") from None
    if not layers:
        raise ValueError(f"{caller}: layers is empty; name at least one layer from model.named_modules()")
    names = dict(model.named_modules())
    for layer in layers:
        if not isinstance(layer, str) or layer not in names:
            valid = [name for name in names if name]
            shown = ", ".join(valid[:40]) + (f", ... ({len(valid)} in all)" if len(valid) > 40 else "")
            raise ValueError(f"{caller}: unknown layer {layer!r}; expected a name from model.named_modules() "
                             f"(\"\" for the model's output): {shown}")
    return list(dict.fromkeys(layers))


def layer_outputs(model: nn.Module, images: torch.Tensor, layers: Sequence[str], caller: str) -> Dict[str, torch.Tensor]:
    """{layer: its output on ``images``}, from one forward in eval semantics without autograd."""
    from ..graph import trace

    graph = trace(model, list(layers), caller=caller)
    with torch.no_grad():
        return graph.run(images)
