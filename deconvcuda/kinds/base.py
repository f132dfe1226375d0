"""The base of every layer kind, the registry that recognises them in an fx graph, and the context
their reverses run in.

A kind is ONE class that knows everything about one kind of layer: how it is recognised (its module
types, functions and Tensor methods, and how their arguments read), its output shape, its forward
(and what the reverse needs kept from it), its reverse for each rule, and how it grows a
receptive-field window. Adding a kind is one class with ``@register``; rules live in deconvcuda.rules.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Dict, List, Optional, Sequence, Tuple, Type

import torch

from ..rules import Rule
from ..windows import Windows

__all__ = ["Kind", "register", "Call", "At", "Keeper", "MODULE_KINDS", "FUNCTION_KINDS", "METHOD_KINDS",
           "Shape", "pair", "numel"]

Shape = Tuple[int, ...]  # one image's shape: (C, H, W) or (F,)
Pair = Tuple[int, int]

MODULE_KINDS: Dict[type, Type["Kind"]] = {}
FUNCTION_KINDS: Dict[Callable, Type["Kind"]] = {}
METHOD_KINDS: Dict[str, Type["Kind"]] = {}


def register(kind: Type["Kind"]) -> Type["Kind"]:
    """Class decorator: make the graph reader recognise ``kind``'s modules, functions and methods."""
    for module_type in kind.modules:
        MODULE_KINDS[module_type] = kind
    for function in kind.functions:
        FUNCTION_KINDS[function] = kind
    for method in kind.methods:
        METHOD_KINDS[method] = kind
    return kind


def pair(value) -> Pair:
    if isinstance(value, int):
        return (value, value)
    value = tuple(value)
    return (value[0], value[0]) if len(value) == 1 else (value[0], value[1])


def numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


class Call:
    """A function or method call being recognised: its arguments by name, and what the graph reader
    needs back (which arguments are the data inputs). Kinds read it in ``from_call``."""

    def __init__(self, reader, node, names: Sequence[str]):
        self.reader, self.node = reader, node
        self.args: Dict[str, Any] = dict(zip(names, node.args))
        self.args.update(node.kwargs)
        self.inputs: List[Any] = []  # fx nodes, in the order the kind's forward takes them

    def get(self, name: str, default=None):
        return self.args.get(name, default)

    def data(self, name: str = "input"):
        """Declare argument ``name`` a data input (a tensor computed from the images)."""
        self.inputs.append(self.reader.data_input(self.node, self.args.get(name)))
        return self.inputs[-1]

    def data_each(self, name: str) -> List[Any]:
        """Declare every item of the list argument ``name`` a data input (``torch.cat``'s tensors)."""
        items = self.args.get(name)
        if not isinstance(items, (list, tuple)) or not items:
            self.fail(f"takes {name}={items!r}; a non-empty list of tensors is expected")
        for item in items:
            self.inputs.append(self.reader.data_input(self.node, item))
        return self.inputs[-len(items):]

    def parameter(self, name: str, optional: bool = False) -> Optional[torch.Tensor]:
        return self.reader.parameter(self.node, self.args.get(name), name, optional)

    def fail(self, problem: str):
        self.reader.fail(self.node, problem)


class Keeper:
    """What a forward that feeds a reverse keeps: each kind asks it for the kernels and the rule, and
    stores what its reverse reads channels-last ([N, H, W, C]), so that any projection's window of
    it is a gather of contiguous rows."""

    def __init__(self, kernels, rule: Rule, lrn: str):
        self.kernels, self.rule, self.lrn = kernels, rule, lrn
        self.saved: Dict[Any, Any] = {}  # per graph node, what its kind kept

    @staticmethod
    def rows(t: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> [N, H, W, C] contiguous (one row of C values per image position)."""
        return t.permute(0, 2, 3, 1).contiguous()


@dataclass
class At:
    """Where a reverse runs: the node's shapes, what its forward kept, the projections of this chunk
    (``images``: each one's row of the forward batch), their windows of the node's OUTPUT (None for
    full maps), and the options of the call."""

    in_shapes: List[Shape]
    out_shape: Shape
    saved: Any
    images: torch.Tensor
    windows: Optional[Windows]
    rule: Rule
    lrn: str
    kernels: Any

    def map_of(self, saved: torch.Tensor, windows: Optional[Windows] = "output") -> torch.Tensor:
        """A kept channels-last map as [P, C, h, w] aligned with the gradient: the projections' images,
        cropped to ``windows`` (default: the output windows) or whole."""
        windows = self.windows if windows == "output" else windows
        if windows is None:
            return saved.index_select(0, self.images).permute(0, 3, 1, 2)
        return windows.crop(saved, self.images)


class Kind:
    """One layer kind. Subclasses set the recognition tables and implement what differs."""

    #: The name shown in listings and errors ("Conv2d").
    name: ClassVar[str] = "Layer"
    #: Module types, functions and Tensor method names that are this kind.
    modules: ClassVar[Tuple[type, ...]] = ()
    functions: ClassVar[Tuple[Callable, ...]] = ()
    methods: ClassVar[Tuple[str, ...]] = ()
    #: Positional parameter names of the functions (for methods the first is the tensor itself).
    arguments: ClassVar[Tuple[str, ...]] = ("input",)
    #: Whether the kind leaves no node (Dropout in eval, Identity): its output is its input.
    identity: ClassVar[bool] = False
    #: Whether the reverse can run on receptive-field windows (False: it mixes every position).
    windowed: ClassVar[bool] = True

    # -- recognition ------------------------------------------------------------------------------ #

    @classmethod
    def from_module(cls, module: torch.nn.Module, call: Call) -> "Kind":
        call.data("input")
        return cls()

    @classmethod
    def from_call(cls, call: Call) -> "Kind":
        call.data("input")
        return cls()

    # -- shape and forward ------------------------------------------------------------------------ #

    def output_shape(self, *shapes: Shape) -> Shape:
        return shapes[0]

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__}.forward")

    def forward_keeping(self, inputs: Sequence[torch.Tensor], keeper: Keeper) -> Tuple[torch.Tensor, Any]:
        """The forward, and what this kind's reverse will read (None: nothing)."""
        return self.forward(*inputs), None

    # -- reverse ---------------------------------------------------------------------------------- #

    def reverse(self, g: torch.Tensor, at: At) -> List[Optional[torch.Tensor]]:
        """The gradient at each input from ``g`` at the output, under ``at.rule``; on windows when
        ``at.windows`` is set (then each input's window is ``grow(at.windows)``)."""
        raise NotImplementedError(f"{type(self).__name__}.reverse")

    def grow(self, windows: Windows) -> Windows:
        """The input windows that the output ``windows`` read (pointwise kinds: the same)."""
        return windows

    def field(self, windows: Windows, in_shape: Optional[Shape]) -> Optional[Windows]:
        """The input windows for receptive fields (``in_shape``: the input's per-image shape, where
        known); None where every output position sees the whole input."""
        return self.grow(windows) if self.windowed else None

    # -- helpers ---------------------------------------------------------------------------------- #

    def cast(self, tensor: Optional[torch.Tensor], like: torch.Tensor) -> Optional[torch.Tensor]:
        """A parameter in ``like``'s dtype and device, converted once per kind object (one per traced
        graph) and dtype/device; the model's own tensor is never written."""
        if tensor is None:
            return None
        cache = self.__dict__.setdefault("_cast_cache", {})
        key = (id(tensor), like.dtype, like.device)
        if key not in cache:
            cache[key] = tensor.detach().to(device=like.device, dtype=like.dtype)
        return cache[key]

    @staticmethod
    def need_spatial(shape: Shape) -> None:
        """Shape errors are raised without the node's name: the graph reader adds it."""
        if len(shape) != 3:
            raise ValueError(f"needs a [N, C, H, W] input, got a flat [N, {shape[0]}] one")
