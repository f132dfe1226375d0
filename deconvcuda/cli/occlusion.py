"""``deconvcuda occlusion``: Fig. 7, how a feature map (and a classifier's output) responds to a gray
square slid over each image.

    deconvcuda occlusion --layer features.29 --window 32 --stride 16
"""
from __future__ import annotations

import argparse
import html
import os
import sys
from pathlib import Path

import torch

from . import analysis, common
from .common import PROG, UsageError

HELP = "Fig. 7: how a feature map (and a classifier's output) responds to a gray square slid over each image"


def _fill(text: str):
    if text == "mean":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'mean' (the images' per-channel mean) or a number, "
                                         f"got {text!r}") from None


def add_parser(commands) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        "occlusion", help=HELP,
        description="Per image: the strongest feature map's total activation with a square occluding each "
                    "position (a heat map), the projection of its strongest activation, and for a classifier the "
                    "true class's probability and the most probable class per position.")
    analysis.add_options(parser, "occlusion", max_images=3)
    parser.add_argument("--layer", metavar="NAME", help="the layer (default: the last of the model's blocks)")
    parser.add_argument("--channel", type=int, metavar="C",
                        help="the feature map (default: per image the one with the largest total activation)")
    parser.add_argument("--window", type=common.positive, default=32, metavar="PIXELS", help="square side (default 32)")
    parser.add_argument("--stride", type=common.positive, default=16, metavar="PIXELS",
                        help="pixels between square positions (default 16)")
    parser.add_argument("--fill", type=_fill, default="mean", metavar="VALUE",
                        help="the square's value in model input: 'mean' (the images' per-channel mean, gray; "
                             "the default) or a number")
    parser.add_argument("--reduce", choices=("sum", "max"), default="sum",
                        help="a map's total activation (sum, the paper's) or its largest")
    parser.add_argument("--labels", type=analysis.ints, metavar="LIST",
                        help="for a classifier: each image's true class, e.g. 281,9 (default: the class it "
                             "predicts unoccluded)")
    return parser


def run(args) -> int:
    from ..analyses.occlusion import most_probable_class, occlusion, strongest_channel
    from ..analyses.outputs import layer_outputs
    from ..engine import project
    from ..figures import gallery, plots, render

    device, model = analysis.device_and_model(args)
    layer = analysis.layer(model, args.layer, -1)
    images = common.open_images(args, model)
    if args.window > args.image_size:
        raise UsageError(f"--window: the square ({args.window}) is larger than the images ({args.image_size})")
    inputs, names = images.first(args.max_images, device)
    fill = inputs.mean(dim=(0, 2, 3)) if args.fill == "mean" else args.fill
    output = layer_outputs(model, inputs, [layer], f"{PROG} occlusion")[layer]
    if args.channel is not None and not 0 <= args.channel < output.shape[1]:
        raise UsageError(f"--channel: layer {layer} has {output.shape[1]} channels (0..{output.shape[1] - 1})")
    channels = (torch.full((inputs.shape[0],), args.channel, dtype=torch.long) if args.channel is not None
                else strongest_channel(output, args.reduce).cpu())
    print(f"{PROG}: occlusion of {layer} ({args.model} on {device}), {len(names)} images, {args.window}px square "
          f"every {args.stride}px", file=sys.stderr)
    options = dict(window=args.window, stride=args.stride, fill=fill, batch_size=args.batch_size,
                   progress=not args.no_progress)
    values = occlusion(model, inputs, layer, channels.to(device), reduce=args.reduce, **options)
    classifier = analysis.is_classifier(model, tuple(inputs.shape[1:]))
    if classifier:
        labels = analysis.labels(args, model, inputs)
        probabilities = occlusion(model, inputs, "", labels.to(device), softmax=True, **options)
        classes = most_probable_class(model, inputs, **options)
    # the projection of each image's chosen map's strongest activation, in the unoccluded image
    maps = output[torch.arange(inputs.shape[0], device=output.device), channels.to(output.device)].flatten(1)
    strongest = maps.argmax(dim=1).cpu()
    width = output.shape[3] if output.dim() == 4 else 1
    neurons = torch.stack([torch.arange(inputs.shape[0]), channels, strongest // width, strongest % width], dim=1)
    projections = project(model, inputs, layer, neurons=neurons.to(device))
    order = getattr(model.preprocessing, "channel_order", "RGB")
    projections_rgb = render.projections_to_rgb(projections.cpu(), order)
    display = model.preprocessing.to_display(inputs.cpu())

    folder = Path(args.out) / "occlusion"
    gallery.clear_previous(args.out, "occlusion")
    files, parts = [], []
    for n, name in enumerate(names):
        path = folder / f"{n:02d}_{gallery.slug(os.path.splitext(name)[0])}.png"
        extra = {}
        if classifier:
            extra = dict(probabilities=probabilities[n], classes=classes[n], true_class=int(labels[n]),
                         class_names=getattr(model, "class_names", None))
        plots.occlusion_figure(path, display[n], values[n], window=args.window, stride=args.stride, layer=layer,
                               channel=int(channels[n]), projection=projections_rgb[n], title=name, **extra)
        files.append(path)
        caption = (f"<b>{html.escape(name)}</b>: {html.escape(layer)} map {int(channels[n])}, its "
                   f"{'total' if args.reduce == 'sum' else 'largest'} activation with a {args.window}px square "
                   f"centred at each point (stride {args.stride}px)")
        if classifier:
            caption += f"; p({html.escape(analysis.class_name(model, int(labels[n])))}) and the most probable class"
        parts.append(gallery.figure_html(path, args.out, caption))
    body = ('<p class="about">Zeiler &amp; Fergus, Fig. 7: a square of the images\' mean colour slid over each '
            "image. Low values where the square covers what the feature map responds to.</p>\n"
            '<div class="channels">' + "\n".join(parts) + "</div>")
    index = gallery.add_to_gallery(args.out, "occlusion", "Occlusion", body, files,
                                   analysis.header(args, images, len(names), device))
    return analysis.done(args, "occlusion", files, index)
