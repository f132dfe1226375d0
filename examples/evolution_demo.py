"""Feature evolution during training (Zeiler & Fergus 2014, Fig. 4), end to end, without downloads.

A small CNN learns to tell scikit-image's bundled photos apart from crops of them (the class of a crop
is the photo it comes from), a checkpoint per epoch is saved, and ``deconvcuda.evolution`` projects
each chosen feature map's strongest activation over the crops at every checkpoint:

    python examples/evolution_demo.py --out out/evolution_demo      # or: make evolution-demo

About a minute on two CPU cores. Writes epoch_*.pt, evolution_<layer>.png and an index.html section.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import deconvcuda
from deconvcuda.cli import parse_channels
from deconvcuda.figures import gallery, plots

IMAGE_SIZE = 64   # the crops the network sees
TRAIN_SIZE = 56   # random sub-crops of them while training


class PhotoNet(nn.Module):
    """Three conv blocks and a linear classifier over global-average-pooled features."""

    def __init__(self, classes: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 48, 3, padding=1), nn.ReLU())
        self.classifier = nn.Linear(48, classes)

    def forward(self, x):
        return self.classifier(self.features(x).mean((2, 3)))


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random TRAIN_SIZE crop of each image, flipped left-right half the time, resized back."""
    n = images.shape[0]
    tops = torch.randint(0, IMAGE_SIZE - TRAIN_SIZE + 1, (n,), generator=generator)
    lefts = torch.randint(0, IMAGE_SIZE - TRAIN_SIZE + 1, (n,), generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5
    crops = []
    for image, top, left, flip in zip(images, tops.tolist(), lefts.tolist(), flips.tolist()):
        crop = image[:, top:top + TRAIN_SIZE, left:left + TRAIN_SIZE]
        crops.append(crop.flip(-1) if flip else crop)
    return F.interpolate(torch.stack(crops), size=IMAGE_SIZE, mode="bilinear", align_corners=False)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="out/evolution_demo", help="output folder (default out/evolution_demo)")
    parser.add_argument("--epochs", type=int, default=6, help="training epochs, one checkpoint each (default 6)")
    parser.add_argument("--layer", default="features.4", help="the layer to follow (default features.4, conv2)")
    parser.add_argument("--channels", default="0-7", type=parse_channels,
                        help="feature maps to follow (default 0-7)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    photos = deconvcuda.data.bundled_photos(size=IMAGE_SIZE, crops_per_photo=14)
    names = sorted({name.split("/")[0] for name in photos.names})
    labels = torch.tensor([names.index(name.split("/")[0]) for name in photos.names])
    mean = photos.images.mean(dim=(0, 2, 3), keepdim=True)
    images = photos.images - mean  # zero-centred input
    model = PhotoNet(len(names))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)

    checkpoints = [out / "epoch_0.pt"]
    torch.save(model.state_dict(), checkpoints[0])
    started = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        model.train()
        order = torch.randperm(len(images), generator=generator)
        total, correct = 0.0, 0
        for start in range(0, len(order), 32):
            batch = order[start:start + 32]
            logits = model(augment(images[batch], generator))
            loss = F.cross_entropy(logits, labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
            correct += int((logits.argmax(1) == labels[batch]).sum())
        checkpoints.append(out / f"epoch_{epoch}.pt")
        torch.save(model.state_dict(), checkpoints[-1])
        print(f"epoch {epoch}: loss {total / len(images):.3f}, training accuracy {correct / len(images):.0%} "
              f"({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    model.eval()

    cells = deconvcuda.evolution(model, checkpoints, images, args.layer, args.channels, progress=True)
    path = out / f"evolution_{args.layer}.png"
    plots.draw_evolution(path, cells, "RGB", [p.stem.replace("_", " ") for p in checkpoints],
                         [f"map {c}" for c in args.channels],
                         f"{args.layer}: strongest projection over {len(images)} crops, per epoch")
    caption = (f"<b>{args.layer}</b> of a small CNN trained to tell {len(names)} bundled photos apart: columns are "
               f"epochs 0 (random) to {args.epochs}, rows feature maps")
    index = gallery.add_to_gallery(out, "evolution", "Evolution", gallery.figure_html(path, out, caption),
                                   [path] + checkpoints, [("model", "PhotoNet (examples/evolution_demo.py)")])
    print(f"wrote {path} and {index}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
