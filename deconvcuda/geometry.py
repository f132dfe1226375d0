"""Geometry along one or two axes, once for the whole package: pairs of sizes, output sizes (the
Python twin of csrc/common/geometry.h: keep the two in step), shared by the fake kernels (ops.py),
the reference (reference.py), the layer kinds (kinds/) and the analyses."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from .checks import ArgumentError

__all__ = ["pair", "checked_pair", "pool_output_size", "conv_output_size", "deconv_min_output_size"]

Pair = Tuple[int, int]


def pair(value) -> Pair:
    """A size as the layers store it, as (height, width): an int, or a sequence of one or two ints
    (``(3,)`` means 3 on both axes, as F.max_pool2d reads it)."""
    if isinstance(value, int):
        return (value, value)
    value = tuple(value)
    return (value[0], value[0]) if len(value) == 1 else (value[0], value[1])


def checked_pair(value, caller: str, name: str, *, minimum: Optional[int] = None) -> Pair:
    """A size a user passes, as (height, width): an int or a pair of ints (a torch.Size too), each at
    least ``minimum`` where given. Anything else is an ArgumentError (a TypeError and a ValueError)
    that names ``caller`` and ``name``."""
    if isinstance(value, torch.Size):
        value = tuple(value)
    items = (value, value) if isinstance(value, int) and not isinstance(value, bool) else value
    try:
        items = tuple(items)
    except TypeError:
        items = ()
    well_formed = len(items) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in items)
    if not well_formed or (minimum is not None and min(items) < minimum):
        if minimum is None:
            expected = "an int or a pair of ints"
        elif minimum == 1:
            expected = "a positive int or a pair of them (height, width)"
        else:
            expected = f"an int of at least {minimum} or a pair of them (height, width)"
        raise ArgumentError(f"{caller}: {name} must be {expected}, got {value!r}")
    return items


def pool_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int, ceil_mode: bool) -> int:
    """max_pool2d's output length, exactly as PyTorch's pooling_output_shape: with ceil_mode the last
    window must still start inside the input or its left padding."""
    span = size + 2 * padding - dilation * (kernel - 1) - 1 + (stride - 1 if ceil_mode else 0)
    out = span // stride + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """conv2d's output length."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def deconv_min_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """The smallest input length whose convolution has ``size`` positions: the transposed
    convolution's default output length (output_size may add up to stride - 1)."""
    return (size - 1) * stride - 2 * padding + dilation * (kernel - 1) + 1


def extent(kernel: Sequence[int], dilation: Sequence[int] = (1, 1)) -> Pair:
    """The span in input positions of a (dilated) kernel."""
    return tuple(dilation[i] * (kernel[i] - 1) + 1 for i in range(2))
