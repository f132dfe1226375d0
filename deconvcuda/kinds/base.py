"""The base of every layer kind, the registry that recognises them in an fx graph, and the context
their reverses run in.

A kind is ONE class that knows everything about one kind of layer: how it is recognised (its module
types, functions and Tensor methods, and how their arguments read), its output shape, its forward
(and what the reverse needs kept from it), its reverse, how it grows a receptive-field window and
an occlusion cone, and how ``describe`` and ``strict=True`` see it. Adding a kind is one class with
``@register`` (and one sample in tests/test_kinds.py); how rectifiers are reversed is the rule's
business (deconvcuda.rules).

Inputs of a node are the graph nodes its call reads: data (computed from the images, and reversed)
and values (computed from parameters and shapes only: a parameter, ``x.size(0)``, a class token
expanded to the batch). A value's per-image "shape" is a ``Constant`` holding what it is at the
shape pass's nominal batch sizes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, List, Optional, Sequence, Tuple, Type

import torch

from ..geometry import pair
from ..rules import Rule
from ..windows import Cone, Windows

__all__ = ["Kind", "register", "Call", "At", "Keeper", "Kept", "MODULE_KINDS", "FUNCTION_KINDS", "METHOD_KINDS", "KINDS",
           "Shape", "Constant", "Unrepresentable", "NotNative", "function_name", "pair", "numel", "vjp", "linear_vjp", "is_shape"]

Shape = Tuple[int, ...]  # one image's shape: (C, H, W), (T, D) or (F,)

MODULE_KINDS: Dict[type, Type["Kind"]] = {}
FUNCTION_KINDS: Dict[Callable, Type["Kind"]] = {}
METHOD_KINDS: Dict[str, Type["Kind"]] = {}
#: Every registered kind, in registration order.
KINDS: List[Type["Kind"]] = []


def register(kind: Type["Kind"]) -> Type["Kind"]:
    """Class decorator: make the graph reader recognise ``kind``'s modules, functions and methods."""
    for module_type in kind.modules:
        MODULE_KINDS[module_type] = kind
    for function in kind.functions:
        FUNCTION_KINDS[function] = kind
    for method in kind.methods:
        METHOD_KINDS[method] = kind
    KINDS.append(kind)
    return kind


class Unrepresentable(ValueError):
    """The graph reader cannot represent this part of the model as nodes of per-image tensors (the
    batch moves from dim 0, a tuple of tensors is passed on whole, ...). ``project`` and the others
    then take the autograd path, which is exact for every model."""


class NotNative(Exception):
    """Raised by a kind's recognition for a form it does not reverse natively (``Call.unsupported``)."""


@dataclass(frozen=True)
class Constant:
    """A value input's stand-in in the shape pass: what it is at each nominal batch size."""

    at_batch: Dict[int, Any] = field(hash=False, compare=False)

    def any(self) -> Any:
        return next(iter(self.at_batch.values()))


def is_shape(shape) -> bool:
    """Whether an input's shape entry is a data input's per-image shape (not a Constant)."""
    return not isinstance(shape, Constant)


def numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def vjp(function: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], g: torch.Tensor,
        wide: bool = False) -> List[Optional[torch.Tensor]]:
    """The vector-Jacobian product of ``function`` at ``inputs`` (a list of tensors, None where an
    argument needs no gradient) with cotangent ``g``: autograd's, the op's exact gradient. ``wide``
    computes in float32 for float16/bfloat16 (ops without half kernels on the CPU), rounded back."""
    dtype = g.dtype
    compute = torch.promote_types(dtype, torch.float32) if wide else dtype
    with torch.enable_grad():
        leaves = [None if x is None else x.detach().to(compute).requires_grad_(True) for x in inputs]
        out = function(*leaves)
        wanted = [x for x in leaves if x is not None]
        grads = torch.autograd.grad(out, wanted, g.to(compute), allow_unused=True)
    grads = iter(grads)
    result = []
    for x in leaves:
        if x is None:
            result.append(None)
            continue
        grad = next(grads)
        result.append(torch.zeros_like(x, dtype=dtype) if grad is None else grad.to(dtype))
    return result


def linear_vjp(function: Callable[[torch.Tensor], torch.Tensor], in_shape, g: torch.Tensor) -> torch.Tensor:
    """The gradient of a linear ``function`` (pools, means, pads, slices, permutes) at any point:
    autograd's at zero (one zero broadcast to the per-image ``in_shape``, for g's batch: nothing is
    allocated for it)."""
    return vjp(function, [g.new_zeros(()).expand((g.shape[0],) + tuple(in_shape))], g)[0]


def _row(kept, image: int) -> torch.Tensor:
    """One image's row of a kept tensor (or ``Kept`` map), [1, ...]."""
    return (kept.tensor if isinstance(kept, Kept) else kept)[image:image + 1]


def _vjp_at(function, inputs, per_image, g) -> List[Optional[torch.Tensor]]:
    """vjp over the floating-point per-image inputs (None for the others: values, and integer data
    such as indices computed from the images, which have no gradient)."""
    wanted = [x if image_wise and x.is_floating_point() else None for x, image_wise in zip(inputs, per_image)]

    def call(*leaves):
        return function(*[leaf if leaf is not None else x for leaf, x in zip(leaves, inputs)])

    return vjp(call, wanted, g)


class Call:
    """A function or method call being recognised: its arguments by name, and what the graph reader
    needs back (which fx nodes the node reads). Kinds read it in ``from_call``."""

    def __init__(self, reader, node, names: Sequence[str]):
        self.reader, self.node = reader, node
        self.args: Dict[str, Any] = dict(zip(names, node.args))
        self.args.update(node.kwargs)
        self.inputs: List[Any] = []  # fx nodes, in the order the kind's forward takes them

    def get(self, name: str, default=None):
        return self.args.get(name, default)

    def data(self, name: str = "input"):
        """Declare argument ``name`` a data input (a tensor computed from the images)."""
        return self._input(self.reader.data_input(self.node, self.args.get(name)))

    def _input(self, value):
        """``value`` (a graph node) as the next input: the node whose result the call really reads,
        after any in-place change (``a.relu_()``), as ``template`` records it, so that both name one input."""
        self.inputs.append(self.reader.current(value, self.node))
        return self.inputs[-1]

    def is_data(self, value) -> bool:
        """Whether ``value`` (an argument) is computed from the images."""
        return self.reader.is_data(value)

    def operand(self, value) -> Any:
        """An argument that may be data, a value computed in the forward (a graph node) or a literal:
        returns ``("input", i)`` for the i-th input (declared here), or ``("literal", value)``."""
        if self.reader.is_node(value):
            self._input(value)
            return ("input", len(self.inputs) - 1)
        return ("literal", value)

    def template(self):
        """The whole call, re-playable on the node's inputs: every graph node among its arguments
        (data or value, however deeply nested) becomes an input, in order."""
        return self.reader.template_of(self.node, self.inputs)

    def parameter(self, name: str, optional: bool = False) -> Optional[torch.Tensor]:
        return self.reader.parameter(self.node, self.args.get(name), name, optional)

    def fail(self, problem: str):
        """A call that cannot be projected in any way (it reads no images, or another input)."""
        self.reader.fail(self.node, problem)

    def unsupported(self, problem: str):
        """A form this kind does not reverse natively: the call then takes its gradient as a general
        op (or, with strict=True, is refused with ``problem``)."""
        raise NotNative(problem)


class Kept:
    """A map [N, C, H, W] the forward kept for the reverse, as the forward made it (whatever its memory
    format), and its rows [N, H, W, C] (one contiguous row of C values per image position, so that any
    projection's window is a gather of rows), made on first use: only reverses on windows need them."""

    __slots__ = ("tensor", "_rows")

    def __init__(self, tensor: torch.Tensor):
        self.tensor, self._rows = tensor, None

    def rows(self) -> torch.Tensor:
        if self._rows is None:
            self._rows = self.tensor.permute(0, 2, 3, 1).contiguous()
        return self._rows


class Keeper:
    """What a forward that feeds a reverse keeps: each kind asks it for the kernels and the rule, and
    stores what its reverse reads."""

    def __init__(self, kernels, rule: Rule, lrn: str):
        self.kernels, self.rule, self.lrn = kernels, rule, lrn
        self.saved: Dict[Any, Any] = {}  # per graph node, what its kind kept

    @staticmethod
    def keep(t: torch.Tensor):
        """A tensor kept per image: maps as ``Kept`` (their windows can be cropped), others as they are."""
        return Kept(t) if t.dim() == 4 else t


@dataclass
class At:
    """Where a reverse runs: the node's shapes, what its forward kept, the projections of this chunk
    (``images``: each one's row of the forward batch), their windows of the node's OUTPUT (None for
    full maps), the options of the call, and the node's value inputs at this chunk's batch (None where
    an input is data, or its forward value serves)."""

    in_shapes: List[Any]
    out_shape: Shape
    saved: Any
    images: torch.Tensor
    windows: Optional[Windows]
    rule: Rule
    lrn: str
    kernels: Any
    values: Optional[List[Any]] = None
    #: The chunk's projections grouped by image: (image, start, stop), consecutive (the engine sorts
    #: projections by image), so a kept tensor's row serves a whole run by broadcasting.
    runs: Optional[List[Tuple[int, int, int]]] = None

    def value(self, index: int, kept: Any) -> Any:
        """Value input ``index`` for this chunk: recomputed for its batch where it depends on the
        batch size, else ``kept`` (what the forward had)."""
        if self.values is not None and self.values[index] is not None:
            return self.values[index]
        return kept

    def multiply(self, g: torch.Tensor, kept) -> torch.Tensor:
        """``g`` times ``kept`` (a per-image tensor, or a ``Kept`` map) aligned with it: each
        projection's image's row, on windows its window (a kept tensor that is no map is broadcast
        over the positions, whole). On whole maps it runs run by run, broadcasting one kept row over
        the run, so the kept tensor is never copied per projection."""
        if self.windows is not None or self.runs is None:
            return g * self.map_of(kept)
        if len(self.runs) == 1:
            return g * _row(kept, self.runs[0][0])
        dtype = (kept.tensor if isinstance(kept, Kept) else kept).dtype
        out = torch.empty_like(g, dtype=torch.promote_types(g.dtype, dtype))
        for image, start, stop in self.runs:
            torch.mul(g[start:stop], _row(kept, image), out=out[start:stop])
        return out

    def vjp(self, function: Callable[..., torch.Tensor], kept: Sequence[Any], per_image: Sequence[bool],
            g: torch.Tensor) -> List[Optional[torch.Tensor]]:
        """autograd's gradient of ``function(*inputs)`` at each per-image input, for the projections of
        this chunk: ``kept[i]`` is the forward's input i, per image ([N, ...], or a ``Kept`` map) where
        ``per_image[i]``, else passed as it is (a value). On whole maps it runs once per run of
        projections of one image, that image's inputs broadcast over the run (no copy per projection);
        on windows, kept maps are cropped to them and other per-image inputs taken whole."""
        if self.windows is not None or self.runs is None:
            inputs = [self.map_of(k) if image_wise else k for k, image_wise in zip(kept, per_image)]
            return _vjp_at(function, inputs, per_image, g)
        parts: List[List[torch.Tensor]] = []
        for image, start, stop in self.runs:
            inputs = []
            for k, image_wise in zip(kept, per_image):
                if image_wise:
                    k = _row(k, image)
                    k = k.expand((stop - start,) + tuple(k.shape[1:]))
                inputs.append(k)
            parts.append(_vjp_at(function, inputs, per_image, g[start:stop]))
        if len(parts) == 1:
            return parts[0]
        return [None if grads[0] is None else torch.cat(grads) for grads in zip(*parts)]

    def map_of(self, saved, windows: Optional[Windows] = "output") -> torch.Tensor:
        """A kept tensor aligned with the gradient, a row per projection (its image's): a ``Kept`` map
        [N, C, H, W] as [P, C, h, w] cropped to ``windows`` (default: the output windows) or whole;
        another tensor whole."""
        if not isinstance(saved, Kept):
            return saved[self.images]
        windows = self.windows if windows == "output" else windows
        if windows is None:
            return saved.tensor[self.images]
        return windows.crop(saved.rows(), self.images)


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
    #: Whether the output at a position reads only the inputs at that position (activations,
    #: normalisations over channels, additions): occlusion cones and fields pass through unchanged.
    pointwise: ClassVar[bool] = False
    #: What the layer reads outside its input map (occlusion windows): zero padding for most.
    padding_value: ClassVar[float] = 0.0
    #: How the reverse is computed, for ``describe``: "kernel" (a native kernel), "rule" (the
    #: rectifiers) or "gradient" (the layer's exact gradient).
    reversal: ClassVar[str] = "gradient"
    #: Whether the kind is one of the paper's reverse operations (docs/DESIGN.md, section 1), which
    #: ``strict=True`` keeps; an instance may narrow it (``in_table``).
    paper: ClassVar[bool] = True

    # -- recognition ------------------------------------------------------------------------------ #

    @classmethod
    def from_module(cls, module: torch.nn.Module, call: Call) -> "Kind":
        call.data("input")
        return cls()

    @classmethod
    def from_call(cls, call: Call) -> "Kind":
        call.data("input")
        return cls()

    def input_channels(self):
        """The channel count this layer takes, where it fixes one (a conv's in_channels), else None:
        how the engine tells the user what images the model expects."""
        return None

    def fused_chain(self, node, targets) -> list:
        """The nodes below ``node`` whose reverse one native kernel call does with its own (a max pool's
        ReLU and conv), where nothing else needs their gradients; [] for most kinds."""
        return []

    def outside_table(self):
        """Why this layer, as called, is not one of the paper's reverse operations (docs/DESIGN.md, section 1,
        all ``strict=True`` keeps), or None where it is one."""
        return None if self.paper else "is not one of the paper's reverse operations"

    @property
    def op(self) -> str:
        """The op this layer is, for ``describe``'s list of ops that take their gradient (the class of
        op, not this call: ``GELU``, ``torch.chunk``, ``MultiheadAttention``)."""
        return self.__dict__.get("_op") or getattr(self, "label", self.name)

    def describe_reverse(self, rule: Rule) -> str:
        """How ``describe`` says this layer is reversed under ``rule``."""
        return {"kernel": "native kernel", "rule": f"the rule ({rule.name})"}.get(self.reversal, "its gradient")

    # -- shape and forward ------------------------------------------------------------------------ #

    def output_shape(self, *shapes) -> Shape:
        return shapes[0]

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__}.forward")

    def forward_keeping(self, inputs: Sequence[torch.Tensor], keeper: Keeper) -> Tuple[torch.Tensor, Any]:
        """The forward, and what this kind's reverse will read (None: nothing)."""
        return self.forward(*inputs), None

    # -- reverse ---------------------------------------------------------------------------------- #

    def reverse(self, g: torch.Tensor, at: At) -> List[Optional[torch.Tensor]]:
        """The gradient at each input from ``g`` at the output (None for value inputs); on windows
        when ``at.windows`` is set (then input i's window is ``input_windows(...)[i]``)."""
        raise NotImplementedError(f"{type(self).__name__}.reverse")

    def grow(self, windows: Windows) -> Windows:
        """The input windows that the output ``windows`` read (pointwise kinds: the same)."""
        return windows

    def input_windows(self, windows: Windows, in_shapes: Sequence[Any]) -> List[Optional[Windows]]:
        """Each input's windows for the output ``windows`` (None: that input's gradient is a whole
        map, as for an operand broadcast over the positions)."""
        grown = self.grow(windows)
        return [grown if is_shape(shape) else None for shape in in_shapes]

    def field(self, windows: Windows, in_shape: Optional[Shape]) -> Optional[Windows]:
        """The input windows for receptive fields (``in_shape``: the input's per-image shape, where
        known); None where every output position sees the whole input."""
        return self.grow(windows) if self.windowed else None

    # -- occlusion -------------------------------------------------------------------------------- #

    def cone(self, cones: Sequence[Optional[Cone]], size: Sequence[int]) -> Optional[Cone]:
        """Where an occluder can change the output (``size``: its (h, w)), from where it changed each
        input (None for a value input or a whole map). None: anywhere (the layer then runs whole)."""
        if not self.pointwise:
            return None
        changed = [cone for cone in cones if cone is not None]
        if not changed:
            return None
        cone = changed[0]
        for other in changed[1:]:
            cone = cone.union(other)
        return cone

    def forward_unpadded(self, x: torch.Tensor, windows: Windows, rows: torch.Tensor, in_size) -> torch.Tensor:
        """The forward on an input window ``x`` that already holds the layer's padding (kinds that are
        not pointwise but have a cone): ``windows`` are its output windows per occluder position,
        ``rows`` each batch row's position, ``in_size`` the input map's (h, w)."""
        raise NotImplementedError(f"{type(self).__name__}.forward_unpadded")

    # -- helpers ---------------------------------------------------------------------------------- #

    def cast(self, tensor: Optional[torch.Tensor], like: torch.Tensor) -> Optional[torch.Tensor]:
        """A parameter in ``like``'s dtype and device, converted once per kind object (one per traced
        graph) and dtype/device; the model's own tensor is never written (and, where it already has
        that dtype and device, it is the model's tensor itself, so the forward computes what the
        model does)."""
        if tensor is None:
            return None
        if tensor.dtype == like.dtype and tensor.device == like.device:
            return tensor.detach()
        cache = self.__dict__.setdefault("_cast_cache", {})
        key = (id(tensor), like.dtype, like.device)
        if key not in cache:
            cache[key] = tensor.detach().to(device=like.device, dtype=like.dtype)
        return cache[key]

    @staticmethod
    def need_spatial(shape: Shape) -> None:
        """Shape errors are raised without the node's name: the graph reader adds it."""
        if len(shape) != 3:
            raise ValueError(f"needs a [N, C, H, W] input, got [N, {', '.join(map(str, shape))}]")


def function_name(function) -> str:
    """How a user writes ``function``: ``F.gelu`` (also for builtins such as torch._C._nn.gelu),
    ``torch.cat``, ``operator.mul``, ``+``."""
    import operator

    import torch.nn.functional as F

    if function in (operator.add, operator.iadd):
        return "+" if function is operator.add else "+="
    module = getattr(function, "__module__", None) or ""
    name = getattr(function, "__name__", repr(function))
    if module.startswith("torch.nn.functional") or getattr(F, name, None) is function:
        return f"F.{name}"
    if getattr(torch, name, None) is function:
        return f"torch.{name}"
    if module in ("_operator", "operator"):
        return f"operator.{name}"
    return f"{module}.{name}" if module else name
