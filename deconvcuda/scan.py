"""The dataset scan: the k strongest activations of every feature map of one or many layers.

    top = top_activations(model, data, "features.29", k=9)                  # one layer: TopActivations
    tops = top_activations(model, data, ["features.3", "features.29"], k=9)  # a list: {layer: TopActivations}
    top.values[c], top.image_index[c], top.y[c], top.x[c]   # channel c's k strongest, strongest first
    r = project(model, images, "features.29", neurons=top.neurons())

Each image contributes at most one activation per channel: its spatial maximum (the first maximum
in row-major order), as in the paper's figures, whose nine patches per map come from nine images.

One pass: per batch ONE forward up to the deepest requested layer; every layer's per-channel
maxima are merged with its running top-k by stable sorts on the device, so memory is bounded by one
batch and nothing waits for the host until the end. Ties keep the earlier image (the smaller
dataset index); NaN is never ranked. The model itself is never called or changed: the forward runs
the traced graph's functional ops in eval semantics (BatchNorm's running statistics, no Dropout).

Scale-out, all with the same exact result:
- ``shard=(i, n)``: scan only the i-th of n contiguous parts of a tensor or map-style Dataset
  (SLURM array jobs), ``save_scan`` each, ``merge_scans`` the files: global image indices. Parts
  are whole batches where there are enough (see ``part``), so the forward rounds as in one scan.
- torch.distributed: with a process group initialized (torchrun), each rank scans its contiguous
  part of a tensor or map-style Dataset on its own device; the per-rank top-k are all-gathered and
  re-ranked with the same tie rule, and every rank returns what one process would.
- ``checkpoint=path``: the running state is written every ``checkpoint_every`` seconds (and when
  the scan fails); the same call again continues where it stopped.
"""
from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from . import batches
from .distributed import part, process_group, share
from .forward import LayerForward
from .progress import Progress

__all__ = ["TopActivations", "top_activations", "model_device", "save_scan", "load_scan", "merge_scans"]

#: The format tag of saved scans and checkpoints (bumped when their content changes).
SCAN_FORMAT = "deconvcuda.scan/1"
CHECKPOINT_FORMAT = "deconvcuda.scan.checkpoint/1"
_FIELDS = ("values", "image_index", "y", "x")
INF = float("inf")


@dataclass
class TopActivations:
    """Per channel of ``layer``, its k strongest activations over the data, strongest first.

    ``values`` [C, k] (the activations, in the data's dtype); ``image_index`` [C, k] (the image's
    position in the data, counting from 0 in the order the data yields images); ``y``, ``x`` [C, k]
    (the position in the layer's output map; 0 for a flat layer). Where the data holds fewer than k
    images, the missing entries have ``image_index == -1``, ``y == x == -1`` and value ``-inf``.
    NaN activations are never ranked. ``images_per_rank``: how many images each process of the scan
    read and ranked (one entry without torch.distributed; unreadable items not counted).
    """

    layer: str
    values: torch.Tensor
    image_index: torch.Tensor
    y: torch.Tensor
    x: torch.Tensor
    images_per_rank: Tuple[int, ...] = ()

    @property
    def k(self) -> int:
        return self.values.shape[1]

    def neurons(self, channel: Optional[int] = None) -> torch.Tensor:
        """The entries as ``project`` neurons rows ``[P, 4]`` of (image_index, channel, y, x): all
        channels' (channel-major, strongest first) or one channel's; missing entries left out. The
        image column indexes the data, so pass the data (or the images it names) to ``project``."""
        channels = torch.arange(self.values.shape[0], device=self.values.device)[:, None].expand_as(self.image_index)
        rows = torch.stack([self.image_index, channels, self.y, self.x], dim=-1)  # [C, k, 4]
        if channel is not None:
            rows = rows[channel:channel + 1]
        rows = rows.reshape(-1, 4)
        return rows[rows[:, 0] >= 0]

    def to(self, device) -> "TopActivations":
        """The same entries on ``device``."""
        return TopActivations(self.layer, *(getattr(self, name).to(device) for name in _FIELDS),
                              images_per_rank=self.images_per_rank)

    def state_dict(self) -> Dict[str, object]:
        """The entries as plain CPU tensors and the layer name (what ``save`` writes)."""
        state: Dict[str, object] = {"layer": self.layer, "images_per_rank": list(self.images_per_rank)}
        state.update({name: getattr(self, name).detach().cpu() for name in _FIELDS})
        return state

    @classmethod
    def from_state_dict(cls, state, caller: str = "TopActivations.from_state_dict") -> "TopActivations":
        if not isinstance(state, dict) or not isinstance(state.get("layer"), str) or any(
                not isinstance(state.get(name), torch.Tensor) for name in _FIELDS):
            raise ValueError(f"{caller}: expected a TopActivations state (a layer name and the tensors "
                             f"{', '.join(_FIELDS)}), got {type(state).__name__}")
        shapes = {tuple(state[name].shape) for name in _FIELDS}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise ValueError(f"{caller}: the tensors of layer {state['layer']!r} must all be [C, k], got shapes "
                             f"{[list(state[name].shape) for name in _FIELDS]}")
        return cls(state["layer"], *(state[name] for name in _FIELDS),
                   images_per_rank=tuple(int(n) for n in state.get("images_per_rank", ())))

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write these entries to ``path`` (``TopActivations.load`` or ``load_scan`` reads them back)."""
        save_scan(self, path)

    @classmethod
    def load(cls, path: Union[str, os.PathLike], map_location="cpu") -> "TopActivations":
        """Read a file ``save`` wrote (a single layer's scan)."""
        scan = load_scan(path, map_location=map_location)
        if not isinstance(scan, TopActivations):
            raise ValueError(f"TopActivations.load: {os.fspath(path)!r} holds a scan of {len(scan)} layers; "
                             "read it with deconvcuda.scan.load_scan")
        return scan

    def merge(self, other: "TopActivations") -> "TopActivations":
        """The top-k of the union of two scans of disjoint parts of one dataset (global indices)."""
        return merge_scans(self, other)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); the CPU for a model with neither."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------- #
# Ranking: the one tie rule, for merging batches, scans and ranks
# --------------------------------------------------------------------------------------------- #

def _rank(values, image_index, ys, xs, k: int, by_index: bool):
    """Keep each row's k best entries of [C, n] candidates: higher value first, then the smaller
    image index (``by_index``; without it the candidates must already be in index order, as the
    running top-k followed by a later batch is), missing entries (index -1) after every ranked one,
    a real -inf included. Stable sorts on the tensors' device: no host sync."""
    fields = (values, image_index, ys, xs)
    if by_index:
        order = torch.sort(image_index, dim=1, stable=True).indices
        fields = tuple(t.gather(1, order) for t in fields)
    order = torch.sort(fields[0], dim=1, descending=True, stable=True).indices
    fields = tuple(t.gather(1, order) for t in fields)
    # A second stable sort, by "missing", keeps the value order within each group.
    order = torch.sort((fields[1] < 0).to(torch.uint8), dim=1, stable=True).indices[:, :k]
    return tuple(t.gather(1, order) for t in fields)


def _missing(channels: int, k: int, dtype: torch.dtype, device) -> Tuple[torch.Tensor, ...]:
    """k missing entries per channel: value -inf, index -1, y = x = -1."""
    values = torch.full((channels, k), -INF, dtype=dtype, device=device)
    index = torch.full((channels, k), -1, dtype=torch.long, device=device)
    return values, index, index.clone(), index.clone()


def _image_maxima(output: torch.Tensor, sync_free: Optional[bool] = None):
    """Per channel and image: the strongest activation and where it is, each [C, B], and a bool
    [C, B] that is True where the map is NaN everywhere (nothing to rank). NaN counts as -inf, so
    it is never ranked; a map's first maximum in row-major order wins. ``sync_free``: never ask the
    device anything (default: everywhere but on the CPU)."""
    if output.dim() == 3:  # tokens [B, T, D]: each feature over the tokens, y = the token, x = 0
        output = output.transpose(1, 2).unsqueeze(3)
    if output.dim() == 2:  # flat [B, F]: the unit itself, at (0, 0)
        values = output.t()
        nan = torch.isnan(values)
        zeros = torch.zeros(values.shape, dtype=torch.long, device=values.device)
        return values.masked_fill(nan, -INF), zeros, zeros, nan
    width = output.shape[3]
    maps = output.flatten(2)  # [B, C, h*w]
    values, flat = maps.max(dim=2)  # NaN propagates: a map holding a NaN has NaN here
    nan_seen = torch.isnan(values)
    unranked = torch.zeros_like(nan_seen)
    # The maps holding a NaN need a second look with NaN as -inf. On the CPU only those maps get it
    # (asking whether there are any costs nothing there); on a GPU that question would wait for the
    # device, so every map gets it, branch-free, at the price of one more read of the output.
    if sync_free is None:
        sync_free = output.device.type != "cpu"
    if not sync_free:
        if bool(nan_seen.any()):
            rows = nan_seen.nonzero(as_tuple=True)
            picked = maps[rows]  # [n, h*w]
            clean = picked.masked_fill(torch.isnan(picked), -INF)
            values[rows], flat[rows] = clean.max(dim=1)
            unranked[rows] = torch.isnan(picked).all(dim=1)
    else:
        nan = torch.isnan(maps)
        clean_values, clean_flat = maps.masked_fill(nan, -INF).max(dim=2)
        values = torch.where(nan_seen, clean_values, values)
        flat = torch.where(nan_seen, clean_flat, flat)
        unranked = nan.all(dim=2)
    return values.t(), (flat // width).t(), (flat % width).t(), unranked.t()


class _Running:
    """One layer's running top-k on the scan's device."""

    def __init__(self, layer: str, k: int):
        self.layer, self.k = layer, k
        self.fields: Optional[Tuple[torch.Tensor, ...]] = None  # values, image_index, y, x: [C, k]

    def add(self, output: torch.Tensor, index: torch.Tensor) -> None:
        """Merge a batch's output [B, ...] whose images have the dataset indices ``index`` [B] (on the
        device, larger than every index merged before: ties keep the earlier image)."""
        values, ys, xs, unranked = _image_maxima(output)
        if self.fields is None:
            self.fields = _missing(values.shape[0], self.k, values.dtype, values.device)
        # A map that is NaN everywhere enters as a missing entry (index -1, y = x = -1, value -inf),
        # not as the NaN at (0, 0) under the value -inf.
        batch_index = index.expand_as(values).masked_fill(unranked, -1)
        ys, xs = ys.masked_fill(unranked, -1), xs.masked_fill(unranked, -1)
        self.fields = _rank(*(torch.cat(pair, dim=1) for pair in zip(self.fields, (values, batch_index, ys, xs))),
                            k=self.k, by_index=False)

    def result(self) -> TopActivations:
        return TopActivations(self.layer, *self.fields)


# --------------------------------------------------------------------------------------------- #
# Saving, loading and merging scans
# --------------------------------------------------------------------------------------------- #

Scan = Union[TopActivations, Dict[str, TopActivations]]


def save_scan(scan: Scan, path: Union[str, os.PathLike]) -> None:
    """Write a scan (one ``TopActivations`` or ``{layer: TopActivations}``) to ``path``, atomically
    (a crash leaves the old file or the new one, never half of one)."""
    if isinstance(scan, TopActivations):
        payload = {"format": SCAN_FORMAT, "single": True, "layers": [scan.state_dict()]}
    elif isinstance(scan, dict) and scan and all(isinstance(top, TopActivations) for top in scan.values()):
        payload = {"format": SCAN_FORMAT, "single": False, "layers": [top.state_dict() for top in scan.values()]}
    else:
        raise TypeError(f"save_scan: scan must be a TopActivations or a non-empty {{layer: TopActivations}}, got "
                        f"{type(scan).__name__}")
    _atomic_save(payload, path)


def load_scan(path: Union[str, os.PathLike], map_location="cpu") -> Scan:
    """Read a file written by ``save_scan`` (or ``TopActivations.save``): the same form back."""
    payload = _load(path, "load_scan", map_location)
    if not isinstance(payload, dict) or payload.get("format") != SCAN_FORMAT:
        raise ValueError(f"load_scan: {os.fspath(path)!r} is not a scan saved by deconvcuda.scan.save_scan "
                         f"(format {SCAN_FORMAT!r})")
    tops = [TopActivations.from_state_dict(state, "load_scan") for state in payload["layers"]]
    return tops[0] if payload["single"] else {top.layer: top for top in tops}


def merge_scans(*scans: Scan) -> Scan:
    """The scan of the union of scans of disjoint parts of one dataset, as one scan over all of it
    would have found it: per channel the k best entries of all, ties to the smaller image index.

    Each argument is a ``TopActivations``, a ``{layer: TopActivations}`` or a path to a saved scan;
    all of one form, with the same layers, channels and k, their image indices global (as ``shard=``
    scans have them). An image ranked in two of them is an error: the parts overlap."""
    caller = "merge_scans"
    if len(scans) == 1 and isinstance(scans[0], (list, tuple)):
        scans = tuple(scans[0])
    if not scans:
        raise ValueError(f"{caller}: no scans given; pass two or more TopActivations, dicts of them, or paths")
    scans = tuple(load_scan(scan) if isinstance(scan, (str, os.PathLike)) else scan for scan in scans)
    if all(isinstance(scan, TopActivations) for scan in scans):
        return _merge_layer(list(scans), caller)
    if not all(isinstance(scan, dict) for scan in scans):
        raise TypeError(f"{caller}: every scan must be of one form, all TopActivations or all {{layer: "
                        f"TopActivations}}, got {', '.join(type(scan).__name__ for scan in scans)}")
    layers = list(scans[0])
    for number, scan in enumerate(scans[1:], start=2):
        if list(scan) != layers:
            raise ValueError(f"{caller}: scan {number} has the layers {list(scan)}, the first {layers}; merge scans "
                             "of the same layers")
    return {layer: _merge_layer([scan[layer] for scan in scans], caller) for layer in layers}


def _merge_layer(tops: List[TopActivations], caller: str) -> TopActivations:
    first = tops[0]
    for number, top in enumerate(tops[1:], start=2):
        if top.layer != first.layer or top.values.shape != first.values.shape:
            raise ValueError(f"{caller}: scan {number} is of layer {top.layer!r} with [C, k] = "
                             f"{list(top.values.shape)}, the first of {first.layer!r} with {list(first.values.shape)}; "
                             "merge scans of the same layer, channels and k")
        if top.values.dtype != first.values.dtype:
            raise ValueError(f"{caller}: scan {number} has {top.values.dtype} values, the first {first.values.dtype}")
    device = first.values.device
    fields = [torch.cat([getattr(top, name).to(device) for top in tops], dim=1) for name in _FIELDS]
    ranked = fields[1].clamp_min(-1)
    present = ranked >= 0
    # An image ranked twice in one channel: the parts overlap (each image appears once per channel per scan).
    in_order = torch.sort(ranked.masked_fill(~present, -1), dim=1).values
    repeated = (in_order[:, 1:] == in_order[:, :-1]) & (in_order[:, 1:] >= 0)
    if bool(repeated.any()):
        channel, where = (int(v) for v in repeated.nonzero()[0])
        raise ValueError(f"{caller}: image {int(in_order[channel, where + 1])} is ranked in channel {channel} of "
                         f"more than one scan of {first.layer!r}: the scans overlap; merge scans of disjoint parts "
                         "(shard=(i, n) gives those)")
    return TopActivations(first.layer, *_rank(*fields, k=first.k, by_index=True),
                          images_per_rank=sum((top.images_per_rank for top in tops), ()))


def _atomic_save(payload, path) -> None:
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    temporary = f"{path}.tmp{os.getpid()}"
    torch.save(payload, temporary)
    os.replace(temporary, path)


def _load(path, caller: str, map_location="cpu"):
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{caller}: no file {path!r}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # pickle and zip errors of many types: a file that is not ours
        raise ValueError(f"{caller}: {path!r} cannot be read as a saved scan ({type(error).__name__}: {error})") \
            from None


# --------------------------------------------------------------------------------------------- #
# Checkpoints
# --------------------------------------------------------------------------------------------- #

def _model_fingerprint(model: nn.Module) -> str:
    """A digest of the model's class, parameter and buffer names, shapes, dtypes, and two sums of
    each (float64 accumulation, no copy): a different model or other weights change it."""
    digest = hashlib.sha256(type(model).__qualname__.encode())
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            summary = f"{name}:{tuple(tensor.shape)}:{tensor.dtype}"
            if tensor.is_floating_point() and tensor.numel():
                summary += f":{tensor.sum(dtype=torch.float64).item():.17g}:{tensor.abs().sum(dtype=torch.float64).item():.17g}"
            elif tensor.numel():
                summary += f":{int(tensor.sum())}"
            digest.update(summary.encode())
    return digest.hexdigest()[:32]


def _data_fingerprint(source: batches.DataSource) -> str:
    data = source.data
    description = f"{source.kind}:{type(data).__qualname__}:{source.count}"
    if isinstance(data, torch.Tensor):
        description += f":{list(data.shape)}:{data.dtype}:{data.sum(dtype=torch.float64).item():.17g}"
    files = getattr(data, "files", None)  # deconvcuda.data.ImageFolder: the file names, in order
    if isinstance(files, (list, tuple)):
        description += ":" + hashlib.sha256("\n".join(map(str, files)).encode()).hexdigest()
    return hashlib.sha256(description.encode()).hexdigest()[:32]


def checkpoint_path(path: Union[str, os.PathLike], rank: int, world: int) -> str:
    """The file of one rank's checkpoint: ``path`` itself in one process, else ``path.rank<r>-of-<w>``."""
    path = os.fspath(path)
    return path if world == 1 else f"{path}.rank{rank}-of-{world}"


class _Checkpoint:
    """Writes the scan's state every ``every`` seconds; reads it back when the same scan starts again."""

    def __init__(self, path, every: float, arguments: Dict[str, object], caller: str):
        self.path, self.every, self.arguments, self.caller = path, every, arguments, caller
        self.last = time.monotonic()

    def load(self):
        """The saved state, or None where there is no checkpoint yet; an error for another scan's."""
        if not os.path.exists(self.path):
            return None
        state = _load(self.path, self.caller)
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{self.caller}: checkpoint {self.path!r} is not a scan checkpoint (format "
                             f"{CHECKPOINT_FORMAT!r}); pass another path or delete the file")
        theirs = state["arguments"]
        different = [key for key in sorted(set(theirs) | set(self.arguments)) if theirs.get(key) != self.arguments.get(key)]
        if different:
            shown = "; ".join(f"{key}: {theirs.get(key)!r} there, {self.arguments.get(key)!r} now" for key in different)
            raise ValueError(f"{self.caller}: checkpoint {self.path!r} belongs to a scan with other arguments "
                             f"({shown}); it is never mixed into this one: pass another checkpoint path, or delete "
                             "the file to start over")
        return state

    def due(self) -> bool:
        return time.monotonic() - self.last >= self.every

    def save(self, position: int, scanned: int, input_info, running: Dict[str, _Running], complete: bool) -> None:
        tops = [running[layer].result().state_dict() for layer in running if running[layer].fields is not None]
        _atomic_save({"format": CHECKPOINT_FORMAT, "arguments": self.arguments, "position": position,
                      "scanned": scanned, "input": input_info, "tops": tops, "complete": complete}, self.path)
        self.last = time.monotonic()


# --------------------------------------------------------------------------------------------- #
# top_activations
# --------------------------------------------------------------------------------------------- #

def _layer_names(layer, layers, caller: str) -> Tuple[List[str], bool]:
    """The requested layers (duplicates dropped, order kept) and whether a single name was given."""
    if layer is not None and layers is not None:
        raise TypeError(f"{caller}: pass the layers once, as layer= or as layers=, not both")
    if layer is None:
        layer = layers
    if layer is None:
        raise TypeError(f"{caller}: missing the layer: a name from model.named_modules() or a list of names")
    if isinstance(layer, str):
        return [layer], True
    if isinstance(layer, nn.Module):
        raise TypeError(f"{caller}: layer must be a name from model.named_modules() (or a list of names), got a "
                        f"{type(layer).__name__} module")
    try:
        names = list(layer)
    except TypeError:
        raise TypeError(f"{caller}: layer must be a name from model.named_modules() or a list of names, got "
                        f"{type(layer).__name__}") from None
    if not names:
        raise ValueError(f"{caller}: the list of layers is empty; name at least one layer from "
                         "model.named_modules()")
    bad = [name for name in names if not isinstance(name, str)]
    if bad:
        raise TypeError(f"{caller}: every layer in the list must be a name from model.named_modules(), got "
                        f"{type(bad[0]).__name__} {bad[0]!r}")
    return list(dict.fromkeys(names)), False


def _check_shard(shard, caller: str) -> Tuple[int, int]:
    if shard is None:
        return 0, 1
    if (not isinstance(shard, (tuple, list)) or len(shard) != 2
            or any(isinstance(v, bool) or not isinstance(v, int) for v in shard)
            or shard[1] < 1 or not 0 <= shard[0] < shard[1]):
        raise ValueError(f"{caller}: shard must be (index, count) with 0 <= index < count, e.g. (3, 10) for the "
                         f"fourth of ten parts, got {shard!r}")
    return int(shard[0]), int(shard[1])


def top_activations(model: nn.Module, data, layer=None, k: int = 9, *, layers=None, batch_size: int = 64,
                    device=None, progress: bool = True, num_workers: Optional[int] = None,
                    shard: Optional[Tuple[int, int]] = None, checkpoint: Union[None, str, os.PathLike] = None,
                    checkpoint_every: float = 300.0) -> Scan:
    """The ``k`` strongest activations of every feature map of ``layer`` over ``data``.

    layer: a name from ``model.named_modules()`` ("" is the model's output): returns a
    :class:`TopActivations`; or a list of names: ONE pass over the data (one forward per batch up to
    the deepest of them) that returns ``{layer: TopActivations}`` in the order given.
    data: a tensor ``[N, C, H, W]`` of model input, a map-style Dataset (items: an image ``[C, H, W]``
    or an ``(image, label)`` pair; e.g. :class:`deconvcuda.data.ImageFolder`), a list of tensors
    (batches or single images), or an iterable of batches such as a DataLoader (batches of images,
    or (images, labels) pairs).
    batch_size: images per forward pass where ``data`` is a tensor, a Dataset or yields single images.
    device: where the forward runs (default: the model's device); batches are moved there.
    progress: progress on stderr (images, images per second, time left; rank 0 only): a tqdm bar in a
    terminal, plain lines in a log file (:mod:`deconvcuda.progress`).
    num_workers: processes reading a Dataset (default: several for one that reads files from a
    ``root`` folder, such as ``deconvcuda.data.ImageFolder``; none for others).
    shard: ``(i, n)``: scan only the i-th of n contiguous parts of a tensor or Dataset, with global
    image indices (``merge_scans`` joins the parts).
    checkpoint: a file for the scan's state, written every ``checkpoint_every`` seconds and when the
    scan fails; calling again with the same arguments continues from it, and a finished scan's file
    returns its result at once. A checkpoint of another scan is an error.

    With torch.distributed initialized and ``data`` a tensor or map-style Dataset, each rank scans
    its part (of the shard) on its own device and every rank returns the merged result, which is
    what one process returns. Other data is scanned whole by every rank.
    """
    caller = "top_activations"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller}: model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"{caller}: k must be a positive int, got {k!r}")
    batches._check_batch_size(batch_size, caller)
    if num_workers is not None and (isinstance(num_workers, bool) or not isinstance(num_workers, int)
                                    or num_workers < 0):
        raise ValueError(f"{caller}: num_workers must be a non-negative int or None, got {num_workers!r}")
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, (int, float)) \
            or not checkpoint_every >= 0:
        raise ValueError(f"{caller}: checkpoint_every must be a number of seconds >= 0, got {checkpoint_every!r}")
    names, single = _layer_names(layer, layers, caller)
    shard_index, shard_count = _check_shard(shard, caller)
    graph = LayerForward(model, names, caller)  # the traced graph, or hooks where fx cannot trace
    source = batches.data_source(data, caller)
    if shard is not None and source.kind == "stream":
        raise ValueError(f"{caller}: shard= needs data that can be read in parts, a tensor or a map-style Dataset; "
                         f"got {type(data).__name__} (pass the DataLoader's dataset instead)")
    device = model_device(model) if device is None else torch.device(device)
    process_rank, process_world = process_group()
    rank, world = process_rank, process_world  # who shares the data: none where it is a stream
    if source.kind == "stream":  # read in order from the start: every rank scans it all
        rank, world = 0, 1
    start, stop = 0, source.count
    if source.count is not None and source.kind != "stream":
        shard_start, shard_stop = part(0, source.count, shard_index, shard_count, batch_size)
        start, stop = part(shard_start, shard_stop, rank, world, batch_size)

    job = _ScanJob(graph=graph, names=names, k=k, source=source, start=start, stop=stop, batch_size=batch_size,
                   device=device, num_workers=num_workers, progress=progress and process_rank == 0, caller=caller)
    saver = None
    if checkpoint is not None:  # each process writes its own file, named by its rank in the process group
        arguments = {"layers": names, "k": k, "model": _model_fingerprint(model), "data": _data_fingerprint(source),
                     "part": [start, stop], "shard": None if shard is None else list(shard),
                     "world_size": process_world}
        saver = _Checkpoint(checkpoint_path(checkpoint, process_rank, process_world), float(checkpoint_every),
                            arguments, caller)
    if world == 1:
        outcome = _scan(job, saver)
    else:  # every rank scans its part; a failure on one rank is raised on every rank
        reports = share(lambda: _scan(job, saver).portable(), caller, world=world)
        outcome = _Outcome.merged(reports, names, k, caller, device)
    if outcome.scanned == 0 and outcome.tops is None:
        raise ValueError(f"{caller}: data holds no images" + ("" if source.count is None or source.count == 0
                                                               else " that could be read"))
    per_rank = outcome.per_rank or (outcome.scanned,)
    tops = {name: TopActivations(name, *(getattr(outcome.tops[name], field).to(device) for field in _FIELDS),
                                 images_per_rank=per_rank) for name in names}
    return tops[names[0]] if single else tops


@dataclass
class _Outcome:
    """One process's scan: the top-k per layer (None where it read no image), how many images it
    scanned, and the input's per-image shape and dtype."""

    tops: Optional[Dict[str, TopActivations]]
    scanned: int
    input_info: Optional[Tuple[Tuple[int, ...], str]]
    per_rank: Tuple[int, ...] = ()

    def portable(self) -> dict:
        """As plain CPU objects, for all_gather_object."""
        return {"tops": None if self.tops is None else {name: top.state_dict() for name, top in self.tops.items()},
                "scanned": self.scanned, "input": self.input_info}

    @classmethod
    def merged(cls, reports: List[dict], names: List[str], k: int, caller: str, device) -> "_Outcome":
        with_images = [(rank, report) for rank, report in enumerate(reports) if report["tops"] is not None]
        infos = {(tuple(report["input"][0]), report["input"][1]) for _, report in with_images}
        if len(infos) > 1:
            shown = "; ".join(f"rank {rank}: {list(report['input'][0])} {report['input'][1]}"
                              for rank, report in with_images)
            raise ValueError(f"{caller}: every image must have the shape and dtype of the first, but the ranks read "
                             f"different ones ({shown}); resize the images to one size")
        per_rank = tuple(report["scanned"] for report in reports)
        if not with_images:
            return cls(None, sum(per_rank), None, per_rank)
        tops = {}
        for name in names:
            parts = [TopActivations.from_state_dict(report["tops"][name], caller).to(device) for _, report in with_images]
            tops[name] = parts[0] if len(parts) == 1 else _merge_layer(parts, caller)
        return cls(tops, sum(per_rank), with_images[0][1]["input"], per_rank)


@dataclass
class _ScanJob:
    """What one process scans: the traced ``graph`` of the layers ``names``, the top ``k`` per channel,
    images ``[start, stop)`` of ``source`` (``stop`` None: to its end) in batches of ``batch_size``
    read by ``num_workers`` processes, the forward on ``device``; ``progress`` shown or not."""

    graph: object
    names: List[str]
    k: int
    source: batches.DataSource
    start: int
    stop: Optional[int]
    batch_size: int
    device: torch.device
    num_workers: Optional[int]
    progress: bool
    caller: str


def _scan(job: _ScanJob, saver: Optional["_Checkpoint"]) -> _Outcome:
    """The job's part of the data, one forward per batch for all its layers (``graph.run``), every
    layer's per-image maxima merged into its running top-k; from and into ``saver``'s checkpoint
    where there is one."""
    graph, names, k, caller, start, stop = job.graph, job.names, job.k, job.caller, job.start, job.stop
    running = {name: _Running(name, k) for name in names}
    position, scanned, input_info = start, 0, None
    if saver is not None:
        state = saver.load()
        if state is not None:
            position, scanned = int(state["position"]), int(state["scanned"])
            input_info = None if state["input"] is None else (tuple(state["input"][0]), state["input"][1])
            for saved in state["tops"]:
                top = TopActivations.from_state_dict(saved, caller).to(job.device)
                running[top.layer].fields = tuple(getattr(top, name) for name in _FIELDS)
            if state["complete"]:
                return _Outcome(_results(running), scanned, input_info)

    total = None if stop is None else stop - start
    done_before = position - start
    bar = Progress(total, f"top-{k} {_describe(names)}", "image", enabled=job.progress, initial=done_before, rate=True)
    pin = job.device.type == "cuda"
    first_shape = None if input_info is None else input_info[0]
    try:
        with bar, torch.inference_mode(False), torch.no_grad():  # the bar closes on errors too
            for batch in job.source.batches(position, stop, job.batch_size, num_workers=job.num_workers,
                                            pin_memory=pin):
                images = batch.images
                if images is not None:
                    if not images.is_floating_point():
                        raise TypeError(f"{caller}: images must be floating point (the model's input), got "
                                        f"{images.dtype}")
                    if first_shape is None:
                        first_shape = tuple(images.shape[1:])
                        graph.shapes(first_shape, caller=caller)  # a clear error where the images do not fit
                        input_info = (first_shape, str(images.dtype).replace("torch.", ""))
                    elif tuple(images.shape[1:]) != first_shape or (
                            input_info[1] != str(images.dtype).replace("torch.", "")):
                        raise ValueError(f"{caller}: every image must have the shape of the first, "
                                         f"{list(first_shape)} ({input_info[1]}); the batch starting at image "
                                         f"{int(batch.index[0])} has {list(images.shape[1:])} "
                                         f"({str(images.dtype).replace('torch.', '')}): resize them to one size")
                    images = images.to(job.device, non_blocking=True)
                    index = batch.index.to(job.device, non_blocking=True)
                    outputs = graph.run(images)
                    for name in names:
                        running[name].add(outputs[name], index)
                    del outputs
                    scanned += images.shape[0]
                bar.update(batch.end - position)
                position = batch.end
                if saver is not None and saver.due():
                    saver.save(position, scanned, input_info, running, complete=False)
    except BaseException:
        if saver is not None:  # keep what was done: the same call continues from here
            saver.save(position, scanned, input_info, running, complete=False)
        raise
    if saver is not None:
        saver.save(position, scanned, input_info, running, complete=True)
    return _Outcome(_results(running), scanned, input_info)


def _results(running: Dict[str, _Running]) -> Optional[Dict[str, TopActivations]]:
    if any(layer.fields is None for layer in running.values()):
        return None
    return {name: layer.result() for name, layer in running.items()}


def _describe(names: Sequence[str]) -> str:
    return names[0] if len(names) == 1 else f"{len(names)} layers"
