"""The README's figure of the three rules on a ResNet: torchvision's resnet18 (random weights, seeded:
nothing is downloaded), layer3 (the output of its third residual stage), the top-9 activations of
one channel over crops of the bundled photos, projected under rule="deconvnet", "guided" and
"gradient", side by side, beside the image patches.

    .venv/bin/python examples/rules_figure.py docs/rules_resnet18_layer3.png
"""
import shutil
import sys
import tempfile

import torch

import deconvcuda


def main(path: str = "docs/rules_resnet18_layer3.png") -> None:
    torch.manual_seed(0)
    model = deconvcuda.models.build("resnet18")
    photos = deconvcuda.data.bundled_photos(size=160, crops_per_photo=3)
    images = model.preprocessing.to_model(photos.images)
    with tempfile.TemporaryDirectory() as out:
        run = deconvcuda.visualize(model, images, ["layer3"], channels=[5], rule=["deconvnet", "guided", "gradient"],
                                   out=out, image_names=photos.names, progress=False, model_name="resnet18",
                                   weights="random weights (seed 0)", data_name="crops of the bundled photos")
        figure = run.figures[0]
        shutil.copyfile(figure.path, path)
    print(f"wrote {path}: layer3 channel {figure.channel}, activations {', '.join(f'{v:.3g}' for v in figure.values)}")


if __name__ == "__main__":
    main(*sys.argv[1:])
