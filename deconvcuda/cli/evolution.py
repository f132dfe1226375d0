"""``deconvcuda evolution``: Fig. 4, each feature map's strongest projection at each training checkpoint.

    deconvcuda evolution --model zfnet --checkpoints epoch1.pt epoch2.pt epoch3.pt --layer features.1
"""
from __future__ import annotations

import argparse
import html
import os
import sys
from pathlib import Path

from . import analysis, common
from .common import PROG, UsageError

HELP = "Fig. 4: each feature map's strongest projection at each training checkpoint"


def add_parser(commands) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        "evolution", help=HELP,
        description="For each checkpoint (a state_dict file, in training order) and each chosen feature map: its "
                    "strongest activation over the images, projected to pixels; checkpoints in columns, maps in rows.")
    analysis.add_options(parser, "evolution", max_images=None)
    parser.add_argument("--checkpoints", nargs="+", required=True, metavar="FILE",
                        help="state_dict files (torch.save(model.state_dict(), FILE)), in training order")
    parser.add_argument("--layer", metavar="NAME", help="the layer (default: the first of the model's blocks)")
    parser.add_argument("--channels", type=common.parse_channels, default=list(range(8)), metavar="LIST",
                        help="feature maps, e.g. 0-7,12 (default 0-7)")
    return parser


def run(args) -> int:
    from ..analyses.evolution import evolution, read_checkpoints
    from ..figures import gallery, plots

    device, model = analysis.device_and_model(args)
    layer = analysis.layer(model, args.layer, 0)
    missing = [path for path in args.checkpoints if not os.path.isfile(path)]
    if missing:
        raise UsageError(f"--checkpoints: no such file: {', '.join(missing)}")
    images = common.open_images(args, model)
    print(f"{PROG}: evolution of {layer} ({args.model} on {device}) over {len(args.checkpoints)} checkpoints, "
          f"{len(images)} images, channels {', '.join(map(str, args.channels))}", file=sys.stderr)
    try:  # every checkpoint must fit before any work: a usage error, not a failure
        states = [state for _, state in read_checkpoints(model, args.checkpoints, f"{PROG} evolution")]
    except (ValueError, TypeError) as error:
        raise UsageError(f"--checkpoints: {error}") from None
    cells = evolution(model, states, images.data, layer, args.channels, batch_size=args.batch_size,
                      progress=not args.no_progress)
    path = Path(args.out) / "evolution" / f"{gallery.slug(layer)}.png"
    gallery.clear_previous(args.out, "evolution")
    order = getattr(model.preprocessing, "channel_order", "RGB")
    plots.draw_evolution(path, cells, order, [Path(p).stem for p in args.checkpoints],
                         [f"map {c}" for c in args.channels], f"{layer}: strongest projection per checkpoint")
    checkpoints = ", ".join(html.escape(Path(p).name) for p in args.checkpoints)
    caption = (f"<b>{html.escape(layer)}</b>: columns are checkpoints ({checkpoints}), rows feature maps "
               f"{', '.join(map(str, args.channels))}")
    body = ('<p class="about">Zeiler &amp; Fergus, Fig. 4: each feature map\'s strongest activation over the images '
            "at each checkpoint, projected to pixels and cropped to where the projection is.</p>\n"
            + gallery.figure_html(path, args.out, caption))
    index = gallery.add_to_gallery(args.out, "evolution", "Evolution", body, [path],
                                   analysis.header(args, images, len(images), device))
    return analysis.done(args, "evolution", [path], index)
