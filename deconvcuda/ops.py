"""The four deconvcuda operators: thin wrappers over ``torch.ops.deconvcuda`` and their fake kernels.

Every size argument takes an int or a pair. The wrappers turn ``stride=None`` into the kernel size
and ``output_size=None`` into the smallest size the transposed convolution produces, then call the
operator, whose C++ kernels check everything else. The fake (meta) kernels below repeat those checks
with the same messages, so ``torch.compile`` fails while tracing the way eager execution fails.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
from torch._prims_common import suggest_memory_format

from . import _C  # noqa: F401  (loads the library that registers torch.ops.deconvcuda)
from . import rules
from .geometry import checked_pair, deconv_min_output_size, pool_output_size

IntPair = Union[int, Sequence[int]]

__all__ = ["max_pool2d_switches", "unpool_relu", "deconv2d", "unpool_relu_deconv2d"]

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
#: The reverse rules of the ReLU before a max pool that the kernels serve (csrc/common/rules.h).
RULES = rules.kernel_names()
_MAX_KERNEL_TAPS = 256  # uint8 switches name at most 256 taps (16x16)


# --------------------------------------------------------------------------------------------- #
# Argument normalisation (Python-side only: the operators take explicit pairs)
# --------------------------------------------------------------------------------------------- #

def _spatial_size(op: str, name: str, value) -> Tuple[int, int]:
    """input_size / output_size: a pair, or a full [N, C, H, W] size whose last two entries count."""
    if isinstance(value, (torch.Size, tuple, list)) and len(value) == 4:
        value = tuple(value)[2:]
    return checked_pair(value, op, name)


def _default_output_size(op: str, input_hw, weight: torch.Tensor, stride, padding, dilation):
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        return (1, 1)  # the operator reports the bad weight itself
    return tuple(deconv_min_output_size(input_hw[i], weight.shape[2 + i], stride[i], padding[i], dilation[i])
                 for i in range(2))


# --------------------------------------------------------------------------------------------- #
# Public wrappers (signatures fixed by the public API, docs/DESIGN.md section 1.1)
# --------------------------------------------------------------------------------------------- #

def max_pool2d_switches(input: torch.Tensor, kernel_size: IntPair, stride: Optional[IntPair] = None,
                        padding: IntPair = 0, dilation: IntPair = 1,
                        ceil_mode: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """``max_pool2d`` that also returns its switches: for every output, the window-local index
    ``ky * kernel_w + kx`` of the maximum, as uint8. First maximum in row-major window order; NaN is
    a maximum (PyTorch's rule). Returns ``(output, switches)``, both ``[N, C, H_out, W_out]``, in the
    input's memory format (channels-last stays channels-last, as with ``max_pool2d``)."""
    op = "max_pool2d_switches"
    kernel = checked_pair(kernel_size, op, "kernel_size")
    stride = kernel if stride is None else checked_pair(stride, op, "stride")
    return torch.ops.deconvcuda.max_pool2d_switches(
        input, kernel, stride, checked_pair(padding, op, "padding"), checked_pair(dilation, op, "dilation"), bool(ceil_mode))


def unpool_relu(grad: torch.Tensor, switches: torch.Tensor, input_size, kernel_size: IntPair,
                stride: Optional[IntPair] = None, padding: IntPair = 0, dilation: IntPair = 1,
                rule: str = "deconvnet", positive: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``relu`` of the switch-based unpooling of ``grad`` to the pool's ``input_size``. Where
    windows overlap, contributions to the same position add up before the ReLU (the gradient of
    max_pool2d, not ``nn.MaxUnpool2d``).

    ``rule`` is the reverse of the ReLU before the pool: ``"deconvnet"`` (the above; ``positive`` is
    not read), ``"guided"`` (values where ``positive`` is False are dropped before the sum, then the
    ReLU) or ``"gradient"`` (dropped likewise, no ReLU: with ``positive=None``, max_pool2d's
    backward). ``positive``: bool, shaped like ``grad``, whether the pool's forward output was > 0."""
    op = "unpool_relu"
    kernel = checked_pair(kernel_size, op, "kernel_size")
    stride = kernel if stride is None else checked_pair(stride, op, "stride")
    return torch.ops.deconvcuda.unpool_relu(
        grad, switches, _spatial_size(op, "input_size", input_size), kernel, stride,
        checked_pair(padding, op, "padding"), checked_pair(dilation, op, "dilation"), rule=rule, positive=positive)


def deconv2d(input: torch.Tensor, weight: torch.Tensor, stride: IntPair = 1, padding: IntPair = 0,
             dilation: IntPair = 1, groups: int = 1, output_size=None) -> torch.Tensor:
    """The transposed convolution with the forward Conv2d's weight ``[C_out, C_in/groups, kh, kw]``
    (``conv_transpose2d``, no bias): the input-gradient of that conv. ``output_size`` picks the exact
    spatial size (the forward input's); by default the smallest one. The output has the input's
    memory format (channels-last stays channels-last, as with ``conv_transpose2d``)."""
    op = "deconv2d"
    stride, padding, dilation = (checked_pair(stride, op, "stride"), checked_pair(padding, op, "padding"),
                                 checked_pair(dilation, op, "dilation"))
    if output_size is None:
        hw = tuple(input.shape[2:]) if isinstance(input, torch.Tensor) and input.dim() == 4 else (1, 1)
        output_size = _default_output_size(op, hw, weight, stride, padding, dilation)
    return torch.ops.deconvcuda.deconv2d(input, weight, stride, padding, dilation, int(groups),
                                         _spatial_size(op, "output_size", output_size))


def unpool_relu_deconv2d(grad: torch.Tensor, switches: torch.Tensor, weight: torch.Tensor, input_size,
                         kernel_size: IntPair, stride: Optional[IntPair] = None, padding: IntPair = 0,
                         dilation: IntPair = 1, conv_stride: IntPair = 1, conv_padding: IntPair = 0,
                         conv_dilation: IntPair = 1, groups: int = 1, output_size=None, rule: str = "deconvnet",
                         positive: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``deconv2d(unpool_relu(grad, switches, input_size, kernel_size, stride, padding, dilation,
    rule, positive), weight, conv_stride, conv_padding, conv_dilation, groups, output_size)`` in one
    kernel that gathers, for each pooled value, the filter tap its switch selects: the reverse of
    conv -> relu -> maxpool. ``input_size`` is the pool's input (the conv's output)."""
    op = "unpool_relu_deconv2d"
    kernel = checked_pair(kernel_size, op, "kernel_size")
    stride = kernel if stride is None else checked_pair(stride, op, "stride")
    input_hw = _spatial_size(op, "input_size", input_size)
    conv_stride, conv_padding, conv_dilation = (checked_pair(conv_stride, op, "conv_stride"),
                                                checked_pair(conv_padding, op, "conv_padding"),
                                                checked_pair(conv_dilation, op, "conv_dilation"))
    if output_size is None:
        output_size = _default_output_size(op, input_hw, weight, conv_stride, conv_padding, conv_dilation)
    return torch.ops.deconvcuda.unpool_relu_deconv2d(
        grad, switches, weight, input_hw, kernel, stride, checked_pair(padding, op, "padding"),
        checked_pair(dilation, op, "dilation"), conv_stride, conv_padding, conv_dilation, int(groups),
        _spatial_size(op, "output_size", output_size), rule=rule, positive=positive)


# --------------------------------------------------------------------------------------------- #
# Fake kernels: shapes for torch.compile / FakeTensor, with the C++ checks' messages
# (csrc/common/checks.h). Keep the two in step.
# --------------------------------------------------------------------------------------------- #

def _fail(cond: bool, message: str) -> None:
    if not cond:
        raise RuntimeError(message)


def _check_4d(op, name, t):
    _fail(t.dim() == 4, f"{op}: {name} must be 4-D [N, C, H, W], got {t.dim()}-D with shape {list(t.shape)}")


def _check_floating(op, name, t):
    _fail(t.dtype in _FLOAT_DTYPES, f"{op}: {name} must be float32, float64, float16 or bfloat16, got {t.dtype}")


def _check_positive(op, name, values):
    _fail(len(values) == 2, f"{op}: {name} must have 2 elements, got {len(values)}")
    _fail(values[0] > 0 and values[1] > 0, f"{op}: {name} must be positive, got {list(values)}")


def _check_non_negative(op, name, values):
    _fail(len(values) == 2, f"{op}: {name} must have 2 elements, got {len(values)}")
    _fail(values[0] >= 0 and values[1] >= 0, f"{op}: {name} must be non-negative, got {list(values)}")


def _check_switches(op, switches, grad):
    _fail(switches.dtype == torch.uint8, f"{op}: switches must be uint8, got {switches.dtype}")
    _fail(switches.device == grad.device,
          f"{op}: switches must be on the device of grad ({grad.device}), got {switches.device}")
    _fail(switches.shape == grad.shape,
          f"{op}: switches must have the shape of grad {list(grad.shape)}, got {list(switches.shape)}")


def _check_rule(op, rule, positive, grad):
    _fail(rule in RULES, f'{op}: rule must be {rules.quoted(RULES)}, got "{rule}"')
    if positive is None:
        return
    _fail(positive.dtype == torch.bool,
          f"{op}: positive must be bool (whether the pool's forward output was > 0), got {positive.dtype}")
    _fail(positive.device == grad.device,
          f"{op}: positive must be on the device of grad ({grad.device}), got {positive.device}")
    _fail(positive.shape == grad.shape,
          f"{op}: positive must have the shape of grad {list(grad.shape)}, got {list(positive.shape)}")


def _check_pool(op, kernel_size, stride, padding, dilation):
    _check_positive(op, "kernel_size", kernel_size)
    _check_positive(op, "stride", stride)
    _check_non_negative(op, "padding", padding)
    _check_positive(op, "dilation", dilation)
    _fail(kernel_size[0] * kernel_size[1] <= _MAX_KERNEL_TAPS,
          f"{op}: kernel_size must have at most 256 taps (16x16) so that a uint8 switch can name each, "
          f"got {list(kernel_size)}")
    _fail(padding[0] <= kernel_size[0] // 2 and padding[1] <= kernel_size[1] // 2,
          f"{op}: padding must be at most half of kernel_size {list(kernel_size)}, got {list(padding)}")


def _check_input_size_pools_to(op, input_size, grad, kernel_size, stride, padding, dilation):
    _check_positive(op, "input_size", input_size)
    for axis in range(2):
        floor_size = pool_output_size(input_size[axis], kernel_size[axis], stride[axis], padding[axis],
                                       dilation[axis], False)
        ceil_size = pool_output_size(input_size[axis], kernel_size[axis], stride[axis], padding[axis],
                                      dilation[axis], True)
        pooled = grad.shape[2 + axis]
        _fail(pooled == floor_size or pooled == ceil_size,
              f"{op}: input_size {list(input_size)} pools to {floor_size} (ceil_mode: {ceil_size}) along dim "
              f"{axis + 2}, but grad has {pooled}")


def _check_deconv_weight_and_size(op, input_name, input, weight, input_hw, stride, padding, dilation, groups,
                                  output_size, names=("stride", "padding", "dilation")):
    _fail(weight.dim() == 4, f"{op}: weight must be 4-D [C_out, C_in / groups, kh, kw], got {weight.dim()}-D "
                             f"with shape {list(weight.shape)}")
    _fail(weight.dtype == input.dtype,
          f"{op}: weight must have the dtype of {input_name} ({input.dtype}), got {weight.dtype}")
    _fail(weight.device == input.device,
          f"{op}: weight must be on the device of {input_name} ({input.device}), got {weight.device}")
    _fail(groups > 0, f"{op}: groups must be positive, got {groups}")
    _fail(weight.shape[0] % groups == 0,
          f"{op}: weight.size(0) ({weight.shape[0]}) must be divisible by groups ({groups})")
    _fail(input.shape[1] == weight.shape[0],
          f"{op}: {input_name} must have weight.size(0) = {weight.shape[0]} channels (the forward conv's C_out), "
          f"got {input.shape[1]}")
    _check_positive(op, names[0], stride)
    _check_non_negative(op, names[1], padding)
    _check_positive(op, names[2], dilation)
    _check_positive(op, "output_size", output_size)
    for axis in range(2):
        smallest = deconv_min_output_size(input_hw[axis], weight.shape[2 + axis], stride[axis], padding[axis],
                                          dilation[axis])
        _fail(smallest <= output_size[axis] <= smallest + stride[axis] - 1 and output_size[axis] >= 1,
              f"{op}: output_size {list(output_size)} cannot be reached along dim {axis + 2}: a transposed conv "
              f"of {input_hw[axis]} positions gives {smallest} to {smallest + stride[axis] - 1}")
    return weight.shape[1] * groups


@torch.library.register_fake("deconvcuda::max_pool2d_switches")
def _(input, kernel_size, stride, padding, dilation, ceil_mode):
    op = "max_pool2d_switches"
    _check_4d(op, "input", input)
    _check_floating(op, "input", input)
    _check_pool(op, kernel_size, stride, padding, dilation)
    out_h, out_w = (pool_output_size(input.shape[2 + i], kernel_size[i], stride[i], padding[i], dilation[i],
                                      ceil_mode) for i in range(2))
    _fail(out_h >= 1 and out_w >= 1,
          f"{op}: input of spatial size {list(input.shape[2:])} is too small for kernel_size {list(kernel_size)}, "
          f"dilation {list(dilation)} and padding {list(padding)} (output would be {out_h}x{out_w})")
    shape = (input.shape[0], input.shape[1], out_h, out_w)
    # in the input's memory format (channels-last stays channels-last), as PyTorch's max_pool2d
    format = suggest_memory_format(input)
    return (torch.empty(shape, dtype=input.dtype, device=input.device, memory_format=format),
            torch.empty(shape, dtype=torch.uint8, device=input.device, memory_format=format))


@torch.library.register_fake("deconvcuda::unpool_relu")
def _(grad, switches, input_size, kernel_size, stride, padding, dilation, rule="deconvnet", positive=None):
    op = "unpool_relu"
    _check_4d(op, "grad", grad)
    _check_floating(op, "grad", grad)
    _check_switches(op, switches, grad)
    _check_pool(op, kernel_size, stride, padding, dilation)
    _check_input_size_pools_to(op, input_size, grad, kernel_size, stride, padding, dilation)
    _check_rule(op, rule, positive, grad)
    return grad.new_empty((grad.shape[0], grad.shape[1], input_size[0], input_size[1]))


@torch.library.register_fake("deconvcuda::deconv2d")
def _(input, weight, stride, padding, dilation, groups, output_size):
    op = "deconv2d"
    _check_4d(op, "input", input)
    _check_floating(op, "input", input)
    channels = _check_deconv_weight_and_size(op, "input", input, weight, input.shape[2:], stride, padding, dilation,
                                             groups, output_size)
    # in the input's memory format, as ATen's transposed convolution (csrc/common/checks.h's deconv2d)
    return torch.empty((input.shape[0], channels, output_size[0], output_size[1]), dtype=input.dtype,
                       device=input.device, memory_format=suggest_memory_format(input))


@torch.library.register_fake("deconvcuda::unpool_relu_deconv2d")
def _(grad, switches, weight, input_size, kernel_size, stride, padding, dilation, conv_stride, conv_padding,
      conv_dilation, groups, output_size, rule="deconvnet", positive=None):
    op = "unpool_relu_deconv2d"
    _check_4d(op, "grad", grad)
    _check_floating(op, "grad", grad)
    _check_switches(op, switches, grad)
    _check_pool(op, kernel_size, stride, padding, dilation)
    _check_input_size_pools_to(op, input_size, grad, kernel_size, stride, padding, dilation)
    channels = _check_deconv_weight_and_size(op, "grad", grad, weight, input_size, conv_stride, conv_padding,
                                             conv_dilation, groups, output_size,
                                             ("conv_stride", "conv_padding", "conv_dilation"))
    _check_rule(op, rule, positive, grad)
    return grad.new_empty((grad.shape[0], channels, output_size[0], output_size[1]))
