"""Argument checks shared by every public function, and the exception types they raise.

Each error names the function (``caller``), the argument, what was expected and what was given.
"""
from __future__ import annotations

import numbers

import torch
from torch import nn

__all__ = ["OutOfRangeError", "DtypeError", "ArgumentError", "is_int", "check_model", "check_images", "check_input_shape",
           "resolve_layer", "check_channel_per_image", "as_list"]


class OutOfRangeError(IndexError, ValueError):
    """A channel, position or neurons row outside the layer's output or the images. An IndexError
    (an index is out of range) that is also a ValueError (an argument has a bad value)."""


class DtypeError(TypeError, ValueError):
    """A tensor argument with the wrong dtype: a TypeError (of its elements) and a ValueError (the
    argument is a tensor, as expected, whose dtype is not)."""


class ArgumentError(TypeError, ValueError):
    """An argument that is not the kind of object expected (a list where a tensor belongs): a
    TypeError, and a ValueError for callers that check arguments' values as one."""


def check_model(model, caller: str) -> None:
    """An ArgumentError where ``model`` is not a torch.nn.Module."""
    if not isinstance(model, nn.Module):
        raise ArgumentError(f"{caller}: model must be a torch.nn.Module, got {type(model).__name__}")


def is_int(value) -> bool:
    """An int (or a 0-d integer tensor), not a bool."""
    if isinstance(value, torch.Tensor):
        return value.dim() == 0 and not value.is_floating_point() and value.dtype != torch.bool
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_images(images, caller: str, *, allow_empty: bool = True) -> torch.Tensor:
    """``images`` must be a floating-point tensor [N, C, H, W] of the model's input (N > 0 unless
    ``allow_empty``); returns it."""
    if not isinstance(images, torch.Tensor):
        raise ArgumentError(f"{caller}: images must be a tensor [N, C, H, W] of model input (a torch.Tensor), got "
                            f"{type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(f"{caller}: images must be a tensor [N, C, H, W] of model input (4-D), got "
                         f"{images.dim()}-D with shape {list(images.shape)}")
    if not images.is_floating_point():
        raise DtypeError(f"{caller}: images must be floating point (a floating-point tensor of model input), got "
                         f"{images.dtype}")
    if not allow_empty and images.shape[0] == 0:
        raise ValueError(f"{caller}: images holds no image; pass at least one")
    return images


def check_input_shape(input_shape, caller: str):
    """One image's shape, ``(C, H, W)`` (or any per-image shape the model takes) as a tuple of
    positive ints."""
    if isinstance(input_shape, torch.Size):
        input_shape = tuple(input_shape)
    if not isinstance(input_shape, (tuple, list)) or not input_shape or not all(is_int(s) and int(s) > 0
                                                                                 for s in input_shape):
        raise ArgumentError(f"{caller}: input_shape must be one image's shape, positive ints such as (3, 224, 224), "
                            f"got {input_shape!r}")
    return tuple(int(s) for s in input_shape)


def resolve_layer(model: nn.Module, layer, caller: str) -> str:
    """``layer`` as a name from ``model.named_modules()``; a module of the model is accepted too."""
    if isinstance(layer, nn.Module):
        for name, module in model.named_modules():
            if module is layer:
                return name
        raise ValueError(f"{caller}: layer is a {type(layer).__name__} that is not a submodule of the model")
    if not isinstance(layer, str):
        raise TypeError(f"{caller}: layer must be a module name from model.named_modules(), got "
                        f"{type(layer).__name__}")
    names = [name for name, _ in model.named_modules()]
    if layer not in names:
        valid = ", ".join(repr(name) for name in names if name)
        raise ValueError(f"{caller}: unknown layer {layer!r}; valid layer names (model.named_modules()): {valid}")
    return layer


def check_channel_per_image(channel, n_images: int, n_channels: int, flat: bool, caller: str):
    """``channel``: an int, a LongTensor ``[N]`` or a list (one per image), or None; as a LongTensor
    [N] on the CPU (None for None), each in range (the unit of a flat layer)."""
    what = "unit" if flat else "channel"
    if channel is None:
        return None
    if isinstance(channel, (list, tuple)) and all(isinstance(c, int) and not isinstance(c, bool) for c in channel):
        channel = torch.tensor(channel, dtype=torch.long)  # one per image, like a LongTensor [N]
    if isinstance(channel, torch.Tensor):
        if channel.dtype in (torch.bool,) or channel.is_floating_point() or channel.is_complex():
            raise TypeError(f"{caller}: channel must be an int or a LongTensor [N], got a {channel.dtype} tensor")
        if channel.dim() == 0:
            channel = channel.reshape(1).expand(n_images)
        if channel.dim() != 1 or channel.shape[0] != n_images:
            raise ValueError(f"{caller}: channel as a tensor or list must hold one {what} per image, shape [{n_images}], "
                             f"got {list(channel.shape)}")
        channel = channel.detach().to("cpu", torch.long)
    elif isinstance(channel, int) and not isinstance(channel, bool):
        channel = torch.full((n_images,), channel, dtype=torch.long)
    else:
        raise TypeError(f"{caller}: channel must be an int, a LongTensor [N] or None, got {type(channel).__name__}")
    bad = channel[(channel < 0) | (channel >= n_channels)]
    if bad.numel():
        raise OutOfRangeError(f"{caller}: {what} {int(bad[0])} is out of range; the layer has {n_channels} "
                         f"{what}s (0..{n_channels - 1})")
    return channel


def as_list(value, single, name: str, expected: str, caller: str, *, allow_empty: bool = False) -> list:
    """``value`` as a list: one ``single`` (a type or a tuple of types) becomes ``[value]``, a tensor
    its items. Anything else that is not iterable is an ArgumentError ("{caller}: {name} must be
    {expected}, got ..."); an empty list a ValueError, unless ``allow_empty``."""
    if isinstance(value, single):
        return [value]
    if isinstance(value, torch.Tensor):
        value = value.flatten().tolist()
    try:
        value = list(value)
    except TypeError:
        raise ArgumentError(f"{caller}: {name} must be {expected}, got {type(value).__name__}") from None
    if not value and not allow_empty:
        raise ValueError(f"{caller}: {name} is empty; pass at least one")
    return value
