"""`deconvcuda gradcam` end to end on ResNet-18 (random weights) and two bundled photos at 64 px: one
figure per image in its gallery section, the classes asked for or predicted, `--help`, and the user's
mistakes as exit status 2 with a message."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import deconvcuda
from deconvcuda import cli, models

torch.set_num_threads(2)

pytest.importorskip("matplotlib")
COMMON = ["--model", "resnet18", "--crops", "1", "--image-size", "64", "--max-images", "2", "--no-progress",
          "--device", "cpu"]


def run_gradcam(capsys, *argv):
    code = cli.main(["gradcam", *COMMON, *map(str, argv)])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def test_a_figure_per_image_in_the_gallery(tmp_path, capsys):
    out_dir = tmp_path / "out"
    code, out, err = run_gradcam(capsys, "--layer", "layer3", "--target", "281", "--batch-size", "1", "--out", out_dir)
    assert code == 0, err
    assert "Grad-CAM of layer3 (resnet18 on cpu), 2 images" in err
    assert f"wrote 2 gradcam figure(s) to {out_dir / 'gradcam'}" in out
    figures = sorted((out_dir / "gradcam").iterdir())
    assert [path.name for path in figures] == ["00_astronaut_center.png", "01_chelsea_center.png"]
    for path in figures:
        with Image.open(path) as picture:
            pixels = np.asarray(picture.convert("RGB"), dtype=np.float64)
        assert pixels.shape[1] > 2 * pixels.shape[0] and pixels.std() > 10     # three panels, not blank
    index = (out_dir / "index.html").read_text(encoding="utf-8")
    assert index.count('id="analysis-gradcam"') == 1
    assert "<b>astronaut/center</b>: class 281 at layer3" in index and "<b>chelsea/center</b>: class 281" in index

    # without --target: each image's predicted class, with the model's random weights (common.build_model's)
    torch.manual_seed(0)
    model = models.build("resnet18").eval()
    photos = deconvcuda.data.bundled_photos(size=64, crops_per_photo=1)
    with torch.no_grad():
        predicted = model(model.preprocessing.to_model(photos.images[:2])).argmax(dim=1).tolist()
    code, _, err = run_gradcam(capsys, "--out", out_dir)
    assert code == 0, err
    index = (out_dir / "index.html").read_text(encoding="utf-8")
    assert index.count('id="analysis-gradcam"') == 1 and "class 281" not in index
    for name, label in zip(("astronaut/center", "chelsea/center"), predicted):
        assert f"<b>{name}</b>: class {label} at layer4" in index


def test_help_lists_the_command(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert re.search(r"^\s+gradcam\s+Grad-CAM and guided Grad-CAM", capsys.readouterr().out, re.MULTILINE)


class Features(nn.Module):
    """Convolutions alone: no class scores."""

    preprocessing = models.IMAGENET

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x)


@pytest.mark.parametrize("argv, message", [
    (["--target", "1000"], "error: --target: gradcam: target class 1000 is out of range; the model's output has 1000 "
                           "classes (0..999)"),
    (["--target", "1,2,3"], "error: --target: expected one class for every image or one per image (2), got 3"),
    (["--layer", "fc"], "error: --layer: gradcam: layer 'fc' has output [2, 1000]; Grad-CAM needs a layer with a "
                        "spatial output"),
    (["--layer", "layer9"], "error: --layers: unknown layer(s) layer9"),
    (["--layer", "conv", "features"], "error: --model: Grad-CAM needs a classifier, whose output is class scores"),
])
def test_usage_errors_exit_2(tmp_path, capsys, monkeypatch, argv, message):
    if argv[-1] == "features":    # a model of our own in place of --model's
        argv = argv[:-1]
        monkeypatch.setattr(models, "build", lambda name, weights=None: Features())
    code, _, err = run_gradcam(capsys, *argv, "--out", tmp_path / "out")
    assert code == 2 and message in err, err
    assert not (tmp_path / "out").exists()
