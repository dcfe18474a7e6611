"""Evaluation: metrics (scikit-learn, torchmetrics), bootstrap intervals, calibration and plots.

`evaluate_samples` classifies files through the same `Classifier` users call, so the numbers
describe exactly what `predict` does.
"""
from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import (balanced_accuracy_score, confusion_matrix, f1_score,
                             precision_recall_fscore_support, roc_auc_score)
from torchmetrics.functional.classification import multiclass_calibration_error

from .data import Sample, atomic_write
from .images import read_xray
from .labels import task_label
from .predict import Classifier

log = logging.getLogger(__name__)
N_BOOTSTRAP = 1000
ECE_BINS = 15


# ---------------------------------------------------------------- numbers
def compute_metrics(y_true: np.ndarray, probs: np.ndarray, classes: tuple[str, ...], seed: int = 0) -> dict:
    """Accuracy (+ bootstrap 95% CI), balanced accuracy, macro F1/AUC, per-class P/R/F1, confusion
    matrix (rows true, columns predicted), expected calibration error (15 bins)."""
    y_true = np.asarray(y_true, dtype=int)
    y_pred = probs.argmax(1)
    labels = list(range(len(classes)))
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels,
                                                                     zero_division=0)
    return {
        "n": int(len(y_true)),
        "accuracy": float((y_pred == y_true).mean()),
        "accuracy_ci95": bootstrap_ci(y_true == y_pred, seed),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "macro_auc": macro_auc(y_true, probs),
        "ece": expected_calibration_error(probs, y_true),
        "per_class": {c: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                          "support": int(support[i])} for i, c in enumerate(classes)},
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


def bootstrap_ci(correct: np.ndarray, seed: int = 0, n: int = N_BOOTSTRAP) -> list[float]:
    rng = np.random.default_rng(seed)
    correct = np.asarray(correct, dtype=float)
    means = correct[rng.integers(0, len(correct), (n, len(correct)))].mean(1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def macro_auc(y_true: np.ndarray, probs: np.ndarray) -> float | None:
    """One-vs-rest macro AUC over the classes present; None when only one class is present."""
    present = np.unique(y_true)
    if len(present) < 2:
        return None
    if probs.shape[1] == 2:
        return float(roc_auc_score(y_true, probs[:, 1]))
    aucs = [roc_auc_score(y_true == c, probs[:, c]) for c in present]
    return float(np.mean(aucs))


def expected_calibration_error(probs: np.ndarray, y_true: np.ndarray, bins: int = ECE_BINS) -> float:
    return float(multiclass_calibration_error(torch.as_tensor(probs, dtype=torch.float32),
                                              torch.as_tensor(y_true), num_classes=probs.shape[1],
                                              n_bins=bins, norm="l1"))


def uncalibrate(probs: np.ndarray, temperature: float) -> np.ndarray:
    """The probabilities before temperature scaling: softmax(T * log p) = softmax(logits)."""
    logits = temperature * np.log(np.clip(probs, 1e-12, 1.0))
    logits -= logits.max(1, keepdims=True)
    exp = np.exp(logits)
    return exp / exp.sum(1, keepdims=True)


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Temperature scaling (Guo et al. 2017): the T > 0 minimising validation NLL of logits / T."""
    log_t = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200)
    logits, targets = logits.detach().float().clone(), targets.long().clone()

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), targets)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp().clamp(0.05, 20.0))


# ---------------------------------------------------------------- the report
def evaluate_samples(checkpoint: str | os.PathLike | None, samples: list[Sample], out_dir: str | os.PathLike,
                     task: str = "three", plots: bool = True, classifier: Classifier | None = None) -> dict:
    """Classifies every sample and writes metrics.json, predictions.csv and (with plots) the figures."""
    classifier = classifier or Classifier.load(checkpoint, task=task)
    classes, task = classifier.classes, classifier.meta["task"]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = list(classifier.predict_many([s.path for s in samples]))
    ok = [(s, r) for s, r in zip(samples, records) if r.status == "ok"]
    failed = [r for r in records if r.status != "ok"]
    for record in failed:
        log.warning("%s; left out of the metrics", record.error)
    if not ok:
        raise ValueError("no image could be classified; nothing to evaluate")
    y_true = np.array([classes.index(task_label(s.label, task)) for s, _ in ok])
    probs = np.array([[r.probabilities[c] for c in classes] for _, r in ok])
    uncalibrated = uncalibrate(probs, classifier.temperature)
    metrics = {"task": task, "classes": list(classes), **compute_metrics(y_true, probs, classes),
               "temperature": classifier.temperature,
               "ece_uncalibrated": expected_calibration_error(uncalibrated, y_true),
               "checkpoint": str(classifier.checkpoint), "model": classifier.name, "failed": len(failed)}
    _write_predictions(out_dir / "predictions.csv", ok, classes, task)
    with atomic_write(out_dir / "metrics.json", "w") as handle:
        json.dump(metrics, handle, indent=2)
    if plots:
        from . import plots as figures

        figures.confusion_matrix_png(np.array(metrics["confusion_matrix"]), classes, out_dir / "confusion_matrix.png")
        figures.roc_png(y_true, probs, classes, out_dir / "roc.png")
        figures.reliability_png(y_true, {f"before (T=1), ECE {metrics['ece_uncalibrated']:.3f}": uncalibrated,
                                         f"after (T={classifier.temperature:.2f}), ECE {metrics['ece']:.3f}": probs},
                                out_dir / "reliability.png", ECE_BINS)
        figures.prediction_grid_png([s.path for s, _ in ok], y_true, probs, classes, out_dir / "prediction_grid.png",
                                    read=read_xray)
        from .explain import cam_cases

        figures.cam_grid_png(*cam_cases(classifier, [s.path for s, _ in ok], y_true, probs), out_dir / "cam_grid.png")
    return metrics


def _write_predictions(path: Path, ok, classes, task) -> None:
    with atomic_write(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "true", "predicted", *[f"p_{c}" for c in classes]])
        for sample, record in ok:
            writer.writerow([sample.path, task_label(sample.label, task), record.label,
                             *[f"{record.probabilities[c]:.6f}" for c in classes]])


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
        lines.append(f"{name:<10}{row['precision']:>10.4f}{row['recall']:>10.4f}{row['f1']:>10.4f}{row['support']:>10d}")
    lines += ["", "confusion matrix (rows true, columns predicted): " + " ".join(metrics["classes"])]
    for name, row in zip(metrics["classes"], metrics["confusion_matrix"]):
        lines.append(f"{name:<10}" + "".join(f"{v:>10d}" for v in row))
    return "\n".join(lines)
