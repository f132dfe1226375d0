"""The outputs of named layers, for every model: the traced graph (deconvcuda.graph) where torch.fx
reads the model, the model itself with forward hooks (deconvcuda.capture) where it cannot, with one
warning that says why. The scan, the analyses and ``layers`` read layer outputs through this.

    forward = LayerForward(model, ["layer2", "layer3"], caller="top_activations")
    forward.shapes((3, 224, 224))      # {"layer2": (128, 28, 28), "layer3": (256, 14, 14)}
    forward.run(images)                # {"layer2": tensor, "layer3": tensor}: one forward, eval mode
"""
from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Sequence

import torch
from torch import nn

from .capture import capture, evaluating
from .checks import check_input_shape
from . import fallback
from .graph import Reader, Untraceable, layer_names, trace, trace_model
from .kinds import Unrepresentable

__all__ = ["LayerForward", "LayerInfo", "layers", "hooked_layer_shapes", "warn_hooks"]


class LayerInfo(NamedTuple):
    """One nameable layer: its name from ``model.named_modules()``, its kind (the module's class) and
    the per-image shape of its output."""

    name: str
    kind: str
    shape: tuple


def warn_hooks(caller: str, model: nn.Module, why: Exception) -> None:
    """The one warning of a call that reads layer outputs with hooks instead of the graph."""
    fallback.warn(caller, model, why, "running the model itself, with forward hooks on the layers", stacklevel=5)


class LayerForward:
    """One forward per batch to the named layers of ``model``, as the model computes them in eval mode."""

    def __init__(self, model: nn.Module, layers, caller: str):
        self.model, self.caller = model, caller
        self.names: List[str] = layer_names(model, layers, caller)
        self.graph = None
        try:
            self.graph = trace(model, self.names, caller=caller)
        except (Untraceable, Unrepresentable) as why:
            warn_hooks(caller, model, why)

    @property
    def traced(self) -> bool:
        """Whether the graph (not hooks) computes the outputs."""
        return self.graph is not None

    def shapes(self, input_shape: Sequence[int], caller: Optional[str] = None,
               dtype: Optional[torch.dtype] = None) -> Dict[str, tuple]:
        """{layer: per-image output shape} for images of ``input_shape``; a clear ValueError where the
        images do not fit."""
        caller = caller or self.caller
        if self.graph is not None:
            try:
                return self.graph.shapes(input_shape, caller)
            except Unrepresentable as why:
                warn_hooks(caller, self.model, why)
                self.graph = None
        probe = _probe_images(self.model, input_shape, dtype)
        outputs = self.run(probe)
        return {name: tuple(outputs[name].shape[1:]) for name in self.names}

    def run(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """{layer: output} of one forward on ``images`` (no gradient)."""
        if self.graph is not None:
            with torch.no_grad():
                return self.graph.run(images)
        with torch.no_grad():
            outputs, _ = capture(self.model, images, self.names, self.caller)
        return outputs


def _probe_images(model: nn.Module, input_shape: Sequence[int], dtype: Optional[torch.dtype]) -> torch.Tensor:
    """Two images of zeros in the model's dtype and on its device (or ``dtype``)."""
    parameter = next((p for p in model.parameters() if p.is_floating_point()), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    dtype = dtype or (parameter.dtype if parameter is not None else torch.float32)
    return torch.zeros((2,) + tuple(input_shape), dtype=dtype, device=device)


def hooked_layer_shapes(model: nn.Module, input_shape: Sequence[int], caller: str) -> List[LayerInfo]:
    """``layers`` for a model torch.fx cannot trace: one forward on zeros with a hook on every module;
    the modules called once that return one tensor with the batch first, in the order they start."""
    starts: List[str] = []
    outputs: Dict[str, List[object]] = {}
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue
        handles.append(module.register_forward_pre_hook(lambda m, args, name=name: starts.append(name)))
        handles.append(module.register_forward_hook(
            lambda m, args, out, name=name: outputs.setdefault(name, []).append(out)))
    probe = _probe_images(model, input_shape, None)
    try:
        with torch.no_grad(), evaluating(model):
            try:
                model(probe)
            except Exception as error:
                raise ValueError(f"{caller}: images of shape [N, {', '.join(map(str, input_shape))}] do not fit the "
                                 f"model: its forward on them fails ({type(error).__name__}: {error})") from None
    finally:
        for handle in handles:
            handle.remove()
    infos = []
    for name in dict.fromkeys(starts):
        seen = outputs.get(name, [])
        if len(seen) == 1 and isinstance(seen[0], torch.Tensor) and seen[0].dim() >= 1 \
                and seen[0].shape[0] == probe.shape[0]:
            infos.append(LayerInfo(name, type(model.get_submodule(name)).__name__, tuple(seen[0].shape[1:])))
    return infos


def layers(model: nn.Module, input_shape: Sequence[int]) -> List[LayerInfo]:
    """Every name of ``model.named_modules()`` that ``project``, ``top_activations`` and the figures can
    take (called once by the forward, returning one tensor with the batch first), with its kind and
    per-image output shape, in forward order. Raises ValueError where the images do not fit the
    model's first layers. Models torch.fx cannot trace are run once (on zeros) with hooks."""
    caller = "layers"
    input_shape = check_input_shape(input_shape, caller)
    try:
        fx_graph, tracer = trace_model(model, caller)
    except Untraceable:
        return hooked_layer_shapes(model, input_shape, caller)
    order = {node: i for i, node in enumerate(fx_graph.nodes)}
    candidates = sorted(((calls[0], name) for name, calls in tracer.module_outputs.items() if len(calls) == 1 and name),
                        key=lambda item: order[item[0]])
    reader = Reader(model, fx_graph, caller, "any", strict=False)
    first = [consumer for consumer in fx_graph.nodes if consumer.op != "placeholder" and reader.is_data(consumer)
             and any(arg is reader.input for arg in consumer.all_input_nodes)][:1]
    if first:  # the images must fit the first layer, whatever else fails
        graph = reader.graph({"": first[0]})
        graph.node_shapes(input_shape, caller)
    try:  # one graph for all of them, where every path holds per-image tensors
        shapes = reader.graph({name: fx_node for fx_node, name in candidates}).shapes(input_shape, caller)
    except (ValueError, Unrepresentable):  # else one at a time: those behind a failing layer are left out
        shapes = {}
        for fx_node, name in candidates:
            try:
                shapes[name] = reader.graph({name: fx_node}).shapes(input_shape, caller)[name]
            except (ValueError, Unrepresentable):
                continue
    return [LayerInfo(name, type(model.get_submodule(name)).__name__, shapes[name])
            for _, name in candidates if name in shapes and isinstance(shapes[name], tuple)]
