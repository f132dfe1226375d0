"""The projection engine: forward with switches, seeds, reverse to pixels.

    r = project(model, images, "features.10", channel=7)                  # each image's strongest activation
    r = project(model, images, "features.10", neurons=idx)                # idx: [P, 4] = (image, channel, y, x)

Data flows one way (DESIGN.md): the plan (deconvcuda.plan) lists the layers from the input to the
target; ``_forward`` runs them with functional ops on the images' device and dtype, keeping each
max pool's switches and each LRN's input; the seeds are put into a map shaped like the target's
output; the reverse undoes the layers from the target down to the input.

The reverse runs in one of two ways per layer:
- full maps ``[P, C, H, W]``: the whole-map seed, flat layers, and every layer of the reference backend;
- windows (native backend, point seeds): a single activation's projection is non-zero only inside
  its receptive field, so each projection carries just that window of every feature map,
  ``[P, C, h, w]`` with a per-projection origin. All windows of a layer have the same size (it only
  depends on the geometry); they are computed with padding 0 and the positions that lie outside the
  real feature map, which stand for its zero padding, are zeroed after every layer that spreads
  values. When a window would be at least as large as the map, the engine switches to full maps.
Both give the same numbers: the tests compare them.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import plan as plans

__all__ = ["project", "OutOfRangeError", "DtypeError"]


class OutOfRangeError(IndexError, ValueError):
    """A channel, position or neurons row outside the layer's output or the images. An IndexError
    (an index is out of range) that is also a ValueError (an argument has a bad value)."""


class DtypeError(TypeError, ValueError):
    """A tensor argument with the wrong dtype: a TypeError (of its elements) and a ValueError (the
    argument is a tensor, as expected, whose dtype is not)."""

SEEDS = ("value", "one")
LRN_MODES = ("gradient", "identity")
BACKENDS = ("auto", "reference")

# Projections are processed in chunks whose largest feature map (per chunk, in elements) stays
# under this bound: 2**25 float32 values are 128 MiB, and a layer holds a few such tensors at once.
CHUNK_ELEMENTS = 1 << 25


# --------------------------------------------------------------------------------------------- #
# Backends
# --------------------------------------------------------------------------------------------- #

class _Kernels:
    """The four ops of one backend, and whether the engine may crop and fuse with them."""

    def __init__(self, backend: str, caller: str):
        if backend == "reference":
            from . import reference as ops  # pure PyTorch: nothing from the extension is imported
        else:
            try:
                from . import ops
            except ImportError as error:
                raise RuntimeError(f"{caller}: backend='auto' needs the compiled extension deconvcuda._C, which "
                                   f"could not be loaded ({error}); build it (`make build`) or pass "
                                   f"backend='reference'") from error
        self.max_pool2d_switches = ops.max_pool2d_switches
        self.unpool_relu = ops.unpool_relu
        self.deconv2d = ops.deconv2d
        self.unpool_relu_deconv2d = ops.unpool_relu_deconv2d
        # the reference stays deliberately simple: full maps, one op per layer
        self.crop = self.fuse = backend != "reference"


def _cast(tensor: Optional[torch.Tensor], like: torch.Tensor) -> Optional[torch.Tensor]:
    """A parameter in the images' dtype and on their device (a copy where either differs; the
    model's own tensor is never written)."""
    return None if tensor is None else tensor.detach().to(device=like.device, dtype=like.dtype)


# --------------------------------------------------------------------------------------------- #
# Forward
# --------------------------------------------------------------------------------------------- #

@dataclass
class _Forward:
    """What the forward leaves behind: the target's activations, and per step what its reverse
    reads (a max pool's switches, an LRN's input), stored channels-last ([N, H, W, C]) so that
    a window of any projection is a gather of contiguous rows."""

    output: torch.Tensor
    saved: List[Optional[torch.Tensor]]


def run_forward(plan: plans.Plan, images: torch.Tensor, kernels: Optional[_Kernels] = None,
                keep_lrn_inputs: bool = False) -> _Forward:
    """Run ``plan``'s steps on ``images`` with functional ops (eval semantics: BatchNorm's running
    statistics, Dropout left out). With ``kernels``, max pools record their switches."""
    x = images
    saved: List[Optional[torch.Tensor]] = []
    for step in plan.steps:
        keep = None
        if isinstance(step, plans.Conv):
            x = F.conv2d(x, _cast(step.weight, x), _cast(step.bias, x), step.stride, step.padding, step.dilation,
                         step.groups)
        elif isinstance(step, plans.ReLU):
            x = torch.relu(x)  # out of place: an in-place ReLU of the model cannot clobber a saved tensor
        elif isinstance(step, plans.MaxPool):
            if kernels is None:
                x = F.max_pool2d(x, step.kernel_size, step.stride, step.padding, step.dilation, step.ceil_mode)
            else:
                x, switches = kernels.max_pool2d_switches(x, step.kernel_size, step.stride, step.padding,
                                                          step.dilation, step.ceil_mode)
                keep = _channels_last_rows(switches)
        elif isinstance(step, plans.LocalResponseNorm):
            if keep_lrn_inputs:
                keep = _channels_last_rows(x)
            x = _local_response_norm(x, step)
        elif isinstance(step, plans.BatchNorm):
            x = F.batch_norm(x, _cast(step.running_mean, x), _cast(step.running_var, x), _cast(step.weight, x),
                             _cast(step.bias, x), False, 0.0, step.eps)
        elif isinstance(step, plans.AvgPool):
            x = F.avg_pool2d(x, step.kernel_size, step.stride, step.padding, step.ceil_mode, step.count_include_pad,
                             step.divisor_override)
        elif isinstance(step, plans.AdaptiveAvgPool):
            x = F.adaptive_avg_pool2d(x, step.output_size)
        elif isinstance(step, plans.Flatten):
            x = x.flatten(1)
        elif isinstance(step, plans.Linear):
            x = F.linear(x, _cast(step.weight, x), _cast(step.bias, x))
        else:  # the plan only makes the steps above
            raise TypeError(f"run_forward: unknown step {step!r}")
        saved.append(keep)
    return _Forward(x, saved)


def _local_response_norm(x: torch.Tensor, step: plans.LocalResponseNorm) -> torch.Tensor:
    """F.local_response_norm computed in float32 (or wider) and rounded back to ``x``'s dtype:
    PyTorch's LRN (avg_pool3d) has no float16/bfloat16 kernel on the CPU, so half-precision images
    failed there; float32 is also what the kernels accumulate half precision in."""
    wide = torch.promote_types(x.dtype, torch.float32)
    return F.local_response_norm(x.to(wide), step.size, step.alpha, step.beta, step.k).to(x.dtype)


def _channels_last_rows(t: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> [N, H, W, C] contiguous (one row of C values per image position)."""
    return t.permute(0, 2, 3, 1).contiguous()


def _rows(saved: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """The whole saved maps of the given images, as [P, C, H, W] (channels-last strides)."""
    return saved.index_select(0, images).permute(0, 3, 1, 2)


# --------------------------------------------------------------------------------------------- #
# Windows
# --------------------------------------------------------------------------------------------- #

@dataclass
class _Windows:
    """Per projection, the window of a feature map its gradient can be non-zero in: rows
    [top, top + height) and columns [left, left + width), in map coordinates (they may reach
    past the map's borders; those positions hold zeros)."""

    top: torch.Tensor   # [P] int64
    left: torch.Tensor  # [P] int64
    height: int
    width: int

    def grow(self, extent: Sequence[int], stride: Sequence[int], padding: Sequence[int]) -> "_Windows":
        """The input window of a conv/pool with this (dilated) kernel extent, stride and padding: the
        window at the output reads input rows top * stride - padding ... (bottom) * stride - padding + extent."""
        return _Windows(self.top * stride[0] - padding[0], self.left * stride[1] - padding[1],
                        (self.height - 1) * stride[0] + extent[0], (self.width - 1) * stride[1] + extent[1])

    def positions(self, size: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Plane-flat indices [P, h * w] into a map of ``size`` (clamped inside it) and whether each
        position really lies inside."""
        rows = self.top[:, None] + torch.arange(self.height, device=self.top.device)
        cols = self.left[:, None] + torch.arange(self.width, device=self.left.device)
        valid = (((rows >= 0) & (rows < size[0]))[:, :, None] & ((cols >= 0) & (cols < size[1]))[:, None, :])
        flat = rows.clamp(0, size[0] - 1)[:, :, None] * size[1] + cols.clamp(0, size[1] - 1)[:, None, :]
        return flat.flatten(1), valid.flatten(1)

    def inside(self, size: Sequence[int]) -> torch.Tensor:
        """[P, 1, h, w]: whether each window position lies inside a map of ``size``."""
        return self.positions(size)[1].view(-1, 1, self.height, self.width)

    def crop(self, saved: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Each projection's window of a saved channels-last map [N, H, W, C] -> [P, C, h, w]
        (channels-last strides). Positions outside the map hold a clamped neighbour's value."""
        n, h, w, c = saved.shape
        flat, _ = self.positions((h, w))
        rows = (images[:, None] * (h * w) + flat).flatten()
        return saved.reshape(n * h * w, c).index_select(0, rows).view(
            -1, self.height, self.width, c).permute(0, 3, 1, 2)

    def zero_outside(self, g: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        return torch.where(self.inside(size), g, torch.zeros((), dtype=g.dtype, device=g.device))

    def paste(self, g: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """The windows [P, C, h, w] placed into zero maps [P, C, H, W]. Positions outside the map go
        to one extra slot that is dropped, so every real position is written once (deterministic)."""
        p, c = g.shape[:2]
        flat, valid = self.positions(size)
        plane = size[0] * size[1]
        flat = torch.where(valid, flat, torch.full_like(flat, plane))
        out = g.new_zeros(p, c, plane + 1)
        out.scatter_(2, flat[:, None, :].expand(p, c, flat.shape[1]), g.reshape(p, c, -1))
        return out[:, :, :plane].reshape(p, c, size[0], size[1])


def _extent(kernel: Sequence[int], dilation: Sequence[int]) -> Tuple[int, int]:
    return tuple(dilation[i] * (kernel[i] - 1) + 1 for i in range(2))


# --------------------------------------------------------------------------------------------- #
# Reverse steps
# --------------------------------------------------------------------------------------------- #

class _Reverse:
    """The reverse of one step (or of a fused run of steps). ``out_shape`` is the per-image shape
    it receives (the forward output), ``in_shape`` the one it returns. ``full`` maps whole
    [P, ...] gradients; ``window`` maps windows and returns the input windows (only where
    ``windowed`` is true)."""

    windowed = True

    def __init__(self, in_shape, out_shape):
        self.in_shape = tuple(in_shape)
        self.out_shape = tuple(out_shape)

    def grow(self, windows: _Windows) -> _Windows:
        return windows

    def full(self, g: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def window(self, g: torch.Tensor, images: torch.Tensor, windows: _Windows) -> torch.Tensor:
        return self.full(g, images)  # pointwise steps: the same op on a window

    def peak_elements(self, height: Optional[int] = None, width: Optional[int] = None) -> int:
        """Elements per projection of the largest map this step touches (full maps, or windows of
        the given output size)."""
        if height is None:
            return max(_numel(self.in_shape), _numel(self.out_shape))
        grown = self.grow(_Windows(torch.zeros(0), torch.zeros(0), height, width))
        return max(self.out_shape[0] * height * width, self.in_shape[0] * grown.height * grown.width)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


class _ReLU(_Reverse):
    def full(self, g, images):
        return torch.relu(g)


class _BatchNorm(_Reverse):
    def __init__(self, in_shape, out_shape, step: plans.BatchNorm, like: torch.Tensor):
        super().__init__(in_shape, out_shape)
        # gamma / sqrt(var + eps), rounded once from float32 or better
        wide = torch.promote_types(like.dtype, torch.float32)
        var = step.running_var.detach().to(device=like.device, dtype=wide)
        gamma = torch.ones_like(var) if step.weight is None else step.weight.detach().to(like.device, wide)
        self.scale = (gamma / torch.sqrt(var + step.eps)).to(like.dtype).view(1, -1, 1, 1)

    def full(self, g, images):
        return g * self.scale


class _LocalResponseNorm(_Reverse):
    """The true gradient of F.local_response_norm at the saved input. LRN mixes channels at one
    position only, so a window's gradient needs the input on that window alone."""

    def __init__(self, in_shape, out_shape, step: plans.LocalResponseNorm, saved: torch.Tensor):
        super().__init__(in_shape, out_shape)
        self.step, self.saved = step, saved

    def _gradient(self, x, g):
        # in float32 or wider, like the forward (_local_response_norm): no half-precision CPU kernel
        wide = torch.promote_types(g.dtype, torch.float32)
        with torch.enable_grad():
            x = x.detach().to(wide).requires_grad_(True)
            y = F.local_response_norm(x, self.step.size, self.step.alpha, self.step.beta, self.step.k)
            (grad,) = torch.autograd.grad(y, x, g.to(wide))
        return grad.to(g.dtype)

    def full(self, g, images):
        return self._gradient(_rows(self.saved, images), g)

    def window(self, g, images, windows):
        grad = self._gradient(windows.crop(self.saved, images), g)
        return windows.zero_outside(grad, self.in_shape[1:])  # the clamped input there is not the map's


class _Deconv(_Reverse):
    def __init__(self, in_shape, out_shape, step: plans.Conv, kernels: _Kernels, like: torch.Tensor):
        super().__init__(in_shape, out_shape)
        self.step, self.kernels, self.weight = step, kernels, _cast(step.weight, like)

    def grow(self, windows):
        return windows.grow(_extent(self.step.kernel_size, self.step.dilation), self.step.stride, self.step.padding)

    def full(self, g, images):
        s = self.step
        return self.kernels.deconv2d(g, self.weight, s.stride, s.padding, s.dilation, s.groups, self.in_shape[1:])

    def window(self, g, images, windows):
        s = self.step
        grown = self.grow(windows)
        g = self.kernels.deconv2d(g, self.weight, s.stride, 0, s.dilation, s.groups, (grown.height, grown.width))
        return grown.zero_outside(g, self.in_shape[1:])  # there the forward read its zero padding


def _unpool_sum(grad: torch.Tensor, switches: torch.Tensor, input_size, kernel, stride, padding,
                dilation) -> torch.Tensor:
    """The plain switch unpooling (no ReLU): each pooled value goes to its window's switch and
    overlapping windows add up. One strided add per kernel tap, so no scatter and no atomics."""
    n, c, pooled_h, pooled_w = grad.shape
    span = [(grad.shape[2 + i] - 1) * stride[i] + dilation[i] * (kernel[i] - 1) + 1 for i in range(2)]
    wide = torch.promote_types(grad.dtype, torch.float32)
    buffer = grad.new_zeros(n, c, max(span[0], padding[0] + input_size[0]), max(span[1], padding[1] + input_size[1]),
                            dtype=wide)
    zero = torch.zeros((), dtype=grad.dtype, device=grad.device)
    for ky in range(kernel[0]):
        for kx in range(kernel[1]):
            chosen = torch.where(switches == ky * kernel[1] + kx, grad, zero)
            y0, x0 = ky * dilation[0], kx * dilation[1]
            buffer[:, :, y0:y0 + (pooled_h - 1) * stride[0] + 1:stride[0],
                   x0:x0 + (pooled_w - 1) * stride[1] + 1:stride[1]] += chosen
    return buffer[:, :, padding[0]:padding[0] + input_size[0], padding[1]:padding[1] + input_size[1]].to(grad.dtype)


class _Unpool(_Reverse):
    """MaxPool2d's reverse; with ``relu`` also the ReLU that precedes the pool in the forward
    (one unpool_relu op). Unpooled values only land on switches, which lie inside the map, so a
    window needs no zeroing."""

    def __init__(self, in_shape, out_shape, step: plans.MaxPool, switches: torch.Tensor, relu: bool,
                 kernels: _Kernels):
        super().__init__(in_shape, out_shape)
        self.step, self.switches, self.relu, self.kernels = step, switches, relu, kernels

    def grow(self, windows):
        return windows.grow(_extent(self.step.kernel_size, self.step.dilation), self.step.stride, self.step.padding)

    def _unpool(self, g, switches, input_size, padding):
        s = self.step
        if self.relu:
            return self.kernels.unpool_relu(g, switches, input_size, s.kernel_size, s.stride, padding, s.dilation)
        return _unpool_sum(g, switches, input_size, s.kernel_size, s.stride, _pair(padding), s.dilation)

    def full(self, g, images):
        return self._unpool(g, _rows(self.switches, images), self.in_shape[1:], self.step.padding)

    def window(self, g, images, windows):
        grown = self.grow(windows)
        return self._unpool(g, windows.crop(self.switches, images), (grown.height, grown.width), 0)


class _UnpoolReluDeconv(_Reverse):
    """The reverse of conv -> ReLU -> max pool in one fused op (native backend)."""

    def __init__(self, in_shape, mid_shape, out_shape, pool: plans.MaxPool, switches: torch.Tensor,
                 conv: plans.Conv, kernels: _Kernels, like: torch.Tensor):
        super().__init__(in_shape, out_shape)
        self.mid_shape = tuple(mid_shape)
        self.pool, self.switches, self.conv, self.kernels = pool, switches, conv, kernels
        self.weight = _cast(conv.weight, like)

    def _grow_pool(self, windows):
        return windows.grow(_extent(self.pool.kernel_size, self.pool.dilation), self.pool.stride, self.pool.padding)

    def grow(self, windows):
        return self._grow_pool(windows).grow(_extent(self.conv.kernel_size, self.conv.dilation), self.conv.stride,
                                             self.conv.padding)

    def peak_elements(self, height=None, width=None):
        if height is None:
            return max(_numel(self.in_shape), _numel(self.mid_shape), _numel(self.out_shape))
        mid = self._grow_pool(_Windows(torch.zeros(0), torch.zeros(0), height, width))
        return max(super().peak_elements(height, width), self.mid_shape[0] * mid.height * mid.width)

    def full(self, g, images):
        p, c = self.pool, self.conv
        return self.kernels.unpool_relu_deconv2d(
            g, _rows(self.switches, images), self.weight, self.mid_shape[1:], p.kernel_size, p.stride, p.padding,
            p.dilation, c.stride, c.padding, c.dilation, c.groups, self.in_shape[1:])

    def window(self, g, images, windows):
        p, c = self.pool, self.conv
        mid = self._grow_pool(windows)
        grown = self.grow(windows)
        g = self.kernels.unpool_relu_deconv2d(
            g, windows.crop(self.switches, images), self.weight, (mid.height, mid.width), p.kernel_size, p.stride, 0,
            p.dilation, c.stride, 0, c.dilation, c.groups, (grown.height, grown.width))
        return grown.zero_outside(g, self.in_shape[1:])


def _linear_vjp(function, in_shape, g: torch.Tensor) -> torch.Tensor:
    """The gradient of a linear ``function`` (average pools) at any point: autograd at zeros."""
    with torch.enable_grad():
        x = g.new_zeros((g.shape[0],) + tuple(in_shape), requires_grad=True)
        (grad,) = torch.autograd.grad(function(x), x, g)
    return grad


def _avg_pool_divisors(pooled: int, size: int, kernel: int, stride: int, padding: int,
                       count_include_pad: bool) -> List[int]:
    """Along one axis, the count F.avg_pool2d divides each window's sum by (PyTorch's rule: the
    window clipped to the padded input, or to the input itself without count_include_pad). The
    2-D divisor is the product of both axes' counts."""
    divisors = []
    for o in range(pooled):
        start = o * stride - padding
        end = min(start + kernel, size + padding)
        inside = min(end, size) - max(start, 0)
        divisors.append(max(end - start if count_include_pad else inside, 1))
    return divisors


class _AvgPool(_Reverse):
    def __init__(self, in_shape, out_shape, step: plans.AvgPool, like: torch.Tensor):
        super().__init__(in_shape, out_shape)
        self.step = step
        s = step
        if s.divisor_override:
            self.divisors = None
        else:
            self.divisors = [torch.tensor(_avg_pool_divisors(out_shape[1 + i], in_shape[1 + i], s.kernel_size[i],
                                                             s.stride[i], s.padding[i], s.count_include_pad),
                                          dtype=like.dtype, device=like.device) for i in range(2)]
        self.ones = torch.ones(in_shape[0], 1, *s.kernel_size, dtype=like.dtype, device=like.device)

    def grow(self, windows):
        return windows.grow(self.step.kernel_size, self.step.stride, self.step.padding)

    def full(self, g, images):
        s = self.step
        return _linear_vjp(lambda x: F.avg_pool2d(x, s.kernel_size, s.stride, s.padding, s.ceil_mode,
                                                  s.count_include_pad, s.divisor_override), self.in_shape, g)

    def window(self, g, images, windows):
        # each input position of a window gets g / divisor from every window covering it: a
        # depthwise transposed conv with a kernel of ones, after dividing by the divisors
        s = self.step
        if self.divisors is None:
            g = g / s.divisor_override
        else:
            rows = (windows.top[:, None] + torch.arange(windows.height, device=g.device)).clamp(0, self.out_shape[1] - 1)
            cols = (windows.left[:, None] + torch.arange(windows.width, device=g.device)).clamp(0, self.out_shape[2] - 1)
            g = g / (self.divisors[0][rows][:, None, :, None] * self.divisors[1][cols][:, None, None, :])
        grown = self.grow(windows)
        g = F.conv_transpose2d(g, self.ones, stride=s.stride, groups=self.in_shape[0])
        return grown.zero_outside(g, self.in_shape[1:])


class _AdaptiveAvgPool(_Reverse):
    windowed = False  # its windows differ in size from one output to the next

    def __init__(self, in_shape, out_shape, step: plans.AdaptiveAvgPool):
        super().__init__(in_shape, out_shape)
        self.step = step

    def full(self, g, images):
        return _linear_vjp(lambda x: F.adaptive_avg_pool2d(x, self.step.output_size), self.in_shape, g)


class _Flatten(_Reverse):
    windowed = False

    def full(self, g, images):
        return g.reshape((g.shape[0],) + self.in_shape)


class _Linear(_Reverse):
    windowed = False

    def __init__(self, in_shape, out_shape, step: plans.Linear, like: torch.Tensor):
        super().__init__(in_shape, out_shape)
        self.weight = _cast(step.weight, like)

    def full(self, g, images):
        return g @ self.weight  # W^T g for each row


def _pair(value) -> Tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def _reverse_program(plan: plans.Plan, shapes, forward: _Forward, kernels: _Kernels, lrn: str,
                     like: torch.Tensor) -> List[_Reverse]:
    """The reverse steps from the target down to the input, fusing where the kernels can:
    MaxPool preceded (in the forward) by a ReLU -> unpool_relu; and by ReLU and Conv ->
    unpool_relu_deconv2d (native backend only)."""
    steps = plan.steps
    program: List[_Reverse] = []
    i = len(steps) - 1
    while i >= 0:
        step, in_shape, out_shape = steps[i], shapes[i], shapes[i + 1]
        if isinstance(step, plans.MaxPool):
            relu_before = i >= 1 and isinstance(steps[i - 1], plans.ReLU)
            if relu_before and kernels.fuse and i >= 2 and isinstance(steps[i - 2], plans.Conv):
                program.append(_UnpoolReluDeconv(shapes[i - 2], in_shape, out_shape, step, forward.saved[i],
                                                 steps[i - 2], kernels, like))
                i -= 3
                continue
            program.append(_Unpool(shapes[i - 1] if relu_before else in_shape, out_shape, step, forward.saved[i],
                                   relu_before, kernels))
            i -= 2 if relu_before else 1
            continue
        if isinstance(step, plans.Conv):
            program.append(_Deconv(in_shape, out_shape, step, kernels, like))
        elif isinstance(step, plans.ReLU):
            program.append(_ReLU(in_shape, out_shape))
        elif isinstance(step, plans.LocalResponseNorm):
            if lrn == "gradient":
                program.append(_LocalResponseNorm(in_shape, out_shape, step, forward.saved[i]))
        elif isinstance(step, plans.BatchNorm):
            program.append(_BatchNorm(in_shape, out_shape, step, like))
        elif isinstance(step, plans.AvgPool):
            program.append(_AvgPool(in_shape, out_shape, step, like))
        elif isinstance(step, plans.AdaptiveAvgPool):
            program.append(_AdaptiveAvgPool(in_shape, out_shape, step))
        elif isinstance(step, plans.Flatten):
            program.append(_Flatten(in_shape, out_shape))
        elif isinstance(step, plans.Linear):
            program.append(_Linear(in_shape, out_shape, step, like))
        else:
            raise TypeError(f"project: no reverse for step {step!r}")
        i -= 1
    return program


def _schedule(program: List[_Reverse], crop: bool) -> Tuple[List[bool], int]:
    """Which steps run on windows (point seeds start as 1x1 windows; once a step needs full maps or
    its input window would cover at least the whole map, the rest runs on full maps), and the
    elements per projection of the largest map touched, for chunking."""
    windowed, peak = [], 1
    height = width = 1
    on_windows = True
    for op in program:
        if on_windows and crop and op.windowed:
            grown = op.grow(_Windows(torch.zeros(0), torch.zeros(0), height, width))
            on_windows = grown.height * grown.width < _numel(op.in_shape[1:])
        else:
            on_windows = False
        windowed.append(on_windows)
        if on_windows:
            peak = max(peak, op.peak_elements(height, width))
            height, width = grown.height, grown.width
        else:
            peak = max(peak, op.peak_elements())
    return windowed, peak


# --------------------------------------------------------------------------------------------- #
# Selections and checks
# --------------------------------------------------------------------------------------------- #

def _is_int(value) -> bool:
    if isinstance(value, torch.Tensor):
        return value.dim() == 0 and not value.is_floating_point() and value.dtype != torch.bool
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_options(seed, lrn, backend, caller: str) -> None:
    for name, value, allowed in (("seed", seed, SEEDS), ("lrn", lrn, LRN_MODES), ("backend", backend, BACKENDS)):
        if not isinstance(value, str) or value not in allowed:
            raise ValueError(f"{caller}: {name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def _check_images(images, caller: str) -> None:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{caller}: images must be a torch.Tensor [N, C, H, W], got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(f"{caller}: images must be 4-D [N, C, H, W], got {images.dim()}-D with shape "
                         f"{list(images.shape)}")
    if not images.is_floating_point():
        raise DtypeError(f"{caller}: images must be a floating-point tensor, got {images.dtype}")


@dataclass
class _Selection:
    """The projections to compute: per projection the image (row of the forward batch), channel
    and position (all on the images' device); ``points`` is False for the whole-map seed."""

    images: torch.Tensor
    channels: Optional[torch.Tensor]
    y: Optional[torch.Tensor]
    x: Optional[torch.Tensor]
    points: bool

    @property
    def count(self) -> int:
        return self.images.shape[0]


def _check_neurons(neurons, n_images: int, target_shape, caller: str) -> torch.Tensor:
    expected = f"{caller}: neurons must be a LongTensor [P, 4] of (image, channel, y, x) rows"
    if not isinstance(neurons, torch.Tensor) or neurons.dtype != torch.long:
        got = (f"a {neurons.dtype} tensor" if isinstance(neurons, torch.Tensor) else type(neurons).__name__)
        raise DtypeError(f"{expected}, got {got}")
    if neurons.dim() != 2 or neurons.shape[1] != 4:
        raise ValueError(f"{expected}, got shape {list(neurons.shape)}")
    if neurons.shape[0] == 0:
        return neurons
    flat = len(target_shape) == 1
    limits = torch.tensor([n_images, target_shape[0], 1 if flat else target_shape[1], 1 if flat else target_shape[2]],
                          device=neurons.device)
    bad = ((neurons < 0) | (neurons >= limits)).any(dim=1)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        columns = "(image, unit, 0, 0) rows for a flat layer" if flat else "(image, channel, y, x) rows"
        bounds = f"[{n_images}, {target_shape[0]}, 1, 1]" if flat else f"[{n_images}, {', '.join(map(str, target_shape))}]"
        raise OutOfRangeError(f"{caller}: neurons row {row} = {neurons[row].tolist()} is out of range: expected "
                         f"{columns} below {bounds} (images, then the layer's output shape)")
    return neurons


def _check_selection(channel, position, neurons, flat: bool, caller: str) -> None:
    if neurons is not None and channel is not None:
        raise ValueError(f"{caller}: pass either channel (with an optional position) or neurons, not both")
    if neurons is not None and position is not None:
        raise ValueError(f"{caller}: position goes with channel; neurons rows carry their own positions")
    if position is not None and channel is None:
        raise ValueError(f"{caller}: position needs a channel")
    if position is not None and flat:
        raise ValueError(f"{caller}: position is not allowed with a layer whose output is flat [N, F]; channel "
                         f"names the unit")
    if channel is not None and not _is_int(channel):
        raise TypeError(f"{caller}: channel must be an int, got {channel!r}")


def _check_channel_position(channel, position, target_shape, caller: str) -> Tuple[int, Optional[Tuple[int, int]]]:
    channel = int(channel)
    if not 0 <= channel < target_shape[0]:
        raise OutOfRangeError(f"{caller}: channel must be in [0, {target_shape[0]}) for this layer, got {channel}")
    if position is None:
        return channel, None
    if isinstance(position, torch.Tensor):
        position = position.tolist()
    if not isinstance(position, (tuple, list)) or len(position) != 2 or not all(_is_int(v) for v in position):
        raise TypeError(f"{caller}: position must be a pair of ints (y, x), got {position!r}")
    y, x = int(position[0]), int(position[1])
    if not (0 <= y < target_shape[1] and 0 <= x < target_shape[2]):
        raise OutOfRangeError(f"{caller}: position must be inside the layer's {target_shape[1]}x{target_shape[2]} map, "
                         f"got {(y, x)}")
    return channel, (y, x)


# --------------------------------------------------------------------------------------------- #
# project
# --------------------------------------------------------------------------------------------- #

def project(model: nn.Module, images: torch.Tensor, layer, channel=None, position=None, neurons=None, *,
            seed: str = "value", lrn: str = "gradient", backend: str = "auto") -> torch.Tensor:
    """Project activations of ``layer`` back to pixel space (Zeiler & Fergus's DeconvNet).

    Selection (one of):
      - ``channel``: per image, its strongest activation of that map (the first maximum in row-major
        order) -> ``[N, C_in, H, W]``;
      - ``channel`` and ``position=(y, x)``: that activation in every image -> ``[N, ...]``;
      - ``neurons``: LongTensor ``[P, 4]`` of (image, channel, y, x) rows -> ``[P, ...]`` (one forward
        per distinct image, however many rows name it);
      - nothing: the whole activation map of each image is the seed -> ``[N, ...]``.
    For a layer with a flat output ``[N, F]``, ``channel`` names the unit, ``position`` is an error
    and ``neurons`` rows are (image, unit, 0, 0).

    ``seed="value"`` keeps each selected activation's value (the paper's), ``"one"`` puts 1 there.
    ``lrn="gradient"`` reverses LocalResponseNorm by its true gradient, ``"identity"`` passes through.
    ``backend="auto"`` runs the native kernels on the images' device; ``"reference"`` pure PyTorch.
    The result has the dtype and device of ``images``. The model is never changed or run.
    """
    caller = "project"
    _check_options(seed, lrn, backend, caller)
    _check_images(images, caller)
    plan = plans.build_plan(model, layer, caller=caller)
    shapes = plan.shapes(tuple(images.shape[1:]), caller=caller)
    target_shape = shapes[-1]
    flat = len(target_shape) == 1
    _check_selection(channel, position, neurons, flat, caller)
    if channel is not None:
        channel, position = _check_channel_position(channel, position, target_shape, caller)
    if neurons is not None:
        neurons = _check_neurons(neurons, images.shape[0], target_shape, caller).to(images.device)
    kernels = _Kernels(backend, caller)

    with torch.inference_mode(False), torch.no_grad():
        if neurons is not None:
            # one forward per distinct image, however many projections name it
            wanted, rows = torch.unique(neurons[:, 0], return_inverse=True)
            batch = images.index_select(0, wanted)
        else:
            rows, batch = None, images
        forward = run_forward(plan, batch, kernels, keep_lrn_inputs=lrn == "gradient")
        output = forward.output
        if neurons is not None:
            selection = _Selection(rows, neurons[:, 1], neurons[:, 2], neurons[:, 3], True)
        elif channel is not None:
            every = torch.arange(images.shape[0], device=images.device)
            chosen = torch.full_like(every, channel)
            if flat:
                y = x = torch.zeros_like(every)
            elif position is None:
                strongest = output[:, channel].flatten(1).argmax(dim=1)  # the first maximum, row-major
                y, x = strongest // target_shape[2], strongest % target_shape[2]
            else:
                y, x = torch.full_like(every, position[0]), torch.full_like(every, position[1])
            selection = _Selection(every, chosen, y, x, True)
        else:
            selection = _Selection(torch.arange(images.shape[0], device=images.device), None, None, None, False)

        program = _reverse_program(plan, shapes, forward, kernels, lrn, like=images)
        return _reverse(program, output, selection, seed, shapes[0], crop=kernels.crop and not flat)


def _reverse(program: List[_Reverse], output: torch.Tensor, selection: _Selection, seed: str, input_shape,
             crop: bool) -> torch.Tensor:
    """Seeds -> pixels, chunk by chunk of projections."""
    target_shape = tuple(output.shape[1:])
    flat = len(target_shape) == 1
    count = selection.count
    result = output.new_zeros((count,) + tuple(input_shape))
    if count == 0:
        return result
    point_windows = selection.points and not flat
    windowed, peak = _schedule(program, crop) if point_windows else ([False] * len(program), 1)
    if not point_windows:
        peak = max([_numel(target_shape)] + [op.peak_elements() for op in program])
    chunk = max(1, min(count, CHUNK_ELEMENTS // max(peak, 1)))

    for start in range(0, count, chunk):
        stop = min(start + chunk, count)
        images = selection.images[start:stop]
        g, windows = _seeds(output, selection, start, stop, seed, point_windows)
        for op, on_windows in zip(program, windowed):
            if windows is not None and not on_windows:
                g, windows = windows.paste(g, op.out_shape[1:]), None
            if windows is None:
                g = op.full(g, images)
            else:
                g, windows = op.window(g, images, windows), op.grow(windows)
        if windows is not None:
            g = windows.paste(g, input_shape[1:])
        result[start:stop] = g
    return result


def _seeds(output: torch.Tensor, selection: _Selection, start: int, stop: int, seed: str,
           point_windows: bool) -> Tuple[torch.Tensor, Optional[_Windows]]:
    """The seed maps of projections [start, stop): 1x1 windows at the selected positions (spatial
    point seeds), one-hot rows (flat layers), or the whole activation maps."""
    images = selection.images[start:stop]
    if not selection.points:
        values = output.index_select(0, images)
        return (torch.ones_like(values) if seed == "one" else values), None
    channels = selection.channels[start:stop]
    count = stop - start
    if output.dim() == 2:  # flat: (image, unit)
        values = output[images, channels]
        g = output.new_zeros(count, output.shape[1])
        return g.scatter_(1, channels[:, None], (torch.ones_like(values) if seed == "one" else values)[:, None]), None
    y, x = selection.y[start:stop], selection.x[start:stop]
    values = output[images, channels, y, x]
    if seed == "one":
        values = torch.ones_like(values)
    g = output.new_zeros(count, output.shape[1])
    g.scatter_(1, channels[:, None], values[:, None])
    return g.view(count, output.shape[1], 1, 1), _Windows(y.clone(), x.clone(), 1, 1)
