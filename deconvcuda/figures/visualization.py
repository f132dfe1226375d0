"""``visualize``: the paper's figure (Zeiler & Fergus 2014, Fig. 2) for whole layers: for each feature
map, its k strongest activations over a dataset projected to pixel space, beside the image patches
they came from.

    run = deconvcuda.visualize(model, images, ["features.22", "features.29"], rule=["deconvnet", "guided"],
                               image_names=names, out="out")
    print(run.index)          # out/index.html: every layer and channel, with captions

``visualize`` runs in stages, each a function of its own:

1. validation: the arguments checked and completed into a :class:`_Request`;
2. scan: one streaming top-k pass over the data for all layers (``_scan_layers``);
3. planning: per layer, which channels are drawn and which activations each shows, cut into chunks
   of channels, each layer's first chunk first (``_plan``);
   with ``synthesize``: the image ``deconvcuda.synthesize`` makes for each drawn channel, each
   layer's channels in batches, the batches shared by the ranks (``_synthesize_layers``);
4. projections, shared by the ranks of a torch.distributed run: rounds of one chunk per rank, each
   ``project(..., neurons=..., rule=...)`` per rule on just the images those activations came from,
   gathered by index from the data, each projection and image patch cropped to the activation's
   receptive field (``_project_rounds``, ``_project_chunk``); a failure on one rank is raised on every
   rank (:func:`deconvcuda.distributed.share`);
5. drawing, by rank 0: per channel one PNG, the projections of each rule side by side, then the image
   patches with the projection's support outlined, then the optimized image where there is one
   (``_draw_chunk``); per layer an overview PNG (``_draw_overview``);
6. HTML: ``index.html`` and the manifest of what was written, by rank 0, whose result (or error)
   every rank returns (``_write_gallery``).

Only activations > 0 are drawn: a channel with fewer than k images that activate it shows those it
has and says so, and channels that never fire on the data are listed as "silent in these images".
"""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from .. import rules as reverse_rules
from ..describe import describe
from ..distributed import process_group, share
from ..progress import Progress, duration, is_terminal
from ..synthesis import optimize
from . import gallery, render
from .records import ChannelFigure, LayerFigures, Visualization

if TYPE_CHECKING:
    from ..receptive_field import ReceptiveField

__all__ = ["visualize", "DEFAULT_CHANNELS"]

#: How many channels per layer ``visualize`` and ``deconvcuda visualize`` draw unless told otherwise:
#: the first that fire on the data (``channels="all"`` or ``max_channels=None`` draws every one).
DEFAULT_CHANNELS = 16
#: The most projections one ``project`` call makes, and the most images it reads: its forward keeps
#: what the reverse needs of each image, and each projection is a full-size image until it is
#: cropped, so the two bound a call's memory whatever the size of the data (about 250 MB on AlexNet,
#: timing of the kernels' candidates included). The channels are cut into chunks that keep within both.
PROJECTIONS_PER_CALL, IMAGES_PER_CALL = 96, 32
#: Channels of each layer projected first, before any layer's others: their times estimate the run.
PROBE_CHANNELS = 2
#: A run whose projections are estimated to take longer than this (seconds) says so when it starts.
LONG_RUN_SECONDS = 60.0
#: The options of ``deconvcuda.synthesize`` that ``visualize(synthesize={...})`` passes on, and the
#: title of the optimized image's panel in a channel's figure.
SYNTHESIS_OPTIONS = ("size", "steps", "seed", "objective", "regularizers", "lr")
OPTIMIZED_TITLE = "optimized image"

DataName = Union[None, str, Callable[[int], str]]


def visualize(model: nn.Module, data, layers: Union[str, Sequence[str]], *,
              channels: Union[None, str, int, Iterable[int], Mapping] = None,
              max_channels: Optional[int] = DEFAULT_CHANNELS, k: int = 9,
              rule: Union[str, Sequence[str]] = "deconvnet", contrast: str = "robust",
              out: Union[str, os.PathLike] = "out", image_names: Optional[Sequence[str]] = None,
              preprocessing=None, batch_size: int = 32, device=None, seed: str = "value",
              lrn: str = "gradient", backend: str = "auto", strict: bool = False,
              synthesize: Union[bool, Mapping[str, object]] = False, progress: bool = True,
              model_name: Optional[str] = None, weights: Optional[str] = None, data_name: DataName = None,
              sections: Sequence[gallery.Section] = ()) -> Visualization:
    """Write the paper's figure for each of ``layers`` and channel to ``out/``, and ``out/index.html``.

    model: in eval mode or not (it is left as it was). data: what ``top_activations`` streams (a
    tensor ``[N, C, H, W]`` of model input, a map-style Dataset such as
    :class:`deconvcuda.data.ImageFolder`, a list of batches, or a DataLoader), in a fixed order; the
    images of the activations drawn are read from it again by index, so a Dataset is never held in
    memory.
    channels: None (the default: the first ``max_channels`` channels that fire, DEFAULT_CHANNELS = 16),
    "all" (every channel that fires), an int, a list, or ``{layer: list}`` (exactly those; layers not
    in the mapping get the default). Channels with no activation > 0 in the data are never drawn: each
    layer lists them as silent. k: activations per channel (9 in the paper).
    rule: "deconvnet" (the paper's), "guided", "gradient", or a list of them, drawn side by side.
    contrast: "robust" (per projection, its colour cast removed, the 99.5th percentile of |value| at
    black and white) or "max" (the paper's linear scaling to the maximum, the values as they are).
    out: the folder; what the previous run wrote there is removed first.
    image_names: one name per image of ``data``, for the captions (default: ``data.names`` where
    there is one). preprocessing: a ``deconvcuda.models.Preprocessing`` that turns model input back into
    pixels (default ``model.preprocessing`` where the model has one, else each patch is stretched to
    its own range). device: where the work runs, default the model's device (the model must be there).
    seed, lrn, backend, strict: as for ``deconvcuda.project``.
    synthesize: True puts beside each channel's grids its optimized image, the image
    ``deconvcuda.synthesize`` makes to drive the channel up (each layer's drawn channels in batches of
    ``batch_size``, on ``device``, the pixels mapped by ``preprocessing``, at the side of the data's
    images, synthesize's defaults otherwise); a dict of synthesize's options (``size``, ``steps``,
    ``seed``, ``objective``, ``regularizers``, ``lr``) does so with them. Each optimized image is also
    written alone, at its size, as ``<layer>/optimized_<channel>.png``. False (the default) draws the
    figures without it.
    progress: progress and a time estimate on stderr.
    model_name, weights, data_name: what the page's header says about the model, where its weights
    came from (e.g. "random weights" or a file) and the data (a str, or a function of the number of
    images the scan read that returns one). sections: extra :class:`Section` s (pages of other
    analyses) for index.html.

    Under torch.distributed every rank scans its part of the data and projects its share of the
    channels; rank 0 alone draws and writes, and every rank returns the same :class:`Visualization`.

    Returns a :class:`Visualization` (out folder, index path, per-layer records with every figure).
    """
    request = _Request(model=model, data=data, layers=layers, channels=channels, max_channels=max_channels, k=k,
                       rules=rule, contrast=contrast, out=out, image_names=image_names, preprocessing=preprocessing,
                       batch_size=batch_size, device=device, seed=seed, lrn=lrn, backend=backend, strict=strict,
                       synthesize=synthesize, progress=progress,
                       model_name=model_name, weights=weights, data_name=data_name, sections=sections)
    if request.rank == 0:
        gallery.prepare_output(request.out)
    tops, scan_seconds = _scan_layers(request)
    work, chunks, sample = _plan(request, tops, scan_seconds)
    optimized = _synthesize_layers(request, work, sample) if request.synthesis is not None else {}
    drawing_error = _project_rounds(request, chunks, optimized)
    return _write_gallery(request, work, tops, drawing_error)


# --------------------------------------------------------------------------------------------- #
# 1. Validation
# --------------------------------------------------------------------------------------------- #

@dataclass
class _Request:
    """``visualize``'s arguments, checked and completed when made: ``layers`` and ``rules`` as lists,
    ``out`` a Path, ``device`` the model's where None, ``preprocessing`` and ``image_names`` from the
    model and the data where None, ``progress`` only on rank 0 of a torch.distributed run; ``synthesis``
    the options ``synthesize`` asks to pass to ``deconvcuda.synthesize`` (None: no optimized images)."""

    model: nn.Module
    data: object
    layers: List[str]
    channels: object
    max_channels: Optional[int]
    k: int
    rules: List[str]
    contrast: str
    out: Path
    image_names: Optional[Sequence[str]]
    preprocessing: object
    batch_size: int
    device: torch.device
    seed: str
    lrn: str
    backend: str
    strict: bool
    synthesize: object
    progress: bool
    model_name: Optional[str]
    weights: Optional[str]
    data_name: DataName
    sections: Sequence[gallery.Section]
    rank: int = 0
    world: int = 1
    synthesis: Optional[Dict[str, object]] = None

    def __post_init__(self):
        from ..scan import model_device

        if not isinstance(self.model, nn.Module):
            raise TypeError(f"visualize: model must be a torch.nn.Module, got {type(self.model).__name__}")
        self.layers = _layer_list(self.model, self.layers)
        self.rules = _rule_list(self.rules)
        render.check_contrast(self.contrast, "visualize")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"visualize: k must be a positive int, got {self.k!r}")
        _check_channel_options(self.channels, self.max_channels)
        self.synthesis = _synthesis_options(self.synthesize)
        if self.preprocessing is None:
            self.preprocessing = getattr(self.model, "preprocessing", None)
        on = model_device(self.model)
        self.device = on if self.device is None else torch.device(self.device)
        if self.device != on and not (self.device.type == on.type and self.device.index is None):
            raise ValueError(f"visualize: the model is on {on} but device is {self.device}; "
                             f"move it first with model.to({str(self.device)!r})")
        self.rank, self.world = process_group()
        self.progress = self.progress and self.rank == 0
        if self.image_names is None:
            self.image_names = getattr(self.data, "names", None)  # deconvcuda.data.ImageFolder's file names
        self.out = Path(self.out)

    @property
    def channel_order(self) -> str:
        return getattr(self.preprocessing, "channel_order", "RGB")


def _layer_list(model: nn.Module, layers) -> List[str]:
    if isinstance(layers, str):
        layers = [layers]
    try:
        layers = list(layers)
    except TypeError:
        raise TypeError(f"visualize: layers must be a layer name or a list of them, got {type(layers).__name__}") from None
    if not layers:
        raise ValueError("visualize: layers is empty; name at least one layer from model.named_modules()")
    names = dict(model.named_modules())
    for layer in layers:
        if not isinstance(layer, str) or layer not in names:
            valid = [name for name in names if name]
            shown = ", ".join(valid[:40]) + (f", ... ({len(valid)} in all)" if len(valid) > 40 else "")
            raise ValueError(f"visualize: unknown layer {layer!r}; the model's layers are: {shown}")
    return layers


def _rule_list(rule) -> List[str]:
    rules = [rule] if isinstance(rule, str) else list(rule)
    if not rules:
        raise ValueError("visualize: rule is empty; name at least one of " + ", ".join(reverse_rules.names()))
    for name in rules:
        if name not in reverse_rules.RULES:
            raise ValueError(f"visualize: unknown rule {name!r}; expected one or more of "
                             f"{', '.join(reverse_rules.names())}")
    return list(dict.fromkeys(rules))


def _check_channel_options(channels, max_channels) -> None:
    if max_channels is not None and (isinstance(max_channels, bool) or not isinstance(max_channels, int)
                                     or max_channels < 1):
        raise ValueError(f"visualize: max_channels must be a positive int or None (every channel), got {max_channels!r}")
    if isinstance(channels, str) and channels != "all":
        raise ValueError(f"visualize: channels must be None, 'all', an int, a list of ints or {{layer: list}}, "
                         f"got {channels!r}")


def _synthesis_options(synthesize) -> Optional[Dict[str, object]]:
    """``synthesize`` as the options to pass to ``deconvcuda.synthesize`` (None for no optimized
    images), checked now, before the scan, with synthesize's own checks."""
    if synthesize is False:
        return None
    if synthesize is True:
        return {}
    if not isinstance(synthesize, Mapping):
        raise TypeError(f"visualize: synthesize must be True, False or a dict of deconvcuda.synthesize's options "
                        f"({', '.join(SYNTHESIS_OPTIONS)}), got {type(synthesize).__name__}")
    unknown = [key for key in synthesize if key not in SYNTHESIS_OPTIONS]
    if unknown:
        raise ValueError(f"visualize: synthesize has the unknown option {unknown[0]!r}; its options are "
                         f"{', '.join(SYNTHESIS_OPTIONS)} (the model, layer, channels, preprocessing and device are "
                         f"visualize's)")
    optimize.check_options("visualize: synthesize", **synthesize)
    return dict(synthesize)


def _requested_channels(channels, layer: str, num_channels: int) -> Optional[List[int]]:
    """The channels asked for by number, in order; None where ``channels`` leaves it to the default
    (None, "all", or a mapping without this layer)."""
    if isinstance(channels, Mapping):
        channels = channels.get(layer)
    if channels is None or (isinstance(channels, str) and channels == "all"):
        return None
    if isinstance(channels, int):
        channels = [channels]
    chosen = []
    for channel in channels:
        if isinstance(channel, bool) or not isinstance(channel, (int, np.integer)):
            raise TypeError(f"visualize: channels must be ints, got {channel!r}")
        if not 0 <= channel < num_channels:
            raise ValueError(f"visualize: channel {channel} is out of range for layer {layer!r}, which has "
                             f"{num_channels} channels (0..{num_channels - 1})")
        if int(channel) not in chosen:
            chosen.append(int(channel))
    return chosen


# --------------------------------------------------------------------------------------------- #
# 2. The scan
# --------------------------------------------------------------------------------------------- #

def _scan_layers(request: _Request):
    """``{layer: TopActivations}`` from one pass over the data, and its seconds. In a terminal the
    scan shows its own bar; in a log file one line says what it did."""
    from ..scan import top_activations

    terminal = is_terminal()
    started = time.perf_counter()
    tops = top_activations(request.model, request.data, list(request.layers), k=request.k,
                           batch_size=request.batch_size, device=request.device,
                           progress=request.progress and terminal)
    seconds = time.perf_counter() - started
    if request.progress and not terminal:
        count = _images_scanned(tops)
        layers = len(request.layers)
        print(f"top-{request.k} of {layers} layer{'s' * (layers > 1)} over {count} images: {duration(seconds)}",
              file=sys.stderr, flush=True)
    return tops, seconds


def _images_scanned(tops) -> int:
    """How many images the scan read and ranked, over every rank."""
    return sum(next(iter(tops.values())).images_per_rank)


# --------------------------------------------------------------------------------------------- #
# 3. Planning
# --------------------------------------------------------------------------------------------- #

@dataclass
class _LayerWork:
    """One layer's record, its top-k (on the CPU) and the (channel, rank) pairs to draw: the
    activations > 0 of the channels drawn, strongest first."""

    record: LayerFigures
    values: torch.Tensor
    image_index: torch.Tensor
    ys: torch.Tensor
    xs: torch.Tensor
    drawn: List[Tuple[int, int]]
    field: Optional[ReceptiveField] = None  # for the data's images; None where the scan ranked none

    def chunks(self, per_call: int) -> List["_Chunk"]:
        """The layer's channels cut for ``project`` calls: the first PROBE_CHANNELS channels (whose
        time estimates the layer's), then as many as keep within ``per_call`` channels and
        IMAGES_PER_CALL images; at least one channel each."""
        chunks: List[_Chunk] = []
        current: List[int] = []
        for channel in self.record.channels:
            wider = current + [channel]
            images = {int(self.image_index[c, r]) for c, r in self.drawn if c in wider}
            full = len(wider) > (min(PROBE_CHANNELS, per_call) if not chunks else per_call) or \
                len(images) > IMAGES_PER_CALL
            if current and full:
                chunks.append(self._chunk(current))
                wider = [channel]
            current = wider
        if current:
            chunks.append(self._chunk(current))
        return chunks

    def _chunk(self, channels: List[int]) -> "_Chunk":
        members = set(channels)
        return _Chunk(self, channels, [(c, r) for c, r in self.drawn if c in members])


@dataclass
class _Chunk:
    """Channels of one layer projected in one ``project`` call per rule, and their (channel, rank) pairs."""

    work: _LayerWork
    channels: List[int]
    pairs: List[Tuple[int, int]]


def _plan(request: _Request, tops,
          scan_seconds: float) -> Tuple[List[_LayerWork], List[_Chunk], Optional[torch.Tensor]]:
    """Each layer's work, every chunk in the order they run (each layer's first chunk comes first, so
    that their times estimate the whole run before most of it starts), and an image of the data (None
    where the scan ranked none)."""
    from .. import batches

    from ..forward import LayerForward

    ranked = [int(i) for top in tops.values() for i in top.image_index.flatten().tolist() if int(i) >= 0][:1]
    sample = batches.gather_images(request.data, ranked, request.batch_size)[0] if ranked else None
    shapes = LayerForward(request.model, request.layers, "visualize").shapes(tuple(sample.shape)) \
        if sample is not None else {}
    work = [_plan_layer(request, layer, tops[layer], scan_seconds, sample, shapes.get(layer))
            for layer in request.layers]
    per_layer = [item.chunks(max(1, PROJECTIONS_PER_CALL // request.k)) for item in work]
    chunks = [chunks[0] for chunks in per_layer if chunks] + [chunk for chunks in per_layer for chunk in chunks[1:]]
    return work, chunks, sample


def _plan_layer(request: _Request, layer: str, scan, scan_seconds: float, sample: Optional[torch.Tensor],
                output_shape) -> _LayerWork:
    """Which channels of ``layer`` are drawn, which are silent, and which activations (> 0) each shows;
    its receptive field for ``sample``, an image of the data, whose per-image output is ``output_shape``
    (both None where the scan ranked none)."""
    from ..receptive_field import receptive_field

    values, image_index = scan.values.detach().cpu(), scan.image_index.detach().cpu()
    ys, xs = scan.y.detach().cpu(), scan.x.detach().cpu()
    num_channels = values.shape[0]
    fires = (values > 0) & (image_index >= 0)                   # [C, k]: NaN and missing entries are False
    silent = [c for c in range(num_channels) if not bool(fires[c, 0])]
    requested = _requested_channels(request.channels, layer, num_channels)
    if requested is None:
        drawn = [c for c in range(num_channels) if bool(fires[c, 0])]
        if request.max_channels is not None and not (isinstance(request.channels, str) and request.channels == "all"):
            drawn = drawn[:request.max_channels]
    else:
        drawn = [c for c in requested if bool(fires[c, 0])]
    # the scan is shared by the layers: each shows its whole time
    record = LayerFigures(layer, num_channels, drawn, (0, 0), None, silent=silent,
                          seconds={"top_activations": scan_seconds, "project": 0.0, "draw": 0.0})
    field_ = None
    if sample is not None:
        field_ = receptive_field(request.model, layer, input_size=tuple(sample.shape[-2:]))
        record.receptive_field, record.stride = tuple(field_.size), tuple(field_.stride)
        record.map_size = tuple(output_shape[1:])
        description = describe(request.model, layer, tuple(sample.shape), rule=request.rules[0])
        record.gradient_ops, record.fallback = description.gradient_ops(), description.fallback
    pairs = [(c, r) for c in drawn for r in range(values.shape[1]) if bool(fires[c, r])]
    return _LayerWork(record, values, image_index, ys, xs, pairs, field_)


# --------------------------------------------------------------------------------------------- #
# 3b. Optimized images (synthesize=), shared by the ranks
# --------------------------------------------------------------------------------------------- #

@dataclass
class _Optimized:
    """One layer's optimized images on the CPU: ``images`` [n, 3, s, s] RGB in [0, 1], one per channel
    of ``channels``; ``values``: the objective each reaches; ``seconds``: the layer's time."""

    channels: List[int]
    images: torch.Tensor
    values: torch.Tensor
    seconds: float


def _synthesis_settings(request: _Request):
    """``(size, steps, seed, objective, lr, plan)`` of the optimized images (``optimize.check_options``)."""
    return optimize.check_options("visualize: synthesize", **request.synthesis)


def _synthesize_layers(request: _Request, work: List[_LayerWork],
                       sample: Optional[torch.Tensor]) -> Dict[str, _Optimized]:
    """{layer: its optimized images}: ``deconvcuda.synthesize`` on each layer's drawn channels, in
    batches of ``request.batch_size`` channels, with ``request.synthesis``'s options (the size set to
    the side of ``sample``, an image of the data, unless they name one). Under torch.distributed batch
    i (counted over all layers) is optimised on rank i % world, so each image is the one a single
    process makes, and every rank gets every layer's images."""
    if sample is not None:
        request.synthesis.setdefault("size", max(sample.shape[-2:]))
    records = [item.record for item in work if item.record.channels]
    if not records:
        return {}
    options = request.synthesis
    size, steps, _, objective, _, _ = _synthesis_settings(request)
    batches = [(record.layer, record.channels[first:first + request.batch_size])
               for record in records for first in range(0, len(record.channels), request.batch_size)]
    mine = batches[request.rank::request.world]
    # in a terminal synthesize's own bar shows each batch's steps (this one only says what starts);
    # in a log file a line at each tenth of the channels
    terminal = is_terminal()
    bar = Progress(sum(len(channels) for _, channels in mine), "optimized images", "channel",
                   enabled=request.progress)
    bar.say(f"visualize: an optimized image for each of {sum(len(record.channels) for record in records)} channels "
            f"({size} px, {steps} steps)")

    def synthesize_mine() -> List[Tuple[str, _Optimized]]:
        results = []
        with bar:
            for layer, channels in mine:
                tick = time.perf_counter()
                images = optimize.synthesize(request.model, layer, channels, preprocessing=request.preprocessing,
                                             device=request.device, progress=request.progress and terminal,
                                             **options)
                values = optimize.objective_values(request.model, layer, images, channels, objective=objective,
                                                   preprocessing=request.preprocessing)
                results.append((layer, _Optimized(channels, images.cpu(), values.cpu(), time.perf_counter() - tick)))
                if not terminal:
                    bar.update(len(channels))
        return results

    parts: Dict[str, List[_Optimized]] = {record.layer: [] for record in records}
    for rank_results in share(synthesize_mine, "visualize", world=request.world):
        for layer, part in rank_results:
            parts[layer].append(part)
    optimized = {}
    for record in records:
        done = sorted(parts[record.layer], key=lambda part: record.channels.index(part.channels[0]))
        optimized[record.layer] = _Optimized(record.channels, torch.cat([part.images for part in done]),
                                             torch.cat([part.values for part in done]),
                                             sum(part.seconds for part in done))
        record.seconds["synthesize"] = optimized[record.layer].seconds
    return optimized


# --------------------------------------------------------------------------------------------- #
# 4. Projections, shared by the ranks
# --------------------------------------------------------------------------------------------- #

def _project_rounds(request: _Request, chunks: List[_Chunk],
                    optimized: Dict[str, _Optimized]) -> Optional[Exception]:
    """Project every chunk and (rank 0) draw it (with its layer's ``optimized`` images, where there
    are), with one progress display for all. In rounds of
    ``world`` chunks, chunk i on rank i % world, so that rank 0 holds at most one round of results.
    Returns rank 0's error while drawing in a torch.distributed run (None otherwise): it is raised on
    every rank at the next meeting, this function's next round or the gallery's."""
    k, rules, world = request.k, request.rules, request.world
    total = sum(len(chunk.pairs) for chunk in chunks) * len(rules)
    bar = Progress(total, "projections", "projection", enabled=request.progress)
    layers = len(request.layers)
    bar.say(f"visualize: {total:,} projections ({sum(len(chunk.channels) for chunk in chunks)} channels of "
            f"{layers} layer{'s' * (layers > 1)}, up to {k} activations each, {len(rules)} "
            f"rule{'s' * (len(rules) > 1)})")
    estimate = _Estimate(chunks, len(rules), world)
    drawing_error = None
    with bar:
        for first in range(0, len(chunks), world):
            number = first + request.rank

            def project_mine():
                if drawing_error is not None:  # rank 0 could not draw: tell the others, then stop
                    raise drawing_error
                if number >= len(chunks):
                    return None
                tick = time.perf_counter()
                cells = _project_chunk(request, chunks[number])
                return cells, time.perf_counter() - tick

            results = share(project_mine, "visualize", world=world)
            if request.rank != 0:
                continue
            for offset, result in enumerate(results):
                if result is None:
                    continue
                chunk, (cells, seconds) = chunks[first + offset], result
                chunk.work.record.seconds["project"] += seconds
                tock = time.perf_counter()
                try:
                    _draw_chunk(request, chunk, cells, optimized.get(chunk.work.record.layer))
                except Exception as error:
                    if world == 1:
                        raise
                    drawing_error = error
                    break
                drawing = time.perf_counter() - tock
                chunk.work.record.seconds["draw"] += drawing
                estimate.done(first + offset, seconds + drawing)
                bar.update(len(chunk.pairs) * len(rules), estimate.left())
            message = estimate.announcement()
            if message:
                bar.say(message)
    return drawing_error


def _project_chunk(request: _Request, chunk: _Chunk):
    """One chunk's cells, on the CPU: per rule the projections' display cells, the image patches'
    cells, the support outlines (of the first rule's projections) and the boxes, in ``pairs`` order.
    The images are read from the data by index: just those the chunk's activations came from."""
    from .. import batches
    from ..engine import project
    from ..receptive_field import crop_patches

    item, pairs = chunk.work, chunk.pairs
    if not pairs:
        return None
    layer = item.record.layer
    wanted = sorted({int(item.image_index[c, r]) for c, r in pairs})
    images = batches.gather_images(request.data, wanted, request.batch_size).to(request.device)
    slot = {index: i for i, index in enumerate(wanted)}
    neurons = torch.tensor([[slot[int(item.image_index[c, r])], c, int(item.ys[c, r]), int(item.xs[c, r])]
                            for c, r in pairs], dtype=torch.long)
    boxes = [tuple(int(v) for v in item.field.box(int(item.ys[c, r]), int(item.xs[c, r]))) for c, r in pairs]
    projections, outlines = [], None
    for name in request.rules:
        projected = project(request.model, images, layer, neurons=neurons.to(request.device), rule=name,
                            seed=request.seed, lrn=request.lrn, backend=request.backend, strict=request.strict)
        crops = crop_patches(projected, boxes, fill=0.0).cpu()
        del projected
        if outlines is None:
            outlines = render.support_mask(crops)
        projections.append(render.projections_to_rgb(crops, request.channel_order, request.contrast))
    inside = crop_patches(torch.ones(1, 1, *images.shape[-2:]), boxes, fill=0.0)[:, 0] > 0
    patches = render.patches_to_rgb(crop_patches(images.index_select(0, neurons[:, 0].to(request.device)),
                                                 boxes).cpu(), request.preprocessing, inside)
    return projections, patches, outlines, boxes


class _Estimate:
    """How long the projections will take: each layer's seconds per projection so far (layers differ by
    orders of magnitude; its first channels come early), times what is left of it, shared by the
    processes."""

    def __init__(self, chunks: List[_Chunk], rules: int, world: int):
        self.chunks, self.rules, self.world = chunks, rules, world
        self.finished = [False] * len(chunks)
        self.spent: Dict[str, List[float]] = {}   # layer -> [seconds, projections] of its finished chunks
        self.announced = False

    def done(self, number: int, seconds: float) -> None:
        chunk = self.chunks[number]
        self.finished[number] = True
        spent = self.spent.setdefault(chunk.work.record.layer, [0.0, 0])
        spent[0] += seconds
        spent[1] += len(chunk.pairs) * self.rules

    def left(self) -> Optional[float]:
        """Seconds still to go, or None until every layer with work left has been measured."""
        seconds = 0.0
        for chunk, finished in zip(self.chunks, self.finished):
            if not finished:
                spent = self.spent.get(chunk.work.record.layer)
                if spent is None:
                    return None
                seconds += spent[0] / max(1, spent[1]) * len(chunk.pairs) * self.rules
        return seconds / self.world

    def announcement(self) -> Optional[str]:
        """Once, as soon as it is known: how long a long run will still take."""
        left = None if self.announced else self.left()
        if left is None:
            return None
        self.announced = True
        if left <= LONG_RUN_SECONDS:
            return None
        count = sum(len(chunk.pairs) for chunk, finished in zip(self.chunks, self.finished) if not finished)
        return (f"visualize: about {duration(left)} more for the other {count * self.rules:,} projections "
                f"(measured on the first channels of each layer); fewer channels (channels=, max_channels=) or a "
                "GPU take less")


# --------------------------------------------------------------------------------------------- #
# 5. Drawing (rank 0)
# --------------------------------------------------------------------------------------------- #

def _draw_chunk(request: _Request, chunk: _Chunk, cells, optimized: Optional[_Optimized]) -> None:
    """Each channel's PNG of the chunk (and its optimized image's, where ``optimized`` holds the
    layer's), and its figure in the layer's record."""
    item, pairs = chunk.work, chunk.pairs
    record = item.record
    projections, patches, outlines, boxes = cells
    folder = request.out / gallery.slug(record.layer)
    for channel in chunk.channels:
        rows = [i for i, (c, _) in enumerate(pairs) if c == channel]
        ranks = [pairs[i][1] for i in rows]
        titles, image, image_path, value = list(request.rules) + ["image patches"], None, None, None
        if optimized is not None:
            at = optimized.channels.index(channel)
            image, value = optimized.images[at], float(optimized.values[at])
            titles.append(OPTIMIZED_TITLE)
            image_path = folder / f"optimized_{channel:04d}.png"
            render.save_png(render.rgb_pixels(image), image_path)
        picture = render.channel_figure([p[rows] for p in projections], patches[rows], request.k, titles=titles,
                                        outlines=outlines[rows], optimized=image)
        path = folder / f"channel_{channel:04d}.png"
        render.save_png(picture, path)
        indices = [int(item.image_index[channel, r]) for r in ranks]
        names = request.image_names
        record.figures.append(ChannelFigure(
            layer=record.layer, channel=channel, path=path,
            values=[float(item.values[channel, r]) for r in ranks],
            image_index=indices,
            image_names=[names[i] if names is not None else f"image {i}" for i in indices],
            positions=[(int(item.ys[channel, r]), int(item.xs[channel, r])) for r in ranks],
            boxes=[boxes[i] for i in rows], rules=list(request.rules), optimized=image_path, optimized_value=value))


def _draw_overview(out: Path, record: LayerFigures, k: int) -> None:
    """The layer's overview PNG: its first OVERVIEW_CHANNELS figures, each under its channel number."""
    from PIL import Image

    if not record.figures:
        return
    tick = time.perf_counter()
    shown, labels = [], []
    for figure in record.figures[:render.OVERVIEW_CHANNELS]:
        with Image.open(figure.path) as image:
            shown.append(np.asarray(image.convert("RGB")))
        few = len(figure.values) < k
        labels.append(f"channel {figure.channel}" + (f" (only {len(figure.values)} images fire)" if few else ""))
    record.overview = out / f"figure_{gallery.slug(record.layer)}.png"
    render.save_png(render.overview(shown, labels), record.overview)
    record.seconds["draw"] += time.perf_counter() - tick


# --------------------------------------------------------------------------------------------- #
# 6. The gallery's page (rank 0), and the result every rank returns
# --------------------------------------------------------------------------------------------- #

def _write_gallery(request: _Request, work: List[_LayerWork], tops, drawing_error: Optional[Exception]) -> Visualization:
    """Rank 0 draws the overviews and writes index.html and the manifest; every rank returns its
    :class:`Visualization`, or raises rank 0's error (the drawing's included)."""
    records = [item.record for item in work]
    index = request.out / "index.html"
    scanned = _images_scanned(tops)

    def write() -> Visualization:
        if drawing_error is not None:
            raise drawing_error
        for record in records:
            _draw_overview(request.out, record, request.k)
        title = f"deconvcuda: {request.model_name or type(request.model).__name__}"
        optimized = None if request.synthesis is None else optimize.OBJECTIVE_WORDS[_synthesis_settings(request)[3]]
        page = gallery.index_html(title, _header(request, scanned, records), records, request.out, request.rules,
                                  request.k, scanned, request.sections, optimized=optimized)
        index.write_text(page, encoding="utf-8")
        figures = [figure for record in records for figure in record.figures]
        gallery.record_outputs(request.out, [index] + [figure.path for figure in figures]
                               + [figure.optimized for figure in figures if figure.optimized is not None]
                               + [record.overview for record in records if record.overview is not None])
        return Visualization(out=request.out, index=index, layers=records, rules=request.rules,
                             images_per_rank=tops[request.layers[0]].images_per_rank)

    return share(write if request.rank == 0 else (lambda: None), "visualize", world=request.world)[0]


def _reversal(records: Sequence[LayerFigures]) -> str:
    """The header's word on how each layer's path is reversed beyond the paper's operations."""
    notes = []
    for record in records:
        if record.fallback is not None:
            notes.append(f"{record.layer}: by autograd on the model itself, every rectifier the rule's "
                         f"({record.fallback})")
        elif record.gradient_ops:
            notes.append(f"{record.layer}: {', '.join(record.gradient_ops)} by their exact gradient")
        else:
            notes.append(f"{record.layer}: only the paper's reverse operations")
    return "; ".join(notes)


def _header(request: _Request, scanned: int, records: Sequence[LayerFigures]) -> List[Tuple[str, str]]:
    """The page's header rows: the model, its weights, the data, the rules, how the paths are
    reversed, the display, the settings, the device."""
    contrast = {
        "robust": f"robust: per projection, its colour cast removed, the {render.ROBUST_PERCENTILE:g}th percentile "
                  "of |value| at black and white (brighter values clipped), zero at mid-gray",
        "max": "max: the paper's linear scaling, p / (2 max|p|) + 0.5, zero at mid-gray, values as they are",
    }[request.contrast]
    data_name = request.data_name
    if callable(data_name):
        data_name = data_name(scanned)
    device = request.device
    if device.type == "cuda" and torch.cuda.is_available():
        device = f"{device} ({torch.cuda.get_device_name(device)})"
    return [
        ("model", request.model_name or type(request.model).__name__),
        ("weights", request.weights or "not stated (visualize(..., weights=...) says where they came from)"),
        ("data", data_name or f"{scanned} images"),
        ("rule", "; ".join(f"{name}: {reverse_rules.RULES[name].description}" for name in request.rules)),
        ("reverse", _reversal(records)),
        ("contrast", contrast),
        ("settings", f"k = {request.k} (activations per channel, one per image), seed = {request.seed!r}, "
                     f"lrn = {request.lrn!r}, backend = {request.backend!r}"),
    ] + _synthesis_header(request) + [
        ("device", str(device)),
    ]


def _synthesis_header(request: _Request) -> List[Tuple[str, str]]:
    """The header's row on the optimized images: how ``deconvcuda.synthesize`` made them (none without)."""
    if request.synthesis is None:
        return []
    size, steps, seed, objective, lr, plan = _synthesis_settings(request)
    regularizers = [plan.parameterization] + plan.transforms + plan.steps
    given = "regularizers" in request.synthesis
    return [("optimized", f"each channel's optimized image: deconvcuda.synthesize on the layer's drawn channels in "
                          f"batches of {request.batch_size}, objective {objective!r} "
                          f"({optimize.OBJECTIVE_WORDS[objective]}), {size}x{size} pixels, {steps} steps of Adam "
                          f"(lr {lr:g}) from seed {seed}, regularizers "
                          f"{', '.join(map(repr, regularizers))}{'' if given else ' (the default)'}")]
