"""The paper's figure (Zeiler & Fergus 2014, Fig. 2): for each feature map of a layer, its k strongest
activations over a dataset projected to pixel space, beside the image patches they came from.

    run = deconvcuda.visualize(model, images, ["features.22", "features.29"], channels=range(16),
                               image_names=names, preprocessing=model.preprocessing, out="out")
    print(run.index)          # out/index.html: every layer and channel, with captions

One streaming top-k pass over the data for all layers, then one ``project(..., neurons=...)`` call
per chunk of channels on just the images those activations came from (under torch.distributed the
scan and the chunks are shared among the processes, and rank 0 alone writes); each projection and
each image is cropped to the activation's receptive field (padded where it leaves the image). Per channel one PNG:
left the grid of projections (each zero-centred, gray = 0, scaled to its own contrast: the paper's
``p / (2 max|p|) + 0.5``), right the grid of image patches. Per layer an overview PNG of its first
channels, and per run a static ``index.html``.
"""
from __future__ import annotations

import datetime
import html
import math
import os
import platform
import re
import string
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

__all__ = ["visualize", "Visualization", "LayerFigures", "ChannelFigure", "projections_to_rgb",
           "patches_to_rgb", "grid", "channel_figure"]

#: Cells smaller than this many pixels are enlarged (nearest neighbour, by a whole factor) so that
#: the 5x5 fields of a first layer stay visible.
MIN_CELL_PIXELS = 64
#: Pixels between cells, and between the projection grid and the patch grid.
CELL_GAP, GRID_GAP = 2, 12
#: Background of the gaps, and of cells left empty when the data holds fewer than k activations.
BACKGROUND = 255
#: How many channels a layer's overview PNG shows, and how tall each channel's figure is there.
OVERVIEW_CHANNELS, OVERVIEW_HEIGHT = 16, 160
#: Projections per ``project`` call: bounds memory (each is a full-size image until it is cropped).
PROJECTIONS_PER_CALL = 144


@dataclass
class ChannelFigure:
    """One channel's figure and what it shows, strongest activation first."""

    layer: str
    channel: int
    path: Path                              # the PNG: projections left, image patches right
    values: List[float]                     # the activations
    image_index: List[int]                  # positions in the dataset
    image_names: List[str]
    positions: List[Tuple[int, int]]        # (y, x) in the layer's output map
    boxes: List[Tuple[int, int, int, int]]  # (top, left, bottom, right) input-pixel boxes, unclipped


@dataclass
class LayerFigures:
    """One layer: its channels' figures, an overview PNG and where the time went (seconds)."""

    layer: str
    num_channels: int                       # how many the layer has
    channels: List[int]                     # the ones drawn
    receptive_field: Tuple[int, int]        # (height, width) in input pixels
    overview: Optional[Path]
    figures: List[ChannelFigure] = field(default_factory=list)
    seconds: Dict[str, float] = field(default_factory=dict)  # "top_activations", "project", "draw"


@dataclass
class Visualization:
    """What ``visualize`` wrote: the output folder, its ``index.html`` and one record per layer."""

    out: Path
    index: Path
    layers: List[LayerFigures]
    images_per_rank: Tuple[int, ...] = ()   # images each process scanned (one entry without torch.distributed)

    @property
    def figures(self) -> List[ChannelFigure]:
        """Every channel's figure, layer by layer."""
        return [figure for layer in self.layers for figure in layer.figures]


# --------------------------------------------------------------------------------------------- #
# Turning tensors into pictures (pure functions: no model, no files)
# --------------------------------------------------------------------------------------------- #

def _as_three_channels(x: torch.Tensor) -> torch.Tensor:
    """[P, C, h, w] -> [P, 3, h, w]: gray inputs are repeated, inputs with other channel counts are
    shown as the mean over their channels."""
    if x.shape[1] == 3:
        return x
    return x.mean(dim=1, keepdim=True).expand(-1, 3, -1, -1)


def projections_to_rgb(projections: torch.Tensor, channel_order: str = "RGB") -> torch.Tensor:
    """[P, C, h, w] projections -> [P, 3, h, w] in [0, 1], each on its own scale, zero at gray:
    ``p / (2 max|p|) + 0.5``. An all-zero projection is uniformly gray."""
    p = projections.detach().to(torch.float32)
    peak = p.abs().flatten(1).amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny).view(-1, 1, 1, 1)
    rgb = _as_three_channels(p / (2 * peak) + 0.5)
    if channel_order == "BGR" and projections.shape[1] == 3:
        rgb = rgb.flip(1)  # the model sees BGR; people see RGB
    return rgb.clamp(0.0, 1.0)


def patches_to_rgb(patches: torch.Tensor, preprocessing=None) -> torch.Tensor:
    """[P, C, h, w] patches of model input -> [P, 3, h, w] in [0, 1]: undone by
    ``preprocessing.to_display`` where given, else stretched to each patch's own min..max."""
    x = patches.detach().to(torch.float32)
    if preprocessing is not None and x.shape[1] == 3:
        return preprocessing.to_display(x)
    low = x.flatten(1).amin(dim=1).view(-1, 1, 1, 1)
    high = x.flatten(1).amax(dim=1).view(-1, 1, 1, 1)
    return _as_three_channels((x - low) / (high - low).clamp_min(1e-12)).clamp(0.0, 1.0)


def _upscale_factor(height: int, width: int) -> int:
    return max(1, math.ceil(MIN_CELL_PIXELS / max(height, width, 1)))


def grid(cells: torch.Tensor, count: int, columns: int, scale: int = 1) -> np.ndarray:
    """[n, 3, h, w] cells in [0, 1] -> an [H, W, 3] uint8 image of ``count`` slots in rows of
    ``columns``, each cell enlarged ``scale`` times (nearest neighbour); slots past ``n`` stay empty."""
    n, _, h, w = cells.shape
    rows = max(1, math.ceil(count / columns))
    ch, cw = h * scale, w * scale
    canvas = np.full((rows * ch + (rows + 1) * CELL_GAP, columns * cw + (columns + 1) * CELL_GAP, 3),
                     BACKGROUND, dtype=np.uint8)
    pixels = (cells.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    for i in range(min(n, count)):
        r, c = divmod(i, columns)
        cell = pixels[i].repeat(scale, axis=0).repeat(scale, axis=1) if scale > 1 else pixels[i]
        top, left = CELL_GAP + r * (ch + CELL_GAP), CELL_GAP + c * (cw + CELL_GAP)
        canvas[top:top + ch, left:left + cw] = cell
    return canvas


def channel_figure(projections: torch.Tensor, patches: torch.Tensor, k: int) -> np.ndarray:
    """The figure of one channel: the grid of ``projections`` left, the grid of ``patches`` right
    (both [n <= k, 3, h, w] in [0, 1]), ``ceil(sqrt(k))`` columns each: 3x3 for the paper's k = 9."""
    columns = max(1, math.ceil(math.sqrt(k)))
    scale = _upscale_factor(projections.shape[2], projections.shape[3])
    left, right = grid(projections, k, columns, scale), grid(patches, k, columns, scale)
    spacer = np.full((left.shape[0], GRID_GAP, 3), BACKGROUND, dtype=np.uint8)
    return np.concatenate([left, spacer, right], axis=1)


def _overview(images: Sequence[np.ndarray], per_row: int = 4) -> np.ndarray:
    """Channel figures side by side, each resized to OVERVIEW_HEIGHT pixels tall."""
    from PIL import Image

    resized = []
    for image in images:
        height, width = image.shape[:2]
        new_width = max(1, round(width * OVERVIEW_HEIGHT / height))
        # nearest keeps small fields crisp; Lanczos keeps big ones from aliasing
        resample = Image.NEAREST if height <= OVERVIEW_HEIGHT else Image.LANCZOS
        resized.append(np.asarray(Image.fromarray(image).resize((new_width, OVERVIEW_HEIGHT), resample)))
    width = max(image.shape[1] for image in resized)
    rows = math.ceil(len(resized) / per_row)
    gap = GRID_GAP
    canvas = np.full((rows * OVERVIEW_HEIGHT + (rows + 1) * gap, per_row * width + (per_row + 1) * gap, 3),
                     BACKGROUND, dtype=np.uint8)
    for i, image in enumerate(resized):
        r, c = divmod(i, per_row)
        top, left = gap + r * (OVERVIEW_HEIGHT + gap), gap + c * (width + gap)
        canvas[top:top + OVERVIEW_HEIGHT, left:left + image.shape[1]] = image
    return canvas


def _save_png(image: np.ndarray, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, format="PNG", compress_level=4)


# --------------------------------------------------------------------------------------------- #
# Arguments
# --------------------------------------------------------------------------------------------- #

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


def _candidate_channels(channels, layer: str, num_channels: int) -> List[int]:
    if isinstance(channels, Mapping):
        if layer not in channels:
            return list(range(num_channels))
        channels = channels[layer]
    if channels is None:
        return list(range(num_channels))
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


def _slug(layer: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", layer) or "output"


# --------------------------------------------------------------------------------------------- #
# visualize
# --------------------------------------------------------------------------------------------- #

def visualize(model: nn.Module, data, layers: Union[str, Sequence[str]], *,
              channels: Union[None, int, Iterable[int], Mapping] = None, k: int = 9,
              out: Union[str, os.PathLike] = "out", image_names: Optional[Sequence[str]] = None,
              preprocessing=None, batch_size: int = 32, device=None, seed: str = "value",
              lrn: str = "gradient", backend: str = "auto", progress: bool = True,
              max_channels: Optional[int] = None, model_name: Optional[str] = None) -> Visualization:
    """Write the paper's figure for each of ``layers`` and channel to ``out/``, and ``out/index.html``.

    model: in eval mode or not (it is left as it was). data: what ``top_activations`` streams (a
    tensor ``[N, C, H, W]`` of model input, a list of batches, or a DataLoader), in a fixed order.
    channels: None (all), an int, a list, or ``{layer: list}``; ``max_channels`` then keeps the first
    that many of them that fire (strongest activation non-zero) on the data. k: activations per
    channel (9 in the paper). image_names: one name per image of ``data``, for the captions.
    preprocessing: a ``deconvcuda.models.Preprocessing`` that turns model input back into pixels
    (default ``model.preprocessing`` where the model has one, else each patch is stretched to its own
    range). device: where the work runs, default the model's device (the model must be there).
    seed, lrn, backend: as for ``deconvcuda.project``. progress: tqdm bars on stderr.

    Returns a :class:`Visualization` (out folder, index path, per-layer records with every figure).
    """
    from tqdm.auto import tqdm

    from . import top_activations
    from .scan import model_device as device_of, process_group

    if not isinstance(model, nn.Module):
        raise TypeError(f"visualize: model must be a torch.nn.Module, got {type(model).__name__}")
    layers = _layer_list(model, layers)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"visualize: k must be a positive int, got {k!r}")
    if max_channels is not None and (isinstance(max_channels, bool) or not isinstance(max_channels, int)
                                     or max_channels < 1):
        raise ValueError(f"visualize: max_channels must be a positive int or None, got {max_channels!r}")
    if preprocessing is None:
        preprocessing = getattr(model, "preprocessing", None)
    model_device = device_of(model)
    device = model_device if device is None else torch.device(device)
    if device != model_device and not (device.type == model_device.type and device.index is None):
        raise ValueError(f"visualize: the model is on {model_device} but device is {device}; "
                         f"move it first with model.to({str(device)!r})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    channel_order = getattr(preprocessing, "channel_order", "RGB")

    # ONE scan for all layers; with torch.distributed every rank scans its part of the data and
    # gets the merged result, then the channels' projections are shared out (chunk i to rank
    # i % world) and rank 0 alone draws and writes the gallery.
    rank, world = process_group()
    progress = progress and rank == 0
    if image_names is None:
        image_names = getattr(data, "names", None)  # deconvcuda.data.ImageFolder's file names
    started = time.perf_counter()
    tops = top_activations(model, data, layers, k=k, batch_size=batch_size, device=device, progress=progress)
    scan_seconds = time.perf_counter() - started

    records: List[LayerFigures] = []
    work = []  # (record, top entries on the CPU, chunk of channels): the projection calls, in order
    per_call = max(1, PROJECTIONS_PER_CALL // k)
    for layer in layers:
        top = tops[layer]
        entries = (top.values.detach().cpu(), top.image_index.detach().cpu(), top.y.detach().cpu(),
                   top.x.detach().cpu())
        num_channels = entries[0].shape[0]
        candidates = _candidate_channels(channels, layer, num_channels)
        if max_channels is not None:
            candidates = [c for c in candidates if entries[0].shape[1] and float(entries[0][c, 0]) != 0.0][:max_channels]
        # the scan is shared by the layers: each shows its whole time
        record = LayerFigures(layer, num_channels, candidates, (0, 0), None,
                              seconds={"top_activations": scan_seconds, "project": 0.0, "draw": 0.0})
        records.append(record)
        work.extend((record, entries, candidates[start:start + per_call])
                    for start in range(0, len(candidates), per_call))

    bar = tqdm(total=sum(len(chunk) for _, _, chunk in work), desc="projections and figures", unit="channel",
               disable=not progress)
    failure = None  # an error of rank 0 while drawing, reported to the other ranks
    with bar:
        # Rounds of `world` chunks, one per rank, so that rank 0 holds at most one round of results.
        for first in range(0, len(work), world):
            number = first + rank
            mine = None
            if failure is not None:  # rank 0 could not draw: tell the others, then stop
                mine = ("error", type(failure).__name__, str(failure))
            elif number < len(work):
                record, entries, chunk = work[number]
                tick = time.perf_counter()
                try:
                    mine = ("ok", _project_chunk(model, data, record.layer, entries, chunk, batch_size, device, seed,
                                                 lrn, backend, channel_order, preprocessing),
                            time.perf_counter() - tick)
                except Exception as error:
                    if world == 1:
                        raise
                    mine = ("error", type(error).__name__, str(error))
            results = _shared(mine, world)
            failed = [(r, result) for r, result in enumerate(results) if result is not None and result[0] == "error"]
            if failed:
                if failure is not None:
                    raise failure
                r, (_, kind, message) = failed[0]
                raise (ValueError if kind == "ValueError" else RuntimeError)(
                    f"visualize: rank {r} of {world} failed to project: {message}")
            if rank != 0:
                continue
            for offset, result in enumerate(results):
                if result is None:
                    continue
                record, entries, chunk = work[first + offset]
                record.seconds["project"] += result[2]
                tock = time.perf_counter()
                try:
                    _draw_chunk(record, entries, chunk, result[1], k, out, image_names)
                except Exception as error:
                    if world == 1:
                        raise
                    failure = error
                    break
                record.seconds["draw"] += time.perf_counter() - tock
                bar.update(len(chunk))

    index = out / "index.html"
    if rank == 0 and failure is None:
        try:
            _write_overviews_and_index(index, records, out, model, model_name, device, k, seed, lrn, backend)
        except Exception as error:
            if world == 1:
                raise
            failure = error
    run = Visualization(out=out, index=index, layers=records, images_per_rank=tops[layers[0]].images_per_rank)
    if world > 1:  # every rank returns the records of what rank 0 wrote, or rank 0's error
        shared = _shared(run if failure is None else ("error", type(failure).__name__, str(failure)), world)[0] \
            if rank == 0 else _shared(None, world)[0]
        if failure is not None:
            raise failure
        if isinstance(shared, tuple):
            raise RuntimeError(f"visualize: rank 0 of {world} failed to write the gallery: {shared[2]}")
        run = shared
    return run


def _write_overviews_and_index(index: Path, records: List[LayerFigures], out: Path, model, model_name, device, k,
                               seed, lrn, backend) -> None:
    """Each layer's overview PNG of its first channels, and the index.html of them all."""
    from PIL import Image

    from . import __version__

    for record in records:
        if not record.figures:
            continue
        tick = time.perf_counter()
        shown = []
        for figure in record.figures[:OVERVIEW_CHANNELS]:
            with Image.open(figure.path) as image:
                shown.append(np.asarray(image.convert("RGB")))
        record.overview = out / f"figure_{_slug(record.layer)}.png"
        _save_png(_overview(shown), record.overview)
        record.seconds["draw"] += time.perf_counter() - tick

    header = {
        "model": model_name or type(model).__name__,
        "device": _device_description(device),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "versions": (f"deconvcuda {__version__}, torch {torch.__version__}, Python {platform.python_version()}, "
                     f"{platform.system()} {platform.machine()}"),
        "settings": f"k = {k}, seed = {seed!r}, lrn = {lrn!r}, backend = {backend!r}",
    }
    index.write_text(_index_html(header, records, out), encoding="utf-8")


def _shared(payload, world: int) -> list:
    """Every rank's ``payload``, in rank order, on every rank (just ``[payload]`` in one process)."""
    if world == 1:
        return [payload]
    import torch.distributed as dist

    gathered = [None] * world
    dist.all_gather_object(gathered, payload)
    return gathered


def _project_chunk(model, data, layer, entries, chunk, batch_size, device, seed, lrn, backend, channel_order,
                   preprocessing):
    """Project the top-k of the channels in ``chunk`` on the images they came from, cropped to their
    receptive fields: ``(keep, boxes, projection_rgb, patch_rgb)`` on the CPU, where ``keep`` lists
    the (channel, rank) pairs that exist (fewer than k where the data has fewer activations)."""
    from . import batches, crop_patches, project, receptive_field

    values, image_index, ys, xs = entries
    keep = [(c, r) for c in chunk for r in range(values.shape[1])
            if int(image_index[c, r]) >= 0 and bool(torch.isfinite(values[c, r]))]
    if not keep:
        return keep, [], None, None
    wanted = sorted({int(image_index[c, r]) for c, r in keep})
    images = batches.gather_images(data, wanted, batch_size)
    slot = {index: i for i, index in enumerate(wanted)}
    neurons = torch.tensor([[slot[int(image_index[c, r])], c, int(ys[c, r]), int(xs[c, r])]
                            for c, r in keep], dtype=torch.long)
    images = images.to(device)
    projections = project(model, images, layer, neurons=neurons.to(device), seed=seed, lrn=lrn, backend=backend)
    field = receptive_field(model, layer, input_size=tuple(images.shape[-2:]))
    boxes = [tuple(int(v) for v in field.box(int(ys[c, r]), int(xs[c, r]))) for c, r in keep]
    projection_patches = crop_patches(projections, boxes, fill=0.0)
    image_patches = crop_patches(images.index_select(0, neurons[:, 0].to(device)), boxes, fill=0.0)
    return keep, boxes, projections_to_rgb(projection_patches.cpu(), channel_order), \
        patches_to_rgb(image_patches.cpu(), preprocessing)


def _draw_chunk(record: LayerFigures, entries, chunk, projected, k: int, out: Path, image_names) -> None:
    """Write one PNG per channel of ``chunk`` from its projections, and add its figure to ``record``."""
    values, image_index, ys, xs = entries
    keep, boxes, projection_rgb, patch_rgb = projected
    if boxes:
        record.receptive_field = (boxes[0][2] - boxes[0][0], boxes[0][3] - boxes[0][1])
    for channel in chunk:
        rows = [i for i, (c, _) in enumerate(keep) if c == channel]
        ranks = [keep[i][1] for i in rows]
        if rows:
            picture = channel_figure(projection_rgb[rows], patch_rgb[rows], k)
        else:  # nothing to show: an empty figure keeps the index complete
            picture = channel_figure(torch.zeros(0, 3, 1, 1), torch.zeros(0, 3, 1, 1), k)
        path = out / _slug(record.layer) / f"channel_{channel:04d}.png"
        _save_png(picture, path)
        indices = [int(image_index[channel, r]) for r in ranks]
        record.figures.append(ChannelFigure(
            layer=record.layer, channel=channel, path=path,
            values=[float(values[channel, r]) for r in ranks],
            image_index=indices,
            image_names=[image_names[i] if image_names is not None else f"image {i}" for i in indices],
            positions=[(int(ys[channel, r]), int(xs[channel, r])) for r in ranks],
            boxes=[boxes[i] for i in rows]))


def _device_description(device: torch.device) -> str:
    if device.type == "cuda" and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


# --------------------------------------------------------------------------------------------- #
# index.html
# --------------------------------------------------------------------------------------------- #

def _relative(path: Path, out: Path) -> str:
    return Path(os.path.relpath(path, out)).as_posix()


def _caption(figure: ChannelFigure) -> str:
    if not figure.values:
        return f"<b>{html.escape(figure.layer)}</b> &middot; channel {figure.channel}: no activation in the data"
    values = ", ".join(f"{v:.4g}" for v in figure.values)
    sources = "; ".join(f"{html.escape(name)} (y {y}, x {x})"
                        for name, (y, x) in zip(figure.image_names, figure.positions))
    return (f"<b>{html.escape(figure.layer)}</b> &middot; channel {figure.channel}"
            f"<br>activations: {values}<br>images: {sources}")


def _index_html(header: Dict[str, str], records: List[LayerFigures], out: Path) -> str:
    template = string.Template((resources.files("deconvcuda") / "templates" / "index.html").read_text("utf-8"))
    nav, sections = [], []
    for number, record in enumerate(records):
        anchor = f"layer-{number}"
        nav.append(f'<a href="#{anchor}">{html.escape(record.layer)}</a>')
        parts = [f'<section id="{anchor}">',
                 f"<h2>{html.escape(record.layer)}</h2>",
                 f'<p class="about">{len(record.channels)} of {record.num_channels} channels drawn; receptive '
                 f"field {record.receptive_field[0]}&times;{record.receptive_field[1]} pixels; "
                 f"top-k {record.seconds.get('top_activations', 0):.1f} s, projections "
                 f"{record.seconds.get('project', 0):.1f} s, drawing {record.seconds.get('draw', 0):.1f} s</p>"]
        if not record.figures:
            parts.append('<p class="about">No channel fired on these images.</p>')
        if record.overview is not None:
            shown = min(len(record.figures), OVERVIEW_CHANNELS)
            parts.append(f'<figure class="overview"><img src="{html.escape(_relative(record.overview, out))}" '
                         f'alt="overview of {html.escape(record.layer)}"><figcaption>overview: the first {shown} '
                         f"channels drawn</figcaption></figure>")
        parts.append('<div class="channels">')
        for figure in record.figures:
            parts.append(f'<figure class="channel"><img src="{html.escape(_relative(figure.path, out))}" '
                         f'alt="{html.escape(figure.layer)} channel {figure.channel}">'
                         f"<figcaption>{_caption(figure)}</figcaption></figure>")
        parts.append("</div></section>")
        sections.append("\n".join(parts))
    return template.substitute(
        title=html.escape(f"deconvcuda: {header['model']}"),
        model=html.escape(header["model"]), device=html.escape(header["device"]),
        date=html.escape(header["date"]), versions=html.escape(header["versions"]),
        settings=html.escape(header["settings"]), nav=" &middot; ".join(nav), sections="\n".join(sections))
