"""The command-line subcommands ``occlusion``, ``invariance`` and ``evolution`` (wired into
``deconvcuda.cli``): each writes PNGs under ``out/<analysis>/`` and a section of ``out/index.html``.

    deconvcuda occlusion --layer features.29 --window 32 --stride 16
    deconvcuda invariance --layers features.3,29 --transforms rotate,scale
    deconvcuda evolution --model zfnet --checkpoints epoch1.pt epoch2.pt epoch3.pt --layer features.1

Each command replaces its own section of the page (and its own earlier PNGs); ``visualize`` starts
the gallery afresh (it removes every file an earlier run recorded), so it runs first.
"""
from __future__ import annotations

import argparse
import copy
import html
import os
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch

__all__ = ["add_parsers", "run", "COMMANDS"]

COMMANDS = ("occlusion", "invariance", "evolution")

#: CLI defaults sized for a CPU: a few images, a coarse occluder grid.
DEFAULT_IMAGES = {"occlusion": 3, "invariance": 4, "evolution": None}
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


def _ints(text: str) -> List[int]:
    try:
        values = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        values = []
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected non-negative integers separated by commas, got {text!r}")
    return values


def _fill(text: str):
    if text == "mean":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'mean' (the images' per-channel mean) or a number, "
                                         f"got {text!r}") from None


def _transforms(text: str) -> List[str]:
    from .invariance import TRANSFORMS

    names = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [name for name in names if name not in TRANSFORMS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"expected transforms from {', '.join(TRANSFORMS)}, got {text!r}")
    return list(dict.fromkeys(names))


def _common(parser: argparse.ArgumentParser, command: str) -> None:
    from ..cli import _positive
    from ..models import MODEL_NAMES

    parser.add_argument("--model", default="vgg16_hed", choices=MODEL_NAMES, metavar="NAME",
                        help="vgg16_hed (pretrained, embedded; the default), zfnet, alexnet, vgg11..vgg19, "
                             "vgg11_bn..vgg19_bn (random weights unless --weights)")
    parser.add_argument("--weights", metavar="FILE",
                        help="a torchvision-style state_dict file (torch.save(model.state_dict(), FILE))")
    parser.add_argument("--images", metavar="DIR",
                        help="a folder of images (default: photos bundled with scikit-image)")
    parser.add_argument("--image-size", type=_positive, default=224, metavar="PIXELS",
                        help="images are resized and centre-cropped to this square (default 224)")
    parser.add_argument("--crops", type=_positive, default=1, metavar="N",
                        help="square crops per bundled photo, at most 14 (default 1; ignored with --images)")
    if DEFAULT_IMAGES[command] is not None:
        parser.add_argument("--max-images", type=_positive, default=DEFAULT_IMAGES[command], metavar="N",
                            help=f"use the first N images (default {DEFAULT_IMAGES[command]})")
    parser.add_argument("--out", default="out", metavar="DIR",
                        help=f"output folder (default out/); PNGs go to DIR/{command}/, linked from DIR/index.html")
    parser.add_argument("--device", metavar="DEVICE", help="cpu, cuda or cuda:N (default cuda if available, else cpu)")
    parser.add_argument("--batch-size", type=_positive, default=64, metavar="N",
                        help="occluder positions or images per forward pass (default 64)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_parsers(commands) -> Dict[str, argparse.ArgumentParser]:
    """Add the three subcommands to ``commands`` (an argparse subparsers object)."""
    from ..cli import _positive, parse_channels, parse_layers

    parsers = {}
    occlusion = commands.add_parser(
        "occlusion", help="Fig. 7: how a feature map (and a classifier's output) responds to a gray square "
                          "slid over each image",
        description="Per image: the strongest feature map's total activation with a square occluding each "
                    "position (a heat map), the projection of its strongest activation, and for a classifier the "
                    "true class's probability and the most probable class per position.")
    _common(occlusion, "occlusion")
    occlusion.add_argument("--layer", metavar="NAME", help="the layer (default: the last of the model's blocks)")
    occlusion.add_argument("--channel", type=int, metavar="C",
                           help="the feature map (default: per image the one with the largest total activation)")
    occlusion.add_argument("--window", type=_positive, default=32, metavar="PIXELS", help="square side (default 32)")
    occlusion.add_argument("--stride", type=_positive, default=16, metavar="PIXELS",
                           help="pixels between square positions (default 16)")
    occlusion.add_argument("--fill", type=_fill, default="mean", metavar="VALUE",
                           help="the square's value in model input: 'mean' (the images' per-channel mean, gray; "
                                "the default) or a number")
    occlusion.add_argument("--reduce", choices=("sum", "max"), default="sum",
                           help="a map's total activation (sum, the paper's) or its largest")
    occlusion.add_argument("--labels", type=_ints, metavar="LIST",
                           help="for a classifier: each image's true class, e.g. 281,9 (default: the class it "
                                "predicts unoccluded)")
    parsers["occlusion"] = occlusion

    invariance = commands.add_parser(
        "invariance", help="Fig. 5: how far layers' feature vectors move under translation, scaling, rotation",
        description="Per transform: each image's Euclidean distance between a layer's output for the image and "
                    "for the transformed image, as curves over the amounts; for a classifier the true class's "
                    "probability too.")
    _common(invariance, "invariance")
    invariance.add_argument("--layers", type=parse_layers, metavar="LIST",
                            help="comma-separated layer names (default: the first and the last block's)")
    invariance.add_argument("--transforms", type=_transforms, default=["translate", "scale", "rotate"],
                            metavar="LIST", help="translate, scale, rotate (default all three)")
    invariance.add_argument("--amounts", type=_floats, metavar="LIST",
                            help="with one transform: its amounts (pixels, factors or degrees), e.g. 0,15,30 "
                                 f"(defaults: translate {DEFAULT_AMOUNTS['translate']}; scale "
                                 f"{DEFAULT_AMOUNTS['scale']}; rotate 0..360 by 30)")
    invariance.add_argument("--labels", type=_ints, metavar="LIST",
                            help="for a classifier: each image's true class (default: the class it predicts)")
    parsers["invariance"] = invariance

    evolution = commands.add_parser(
        "evolution", help="Fig. 4: each feature map's strongest projection at each training checkpoint",
        description="For each checkpoint (a state_dict file, in training order) and each chosen feature map: its "
                    "strongest activation over the images, projected to pixels; checkpoints in columns, maps in rows.")
    _common(evolution, "evolution")
    evolution.add_argument("--checkpoints", nargs="+", required=True, metavar="FILE",
                           help="state_dict files (torch.save(model.state_dict(), FILE)), in training order")
    evolution.add_argument("--layer", metavar="NAME", help="the layer (default: the first of the model's blocks)")
    evolution.add_argument("--channels", type=parse_channels, default=list(range(8)), metavar="LIST",
                           help="feature maps, e.g. 0-7,12 (default 0-7)")
    parsers["evolution"] = evolution
    return parsers


# --------------------------------------------------------------------------------------------- #
# Shared steps
# --------------------------------------------------------------------------------------------- #

def _model(args):
    from .. import models
    from ..cli import UsageError

    try:
        with torch.random.fork_rng(devices=[]):  # random weights: the same model in every run
            torch.manual_seed(0)
            return models.build(args.model, weights=args.weights)
    except (FileNotFoundError, IsADirectoryError) as error:
        raise UsageError(f"--weights: {error}") from None
    except ValueError as error:
        raise UsageError(f"--weights: {error}" if args.weights else str(error)) from None


def _images(args):
    from ..cli import _load_images

    images = _load_images(args, args.image_size)
    limit = getattr(args, "max_images", None)
    if limit is not None and len(images) > limit:
        images = type(images)(images.images[:limit], images.names[:limit])
    return images


def _layer(args, model, given: Optional[str], which: int) -> str:
    from ..cli import UsageError, _check_layers
    from ..models import default_layers

    if given is None:
        blocks = default_layers(model)
        if not blocks:
            raise UsageError("--layer: the model has no ReLU to pick by default; name a layer")
        return blocks[which]
    _check_layers(model, [given])
    return given


def _is_classifier(model, input_shape) -> bool:
    """Whether the model's output is flat [N, F] (a classifier), judged from the traced graph."""
    from ..graph import trace

    try:
        return len(trace(model, "", caller="classifier").shapes(input_shape)[""]) == 1
    except (ValueError, TypeError):
        return False


def _labels(args, model, inputs) -> torch.Tensor:
    from ..cli import UsageError
    from .outputs import layer_outputs

    logits = layer_outputs(model, inputs, [""], "labels")[""]
    if args.labels is None:
        return logits.argmax(dim=1).cpu()
    if len(args.labels) != inputs.shape[0]:
        raise UsageError(f"--labels: expected one class per image ({inputs.shape[0]}), got {len(args.labels)}")
    if max(args.labels) >= logits.shape[1]:
        raise UsageError(f"--labels: the model has {logits.shape[1]} classes (0..{logits.shape[1] - 1})")
    return torch.tensor(args.labels)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "output"


def _class_name(model, index: int) -> str:
    names = getattr(model, "class_names", None)
    return names[index] if names is not None and index < len(names) else f"class {index}"


def _header(args, images, device) -> list:
    where = "the bundled photos" if args.images is None else args.images
    return [("model", args.model if args.weights is None else f"{args.model} ({args.weights})"),
            ("data", f"{len(images)} images of {where} at {args.image_size}x{args.image_size}"),
            ("device", str(device))]


def _done(args, command: str, files: List[Path], index: Path) -> int:
    print(f"wrote {len(files)} {command} figure(s) to {os.path.join(str(Path(args.out) / command), '')}; "
          f"open {index}")
    return 0


# --------------------------------------------------------------------------------------------- #
# The commands
# --------------------------------------------------------------------------------------------- #

def occlusion_command(args) -> int:
    from .. import figures, project
    from ..cli import PROG, UsageError, _device
    from . import drawing, gallery
    from .occlusion import strongest_channel, most_probable_class, occlusion
    from .outputs import layer_outputs

    device = _device(args.device)
    model = _model(args).to(device)
    layer = _layer(args, model, args.layer, -1)
    images = _images(args)
    inputs = model.preprocessing.to_model(images.images).to(device)
    if args.window > args.image_size:
        raise UsageError(f"--window: the square ({args.window}) is larger than the images ({args.image_size})")
    fill = inputs.mean(dim=(0, 2, 3)) if args.fill == "mean" else args.fill
    output = layer_outputs(model, inputs, [layer], f"{PROG} occlusion")[layer]
    if args.channel is not None and not 0 <= args.channel < output.shape[1]:
        raise UsageError(f"--channel: layer {layer} has {output.shape[1]} channels (0..{output.shape[1] - 1})")
    channels = (torch.full((inputs.shape[0],), args.channel, dtype=torch.long) if args.channel is not None
                else strongest_channel(output, args.reduce).cpu())
    progress = not args.no_progress
    print(f"{PROG}: occlusion of {layer} ({args.model} on {device}), {len(images)} images, {args.window}px square "
          f"every {args.stride}px", file=sys.stderr)
    options = dict(window=args.window, stride=args.stride, fill=fill, batch_size=args.batch_size, progress=progress)
    values = occlusion(model, inputs, layer, channels.to(device), reduce=args.reduce, **options)
    classifier = _is_classifier(model, tuple(inputs.shape[1:]))
    if classifier:
        labels = _labels(args, model, inputs)
        probabilities = occlusion(model, inputs, "", labels.to(device), softmax=True, **options)
        classes = most_probable_class(model, inputs, **options)
    # the projection of each image's chosen map's strongest activation, in the unoccluded image
    maps = output[torch.arange(inputs.shape[0], device=output.device), channels.to(output.device)].flatten(1)
    strongest = maps.argmax(dim=1).cpu()
    width = output.shape[3] if output.dim() == 4 else 1
    neurons = torch.stack([torch.arange(inputs.shape[0]), channels, strongest // width, strongest % width], dim=1)
    projections = project(model, inputs, layer, neurons=neurons.to(device))
    order = getattr(model.preprocessing, "channel_order", "RGB")
    projections_rgb = figures.projections_to_rgb(projections.cpu(), order)
    display = model.preprocessing.to_display(inputs.cpu())

    folder = Path(args.out) / "occlusion"
    gallery.clear_previous(args.out, "occlusion")
    files, parts = [], []
    for n, name in enumerate(images.names):
        path = folder / f"{n:02d}_{_slug(os.path.splitext(name)[0])}.png"
        extra = {}
        if classifier:
            extra = dict(probabilities=probabilities[n], classes=classes[n], true_class=int(labels[n]),
                         class_names=getattr(model, "class_names", None))
        drawing.occlusion_figure(path, display[n], values[n], window=args.window, stride=args.stride, layer=layer,
                                 channel=int(channels[n]), projection=projections_rgb[n], title=name, **extra)
        files.append(path)
        caption = (f"<b>{html.escape(name)}</b>: {html.escape(layer)} map {int(channels[n])}, its "
                   f"{'total' if args.reduce == 'sum' else 'largest'} activation with a {args.window}px square "
                   f"centred at each point (stride {args.stride}px)")
        if classifier:
            caption += f"; p({html.escape(_class_name(model, int(labels[n])))}) and the most probable class"
        parts.append(gallery.figure_html(path, args.out, caption))
    body = ('<p class="about">Zeiler &amp; Fergus, Fig. 7: a square of the images\' mean colour slid over each '
            "image. Low values where the square covers what the feature map responds to.</p>\n"
            '<div class="channels">' + "\n".join(parts) + "</div>")
    index = gallery.add_to_gallery(args.out, "occlusion", "Occlusion", body, files, _header(args, images, device))
    return _done(args, "occlusion", files, index)


def invariance_command(args) -> int:
    from ..cli import PROG, UsageError, _check_layers, _device
    from ..models import default_layers
    from . import drawing, gallery
    from .invariance import class_probabilities, invariance

    device = _device(args.device)
    model = _model(args).to(device)
    if args.layers is not None:
        _check_layers(model, args.layers)
        layers = args.layers
    else:
        blocks = default_layers(model)
        layers = list(dict.fromkeys([blocks[0], blocks[-1]])) if blocks else [""]
    if args.amounts is not None and len(args.transforms) != 1:
        raise UsageError("--amounts: name one transform with --transforms when giving amounts")
    images = _images(args)
    inputs = model.preprocessing.to_model(images.images).to(device)
    classifier = _is_classifier(model, tuple(inputs.shape[1:]))
    labels = _labels(args, model, inputs) if classifier else None
    print(f"{PROG}: invariance of {', '.join(layers)} ({args.model} on {device}), {len(images)} images, "
          f"{', '.join(args.transforms)}", file=sys.stderr)
    folder = Path(args.out) / "invariance"
    gallery.clear_previous(args.out, "invariance")
    files, parts = [], []
    for transform in args.transforms:
        amounts = args.amounts if args.amounts is not None else _floats(DEFAULT_AMOUNTS[transform])
        distances = invariance(model, inputs, layers, transform, amounts, progress=not args.no_progress)
        probabilities = class_probabilities(model, inputs, labels, transform, amounts) if classifier else None
        path = drawing.invariance_figure(folder / f"{transform}.png", transform, amounts, distances,
                                         probabilities=probabilities, image_names=images.names)
        files.append(path)
        parts.append(gallery.figure_html(path, args.out, f"<b>{transform}</b>: {', '.join(map(html.escape, layers))}"))
    body = ('<p class="about">Zeiler &amp; Fergus, Fig. 5: the Euclidean distance between a layer\'s output for '
            "an image and for the image translated vertically, scaled or rotated (bilinear, zero fill), one curve "
            "per image.</p>\n" + "\n".join(parts))
    index = gallery.add_to_gallery(args.out, "invariance", "Invariance", body, files, _header(args, images, device))
    return _done(args, "invariance", files, index)


def evolution_command(args) -> int:
    from ..cli import PROG, UsageError, _device
    from . import gallery
    from .evolution import evolution, load_checkpoint, read_checkpoint

    device = _device(args.device)
    model = _model(args).to(device)
    layer = _layer(args, model, args.layer, 0)
    missing = [path for path in args.checkpoints if not os.path.isfile(path)]
    if missing:
        raise UsageError(f"--checkpoints: no such file: {', '.join(missing)}")
    images = _images(args)
    inputs = model.preprocessing.to_model(images.images).to(device)
    print(f"{PROG}: evolution of {layer} ({args.model} on {device}) over {len(args.checkpoints)} checkpoints, "
          f"{len(images)} images, channels {', '.join(map(str, args.channels))}", file=sys.stderr)
    probe = copy.deepcopy(model)  # every checkpoint must fit before any work: a usage error, not a failure
    for number, checkpoint in enumerate(args.checkpoints):
        where = f"checkpoint {number} ({checkpoint!r})"
        try:
            load_checkpoint(probe, read_checkpoint(checkpoint, where, f"{PROG} evolution"), where, f"{PROG} evolution")
        except (ValueError, TypeError) as error:
            raise UsageError(f"--checkpoints: {error}") from None
    del probe
    cells = evolution(model, args.checkpoints, inputs, layer, args.channels, batch_size=args.batch_size,
                      progress=not args.no_progress)
    path = Path(args.out) / "evolution" / f"{_slug(layer)}.png"
    gallery.clear_previous(args.out, "evolution")
    order = getattr(model.preprocessing, "channel_order", "RGB")
    draw_evolution(path, cells, order, [Path(p).stem for p in args.checkpoints],
                   [f"map {c}" for c in args.channels], f"{layer}: strongest projection per checkpoint")
    caption = (f"<b>{html.escape(layer)}</b>: columns are checkpoints ({', '.join(html.escape(Path(p).name) for p in args.checkpoints)}), "
               f"rows feature maps {', '.join(map(str, args.channels))}")
    body = ('<p class="about">Zeiler &amp; Fergus, Fig. 4: each feature map\'s strongest activation over the images '
            "at each checkpoint, projected to pixels and cropped to where the projection is.</p>\n"
            + gallery.figure_html(path, args.out, caption))
    index = gallery.add_to_gallery(args.out, "evolution", "Evolution", body, [path], _header(args, images, device))
    return _done(args, "evolution", [path], index)


def draw_evolution(path, cells: torch.Tensor, channel_order: str, checkpoint_labels, channel_labels, title: str):
    """``evolution``'s result [T, K, C, H, W] as the figure: each projection shown zero-centred on its own
    contrast, cropped to the square around where it is non-zero."""
    from .. import figures
    from . import drawing

    steps, rows = cells.shape[:2]
    rgb = figures.projections_to_rgb(cells.flatten(0, 1).cpu(), channel_order)
    magnitude = cells.flatten(0, 1).abs().sum(dim=1).cpu()          # [T * K, H, W]
    crops = []
    for i in range(rgb.shape[0]):
        crops.append(_crop_to_support(rgb[i], magnitude[i]))
    side = max(crop.shape[-1] for crop in crops)
    resized = torch.stack([torch.nn.functional.interpolate(crop[None], size=(side, side), mode="nearest")[0]
                           for crop in crops])
    return drawing.evolution_figure(path, resized.view(steps, rows, 3, side, side), checkpoint_labels,
                                    channel_labels, title)


def _crop_to_support(image: torch.Tensor, magnitude: torch.Tensor, share: float = 0.02) -> torch.Tensor:
    """The smallest square of ``image`` [3, H, W] holding every pixel whose ``magnitude`` is above
    ``share`` of the largest (the whole image where the projection is zero)."""
    height, width = magnitude.shape
    peak = float(magnitude.max())
    if peak <= 0:
        return image
    ys, xs = torch.nonzero(magnitude > share * peak, as_tuple=True)
    top, bottom, left, right = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    side = min(max(bottom - top, right - left, 8), height, width)
    top = max(0, min((top + bottom - side) // 2, height - side))
    left = max(0, min((left + right - side) // 2, width - side))
    return image[:, top:top + side, left:left + side]


def run(args) -> int:
    """Run the subcommand ``args.command`` (one of :data:`COMMANDS`)."""
    return {"occlusion": occlusion_command, "invariance": invariance_command,
            "evolution": evolution_command}[args.command](args)
