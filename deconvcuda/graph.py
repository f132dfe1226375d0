"""Model -> graph: the layers from the input to the chosen layers, read with torch.fx.

    graph = trace(model, ["layer2", "layer3.1"])
    graph.nodes                    # topologically ordered: Input, then Conv2d 'conv1', BatchNorm2d 'bn1', ...
    graph.shapes((3, 224, 224))    # {"layer2": (128, 28, 28), "layer3.1": (256, 14, 14)}
    graph.run(images)              # {"layer2": tensor, "layer3.1": tensor}: one functional forward

The model is traced symbolically (``torch.fx``), never hooked, run or changed, so a ReLU counts in every
form a forward can apply it: ``nn.ReLU`` (in place or not, one module called several times),
``F.relu``, ``torch.relu``, ``Tensor.relu`` and ``relu_``. Each fx node on a path from the images to
a chosen layer becomes a ``Node`` whose ``kind`` (deconvcuda.kinds) knows its shape, forward and
reverse; nodes nothing chosen depends on are left out. In-place operations become out-of-place nodes:
a later reader of a tensor that was changed in place reads the changing node instead, and a chosen
layer's output is its value when the module returned it.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from . import kinds
from .kinds.base import Call, Kind, Shape

__all__ = ["trace", "Graph", "Node", "LayerInfo", "layers", "resolve_layer"]


class Input(Kind):
    """The images: the graph's first node."""

    name = "Input"


@dataclass(eq=False)
class Node:
    """One layer of the graph. ``name`` is the module's qualified name (``layer1.0.conv1``) or the fx
    node's name for a function call (``relu_1``, ``add``); ``where`` is the module it sits in."""

    name: str
    where: str
    kind: Kind
    inputs: List["Node"] = field(default_factory=list)
    consumers: List["Node"] = field(default_factory=list)

    def describe(self) -> str:
        return f"{self.kind.name} '{self.name}'"

    def __repr__(self) -> str:
        return f"<{self.describe()}>"


class LayerInfo(NamedTuple):
    """One nameable layer: its name from ``model.named_modules()``, its kind (the module's class) and
    the per-image shape of its output."""

    name: str
    kind: str
    shape: Shape


class Graph:
    """The nodes from the images to ``layers`` in topological order (``nodes[0]`` is the input)."""

    def __init__(self, nodes: List[Node], targets: Dict[str, Node]):
        self.nodes = nodes
        self.targets = targets
        self.layers = list(targets)
        self.input = nodes[0]

    def node_shapes(self, input_shape: Sequence[int], caller: str) -> Dict[Node, Shape]:
        """Per-image output shape of every node. Raises ValueError (prefixed with ``caller``) where
        the images do not fit, naming the node."""
        shape = tuple(int(s) for s in input_shape)
        shapes: Dict[Node, Shape] = {self.input: shape}
        for node in self.nodes[1:]:
            try:
                shapes[node] = node.kind.output_shape(*(shapes[i] for i in node.inputs))
            except ValueError as error:
                first_conv = node.inputs == [self.input] and isinstance(node.kind, kinds.Conv)
                if first_conv and len(shape) == 3 and shape[0] != node.kind.in_channels:
                    raise ValueError(f"{caller}: images must have {node.kind.in_channels} channels (the in_channels "
                                     f"of {node.describe()}), got {shape[0]}") from None
                raise ValueError(f"{caller}: images of shape [N, {', '.join(map(str, shape))}] do not fit the model: "
                                 f"{node.describe()} {error}") from None
        return shapes

    def shapes(self, input_shape: Sequence[int], caller: str = "shapes") -> Dict[str, Shape]:
        """{layer: per-image output shape}: (C, H, W), or (F,) for a flat layer."""
        shapes = self.node_shapes(input_shape, caller)
        return {layer: shapes[node] for layer, node in self.targets.items()}

    def run(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """One functional forward up to the deepest layer (eval semantics: BatchNorm's running
        statistics, no Dropout); {layer: output}. Each node's output is dropped once its last
        consumer has run."""
        values = self.forward(images)
        return {layer: values[node] for layer, node in self.targets.items()}

    def forward(self, images: torch.Tensor, keeper=None) -> Dict[Node, torch.Tensor]:
        """The outputs of the targets (and, with a ``keeper``, what each node's reverse reads, in
        ``keeper.saved``): intermediate outputs are freed as soon as nothing reads them."""
        wanted = set(self.targets.values())
        remaining = {node: len(node.consumers) for node in self.nodes}
        if images.device.type == "cpu" and images.dim() == 4:
            # channels-last maps: oneDNN's convolutions run about a quarter faster on them, the pools
            # keep the format, and the reverse's saved maps ([N, H, W, C]) need no transpose
            images = images.contiguous(memory_format=torch.channels_last)
        values: Dict[Node, torch.Tensor] = {self.input: images}
        kept: Dict[Node, torch.Tensor] = {}
        for node in self.nodes[1:]:
            inputs = [values[i] for i in node.inputs]
            if keeper is None:
                values[node] = node.kind.forward(*inputs)
            else:
                values[node], saved = node.kind.forward_keeping(inputs, keeper)
                if saved is not None:
                    keeper.saved[node] = saved
            for i in node.inputs:
                remaining[i] -= 1
                if remaining[i] == 0 and i not in wanted:
                    del values[i]
        return {node: values[node] for node in wanted}

    def __repr__(self) -> str:
        return f"Graph(layers={self.layers!r}, nodes=[{', '.join(n.describe() for n in self.nodes)}])"


# --------------------------------------------------------------------------------------------- #
# Tracing
# --------------------------------------------------------------------------------------------- #

class _RecordingTracer(fx.Tracer):
    """torch.fx's default tracer that also remembers the node each module call returned, so the
    output of any named module (a leaf like ``features.3`` or a block like ``layer2.1``) is known."""

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


def _trace(model: nn.Module, caller: str) -> Tuple[fx.Graph, _RecordingTracer]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller}: model must be a torch.nn.Module, got {type(model).__name__}")
    tracer = _RecordingTracer()
    try:
        graph = tracer.trace(model)
    except Exception as error:  # fx raises many types (TraceError, TypeError, ...) for untraceable code
        raise TypeError(f"{caller}: model {type(model).__name__} cannot be traced with torch.fx "
                        f"({type(error).__name__}: {error}); its forward must not branch on tensor values") from error
    return graph, tracer


def trace(model: nn.Module, layers: Union[str, nn.Module, Sequence], caller: str = "trace") -> Graph:
    """The graph from ``model``'s input to the output of each of ``layers`` (a name or a list of names
    from ``model.named_modules()``; ``""`` is the model's output)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller}: model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(layers, (str, nn.Module)):
        layers = [layers]
    elif not isinstance(layers, (list, tuple)):
        raise TypeError(f"{caller}: layers must be a layer name or a list of them, got {type(layers).__name__}")
    if not layers:
        raise ValueError(f"{caller}: layers is empty; name at least one layer from model.named_modules()")
    names = [resolve_layer(model, layer, caller) for layer in layers]
    fx_graph, tracer = _trace(model, caller)
    reader = _Reader(model, fx_graph, caller, names[0] if len(names) == 1 else names)
    targets = {name: _target_node(fx_graph, tracer, name, caller) for name in names}
    return reader.graph(targets)


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
        where = ", ".join(f"call {i + 1} returns fx node '{node.name}'"
                          + (f" in '{_enclosing_module(node)}'" if _enclosing_module(node) else "") for i, node in enumerate(calls))
        raise ValueError(f"{caller}: layer {layer!r} is called {len(calls)} times in the model's forward ({where}), so "
                         f"it has no single output; name a layer that is called once (for a reused ReLU, the block "
                         f"or conv around the call you mean)")
    return calls[0]


def _enclosing_module(node: fx.Node) -> str:
    """The qualified name of the innermost module a call sits in ("" for the model's own forward)."""
    paths = [path for path, _ in (node.meta.get("nn_module_stack") or {}).values()]
    if node.op == "call_module" and paths and paths[-1] == node.target:
        paths = paths[:-1]  # a module call's stack ends with the module itself
    return paths[-1] if paths else ""


def layers(model: nn.Module, input_shape: Sequence[int]) -> List[LayerInfo]:
    """Every name of ``model.named_modules()`` that ``project``, ``top_activations`` and the figures can
    take (called once by the forward, returning one tensor, reached through supported layers), with
    its kind and per-image output shape, in forward order."""
    caller = "layers"
    fx_graph, tracer = _trace(model, caller)
    order = {node: i for i, node in enumerate(fx_graph.nodes)}
    candidates = sorted(((calls[0], name) for name, calls in tracer.module_outputs.items() if len(calls) == 1 and name),
                        key=lambda item: order[item[0]])
    reader = _Reader(model, fx_graph, caller, "any")
    try:  # one graph for all of them, where every path is supported
        shapes = reader.graph({name: fx_node for fx_node, name in candidates}).shapes(input_shape, caller)
    except ValueError:  # else one at a time: those behind an unsupported layer are not nameable
        shapes = {}
        for fx_node, name in candidates:
            try:
                shapes[name] = reader.graph({name: fx_node}).shapes(input_shape, caller)[name]
            except ValueError:
                continue
    return [LayerInfo(name, type(model.get_submodule(name)).__name__, shapes[name])
            for _, name in candidates if name in shapes]


# --------------------------------------------------------------------------------------------- #
# Reading the fx graph
# --------------------------------------------------------------------------------------------- #

class _Reader:
    """Reads the fx graph: which nodes the targets depend on, and the kind of each."""

    def __init__(self, model: nn.Module, graph: fx.Graph, caller: str, layer):
        self.model, self.fx_graph, self.caller, self.layer = model, graph, caller, layer
        self.order = {node: i for i, node in enumerate(graph.nodes)}
        placeholders = [node for node in graph.nodes if node.op == "placeholder"]
        self.input = placeholders[0] if placeholders else None
        self.mutated_by = self._mutations()

    # -- messages ------------------------------------------------------------------------------ #

    def what(self, node: fx.Node) -> str:
        if node.op == "call_module":
            return f"{type(self.model.get_submodule(node.target)).__name__} module '{node.target}'"
        if node.op == "call_method":
            return f"Tensor.{node.target}"
        if node.op == "call_function":
            return kinds._function_name(node.target)
        return f"{node.op} '{node.target}'"

    def where(self, node: fx.Node) -> str:
        return _enclosing_module(node)

    def in_module(self, node: fx.Node) -> str:
        where = self.where(node)
        if not where:
            return f"in {type(self.model).__name__}.forward"
        return f"in module '{where}' ({type(self.model.get_submodule(where)).__name__})"

    def fail(self, node: fx.Node, problem: str):
        target = f"layer '{self.layer}'" if isinstance(self.layer, str) else f"layers {self.layer}"
        raise ValueError(f"{self.caller}: {self.what(node)} {self.in_module(node)} {problem} (on the path from "
                         f"the input to {target})")

    # -- what kinds ask for -------------------------------------------------------------------- #

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

    def is_batch_size(self, node: fx.Node) -> bool:
        """``x.size(0)``, ``x.size()[0]`` or ``x.shape[0]``."""
        if node.op == "call_method" and node.target == "size":
            return (node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")) == 0
        if node.op == "call_function" and node.target is operator.getitem and node.args[1] == 0:
            inner = node.args[0]
            return isinstance(inner, fx.Node) and (
                (inner.op == "call_method" and inner.target == "size" and len(inner.args) == 1)
                or (inner.op == "call_function" and inner.target is getattr and inner.args[1] == "shape"))
        return False

    # -- in-place operations ------------------------------------------------------------------- #

    def mutates(self, node: fx.Node) -> bool:
        """Whether ``node`` changes its first argument in place."""
        if not node.args or not isinstance(node.args[0], fx.Node):
            return False
        if node.op == "call_method":
            return node.target.endswith("_") and not node.target.startswith("_")
        if node.op == "call_module":
            return bool(getattr(self.model.get_submodule(node.target), "inplace", False))
        if node.op == "call_function":
            if node.target in (operator.setitem, operator.iadd, operator.imul, operator.isub, torch.relu_):
                return True
            if getattr(node.target, "__name__", "").endswith("_"):
                return True
            if node.kwargs.get("inplace", False):
                return True
            positional = {F.relu: 1, F.relu6: 1, F.dropout: 3, F.dropout2d: 3, F.hardtanh: 3}
            index = positional.get(node.target)
            return index is not None and len(node.args) > index and bool(node.args[index])
        return False

    def _mutations(self) -> Dict[fx.Node, List[fx.Node]]:
        """Per tensor (the node that first computed it), the nodes that change it in place, in graph
        order. A mutating node's result is the same tensor, so it is an alias of that root."""
        self.root: Dict[fx.Node, fx.Node] = {}
        mutated: Dict[fx.Node, List[fx.Node]] = {}
        for node in self.fx_graph.nodes:
            if node.op in ("call_method", "call_module", "call_function") and self.mutates(node):
                root = self.root.get(node.args[0], node.args[0])
                self.root[node] = root
                mutated.setdefault(root, []).append(node)
        return mutated

    def current(self, value: fx.Node, reader: fx.Node) -> fx.Node:
        """The node whose result ``reader`` really reads when it reads ``value``: the last node that
        changed the tensor in place after ``value`` was computed and before ``reader`` runs."""
        latest = value
        for mutation in self.mutated_by.get(self.root.get(value, value), []):
            if self.order[value] < self.order[mutation] < self.order[reader]:
                latest = mutation
        return latest

    # -- building the graph -------------------------------------------------------------------- #

    def graph(self, targets: Dict[str, fx.Node]) -> Graph:
        if self.input is None:
            raise ValueError(f"{self.caller}: the model's forward takes no input")
        input_node = Node("input", "", Input())
        built: Dict[fx.Node, Node] = {self.input: input_node}
        nodes = [input_node]

        def build(fx_node: fx.Node) -> Node:
            # iterative depth-first: deep models (DenseNet) would overflow Python's recursion
            stack = [fx_node]
            while stack:
                top = stack[-1]
                if top in built:
                    stack.pop()
                    continue
                kind, inputs = self.classify(top)
                sources = [self.current(i, top) for i in inputs]
                missing = [s for s in sources if s not in built]
                if missing:
                    stack.extend(missing)
                    continue
                stack.pop()
                if kind.identity:
                    built[top] = built[sources[0]]
                    continue
                node = Node(self.name_of(top), self.where(top), kind, [built[s] for s in sources])
                built[top] = node
                nodes.append(node)
            return built[fx_node]

        target_nodes = {name: build(fx_node) for name, fx_node in targets.items()}
        for node in nodes:
            for i in node.inputs:
                i.consumers.append(node)
        return Graph(nodes, target_nodes)

    def name_of(self, node: fx.Node) -> str:
        return node.target if node.op == "call_module" else node.name

    def classify(self, node: fx.Node) -> Tuple[Kind, List[fx.Node]]:
        """The kind a node is and the fx nodes its data inputs come from."""
        if node.op == "placeholder":
            self.fail(node, "is not the images (the forward's first argument)")
        if node.op not in ("call_module", "call_function", "call_method"):
            self.fail(node, "does not depend on the model's input, so the layer is not reached from it")
        kind_class, module = None, None
        if node.op == "call_module":
            module = self.model.get_submodule(node.target)
            kind_class = kinds.MODULE_KINDS.get(type(module)) or next(
                (k for t, k in kinds.MODULE_KINDS.items() if isinstance(module, t)), None)
        elif node.op == "call_function":
            kind_class = kinds.FUNCTION_KINDS.get(node.target) if _hashable(node.target) else None
        else:
            kind_class = kinds.METHOD_KINDS.get(node.target)
        if kind_class is None:
            self.fail(node, f"is not supported; supported: {kinds.supported()}")
        call = Call(self, node, ("input",) if module is not None else kind_class.arguments)
        kind = kind_class.from_module(module, call) if module is not None else kind_class.from_call(call)
        return kind, call.inputs


def _hashable(value) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True
