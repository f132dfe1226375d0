"""What the commands of the paper's other experiments (occlusion, invariance, evolution) share: their
options, their default layer, a classifier's labels, their gallery section's header and last line.

Each writes PNGs under ``out/<command>/`` and its own section of ``out/index.html``; running it again
replaces its section (and its own earlier PNGs). ``visualize`` starts the gallery afresh (it removes
every file an earlier run recorded), so it runs first.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from . import common
from .common import UsageError


def add_options(parser: argparse.ArgumentParser, command: str, max_images: Optional[int]) -> None:
    """The options of every analysis: model, images (``--max-images`` where ``max_images`` is a
    default count), output folder, device, batch size, progress."""
    common.add_model_options(parser)
    common.add_image_options(parser, crops=1)
    if max_images is not None:
        parser.add_argument("--max-images", type=common.positive, default=max_images, metavar="N",
                            help=f"use the first N images (default {max_images})")
    common.add_run_options(parser, f"output folder (default out/); PNGs go to DIR/{command}/, linked from "
                                   "DIR/index.html", 64, "occluder positions or images per forward pass")


def device_and_model(args) -> Tuple[torch.device, torch.nn.Module]:
    """The device of ``--device`` and the model of ``--model`` and ``--weights`` on it."""
    device = common.device(args.device)
    return device, common.build_model(args).to(device)


def ints(text: str) -> List[int]:
    """``"281,9"`` -> [281, 9]: non-negative integers separated by commas."""
    try:
        values = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        values = []
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected non-negative integers separated by commas, got {text!r}")
    return values


def layer(model: torch.nn.Module, given: Optional[str], which: int) -> str:
    """``given`` where it is a layer of the model, else the default layers' ``which``-th (0 the first
    block's, -1 the last block's)."""
    from ..models import default_layers

    if given is None:
        blocks = default_layers(model)
        if not blocks:
            raise UsageError("--layer: the model has no ReLU to pick by default; name a layer")
        return blocks[which]
    common.check_layers(model, [given])
    return given


def is_classifier(model: torch.nn.Module, input_shape) -> bool:
    """Whether the model's output is flat [N, F] (a classifier), judged from its shapes."""
    from ..forward import LayerForward

    try:
        return len(LayerForward(model, "", "classifier").shapes(input_shape)[""]) == 1
    except (ValueError, TypeError):
        return False


def labels(args, model: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """``--labels`` (one class per image), or each image's predicted class."""
    from ..analyses.outputs import layer_outputs

    logits = layer_outputs(model, inputs, [""], "labels")[""]
    if args.labels is None:
        return logits.argmax(dim=1).cpu()
    if len(args.labels) != inputs.shape[0]:
        raise UsageError(f"--labels: expected one class per image ({inputs.shape[0]}), got {len(args.labels)}")
    if max(args.labels) >= logits.shape[1]:
        raise UsageError(f"--labels: the model has {logits.shape[1]} classes (0..{logits.shape[1] - 1})")
    return torch.tensor(args.labels)


def class_name(model: torch.nn.Module, index: int) -> str:
    names = getattr(model, "class_names", None)
    return names[index] if names is not None and index < len(names) else f"class {index}"


def header(args, images: "common.Images", count: int, device) -> list:
    """The gallery header's rows where the analysis starts the page."""
    return [("model", args.model if args.weights is None else f"{args.model} ({args.weights})"),
            ("data", f"{count} images of {images.where} at {args.image_size}x{args.image_size}"),
            ("device", str(device))]


def done(args, command: str, files: List[Path], index: Path) -> int:
    print(f"wrote {len(files)} {command} figure(s) to {os.path.join(str(Path(args.out) / command), '')}; "
          f"open {index}")
    return 0
