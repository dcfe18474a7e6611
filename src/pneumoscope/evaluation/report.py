"""Evaluation reports: metrics.json, predictions.csv and the figures for a set of labelled images.

`evaluate_samples` scores the files through the same `Classifier` users call (so the numbers
describe exactly what `predict` does) and takes its arrays: logits and calibrated probabilities,
never rounded records. The numbers come from `metrics`, the figures from `plots`.
"""
from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path

import numpy as np

from ..core.files import atomic_write
from ..core.labels import TASKS, task_label
from ..data.datasets import class_indices, read_dataset
from ..data.images import read_xray
from ..runtime.classifier import Classifier, softmax
from ..runtime.explain import cam_cases
from . import plots
from .metrics import ECE_BINS, compute_metrics, expected_calibration_error

log = logging.getLogger(__name__)


def samples_for(data: str | os.PathLike, meta, split: str | None = None, groups: str | os.PathLike | None = None
                ) -> list:
    """The labelled images of a dataset (data.read_dataset: a Kermany tree read for the model's task)
    to evaluate a model on: a manifest's `split` (default test), a tree's own split folder when
    `split` names one, else every image. Labels the model does not know: a one-line error."""

    dataset = read_dataset(data, None, groups)
    if dataset.layout == "kermany" and meta.task in TASKS and meta.task != dataset.task:
        dataset = read_dataset(data, meta.task, groups)
    samples = dataset.select(split or ("test" if dataset.is_manifest else None))
    unknown = sorted({task_label(s.label, meta.task) for s in samples} - set(meta.classes))
    if unknown:
        raise ValueError(f"{data}: its classes {', '.join(unknown)} are not the model's ({meta.name}: "
                         f"{', '.join(meta.classes)}); give --model the model trained on this data")
    return samples


def evaluate_samples(model, samples: list, out_dir: str | os.PathLike, task: str = "three",
                     plots: bool = True) -> dict:
    """Classifies every sample and writes the report into `out_dir`; returns metrics.json's content.
    `model`: a Classifier, or a bundle path (None: the shipped model for `task`).
    Files that cannot be read are logged and left out (counted as `failed`)."""

    classifier = model if isinstance(model, Classifier) else Classifier.load(model, task=task)
    scores = classifier.scores([s.path for s in samples])
    ok = [i for i, error in enumerate(scores.errors) if error is None]
    for error in scores.errors:
        if error is not None:
            log.warning("%s; left out of the metrics", error)
    if not ok:
        raise ValueError("no image could be classified; nothing to evaluate")

    kept = [samples[i] for i in ok]
    targets = class_indices(kept, classifier.classes, classifier.meta.task)
    return write_report(out_dir, classifier, [s.path for s in kept], targets, scores.logits[ok],
                        scores.probabilities[ok], failed=len(samples) - len(ok), plots=plots,
                        groups=[s.patient_id for s in kept])


def write_report(out_dir: str | os.PathLike, classifier, paths: list[str], targets: np.ndarray,
                 logits: np.ndarray, probs: np.ndarray, failed: int = 0, plots: bool = True,
                 groups: list[str] | None = None) -> dict:
    """metrics.json, predictions.csv and (with plots) the figures, from one pass's arrays:
    `probs` calibrated, `logits` before the temperature (for the before/after reliability);
    `groups` (each image's patient or group) go into predictions.csv."""
    out_dir = Path(out_dir)
    classes, meta = classifier.classes, classifier.meta
    uncalibrated = softmax(logits)
    metrics = {"task": meta.task, "classes": list(classes), **compute_metrics(targets, probs, classes),
               "temperature": meta.temperature, "ece_uncalibrated": expected_calibration_error(uncalibrated, targets),
               "checkpoint": str(classifier.bundle.path) if classifier.bundle else None,  # None: in memory
               "model": classifier.name, "failed": failed}
    _write_predictions(out_dir / "predictions.csv", paths, targets, probs, classes, groups)
    with atomic_write(out_dir / "metrics.json", "w") as handle:
        json.dump(metrics, handle, indent=2)
    if plots:
        _figures(out_dir, classifier, paths, targets, probs, uncalibrated, metrics)
    return metrics


def _figures(out_dir: Path, classifier, paths, targets, probs, uncalibrated, metrics) -> None:
    classes, temperature = classifier.classes, classifier.meta.temperature
    plots.confusion_matrix_png(np.array(metrics["confusion_matrix"]), classes, out_dir / "confusion_matrix.png")
    plots.roc_png(targets, probs, classes, out_dir / "roc.png")
    plots.reliability_png(targets, {f"before (T=1), ECE {metrics['ece_uncalibrated']:.3f}": uncalibrated,
                                    f"after (T={temperature:.2f}), ECE {metrics['ece']:.3f}": probs},
                          out_dir / "reliability.png", ECE_BINS)
    plots.prediction_grid_png(paths, targets, probs, classes, out_dir / "prediction_grid.png", read=read_xray)
    plots.cam_grid_png(*cam_cases(classifier, paths, targets, probs), out_dir / "cam_grid.png")


def _write_predictions(path: Path, paths, targets, probs, classes, groups=None) -> None:
    with atomic_write(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "true", "predicted", *[f"p_{c}" for c in classes], *(["group"] if groups else [])])
        for i, (file, target, p) in enumerate(zip(paths, targets, probs)):
            writer.writerow([file, classes[target], classes[int(p.argmax())], *[f"{v:.6f}" for v in p],
                             *([groups[i]] if groups else [])])


def summary_table(metrics: dict) -> str:
    """A readable plain-text summary of metrics.json."""
    lo, hi = metrics["accuracy_ci95"]
    auc = metrics["macro_auc"]
    lines = [
        f"{metrics['model']}  task={metrics['task']}  n={metrics['n']}"
        + (f"  (failed to read: {metrics['failed']})" if metrics.get("failed") else ""),
        f"accuracy {metrics['accuracy']:.4f}  (95% CI {lo:.4f}-{hi:.4f})   balanced {metrics['balanced_accuracy']:.4f}"
        f"   macro F1 {metrics['macro_f1']:.4f}   macro AUC {'n/a' if auc is None else f'{auc:.4f}'}"
        f"   ECE {metrics['ece']:.4f}",
        "",
        f"{'class':<10}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}",
    ]
    for name, row in metrics["per_class"].items():
        lines.append(f"{name:<10}{row['precision']:>10.4f}{row['recall']:>10.4f}{row['f1']:>10.4f}"
                     f"{row['support']:>10d}")
    lines += ["", "confusion matrix (rows true, columns predicted): " + " ".join(metrics["classes"])]
    for name, row in zip(metrics["classes"], metrics["confusion_matrix"]):
        lines.append(f"{name:<10}" + "".join(f"{v:>10d}" for v in row))
    return "\n".join(lines)
