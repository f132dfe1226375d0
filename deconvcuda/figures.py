"""The paper's figure (Zeiler & Fergus 2014, Fig. 2): for each feature map of a layer, its k strongest
activations over a dataset projected to pixel space, beside the image patches they came from.

    run = deconvcuda.visualize(model, images, ["features.22", "features.29"], rule=["deconvnet", "guided"],
                               image_names=names, out="out")
    print(run.index)          # out/index.html: every layer and channel, with captions

``visualize`` works in three stages, each a function of its own:

1. scan: one streaming top-k pass over the data per layer (``_scan``);
2. projections: per chunk of channels, one ``project(..., neurons=..., rule=...)`` call per rule on just
   the images those activations came from, each projection and image patch cropped to the
   activation's receptive field (``_project_chunk``);
3. drawing: per channel one PNG, the projections of each rule side by side, then the image patches with
   the projection's support outlined (``channel_figure``); per layer an overview PNG with channel
   numbers; per run a static ``index.html`` (``_index_html``).

Display (``contrast="robust"``, the default): per projection, the colour cast (each colour channel's
median over the quieter half of the projection's support) is removed, and values are scaled so that the 99.5th percentile
of |value| reaches black or white (brighter values are clipped), zero at mid-gray. ``contrast="max"``
is the paper's linear scaling, ``p / (2 max|p|) + 0.5``, with no cast removed: the raw values.

Only activations > 0 are drawn: a channel with fewer than k images that activate it shows those it
has and says so, and channels that never fire on the data are listed as "silent in these images".
"""
from __future__ import annotations

import datetime
import html
import math
import os
import platform
import re
import string
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from . import rules as reverse_rules

__all__ = ["visualize", "Visualization", "LayerFigures", "ChannelFigure", "Section", "projections_to_rgb",
           "patches_to_rgb", "support_mask", "grid", "channel_figure", "prepare_output", "record_outputs",
           "CONTRASTS", "DEFAULT_CHANNELS"]

#: How projections are turned into gray levels: see :func:`projections_to_rgb`.
CONTRASTS = ("robust", "max")
#: The percentile of |value| that ``contrast="robust"`` maps to black and white, and the fewest pixels
#: a projection's support must have for its colour cast to be estimated and removed: in smaller ones
#: (the 5x5 fields of a first block) every pixel is the filters' own colour, not a cast.
ROBUST_PERCENTILE, CAST_MIN_PIXELS = 99.5, 64
#: How many channels per layer ``visualize`` and ``deconvcuda visualize`` draw unless told otherwise:
#: the first that fire on the data (``channels="all"`` or ``max_channels=None`` draws every one).
DEFAULT_CHANNELS = 16
#: Cells smaller than this many pixels are enlarged (nearest neighbour, by a whole factor) so that
#: the 5x5 fields of a first layer stay visible.
MIN_CELL_PIXELS = 64
#: Pixels between cells, and between one grid and the next.
CELL_GAP, GRID_GAP = 2, 12
#: Background of the gaps, and of cells left empty when the data holds fewer than k activations.
BACKGROUND = 255
#: Image patches: pixels outside the image (a receptive field reaching past the border) are this gray.
OUTSIDE = 0.85
#: The outline of a projection's support drawn on its image patch (RGB), and the share of the
#: projection's (smoothed) magnitude the outlined region holds.
OUTLINE_COLOUR, OUTLINE_SHARE = (255, 214, 0), 0.8
#: How many channels a layer's overview PNG shows, and how tall each channel's figure is there.
OVERVIEW_CHANNELS, OVERVIEW_HEIGHT = 16, 160
#: Projections per ``project`` call: bounds memory (each is a full-size image until it is cropped).
PROJECTIONS_PER_CALL = 144
#: Channels of each layer projected first, before any layer's others: their times estimate the run.
PROBE_CHANNELS = 2
#: A run whose projections are estimated to take longer than this (seconds) says so when it starts.
LONG_RUN_SECONDS = 60.0
#: The file in the output folder that lists what the last run wrote, so the next run can remove it.
MANIFEST = ".deconvcuda-files"


@dataclass
class ChannelFigure:
    """One channel's figure and what it shows, strongest activation first (activations > 0 only)."""

    layer: str
    channel: int
    path: Path                              # the PNG: projections (one grid per rule), then image patches
    values: List[float]                     # the activations, all > 0; fewer than k where fewer images fire
    image_index: List[int]                  # positions in the dataset
    image_names: List[str]
    positions: List[Tuple[int, int]]        # (y, x) in the layer's output map
    boxes: List[Tuple[int, int, int, int]]  # (top, left, bottom, right) input-pixel boxes, unclipped
    rules: List[str] = field(default_factory=lambda: ["deconvnet"])


@dataclass
class LayerFigures:
    """One layer: its channels' figures, an overview PNG and where the time went (seconds)."""

    layer: str
    num_channels: int                       # how many the layer has
    channels: List[int]                     # the ones drawn
    receptive_field: Tuple[int, int]        # (height, width) in input pixels
    overview: Optional[Path]
    figures: List[ChannelFigure] = field(default_factory=list)
    seconds: Dict[str, float] = field(default_factory=dict)  # "top_activations", "project", "draw"
    silent: List[int] = field(default_factory=list)          # channels with no activation > 0 in the data
    map_size: Tuple[int, ...] = ()                           # (H, W) of the output map; () for a flat layer
    stride: Tuple[int, int] = (0, 0)                         # input pixels between neighbouring fields


@dataclass
class Section:
    """An extra part of the gallery's index.html (e.g. occlusion maps, invariance curves): ``title`` goes
    into the navigation, ``body`` is HTML placed under it as it is (links to other pages, figures)."""

    title: str
    body: str
    anchor: Optional[str] = None            # the section's id; derived from the title where None


@dataclass
class Visualization:
    """What ``visualize`` wrote: the output folder, its ``index.html`` and one record per layer."""

    out: Path
    index: Path
    layers: List[LayerFigures]
    rules: List[str] = field(default_factory=lambda: ["deconvnet"])
    images_per_rank: Tuple[int, ...] = ()   # images each process scanned (one entry without torch.distributed)

    @property
    def figures(self) -> List[ChannelFigure]:
        """Every channel's figure, layer by layer."""
        return [figure for layer in self.layers for figure in layer.figures]


# --------------------------------------------------------------------------------------------- #
# Turning tensors into pictures (pure functions: no model, no files)
# --------------------------------------------------------------------------------------------- #

def _as_three_channels(x: torch.Tensor) -> torch.Tensor:
    """[P, C, h, w] -> [P, 3, h, w]: gray inputs are repeated, inputs with other channel counts are
    shown as the mean over their channels."""
    if x.shape[1] == 3:
        return x
    return x.mean(dim=1, keepdim=True).expand(-1, 3, -1, -1)


def _check_contrast(contrast: str, caller: str) -> None:
    if contrast not in CONTRASTS:
        raise ValueError(f"{caller}: contrast must be one of {', '.join(map(repr, CONTRASTS))}, got {contrast!r}")


def projections_to_rgb(projections: torch.Tensor, channel_order: str = "RGB", contrast: str = "robust",
                       percentile: float = ROBUST_PERCENTILE) -> torch.Tensor:
    """[P, C, h, w] projections -> [P, 3, h, w] in [0, 1], each on its own scale, zero at mid-gray.

    ``contrast="robust"``: per projection, the support is where any channel is non-zero. Its colour
    cast, each channel's median over the quieter half of the support (the pixels whose magnitude,
    summed over channels, is at most the median), is subtracted there (where the support has at least
    CAST_MIN_PIXELS pixels), so a tinted background turns gray and the structure keeps its colours;
    the result is divided by twice the ``percentile``-th percentile of |value| over the support, plus
    0.5, clipped: a few bright pixels no longer push everything else to gray.
    ``contrast="max"``: the paper's ``p / (2 max|p|) + 0.5``, the values as they are. An all-zero
    projection is uniformly gray.
    """
    _check_contrast(contrast, "projections_to_rgb")
    if not 0 < percentile <= 100:
        raise ValueError(f"projections_to_rgb: percentile must be in (0, 100], got {percentile!r}")
    p = projections.detach().to(torch.float32)
    tiny = torch.finfo(torch.float32).tiny
    if contrast == "max":
        peak = p.abs().flatten(1).amax(dim=1).clamp_min(tiny).view(-1, 1, 1, 1)
        scaled = p / (2 * peak)
    else:
        support = (p != 0).any(dim=1)                                                # [P, h, w]
        cast = torch.zeros(p.shape[0], p.shape[1], 1, 1)
        scale = torch.zeros(p.shape[0])
        for i in range(p.shape[0]):  # per projection, over its support only
            values = p[i][:, support[i]]                                             # [C, n]
            if values.shape[1] >= CAST_MIN_PIXELS:
                magnitude = values.abs().sum(dim=0)
                cast[i, :, 0, 0] = values[:, magnitude <= magnitude.median()].median(dim=1).values
            if values.shape[1]:
                scale[i] = torch.quantile((values - cast[i, :, 0]).abs().flatten(), percentile / 100)
        p = (p - cast) * support[:, None]
        scaled = p / (2 * scale.clamp_min(tiny).view(-1, 1, 1, 1))
    rgb = _as_three_channels(scaled + 0.5)
    if channel_order == "BGR" and projections.shape[1] == 3:
        rgb = rgb.flip(1)  # the model sees BGR; people see RGB
    return rgb.clamp(0.0, 1.0)


def patches_to_rgb(patches: torch.Tensor, preprocessing=None, inside: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[P, C, h, w] patches of model input -> [P, 3, h, w] in [0, 1]: undone by
    ``preprocessing.to_display`` where given, else stretched to each patch's own min..max.
    ``inside`` (bool [P, h, w]): where the patch lies in the image; elsewhere it is drawn light gray."""
    x = patches.detach().to(torch.float32)
    if preprocessing is not None and x.shape[1] == 3:
        rgb = preprocessing.to_display(x)
    else:
        low = x.flatten(1).amin(dim=1).view(-1, 1, 1, 1)
        high = x.flatten(1).amax(dim=1).view(-1, 1, 1, 1)
        rgb = _as_three_channels((x - low) / (high - low).clamp_min(1e-12)).clamp(0.0, 1.0)
    if inside is not None:
        rgb = torch.where(inside.to(rgb.device)[:, None], rgb, torch.full((), OUTSIDE))
    return rgb


def support_mask(projections: torch.Tensor, share: float = OUTLINE_SHARE) -> torch.Tensor:
    """[P, C, h, w] projections -> bool [P, h, w]: where each projection lives. Its magnitude (summed
    over channels) is smoothed with a box a twelfth of the cell wide, and the mask is the smallest set of
    pixels that holds ``share`` of the smoothed magnitude. All False for an all-zero projection."""
    if projections.shape[0] == 0:
        return torch.zeros(0, *projections.shape[2:], dtype=torch.bool)
    magnitude = projections.detach().to(torch.float32).abs().sum(dim=1, keepdim=True)
    h, w = magnitude.shape[2:]
    radius = max(h, w) // 24
    if radius:
        magnitude = torch.nn.functional.avg_pool2d(magnitude, 2 * radius + 1, stride=1, padding=radius,
                                                   count_include_pad=False)
    flat = magnitude.flatten(1)
    ordered, _ = flat.sort(dim=1, descending=True)
    total = ordered.sum(dim=1, keepdim=True)
    # the level of the pixel at which the running sum first reaches `share` of the total
    reached = (ordered.cumsum(dim=1) >= share * total).to(torch.int8).argmax(dim=1, keepdim=True)
    level = ordered.gather(1, reached)
    return ((flat >= level) & (total > 0)).view(-1, h, w)


def _outline(mask: np.ndarray, thickness: int) -> np.ndarray:
    """bool [H, W] -> bool [H, W]: the pixels of ``mask`` within ``thickness`` of its edge."""
    padded = np.pad(mask, thickness, constant_values=False)
    eroded = mask.copy()
    h, w = mask.shape
    for dy in range(-thickness, thickness + 1):
        for dx in range(-thickness, thickness + 1):
            eroded &= padded[thickness + dy:thickness + dy + h, thickness + dx:thickness + dx + w]
    return mask & ~eroded


def _upscale_factor(height: int, width: int) -> int:
    return max(1, math.ceil(MIN_CELL_PIXELS / max(height, width, 1)))


def grid(cells: torch.Tensor, count: int, columns: int, scale: int = 1,
         outlines: Optional[torch.Tensor] = None) -> np.ndarray:
    """[n, 3, h, w] cells in [0, 1] -> an [H, W, 3] uint8 image of ``count`` slots in rows of
    ``columns``, each cell enlarged ``scale`` times (nearest neighbour); slots past ``n`` stay empty.
    ``outlines`` (bool [n, h, w]): regions whose edge is drawn on the cells in OUTLINE_COLOUR."""
    n, _, h, w = cells.shape
    rows = max(1, math.ceil(count / columns))
    ch, cw = h * scale, w * scale
    canvas = np.full((rows * ch + (rows + 1) * CELL_GAP, columns * cw + (columns + 1) * CELL_GAP, 3),
                     BACKGROUND, dtype=np.uint8)
    pixels = (cells.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    masks = outlines.cpu().numpy() if outlines is not None else None
    thickness = max(1, round(max(ch, cw) / 150))
    for i in range(min(n, count)):
        r, c = divmod(i, columns)
        cell = pixels[i].repeat(scale, axis=0).repeat(scale, axis=1) if scale > 1 else pixels[i].copy()
        if masks is not None and masks[i].any():
            mask = masks[i].repeat(scale, axis=0).repeat(scale, axis=1) if scale > 1 else masks[i]
            cell[_outline(mask, thickness)] = OUTLINE_COLOUR
        top, left = CELL_GAP + r * (ch + CELL_GAP), CELL_GAP + c * (cw + CELL_GAP)
        canvas[top:top + ch, left:left + cw] = cell
    return canvas


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one small bitmap font
        return ImageFont.load_default()


def _with_titles(parts: Sequence[np.ndarray], titles: Sequence[str]) -> np.ndarray:
    """Images of equal height side by side, GRID_GAP apart, each under its title."""
    from PIL import Image, ImageDraw

    size = int(min(28, max(12, min(part.shape[1] for part in parts) / 14)))
    font = _font(size)
    band = size + size // 2 + 2
    height = parts[0].shape[0] + band
    width = sum(part.shape[1] for part in parts) + GRID_GAP * (len(parts) - 1)
    canvas = Image.new("RGB", (width, height), (BACKGROUND,) * 3)
    draw = ImageDraw.Draw(canvas)
    left = 0
    for part, title in zip(parts, titles):
        canvas.paste(Image.fromarray(part), (left, band))
        draw.text((left + CELL_GAP, size // 4), title, fill=(40, 40, 40), font=font)
        left += part.shape[1] + GRID_GAP
    return np.asarray(canvas)


def channel_figure(projections: Union[torch.Tensor, Sequence[torch.Tensor]], patches: torch.Tensor, k: int, *,
                   titles: Optional[Sequence[str]] = None, outlines: Optional[torch.Tensor] = None) -> np.ndarray:
    """The figure of one channel: one grid of projections per rule (``projections``: a tensor, or a list
    with one per rule), then the grid of image ``patches`` (all [n <= k, 3, h, w] in [0, 1]),
    ``ceil(sqrt(k))`` columns each: 3x3 for the paper's k = 9. ``titles``: one per grid (the rules,
    then the patches), drawn above them. ``outlines``: bool [n, h, w] drawn on the patches."""
    if isinstance(projections, torch.Tensor):
        projections = [projections]
    columns = max(1, math.ceil(math.sqrt(k)))
    scale = _upscale_factor(patches.shape[2], patches.shape[3])
    parts = [grid(p, k, columns, scale) for p in projections] + [grid(patches, k, columns, scale, outlines)]
    if titles is not None:
        if len(titles) != len(parts):
            raise ValueError(f"channel_figure: {len(parts)} grids but {len(titles)} titles")
        return _with_titles(parts, titles)
    spacer = np.full((parts[0].shape[0], GRID_GAP, 3), BACKGROUND, dtype=np.uint8)
    pieces = [parts[0]]
    for part in parts[1:]:
        pieces += [spacer, part]
    return np.concatenate(pieces, axis=1)


def _overview(images: Sequence[np.ndarray], labels: Sequence[str]) -> np.ndarray:
    """Channel figures in rows, each resized to OVERVIEW_HEIGHT pixels tall under its label."""
    from PIL import Image, ImageDraw

    resized = []
    for image in images:
        height, width = image.shape[:2]
        new_width = max(1, round(width * OVERVIEW_HEIGHT / height))
        # nearest keeps small fields crisp; Lanczos keeps big ones from aliasing
        resample = Image.NEAREST if height <= OVERVIEW_HEIGHT else Image.LANCZOS
        resized.append(Image.fromarray(image).resize((new_width, OVERVIEW_HEIGHT), resample))
    width = max(image.width for image in resized)
    per_row = max(1, min(4, 2400 // (width + GRID_GAP)))
    rows = math.ceil(len(resized) / per_row)
    font_size = 16
    font = _font(font_size)
    band = font_size + 6
    cell_height = band + OVERVIEW_HEIGHT
    canvas = Image.new("RGB", (per_row * width + (per_row + 1) * GRID_GAP, rows * cell_height + (rows + 1) * GRID_GAP),
                       (BACKGROUND,) * 3)
    draw = ImageDraw.Draw(canvas)
    for i, (image, label) in enumerate(zip(resized, labels)):
        r, c = divmod(i, per_row)
        top, left = GRID_GAP + r * (cell_height + GRID_GAP), GRID_GAP + c * (width + GRID_GAP)
        draw.text((left, top), label, fill=(0, 0, 0), font=font)
        canvas.paste(image, (left, top + band))
    return np.asarray(canvas)


def _save_png(image: np.ndarray, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, format="PNG", compress_level=4)


# --------------------------------------------------------------------------------------------- #
# The output folder: each run removes what the previous one wrote
# --------------------------------------------------------------------------------------------- #

def prepare_output(out: Union[str, os.PathLike]) -> Path:
    """Create ``out`` and remove every file the previous run listed in its manifest (and the folders
    that leaves empty), so a gallery never shows figures of an earlier run. Files deconvcuda did not
    write are left alone."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"visualize: out {str(out)!r} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / MANIFEST
    if manifest.is_file():
        root = out.resolve()
        folders = set()
        for line in manifest.read_text(encoding="utf-8").splitlines():
            path = (out / line).resolve()
            if not line or root not in path.parents:  # only files inside out/
                continue
            if path.is_file():
                path.unlink()
            folders.update(parent for parent in path.parents if root in parent.parents)
        for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        manifest.unlink()
    return out


def record_outputs(out: Union[str, os.PathLike], paths: Iterable[Union[str, os.PathLike]]) -> None:
    """Add ``paths`` (files inside ``out``) to the manifest that the next run's ``prepare_output``
    removes. Commands that add pages to a gallery call this for each file they write."""
    out = Path(out)
    lines = [Path(os.path.relpath(Path(path), out)).as_posix() for path in paths]
    with open(out / MANIFEST, "a", encoding="utf-8") as manifest:
        manifest.writelines(line + "\n" for line in lines)


# --------------------------------------------------------------------------------------------- #
# Progress that reads well in a terminal and in a log file
# --------------------------------------------------------------------------------------------- #

def _is_terminal(stream=None) -> bool:
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class _Progress:
    """One progress bar at a time on stderr: tqdm in a terminal; in a file or CI log, a plain line at
    each tenth of the work (never carriage returns or cursor movements)."""

    def __init__(self, total: int, desc: str, unit: str, enabled: bool):
        self.total, self.desc, self.unit, self.enabled = total, desc, unit, enabled and total > 0
        self.done, self.started, self.next_line = 0, time.perf_counter(), 0.1
        self.bar = None
        self.terminal = _is_terminal()

    def say(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def update(self, count: int, left: Optional[float] = None) -> None:
        """``count`` more done; ``left``: the seconds still to go, where the caller knows better than
        the average so far."""
        self.done += count
        if not self.enabled:
            return
        if self.terminal:
            if self.bar is None:  # opened at the first update, below what was said before it
                from tqdm import tqdm

                self.bar = tqdm(total=self.total, desc=self.desc, unit=self.unit, file=sys.stderr, dynamic_ncols=True)
            if left is not None and self.done < self.total:
                self.bar.set_postfix_str(f"about {_duration(left)} left", refresh=False)
            self.bar.update(count)
            return
        if self.done >= self.next_line * self.total or self.done == self.total:
            elapsed = time.perf_counter() - self.started
            if left is None:
                left = elapsed / self.done * (self.total - self.done)
            print(f"{self.desc}: {self.done}/{self.total} {self.unit}s, {_duration(elapsed)} so far"
                  + (f", about {_duration(left)} left" if self.done < self.total else ""), file=sys.stderr, flush=True)
            while self.next_line * self.total <= self.done:
                self.next_line += 0.1

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _Estimate:
    """How long the projections will take: each layer's seconds per projection so far (layers differ by
    orders of magnitude; its first channels come early), times what is left of it, shared by the
    processes."""

    def __init__(self, jobs, rules: int, world: int):
        self.jobs, self.rules, self.world = jobs, rules, world
        self.finished = [False] * len(jobs)
        self.spent: Dict[str, List[float]] = {}   # layer -> [seconds, projections] of its finished chunks
        self.announced = False

    def done(self, number: int, seconds: float) -> None:
        item, _, pairs = self.jobs[number]
        self.finished[number] = True
        spent = self.spent.setdefault(item.record.layer, [0.0, 0])
        spent[0] += seconds
        spent[1] += len(pairs) * self.rules

    def left(self) -> Optional[float]:
        """Seconds still to go, or None until every layer with work left has been measured."""
        seconds = 0.0
        for (item, _, pairs), finished in zip(self.jobs, self.finished):
            if not finished:
                spent = self.spent.get(item.record.layer)
                if spent is None:
                    return None
                seconds += spent[0] / max(1, spent[1]) * len(pairs) * self.rules
        return seconds / self.world

    def announcement(self) -> Optional[str]:
        """Once, as soon as it is known: how long a long run will still take."""
        left = None if self.announced else self.left()
        if left is None:
            return None
        self.announced = True
        if left <= LONG_RUN_SECONDS:
            return None
        count = sum(len(pairs) for (_, _, pairs), finished in zip(self.jobs, self.finished) if not finished)
        return (f"visualize: about {_duration(left)} more for the other {count * self.rules:,} projections "
                f"(measured on the first channels of each layer); fewer channels (channels=, max_channels=) or a "
                "GPU take less")


# --------------------------------------------------------------------------------------------- #
# Arguments
# --------------------------------------------------------------------------------------------- #

def _layer_list(model: nn.Module, layers) -> List[str]:
    if isinstance(layers, str):
        layers = [layers]
    try:
        layers = list(layers)
    except TypeError:
        raise TypeError(f"visualize: layers must be a layer name or a list of them, got {type(layers).__name__}") from None
    if not layers:
        raise ValueError("visualize: layers is empty; name at least one layer from model.named_modules()")
    names = dict(model.named_modules())
    for layer in layers:
        if not isinstance(layer, str) or layer not in names:
            valid = [name for name in names if name]
            shown = ", ".join(valid[:40]) + (f", ... ({len(valid)} in all)" if len(valid) > 40 else "")
            raise ValueError(f"visualize: unknown layer {layer!r}; the model's layers are: {shown}")
    return layers


def _rule_list(rule) -> List[str]:
    rules = [rule] if isinstance(rule, str) else list(rule)
    if not rules:
        raise ValueError("visualize: rule is empty; name at least one of " + ", ".join(reverse_rules.names()))
    for name in rules:
        if name not in reverse_rules.RULES:
            raise ValueError(f"visualize: unknown rule {name!r}; expected one or more of "
                             f"{', '.join(reverse_rules.names())}")
    return list(dict.fromkeys(rules))


def _check_channel_options(channels, max_channels) -> None:
    if max_channels is not None and (isinstance(max_channels, bool) or not isinstance(max_channels, int)
                                     or max_channels < 1):
        raise ValueError(f"visualize: max_channels must be a positive int or None (every channel), got {max_channels!r}")
    if isinstance(channels, str) and channels != "all":
        raise ValueError(f"visualize: channels must be None, 'all', an int, a list of ints or {{layer: list}}, "
                         f"got {channels!r}")


def _requested_channels(channels, layer: str, num_channels: int) -> Optional[List[int]]:
    """The channels asked for by number, in order; None where ``channels`` leaves it to the default
    (None, "all", or a mapping without this layer)."""
    if isinstance(channels, Mapping):
        channels = channels.get(layer)
    if channels is None or (isinstance(channels, str) and channels == "all"):
        return None
    if isinstance(channels, int):
        channels = [channels]
    chosen = []
    for channel in channels:
        if isinstance(channel, bool) or not isinstance(channel, (int, np.integer)):
            raise TypeError(f"visualize: channels must be ints, got {channel!r}")
        if not 0 <= channel < num_channels:
            raise ValueError(f"visualize: channel {channel} is out of range for layer {layer!r}, which has "
                             f"{num_channels} channels (0..{num_channels - 1})")
        if int(channel) not in chosen:
            chosen.append(int(channel))
    return chosen


def _slug(layer: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", layer) or "output"


# --------------------------------------------------------------------------------------------- #
# visualize
# --------------------------------------------------------------------------------------------- #

@dataclass
class _LayerWork:
    """What stages 2 and 3 do for one layer: its record, its top-k (on the CPU) and the (channel, rank)
    pairs to draw: the activations > 0 of the channels drawn, strongest first."""

    record: LayerFigures
    values: torch.Tensor
    image_index: torch.Tensor
    ys: torch.Tensor
    xs: torch.Tensor
    drawn: List[Tuple[int, int]]

    def jobs(self, per_call: int) -> List[Tuple["_LayerWork", List[int], List[Tuple[int, int]]]]:
        """(self, channels, their pairs) per ``project`` call: the first PROBE_CHANNELS channels (whose
        time estimates the layer's), then at most ``per_call`` channels each."""
        channels = self.record.channels
        starts = [0] + list(range(min(PROBE_CHANNELS, per_call), len(channels), per_call))
        jobs = []
        for start, stop in zip(starts, starts[1:] + [len(channels)]):
            if start < stop:
                members = set(channels[start:stop])
                jobs.append((self, channels[start:stop], [(c, r) for c, r in self.drawn if c in members]))
        return jobs


def visualize(model: nn.Module, data, layers: Union[str, Sequence[str]], *,
              channels: Union[None, str, int, Iterable[int], Mapping] = None,
              max_channels: Optional[int] = DEFAULT_CHANNELS, k: int = 9,
              rule: Union[str, Sequence[str]] = "deconvnet", contrast: str = "robust",
              out: Union[str, os.PathLike] = "out", image_names: Optional[Sequence[str]] = None,
              preprocessing=None, batch_size: int = 32, device=None, seed: str = "value",
              lrn: str = "gradient", backend: str = "auto", progress: bool = True,
              model_name: Optional[str] = None, weights: Optional[str] = None, data_name: Optional[str] = None,
              sections: Sequence[Section] = ()) -> Visualization:
    """Write the paper's figure for each of ``layers`` and channel to ``out/``, and ``out/index.html``.

    model: in eval mode or not (it is left as it was). data: what ``top_activations`` streams (a
    tensor ``[N, C, H, W]`` of model input, a map-style Dataset, a list of batches, or a DataLoader),
    in a fixed order.
    channels: None (the default: the first ``max_channels`` channels that fire, DEFAULT_CHANNELS = 16),
    "all" (every channel that fires), an int, a list, or ``{layer: list}`` (exactly those; layers not
    in the mapping get the default). Channels with no activation > 0 in the data are never drawn: each
    layer lists them as silent. k: activations per channel (9 in the paper).
    rule: "deconvnet" (the paper's), "guided", "gradient", or a list of them, drawn side by side.
    contrast: "robust" (per projection, its colour cast removed, the 99.5th percentile of |value| at
    black and white) or "max" (the paper's linear scaling to the maximum, the values as they are).
    out: the folder; what the previous run wrote there is removed first.
    image_names: one name per image of ``data``, for the captions (default: ``data.names`` where
    there is one). preprocessing: a ``deconvcuda.models.Preprocessing`` that turns model input back into
    pixels (default ``model.preprocessing`` where the model has one, else each patch is stretched to
    its own range). device: where the work runs, default the model's device (the model must be there).
    seed, lrn, backend: as for ``deconvcuda.project``. progress: progress and a time estimate on stderr.
    model_name, weights, data_name: what the page's header says about the model, where its weights
    came from (e.g. "random weights" or a file) and the data. sections: extra :class:`Section` s
    (pages of other analyses) for index.html.

    Under torch.distributed every rank scans its part of the data and projects its share of the
    channels; rank 0 alone draws and writes, and every rank returns the same :class:`Visualization`.

    Returns a :class:`Visualization` (out folder, index path, per-layer records with every figure).
    """
    from .scan import model_device as device_of, process_group

    if not isinstance(model, nn.Module):
        raise TypeError(f"visualize: model must be a torch.nn.Module, got {type(model).__name__}")
    layers = _layer_list(model, layers)
    rules = _rule_list(rule)
    _check_contrast(contrast, "visualize")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"visualize: k must be a positive int, got {k!r}")
    _check_channel_options(channels, max_channels)
    if preprocessing is None:
        preprocessing = getattr(model, "preprocessing", None)
    model_device = device_of(model)
    device = model_device if device is None else torch.device(device)
    if device != model_device and not (device.type == model_device.type and device.index is None):
        raise ValueError(f"visualize: the model is on {model_device} but device is {device}; "
                         f"move it first with model.to({str(device)!r})")
    # Under torch.distributed every rank scans its part of the data and gets the merged result, the
    # projections are shared out (chunk i to rank i % world), and rank 0 alone draws and writes.
    rank, world = process_group()
    progress = progress and rank == 0
    if image_names is None:
        image_names = getattr(data, "names", None)  # deconvcuda.data.ImageFolder's file names
    out = prepare_output(out) if rank == 0 else Path(out)

    # 1. scan: ONE pass over the data for all layers
    tops, scan_seconds = _scan(model, data, layers, k, batch_size, device, progress)

    # 2. projections and 3. drawing, chunk by chunk of channels, with one progress bar for all
    geometry = _geometry(model, data, layers, tops, batch_size)
    work = [_plan_layer(layer, tops[layer], channels, max_channels, scan_seconds, geometry.get(layer))
            for layer in layers]
    per_layer = [item.jobs(max(1, PROJECTIONS_PER_CALL // k)) for item in work]
    # each layer's first chunk comes first: their times estimate the whole run before most of it starts
    jobs = [layer_jobs[0] for layer_jobs in per_layer if layer_jobs] + \
        [job for layer_jobs in per_layer for job in layer_jobs[1:]]
    total = sum(len(pairs) for _, _, pairs in jobs) * len(rules)
    bar = _Progress(total, "projections", "projection", progress)
    bar.say(f"visualize: {total:,} projections ({sum(len(item.record.channels) for item in work)} channels of "
            f"{len(layers)} layer{'s' * (len(layers) > 1)}, up to {k} activations each, {len(rules)} "
            f"rule{'s' * (len(rules) > 1)})")
    channel_order = getattr(preprocessing, "channel_order", "RGB")
    estimate = _Estimate(jobs, len(rules), world)
    failure = None  # an error of rank 0 while drawing, reported to the other ranks
    try:
        # Rounds of `world` chunks, one per rank, so that rank 0 holds at most one round of results.
        for first in range(0, len(jobs), world):
            number = first + rank
            mine = None
            if failure is not None:  # rank 0 could not draw: tell the others, then stop
                mine = ("error", type(failure).__name__, str(failure))
            elif number < len(jobs):
                item, _, pairs = jobs[number]
                tick = time.perf_counter()
                try:
                    mine = ("ok", _project_chunk(model, data, item, pairs, rules, contrast, channel_order,
                                                 preprocessing, batch_size, device, seed, lrn, backend),
                            time.perf_counter() - tick)
                except Exception as error:
                    if world == 1:
                        raise
                    mine = ("error", type(error).__name__, str(error))
            results = _shared(mine, world)
            failed = [(r, result) for r, result in enumerate(results) if result is not None and result[0] == "error"]
            if failed:
                if failure is not None:
                    raise failure
                r, (_, kind, message) = failed[0]
                raise (ValueError if kind == "ValueError" else RuntimeError)(
                    f"visualize: rank {r} of {world} failed to project: {message}")
            if rank != 0:
                continue
            for offset, result in enumerate(results):
                if result is None:
                    continue
                item, chunk, pairs = jobs[first + offset]
                item.record.seconds["project"] += result[2]
                tock = time.perf_counter()
                try:
                    _draw_chunk(out, item, chunk, pairs, result[1], rules, k, image_names)
                except Exception as error:
                    if world == 1:
                        raise
                    failure = error
                    break
                drawing = time.perf_counter() - tock
                item.record.seconds["draw"] += drawing
                estimate.done(first + offset, result[2] + drawing)
                bar.update(len(pairs) * len(rules), estimate.left())
            message = estimate.announcement()
            if message:
                bar.say(message)
    finally:
        bar.close()

    records = [item.record for item in work]
    index = out / "index.html"
    if rank == 0 and failure is None:
        try:
            for record in records:
                _draw_overview(out, record, k)
            header = _header(model, model_name, weights, data, data_name, rules, contrast, k, seed, lrn, backend,
                             device)
            index.write_text(_index_html(header, records, out, rules, k, _count_images(data), sections),
                             encoding="utf-8")
            record_outputs(out, [index] + [figure.path for record in records for figure in record.figures]
                           + [record.overview for record in records if record.overview is not None])
        except Exception as error:
            if world == 1:
                raise
            failure = error
    run = Visualization(out=out, index=index, layers=records, rules=rules,
                        images_per_rank=tops[layers[0]].images_per_rank)
    if world > 1:  # every rank returns the records of what rank 0 wrote, or rank 0's error
        shared = _shared(run if failure is None else ("error", type(failure).__name__, str(failure)), world)[0] \
            if rank == 0 else _shared(None, world)[0]
        if failure is not None:
            raise failure
        if isinstance(shared, tuple):
            raise RuntimeError(f"visualize: rank 0 of {world} failed to write the gallery: {shared[2]}")
        run = shared
    return run


def _shared(payload, world: int) -> list:
    """Every rank's ``payload``, in rank order, on every rank (just ``[payload]`` in one process)."""
    if world == 1:
        return [payload]
    import torch.distributed as dist

    gathered = [None] * world
    dist.all_gather_object(gathered, payload)
    return gathered


def _scan(model: nn.Module, data, layers: Sequence[str], k: int, batch_size: int, device: torch.device,
          progress: bool):
    """Stage 1: ``{layer: TopActivations}`` from one pass over the data, and its seconds. In a
    terminal the scan shows its own tqdm bar; in a log file it says in one line what it did."""
    from . import top_activations

    terminal = _is_terminal()
    started = time.perf_counter()
    tops = top_activations(model, data, list(layers), k=k, batch_size=batch_size, device=device,
                           progress=progress and terminal)
    seconds = time.perf_counter() - started
    if progress and not terminal:
        count = _count_images(data)
        print(f"top-{k} of {len(layers)} layer{'s' * (len(layers) > 1)}"
              + (f" over {count} images" if count is not None else "") + f": {_duration(seconds)}",
              file=sys.stderr, flush=True)
    return tops, seconds


def _geometry(model: nn.Module, data, layers: Sequence[str], tops, batch_size: int) -> Dict[str, tuple]:
    """{layer: (receptive field size, its stride, output map size)} for the images of ``data``, read
    from one image of it that the scan ranked (none where it ranked none)."""
    from . import batches, receptive_field
    from .graph import trace

    ranked = [int(i) for top in tops.values() for i in top.image_index.flatten().tolist() if int(i) >= 0][:1]
    if not ranked:
        return {}
    shape = tuple(batches.gather_images(data, ranked, batch_size).shape[1:])
    shapes = trace(model, list(layers), caller="visualize").shapes(shape, caller="visualize")
    geometry = {}
    for layer in layers:
        field_ = receptive_field(model, layer, input_size=shape[-2:])
        geometry[layer] = (tuple(field_.size), tuple(field_.stride), tuple(shapes[layer][1:]))
    return geometry


def _plan_layer(layer: str, scan, channels, max_channels: Optional[int], scan_seconds: float,
                geometry: Optional[tuple]) -> _LayerWork:
    """Which channels of ``layer`` are drawn, which are silent, and which activations (> 0) each shows."""
    values, image_index = scan.values.detach().cpu(), scan.image_index.detach().cpu()
    ys, xs = scan.y.detach().cpu(), scan.x.detach().cpu()
    num_channels = values.shape[0]
    fires = (values > 0) & (image_index >= 0)                   # [C, k]: NaN and missing entries are False
    silent = [c for c in range(num_channels) if not bool(fires[c, 0])]
    requested = _requested_channels(channels, layer, num_channels)
    if requested is None:
        drawn = [c for c in range(num_channels) if bool(fires[c, 0])]
        if max_channels is not None and not (isinstance(channels, str) and channels == "all"):
            drawn = drawn[:max_channels]
    else:
        drawn = [c for c in requested if bool(fires[c, 0])]
    # the scan is shared by the layers: each shows its whole time
    record = LayerFigures(layer, num_channels, drawn, (0, 0), None, silent=silent,
                          seconds={"top_activations": scan_seconds, "project": 0.0, "draw": 0.0})
    if geometry is not None:
        record.receptive_field, record.stride, record.map_size = geometry
    pairs = [(c, r) for c in drawn for r in range(values.shape[1]) if bool(fires[c, r])]
    return _LayerWork(record, values, image_index, ys, xs, pairs)


def _project_chunk(model, data, item: _LayerWork, pairs, rules, contrast, channel_order, preprocessing, batch_size,
                   device, seed, lrn, backend):
    """Stage 2 for one chunk, on the CPU: per rule the projections' display cells, the image patches'
    cells, the support outlines (of the first rule's projections) and the boxes, in ``pairs`` order."""
    from . import batches, crop_patches, project, receptive_field

    if not pairs:
        return None
    layer = item.record.layer
    wanted = sorted({int(item.image_index[c, r]) for c, r in pairs})
    images = batches.gather_images(data, wanted, batch_size).to(device)
    slot = {index: i for i, index in enumerate(wanted)}
    neurons = torch.tensor([[slot[int(item.image_index[c, r])], c, int(item.ys[c, r]), int(item.xs[c, r])]
                            for c, r in pairs], dtype=torch.long)
    field_ = receptive_field(model, layer, input_size=tuple(images.shape[-2:]))
    boxes = [tuple(int(v) for v in field_.box(int(item.ys[c, r]), int(item.xs[c, r]))) for c, r in pairs]
    projections, outlines = [], None
    for name in rules:
        projected = project(model, images, layer, neurons=neurons.to(device), rule=name, seed=seed, lrn=lrn,
                            backend=backend)
        crops = crop_patches(projected, boxes, fill=0.0).cpu()
        del projected
        if outlines is None:
            outlines = support_mask(crops)
        projections.append(projections_to_rgb(crops, channel_order, contrast))
    inside = crop_patches(torch.ones(1, 1, *images.shape[-2:]), boxes, fill=0.0)[:, 0] > 0
    patches = patches_to_rgb(crop_patches(images.index_select(0, neurons[:, 0].to(device)), boxes).cpu(),
                             preprocessing, inside)
    return projections, patches, outlines, boxes


def _draw_chunk(out: Path, item: _LayerWork, chunk: Sequence[int], pairs, cells, rules, k: int,
                image_names) -> None:
    """Stage 3 for one chunk: each channel's PNG, and its figure in the layer's record."""
    record = item.record
    projections, patches, outlines, boxes = cells
    for channel in chunk:
        rows = [i for i, (c, _) in enumerate(pairs) if c == channel]
        ranks = [pairs[i][1] for i in rows]
        picture = channel_figure([p[rows] for p in projections], patches[rows], k,
                                 titles=list(rules) + ["image patches"], outlines=outlines[rows])
        path = out / _slug(record.layer) / f"channel_{channel:04d}.png"
        _save_png(picture, path)
        indices = [int(item.image_index[channel, r]) for r in ranks]
        record.figures.append(ChannelFigure(
            layer=record.layer, channel=channel, path=path,
            values=[float(item.values[channel, r]) for r in ranks],
            image_index=indices,
            image_names=[image_names[i] if image_names is not None else f"image {i}" for i in indices],
            positions=[(int(item.ys[channel, r]), int(item.xs[channel, r])) for r in ranks],
            boxes=[boxes[i] for i in rows], rules=list(rules)))


def _draw_overview(out: Path, record: LayerFigures, k: int) -> None:
    """The layer's overview PNG: its first OVERVIEW_CHANNELS figures, each under its channel number."""
    from PIL import Image

    if not record.figures:
        return
    tick = time.perf_counter()
    shown, labels = [], []
    for figure in record.figures[:OVERVIEW_CHANNELS]:
        with Image.open(figure.path) as image:
            shown.append(np.asarray(image.convert("RGB")))
        few = len(figure.values) < k
        labels.append(f"channel {figure.channel}" + (f" (only {len(figure.values)} images fire)" if few else ""))
    record.overview = out / f"figure_{_slug(record.layer)}.png"
    _save_png(_overview(shown, labels), record.overview)
    record.seconds["draw"] += time.perf_counter() - tick


def _device_description(device: torch.device) -> str:
    if device.type == "cuda" and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def _count_images(data) -> Optional[int]:
    from . import batches

    return batches.count_images(data)


def _data_description(data, data_name: Optional[str]) -> str:
    if data_name:
        return data_name
    count = _count_images(data)
    return f"{count} images" if count is not None else "the images given"


def _header(model, model_name, weights, data, data_name, rules, contrast, k, seed, lrn, backend, device) -> Dict[str, str]:
    from . import __version__

    contrast_text = {
        "robust": f"robust: per projection, its colour cast removed, the {ROBUST_PERCENTILE:g}th percentile of "
                  "|value| at black and white (brighter values clipped), zero at mid-gray",
        "max": "max: the paper's linear scaling, p / (2 max|p|) + 0.5, zero at mid-gray, values as they are",
    }[contrast]
    return {
        "model": model_name or type(model).__name__,
        "weights": weights or "not stated (visualize(..., weights=...) says where they came from)",
        "data": _data_description(data, data_name),
        "rules": "; ".join(f"{name}: {reverse_rules.RULES[name].description}" for name in rules),
        "contrast": contrast_text,
        "settings": f"k = {k} (activations per channel, one per image), seed = {seed!r}, lrn = {lrn!r}, "
                    f"backend = {backend!r}",
        "device": _device_description(device),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "versions": (f"deconvcuda {__version__}, torch {torch.__version__}, Python {platform.python_version()}, "
                     f"{platform.system()} {platform.machine()}"),
    }


# --------------------------------------------------------------------------------------------- #
# index.html
# --------------------------------------------------------------------------------------------- #

def _relative(path: Path, out: Path) -> str:
    return Path(os.path.relpath(path, out)).as_posix()


def _channel_list(channels: Sequence[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2, 5, 7-8"."""
    parts, start = [], None
    for i, channel in enumerate(channels):
        if start is None:
            start = channel
        if i + 1 == len(channels) or channels[i + 1] != channel + 1:
            parts.append(str(start) if start == channel else f"{start}-{channel}")
            start = None
    return ", ".join(parts)


def _layer_anchor(number: int) -> str:
    return f"layer-{number}"


def _channel_anchor(number: int, channel: int) -> str:
    return f"layer-{number}-channel-{channel}"


def _caption(figure: ChannelFigure, record: LayerFigures, k: int, images: Optional[int]) -> str:
    """The channel's title and a table of its activations, each with its unit."""
    title = f"<b>{html.escape(figure.layer)} &middot; channel {figure.channel}</b>"
    count = len(figure.values)
    if count < k:
        among = f" of the {images} images" if images is not None else ""
        title += (f'<br><span class="few">only {count}{among} activate{"s" * (count == 1)} this channel '
                  f"(an activation &gt; 0), so {count} of the {k} cells are filled</span>")
    map_text = ("&times;".join(str(v) for v in record.map_size) + " map") if record.map_size else "output"
    rows = []
    for rank, (value, name, (y, x), (top, left, bottom, right)) in enumerate(
            zip(figure.values, figure.image_names, figure.positions, figure.boxes), start=1):
        rows.append(f"<tr><td>{rank}</td><td>{value:.4g}</td><td>{html.escape(name)}</td><td>({y}, {x})</td>"
                    f"<td>{top}..{bottom - 1}, {left}..{right - 1}</td></tr>")
    table = ('<table class="acts"><thead><tr><th>#</th><th>activation</th><th>image</th>'
             f"<th>(y, x) in the {map_text}</th><th>rows, columns of input pixels</th></tr></thead>"
             f"<tbody>{''.join(rows)}</tbody></table>")
    return title + table


def _layer_section(number: int, record: LayerFigures, count: int, out: Path, k: int, images: Optional[int]) -> str:
    anchor = _layer_anchor(number)
    links = ['<a href="#top">top</a>']
    if number > 0:
        links.append(f'<a href="#{_layer_anchor(number - 1)}">&larr; previous layer</a>')
    if number + 1 < count:
        links.append(f'<a href="#{_layer_anchor(number + 1)}">next layer &rarr;</a>')
    height, width = record.receptive_field
    shape = ("&times;".join(str(v) for v in record.map_size) + " positions") if record.map_size else "a flat output"
    parts = [f'<section class="layer" id="{anchor}">',
             f'<h2>{html.escape(record.layer)} <span class="layer-nav">{" &middot; ".join(links)}</span></h2>',
             f'<p class="about">{record.num_channels} channels, each a map of {shape}; an activation sees a '
             f"{height}&times;{width}-pixel receptive field of the input"
             + (f", neighbouring positions {record.stride[0]} pixel{'s' * (record.stride[0] != 1)} apart"
                if any(record.stride) else "")
             + f". Time: top-{k} scan {record.seconds.get('top_activations', 0):.1f} s, projections "
             f"{record.seconds.get('project', 0):.1f} s, drawing {record.seconds.get('draw', 0):.1f} s.</p>"]
    drawn = len(record.channels)
    parts.append(f'<p class="about">Drawn: {drawn} channel{"s" * (drawn != 1)}'
                 + (f" ({_channel_list(record.channels)})" if drawn else "") + ".</p>")
    if record.silent:
        parts.append(f'<p class="silent">Silent in these images (no activation &gt; 0 anywhere, so nothing to '
                     f"draw): {len(record.silent)} of {record.num_channels} channels: "
                     f"{_channel_list(record.silent)}.</p>")
    if record.overview is not None:
        shown = min(len(record.figures), OVERVIEW_CHANNELS)
        parts.append(f'<figure class="overview"><img src="{html.escape(_relative(record.overview, out))}" '
                     f'alt="overview of {html.escape(record.layer)}"><figcaption>Overview: the first {shown} channels '
                     "drawn, each labelled with its number.</figcaption></figure>")
    if record.figures:
        jumps = " ".join(f'<a href="#{_channel_anchor(number, figure.channel)}">{figure.channel}</a>'
                         for figure in record.figures)
        parts.append(f'<p class="jump">Channels: {jumps}</p>')
    parts.append('<div class="channels">')
    for figure in record.figures:
        parts.append(f'<figure class="channel" id="{_channel_anchor(number, figure.channel)}">'
                     f'<img src="{html.escape(_relative(figure.path, out))}" '
                     f'alt="{html.escape(figure.layer)} channel {figure.channel}">'
                     f"<figcaption>{_caption(figure, record, k, images)}</figcaption></figure>")
    parts.append("</div></section>")
    return "\n".join(parts)


def _section_anchor(section: Section, number: int) -> str:
    return section.anchor or f"section-{number}-" + (re.sub(r"[^a-z0-9]+", "-", section.title.lower()).strip("-")
                                                     or "more")


def _index_html(header: Dict[str, str], records: List[LayerFigures], out: Path, rules: Sequence[str], k: int,
                images: Optional[int], sections: Sequence[Section] = ()) -> str:
    template = string.Template((resources.files("deconvcuda") / "templates" / "index.html").read_text("utf-8"))
    nav = [f'<a href="#{_layer_anchor(number)}">{html.escape(record.layer)}</a>' for number, record in enumerate(records)]
    extra_nav, extra = [], []
    for number, section in enumerate(sections):
        anchor = _section_anchor(section, number)
        extra_nav.append(f'<a href="#{html.escape(anchor)}">{html.escape(section.title)}</a>')
        extra.append(f'<section class="extra" id="{html.escape(anchor)}"><h2>{html.escape(section.title)}</h2>\n'
                     f"{section.body}\n</section>")
    grids = " then ".join(f"<i>{html.escape(rule)}</i>" for rule in rules)
    how = (f"Per channel, its {k} strongest activations over the images (at most one per image, strongest "
           f"first, row by row), projected back to pixel space: one grid per rule ({grids}), then the "
           "image patches they came from, each the activation's receptive field, with the region holding "
           f"{OUTLINE_SHARE:.0%} of the {html.escape(rules[0])} projection outlined in yellow. Light gray in a "
           "patch is outside the image. Gray in a projection is zero. In each caption: <i>activation</i> is the "
           "layer's output value (after the layer: only values &gt; 0 are drawn); <i>(y, x)</i> is its position "
           "in the layer's output map, in map cells; the last column is the receptive field in input pixels "
           "(rows, columns; inclusive, may reach past the image).")
    rows = [("model", header["model"]), ("weights", header["weights"]), ("data", header["data"]),
            ("rule", header["rules"]), ("contrast", header["contrast"]), ("settings", header["settings"]),
            ("device", header["device"]), ("date", header["date"]), ("versions", header["versions"])]
    return template.substitute(
        title=html.escape(f"deconvcuda: {header['model']}"),
        header="\n".join(f"  <dt>{name}</dt><dd>{html.escape(value)}</dd>" for name, value in rows),
        how=how,
        nav=" &middot; ".join(nav),
        extra_nav=(" &middot; More: " + " &middot; ".join(extra_nav)) if extra_nav else "",
        sections="\n".join(_layer_section(number, record, len(records), out, k, images)
                           for number, record in enumerate(records)) + "\n" + "\n".join(extra))

