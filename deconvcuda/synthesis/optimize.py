"""Feature visualization by regularized optimization (Yosinski et al. 2015; Olah et al. 2017): the image
a unit would like best, beside the DeconvNet's top-9 of what it saw.

    images = deconvcuda.synthesize(model, "features.22", [3, 17, 40], size=128)     # [3, 3, 128, 128] RGB in [0, 1]
    images = deconvcuda.synthesize(model, "features.22", [3], regularizers=["decay", Blur(1.0, every=4)])
    values = deconvcuda.synthesis.objective_values(model, "features.22", images, [3, 17, 40])

All channels are optimised together, one image each, as one batch: gradient ascent (Adam) on the
parameterization's tensor, the model run through :func:`deconvcuda.capture.capture` (eval mode, flags
restored, hooks removed; any ``nn.Module``, also those torch.fx cannot trace). Gradients are taken
with respect to the image only: the model's parameters, their ``requires_grad`` and ``.grad`` stay as
they are.
"""
from __future__ import annotations

import numbers
from typing import Callable, List, Tuple

import torch
from torch import nn

from ..capture import capture
from ..checks import ArgumentError, OutOfRangeError, check_model, is_int
from . import regularizers as _regularizers
from .redirect import redirected_relus

__all__ = ["synthesize", "objective_values", "check_options", "OBJECTIVES", "OBJECTIVE_WORDS", "DEFAULT_SIZE",
           "DEFAULT_STEPS", "DEFAULT_LR"]

#: "channel": the mean of the channel's map (over positions, or over tokens); "neuron": the unit at
#: the map's centre (row H // 2, column W // 2; the token T // 2). Flat layers [N, F]: the unit, either way.
OBJECTIVES = ("channel", "neuron")
#: Each objective in words, for captions (of a flat layer's unit, either way).
OBJECTIVE_WORDS = {"channel": "the mean of the channel's map", "neuron": "the unit at the centre of the channel's map"}
#: The images' side, steps and Adam's learning rate unless told otherwise (steps and rate chosen by
#: measuring: docs/synthesize.md).
DEFAULT_SIZE = 224
DEFAULT_STEPS = 256
DEFAULT_LR = 0.05


def _unit_values(output: torch.Tensor, channels: torch.Tensor, objective: str) -> torch.Tensor:
    """[N]: for image n, the objective of channel ``channels[n]`` in the layer's ``output``:
    [N, C, H, W] (maps), [N, F] (units) or [N, T, D] (tokens, the channel a feature d)."""
    rows = torch.arange(output.shape[0], device=output.device)
    if output.dim() == 2:
        return output[rows, channels]
    if output.dim() == 4:
        maps = output[rows, channels]                        # [N, H, W]
        if objective == "neuron":
            return maps[:, maps.shape[1] // 2, maps.shape[2] // 2]
        return maps.mean(dim=(1, 2))
    tokens = output[rows, :, channels]                       # [N, T]
    return tokens[:, tokens.shape[1] // 2] if objective == "neuron" else tokens.mean(dim=1)


def _channel_axis(output: torch.Tensor, layer: str, caller: str) -> int:
    """Which axis of the layer's output the channels index; an error for outputs of another shape."""
    if output.dim() not in (2, 3, 4):
        raise ValueError(f"{caller}: layer {layer!r} has an output of shape {list(output.shape)}; expected maps "
                         f"[N, C, H, W], units [N, F] or tokens [N, T, D]; name another layer")
    return 2 if output.dim() == 3 else 1


def _check_channels(channels, caller: str) -> List[int]:
    if is_int(channels):
        channels = [channels]
    elif isinstance(channels, torch.Tensor):
        if channels.dim() != 1 or channels.is_floating_point() or channels.dtype == torch.bool:
            raise ArgumentError(f"{caller}: channels must be an int, a list of ints or a 1-D integer tensor, got a "
                                f"{channels.dtype} tensor of shape {list(channels.shape)}")
        channels = channels.tolist()
    try:
        channels = list(channels)
    except TypeError:
        raise ArgumentError(f"{caller}: channels must be an int, a list of ints or a 1-D integer tensor, got "
                            f"{type(channels).__name__}") from None
    bad = [channel for channel in channels if not is_int(channel)]
    if bad:
        raise ArgumentError(f"{caller}: channels must be ints, got {bad[0]!r} ({type(bad[0]).__name__})")
    if not channels:
        raise ValueError(f"{caller}: channels is empty; pass at least one channel")
    return [int(channel) for channel in channels]


def _check_positive_int(value, argument: str, caller: str, what: str) -> int:
    if not is_int(value) or value < 1:
        raise ValueError(f"{caller}: {argument} must be a positive int ({what}), got {value!r}")
    return int(value)


def _check_objective(objective, caller: str) -> str:
    if objective not in OBJECTIVES:
        raise ValueError(f"{caller}: objective must be one of {', '.join(map(repr, OBJECTIVES))}, got {objective!r}")
    return objective


def _placement(model: nn.Module, device, caller: str):
    """(device, dtype) of the optimisation: ``device`` (where the model must be) or the model's; the
    dtype of the model's first floating-point parameter or buffer (float32 for a model with none)."""
    from ..scan import model_device

    floating = [t for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()]
    dtype = floating[0].dtype if floating else torch.float32
    own = model_device(model)
    if device is None:
        return own, dtype
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{caller}: device must be a torch.device or a name like 'cuda:0', got {device!r}") from None
    if device != own and not (device.type == own.type and device.index is None):
        raise ValueError(f"{caller}: device is {device} but the model's weights are on {own}; move the model there "
                         f"first (model.to({str(device)!r})) or leave device out")
    return device, dtype


def _input_mapping(model: nn.Module, preprocessing, caller: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """RGB in [0, 1] -> the model's input: ``preprocessing`` (a Preprocessing or a callable), else the
    model's own ``preprocessing`` where ``models.build`` made it, else the identity."""
    from ..models import Preprocessing

    if preprocessing is None:
        own = getattr(model, "preprocessing", None)
        return own.to_model if isinstance(own, Preprocessing) else (lambda rgb: rgb)
    if isinstance(preprocessing, Preprocessing):
        return preprocessing.to_model
    if callable(preprocessing):
        return preprocessing
    raise ArgumentError(f"{caller}: preprocessing must be a deconvcuda.models.Preprocessing or a function from RGB "
                        f"in [0, 1] to the model's input, got {type(preprocessing).__name__}")


def _layer_output(model, layer, model_input, caller: str, *, stop_early: bool):
    from ..graph import resolve_layer

    name = resolve_layer(model, layer, caller)
    if not name:
        outputs, output = capture(model, model_input, [""], caller)
        return name, output
    outputs, _ = capture(model, model_input, [name], caller, stop_early=stop_early)
    return name, outputs[name]


def _check_layer_and_channels(model, layer, model_input, channels: List[int], caller: str
                              ) -> Tuple[str, torch.Tensor]:
    """One full forward, without gradients: the layer exists, is called once, returns a tensor of a
    known shape, and every channel is in it. Returns the layer's name and its output."""
    try:
        with torch.no_grad():
            name, output = _layer_output(model, layer, model_input, caller, stop_early=False)
    except RuntimeError as error:
        raise ValueError(f"{caller}: the model's forward failed on images of shape {list(model_input.shape)} "
                         f"({error}); choose a size the model accepts") from error
    if not isinstance(output, torch.Tensor):
        raise ValueError(f"{caller}: the model's output is a {type(output).__name__}, not a tensor; name a layer")
    axis = _channel_axis(output, name or "(the model's output)", caller)
    count = output.shape[axis]
    outside = [channel for channel in channels if not 0 <= channel < count]
    if outside:
        raise OutOfRangeError(f"{caller}: channel {outside[0]} is outside layer {name!r}, which has {count} "
                              f"{'units' if output.dim() == 2 else 'channels'} (0..{count - 1})")
    return name, output


def check_options(caller: str, *, size: int = DEFAULT_SIZE, steps: int = DEFAULT_STEPS, seed: int = 0,
                  objective: str = "channel", regularizers=None, lr: float = DEFAULT_LR):
    """:func:`synthesize`'s options checked, errors naming ``caller``: ``(size, steps, seed, objective,
    lr, plan)``, ``plan`` the regularizers by role (:func:`regularizers.plan`). For callers that
    synthesize later (``visualize(synthesize=...)``) and want a mistake reported before their work."""
    size = _check_positive_int(size, "size", caller, "the images' side in pixels")
    steps = _check_positive_int(steps, "steps", caller, "the number of optimisation steps")
    if not is_int(seed):
        raise ValueError(f"{caller}: seed must be an int, got {seed!r}")
    objective = _check_objective(objective, caller)
    if not isinstance(lr, numbers.Real) or isinstance(lr, bool) or not lr > 0:
        raise ValueError(f"{caller}: lr must be a positive number (Adam's learning rate), got {lr!r}")
    plan = _regularizers.plan(regularizers, caller, default=_regularizers.DEFAULT[objective])
    return size, steps, int(seed), objective, float(lr), plan


def objective_values(model: nn.Module, layer, images: torch.Tensor, channels, *, objective: str = "channel",
                     preprocessing=None) -> torch.Tensor:
    """[N]: the objective :func:`synthesize` maximises, of channel ``channels[n]`` on image n
    (``images``: RGB [N, 3, H, W] in [0, 1], mapped by ``preprocessing`` as in :func:`synthesize`)."""
    caller = "objective_values"
    check_model(model, caller)
    channels = _check_channels(channels, caller)
    objective = _check_objective(objective, caller)
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
        raise ArgumentError(f"{caller}: images must be a floating-point tensor [N, 3, H, W] of RGB in [0, 1], got "
                            f"{list(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    if len(channels) != images.shape[0]:
        raise ValueError(f"{caller}: channels must name one channel per image ({images.shape[0]}), got {len(channels)}")
    model_input = _input_mapping(model, preprocessing, caller)(images)
    _, output = _check_layer_and_channels(model, layer, model_input, channels, caller)
    return _unit_values(output, torch.tensor(channels, device=output.device), objective)


def synthesize(model: nn.Module, layer, channels, *, size: int = DEFAULT_SIZE, steps: int = DEFAULT_STEPS,
               seed: int = 0, objective: str = "channel", preprocessing=None, regularizers=None, lr: float = DEFAULT_LR,
               device=None, progress: bool = True) -> torch.Tensor:
    """Images that drive each of ``channels`` of ``layer`` up: ``[len(channels), 3, size, size]`` RGB in [0, 1].

    layer: a name from ``model.named_modules()`` (or the module). channels: an int or a list of them,
    one image each, all optimised together. objective: "channel" maximises the mean of the channel's
    map, "neuron" the unit at its centre (row H // 2, column W // 2; the toolbox's choice); a flat layer
    [N, F] takes the unit; a token layer [N, T, D] the feature's mean over tokens, or the token T // 2.
    preprocessing: maps RGB in [0, 1] to the model's input (a ``models.Preprocessing`` or a function);
    default the model's own ``preprocessing`` where ``models.build`` made it, else the identity.
    regularizers: names or objects of ``deconvcuda.synthesis.regularizers`` (a list; ``[]`` for plain
    gradient ascent on the pixels); default ``regularizers.DEFAULT[objective]``: the Fourier
    parameterization with jitter, scale and rotation ("neuron": without jitter, which moves the pattern
    off the one unit; docs/synthesize.md has the measurements). steps and lr: Adam's steps and learning
    rate. device: where to optimise (default the model's). The same seed gives the same images
    (bitwise on the CPU). progress: a tqdm bar on stderr.
    """
    from tqdm.auto import tqdm

    caller = "synthesize"
    check_model(model, caller)
    channels = _check_channels(channels, caller)
    size, steps, seed, objective, lr, plan = check_options(caller, size=size, steps=steps, seed=seed,
                                                           objective=objective, regularizers=regularizers, lr=lr)
    device, dtype = _placement(model, device, caller)
    to_model = _input_mapping(model, preprocessing, caller)

    generator = torch.Generator().manual_seed(int(seed))
    shape = (len(channels), 3, size, size)
    parameterization = plan.parameterization
    parameters = parameterization.init(shape, generator, dtype).to(device).requires_grad_(True)
    with torch.no_grad():
        start = torch.sigmoid(parameterization.image(parameters, (size, size)))
        name, _ = _check_layer_and_channels(model, layer, to_model(start), channels, caller)
    index = torch.tensor(channels, device=device)
    optimizer = torch.optim.Adam([parameters], lr=float(lr), maximize=True)

    bar = tqdm(range(steps), desc=f"synthesize {name or 'output'}", unit="step", disable=not progress)
    for step in bar:
        with torch.enable_grad():
            z = parameterization.image(parameters, (size, size))
            rgb = torch.sigmoid(z)
            for transform in plan.transforms:
                rgb = transform(rgb, generator)
            with redirected_relus():
                _, output = _layer_output(model, name, to_model(rgb), caller, stop_early=True)
            values = _unit_values(output, index, objective)
            wanted = [parameters, z] if plan.needs_gradient and z is not parameters else [parameters]
            gradients = torch.autograd.grad(values.sum(), wanted)
        parameters.grad = gradients[0]
        optimizer.step()
        if plan.steps:
            with torch.no_grad():
                z_gradient = gradients[-1] if plan.needs_gradient else None
                z = parameterization.image(parameters, (size, size)).clone()
                for operator in plan.steps:
                    operator.apply(z, z_gradient, step)
                parameters.copy_(parameterization.parameters_of(z))
        if progress:
            bar.set_postfix(objective=f"{values.mean().item():.3g}", refresh=False)
    bar.close()
    with torch.no_grad():
        return torch.sigmoid(parameterization.image(parameters, (size, size))).detach()
