"""Grad-CAM heat maps (the `grad-cam` package): where in the X-ray the evidence for a label lies.

Grad-CAM always runs the PyTorch model (`Classifier.model`, loaded on first use when predictions
run on ONNX Runtime) and needs gradients, so it never runs under inference mode. Each image is
decoded once: the prediction and the heat map share `Classifier.decode`'s pixels, and the
overlay is drawn on the gray X-ray it kept.
"""
from __future__ import annotations

import hashlib
import io
import os
import weakref
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from ..core.files import atomic_write
from ..data.images import to_batch
from .classifier import Classifier, Decoded, Record

OVERLAY_ALPHA = 0.4  # weight of the heat map over the X-ray
MAX_OVERLAY_SIDE = 1024  # px; larger X-rays are shown smaller (the heat map has no finer detail)
_target_layers: "weakref.WeakKeyDictionary[torch.nn.Module, torch.nn.Module]" = weakref.WeakKeyDictionary()


def target_layer(model: torch.nn.Module, size: int) -> torch.nn.Module:
    """The last module whose output is still a spatial map (B x C x H x W, H*W > 1): the input of
    global pooling, where Grad-CAM is taken. Found with one traced forward pass, so it works for
    every registered architecture (timm's conv_head/bn2, layer4, features; our `.features`)."""
    if model in _target_layers:
        return _target_layers[model]
    shapes: list[tuple[torch.nn.Module, torch.Size]] = []
    hooks = [m.register_forward_hook(lambda m, _, out: shapes.append((m, out.shape))
                                     if isinstance(out, torch.Tensor) and out.ndim == 4 else None)
             for m in model.modules()]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 1, size, size))
    finally:
        for hook in hooks:
            hook.remove()
    spatial = [m for m, shape in shapes if shape[2] * shape[3] > 1]
    _target_layers[model] = (spatial or [m for m, _ in shapes])[-1]  # post-order: containers come last
    return _target_layers[model]


def target_layers(model: torch.nn.Module, size: int) -> list[torch.nn.Module]:
    """Grad-CAM's layers: the network's target layer, or each ensemble member's (grad-cam scales each
    member's map to [0, 1] and averages them)."""
    members = getattr(model, "members", None)
    return [target_layer(member, size) for member in members] if members is not None else [target_layer(model, size)]


def cam_heatmap(classifier: Classifier, pixels: np.ndarray, target: int | None = None) -> np.ndarray:
    """Grad-CAM of `target` (default: the predicted class) for img_size x img_size uint8 `pixels`
    (`Classifier.decode(...).pixels`): float32 H x W in [0, 1]."""
    return cam_heatmaps(classifier, pixels[None], None if target is None else [target])[0]


def cam_heatmaps(classifier: Classifier, pixels: np.ndarray, targets: list[int] | None = None) -> np.ndarray:
    """Grad-CAM of N images (N x S x S uint8) in one forward and backward pass, each for its own
    target (default: its predicted class): N x S x S float32 in [0, 1]. The model is in eval mode,
    so the images of a batch do not affect each other's maps."""
    batch = torch.from_numpy(to_batch(pixels))
    targets = None if targets is None else [ClassifierOutputTarget(int(t)) for t in targets]
    with classifier.torch_lock, torch.inference_mode(False), torch.enable_grad():
        model = classifier.model
        cam = GradCAM(model, target_layers(model, classifier.img_size))
        try:
            heat = cam(batch, targets=targets)
        finally:
            cam.activations_and_grads.release()  # remove the hooks before anyone else runs the model
            model.zero_grad(set_to_none=True)  # the backward pass filled every weight's .grad
    return np.clip(heat, 0, 1).astype(np.float32)


def overlay_rgb(gray: np.ndarray, heatmap: np.ndarray) -> np.ndarray:
    """The heat map (jet) blended at OVERLAY_ALPHA over the gray X-ray: H x W x 3 uint8 at the
    X-ray's size (the heat map is stretched to it, undoing the squash to a square)."""
    heat = Image.fromarray(np.asarray(heatmap, np.float32), "F").resize(gray.shape[::-1], Image.Resampling.BILINEAR)
    rgb = np.repeat(gray[..., None], 3, axis=2).astype(np.float32) / 255
    return show_cam_on_image(rgb, np.clip(np.asarray(heat), 0, 1), use_rgb=True, image_weight=1 - OVERLAY_ALPHA)


def overlay_png(gray: np.ndarray, heatmap: np.ndarray, text: str) -> bytes:
    """PNG bytes of `overlay_image`."""
    buffer = io.BytesIO()
    overlay_image(gray, heatmap, text).save(buffer, format="PNG")
    return buffer.getvalue()


def overlay_image(gray: np.ndarray, heatmap: np.ndarray, text: str) -> Image.Image:
    """`overlay_rgb` (at most MAX_OVERLAY_SIDE a side) with `text` (label and probability; lines
    may follow) on a dark box, top left: an RGB image."""
    image = Image.fromarray(gray)
    image.thumbnail((MAX_OVERLAY_SIDE, MAX_OVERLAY_SIDE))
    image = Image.fromarray(overlay_rgb(np.asarray(image), heatmap))
    font = ImageFont.load_default(size=max(10, max(image.size) // 30))
    draw, margin = ImageDraw.Draw(image), max(2, max(image.size) // 100)
    left, top, right, bottom = draw.textbbox((2 * margin, 2 * margin), text, font=font)
    draw.rectangle((left - margin, top - margin, right + margin, bottom + margin), fill=(0, 0, 0))
    draw.text((2 * margin, 2 * margin), text, fill=(255, 255, 255), font=font)
    return image


def caption(record: Record) -> str:
    """The overlay's text, "BACTERIA (p 0.90)": PIL's default font draws a space a fifth of an em
    wide, so a bare space read as `BACTERIA0.90`."""
    text = f"{record.label} (p {record.probabilities[record.label]:.2f})"
    return text + " - not a chest X-ray?" if record.reliable is False else text


def explain(classifier: Classifier, source, name: str | None = None) -> tuple[Record, bytes | None]:
    """The prediction record for one path, bytes or array, plus a Grad-CAM overlay PNG of the
    predicted class (None when the record is an error). The input is decoded once."""
    decoded = classifier.decode(source, name, keep_gray=True)
    record = classifier.records(classifier.score_decoded([decoded]))[0]
    return record, cam_png(classifier, record, decoded)


def cam_png(classifier: Classifier, record: Record, decoded: Decoded) -> bytes | None:
    """The overlay PNG of `record`'s label over the decoded X-ray (None for an error record)."""
    if record.status != "ok":
        return None
    heat = cam_heatmap(classifier, decoded.pixels, classifier.classes.index(record.label))
    return overlay_png(decoded.gray, heat, caption(record))


class CamWriter:
    """Writes `<stem>_<hash>_cam.png` into a folder for each ok record, from the pixels its
    prediction was decoded into. The hash (8 hex digits of the sha256 of the input's absolute
    path) tells apart a/x.jpeg and b/x.jpeg and depends on nothing else, so a run resumed later
    gives each input the name it had and overwrites no other input's overlay."""

    def __init__(self, classifier: Classifier, folder: str | Path):
        self.classifier, self.folder = classifier, Path(folder)

    def __call__(self, record: Record, decoded: Decoded) -> Path | None:
        png = cam_png(self.classifier, record, decoded)
        if png is None:
            return None
        path = self.folder / cam_name(record.path)
        with atomic_write(path) as handle:
            handle.write(png)
        return path


def cam_name(path: str) -> str:
    """The overlay's file name for the input `path` (see CamWriter)."""
    digest = hashlib.sha256(os.fsencode(os.path.abspath(path))).hexdigest()[:8]
    return f"{Path(path).stem}_{digest}_cam.png"


def cam_cases(classifier: Classifier, paths: list[str], y_true: np.ndarray, probs: np.ndarray, n: int = 16
              ) -> tuple[list[np.ndarray], list[str], list[bool]]:
    """Overlays for an evaluation's CAM grid: the wrong predictions first (most confident first),
    then the right ones; returns (RGB images, titles, wrong flags)."""
    predicted, confidence = probs.argmax(1), probs.max(1)
    order = sorted(range(len(paths)), key=lambda i: (predicted[i] == y_true[i], -confidence[i]))[:n]
    if not order:
        return [], [], []
    pixels = np.stack([classifier.decode(paths[i]).pixels for i in order])
    heat = cam_heatmaps(classifier, pixels, [int(predicted[i]) for i in order])
    images = [overlay_rgb(p, h) for p, h in zip(pixels, heat)]
    titles = [f"{classifier.classes[predicted[i]]} {confidence[i]:.2f}\n[{classifier.classes[y_true[i]]}]"
              for i in order]
    return images, titles, [bool(predicted[i] != y_true[i]) for i in order]
