"""``deconvcuda gradcam``: the class views of a classifier (Selvaraju et al. 2017): per image, where the
class came from (Grad-CAM at a layer) and its sharp version (guided Grad-CAM).

    deconvcuda gradcam --model resnet18 --weights resnet18.pth --layer layer4 --target 281
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

HELP = "Grad-CAM and guided Grad-CAM of a classifier's class, per image"


def add_parser(commands) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        "gradcam", help=HELP,
        description="Per image: the image, its Grad-CAM map of a class at a layer (the channels weighted by the "
                    "spatial mean of the class score's gradient, their positive sum, upsampled bilinearly) over it, "
                    "and guided Grad-CAM (guided backpropagation of the class score times that map). Needs a "
                    "classifier: a model whose output is class scores [N, classes].")
    analysis.add_options(parser, "gradcam", max_images=4)
    parser.add_argument("--layer", metavar="NAME",
                        help="a layer with a spatial output (default: the last of the model's blocks, Grad-CAM's "
                             "usual choice)")
    parser.add_argument("--target", type=analysis.ints, metavar="LIST",
                        help="the class: one for every image (e.g. 281) or one per image (e.g. 281,9) (default: per "
                             "image, the class the model predicts)")
    return parser


def run(args) -> int:
    from ..analyses.outputs import layer_outputs
    from ..batches import iter_batches
    from ..checks import OutOfRangeError
    from ..classviews import gradcam, guided_gradcam
    from ..figures import gallery, plots

    device, model = analysis.device_and_model(args)
    layer = analysis.layer(model, args.layer, -1)
    images = common.open_images(args, model)
    inputs, names = images.first(args.max_images, device)
    if not analysis.is_classifier(model, tuple(inputs.shape[1:])):
        raise UsageError(f"--model: Grad-CAM needs a classifier, whose output is class scores [N, classes]; "
                         f"{args.model}'s is not (vgg16_hed is VGG16's convolutions alone): name a classifier such as "
                         "zfnet, alexnet or resnet18, with --weights for its trained weights")
    if args.target is None:
        targets = layer_outputs(model, inputs, [""], f"{PROG} gradcam")[""].argmax(dim=1).cpu()
    elif len(args.target) in (1, len(names)):
        targets = torch.tensor(args.target).expand(len(names))
    else:
        raise UsageError(f"--target: expected one class for every image or one per image ({len(names)}), got "
                         f"{len(args.target)}")
    print(f"{PROG}: Grad-CAM of {layer} ({args.model} on {device}), {len(names)} images", file=sys.stderr)
    cams, guided = [], []
    for first, batch in iter_batches(inputs, args.batch_size):
        target = targets[first:first + batch.shape[0]].to(device)
        try:  # the layer, its output and the classes are checked before any work: the user's to change
            cams.append(gradcam(model, batch, layer, target).cpu())
        except OutOfRangeError as error:
            raise UsageError(f"--target: {error}") from None
        except ValueError as error:
            raise UsageError(f"--layer: {error}") from None
        guided.append(guided_gradcam(model, batch, layer, target).cpu())
    cam, guided = torch.cat(cams), torch.cat(guided)
    order = getattr(model.preprocessing, "channel_order", "RGB")
    display = model.preprocessing.to_display(inputs.cpu())

    folder = Path(args.out) / "gradcam"
    gallery.clear_previous(args.out, "gradcam")
    files, parts = [], []
    for n, name in enumerate(names):
        target = analysis.class_name(model, int(targets[n]))
        path = folder / f"{n:02d}_{gallery.slug(os.path.splitext(name)[0])}.png"
        plots.gradcam_figure(path, display[n], cam[n], guided[n], channel_order=order, title=f"{name}: {target}")
        files.append(path)
        parts.append(gallery.figure_html(path, args.out, f"<b>{html.escape(name)}</b>: {html.escape(target)} at "
                                                         f"{html.escape(layer)}"))
    body = ('<p class="about">Selvaraju et al. (2017): Grad-CAM weighs each channel of the layer by the spatial mean '
            "of the class score's gradient there and keeps the positive part of the weighted sum (red: where the "
            "class came from, at the layer's resolution); guided Grad-CAM multiplies guided backpropagation of the "
            "class score by that map. See the sanity check for how much of guided backpropagation's detail comes "
            "from the image rather than the network.</p>\n"
            '<div class="channels">' + "\n".join(parts) + "</div>")
    index = gallery.add_to_gallery(args.out, "gradcam", "Grad-CAM", body, files,
                                   analysis.header(args, images, len(names), device))
    return analysis.done(args, "gradcam", files, index)
