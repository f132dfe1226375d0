"""What ``visualize`` wrote, as records: one per channel figure, one per layer, one per run."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

__all__ = ["ChannelFigure", "LayerFigures", "Visualization"]


@dataclass
class ChannelFigure:
    """One channel's figure and what it shows, strongest activation first (activations > 0 only)."""

    layer: str
    channel: int
    path: Path                              # the PNG: a grid of projections per rule, the patches (, optimized image)
    values: List[float]                     # the activations, all > 0; fewer than k where fewer images fire
    image_index: List[int]                  # positions in the dataset
    image_names: List[str]
    positions: List[Tuple[int, int]]        # (y, x) in the layer's output map
    boxes: List[Tuple[int, int, int, int]]  # (top, left, bottom, right) input-pixel boxes, unclipped
    rules: List[str] = field(default_factory=lambda: ["deconvnet"])
    optimized: Optional[Path] = None        # the optimized image's own PNG (visualize(synthesize=...)), else None
    optimized_value: Optional[float] = None  # the objective synthesize maximised, as the optimized image reaches it


@dataclass
class LayerFigures:
    """One layer: its channels' figures, an overview PNG and where the time went (seconds)."""

    layer: str
    num_channels: int                       # how many the layer has
    channels: List[int]                     # the ones drawn
    receptive_field: Tuple[int, int]        # (height, width) in input pixels
    overview: Optional[Path]
    figures: List[ChannelFigure] = field(default_factory=list)
    seconds: Dict[str, float] = field(default_factory=dict)  # "top_activations", "project", "draw" (, "synthesize")
    silent: List[int] = field(default_factory=list)          # channels with no activation > 0 in the data
    map_size: Tuple[int, ...] = ()                           # (H, W) of the output map; () for a flat layer
    stride: Tuple[int, int] = (0, 0)                         # input pixels between neighbouring fields
    gradient_ops: List[str] = field(default_factory=list)    # ops on the path outside the paper's table
    fallback: Optional[str] = None                           # why the graph cannot hold the model, if it cannot


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
