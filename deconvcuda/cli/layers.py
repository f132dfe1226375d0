"""``deconvcuda layers``: the layers of a model that can be named, with kind and output shape.

    deconvcuda layers --model resnet18 --image-size 224
    deconvcuda layers --model efficientnet_b0 --describe features.4 --rule guided
"""
from __future__ import annotations

import argparse

from .. import rules as reverse_rules
from . import common

HELP = "list the layers of a model that can be named, with kind and output shape"


def add_parser(commands) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        "layers", help=HELP,
        description="Every name of model.named_modules() that project, top_activations and visualize can take "
                    "(called once by the forward, reached through supported layers), in forward order.")
    common.add_model_options(parser, weights_help="a state_dict file (only its fit is checked)")
    parser.add_argument("--image-size", type=common.positive, default=common.DEFAULT_IMAGE_SIZE, metavar="PIXELS",
                        help=f"the square input size the shapes are given for (default {common.DEFAULT_IMAGE_SIZE})")
    parser.add_argument("--describe", metavar="LAYER",
                        help="instead of the listing, the ops on the path from the images to LAYER and how each is "
                             "reversed: a native kernel, the rule, or the op's exact gradient")
    parser.add_argument("--rule", default="deconvnet", choices=reverse_rules.names(), help="the rule --describe shows")
    return parser


def run(args) -> int:
    """Print the nameable layers of ``--model``: name, kind, output shape, and which are defaults."""
    from .. import models
    from ..forward import layers

    model = common.build_model(args)
    shape = (3, args.image_size, args.image_size)
    if args.describe is not None:
        from ..describe import describe

        common.check_layers(model, [args.describe], "--describe")
        print(describe(model, args.describe, shape, rule=args.rule))
        return 0
    defaults = set(models.default_layers(model))
    listed = layers(model, shape)
    width = max(len(entry.name) for entry in listed)
    kind_width = max(len(entry.kind) for entry in listed)
    print(f"{'layer'.ljust(width)}  {'kind'.ljust(kind_width)}  output per image ({args.image_size}x{args.image_size} "
          f"input)   * = a default layer of visualize")
    for entry in listed:
        mark = "  *" if entry.name in defaults else ""
        print(f"{entry.name.ljust(width)}  {entry.kind.ljust(kind_width)}  {' x '.join(map(str, entry.shape))}{mark}")
    return 0
