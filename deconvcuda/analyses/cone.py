"""Occlusion by difference: an occluder changes only its cone of influence in each layer.

The unoccluded forward runs once and keeps every node's output (the "base"). For each occluder
position, each node's cone is the part of its output the square can change: the square itself at
the input; through a conv or pool (exact geometry: kernel, stride, padding, dilation) the outputs
whose windows read a changed input; through a pointwise layer the same positions; where branches
meet (add, cat) the union. Each node then recomputes only a window that holds its cone: one size
for every position (the largest cone, so positions batch), placed inside the map. To compute a
window a node reads its input on the grown window, which is the base there except inside the
input's own window, and the layer's own padding where the grown window leaves the map (zero for
convs and average pools, -inf for max pools); the layer then runs without padding. Where a
node's window covers its whole map, or the node is flat or global (Linear, Flatten, adaptive pools,
means), it runs on whole maps instead; so does everything after it.

    cones = OcclusionCones(model, layer, images.shape[1:], caller)
    cones.unoccluded_output(images)                # the layer's output on the images themselves
    cones.values(images, corners, window, fill, channels, value_of, batch_size=256, progress=False)  # [N * P]
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import kinds
from ..graph import Node, trace
from ..windows import Windows, extent

__all__ = ["OcclusionCones", "SPATIAL_KINDS", "POINTWISE_KINDS"]

#: Layer kinds that read a kernel-sized window of their input; their geometry grows windows.
SPATIAL_KINDS = (kinds.Conv, kinds.MaxPool, kinds.AvgPool)
#: Layer kinds whose output at a position reads only their inputs at that position. Any other kind
#: runs on whole maps, which is always right.
POINTWISE_KINDS = (kinds.Rectifier, kinds.BatchNorm, kinds.LocalResponseNorm, kinds.Add, kinds.Cat)


@dataclass
class _Cone:
    """Per occluder position, the rows [top, bottom) and columns [left, right) a node's output can
    change in (empty where top >= bottom), or the whole map (``whole``)."""

    top: torch.Tensor
    bottom: torch.Tensor
    left: torch.Tensor
    right: torch.Tensor
    whole: bool = False

    def union(self, other: "_Cone") -> "_Cone":
        if self.whole or other.whole:
            return _Cone(self.top, self.bottom, self.left, self.right, whole=True)
        # an empty cone adds nothing to the union
        empty_self = (self.top >= self.bottom) | (self.left >= self.right)
        empty_other = (other.top >= other.bottom) | (other.left >= other.right)
        def merge(a, b, pick):
            return torch.where(empty_self, b, torch.where(empty_other, a, pick(a, b)))
        return _Cone(merge(self.top, other.top, torch.minimum), merge(self.bottom, other.bottom, torch.maximum),
                     merge(self.left, other.left, torch.minimum), merge(self.right, other.right, torch.maximum))


def _through(kind, cone: _Cone, size: Sequence[int]) -> _Cone:
    """The output cone of a conv or pool whose input cone is ``cone``; ``size``: its output (h, w).
    Output o reads inputs o * stride - padding + [0, extent): it changes where that meets the cone."""
    span = extent(kind.kernel_size, kind.dilation)
    bounds = []
    for axis, (low, high) in enumerate(((cone.top, cone.bottom), (cone.left, cone.right))):
        stride, padding = kind.stride[axis], kind.padding[axis]
        first = torch.div(low + padding - span[axis] + stride, stride, rounding_mode="floor")  # ceil((low+p-e+1)/s)
        last = torch.div(high - 1 + padding, stride, rounding_mode="floor")
        bounds += [first.clamp(0, size[axis]), (last + 1).clamp(0, size[axis])]
    return _Cone(bounds[0], bounds[1], bounds[2], bounds[3])


def _windows_holding(cone: _Cone, size: Sequence[int]) -> Optional[Windows]:
    """One window size for every position, each window inside the map and holding its cone; None
    where that is the whole map."""
    if cone.whole:
        return None
    height = max(int((cone.bottom - cone.top).clamp_min(0).max()), 1)
    width = max(int((cone.right - cone.left).clamp_min(0).max()), 1)
    if height >= size[0] and width >= size[1]:
        return None
    height, width = min(height, size[0]), min(width, size[1])
    top = torch.minimum(cone.top.clamp_min(0), torch.full_like(cone.top, size[0] - height))
    left = torch.minimum(cone.left.clamp_min(0), torch.full_like(cone.left, size[1] - width))
    return Windows(top, left, height, width)


def _padding_value(kind) -> float:
    """What the layer reads outside its input map: -inf for max pools, zero for the rest."""
    return float("-inf") if isinstance(kind, kinds.MaxPool) else 0.0


def _avg_pool_divisors(kind, size: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """[h, w] of what ``kind`` (an AvgPool) divides each window's sum by on an input of ``size``:
    its own forward on ones against the sum of ones (count_include_pad, ceil_mode and
    divisor_override all as the layer has them)."""
    ones = torch.ones(1, 1, *size, dtype=torch.float64, device=like.device)
    if kind.divisor_override:
        averages = F.avg_pool2d(ones, kind.kernel_size, kind.stride, kind.padding, kind.ceil_mode)
        return torch.full(averages.shape[2:], float(kind.divisor_override), dtype=like.dtype, device=like.device)
    sums = F.avg_pool2d(ones, kind.kernel_size, kind.stride, kind.padding, kind.ceil_mode, True, 1)
    averages = kind.forward(ones)
    return (sums / averages)[0, 0].round().to(like.dtype)


class OcclusionCones:
    """The traced model and, for the images being worked on, every node's unoccluded output."""

    def __init__(self, model: nn.Module, layer: str, image_shape: Sequence[int], caller: str):
        self.graph = trace(model, layer, caller=caller)
        # per-image output shapes; a clear error where the images do not fit
        self.shapes = self.graph.node_shapes(tuple(image_shape), caller)
        self.target = self.graph.targets[layer]
        self.nodes: List[Node] = self._needed()
        self._use(None)

    def _use(self, images: Optional[torch.Tensor]) -> None:
        """Make ``images`` the ones worked on: their unoccluded forward, keeping every node's output."""
        self.images = images
        self.base: Dict[Node, torch.Tensor] = {}
        self._divisors: Dict[Node, torch.Tensor] = {}
        self._padded: Dict[Tuple[Node, Tuple[int, ...], float], torch.Tensor] = {}
        if images is None:
            return
        with torch.no_grad():
            self.base[self.graph.input] = images
            for node in self.nodes[1:]:
                self.base[node] = node.kind.forward(*(self.base[i] for i in node.inputs))

    def unoccluded_output(self, images: torch.Tensor) -> torch.Tensor:
        """The target's output on ``images`` themselves (one forward; nothing kept)."""
        with torch.no_grad():
            return self.graph.run(images)[self.graph.layers[0]]

    def _needed(self) -> List[Node]:
        """The nodes the target depends on, in topological order."""
        needed = {self.target}
        for node in reversed(self.graph.nodes):
            if node in needed:
                needed.update(node.inputs)
        return [node for node in self.graph.nodes if node in needed]

    # -- geometry, per occluder position -------------------------------------------------------- #

    def _windows(self, corners: torch.Tensor, window: Tuple[int, int]) -> Dict[Node, Optional[Windows]]:
        """Each node's output windows over the occluder positions (None: the whole map)."""
        top, left = corners[:, 0], corners[:, 1]
        cones = {self.graph.input: _Cone(top, top + window[0], left, left + window[1])}
        windows = {self.graph.input: Windows(top, left, window[0], window[1])}
        for node in self.nodes[1:]:
            size = self.shapes[node][1:]
            flat = len(size) != 2 or any(len(self.shapes[i]) != 3 for i in node.inputs)
            if flat or not isinstance(node.kind, SPATIAL_KINDS + POINTWISE_KINDS) or any(
                    cones[i].whole for i in node.inputs):  # once whole, whole from there on
                cone = _Cone(top, top, left, left, whole=True)
            elif isinstance(node.kind, SPATIAL_KINDS):
                cone = _through(node.kind, cones[node.inputs[0]], size)
            else:  # pointwise: the same positions; where branches meet, the union
                cone = cones[node.inputs[0]]
                for other in node.inputs[1:]:
                    cone = cone.union(cones[other])
            windows[node] = None if cone.whole else _windows_holding(cone, size)
            if windows[node] is None:
                cone = _Cone(top, top, left, left, whole=True)
            cones[node] = cone
        return windows

    # -- reading a node's input on windows ------------------------------------------------------ #

    def _padded_base(self, node: Node, pads: Tuple[int, int, int, int], value: float) -> torch.Tensor:
        """The base output of ``node`` channels-last [N, H + pads, W + pads, C], padded with ``value``."""
        key = (node, pads, value)
        if key not in self._padded:
            base = self.base[node]
            if any(pads):
                base = F.pad(base, (pads[2], pads[3], pads[0], pads[1]), value=value)
            self._padded[key] = base.permute(0, 2, 3, 1).contiguous()
        return self._padded[key]

    def _read(self, node: Node, patch: torch.Tensor, patch_windows: Optional[Windows], rows: torch.Tensor,
              images: torch.Tensor, target: Optional[Windows], value: float) -> torch.Tensor:
        """``node``'s occluded output on the ``target`` windows (over all positions; None: the whole
        map) for a batch, [B, C, h, w]: its recomputed ``patch`` where that lies (``patch_windows``
        over all positions, None for whole maps), its base output elsewhere, and ``value`` outside the
        map. rows: each batch row's occluder position; images: its image."""
        size = tuple(self.base[node].shape[2:])
        if target is None:
            if patch_windows is None:
                return patch
            target = Windows(torch.zeros_like(patch_windows.top), torch.zeros_like(patch_windows.left), *size)
        if patch_windows is not None and (patch_windows.height, patch_windows.width) == (target.height, target.width) \
                and torch.equal(patch_windows.top, target.top) and torch.equal(patch_windows.left, target.left):
            return patch  # a pointwise layer reads exactly the windows its input recomputed
        # the base, padded far enough for every position's window, channels-last: a window is a row gather
        pads = (max(0, -int(target.top.min())), max(0, int(target.top.max()) + target.height - size[0]),
                max(0, -int(target.left.min())), max(0, int(target.left.max()) + target.width - size[1]))
        base = self._padded_base(node, pads, value)
        device = patch.device
        target_rows = target.top[rows][:, None] + torch.arange(target.height, device=device)   # [B, h]
        target_cols = target.left[rows][:, None] + torch.arange(target.width, device=device)   # [B, w]
        _, padded_h, padded_w, channels = base.shape
        flat = ((images[:, None, None] * padded_h + (target_rows + pads[0])[:, :, None]) * padded_w
                + (target_cols + pads[2])[:, None, :])
        out = base.reshape(-1, channels).index_select(0, flat.flatten()).view(
            -1, target.height, target.width, channels)
        # the patch where it lies inside the target windows (and inside the map)
        if patch_windows is None:
            patch_height, patch_width = size
            inner_y, inner_x = target_rows, target_cols
        else:
            patch_height, patch_width = patch_windows.height, patch_windows.width
            inner_y = target_rows - patch_windows.top[rows][:, None]
            inner_x = target_cols - patch_windows.left[rows][:, None]
        inside = (((inner_y >= 0) & (inner_y < patch_height) & (target_rows >= 0) & (target_rows < size[0]))[:, :, None]
                  & ((inner_x >= 0) & (inner_x < patch_width) & (target_cols >= 0) & (target_cols < size[1]))[:, None, :])
        patch_rows = patch.permute(0, 2, 3, 1).reshape(-1, channels)
        flat = ((torch.arange(patch.shape[0], device=device)[:, None, None] * patch_height
                 + inner_y.clamp(0, patch_height - 1)[:, :, None]) * patch_width
                + inner_x.clamp(0, patch_width - 1)[:, None, :])
        from_patch = patch_rows.index_select(0, flat.flatten()).view(-1, target.height, target.width, channels)
        return torch.where(inside[..., None], from_patch, out).permute(0, 3, 1, 2)

    # -- one node on windows -------------------------------------------------------------------- #

    def _forward_window(self, node: Node, x: torch.Tensor, windows: Windows, rows: torch.Tensor) -> torch.Tensor:
        """A conv or pool on its grown input window ``x`` (padding already in it): no padding."""
        kind = node.kind
        if isinstance(kind, kinds.Conv):
            return F.conv2d(x, kind.cast(kind.weight, x), kind.cast(kind.bias, x), kind.stride, 0, kind.dilation,
                            kind.groups)
        if isinstance(kind, kinds.MaxPool):
            return F.max_pool2d(x, kind.kernel_size, kind.stride, 0, kind.dilation)
        # AvgPool: window sums over the divisors the layer uses at those outputs
        sums = F.avg_pool2d(x, kind.kernel_size, kind.stride, 0, False, True, 1)
        if node not in self._divisors:
            self._divisors[node] = _avg_pool_divisors(kind, self.base[node.inputs[0]].shape[2:], x)
        divisors = self._divisors[node].to(x.dtype)
        out_rows = windows.top[rows][:, None] + torch.arange(windows.height, device=x.device)
        out_cols = windows.left[rows][:, None] + torch.arange(windows.width, device=x.device)
        return sums / divisors[out_rows[:, :, None], out_cols[:, None, :]][:, None]

    # -- the values ----------------------------------------------------------------------------- #

    def values(self, images: torch.Tensor, corners: torch.Tensor, window: Tuple[int, int], fill: torch.Tensor,
               channels: torch.Tensor, value_of, *, batch_size: int, progress: bool,
               method: str = "difference") -> torch.Tensor:
        """Per image and occluder position (``corners`` [P, 2]; image-major), ``value_of(output, channel)``
        of the target's occluded output, where ``output`` is the chosen channel's map [B, 1, h, w]
        (then ``channel`` is 0) or the flat output [B, F] (``channel`` indexes it). Returns [N * P].

        method: "difference" (the cones) or "recompute" (each occluded image through the whole
        forward: the baseline). Images go through in groups small enough that a group's positions fill
        about one batch, so the unoccluded outputs kept are those of one group, not of every image."""
        from tqdm.auto import tqdm

        n_positions = corners.shape[0]
        per_group = max(1, batch_size // n_positions)
        results = []
        bar = tqdm(total=images.shape[0] * n_positions, desc="occlusion", unit="position", disable=not progress)
        try:
            with torch.no_grad():
                for first in range(0, images.shape[0], per_group):
                    group = images[first:first + per_group]
                    if method == "recompute":
                        self._use(None)
                        self.images = group
                    else:
                        self._use(group)
                        windows = self._windows(corners, window)
                        grown = {node: node.kind.grow(windows[node]) for node in self.nodes[1:]
                                 if windows[node] is not None and isinstance(node.kind, SPATIAL_KINDS)}
                    total = group.shape[0] * n_positions
                    for start in range(0, total, batch_size):
                        index = torch.arange(start, min(start + batch_size, total), device=images.device)
                        rows_images, rows = index // n_positions, index % n_positions
                        chosen = channels[first + rows_images]

                        if method == "recompute":
                            output = self._recomputed_target(rows_images, corners[rows], fill, window, chosen)
                        else:
                            output = self._occluded_target(windows, grown, rows_images, rows, fill, window, chosen)
                        results.append(value_of(output, chosen if output.dim() == 2 else torch.zeros_like(chosen)))
                        bar.update(index.shape[0])
        finally:
            bar.close()
            self._use(None)
        return torch.cat(results)

    def _recomputed_target(self, rows_images, corners, fill, window, chosen) -> torch.Tensor:
        """One batch of (image, position) rows the plain way: each occluded image through the forward."""
        from .occlusion import occluded_images

        output = self.graph.run(occluded_images(self.images[rows_images], corners, window, fill))[self.graph.layers[0]]
        if output.dim() == 2:
            return output
        return output[torch.arange(output.shape[0], device=output.device), chosen][:, None]

    def _occluded_target(self, windows, grown, images, rows, fill, window, chosen) -> torch.Tensor:
        """One batch of (image, position) rows through the cones: the target's chosen channel's whole
        map [B, 1, h, w], or its flat output [B, F]."""
        remaining = {node: sum(consumer in self.nodes for consumer in node.consumers) for node in self.nodes}
        fill_patch = fill.unsqueeze(0).expand(images.shape[0], -1, window[0], window[1])
        patches: Dict[Node, torch.Tensor] = {self.graph.input: fill_patch.to(self.images.dtype)}
        for node in self.nodes[1:]:
            kind = node.kind
            if windows[node] is None:  # the whole map, with the layer's own forward
                inputs = [self._read(i, patches[i], windows[i], rows, images, None, 0.0) for i in node.inputs]
                patches[node] = kind.forward(*inputs)
            elif isinstance(kind, SPATIAL_KINDS):
                x = self._read(node.inputs[0], patches[node.inputs[0]], windows[node.inputs[0]], rows, images,
                               grown[node], _padding_value(kind))
                patches[node] = self._forward_window(node, x, windows[node], rows)
            else:  # pointwise: the input on the same windows
                inputs = [self._read(i, patches[i], windows[i], rows, images, windows[node], 0.0) for i in node.inputs]
                patches[node] = kind.forward(*inputs)
            for i in node.inputs:  # free what nothing reads any more
                remaining[i] -= 1
                if remaining[i] == 0 and i is not self.target:
                    patches.pop(i, None)
        patch, target_windows = patches[self.target], windows[self.target]
        if patch.dim() == 2:
            return patch
        batch = torch.arange(images.shape[0], device=patch.device)
        if target_windows is None:
            return patch[batch, chosen][:, None]
        maps = self.base[self.target][images, chosen].clone()  # [B, h, w]
        top, left = target_windows.top[rows], target_windows.left[rows]
        map_rows = top[:, None] + torch.arange(target_windows.height, device=patch.device)
        map_cols = left[:, None] + torch.arange(target_windows.width, device=patch.device)
        maps[batch[:, None, None], map_rows[:, :, None], map_cols[:, None, :]] = patch[batch, chosen]
        return maps[:, None]
