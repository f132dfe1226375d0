"""The pure-PyTorch twin of every deconvcuda op: the oracle the native kernels are tested against, and
the ops of ``backend="reference"``. Only torch ops, no extension; the same signatures and semantics as
``deconvcuda.ops``, and deliberately simple. ``deconvcuda.reference`` is their public face, with
``project``."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from . import rules
from .geometry import deconv_min_output_size, pair

IntPair = Union[int, Sequence[int]]

__all__ = ["max_pool2d_switches", "unpool_relu", "deconv2d", "unpool_relu_deconv2d"]


def _pair(value) -> Tuple[int, int]:
    """A size argument as (height, width); a full [N, C, H, W] size gives its last two."""
    return pair(tuple(value)[2:] if not isinstance(value, int) and len(value) == 4 else value)


def _window_starts(pooled: int, stride: int, padding: int, device) -> torch.Tensor:
    return torch.arange(pooled, device=device) * stride - padding


def max_pool2d_switches(input: torch.Tensor, kernel_size: IntPair, stride: Optional[IntPair] = None,
                        padding: IntPair = 0, dilation: IntPair = 1,
                        ceil_mode: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """PyTorch's max_pool2d_with_indices, its plane-flat indices turned into window-local switches."""
    kernel = _pair(kernel_size)
    stride = kernel if stride is None else _pair(stride)
    padding, dilation = _pair(padding), _pair(dilation)
    if input.dim() == 4 and input.shape[1] == 0:
        # PyTorch refuses zero channels but allows an empty batch: pool the [N * C, 1, H, W] planes
        out, flat = F.max_pool2d_with_indices(input.reshape(0, 1, *input.shape[2:]), kernel, stride, padding,
                                              dilation, ceil_mode)
        out, flat = (t.reshape(*input.shape[:2], *t.shape[2:]) for t in (out, flat))
    else:
        out, flat = F.max_pool2d_with_indices(input, kernel, stride, padding, dilation, ceil_mode)
    width = input.shape[3]
    iy, ix = flat // width, flat % width
    y0 = _window_starts(out.shape[2], stride[0], padding[0], input.device).view(1, 1, -1, 1)
    x0 = _window_starts(out.shape[3], stride[1], padding[1], input.device).view(1, 1, 1, -1)
    ky = (iy - y0) // dilation[0]
    kx = (ix - x0) // dilation[1]
    return out, (ky * kernel[1] + kx).to(torch.uint8)


def _switch_targets(switches: torch.Tensor, input_size, kernel, stride, padding, dilation):
    """Plane-flat input index each switch points at, and whether it points inside the input."""
    ky = switches.long() // kernel[1]
    kx = switches.long() % kernel[1]
    y0 = _window_starts(switches.shape[2], stride[0], padding[0], switches.device).view(1, 1, -1, 1)
    x0 = _window_starts(switches.shape[3], stride[1], padding[1], switches.device).view(1, 1, 1, -1)
    iy = y0 + ky * dilation[0]
    ix = x0 + kx * dilation[1]
    valid = (switches.long() < kernel[0] * kernel[1]) & (iy >= 0) & (iy < input_size[0]) & (ix >= 0) & (
        ix < input_size[1])
    return (iy * input_size[1] + ix).clamp(0, input_size[0] * input_size[1] - 1), valid


def unpool_relu(grad: torch.Tensor, switches: torch.Tensor, input_size, kernel_size: IntPair,
                stride: Optional[IntPair] = None, padding: IntPair = 0, dilation: IntPair = 1,
                rule: str = "deconvnet", positive: Optional[torch.Tensor] = None) -> torch.Tensor:
    """relu(sum of each pooled value scattered to its switch), under ``rule``: "guided" and
    "gradient" drop the values where ``positive`` is False (where it is given), "gradient" skips
    the relu."""
    policy = rules.kernel_rule(rule, "unpool_relu")
    kernel = _pair(kernel_size)
    stride = kernel if stride is None else _pair(stride)
    padding, dilation, input_size = _pair(padding), _pair(dilation), _pair(input_size)
    target, valid = _switch_targets(switches, input_size, kernel, stride, padding, dilation)
    if policy.masked and positive is not None:
        valid = valid & positive
    n, c, pooled = grad.shape[0], grad.shape[1], grad.shape[2] * grad.shape[3]
    values = torch.where(valid, grad, torch.zeros((), dtype=grad.dtype, device=grad.device))
    # accumulate in float64 so that the oracle's only rounding is the final cast
    plane = torch.zeros(n, c, input_size[0] * input_size[1], dtype=torch.float64, device=grad.device)
    plane.scatter_add_(2, target.reshape(n, c, pooled), values.reshape(n, c, pooled).double())
    if policy.rectifies:
        plane = torch.relu(plane)
    return plane.view(n, c, *input_size).to(grad.dtype)


def deconv2d(input: torch.Tensor, weight: torch.Tensor, stride: IntPair = 1, padding: IntPair = 0,
             dilation: IntPair = 1, groups: int = 1, output_size=None) -> torch.Tensor:
    """conv_transpose2d with the forward conv's weight; output_size picks the output padding."""
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    smallest = [deconv_min_output_size(input.shape[2 + i], weight.shape[2 + i], stride[i], padding[i], dilation[i])
                for i in range(2)]
    output_size = smallest if output_size is None else _pair(output_size)
    output_padding = tuple(output_size[i] - smallest[i] for i in range(2))
    if input.shape[1] == 0 or weight.shape[1] == 0:
        # a sum over no channels, or no output channels: PyTorch's convolutions refuse both
        return input.new_zeros(input.shape[0], weight.shape[1] * groups, *output_size)
    return F.conv_transpose2d(input, weight, None, stride, padding, output_padding, groups, dilation)


def unpool_relu_deconv2d(grad: torch.Tensor, switches: torch.Tensor, weight: torch.Tensor, input_size,
                         kernel_size: IntPair, stride: Optional[IntPair] = None, padding: IntPair = 0,
                         dilation: IntPair = 1, conv_stride: IntPair = 1, conv_padding: IntPair = 0,
                         conv_dilation: IntPair = 1, groups: int = 1, output_size=None, rule: str = "deconvnet",
                         positive: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The composition the fused kernel computes in one pass."""
    rules.kernel_rule(rule, "unpool_relu_deconv2d")
    unpooled = unpool_relu(grad, switches, input_size, kernel_size, stride, padding, dilation, rule, positive)
    return deconv2d(unpooled, weight, conv_stride, conv_padding, conv_dilation, groups, output_size)
