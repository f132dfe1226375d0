"""Running the user's model as it is, and reading the outputs of its named modules.

    with evaluating(model):                       # eval mode; each module's own flag restored afterwards
        ...
    outputs, logits = capture(model, images, ["layer3", ""], caller="gradcam")   # "" is the model's output

``capture`` runs ``model(images)`` in eval mode with a forward hook on each named module and removes
the hooks afterwards. It works on any ``nn.Module`` (also where torch.fx cannot trace the forward),
keeps autograd's graph when grad mode is on (so gradients can be taken with respect to the outputs).
A module the forward calls more than once has no single output: that is an error that says so. Each
output is kept as the module returned it: where the forward goes on, it goes on with a copy, so an
in-place op after the module (``ReLU(inplace=True)`` after a convolution) does not change it. With
``stop_early=True`` the forward stops at the first call of the last module it needs (a caller that
runs the same layer many times checks it once without, then saves the rest of the forward). With
``roots=True`` each named module's output is a root of autograd's graph: gradients of the model's
output with respect to it exist whatever requires grad before it (what Grad-CAM needs).
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Sequence, Tuple, Union

import torch
from torch import nn

from .checks import resolve_layer

__all__ = ["evaluating", "capture"]


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode (Dropout off, BatchNorm's running statistics) for the ``with`` block;
    afterwards every module's ``training`` flag is what it was, also where they differed."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in flags:
            module.training = training


class _Enough(Exception):
    """Raised by the last hook a capture needs: nothing after that module has to run."""


def capture(model: nn.Module, images, layers: Union[str, Sequence[str]], caller: str, *, stop_early: bool = False,
            roots: bool = False) -> Tuple[Dict[str, torch.Tensor], Union[torch.Tensor, None]]:
    """``({layer: output}, model_output)``: one forward of ``model(images)`` in eval mode. ``layers``
    are names from ``model.named_modules()``; ``""`` asks for the model's output, which is then also
    returned as ``model_output`` (else None). Each output is the tensor the module returned (not a
    copy: under grad mode it is part of autograd's graph), and the rest of the forward runs on a clone
    of it, so in-place ops there leave it as the module returned it. With ``roots=True`` (under grad
    mode) it is that tensor detached (the same memory) and requiring grad: nothing before the module
    is differentiated. Raises ValueError, prefixed with ``caller``, for a module the forward calls more
    than once or never, or that returns something other than one tensor."""
    names = [layers] if isinstance(layers, (str, nn.Module)) else list(layers)
    names = list(dict.fromkeys(resolve_layer(model, layer, caller) for layer in names))
    wanted = [name for name in names if name]
    whole = len(wanted) < len(names)
    calls: Dict[str, List[object]] = {name: [] for name in wanted}

    def hook_for(name: str):
        def hook(module, inputs, output):
            if roots and isinstance(output, torch.Tensor):
                output = output.detach().requires_grad_()
            calls[name].append(output)
            if stop_early and not whole and all(calls[other] for other in wanted):
                raise _Enough
            # what the rest of the forward reads (and may change in place)
            return output.clone() if isinstance(output, torch.Tensor) else None
        return hook

    handles = [model.get_submodule(name).register_forward_hook(hook_for(name)) for name in wanted]
    model_output = None
    try:
        with evaluating(model):
            try:
                model_output = model(images)
            except _Enough:
                pass
    finally:
        for handle in handles:
            handle.remove()
    outputs: Dict[str, torch.Tensor] = {}
    for name in wanted:
        seen = calls[name]
        if not seen:
            raise ValueError(f"{caller}: layer {name!r} is never called by the model's forward, so it has no output")
        if len(seen) > 1:
            raise ValueError(f"{caller}: layer {name!r} is called {len(seen)} times in the model's forward, so it has "
                             f"no single output; name a layer that is called once")
        if not isinstance(seen[0], torch.Tensor):
            raise ValueError(f"{caller}: layer {name!r} returns a {type(seen[0]).__name__}, not a tensor; name a "
                             f"layer whose output is one tensor")
        outputs[name] = seen[0]
    if whole:
        if not isinstance(model_output, torch.Tensor):
            raise ValueError(f"{caller}: the model's output is a {type(model_output).__name__}, not a tensor; name a "
                             f"layer instead")
        outputs[""] = model_output
    return outputs, model_output if whole else None
