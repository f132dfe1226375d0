"""The reverse rules: how the way down passes a rectifier. One registry, read by everything that names
a rule (``project``'s check, the engine's fusion, the kinds, the ops' checks, the CLI, the figures).

    rule          reverse of y = relu(x)           reverse of y = relu6(x)
    deconvnet     max(g, 0)                        max(g, 0)                  (the paper's; forward ignored)
    guided        max(g, 0) * [x > 0]              max(g, 0) * [0 < x < 6]    (Springenberg et al. 2014)
    gradient      g * [x > 0]                      g * [0 < x < 6]            (the plain gradient)

Every other layer is reversed by its gradient under every rule. A rule is one class, registered by
name; it says how a rectifier is reversed (``rectifies``, ``masked``), and whether the fused kernels
serve it (``kernel``: the name csrc/common/checks.h's ``check_rule`` accepts, which selects the
kernels' compile-time policy in csrc/common/rules.h; None where they do not). A rule of another shape
(one that also changes how a convolution or an addition is reversed) overrides ``reverse``; then it
sets ``kernel = None``, so the engine does not fuse layers whose reverse the rule changes.

    rules.get("guided", caller="project")     # the Rule, or a ValueError that lists the names
    rules.names()                             # ("deconvnet", "guided", "gradient")
"""
from __future__ import annotations

from typing import Any, ClassVar, Dict, List, Optional, Tuple, Type

import torch

__all__ = ["Rule", "register", "get", "names", "RULES", "Deconvnet", "Guided", "Gradient"]


class Rule:
    """One reverse rule. Subclasses set the class attributes; ``rectifier`` follows from them."""

    #: The name users pass (``rule="guided"``).
    name: ClassVar[str]
    #: One line on what the projections show: the gallery's and ``--help``'s text.
    description: ClassVar[str]
    #: max(g, 0) on the way down through a rectifier.
    rectifies: ClassVar[bool]
    #: Times the forward's pass-through mask ([x > 0] for ReLU, [0 < x < 6] for ReLU6).
    masked: ClassVar[bool]
    #: The rule name the native kernels take (their policy type), or None where they do not serve it.
    kernel: ClassVar[Optional[str]]

    def rectifier(self, g: torch.Tensor, passed) -> torch.Tensor:
        """The reverse of a rectifier: ``g`` at its output -> the signal at its input. ``passed``: the
        forward's pass-through mask (bool, shaped like ``g``), or a function that multiplies by it,
        given where ``masked``."""
        if self.rectifies:
            g = torch.relu(g)
        if self.masked:
            g = passed(g) if callable(passed) else g * passed
        return g

    def reverse(self, kind: Any, g: torch.Tensor, at: Any) -> List[Optional[torch.Tensor]]:
        """The reverse of one node of kind ``kind`` under this rule: the kind's own (which for a
        rectifier calls ``rectifier``). A rule that changes how other layers are reversed overrides this."""
        return kind.reverse(g, at)

    def __repr__(self) -> str:
        return f"<rule {self.name!r}>"


#: The rules by name, in the order they were registered.
RULES: Dict[str, Rule] = {}


def register(rule: Type[Rule]) -> Type[Rule]:
    """Class decorator: make ``rule`` known by its name."""
    if rule.name in RULES:
        raise ValueError(f"register: a rule named {rule.name!r} is registered already")
    RULES[rule.name] = rule()
    return rule


def names() -> Tuple[str, ...]:
    """Every rule's name, in registration order."""
    return tuple(RULES)


def kernel_names() -> Tuple[str, ...]:
    """The rule names the native kernels take."""
    return tuple(rule.kernel for rule in RULES.values() if rule.kernel is not None)


def kernel_rule(name: str, op: str) -> Rule:
    """The rule the native kernels call ``name``; a ValueError worded as the C++ check's otherwise."""
    for rule in RULES.values():
        if rule.kernel is not None and rule.kernel == name:
            return rule
    raise ValueError(f"{op}: rule must be {quoted(kernel_names())}, got \"{name}\"")


def quoted(words) -> str:
    """``"a", "b" or "c"``: how the C++ checks list names (csrc/common/checks.h)."""
    words = [f'"{word}"' for word in words]
    return ", ".join(words[:-1]) + f" or {words[-1]}" if len(words) > 1 else words[0]


def get(rule, caller: str, argument: str = "rule") -> Rule:
    """The registered rule called ``rule`` (a Rule passes through); a ValueError naming ``caller`` and
    ``argument`` and listing the rules otherwise."""
    if isinstance(rule, Rule):
        return rule
    if isinstance(rule, str) and rule in RULES:
        return RULES[rule]
    raise ValueError(f"{caller}: {argument} must be one of {', '.join(map(repr, RULES))}, got {rule!r}")


@register
class Deconvnet(Rule):
    name = "deconvnet"
    description = ("the paper's DeconvNet: on the way down every ReLU passes only the positive part of the signal, "
                   "wherever the forward pass was; the pooling switches are all it keeps of the image")
    rectifies, masked = True, False
    kernel = "deconvnet"


@register
class Guided(Rule):
    name = "guided"
    description = ("guided backpropagation (Springenberg et al. 2014): as the DeconvNet, and every ReLU also passes "
                   "signal only where its forward input was positive, so the projection follows the image's own edges")
    rectifies, masked = True, True
    kernel = "guided"


@register
class Gradient(Rule):
    name = "gradient"
    description = "the plain gradient of the activation with respect to the input pixels (saliency)"
    rectifies, masked = False, True
    kernel = "gradient"
