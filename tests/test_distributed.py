"""The scan and the CLI under torch.distributed: 2 processes with gloo on the CPU, against one process.

``top_activations``: two processes started with torch.multiprocessing (spawn), joined with a
deadline, a TCP rendezvous on a free port of 127.0.0.1 only. Each runs every scenario below and
saves what it got; the test process compares each rank's result with one process's, bit for bit
(float64 data), and checks which images each rank read. The CLI: ``python -m torch.distributed.run
--nproc_per_node=2 -m deconvcuda visualize`` against ``deconvcuda visualize`` in one process: the
same PNG files, byte for byte, written once, each process having scanned half of the images (with
``--synthesize``, the optimized images too); ``deconvcuda synthesize`` likewise, its batches of
channels shared by the processes.
"""
from __future__ import annotations

import contextlib
import datetime
import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import deconvcuda
from conftest import PairDataset, small_cnn
from deconvcuda import cli

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
LAYERS = ["features.1", "features.4", "fc"]
#: Seconds the 2-process runs may take (start-up included) before they are killed.
DEADLINE = 240

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def the_model() -> nn.Module:
    torch.manual_seed(3)
    return small_cnn()


def the_images(count: int, seed: int) -> torch.Tensor:
    return torch.randn(count, 3, 12, 12, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def tied_images() -> torch.Tensor:
    """Through one ReLU: channel 0 ties at 0 in all 5 images, channel 1 at 1 but image 3 (2)."""
    x = torch.zeros(5, 2, 2, 2)
    x[:, 1] = 1.0
    x[3, 1, 1, 1] = 2.0
    return x


# --------------------------------------------------------------------------------------------- #
# The scenarios, run by each process (and by the test process alone, for the expected results)
# --------------------------------------------------------------------------------------------- #

def scenarios(checkpoint_dir: Path) -> dict:
    """Every scenario's result as plain CPU objects: {name: {layer: state_dict}} or what it shows."""
    model = the_model()
    results = {}

    dataset = PairDataset(the_images(7, seed=1))  # 7 images: parts of 3 and 4
    tops = deconvcuda.top_activations(model, dataset, LAYERS, k=3, batch_size=2, num_workers=0, progress=False)
    results["dataset"] = {layer: top.state_dict() for layer, top in tops.items()}
    results["dataset_reads"] = sorted(dataset.reads)

    top = deconvcuda.top_activations(model, the_images(9, seed=2), "features.2", k=5, batch_size=4, progress=False)
    results["tensor"] = {"features.2": top.state_dict()}

    top = deconvcuda.top_activations(nn.Sequential(nn.ReLU()), tied_images(), "0", k=4, batch_size=2, progress=False)
    results["ties"] = {"0": top.state_dict()}

    top = deconvcuda.top_activations(model, the_images(1, seed=3), "fc", k=3, progress=False)  # a rank reads none
    results["one_image"] = {"fc": top.state_dict()}

    tops = deconvcuda.top_activations(model, the_images(10, seed=4), LAYERS, k=2, shard=(1, 2), progress=False)
    results["shard"] = {layer: top.state_dict() for layer, top in tops.items()}

    path = checkpoint_dir / "scan.ckpt"
    tops = deconvcuda.top_activations(model, PairDataset(the_images(6, seed=5)), LAYERS, k=2, batch_size=2,
                                      num_workers=0, checkpoint=path, progress=False)
    results["checkpointed"] = {layer: top.state_dict() for layer, top in tops.items()}
    again = PairDataset(the_images(6, seed=5))  # a finished checkpoint: nothing is read again
    deconvcuda.top_activations(model, again, LAYERS, k=2, batch_size=2, num_workers=0, checkpoint=path,
                               progress=False)
    results["checkpoint_reads"] = again.reads

    try:  # image 5 is on the second rank: both ranks must raise, neither may hang
        deconvcuda.top_activations(model, PairDataset(the_images(7, seed=6), fail_at=5), "fc", num_workers=0,
                                   progress=False)
        results["failure"] = None
    except Exception as error:
        results["failure"] = (type(error).__name__, str(error))

    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        deconvcuda.top_activations(model, the_images(4, seed=7), "fc", k=2, batch_size=2, progress=True)
    results["progress"] = stderr.getvalue()
    return results


def worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=WORLD, timeout=datetime.timedelta(seconds=DEADLINE))
    try:
        torch.save(scenarios(Path(out)), os.path.join(out, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> list:
    out = tmp_path_factory.mktemp("distributed")
    context = torch.multiprocessing.start_processes(worker, args=(free_port(), str(out)), nprocs=WORLD, join=False,
                                                    start_method="spawn")
    deadline = time.monotonic() + DEADLINE
    try:
        while not context.join(timeout=5):
            if time.monotonic() > deadline:
                pytest.fail(f"the {WORLD} processes did not finish within {DEADLINE} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return [torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD)], out


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each of the two processes: BLAS may split its sums by thread
    try:
        return scenarios(tmp_path_factory.mktemp("one"))
    finally:
        torch.set_num_threads(threads)


SCANS = ["dataset", "tensor", "ties", "one_image", "shard", "checkpointed"]


@pytest.mark.parametrize("name", SCANS)
def test_every_rank_returns_what_one_process_returns(two_processes, one_process, name):
    ranks, _ = two_processes
    for rank, results in enumerate(ranks):
        assert list(results[name]) == list(one_process[name])
        for layer, expected in one_process[name].items():
            got = results[name][layer]
            for field in ("values", "image_index", "y", "x"):
                assert torch.equal(got[field], expected[field]), f"rank {rank}, {name}, {layer}: {field} differs"


def test_each_rank_read_its_half(two_processes, one_process):
    ranks, _ = two_processes
    assert one_process["dataset_reads"] == list(range(7))
    # 7 images in batches of 2: two whole batches each (0-3 and 4-6), as one process batches them
    assert [results["dataset_reads"] for results in ranks] == [[0, 1, 2, 3], [4, 5, 6]]
    for results in ranks:
        assert results["dataset"]["fc"]["images_per_rank"] == [4, 3]
        assert results["tensor"]["features.2"]["images_per_rank"] == [4, 5], "batches of 4: one and two"
        # fewer batches than processes: runs of images instead
        assert results["one_image"]["fc"]["images_per_rank"] == [0, 1]
        assert results["shard"]["fc"]["images_per_rank"] == [2, 3], "the second half of 10, split in two"
    assert one_process["shard"]["fc"]["images_per_rank"] == [5]


def test_ties_across_ranks_keep_the_earlier_image(two_processes):
    ranks, _ = two_processes
    assert ranks[1]["ties"]["0"]["image_index"].tolist() == [[0, 1, 2, 3], [3, 0, 1, 2]]


def test_each_rank_has_its_own_checkpoint(two_processes):
    ranks, out = two_processes
    assert sorted(path.name for path in out.glob("scan.ckpt*")) == [f"scan.ckpt.rank{r}-of-2" for r in range(WORLD)]
    assert all(results["checkpoint_reads"] == [] for results in ranks)


def test_a_failure_on_one_rank_is_raised_on_every_rank(two_processes):
    ranks, _ = two_processes
    assert ranks[1]["failure"] == ("RuntimeError", "simulated crash at image 5")
    assert ranks[0]["failure"] == ("RuntimeError", "top_activations: rank 1 of 2 failed: simulated crash at image 5")


def test_only_rank_0_shows_progress(two_processes):
    ranks, _ = two_processes
    assert "top-2 fc" in ranks[0]["progress"] and "2/2" in ranks[0]["progress"], ranks[0]["progress"]
    assert ranks[1]["progress"] == ""


# --------------------------------------------------------------------------------------------- #
# The CLI under torchrun
# --------------------------------------------------------------------------------------------- #

@pytest.fixture
def folder(tmp_path) -> Path:
    directory = tmp_path / "images"
    directory.mkdir()
    rng = np.random.default_rng(1)
    for i in range(10):
        Image.fromarray(rng.integers(0, 256, (40 + i, 48, 3), dtype=np.uint8)).save(directory / f"{i:02d}.png")
    return directory


def gallery(directory: Path) -> dict:
    return {path.relative_to(directory).as_posix(): path.read_bytes() for path in sorted(directory.rglob("*.png"))}


def under_torchrun(arguments, out: Path) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc_per_node=2 -m deconvcuda ARGUMENTS --out OUT``, which must succeed."""
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD}", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", "-m", "deconvcuda", *arguments, "--out", str(out)]
    # one thread per process, as torchrun sets; in_one_process gets the same
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    finished = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=DEADLINE)
    assert finished.returncode == 0, finished.stderr[-3000:]
    return finished


def in_one_process(arguments, out: Path) -> None:
    """The same command in this process, on one thread as each torchrun process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli.main([*arguments, "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("synthesize", [[], ["--synthesize", "--synthesis-steps", "2"]], ids=["", "synthesize"])
def test_cli_under_torchrun_writes_the_gallery_of_one_process(folder, tmp_path, capsys, synthesize):
    """With --synthesize each process optimises one layer's images; the figures are one process's."""
    arguments = ["visualize", "--no-progress", "--device", "cpu", "--model", "zfnet", "--images", str(folder),
                 "--layers", "features.1,5", "--channels", "0-2", "--top", "3", "--image-size", "48",
                 "--batch-size", "5", *synthesize]
    shared, alone = tmp_path / "shared", tmp_path / "alone"
    finished = under_torchrun(arguments, shared)
    assert finished.stdout.count("wrote 6 figures of 2 layers") == 1, finished.stdout
    assert "in 2 processes, 10 images" in finished.stderr
    assert "scanned 10 images (5 + 5 by the 2 processes)" in finished.stderr, finished.stderr[-3000:]
    in_one_process(arguments, alone)
    assert "scanned 10 images\n" in capsys.readouterr().err
    expected = gallery(alone)
    assert len(expected) == 2 * 3 * (2 if synthesize else 1) + 2, "3 channels of 2 layers (their optimized images) " \
                                                                  "and 2 overviews"
    got = gallery(shared)
    assert sorted(got) == sorted(expected)
    different = [name for name in expected if got[name] != expected[name]]
    assert not different, f"these PNGs differ from one process's: {different}"
    captions = [line for line in (shared / "index.html").read_text().splitlines() if "activations:" in line]
    assert captions == [line for line in (alone / "index.html").read_text().splitlines() if "activations:" in line]


def test_cli_synthesize_under_torchrun_shares_the_batches(tmp_path, capsys):
    """Batch i of --batch-size channels is optimised by process i % 2; rank 0 writes one process's grid."""
    arguments = ["synthesize", "--no-progress", "--device", "cpu", "--model", "zfnet", "--layer", "features.1",
                 "--channels", "0-4", "--size", "48", "--steps", "2", "--batch-size", "2"]
    shared, alone = tmp_path / "shared", tmp_path / "alone"
    finished = under_torchrun(arguments, shared)
    assert finished.stdout.count("wrote 1 synthesize figure(s)") == 1, finished.stdout
    assert "(zfnet on cpu in 2 processes), 5 channels" in finished.stderr, finished.stderr[-3000:]
    in_one_process(arguments, alone)
    assert "(zfnet on cpu), 5 channels" in capsys.readouterr().err

    def pixels(folder: Path) -> np.ndarray:
        with Image.open(folder / "synthesize" / "features.1.png") as image:
            return np.asarray(image.convert("RGB"))

    np.testing.assert_array_equal(pixels(shared), pixels(alone))
    assert sorted(gallery(shared)) == ["synthesize/features.1.png"]
