"""What keeps an image optimised for a unit looking like an image: the regularizers of feature
visualization, each a small object with its strength, registered by name.

    regularizers.get("blur", caller="synthesize")            # Blur() with its default strength
    regularizers.plan(["fourier", Jitter(16), "decay"], caller="synthesize")   # a Plan of the three roles
    regularizers.DEFAULT["channel"]                            # what synthesize uses unless told otherwise
    regularizers.names()                                      # every registered name

Three roles, one per base class:

- a **parameterization** says how the optimised tensor becomes an image: ``Pixel`` (the pixels
  themselves) or ``Fourier`` (a spectrum scaled by 1/frequency, colours decorrelated; Olah et al. 2017,
  Lucid/lucent). At most one per plan; ``Pixel`` when none is named.
- a **transform** moves the image at random before every forward (``Jitter``, ``Scale``, ``Rotate``:
  Lucid's transformation robustness), so only features that survive small moves are reinforced.
- a **step** operator acts on the image after every gradient step (Yosinski et al. 2015, "Understanding
  Neural Networks Through Deep Visualization", Sec. 3): ``Decay`` (L2 decay), ``Blur`` (Gaussian blur
  every few steps), ``NormClip`` (pixels of small norm set to zero), ``ContributionClip`` (pixels of
  small contribution to the objective set to zero).

Every role works on the *centred image* ``z`` ``[N, 3, H, W]``: RGB = sigmoid(z), so z = 0 is mid gray
and "set to zero" (decay, clipping) means "towards gray", the paper's mean image. A parameterization
maps its tensor to z and back, so the step operators act on the image under either one.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import ClassVar, Dict, List, Optional, Sequence, Tuple, Type

import torch
import torch.nn.functional as F

from ..checks import ArgumentError, as_list, is_int

__all__ = ["Regularizer", "Parameterization", "Transform", "StepOperator", "Pixel", "Fourier", "Jitter", "Scale",
           "Rotate", "Decay", "Blur", "NormClip", "ContributionClip", "REGULARIZERS", "DEFAULT", "register", "get",
           "names", "plan", "Plan"]


def _check_number(owner: str, argument: str, value, *, low: float, high: float = math.inf,
                  integer: bool = False) -> float:
    """``value`` as a number (an int where ``integer``) in [low, high]; a ValueError naming ``owner``
    and ``argument`` otherwise."""
    ok_type = is_int(value) if integer else isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not ok_type or not low <= value <= high:
        bound = f">= {low:g}" + (f" and <= {high:g}" if high < math.inf else "")
        kind = "an int" if integer else "a number"
        raise ValueError(f"{owner}: {argument} must be {kind} {bound}, got {value!r}")
    return int(value) if integer else float(value)


class Regularizer:
    """One regularizer. Subclasses of the three roles below set ``name`` and ``description``."""

    #: The name users pass (``regularizers=["blur"]``).
    name: ClassVar[str]
    #: One line on what it does and why (for help texts and listings).
    description: ClassVar[str]

    def _settings(self) -> Dict[str, object]:
        return {key: value for key, value in vars(self).items() if not key.startswith("_")}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self._settings().items())})"


class Parameterization(Regularizer):
    """How the optimised tensor becomes the centred image z (RGB = sigmoid(z)), and back."""

    def init(self, shape: Tuple[int, int, int, int], generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
        """The tensor to optimise for images of ``shape`` [N, 3, H, W], drawn on the CPU from ``generator``."""
        raise NotImplementedError

    def image(self, parameters: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
        """The centred image z [N, 3, H, W] of ``size`` (H, W) (differentiable)."""
        raise NotImplementedError

    def parameters_of(self, z: torch.Tensor) -> torch.Tensor:
        """The tensor whose ``image`` is ``z`` (the step operators' way back)."""
        raise NotImplementedError


class Transform(Regularizer):
    """A random, differentiable change of the RGB image before the forward; the size stays."""

    def __call__(self, rgb: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError


class StepOperator(Regularizer):
    """Acts on the centred image z after every gradient step (in place, without autograd)."""

    #: Whether ``apply`` needs the objective's gradient with respect to z.
    needs_gradient: ClassVar[bool] = False

    def apply(self, z: torch.Tensor, gradient: Optional[torch.Tensor], step: int) -> None:
        """Change ``z`` [N, 3, H, W] in place after step ``step`` (0-based); ``gradient``: d objective / dz
        before the step, where ``needs_gradient``."""
        raise NotImplementedError


#: The regularizer classes by name, in the order they were registered.
REGULARIZERS: Dict[str, Type[Regularizer]] = {}


def register(cls: Type[Regularizer]) -> Type[Regularizer]:
    """Class decorator: make ``cls`` known by its name."""
    if cls.name in REGULARIZERS:
        raise ValueError(f"register: a regularizer named {cls.name!r} is registered already")
    REGULARIZERS[cls.name] = cls
    return cls


def names() -> Tuple[str, ...]:
    """Every regularizer's name, in registration order."""
    return tuple(REGULARIZERS)


def get(regularizer, caller: str, argument: str = "regularizers") -> Regularizer:
    """The regularizer called ``regularizer`` with its default strength (a Regularizer passes through);
    a ValueError naming ``caller`` and ``argument`` and listing the names otherwise."""
    if isinstance(regularizer, Regularizer):
        return regularizer
    if isinstance(regularizer, str) and regularizer in REGULARIZERS:
        return REGULARIZERS[regularizer]()
    if isinstance(regularizer, str):
        raise ValueError(f"{caller}: unknown regularizer {regularizer!r} in {argument}; known regularizers: "
                         f"{', '.join(map(repr, REGULARIZERS))}")
    raise ArgumentError(f"{caller}: {argument} must hold regularizer names or Regularizer objects "
                        f"(deconvcuda.synthesis.regularizers), got a {type(regularizer).__name__}")


@dataclass
class Plan:
    """The regularizers of one optimisation, by role, in the order given."""

    parameterization: Parameterization
    transforms: List[Transform] = field(default_factory=list)
    steps: List[StepOperator] = field(default_factory=list)

    @property
    def needs_gradient(self) -> bool:
        return any(step.needs_gradient for step in self.steps)


def plan(regularizers, caller: str, *, default: Sequence[Regularizer] = (), argument: str = "regularizers") -> Plan:
    """``regularizers`` (a name, a Regularizer, or a list of them; ``[]`` for none: plain gradient ascent
    on the pixels; None for ``default``) as a :class:`Plan`. Two parameterizations are an error."""
    if regularizers is None:
        regularizers = default
    items = as_list(regularizers, (str, Regularizer), argument, "a regularizer name, a Regularizer, or a list of them",
                    caller, allow_empty=True)
    items = [get(item, caller, argument) for item in items]
    parameterizations = [item for item in items if isinstance(item, Parameterization)]
    if len(parameterizations) > 1:
        raise ValueError(f"{caller}: {argument} names {len(parameterizations)} parameterizations "
                         f"({', '.join(map(repr, parameterizations))}); keep one")
    return Plan(parameterizations[0] if parameterizations else Pixel(),
                [item for item in items if isinstance(item, Transform)],
                [item for item in items if isinstance(item, StepOperator)])


# --------------------------------------------------------------------------------------------- #
# Parameterizations
# --------------------------------------------------------------------------------------------- #

@register
class Pixel(Parameterization):
    name = "pixel"
    description = ("the pixels themselves (through a sigmoid, so they stay in [0, 1]): every pixel free, so the "
                   "optimisation fills the image with high-frequency patterns unless other regularizers hold it back")

    def __init__(self, sd: float = 0.01):
        #: The standard deviation of the random start around mid gray.
        self.sd = _check_number("Pixel", "sd", sd, low=0.0)

    def init(self, shape, generator, dtype):
        return torch.randn(shape, generator=generator, dtype=torch.float64).mul_(self.sd).to(dtype)

    def image(self, parameters, size):
        return parameters

    def parameters_of(self, z):
        return z


# The square root of the colour covariance of ImageNet's pixels (rows R, G, B), as measured for Lucid
# (Olah et al. 2017); scaled below so that its largest column has norm 1.
_COLOUR_CORRELATION = ((0.26, 0.09, 0.02), (0.27, 0.00, -0.05), (0.27, -0.09, 0.03))
# The spectrum's image is divided by this, as in Lucid, so the start is not saturated.
_FOURIER_IMAGE_SCALE = 4.0


@register
class Fourier(Parameterization):
    name = "fourier"
    description = ("the image's 2-D Fourier spectrum, each frequency scaled by 1/frequency^decay_power, with the "
                   "colours decorrelated (ImageNet's colour covariance): a step moves low frequencies more than "
                   "high ones, as natural images vary, and the colours together, so the image stays smooth and "
                   "natural in colour instead of filling with the high frequencies the gradient favours "
                   "(Olah et al. 2017)")

    def __init__(self, decay_power: float = 1.0, decorrelate: bool = True, sd: float = 0.01):
        #: Frequency f's coefficient is scaled by 1 / max(f, 1 / max(H, W)) ** decay_power.
        self.decay_power = _check_number("Fourier", "decay_power", decay_power, low=0.0)
        if not isinstance(decorrelate, bool):
            raise ValueError(f"Fourier: decorrelate must be True or False, got {decorrelate!r}")
        self.decorrelate = decorrelate
        #: The standard deviation of the random start of every coefficient.
        self.sd = _check_number("Fourier", "sd", sd, low=0.0)

    def _scale(self, height: int, width: int, like: torch.Tensor) -> torch.Tensor:
        fy = torch.fft.fftfreq(height, dtype=torch.float64)[:, None]
        fx = torch.fft.rfftfreq(width, dtype=torch.float64)[None, :]
        frequency = (fx * fx + fy * fy).sqrt().clamp(min=1.0 / max(height, width))
        return frequency.pow(-self.decay_power).to(like.device, like.dtype)

    def _colours(self, like: torch.Tensor) -> torch.Tensor:
        matrix = torch.tensor(_COLOUR_CORRELATION, dtype=torch.float64)
        matrix = matrix / matrix.norm(dim=0).max()
        return matrix.to(like.device, like.dtype)

    def init(self, shape, generator, dtype):
        n, c, h, w = shape
        return torch.randn((n, c, h, w // 2 + 1, 2), generator=generator, dtype=torch.float64).mul_(self.sd).to(dtype)

    def image(self, parameters, size):
        h, w = size
        spectrum = torch.view_as_complex(parameters) * self._scale(h, w, parameters)
        decorrelated = torch.fft.irfft2(spectrum, s=(h, w), norm="ortho") / _FOURIER_IMAGE_SCALE
        if not self.decorrelate:
            return decorrelated
        return torch.einsum("ij,njhw->nihw", self._colours(decorrelated), decorrelated)

    def parameters_of(self, z):
        h, w = z.shape[-2:]
        if self.decorrelate:
            z = torch.einsum("ij,njhw->nihw", torch.linalg.inv(self._colours(z)), z)
        spectrum = torch.fft.rfft2(z * _FOURIER_IMAGE_SCALE, norm="ortho") / self._scale(h, w, z)
        return torch.view_as_real(spectrum).contiguous()


# --------------------------------------------------------------------------------------------- #
# Transforms (Lucid's transformation robustness)
# --------------------------------------------------------------------------------------------- #

def _uniform(count: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    """``count`` draws from U[low, high] (float64, on the CPU, from ``generator``)."""
    return torch.rand(count, generator=generator, dtype=torch.float64) * (high - low) + low


def _warp(rgb: torch.Tensor, angles: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Each image rotated by ``angles[n]`` degrees and scaled by ``scales[n]`` about its centre
    (bilinear; the border mirrored, so no gray or black corners appear)."""
    radians = angles * (math.pi / 180.0)
    cos, sin = torch.cos(radians) / scales, torch.sin(radians) / scales
    zero = torch.zeros_like(cos)
    # affine_grid maps output coordinates to input ones: the inverse of the image's rotation and scaling
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta.to(rgb.device, rgb.dtype), list(rgb.shape), align_corners=False)
    return F.grid_sample(rgb, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


@register
class Jitter(Transform):
    name = "jitter"
    description = ("shifts the image by a random whole number of pixels, up to ``pixels`` each way (the border "
                   "mirrored), before every step: patterns that only work at one pixel offset (checkerboards) "
                   "are not reinforced")

    def __init__(self, pixels: int = 8):
        self.pixels = _check_number("Jitter", "pixels", pixels, low=1, integer=True)

    def __call__(self, rgb, generator):
        n, _, h, w = rgb.shape
        pad = min(self.pixels, h - 1, w - 1)
        if pad < 1:
            return rgb
        shifts = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator).tolist()
        padded = F.pad(rgb, [pad] * 4, mode="reflect")
        return torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(shifts)])


@register
class Scale(Transform):
    name = "scale"
    description = ("scales the image about its centre by a random factor in [1 - amount, 1 + amount] before every "
                   "step, so the pattern must work at slightly different sizes")

    def __init__(self, amount: float = 0.1):
        self.amount = _check_number("Scale", "amount", amount, low=0.0, high=0.9)

    def __call__(self, rgb, generator):
        n = rgb.shape[0]
        return _warp(rgb, torch.zeros(n, dtype=torch.float64), _uniform(n, 1 - self.amount, 1 + self.amount, generator))


@register
class Rotate(Transform):
    name = "rotate"
    description = ("rotates the image about its centre by a random angle of up to ``degrees`` each way before every "
                   "step, so the pattern must work at slightly different orientations")

    def __init__(self, degrees: float = 10.0):
        self.degrees = _check_number("Rotate", "degrees", degrees, low=0.0, high=180.0)

    def __call__(self, rgb, generator):
        n = rgb.shape[0]
        return _warp(rgb, _uniform(n, -self.degrees, self.degrees, generator), torch.ones(n, dtype=torch.float64))


# --------------------------------------------------------------------------------------------- #
# Step operators (Yosinski et al. 2015, Sec. 3)
# --------------------------------------------------------------------------------------------- #

def gaussian_blur(z: torch.Tensor, sigma: float) -> torch.Tensor:
    """``z`` [N, C, H, W] blurred by a Gaussian of standard deviation ``sigma`` pixels (separable,
    radius ceil(3 sigma), the border mirrored)."""
    radius = min(max(1, math.ceil(3 * sigma)), z.shape[-2] - 1, z.shape[-1] - 1)
    if sigma <= 0 or radius < 1:
        return z
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(z.device, z.dtype)
    channels = z.shape[1]
    rows = kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
    columns = kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1)
    z = F.conv2d(F.pad(z, [0, 0, radius, radius], mode="reflect"), rows, groups=channels)
    return F.conv2d(F.pad(z, [radius, radius, 0, 0], mode="reflect"), columns, groups=channels)


def _below_percentile(scores: torch.Tensor, percentile: float) -> torch.Tensor:
    """Bool [N, H, W]: where each image's ``scores`` [N, H, W] lie below its ``percentile``."""
    threshold = torch.quantile(scores.flatten(1).to(torch.float64), percentile / 100.0, dim=1)
    return scores < threshold.to(scores.dtype).view(-1, 1, 1)


@register
class Decay(StepOperator):
    name = "decay"
    description = ("L2 decay: after every step the image moves towards gray by the share ``strength`` "
                   "(z <- (1 - strength) z), so pixels the unit does not need fade out and no colour saturates")

    def __init__(self, strength: float = 0.01):
        self.strength = _check_number("Decay", "strength", strength, low=0.0, high=1.0)

    def apply(self, z, gradient, step):
        z.mul_(1.0 - self.strength)


@register
class Blur(StepOperator):
    name = "blur"
    description = ("Gaussian blur of ``sigma`` pixels every ``every`` steps: removes the high frequencies that the "
                   "gradient piles up, at some cost in the activation reached")

    def __init__(self, sigma: float = 0.5, every: int = 4):
        self.sigma = _check_number("Blur", "sigma", sigma, low=0.0)
        self.every = _check_number("Blur", "every", every, low=1, integer=True)

    def apply(self, z, gradient, step):
        if (step + 1) % self.every == 0:
            z.copy_(gaussian_blur(z, self.sigma))


@register
class NormClip(StepOperator):
    name = "norm_clip"
    description = ("after every step, the pixels whose colour vector has a norm below the image's ``percentile`` "
                   "are set to gray: only the strongest parts of the pattern stay")

    def __init__(self, percentile: float = 20.0):
        self.percentile = _check_number("NormClip", "percentile", percentile, low=0.0, high=100.0)

    def apply(self, z, gradient, step):
        z.mul_(~_below_percentile(z.norm(dim=1), self.percentile).unsqueeze(1))


@register
class ContributionClip(StepOperator):
    name = "contribution_clip"
    description = ("after every step, the pixels whose contribution to the objective (|sum over colours of z times "
                   "its gradient|: the change if the pixel went gray) is below the image's ``percentile`` are set "
                   "to gray: what the unit does not use disappears")
    needs_gradient = True

    def __init__(self, percentile: float = 20.0):
        self.percentile = _check_number("ContributionClip", "percentile", percentile, low=0.0, high=100.0)

    def apply(self, z, gradient, step):
        contribution = (z * gradient).sum(dim=1).abs()
        z.mul_(~_below_percentile(contribution, self.percentile).unsqueeze(1))


#: The regularizers ``synthesize`` uses unless told otherwise, per objective (chosen by measuring:
#: docs/synthesize.md). Jitter moves the pattern off a single unit, so "neuron" goes without it.
DEFAULT: Dict[str, Tuple[Regularizer, ...]] = {
    "channel": (Fourier(), Jitter(), Scale(), Rotate()),
    "neuron": (Fourier(), Scale(), Rotate()),
}
