"""Streaming a dataset as batches, and fetching chosen images from it again.

    for first, images in iter_batches(data, batch_size=64):   # images: [B, C, H, W]; first: dataset index of images[0]
        ...
    picked = gather_images(data, [17, 3, 17], batch_size=64)   # [3, C, H, W], in the order asked

``data`` may be a tensor ``[N, C, H, W]`` (split into ``batch_size`` chunks), a list or tuple of
tensors (each a batch ``[B, C, H, W]`` or a single image ``[C, H, W]``), or any iterable such as a
DataLoader yielding batches or ``(images, labels)`` pairs. Single images are stacked into batches
of ``batch_size``. Dataset indices count images in the order the data yields them, so
``gather_images`` needs data that yields the same images in the same order every time (a tensor,
a list, a DataLoader without shuffling).
"""
from __future__ import annotations

from typing import Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch

__all__ = ["iter_batches", "gather_images", "count_images"]


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


def iter_batches(data, batch_size: int, caller: str = "iter_batches") -> Iterator[Tuple[int, torch.Tensor]]:
    """Yield ``(first_index, images)``: each batch ``[B, C, H, W]`` with the dataset index of its first image."""
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
        raise TypeError(f"{caller}: data must be a tensor [N, C, H, W], a list of tensors or an iterable of batches "
                        f"(e.g. a DataLoader), got {type(data).__name__}") from None
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
    dataset = getattr(data, "dataset", None)  # a DataLoader
    if dataset is not None and hasattr(dataset, "__len__") and getattr(data, "batch_size", None) is not None \
            and not getattr(data, "drop_last", False):
        return len(dataset)
    if isinstance(data, (list, tuple)) and all(isinstance(item, torch.Tensor) for item in data):
        return sum(1 if item.dim() == 3 else item.shape[0] for item in data)
    return None


def gather_images(data, indices, batch_size: int = 64) -> torch.Tensor:
    """The images with the given dataset indices, ``[len(indices), C, H, W]`` in the order given
    (repeats allowed), read in one more pass over ``data`` that stops once all are found."""
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
        return data.index_select(0, torch.tensor(indices, dtype=torch.long, device=data.device))
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
    if not indices:
        raise ValueError(f"{caller}: no indices given, so the image shape is unknown")
    return torch.stack([found[i] for i in indices])
