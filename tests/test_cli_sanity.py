"""`deconvcuda sanity` end to end on ZFNet and two bundled photos at 64 px: the figure, its gallery
section with the table of numbers (those of `deconvcuda.sanity_check` on the same images), a second
run replacing the first, `--help`, and the user's mistakes as exit status 2 with a message."""
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
COMMON = ["--model", "zfnet", "--crops", "1", "--image-size", "64", "--max-images", "2", "--no-progress",
          "--device", "cpu"]


def run_sanity(capsys, *argv):
    code = cli.main(["sanity", *COMMON, *map(str, argv)])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def table_cells(index: str):
    """The gallery section's table: {rule: ["spearman / ssim", ...]}."""
    section = index[index.index('id="analysis-sanity"'):]
    table = section[section.index("<table"):section.index("</table>")]
    rows = re.findall(r"<tr>(.*?)</tr>", table)
    header = re.findall(r"<th>(.*?)</th>", rows[0])
    return header, {cells[0]: cells[1:] for cells in (re.findall(r"<td>(.*?)</td>", row) for row in rows[1:])}


def test_the_figure_and_the_table_in_the_gallery(tmp_path, capsys):
    out_dir = tmp_path / "out"
    code, out, err = run_sanity(capsys, "--layer", "features.4", "--rule", "guided,gradient", "--seed", "3",
                                "--out", out_dir)
    assert code == 0, err
    assert ("sanity check of features.4 (zfnet on cpu), 2 images, rules guided, gradient: 2 layers randomized one "
            "at a time, from features.4 down to features.0") in err
    assert f"wrote 1 sanity figure(s) to {out_dir / 'sanity'}" in out
    with Image.open(out_dir / "sanity" / "features.4.png") as picture:
        pixels = np.asarray(picture.convert("RGB"), dtype=np.float64)
    assert pixels.shape[1] > pixels.shape[0] > 200 and pixels.std() > 10   # 2 rows of 1 + 3 cells, not blank

    # the numbers: those of sanity_check on the same model, images, rules and seed
    torch.manual_seed(0)                                   # the CLI's random weights (common.build_model)
    model = models.build("zfnet")
    photos = deconvcuda.data.bundled_photos(size=64, crops_per_photo=1)
    images = model.preprocessing.to_model(photos.images[:2])
    expected = deconvcuda.sanity_check(model, images, "features.4", rules=["guided", "gradient"], seed=3)
    index = (out_dir / "index.html").read_text(encoding="utf-8")
    header, cells = table_cells(index)
    assert header == ["rule", "original", "features.4", "features.0"]
    assert list(cells) == ["guided", "gradient"]
    for row, rule in enumerate(expected.rules):
        assert cells[rule][0] == "1.00 / 1.00"
        assert cells[rule] == [f"{float(expected.spearman[row, step]):.2f} / {float(expected.ssim[row, step]):.2f}"
                               for step in range(3)]
        assert re.search(rf"^{rule} +1\.00 / 1\.00  {re.escape(cells[rule][1])}  {re.escape(cells[rule][2])}$",
                         out, re.MULTILINE), out                  # the same table on stdout
    assert 'src="sanity/features.4.png"' in index and '<a href="#analysis-sanity">Sanity check</a>' in index
    assert f"the cells show {photos.names[0]}" in index

    # a second run replaces the section and the figure of the first
    code, _, err = run_sanity(capsys, "--layer", "features.0", "--rule", "gradient", "--channel", "5", "--out",
                              out_dir)
    assert code == 0, err
    assert [path.name for path in (out_dir / "sanity").iterdir()] == ["features.0.png"]
    index = (out_dir / "index.html").read_text(encoding="utf-8")
    assert index.count('id="analysis-sanity"') == 1 and "features.4.png" not in index
    header, cells = table_cells(index)
    assert header == ["rule", "original", "features.0"] and list(cells) == ["gradient"]
    assert "per image map 5's strongest activation" in index


def test_help_lists_the_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    assert re.search(r"^\s+sanity\s+Adebayo et al.'s sanity check", capsys.readouterr().out, re.MULTILINE)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["sanity", "--help"])
    assert exit_info.value.code == 0
    usage = capsys.readouterr().out
    for option in ("--layer NAME", "--rule LIST", "--channel C", "--seed N", "--max-images N", "--images PATH",
                   "--weights FILE", "--out DIR", "--device DEVICE"):
        assert option in usage, option


class Headed(nn.Module):
    """A pool before any weights, a convolution, and a head the forward never calls."""

    preprocessing = models.IMAGENET

    def __init__(self):
        super().__init__()
        self.pool = nn.MaxPool2d(2)
        self.conv = nn.Conv2d(3, 4, 3)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.conv(self.pool(x))


@pytest.mark.parametrize("argv, message", [
    (["--layer", "features.99"], "error: --layers: unknown layer(s) features.99; the model's layers are: features, "),
    (["--layer", "features.4", "--channel", "256"],
     "error: --channel: sanity_check: channel 256 is out of range; the layer has 256 channels (0..255)"),
    (["--layer", "features.4", "--rule", "deconvnet,lrp"], "argument --rule: expected rules from deconvnet, guided"),
    (["--rule", "gradient"], "the following arguments are required: --layer"),
    (["--layer", "head", "headed"], "error: --layer: randomizable_layers: layer 'head' is never called by the model's "
                                    "forward"),
    (["--layer", "pool", "headed"], "error: --layer: no layer with weights runs before pool, so there is nothing to "
                                    "randomize"),
])
def test_usage_errors_exit_2(tmp_path, capsys, monkeypatch, argv, message):
    if argv[-1] == "headed":    # a model of our own in place of --model's
        argv = argv[:-1]
        monkeypatch.setattr(models, "build", lambda name, weights=None: Headed())
    try:
        code = cli.main(["sanity", *COMMON, *argv, "--out", str(tmp_path / "out")])
    except SystemExit as exit_info:   # argparse: a bad option
        code = exit_info.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()
