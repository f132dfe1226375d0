"""The projection engine: forward with switches, seeds, reverse over the graph to pixels.

    r = project(model, images, "features.10", channel=7)                  # each image's strongest activation
    r = project(model, images, "layer3.1", neurons=idx, rule="guided")    # idx: [P, 4] = (image, channel, y, x)

Data flows one way (DESIGN.md): the graph (deconvcuda.graph) lists the nodes from the images to the
target layer; the forward runs them with functional ops on the images' device and dtype, keeping what
each node's reverse reads (a max pool's switches, an LRN's input, a rectifier's mask under the guided
and gradient rules); the seeds are put into a map shaped like the target's output; the reverse walks
the nodes backwards, each node's kind undoing its layer under the chosen rule, and a node read by
several consumers receives the sum of their gradients.

The reverse runs each node in one of two ways:
- full maps ``[P, C, H, W]``: the whole-map seed, flat layers, and every node of the reference backend;
- windows (native backend, point seeds): a single activation's projection is non-zero only inside
  its receptive field, so each projection carries just that window of every feature map (see
  deconvcuda.windows), united where branches meet. When a window would be at least as large as the
  map, that node and everything below it that it feeds switches to full maps.
Conv -> ReLU -> max pool chains whose inner nodes have one consumer each are reversed by one fused
kernel call (native backend). Both ways and both backends give the same numbers: the tests compare them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from . import kinds
from .graph import Graph, Node, trace
from . import rules
from .checks import DtypeError, OutOfRangeError, check_images, is_int
from .kinds import LRN_MODES, At, Keeper
from .kinds.base import numel
from .windows import Windows

__all__ = ["project", "OutOfRangeError", "DtypeError", "SEEDS", "LRN_MODES", "BACKENDS"]


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
            from . import reference as ops  # pure PyTorch: nothing from the extension is imported
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
# The reverse program: one unit per node, or per fused conv -> ReLU -> max pool chain
# --------------------------------------------------------------------------------------------- #

@dataclass
class _Unit:
    """The reverse of one node (or of a fused chain ending in ``node``): takes the gradient at
    ``node``'s output and gives the gradients at the outputs of ``inputs``."""

    node: Node
    inputs: List[Node]
    in_shapes: List[Tuple[int, ...]]
    out_shape: Tuple[int, ...]
    saved: object
    run: Callable[[torch.Tensor, At], List[torch.Tensor]]
    grow: Callable[[Windows], Windows]
    windowed: bool
    inner_shape: Optional[Tuple[int, ...]] = None  # the map a fused chain passes through (the unpooled one)
    inner_grow: Optional[Callable[[Windows], Windows]] = None  # its windows, from the output's

    def peak_elements(self, windows: Optional[Windows]) -> int:
        """Elements per projection of the largest map this unit touches (full maps, or windows)."""
        inner = [] if self.inner_shape is None else [numel(self.inner_shape)]
        if windows is None:
            return max([numel(self.out_shape)] + [numel(s) for s in self.in_shapes] + inner)
        grown = self.grow(windows)
        if self.inner_shape is not None:
            mid = self.inner_grow(windows)
            inner = [self.inner_shape[0] * mid.height * mid.width]
        return max([self.out_shape[0] * windows.height * windows.width] + inner +
                    [s[0] * grown.height * grown.width for s in self.in_shapes])


def _fusable_chain(pool: Node, graph: Graph, kernels: _Kernels) -> List[Node]:
    """The ReLU (and conv) below a max pool that one fused kernel call can reverse with it, under any
    rule: each feeds only the next, so nothing else needs their gradients."""
    if not (kernels.fuse and isinstance(pool.kind, kinds.MaxPool)):
        return []
    relu = pool.inputs[0]
    if type(relu.kind) is not kinds.ReLU or relu.consumers != [pool] or relu in graph.targets.values():
        return []
    conv = relu.inputs[0]
    if isinstance(conv.kind, kinds.Conv) and conv.consumers == [relu]:
        return [relu, conv]
    return [relu]


def _program(graph: Graph, shapes: Dict[Node, Tuple[int, ...]], saved: Dict[Node, object],
             kernels: _Kernels) -> List[_Unit]:
    """The reverse units from the target down to the input, in reverse topological order."""
    program: List[_Unit] = []
    absorbed = set()
    for node in reversed(graph.nodes[1:]):
        if node in absorbed:
            continue
        chain = _fusable_chain(node, graph, kernels)
        absorbed.update(chain)
        pool = node.kind
        if len(chain) == 2:
            relu, conv = chain
            conv_input = conv.inputs[0]
            run = (lambda g, at, pool=pool, conv=conv.kind, c_in=shapes[conv_input], mid=shapes[relu]:
                   pool.reverse_with_relu_conv(g, at, conv, c_in, mid))
            grow = (lambda w, pool=pool, conv=conv.kind: conv.grow(pool.grow(w)))
            program.append(_Unit(node, [conv_input], [shapes[conv_input]], shapes[node], saved.get(node), run, grow,
                                 True, shapes[relu], pool.grow))
        elif len(chain) == 1:
            relu_input = chain[0].inputs[0]
            program.append(_Unit(node, [relu_input], [shapes[relu_input]], shapes[node], saved.get(node),
                                 pool.reverse_with_relu, pool.grow, True))
        else:
            program.append(_Unit(node, list(node.inputs), [shapes[i] for i in node.inputs], shapes[node],
                                 saved.get(node), node.kind.reverse, node.kind.grow, node.kind.windowed))
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
        grown = unit.grow(current) if current is not None and unit.windowed else None
        use = grown is not None and not any(grown.covers(s[1:]) for s in unit.in_shapes if len(s) == 3)
        on_windows.append(use)
        peak = max(peak, unit.peak_elements(current if use else None))
        for node in unit.inputs:
            if node in windows and (windows[node] is None or not use):
                windows[node] = None
            elif node in windows:
                windows[node] = windows[node].union(grown)
            else:
                windows[node] = grown if use else None
    return on_windows, peak


# --------------------------------------------------------------------------------------------- #
# Selections and checks
# --------------------------------------------------------------------------------------------- #

def _check_options(rule, seed, lrn, backend, caller: str) -> None:
    rules.get(rule, caller)
    for name, value, allowed in (("seed", seed, SEEDS), ("lrn", lrn, LRN_MODES),
                                 ("backend", backend, BACKENDS)):
        if not isinstance(value, str) or value not in allowed:
            raise ValueError(f"{caller}: {name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


@dataclass
class _Selection:
    """The projections to compute: per projection the image (row of the forward batch), channel
    and position (all on the images' device); ``points`` is False for the whole-map seed."""

    images: torch.Tensor
    channels: Optional[torch.Tensor]
    y: Optional[torch.Tensor]
    x: Optional[torch.Tensor]
    points: bool

    @property
    def count(self) -> int:
        return self.images.shape[0]


def _check_neurons(neurons, n_images: int, target_shape, caller: str) -> torch.Tensor:
    expected = f"{caller}: neurons must be a LongTensor [P, 4] of (image, channel, y, x) rows"
    if not isinstance(neurons, torch.Tensor) or neurons.dtype != torch.long:
        got = (f"a {neurons.dtype} tensor" if isinstance(neurons, torch.Tensor) else type(neurons).__name__)
        raise DtypeError(f"{expected}, got {got}")
    if neurons.dim() != 2 or neurons.shape[1] != 4:
        raise ValueError(f"{expected}, got shape {list(neurons.shape)}")
    if neurons.shape[0] == 0:
        return neurons
    flat = len(target_shape) == 1
    limits = torch.tensor([n_images, target_shape[0], 1 if flat else target_shape[1], 1 if flat else target_shape[2]],
                          device=neurons.device)
    bad = ((neurons < 0) | (neurons >= limits)).any(dim=1)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        columns = "(image, unit, 0, 0) rows for a flat layer" if flat else "(image, channel, y, x) rows"
        bounds = f"[{n_images}, {target_shape[0]}, 1, 1]" if flat else f"[{n_images}, {', '.join(map(str, target_shape))}]"
        raise OutOfRangeError(f"{caller}: neurons row {row} = {neurons[row].tolist()} is out of range: expected "
                         f"{columns} below {bounds} (images, then the layer's output shape)")
    return neurons


def _check_selection(channel, position, neurons, flat: bool, caller: str) -> None:
    if neurons is not None and channel is not None:
        raise ValueError(f"{caller}: pass either channel (with an optional position) or neurons, not both")
    if neurons is not None and position is not None:
        raise ValueError(f"{caller}: position goes with channel; neurons rows carry their own positions")
    if position is not None and channel is None:
        raise ValueError(f"{caller}: position needs a channel")
    if position is not None and flat:
        raise ValueError(f"{caller}: position is not allowed with a layer whose output is flat [N, F]; channel "
                         f"names the unit")
    if channel is not None and not is_int(channel):
        raise TypeError(f"{caller}: channel must be an int, got {channel!r}")


def _check_channel_position(channel, position, target_shape, caller: str) -> Tuple[int, Optional[Tuple[int, int]]]:
    channel = int(channel)
    if not 0 <= channel < target_shape[0]:
        raise OutOfRangeError(f"{caller}: channel must be in [0, {target_shape[0]}) for this layer, got {channel}")
    if position is None:
        return channel, None
    if isinstance(position, torch.Tensor):
        position = position.tolist()
    if not isinstance(position, (tuple, list)) or len(position) != 2 or not all(is_int(v) for v in position):
        raise TypeError(f"{caller}: position must be a pair of ints (y, x), got {position!r}")
    y, x = int(position[0]), int(position[1])
    if not (0 <= y < target_shape[1] and 0 <= x < target_shape[2]):
        raise OutOfRangeError(f"{caller}: position must be inside the layer's {target_shape[1]}x{target_shape[2]} map, "
                         f"got {(y, x)}")
    return channel, (y, x)


# --------------------------------------------------------------------------------------------- #
# project
# --------------------------------------------------------------------------------------------- #

def project(model: nn.Module, images: torch.Tensor, layer, channel=None, position=None, neurons=None, *,
            rule: str = "deconvnet", seed: str = "value", lrn: str = "gradient",
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
    and ``neurons`` rows are (image, unit, 0, 0).

    ``rule``: how every ReLU (and ReLU6) is reversed: ``"deconvnet"`` (the paper's: max(g, 0), the
    forward ignored), ``"guided"`` (guided backpropagation: max(g, 0) where the forward passed) or
    ``"gradient"`` (the plain gradient). Every other layer is reversed by its gradient.
    ``seed="value"`` keeps each selected activation's value (the paper's), ``"one"`` puts 1 there.
    ``lrn="gradient"`` reverses LocalResponseNorm by its true gradient, ``"identity"`` passes through.
    ``backend="auto"`` runs the native kernels on the images' device; ``"reference"`` pure PyTorch.
    The result has the dtype and device of ``images``. The model is never changed or run.
    """
    caller = "project"
    _check_options(rule, seed, lrn, backend, caller)
    check_images(images, caller)
    graph = trace(model, layer, caller=caller)
    shapes = graph.node_shapes(tuple(images.shape[1:]), caller=caller)
    target = graph.targets[graph.layers[0]]
    target_shape = shapes[target]
    flat = len(target_shape) == 1
    _check_selection(channel, position, neurons, flat, caller)
    if channel is not None:
        channel, position = _check_channel_position(channel, position, target_shape, caller)
    if neurons is not None:
        neurons = _check_neurons(neurons, images.shape[0], target_shape, caller).to(images.device)
    kernels = _Kernels(backend, caller)

    with torch.inference_mode(False), torch.no_grad():
        if neurons is not None:
            # one forward per distinct image, however many projections name it
            wanted, rows = torch.unique(neurons[:, 0], return_inverse=True)
            batch = images.index_select(0, wanted)
        else:
            rows, batch = None, images
        keeper = Keeper(kernels, rules.get(rule, caller), lrn)
        output = graph.forward(batch, keeper)[target]
        if neurons is not None:
            selection = _Selection(rows, neurons[:, 1], neurons[:, 2], neurons[:, 3], True)
        elif channel is not None:
            every = torch.arange(images.shape[0], device=images.device)
            chosen = torch.full_like(every, channel)
            if flat:
                y = x = torch.zeros_like(every)
            elif position is None:
                strongest = output[:, channel].flatten(1).argmax(dim=1)  # the first maximum, row-major
                y, x = strongest // target_shape[2], strongest % target_shape[2]
            else:
                y, x = torch.full_like(every, position[0]), torch.full_like(every, position[1])
            selection = _Selection(every, chosen, y, x, True)
        else:
            selection = _Selection(torch.arange(images.shape[0], device=images.device), None, None, None, False)

        program = _program(graph, shapes, keeper.saved, kernels)
        return _reverse(program, graph, output, selection, seed, shapes[graph.input],
                        _Options(keeper.rule, lrn, kernels, crop=kernels.crop and not flat))


@dataclass
class _Options:
    rule: rules.Rule
    lrn: str
    kernels: _Kernels
    crop: bool


def _reverse(program: List[_Unit], graph: Graph, output: torch.Tensor, selection: _Selection, seed: str,
             input_shape, options: _Options) -> torch.Tensor:
    """Seeds -> pixels, chunk by chunk of projections."""
    target_shape = tuple(output.shape[1:])
    flat = len(target_shape) == 1
    count = selection.count
    result = output.new_zeros((count,) + tuple(input_shape))
    if count == 0:
        return result
    point_windows = selection.points and not flat
    windowed, peak = _schedule(program, options.crop and point_windows)
    chunk = max(1, min(count, _chunk_elements(output) // max(peak, numel(target_shape), 1)))

    for start in range(0, count, chunk):
        stop = min(start + chunk, count)
        images = selection.images[start:stop]
        grads: Dict[Node, Tuple[torch.Tensor, Optional[Windows]]] = {
            program[0].node if program else graph.input: _seeds(output, selection, start, stop, seed, point_windows)}
        for unit, on_windows in zip(program, windowed):
            if unit.node not in grads:
                continue
            g, windows = grads.pop(unit.node)
            if windows is not None and not on_windows:
                g, windows = windows.paste(g, unit.out_shape[1:]), None
            at = At(unit.in_shapes, unit.out_shape, unit.saved, images, windows, options.rule, options.lrn,
                    options.kernels)
            in_windows = unit.grow(windows) if windows is not None else None
            for node, shape, gi in zip(unit.inputs, unit.in_shapes, unit.run(g, at)):
                _accumulate(grads, node, gi, in_windows, shape)
        g, windows = grads.pop(graph.input)
        if windows is None:
            result[start:stop] = g
        else:
            windows.add_into(result[start:stop], g)
    return result


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
    full = [t if w is None else w.paste(t, shape[1:]) for t, w in ((other, other_windows), (g, windows))]
    grads[node] = (full[0] + full[1], None)


def _seeds(output: torch.Tensor, selection: _Selection, start: int, stop: int, seed: str,
           point_windows: bool) -> Tuple[torch.Tensor, Optional[Windows]]:
    """The seed maps of projections [start, stop): 1x1 windows at the selected positions (spatial
    point seeds), one-hot rows (flat layers), or the whole activation maps."""
    images = selection.images[start:stop]
    if not selection.points:
        values = output.index_select(0, images)
        return (torch.ones_like(values) if seed == "one" else values), None
    channels = selection.channels[start:stop]
    count = stop - start
    if output.dim() == 2:  # flat: (image, unit)
        values = output[images, channels]
        g = output.new_zeros(count, output.shape[1])
        return g.scatter_(1, channels[:, None], (torch.ones_like(values) if seed == "one" else values)[:, None]), None
    y, x = selection.y[start:stop], selection.x[start:stop]
    values = output[images, channels, y, x]
    if seed == "one":
        values = torch.ones_like(values)
    g = output.new_zeros(count, output.shape[1])
    g.scatter_(1, channels[:, None], values[:, None])
    return g.view(count, output.shape[1], 1, 1), Windows.points(y, x)
