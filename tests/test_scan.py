"""The dataset scan (deconvcuda.scan) in one process: many layers in one pass, Datasets and image
folders, shards with save/load/merge, checkpoints and resuming, and bad input.

Exact comparisons use float64 data (the forward runs in the data's dtype), so that different batch
splits cannot round differently; the brute-force oracle is conftest's ``brute_force_top``. The
2-process torch.distributed runs are in test_distributed.py.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import List

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset, TensorDataset

import deconvcuda
from conftest import PairDataset, assert_top_equals, brute_force_top, forward_to_layer, small_cnn
from deconvcuda import batches, data, graph, scan

FIELDS = ("values", "image_index", "y", "x")
SMALL_LAYERS = ["features.0", "features.1", "features.2", "features.4", "fc"]


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(3)
    return small_cnn()


def images(count: int, seed: int, shape=(3, 12, 12), dtype=torch.float64) -> torch.Tensor:
    return torch.randn(count, *shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def assert_same(actual: scan.TopActivations, expected: scan.TopActivations, msg: str = "") -> None:
    assert actual.layer == expected.layer, msg
    for name in FIELDS:
        assert torch.equal(getattr(actual, name), getattr(expected, name)), f"{msg}: {name} differs"


class Items(Dataset):
    """A Dataset of whatever items it is given."""

    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


# --------------------------------------------------------------------------------------------- #
# Many layers in one pass
# --------------------------------------------------------------------------------------------- #

class Residual(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(channels, channels, 3, padding=1), nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(torch.relu(self.conv1(x)))


class Branches(nn.Module):
    """A graph model (a residual addition, functional ReLUs, two branches joined by torch.cat) that
    builds in milliseconds."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        self.block = Residual(6)
        self.left, self.right = nn.Conv2d(6, 4, 3, stride=2, padding=1), nn.Conv2d(6, 3, 1, stride=2)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(7 * 3 * 3, 5)

    def forward(self, x):
        x = self.block(self.stem(x))
        x = torch.cat([torch.relu(self.left(x)), torch.relu(self.right(x))], dim=1)
        return self.fc(torch.flatten(self.pool(x), 1))


def branches() -> nn.Module:
    torch.manual_seed(5)
    return Branches().eval()


@pytest.mark.parametrize("name, build, shape, layers", [
    ("small", small_cnn, (3, 12, 12), SMALL_LAYERS),
    ("branches", branches, (3, 12, 12), ["stem", "block", "left", "pool", "fc"]),
], ids=["small", "branches"])
def test_list_equals_one_layer_at_a_time(name, build, shape, layers):
    """Bit for bit (the same batches through the same ops), and against the brute force of the
    model's own forward in float64."""
    model = build()
    x = images(7, seed=11, shape=shape)
    tops = deconvcuda.top_activations(model, x, layers, k=3, batch_size=3, progress=False)
    assert list(tops) == layers
    for layer in layers:
        single = deconvcuda.top_activations(model, x, layer, k=3, batch_size=3, progress=False)
        assert isinstance(single, scan.TopActivations)
        assert_same(tops[layer], single, f"{name} {layer}")
        with torch.no_grad():
            truth = forward_to_layer(copy.deepcopy(model).double(), x, layer)
        assert_top_equals(tops[layer], brute_force_top(truth, k=3), device="cpu", rtol=1e-9, msg=f"{name} {layer}")


def test_one_forward_per_batch_and_the_model_is_never_called(model, monkeypatch):
    runs = []
    original = graph.Graph.run

    def counting(self, x):
        runs.append(x.shape[0])
        return original(self, x)

    monkeypatch.setattr(graph.Graph, "run", counting)
    calls = []
    handle = model.register_forward_hook(lambda *args: calls.append(1))
    try:
        deconvcuda.top_activations(model, images(7, seed=1), SMALL_LAYERS, k=2, batch_size=3, progress=False)
    finally:
        handle.remove()
    assert runs == [3, 3, 1], "one forward per batch for all five layers"
    assert calls == [], "the model itself must not be called"


def test_order_given_duplicates_dropped_and_the_layers_keyword(model):
    x = images(5, seed=2)
    tops = deconvcuda.top_activations(model, x, ["fc", "features.1", "fc"], k=2, progress=False)
    assert list(tops) == ["fc", "features.1"]
    again = deconvcuda.top_activations(model, x, layers=("fc", "features.1"), k=2, progress=False)
    for layer in tops:
        assert_same(again[layer], tops[layer], layer)
    assert tops["fc"].images_per_rank == (5,)


def test_progress_bar_of_a_list_counts_images(model, capsys):
    deconvcuda.top_activations(model, images(5, seed=8), ["features.1", "fc"], k=2, batch_size=2, progress=True)
    err = capsys.readouterr().err
    assert "top-2 2 layers" in err and "5/5" in err and "image/s" in err, err
    # stderr is not a terminal here (a log file, CI): plain lines, no carriage returns or escape codes
    assert "\r" not in err and "\x1b" not in err, repr(err)


# --------------------------------------------------------------------------------------------- #
# Datasets and image folders
# --------------------------------------------------------------------------------------------- #

@pytest.mark.parametrize("workers", [0, 2])
def test_datasets_equal_the_tensor(model, workers):
    x = images(9, seed=6)
    expected = deconvcuda.top_activations(model, x, SMALL_LAYERS, k=4, batch_size=4, progress=False)
    for dataset in (TensorDataset(x), PairDataset(x), Items(list(x.unbind(0)))):
        tops = deconvcuda.top_activations(model, dataset, SMALL_LAYERS, k=4, batch_size=4, num_workers=workers,
                                          progress=False)
        for layer in SMALL_LAYERS:
            assert_same(tops[layer], expected[layer], f"{type(dataset).__name__} {layer} workers={workers}")
    assert torch.equal(batches.gather_images(PairDataset(x), [5, 1, 5]), x[[5, 1, 5]])


def write_folder(directory: Path, count: int, broken=(), seed: int = 0) -> Path:
    """``count`` random PNG/JPEG files of different sizes named 00.png .. (some in a subfolder), the
    names in ``broken`` written as junk, a hidden file and a hidden folder."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "sub").mkdir(exist_ok=True)
    for i in range(count):
        name = f"{i:02d}.png" if i % 3 else f"sub/{i:02d}.jpg"
        if name in broken:
            (directory / name).write_bytes(b"\x89PNG not really")
        else:
            size = (20 + 3 * i, 24 + i)
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(directory / name)
    (directory / ".hidden.png").write_bytes(b"ignored")
    (directory / ".cache").mkdir(exist_ok=True)
    (directory / ".cache" / "x.png").write_bytes(b"ignored")
    return directory


def test_image_folder_reads_lazily_in_order(tmp_path):
    folder = data.ImageFolder(write_folder(tmp_path / "images", 5), size=16)
    assert len(folder) == 5
    assert folder.names == ["01.png", "02.png", "04.png", "sub/00.jpg", "sub/03.jpg"]
    image = folder[1]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    # the same pixels as load_folder's for the same file, and model input with a Preprocessing
    assert torch.equal(image, data.load_folder(tmp_path / "images", size=16).images[1])
    vgg = deconvcuda.models.Preprocessing(channel_order="BGR", scale=255.0, mean=(103.939, 116.779, 123.68))
    with_model_input = data.ImageFolder(tmp_path / "images", size=16, transform=vgg)
    torch.testing.assert_close(with_model_input[1], vgg.to_model(image[None])[0])
    flat = data.ImageFolder(tmp_path / "images", size=16, recursive=False)
    assert flat.names == ["01.png", "02.png", "04.png"]
    # worker processes read a folder (where there are CPUs for them), not a Dataset in memory
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert batches.default_workers(folder) == (min(8, cpus) if cpus >= 2 else 0)
    assert batches.default_workers(PairDataset(torch.zeros(2, 3, 4, 4))) == 0


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^ImageFolder: image directory .* does not exist"):
        data.ImageFolder(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"^ImageFolder: no files in"):
        data.ImageFolder(tmp_path / "empty")
    with pytest.raises(ValueError, match=r"^ImageFolder: size must be a positive int"):
        data.ImageFolder(tmp_path, size=0)
    folder = data.ImageFolder(write_folder(tmp_path / "images", 2, broken=("01.png",)), size=8)
    with pytest.raises(data.UnreadableImageError, match=r"01\.png: not a readable image"):
        folder[0]
    with pytest.raises(IndexError, match=r"^ImageFolder: index 2 is out of range for 2 files"):
        folder[2]


def test_image_folder_from_a_list_of_files(tmp_path):
    root = write_folder(tmp_path / "images", 5)
    listing = tmp_path / "list.txt"   # relative to the list's folder, absolute, a comment, a blank line
    listing.write_text(f"# my images\nimages/sub/03.jpg\n\n{root / '01.png'}\n  images/02.png  \n", encoding="utf-8")
    listed = data.ImageFolder.from_list(listing, size=16)
    assert listed.names == ["images/sub/03.jpg", str(root / "01.png"), "images/02.png"]
    assert len(listed) == 3 and listed.root == str(tmp_path)
    folder = data.ImageFolder(root, size=16)
    for position, name in ((0, "sub/03.jpg"), (1, "01.png"), (2, "02.png")):   # the same pixels, in the list's order
        assert torch.equal(listed[position], folder[folder.names.index(name)])
    assert batches.default_workers(listed) == batches.default_workers(folder)   # read by workers too
    with pytest.raises(FileNotFoundError, match=r"^ImageFolder.from_list: no file .*nothing.txt"):
        data.ImageFolder.from_list(tmp_path / "nothing.txt")
    (tmp_path / "comments.txt").write_text("# nothing\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"lists no image paths"):
        data.ImageFolder.from_list(tmp_path / "comments.txt")
    with pytest.raises(ValueError, match=r"is not a text file"):
        data.ImageFolder.from_list(root / "sub" / "00.jpg")


class _Frames(torch.utils.data.Dataset):
    """``count`` images [3, 224, 224] (600 KB each) made on demand."""

    def __init__(self, count: int):
        self.count = count

    def __len__(self):
        return self.count

    def __getitem__(self, index):
        return torch.full((3, 224, 224), float(index))


def _private_megabytes(pid: int) -> float:
    """The memory only this process holds (private pages, shared memory included where only it maps it)."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:])
    return sum(int(fields[name].split()[0]) for name in ("Private_Clean", "Private_Dirty")) / 1024


def _children() -> List[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == os.getpid():
                found.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="needs Linux's /proc/PID/smaps_rollup")
def test_worker_processes_do_not_grow_with_the_images_they_read():
    """Each batch travels from a worker in shared memory; none may stay behind in the worker."""
    source = batches.data_source(_Frames(16 * 64), "test")
    seen = {}
    for number, batch in enumerate(source.batches(0, None, 16, num_workers=2)):
        assert torch.equal(batch.index, torch.arange(16 * number, 16 * number + 16))
        assert float(batch.images[3, 0, 0, 0]) == 16 * number + 3
        if number in (8, 63):
            seen[number] = {pid: _private_megabytes(pid) for pid in _children()}
    grown = [seen[63][pid] - seen[8][pid] for pid in seen[8] if pid in seen[63]]
    assert grown and max(grown) < 40, f"workers grew by {grown} MB over 55 batches of 9.6 MB"


@pytest.mark.parametrize("workers", [0, None], ids=["in-process", "default-workers"])
def test_scan_of_an_image_folder_skips_unreadable_files_with_a_warning(model, tmp_path, workers):
    root = write_folder(tmp_path / "images", 8, broken=("02.png", "sub/06.jpg"))
    folder = data.ImageFolder(root, size=12)
    assert folder.names[1] == "02.png" and folder.names[7] == "sub/06.jpg"
    with pytest.warns(UserWarning) as caught:
        tops = deconvcuda.top_activations(model, folder, ["features.1", "fc"], k=8, batch_size=3,
                                          num_workers=workers, progress=False)
    messages = [str(w.message) for w in caught]
    assert any("02.png" in m and m.startswith("top_activations: skipping image 1") for m in messages), messages
    assert any("06.jpg" in m for m in messages), messages
    # the readable images keep their folder indices; the broken ones are never ranked
    readable = [i for i in range(len(folder)) if i not in (1, 7)]
    stacked = torch.stack([folder[i] for i in readable])
    expected = deconvcuda.top_activations(model, stacked, ["features.1", "fc"], k=8, progress=False)
    for layer, top in tops.items():
        mapped = torch.tensor([-1] + readable)[expected[layer].image_index + 1]  # -1 stays -1
        assert torch.equal(top.image_index, mapped), layer
        # float32: other batches may round differently
        torch.testing.assert_close(top.values, expected[layer].values, rtol=1e-5, atol=1e-6)
        assert bool((top.image_index[:, -2:] == -1).all()), "6 readable images, k = 8: two entries missing"
    assert tops["fc"].images_per_rank == (6,)


# --------------------------------------------------------------------------------------------- #
# Bad input
# --------------------------------------------------------------------------------------------- #

def test_an_empty_list_of_layers(model):
    with pytest.raises(ValueError, match=r"^top_activations: the list of layers is empty"):
        deconvcuda.top_activations(model, images(2, seed=0), [], progress=False)


def test_an_unknown_layer_in_the_list(model):
    with pytest.raises(ValueError, match=r"^top_activations: unknown layer 'features.9'"):
        deconvcuda.top_activations(model, images(2, seed=0), ["features.1", "features.9"], progress=False)


@pytest.mark.parametrize("layers, error, words", [
    (["features.1", 3], TypeError, "every layer in the list must be a name"),
    (nn.ReLU(), TypeError, "layer must be a name"),
    (5, TypeError, "layer must be a name"),
])
def test_layers_that_are_not_names(model, layers, error, words):
    with pytest.raises(error, match=rf"^top_activations: {words}"):
        deconvcuda.top_activations(model, images(2, seed=0), layers, progress=False)


def test_layer_and_layers_together(model):
    with pytest.raises(TypeError, match=r"^top_activations: pass the layers once"):
        deconvcuda.top_activations(model, images(2, seed=0), "fc", layers=["fc"], progress=False)


BAD_ITEMS = {
    "strings": (lambda: Items(["a.png", "b.png"]), TypeError, r"item 0 of the dataset must be an image tensor"),
    "pil-images": (lambda: Items([Image.new("RGB", (12, 12))] * 2), TypeError, r"a PIL image: give the Dataset a "
                                                                               r"transform"),
    "flat-tensors": (lambda: Items([torch.zeros(12)] * 2), ValueError, r"a 1-D tensor of shape \[12\]"),
    "sizes-differ-in-a-batch": (lambda: Items([torch.zeros(3, 12, 12), torch.zeros(3, 13, 12)]), ValueError,
                                r"every image must have the shape of the first, \[3, 12, 12\] \(image 0\); image 1 "
                                r"has \[3, 13, 12\]"),
    "sizes-differ-between-batches": (lambda: Items([torch.zeros(3, 12, 12)] * 2 + [torch.zeros(3, 14, 14)]),
                                     ValueError, r"every image must have the shape of the first, \[3, 12, 12\]"),
    "sizes-differ-in-a-list": (lambda: [torch.zeros(3, 12, 12), torch.zeros(3, 12, 13)], ValueError,
                               "shape of the first"),
    "integers": (lambda: Items([torch.zeros(3, 12, 12, dtype=torch.uint8)] * 2), TypeError, "floating point"),
    "empty-dataset": (lambda: Items([]), ValueError, "data holds no images"),
    "a-string": (lambda: "images/", TypeError, "data must be"),
}


@pytest.mark.parametrize("case", list(BAD_ITEMS))
def test_items_that_are_not_images(model, case):
    make, error, words = BAD_ITEMS[case]
    with pytest.raises(error, match=rf"^top_activations: .*{words}"):
        deconvcuda.top_activations(model, make(), ["features.1", "fc"], k=2, batch_size=2, num_workers=0,
                                   progress=False)


def test_unreadable_items_only(model, tmp_path):
    root = write_folder(tmp_path / "images", 2, broken=("sub/00.jpg", "01.png"))
    with pytest.warns(UserWarning, match="skipping"):
        with pytest.raises(ValueError, match=r"^top_activations: data holds no images that could be read"):
            deconvcuda.top_activations(model, data.ImageFolder(root, size=12), "fc", num_workers=0, progress=False)


@pytest.mark.parametrize("shard", [(2, 2), (-1, 3), (0, 0), (1,), "0/2", (0.0, 2)], ids=repr)
def test_bad_shard(model, shard):
    with pytest.raises(ValueError, match=r"^top_activations: shard must be \(index, count\)"):
        deconvcuda.top_activations(model, images(2, seed=0), "fc", shard=shard, progress=False)


def test_shard_of_a_stream_is_an_error(model):
    with pytest.raises(ValueError, match=r"^top_activations: shard= needs data that can be read in parts"):
        deconvcuda.top_activations(model, [images(2, seed=0)], "fc", shard=(0, 2), progress=False)


# --------------------------------------------------------------------------------------------- #
# Shards: save, load, merge
# --------------------------------------------------------------------------------------------- #

def test_shards_saved_loaded_and_merged_equal_one_scan(model, tmp_path):
    x = images(11, seed=9)
    full = deconvcuda.top_activations(model, x, SMALL_LAYERS, k=4, batch_size=3, progress=False)
    paths = []
    # 11 images are 4 batches of 3: the parts are batches 0, 1 and 2-3, images 0-2, 3-5 and 6-10
    for i, size in enumerate((3, 3, 5)):
        part = deconvcuda.top_activations(model, PairDataset(x), SMALL_LAYERS, k=4, batch_size=3, shard=(i, 3),
                                          num_workers=0, progress=False)
        assert part["fc"].images_per_rank == (size,)
        paths.append(tmp_path / f"part{i}.pt")
        scan.save_scan(part, paths[-1])
    merged = scan.merge_scans(*paths)
    for layer in SMALL_LAYERS:
        assert_same(merged[layer], full[layer], layer)
    assert merged["fc"].images_per_rank == (3, 3, 5)
    # one layer's TopActivations: save, load, merge with the method
    first, second = (deconvcuda.top_activations(model, x, "features.2", k=4, shard=(i, 2), progress=False)
                     for i in range(2))
    first.save(tmp_path / "first.pt")
    loaded = scan.TopActivations.load(tmp_path / "first.pt")
    assert_same(loaded, first, "loaded")
    assert_same(loaded.merge(second), full["features.2"], "merged")
    with pytest.raises(ValueError, match=r"^TopActivations.load: .* holds a scan of 5 layers"):
        scan.TopActivations.load(paths[0])


def test_merge_keeps_the_earlier_image_on_ties_and_pads_missing_entries():
    relu = nn.Sequential(nn.ReLU()).eval()
    x = torch.zeros(5, 2, 2, 2)
    x[:, 1] = 1.0  # channel 1: every image ties at 1; channel 0: at 0
    x[3, 1, 1, 1] = 2.0
    full = deconvcuda.top_activations(relu, x, "0", k=4, progress=False)
    later, earlier = (deconvcuda.top_activations(relu, x, "0", k=4, shard=(i, 2), progress=False) for i in (1, 0))
    merged = scan.merge_scans(later, earlier)  # the later part first: ties still go to the smaller index
    assert_same(merged, full, "ties")
    assert merged.image_index.tolist() == [[0, 1, 2, 3], [3, 0, 1, 2]]
    # two parts of two and three images, k = 6: one entry stays missing
    merged = scan.merge_scans(*(deconvcuda.top_activations(relu, x, "0", k=6, shard=(i, 2), progress=False)
                                for i in range(2)))
    assert merged.image_index[:, 5].tolist() == [-1, -1] and merged.values[:, 5].tolist() == [-float("inf")] * 2


def test_merge_errors(model, tmp_path):
    x = images(6, seed=10)
    a = deconvcuda.top_activations(model, x, ["features.1", "fc"], k=3, shard=(0, 2), progress=False)
    with pytest.raises(ValueError, match=r"^merge_scans: image \d+ is ranked in channel \d+ of more than one scan"):
        scan.merge_scans(a, a)
    b = deconvcuda.top_activations(model, x, ["fc"], k=3, shard=(1, 2), progress=False)
    with pytest.raises(ValueError, match=r"^merge_scans: scan 2 has the layers \['fc'\]"):
        scan.merge_scans(a, b)
    c = deconvcuda.top_activations(model, x, "fc", k=2, shard=(1, 2), progress=False)
    with pytest.raises(ValueError, match=r"^merge_scans: scan 2 is of layer 'fc' with \[C, k\] = \[5, 2\]"):
        scan.merge_scans(a["fc"], c)
    with pytest.raises(TypeError, match=r"^merge_scans: every scan must be of one form"):
        scan.merge_scans(a, c)
    (tmp_path / "junk.pt").write_bytes(b"not a scan")
    with pytest.raises(ValueError, match=r"^load_scan: .*junk.pt' cannot be read as a saved scan"):
        scan.load_scan(tmp_path / "junk.pt")
    with pytest.raises(FileNotFoundError, match=r"^load_scan: no file"):
        scan.load_scan(tmp_path / "missing.pt")


# --------------------------------------------------------------------------------------------- #
# Checkpoints
# --------------------------------------------------------------------------------------------- #

def test_an_interrupted_scan_resumes_from_its_checkpoint(model, tmp_path):
    x = images(10, seed=12)
    expected = deconvcuda.top_activations(model, x, SMALL_LAYERS, k=3, batch_size=3, progress=False)
    path = tmp_path / "scan.ckpt"
    crashing = PairDataset(x, fail_at=7)  # the third batch (6, 7, 8) fails
    with pytest.raises(RuntimeError, match="simulated crash at image 7"):
        deconvcuda.top_activations(model, crashing, SMALL_LAYERS, k=3, batch_size=3, num_workers=0,
                                   checkpoint=path, checkpoint_every=0, progress=False)
    assert path.exists()
    resumed = PairDataset(x)
    tops = deconvcuda.top_activations(model, resumed, SMALL_LAYERS, k=3, batch_size=3, num_workers=0,
                                      checkpoint=path, checkpoint_every=0, progress=False)
    assert resumed.reads == [6, 7, 8, 9], "only the images after the last finished batch are read again"
    for layer in SMALL_LAYERS:
        assert_same(tops[layer], expected[layer], layer)
    assert tops["fc"].images_per_rank == (10,)
    # a finished scan's checkpoint gives its result without reading anything
    again = PairDataset(x)
    tops = deconvcuda.top_activations(model, again, SMALL_LAYERS, k=3, batch_size=5, num_workers=0,
                                      checkpoint=path, progress=False)
    assert again.reads == []
    for layer in SMALL_LAYERS:
        assert_same(tops[layer], expected[layer], layer)


def test_a_checkpoint_of_a_tensor_scan_written_every_so_often(model, tmp_path):
    x = images(9, seed=13)
    path = tmp_path / "scan.ckpt"
    deconvcuda.top_activations(model, x, "features.4", k=2, batch_size=2, checkpoint=path, checkpoint_every=3600,
                               progress=False)
    state = torch.load(path, weights_only=True)
    assert state["complete"] and state["position"] == 9 and state["scanned"] == 9


@pytest.mark.parametrize("change", ["k", "layers", "weights", "data", "shard"])
def test_a_checkpoint_of_other_arguments_is_an_error(model, tmp_path, change):
    x = images(6, seed=14)
    path = tmp_path / "scan.ckpt"
    deconvcuda.top_activations(model, x, ["features.1", "fc"], k=3, checkpoint=path, progress=False)
    arguments = dict(model=model, data=x, layer=["features.1", "fc"], k=3, shard=None)
    if change == "k":
        arguments["k"] = 4
    elif change == "layers":
        arguments["layer"] = ["features.1"]
    elif change == "weights":
        arguments["model"] = small_cnn()
    elif change == "data":
        arguments["data"] = x + 1
    else:
        arguments["shard"] = (0, 2)
    with pytest.raises(ValueError, match=rf"^top_activations: checkpoint .* belongs to a scan with other "
                                         rf"arguments \(.*{change if change != 'weights' else 'model'}"):
        deconvcuda.top_activations(checkpoint=path, progress=False, **arguments)


def test_a_file_that_is_not_a_checkpoint(model, tmp_path):
    path = tmp_path / "scan.pt"
    scan.save_scan(deconvcuda.top_activations(model, images(2, seed=0), "fc", progress=False), path)
    with pytest.raises(ValueError, match=r"^top_activations: checkpoint .* is not a scan checkpoint"):
        deconvcuda.top_activations(model, images(2, seed=0), "fc", checkpoint=path, progress=False)
    with pytest.raises(ValueError, match=r"^top_activations: checkpoint_every must be a number of seconds"):
        deconvcuda.top_activations(model, images(2, seed=0), "fc", checkpoint=path, checkpoint_every=-1,
                                   progress=False)


# --------------------------------------------------------------------------------------------- #
# The per-image maxima: the CPU's path and the GPU's branch-free path agree
# --------------------------------------------------------------------------------------------- #

def test_maxima_with_and_without_asking_the_device():
    """The GPU path (no host sync: every map gets the NaN-free second look) run on the CPU gives
    exactly what the CPU path does, on maps with NaN beside a maximum, NaN everywhere, ties, +-inf."""
    nan, inf = float("nan"), float("inf")
    maps = torch.randn(4, 3, 3, 5, generator=torch.Generator().manual_seed(15))
    maps[0, 0] = nan                      # NaN everywhere: unranked
    maps[1, 1, 0, 0] = nan                # NaN before the maximum
    maps[1, 1, 2, 3] = 9.0
    maps[2, 2] = 1.0                      # ties: the first position wins
    maps[3, 0, 1, 1], maps[3, 1, 2, 2] = inf, -inf
    for output in (maps, maps.flatten(1)):  # spatial, and flat [B, F]
        with_sync = scan._image_maxima(output.clone(), sync_free=False)
        without = scan._image_maxima(output.clone(), sync_free=True)
        for a, b in zip(with_sync, without):
            assert torch.equal(a, b)
    values, ys, xs, unranked = scan._image_maxima(maps, sync_free=True)
    assert bool(unranked[0, 0]) and int(unranked.sum()) == 1
    assert (float(values[1, 1]), int(ys[1, 1]), int(xs[1, 1])) == (9.0, 2, 3)
    assert (int(ys[2, 2]), int(xs[2, 2])) == (0, 0)
    assert float(values[0, 3]) == inf
