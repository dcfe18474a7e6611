"""Site adaptation without labels: re-estimated BatchNorm statistics and class priors.

A network trained at one hospital sees another hospital's films with other exposure, contrast and
post-processing; its BatchNorm layers then normalise with statistics that no longer fit. AdaBN
(Li et al. 2016, "Revisiting Batch Normalization For Practical Domain Adaptation") re-estimates
every BatchNorm layer's running mean and variance on unlabelled images from the new site and
changes nothing else. The class mix may differ too: the EM of Saerens et al. (2002, "Adjusting the
outputs of a classifier to new a priori probabilities") re-estimates the class priors from the
model's own calibrated probabilities on those images, and the shift is folded into the classifier's
bias so that the exported graph carries it.

No labels are read here: both steps use pixels only, which is what makes them usable on a new site.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..bundle import load_bundle, resolve_model
from ..core.files import atomic_write
from ..data.datasets import read_dataset
from ..data.images import ImageReadError, input_step, read_xray, resize_square
from ..nets.build import load_network
from ..nets.registry import classifier_layers
from ..runtime.classifier import Classifier, expand_inputs
from ..runtime.export import save_with_graph

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, BN_TYPES) and m.track_running_stats]


@torch.no_grad()
def adapt_batchnorm(model: nn.Module, pixels: np.ndarray, batch_size: int = 64, layers: list | None = None) -> int:
    """Re-estimates the running mean/variance of every BatchNorm layer (or of `layers`) on `pixels`
    (N x S x S uint8, the images of the new site), in place. Weights, biases and every other tensor
    stay as they were; the other layers run in eval mode. (torch.optim.swa_utils.update_bn does
    this for every BatchNorm layer with the whole model in train mode: a soup must keep the layers
    that training froze, and their eval-mode outputs, as they were.)

    Statistics are exact averages over all images (momentum None = cumulative moving average), not
    a decayed mix with the old site's. Returns the number of BatchNorm layers re-estimated."""
    layers = batchnorm_layers(model) if layers is None else layers
    if not layers:
        raise ValueError("the model has no BatchNorm layers to adapt")
    if len(pixels) < 2:
        raise ValueError("adaptation needs at least 2 images")
    saved_momentum = [layer.momentum for layer in layers]
    was_training = model.training
    model.eval()
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None
        layer.train()  # only the BatchNorm layers: dropout and the rest stay in eval mode
    try:
        for start in range(0, len(pixels), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(pixels[start:start + batch_size], np.float32) / 255)
            model(batch[:, None].contiguous(memory_format=torch.channels_last))
    finally:
        for layer, momentum in zip(layers, saved_momentum):
            layer.momentum = momentum
        model.train(was_training)
    return len(layers)


def estimate_priors(probabilities: np.ndarray, source_priors: np.ndarray, max_iter: int = 1000,
                    tol: float = 1e-8) -> np.ndarray:
    """Saerens et al.'s EM: the class priors of a new set, from a classifier's calibrated
    probabilities on it (N x C) and the priors those probabilities were calibrated under (C)."""
    p = np.asarray(probabilities, np.float64)
    source = np.asarray(source_priors, np.float64)
    priors = source.copy()
    for _ in range(max_iter):
        posterior = p * (priors / source)
        posterior /= posterior.sum(axis=1, keepdims=True)
        updated = posterior.mean(axis=0)
        if np.abs(updated - priors).max() < tol:
            return updated
        priors = updated
    return priors


def prior_shift_bias(source_priors, target_priors, temperature: float) -> np.ndarray:
    """What to add to the logits so that softmax(logits / T) moves from the source priors to the
    target ones: p' ∝ p * target / source  <=>  z' = z + T * log(target / source)."""
    return temperature * np.log(np.asarray(target_priors, np.float64) / np.asarray(source_priors, np.float64))


@torch.no_grad()
def add_logit_bias(model: nn.Module, bias: np.ndarray) -> None:
    """Adds `bias` to the model's logits, through its classifier bias: every member's, for an
    Ensemble, whose logits are their mean."""
    for layer in classifier_layers(model):
        if layer.out_features != len(bias):
            raise ValueError(f"classifier has {layer.out_features} outputs, prior shift has {len(bias)}")
        if layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros(layer.out_features))
        layer.bias += torch.as_tensor(bias, dtype=layer.bias.dtype)


# ---------------------------------------------------------------- the `pneumoscope adapt` command
def predicted_mix(probabilities: np.ndarray, classes) -> dict[str, float]:
    counts = np.bincount(probabilities.argmax(1), minlength=len(classes))
    return {c: round(float(n) / max(len(probabilities), 1), 4) for c, n in zip(classes, counts)}


def site_images(inputs) -> list[str]:
    """The image files of the new site: files as given, folders walked, and a manifest CSV read as
    every dataset is (data.read_dataset; its labels are not used)."""

    files = []
    for item in inputs:
        if str(item).lower().endswith(".csv"):
            files += [s.path for s in read_dataset(item).samples]
        else:
            files += list(expand_inputs([item]))
    return files


def adapt_bundle(checkpoint, images, out, priors: bool = False, task: str = "three") -> dict:
    """Writes to `out` a copy of the model (a bundle, or the shipped model for `task`) adapted to
    the unlabelled images under `images` (files or folders): BatchNorm statistics re-estimated
    (AdaBN) and, with `priors`, the class priors re-estimated by EM and folded into the classifier
    bias. The input model is never modified. Returns the report also written to out/adaptation.json:
    what was applied, on how many images, and how the predicted-class mix moved."""
    import dataclasses
    import json
    import time
    from pathlib import Path


    bundle = load_bundle(checkpoint or resolve_model(task))
    meta, model = bundle.meta, load_network(bundle)
    files = site_images(images if isinstance(images, (list, tuple)) else [images])
    if not files:
        raise ValueError(f"{images}: no images found; adaptation needs unlabelled X-rays from the new site")
    pixels, skipped = [], []
    for path in files:
        try:
            pixels.append(resize_square(read_xray(path), meta.img_size))
        except ImageReadError as err:
            skipped.append(str(err))
    if len(pixels) < 2:
        raise ValueError(f"{images}: {len(pixels)} readable image(s); adaptation needs at least 2")
    pixels = np.stack(pixels)
    classes = tuple(meta.classes)
    before = Classifier.from_model(model, meta, backend="torch").scores(list(pixels)).probabilities
    layers = adapt_batchnorm(model, input_step(pixels, meta.preprocess))  # Classifier.scores applies it itself
    applied = {"method": "adabn", "batchnorm_layers": layers, "images": int(len(pixels)),
               "source": str(images), "date": time.strftime("%Y-%m-%d")}
    if priors:
        # the priors the probabilities were calibrated under: uniform, as no bundle records them
        # (benchmarks/site_shift.py, which measured --priors, gave the val split's class mix instead)
        source = np.full(len(classes), 1 / len(classes))
        adabn_probs = Classifier.from_model(model, meta, backend="torch").scores(list(pixels)).probabilities
        target = estimate_priors(adabn_probs, source)
        add_logit_bias(model, prior_shift_bias(source, target, meta.temperature))
        applied.update(method="adabn + priors (EM)", source_priors=[round(float(p), 4) for p in source],
                       priors=[round(float(p), 4) for p in target])
    # the guard's statistics describe the old features: AdaBN moves them, so they would misjudge X-rays
    adapted_meta = dataclasses.replace(meta, name=f"{meta.name}-adapted", adaptation=applied, guard=None)
    after = Classifier.from_model(model, adapted_meta, backend="torch").scores(list(pixels)).probabilities
    out = Path(out)
    save_with_graph(model, adapted_meta, out)
    report = {**applied, "from": str(bundle.path), "skipped": skipped,
              "predicted_mix_before": predicted_mix(before, classes),
              "predicted_mix_after": predicted_mix(after, classes)}
    with atomic_write(out / "adaptation.json", "w") as handle:
        json.dump(report, handle, indent=2)
    return report
