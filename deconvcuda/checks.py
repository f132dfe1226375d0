"""Argument checks shared by every public function, and the exception types they raise.

Each error names the function (``caller``), the argument, what was expected and what was given.
"""
from __future__ import annotations

import numbers

import torch

__all__ = ["OutOfRangeError", "DtypeError", "ArgumentError", "is_int", "check_images"]


class OutOfRangeError(IndexError, ValueError):
    """A channel, position or neurons row outside the layer's output or the images. An IndexError
    (an index is out of range) that is also a ValueError (an argument has a bad value)."""


class DtypeError(TypeError, ValueError):
    """A tensor argument with the wrong dtype: a TypeError (of its elements) and a ValueError (the
    argument is a tensor, as expected, whose dtype is not)."""


class ArgumentError(TypeError, ValueError):
    """An argument that is not the kind of object expected (a list where a tensor belongs): a
    TypeError, and a ValueError for callers that check arguments' values as one."""


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
