"""What a projection does on the way down: the ops on the path from the images to a layer, and how each
is reversed (a native kernel, the rule, or the op's exact gradient).

    print(deconvcuda.describe(model, "features.29", (3, 224, 224)))
    description.gradient_ops()       # the ops outside the paper's table, which take their gradient
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

from torch import nn

from . import rules
from .checks import check_input_shape, resolve_layer
from .graph import Untraceable, trace
from .kinds import Unrepresentable

__all__ = ["describe", "Description", "Step"]


@dataclass(frozen=True)
class Step:
    """One op on the path: its node name, what it is, the module it sits in, its per-image output shape,
    how it is reversed ("kernel", "rule" or "gradient") in words, and whether the paper's table has it."""

    name: str
    op: str
    where: str
    shape: tuple
    reversal: str
    reverse: str
    in_table: bool
    kind_of_op: str  # the op without this call's particulars ("MultiheadAttention", "torch.chunk")


@dataclass
class Description:
    """The path to ``layer`` in forward order, or, where the graph cannot hold the model, why not
    (``fallback``): then projections run the model itself by autograd, with the rule's rectifiers."""

    layer: str
    rule: str
    steps: List[Step] = field(default_factory=list)
    fallback: Optional[str] = None

    def gradient_ops(self) -> List[str]:
        """The distinct ops outside the paper's table (each takes its exact gradient), in path order."""
        return list(dict.fromkeys(step.kind_of_op for step in self.steps if not step.in_table))

    def __str__(self) -> str:
        head = f"path to layer {self.layer!r} under rule {self.rule!r}"
        if self.fallback is not None:
            return (f"{head}: the graph engine cannot hold this model ({self.fallback}); projections run the model "
                    f"itself by autograd, every rectifier's backward the rule's, every other op its gradient")
        widths = [max([len(getattr(s, f) or "-") for s in self.steps] + [len(title)])
                  for f, title in (("name", "name"), ("op", "op"), ("where", "in module"))]
        lines = [head, f"{'name':{widths[0]}}  {'op':{widths[1]}}  {'in module':{widths[2]}}  {'output':16}  reverse"]
        for s in self.steps:
            shape = "[" + ", ".join(map(str, s.shape)) + "]"
            lines.append(f"{s.name:{widths[0]}}  {s.op:{widths[1]}}  {s.where or '-':{widths[2]}}  {shape:16}  "
                         f"{s.reverse}")
        return "\n".join(lines)


def describe(model: nn.Module, layer, input_shape: Sequence[int], *, rule: str = "deconvnet") -> Description:
    """The ops on the path from the images (one image's shape ``input_shape``, e.g. (3, 224, 224)) to
    ``layer``, and how ``project`` reverses each under ``rule``: by a native kernel (convolutions, max
    pools, fused where a conv -> ReLU -> max pool chain allows), by the rule (ReLU, ReLU6), or by the
    op's exact gradient (everything else; ``strict=True`` refuses those outside the paper's table)."""
    caller = "describe"
    input_shape = check_input_shape(input_shape, caller)
    rule_object = rules.get(rule, caller)
    name = resolve_layer(model, layer, caller)
    try:
        graph = trace(model, name, caller=caller)
        shapes = graph.node_shapes(input_shape, caller)
    except (Untraceable, Unrepresentable) as why:
        reason = str(why)
        return Description(name, rule_object.name, fallback=reason[len(caller) + 2:] if reason.startswith(
            f"{caller}: ") else reason)
    fused = {}
    if rule_object.kernel is not None:
        targets = set(graph.targets.values())
        for node in graph.nodes[1:]:
            if node.data:
                for inner in node.kind.fused_chain(node, targets):
                    fused[inner] = node
    steps = []
    for node in graph.nodes[1:]:
        if not node.data:
            continue
        kind = node.kind
        reverse = kind.describe_reverse(rule_object)
        chain = [n for n, pool in fused.items() if pool is node]
        if chain:
            reverse = (f"native kernel ({'unpool_relu_deconv2d' if len(chain) == 2 else 'unpool_relu'}: the max pool "
                       f"with the {' and '.join(n.describe() for n in chain)} below it, in one call)")
        elif node in fused:
            reverse = f"{reverse}, inside the fused kernel of {fused[node].describe()}"
        steps.append(Step(node.name, getattr(kind, "label", kind.name), node.where, tuple(shapes[node]),
                          kind.reversal, reverse, kind.outside_table() is None, kind.op))
    return Description(name, rule_object.name, steps)
