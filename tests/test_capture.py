"""deconvcuda.capture: eval mode with every flag restored, and module outputs by hooks that are removed."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from deconvcuda.capture import capture, evaluating


class Branchy(nn.Module):
    """A forward that branches on the data (torch.fx cannot trace it) and reuses one ReLU."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.drop = nn.Dropout(0.5)
        self.relu = nn.ReLU()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        x = self.relu(self.drop(self.conv(x)))
        if x.mean() > 0:
            x = x * 2
        return self.head(self.relu(x).mean((2, 3)))


def test_evaluating_restores_each_flag():
    model = Branchy().train()
    model.head.eval()
    with evaluating(model):
        assert not any(m.training for m in model.modules())
    assert model.training and model.conv.training and not model.head.training


def test_capture_returns_outputs_in_eval_mode_and_leaves_no_hooks():
    model = Branchy().train()
    x = torch.randn(2, 3, 8, 8)
    outputs, logits = capture(model, x, ["conv", ""], caller="test")
    torch.testing.assert_close(outputs["conv"], model.conv(x))
    assert model.training, "the training flag is restored"
    with evaluating(model):
        torch.testing.assert_close(logits, model(x))  # eval mode: Dropout is the identity
    assert outputs[""] is logits
    assert all(not m._forward_hooks for m in model.modules())


def test_capture_keeps_the_graph_for_gradients():
    model = Branchy()
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    with torch.enable_grad():
        outputs, logits = capture(model, x, ["conv", ""], caller="test")
        (grad,) = torch.autograd.grad(logits[:, 0].sum(), outputs["conv"])
    assert grad.shape == outputs["conv"].shape


def test_capture_without_the_output_can_stop_early():
    model = Branchy()
    seen = []
    model.head.register_forward_hook(lambda *args: seen.append(1))
    outputs, logits = capture(model, torch.randn(1, 3, 8, 8), "conv", caller="test", stop_early=True)
    assert logits is None and set(outputs) == {"conv"} and not seen


def test_capture_refuses_a_module_called_twice_or_never():
    model = Branchy()
    with pytest.raises(ValueError, match=r"test: layer 'relu' is called 2 times in the model's forward"):
        capture(model, torch.randn(1, 3, 8, 8), "relu", caller="test")
    model.unused = nn.ReLU()
    with pytest.raises(ValueError, match=r"test: layer 'unused' is never called by the model's forward"):
        capture(model, torch.randn(1, 3, 8, 8), "unused", caller="test")
    assert all(not m._forward_hooks for m in model.modules())
