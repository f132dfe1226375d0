"""Streaming top-k: the k strongest activations of every feature map of a layer over a dataset.

    top = top_activations(model, loader, "features.29", k=9)
    top.values[c], top.image_index[c], top.y[c], top.x[c]   # channel c's k strongest, strongest first
    r = project(model, images, "features.29", neurons=top.neurons(images_of_the_rows))

Each image contributes at most one activation per channel: its spatial maximum (the first maximum
in row-major order), as in the paper's figures, whose nine patches per map come from nine images.
The data streams through the layers of the plan batch by batch on the model's device; per batch the
per-channel maxima are merged with the running top-k by one stable sort on the device, so memory is
bounded by one batch and nothing waits for the host until the end. Ties keep the earlier image.
The model itself is never called or changed: the forward runs the plan's functional ops in eval
semantics (BatchNorm's running statistics, no Dropout).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from . import batches
from . import plan as plans
from .engine import run_forward

__all__ = ["TopActivations", "top_activations", "model_device"]


@dataclass
class TopActivations:
    """Per channel of ``layer``, its k strongest activations over the data, strongest first.

    ``values`` [C, k] (the activations, in the data's dtype); ``image_index`` [C, k] (the image's
    position in the data, counting from 0 in the order the data yields images); ``y``, ``x`` [C, k]
    (the position in the layer's output map; 0 for a flat layer). Where the data holds fewer than k
    images, the missing entries have ``image_index == -1``, ``y == x == -1`` and value ``-inf``.
    NaN activations are never ranked.
    """

    layer: str
    values: torch.Tensor
    image_index: torch.Tensor
    y: torch.Tensor
    x: torch.Tensor

    @property
    def k(self) -> int:
        return self.values.shape[1]

    def neurons(self, channel: Optional[int] = None) -> torch.Tensor:
        """The entries as ``project`` neurons rows ``[P, 4]`` of (image_index, channel, y, x): all
        channels' (channel-major, strongest first) or one channel's; missing entries left out. The
        image column indexes the data, so pass the data (or the images it names) to ``project``."""
        channels = torch.arange(self.values.shape[0], device=self.values.device)[:, None].expand_as(self.image_index)
        rows = torch.stack([self.image_index, channels, self.y, self.x], dim=-1)  # [C, k, 4]
        if channel is not None:
            rows = rows[channel:channel + 1]
        rows = rows.reshape(-1, 4)
        return rows[rows[:, 0] >= 0]


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); the CPU for a model with neither."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def top_activations(model: nn.Module, data, layer, k: int = 9, *, batch_size: int = 64, device=None,
                    progress: bool = True) -> TopActivations:
    """The ``k`` strongest activations of every feature map of ``layer`` over ``data``.

    data: a tensor ``[N, C, H, W]`` of model input, a list of tensors (batches or single images), or
    an iterable of batches such as a DataLoader (batches of images, or (images, labels) pairs).
    batch_size: images per forward pass where ``data`` is a tensor or yields single images.
    device: where the forward runs (default: the model's device); batches are moved there.
    progress: a tqdm bar on stderr (images done, out of the total where it is known).
    """
    from tqdm.auto import tqdm

    caller = "top_activations"
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"{caller}: k must be a positive int, got {k!r}")
    plan = plans.build_plan(model, layer, caller=caller)
    device = model_device(model) if device is None else torch.device(device)

    values = image_index = ys = xs = None  # the running top-k, [C, <= k] each
    input_shape = None
    bar = tqdm(total=batches.count_images(data), desc=f"top-{k} {plan.layer}", unit="image", disable=not progress)
    with bar, torch.inference_mode(False), torch.no_grad():  # the bar closes on errors too
        for first, images in batches.iter_batches(data, batch_size, caller):
            if not images.is_floating_point():
                raise TypeError(f"{caller}: images must be floating point (the model's input), got {images.dtype}")
            if input_shape is None:
                input_shape = tuple(images.shape[1:])
                plan.shapes(input_shape, caller=caller)  # a clear error where the images do not fit
            elif tuple(images.shape[1:]) != input_shape:
                raise ValueError(f"{caller}: every image must have the shape of the first, "
                                 f"{list(input_shape)}; the batch starting at image {first} has "
                                 f"{list(images.shape[1:])}")
            images = images.to(device, non_blocking=True)
            output = run_forward(plan, images).output
            batch_values, batch_y, batch_x, unranked = _image_maxima(output)
            batch_index = torch.arange(first, first + images.shape[0], device=device).expand_as(batch_values)
            # A map that is NaN everywhere has no activation to rank ("NaN activations are never
            # ranked"): it enters as a missing entry (index -1, y = x = -1, value -inf), not as the
            # NaN at (0, 0) under the value -inf.
            batch_index = batch_index.masked_fill(unranked, -1)
            batch_y, batch_x = batch_y.masked_fill(unranked, -1), batch_x.masked_fill(unranked, -1)
            if values is None:
                values, image_index, ys, xs = batch_values, batch_index, batch_y, batch_x
            else:
                values, image_index, ys, xs = (torch.cat(pair, dim=1) for pair in (
                    (values, batch_values), (image_index, batch_index), (ys, batch_y), (xs, batch_x)))
            # Earlier images come first in the concatenation, so a stable sort keeps them first on ties.
            order = torch.sort(values, dim=1, descending=True, stable=True).indices
            values, image_index, ys, xs = (t.gather(1, order) for t in (values, image_index, ys, xs))
            # Missing entries (value -inf) go after every ranked one, a genuine -inf included: a
            # second stable sort, by "missing", keeps the value order within each group.
            order = torch.sort((image_index < 0).to(torch.uint8), dim=1, stable=True).indices[:, :k]
            values, image_index, ys, xs = (t.gather(1, order) for t in (values, image_index, ys, xs))
            bar.update(images.shape[0])
    if values is None:
        raise ValueError(f"{caller}: data holds no images")
    missing = k - values.shape[1]
    if missing > 0:
        values = torch.cat([values, values.new_full((values.shape[0], missing), float("-inf"))], dim=1)
        image_index, ys, xs = (torch.cat([t, t.new_full((t.shape[0], missing), -1)], dim=1)
                               for t in (image_index, ys, xs))
    return TopActivations(plan.layer, values, image_index, ys, xs)


def _image_maxima(output: torch.Tensor):
    """Per channel and image: the strongest activation and where it is, each [C, B], and a bool
    [C, B] that is True where the map is NaN everywhere (nothing to rank). NaN counts as -inf, so
    it is never ranked; a map's first maximum in row-major order wins."""
    nan = torch.isnan(output)
    output = output.nan_to_num(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    if output.dim() == 2:  # flat [B, F]: the unit itself, at (0, 0)
        values = output.t().contiguous()
        zeros = torch.zeros_like(values, dtype=torch.long)
        return values, zeros, zeros, nan.t().contiguous()
    width = output.shape[3]
    values, flat = output.flatten(2).max(dim=2)  # [B, C]
    unranked = nan.flatten(2).all(dim=2).t().contiguous()
    return (values.t().contiguous(), (flat // width).t().contiguous(), (flat % width).t().contiguous(),
            unranked)
