"""Output sizes along one axis: the Python twin of csrc/common/geometry.h, shared by the fake
kernels (ops.py), the reference (reference.py) and the layer kinds (kinds/). Keep the two in step."""
from __future__ import annotations

__all__ = ["pool_output_size", "conv_output_size", "deconv_min_output_size"]


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
