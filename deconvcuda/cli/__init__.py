"""The command line: ``deconvcuda COMMAND ...`` (also ``python -m deconvcuda COMMAND ...``).

    deconvcuda visualize                                   # the embedded VGG16 on the bundled photos -> out/
    deconvcuda visualize --model alexnet --weights alexnet.pth --images photos/ --layers features.11
    python -m torch.distributed.run --nproc_per_node=8 -m deconvcuda visualize ...   # 8 processes share the work
    deconvcuda layers --model resnet18                     # the layers that can be named
    deconvcuda occlusion / invariance / evolution ...      # the paper's Sec. 4 experiments, into the same gallery
    deconvcuda sanity --layer features.28                  # Adebayo et al.'s sanity check of the rules, likewise
    deconvcuda gradcam --model resnet18 --weights W.pth    # a classifier's Grad-CAM and guided Grad-CAM, likewise
    deconvcuda synthesize --layer features.29 --channels 0-15   # each channel's optimized image, likewise

Exit status: 0 on success, 2 for usage errors (a bad option, a missing file or directory, an unknown
layer or channel, a weights file that does not fit the model), 1 when the work itself fails, 130
when interrupted.

The package: :mod:`.common` holds what every command shares (option parsers, the common options,
the device, the model, the images, warnings, :class:`UsageError`); :mod:`.analysis` what the
analyses share; each command is one module: ``visualize``, ``layers``, ``occlusion``,
``invariance``, ``evolution``, ``sanity``, ``gradcam``, ``synthesize``.

Adding a command: write ``deconvcuda/cli/NAME.py`` with ``HELP`` (a line for ``deconvcuda --help``),
``add_parser(commands)`` (``commands.add_parser(NAME, help=HELP, ...)``, the options from
:mod:`.common` such as ``common.add_model_options(parser)``, then its own; return the parser) and
``run(args) -> int`` (the exit status; raise :class:`UsageError` for the user's mistakes), and add
NAME to :data:`COMMANDS`. ``main`` builds the parser from the registry and runs the command with
warnings shown as ``deconvcuda NAME: warning: ...`` and errors as ``deconvcuda NAME: error: ...``.
A command that adds to the gallery: see :mod:`deconvcuda.figures`.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from types import ModuleType
from typing import Dict, Optional, Sequence, Tuple

from .common import (PROG, UsageError, parse_channels, parse_layers, parse_rules, return_large_buffers, weights_description,
                     warnings_as_messages)

__all__ = ["main", "COMMANDS", "UsageError", "parse_channels", "parse_layers", "parse_rules", "weights_description"]

#: The commands, in the order ``deconvcuda --help`` lists them: each the name of its module in this package.
COMMANDS = ("visualize", "layers", "occlusion", "invariance", "evolution", "sanity", "gradcam", "synthesize")


def commands() -> Dict[str, ModuleType]:
    """{name: its module} for every command of :data:`COMMANDS`."""
    return {name: importlib.import_module(f"{__name__}.{name}") for name in COMMANDS}


def _parser() -> Tuple[argparse.ArgumentParser, Dict[str, argparse.ArgumentParser]]:
    """The top-level parser, and each command's parser by name."""
    from .._version import __version__

    parser = argparse.ArgumentParser(prog=PROG, description="Zeiler & Fergus DeconvNet projections and top-k figures.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser, {name: module.add_parser(subparsers) for name, module in commands().items()}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``deconvcuda`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser, parsers = _parser()
    # argparse exits with status 2 and a usage message on a bad option
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # reported with the command's usage, not the top level's
        (parsers[args.command] if args.command else parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    return_large_buffers()
    try:
        with warnings_as_messages(args.command):
            return commands()[args.command].run(args)
    except UsageError as error:
        print(f"{PROG} {args.command}: error: {error}", file=sys.stderr)
        return 2
    except (ModuleNotFoundError, ValueError, TypeError, RuntimeError, OSError) as error:
        print(f"{PROG} {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
