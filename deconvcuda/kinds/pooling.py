"""Pools: MaxPool2d (reversed through its switches, fused with the ReLU and conv below it where the
graph allows), AvgPool2d, AdaptiveAvgPool2d and the spatial mean (their gradients)."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..geometry import extent, pair, pool_output_size
from .base import At, Kind, linear_vjp, register

__all__ = ["MaxPool", "AvgPool", "AdaptiveAvgPool", "SpatialMean", "pooled_shape"]


def pooled_shape(shape, kernel_size, stride, padding, dilation, ceil_mode):
    Kind.need_spatial(shape)
    size = tuple(pool_output_size(shape[1 + i], kernel_size[i], stride[i], padding[i], dilation[i], ceil_mode)
                 for i in range(2))
    if min(size) < 1:
        raise ValueError(f"its input of spatial size {list(shape[1:])} is smaller than its window {list(kernel_size)}")
    return (shape[0],) + size


def _stride(kernel, stride):
    return kernel if stride is None or (isinstance(stride, (list, tuple)) and not stride) else pair(stride)


@register
class MaxPool(Kind):
    name = "MaxPool2d"
    modules = (nn.MaxPool2d,)
    functions = (F.max_pool2d, torch.max_pool2d)
    arguments = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
    reversal = "kernel"
    padding_value = float("-inf")

    def __init__(self, kernel_size, stride, padding, dilation, ceil_mode):
        self.kernel_size = pair(kernel_size)
        self.stride = _stride(self.kernel_size, stride)
        self.padding, self.dilation, self.ceil_mode = pair(padding), pair(dilation), bool(ceil_mode)

    @classmethod
    def from_module(cls, module, call):
        if module.return_indices:
            call.unsupported("returns indices (return_indices=True)")
        call.data("input")
        return cls(module.kernel_size, module.stride, module.padding, module.dilation, module.ceil_mode)

    @classmethod
    def from_call(cls, call):
        if call.get("return_indices", False):
            call.unsupported("returns indices (return_indices=True)")
        call.data("input")
        return cls(call.get("kernel_size"), call.get("stride"), call.get("padding", 0), call.get("dilation", 1),
                   call.get("ceil_mode", False))

    def output_shape(self, shape):
        return pooled_shape(shape, self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode)

    def describe_reverse(self, rule):
        return "native kernel (unpooling by the switches)"

    def fused_chain(self, node, targets):
        """The ReLU (and conv) below this pool that one fused kernel call reverses with it: each feeds
        only the next, and neither is a chosen layer, so nothing else needs their gradients."""
        from .activations import ReLU
        from .conv import Conv

        relu = node.inputs[0]
        if type(relu.kind) is not ReLU or relu.data_consumers != [node] or relu in targets:
            return []
        conv = relu.inputs[0]
        if isinstance(conv.kind, Conv) and conv.data_consumers == [relu]:
            return [relu, conv]
        return [relu]

    def forward(self, x):
        return F.max_pool2d(x, self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode)

    def forward_unpadded(self, x, windows=None, rows=None, in_size=None):
        return F.max_pool2d(x, self.kernel_size, self.stride, 0, self.dilation)

    def cone(self, cones, size):
        return None if cones[0] is None else cones[0].through(extent(self.kernel_size, self.dilation), self.stride,
                                                               self.padding, size)

    def forward_keeping(self, inputs, keeper):
        pooled, switches = keeper.kernels.max_pool2d_switches(inputs[0], self.kernel_size, self.stride, self.padding,
                                                              self.dilation, self.ceil_mode)
        # guided and gradient mask a fused ReLU below by whether the pooled value was > 0 (at the switch,
        # the ReLU's output is the pooled value); the deconvnet rule needs only the switches
        positive = keeper.keep(pooled > 0) if keeper.rule.masked else None
        return pooled, (keeper.keep(switches), positive)

    def grow(self, windows):
        return windows.grow(extent(self.kernel_size, self.dilation), self.stride, self.padding)

    def _unpooled(self, at: At) -> Tuple[Tuple[int, int], Tuple[int, int]]:
        """The unpooled map's size and the padding to unpool with (full maps, or the grown windows,
        which start where the padding would)."""
        if at.windows is None:
            return tuple(at.in_shapes[0][1:]), self.padding
        grown = self.grow(at.windows)
        return (grown.height, grown.width), (0, 0)

    def reverse(self, g, at):
        """The plain switch unpooling (the gradient of a max pool); values land on switches only,
        which lie inside the map, so windows need no zeroing."""
        switches, _ = at.saved
        size, padding = self._unpooled(at)
        # rule "gradient" without a mask: each pooled value to its switch, no rectification
        return [at.kernels.unpool_relu(g, at.map_of(switches), size, self.kernel_size, self.stride, padding,
                                       self.dilation, rule="gradient")]

    def reverse_with_relu(self, g, at: At) -> List[torch.Tensor]:
        """The reverse of ReLU -> this pool in one ``unpool_relu`` call, under any rule."""
        switches, positive = at.saved
        size, padding = self._unpooled(at)
        return [at.kernels.unpool_relu(g, at.map_of(switches), size, self.kernel_size, self.stride, padding,
                                       self.dilation, **_rule_arguments(at, positive))]

    def reverse_with_relu_conv(self, g, at: At, conv, conv_in_shape, relu_shape) -> List[torch.Tensor]:
        """The reverse of conv -> ReLU -> this pool in one ``unpool_relu_deconv2d`` call."""
        switches, positive = at.saved
        weight = conv.cast(conv.weight, g)
        if at.windows is None:
            return [at.kernels.unpool_relu_deconv2d(
                g, at.map_of(switches), weight, relu_shape[1:], self.kernel_size, self.stride, self.padding,
                self.dilation, conv.stride, conv.padding, conv.dilation, conv.groups, conv_in_shape[1:],
                **_rule_arguments(at, positive))]
        mid = self.grow(at.windows)
        grown = conv.grow(mid)
        out = at.kernels.unpool_relu_deconv2d(
            g, at.map_of(switches), weight, (mid.height, mid.width), self.kernel_size, self.stride, 0, self.dilation,
            conv.stride, 0, conv.dilation, conv.groups, (grown.height, grown.width), **_rule_arguments(at, positive))
        return [grown.zero_outside(out, conv_in_shape[1:])]


def _rule_arguments(at: At, positive) -> dict:
    """The fused ops' rule arguments: the kernels' name of the rule, and for the masked rules whether
    each pooled value was > 0."""
    return {"rule": at.rule.kernel, "positive": None if positive is None else at.map_of(positive)}


@register
class AvgPool(Kind):
    name = "AvgPool2d"
    modules = (nn.AvgPool2d,)
    functions = (F.avg_pool2d,)
    arguments = ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")

    def __init__(self, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
        self.kernel_size = pair(kernel_size)
        self.stride = _stride(self.kernel_size, stride)
        self.padding, self.ceil_mode = pair(padding), bool(ceil_mode)
        self.count_include_pad, self.divisor_override = bool(count_include_pad), divisor_override
        self.dilation = (1, 1)

    @classmethod
    def from_module(cls, module, call):
        call.data("input")
        return cls(module.kernel_size, module.stride, module.padding, module.ceil_mode, module.count_include_pad,
                   module.divisor_override)

    @classmethod
    def from_call(cls, call):
        call.data("input")
        return cls(call.get("kernel_size"), call.get("stride"), call.get("padding", 0), call.get("ceil_mode", False),
                   call.get("count_include_pad", True), call.get("divisor_override"))

    def output_shape(self, shape):
        return pooled_shape(shape, self.kernel_size, self.stride, self.padding, (1, 1), self.ceil_mode)

    def forward(self, x):
        return F.avg_pool2d(x, self.kernel_size, self.stride, self.padding, self.ceil_mode, self.count_include_pad,
                            self.divisor_override)

    def grow(self, windows):
        return windows.grow(self.kernel_size, self.stride, self.padding)

    def divisors(self, in_size, like: torch.Tensor) -> torch.Tensor:
        """[h_out, w_out]: what the pool divides each window's sum by on an input of spatial size
        ``in_size``: its own forward on ones against the window sums of ones (count_include_pad,
        ceil_mode and divisor_override all as the layer has them), once per size, dtype and device."""
        cache = self.__dict__.setdefault("_divisor_cache", {})
        key = (tuple(in_size), like.dtype, like.device)
        if key not in cache:
            ones = torch.ones(1, 1, *in_size, dtype=torch.float64, device=like.device)
            sums = F.avg_pool2d(ones, self.kernel_size, self.stride, self.padding, self.ceil_mode, True, 1)
            cache[key] = (sums / self.forward(ones))[0, 0].round().to(like.dtype)
        return cache[key]

    def cone(self, cones, size):
        return None if cones[0] is None else cones[0].through(self.kernel_size, self.stride, self.padding, size)

    def forward_unpadded(self, x, windows, rows, in_size):
        """Window sums over the divisors the layer uses at those outputs (``windows`` of its output
        per occluder position, ``rows`` each batch row's position, ``in_size`` its input's size)."""
        sums = F.avg_pool2d(x, self.kernel_size, self.stride, 0, False, True, 1)
        divisors = self.divisors(in_size, x)
        out_rows = windows.top[rows][:, None] + torch.arange(windows.height, device=x.device)
        out_cols = windows.left[rows][:, None] + torch.arange(windows.width, device=x.device)
        return sums / divisors[out_rows[:, :, None], out_cols[:, None, :]][:, None]

    def reverse(self, g, at):
        in_shape, out_shape = at.in_shapes[0], at.out_shape
        if at.windows is None:
            return [linear_vjp(self.forward, in_shape, g)]
        # each input position of a window gets g / divisor from every window covering it: a depthwise
        # transposed conv with a kernel of ones, after dividing by the divisors
        windows = at.windows
        divisors = self.divisors(in_shape[1:], g)
        rows = (windows.top[:, None] + torch.arange(windows.height, device=g.device)).clamp(0, out_shape[1] - 1)
        cols = (windows.left[:, None] + torch.arange(windows.width, device=g.device)).clamp(0, out_shape[2] - 1)
        g = g / divisors[rows[:, :, None], cols[:, None, :]][:, None]
        grown = self.grow(windows)
        ones = torch.ones(in_shape[0], 1, *self.kernel_size, dtype=g.dtype, device=g.device)
        g = F.conv_transpose2d(g, ones, stride=self.stride, groups=in_shape[0])
        return [grown.zero_outside(g, in_shape[1:])]


@register
class AdaptiveAvgPool(Kind):
    name = "AdaptiveAvgPool2d"
    modules = (nn.AdaptiveAvgPool2d,)
    functions = (F.adaptive_avg_pool2d,)
    arguments = ("input", "output_size")
    windowed = False  # its windows differ in size from one output to the next

    def __init__(self, output_size):
        self.output_size = (output_size, output_size) if isinstance(output_size, int) or output_size is None \
            else pair(output_size)  # None keeps the input's size on that axis

    @classmethod
    def from_module(cls, module, call):
        call.data("input")
        return cls(module.output_size)

    @classmethod
    def from_call(cls, call):
        call.data("input")
        return cls(call.get("output_size"))

    def output_shape(self, shape):
        self.need_spatial(shape)
        return (shape[0],) + tuple(shape[1 + i] if self.output_size[i] is None else self.output_size[i]
                                   for i in range(2))

    def forward(self, x):
        return F.adaptive_avg_pool2d(x, self.output_size)

    def field(self, windows, in_shape):
        """Where the input size is a multiple of the output size, this is a plain pool with kernel =
        stride = input // output; otherwise its windows differ in size and each output sees all."""
        window = None if in_shape is None or len(in_shape) != 3 else self.even_window(in_shape[1:])
        return None if window is None else windows.grow(window, window, (0, 0))

    def even_window(self, spatial) -> Optional[Tuple[int, int]]:
        window = []
        for axis in range(2):
            out = spatial[axis] if self.output_size[axis] is None else self.output_size[axis]
            if spatial[axis] % out:
                return None
            window.append(spatial[axis] // out)
        return tuple(window)

    def reverse(self, g, at):
        return [linear_vjp(self.forward, at.in_shapes[0], g)]


@register
class SpatialMean(Kind):
    """A mean over some of a tensor's per-image dims (``x.mean((2, 3))``, ``torch.mean(x, dim=[-2, -1],
    keepdim=True)``, ``x.mean(1)`` over tokens): its gradient, spread evenly. The mean over a map's
    positions is the global average pool of the paper's table."""

    name = "mean"
    functions = (torch.mean,)
    methods = ("mean",)
    arguments = ("input", "dim", "keepdim")
    windowed = False

    def __init__(self, dims, keepdim: bool):
        self.dims, self.keepdim = dims, bool(keepdim)

    @classmethod
    def from_call(cls, call):
        call.data("input")
        dims = call.get("dim")
        dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
        if not dims or call.get("dtype") is not None or not all(isinstance(d, int) for d in dims):
            call.unsupported(f"takes the mean over dims {dims or 'all'}; only a mean over some of the per-image dims "
                             "is reversed natively")
        return cls(dims, call.get("keepdim", False))

    def outside_table(self):
        return None if self.spatial else f"takes the mean over dims {list(self.dims)}; only the mean over the " \
                                         "spatial dims (2, 3) of a map is in the paper's table"

    def output_shape(self, shape):
        rank = len(shape) + 1
        dims = sorted(d % rank for d in self.dims)
        if 0 in dims:
            raise ValueError("takes the mean over the batch dim; the engine needs one image per row")
        self.spatial = rank == 4 and dims == [2, 3]
        return tuple((1 if self.keepdim else None) if i + 1 in dims else size for i, size in enumerate(shape)
                     if self.keepdim or i + 1 not in dims)

    def forward(self, x):
        return x.mean(self.dims, keepdim=self.keepdim)

    def reverse(self, g, at):
        return [linear_vjp(self.forward, at.in_shapes[0], g)]
