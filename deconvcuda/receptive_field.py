"""Receptive fields: which input pixels an activation of a layer can see, and patches of them.

    field = receptive_field(model, "features.10")
    field.size, field.stride, field.offset       # (height, width) pairs, in input pixels
    top, left, bottom, right = field.box(3, 5)   # the field of activation (y=3, x=5): half-open, unclipped
    patches = crop_patches(images, [field.box(3, 5), field.box(0, 0)])   # [2, C, h, w], zero outside

The geometry is the engine's (deconvcuda.windows): the windows of two activations, (0, 0) and (1, 1),
are grown from the layer down to the input through every node of the graph; where branches meet
(a residual addition, a concatenation) the windows of every path are united. A conv or pool with
kernel k, stride s, padding p and dilation d widens a window by d * (k - 1) input positions and moves
its start by -p; ceil_mode only adds windows at the end, so it changes nothing here. A projection of
an activation is non-zero only inside its box. A flat layer (after Flatten, Linear or a spatial
mean), or an adaptive pool whose windows are not all the same, sees the whole image: then the field
is the image, and ``input_size`` must be given.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from .capture import capture
from .checks import resolve_layer
from .fallback import RectifierMode, StraightThrough
from .geometry import pair
from .graph import Graph, Node, Untraceable, trace
from .kinds import Unrepresentable
from .windows import Windows

__all__ = ["ReceptiveField", "receptive_field", "crop_patches"]

Pair = Tuple[int, int]


@dataclass(frozen=True)
class ReceptiveField:
    """The receptive field of every activation of a layer, in input pixels.

    ``size``: (height, width) of one field. ``stride``: input pixels between the fields of
    neighbouring activations ((0, 0) where the field is the whole image). ``offset``: the top-left
    pixel of activation (0, 0)'s field; negative where it starts in the padding.
    """

    size: Pair
    stride: Pair
    offset: Pair

    def box(self, y, x) -> Tuple:
        """``(top, left, bottom, right)`` of activation (y, x)'s field: half-open, not clipped to
        the image (it may reach past the borders). ``y`` and ``x`` may be ints or integer tensors
        (then each entry is a tensor)."""
        top = self.offset[0] + y * self.stride[0]
        left = self.offset[1] + x * self.stride[1]
        return (top, left, top + self.size[0], left + self.size[1])

    def boxes(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The boxes of many activations as a LongTensor [P, 4] of (top, left, bottom, right)."""
        return torch.stack(self.box(torch.as_tensor(y, dtype=torch.long), torch.as_tensor(x, dtype=torch.long)),
                           dim=-1)


def _whole_image(reason: str, input_size, layer: str) -> ReceptiveField:
    if input_size is None:
        raise ValueError(f"receptive_field: an activation of layer {layer!r} sees the whole image ({reason}), so "
                         f"its field depends on the image size; pass input_size=(H, W)")
    return ReceptiveField(size=input_size, stride=(0, 0), offset=(0, 0))


def _input_channels(graph: Graph) -> int:
    """A channel count the graph's first layers accept, for computing spatial sizes only."""
    for node in graph.input.consumers:
        channels = node.kind.input_channels()
        if channels is not None:
            return channels
    return 3


def receptive_field(model: nn.Module, layer, input_size: Optional[Sequence[int]] = None) -> ReceptiveField:
    """The receptive field of ``layer``'s activations (``layer``: a name from ``model.named_modules()``),
    the union of every path's field on graph models. ``input_size=(H, W)`` is needed where the field
    is the whole image (flat layers, uneven adaptive pools) and lets an adaptive pool with even
    windows count as a plain one."""
    caller = "receptive_field"
    if input_size is not None:
        input_size = tuple(int(v) for v in input_size)
        if len(input_size) != 2 or min(input_size) < 1:
            raise ValueError(f"{caller}: input_size must be a pair of positive ints (H, W), got {input_size!r}")
    try:
        graph = trace(model, layer, caller=caller)
    except (Untraceable, Unrepresentable) as why:
        if input_size is None:
            raise ValueError(f"{caller}: {why}, so the field is measured by gradients on an image; pass "
                             f"input_size=(H, W)") from why
        return _measured(model, resolve_layer(model, layer, caller), input_size, caller)
    name = graph.layers[0]
    shapes: Optional[Dict[Node, tuple]] = None
    if input_size is not None:
        try:
            shapes = graph.node_shapes((_input_channels(graph),) + input_size, caller)
        except ValueError as error:
            raise ValueError(f"{caller}: input_size {list(input_size)} does not fit the model: {error}") from None
    # two activations' windows: (0, 0) gives the offset and the size, (1, 1) the stride
    seed = torch.tensor([0, 1])
    windows: Dict[Node, Windows] = {graph.targets[name]: Windows(seed, seed.clone(), 1, 1)}
    for node in reversed(graph.nodes[1:]):
        if node not in windows:
            continue
        current = windows.pop(node)
        for source in node.inputs:
            if not source.data:
                continue
            grown = node.kind.field(current, None if shapes is None else shapes[source])
            if grown is None:
                return _whole_image(f"after {node.describe()}", input_size, name)
            windows[source] = windows[source].union(grown) if source in windows else grown
    field = windows[graph.input]
    top, left = (int(v) for v in field.top), (int(v) for v in field.left)
    (top0, top1), (left0, left1) = top, left
    return ReceptiveField(size=(field.height, field.width), stride=(top1 - top0, left1 - left0),
                          offset=(top0, left0))


class _SpreadMaxPool(torch.autograd.Function):
    """A max pool's forward; backward, every pooled value to its whole window (the field, not the switch)."""

    @staticmethod
    def forward(ctx, x, value, kernel, stride, padding, dilation):
        ctx.geometry = (x.shape, kernel, stride, padding, dilation)
        return value

    @staticmethod
    def backward(ctx, g):
        import torch.nn.functional as F

        shape, kernel, stride, padding, dilation = ctx.geometry
        ones = g.new_ones(shape[1], 1, *kernel)
        spread = F.conv_transpose2d(g, ones, stride=stride, padding=padding, dilation=dilation, groups=shape[1])
        out = g.new_zeros(shape)
        h, w = min(shape[2], spread.shape[2]), min(shape[3], spread.shape[3])
        out[:, :, :h, :w] = spread[:, :, :h, :w]
        return out, None, None, None, None, None


class _FieldMode(RectifierMode):
    """Every rectifier passes gradients straight through and every max pool spreads them over its
    windows, so an input pixel's gradient is non-zero wherever the activation can see it."""

    def rectify(self, x, top, inplace):
        with torch.no_grad():  # the value on a copy: an in-place form must not change x under autograd
            value = x.detach().clamp(0, top) if top != float("inf") else x.detach().clamp(min=0)
        return StraightThrough.apply(x, value)

    def other(self, func, args, kwargs):
        import torch.nn.functional as F

        if func is F.max_pool2d:
            x = args[0] if args else kwargs["input"]
            names = ("kernel_size", "stride", "padding", "dilation")
            values = [args[1 + i] if len(args) > 1 + i else kwargs.get(n) for i, n in enumerate(names)]
            kernel = pair(values[0])
            stride = kernel if not values[1] else pair(values[1])
            return _SpreadMaxPool.apply(x, func(*args, **kwargs), kernel, stride, pair(values[2] or 0),
                                        pair(values[3] or 1))
        return func(*args, **kwargs)


def _measured(model: nn.Module, layer: str, input_size, caller: str) -> ReceptiveField:
    """The field of a layer the graph cannot derive, measured: the input-gradient of one activation in
    the middle of the map (and of its diagonal neighbour, for the stride), with rectifiers passing
    gradients through and max pools spreading them over their windows. On larger images where the
    model takes them, so that the field lies inside; where it still reaches the borders, the image."""
    parameter = next((p for p in model.parameters() if p.is_floating_point()), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    dtype = parameter.dtype if parameter is not None else torch.float32
    channels = next((getattr(m, "in_channels") for m in model.modules() if isinstance(
        getattr(m, "in_channels", None), int)), 3)
    generator = torch.Generator().manual_seed(0)
    for scale in (3, 2, 1):
        size = (input_size[0] * scale, input_size[1] * scale)
        x = torch.rand(1, channels, *size, generator=generator, dtype=dtype).to(device).requires_grad_(True)
        try:
            with torch.enable_grad(), _FieldMode():
                out = capture(model, x, [layer], caller)[0][layer]
        except Exception:
            if scale == 1:
                raise
            continue  # the model takes only its own size
        if out.dim() != 4:
            return _whole_image(f"its output is [N, {', '.join(map(str, out.shape[1:]))}], not a map", input_size,
                                layer)
        boxes = []
        h, w = out.shape[2:]
        for y, x_ in ((h // 2, w // 2), (min(h // 2 + 1, h - 1), min(w // 2 + 1, w - 1))):
            (grad,) = torch.autograd.grad(out[0, :, y, x_].sum(), x, retain_graph=True)
            seen = grad[0].abs().sum(0) > 0
            rows, cols = seen.any(1).nonzero().flatten(), seen.any(0).nonzero().flatten()
            if rows.numel() == 0:
                return _whole_image("no pixel reaches its activations", input_size, layer)
            boxes.append((int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1, y, x_))
        (t0, b0, l0, r0, y0, x0), (t1, b1, l1, r1, y1, x1) = boxes
        touches = t0 == 0 or l0 == 0 or b0 == size[0] or r0 == size[1]
        if touches and scale > 1:
            continue
        if touches:
            return _whole_image("measured by gradients, it reaches the image's borders", input_size, layer)
        stride = ((t1 - t0) // max(y1 - y0, 1), (l1 - l0) // max(x1 - x0, 1))
        return ReceptiveField(size=(b0 - t0, r0 - l0), stride=stride, offset=(t0 - y0 * stride[0], l0 - x0 * stride[1]))
    return _whole_image("measured by gradients, it reaches the image's borders", input_size, layer)


def _as_boxes(boxes) -> torch.Tensor:
    if isinstance(boxes, torch.Tensor):
        boxes = boxes.to(torch.long)
    else:
        # A ragged list ([(0, 0, 2, 2), (0, 0, 2)]) or a non-sequence made torch.tensor / int() fail
        # with an error that did not name crop_patches nor say what boxes must be.
        try:
            boxes = torch.tensor([[int(v) for v in box] for box in boxes], dtype=torch.long)
        except (TypeError, ValueError) as error:
            raise ValueError(f"crop_patches: boxes must be [P, 4] rows of (top, left, bottom, right), got "
                             f"{type(boxes).__name__} ({error})") from None
    if boxes.numel() == 0:
        return boxes.reshape(0, 4)
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"crop_patches: boxes must be [P, 4] rows of (top, left, bottom, right), got shape "
                         f"{list(boxes.shape)}")
    return boxes


def crop_patches(images: torch.Tensor, boxes, fill: float = 0.0) -> torch.Tensor:
    """Cut one patch per box: ``images`` is [P, C, H, W] (box i from image i), or [C, H, W] /
    [1, C, H, W] (every box from the one image); ``boxes`` is a LongTensor [P, 4] or a sequence of
    (top, left, bottom, right), all of the same size. Returns [P, C, h, w] with ``fill`` where a box
    reaches past the image."""
    if not isinstance(images, torch.Tensor) or images.dim() not in (3, 4):
        got = f"{images.dim()}-D tensor" if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"crop_patches: images must be [P, C, H, W] or [C, H, W], got a {got}")
    if images.dim() == 3:
        images = images.unsqueeze(0)
    boxes = _as_boxes(boxes)
    count = boxes.shape[0]
    if images.shape[0] not in (1, count):
        raise ValueError(f"crop_patches: images must hold one image per box ({count}) or a single image, got "
                         f"{images.shape[0]}")
    channels, height, width = images.shape[1:]
    if count == 0:
        return images.new_zeros(0, channels, 0, 0)
    heights, widths = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    h, w = int(heights[0]), int(widths[0])
    if bool((heights != h).any()) or bool((widths != w).any()) or h < 1 or w < 1:
        raise ValueError(f"crop_patches: boxes must all have the same positive size, got sizes from "
                         f"{[int(heights.min()), int(widths.min())]} to {[int(heights.max()), int(widths.max())]}")
    boxes = boxes.to(images.device)
    rows = boxes[:, 0:1] + torch.arange(h, device=images.device)  # [P, h]
    cols = boxes[:, 1:2] + torch.arange(w, device=images.device)  # [P, w]
    inside = (((rows >= 0) & (rows < height))[:, :, None] & ((cols >= 0) & (cols < width))[:, None, :])
    which = torch.arange(count, device=images.device) if images.shape[0] == count else \
        torch.zeros(count, dtype=torch.long, device=images.device)
    patches = images[which[:, None, None], :, rows.clamp(0, height - 1)[:, :, None],
                     cols.clamp(0, width - 1)[:, None, :]]  # [P, h, w, C]: advanced indices come first
    patches = torch.where(inside[..., None], patches, torch.full((), fill, dtype=images.dtype, device=images.device))
    return patches.permute(0, 3, 1, 2).contiguous()
