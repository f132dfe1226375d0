"""Per-shape dispatch by measurement: where an op has several exact implementations, time each once
per shape (batch sizes by powers of two), device and dtype, and use the fastest for the rest of the
process (as ``torch.backends.cudnn.benchmark`` does for convolutions).

The measurement is fair to every candidate: each is first run once untimed (its warm-up: cuDNN
builds its plans, the caching allocator and the caches fill, a nested choice is made), then timed
over several runs, of which the median counts: with CUDA events on the GPU, with the wall clock on
the CPU. On the CPU the timed runs stop once they have taken ``CPU_MEASURE_BUDGET_S`` (after one at
least), so that where a call is slow a shape's first call costs two calls of each candidate. The
call's result is the chosen candidate's last one.

    kernels = Dispatcher(ops)          # ops: deconvcuda.ops
    kernels.deconv2d(...)              # the op, or a GEMM + col2im, whichever was faster for this shape
    kernels.unpool_relu_deconv2d(...)  # the fused kernel, or unpool_relu followed by the fastest deconv2d

Every candidate computes the same numbers up to floating-point rounding; which one ran can change the
last bits. For bit-reproducible runs turn it off: ``deconvcuda.dispatch.AUTOTUNE = False`` or the
environment variable ``DECONVCUDA_AUTOTUNE=0``; then the native op always runs.
"""
from __future__ import annotations

import os
import statistics
import time
from typing import Callable, Dict, Hashable, List, Optional, Tuple

import torch
import torch.nn.functional as F

from .geometry import deconv_min_output_size, pair

__all__ = ["AUTOTUNE", "Dispatcher", "deconv2d_gemm", "measure"]

#: Whether to time the candidates and pick the fastest (False: always the native op).
AUTOTUNE = os.environ.get("DECONVCUDA_AUTOTUNE", "1").strip().lower() not in ("0", "false", "no", "off")

#: The choices made so far in this process: {(op, shapes, arguments, device, dtype): candidate name}.
#: Batch sizes count by powers of two, so the chunks of one run (and the next runs) reuse a choice.
CHOICES: Dict[Hashable, str] = {}

#: Timed runs of each candidate after its warm-up; the median counts.
TIMED_RUNS = 5

#: On the CPU a candidate's timed runs stop once they have taken this long (one run at least).
CPU_MEASURE_BUDGET_S = 0.02

#: The GEMM + col2im deconvolution is a candidate only for inputs of at most this many positions
#: (the windows of point projections); on whole maps its column buffer is the map times the kernel.
GEMM_MAX_POSITIONS = 256

#: ... and only where its column buffer (every input position times the filters) stays within this
#: many bytes: a batch of 144 windows of 15 x 15 positions reversing a 5 x 5 convolution to 64
#: channels would need 200 MB of columns (twice that while they are laid out for col2im), which
#: timing it would add to the run's peak memory for a candidate that loses there anyway.
GEMM_MAX_COLUMN_BYTES = 32 * 2 ** 20


def _bucket(batch: int) -> int:
    """The power of two at or above ``batch``."""
    return 1 << max(0, int(batch) - 1).bit_length()


def _gemm_column_bytes(input: torch.Tensor, weight: torch.Tensor, groups: int) -> int:
    """The bytes of ``deconv2d_gemm``'s column buffer: each input position times each output channel's taps."""
    positions = input.shape[0] * input.shape[2] * input.shape[3]
    return positions * groups * weight[0].numel() * input.element_size()


def deconv2d_gemm(input: torch.Tensor, weight: torch.Tensor, stride=1, padding=0, dilation=1, groups: int = 1,
                  output_size=None) -> torch.Tensor:
    """The transposed convolution as one matrix product per group and a col2im (``F.fold``): each
    input position times the filters gives the kernel-sized patch it adds to the output. No
    convolution library's setup cost, so it can win on the small windows of point projections."""
    stride, padding, dilation = pair(stride), pair(padding), pair(dilation)
    p, c_out, h, w = input.shape
    c_in_group, kh, kw = weight.shape[1:]
    if output_size is None:
        output_size = [deconv_min_output_size((h, w)[i], (kh, kw)[i], stride[i], padding[i], dilation[i])
                       for i in range(2)]
    rows = input.permute(0, 2, 3, 1).reshape(p * h * w, groups, c_out // groups).transpose(0, 1)  # [G, PHW, Co/G]
    filters = weight.reshape(groups, c_out // groups, c_in_group * kh * kw)                         # [G, Co/G, Ci/G k]
    columns = torch.mm(rows[0], filters[0])[None] if groups == 1 else torch.bmm(rows, filters)    # [G, PHW, Ci/G k]
    columns = columns.view(groups, p, h * w, c_in_group * kh * kw).permute(1, 0, 3, 2)
    columns = columns.reshape(p, groups * c_in_group * kh * kw, h * w)
    return F.fold(columns, tuple(output_size), (kh, kw), dilation=dilation, padding=padding, stride=stride)


class Dispatcher:
    """The native ops, with ``deconv2d`` and ``unpool_relu_deconv2d`` chosen by measurement."""

    def __init__(self, ops):
        self.ops = ops
        self.max_pool2d_switches = ops.max_pool2d_switches
        self.unpool_relu = ops.unpool_relu

    def _choose(self, op: str, candidates: Dict[str, Callable[[], torch.Tensor]], key: Hashable,
                like: torch.Tensor) -> torch.Tensor:
        if not AUTOTUNE:
            return next(iter(candidates.values()))()
        key = (op, key, like.device.type, like.dtype)
        chosen = CHOICES.get(key)
        if chosen is not None:
            return candidates[chosen]()
        if len(candidates) == 1:
            return next(iter(candidates.values()))()
        best: Optional[Tuple[float, str, torch.Tensor]] = None
        for name, candidate in candidates.items():
            seconds, result = measure(candidate, like.device)
            if best is None or seconds < best[0]:
                best = (seconds, name, result)
        CHOICES[key] = best[1]
        return best[2]

    def deconv2d(self, input, weight, stride=1, padding=0, dilation=1, groups=1, output_size=None):
        if input.numel() == 0 or weight.numel() == 0:
            return self.ops.deconv2d(input, weight, stride, padding, dilation, groups, output_size)
        key = (_bucket(input.shape[0]),) + tuple(input.shape[1:]) + (tuple(weight.shape), str(stride), str(padding),
                                                                    str(dilation), groups, str(output_size))
        candidates = {"op": lambda: self.ops.deconv2d(input, weight, stride, padding, dilation, groups, output_size)}
        if input.shape[2] * input.shape[3] <= GEMM_MAX_POSITIONS and \
                _gemm_column_bytes(input, weight, groups) <= GEMM_MAX_COLUMN_BYTES:
            candidates["gemm"] = lambda: deconv2d_gemm(input, weight, stride, padding, dilation, groups, output_size)
        return self._choose("deconv2d", candidates, key, input)

    def unpool_relu_deconv2d(self, grad, switches, weight, input_size, kernel_size, stride=None, padding=0,
                             dilation=1, conv_stride=1, conv_padding=0, conv_dilation=1, groups=1, output_size=None,
                             rule="deconvnet", positive=None):
        if grad.numel() == 0 or weight.numel() == 0:
            return self.ops.unpool_relu_deconv2d(grad, switches, weight, input_size, kernel_size, stride, padding,
                                                 dilation, conv_stride, conv_padding, conv_dilation, groups,
                                                 output_size, rule, positive)
        key = (_bucket(grad.shape[0]),) + tuple(grad.shape[1:]) + (tuple(weight.shape), str(input_size), str(kernel_size), str(stride), str(padding),
               str(dilation), str(conv_stride), str(conv_padding), str(conv_dilation), groups, str(output_size), rule)

        def fused():
            return self.ops.unpool_relu_deconv2d(grad, switches, weight, input_size, kernel_size, stride, padding,
                                                 dilation, conv_stride, conv_padding, conv_dilation, groups,
                                                 output_size, rule, positive)

        def unpool_then_deconv():
            unpooled = self.ops.unpool_relu(grad, switches, input_size, kernel_size, stride, padding, dilation, rule,
                                            positive)
            return self.deconv2d(unpooled, weight, conv_stride, conv_padding, conv_dilation, groups, output_size)

        return self._choose("unpool_relu_deconv2d", {"fused": fused, "unpool+deconv2d": unpool_then_deconv}, key,
                            grad)


def measure(candidate: Callable[[], torch.Tensor], device: torch.device) -> Tuple[float, torch.Tensor]:
    """The median seconds of ``candidate`` on ``device`` after one untimed warm-up call, and its last
    result: ``TIMED_RUNS`` runs timed with CUDA events on the GPU (queued back to back, one
    synchronisation at the end), with the wall clock on the CPU, where the timed runs stop once they
    have taken ``CPU_MEASURE_BUDGET_S`` together (after one run at least)."""
    if device.type == "cuda":
        return _measure_cuda(candidate, device)
    result = candidate()
    seconds: List[float] = []
    while len(seconds) < TIMED_RUNS and (not seconds or sum(seconds) < CPU_MEASURE_BUDGET_S):
        start = time.perf_counter()
        result = candidate()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), result


def _measure_cuda(candidate: Callable[[], torch.Tensor], device: torch.device) -> Tuple[float, torch.Tensor]:
    with torch.cuda.device(device):
        stream = torch.cuda.current_stream(device)
        result = candidate()
        stream.synchronize()  # the warm-up, plans and allocations included, is over before timing
        events = []
        for _ in range(TIMED_RUNS):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            result = candidate()
            end.record(stream)
            events.append((start, end))
        events[-1][1].synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events) / 1e3, result
