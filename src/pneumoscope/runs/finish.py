"""A finished run made into its model, without Lightning: the temperature fitted on the validation
images, the bundle written once, the val (and internal test) reports made from that bundle, and
what the run did (`TrainResult`).

Training, `ensemble`, `soup`, `ship` and `calibrate` all finish a run this way; only training needs
a trainer to get there, so ensembling, shipping or recalibrating a run never loads Lightning.
"""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..bundle import load_bundle, write_metrics
from ..core.config import CALIBRATIONS, TrainConfig
from ..data.datasets import class_indices, load_pixels
from ..data.transforms import augmented_views
from ..evaluation.metrics import fit_temperature, headline
from ..evaluation.report import evaluate_samples
from ..nets.build import load_network
from ..runtime.classifier import Classifier
from ..runtime.export import save_with_graph
from .rundir import RunDir, data_facts


@dataclass
class TrainResult:
    """What a training run did: where it is, its model bundle and the headline metrics of each
    evaluated split ("val", "internal_test"; metrics.headline). On ranks other than 0 of a
    multi-process run, `bundle` is None and `metrics` empty: rank 0 finishes alone."""

    run_dir: Path
    bundle: Path | None
    metrics: dict = field(default_factory=dict)
    config: TrainConfig | None = None  # what ran: with --resume, the run's saved configuration
    resumed: bool = False
    best_epoch: int | None = None


def save_calibrated(model, meta, run: RunDir, samples, val_pixels, val_targets, evaluate_test: bool = True,
                    calibration: str = "augmented") -> dict:
    """Temperature from the val pixels (`calibration_temperature`) -> the bundle, written once -> val
    (and internal test) reports from that bundle, through the Classifier users load, on the fp32
    reference (ONNX Runtime: the same figures on every CPU). Returns the headlines {"val", "internal_test"}."""
    temperature = calibration_temperature(Classifier.from_model(model, meta.replace(temperature=1.0), backend="torch"),
                                          val_pixels, val_targets, calibration)
    source = meta.provenance.get("train_config", {}).get("data")
    save_with_graph(model, meta.replace(temperature=temperature, provenance={
        **meta.provenance, "calibration": calibration, "data": data_facts(samples, source)}), run.bundle)
    classifier = Classifier.load(run.bundle, backend="onnx")
    metrics = {}
    for split, name in (("val", "val"), ("test", "internal_test")):
        chosen = [s for s in samples if s.split == split]
        if chosen and (split == "val" or evaluate_test):
            metrics[name] = headline(evaluate_samples(classifier, chosen, run.report_dir(split), plots=split == "test"))
    write_metrics(run.bundle, {**metrics, "backend": classifier.backend_name})  # what the web page and card show of it
    return metrics


def calibration_temperature(classifier, val_pixels: np.ndarray, val_targets, method: str = "augmented") -> float:
    """Temperature scaling (metrics.fit_temperature) on the validation logits as they are (`val`), or
    on those of the validation images seen twice through the strong augmentation (`augmented`): a
    simulated change of acquisition, which lowered the ECE on the external group for every model
    measured (docs/benchmarks.md#calibration-under-shift). `classifier` scores at temperature 1."""
    if method not in CALIBRATIONS:
        raise ValueError(f"unknown calibration {method!r}; choose from {', '.join(CALIBRATIONS)}")
    targets = np.asarray(val_targets)
    if method == "val":
        return fit_temperature(classifier.score_pixels(val_pixels).logits, targets)
    views = augmented_views(val_pixels, classifier.meta.img_size, passes=2)
    return fit_temperature(classifier.score_pixels(views).logits, np.tile(targets, 2))


def validation_pixels(samples, meta) -> tuple[np.ndarray, np.ndarray]:
    """The readable validation images of a manifest at the model's input size, and their class
    indices for the model's task: what a temperature is fitted on."""
    pixels, val, _ = load_pixels([s for s in samples if s.split == "val"], meta.img_size)
    return pixels, class_indices(val, meta.classes, meta.task)


def recalibrate(run_dir, calibration: str = "augmented") -> TrainResult:
    """A finished run's temperature fitted again (`calibration_temperature`), its bundle and its val
    and internal test reports rewritten; the weights are untouched."""
    run = RunDir(run_dir)
    bundle = load_bundle(run.finished_model())
    meta, samples = bundle.meta, run.samples()
    pixels, targets = validation_pixels(samples, meta)
    if not len(targets):
        raise ValueError(f"{run.path}: no readable validation image to fit a temperature on")
    evaluate_test = meta.provenance.get("train_config", {}).get("evaluate_test", True)
    metrics = save_calibrated(load_network(bundle).eval(), meta, run, samples, pixels, targets, evaluate_test,
                              calibration)
    return TrainResult(run.path, run.bundle, metrics)


def git_commit() -> str | None:
    """The source's commit, for a bundle's provenance; $PNEUMOSCOPE_GIT_COMMIT names it where there
    is no .git (an exported snapshot of the tree, a container image)."""
    if os.environ.get("PNEUMOSCOPE_GIT_COMMIT"):
        return os.environ["PNEUMOSCOPE_GIT_COMMIT"]
    try:
        here = Path(__file__).resolve().parent
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
