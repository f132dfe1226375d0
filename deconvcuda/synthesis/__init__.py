"""Feature visualization by regularized optimization: the image a unit would like best.

    images = deconvcuda.synthesize(model, "features.22", [3, 17, 40], size=128)    # RGB in [0, 1]
    deconvcuda.figures.synthesis_figure("out/features.22.png", images, ["3", "17", "40"])

``regularizers`` (names, objects, the registry and the default set), ``optimize`` (``synthesize``,
``objective_values``), ``redirect`` (the redirected ReLU gradient the optimisation starts with); the
figure is drawn by ``deconvcuda.figures.synthesis_figure``.
"""
from . import regularizers
from .optimize import objective_values, synthesize
from .regularizers import (Blur, ContributionClip, Decay, Fourier, Jitter, NormClip, Pixel, Regularizer, Rotate,
                           Scale)

__all__ = ["synthesize", "objective_values", "regularizers", "Regularizer", "Pixel", "Fourier",
           "Jitter", "Scale", "Rotate", "Decay", "Blur", "NormClip", "ContributionClip"]
