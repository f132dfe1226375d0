"""BatchNorm2d in eval mode (reverse: g * gamma / sqrt(var + eps)) and LocalResponseNorm (its true
gradient, or the identity with ``lrn="identity"``, Caffe's deconv_ignore)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Kind, register

__all__ = ["BatchNorm", "LocalResponseNorm", "LRN_MODES"]

LRN_MODES = ("gradient", "identity")


@register
class BatchNorm(Kind):
    name = "BatchNorm2d"
    modules = (nn.BatchNorm2d,)

    def __init__(self, running_mean, running_var, weight, bias, eps):
        self.running_mean, self.running_var, self.weight, self.bias, self.eps = (running_mean, running_var, weight,
                                                                                 bias, eps)

    @classmethod
    def from_module(cls, module, call):
        if module.running_mean is None or module.running_var is None:
            call.fail("has no running statistics (track_running_stats=False); eval-mode batch norm needs them")
        call.data("input")
        return cls(module.running_mean, module.running_var, module.weight, module.bias, module.eps)

    def output_shape(self, shape):
        self.need_spatial(shape)
        if shape[0] != self.running_mean.numel():
            raise ValueError(f"expects {self.running_mean.numel()} channels, got {shape[0]}")
        return shape

    def forward(self, x):
        return F.batch_norm(x, self.cast(self.running_mean, x), self.cast(self.running_var, x),
                            self.cast(self.weight, x), self.cast(self.bias, x), False, 0.0, self.eps)

    def scale(self, like: torch.Tensor) -> torch.Tensor:
        """gamma / sqrt(var + eps) as [1, C, 1, 1], rounded once from float32 or better."""
        cache = self.__dict__.setdefault("_scale_cache", {})
        key = (like.dtype, like.device)
        if key not in cache:
            wide = torch.promote_types(like.dtype, torch.float32)
            var = self.running_var.detach().to(device=like.device, dtype=wide)
            gamma = torch.ones_like(var) if self.weight is None else self.weight.detach().to(like.device, wide)
            cache[key] = (gamma / torch.sqrt(var + self.eps)).to(like.dtype).view(1, -1, 1, 1)
        return cache[key]

    def reverse(self, g, at):
        return [g * self.scale(g)]


@register
class LocalResponseNorm(Kind):
    """LRN mixes channels at one position only, so a window's gradient needs the input on that window."""

    name = "LocalResponseNorm"
    modules = (nn.LocalResponseNorm,)
    functions = (F.local_response_norm,)
    arguments = ("input", "size", "alpha", "beta", "k")

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

    def output_shape(self, shape):
        self.need_spatial(shape)
        return shape

    def forward(self, x):
        """In float32 (or wider), rounded back to ``x``'s dtype: PyTorch's LRN (avg_pool3d) has no
        float16/bfloat16 kernel on the CPU; float32 is also what the kernels accumulate half precision in."""
        wide = torch.promote_types(x.dtype, torch.float32)
        return F.local_response_norm(x.to(wide), self.size, self.alpha, self.beta, self.k).to(x.dtype)

    def forward_keeping(self, inputs, keeper):
        return self.forward(inputs[0]), (keeper.rows(inputs[0]) if keeper.lrn == "gradient" else None)

    def reverse(self, g, at):
        if at.lrn == "identity":
            return [g]
        wide = torch.promote_types(g.dtype, torch.float32)
        with torch.enable_grad():
            x = at.map_of(at.saved).detach().to(wide).requires_grad_(True)
            y = F.local_response_norm(x, self.size, self.alpha, self.beta, self.k)
            (grad,) = torch.autograd.grad(y, x, g.to(wide))
        grad = grad.to(g.dtype)
        if at.windows is not None:  # the clamped input outside the map is not the map's
            grad = at.windows.zero_outside(grad, at.in_shapes[0][1:])
        return [grad]
