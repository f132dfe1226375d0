"""Occlusion sensitivity (Zeiler & Fergus 2014, Sec. 4.2, Fig. 7): slide a square over the image and
record how a feature map (or a class's probability) responds.

    values = deconvcuda.occlusion(model, images, "features.15", window=16, stride=8)   # [N, R, C]

Per image and occluder position the value is the total (``reduce="sum"``) or the largest
(``reduce="max"``) activation of one channel of the layer on the occluded image; for a flat layer
the unit's activation, or with ``softmax=True`` its softmax probability.

Fast by difference: an occluder changes only its cone of influence in each layer. The unoccluded
forward runs once; for each occluder position only that cone is recomputed on top of the
unoccluded activations (see :mod:`deconvcuda.analyses.cone`), batched over positions.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
from torch import nn

from ..checks import check_channel_per_image, check_images
from ..geometry import checked_pair
from .cone import occluded_images
from .outputs import layer_list

__all__ = ["occlusion", "most_probable_class", "occluder_grid", "occluded_images", "METHODS"]

Pair = Tuple[int, int]

#: Occluder positions per batch: bounds memory (each position carries its cone of every layer).
POSITIONS_PER_BATCH = 256


def occluder_grid(image_size: Sequence[int], window, stride, caller: str = "occluder_grid") -> Tuple[Pair, Pair, Pair]:
    """(window, stride, (rows, columns)) of the occluder positions that lie wholly inside an image of
    ``image_size`` (height, width): corners at (i * stride_h, j * stride_w)."""
    window, stride = checked_pair(window, caller, "window", minimum=1), checked_pair(stride, caller, "stride", minimum=1)
    height, width = int(image_size[0]), int(image_size[1])
    if window[0] > height or window[1] > width:
        raise ValueError(f"{caller}: the occluder window {window[0]}x{window[1]} is larger than the images "
                         f"({height}x{width}); pass a window of at most the image size")
    grid = ((height - window[0]) // stride[0] + 1, (width - window[1]) // stride[1] + 1)
    return window, stride, grid


def _check_fill(fill, images: torch.Tensor, caller: str) -> torch.Tensor:
    """``fill`` as a [C, 1, 1] tensor in the images' dtype and device."""
    channels = images.shape[1]
    if isinstance(fill, bool):
        raise TypeError(f"{caller}: fill must be a float or a tensor [C] of per-channel values, got a bool")
    if isinstance(fill, (int, float)):
        return torch.full((channels, 1, 1), float(fill), dtype=images.dtype, device=images.device)
    if isinstance(fill, (list, tuple)) and all(isinstance(v, (int, float)) for v in fill):
        fill = torch.tensor(fill, dtype=torch.float64)
    if isinstance(fill, torch.Tensor):
        if fill.dim() == 0:
            return fill.to(images.dtype).to(images.device).expand(channels).reshape(channels, 1, 1).clone()
        if fill.dim() == 1 and fill.shape[0] == channels:
            return fill.to(dtype=images.dtype, device=images.device).reshape(channels, 1, 1)
        raise ValueError(f"{caller}: fill must be a float or a tensor [C] with one value per input channel "
                         f"(C = {channels}), got a tensor of shape {list(fill.shape)}")
    raise TypeError(f"{caller}: fill must be a float or a tensor [C] of per-channel values, got {type(fill).__name__}")


def _values(output: torch.Tensor, channel: torch.Tensor, reduce: str, softmax: bool) -> torch.Tensor:
    """Per row of ``output`` (the layer's output, [B, C, h, w] or [B, F]) the value of its row of
    ``channel`` [B] (on the output's device)."""
    if output.dim() == 2:
        if softmax:
            output = torch.softmax(output.to(torch.float32) if output.dtype in (torch.float16, torch.bfloat16)
                                   else output, dim=1).to(output.dtype)
        return output.gather(1, channel[:, None])[:, 0]
    maps = output[torch.arange(output.shape[0], device=output.device), channel].flatten(1)
    return maps.sum(dim=1) if reduce == "sum" else maps.amax(dim=1)


def strongest_channel(output: torch.Tensor, reduce: str) -> torch.Tensor:
    """Per image, the channel (unit) with the largest ``reduce`` of its map (its activation)."""
    if output.dim() == 2:
        return output.argmax(dim=1)
    per_channel = output.flatten(2).sum(dim=2) if reduce == "sum" else output.flatten(2).amax(dim=2)
    return per_channel.argmax(dim=1)


def _check_arguments(model, images, layer, reduce, softmax, caller):
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller}: model must be a torch.nn.Module, got {type(model).__name__}")
    check_images(images, caller, allow_empty=False)
    if not isinstance(layer, str):
        raise TypeError(f"{caller}: layer must be one layer name (a str), got {type(layer).__name__}")
    layer_list(model, layer, caller)
    if reduce not in ("sum", "max"):
        raise ValueError(f"{caller}: reduce must be 'sum' (the paper's total activation) or 'max', got {reduce!r}")
    if not isinstance(softmax, bool):
        raise TypeError(f"{caller}: softmax must be True or False, got {softmax!r}")


def _prepare(model, images, layer, window, stride, fill, reduce, softmax, caller):
    """Checks every argument but the channel (that needs the layer's output); returns the occluder's
    window, stride, grid and the fill [C, 1, 1]."""
    _check_arguments(model, images, layer, reduce, softmax, caller)
    window, stride, grid = occluder_grid(images.shape[-2:], window, stride, caller)
    fill = _check_fill(fill, images, caller)
    return window, stride, grid, fill


def _resolve_channel(output: torch.Tensor, channel, reduce: str, softmax: bool, caller: str) -> torch.Tensor:
    if softmax and output.dim() != 2:
        raise ValueError(f"{caller}: softmax=True needs a flat layer (output [N, F], e.g. the classifier's "
                         f"output \"\"), but the layer's output is {list(output.shape)}; pass softmax=False")
    if output.dim() not in (2, 4):
        raise ValueError(f"{caller}: the layer's output must be [N, C, h, w] or [N, F], got {list(output.shape)}")
    checked = check_channel_per_image(channel, output.shape[0], output.shape[1], output.dim() == 2, caller)
    if checked is None:
        return strongest_channel(output, reduce)
    return checked.to(output.device)


def _corners(grid: Pair, stride: Pair, device) -> torch.Tensor:
    """[R * C, 2] (top, left) of every occluder position, row-major."""
    rows = torch.arange(grid[0], device=device) * stride[0]
    cols = torch.arange(grid[1], device=device) * stride[1]
    return torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).reshape(-1, 2)


def occlusion(model: nn.Module, images: torch.Tensor, layer: str, channel=None, *, window=16, stride=8,
              fill=0.0, reduce: str = "sum", softmax: bool = False,
              batch_size: int = POSITIONS_PER_BATCH, progress: bool = False,
              method: str = "difference") -> torch.Tensor:
    """How ``channel`` of ``layer`` responds to a ``window`` square of ``fill`` slid over each image.

    images: ``[N, C, H, W]`` model input. The occluder's top-left corner is at ``(i * stride_h,
    j * stride_w)`` for every position wholly inside the image: ``R = (H - window_h) // stride_h + 1``
    rows, likewise columns. window, stride: an int or a pair (height, width). fill: a float, or a
    tensor ``[C]`` with one value per input channel (e.g. the data mean). channel: an int, a LongTensor
    ``[N]`` (one per image) or None (per image, the channel with the largest ``reduce`` on the
    unoccluded image: the paper's "strongest feature map"). reduce: "sum" (the total activation) or
    "max". For a flat layer ``[N, F]`` the value is the unit's activation, with ``softmax=True`` its
    softmax probability. batch_size: occluder positions computed together. progress: a tqdm bar.
    method: "difference" (the default: each position recomputes only its cone of influence in each
    layer, on top of the unoccluded activations) or "recompute" (each occluded image through the
    whole forward: the plain way, and the baseline of bench/bench_occlusion.py); the same values.

    Returns ``[N, R, C_cols]`` in the images' dtype, on their device.
    """
    caller = "occlusion"
    window, stride, grid, fill = _prepare(model, images, layer, window, stride, fill, reduce, softmax, caller)
    _check_batch_size(batch_size, caller)
    _check_method(method, caller)
    from .cone import OcclusionCones

    cones = OcclusionCones(model, layer, images.shape[1:], caller)
    channels = _resolve_channel(cones.unoccluded_output(images), channel, reduce, softmax, caller)
    corners = _corners(grid, stride, images.device)
    values = cones.values(images, corners, window, fill, channels, lambda out, ch: _values(out, ch, reduce, softmax),
                          batch_size=batch_size, progress=progress, method=method)
    return values.reshape(images.shape[0], grid[0], grid[1]).to(images.dtype)


def most_probable_class(model: nn.Module, images: torch.Tensor, layer: str = "", *, window=16, stride=8, fill=0.0,
                        batch_size: int = POSITIONS_PER_BATCH, progress: bool = False,
                        method: str = "difference") -> torch.Tensor:
    """Per image and occluder position (as :func:`occlusion` places them), the unit with the largest
    value in the flat ``layer`` (default the model's output: the most probable class, Fig. 7's last
    column). method: as for :func:`occlusion`. Returns a LongTensor ``[N, R, C_cols]``."""
    caller = "most_probable_class"
    window, stride, grid, fill = _prepare(model, images, layer, window, stride, fill, "sum", False, caller)
    _check_batch_size(batch_size, caller)
    _check_method(method, caller)
    from .cone import OcclusionCones

    cones = OcclusionCones(model, layer, images.shape[1:], caller)
    shape = cones.layer_shape
    if len(shape) != 1:
        raise ValueError(f"{caller}: layer {layer!r} is not flat ([N, F]) but [N, {', '.join(map(str, shape))}]; "
                         "pass a classifier's output")
    unused = torch.zeros(images.shape[0], dtype=torch.long, device=images.device)
    classes = cones.values(images, _corners(grid, stride, images.device), window, fill, unused,
                           lambda output, _: output.argmax(dim=1), batch_size=batch_size, progress=progress,
                           method=method)
    return classes.reshape(images.shape[0], grid[0], grid[1])


METHODS = ("difference", "recompute")


def _check_method(method, caller: str) -> None:
    if method not in METHODS:
        raise ValueError(f"{caller}: method must be one of {', '.join(repr(m) for m in METHODS)}, got {method!r}")


def _check_batch_size(batch_size, caller: str) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"{caller}: batch_size must be a positive int (occluder positions per batch), "
                         f"got {batch_size!r}")
