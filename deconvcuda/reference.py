"""The pure-PyTorch twin of every deconvcuda op and of ``project``: the oracle the native kernels are
tested against. Only torch ops, no extension; same signatures and semantics as ``deconvcuda.ops``
and ``deconvcuda.project``, and deliberately simple (full-size maps, no cropping, no fusion).

    deconvcuda.reference.project(model, images, "features.29", channel=7)
    deconvcuda.reference.unpool_relu(grad, switches, input_size, kernel_size)
"""
from __future__ import annotations

from .engine import BACKENDS, project as _project
from .reference_ops import deconv2d, max_pool2d_switches, unpool_relu, unpool_relu_deconv2d

__all__ = ["max_pool2d_switches", "unpool_relu", "deconv2d", "unpool_relu_deconv2d", "project"]


def project(model, images, layer, channel=None, position=None, neurons=None, *, rule="deconvnet", seed="value",
            lrn="gradient", strict=False, backend="reference"):
    """``deconvcuda.project`` computed with the reference ops: full-size maps, layer by layer, torch ops
    only. Same signature; ``backend`` is checked as ``project`` checks it, and the reference ops run
    whatever it says (use ``deconvcuda.project`` for the native kernels)."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"project: backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    return _project(model, images, layer, channel, position, neurons, rule=rule, seed=seed, lrn=lrn, strict=strict,
                    backend="reference")
