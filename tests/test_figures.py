"""deconvcuda.visualize and its drawing helpers: PNG sizes and pixels, index.html, channel selection,
errors; index.html opened in headless Chromium where one is installed."""
import json
import os
import re
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import deconvcuda
from conftest import DEVICES
from deconvcuda import figures
from deconvcuda.models import HED_BGR

K = 9
CHROMIUM = next((path for path in (shutil.which("chromium"), shutil.which("chromium-browser"), "/usr/bin/chromium")
                 if path and os.path.exists(path)), None)


class TinyNet(nn.Module):
    """conv(pad 1) -> ReLU -> 2x2 max pool -> conv -> ReLU: receptive fields 3x3 and 8x8."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(4, 5, 3), nn.ReLU())

    def forward(self, x):
        return self.features(x)


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    model = TinyNet().eval()
    images = torch.randn(12, 3, 12, 12)
    names = [f"img{i:02d}" for i in range(len(images))]
    return model, images, names


def _grid_side(cell: int, columns: int = 3) -> int:
    return columns * cell + (columns + 1) * figures.CELL_GAP


def _figure_size(field: int) -> tuple:
    """(width, height) of a channel's PNG for a square receptive field of ``field`` pixels."""
    cell = field * max(1, -(-figures.MIN_CELL_PIXELS // field))
    return 2 * _grid_side(cell) + figures.GRID_GAP, _grid_side(cell)


def _cell(png: np.ndarray, field: int, index: int, right: bool = False) -> np.ndarray:
    """The pixels of cell ``index`` (row-major) of the left or right 3x3 grid, at its upscaled size."""
    scale = max(1, -(-figures.MIN_CELL_PIXELS // field))
    cell = field * scale
    r, c = divmod(index, 3)
    top = figures.CELL_GAP + r * (cell + figures.CELL_GAP)
    left = figures.CELL_GAP + c * (cell + figures.CELL_GAP) + (_grid_side(cell) + figures.GRID_GAP if right else 0)
    return png[top:top + cell:scale, left:left + cell:scale]


class _Sources(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sources = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.sources.append(dict(attrs)["src"])


def _img_sources(index: Path) -> list:
    parser = _Sources()
    parser.feed(index.read_text(encoding="utf-8"))
    return parser.sources


# --------------------------------------------------------------------------------------------- #
# Drawing helpers
# --------------------------------------------------------------------------------------------- #

def test_projections_are_zero_centred_on_their_own_scale():
    p = torch.zeros(3, 3, 2, 2)
    p[0, 0, 0, 0], p[0, 1, 1, 1] = 4.0, -2.0     # peak 4: 4 -> 1.0, -2 -> 0.25, 0 -> 0.5
    p[1] = 1e-30                                 # tiny but not zero: still full contrast
    rgb = figures.projections_to_rgb(p)          # p[2] is all zero: uniformly gray, no NaN
    assert rgb[0, 0, 0, 0] == 1.0 and rgb[0, 1, 1, 1] == 0.25 and rgb[0, 2, 0, 0] == 0.5
    assert torch.all(rgb[1] == 1.0)
    assert torch.all(rgb[2] == 0.5)


def test_bgr_projections_are_shown_as_rgb():
    p = torch.zeros(1, 3, 1, 1)
    p[0, 2] = 1.0  # the model's third channel is red when it reads BGR
    assert figures.projections_to_rgb(p, "BGR")[0, :, 0, 0].tolist() == [1.0, 0.5, 0.5]
    assert figures.projections_to_rgb(p, "RGB")[0, :, 0, 0].tolist() == [0.5, 0.5, 1.0]


def test_patches_use_the_preprocessing_or_their_own_range():
    rgb = torch.rand(2, 3, 4, 4)
    torch.testing.assert_close(figures.patches_to_rgb(HED_BGR.to_model(rgb), HED_BGR), rgb, atol=1e-5, rtol=0)
    stretched = figures.patches_to_rgb(rgb * 10 - 3)
    assert stretched.amin(dim=(1, 2, 3)).tolist() == [0.0, 0.0] and stretched.amax(dim=(1, 2, 3)).tolist() == [1.0, 1.0]
    gray = figures.patches_to_rgb(torch.rand(1, 1, 4, 4))
    assert gray.shape == (1, 3, 4, 4) and torch.equal(gray[:, 0], gray[:, 2])


def test_channel_figure_layout_and_upscaling():
    projections, patches = torch.full((9, 3, 5, 5), 0.5), torch.ones(9, 3, 5, 5)
    image = figures.channel_figure(projections, patches, K)
    assert (image.shape[1], image.shape[0]) == _figure_size(5)   # 5x5 fields become 65x65 cells
    assert image.dtype == np.uint8 and image.shape[2] == 3
    # fewer activations than slots: the missing cells stay background
    partial = figures.channel_figure(projections[:2], patches[:2], K)
    assert partial.shape == image.shape
    assert (_cell(partial, 5, 2) == figures.BACKGROUND).all() and (_cell(partial, 5, 1) == 128).all()
    big = figures.channel_figure(torch.rand(4, 3, 100, 100), torch.rand(4, 3, 100, 100), 4)  # 2x2, no upscaling
    assert big.shape == (2 * 100 + 3 * figures.CELL_GAP, 2 * (2 * 100 + 3 * figures.CELL_GAP) + figures.GRID_GAP, 3)


# --------------------------------------------------------------------------------------------- #
# visualize
# --------------------------------------------------------------------------------------------- #

@pytest.mark.parametrize("device", DEVICES)
def test_visualize_writes_the_papers_figures(tiny, tmp_path, device):
    model, images, names = tiny
    model = model.to(device)
    run = deconvcuda.visualize(model, images.to(device), ["features.1", "features.4"], k=K, out=tmp_path / "out",
                               image_names=names, batch_size=5, progress=False)
    assert run.index == tmp_path / "out" / "index.html" and run.index.is_file()
    assert [layer.layer for layer in run.layers] == ["features.1", "features.4"]
    assert [layer.receptive_field for layer in run.layers] == [(3, 3), (8, 8)]
    assert [len(layer.figures) for layer in run.layers] == [4, 5]

    maps = {"features.1": model.features[:2](images.to(device)), "features.4": model.features(images.to(device))}
    for figure in run.figures:
        field = 3 if figure.layer == "features.1" else 8
        with Image.open(figure.path) as png:
            assert png.mode == "RGB" and png.size == _figure_size(field), figure.path
        # the captions' numbers are the brute-force top-9 over the images (one per image, strongest
        # first; ties, such as ReLU zeros, keep the earlier image)
        per_image = maps[figure.layer][:, figure.channel].flatten(1).amax(dim=1).cpu()
        expected_values, expected_indices = per_image.sort(descending=True, stable=True)
        torch.testing.assert_close(torch.tensor(figure.values), expected_values[:K])
        assert figure.image_index == expected_indices[:K].tolist()
        assert figure.image_names == [names[i] for i in figure.image_index]
        for value, index, (y, x) in zip(figure.values, figure.image_index, figure.positions):
            assert maps[figure.layer][index, figure.channel, y, x].item() == pytest.approx(value)
        assert all(bottom - top == field and right - left == field for top, left, bottom, right in figure.boxes)

    # index.html shows every PNG written, and nothing else
    written = sorted(path.relative_to(run.out).as_posix() for path in run.out.rglob("*.png"))
    assert sorted(_img_sources(run.index)) == written
    assert len(written) == 4 + 5 + 2  # one per channel, one overview per layer
    text = run.index.read_text(encoding="utf-8")
    assert "features.4</b> &middot; channel 3" in text and names[run.layers[1].figures[3].image_index[0]] in text
    assert str(torch.device(device)) in text and torch.__version__ in text


def test_visualize_pixels_are_the_projection_and_the_patch(tiny, tmp_path):
    # The first layer's projection of one activation at (y, x) of map c is its value times filter c,
    # placed on the activation's 3x3 field (ReLU keeps the positive seed): an oracle independent of
    # the engine. Cells show it zero-centred on its own scale, beside the image's own 3x3 patch.
    model, images, names = tiny
    run = deconvcuda.visualize(model, images, "features.1", channels=[2], k=K, out=tmp_path, progress=False)
    (figure,) = run.figures
    png = np.asarray(Image.open(figure.path).convert("RGB")).astype(np.float64) / 255
    weight = model.features[0].weight[2].detach()
    for cell, (index, (top, left, bottom, right)) in enumerate(zip(figure.image_index, figure.boxes)):
        inside = torch.zeros(3, 3)
        ys, xs = range(top, bottom), range(left, right)
        for i, y in enumerate(ys):
            for j, x in enumerate(xs):
                inside[i, j] = float(0 <= y < 12 and 0 <= x < 12)
        projection = weight * inside
        expected = (projection / (2 * projection.abs().max()) + 0.5).permute(1, 2, 0).numpy()
        np.testing.assert_allclose(_cell(png, 3, cell), expected, atol=1 / 255 + 1e-6)
        padded = torch.nn.functional.pad(images[index], (1, 1, 1, 1))
        patch = padded[:, top + 1:bottom + 1, left + 1:right + 1]
        patch = ((patch - patch.min()) / (patch.max() - patch.min())).permute(1, 2, 0).numpy()
        np.testing.assert_allclose(_cell(png, 3, cell, right=True), patch, atol=1 / 255 + 1e-6)


def test_visualize_channel_selection(tiny, tmp_path):
    model, images, names = tiny
    with torch.no_grad():
        model.features[3].bias[1] = -1e4  # map 1 of the second conv never fires
    run = deconvcuda.visualize(model, images, ["features.1", "features.4"], channels={"features.4": [4, 1]},
                               out=tmp_path / "a", progress=False)
    assert [layer.channels for layer in run.layers] == [[0, 1, 2, 3], [4, 1]]
    assert run.layers[1].figures[1].values == [0.0] * K
    run = deconvcuda.visualize(model, images, "features.4", max_channels=3, out=tmp_path / "b", progress=False)
    assert run.layers[0].channels == [0, 2, 3]  # the first three that fire
    assert sorted(p.name for p in (tmp_path / "b" / "features.4").iterdir()) == [
        "channel_0000.png", "channel_0002.png", "channel_0003.png"]


def test_visualize_leaves_the_model_as_it_was(tiny, tmp_path):
    model, images, _ = tiny
    model.train()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    deconvcuda.visualize(model, images, "features.4", channels=[0], out=tmp_path, progress=False)
    assert model.training
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())


def test_visualize_errors_name_the_problem(tiny, tmp_path):
    model, images, _ = tiny
    with pytest.raises(ValueError, match=r"visualize: unknown layer 'features\.9'; the model's layers are: "
                                         r"features, features\.0, features\.1"):
        deconvcuda.visualize(model, images, "features.9", out=tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"channel 5 is out of range for layer 'features\.4', which has 5 channels"):
        deconvcuda.visualize(model, images, "features.4", channels=[5], out=tmp_path, progress=False)
    with pytest.raises(ValueError, match="k must be a positive int"):
        deconvcuda.visualize(model, images, "features.4", k=0, out=tmp_path, progress=False)
    with pytest.raises(ValueError, match="layers is empty"):
        deconvcuda.visualize(model, images, [], out=tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"the model is on cpu but device is meta"):
        deconvcuda.visualize(model, images, "features.4", device="meta", out=tmp_path, progress=False)


# --------------------------------------------------------------------------------------------- #
# index.html in a real browser
# --------------------------------------------------------------------------------------------- #

# Appended to a copy of index.html: once the page has loaded, list the images the browser decoded.
_PROBE = """<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const probe = document.createElement("pre");
  probe.id = "probe";
  probe.textContent = JSON.stringify({
    total: images.length,
    loaded: images.filter(img => img.complete && img.naturalWidth > 0).map(img => img.getAttribute("src")),
  });
  document.body.appendChild(probe);
});
</script>"""


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (Debian: apt-get install chromium)")
def test_index_html_loads_every_figure_in_chromium(tiny, tmp_path):
    model, images, names = tiny
    run = deconvcuda.visualize(model, images, ["features.1", "features.4"], out=tmp_path / "out",
                               image_names=names, progress=False)
    probe = run.out / "probe.html"
    probe.write_text(run.index.read_text(encoding="utf-8").replace("</body>", _PROBE + "</body>"), encoding="utf-8")
    with tempfile.TemporaryDirectory() as profile:
        result = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--no-first-run", "--disable-sync", f"--user-data-dir={profile}",
             "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
            capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="probe">(.*?)</pre>', result.stdout, re.S)
    assert found, f"Chromium did not run the probe (exit {result.returncode}): {result.stderr[-2000:]}"
    report = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    expected = _img_sources(run.index)
    assert report["total"] == len(expected) == 4 + 5 + 2
    assert sorted(report["loaded"]) == sorted(expected)
