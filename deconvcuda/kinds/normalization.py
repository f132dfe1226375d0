"""Normalisations. BatchNorm in eval (every form: the modules, ``F.batch_norm``, timm's BatchNormAct):
reverse ``g * gamma / sqrt(var + eps)`` per channel. LayerNorm (the module, ``F.layer_norm``, and so
torchvision's and timm's LayerNorm2d, which call it between two permutes): its exact gradient, at the
input the forward kept. LocalResponseNorm: its true gradient, or the identity with
``lrn="identity"`` (Caffe's deconv_ignore)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Kind, register, vjp

__all__ = ["BatchNorm", "LayerNorm", "LocalResponseNorm", "LRN_MODES"]

LRN_MODES = ("gradient", "identity")


@register
class BatchNorm(Kind):
    """Eval-mode batch norm: an affine map per channel (dim 1) with the running statistics. A call
    that normalises with the batch's own statistics (training=True, or no running statistics) mixes
    the images: it is not this kind, and takes its gradient as a general op."""

    name = "BatchNorm"
    modules = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
    functions = (F.batch_norm,)
    arguments = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
    pointwise = True

    def __init__(self, running_mean, running_var, weight, bias, eps, label):
        self.running_mean, self.running_var, self.weight, self.bias = running_mean, running_var, weight, bias
        self.eps, self.label = eps, label

    @classmethod
    def from_module(cls, module, call):
        if module.running_mean is None or module.running_var is None:
            call.unsupported("has no running statistics (track_running_stats=False), so even in eval it normalises "
                             "with the batch's own statistics")
        call.data("input")
        return cls(module.running_mean, module.running_var, module.weight, module.bias, module.eps,
                   type(module).__name__)

    @classmethod
    def from_call(cls, call):
        if call.get("training", False):
            call.unsupported("normalises with the batch's own statistics (training=True)")
        call.data("input")
        running_mean, running_var = call.parameter("running_mean"), call.parameter("running_var")
        return cls(running_mean, running_var, call.parameter("weight", optional=True),
                   call.parameter("bias", optional=True), call.get("eps", 1e-5), "F.batch_norm")

    def input_channels(self):
        return self.running_var.numel()

    def describe_reverse(self, rule):
        return "its gradient (g * gamma / sqrt(var + eps) per channel)"

    def output_shape(self, shape):
        if len(shape) < 1 or shape[0] != self.running_var.numel():
            raise ValueError(f"expects {self.running_var.numel()} channels, got [N, {', '.join(map(str, shape))}]")
        return shape

    def forward(self, x):
        return F.batch_norm(x, self.cast(self.running_mean, x), self.cast(self.running_var, x),
                            self.cast(self.weight, x), self.cast(self.bias, x), False, 0.0, self.eps)

    def scale(self, like: torch.Tensor) -> torch.Tensor:
        """gamma / sqrt(var + eps) as [1, C, 1, ...] for ``like``'s rank, rounded once from float32 or better."""
        cache = self.__dict__.setdefault("_scale_cache", {})
        key = (like.dtype, like.device, like.dim())
        if key not in cache:
            wide = torch.promote_types(like.dtype, torch.float32)
            var = self.running_var.detach().to(device=like.device, dtype=wide)
            gamma = torch.ones_like(var) if self.weight is None else self.weight.detach().to(like.device, wide)
            cache[key] = (gamma / torch.sqrt(var + self.eps)).to(like.dtype).view(1, -1, *[1] * (like.dim() - 2))
        return cache[key]

    def reverse(self, g, at):
        return [g * self.scale(g)]


@register
class LayerNorm(Kind):
    """Layer norm over the trailing dims: its exact gradient, ATen's own layer-norm backward at the
    input, mean and reciprocal deviation the forward kept (one pass over the images; nothing is
    recomputed per projection)."""

    name = "LayerNorm"
    modules = (nn.LayerNorm,)
    functions = (F.layer_norm,)
    arguments = ("input", "normalized_shape", "weight", "bias", "eps")
    windowed = False
    paper = False

    def __init__(self, normalized_shape, weight, bias, eps, label):
        self.normalized_shape = [int(n) for n in ((normalized_shape,) if isinstance(normalized_shape, int)
                                                  else normalized_shape)]
        self.weight, self.bias, self.eps, self.label = weight, bias, eps, label

    @classmethod
    def from_module(cls, module, call):
        call.data("input")
        return cls(module.normalized_shape, module.weight, module.bias, module.eps, type(module).__name__)

    @classmethod
    def from_call(cls, call):
        shape = call.get("normalized_shape")
        if not isinstance(shape, (int, list, tuple)) or not all(isinstance(n, int) for n in (
                (shape,) if isinstance(shape, int) else shape)):
            call.unsupported("normalises over a shape computed in the forward")
        call.data("input")
        return cls(shape, call.parameter("weight", optional=True), call.parameter("bias", optional=True),
                   call.get("eps", 1e-5), "F.layer_norm")

    def describe_reverse(self, rule):
        return f"its gradient ({self.label})"

    def output_shape(self, shape):
        if tuple(shape[len(shape) - len(self.normalized_shape):]) != tuple(self.normalized_shape):
            raise ValueError(f"normalises over {self.normalized_shape}, but its input is "
                             f"[N, {', '.join(map(str, shape))}]")
        return shape

    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.cast(self.weight, x), self.cast(self.bias, x), self.eps)

    def forward_keeping(self, inputs, keeper):
        """F.layer_norm is ATen's native_layer_norm: the same output, and its mean and 1/deviation."""
        x = inputs[0]
        out, mean, rstd = torch.native_layer_norm(x, self.normalized_shape, self.cast(self.weight, x),
                                                  self.cast(self.bias, x), self.eps)
        return out, (x.contiguous(), mean, rstd)

    def reverse(self, g, at):
        x, mean, rstd = (kept[at.images] for kept in at.saved)
        weight = self.cast(self.weight, g)
        grad = torch.ops.aten.native_layer_norm_backward(g.contiguous(), x, self.normalized_shape, mean, rstd, weight,
                                                         None, [True, False, False])[0]
        return [grad]


@register
class LocalResponseNorm(Kind):
    """LRN mixes channels at one position only, so a window's gradient needs the input on that window."""

    name = "LocalResponseNorm"
    modules = (nn.LocalResponseNorm,)
    functions = (F.local_response_norm,)
    arguments = ("input", "size", "alpha", "beta", "k")
    pointwise = True

    def __init__(self, size, alpha, beta, k):
        self.size, self.alpha, self.beta, self.k = size, alpha, beta, k

    @classmethod
    def from_module(cls, module, call):
        call.data("input")
        return cls(module.size, module.alpha, module.beta, module.k)

    @classmethod
    def from_call(cls, call):
        call.data("input")
        return cls(call.get("size"), call.get("alpha", 1e-4), call.get("beta", 0.75), call.get("k", 1.0))

    def describe_reverse(self, rule):
        return "its gradient (lrn='gradient'; the identity with lrn='identity')"

    def output_shape(self, shape):
        self.need_spatial(shape)
        return shape

    def _lrn(self, x):
        return F.local_response_norm(x, self.size, self.alpha, self.beta, self.k)

    def forward(self, x):
        """In float32 (or wider), rounded back to ``x``'s dtype: PyTorch's LRN (avg_pool3d) has no
        float16/bfloat16 kernel on the CPU; float32 is also what the kernels accumulate half precision in."""
        wide = torch.promote_types(x.dtype, torch.float32)
        return self._lrn(x.to(wide)).to(x.dtype)

    def forward_keeping(self, inputs, keeper):
        return self.forward(inputs[0]), (keeper.keep(inputs[0]) if keeper.lrn == "gradient" else None)

    def reverse(self, g, at):
        if at.lrn == "identity":
            return [g]
        (grad,) = vjp(self._lrn, [at.map_of(at.saved)], g, wide=True)
        if at.windows is not None:  # the clamped input outside the map is not the map's
            grad = at.windows.zero_outside(grad, at.in_shapes[0][1:])
        return [grad]
