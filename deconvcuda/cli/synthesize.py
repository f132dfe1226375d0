"""``deconvcuda synthesize``: the image each channel of a layer would like best (feature visualization by
regularized optimization, ``deconvcuda.synthesize``), as a grid in the gallery's own section.

    deconvcuda synthesize --layer features.29 --channels 0-15
    deconvcuda synthesize --layer features.22 --channels 3,17 --size 128 --steps 512 --regularizers fourier,jitter
    deconvcuda visualize --synthesize ...          # each channel's optimized image beside its top-9 instead
    python -m torch.distributed.run --nproc_per_node=8 -m deconvcuda synthesize ...   # 8 processes share the batches

:func:`add_options` gives both commands synthesize's options (``visualize`` with the prefix
``synthesis-``) and :func:`options` reads them back as its keyword arguments.
"""
from __future__ import annotations

import argparse
import html
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from . import analysis, common
from .common import PROG, UsageError

HELP = "the image each channel of a layer would like best (regularized optimization), as a grid in the gallery"
#: The folder under --out, and the gallery's section, of this command.
KEY = "synthesize"


def regularizer_names(text: str) -> List[str]:
    """``"fourier,jitter"`` -> ["fourier", "jitter"]: names of ``deconvcuda.synthesis.regularizers``;
    ``"none"`` -> [] (plain gradient ascent on the pixels)."""
    from ..synthesis import regularizers

    if text.strip().lower() == "none":
        return []
    names = [item.strip() for item in text.split(",")]
    if not all(name in regularizers.REGULARIZERS for name in names):
        raise argparse.ArgumentTypeError(f"expected regularizers from {', '.join(regularizers.names())} separated "
                                         f"by commas, or 'none', got {text!r}")
    return list(dict.fromkeys(names))


def add_options(parser: argparse.ArgumentParser, prefix: str = "", size_help: Optional[str] = None) -> None:
    """``--size``, ``--steps``, ``--seed``, ``--objective`` and ``--regularizers``, the options of
    ``deconvcuda.synthesize``. With a ``prefix`` (after the dashes) they belong to another command
    and default to None, so that :func:`options` holds only those given. size_help: where the default
    size is not synthesize's, what it is."""
    from ..synthesis import optimize, regularizers

    def default(value):
        return None if prefix else value

    group = parser.add_argument_group(
        "optimized images" + (" (with --synthesize)" if prefix else ""),
        "how deconvcuda.synthesize makes each channel's image (docs/synthesize.md)")
    group.add_argument(f"--{prefix}size", type=common.positive, default=default(optimize.DEFAULT_SIZE), metavar="PIXELS",
                       help=f"the images' side (default {size_help or optimize.DEFAULT_SIZE})")
    group.add_argument(f"--{prefix}steps", type=common.positive, default=default(optimize.DEFAULT_STEPS), metavar="N",
                       help=f"optimisation steps (default {optimize.DEFAULT_STEPS})")
    group.add_argument(f"--{prefix}seed", type=int, default=default(0), metavar="N",
                       help="the random start and transforms: the same seed gives the same images (default 0)")
    group.add_argument(f"--{prefix}objective", choices=optimize.OBJECTIVES, default=default(optimize.OBJECTIVES[0]),
                       help="what is driven up: channel (the mean of the channel's map, default) or neuron (the "
                            "unit at its centre)")
    defaults = "; ".join(f"{objective}: {','.join(item.name for item in chosen)}"
                         for objective, chosen in regularizers.DEFAULT.items())
    group.add_argument(f"--{prefix}regularizers", type=regularizer_names, metavar="NAMES",
                       help=f"comma-separated, from {', '.join(regularizers.names())}, or 'none' (default per "
                            f"objective, {defaults})")


def options(args, prefix: str = "") -> Dict[str, object]:
    """The keyword arguments of ``deconvcuda.synthesize`` that :func:`add_options`'s options hold
    (those at None left out, so that the callee's defaults apply)."""
    given = {name: getattr(args, (prefix + name).replace("-", "_"))
             for name in ("size", "steps", "seed", "objective", "regularizers")}
    return {name: value for name, value in given.items() if value is not None}


def add_parser(commands) -> argparse.ArgumentParser:
    from ..figures.visualization import DEFAULT_CHANNELS

    parser = commands.add_parser(
        KEY, help=HELP,
        description="For each channel: an image optimised to drive it up, with regularizers that keep it looking "
                    "like an image (deconvcuda.synthesize); drawn as one grid, with the objective each reaches, "
                    "into the gallery's section 'Optimized images'.")
    common.add_model_options(parser)
    parser.add_argument("--layer", metavar="NAME", help="the layer (default: the last of the model's blocks)")
    parser.add_argument("--channels", type=common.parse_channels, metavar="LIST",
                        help=f"e.g. 0-15,32, or 'all' (default: the first {DEFAULT_CHANNELS})")
    add_options(parser)
    common.add_run_options(parser, f"output folder (default out/); the grid goes to DIR/{KEY}/, linked from "
                                   "DIR/index.html", 32,
                           "channels optimised together in one batch")
    return parser


def run(args) -> int:
    with common.torchrun(args.device) as (device, rank, world):
        return _synthesize(args, device, rank, world)


def _synthesize(args, device: torch.device, rank: int, world: int) -> int:
    """The command in one process of ``world``: the channels are cut into batches of --batch-size,
    batch i optimised by process i % world (so each image is the one a single process makes, whatever
    the number of processes); rank 0 alone prints, draws and writes."""
    from ..distributed import share
    from ..figures import gallery, plots
    from ..figures.visualization import DEFAULT_CHANNELS
    from ..forward import LayerForward
    from ..progress import Progress, is_terminal
    from ..synthesis import objective_values, regularizers, synthesize
    from ..synthesis.optimize import OBJECTIVE_WORDS

    model = common.build_model(args).to(device)
    layer = args.layer if args.layer is not None else analysis.layer(model, None, -1)
    common.check_layers(model, [layer], "--layer")
    requested = args.channels if isinstance(args.channels, list) else []
    shape = (3, args.size, args.size)
    try:
        LayerForward(model, [""], f"{PROG} {KEY}").shapes(shape)   # synthesize checks its layer on a whole forward
        count = common.check_channels(model, shape, [layer], requested, KEY)[layer]
    except ValueError as error:
        raise UsageError(f"--size: {error}") from None
    if args.channels is None:
        channels = list(range(min(DEFAULT_CHANNELS, count)))
    else:
        channels = list(range(count)) if args.channels == "all" else args.channels
    settings = options(args)
    if rank == 0:
        processes = f" in {world} processes" if world > 1 else ""
        print(f"{PROG}: synthesize {layer} ({args.model} on {device}{processes}), {len(channels)} channels, "
              f"{args.size}x{args.size} pixels, {args.steps} steps", file=sys.stderr)
    batches = [channels[first:first + args.batch_size] for first in range(0, len(channels), args.batch_size)]
    mine = list(range(rank, len(batches), world))
    # in a terminal synthesize's own bar shows each batch's steps; in a log file a line at each tenth of the channels
    progress, terminal = not args.no_progress and rank == 0, is_terminal()

    def optimise_mine() -> List[Tuple[int, torch.Tensor, torch.Tensor]]:
        done = []
        with Progress(sum(len(batches[number]) for number in mine), f"synthesize {layer}", "channel",
                      enabled=progress and not terminal) as bar:
            for number in mine:
                images = synthesize(model, layer, batches[number], device=device, progress=progress and terminal,
                                    **settings)
                values = objective_values(model, layer, images, batches[number], objective=args.objective)
                done.append((number, images.cpu(), values.cpu()))
                bar.update(len(batches[number]))
        return done

    results = sorted((item for part in share(optimise_mine, f"{PROG} {KEY}", world=world) for item in part),
                     key=lambda item: item[0])
    if rank != 0:
        return 0
    images = torch.cat([images for _, images, _ in results])
    values = torch.cat([values for _, _, values in results])

    gallery.clear_previous(args.out, KEY)
    path = Path(args.out) / KEY / f"{gallery.slug(layer)}.png"
    plots.synthesis_figure(path, images, [f"channel {c}" for c in channels], values=values,
                           title=f"{layer}: each channel's optimized image; under it, "
                                 f"{OBJECTIVE_WORDS[args.objective]} it reaches")
    if args.regularizers is None:
        used = ", ".join(item.name for item in regularizers.DEFAULT[args.objective]) + " (the default)"
    else:
        used = ", ".join(args.regularizers) or "none"
    caption = (f"<b>{html.escape(layer)}</b>, {len(channels)} channel{'s' * (len(channels) != 1)}: "
               f"{args.size}&times;{args.size} pixels, {args.steps} steps from seed {args.seed} in batches of "
               f"{args.batch_size}, regularizers {html.escape(used)}; under each image, "
               f"{html.escape(OBJECTIVE_WORDS[args.objective])} it reaches")
    body = ('<p class="about">Feature visualization by regularized optimization (Yosinski et al. 2015; Olah et al. '
            "2017): for each channel an input optimised to drive it up, with regularizers that keep it looking like "
            "an image; <code>deconvcuda visualize --synthesize</code> puts each beside the channel's top-k.</p>\n"
            '<div class="channels">' + gallery.figure_html(path, args.out, caption) + "</div>")
    header = [("model", args.model), ("weights", common.weights_description(args.model, args.weights)),
              ("device", str(device))]
    index = gallery.add_to_gallery(args.out, KEY, "Optimized images", body, [path], header)
    return analysis.done(args, KEY, [path], index)
