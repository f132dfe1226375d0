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

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..capture import evaluating
from ..forward import LayerForward
from ..graph import Node
from ..windows import Cone, Windows

__all__ = ["OcclusionCones", "occluded_images"]

Pair = Tuple[int, int]


def occluded_images(images: torch.Tensor, corners: torch.Tensor, window: Pair, fill: torch.Tensor) -> torch.Tensor:
    """``images`` [B, C, H, W] with a ``window`` square set to ``fill`` ([C, 1, 1]) at each row's
    ``corners`` [B, 2] (top, left)."""
    height, width = images.shape[-2:]
    rows = torch.arange(height, device=images.device)
    cols = torch.arange(width, device=images.device)
    top, left = corners[:, 0, None], corners[:, 1, None]
    inside_rows = (rows >= top) & (rows < top + window[0])      # [B, H]
    inside_cols = (cols >= left) & (cols < left + window[1])    # [B, W]
    square = (inside_rows[:, :, None] & inside_cols[:, None, :])[:, None]  # [B, 1, H, W]
    return torch.where(square, fill.unsqueeze(0), images)



def _spatial(value_shape) -> bool:
    """Whether a value input (its Constant) varies over a map's positions."""
    value = value_shape.any()
    return isinstance(value, torch.Tensor) and value.dim() >= 2 and tuple(value.shape[-2:]) != (1, 1)


def _windows_holding(cone: Optional[Cone], size: Sequence[int]) -> Optional[Windows]:
    """One window size for every position, each window inside the map and holding its cone; None
    where that is the whole map (or the cone is: anywhere)."""
    if cone is None:
        return None
    height = max(int((cone.bottom - cone.top).clamp_min(0).max()), 1)
    width = max(int((cone.right - cone.left).clamp_min(0).max()), 1)
    if height >= size[0] and width >= size[1]:
        return None
    height, width = min(height, size[0]), min(width, size[1])
    top = torch.minimum(cone.top.clamp_min(0), torch.full_like(cone.top, size[0] - height))
    left = torch.minimum(cone.left.clamp_min(0), torch.full_like(cone.left, size[1] - width))
    return Windows(top, left, height, width)


class OcclusionCones:
    """The traced model and, for the images being worked on, every node's unoccluded output."""

    def __init__(self, model: nn.Module, layer: str, image_shape: Sequence[int], caller: str):
        self.forward = LayerForward(model, [layer], caller)
        self.layer = layer
        # per-image output shapes; a clear error where the images do not fit
        self.layer_shape = self.forward.shapes(tuple(image_shape), caller)[layer]
        self.graph = self.forward.graph  # None where the graph cannot hold the model: then whole forwards
        if self.graph is not None:
            self.shapes = self.graph.node_shapes(tuple(image_shape), caller)
            self.target = self.graph.targets[layer]
            self.nodes: List[Node] = self._needed()
        self._use(None)

    def _use(self, images: Optional[torch.Tensor]) -> None:
        """Make ``images`` the ones worked on: their unoccluded forward, keeping every node's output."""
        self.images = images
        self.base: Dict[Node, torch.Tensor] = {}
        self._padded: Dict[Tuple[Node, Tuple[int, ...], float], torch.Tensor] = {}
        if images is None:
            return
        with torch.no_grad(), evaluating(self.graph.model):
            self.base[self.graph.input] = images
            for node in self.nodes[1:]:
                self.base[node] = node.kind.forward(*(self.base[i] for i in node.inputs))

    def unoccluded_output(self, images: torch.Tensor) -> torch.Tensor:
        """The target's output on ``images`` themselves (one forward; nothing kept)."""
        return self.forward.run(images)[self.layer]

    def _needed(self) -> List[Node]:
        """The nodes the target depends on, in topological order."""
        needed = {self.target}
        for node in reversed(self.graph.nodes):
            if node in needed:
                needed.update(node.inputs)
        return [node for node in self.graph.nodes if node in needed]

    # -- geometry, per occluder position -------------------------------------------------------- #

    def _windows(self, corners: torch.Tensor, window: Tuple[int, int]) -> Dict[Node, Optional[Windows]]:
        """Each data node's output windows over the occluder positions (None: the whole map). Each
        kind says where the occluder can change its output (its cone); once a cone is the whole map,
        everything it feeds runs whole too."""
        top, left = corners[:, 0], corners[:, 1]
        cones: Dict[Node, Optional[Cone]] = {self.graph.input: Cone(top, top + window[0], left, left + window[1])}
        windows = {self.graph.input: Windows(top, left, window[0], window[1])}
        for node in self.nodes[1:]:
            if not node.data:
                continue
            size = self.shapes[node][1:]
            sources = [i for i in node.inputs if i.data]
            maps = len(size) == 2 and all(len(self.shapes[i]) == 3 for i in sources)
            if not maps or any(cones[i] is None for i in sources) or any(
                    not i.data and _spatial(self.shapes[i]) for i in node.inputs):
                cone = None  # a value with extent over the positions is read whole: the layer runs whole
            else:
                cone = node.kind.cone([cones[i] if i.data else None for i in node.inputs], size)
            windows[node] = _windows_holding(cone, size)
            cones[node] = None if windows[node] is None else cone
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

    # -- the values ----------------------------------------------------------------------------- #

    def values(self, images: torch.Tensor, corners: torch.Tensor, window: Tuple[int, int], fill: torch.Tensor,
               channels: torch.Tensor, value_of, *, batch_size: int, progress: bool,
               method: str = "difference") -> torch.Tensor:
        """Per image and occluder position (``corners`` [P, 2]; image-major), ``value_of(output, channel)``
        of the target's occluded output, where ``output`` is the chosen channel's map [B, 1, h, w]
        (then ``channel`` is 0) or the flat output [B, F] (``channel`` indexes it). Returns [N * P].

        method: "difference" (the cones) or "recompute" (each occluded image through the whole
        forward: the baseline, and the only way where the graph cannot hold the model). Images go through in groups small enough that a group's positions fill
        about one batch, so the unoccluded outputs kept are those of one group, not of every image."""
        from tqdm.auto import tqdm

        if self.graph is None:
            method = "recompute"
        n_positions = corners.shape[0]
        per_group = max(1, batch_size // n_positions)
        results = []
        bar = tqdm(total=images.shape[0] * n_positions, desc="occlusion", unit="position", disable=not progress)
        try:
            with torch.no_grad(), evaluating(self.forward.model):
                for first in range(0, images.shape[0], per_group):
                    group = images[first:first + per_group]
                    if method == "recompute":
                        self._use(None)
                        self.images = group
                    else:
                        self._use(group)
                        windows = self._windows(corners, window)
                        grown = {node: node.kind.grow(windows[node]) for node in self.nodes[1:]
                                 if node.data and windows[node] is not None and not node.kind.pointwise}
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
        output = self.forward.run(occluded_images(self.images[rows_images], corners, window, fill))[self.layer]
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
            if not node.data:  # a value: as in the unoccluded forward
                patches[node] = self.base[node]
            elif windows[node] is None:  # the whole map, with the layer's own forward
                inputs = [self._read(i, patches[i], windows.get(i), rows, images, None, 0.0) if i.data
                          else self.base[i] for i in node.inputs]
                patches[node] = kind.forward(*inputs)
            elif not kind.pointwise:  # a conv or pool: its input on the grown window, padding read there
                source = node.inputs[0]
                x = self._read(source, patches[source], windows[source], rows, images, grown[node],
                               kind.padding_value)
                patches[node] = kind.forward_unpadded(x, windows[node], rows, self.base[source].shape[2:])
            else:  # pointwise: the inputs on the same windows
                inputs = [self._read(i, patches[i], windows[i], rows, images, windows[node], 0.0) if i.data
                          else self.base[i] for i in node.inputs]
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
