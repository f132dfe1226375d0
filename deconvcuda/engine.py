"""The projection engine: forward with switches, seeds, reverse over the graph to pixels.

    r = project(model, images, "features.10", channel=7)                  # each image's strongest activation
    r = project(model, images, "layer3.1", neurons=idx, rule="guided")    # idx: [P, 4] = (image, channel, y, x)

Data flows one way (docs/DESIGN.md): the graph (deconvcuda.graph) lists the nodes from the images to
the target layer; the forward runs them as the model does (its own calls, in the images' memory
format, eval mode) on the images' device and dtype, keeping what each node's reverse reads (a max
pool's switches, an LRN's input, a rectifier's mask under the masked rules, the inputs of an op
reversed by autograd); the seeds are put into a map shaped like the target's output; the reverse
walks the nodes backwards, each node's kind undoing its layer (the rule decides how rectifiers are
undone), and a node read by several consumers receives the sum of their gradients.

The reverse runs each node in one of two ways:
- full maps ``[P, ...]``: whole-map seeds, flat and token layers, nodes that mix positions (global
  pools, attention, reshapes), and every node of the reference backend;
- windows (native backend, point seeds on maps): a single activation's projection is non-zero only
  inside its receptive field, so each projection carries just that window of every feature map (see
  deconvcuda.windows), united where branches meet. When a window would be at least as large as the
  map, or a node mixes positions, that node and everything below it that it feeds runs on full maps.
Conv -> ReLU -> max pool chains whose inner nodes have one consumer each are reversed by one fused
kernel call (native backend, rules the kernels serve). Both ways and both backends give the same
numbers: the tests compare them.

Models the graph cannot hold (torch.fx cannot trace them; a tensor on the way leaves the batch in dim
0) take deconvcuda.fallback's autograd path, with one warning that says why.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from . import fallback, rules
from .checks import DtypeError, OutOfRangeError, check_images, is_int, resolve_layer
from .graph import Graph, Node, Untraceable, trace
from .kinds import LRN_MODES, At, Keeper, Unrepresentable, is_shape
from .kinds.base import numel
from .windows import Windows

__all__ = ["project", "OutOfRangeError", "DtypeError", "SEEDS", "LRN_MODES", "BACKENDS", "Selection",
           "layout_of", "channel_count"]

SEEDS = ("value", "one")
BACKENDS = ("auto", "reference")

# Projections are processed in chunks whose largest feature map (per chunk, in elements) stays
# under this bound on the CPU: 2**25 float32 values are 128 MiB, and a layer holds a few such tensors
# at once. On CUDA the bound follows the device's free memory (``_chunk_elements``).
CHUNK_ELEMENTS = 1 << 25
#: On CUDA, the share of the free device memory one chunk's largest map may take: a unit holds a
#: few maps of that size at once (its input, its output, a fused op's unpooled map, the sum).
CUDA_FREE_SHARE = 1 / 8


def _chunk_elements(like: torch.Tensor) -> int:
    """Elements one chunk's largest map may have: CHUNK_ELEMENTS on the CPU (a test may lower it), a
    share of the free memory on CUDA (at least CHUNK_ELEMENTS's worth where that is less)."""
    if like.device.type != "cuda" or CHUNK_ELEMENTS != 1 << 25:
        return CHUNK_ELEMENTS
    free, _ = torch.cuda.mem_get_info(like.device)
    return max(CHUNK_ELEMENTS, int(free * CUDA_FREE_SHARE) // like.element_size())


# --------------------------------------------------------------------------------------------- #
# Backends
# --------------------------------------------------------------------------------------------- #

class _Kernels:
    """The four ops of one backend, and whether the engine may crop and fuse with them."""

    def __init__(self, backend: str, caller: str):
        if backend == "reference":
            from . import reference_ops as ops  # pure PyTorch: nothing from the extension is imported
        else:
            try:
                from . import ops
            except ImportError as error:
                raise RuntimeError(f"{caller}: backend='auto' needs the compiled extension deconvcuda._C, which "
                                   f"could not be loaded ({error}); build it (`make build`) or pass "
                                   f"backend='reference'") from error
        if backend != "reference":
            from .dispatch import Dispatcher

            ops = Dispatcher(ops)  # deconv2d and the fused op: the fastest exact implementation per shape
        self.max_pool2d_switches = ops.max_pool2d_switches
        self.unpool_relu = ops.unpool_relu
        self.deconv2d = ops.deconv2d
        self.unpool_relu_deconv2d = ops.unpool_relu_deconv2d
        # the reference stays deliberately simple: full maps, one op per layer
        self.crop = self.fuse = backend != "reference"


# --------------------------------------------------------------------------------------------- #
# The reverse program: one unit per data node, or per fused conv -> ReLU -> max pool chain
# --------------------------------------------------------------------------------------------- #

@dataclass
class _Unit:
    """The reverse of one node (or of a fused chain ending in ``node``): takes the gradient at
    ``node``'s output and gives the gradients at the outputs of ``inputs`` (None for value inputs
    and inputs without a gradient)."""

    node: Node
    inputs: List[Node]
    in_shapes: List[object]
    out_shape: Tuple[int, ...]
    saved: object
    run: Callable[[torch.Tensor, At], List[Optional[torch.Tensor]]]
    input_windows: Callable[[Windows], List[Optional[Windows]]]
    windowed: bool
    inner_shape: Optional[Tuple[int, ...]] = None  # the map a fused chain passes through (the unpooled one)
    inner_grow: Optional[Callable[[Windows], Windows]] = None  # its windows, from the output's

    def peak_elements(self, windows: Optional[Windows]) -> int:
        """Elements per projection of the largest map this unit touches (full maps, or windows)."""
        shapes = [s for s in self.in_shapes if is_shape(s)]
        inner = [] if self.inner_shape is None else [numel(self.inner_shape)]
        if windows is None:
            return max([numel(self.out_shape)] + [numel(s) for s in shapes] + inner)
        if self.inner_shape is not None:
            mid = self.inner_grow(windows)
            inner = [self.inner_shape[0] * mid.height * mid.width]
        grown = [w for w in self.input_windows(windows) if w is not None]
        sizes = [s[0] * w.height * w.width for s, w in zip(shapes, grown)]
        return max([self.out_shape[0] * windows.height * windows.width] + inner + sizes)


def _program(graph: Graph, shapes: Dict[Node, object], saved: Dict[Node, object], kernels: _Kernels,
             rule: rules.Rule) -> List[_Unit]:
    """The reverse units from the target down to the input, in reverse topological order."""
    program: List[_Unit] = []
    absorbed = set()
    for node in reversed(graph.nodes[1:]):
        if node in absorbed or not node.data:
            continue
        # fused kernels where the backend fuses and serves the rule: the kind says which nodes below
        chain = node.kind.fused_chain(node, set(graph.targets.values())) if kernels.fuse and rule.kernel else []
        absorbed.update(chain)
        pool = node.kind
        if len(chain) == 2:
            relu, conv = chain
            conv_input = conv.inputs[0]
            run = (lambda g, at, pool=pool, conv=conv.kind, c_in=shapes[conv_input], mid=shapes[relu]:
                   pool.reverse_with_relu_conv(g, at, conv, c_in, mid))
            grow = (lambda w, pool=pool, conv=conv.kind: [conv.grow(pool.grow(w))])
            program.append(_Unit(node, [conv_input], [shapes[conv_input]], shapes[node], saved.get(node), run, grow,
                                 True, shapes[relu], pool.grow))
        elif len(chain) == 1:
            relu_input = chain[0].inputs[0]
            program.append(_Unit(node, [relu_input], [shapes[relu_input]], shapes[node], saved.get(node),
                                 pool.reverse_with_relu, lambda w, pool=pool: [pool.grow(w)], True))
        else:
            in_shapes = [shapes[i] for i in node.inputs]
            run = (lambda g, at, kind=node.kind: rule.reverse(kind, g, at))
            windows_of = (lambda w, kind=node.kind, s=in_shapes: kind.input_windows(w, s))
            program.append(_Unit(node, list(node.inputs), in_shapes, shapes[node], saved.get(node), run, windows_of,
                                 node.kind.windowed))
    return program


def _schedule(program: List[_Unit], crop: bool) -> Tuple[List[bool], int]:
    """Which units run on windows, and the elements per projection of the largest map touched, for
    chunking. A dry run with one point seed at (0, 0): window sizes depend on the geometry only.
    A unit runs on windows while its input windows stay smaller than its input maps."""
    windows: Dict[Node, Optional[Windows]] = {}
    if program:
        zero = torch.zeros(1, dtype=torch.long)
        windows[program[0].node] = Windows(zero, zero, 1, 1) if crop else None
    on_windows, peak = [], 1
    for unit in program:
        current = windows.pop(unit.node, None)
        grown = unit.input_windows(current) if current is not None and unit.windowed else None
        use = grown is not None and not any(
            w is not None and w.covers(s[1:]) for w, s in zip(grown, unit.in_shapes) if is_shape(s) and len(s) == 3)
        on_windows.append(use)
        peak = max(peak, unit.peak_elements(current if use else None))
        for i, node in enumerate(unit.inputs):
            if not node.data:
                continue
            mine = grown[i] if use else None
            if node in windows and (windows[node] is None or mine is None):
                windows[node] = None
            elif node in windows:
                windows[node] = windows[node].union(mine)
            else:
                windows[node] = mine
    return on_windows, peak


# --------------------------------------------------------------------------------------------- #
# Selections and checks
# --------------------------------------------------------------------------------------------- #

def layout_of(shape: Sequence[int]) -> str:
    """How a layer's per-image output is addressed: "map" (C, H, W), "tokens" (T, D), "flat" (F,), or
    "other" (only the whole map can be the seed)."""
    return {3: "map", 2: "tokens", 1: "flat"}.get(len(shape), "other")


def channel_count(shape: Sequence[int]) -> int:
    """How many channels ``channel`` can name in a layer of per-image ``shape``: a map's channels, a
    token layer's features, a flat layer's units."""
    return shape[1] if layout_of(shape) == "tokens" else shape[0]


def _check_options(rule, seed, lrn, backend, caller: str) -> None:
    rules.get(rule, caller)
    for name, value, allowed in (("seed", seed, SEEDS), ("lrn", lrn, LRN_MODES), ("backend", backend, BACKENDS)):
        if not isinstance(value, str) or value not in allowed:
            raise ValueError(f"{caller}: {name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


@dataclass
class Selection:
    """The projections to compute: per projection the image (row of the forward batch), channel
    (the feature of a token layer, the unit of a flat one) and position (y, x of a map; the token
    and 0 of a token layer; 0, 0 of a flat one), all on the images' device; ``points`` is False for
    the whole-map seed."""

    layout: str
    images: torch.Tensor
    channels: Optional[torch.Tensor] = None
    y: Optional[torch.Tensor] = None
    x: Optional[torch.Tensor] = None

    @property
    def points(self) -> bool:
        return self.channels is not None

    def reordered(self, order: torch.Tensor) -> "Selection":
        """The same projections in ``order``."""
        pick = (lambda t: None if t is None else t[order])
        return Selection(self.layout, self.images[order], pick(self.channels), pick(self.y), pick(self.x))

    @property
    def count(self) -> int:
        return self.images.shape[0]

    def index(self, start: int, stop: int, rows: torch.Tensor) -> tuple:
        """Indices of the selected activations of projections [start, stop) into a tensor whose rows
        are ``rows``."""
        channels = self.channels[start:stop]
        if self.layout == "map":
            return rows, channels, self.y[start:stop], self.x[start:stop]
        if self.layout == "tokens":
            return rows, self.y[start:stop], channels
        return rows, channels

    def full_seeds(self, output: torch.Tensor, start: int, stop: int, seed: str) -> torch.Tensor:
        """The seed maps of projections [start, stop), shaped like their rows of ``output``."""
        values = output[self.images[start:stop]]
        if not self.points:
            return torch.ones_like(values) if seed == "one" else values
        g = torch.zeros_like(values)
        index = self.index(start, stop, torch.arange(stop - start, device=values.device))
        g[index] = 1 if seed == "one" else values[index]
        return g

    def window_seeds(self, output: torch.Tensor, start: int, stop: int, seed: str) -> Tuple[torch.Tensor, Windows]:
        """Point seeds on a map as 1x1 windows at the selected positions."""
        images, channels = self.images[start:stop], self.channels[start:stop]
        y, x = self.y[start:stop], self.x[start:stop]
        values = output[images, channels, y, x]
        if seed == "one":
            values = torch.ones_like(values)
        g = output.new_zeros(stop - start, output.shape[1])
        g.scatter_(1, channels[:, None], values[:, None])
        return g.view(stop - start, output.shape[1], 1, 1), Windows.points(y, x)


def _check_neurons(neurons, n_images: int, target_shape, caller: str) -> torch.Tensor:
    expected = f"{caller}: neurons must be a LongTensor [P, 4] of (image, channel, y, x) rows"
    if not isinstance(neurons, torch.Tensor) or neurons.dtype != torch.long:
        got = (f"a {neurons.dtype} tensor" if isinstance(neurons, torch.Tensor) else type(neurons).__name__)
        raise DtypeError(f"{expected}, got {got}")
    if neurons.dim() != 2 or neurons.shape[1] != 4:
        raise ValueError(f"{expected}, got shape {list(neurons.shape)}")
    if neurons.shape[0] == 0:
        return neurons
    layout = layout_of(target_shape)
    if layout == "other":
        raise ValueError(f"{caller}: neurons need a layer whose output is a map [N, C, H, W], tokens [N, T, D] or "
                         f"flat [N, F]; this one is [N, {', '.join(map(str, target_shape))}]: project the whole map")
    if layout == "map":
        bounds, columns = [n_images] + list(target_shape), "(image, channel, y, x) rows"
    elif layout == "tokens":
        bounds, columns = [n_images, target_shape[1], target_shape[0], 1], "(image, feature, token, 0) rows for a " \
                                                                          "token layer"
    else:
        bounds, columns = [n_images, target_shape[0], 1, 1], "(image, unit, 0, 0) rows for a flat layer"
    limits = torch.tensor(bounds, device=neurons.device)
    bad = ((neurons < 0) | (neurons >= limits)).any(dim=1)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise OutOfRangeError(f"{caller}: neurons row {row} = {neurons[row].tolist()} is out of range: expected "
                              f"{columns} below {bounds} (images, then the layer's output shape)")
    return neurons


def _check_selection(channel, position, neurons, layout: str, caller: str) -> None:
    if neurons is not None and channel is not None:
        raise ValueError(f"{caller}: pass either channel (with an optional position) or neurons, not both")
    if neurons is not None and position is not None:
        raise ValueError(f"{caller}: position goes with channel; neurons rows carry their own positions")
    if position is not None and channel is None:
        raise ValueError(f"{caller}: position needs a channel")
    if position is not None and layout == "flat":
        raise ValueError(f"{caller}: position is not allowed with a layer whose output is flat [N, F]; channel "
                         f"names the unit")
    if channel is not None and not is_int(channel):
        raise TypeError(f"{caller}: channel must be an int, got {channel!r}")
    if channel is not None and layout == "other":
        raise ValueError(f"{caller}: channel needs a layer whose output is a map [N, C, H, W], tokens [N, T, D] or "
                         f"flat [N, F]; project the whole map of this one instead")


def _check_channel_position(channel, position, target_shape, caller: str):
    layout = layout_of(target_shape)
    channel = int(channel)
    count = channel_count(target_shape)
    if not 0 <= channel < count:
        what = "feature (channel)" if layout == "tokens" else "channel"
        raise OutOfRangeError(f"{caller}: {what} must be in [0, {count}) for this layer, got {channel}")
    if position is None:
        return channel, None
    if layout == "tokens":
        if isinstance(position, torch.Tensor):
            position = position.item() if position.numel() == 1 else position.tolist()
        if not is_int(position):
            raise TypeError(f"{caller}: position must be a token index (an int) for a token layer [N, T, D], got "
                            f"{position!r}")
        if not 0 <= int(position) < target_shape[0]:
            raise OutOfRangeError(f"{caller}: position must be a token in [0, {target_shape[0]}), got {position}")
        return channel, (int(position), 0)
    if isinstance(position, torch.Tensor):
        position = position.tolist()
    if not isinstance(position, (tuple, list)) or len(position) != 2 or not all(is_int(v) for v in position):
        raise TypeError(f"{caller}: position must be a pair of ints (y, x), got {position!r}")
    y, x = int(position[0]), int(position[1])
    if not (0 <= y < target_shape[1] and 0 <= x < target_shape[2]):
        raise OutOfRangeError(f"{caller}: position must be inside the layer's {target_shape[1]}x{target_shape[2]} map, "
                              f"got {(y, x)}")
    return channel, (y, x)


def _strongest(output: torch.Tensor, layout: str, channel: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per image, the position of its strongest activation of ``channel``: the first maximum in
    row-major order (of a map; over the tokens of a token layer)."""
    if layout == "map":
        strongest = output[:, channel].flatten(1).argmax(dim=1)
        return strongest // output.shape[3], strongest % output.shape[3]
    if layout == "tokens":
        token = output[:, :, channel].argmax(dim=1)
        return token, torch.zeros_like(token)
    zeros = torch.zeros(output.shape[0], dtype=torch.long, device=output.device)
    return zeros, zeros.clone()


def _selection(output: torch.Tensor, layout: str, channel, position, neurons, rows) -> Selection:
    """The selection on the forward's ``output`` (whose rows are the distinct images with ``neurons``)."""
    if neurons is not None:
        return Selection(layout, rows, neurons[:, 1], neurons[:, 2], neurons[:, 3])
    every = torch.arange(output.shape[0], device=output.device)
    if channel is None:
        return Selection(layout, every)
    if position is None:
        y, x = _strongest(output, layout, channel)
    else:
        y, x = torch.full_like(every, position[0]), torch.full_like(every, position[1])
    return Selection(layout, every, torch.full_like(every, channel), y, x)


# --------------------------------------------------------------------------------------------- #
# project
# --------------------------------------------------------------------------------------------- #

def project(model: nn.Module, images: torch.Tensor, layer, channel=None, position=None, neurons=None, *,
            rule: str = "deconvnet", seed: str = "value", lrn: str = "gradient", strict: bool = False,
            backend: str = "auto") -> torch.Tensor:
    """Project activations of ``layer`` back to pixel space (Zeiler & Fergus's DeconvNet).

    Selection (one of):
      - ``channel``: per image, its strongest activation of that map (the first maximum in row-major
        order) -> ``[N, C_in, H, W]``;
      - ``channel`` and ``position=(y, x)``: that activation in every image -> ``[N, ...]``;
      - ``neurons``: LongTensor ``[P, 4]`` of (image, channel, y, x) rows -> ``[P, ...]`` (one forward
        per distinct image, however many rows name it);
      - nothing: the whole activation map of each image is the seed -> ``[N, ...]``.
    For a layer with a flat output ``[N, F]``, ``channel`` names the unit, ``position`` is an error
    and ``neurons`` rows are (image, unit, 0, 0). For a token layer ``[N, T, D]`` (a transformer
    block), ``channel`` names the feature d, ``position`` the token t (an int) and ``neurons`` rows
    are (image, d, t, 0).

    ``rule``: how every ReLU (and ReLU6) is reversed: ``"deconvnet"`` (the paper's: max(g, 0), the
    forward ignored), ``"guided"`` (guided backpropagation: max(g, 0) where the forward passed) or
    ``"gradient"`` (the plain gradient); deconvcuda.rules lists them. Every other layer is reversed by
    its exact gradient; ``strict=True`` refuses every op outside the paper's table instead.
    ``seed="value"`` keeps each selected activation's value (the paper's), ``"one"`` puts 1 there.
    ``lrn="gradient"`` reverses LocalResponseNorm by its true gradient, ``"identity"`` passes through.
    ``backend="auto"`` runs the native kernels on the images' device; ``"reference"`` pure PyTorch.
    The result has the dtype and device of ``images``. The model is never changed.

    Models torch.fx cannot trace are projected by autograd with every rectifier's backward the
    rule's (exact, about as fast as batched autograd), with a warning that says why.
    """
    caller = "project"
    _check_options(rule, seed, lrn, backend, caller)
    check_images(images, caller)
    if not isinstance(strict, bool):
        raise TypeError(f"{caller}: strict must be True or False, got {strict!r}")
    rule = rules.get(rule, caller)
    try:
        graph = trace(model, layer, caller=caller, strict=strict)
        shapes = graph.node_shapes(tuple(images.shape[1:]), caller=caller, dtype=images.dtype)
    except (Untraceable, Unrepresentable) as why:
        if strict:
            raise ValueError(f"{caller}: {why}; strict=True needs the model's graph, to refuse every op outside the "
                             f"paper's table") from why
        fallback.warn(caller, model, why, "running the model itself with every rectifier's backward swapped for the "
                                          "rule's (exact, about as fast as batched autograd)")
        return _project_by_autograd(model, images, layer, channel, position, neurons, rule, seed, lrn, caller)
    target = graph.targets[graph.layers[0]]
    target_shape = shapes[target]
    layout = layout_of(target_shape)
    channel, position, neurons = _checked_selection(channel, position, neurons, images, target_shape, caller)
    kernels = _Kernels(backend, caller)

    with torch.inference_mode(False), torch.no_grad():
        if neurons is not None:
            # one forward per distinct image, however many projections name it
            wanted, rows = torch.unique(neurons[:, 0], return_inverse=True)
            batch = images[wanted]
        else:
            rows, batch = None, images
        keeper = Keeper(kernels, rule, lrn)
        output = graph.forward(batch, keeper)[target]
        selection = _selection(output, layout, channel, position, neurons, rows)
        program = _program(graph, shapes, keeper.saved, kernels, rule)
        options = _Options(rule, lrn, kernels, crop=kernels.crop and layout == "map", graph=graph, shapes=shapes)
        return _reverse(program, graph, output, selection, seed, shapes[graph.input], options)


def _checked_selection(channel, position, neurons, images, target_shape, caller: str):
    layout = layout_of(target_shape)
    _check_selection(channel, position, neurons, layout, caller)
    if channel is not None:
        channel, position = _check_channel_position(channel, position, target_shape, caller)
    if neurons is not None:
        neurons = _check_neurons(neurons, images.shape[0], target_shape, caller).to(images.device)
    return channel, position, neurons


@dataclass
class _Options:
    rule: rules.Rule
    lrn: str
    kernels: _Kernels
    crop: bool
    graph: Graph
    shapes: Dict[Node, object]


def _reverse(program: List[_Unit], graph: Graph, output: torch.Tensor, selection: Selection, seed: str,
             input_shape, options: _Options) -> torch.Tensor:
    """Seeds -> pixels, chunk by chunk of projections."""
    target_shape = tuple(output.shape[1:])
    count = selection.count
    result = output.new_zeros((count,) + tuple(input_shape))
    if count == 0:
        return result
    # projections by image, so that a kept tensor's row serves a run of them (At.runs)
    order = torch.argsort(selection.images, stable=True)
    selection = selection.reordered(order)
    point_windows = selection.points and selection.layout == "map"
    windowed, peak = _schedule(program, options.crop and point_windows)
    chunk = max(1, min(count, _chunk_elements(output) // max(peak, numel(target_shape), 1)))

    for start in range(0, count, chunk):
        stop = min(start + chunk, count)
        images = selection.images[start:stop]
        distinct, counts = torch.unique_consecutive(images, return_counts=True)
        ends = counts.cumsum(0).tolist()
        runs = [(image, end - size, end) for image, size, end in zip(distinct.tolist(), counts.tolist(), ends)]
        if point_windows:
            seeds = selection.window_seeds(output, start, stop, seed)
        else:
            seeds = (_reverse_layout(selection.full_seeds(output, start, stop, seed)), None)
        grads: Dict[Node, Tuple[torch.Tensor, Optional[Windows]]] = {
            program[0].node if program else graph.input: seeds}
        for unit, on_windows in zip(program, windowed):
            if unit.node not in grads:
                continue
            g, windows = grads.pop(unit.node)
            if windows is not None and not on_windows:
                g, windows = _reverse_layout(windows.paste(g, unit.out_shape[1:])), None
            values = options.graph.values_at(unit.node, stop - start, options.shapes, output)
            at = At(unit.in_shapes, unit.out_shape, unit.saved, images, windows, options.rule, options.lrn,
                    options.kernels, values, runs)
            in_windows = unit.input_windows(windows) if windows is not None else [None] * len(unit.inputs)
            for node, shape, gi, wi in zip(unit.inputs, unit.in_shapes, unit.run(g, at), in_windows):
                if gi is not None and node.data:
                    _accumulate(grads, node, gi, wi, shape)
        if graph.input not in grads:  # nothing reached the images (every path was cut)
            continue
        g, windows = grads.pop(graph.input)
        g = g.contiguous()  # as the result is laid out: adding or copying it is then a copy of rows
        if windows is None:
            result.index_copy_(0, order[start:stop], g)
        else:
            windows.add_into(result, g, order[start:stop])
    return result


def _reverse_layout(g: torch.Tensor) -> torch.Tensor:
    """Whole maps on the CPU go down channels-last (Conv.reverse keeps them so): oneDNN's transposed
    convolutions run two to four times faster on it. (The reverse decides nothing, so the layout
    changes only its rounding.)"""
    if g.device.type == "cpu" and g.dim() == 4:
        return g.contiguous(memory_format=torch.channels_last)
    return g


def _accumulate(grads, node: Node, g: torch.Tensor, windows: Optional[Windows], shape) -> None:
    """Add a consumer's gradient to ``node``'s: windows are united (or pasted into full maps once the
    union would cover the map, or where the other is a full map)."""
    if node not in grads:
        grads[node] = (g, windows)
        return
    other, other_windows = grads[node]
    if windows is None and other_windows is None:
        grads[node] = (other + g, None)
        return
    if windows is not None and other_windows is not None:
        union = windows.union(other_windows)
        if not union.covers(shape[1:]):
            grads[node] = (other_windows.embed(other, union) + windows.embed(g, union), union)
            return
    full = [t if w is None else _reverse_layout(w.paste(t, shape[1:])) for t, w in ((other, other_windows), (g, windows))]
    grads[node] = (full[0] + full[1], None)


# --------------------------------------------------------------------------------------------- #
# The autograd path
# --------------------------------------------------------------------------------------------- #

def _project_by_autograd(model: nn.Module, images: torch.Tensor, layer, channel, position, neurons,
                         rule: rules.Rule, seed: str, lrn: str, caller: str) -> torch.Tensor:
    """``project`` for models the graph cannot hold: the model itself under deconvcuda.fallback's
    rule mode, one forward row per projection, chunk by chunk."""
    layer = resolve_layer(model, layer, caller)
    target_shape = fallback.output_shape(model, images, layer, caller) if images.shape[0] else None
    if target_shape is None:
        return images.new_zeros(images.shape)
    layout = layout_of(target_shape)
    channel, position, neurons = _checked_selection(channel, position, neurons, images, target_shape, caller)
    if neurons is not None:
        rows_images = neurons[:, 0]
    else:
        rows_images = torch.arange(images.shape[0], device=images.device)
    result = images.new_zeros((rows_images.shape[0],) + tuple(images.shape[1:]))
    step = fallback.ROWS_PER_CHUNK
    with torch.inference_mode(False):
        for start in range(0, rows_images.shape[0], step):
            stop = min(start + step, rows_images.shape[0])
            x = images[rows_images[start:stop]]
            chunk_neurons = None if neurons is None else torch.cat(
                [torch.arange(stop - start, device=neurons.device)[:, None], neurons[start:stop, 1:]], dim=1)

            def seeds(out, chunk_neurons=chunk_neurons):
                selection = _selection(out, layout, channel, position, chunk_neurons,
                                       torch.arange(out.shape[0], device=out.device))
                return selection.full_seeds(out, 0, out.shape[0], seed)

            result[start:stop] = fallback.gradient_at_input(model, x, layer, rule, lrn, caller, seeds)
    return result
