"""The memory format of max_pool2d_switches' outputs: the input's, as PyTorch's max_pool2d returns
them (channels-last stays channels-last; an empty tensor counts as contiguous, as PyTorch's
suggest_memory_format says), the same on every device, and what the fake kernel (torch.compile's
view) says."""
from __future__ import annotations

import pytest
import torch

from conftest import DEVICES
from deconvcuda import ops

SHAPES = {"filled": ((2, 3, 9, 8), True), "batch0": ((0, 3, 9, 8), True), "channels0": ((2, 0, 9, 8), True),
          # many channels and short rows: the CPU kernel pools such maps channels-last inside
          "batch0_many_channels": ((0, 64, 13, 13), False), "many_channels": ((2, 64, 13, 13), False)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(SHAPES))
def test_max_pool2d_switches_keeps_the_input_format(device, name):
    shape, channels_last = SHAPES[name]
    format = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.empty(shape, device=device, memory_format=format).normal_()
    out, switches = ops.max_pool2d_switches(x, 3, 2, 1, ceil_mode=True)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake_out, fake_switches = ops.max_pool2d_switches(mode.from_tensor(x), 3, 2, 1, ceil_mode=True)
    assert out.shape == switches.shape == fake_out.shape
    assert out.stride() == fake_out.stride(), f"output strides {out.stride()}, fake kernel's {fake_out.stride()}"
    assert switches.stride() == fake_switches.stride(), f"switch strides {switches.stride()}, fake's {fake_switches.stride()}"
    if shape[1] > 0:  # max_pool2d refuses a map of no channels
        expected = torch.nn.functional.max_pool2d(x, 3, 2, 1, ceil_mode=True)
        assert out.stride() == expected.stride(), f"output strides {out.stride()}, max_pool2d's {expected.stride()}"
    if x.numel() and channels_last:
        assert out.is_contiguous(memory_format=torch.channels_last)
