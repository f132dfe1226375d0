"""``deconvcuda invariance``: Fig. 5, how far layers' feature vectors move under translation, scaling
and rotation.

    deconvcuda invariance --layers features.3,29 --transforms rotate,scale
"""
from __future__ import annotations

import argparse
import html
import sys
from pathlib import Path
from typing import List

from . import analysis, common
from .common import PROG, UsageError

HELP = "Fig. 5: how far layers' feature vectors move under translation, scaling, rotation"

#: The amounts of each transform unless --amounts says otherwise.
DEFAULT_AMOUNTS = {"translate": "-48,-36,-24,-12,0,12,24,36,48", "scale": "0.6,0.7,0.8,0.9,1,1.1,1.2,1.4,1.6",
                   "rotate": ",".join(str(a) for a in range(0, 361, 30))}


def _floats(text: str) -> List[float]:
    try:
        values = [float(item) for item in text.split(",") if item.strip()]
    except ValueError:
        values = []
    if not values:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}")
    return values


def _transforms(text: str) -> List[str]:
    from ..analyses.invariance import TRANSFORMS

    names = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [name for name in names if name not in TRANSFORMS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"expected transforms from {', '.join(TRANSFORMS)}, got {text!r}")
    return list(dict.fromkeys(names))


def add_parser(commands) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        "invariance", help=HELP,
        description="Per transform: each image's Euclidean distance between a layer's output for the image and "
                    "for the transformed image, as curves over the amounts; for a classifier the true class's "
                    "probability too.")
    analysis.add_options(parser, "invariance", max_images=4)
    parser.add_argument("--layers", type=common.parse_layers, metavar="LIST",
                        help="comma-separated layer names (default: the first and the last block's)")
    parser.add_argument("--transforms", type=_transforms, default=["translate", "scale", "rotate"],
                        metavar="LIST", help="translate, scale, rotate (default all three)")
    parser.add_argument("--amounts", type=_floats, metavar="LIST",
                        help="with one transform: its amounts (pixels, factors or degrees), e.g. 0,15,30 "
                             f"(defaults: translate {DEFAULT_AMOUNTS['translate']}; scale "
                             f"{DEFAULT_AMOUNTS['scale']}; rotate 0..360 by 30)")
    parser.add_argument("--labels", type=analysis.ints, metavar="LIST",
                        help="for a classifier: each image's true class (default: the class it predicts)")
    return parser


def run(args) -> int:
    from ..analyses.invariance import class_probabilities, invariance
    from ..figures import gallery, plots
    from ..models import default_layers

    device, model = analysis.device_and_model(args)
    if args.layers is not None:
        common.check_layers(model, args.layers)
        layers = args.layers
    else:
        blocks = default_layers(model)
        layers = list(dict.fromkeys([blocks[0], blocks[-1]])) if blocks else [""]
    if args.amounts is not None and len(args.transforms) != 1:
        raise UsageError("--amounts: name one transform with --transforms when giving amounts")
    images = common.open_images(args, model)
    inputs, names = images.first(args.max_images, device)
    classifier = analysis.is_classifier(model, tuple(inputs.shape[1:]))
    labels = analysis.labels(args, model, inputs) if classifier else None
    print(f"{PROG}: invariance of {', '.join(layers)} ({args.model} on {device}), {len(names)} images, "
          f"{', '.join(args.transforms)}", file=sys.stderr)
    folder = Path(args.out) / "invariance"
    gallery.clear_previous(args.out, "invariance")
    files, parts = [], []
    for transform in args.transforms:
        amounts = args.amounts if args.amounts is not None else _floats(DEFAULT_AMOUNTS[transform])
        distances = invariance(model, inputs, layers, transform, amounts, progress=not args.no_progress)
        probabilities = class_probabilities(model, inputs, labels, transform, amounts) if classifier else None
        path = plots.invariance_figure(folder / f"{transform}.png", transform, amounts, distances,
                                       probabilities=probabilities, image_names=names)
        files.append(path)
        parts.append(gallery.figure_html(path, args.out, f"<b>{transform}</b>: {', '.join(map(html.escape, layers))}"))
    body = ('<p class="about">Zeiler &amp; Fergus, Fig. 5: the Euclidean distance between a layer\'s output for '
            "an image and for the image translated vertically, scaled or rotated (bilinear, zero fill), one curve "
            "per image.</p>\n" + "\n".join(parts))
    index = gallery.add_to_gallery(args.out, "invariance", "Invariance", body, files,
                                   analysis.header(args, images, len(names), device))
    return analysis.done(args, "invariance", files, index)
