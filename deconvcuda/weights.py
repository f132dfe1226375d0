"""Weights and checkpoint files: the one reader of state_dicts and the one check that they fit a model.

    state = read_state_dict("alexnet.pth", "deconvcuda.models.build", "weights file 'alexnet.pth'")
    load_state_dict(model, state, "deconvcuda.models.build", "weights file 'alexnet.pth'", "model 'alexnet'")

``models.build(..., weights=)``, ``evolution``'s checkpoints and the command line all read files here,
so a file that is not a state_dict gets the same message wherever it is given: what it holds instead
(a whole pickled model, a truncated or foreign file, a single tensor) and what to save.
Files are read with ``torch.load(weights_only=True)``: no code from a file ever runs.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Callable, List, Optional, Sequence, Union

import torch
from torch import nn

__all__ = ["read_state_dict", "check_fits", "load_state_dict", "fit_problems", "SAVE_ADVICE"]

SAVE_ADVICE = "save the weights alone with `torch.save(model.state_dict(), path)`"
#: Keys under which training checkpoints keep the model's state_dict.
CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model")


def _advice() -> str:
    return SAVE_ADVICE[0].upper() + SAVE_ADVICE[1:]


def _file_kind(path: str) -> str:
    """What the first bytes of a file say it is, in words (for errors about files that are not ours)."""
    with open(path, "rb") as file:
        head = file.read(64)
    size = os.path.getsize(path)
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive (the format torch.save writes)"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a pickle (torch.save's legacy format)"
    if head.startswith(b"\x89HDF\r\n\x1a\n"):
        return "an HDF5 file (Keras or h5py weights, not PyTorch's)"
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < size:
        return ("a safetensors file (read it with safetensors.torch.load_file, load that into the model, then "
                f"{SAVE_ADVICE})")
    if not head:
        return "an empty file"
    return f"neither the zip archive torch.save writes nor a pickle: its {size} bytes start with {head[:16]!r}"


def _read_error(path: str, error: Exception, caller: str, where: str) -> ValueError:
    """A ValueError that says what the file holds instead of a state_dict, and what to save."""
    prefix = f"{caller}: cannot read {where}"
    text = str(error)
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if found:  # a pickled object of a class outside torch's allowlist: most often a whole model
        return ValueError(
            f"{prefix}: it holds a pickled object of class {found.group(1)} (a whole model saved with "
            f"torch.save(model)?), not a state_dict. Such a file stores the class by reference and loads only by "
            f"running code from the file (weights_only=False), which deconvcuda never does. Where the model was "
            f"saved, {SAVE_ADVICE}; to convert this file, only if you trust it: `torch.save(torch.load({path!r}, "
            f"weights_only=False).state_dict(), 'weights.pth')`")
    kind = _file_kind(path)
    if kind.startswith(("a zip archive", "a pickle")):
        return ValueError(
            f"{prefix}: it is {kind}, but cut short or damaged ({os.path.getsize(path)} bytes; "
            f"{text.split('. ')[0].rstrip('.') if text else type(error).__name__}). Copy it again, or {SAVE_ADVICE}")
    return ValueError(f"{prefix}: it is not a PyTorch weights file: {kind}. {_advice()}")


def _all_tensors(value) -> bool:
    return isinstance(value, Mapping) and all(isinstance(v, torch.Tensor) for v in value.values())


def _unwrapped(state):
    """A training checkpoint's state_dict (``{"state_dict": ...}``, ``{"model": ...}``), else ``state``."""
    if isinstance(state, Mapping) and not _all_tensors(state):
        inner = next((state[key] for key in CHECKPOINT_KEYS if _all_tensors(state.get(key))), None)
        if inner is not None:
            return inner
    return state


def _what_it_holds(state) -> str:
    if isinstance(state, Mapping):
        keys = [str(key) for key in state][:8]
        return (f"a {type(state).__name__} with keys {', '.join(map(repr, keys))}" + (" ..." if len(state) > 8 else "")
                + " that are not all tensors; where a training checkpoint holds the weights under some key, save "
                  "just those: `torch.save(checkpoint[KEY], path)`")
    if isinstance(state, torch.Tensor):
        return f"a single tensor of shape {list(state.shape)}"
    return f"a {type(state).__name__}"


def read_state_dict(source: Union[str, os.PathLike, Mapping], caller: str, where: Optional[str] = None) -> Mapping:
    """The state_dict in ``source``: a path to a file (``torch.save(model.state_dict(), path)``; also a
    training checkpoint that keeps it under "state_dict", "model_state_dict" or "model") or a mapping
    given as it is. DataParallel's ``module.`` prefix is removed.

    caller: the function errors name; where: how they name the source (default "weights file
    '<path>'"). A missing path is a FileNotFoundError, a folder an IsADirectoryError, a file that holds
    no state_dict a ValueError saying what it holds, a mapping of other things a TypeError."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        where = where or f"weights file {path!r}"
        if not os.path.exists(path):
            raise FileNotFoundError(f"{caller}: {where} does not exist")
        if not os.path.isfile(path):
            raise IsADirectoryError(f"{caller}: {where} is not a file")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # pickle, zip and weights_only errors come in many types
            raise _read_error(path, error, caller, where) from None
        state = _unwrapped(state)
        if not _all_tensors(state):
            raise ValueError(f"{caller}: {where} does not hold a state_dict (a mapping from parameter names to "
                             f"tensors): it holds {_what_it_holds(state)}. {_advice()}")
    else:
        where = where or "the state_dict"
        state = _unwrapped(source)
        if not _all_tensors(state):
            raise TypeError(f"{caller}: {where}: expected a state_dict (a mapping from parameter names to tensors) or a "
                            f"path to one, got {type(source).__name__}")
    if state and all(key.startswith("module.") for key in state):  # saved from DataParallel / DDP
        state = {key[len("module."):]: value for key, value in state.items()}
    return state


def fit_problems(model: nn.Module, state: Mapping) -> List[str]:
    """What keeps ``state`` from loading into ``model`` exactly: missing keys, unexpected keys and
    shapes that differ, each a phrase; empty where it fits."""
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    mismatched = [f"{key} {list(state[key].shape)} vs {list(value.shape)}" for key, value in expected.items()
                  if key in state and state[key].shape != value.shape]

    def some(items: Sequence[str]) -> str:
        return ", ".join(items[:5]) + (f" (and {len(items) - 5} more)" if len(items) > 5 else "")

    return [f"{label}: {some(items)}" for label, items in (
        ("missing keys", missing), ("unexpected keys", unexpected), ("shapes (file vs model)", mismatched)) if items]


def check_fits(model: nn.Module, state: Mapping, caller: str, where: str, target: Optional[str] = None, *,
               advice: Optional[str] = None, suggest: Optional[Callable[[Mapping], str]] = None) -> None:
    """A ValueError that lists what does not fit where ``state`` would not load into ``model`` exactly.

    target: how the message names the model (default "the model (<class>)"); advice: what to do
    (default: save the state_dict of this model); suggest: a function of the state that adds what
    it does fit (``models.build`` names the architectures it fits)."""
    problems = fit_problems(model, state)
    if problems:
        target = target or f"the model ({type(model).__name__})"
        found = f"It holds {len(state)} tensors for {type(model).__name__}'s {len(model.state_dict())}"
        if suggest is not None:
            found += suggest(state)
        raise ValueError(f"{caller}: {where} does not fit {target}; " + "; ".join(problems) + f". {found}. "
                         + (advice or f"From this model, {SAVE_ADVICE}"))


def load_state_dict(model: nn.Module, state: Mapping, caller: str, where: str, target: Optional[str] = None, *,
                    advice: Optional[str] = None, suggest: Optional[Callable[[Mapping], str]] = None) -> None:
    """Load ``state`` into ``model`` exactly, after :func:`check_fits` (same arguments)."""
    check_fits(model, state, caller, where, target, advice=advice, suggest=suggest)
    model.load_state_dict(state, strict=True)
