"""Turning tensors into pictures: pure functions, no model, no files but :func:`save_png`.

    rgb = projections_to_rgb(projections, channel_order="BGR")      # [P, 3, h, w] in [0, 1], zero at mid-gray
    cells = patches_to_rgb(patches, model.preprocessing, inside)     # the image patches, outside the image gray
    picture = channel_figure([deconvnet, guided], cells, k=9, titles=[...], outlines=support_mask(deconvnet))
    picture = channel_figure(..., optimized=image)                  # and the image synthesize made, as tall
    save_png(picture, path)

Display (``contrast="robust"``, the default): per projection, the colour cast (each colour channel's
median over the quieter half of the projection's support) is removed, and values are scaled so that
the 99.5th percentile of |value| reaches black or white (brighter values are clipped), zero at
mid-gray. ``contrast="max"`` is the paper's linear scaling, ``p / (2 max|p|) + 0.5``, with no cast
removed: the raw values.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

__all__ = ["projections_to_rgb", "patches_to_rgb", "support_mask", "grid", "channel_figure", "overview", "rgb_pixels",
           "save_png", "check_contrast", "CONTRASTS"]

#: How projections are turned into gray levels: see :func:`projections_to_rgb`.
CONTRASTS = ("robust", "max")
#: The percentile of |value| that ``contrast="robust"`` maps to black and white, and the fewest pixels
#: a projection's support must have for its colour cast to be estimated and removed: in smaller ones
#: (the 5x5 fields of a first block) every pixel is the filters' own colour, not a cast.
ROBUST_PERCENTILE, CAST_MIN_PIXELS = 99.5, 64
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


def _as_three_channels(x: torch.Tensor) -> torch.Tensor:
    """[P, C, h, w] -> [P, 3, h, w]: gray inputs are repeated, inputs with other channel counts are
    shown as the mean over their channels."""
    if x.shape[1] == 3:
        return x
    return x.mean(dim=1, keepdim=True).expand(-1, 3, -1, -1)


def check_contrast(contrast: str, caller: str) -> None:
    """A ValueError naming ``caller`` where ``contrast`` is not one of CONTRASTS."""
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
    check_contrast(contrast, "projections_to_rgb")
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
    pixels = rgb_pixels(cells)
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


def _with_titles(parts: Sequence[np.ndarray], titles: Sequence[str], narrowest: int) -> np.ndarray:
    """Images of equal height side by side, GRID_GAP apart, each under its title (in letters sized
    for ``narrowest`` pixels of width)."""
    from PIL import Image, ImageDraw

    size = int(min(28, max(12, narrowest / 14)))
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


def rgb_pixels(image: torch.Tensor) -> np.ndarray:
    """[..., 3, h, w] RGB in [0, 1] -> [..., h, w, 3] uint8 (rounded), as :func:`save_png` writes it."""
    return (image.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8).movedim(-3, -1).numpy()


def _panel(image: torch.Tensor, height: int) -> np.ndarray:
    """[3, h, w] in [0, 1] -> an [height, ., 3] uint8 panel: the image resized (Lanczos) to fill it
    inside a CELL_GAP border, so that it lines up with the cells of a grid ``height`` pixels tall."""
    from PIL import Image

    inner = max(1, height - 2 * CELL_GAP)
    h, w = image.shape[-2:]
    width = max(1, round(w * inner / h))
    resized = np.asarray(Image.fromarray(rgb_pixels(image)).resize((width, inner), Image.LANCZOS))
    canvas = np.full((height, width + 2 * CELL_GAP, 3), BACKGROUND, dtype=np.uint8)
    canvas[CELL_GAP:CELL_GAP + inner, CELL_GAP:CELL_GAP + width] = resized
    return canvas


def channel_figure(projections: Union[torch.Tensor, Sequence[torch.Tensor]], patches: torch.Tensor, k: int, *,
                   titles: Optional[Sequence[str]] = None, outlines: Optional[torch.Tensor] = None,
                   optimized: Optional[torch.Tensor] = None) -> np.ndarray:
    """The figure of one channel: one grid of projections per rule (``projections``: a tensor, or a list
    with one per rule), then the grid of image ``patches`` (all [n <= k, 3, h, w] in [0, 1]),
    ``ceil(sqrt(k))`` columns each: 3x3 for the paper's k = 9; then, where given, the ``optimized``
    image ([3, h, w] in [0, 1], e.g. from ``synthesize``) as tall as the grids. ``titles``: one per
    panel (the rules, the patches, the optimized image), drawn above them. ``outlines``: bool [n, h, w]
    drawn on the patches. The grids are drawn alike with or without the optimized image."""
    if isinstance(projections, torch.Tensor):
        projections = [projections]
    columns = max(1, math.ceil(math.sqrt(k)))
    scale = _upscale_factor(patches.shape[2], patches.shape[3])
    parts = [grid(p, k, columns, scale) for p in projections] + [grid(patches, k, columns, scale, outlines)]
    narrowest = min(part.shape[1] for part in parts)
    if optimized is not None:
        if not isinstance(optimized, torch.Tensor) or optimized.dim() != 3 or optimized.shape[0] != 3:
            given = list(optimized.shape) if isinstance(optimized, torch.Tensor) else type(optimized).__name__
            raise ValueError(f"channel_figure: optimized must be an RGB image [3, h, w] in [0, 1], got {given}")
        parts.append(_panel(optimized, parts[0].shape[0]))
    if titles is not None:
        if len(titles) != len(parts):
            drawn = "panels (grids and the optimized image)" if optimized is not None else "grids"
            raise ValueError(f"channel_figure: {len(parts)} {drawn} but {len(titles)} titles")
        return _with_titles(parts, titles, narrowest)
    spacer = np.full((parts[0].shape[0], GRID_GAP, 3), BACKGROUND, dtype=np.uint8)
    pieces = [parts[0]]
    for part in parts[1:]:
        pieces += [spacer, part]
    return np.concatenate(pieces, axis=1)


def overview(images: Sequence[np.ndarray], labels: Sequence[str]) -> np.ndarray:
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


def save_png(image: np.ndarray, path: Path) -> None:
    """Write an [H, W, 3] uint8 image as a PNG, creating its folder."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, format="PNG", compress_level=4)

