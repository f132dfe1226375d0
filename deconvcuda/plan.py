"""Model -> plan: the chain of layers from the input to a chosen layer, read with torch.fx.

    plan = build_plan(model, "features.7")
    plan.steps          # [Conv2d 'features.0', ReLU 'features.1', MaxPool2d 'features.2', ...]
    plan.shapes((3, 64, 64))  # the per-image shape before every step and after the last one

The model is traced symbolically (``torch.fx``), not hooked, so a ReLU counts in every form a
forward can apply it: ``nn.ReLU`` (in place or not, one module called several times), ``F.relu``,
``torch.relu``, ``Tensor.relu`` and ``relu_``. Walking back from the node that produces the layer's
output to the input placeholder gives the chain of steps the projection engine runs forward and
then undoes in reverse. Tracing never runs or changes the model: no hooks, no ``train()``/``eval()``.

Each step keeps what both directions need: its weights (by reference, never copied here), its
geometry and its name. Dropout and Identity are identities in eval mode and leave no step.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .geometry import conv_output_size, pool_output_size

__all__ = [
    "Plan", "Step", "Conv", "ReLU", "MaxPool", "LocalResponseNorm", "BatchNorm", "AvgPool", "AdaptiveAvgPool",
    "Flatten", "Linear", "SUPPORTED", "build_plan", "resolve_layer",
]

SUPPORTED = ("Conv2d (zero padding), ReLU (nn.ReLU, F.relu, torch.relu, Tensor.relu, in place or not), "
             "MaxPool2d, LocalResponseNorm, BatchNorm2d (eval), Dropout (eval), AvgPool2d, AdaptiveAvgPool2d, "
             "Flatten (nn.Flatten, torch.flatten, Tensor.flatten/view/reshape to [N, -1]), Linear, Identity")

Pair = Tuple[int, int]
Shape = Tuple[int, ...]  # one image's shape: (C, H, W) or (F,)


def _pair(value) -> Pair:
    if isinstance(value, int):
        return (value, value)
    value = tuple(value)
    return (value[0], value[0]) if len(value) == 1 else (value[0], value[1])


def _pooled_shape(step: "Step", shape: Shape, dilation: Pair) -> Shape:
    """The output shape of a max or average pool ``step`` (kernel_size, stride, padding, ceil_mode)."""
    step._need_spatial(shape)
    size = tuple(pool_output_size(shape[1 + i], step.kernel_size[i], step.stride[i], step.padding[i], dilation[i],
                                   step.ceil_mode) for i in range(2))
    if min(size) < 1:
        raise ValueError(f"{step.describe()}: its input of spatial size {list(shape[1:])} is smaller than its "
                         f"window {list(step.kernel_size)}")
    return (shape[0],) + size


# --------------------------------------------------------------------------------------------- #
# Steps
# --------------------------------------------------------------------------------------------- #

@dataclass(eq=False)
class Step:
    """One layer of the chain. ``name`` is the module's qualified name (``features.3``), or the fx
    node's name (``relu_1``) for a function call; ``where`` is the module the call sits in."""

    name: str
    where: str

    kind = "Step"

    def output_shape(self, shape: Shape) -> Shape:
        """The per-image shape this step produces from ``shape``; ValueError if it cannot take it."""
        return shape

    def describe(self) -> str:
        return f"{self.kind} '{self.name}'"

    def _need_spatial(self, shape: Shape) -> None:
        if len(shape) != 3:
            raise ValueError(f"{self.describe()} needs a [N, C, H, W] input, got a flat [N, {shape[0]}] one")


@dataclass(eq=False)
class Conv(Step):
    weight: torch.Tensor  # [C_out, C_in / groups, kh, kw], the model's own Parameter
    bias: Optional[torch.Tensor]
    stride: Pair
    padding: Pair
    dilation: Pair
    groups: int

    kind = "Conv2d"

    @property
    def kernel_size(self) -> Pair:
        return (self.weight.shape[2], self.weight.shape[3])

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1] * self.groups

    def output_shape(self, shape):
        self._need_spatial(shape)
        if shape[0] != self.in_channels:
            raise ValueError(f"{self.describe()} expects {self.in_channels} input channels, got {shape[0]}")
        size = tuple(conv_output_size(shape[1 + i], self.kernel_size[i], self.stride[i], self.padding[i],
                                       self.dilation[i]) for i in range(2))
        if min(size) < 1:
            raise ValueError(f"{self.describe()}: its input of spatial size {list(shape[1:])} is smaller than its "
                             f"kernel {list(self.kernel_size)} (dilation {list(self.dilation)}, padding "
                             f"{list(self.padding)})")
        return (self.weight.shape[0],) + size


@dataclass(eq=False)
class ReLU(Step):
    kind = "ReLU"


@dataclass(eq=False)
class MaxPool(Step):
    kernel_size: Pair
    stride: Pair
    padding: Pair
    dilation: Pair
    ceil_mode: bool

    kind = "MaxPool2d"

    def output_shape(self, shape):
        return _pooled_shape(self, shape, self.dilation)


@dataclass(eq=False)
class LocalResponseNorm(Step):
    size: int
    alpha: float
    beta: float
    k: float

    kind = "LocalResponseNorm"

    def output_shape(self, shape):
        self._need_spatial(shape)
        return shape


@dataclass(eq=False)
class BatchNorm(Step):
    running_mean: torch.Tensor
    running_var: torch.Tensor
    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    eps: float

    kind = "BatchNorm2d"

    def output_shape(self, shape):
        self._need_spatial(shape)
        if shape[0] != self.running_mean.numel():
            raise ValueError(f"{self.describe()} expects {self.running_mean.numel()} channels, got {shape[0]}")
        return shape


@dataclass(eq=False)
class AvgPool(Step):
    kernel_size: Pair
    stride: Pair
    padding: Pair
    ceil_mode: bool
    count_include_pad: bool
    divisor_override: Optional[int]

    kind = "AvgPool2d"

    def output_shape(self, shape):
        return _pooled_shape(self, shape, (1, 1))


@dataclass(eq=False)
class AdaptiveAvgPool(Step):
    output_size: Tuple[Optional[int], Optional[int]]  # None keeps the input's size on that axis

    kind = "AdaptiveAvgPool2d"

    def output_shape(self, shape):
        self._need_spatial(shape)
        return (shape[0],) + tuple(shape[1 + i] if self.output_size[i] is None else self.output_size[i]
                                   for i in range(2))


@dataclass(eq=False)
class Flatten(Step):
    features: Optional[int] = None  # the feature count a view/reshape asked for, checked against the input

    kind = "Flatten"

    def output_shape(self, shape):
        flat = 1
        for size in shape:
            flat *= size
        if self.features is not None and self.features != flat:
            raise ValueError(f"{self.describe()} reshapes to [N, {self.features}], but one image has {flat} values "
                             f"{list(shape)}")
        return (flat,)


@dataclass(eq=False)
class Linear(Step):
    weight: torch.Tensor  # [out_features, in_features]
    bias: Optional[torch.Tensor]

    kind = "Linear"

    def output_shape(self, shape):
        if len(shape) != 1:
            raise ValueError(f"{self.describe()} needs a flat [N, F] input, got [N, {', '.join(map(str, shape))}]")
        if shape[0] != self.weight.shape[1]:
            raise ValueError(f"{self.describe()} expects {self.weight.shape[1]} input features, got {shape[0]}")
        return (self.weight.shape[0],)


# --------------------------------------------------------------------------------------------- #
# Plan
# --------------------------------------------------------------------------------------------- #

@dataclass(eq=False)
class Plan:
    """The steps from the input to ``layer``'s output, in forward order."""

    layer: str
    steps: List[Step]

    def shapes(self, input_shape: Sequence[int], caller: str = "plan") -> List[Shape]:
        """Per-image shapes: ``shapes[i]`` enters ``steps[i]``; ``shapes[-1]`` is the layer's output.
        Raises ValueError (prefixed with ``caller``) where the input does not fit, naming the step."""
        shape = tuple(int(s) for s in input_shape)
        first_channel_check = next((s for s in self.steps if isinstance(s, (Conv, BatchNorm, Linear, Flatten))), None)
        if isinstance(first_channel_check, Conv) and shape[0] != first_channel_check.in_channels:
            raise ValueError(f"{caller}: images must have {first_channel_check.in_channels} channels (the "
                             f"in_channels of {first_channel_check.describe()}), got {shape[0]}")
        shapes = [shape]
        for step in self.steps:
            try:
                shape = step.output_shape(shape)
            except ValueError as error:
                raise ValueError(f"{caller}: images of shape [N, {', '.join(map(str, input_shape))}] do not fit "
                                 f"the model: {error}") from None
            shapes.append(shape)
        return shapes

    def __repr__(self) -> str:
        steps = ", ".join(step.describe() for step in self.steps)
        return f"Plan(layer={self.layer!r}, steps=[{steps}])"


# --------------------------------------------------------------------------------------------- #
# Tracing
# --------------------------------------------------------------------------------------------- #

class _RecordingTracer(fx.Tracer):
    """torch.fx's default tracer that also remembers the node each module call returned, so the
    output of any named module (a leaf like ``features.3`` or a container like ``features``) is known."""

    def __init__(self):
        super().__init__()
        self.module_outputs: Dict[str, List[fx.Node]] = {}

    def call_module(self, m, forward, args, kwargs):
        out = super().call_module(m, forward, args, kwargs)
        if isinstance(out, fx.Proxy):
            self.module_outputs.setdefault(self.path_of_module(m), []).append(out.node)
        return out


def resolve_layer(model: nn.Module, layer, caller: str) -> str:
    """``layer`` as a name from ``model.named_modules()``; a module of the model is accepted too."""
    if isinstance(layer, nn.Module):
        for name, module in model.named_modules():
            if module is layer:
                return name
        raise ValueError(f"{caller}: layer is a {type(layer).__name__} that is not a submodule of the model")
    if not isinstance(layer, str):
        raise TypeError(f"{caller}: layer must be a module name from model.named_modules(), got "
                        f"{type(layer).__name__}")
    names = [name for name, _ in model.named_modules()]
    if layer not in names:
        valid = ", ".join(repr(name) for name in names if name)
        raise ValueError(f"{caller}: unknown layer {layer!r}; valid layer names (model.named_modules()): {valid}")
    return layer


def build_plan(model: nn.Module, layer, caller: str = "build_plan") -> Plan:
    """Trace ``model`` and return the chain of steps from its input to the output of ``layer``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller}: model must be a torch.nn.Module, got {type(model).__name__}")
    layer = resolve_layer(model, layer, caller)
    tracer = _RecordingTracer()
    try:
        graph = tracer.trace(model)
    except Exception as error:  # fx raises many types (TraceError, TypeError, ...) for untraceable code
        raise TypeError(f"{caller}: model {type(model).__name__} cannot be traced with torch.fx "
                        f"({type(error).__name__}: {error}); its forward must not branch on tensor values") from error
    return _Walker(model, graph, caller, layer).plan(_target_node(graph, tracer, layer, caller))


def _target_node(graph: fx.Graph, tracer: _RecordingTracer, layer: str, caller: str) -> fx.Node:
    if layer == "":
        output = next(node for node in graph.nodes if node.op == "output")
        if not isinstance(output.args[0], fx.Node):
            raise ValueError(f"{caller}: the model's output is not a single tensor; name a layer instead")
        return output.args[0]
    calls = tracer.module_outputs.get(layer, [])
    if not calls:
        raise ValueError(f"{caller}: layer {layer!r} is never called by the model's forward (or does not return a "
                         f"single tensor), so it has no output to project")
    if len(calls) > 1:
        raise ValueError(f"{caller}: layer {layer!r} is called {len(calls)} times in the model's forward, so its "
                         f"output is ambiguous; choose a layer that is called once")
    return calls[0]


_RELU_FUNCTIONS = {F.relu: ("input", "inplace"), torch.relu: ("input",), torch.relu_: ("input",)}
_MAX_POOL_FUNCTIONS = {
    F.max_pool2d: ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
    torch.max_pool2d: ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode"),
}
_DROPOUT_FUNCTIONS = {F.dropout, F.dropout2d, F.alpha_dropout, F.feature_alpha_dropout}
_RESHAPE_METHODS = {"view", "reshape"}
_MUTATING_FUNCTIONS = {operator.setitem}
_ARGUMENTS = {
    F.avg_pool2d: ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"),
    F.adaptive_avg_pool2d: ("input", "output_size"),
    F.local_response_norm: ("input", "size", "alpha", "beta", "k"),
    F.linear: ("input", "weight", "bias"),
    F.conv2d: ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
    torch.conv2d: ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
    torch.flatten: ("input", "start_dim", "end_dim"),
    torch.reshape: ("input", "shape"),
}


def _bind(node: fx.Node, names: Sequence[str]) -> Dict[str, Any]:
    """A call's arguments by parameter name (positional ones named after ``names``)."""
    bound = dict(zip(names, node.args))
    bound.update(node.kwargs)
    return bound


def _function_name(target) -> str:
    if target is operator.add or target is operator.iadd:
        return "operator.add (+)"
    module = getattr(target, "__module__", None) or ""
    name = getattr(target, "__name__", repr(target))
    if module.startswith("torch.nn.functional") or target in (F.avg_pool2d, F.linear, F.conv2d):
        return f"F.{name}"
    if module in ("torch", "") and hasattr(torch, name) and getattr(torch, name) is target:
        return f"torch.{name}"
    return f"{module}.{name}" if module else name


class _Walker:
    """Walks the traced graph back from the target node to the input and classifies each node."""

    def __init__(self, model: nn.Module, graph: fx.Graph, caller: str, layer: str):
        self.model = model
        self.graph = graph
        self.caller = caller
        self.layer = layer
        self.order = {node: i for i, node in enumerate(graph.nodes)}
        placeholders = [node for node in graph.nodes if node.op == "placeholder"]
        self.input = placeholders[0] if placeholders else None

    # -- messages ------------------------------------------------------------------------------ #

    def what(self, node: fx.Node) -> str:
        if node.op == "call_module":
            return f"{type(self.model.get_submodule(node.target)).__name__} module '{node.target}'"
        if node.op == "call_method":
            return f"Tensor.{node.target}"
        if node.op == "call_function":
            return _function_name(node.target)
        return f"{node.op} '{node.target}'"

    def where(self, node: fx.Node) -> str:
        """The qualified name of the innermost module a call sits in ("" for the model's own forward)."""
        paths = [path for path, _ in (node.meta.get("nn_module_stack") or {}).values()]
        if node.op == "call_module" and paths and paths[-1] == node.target:
            paths = paths[:-1]  # a module call's stack ends with the module itself
        return paths[-1] if paths else ""

    def in_module(self, node: fx.Node) -> str:
        where = self.where(node)
        if not where:
            return f"in {type(self.model).__name__}.forward"
        return f"in module '{where}' ({type(self.model.get_submodule(where)).__name__})"

    def fail(self, node: fx.Node, problem: str):
        raise ValueError(f"{self.caller}: {self.what(node)} {self.in_module(node)} {problem} (on the path from "
                         f"the input to layer '{self.layer}')")

    def unsupported(self, node: fx.Node):
        self.fail(node, f"is not supported; supported: {SUPPORTED}")

    # -- walking ------------------------------------------------------------------------------- #

    def plan(self, target: fx.Node) -> Plan:
        steps: List[Step] = []
        node = target
        while node is not self.input:
            step, source = self.classify(node)
            if step is not None:
                steps.append(step)
            steps.extend(reversed(self.mutations_between(source, node)))
            node = source
        steps.reverse()
        return Plan(self.layer, steps)

    def data_input(self, node: fx.Node, value) -> fx.Node:
        if not isinstance(value, fx.Node) or value.op == "get_attr":
            self.fail(node, "does not take its input from the model's input, so the layer is not reached from it")
        if value.op == "placeholder" and value is not self.input:
            self.fail(node, f"reads the forward's argument '{value.target}', not the images (the first argument)")
        return value

    def parameter(self, node: fx.Node, value, name: str, optional: bool = False) -> Optional[torch.Tensor]:
        if value is None and optional:
            return None
        if isinstance(value, fx.Node) and value.op == "get_attr":
            tensor = self.model
            for part in value.target.split("."):
                tensor = getattr(tensor, part)
            if isinstance(tensor, torch.Tensor):
                return tensor
        self.fail(node, f"takes its {name} from a computation; only a parameter or buffer of the model is supported")

    def mutations_between(self, source: fx.Node, consumer: fx.Node) -> List[Step]:
        """Steps for in-place ops that change ``source`` after it is computed and before ``consumer``
        reads it (``F.relu(x, inplace=True)`` whose result is not used, ``x.relu_()``): their effect
        is only visible through ``source``. In graph order; anything but a ReLU or dropout is refused."""
        steps = []
        for user in sorted(source.users, key=self.order.__getitem__):
            if user is consumer or self.order[user] > self.order[consumer] or not self.mutates(user, source):
                continue
            step, _ = self.classify(user)
            if step is None:  # an in-place dropout: identity in eval mode
                continue
            if not isinstance(step, ReLU):
                self.fail(user, "changes a tensor in place, which is supported for ReLU and Dropout only")
            steps.append(step)
        return steps

    def mutates(self, node: fx.Node, source: fx.Node) -> bool:
        if not node.args or node.args[0] is not source:
            return False
        if node.op == "call_method":
            return node.target.endswith("_") and not node.target.startswith("_")
        if node.op == "call_module":
            return bool(getattr(self.model.get_submodule(node.target), "inplace", False))
        if node.op == "call_function":
            if node.target in _MUTATING_FUNCTIONS or getattr(node.target, "__name__", "").endswith("_"):
                return True
            if node.kwargs.get("inplace", False):
                return True
            if node.target is F.relu and len(node.args) > 1:
                return bool(node.args[1])
            if node.target in _DROPOUT_FUNCTIONS and len(node.args) > 3:
                return bool(node.args[3])
        return False

    def classify(self, node: fx.Node) -> Tuple[Optional[Step], fx.Node]:
        """The step a node stands for (None for identities) and the node its input comes from."""
        if node.op == "call_module":
            return self.classify_module(node, self.model.get_submodule(node.target))
        if node.op == "call_function":
            return self.classify_function(node)
        if node.op == "call_method":
            return self.classify_method(node)
        if node.op == "placeholder":
            self.fail(node, "is not the images (the forward's first argument)")
        self.fail(node, "does not depend on the model's input, so the layer is not reached from it")

    def refuse_merges(self, node: fx.Node) -> None:
        tensors = []
        fx.node.map_arg((node.args, node.kwargs),
                        lambda n: tensors.append(n) if n.op != "get_attr" and not self.is_shape(n) else None)
        if len(tensors) > 1:
            self.fail(node, f"combines {len(tensors)} tensors; residual connections and concatenation are not "
                            "supported yet: the path from the input to the layer must be a chain of single-input "
                            "layers")

    def is_shape(self, node: fx.Node) -> bool:
        """Shape-only nodes (``x.size(0)``, ``x.shape``, ``x.dim()`` and items of them) carry no data."""
        if node.op == "call_method" and node.target in ("size", "dim"):
            return True
        if node.op == "call_function" and node.target is getattr and node.args[1] in ("shape", "ndim"):
            return True
        if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node):
            return self.is_shape(node.args[0])
        return False

    def classify_module(self, node: fx.Node, module: nn.Module):
        name = node.target
        source = self.data_input(node, node.args[0] if node.args else node.kwargs.get("input"))
        if isinstance(module, nn.Conv2d):
            if module.padding_mode != "zeros":
                self.fail(node, f"pads with padding_mode={module.padding_mode!r}; only zero padding is supported")
            padding = self.conv_padding(node, module.padding, module.kernel_size, module.dilation, module.stride)
            return Conv(name, name, module.weight, module.bias, _pair(module.stride), padding,
                        _pair(module.dilation), module.groups), source
        if isinstance(module, nn.ReLU):
            return ReLU(name, name), source
        if isinstance(module, nn.MaxPool2d):
            if module.return_indices:
                self.fail(node, "returns indices (return_indices=True); use it without them")
            kernel = _pair(module.kernel_size)
            stride = kernel if module.stride is None else _pair(module.stride)
            return MaxPool(name, name, kernel, stride, _pair(module.padding), _pair(module.dilation),
                           bool(module.ceil_mode)), source
        if isinstance(module, nn.LocalResponseNorm):
            return LocalResponseNorm(name, name, module.size, module.alpha, module.beta, module.k), source
        if isinstance(module, nn.BatchNorm2d):
            if module.running_mean is None or module.running_var is None:
                self.fail(node, "has no running statistics (track_running_stats=False); eval-mode batch norm "
                                "needs them")
            return BatchNorm(name, name, module.running_mean, module.running_var, module.weight, module.bias,
                             module.eps), source
        if isinstance(module, (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.Identity)):
            return None, source
        if isinstance(module, nn.AvgPool2d):
            kernel = _pair(module.kernel_size)
            stride = kernel if module.stride is None else _pair(module.stride)
            return AvgPool(name, name, kernel, stride, _pair(module.padding), bool(module.ceil_mode),
                           bool(module.count_include_pad), module.divisor_override), source
        if isinstance(module, nn.AdaptiveAvgPool2d):
            return AdaptiveAvgPool(name, name, self.adaptive_size(module.output_size)), source
        if isinstance(module, nn.Flatten):
            self.check_flatten(node, module.start_dim, module.end_dim)
            return Flatten(name, name), source
        if isinstance(module, nn.Linear):
            return Linear(name, name, module.weight, module.bias), source
        self.refuse_merges(node)
        self.unsupported(node)

    def classify_function(self, node: fx.Node):
        target = node.target
        self.refuse_merges(node)
        where = self.where(node)
        if target in _RELU_FUNCTIONS:
            args = _bind(node, _RELU_FUNCTIONS[target])
            return ReLU(node.name, where), self.data_input(node, args.get("input"))
        if target in _MAX_POOL_FUNCTIONS:
            args = _bind(node, _MAX_POOL_FUNCTIONS[target])
            if args.get("return_indices", False):
                self.fail(node, "returns indices (return_indices=True); use it without them")
            kernel = _pair(args["kernel_size"])
            stride = args.get("stride")
            stride = kernel if stride is None or (isinstance(stride, (list, tuple)) and not stride) else _pair(stride)
            return MaxPool(node.name, where, kernel, stride, _pair(args.get("padding", 0)),
                           _pair(args.get("dilation", 1)), bool(args.get("ceil_mode", False))), \
                self.data_input(node, args.get("input"))
        if target in _DROPOUT_FUNCTIONS:
            return None, self.data_input(node, _bind(node, ("input",)).get("input"))
        if target is F.avg_pool2d:
            args = _bind(node, _ARGUMENTS[target])
            kernel = _pair(args["kernel_size"])
            stride = args.get("stride")
            stride = kernel if stride is None or (isinstance(stride, (list, tuple)) and not stride) else _pair(stride)
            return AvgPool(node.name, where, kernel, stride, _pair(args.get("padding", 0)),
                           bool(args.get("ceil_mode", False)), bool(args.get("count_include_pad", True)),
                           args.get("divisor_override")), self.data_input(node, args.get("input"))
        if target is F.adaptive_avg_pool2d:
            args = _bind(node, _ARGUMENTS[target])
            return AdaptiveAvgPool(node.name, where, self.adaptive_size(args["output_size"])), \
                self.data_input(node, args.get("input"))
        if target is F.local_response_norm:
            args = _bind(node, _ARGUMENTS[target])
            return LocalResponseNorm(node.name, where, args["size"], args.get("alpha", 1e-4), args.get("beta", 0.75),
                                     args.get("k", 1.0)), self.data_input(node, args.get("input"))
        if target is F.linear:
            args = _bind(node, _ARGUMENTS[target])
            return Linear(node.name, where, self.parameter(node, args.get("weight"), "weight"),
                          self.parameter(node, args.get("bias"), "bias", optional=True)), \
                self.data_input(node, args.get("input"))
        if target in (F.conv2d, torch.conv2d):
            args = _bind(node, _ARGUMENTS[target])
            weight = self.parameter(node, args.get("weight"), "weight")
            dilation = _pair(args.get("dilation", 1))
            stride = _pair(args.get("stride", 1))
            padding = self.conv_padding(node, args.get("padding", 0), tuple(weight.shape[2:]), dilation, stride)
            return Conv(node.name, where, weight, self.parameter(node, args.get("bias"), "bias", optional=True),
                        stride, padding, dilation, int(args.get("groups", 1))), \
                self.data_input(node, args.get("input"))
        if target is torch.flatten:
            args = _bind(node, _ARGUMENTS[target])
            self.check_flatten(node, args.get("start_dim", 0), args.get("end_dim", -1))
            return Flatten(node.name, where), self.data_input(node, args.get("input"))
        if target is torch.reshape:
            args = _bind(node, _ARGUMENTS[target])
            return Flatten(node.name, where, self.flat_features(node, args.get("shape"))), \
                self.data_input(node, args.get("input"))
        self.unsupported(node)

    def classify_method(self, node: fx.Node):
        method = node.target
        self.refuse_merges(node)
        where = self.where(node)
        source = self.data_input(node, node.args[0])
        if method in ("relu", "relu_"):
            return ReLU(node.name, where), source
        if method == "contiguous":
            return None, source
        if method == "flatten":
            args = _bind(node, ("self", "start_dim", "end_dim"))
            self.check_flatten(node, args.get("start_dim", 0), args.get("end_dim", -1))
            return Flatten(node.name, where), source
        if method in _RESHAPE_METHODS:
            shape = node.args[1:] if len(node.args) > 2 else (node.args[1] if len(node.args) == 2
                                                               else node.kwargs.get("shape", node.kwargs.get("size")))
            return Flatten(node.name, where, self.flat_features(node, shape)), source
        self.unsupported(node)

    # -- argument checks ----------------------------------------------------------------------- #

    def conv_padding(self, node, padding, kernel_size, dilation, stride) -> Pair:
        if padding == "valid":
            return (0, 0)
        if padding == "same":
            total = [_pair(dilation)[i] * (_pair(kernel_size)[i] - 1) for i in range(2)]
            if any(t % 2 for t in total):
                self.fail(node, "uses padding='same' with an even kernel extent, which pads asymmetrically; "
                                "only symmetric zero padding is supported")
            return (total[0] // 2, total[1] // 2)
        return _pair(padding)

    def adaptive_size(self, output_size) -> Tuple[Optional[int], Optional[int]]:
        if isinstance(output_size, int):
            return (output_size, output_size)
        output_size = tuple(output_size)
        return (output_size[0], output_size[0]) if len(output_size) == 1 else (output_size[0], output_size[1])

    def check_flatten(self, node, start_dim, end_dim) -> None:
        if start_dim != 1 or end_dim not in (-1, 3):
            self.fail(node, f"flattens dims {start_dim} to {end_dim}; only flattening to [N, -1] (start_dim=1, "
                            f"end_dim=-1) is supported")

    def flat_features(self, node, shape) -> Optional[int]:
        """A view/reshape must flatten to [N, -1]: (x.size(0), -1), (-1, F) or (x.size(0), F).
        Returns F where it is given, to be checked against the input's size."""
        if isinstance(shape, (list, tuple)) and len(shape) == 2:
            batch, features = shape
            batch_is_n = isinstance(batch, fx.Node) and self.is_batch_size(batch)
            if batch_is_n and features == -1:
                return None
            if (batch_is_n or batch == -1) and isinstance(features, int) and features > 0:
                return features
        self.fail(node, f"reshapes to {shape!r}; only flattening to [N, -1] (x.view(x.size(0), -1)) is supported")

    def is_batch_size(self, node: fx.Node) -> bool:
        """``x.size(0)``, ``x.size()[0]`` or ``x.shape[0]``."""
        if node.op == "call_method" and node.target == "size":
            return _bind(node, ("self", "dim")).get("dim") == 0
        if node.op == "call_function" and node.target is operator.getitem and node.args[1] == 0:
            inner = node.args[0]
            return isinstance(inner, fx.Node) and (
                (inner.op == "call_method" and inner.target == "size" and len(inner.args) == 1)
                or (inner.op == "call_function" and inner.target is getattr and inner.args[1] == "shape"))
        return False
