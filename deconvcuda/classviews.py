"""Class views: where in the image a class came from (Grad-CAM, Selvaraju et al. 2017) and its sharp
version, guided Grad-CAM (guided backpropagation times the class map).

    cam = deconvcuda.gradcam(model, images, "layer4", target=281)              # [N, H, W]
    sharp = deconvcuda.guided_gradcam(model, images, "layer4", target=labels)  # [N, C, H, W]

``target`` indexes the model's output ``[N, classes]``: an int (the same class for every image) or a
LongTensor ``[N]`` (one per image). Grad-CAM's channel weights are the spatial mean of the class
score's plain gradient at the layer's output; the map is the ReLU of the channels' weighted sum,
upsampled to the image size. These are Captum's definitions (``LayerGradCam(...,
relu_attributions=True)`` + ``LayerAttribution.interpolate(..., "bilinear")``, ``GuidedGradCam``).

Grad-CAM runs the model as it is (``deconvcuda.capture``: eval mode, flags restored, hooks removed),
so it works on any model, also where torch.fx cannot trace the forward; guided Grad-CAM's guided
backpropagation is :func:`deconvcuda.project`'s (every ReLU form, on the models ``project`` accepts).
"""
from __future__ import annotations

from typing import Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .capture import capture
from .checks import ArgumentError, DtypeError, OutOfRangeError, check_images, check_model, is_int

__all__ = ["gradcam", "guided_gradcam", "UPSAMPLE_MODES"]

#: ``F.interpolate``'s modes for maps [N, 1, h, w]; the linear ones run with ``align_corners=False``.
UPSAMPLE_MODES = ("bilinear", "nearest", "nearest-exact", "bicubic", "area")

Target = Union[int, torch.Tensor]


def _check_target(target, n_images: int, classes: int, caller: str) -> torch.Tensor:
    """``target`` as a LongTensor [N] of classes in range (on the CPU)."""
    if is_int(target):
        target = torch.full((n_images,), int(target), dtype=torch.long)
    elif isinstance(target, torch.Tensor):
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise DtypeError(f"{caller}: target must be an int or a LongTensor [N] of classes, got a {target.dtype} "
                             f"tensor")
        if target.dim() != 1 or target.shape[0] != n_images:
            raise ValueError(f"{caller}: target as a tensor must hold one class per image, shape [{n_images}], got "
                             f"{list(target.shape)}")
        target = target.detach().to("cpu", torch.long)
    else:
        raise ArgumentError(f"{caller}: target must be an int or a LongTensor [N] of classes, got "
                            f"{type(target).__name__}")
    bad = target[(target < 0) | (target >= classes)]
    if bad.numel():
        raise OutOfRangeError(f"{caller}: target class {int(bad[0])} is out of range; the model's output has "
                              f"{classes} classes (0..{classes - 1})")
    return target


def _class_map(model: nn.Module, images: torch.Tensor, layer, target, caller: str
               ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(Grad-CAM's map at the layer's resolution ``[N, 1, h, w]``, the checked target ``[N]``)."""
    check_model(model, caller)
    check_images(images, caller, allow_empty=False)
    n = images.shape[0]
    with torch.inference_mode(False), torch.enable_grad():
        x = images.clone() if images.is_inference() else images
        outputs, scores = capture(model, x, [layer, ""], caller, roots=True)
        name = next(iter(outputs))
        if name == "":
            raise ValueError(f"{caller}: layer must be a layer inside the model with a spatial output [N, C, h, w], "
                             f"got the model's output \"\"; name a convolutional layer or block (the last one is "
                             f"Grad-CAM's usual choice)")
        activations = outputs[name]
        if scores.dim() != 2 or scores.shape[0] != n:
            raise ValueError(f"{caller}: the model's output must be class scores [N, classes] with N = {n} (the "
                             f"number of images), got {list(scores.shape)}; Grad-CAM needs a classifier")
        if activations.dim() != 4:
            raise ValueError(f"{caller}: layer {name!r} has output {list(activations.shape)}; Grad-CAM needs a layer "
                             f"with a spatial output [N, C, h, w] (a convolutional layer or block)")
        target = _check_target(target, n, scores.shape[1], caller)
        score = scores.gather(1, target.to(scores.device)[:, None]).sum()
        gradient = None
        if score.requires_grad:
            (gradient,) = torch.autograd.grad(score, activations, allow_unused=True)
        if gradient is None:
            raise ValueError(f"{caller}: the model's output does not depend on layer {name!r}'s output (the layer is "
                             f"not on the path from the input to the class scores); name a layer the scores are "
                             f"computed from")
        weights = gradient.mean(dim=(2, 3), keepdim=True)                     # [N, C, 1, 1]
        cam = F.relu((weights * activations.detach()).sum(dim=1, keepdim=True))
    return cam, target


def _upsample(cam: torch.Tensor, size, mode: str) -> torch.Tensor:
    linear = mode in ("bilinear", "bicubic")
    return F.interpolate(cam, size=tuple(size), mode=mode, align_corners=False if linear else None)


def gradcam(model: nn.Module, images: torch.Tensor, layer, target: Target, *, upsample: str = "bilinear"
            ) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al. 2017) of class ``target`` at ``layer``: ``[N, H, W]``.

    images: ``[N, C, H, W]`` model input (one forward for the batch). layer: a name from
    ``model.named_modules()`` whose output is ``[N, C, h, w]``. target: an int or a LongTensor ``[N]``
    indexing the model's output ``[N, classes]``. The channel weights are the spatial mean of the class
    score's plain gradient (no rule) at the layer's output; the map is the ReLU of the weighted sum of
    the channels, upsampled to ``H x W`` by ``F.interpolate(mode=upsample)`` (``align_corners=False``
    for "bilinear" and "bicubic"). Equal to Captum's ``LayerGradCam(..., relu_attributions=True)``
    followed by ``LayerAttribution.interpolate(..., upsample)``. The model runs as it is, in eval mode
    (every flag restored, hooks removed; any model, also where torch.fx cannot trace it) and is not
    changed. Returns the images' dtype and device.
    """
    caller = "gradcam"
    if upsample not in UPSAMPLE_MODES:
        raise ValueError(f"{caller}: upsample must be one of {', '.join(map(repr, UPSAMPLE_MODES))} (F.interpolate's "
                         f"modes for maps), got {upsample!r}")
    cam, _ = _class_map(model, images, layer, target, caller)
    return _upsample(cam, images.shape[-2:], upsample)[:, 0].to(images.dtype)


def guided_gradcam(model: nn.Module, images: torch.Tensor, layer, target: Target) -> torch.Tensor:
    """Guided Grad-CAM (Selvaraju et al. 2017): the guided-backpropagation projection of the class score
    times the Grad-CAM map of ``layer`` upsampled with "nearest": ``[N, C, H, W]``.

    The projection is ``deconvcuda.project(model, images, "", neurons=..., rule="guided", seed="one")``
    at the model's output, a row ``(i, target_i, 0, 0)`` per image. Equal to Captum's ``GuidedGradCam``
    where Captum's hooks see every ReLU (here every ReLU form counts). Runs on every model ``project``
    accepts; the model is not changed.
    """
    from .engine import project

    caller = "guided_gradcam"
    cam, classes = _class_map(model, images, layer, target, caller)
    rows = torch.arange(images.shape[0])
    zeros = torch.zeros_like(rows)
    neurons = torch.stack([rows, classes, zeros, zeros], dim=1).to(images.device)
    guided = project(model, images, "", neurons=neurons, rule="guided", seed="one")
    return guided * _upsample(cam, images.shape[-2:], "nearest").to(guided.dtype)
