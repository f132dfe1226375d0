"""The sanity check of every rule (Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS 2018):
does the projection depend on the model's weights at all?

    table = deconvcuda.sanity_check(model, images, "features.28")
    table.layers        # ("features.28", "features.26", ..., "features.0"): randomized top down
    table.spearman      # [rules, steps + 1]: step 0 the original model (1.0), step k layers[:k] randomized
    table.ssim          # the same for SSIM

Cascading randomization: the layers with weights on the way to ``layer`` (the modules with their own
parameters that the forward runs up to ``layer``'s output, ``layer`` included) are re-initialised one
at a time from the top down, each keeping the ones above it random. A layer is re-initialised with
its own init (``reset_parameters()``; a module without one has each of its parameters' entries
shuffled), under a generator seeded from ``seed``, on a deep copy: the model passed in never changes.

At every step each rule projects the same activations (``deconvcuda.project`` with ``neurons`` and
``seed="one"``), chosen on the original model, so the original and randomized projections are of the
same neurons. Per image, both are cut to the activation's receptive field (clipped to the image, at
least SSIM's 11 x 11 window where the image is that large; the whole image for a flat or token
layer): outside it every projection is zero whatever the weights, and counting those pixels would
make any two projections look alike. There they become Adebayo's maps
(:func:`deconvcuda.similarity.saliency_maps`: |p| summed over channels, scaled to [0, 1] by the 99th
percentile) and are compared by Spearman's rank correlation and SSIM; the table holds the means over
the images.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from . import rules as rule_registry
from .batches import iter_batches
from .capture import capture
from .checks import ArgumentError, as_list, check_channel_per_image, check_images, check_model, is_int, resolve_layer
from .progress import track
from .receptive_field import receptive_field
from .similarity import SSIM_WINDOW, saliency_maps, spearman, ssim

__all__ = ["SanityCheck", "sanity_check", "randomizable_layers", "randomize", "DEFAULT_RULES"]

#: The rules :func:`sanity_check` compares unless told otherwise: the DeconvNet, guided backpropagation, the gradient.
DEFAULT_RULES = ("deconvnet", "guided", "gradient")


@dataclass
class SanityCheck:
    """The result of :func:`sanity_check`. Step 0 is the original model; step k has ``layers[:k]``
    randomized (``layers`` runs from the top of the path down to the input)."""

    #: The layer whose activations are projected.
    layer: str
    #: The randomized layers, in the order they were randomized (top first).
    layers: Tuple[str, ...]
    #: The rules, one row each.
    rules: Tuple[str, ...]
    #: ``[rules, steps + 1]``: mean over the images of the Spearman rank correlation between the
    #: original and the randomized projection (Adebayo's absolute-value maps).
    spearman: torch.Tensor
    #: ``[rules, steps + 1]``: the same for SSIM.
    ssim: torch.Tensor
    #: ``[rules, steps + 1, N]``: each image's Spearman correlation.
    spearman_per_image: torch.Tensor
    #: ``[rules, steps + 1, N]``: each image's SSIM.
    ssim_per_image: torch.Tensor
    #: ``[N, 4]``: the projected activation of each image, ``(image, channel, y, x)`` as ``project``'s
    #: ``neurons`` (chosen on the original model).
    neurons: torch.Tensor
    #: ``[N, 4]``: per image the region compared, ``(top, left, bottom, right)`` (half-open): the
    #: activation's receptive field clipped to the image, at least SSIM's window where the image allows.
    regions: torch.Tensor
    #: ``[rules, steps + 1, C, H, W]``: the first image's projection per rule and step (the figure's cells).
    projections: torch.Tensor
    #: The seed of the randomization.
    seed: int


def _run_to_layer(model: nn.Module, images: torch.Tensor, layer: str, caller: str
                  ) -> Tuple[List[str], torch.Tensor]:
    """(the modules with their own parameters that the forward runs up to ``layer``'s output, in the
    order they finish, ``layer`` included; ``layer``'s output). One whole forward without autograd
    by :func:`deconvcuda.capture.capture` (eval mode; a layer called more than once or never is an
    error that says so), with a hook on each of those modules and on the layer, removed afterwards."""
    owners = [name for name, module in model.named_modules()
              if next(module.parameters(recurse=False), None) is not None]
    finished: List[str] = []     # the owners and the layer, each at its first call's end

    def finish(name: str):
        def hook(module, inputs, output):
            if name not in finished:
                finished.append(name)
        return hook

    watched = list(dict.fromkeys(owners + ([layer] if layer else [])))
    handles = [model.get_submodule(name).register_forward_hook(finish(name)) for name in watched]
    try:
        with torch.inference_mode(False), torch.no_grad():
            outputs, _ = capture(model, images, [layer], caller)
    finally:
        for handle in handles:
            handle.remove()
    owned = set(owners)
    reached = finished[:finished.index(layer) + 1] if layer else finished
    return [name for name in reached if name in owned], outputs[layer]


def randomizable_layers(model: nn.Module, images: torch.Tensor, layer) -> Tuple[str, ...]:
    """The layers :func:`sanity_check` randomizes for ``layer``, in its order (top of the path first):
    the modules with their own parameters that the forward of ``images`` runs up to ``layer``'s output."""
    caller = "randomizable_layers"
    check_images(images, caller, allow_empty=False)
    finished, _ = _run_to_layer(model, images, resolve_layer(model, layer, caller), caller)
    return tuple(finished[::-1])


def randomize(module: nn.Module, generator_seed: int) -> None:
    """Re-initialise ``module``'s own parameters in place: its ``reset_parameters()`` where it has one
    (BatchNorm's also resets its running statistics), else a random permutation of each of its own
    parameters' entries; the global random state is seeded with ``generator_seed`` inside and restored
    afterwards."""
    devices = sorted({p.device.index or 0 for p in module.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(generator_seed)
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()
            return
        for parameter in module.parameters(recurse=False):
            order = torch.randperm(parameter.numel()).to(parameter.device)
            parameter.copy_(parameter.flatten()[order].view_as(parameter))


def _check_rules(rules, caller: str) -> Tuple[str, ...]:
    names = ", ".join(map(repr, rule_registry.names()))
    rules = as_list(rules, (str, rule_registry.Rule), "rules", f"a rule name or a sequence of them ({names})", caller)
    names = tuple(rule_registry.get(rule, caller, "rules").name for rule in rules)
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"{caller}: rules names {', '.join(map(repr, repeated))} more than once; name each rule once")
    return names


def _neurons(output: torch.Tensor, channel, caller: str) -> torch.Tensor:
    """Per image the activation to project, ``[N, 4]`` rows (image, channel, y, x) on the CPU: with
    ``channel=None`` the layer's largest activation (the first maximum in (channel, y, x) order), with
    a channel that map's largest activation."""
    n, flat = output.shape[0], output.dim() == 2
    if output.dim() == 4:
        channels, width = output.shape[1], output.shape[3]
    elif output.dim() == 3:      # tokens [N, T, D]: the feature d is the channel, the token t the row
        channels, width = output.shape[2], 1
        output = output.transpose(1, 2)[..., None]
    elif output.dim() == 2:      # flat [N, F]: the unit
        channels, width = output.shape[1], 1
        output = output[..., None, None]
    else:
        raise ValueError(f"{caller}: the layer's output must be [N, C, h, w], [N, T, D] or [N, F], got "
                         f"{list(output.shape)}")
    chosen = check_channel_per_image(channel, n, channels, flat, caller)
    maps = output.detach().to(torch.float64).cpu()                               # [N, C, h, w]
    if chosen is None:
        strongest = maps.flatten(1).argmax(dim=1)
        chosen, place = strongest // (maps.shape[2] * width), strongest % (maps.shape[2] * width)
    else:
        place = maps[torch.arange(n), chosen].flatten(1).argmax(dim=1)
    return torch.stack([torch.arange(n), chosen, place // width, place % width], dim=1)


def _regions(model: nn.Module, layer: str, neurons: torch.Tensor, spatial: bool, size) -> torch.Tensor:
    """Per neuron, ``(top, left, bottom, right)`` of its receptive field clipped to the image, widened
    (centred, inside the image) to SSIM's window where it is smaller and the image allows; the whole
    image for a layer without a spatial output or where the field is not known."""
    height, width = int(size[0]), int(size[1])
    whole = torch.tensor([[0, 0, height, width]]).expand(neurons.shape[0], 4)
    if not spatial:
        return whole.clone()
    try:
        field = receptive_field(model, layer, input_size=(height, width))
    except (TypeError, ValueError):  # geometry receptive_field cannot read (fx, an op): compare the whole image
        return whole.clone()
    boxes = field.boxes(neurons[:, 2], neurons[:, 3])
    regions = []
    for top, left, bottom, right in boxes.tolist():
        spans = []
        for start, stop, extent in ((top, bottom, height), (left, right, width)):
            start, stop = max(start, 0), min(stop, extent)
            least = min(SSIM_WINDOW, extent)
            if stop - start < least:
                start = min(max((start + stop - least) // 2, 0), extent - least)
                stop = start + least
            spans.append((start, stop))
        regions.append([spans[0][0], spans[1][0], spans[0][1], spans[1][1]])
    return torch.tensor(regions, dtype=torch.long)


def _region_maps(projections: torch.Tensor, regions: torch.Tensor) -> List[torch.Tensor]:
    """Per image, Adebayo's map ``[1, h, w]`` of its projection inside its region."""
    return [saliency_maps(p[None, :, top:bottom, left:right])
            for p, (top, left, bottom, right) in zip(projections, regions.tolist())]


def sanity_check(model: nn.Module, images: torch.Tensor, layer, *,
                 rules: Sequence[str] = DEFAULT_RULES, channel=None, seed: int = 0,
                 batch_size: Optional[int] = None, progress: bool = False) -> SanityCheck:
    """Cascading randomization (Adebayo et al. 2018) of the layers with weights on the way to ``layer``,
    from the top down, and how much each rule's projection changes.

    images: ``[N, C, H, W]`` model input. layer: a name from
    ``model.named_modules()`` ("" is the model's output, e.g. the class scores, as in the paper).
    rules: rule names (``deconvcuda.rules``). channel: None (per image, the layer's largest activation
    on the original model), an int or a LongTensor ``[N]`` (per image, that map's largest activation on
    the original model); a flat layer's unit, a token layer's feature. The same activations, seeded
    with 1, are projected at every step. seed: seeds the re-initialisation (the same seed gives the
    same table). batch_size: images projected together (None: all of them), which bounds the memory
    of each projection; the table does not depend on it. progress: progress on stderr over the
    randomization steps (:mod:`deconvcuda.progress`).

    Returns a :class:`SanityCheck`: ``layers`` (randomized, top first), ``rules``, and ``spearman`` and
    ``ssim`` ``[rules, steps + 1]`` (step 0 the original model: 1.0; step k with ``layers[:k]``
    randomized), each the mean over the images of Adebayo's measure between the original and the
    randomized projection inside the activation's receptive field (``regions``). The model passed in
    is never changed.
    """
    from .engine import project

    caller = "sanity_check"
    check_model(model, caller)
    check_images(images, caller, allow_empty=False)
    layer = resolve_layer(model, layer, caller)
    names = _check_rules(rules, caller)
    if not is_int(seed):
        raise ArgumentError(f"{caller}: seed must be an int, got {type(seed).__name__}")
    seed = int(seed)
    batches = list(iter_batches(images, images.shape[0] if batch_size is None else batch_size, caller))
    finished, output = _run_to_layer(model, images, layer, caller)
    neurons = _neurons(output, channel, caller)
    regions = _regions(model, layer, neurons, output.dim() == 4, images.shape[-2:])
    del output
    layers = tuple(finished[::-1])
    if not layers:
        raise ValueError(f"{caller}: no layer with weights runs before layer {layer!r}, so there is nothing to "
                         f"randomize; name a layer after a convolution or a linear layer")

    def projections(net: nn.Module) -> List[torch.Tensor]:
        """Per rule, the projections ``[N, C, H, W]`` of ``neurons`` (one row per image), batch by batch."""
        return [torch.cat([project(net, batch, layer, rule=rule, seed="one",
                                   neurons=(neurons[first:first + len(batch)] - torch.tensor([first, 0, 0, 0])
                                            ).to(images.device))
                           for first, batch in batches])
                for rule in names]

    original = projections(model)
    original_maps = [_region_maps(p, regions) for p in original]
    n = images.shape[0]
    rho = torch.ones(len(names), len(layers) + 1, n, dtype=torch.float64)
    similarity = torch.ones_like(rho)
    firsts = torch.empty((len(names), len(layers) + 1) + tuple(original[0].shape[1:]), dtype=original[0].dtype)
    firsts[:, 0] = torch.stack([p[0].detach().cpu() for p in original])
    randomized = copy.deepcopy(model)
    draws = torch.Generator().manual_seed(seed)
    for step, module in enumerate(track(layers, desc="sanity_check: randomizing", unit="layer", enabled=progress),
                                  start=1):
        randomize(randomized.get_submodule(module), int(torch.randint(2 ** 62, (1,), generator=draws)))
        for row, (before, after) in enumerate(zip(original_maps, projections(randomized))):
            for image, (a, b) in enumerate(zip(before, _region_maps(after, regions))):
                rho[row, step, image] = spearman(a.flatten(1), b.flatten(1)).cpu()
                similarity[row, step, image] = ssim(a, b).cpu()
            firsts[row, step] = after[0].detach().cpu()
    return SanityCheck(layer=layer, layers=layers, rules=names, spearman=rho.mean(dim=2), ssim=similarity.mean(dim=2),
                       spearman_per_image=rho, ssim_per_image=similarity, neurons=neurons, regions=regions,
                       projections=firsts, seed=seed)
