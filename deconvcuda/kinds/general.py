"""Calls replayed as the model makes them: values (computed from parameters and shapes only), and
the general kind, which takes every op no other kind knows (attention, matmul, softmax, custom
functions, modules) by its exact gradient, autograd's vector-Jacobian product of the call at the
inputs the forward kept.

A ``Template`` is one fx call with its graph-node arguments replaced by references to the node's
inputs (``Ref``), or by another call whose result it indexes (``Nested``: ``attention(x)[0]`` for a
module that returns a tuple). Replaying it on the forward's inputs gives what the model computes.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

import torch
from .base import Constant, Kind, Unrepresentable, function_name, is_shape

__all__ = ["Ref", "Nested", "Template", "Value", "General", "replay_at", "per_image_shape", "shapes_in",
           "NOMINAL_BATCHES"]

#: The batch sizes the shape pass runs value and general calls at (fake tensors, no data): two, so
#: that the batch dim is told apart from a dim of the same size.
NOMINAL_BATCHES = (2, 3)


@dataclass(frozen=True)
class Ref:
    """The node's ``index``-th input."""

    index: int


@dataclass(frozen=True)
class Nested:
    """Another call, replayed on the same inputs, whose result is an argument here."""

    template: "Template"


def _resolve(value, inputs: Sequence[Any], like: Optional[torch.Tensor]):
    if isinstance(value, Ref):
        return _cast(inputs[value.index], like)
    if isinstance(value, Nested):
        return value.template(inputs, like)
    if isinstance(value, (list, tuple)):
        resolved = [_resolve(v, inputs, like) for v in value]
        return type(value)(resolved) if not hasattr(value, "_fields") else type(value)(*resolved)
    if isinstance(value, dict):
        return {k: _resolve(v, inputs, like) for k, v in value.items()}
    if isinstance(value, slice):
        return slice(_resolve(value.start, inputs, like), _resolve(value.stop, inputs, like),
                     _resolve(value.step, inputs, like))
    return value


def _cast(value, like: Optional[torch.Tensor]):
    """A floating-point tensor in ``like``'s dtype and device (the images'), where it differs: the
    engine computes in the images' dtype on their device, whatever the model's parameters are."""
    if like is None or not isinstance(value, torch.Tensor) or not value.is_floating_point():
        return value
    if value.dtype == like.dtype and value.device == like.device:
        return value
    return value.to(dtype=like.dtype, device=like.device)





@dataclass(frozen=True)
class Template:
    """One call of the model's forward: ``op`` is fx's (call_function, call_method, call_module,
    get_attr), ``target`` its target, ``module`` the called module or the attribute's value."""

    op: str
    target: Any
    args: tuple
    kwargs: dict
    module: Any = None
    #: Whether the call changes its first argument in place (x.mul_(y), F.relu(x, inplace=True)):
    #: replays then work on a copy, so kept inputs stay as they were.
    mutates: bool = False
    #: Which of the node's inputs are data (computed from the images).
    data_inputs: Tuple[int, ...] = ()

    def like(self, inputs: Sequence[Any]) -> Optional[torch.Tensor]:
        """The first floating-point data input: the dtype and device a replay computes in."""
        return next((inputs[i] for i in self.data_inputs
                     if isinstance(inputs[i], torch.Tensor) and inputs[i].is_floating_point()), None)

    def __call__(self, inputs: Sequence[Any], like: Optional[torch.Tensor] = None):
        """The call on ``inputs``; floating-point tensors other than ``like``'s dtype and device (the
        model's parameters, where the images differ) computed in ``like``'s."""
        if self.op == "get_attr":
            return self.module
        args, kwargs = _resolve(self.args, inputs, like), _resolve(self.kwargs, inputs, like)
        if self.mutates and args and isinstance(args[0], torch.Tensor):
            args = (args[0].clone(),) + tuple(args[1:])
        if self.op == "call_function":
            return self.target(*args, **kwargs)
        if self.op == "call_method":
            return getattr(args[0], self.target)(*args[1:], **kwargs)
        return self._module_like(like)(*args, **kwargs)

    def _module_like(self, like: Optional[torch.Tensor]):
        """The called module, or a copy of it in ``like``'s dtype and device where its parameters
        differ (made once per dtype and device; the model's own module is never changed)."""
        tensors = list(self.module.parameters()) + list(self.module.buffers())
        floating = [t for t in tensors if t.is_floating_point()]
        if like is None or all(t.dtype == like.dtype and t.device == like.device for t in floating):
            return self.module
        cache = self.__dict__.setdefault("_copies", {})
        key = (like.dtype, like.device)
        if key not in cache:
            import copy

            from torch._subclasses.fake_tensor import unset_fake_temporarily

            with unset_fake_temporarily():  # a real copy, also while the shape pass runs on fake tensors
                cache[key] = copy.deepcopy(self.module).to(dtype=like.dtype, device=like.device)
        return cache[key]

    def describe(self) -> str:
        """What the call is, as a user reads it: the module's class, ``Tensor.permute``, ``F.softmax``,
        the function's own name for one outside torch."""
        if self.op == "call_module":
            return type(self.module).__name__
        if self.op == "call_method":
            return f"Tensor.{self.target}"
        if self.op == "get_attr":
            return f"attribute {self.target}"
        name = function_name(self.target)
        return name if name.split(".")[0] in ("F", "torch", "operator") or "." not in name else name.split(".")[-1]


_SHAPE_DTYPE = [torch.float32]


@contextlib.contextmanager
def shapes_in(dtype: torch.dtype):
    """The shape pass's fake data inputs in ``dtype`` (the images'), so that replays compute as they
    will, for the duration of the ``with`` block."""
    _SHAPE_DTYPE.append(dtype)
    try:
        yield
    finally:
        _SHAPE_DTYPE.pop()


def _fake_inputs(in_shapes: Sequence[Any], batch: int, mode) -> List[Any]:
    """Fake tensors [batch, *shape] for data inputs, a Constant's value at ``batch`` else."""
    inputs = []
    for shape in in_shapes:
        if is_shape(shape):
            with mode:
                inputs.append(torch.empty((batch,) + tuple(shape), dtype=_SHAPE_DTYPE[-1]))
        else:
            inputs.append(shape.at_batch[batch])
    return inputs


def replay_at(function, in_shapes: Sequence[Any]) -> dict:
    """``function(*inputs)`` at each nominal batch size on fake tensors: {batch: result}."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    results = {}
    for batch in NOMINAL_BATCHES:
        inputs = _fake_inputs(in_shapes, batch, mode)
        with mode:
            results[batch] = function(*inputs)
    return results


def per_image_shape(function, in_shapes: Sequence[Any], what: str):
    """The per-image output shape of ``function`` on inputs of ``in_shapes``, from fake runs at the
    nominal batch sizes. Raises Unrepresentable where the output is not one tensor with the batch
    first (the engine's nodes hold per-image tensors)."""
    results = replay_at(function, in_shapes)
    shapes = set()
    for batch, out in results.items():
        if not isinstance(out, torch.Tensor):
            raise Unrepresentable(f"{what} returns a {type(out).__name__}, not one tensor, to a layer that reads it "
                                  f"whole")
        if out.dim() == 0 or out.shape[0] != batch:
            raise Unrepresentable(f"{what} gives a tensor of shape {list(out.shape)[1:] if out.dim() else []} after "
                                  f"the batch dim moved (the engine needs the images in dim 0)")
        shapes.add(tuple(out.shape[1:]))
    if len(shapes) != 1:
        raise Unrepresentable(f"{what} gives a per-image shape that depends on the batch size")
    return shapes.pop()


class Value(Kind):
    """A value the forward computes from parameters and shapes only (``x.size(0)``, a parameter, a
    class token expanded to the batch): replayed in the forward, never reversed."""

    name = "value"

    def __init__(self, template: Template):
        self.template = template

    def output_shape(self, *shapes) -> Constant:
        return Constant(replay_at(self.forward, shapes))

    def forward(self, *inputs):
        return self.template(inputs)  # as the model computes it: the consumer casts where it must


class General(Kind):
    """Any other call with a data input: its forward is the model's own call, its reverse autograd's
    vector-Jacobian product of that call at the inputs the forward kept (on whole maps)."""

    name = "gradient"
    windowed = False
    paper = False

    def __init__(self, template: Template, label: Optional[str] = None, op: Optional[str] = None):
        self.template = template
        self.label = label or template.describe()
        self._op = op or template.describe()

    @classmethod
    def from_module(cls, module, call):
        return cls(call.template())

    @classmethod
    def from_call(cls, call):
        return cls(call.template())

    def describe_reverse(self, rule):
        return f"its gradient (autograd, {self.label})"

    def output_shape(self, *shapes):
        return per_image_shape(self.forward, shapes, self.label)

    def forward(self, *inputs):
        return self.template(inputs, self.template.like(inputs))

    def forward_keeping(self, inputs, keeper):
        return self.forward(*inputs), list(inputs)

    def reverse(self, g, at):
        kept = [k if is_shape(shape) else at.value(i, k) for i, (k, shape) in enumerate(zip(at.saved, at.in_shapes))]
        return at.vjp(self.forward, kept, [is_shape(shape) for shape in at.in_shapes], g)
