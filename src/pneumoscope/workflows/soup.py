"""Model soups: finished runs averaged in weight space into one network (`pneumoscope soup`).

Runs fine-tuned from the same start (the same pretrained body; `train --head-init zero` gives every
seed the same head too) stay in one basin of the loss, so the average of their weights is itself a
good network, often better than each (Wortsman et al. 2022, "Model soups"; SWA, Izmailov et al.
2018) - at the cost of one network, where an ensemble (`pneumoscope ensemble`) runs them all.

- uniform: the mean of all runs' weights.
- greedy: the runs sorted by validation accuracy, each added to the soup only when the soup's
  validation accuracy does not fall (Wortsman's greedy soup), so a run from another basin is left out.

Averaged BatchNorm running statistics are not the statistics of the averaged network: the trained
BatchNorm layers are re-estimated on training images (the layers that training froze keep theirs,
which every run shares). Then, as for a training run, the temperature is fitted on the validation
split and the bundle, val and internal test reports are written into a run directory.
"""
from __future__ import annotations

import os
import time

import numpy as np
import torch

from .. import __version__
from ..bundle import load_bundle
from ..data.datasets import load_pixels
from ..nets.build import load_network
from ..nets.registry import freeze_model
from ..runs.rundir import RunDir, model_name
from ..runtime.classifier import Classifier
from ..training.fit import TrainResult, git_commit, save_calibrated, validation_pixels
from .adapt import adapt_batchnorm, batchnorm_layers
from .ensemble import check_compatible, member_facts

SOUPS = ("uniform", "greedy")
BN_IMAGES = 1024  # training images the trained BatchNorm layers' statistics are re-estimated on


def build_soup(run_dirs: list[str | os.PathLike], out: str | os.PathLike, method: str = "uniform",
               bn_images: int = BN_IMAGES):
    """Averages the finished runs `run_dirs` into the run directory `out`; returns a train.TrainResult.
    `bn_images` 0 keeps the averaged BatchNorm statistics."""

    if method not in SOUPS:
        raise ValueError(f"unknown soup {method!r}; choose from {', '.join(SOUPS)}")
    started = time.perf_counter()
    runs = [RunDir(path) for path in run_dirs]
    bundles = [load_bundle(run.finished_model()) for run in runs]
    metas = [b.meta for b in bundles]
    for run, meta in zip(runs, metas):
        if meta.arch != metas[0].arch:
            raise ValueError(f"{run.path}: architecture {meta.arch} differs from {runs[0].path}'s {metas[0].arch}; "
                             "only one architecture's weights can be averaged")
    check_compatible(runs, metas)
    first = metas[0]
    samples = runs[0].samples()
    val_pixels, val_targets = validation_pixels(samples, first)
    train = [s for s in samples if s.split == "train"]
    picked = np.random.default_rng(0).permutation(len(train))[:bn_images]
    bn_pixels, _, _ = load_pixels([train[i] for i in sorted(picked)], first.img_size)
    freeze = first.provenance.get("train_config", {}).get("freeze") or "none"
    states = [b.state_dict() for b in bundles]
    model = load_network(bundles[0])
    chosen, soup_accuracy = _cook(model, states, method, freeze, bn_pixels, val_pixels, val_targets, first)
    members = [{**member_facts(runs[i], metas[i]), "in_soup": i in chosen} for i in range(len(runs))]
    meta = first.replace(
        name=model_name(out), temperature=1.0,  # a run of the user's own: named after it (ship renames)
        provenance={"pneumoscope": __version__, "git_commit": git_commit(), "soup": method,
                    "manifest_hash": first.provenance.get("manifest_hash"), "members": members,
                    "train_config": first.provenance.get("train_config", {}), "bn_images": len(bn_pixels),
                    "soup_val_accuracy": soup_accuracy, "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
    run = RunDir(out)
    run.path.mkdir(parents=True, exist_ok=True)
    run.write_status("running", fresh=True)
    run.write_manifest(samples)
    calibration = first.provenance.get("calibration", "augmented")
    metrics = save_calibrated(model, meta, run, samples, val_pixels, val_targets, calibration=calibration)
    wall = round(time.perf_counter() - started, 1)
    run.write_env({"pneumoscope": __version__, "cpu_count": os.cpu_count(), "soup_seconds": wall})
    members_wall = sum(m["training"].get("wall_seconds") or 0 for m in members)
    run.write_status("finished", wall_seconds=round(members_wall + wall, 1), soup_seconds=wall)
    return TrainResult(run.path, run.bundle, metrics)


def _cook(model, states, method, freeze, bn_pixels, val_pixels, val_targets, meta) -> tuple[list[int], float]:
    """Loads the soup into `model` (in place) and returns the runs in it and its val accuracy."""
    accuracy = [_val_accuracy(_filled(model, [s], freeze, bn_pixels), val_pixels, val_targets, meta)
                for s in states]
    order = sorted(range(len(states)), key=lambda i: -accuracy[i])
    if method == "uniform":
        chosen = order
        best = _val_accuracy(_filled(model, [states[i] for i in chosen], freeze, bn_pixels), val_pixels,
                             val_targets, meta)
        return chosen, best
    chosen, best = [order[0]], accuracy[order[0]]
    for i in order[1:]:
        trial = _val_accuracy(_filled(model, [states[j] for j in chosen + [i]], freeze, bn_pixels), val_pixels,
                              val_targets, meta)
        if trial >= best:
            chosen, best = chosen + [i], trial
    _filled(model, [states[i] for i in chosen], freeze, bn_pixels)
    return chosen, best


def average_states(states: list[dict]) -> dict:
    """The element-wise mean of state dicts with the same keys and shapes (integer tensors, such
    as BatchNorm's batch counter, are taken from the first)."""
    keys = states[0].keys()
    for state in states[1:]:
        if state.keys() != keys or any(state[k].shape != states[0][k].shape for k in keys):
            raise ValueError("the runs' weights have different layers or shapes; they cannot be averaged")
    return {k: (torch.stack([s[k] for s in states]).mean(0) if states[0][k].is_floating_point() else states[0][k])
            for k in keys}


def _filled(model, states: list[dict], freeze: str, bn_pixels: np.ndarray):
    """`model` holding the average of `states`, its trained BatchNorm layers re-estimated."""

    model.load_state_dict(average_states(states))
    if len(states) > 1 and len(bn_pixels):
        frozen = {id(layer) for module in freeze_model(model, freeze) for layer in batchnorm_layers(module)}
        trained = [layer for layer in batchnorm_layers(model) if id(layer) not in frozen]
        if trained:
            adapt_batchnorm(model, bn_pixels, layers=trained)
    for parameter in model.parameters():  # freeze_model marked them; the soup is a plain eval network
        parameter.requires_grad_(True)
    return model.eval()


def _val_accuracy(model, val_pixels: np.ndarray, val_targets: np.ndarray, meta) -> float:
    logits = Classifier.from_model(model, meta, backend="torch").score_pixels(val_pixels).logits
    return float((logits.argmax(1) == np.asarray(val_targets)).mean())
