"""Figures and the gallery: everything deconvcuda draws and the ``index.html`` that shows it.

    run = deconvcuda.figures.visualize(model, images, ["features.22", "features.29"], out="out")
    rgb = deconvcuda.figures.projections_to_rgb(projections)           # [P, 3, h, w] in [0, 1]

The parts, one job each:

- :mod:`.render`: tensors to pictures (projections and image patches to RGB, grids, the channel
  figure, the overview); pure functions, no model.
- :mod:`.plots`: the analyses' figures (occlusion, invariance, evolution, the sanity check, Grad-CAM,
  optimized images), drawn with matplotlib.
- :mod:`.gallery`: the output folder (its manifest, so each run removes what the previous wrote) and
  ``index.html``: ``visualize``'s page, and one section per other command.
- :mod:`.visualization`: ``visualize``, in stages (validation, scan, planning, optimized images and
  projections shared by the ranks, drawing, the page); :mod:`.records`: what it returns.

Adding a gallery section (for a new command): draw its PNGs under
``out/<key>/`` (``render.save_png`` for arrays, a function in :mod:`.plots` for a matplotlib figure),
call ``gallery.clear_previous(out, key)`` before writing them and ``gallery.add_to_gallery(out, key,
title, body, files, header)`` after, ``body`` being HTML made of ``gallery.figure_html(path, out,
caption)`` pieces. The section gets its own link in the page's navigation, replaces the one an
earlier run of the same key left, and its files go into the manifest. ``deconvcuda/cli/occlusion.py``
is a complete example.
"""
from .gallery import MANIFEST, Section, add_to_gallery, clear_previous, figure_html, prepare_output, record_outputs
from .plots import gradcam_figure, sanity_figure, synthesis_figure
from .records import ChannelFigure, LayerFigures, Visualization
from .render import (BACKGROUND, CELL_GAP, CONTRASTS, GRID_GAP, MIN_CELL_PIXELS, OUTLINE_COLOUR, OUTSIDE,
                     OVERVIEW_HEIGHT, channel_figure, grid, patches_to_rgb, projections_to_rgb, support_mask)
from .visualization import DEFAULT_CHANNELS, PROBE_CHANNELS, visualize

__all__ = ["visualize", "Visualization", "LayerFigures", "ChannelFigure", "Section", "projections_to_rgb",
           "patches_to_rgb", "support_mask", "grid", "channel_figure", "prepare_output", "record_outputs",
           "add_to_gallery", "clear_previous", "figure_html", "CONTRASTS", "DEFAULT_CHANNELS", "PROBE_CHANNELS", "MANIFEST",
           "BACKGROUND", "CELL_GAP", "GRID_GAP", "MIN_CELL_PIXELS", "OUTLINE_COLOUR", "OUTSIDE", "OVERVIEW_HEIGHT",
           "sanity_figure", "synthesis_figure", "gradcam_figure"]
