"""torch.distributed for the scan, the figures and the command line: the one home of the process
group, sharding, gathering and the protocol for a failure on one rank.

    rank, world = process_group()                  # (0, 1) without a process group
    start, stop = part(0, count, rank, world, batch_size)
    results = share(lambda: work(), "visualize")   # every rank's result, on every rank, in rank order

``share`` is the protocol every collective step follows: each rank runs its work, and every rank
meets in one all-gather, the failed ones too, so that a failure on one rank is raised on every rank
(its own error where it failed, else "<caller>: rank r of w failed: <message>" of the same type)
instead of leaving the others waiting forever. ``torchrun_group`` opens the process group that
``python -m torch.distributed.run ... -m deconvcuda ...`` asks for.
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator, List, Optional, Tuple, TypeVar

import torch

__all__ = ["process_group", "part", "share", "torchrun_group", "REPORTED_ERRORS"]

T = TypeVar("T")

#: The exception types a failure on another rank is raised as (by name); others become RuntimeError.
REPORTED_ERRORS = {"ValueError": ValueError, "TypeError": TypeError, "IndexError": IndexError,
                   "FileNotFoundError": FileNotFoundError, "NotADirectoryError": NotADirectoryError}


def process_group() -> Tuple[int, int]:
    """``(rank, world_size)`` of the initialized default process group, ``(0, 1)`` without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def part(start: int, stop: int, index: int, parts: int, batch_size: int) -> Tuple[int, int]:
    """The ``index``-th of ``parts`` contiguous, nearly equal parts of ``range(start, stop)``.

    Made of whole batches of ``batch_size`` counted from ``start`` where there are at least
    ``parts`` batches: then every batch holds the images it would hold in one process's scan, so
    the forward rounds alike and the merged result equals one process's bit for bit. With fewer
    batches than parts, nearly equal runs of images instead (no part is left without work)."""
    count = stop - start
    whole_batches = -(-count // batch_size)
    if whole_batches >= parts:
        first, last = whole_batches * index // parts, whole_batches * (index + 1) // parts
        return start + first * batch_size, min(stop, start + last * batch_size)
    return start + count * index // parts, start + count * (index + 1) // parts


def _all_gather(payload) -> list:
    import torch.distributed as dist

    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, payload)
    return gathered


def share(work: Callable[[], T], caller: str, *, world: Optional[int] = None) -> List[T]:
    """Run ``work()`` on this rank and return every rank's result, in rank order, on every rank.

    Where ``work`` raises on any rank, every rank raises: the failed rank its own error, the others
    "<caller>: rank r of w failed: <message>" (the first failed rank's; its type where it is one of
    REPORTED_ERRORS, else RuntimeError). world: the ranks taking part (default the process group's);
    1 runs ``work`` alone and lets its errors through."""
    if world is None:
        world = process_group()[1]
    if world == 1:
        return [work()]
    error = None
    try:
        result = work()
    except Exception as caught:
        error, result = caught, None
    reports = _all_gather((result, None if error is None else (type(error).__name__, str(error))))
    if error is not None:
        raise error
    for rank, (_, failure) in enumerate(reports):
        if failure is not None:
            kind, message = failure
            raise REPORTED_ERRORS.get(kind, RuntimeError)(f"{caller}: rank {rank} of {world} failed: {message}")
    return [report for report, _ in reports]


@contextlib.contextmanager
def torchrun_group(device: torch.device) -> Iterator[Tuple[torch.device, int, int]]:
    """Under torchrun (``WORLD_SIZE`` > 1 in the environment, no process group yet): a process group
    for the block's lifetime, gloo on the CPU, NCCL on GPUs (rank ``LOCAL_RANK`` on GPU
    ``cuda:LOCAL_RANK`` where ``device`` names no index). Yields ``(device, rank, world_size)``;
    outside torchrun, or where a group exists already, ``(device,) + process_group()``.
    A ValueError where this node has fewer GPUs than torchrun started processes."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1") or "1")
    if world <= 1 or not dist.is_available() or dist.is_initialized():
        yield (device,) + process_group()
        return
    if device.type == "cuda":
        if device.index is None:
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            if local_rank >= torch.cuda.device_count():
                raise ValueError(f"torchrun started {os.environ.get('LOCAL_WORLD_SIZE', '?')} processes on this node "
                                 f"but it has {torch.cuda.device_count()} CUDA device(s): use "
                                 f"--nproc_per_node={torch.cuda.device_count()} or --device cpu")
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield device, dist.get_rank(), dist.get_world_size()
    finally:
        dist.destroy_process_group()
