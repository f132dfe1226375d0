"""``deconvcuda visualize``: the paper's top-k figures of some layers, into a folder with an index.html.

    deconvcuda visualize --model alexnet --weights alexnet.pth --images photos/ --layers features.4,11
    deconvcuda visualize --synthesize --synthesis-steps 128     # and each channel's optimized image beside them
    python -m torch.distributed.run --nproc_per_node=8 -m deconvcuda visualize ...   # 8 processes share the work

The images stream: a folder (or a list of files) is read batch by batch by the scan's worker
processes, each torchrun process reading its own part, and the images of the activations drawn are
read again by index; memory does not grow with the number of images.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from . import common
from .common import PROG, UsageError
from .synthesize import add_options as add_synthesis_options, options as synthesis_options

HELP = "write the paper's top-k figures of some layers to a folder with an index.html"


def add_parser(commands) -> argparse.ArgumentParser:
    from ..figures.render import CONTRASTS
    from ..figures.visualization import DEFAULT_CHANNELS

    parser = commands.add_parser(
        "visualize", help=HELP,
        description="For each channel of each layer: its k strongest activations over the images, projected "
                    "to pixel space, beside the image patches they came from; PNG files and an index.html.")
    common.add_model_options(parser)
    common.add_image_options(parser, crops=3)
    parser.add_argument("--layers", type=common.parse_layers, metavar="LIST",
                        help="comma-separated layer names; a bare number reuses the previous prefix, e.g. "
                             "features.3,8,15 (default: the last ReLU of each block)")
    parser.add_argument("--channels", type=common.parse_channels, metavar="LIST",
                        help="channels to draw in every layer, e.g. 0-15,32, or 'all' (default: the first "
                             "--max-channels channels that fire on the images); channels that never fire are "
                             "listed as silent, not drawn")
    parser.add_argument("--max-channels", type=common.count_or_all, default=DEFAULT_CHANNELS, metavar="N",
                        help=f"without --channels, how many channels per layer: the first N that fire, or 'all' "
                             f"(default {DEFAULT_CHANNELS})")
    parser.add_argument("--rule", type=common.parse_rules, default=["deconvnet"], metavar="LIST",
                        help="how each ReLU is reversed: deconvnet (the paper's, default), guided (guided "
                             "backpropagation), gradient; several, e.g. deconvnet,guided, are drawn side by side")
    parser.add_argument("--contrast", choices=CONTRASTS, default="robust",
                        help="robust (default: per projection, colour cast removed, the 99.5th percentile of "
                             "|value| at black and white) or max (the paper's linear scaling to the maximum)")
    parser.add_argument("--top", type=common.positive, default=9, metavar="K",
                        help="activations per channel (default 9, a 3x3 grid as in the paper)")
    common.add_run_options(parser, "output folder (default out/)", 32, "images per forward pass")
    parser.add_argument("--seed", choices=("value", "one"), default="value",
                        help="the seed: the activation's value (the paper's, default) or 1")
    parser.add_argument("--lrn", choices=("gradient", "identity"), default="gradient",
                        help="how LocalResponseNorm is reversed (default: its gradient)")
    parser.add_argument("--backend", choices=("auto", "reference"), default="auto",
                        help="native kernels (auto, default) or the pure-PyTorch reference")
    parser.add_argument("--strict", action="store_true",
                        help="refuse every op outside the paper's reverse operations instead of taking its exact "
                             "gradient (SiLU, GELU, attention, ...)")
    parser.add_argument("--synthesize", action="store_true",
                        help="put beside each channel's grids its optimized image, the image deconvcuda.synthesize "
                             "makes to drive the channel up, in batches of --batch-size channels (the --synthesis-* "
                             "options below)")
    add_synthesis_options(parser, "synthesis-", size_help="--image-size")
    return parser


def run(args) -> int:
    with common.torchrun(args.device) as (device, rank, world):
        return _visualize(args, device, rank, world)


def _visualize(args, device: torch.device, rank: int, world: int) -> int:
    """The command in one process of ``world``: every process scans and projects its share, rank 0
    alone prints and writes."""
    from .. import models
    from ..figures.visualization import visualize

    model = common.build_model(args).to(device)
    layers = args.layers or models.default_layers(model)
    common.check_layers(model, layers)
    images = common.open_images(args, model)
    synthesis = synthesis_options(args, "synthesis-")
    if synthesis and not args.synthesize:
        raise UsageError(f"--synthesis-{next(iter(synthesis))}: the --synthesis-* options set how the optimized images "
                         "are made; add --synthesize to draw them")
    if isinstance(args.channels, list):
        common.check_channels(model, (3, args.image_size, args.image_size), layers, args.channels, "visualize")

    processes = f" in {world} processes" if world > 1 else ""
    if rank == 0:
        print(f"{PROG}: {args.model} on {device}{processes}, {len(images)} images of {images.where} at "
              f"{args.image_size}x{args.image_size}, layers {', '.join(layers)}", file=sys.stderr)
    result = visualize(model, images.data, layers, channels=args.channels, max_channels=args.max_channels, k=args.top,
                       rule=args.rule, contrast=args.contrast, out=args.out, image_names=images.names,
                       preprocessing=model.preprocessing, batch_size=args.batch_size, device=device, seed=args.seed,
                       lrn=args.lrn, backend=args.backend, strict=args.strict,
                       synthesize=synthesis if args.synthesize else False,
                       progress=not args.no_progress,
                       model_name=args.model,
                       weights=common.weights_description(args.model, args.weights), data_name=images.describe)
    if rank == 0:
        shares = f" ({' + '.join(map(str, result.images_per_rank))} by the {world} processes)" if world > 1 else ""
        print(f"{PROG}: scanned {sum(result.images_per_rank)} images{shares}", file=sys.stderr)
        print(f"wrote {len(result.figures)} figures of {len(result.layers)} layers to "
              f"{os.path.join(str(result.out), '')}; open {result.index}")
    return 0
