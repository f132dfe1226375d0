"""``deconvcuda sanity``: the sanity check of every rule (Adebayo et al., "Sanity Checks for Saliency
Maps", NeurIPS 2018): the layers with weights below a layer randomized one at a time from the top down,
and how far each rule's projection moves from the original one.

    deconvcuda sanity --layer features.28 --rule guided,gradient --max-images 6
"""
from __future__ import annotations

import argparse
import html
import sys
from pathlib import Path
from typing import List

from . import analysis, common
from .common import PROG, UsageError

HELP = "Adebayo et al.'s sanity check: how far each rule's projection moves as the weights are randomized"


def add_parser(commands) -> argparse.ArgumentParser:
    from ..sanity import DEFAULT_RULES

    parser = commands.add_parser(
        "sanity", help=HELP,
        description="Cascading randomization: the layers with weights on the way to --layer are re-initialised one "
                    "at a time, from the top down; after each step every rule projects the same activations as on "
                    "the original model, and each projection is compared with the original one (Spearman's rank "
                    "correlation and SSIM inside the activation's receptive field). A figure (rows rules, columns "
                    "steps) and the table of numbers, in the gallery.")
    analysis.add_options(parser, "sanity", max_images=4)
    parser.add_argument("--layer", required=True, metavar="NAME",
                        help="the layer whose activations are projected, e.g. features.28 (VGG16's conv5_3 before its "
                             "ReLU: the activation stays live when the weights are random)")
    parser.add_argument("--rule", type=common.parse_rules, default=list(DEFAULT_RULES), metavar="LIST",
                        help=f"the rules compared, e.g. guided,gradient (default {','.join(DEFAULT_RULES)})")
    parser.add_argument("--channel", type=int, metavar="C",
                        help="per image, the strongest activation of this feature map (default: per image, the "
                             "layer's strongest activation)")
    parser.add_argument("--seed", type=int, default=0, metavar="N",
                        help="seeds the re-initialisation of the weights (default 0; the same seed gives the same "
                             "numbers)")
    return parser


def _cell(table, row: int, step: int) -> str:
    """One rule and step of the table: "Spearman / SSIM"."""
    return f"{float(table.spearman[row, step]):.2f} / {float(table.ssim[row, step]):.2f}"


def _table_html(table) -> str:
    """The numbers of the figure: a row per rule, a column per step."""
    head = "".join(f"<th>{html.escape(name)}</th>" for name in ("rule", "original") + table.layers)
    rows = "\n".join(f"<tr><td>{html.escape(rule)}</td>"
                     + "".join(f"<td>{_cell(table, row, step)}</td>" for step in range(len(table.layers) + 1))
                     + "</tr>" for row, rule in enumerate(table.rules))
    return f'<table class="acts">\n<tr>{head}</tr>\n{rows}\n</table>'


def _table_text(table) -> List[str]:
    """The same numbers as lines of text, for the terminal."""
    names = ("rule", "original") + table.layers
    rows = [names] + [(rule,) + tuple(_cell(table, row, step) for step in range(len(table.layers) + 1))
                      for row, rule in enumerate(table.rules)]
    widths = [max(len(row[column]) for row in rows) for column in range(len(names))]
    return ["  ".join(value.ljust(width) for value, width in zip(row, widths)).rstrip() for row in rows]


def run(args) -> int:
    from ..checks import OutOfRangeError
    from ..figures import gallery, plots
    from ..sanity import randomizable_layers, sanity_check

    device, model = analysis.device_and_model(args)
    common.check_layers(model, [args.layer])
    layer = args.layer
    images = common.open_images(args, model)
    inputs, names = images.first(args.max_images, device)
    try:  # a layer the forward never runs (or runs twice) is the user's to change, before any work
        layers = randomizable_layers(model, inputs, layer)
    except ValueError as error:
        raise UsageError(f"--layer: {error}") from None
    if not layers:
        raise UsageError(f"--layer: no layer with weights runs before {layer}, so there is nothing to randomize; name "
                         "a layer after a convolution or a linear layer")
    print(f"{PROG}: sanity check of {layer} ({args.model} on {device}), {len(names)} images, rules "
          f"{', '.join(args.rule)}: {len(layers)} layers randomized one at a time, from {layers[0]} down to "
          f"{layers[-1]}", file=sys.stderr)
    try:
        table = sanity_check(model, inputs, layer, rules=args.rule, channel=args.channel, seed=args.seed,
                             batch_size=args.batch_size, progress=not args.no_progress)
    except OutOfRangeError as error:  # the only argument sanity_check checks against the layer's output
        raise UsageError(f"--channel: {error}") from None

    path = Path(args.out) / "sanity" / f"{gallery.slug(layer)}.png"
    gallery.clear_previous(args.out, "sanity")
    display = model.preprocessing.to_display(inputs[:1].cpu())[0]
    plots.sanity_figure(path, table, channel_order=getattr(model.preprocessing, "channel_order", "RGB"),
                        image=display)
    image, channel, y, x = table.neurons[0].tolist()
    which = (f"map {args.channel}'s strongest activation" if args.channel is not None
             else "the layer's strongest activation")
    caption = (f"<b>{html.escape(layer)}</b>: per image {which}, projected under each rule (rows) by the original "
               f"model and after each randomization step (columns); the cells show {html.escape(names[0])} "
               f"(channel {channel} at ({y}, {x})); ρ and SSIM beneath are means over {len(names)} images")
    body = ('<p class="about">Adebayo et al., "Sanity Checks for Saliency Maps" (NeurIPS 2018): the layers with '
            f"weights on the way to {html.escape(layer)} are re-initialised with their own init (seed {args.seed}), "
            "one more per column from the top down, and each projection is compared with the original one inside "
            "the activation's receptive field: Spearman's rank correlation and SSIM of Adebayo's maps (|projection| "
            "summed over the colour channels), 1 where nothing changed. A projection that stays the same when the "
            "weights are random shows the image, not what the network learnt.</p>\n"
            + gallery.figure_html(path, args.out, caption)
            + f"\n<p>Spearman / SSIM with the original projection, means over {len(names)} images; each column "
              "names the last layer randomized (every layer above it is random too):</p>\n" + _table_html(table))
    index = gallery.add_to_gallery(args.out, "sanity", "Sanity check", body, [path],
                                   analysis.header(args, images, len(names), device))
    print(f"Spearman / SSIM with the original projection (means over {len(names)} images):")
    print("\n".join(_table_text(table)))
    return analysis.done(args, "sanity", [path], index)
