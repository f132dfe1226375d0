"""Layer kinds: one class per kind of layer, each knowing its recognition, shape, forward, reverse,
window growth and occlusion cone. Importing this package registers them all with the graph reader;
a call no kind recognises is a ``General`` node (its exact gradient by autograd)."""
from .base import (FUNCTION_KINDS, KINDS, METHOD_KINDS, MODULE_KINDS, At, Call, Constant, Keeper, Kind, NotNative,
                   Unrepresentable, function_name, is_shape, register)
from .general import General, Nested, Ref, Template, Value
from .pointwise import Pointwise
from .activations import ReLU, ReLU6, Rectifier
from .conv import Conv
from .elementwise import Elementwise
from .linear import Linear
from .normalization import LRN_MODES, BatchNorm, LayerNorm, LocalResponseNorm
from .pooling import AdaptiveAvgPool, AvgPool, MaxPool, SpatialMean
from .shaping import Cat, Interpolate, LinearCall, Pad, Permute, Reshape, Split
from .structure import Identity

__all__ = ["Kind", "register", "Call", "At", "Keeper", "Constant", "NotNative", "Unrepresentable", "is_shape",
           "LRN_MODES", "MODULE_KINDS", "FUNCTION_KINDS", "METHOD_KINDS", "KINDS", "General", "Value", "Template",
           "Ref", "Nested", "Pointwise", "Conv", "ReLU", "ReLU6", "Rectifier", "MaxPool", "AvgPool", "AdaptiveAvgPool",
           "SpatialMean", "BatchNorm", "LayerNorm", "LocalResponseNorm", "Linear", "Identity", "Reshape", "Permute",
           "Cat", "LinearCall", "Pad", "Interpolate", "Split", "Elementwise", "supported", "function_name"]


def supported(paper_only: bool = False) -> str:
    """What the graph reader recognises natively (``paper_only``: the kinds ``strict=True`` keeps), for
    error messages: every registered kind with its forms."""
    names = []
    for kind in KINDS:
        if paper_only and not kind.paper:
            continue
        forms = [t.__name__ for t in kind.modules] + [function_name(f) for f in kind.functions] + \
                [f"Tensor.{m}" for m in kind.methods]
        forms = list(dict.fromkeys(forms))  # F.conv2d is torch.conv2d
        names.append(f"{kind.name} ({', '.join(forms)})")
    return "; ".join(names)
