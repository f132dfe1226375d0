"""Layer kinds: one class per kind of layer, each knowing its recognition, shape, forward, reverse per
rule and window growth. Importing this package registers them all with the graph reader."""
from .base import FUNCTION_KINDS, METHOD_KINDS, MODULE_KINDS, At, Call, Keeper, Kind, register
from .activations import ReLU, ReLU6, Rectifier
from .conv import Conv
from .linear import Linear
from .normalization import LRN_MODES, BatchNorm, LocalResponseNorm
from .pooling import AdaptiveAvgPool, AvgPool, MaxPool, SpatialMean
from .structure import Add, Cat, Flatten, Identity

__all__ = ["Kind", "register", "Call", "At", "Keeper", "LRN_MODES", "MODULE_KINDS",
           "FUNCTION_KINDS", "METHOD_KINDS", "Conv", "ReLU", "ReLU6", "Rectifier", "MaxPool", "AvgPool",
           "AdaptiveAvgPool", "SpatialMean", "BatchNorm", "LocalResponseNorm", "Linear", "Identity", "Flatten",
           "Add", "Cat"]


def supported() -> str:
    """What the graph reader recognises, for error messages."""
    names = []
    for kind in [Conv, ReLU, ReLU6, MaxPool, AvgPool, AdaptiveAvgPool, SpatialMean, BatchNorm, LocalResponseNorm,
                 Linear, Flatten, Add, Cat, Identity]:
        forms = [t.__name__ for t in kind.modules] + [_function_name(f) for f in kind.functions] + \
                [f"Tensor.{m}" for m in kind.methods]
        forms = list(dict.fromkeys(forms))  # F.conv2d is torch.conv2d
        names.append(f"{kind.name} ({', '.join(forms)})")
    return "; ".join(names)


def _function_name(function) -> str:
    """How a user writes ``function``: ``F.gelu`` (also for builtins such as torch._C._nn.gelu),
    ``torch.cat``, ``operator.mul``, ``+``."""
    import operator

    import torch
    import torch.nn.functional as F

    if function in (operator.add, operator.iadd):
        return "+" if function is operator.add else "+="
    module = getattr(function, "__module__", None) or ""
    name = getattr(function, "__name__", repr(function))
    if module.startswith("torch.nn.functional") or getattr(F, name, None) is function:
        return f"F.{name}"
    if getattr(torch, name, None) is function:
        return f"torch.{name}"
    if module in ("_operator", "operator"):
        return f"operator.{name}"
    return f"{module}.{name}" if module else name
