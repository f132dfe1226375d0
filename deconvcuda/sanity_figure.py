"""Adebayo et al.'s cascading-randomization figure for a :class:`deconvcuda.sanity.SanityCheck`: rows are
the rules, columns the randomization steps (the original model, then one more layer randomized per
column, from the top down), each cell the first image's projection as the gallery shows projections
(``figures.projections_to_rgb``), with that step's mean Spearman correlation and SSIM beneath.

    table = deconvcuda.sanity_check(model, images, "features.28")
    sanity_figure("sanity.png", table, channel_order="BGR", image=photos.images[0])
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from .analyses.drawing import PathLike, _figure, _hwc, _save
from .sanity import SanityCheck

__all__ = ["sanity_figure"]

CELL_INCHES = 1.25


def sanity_figure(path: PathLike, table: SanityCheck, *, channel_order: str = "RGB",
                  image: Optional[torch.Tensor] = None, title: str = "") -> Path:
    """Draw ``table`` into the PNG ``path``; returns the path. channel_order: the model's input order
    ("BGR" models are shown in RGB). image: the first image as people see it (``[3, H, W]`` RGB in
    [0, 1]), drawn as a first column when given. title: above the figure (default: what was randomized)."""
    from .figures import projections_to_rgb

    if not isinstance(table, SanityCheck):
        raise TypeError(f"sanity_figure: table must be a SanityCheck (what sanity_check returns), got "
                        f"{type(table).__name__}")
    rules, steps = table.projections.shape[:2]
    cells = projections_to_rgb(table.projections.flatten(0, 1), channel_order).view(rules, steps, 3,
                                                                                    *table.projections.shape[-2:])
    first = image is not None
    columns = steps + first
    figure = _figure(CELL_INCHES * columns + 0.6, CELL_INCHES * rules + 0.9)
    axes = figure.subplots(rules, columns, squeeze=False)
    for row, rule in enumerate(table.rules):
        if first:
            axes[row][0].imshow(_hwc(image), interpolation="nearest")
            if row == 0:
                axes[row][0].set_title("image", fontsize=8)
        for step in range(steps):
            cell = axes[row][step + first]
            cell.imshow(_hwc(cells[row, step]), interpolation="nearest")
            if row == 0:
                cell.set_title("original" if step == 0 else table.layers[step - 1], fontsize=8)
            cell.set_xlabel(f"ρ {float(table.spearman[row, step]):.2f}  SSIM {float(table.ssim[row, step]):.2f}",
                            fontsize=6.5)
        axes[row][0].set_ylabel(rule, fontsize=9)
        for cell in axes[row]:
            cell.set_xticks([])
            cell.set_yticks([])
    neuron = table.neurons[0].tolist()
    figure.suptitle(title or (f"cascading randomization down to the input: each column re-initialises one more layer; "
                              f"{table.layer} channel {neuron[1]} at ({neuron[2]}, {neuron[3]}) of the first image, "
                              f"projected; ρ, SSIM: means over {table.neurons.shape[0]} images"), fontsize=9)
    return _save(figure, path)
