"""Feature evolution during training (Zeiler & Fergus 2014, Sec. 4.1, Fig. 4): for each checkpoint,
each chosen feature map's strongest activation over a dataset, projected to pixel space.

    projections = deconvcuda.evolution(model, ["epoch1.pt", "epoch2.pt"], images, "features.3", [0, 5, 9])
    projections.shape          # [T, len(channels), C_in, H, W]: checkpoints x channels

The user's model is never changed: each checkpoint is loaded into a deep copy of it.
"""
from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from typing import List, Sequence, Tuple, Union

import torch
from torch import nn

from ..checks import OutOfRangeError, as_list
from ..progress import track
from ..weights import check_fits, read_state_dict

__all__ = ["evolution", "read_checkpoints"]

#: What to do with a checkpoint that does not fit the model.
CHECKPOINT_ADVICE = "Pass checkpoints saved from this model with torch.save(model.state_dict(), path)"


def checkpoint_name(number: int, checkpoint) -> str:
    """How errors name checkpoint ``number``: "checkpoint 2 ('epoch2.pt')", or "checkpoint 2" for a state_dict."""
    if isinstance(checkpoint, (str, os.PathLike)):
        return f"checkpoint {number} ({os.fspath(checkpoint)!r})"
    return f"checkpoint {number}"


def read_checkpoints(model: nn.Module, checkpoints, caller: str = "evolution") -> List[Tuple[str, Mapping]]:
    """Every checkpoint (a state_dict or a path to one) read with :func:`deconvcuda.weights.read_state_dict`
    and checked to fit ``model``, before any work: ``[(its name for errors, its state_dict)]``."""
    states = []
    for number, checkpoint in enumerate(checkpoints):
        where = checkpoint_name(number, checkpoint)
        state = read_state_dict(checkpoint, caller, where)
        check_fits(model, state, caller, where, advice=CHECKPOINT_ADVICE)
        states.append((where, state))
    return states


def _check_channels(channels, caller: str) -> List[int]:

    channels = as_list(channels, int, "channels", "an int or a list of ints", caller)
    for channel in channels:
        if isinstance(channel, bool) or not isinstance(channel, int) or channel < 0:
            raise ValueError(f"{caller}: channels must be non-negative ints, got {channel!r}")
    return channels


def evolution(model: nn.Module, checkpoints: Sequence[Union[Mapping, str, os.PathLike]], data, layer: str,
              channels: Union[int, Sequence[int]], *, batch_size: int = 64, device=None,
              progress: bool = False) -> torch.Tensor:
    """Per checkpoint and channel, the strongest activation of ``channel`` in ``layer`` over ``data``
    (top-1, as :func:`deconvcuda.top_activations` ranks them) projected to pixels by
    :func:`deconvcuda.project`, with the checkpoint's weights.

    checkpoints: state_dicts or paths to them (``torch.save(model.state_dict(), path)``), in training
    order. data: what ``top_activations`` streams (a tensor ``[N, C, H, W]``, a list, a Dataset, a
    DataLoader). channels: an int or a list. A channel with no activation in the data (all NaN) gets
    an all-zero projection. The model itself is never changed: each checkpoint goes into a copy.

    Returns ``[T, len(channels), C_in, H, W]`` (checkpoints, channels), in the data's dtype.
    """
    from .. import batches
    from ..engine import project
    from ..scan import model_device, top_activations
    from .outputs import layer_list

    caller = "evolution"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller}: model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(layer, str):
        raise TypeError(f"{caller}: layer must be one layer name (a str), got {type(layer).__name__}")
    layer_list(model, layer, caller)
    channels = _check_channels(channels, caller)
    if isinstance(checkpoints, (str, os.PathLike, Mapping)):
        raise TypeError(f"{caller}: checkpoints must be a list of state_dicts or paths, got a single "
                        f"{type(checkpoints).__name__}; wrap it in a list")
    checkpoints = list(checkpoints)
    if not checkpoints:
        raise ValueError(f"{caller}: checkpoints is empty; pass at least one state_dict or path")
    states = read_checkpoints(model, checkpoints, caller)  # every one read and checked: a bad one fails fast

    copied = copy.deepcopy(model)
    results = []
    for _, state in track(states, desc=f"evolution {layer}", unit="checkpoint", enabled=progress):
        copied.load_state_dict(state, strict=True)
        top = top_activations(copied, data, layer, k=1, batch_size=batch_size, device=device, progress=False)
        n_channels = top.values.shape[0]
        bad = [channel for channel in channels if channel >= n_channels]
        if bad:

            raise OutOfRangeError(f"{caller}: channel {bad[0]} is out of range; layer {layer!r} has {n_channels} "
                             f"channels (0..{n_channels - 1})")
        chosen = torch.tensor(channels, dtype=torch.long, device=top.image_index.device)
        image_index = top.image_index[chosen, 0].cpu()
        found = [i for i in range(len(channels)) if int(image_index[i]) >= 0]
        if not found:
            raise ValueError(f"{caller}: none of the channels has an activation in the data ({layer!r})")
        wanted = sorted({int(image_index[i]) for i in found})
        # projected where the scan ran: ``device``, else the model's device
        images = batches.gather_images(data, wanted, batch_size).to(device if device is not None
                                                                    else model_device(copied))
        slot = {index: row for row, index in enumerate(wanted)}
        neurons = torch.tensor([[slot[int(image_index[i])], channels[i], int(top.y[channels[i], 0]),
                                 int(top.x[channels[i], 0])] for i in found], dtype=torch.long, device=images.device)
        projected = project(copied, images, layer, neurons=neurons)
        cell = projected.new_zeros((len(channels),) + tuple(projected.shape[1:]))
        cell[torch.tensor(found, device=cell.device)] = projected
        results.append(cell)
    return torch.stack(results)
