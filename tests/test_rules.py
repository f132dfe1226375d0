"""The rule registry (deconvcuda.rules): every rule's contract, the one list of names everything reads,
and the C++ side's names and policy types in step with it."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import deconvcuda
from deconvcuda import rules

ROOT = Path(__file__).resolve().parents[1]

# docs/DESIGN.md's table (section 1): per rule, the reverse of a ReLU as a function of (g, x).
TABLE = {
    "deconvnet": lambda g, x: g.clamp_min(0),
    "guided": lambda g, x: g.clamp_min(0) * (x > 0),
    "gradient": lambda g, x: g * (x > 0),
}


def test_the_registry_holds_the_table_rules_in_order():
    assert rules.names() == ("deconvnet", "guided", "gradient")


@pytest.mark.parametrize("name", list(TABLE))
def test_each_rule_reverses_a_rectifier_as_the_table_says(name):
    rule = rules.get(name, caller="test")
    g = torch.tensor([-2.0, -0.5, 0.0, 0.5, 2.0, -1.0, 3.0, float("nan")])
    x = torch.tensor([1.0, -1.0, 2.0, 0.0, -3.0, 0.5, 4.0, 1.0])
    expected = TABLE[name](g, x)
    actual = rule.rectifier(g, (x > 0) if rule.masked else None)
    torch.testing.assert_close(actual, expected, equal_nan=True)
    assert rule.description and "\n" not in rule.description, "one line for --help and the gallery"


@pytest.mark.parametrize("name", list(TABLE))
def test_project_applies_each_rule_to_a_single_relu(name):
    """A ReLU between two 1x1 convolutions on 1x1 images: the projection is W1^T rule(W2^T g, x)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(6, 5, 1), torch.nn.ReLU(), torch.nn.Conv2d(5, 4, 1)).double()
    images = torch.randn(3, 6, 1, 1, dtype=torch.float64)
    w1, w2 = model[0].weight.detach().flatten(1), model[2].weight.detach().flatten(1)
    hidden = model[0](images).detach().flatten(1)
    for unit in range(4):
        g = torch.zeros(3, 4, dtype=torch.float64)
        g[:, unit] = model(images).detach().flatten(1)[:, unit]
        expected = TABLE[name](g @ w2, hidden) @ w1
        actual = deconvcuda.project(model, images, "2", channel=unit, rule=name)
        torch.testing.assert_close(actual.flatten(1), expected, rtol=1e-12, atol=1e-12)


def test_unknown_rules_are_refused_with_the_list_everywhere():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    with pytest.raises(ValueError, match=r"project: rule must be one of 'deconvnet', 'guided', 'gradient', got 'lrp'"):
        deconvcuda.project(model, torch.randn(1, 3, 8, 8), "1", channel=0, rule="lrp")
    with pytest.raises(ValueError, match=r'unpool_relu: rule must be "deconvnet", "guided" or "gradient", got "lrp"'):
        deconvcuda.reference.unpool_relu(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2, dtype=torch.uint8), (4, 4), 2,
                                         rule="lrp")
    with pytest.raises(ValueError, match="register: a rule named 'guided' is registered already"):
        rules.register(type("Again", (rules.Guided,), {}))


def test_the_kernels_take_the_registry_kernel_names():
    """csrc/common/checks.h's check_rule maps exactly the registry's kernel names to the policy enum
    of csrc/common/rules.h, one enum value each, in the same order."""
    checks = (ROOT / "csrc/common/checks.h").read_text()
    policies = (ROOT / "csrc/common/rules.h").read_text()
    mapped = re.findall(r'if \(rule == "(\w+)"\) return rules::RuleKind::(\w+);', checks)
    enum = re.search(r"enum class RuleKind \{([^}]*)\}", policies).group(1)
    enum_values = [value.strip() for value in enum.split(",") if value.strip()]
    assert [name for name, _ in mapped] == list(rules.kernel_names())
    assert [value for _, value in mapped] == enum_values
    for name, value in mapped:
        assert value == "k" + name.capitalize(), f"{name} maps to {value}"


def test_the_kernels_refuse_what_the_registry_does_not_name():
    pytest.importorskip("deconvcuda._C")
    from deconvcuda import ops

    assert ops.RULES == rules.kernel_names()
    with pytest.raises(RuntimeError, match=r'unpool_relu: rule must be "deconvnet", "guided" or "gradient", got "lrp"'):
        ops.unpool_relu(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2, dtype=torch.uint8), (4, 4), 2, rule="lrp")
