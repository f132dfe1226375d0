"""The figures of the analyses (the paper's Figs. 4, 5 and 7), drawn with matplotlib (its object API:
no pyplot, no global state).

    occlusion_figure(path, image, values, window=16, stride=8, projection=..., probabilities=..., classes=...)
    invariance_figure(path, transform, amounts, {layer: distances}, probabilities=...)
    evolution_figure(path, cells, checkpoint_labels, channel_labels)
    draw_evolution(path, projections, channel_order, checkpoint_labels, channel_labels, title)
    sanity_figure(path, table, channel_order="BGR", image=first_image)       # Adebayo et al.'s figure
    gradcam_figure(path, image, cam, guided, channel_order="BGR", title=...)  # one image's class views

Images come in as ``[3, H, W]`` RGB floats in [0, 1] (``Preprocessing.to_display``,
``render.projections_to_rgb``); every function writes one PNG and returns its path.
"""
from __future__ import annotations

import math
import os
import textwrap
from pathlib import Path
from typing import List, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from ..geometry import pair

__all__ = ["occlusion_figure", "invariance_figure", "evolution_figure", "draw_evolution", "sanity_figure",
           "synthesis_figure", "gradcam_figure", "new_figure", "hwc", "save_figure"]

PathLike = Union[str, os.PathLike]
DPI = 100
#: About how many characters of a 9-point title fit in an inch: long titles are wrapped to the figure's width.
TITLE_CHARACTERS_PER_INCH = 13


def new_figure(width: float, height: float):
    try:
        from matplotlib.figure import Figure
    except ModuleNotFoundError:
        raise ModuleNotFoundError("deconvcuda.figures: the analyses' figures are drawn with matplotlib; install it with "
                                  "`pip install matplotlib`") from None
    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def title_lines(title: str, inches: float) -> List[str]:
    """``title`` wrapped into lines that fit a figure ``inches`` wide in 9-point type."""
    return textwrap.wrap(title, width=max(12, int(inches * TITLE_CHARACTERS_PER_INCH)))


def save_figure(figure, path: PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=DPI)
    return path


def hwc(image: torch.Tensor) -> np.ndarray:
    """[3, H, W] (or [1, H, W]) floats in [0, 1] -> [H, W, 3] numpy."""
    image = image.detach().to("cpu", torch.float32).clamp(0.0, 1.0)
    if image.dim() != 3:
        raise ValueError(f"deconvcuda.figures: expected an image [3, H, W], got {list(image.shape)}")
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    return image.permute(1, 2, 0).numpy()


def _heat_map(axes, figure, values: np.ndarray, image_size, window, stride, title: str, colour_map: str,
              label: str, limits=None):
    """Values over occluder positions, each drawn at its square's centre in image coordinates."""
    window, stride = pair(window), pair(stride)
    rows, cols = values.shape
    # the centres span [window/2, (rows-1)*stride + window/2]; each cell is one stride wide
    extent = (window[1] / 2 - stride[1] / 2, window[1] / 2 + (cols - 0.5) * stride[1],
              window[0] / 2 + (rows - 0.5) * stride[0], window[0] / 2 - stride[0] / 2)
    shown = axes.imshow(values, cmap=colour_map, extent=extent, interpolation="nearest",
                        vmin=None if limits is None else limits[0], vmax=None if limits is None else limits[1])
    axes.set_xlim(0, image_size[1])
    axes.set_ylim(image_size[0], 0)
    axes.set_title(title, fontsize=9)
    axes.tick_params(labelsize=7)
    bar = figure.colorbar(shown, ax=axes, shrink=0.8)
    formatter = bar.ax.yaxis.get_major_formatter()
    if hasattr(formatter, "set_useOffset"):  # probabilities like 0.00100007 read as they are, not as an offset
        formatter.set_useOffset(False)
    bar.set_label(label, fontsize=8)
    bar.ax.tick_params(labelsize=7)


def occlusion_figure(path: PathLike, image: torch.Tensor, values: torch.Tensor, *, window=16, stride=8,
                     layer: str = "", channel: Optional[int] = None, projection: Optional[torch.Tensor] = None,
                     probabilities: Optional[torch.Tensor] = None, classes: Optional[torch.Tensor] = None,
                     true_class: Optional[int] = None, class_names: Optional[Sequence[str]] = None,
                     title: str = "") -> Path:
    """Fig. 7 for one image: (a) the image with the occluder's grid and one square, (b) the feature
    map's total activation as a heat map over square positions, (c) the projection of the feature
    map's strongest activation, and for a classifier (d) the true class's probability and (e) the most
    probable class per position. values, probabilities, classes: ``[R, C]`` over positions."""
    from matplotlib.patches import Rectangle

    window, stride = pair(window), pair(stride)
    picture = hwc(image)
    height, width = picture.shape[:2]
    panels = 2 + (projection is not None) + (probabilities is not None) + (classes is not None)
    figure = new_figure(3.2 * panels, 3.4)
    axes = figure.subplots(1, panels, squeeze=False)[0]
    if title:
        figure.suptitle(title, fontsize=10)
    rows, cols = values.shape

    axes[0].imshow(picture, interpolation="nearest")
    for i in range(rows):  # the centres of every square position
        axes[0].plot([window[1] / 2 + j * stride[1] for j in range(cols)], [window[0] / 2 + i * stride[0]] * cols,
                     ".", color="white", markersize=1.5, alpha=0.8)
    axes[0].add_patch(Rectangle((-0.5, -0.5), window[1], window[0], facecolor=(0.5, 0.5, 0.5, 0.8),
                                edgecolor="white", linewidth=0.8))
    axes[0].set_title(f"(a) image, {window[0]}x{window[1]} square, stride {stride[0]}", fontsize=9)
    axes[0].set_axis_off()

    what = f"{layer or 'output'}" + (f" map {channel}" if channel is not None else "")
    _heat_map(axes[1], figure, values.detach().to("cpu", torch.float32).numpy(), (height, width), window, stride,
              f"(b) {what}: activation", "viridis", "activation with the square there")
    panel = 2
    if projection is not None:
        axes[panel].imshow(hwc(projection), interpolation="nearest")
        axes[panel].set_title("(c) its strongest activation, projected", fontsize=9)
        axes[panel].set_axis_off()
        panel += 1
    if probabilities is not None:
        name = (class_names[true_class] if class_names is not None and true_class is not None
                else f"class {true_class}")
        _heat_map(axes[panel], figure, probabilities.detach().to("cpu", torch.float32).numpy(), (height, width),
                  window, stride, f"(d) p({name})", "magma", "probability")
        panel += 1
    if classes is not None:
        classes = classes.detach().cpu()
        distinct, codes = torch.unique(classes, return_inverse=True)
        from matplotlib import colormaps

        colours = colormaps["tab20"].resampled(max(len(distinct), 1))
        _heat_map(axes[panel], figure, codes.numpy().astype(np.float32), (height, width), window, stride,
                  "(e) most probable class", colours, "class", limits=(-0.5, len(distinct) - 0.5))
        bar = axes[panel].images[-1].colorbar
        bar.set_ticks(range(len(distinct)))
        bar.set_ticklabels([class_names[int(c)] if class_names is not None else str(int(c)) for c in distinct],
                           fontsize=6)
    return save_figure(figure, path)


def invariance_figure(path: PathLike, transform: str, amounts: Sequence[float],
                      distances: Mapping[str, torch.Tensor], *, probabilities: Optional[torch.Tensor] = None,
                      image_names: Optional[Sequence[str]] = None, class_name: str = "true class") -> Path:
    """Fig. 5 for one transform: per layer, each image's distance curve over ``amounts``, and for a
    classifier each image's true-class probability. distances: ``{layer: [N, len(amounts)]}``."""
    units = {"translate": "vertical shift (pixels)", "scale": "scale factor", "rotate": "rotation (degrees)"}
    panels = len(distances) + (probabilities is not None)
    figure = new_figure(3.4 * panels, 3.0)
    axes = figure.subplots(1, panels, squeeze=False)[0]
    amounts = [float(a) for a in amounts]
    curves = list(distances.items()) + ([("", probabilities)] if probabilities is not None else [])
    for panel, (layer, values) in enumerate(curves):
        values = values.detach().to("cpu", torch.float64).numpy()
        for n in range(values.shape[0]):
            label = image_names[n] if image_names is not None else f"image {n}"
            axes[panel].plot(amounts, values[n], marker=".", linewidth=1, markersize=3, label=label)
        is_probability = probabilities is not None and panel == len(curves) - 1
        axes[panel].set_title(f"p({class_name})" if is_probability else f"{layer or 'output'}: distance", fontsize=9)
        axes[panel].set_xlabel(units.get(transform, transform), fontsize=8)
        axes[panel].set_ylabel("probability" if is_probability else "Euclidean distance", fontsize=8)
        axes[panel].tick_params(labelsize=7)
        axes[panel].grid(alpha=0.3)
    if curves and len(curves[0][1]) <= 12:
        axes[0].legend(fontsize=6)
    figure.suptitle(f"invariance to {transform}", fontsize=10)
    return save_figure(figure, path)


def evolution_figure(path: PathLike, cells: torch.Tensor, checkpoint_labels: Sequence[str],
                     channel_labels: Sequence[str], title: str = "") -> Path:
    """Fig. 4: rows of feature maps, columns of checkpoints; cells ``[T, K, 3, h, w]`` RGB in [0, 1]."""
    steps, rows = cells.shape[:2]
    figure = new_figure(1.3 * steps + 1.2, 1.3 * rows + 0.6)
    axes = figure.subplots(rows, steps, squeeze=False)
    for row in range(rows):
        for step in range(steps):
            axes[row][step].imshow(hwc(cells[step, row]), interpolation="nearest")
            axes[row][step].set_xticks([])
            axes[row][step].set_yticks([])
            if row == 0:
                axes[row][step].set_title(checkpoint_labels[step], fontsize=8)
            if step == 0:
                axes[row][step].set_ylabel(channel_labels[row], fontsize=8)
    if title:
        figure.suptitle(title, fontsize=10)
    return save_figure(figure, path)


def draw_evolution(path, cells: torch.Tensor, channel_order: str, checkpoint_labels, channel_labels, title: str):
    """``evolution``'s result [T, K, C, H, W] as the figure: each projection shown zero-centred on its own
    contrast, cropped to the square around where it is non-zero."""
    from .render import projections_to_rgb

    steps, rows = cells.shape[:2]
    rgb = projections_to_rgb(cells.flatten(0, 1).cpu(), channel_order)
    magnitude = cells.flatten(0, 1).abs().sum(dim=1).cpu()          # [T * K, H, W]
    crops = []
    for i in range(rgb.shape[0]):
        crops.append(_crop_to_support(rgb[i], magnitude[i]))
    side = max(crop.shape[-1] for crop in crops)
    resized = torch.stack([torch.nn.functional.interpolate(crop[None], size=(side, side), mode="nearest")[0]
                           for crop in crops])
    return evolution_figure(path, resized.view(steps, rows, 3, side, side), checkpoint_labels, channel_labels, title)


def _crop_to_support(image: torch.Tensor, magnitude: torch.Tensor, share: float = 0.02) -> torch.Tensor:
    """The smallest square of ``image`` [3, H, W] holding every pixel whose ``magnitude`` is above
    ``share`` of the largest (the whole image where the projection is zero)."""
    height, width = magnitude.shape
    peak = float(magnitude.max())
    if peak <= 0:
        return image
    ys, xs = torch.nonzero(magnitude > share * peak, as_tuple=True)
    top, bottom, left, right = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    side = min(max(bottom - top, right - left, 8), height, width)
    top = max(0, min((top + bottom - side) // 2, height - side))
    left = max(0, min((left + right - side) // 2, width - side))
    return image[:, top:top + side, left:left + side]


#: The size of one cell of the sanity-check figure.
SANITY_CELL_INCHES = 1.25


def sanity_figure(path: PathLike, table, *, channel_order: str = "RGB",
                  image: Optional[torch.Tensor] = None, title: str = "") -> Path:
    """Adebayo et al.'s cascading-randomization figure of ``table`` (a :class:`deconvcuda.sanity.SanityCheck`):
    rows are the rules, columns the randomization steps (the original model, then one more layer
    randomized per column, from the top down), each cell the first image's projection as the gallery
    shows projections, with that step's mean Spearman correlation and SSIM beneath. Drawn into the PNG
    ``path``; returns the path. channel_order: the model's input order
    ("BGR" models are shown in RGB). image: the first image as people see it (``[3, H, W]`` RGB in
    [0, 1]), drawn as a first column when given. title: above the figure (default: what was randomized)."""
    from ..sanity import SanityCheck
    from .render import projections_to_rgb

    if not isinstance(table, SanityCheck):
        raise TypeError(f"sanity_figure: table must be a SanityCheck (what sanity_check returns), got "
                        f"{type(table).__name__}")
    rules, steps = table.projections.shape[:2]
    cells = projections_to_rgb(table.projections.flatten(0, 1), channel_order).view(rules, steps, 3,
                                                                                    *table.projections.shape[-2:])
    first = image is not None
    columns = steps + first
    width = SANITY_CELL_INCHES * columns + 0.6
    neuron = table.neurons[0].tolist()
    title = title or (f"cascading randomization down to the input: each column re-initialises one more layer; "
                      f"{table.layer} channel {neuron[1]} at ({neuron[2]}, {neuron[3]}) of the first image, "
                      f"projected; ρ, SSIM: means over {table.neurons.shape[0]} images")
    lines = title_lines(title, width)
    figure = new_figure(width, SANITY_CELL_INCHES * rules + 0.75 + 0.15 * len(lines))
    axes = figure.subplots(rules, columns, squeeze=False)
    for row, rule in enumerate(table.rules):
        if first:
            axes[row][0].imshow(hwc(image), interpolation="nearest")
            if row == 0:
                axes[row][0].set_title("image", fontsize=8)
        for step in range(steps):
            cell = axes[row][step + first]
            cell.imshow(hwc(cells[row, step]), interpolation="nearest")
            if row == 0:
                cell.set_title("original" if step == 0 else table.layers[step - 1], fontsize=8)
            cell.set_xlabel(f"ρ {float(table.spearman[row, step]):.2f}  SSIM {float(table.ssim[row, step]):.2f}",
                            fontsize=6.5)
        axes[row][0].set_ylabel(rule, fontsize=9)
        for cell in axes[row]:
            cell.set_xticks([])
            cell.set_yticks([])
    figure.suptitle("\n".join(lines), fontsize=9)
    return save_figure(figure, path)


#: The side of one panel of the Grad-CAM figure.
GRADCAM_PANEL_INCHES = 2.4


def gradcam_figure(path: PathLike, image: torch.Tensor, cam: torch.Tensor, guided: torch.Tensor, *,
                   channel_order: str = "RGB", title: str = "") -> Path:
    """The class views of one image, side by side: the image, its Grad-CAM map over it (a heat map
    scaled to the map's maximum, which the panel's title gives), and guided Grad-CAM drawn as the
    gallery draws projections. image: ``[3, H, W]`` RGB in [0, 1] (``Preprocessing.to_display``);
    cam: ``[H, W]`` (one image of :func:`deconvcuda.gradcam`); guided: ``[C, H, W]`` (one image of
    :func:`deconvcuda.guided_gradcam`, in the model's input order ``channel_order``). Drawn into the
    PNG ``path``; returns the path."""
    from .render import projections_to_rgb

    picture = hwc(image)
    cam = cam.detach().to("cpu", torch.float64)
    peak = float(cam.max())
    figure = new_figure(3 * GRADCAM_PANEL_INCHES, GRADCAM_PANEL_INCHES + 0.5)
    axes = figure.subplots(1, 3, squeeze=False)[0]
    axes[0].imshow(picture, interpolation="nearest")
    axes[0].set_title("image", fontsize=9)
    axes[1].imshow(picture, interpolation="nearest")
    axes[1].imshow((cam / peak if peak > 0 else cam).numpy(), cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0,
                   interpolation="nearest")
    axes[1].set_title(f"Grad-CAM (max {peak:.3g})", fontsize=9)
    axes[2].imshow(hwc(projections_to_rgb(guided.detach().cpu()[None], channel_order)[0]), interpolation="nearest")
    axes[2].set_title("guided Grad-CAM", fontsize=9)
    for panel in axes:
        panel.set_xticks([])
        panel.set_yticks([])
    if title:
        lines = title_lines(title, 3 * GRADCAM_PANEL_INCHES)
        figure.suptitle("\n".join(lines), fontsize=9)
    return save_figure(figure, path)


def synthesis_figure(path: PathLike, images: torch.Tensor, labels: Optional[Sequence[str]] = None, *,
                     values: Optional[torch.Tensor] = None, title: str = "", columns: Optional[int] = None,
                     cell_inches: float = 1.6) -> Path:
    """Writes ``images`` ([N, 3, H, W] RGB in [0, 1], e.g. from ``synthesize``) as a grid to ``path``
    (PNG) and returns the path. labels: one per image (default "0", "1", ...); values: one number per
    image (the activation reached), written under its label. columns: default ceil(sqrt(N)), at most 8."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(f"synthesis_figure: images must be a tensor [N, 3, H, W] with N > 0, got "
                         f"{list(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    count = images.shape[0]
    labels = [str(i) for i in range(count)] if labels is None else [str(label) for label in labels]
    if len(labels) != count:
        raise ValueError(f"synthesis_figure: labels must hold one label per image ({count}), got {len(labels)}")
    if values is not None:
        values = torch.as_tensor(values).detach().to("cpu", torch.float64).flatten()
        if values.numel() != count:
            raise ValueError(f"synthesis_figure: values must hold one number per image ({count}), got {values.numel()}")
    if columns is None:
        columns = min(8, math.ceil(math.sqrt(count)))
    if not isinstance(columns, int) or columns < 1:
        raise ValueError(f"synthesis_figure: columns must be a positive int, got {columns!r}")
    rows = math.ceil(count / columns)
    lines = title_lines(title, cell_inches * columns) if title else []
    title_inches = 0.15 + 0.15 * len(lines) if lines else 0.0
    figure = new_figure(cell_inches * columns, (cell_inches + 0.3) * rows + title_inches)
    axes = figure.subplots(rows, columns, squeeze=False)
    for i in range(rows * columns):
        cell = axes[i // columns][i % columns]
        cell.set_axis_off()
        if i >= count:
            continue
        cell.imshow(hwc(images[i]), interpolation="antialiased")
        text = labels[i] if values is None else f"{labels[i]}\n{values[i].item():.3g}"
        cell.set_title(text, fontsize=8)
    if lines:
        figure.suptitle("\n".join(lines), fontsize=9)
    return save_figure(figure, path)
