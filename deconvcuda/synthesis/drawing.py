"""A grid of synthesized images, each under its label, as one PNG (matplotlib's object API).

    synthesis_figure("out/synthesis_features.22.png", images, [f"channel {c}" for c in channels],
                     values=objective_values(...), title="features.22")
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..analyses.drawing import PathLike, _figure, _hwc, _save

__all__ = ["synthesis_figure"]


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
    figure = _figure(cell_inches * columns, (cell_inches + 0.3) * rows + (0.3 if title else 0.0))
    axes = figure.subplots(rows, columns, squeeze=False)
    for i in range(rows * columns):
        cell = axes[i // columns][i % columns]
        cell.set_axis_off()
        if i >= count:
            continue
        cell.imshow(_hwc(images[i]), interpolation="antialiased")
        text = labels[i] if values is None else f"{labels[i]}\n{values[i].item():.3g}"
        cell.set_title(text, fontsize=8)
    if title:
        figure.suptitle(title, fontsize=10)
    return _save(figure, path)
