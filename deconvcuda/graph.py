"""Model -> graph: the layers from the input to the chosen layers, read with torch.fx.

    graph = trace(model, ["layer2", "layer3.1"])
    graph.nodes                    # topologically ordered: Input, then Conv2d 'conv1', BatchNorm2d 'bn1', ...
    graph.shapes((3, 224, 224))    # {"layer2": (128, 28, 28), "layer3.1": (256, 14, 14)}
    graph.run(images)              # {"layer2": tensor, "layer3.1": tensor}: one forward, in eval mode

The model is traced symbolically (``torch.fx``), in eval mode, never hooked or changed, so a ReLU
counts in every form a forward can apply it: ``nn.ReLU`` (in place or not, one module called several
times), ``F.relu``, ``torch.relu``, ``Tensor.relu`` and ``relu_``. Each fx node on a path from the
images to a chosen layer becomes a ``Node``:

- data nodes compute with the images; their ``kind`` (deconvcuda.kinds) knows the shape, forward and
  reverse. A call no kind recognises is a ``General`` node: the model's own call forward, autograd's
  vector-Jacobian product of it backward. ``strict=True`` refuses anything outside the paper's table.
- value nodes compute from parameters and shapes only (``x.size(0)``, a parameter, a class token
  expanded to the batch): replayed in the forward, never reversed.

Nodes nothing chosen depends on are left out. In-place operations become out-of-place nodes: a later
reader of a tensor that was changed in place reads the changing node instead, and a chosen layer's
output is its value when the module returned it. An item taken from a call that returns several
(``x.chunk(2, 1)[0]``, ``attention(x)[0]``) is one node with that call.
"""
from __future__ import annotations

import builtins
import operator
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from . import kinds
from .capture import evaluating
from .checks import resolve_layer
from .kinds import General, Kind, Nested, NotNative, Ref, Split, Template, Unrepresentable, Value
from .kinds.general import shapes_in
from .kinds.base import Call, Shape

__all__ = ["trace", "Graph", "Node", "resolve_layer", "Untraceable"]

#: Tensor methods and attributes that read a tensor's shape or type, not its values.
SHAPE_METHODS = {"size", "dim", "ndimension", "numel", "nelement", "stride", "get_device", "is_contiguous",
                 "is_floating_point", "element_size"}
SHAPE_ATTRIBUTES = {"shape", "dtype", "device", "ndim", "is_cuda", "layout", "requires_grad"}


class Untraceable(TypeError):
    """torch.fx cannot trace the model's forward (it branches on tensor values, or runs Python fx
    cannot follow). ``project`` and the others then take the autograd path."""


class Input(Kind):
    """The images: the graph's first node."""

    name = "Input"


@dataclass(eq=False)
class Node:
    """One node of the graph. ``name`` is the module's qualified name (``layer1.0.conv1``) or the fx
    node's name for a function call (``relu_1``, ``add``); ``where`` is the module it sits in. ``data``
    says whether it computes with the images (else it is a value)."""

    name: str
    where: str
    kind: Kind
    inputs: List["Node"] = field(default_factory=list)
    consumers: List["Node"] = field(default_factory=list)
    data: bool = True
    #: For a value: whether it depends on the batch size (through a shape of a data node).
    batch_dependent: bool = False

    @property
    def data_consumers(self) -> List["Node"]:
        return [c for c in self.consumers if c.data]

    def describe(self) -> str:
        return f"{getattr(self.kind, 'label', self.kind.name)} '{self.name}'"

    def __repr__(self) -> str:
        return f"<{self.describe()}>"


class Graph:
    """The nodes from the images to ``layers`` in topological order (``nodes[0]`` is the input)."""

    def __init__(self, model: nn.Module, nodes: List[Node], targets: Dict[str, Node], strict: bool, reader):
        self.model = model
        self.nodes = nodes
        self.targets = targets
        self.layers = list(targets)
        self.input = nodes[0]
        self.strict = strict
        self._reader = reader

    def node_shapes(self, input_shape: Sequence[int], caller: str, dtype: Optional[torch.dtype] = None
                    ) -> Dict[Node, Any]:
        """Per-image output shape of every data node (a Constant for values), for images of
        ``input_shape`` and ``dtype`` (default: the model's). Raises ValueError (prefixed with
        ``caller``) where the images do not fit, naming the node; Unrepresentable where a node's
        output is not a per-image tensor."""
        if dtype is None:
            dtype = next((p.dtype for p in self.model.parameters() if p.is_floating_point()), torch.float32)
        with shapes_in(dtype):
            return self._node_shapes(tuple(int(s) for s in input_shape), caller)

    def _node_shapes(self, shape: Tuple[int, ...], caller: str) -> Dict[Node, Any]:
        shapes: Dict[Node, Any] = {self.input: shape}
        for node in self.nodes[1:]:
            in_shapes = [shapes[i] for i in node.inputs]
            try:
                shapes[node] = node.kind.output_shape(*in_shapes)
            except Unrepresentable:
                raise
            except (ValueError, RuntimeError, TypeError, IndexError) as error:
                channels = node.kind.input_channels() if node.inputs[:1] == [self.input] else None
                if channels is not None and len(shape) >= 1 and shape[0] != channels:
                    raise ValueError(f"{caller}: images must have {channels} channels (the input channels of "
                                     f"{node.describe()}), got {shape[0]}") from None
                message = str(error).splitlines()[0] if str(error) else type(error).__name__
                raise ValueError(f"{caller}: images of shape [N, {', '.join(map(str, shape))}] do not fit the model: "
                                 f"{node.describe()} {message}") from None
            if self.strict and node.data and node.kind.outside_table() is not None:
                self._reader.refuse(self._reader.fx_of[node], node.kind.outside_table())
        return shapes

    def shapes(self, input_shape: Sequence[int], caller: str = "shapes") -> Dict[str, Shape]:
        """{layer: per-image output shape}: (C, H, W), (T, D) for tokens, or (F,) for a flat layer."""
        shapes = self.node_shapes(input_shape, caller)
        return {layer: shapes[node] for layer, node in self.targets.items()}

    def run(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """One forward up to the deepest layer, as the model computes it in eval mode; {layer: output}.
        Each node's output is dropped once its last consumer has run."""
        values = self.forward(images)
        return {layer: values[node] for layer, node in self.targets.items()}

    def forward(self, images: torch.Tensor, keeper=None) -> Dict[Node, torch.Tensor]:
        """The outputs of the targets (and, with a ``keeper``, what each node's reverse reads, in
        ``keeper.saved``): intermediate outputs are freed as soon as nothing reads them. It runs in
        the images' memory format, as the model does on them: where max pools see exact ties (flat
        regions, zero padding), the last bit of a convolution decides the switch."""
        wanted = set(self.targets.values())
        remaining = {node: len(node.consumers) for node in self.nodes}
        values: Dict[Node, Any] = {self.input: images}
        with evaluating(self.model):
            for node in self.nodes[1:]:
                inputs = [values[i] for i in node.inputs]
                if keeper is None or not node.data:
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

    def values_at(self, node: Node, batch: int, shapes: Dict[Node, Any], like: torch.Tensor) -> Optional[List[Any]]:
        """``node``'s value inputs recomputed for a batch of ``batch`` rows where they depend on the
        batch size (a reshape to ``x.size(0)`` rows, a class token expanded to the batch); None where
        none does. Data nodes stand in as tensors of the right shape whose values are never read."""
        if not any(i.batch_dependent for i in node.inputs):
            return None
        memo: Dict[Node, Any] = {}

        def value(of: Node):
            if of in memo:
                return memo[of]
            if of.data:
                stand_in = torch.empty((), dtype=like.dtype, device=like.device)
                memo[of] = stand_in.expand((batch,) + tuple(shapes[of]))
            else:
                memo[of] = of.kind.forward(*[value(i) for i in of.inputs])
            return memo[of]

        return [value(i) if i.batch_dependent else None for i in node.inputs]

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


def trace_model(model: nn.Module, caller: str) -> Tuple[fx.Graph, _RecordingTracer]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller}: model must be a torch.nn.Module, got {type(model).__name__}")
    tracer = _RecordingTracer()
    try:
        with evaluating(model):  # the eval-mode forward: BatchNorm's running statistics, no Dropout
            graph = tracer.trace(model)
    except Exception as error:  # fx raises many types (TraceError, TypeError, ...) for untraceable code
        raise Untraceable(f"{caller}: torch.fx cannot trace {type(model).__name__}'s forward "
                          f"({type(error).__name__}: {error})") from error
    return graph, tracer


def layer_names(model: nn.Module, layers, caller: str) -> List[str]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller}: model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(layers, (str, nn.Module)):
        layers = [layers]
    elif not isinstance(layers, (list, tuple)):
        raise TypeError(f"{caller}: layers must be a layer name or a list of them, got {type(layers).__name__}")
    if not layers:
        raise ValueError(f"{caller}: layers is empty; name at least one layer from model.named_modules()")
    return [resolve_layer(model, layer, caller) for layer in layers]


def trace(model: nn.Module, layers: Union[str, nn.Module, Sequence], caller: str = "trace",
          strict: bool = False) -> Graph:
    """The graph from ``model``'s input to the output of each of ``layers`` (a name or a list of names
    from ``model.named_modules()``; ``""`` is the model's output). Raises Untraceable where torch.fx
    cannot trace the model, Unrepresentable where the graph's nodes cannot hold per-image tensors,
    and with ``strict=True`` a ValueError for any op outside the paper's table."""
    names = layer_names(model, layers, caller)
    fx_graph, tracer = trace_model(model, caller)
    reader = Reader(model, fx_graph, caller, names[0] if len(names) == 1 else names, strict)
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


# --------------------------------------------------------------------------------------------- #
# Reading the fx graph
# --------------------------------------------------------------------------------------------- #

def _nodes_in(value) -> List[fx.Node]:
    """The fx nodes in an argument, however deeply nested."""
    found: List[fx.Node] = []
    fx.node.map_arg(value, found.append)
    return found


class Reader:
    """Reads the fx graph: which nodes the targets depend on, which compute with the images, and the
    kind of each."""

    def __init__(self, model: nn.Module, graph: fx.Graph, caller: str, layer, strict: bool = False):
        self.model, self.fx_graph, self.caller, self.layer, self.strict = model, graph, caller, layer, strict
        self.order = {node: i for i, node in enumerate(graph.nodes)}
        placeholders = [node for node in graph.nodes if node.op == "placeholder"]
        self.input = placeholders[0] if placeholders else None
        self.mutated_by = self._mutations()
        self._data: Dict[fx.Node, bool] = {}

    # -- messages ------------------------------------------------------------------------------ #

    def what(self, node: fx.Node) -> str:
        if node.op == "call_module":
            return f"{type(self.model.get_submodule(node.target)).__name__} module '{node.target}'"
        if node.op == "call_method":
            return f"Tensor.{node.target}"
        if node.op == "call_function":
            return kinds.function_name(node.target)
        return f"{node.op} '{node.target}'"

    def in_module(self, node: fx.Node) -> str:
        where = _enclosing_module(node)
        if not where:
            return f"in {type(self.model).__name__}.forward"
        return f"in module '{where}' ({type(self.model.get_submodule(where)).__name__})"

    def _path(self) -> str:
        target = f"layer '{self.layer}'" if isinstance(self.layer, str) else f"layers {self.layer}"
        return f"on the path from the input to {target}"

    def fail(self, node: fx.Node, problem: str):
        raise ValueError(f"{self.caller}: {self.what(node)} {self.in_module(node)} {problem} ({self._path()})")

    # -- what kinds ask for -------------------------------------------------------------------- #

    def is_node(self, value) -> bool:
        return isinstance(value, fx.Node)

    def is_data(self, value) -> bool:
        """Whether ``value`` (an argument, however nested) is computed from the images' values."""
        return any(self._is_data_node(node) for node in _nodes_in(value))

    def _is_data_node(self, node: fx.Node) -> bool:
        if node in self._data:
            return self._data[node]
        # iterative: deep models would overflow Python's recursion
        stack = [node]
        while stack:
            top = stack[-1]
            if top in self._data:
                stack.pop()
                continue
            if top.op == "placeholder":
                self._data[top] = top is self.input
            elif top.op == "get_attr" or self._is_shape_query(top):
                self._data[top] = False
            else:
                sources = top.all_input_nodes
                missing = [s for s in sources if s not in self._data]
                if missing:
                    stack.extend(missing)
                    continue
                self._data[top] = any(self._data[s] for s in sources)
            stack.pop()
        return self._data[node]

    @staticmethod
    def _is_shape_query(node: fx.Node) -> bool:
        if node.op == "call_method" and node.target in SHAPE_METHODS:
            return True
        return (node.op == "call_function" and node.target is builtins.getattr and len(node.args) > 1
                and node.args[1] in SHAPE_ATTRIBUTES)

    def data_input(self, node: fx.Node, value) -> fx.Node:
        if not isinstance(value, fx.Node) or not self.is_data(value):
            self.fail(node, "does not take its input from the model's input, so the layer is not reached from it")
        if value.op == "placeholder" and value is not self.input:
            self.fail(node, f"reads the forward's argument '{value.target}', not the images (the first argument)")
        return value

    def parameter(self, node: fx.Node, value, name: str, optional: bool = False) -> Optional[torch.Tensor]:
        if value is None and optional:
            return None
        if isinstance(value, fx.Node) and value.op == "get_attr":
            tensor = self._attribute(value.target)
            if isinstance(tensor, torch.Tensor):
                return tensor
        raise NotNative(f"takes its {name} from a computation, not from a parameter or buffer of the model")

    def _attribute(self, target: str):
        value = self.model
        for part in target.split("."):
            value = getattr(value, part)
        return value

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

    def template_of(self, node: fx.Node, inputs: List[fx.Node], nested: Optional[Dict[fx.Node, Template]] = None
                    ) -> Template:
        """``node``'s call with every graph node among its arguments an input (appended to ``inputs``
        where not there yet) or, for those in ``nested``, that call replayed inline."""
        nested = nested or {}

        def ref(value: fx.Node):
            value = self.current(value, node)
            if value in nested:
                return Nested(nested[value])
            if value not in inputs:
                inputs.append(value)
            return Ref(inputs.index(value))

        args = fx.node.map_arg(node.args, ref)
        kwargs = fx.node.map_arg(node.kwargs, ref)
        module = None
        if node.op == "call_module":
            module = self.model.get_submodule(node.target)
        elif node.op == "get_attr":
            module = self._attribute(node.target)
        data = tuple(i for i, value in enumerate(inputs) if self.is_data(value))
        return Template(node.op, node.target, tuple(args), dict(kwargs), module, self.mutates(node), data)

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
            if node.target in (operator.setitem, operator.iadd, operator.imul, operator.isub, operator.itruediv,
                               torch.relu_):
                return True
            if getattr(node.target, "__name__", "").endswith("_"):
                return True
            if node.kwargs.get("inplace", False):
                return True
            positional = {F.relu: 1, F.relu6: 1, F.dropout: 3, F.dropout2d: 3, F.hardtanh: 3, F.silu: 1,
                          F.hardswish: 1, F.hardsigmoid: 1, F.elu: 2, F.leaky_relu: 2, F.mish: 1, F.selu: 1,
                          F.celu: 2}
            index = positional.get(node.target) if _hashable(node.target) else None
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
        self.fx_of: Dict[Node, fx.Node] = {}

        for name, fx_node in targets.items():
            if not self.is_data(fx_node):
                raise ValueError(f"{self.caller}: layer {name!r} does not depend on the model's input, so it has "
                                 f"nothing to project")

        def build(fx_node: fx.Node) -> Node:
            # iterative depth-first: deep models (DenseNet) would overflow Python's recursion
            stack = [fx_node]
            read: Dict[fx.Node, Tuple[Kind, List[fx.Node]]] = {}
            while stack:
                top = stack[-1]
                if top in built:
                    stack.pop()
                    continue
                if top not in read:
                    read[top] = self.classify(top) if self.is_data(top) else self.value(top)
                kind, inputs = read[top]
                sources = [self.current(i, top) for i in inputs]
                missing = [s for s in sources if s not in built]
                if missing:
                    stack.extend(missing)
                    continue
                stack.pop()
                if kind.identity:
                    built[top] = built[sources[0]]
                    continue
                data = self.is_data(top)
                node = Node(self._name_of(top), _enclosing_module(top), kind, [built[s] for s in sources], data=data)
                node.batch_dependent = not data and any(i.data or i.batch_dependent for i in node.inputs)
                built[top] = node
                self.fx_of[node] = top
                nodes.append(node)
            return built[fx_node]

        target_nodes = {name: build(fx_node) for name, fx_node in targets.items()}
        for node in nodes:
            for i in node.inputs:
                i.consumers.append(node)
        return Graph(self.model, nodes, target_nodes, self.strict, self)

    def _name_of(self, node: fx.Node) -> str:
        return node.target if node.op == "call_module" else node.name

    def value(self, node: fx.Node) -> Tuple[Kind, List[fx.Node]]:
        """A node that computes from parameters and shapes only: replayed, never reversed."""
        if node.op == "placeholder":
            if node.args:  # a forward argument with a default (fx keeps it in args)
                return Value(Template("call_function", _constant, (node.args[0],), {})), []
            self.fail(node, "is a forward argument other than the images, without a default; the model must take "
                            "the images alone")
        inputs: List[fx.Node] = []
        return Value(self.template_of(node, inputs)), inputs

    def kind_class(self, node: fx.Node):
        """The registered kind of a call, or None."""
        if node.op == "call_module":
            module = self.model.get_submodule(node.target)
            return kinds.MODULE_KINDS.get(type(module)) or next(
                (k for t, k in kinds.MODULE_KINDS.items() if isinstance(module, t)), None)
        if node.op == "call_function":
            return kinds.FUNCTION_KINDS.get(node.target) if _hashable(node.target) else None
        if node.op == "call_method":
            return kinds.METHOD_KINDS.get(node.target)
        return None

    def classify(self, node: fx.Node) -> Tuple[Kind, List[fx.Node]]:
        """The kind a data node is and the fx nodes its inputs come from."""
        if node.op not in ("call_module", "call_function", "call_method"):
            self.fail(node, "does not depend on the model's input, so the layer is not reached from it")
        if node.op == "call_function" and node.target is operator.getitem and self.is_data(node.args[0]):
            return self._item(node)
        kind_class = self.kind_class(node)
        module = self.model.get_submodule(node.target) if node.op == "call_module" else None
        if kind_class is not None:
            call = Call(self, node, ("input",) if module is not None else kind_class.arguments)
            try:
                kind = kind_class.from_module(module, call) if module is not None else kind_class.from_call(call)
                return kind, call.inputs
            except NotNative as reason:
                if self.strict:
                    self.refuse(node, str(reason))
        elif self.strict:
            self.refuse(node, None)
        call = Call(self, node, ())
        return General.from_call(call), call.inputs

    def refuse(self, node: fx.Node, problem: Optional[str]):
        """strict=True: ``node`` is not one of the paper's reverse operations (``problem``: why not)."""
        problem = problem or "is not one of the paper's reverse operations"
        raise ValueError(f"{self.caller}: {self.what(node)} {self.in_module(node)} {problem}, so strict=True refuses "
                         f"it ({self._path()}); without strict it takes its exact gradient. The paper's reverse "
                         f"operations, supported: {kinds.supported(paper_only=True)}")

    def _item(self, node: fx.Node) -> Tuple[Kind, List[fx.Node]]:
        """``producer(...)[index]`` on a data producer: one node. A split's item is a Split (linear,
        windowed along channels); an item of a call no kind recognises replays that call inline (it may
        return a tuple); an item of a tensor (``x[:, 0]``) is a general node."""
        producer = self.current(node.args[0], node)
        inputs: List[fx.Node] = []
        if producer.op in ("call_function", "call_method") and _hashable(producer.target) \
                and producer.target in Split.splits and producer.all_input_nodes:
            if self.strict:
                self.refuse(node, f"takes an item of {self.what(producer)}, which is not one of the paper's "
                                      "reverse operations")
            template = self.template_of(node, inputs, nested={producer: self.template_of(producer, inputs)})
            position = 1 if producer.target in (torch.unbind, "unbind") else 2
            dim = producer.kwargs.get("dim", producer.args[position] if len(producer.args) > position else 0)
            return Split(template, f"{self.what(producer)}[{node.args[1]!r}]", dim,
                         op=self.template_of(producer, []).describe()), inputs
        if producer.op in ("call_function", "call_method", "call_module") and self._is_general(producer):
            if self.strict:
                self.refuse(producer, None)
            template = self.template_of(node, inputs, nested={producer: self.template_of(producer, inputs)})
            return General(template, f"{self.what(producer)}[{node.args[1]!r}]",
                           op=self.template_of(producer, []).describe()), inputs
        if self.strict:
            self.refuse(node, None)
        return General(self.template_of(node, inputs), f"[{node.args[1]!r}]", op="indexing"), inputs

    def _is_general(self, node: fx.Node) -> bool:
        """Whether a data call would be a general node (no kind reverses it natively)."""
        kind_class = self.kind_class(node)
        if kind_class is None:
            return True
        module = self.model.get_submodule(node.target) if node.op == "call_module" else None
        call = Call(self, node, ("input",) if module is not None else kind_class.arguments)
        try:
            kind_class.from_module(module, call) if module is not None else kind_class.from_call(call)
        except NotNative:
            return True
        return False


def _constant(value):
    return value


def _hashable(value) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True
