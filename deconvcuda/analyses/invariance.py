"""Invariance (Zeiler & Fergus 2014, Sec. 4.4, Fig. 5): how far a layer's feature vector moves when
the image is translated vertically, scaled or rotated.

    distances = deconvcuda.invariance(model, images, ["features.3", "features.29"], "rotate", range(0, 361, 15))
    distances["features.29"]        # [N, len(amounts)]: || f(x) - f(T_amount(x)) ||_2 per image

The transforms are ``torchvision.transforms.v2.functional.affine`` with bilinear interpolation and
fill 0: "translate" shifts down by ``amount`` pixels, "scale" scales by ``amount`` about the centre,
"rotate" rotates by ``amount`` degrees.
"""
from __future__ import annotations

from typing import Dict, Sequence, Union

import torch
from torch import nn

from ..checks import check_images
from ..progress import track
from .outputs import layer_list, layer_outputs

__all__ = ["invariance", "transform_images", "class_probabilities", "TRANSFORMS"]

TRANSFORMS = ("translate", "scale", "rotate")


def _check_transform(transform, caller: str) -> str:
    if transform not in TRANSFORMS:
        raise ValueError(f"{caller}: unknown transform {transform!r}; expected one of "
                         f"{', '.join(repr(name) for name in TRANSFORMS)}")
    return transform


def _check_amounts(amounts, transform: str, caller: str):
    if isinstance(amounts, torch.Tensor):
        amounts = amounts.flatten().tolist()
    try:
        amounts = [float(amount) for amount in amounts]
    except (TypeError, ValueError):
        raise TypeError(f"{caller}: amounts must be a sequence of numbers (pixels, a scale factor or degrees), "
                        f"got {amounts!r}") from None
    if not amounts:
        raise ValueError(f"{caller}: amounts is empty; pass at least one amount of {transform}")
    if transform == "scale" and any(amount <= 0 for amount in amounts):
        raise ValueError(f"{caller}: scale amounts must be positive factors, got {min(amounts)}")
    return amounts


def transform_images(images: torch.Tensor, transform: str, amount: float) -> torch.Tensor:
    """``images`` [N, C, H, W] under one transform (bilinear, fill 0), as :func:`invariance` applies it."""
    try:
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2 import functional as F
    except ModuleNotFoundError:
        raise ModuleNotFoundError("invariance: the transforms are torchvision's (transforms.v2.functional.affine); "
                                  "install it with `pip install torchvision`") from None

    _check_transform(transform, "transform_images")
    angle, translate, scale = 0.0, [0.0, 0.0], 1.0
    if transform == "translate":
        translate = [0.0, float(amount)]
    elif transform == "scale":
        scale = float(amount)
    else:
        angle = float(amount)
    return F.affine(images, angle=angle, translate=translate, scale=scale, shear=[0.0, 0.0],
                    interpolation=InterpolationMode.BILINEAR, fill=0)


def invariance(model: nn.Module, images: torch.Tensor, layers: Union[str, Sequence[str]], transform: str,
               amounts: Sequence[float], *, progress: bool = False) -> Dict[str, torch.Tensor]:
    """For each of ``layers``, ``[N, len(amounts)]``: the Euclidean distance between the layer's output
    (flattened per image) for each image and for the image transformed by ``amount``.

    transform: "translate" (vertical shift by ``amount`` pixels: ``translate=[0, amount]``), "scale"
    (factor ``amount``) or "rotate" (``amount`` degrees), each through
    ``torchvision.transforms.v2.functional.affine`` (bilinear, fill 0). Returns ``{layer: tensor}`` in
    the images' dtype. One forward per amount reaches every layer at once.
    """
    caller = "invariance"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller}: model must be a torch.nn.Module, got {type(model).__name__}")
    check_images(images, caller)
    layers = layer_list(model, layers, caller)
    transform = _check_transform(transform, caller)
    amounts = _check_amounts(amounts, transform, caller)
    with torch.no_grad():
        originals = {layer: output.flatten(1) for layer, output in layer_outputs(model, images, layers, caller).items()}
        columns = {layer: [] for layer in layers}
        for amount in track(amounts, desc=f"invariance {transform}", unit="amount", enabled=progress):
            moved = layer_outputs(model, transform_images(images, transform, amount), layers, caller)
            for layer in layers:
                difference = (moved[layer].flatten(1) - originals[layer]).to(torch.float64)
                columns[layer].append(difference.norm(dim=1))
    return {layer: torch.stack(columns[layer], dim=1).to(images.dtype) for layer in layers}


def class_probabilities(model: nn.Module, images: torch.Tensor, labels, transform: str, amounts: Sequence[float],
                        *, layer: str = "") -> torch.Tensor:
    """``[N, len(amounts)]``: each image's softmax probability of its class ``labels[n]`` in ``layer``'s
    flat output (default the model's output) under each amount of ``transform`` (Fig. 5's last column)."""
    caller = "class_probabilities"
    check_images(images, caller)
    transform = _check_transform(transform, caller)
    amounts = _check_amounts(amounts, transform, caller)
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"{caller}: labels must hold one class per image ({images.shape[0]}), got {labels.shape[0]}")
    columns = []
    with torch.no_grad():
        for amount in amounts:
            logits = layer_outputs(model, transform_images(images, transform, amount), [layer], caller)[layer]
            if logits.dim() != 2:
                raise ValueError(f"{caller}: layer {layer!r} is not flat ([N, F]) but {list(logits.shape)}; "
                                 "pass a classifier's output layer")
            if int(labels.max()) >= logits.shape[1] or int(labels.min()) < 0:
                raise ValueError(f"{caller}: labels must be classes 0..{logits.shape[1] - 1}")
            probabilities = torch.softmax(logits.to(torch.float32), dim=1)
            columns.append(probabilities.gather(1, labels.to(logits.device)[:, None])[:, 0])
    return torch.stack(columns, dim=1)
