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
from typing import List, Sequence, Union

import torch
from torch import nn

from ..checks import OutOfRangeError

__all__ = ["evolution", "read_checkpoint", "load_checkpoint"]


def read_checkpoint(checkpoint, where: str, caller: str = "evolution") -> Mapping:
    """A state_dict: ``checkpoint`` itself, or read from a path (``torch.save(model.state_dict(), path)``,
    also inside a ``{"state_dict": ...}`` training checkpoint). ``where`` names it in errors."""
    if isinstance(checkpoint, (str, os.PathLike)):
        path = os.fspath(checkpoint)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{caller}: {where}: checkpoint file {path!r} does not exist or is not a file")
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # pickle, zip and weights_only errors come in many types
            raise ValueError(f"{caller}: {where}: cannot read {path!r} as a PyTorch state_dict (torch.load with "
                             f"weights_only=True failed: {error}); save checkpoints with "
                             "torch.save(model.state_dict(), path)") from None
        if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("state_dict"), Mapping):
            checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, Mapping) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise TypeError(f"{caller}: {where}: expected a state_dict (a mapping from parameter names to tensors) or "
                        f"a path to one, got {type(checkpoint).__name__}")
    if checkpoint and all(key.startswith("module.") for key in checkpoint):  # saved from DataParallel / DDP
        checkpoint = {key[len("module."):]: value for key, value in checkpoint.items()}
    return checkpoint


def load_checkpoint(model: nn.Module, state: Mapping, where: str, caller: str = "evolution") -> None:
    """``model.load_state_dict(state)``, with an error that names every missing, unexpected or
    mis-shaped key where the state does not fit."""
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    mis_shaped = [f"{key} {list(state[key].shape)} (model {list(value.shape)})" for key, value in expected.items()
                  if key in state and state[key].shape != value.shape]

    def listed(keys: List[str]) -> str:
        return ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")

    problems = [f"{label}: {listed(keys)}" for label, keys in (
        ("missing keys", missing), ("unexpected keys", unexpected), ("shapes that differ", mis_shaped)) if keys]
    if problems:
        raise ValueError(f"{caller}: {where} does not fit the model ({type(model).__name__}): " + "; ".join(problems)
                         + ". Pass checkpoints saved from this model with torch.save(model.state_dict(), path)")
    model.load_state_dict(state, strict=True)


def _check_channels(channels, caller: str) -> List[int]:
    from .outputs import as_list

    channels = as_list(channels, int, "channels (an int or a list of ints)", caller)
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
    from tqdm.auto import tqdm

    from .. import batches, project, top_activations
    from ..scan import model_device
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
    # every checkpoint is read and checked before any work, so a bad one fails fast
    states = []
    for number, checkpoint in enumerate(checkpoints):
        where = (f"checkpoint {number} ({os.fspath(checkpoint)!r})" if isinstance(checkpoint, (str, os.PathLike))
                 else f"checkpoint {number}")
        states.append((where, read_checkpoint(checkpoint, where, caller)))

    copied = copy.deepcopy(model)
    results = []
    for where, state in tqdm(states, desc=f"evolution {layer}", unit="checkpoint", disable=not progress):
        load_checkpoint(copied, state, where, caller)
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
