"""Optimized images in the gallery: ``visualize(..., synthesize=...)`` (and ``deconvcuda visualize
--synthesize``) puts each channel's image beside its grids; ``deconvcuda synthesize`` writes a grid of
its own into the gallery's section.

The optimized images are checked against ``deconvcuda.synthesize`` called here, their values against a
forward hook written in conftest (not the code under test); the figures without ``synthesize``
against the same run without the option, pixel for pixel.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import deconvcuda
from conftest import forward_to_layer, small_cnn
from deconvcuda import cli, figures

LAYERS = ["features.1", "features.4", "fc"]       # maps 12x12, maps 3x3, a flat layer
QUICK = {"steps": 3}                               # a few steps: the wiring, not the optimisation, is tested here


@pytest.fixture
def cnn():
    torch.manual_seed(0)
    return small_cnn(), torch.rand(10, 3, 12, 12)


def _png(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _pngs(folder: Path) -> dict:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in sorted(folder.rglob("*.png"))}


# --------------------------------------------------------------------------------------------- #
# The panel
# --------------------------------------------------------------------------------------------- #

def test_channel_figure_ends_in_the_optimized_image_as_tall_as_the_grids():
    projections, patches = torch.full((9, 3, 5, 5), 0.5), torch.ones(9, 3, 5, 5)
    titles = ["deconvnet", "image patches"]
    plain = figures.channel_figure(projections, patches, 9, titles=titles)
    red = torch.zeros(3, 20, 20)
    red[0] = 1.0
    wider = figures.channel_figure(projections, patches, 9, titles=titles + ["optimized image"], optimized=red)
    assert wider.shape[0] == plain.shape[0]
    side = figures.render.grid(patches, 9, 3, 13).shape[0]           # 5x5 fields: 65x65 cells
    assert wider.shape[1] == plain.shape[1] + figures.GRID_GAP + side
    np.testing.assert_array_equal(wider[:, :plain.shape[1]], plain)   # the grids and their titles as they were
    panel = wider[-side:, plain.shape[1] + figures.GRID_GAP:]
    gap = figures.CELL_GAP
    assert (panel[:gap] == figures.BACKGROUND).all() and (panel[:, -gap:] == figures.BACKGROUND).all()
    assert (panel[gap:-gap, gap:-gap] == (255, 0, 0)).all()           # the image fills the panel inside the gaps
    with pytest.raises(ValueError, match=r"4 panels \(grids and the optimized image\) but 3 titles"):
        figures.channel_figure([projections, projections], patches, 9, titles=["a", "b", "c"], optimized=red)
    with pytest.raises(ValueError, match=r"optimized must be an RGB image \[3, h, w\]"):
        figures.channel_figure(projections, patches, 9, optimized=torch.rand(1, 3, 8, 8))


# --------------------------------------------------------------------------------------------- #
# visualize(synthesize=...)
# --------------------------------------------------------------------------------------------- #

def test_visualize_puts_each_channels_optimized_image_beside_its_grids(cnn, tmp_path, capsys):
    model, images = cnn
    plain = deconvcuda.visualize(model, images, LAYERS, max_channels=3, k=4, out=tmp_path / "plain", progress=False)
    off = deconvcuda.visualize(model, images, LAYERS, max_channels=3, k=4, out=tmp_path / "off", synthesize=False,
                               progress=False)
    assert _pngs(tmp_path / "off") == _pngs(tmp_path / "plain")        # synthesize=False: the same files, bytes
    run = deconvcuda.visualize(model, images, LAYERS, max_channels=3, k=4, out=tmp_path / "on", synthesize=QUICK,
                               progress=False)
    assert capsys.readouterr().err == ""                              # progress=False: synthesize's bar too
    assert [figure.path.name for figure in run.figures] == [figure.path.name for figure in plain.figures]
    assert [figure.optimized for figure in off.figures] == [None] * len(off.figures)

    for record, plain_record in zip(run.layers, plain.layers):
        channels = record.channels
        assert channels and channels == plain_record.channels and record.seconds["synthesize"] > 0
        # the images deconvcuda.synthesize makes for the layer's drawn channels, one batch, at the data's size
        expected = deconvcuda.synthesize(model, record.layer, channels, size=12, progress=False, **QUICK)
        reached = forward_to_layer(model, expected, record.layer).detach()
        for i, (figure, before) in enumerate(zip(record.figures, plain_record.figures)):
            assert figure.optimized == figure.path.parent / f"optimized_{figure.channel:04d}.png"
            optimized = _png(figure.optimized)
            np.testing.assert_array_equal(optimized, (expected[i] * 255).round().byte().permute(1, 2, 0).numpy())
            value = reached[i, figure.channel].mean().item()          # the map's mean; a flat layer's unit
            assert figure.optimized_value == pytest.approx(value, rel=1e-5, abs=1e-6)
            wide, narrow = _png(figure.path), _png(before.path)
            assert wide.shape[0] == narrow.shape[0] and wide.shape[1] > narrow.shape[1] + narrow.shape[0] // 2
            np.testing.assert_array_equal(wide[:, :narrow.shape[1]], narrow)      # the grids are as without
            panel = wide[:, narrow.shape[1] + figures.GRID_GAP:]
            # the panel shows the image, enlarged: the same colours on average
            inner = panel[-panel.shape[1]:][figures.CELL_GAP:-figures.CELL_GAP, figures.CELL_GAP:-figures.CELL_GAP]
            assert np.abs(inner.reshape(-1, 3).mean(0) - optimized.reshape(-1, 3).mean(0)).max() < 4

    index = (tmp_path / "on" / "index.html").read_text(encoding="utf-8")
    assert "<dt>optimized</dt>" in index and "12x12 pixels, 3 steps of Adam" in index
    assert "then the channel's <i>optimized image</i>" in index
    first = run.figures[0]
    assert (f'optimized image (right; <a href="features.1/optimized_{first.channel:04d}.png">alone</a>): the mean '
            f"of the channel&#x27;s map reaches {first.optimized_value:.4g} there") in index
    assert "optimized image" not in (tmp_path / "plain" / "index.html").read_text(encoding="utf-8")
    # the optimized images are in the manifest: a run without them into the same folder leaves none behind
    deconvcuda.visualize(model, images, LAYERS, max_channels=3, k=4, out=tmp_path / "on", progress=False)
    assert _pngs(tmp_path / "on") == _pngs(tmp_path / "plain")


def test_visualize_synthesize_options_reach_synthesize(cnn, tmp_path):
    model, images = cnn
    del model.fc                                          # any size fits what is left
    options = {"size": 16, "steps": 2, "seed": 3, "objective": "neuron", "regularizers": ["jitter", "decay"]}
    run = deconvcuda.visualize(model, images, "features.4", channels=[0, 1, 4], k=2, out=tmp_path,
                               synthesize=options, progress=False)
    drawn = run.layers[0].channels                        # those that fire in the images, as one batch
    assert len(drawn) >= 2
    expected = deconvcuda.synthesize(model, "features.4", drawn, progress=False, **options)
    reached = forward_to_layer(model, expected, "features.4").detach()       # [2, 6, 4, 4]: the centre is (2, 2)
    for i, figure in enumerate(run.figures):
        assert _png(figure.optimized).shape == (16, 16, 3)
        np.testing.assert_array_equal(_png(figure.optimized),
                                      (expected[i] * 255).round().byte().permute(1, 2, 0).numpy())
        assert figure.optimized_value == pytest.approx(reached[i, figure.channel, 2, 2].item(), rel=1e-5, abs=1e-6)
    index = (tmp_path / "index.html").read_text(encoding="utf-8")
    assert "objective &#x27;neuron&#x27; (the unit at the centre of the channel&#x27;s map), 16x16 pixels" in index
    assert "regularizers Pixel(sd=0.01), Jitter(pixels=8), Decay(strength=0.01)<" in index


@pytest.mark.parametrize("synthesize, error, message", [
    ("yes", TypeError, "visualize: synthesize must be True, False or a dict of deconvcuda.synthesize's options"),
    ({"stepz": 3}, ValueError, "visualize: synthesize has the unknown option 'stepz'; its options are size, steps"),
    ({"steps": 0}, ValueError, "visualize: synthesize: steps must be a positive int (the number of optimisation "
                               "steps), got 0"),
    ({"objective": "map"}, ValueError, "visualize: synthesize: objective must be one of 'channel', 'neuron'"),
    ({"regularizers": ["blurry"]}, ValueError, "visualize: synthesize: unknown regularizer 'blurry' in regularizers"),
])
def test_visualize_checks_synthesize_before_any_work(cnn, tmp_path, synthesize, error, message):
    model, images = cnn
    with pytest.raises(error) as raised:
        deconvcuda.visualize(model, images, "features.4", out=tmp_path / "out", synthesize=synthesize, progress=False)
    assert message in str(raised.value)
    assert not (tmp_path / "out").exists()                            # before the scan: nothing written


# --------------------------------------------------------------------------------------------- #
# The command line
# --------------------------------------------------------------------------------------------- #

@pytest.fixture
def photo_folder(tmp_path):
    """Three of the bundled photos as files."""
    directory = tmp_path / "photos"
    directory.mkdir()
    photos = deconvcuda.data.bundled_photos(size=48, crops_per_photo=1)
    for name, image in list(zip(photos.names, photos.images))[:3]:
        pixels = (image * 255).round().byte().permute(1, 2, 0).numpy()
        Image.fromarray(pixels).save(directory / f"{name.replace('/', '_')}.png")
    return directory


def run_command(capsys, *argv, progress=False):
    code = cli.main([*map(str, argv), "--device", "cpu"] + ([] if progress else ["--no-progress"]))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def test_cli_visualize_and_synthesize_share_the_gallery(photo_folder, tmp_path, capsys):
    out_dir = tmp_path / "gallery"
    model = ("--model", "zfnet", "--out", out_dir)
    code, out, err = run_command(capsys, "visualize", *model, "--images", photo_folder, "--image-size", "48",
                                 "--layers", "features.1", "--channels", "0-1", "--top", "2", "--synthesize",
                                 "--synthesis-steps", "2")
    assert code == 0, err
    folder = out_dir / "features.1"
    assert sorted(p.name for p in folder.iterdir()) == ["channel_0000.png", "channel_0001.png", "optimized_0000.png",
                                                        "optimized_0001.png"]
    assert _png(folder / "optimized_0000.png").shape == (48, 48, 3)      # the size of the images by default
    index = (out_dir / "index.html").read_text(encoding="utf-8")
    assert "48x48 pixels, 2 steps of Adam" in index and 'href="features.1/optimized_0001.png"' in index

    code, out, err = run_command(capsys, "synthesize", *model, "--layer", "features.4", "--channels", "3,5-7",
                                 "--size", "48", "--steps", "2", "--regularizers", "fourier,jitter", "--batch-size", "3",
                                 progress=True)
    assert code == 0, err
    assert f"wrote 1 synthesize figure(s) to {out_dir / 'synthesize'}" in out
    assert "deconvcuda: synthesize features.4 (zfnet on cpu), 4 channels, 48x48 pixels, 2 steps" in err
    assert "synthesize features.4: 3/4 channels" in err and "\r" not in err   # a log file: plain lines
    grid = _png(out_dir / "synthesize" / "features.4.png")
    assert grid.shape[0] > 200 and grid.shape[1] > 200 and grid.std() > 10
    index = (out_dir / "index.html").read_text(encoding="utf-8")
    assert index.count('id="analysis-synthesize"') == 1 and 'src="synthesize/features.4.png"' in index
    assert "regularizers fourier, jitter; under each image, the mean of the channel&#x27;s map it reaches" in index
    assert 'href="features.1/optimized_0001.png"' in index              # visualize's page is still there

    code, out, err = run_command(capsys, "synthesize", *model, "--layer", "features.1", "--channels", "2",
                                 "--size", "48", "--steps", "2", "--objective", "neuron")
    assert code == 0, err
    assert sorted(p.name for p in (out_dir / "synthesize").iterdir()) == ["features.1.png"]   # replaced
    index = (out_dir / "index.html").read_text(encoding="utf-8")
    assert index.count('id="analysis-synthesize"') == 1 and "synthesize/features.4.png" not in index
    assert ("1 channel: 48&times;48 pixels, 2 steps from seed 0 in batches of 32, regularizers fourier, scale, rotate "
            "(the default)") in index


@pytest.mark.parametrize("argv, message", [
    (["--layer", "features.99"], "error: --layer: unknown layer(s) features.99; the model's layers are: features"),
    (["--layer", "features.4", "--channels", "250-300"],
     "error: --channels: layer features.4 has 256 channels (0..255), so 256, 257"),
    (["--size", "40"], "error: --size: deconvcuda synthesize: images of shape [N, 3, 40, 40] do not fit the model: "
                       "MaxPool2d 'features.14'"),    # the layer (features.13) fits; synthesize runs the whole model
])
def test_cli_synthesize_usage_errors_exit_2(tmp_path, capsys, argv, message):
    code, out, err = run_command(capsys, "synthesize", "--model", "zfnet", "--steps", "1", *argv,
                                 "--out", tmp_path / "out")
    assert code == 2 and message in err, err
    assert not (tmp_path / "out").exists()


def test_cli_visualize_synthesis_options_need_synthesize(tmp_path, capsys):
    code, out, err = run_command(capsys, "visualize", "--model", "zfnet", "--synthesis-steps", "8",
                                 "--out", tmp_path / "out")
    assert code == 2 and "error: --synthesis-steps: the --synthesis-* options set how the optimized images are made; " \
                         "add --synthesize to draw them" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, message", [
    (["synthesize", "--steps", "0"], "argument --steps: expected a positive integer, got '0'"),
    (["synthesize", "--size", "-3"], "argument --size: expected a positive integer, got '-3'"),
    (["synthesize", "--regularizers", "fourier,blurry"],
     "argument --regularizers: expected regularizers from pixel, fourier, jitter"),
    (["synthesize", "--objective", "map"], "argument --objective: invalid choice: 'map'"),
    (["synthesize", "--channels", "5-2"], "argument --channels: expected channels like '0-15,32'"),
    (["visualize", "--synthesis-steps", "none"], "argument --synthesis-steps: expected a positive integer"),
    (["visualize", "--synthesis-regularizers", "blurry"], "argument --synthesis-regularizers: expected regularizers"),
])
def test_cli_synthesize_bad_options_exit_2_with_usage(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"usage: deconvcuda {argv[0]}" in err and message in err, err


def test_cli_synthesize_options_are_synthesizes():
    from deconvcuda.cli import synthesize as command
    from deconvcuda.synthesis import optimize, regularizers

    parser, _ = cli._parser()
    args = parser.parse_args(["synthesize"])
    assert command.options(args) == {"size": optimize.DEFAULT_SIZE, "steps": optimize.DEFAULT_STEPS, "seed": 0,
                                     "objective": "channel"}                  # regularizers: the objective's default
    args = parser.parse_args(["visualize", "--synthesize", "--synthesis-regularizers", "none"])
    assert command.options(args, "synthesis-") == {"regularizers": []}      # the others: visualize's defaults
    assert command.regularizer_names("decay, blur,decay") == ["decay", "blur"]
    assert set(regularizers.names()) == set(regularizers.REGULARIZERS)


def test_cli_synthesize_the_same_seed_gives_the_same_grid(tmp_path, capsys):
    """Two runs with one seed draw the same pixels; another seed, other images. The images are
    deconvcuda.synthesize's, batch by batch as --batch-size cuts the channels."""
    common = ("--model", "zfnet", "--layer", "features.1", "--channels", "0-2", "--size", "48", "--steps", "2",
              "--batch-size", "2")
    grids = {}
    for name, seed in (("first", 0), ("again", 0), ("other", 1)):
        code, out, err = run_command(capsys, "synthesize", *common, "--seed", seed, "--out", tmp_path / name)
        assert code == 0, err
        grids[name] = _png(tmp_path / name / "synthesize" / "features.1.png")
    np.testing.assert_array_equal(grids["first"], grids["again"])
    assert grids["first"].shape == grids["other"].shape and not np.array_equal(grids["first"], grids["other"])
