"""Receptive-field windows: per projection, the part of a feature map its gradient can be non-zero in.

A single activation's projection is non-zero only inside its receptive field, so the engine carries
each projection's window of every feature map, ``[P, C, h, w]`` with a per-projection origin, instead
of whole maps. All windows of one node have the same size (it depends on the geometry only); they may
reach past the map's borders, where they hold zeros (the map's zero padding). Where branches of a
graph meet, the windows of the consumers are united. The same geometry gives ``receptive_field``.

    Windows(top, left, height, width).grow(extent, stride, padding)   # a conv/pool's input window
    windows.union(other)                                              # where two branches meet
    windows.crop(saved_rows, images) / windows.paste(g, size) / windows.embed(g, outer)

Occlusion cones (``Cone``) are the forward's twin: per occluder position, the part of a map the
occluder can change, carried from the input up through the layers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from .geometry import extent

__all__ = ["Windows", "Cone", "extent"]

Pair = Tuple[int, int]


@dataclass
class Windows:
    """Rows [top, top + height) and columns [left, left + width) of a map, per projection, in map
    coordinates (they may reach past the map's borders; those positions hold zeros)."""

    top: torch.Tensor   # [P] int64
    left: torch.Tensor  # [P] int64
    height: int
    width: int

    @staticmethod
    def points(y: torch.Tensor, x: torch.Tensor) -> "Windows":
        """1x1 windows at the seeds' positions."""
        return Windows(y.clone(), x.clone(), 1, 1)

    def grow(self, kernel_extent: Sequence[int], stride: Sequence[int], padding: Sequence[int]) -> "Windows":
        """The input window of a conv/pool with this (dilated) kernel extent, stride and padding: the
        window at the output reads input rows top * stride - padding ... (bottom - 1) * stride - padding + extent."""
        return Windows(self.top * stride[0] - padding[0], self.left * stride[1] - padding[1],
                       (self.height - 1) * stride[0] + kernel_extent[0], (self.width - 1) * stride[1] + kernel_extent[1])

    def union(self, other: "Windows") -> "Windows":
        """The smallest windows (one size for all projections) that hold both."""
        top, left = torch.minimum(self.top, other.top), torch.minimum(self.left, other.left)
        bottom = torch.maximum(self.top + self.height, other.top + other.height)
        right = torch.maximum(self.left + self.width, other.left + other.width)
        if top.numel() == 0:
            return Windows(top, left, max(self.height, other.height), max(self.width, other.width))
        return Windows(top, left, int((bottom - top).max()), int((right - left).max()))

    def covers(self, size: Sequence[int]) -> bool:
        """Whether a window is at least as large as a map of ``size``: then full maps are cheaper."""
        return self.height * self.width >= size[0] * size[1]

    def positions(self, size: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Plane-flat indices [P, h * w] into a map of ``size`` (clamped inside it) and whether each
        position really lies inside."""
        rows = self.top[:, None] + torch.arange(self.height, device=self.top.device)
        cols = self.left[:, None] + torch.arange(self.width, device=self.left.device)
        valid = (((rows >= 0) & (rows < size[0]))[:, :, None] & ((cols >= 0) & (cols < size[1]))[:, None, :])
        flat = rows.clamp(0, size[0] - 1)[:, :, None] * size[1] + cols.clamp(0, size[1] - 1)[:, None, :]
        return flat.flatten(1), valid.flatten(1)

    def inside(self, size: Sequence[int]) -> torch.Tensor:
        """[P, 1, h, w]: whether each window position lies inside a map of ``size`` (built from one
        row test and one column test per window)."""
        rows = self.top[:, None] + torch.arange(self.height, device=self.top.device)
        cols = self.left[:, None] + torch.arange(self.width, device=self.left.device)
        return (((rows >= 0) & (rows < size[0]))[:, None, :, None] & ((cols >= 0) & (cols < size[1]))[:, None, None, :])

    def crop(self, saved: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Each projection's window of a saved channels-last map [N, H, W, C] -> [P, C, h, w]
        (channels-last strides). Positions outside the map hold a clamped neighbour's value."""
        n, h, w, c = saved.shape
        flat, _ = self.positions((h, w))
        rows = (images[:, None] * (h * w) + flat).flatten()
        return saved.reshape(n * h * w, c).index_select(0, rows).view(
            -1, self.height, self.width, c).permute(0, 3, 1, 2)

    def zero_outside(self, g: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """``g`` (a fresh result, changed in place) with zeros where the windows leave the map: there
        the forward read zero padding, which has no gradient."""
        if g.device.type != "cpu":  # one kernel for all windows (a slice each would be a launch each)
            return g.masked_fill_(~self.inside(size), 0)
        # On the CPU only the strips outside the map, window by window: most windows lie inside it,
        # and the others leave it by a few rows or columns.
        for p, (y0, y1, x0, x1) in enumerate(self._inside_bounds(size)):
            window = g[p]
            if y0 > 0:
                window[:, :y0].zero_()
            if y1 < self.height:
                window[:, y1:].zero_()
            if x0 > 0:
                window[:, y0:y1, :x0].zero_()
            if x1 < self.width:
                window[:, y0:y1, x1:].zero_()
        return g

    def _inside_bounds(self, size: Sequence[int]) -> List[Tuple[int, int, int, int]]:
        """Per window, the rows [y0, y1) and columns [x0, x1) of it that lie inside a map of ``size``
        (window coordinates; empty ranges where it lies wholly outside)."""
        y0 = (-self.top).clamp(0, self.height)
        y1 = torch.maximum((size[0] - self.top).clamp(max=self.height), y0)
        x0 = (-self.left).clamp(0, self.width)
        x1 = torch.maximum((size[1] - self.left).clamp(max=self.width), x0)
        return torch.stack([y0, y1, x0, x1], dim=1).tolist()

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

    def add_into(self, out: torch.Tensor, g: torch.Tensor, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Add the windows [P, C, h, w] into maps ``out`` in place (window p into map ``rows[p]``,
        default p); positions outside the map are dropped, so every real position receives exactly its
        own value."""
        if rows is None:
            rows = torch.arange(g.shape[0], device=out.device)
        if out.device.type != "cpu":  # one kernel for all windows (a slice each would be a launch each)
            return out.index_add_(0, rows, self.paste(g, out.shape[2:]))
        # On the CPU a slice per window, clipped to the map: it reads and writes only the window
        # (scatter_add_ with an index per position moved three times the bytes).
        tops, lefts, rows = self.top.tolist(), self.left.tolist(), rows.tolist()
        for p, (y0, y1, x0, x1) in enumerate(self._inside_bounds(out.shape[2:])):
            if y0 < y1 and x0 < x1:
                out[rows[p], :, tops[p] + y0:tops[p] + y1, lefts[p] + x0:lefts[p] + x1].add_(g[p, :, y0:y1, x0:x1])
        return out

    def embed(self, g: torch.Tensor, outer: "Windows") -> torch.Tensor:
        """These windows' values [P, C, h, w] placed into the larger windows ``outer`` (which hold
        them: a union), zeros elsewhere."""
        if (outer.height, outer.width) == (self.height, self.width) and torch.equal(outer.top, self.top) \
                and torch.equal(outer.left, self.left):
            return g
        p, c = g.shape[:2]
        rows = (self.top - outer.top)[:, None] + torch.arange(self.height, device=g.device)
        cols = (self.left - outer.left)[:, None] + torch.arange(self.width, device=g.device)
        flat = (rows[:, :, None] * outer.width + cols[:, None, :]).flatten(1)
        out = g.new_zeros(p, c, outer.height * outer.width)
        out.scatter_(2, flat[:, None, :].expand(p, c, flat.shape[1]), g.reshape(p, c, -1))
        return out.view(p, c, outer.height, outer.width)


@dataclass
class Cone:
    """Per occluder position, the rows [top, bottom) and columns [left, right) of a map that an
    occluder can change (empty where top >= bottom)."""

    top: torch.Tensor
    bottom: torch.Tensor
    left: torch.Tensor
    right: torch.Tensor

    def empty(self) -> torch.Tensor:
        return (self.top >= self.bottom) | (self.left >= self.right)

    def union(self, other: "Cone") -> "Cone":
        """Where branches meet: per position the box holding both (an empty cone adds nothing)."""
        empty_self, empty_other = self.empty(), other.empty()

        def merge(a, b, pick):
            return torch.where(empty_self, b, torch.where(empty_other, a, pick(a, b)))

        return Cone(merge(self.top, other.top, torch.minimum), merge(self.bottom, other.bottom, torch.maximum),
                    merge(self.left, other.left, torch.minimum), merge(self.right, other.right, torch.maximum))

    def through(self, kernel_extent: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                size: Sequence[int]) -> "Cone":
        """The output cone of a conv or pool (kernel extent, stride, padding) whose input cone this is;
        ``size``: its output (h, w). Output o reads inputs o * stride - padding + [0, extent): it
        changes where that meets the cone."""
        bounds = []
        for axis, (low, high) in enumerate(((self.top, self.bottom), (self.left, self.right))):
            s, p, e = stride[axis], padding[axis], kernel_extent[axis]
            first = torch.div(low + p - e + s, s, rounding_mode="floor")  # ceil((low + p - e + 1) / s)
            last = torch.div(high - 1 + p, s, rounding_mode="floor")
            bounds += [first.clamp(0, size[axis]), (last + 1).clamp(0, size[axis])]
        return Cone(*bounds)
