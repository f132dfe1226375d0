"""Reading the data a scan streams: batches with their dataset indices, and chosen images again.

    source = data_source(data, "top_activations")      # a tensor, a list, an iterable, or a map-style Dataset
    for batch in source.batches(start, stop, batch_size=64):
        batch.index, batch.images                         # [B] dataset indices, [B, C, H, W]
    picked = gather_images(data, [17, 3, 17], batch_size=64)   # [3, C, H, W], in the order asked

``data`` may be a tensor ``[N, C, H, W]`` (split into ``batch_size`` chunks), a map-style
``torch.utils.data.Dataset`` whose items are images ``[C, H, W]`` or ``(image, label)`` pairs (read
through a DataLoader of our own: worker processes, pinned memory for a GPU; a range of it can be
read alone, which is how a scan is sharded), a list or tuple of tensors (each a batch
``[B, C, H, W]`` or a single image ``[C, H, W]``), or any iterable such as a DataLoader yielding
batches or ``(images, labels)`` pairs. Single images are stacked into batches of ``batch_size``.
Dataset indices count images in the order the data yields them (a Dataset's own indices), so
``gather_images`` needs data that yields the same images in the same order every time (a tensor,
a Dataset, a list, a DataLoader without shuffling).

A Dataset item that cannot be read (``__getitem__`` raises ``OSError``, as Pillow does for a
broken file and :class:`deconvcuda.data.ImageFolder` for any unreadable one) is skipped with a
warning that names it; its index is simply never ranked.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Iterator, List, NamedTuple, Optional, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate

__all__ = ["iter_batches", "gather_images", "count_images", "data_source", "is_map_dataset", "Batch",
           "DataSource"]


def _check_batch_size(batch_size, caller: str) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"{caller}: batch_size must be a positive int, got {batch_size!r}")
    return batch_size


def _images_of(item, caller: str) -> torch.Tensor:
    """The images of one item of the data: a tensor, or the first entry of an (images, labels) pair."""
    if isinstance(item, (tuple, list)) and item and isinstance(item[0], torch.Tensor):
        item = item[0]
    if not isinstance(item, torch.Tensor):
        raise TypeError(f"{caller}: each item of data must be a tensor [B, C, H, W] or [C, H, W], or an "
                        f"(images, labels) pair, got {type(item).__name__}")
    if item.dim() not in (3, 4):
        raise ValueError(f"{caller}: each item of data must be a batch [B, C, H, W] or an image [C, H, W], got a "
                         f"{item.dim()}-D tensor of shape {list(item.shape)}")
    return item


def is_map_dataset(data) -> bool:
    """Whether ``data`` is a map-style Dataset: indexable by position, with a length."""
    return (isinstance(data, Dataset) and not isinstance(data, IterableDataset)
            and hasattr(data, "__len__") and hasattr(data, "__getitem__"))


def iter_batches(data, batch_size: int, caller: str = "iter_batches") -> Iterator[Tuple[int, torch.Tensor]]:
    """Yield ``(first_index, images)``: each batch ``[B, C, H, W]`` with the dataset index of its first
    image (data of any form but a map-style Dataset, whose skipped items break that numbering: use
    :func:`data_source` for those)."""
    _check_batch_size(batch_size, caller)
    if isinstance(data, torch.Tensor):
        if data.dim() != 4:
            raise ValueError(f"{caller}: data as a tensor must be [N, C, H, W], got {data.dim()}-D with shape "
                             f"{list(data.shape)}")
        for first in range(0, data.shape[0], batch_size):
            yield first, data[first:first + batch_size]
        return
    try:
        items = iter(data)
    except TypeError:
        raise TypeError(f"{caller}: data must be a tensor [N, C, H, W], a map-style Dataset, a list of tensors or "
                        f"an iterable of batches (e.g. a DataLoader), got {type(data).__name__}") from None
    first = 0
    pending: List[torch.Tensor] = []  # single images waiting to fill a batch

    def flush():
        nonlocal first, pending
        batch = torch.stack(pending)
        pending = []
        first += batch.shape[0]
        return first - batch.shape[0], batch

    for item in items:
        images = _images_of(item, caller)
        if images.dim() == 3:
            if pending and pending[0].shape != images.shape:
                yield flush()
            pending.append(images)
            if len(pending) == batch_size:
                yield flush()
            continue
        if pending:
            yield flush()
        if images.shape[0]:
            yield first, images
            first += images.shape[0]
    if pending:
        yield flush()


def count_images(data) -> Optional[int]:
    """How many images ``data`` holds, where that is known without reading it (else None)."""
    if isinstance(data, torch.Tensor):
        return data.shape[0] if data.dim() == 4 else None
    if is_map_dataset(data):
        return len(data)
    dataset = getattr(data, "dataset", None)  # a DataLoader
    if dataset is not None and hasattr(dataset, "__len__") and getattr(data, "batch_size", None) is not None \
            and not getattr(data, "drop_last", False):
        return len(dataset)
    if isinstance(data, (list, tuple)) and all(isinstance(item, torch.Tensor) for item in data):
        return sum(1 if item.dim() == 3 else item.shape[0] for item in data)
    return None


# --------------------------------------------------------------------------------------------- #
# Sources: a range of the data, batch by batch, with each image's dataset index
# --------------------------------------------------------------------------------------------- #

class Batch(NamedTuple):
    """Images ``[B, C, H, W]`` (None where every item of the batch was skipped), their dataset
    indices ``[B]`` (int64, on the CPU), and the source position just after the batch (what a
    resumed scan passes as ``start``)."""

    index: torch.Tensor
    images: Optional[torch.Tensor]
    end: int


@dataclass
class DataSource:
    """How a scan reads ``data``. ``kind``: "tensor" and "dataset" can read any range ``[start,
    stop)`` of their ``count`` images directly (so they can be sharded); "stream" (lists, iterables,
    DataLoaders) is read from its beginning, ``start`` images skipped by reading them."""

    data: object
    kind: str
    count: Optional[int]
    caller: str

    def batches(self, start: int, stop: Optional[int], batch_size: int, *, num_workers: Optional[int] = None,
                pin_memory: bool = False) -> Iterator[Batch]:
        _check_batch_size(batch_size, self.caller)
        if self.kind == "tensor":
            stop = self.count if stop is None else stop
            for first in range(start, stop, batch_size):
                last = min(first + batch_size, stop)
                yield Batch(torch.arange(first, last), self.data[first:last], last)
        elif self.kind == "dataset":
            yield from self._dataset_batches(start, self.count if stop is None else stop, batch_size,
                                             num_workers, pin_memory)
        else:
            yield from self._stream_batches(start, batch_size)

    def _stream_batches(self, start: int, batch_size: int) -> Iterator[Batch]:
        for first, images in iter_batches(self.data, batch_size, self.caller):
            end = first + images.shape[0]
            if end <= start:  # read before: a resumed scan skips it
                continue
            if first < start:
                images, first = images[start - first:], start
            yield Batch(torch.arange(first, end), images, end)

    def _dataset_batches(self, start: int, stop: int, batch_size: int, num_workers: Optional[int],
                         pin_memory: bool) -> Iterator[Batch]:
        if stop <= start:
            return
        if num_workers is None:
            num_workers = default_workers(self.data)
        loader = DataLoader(_IndexedItems(self.data, start, stop), batch_size=batch_size, shuffle=False,
                            num_workers=num_workers, pin_memory=pin_memory, collate_fn=_collate_items,
                            # a worker that reads a few batches ahead keeps the forward fed
                            prefetch_factor=2 if num_workers > 0 else None)
        for index, images, end, skipped, error in loader:
            for message in skipped:
                warnings.warn(f"{self.caller}: {message}", stacklevel=4)
            if error is not None:
                raise _error_type(error)(f"{self.caller}: {error[1]}")
            yield Batch(torch.tensor(index, dtype=torch.long), images, end)


def default_workers(dataset) -> int:
    """Worker processes for reading ``dataset`` where that helps: a Dataset that reads files from a
    ``root`` folder (``deconvcuda.data.ImageFolder``, torchvision's datasets) gets up to 8, the CPUs
    this process may use divided among the processes of a torchrun on this node (none where that
    leaves fewer than 2); any other Dataset is read in this process (items already in memory gain
    nothing from workers, and the Dataset object the caller holds sees every read). Pass
    ``num_workers`` to choose."""
    if getattr(dataset, "root", None) is None:
        return 0
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    per_process = cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return min(8, per_process) if per_process >= 2 else 0


class _IndexedItems(Dataset):
    """Items ``start .. stop - 1`` of a map-style Dataset as ``(index, item, problem)``; an item
    that cannot be read (OSError) becomes ``(index, None, message)`` so that the scan skips it."""

    def __init__(self, dataset, start: int, stop: int):
        self.dataset, self.start, self.stop = dataset, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, position: int):
        index = self.start + position
        try:
            return index, self.dataset[index], None
        except OSError as error:  # Pillow's UnidentifiedImageError and truncated files are OSErrors
            return index, None, f"skipping image {index} of the dataset, which cannot be read: {error}"


def _error_type(error) -> type:
    return {"TypeError": TypeError, "ValueError": ValueError}.get(error[0], RuntimeError)


def _dataset_image(item, index: int) -> Tuple[Optional[torch.Tensor], Optional[Tuple[str, str]]]:
    """The image of a Dataset item (an image, or an (image, label) pair), or an error (type, message)."""
    if isinstance(item, (tuple, list)) and item:
        item = item[0]
    if isinstance(item, torch.Tensor) and item.dim() == 3:
        return item, None
    if isinstance(item, torch.Tensor):
        return None, ("ValueError", f"item {index} of the dataset must be an image [C, H, W] or an (image, label) "
                                    f"pair, got a {item.dim()}-D tensor of shape {list(item.shape)}")
    hint = ""
    if type(item).__module__.startswith("PIL"):
        hint = (" (a PIL image: give the Dataset a transform to a float tensor, e.g. torchvision.transforms.v2."
                "Compose([ToImage(), ToDtype(torch.float32, scale=True)]), or use deconvcuda.data.ImageFolder)")
    return None, ("TypeError", f"item {index} of the dataset must be an image tensor [C, H, W] or an "
                               f"(image, label) pair, got {type(item).__name__}{hint}")


def _collate_items(items):
    """``[(index, item, problem)]`` -> ``(indices (ints), images [B, C, H, W] or None, end, skipped
    messages, error)``. Runs in the worker processes; problems travel back as values, so that the
    main process reports them with the caller's name (an exception would arrive wrapped)."""
    end = items[-1][0] + 1
    indices, images, skipped = [], [], []
    for index, item, problem in items:
        if problem is not None:
            skipped.append(problem)
            continue
        image, error = _dataset_image(item, index)
        if error is not None:
            return [], None, end, skipped, error
        if images and image.shape != images[0].shape:
            return [], None, end, skipped, (
                "ValueError", f"every image must have the shape of the first, {list(images[0].shape)} (image "
                              f"{indices[0]}); image {index} has {list(image.shape)}: resize them to one size "
                              f"(deconvcuda.data.ImageFolder(..., size=...) does)")
        indices.append(index)
        images.append(image)
    # default_collate stacks straight into shared memory in a worker process (what the batch travels
    # through anyway). A tensor made in the worker's own memory and shared on the way out is never
    # given back there: the worker would grow by a batch per batch. The indices travel as ints.
    stacked = default_collate(images) if images else None
    return indices, stacked, end, skipped, None


def data_source(data, caller: str) -> DataSource:
    """Classify ``data`` (see the module's docstring); a clear error for what cannot be data."""
    if isinstance(data, torch.Tensor):
        if data.dim() != 4:
            raise ValueError(f"{caller}: data as a tensor must be [N, C, H, W], got {data.dim()}-D with shape "
                             f"{list(data.shape)}")
        return DataSource(data, "tensor", data.shape[0], caller)
    if is_map_dataset(data):
        return DataSource(data, "dataset", len(data), caller)
    if isinstance(data, (str, bytes)) or not hasattr(data, "__iter__"):
        raise TypeError(f"{caller}: data must be a tensor [N, C, H, W], a map-style Dataset, a list of tensors or "
                        f"an iterable of batches (e.g. a DataLoader), got {type(data).__name__}")
    return DataSource(data, "stream", count_images(data), caller)


# --------------------------------------------------------------------------------------------- #
# Fetching chosen images again
# --------------------------------------------------------------------------------------------- #

def gather_images(data, indices, batch_size: int = 64) -> torch.Tensor:
    """The images with the given dataset indices, ``[len(indices), C, H, W]`` in the order given
    (repeats allowed): indexed directly in a tensor or a map-style Dataset, else read in one more
    pass over ``data`` that stops once all are found."""
    caller = "gather_images"
    _check_batch_size(batch_size, caller)
    if isinstance(indices, torch.Tensor):
        indices = indices.flatten().tolist()
    indices = [int(i) for i in indices]
    if any(i < 0 for i in indices):
        raise IndexError(f"{caller}: indices must be non-negative, got {min(indices)}")
    if isinstance(data, torch.Tensor):
        if data.dim() != 4:
            raise ValueError(f"{caller}: data as a tensor must be [N, C, H, W], got {data.dim()}-D")
        if indices and max(indices) >= data.shape[0]:
            raise IndexError(f"{caller}: index {max(indices)} is out of range for data of {data.shape[0]} images")
        return data[torch.tensor(indices, dtype=torch.long, device=data.device)]
    if not indices:
        raise ValueError(f"{caller}: no indices given, so the image shape is unknown")
    if is_map_dataset(data):
        if max(indices) >= len(data):
            raise IndexError(f"{caller}: index {max(indices)} is out of range for a dataset of {len(data)} images")
        found = {}
        for index in dict.fromkeys(indices):
            image, error = _dataset_image(data[index], index)
            if error is not None:
                raise _error_type(error)(f"{caller}: {error[1]}")
            found[index] = image
        return torch.stack([found[i] for i in indices])
    wanted = sorted(set(indices))
    found = {}
    seen = 0
    position = 0  # next entry of `wanted` to look for
    for first, images in iter_batches(data, batch_size, caller):
        seen = first + images.shape[0]
        while position < len(wanted) and wanted[position] < seen:
            found[wanted[position]] = images[wanted[position] - first]
            position += 1
        if position == len(wanted):
            break
    if position < len(wanted):
        raise IndexError(f"{caller}: index {wanted[position]} is out of range for data of {seen} images")
    return torch.stack([found[i] for i in indices])
