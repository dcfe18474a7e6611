"""Figures of an evaluation (matplotlib, headless). Each PNG is written atomically."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import roc_auc_score, roc_curve  # noqa: E402

from ..core.files import atomic_write  # noqa: E402


def save(fig, out: Path, dpi: int = 100) -> None:
    with atomic_write(out) as handle:
        fig.savefig(handle, format="png", dpi=dpi)
    plt.close(fig)


def confusion_matrix_png(matrix: np.ndarray, classes, out: Path) -> None:
    """Counts and row-normalised rates of sklearn's confusion_matrix (metrics.compute_metrics), side by
    side, both coloured by the rates. Drawn here: ConfusionMatrixDisplay changes the report's PNG."""
    rows = matrix.sum(1, keepdims=True).clip(min=1)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, values, title, fmt in ((axes[0], matrix, "counts", "d"), (axes[1], matrix / rows, "row-normalised", ".2f")):
        ax.imshow(values if fmt == ".2f" else matrix / rows, cmap="Blues", vmin=0, vmax=1)
        for i in range(len(classes)):
            for j in range(len(classes)):
                ax.text(j, i, format(values[i, j], fmt), ha="center", va="center",
                        color="white" if (matrix / rows)[i, j] > 0.5 else "black")
        ax.set_xticks(range(len(classes)), classes)
        ax.set_yticks(range(len(classes)), classes)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title)
    fig.tight_layout()
    save(fig, out)


def roc_png(y_true: np.ndarray, probs: np.ndarray, classes, out: Path) -> None:
    """One-vs-rest curves (sklearn's roc_curve) of each class present. Drawn here: RocCurveDisplay
    (its own labels, limits and square aspect) changes the report's PNG."""
    fig, ax = plt.subplots(figsize=(5, 5))
    for c, name in enumerate(classes):
        positives = y_true == c
        if positives.all() or not positives.any():
            continue
        fpr, tpr, _ = roc_curve(positives, probs[:, c])
        ax.plot(fpr, tpr, label=f"{name} vs rest (AUC {roc_auc_score(positives, probs[:, c]):.3f})")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("ROC, one-vs-rest")
    ax.legend(loc="lower right")
    fig.tight_layout()
    save(fig, out)


def reliability_png(y_true: np.ndarray, curves: dict[str, np.ndarray], out: Path, bins: int = 15) -> None:
    """Accuracy per confidence bin for each named set of probabilities (e.g. before/after scaling),
    at the bin centres. Binned here, not by sklearn's calibration_curve: that gives each bin's mean
    confidence instead of its centre (and puts a confidence on an edge in the lower bin, where the
    ECE's torchmetrics bins put it in the upper), which changes the report's PNG."""
    edges = np.linspace(0, 1, bins + 1)
    centers = (edges[:-1] + edges[1:]) / 2
    fig, ax = plt.subplots(figsize=(5, 5))
    for (name, probs), marker in zip(curves.items(), "os^"):
        confidence, correct = probs.max(1), probs.argmax(1) == y_true
        which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
        filled = [b for b in range(bins) if (which == b).any()]
        ax.plot(centers[filled], [correct[which == b].mean() for b in filled], "-" + marker, label=name)
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.set_xlabel(f"confidence ({bins} bins)")
    ax.set_ylabel("accuracy")
    ax.set_title("reliability")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    save(fig, out)


def prediction_grid_png(paths, y_true, probs, classes, out: Path, read, n: int = 16, seed: int = 0) -> None:
    """16 images: predicted label (and probability) over each, the true one in brackets; wrong in red."""
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(paths), size=min(n, len(paths)), replace=False)
    cols = 4
    rows = int(np.ceil(len(chosen) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.6, rows * 2.8), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, chosen):
        predicted = int(probs[i].argmax())
        ax.imshow(read(paths[i]), cmap="gray")
        wrong = predicted != y_true[i]
        ax.set_title(f"{classes[predicted]} {probs[i, predicted]:.2f}\n[{classes[y_true[i]]}]", fontsize=9,
                     color="red" if wrong else "black")
    fig.suptitle(GRID_LEGEND, fontsize=10)
    fig.tight_layout()
    save(fig, out)


# what every grid of titled X-rays says about its titles
GRID_LEGEND = "predicted class and probability above each image, [true class] in brackets; red: wrong"


def cam_grid_png(images, titles, wrong, out: Path) -> None:
    """Grad-CAM overlays (RGB arrays) in a 4-column grid; titles of wrong predictions in red."""
    cols = 4
    rows = max(1, int(np.ceil(len(images) / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.6, rows * 2.8), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, title, is_wrong in zip(axes.flat, images, titles, wrong):
        ax.imshow(image)
        ax.set_title(title, fontsize=9, color="red" if is_wrong else "black")
    fig.suptitle(f"Grad-CAM of the predicted class, wrong predictions first\n{GRID_LEGEND}", fontsize=10)
    fig.tight_layout()
    save(fig, out)


def mistakes_png(images, titles, out: Path) -> None:
    """A row of X-rays (gray arrays) with their titles in red: the most confident mistakes."""
    fig, axes = plt.subplots(1, len(images), figsize=(2.4 * len(images), 3.2), squeeze=False)
    for ax, image, title in zip(axes[0], images, titles):
        ax.imshow(image, cmap="gray")
        ax.set_title(title, fontsize=9, color="red")
        ax.axis("off")
    fig.suptitle("most confident mistakes: predicted class and probability, [true class] in brackets", fontsize=9)
    fig.tight_layout()
    save(fig, out)


# ---------------------------------------------------------------- training runs
def _series(rows: list[dict], key: str) -> list[float]:
    return [float(r[key]) if r.get(key) not in (None, "") else np.nan for r in rows]


def training_curves_png(rows: list[dict], out: Path) -> None:
    """Loss and accuracy per epoch of one run (metrics.csv rows), train vs val; whole epochs on the x axis."""
    from matplotlib.ticker import MaxNLocator

    epochs = [int(r["epoch"]) for r in rows]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for key, style in (("train", "-o"), ("val", "--s")):
        ax_loss.plot(epochs, _series(rows, f"{key}_loss"), style, label=key)
        ax_acc.plot(epochs, _series(rows, f"{key}_acc"), style, label=key)
    ax_acc.plot(epochs, _series(rows, "val_bacc"), ":^", label="val balanced")
    for ax, title in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # a 2-epoch run: 0 and 1, not 0.2, 0.4, ...
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    save(fig, out)


def runs_curves_png(runs_rows: list[list[dict]], labels: list[str], out: Path) -> None:
    """Train and val accuracy and loss of several runs overlaid; runs of any length, or none."""
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex=True)
    for key, ax in zip(("train_acc", "val_acc", "train_loss", "val_loss"), axes.flat):
        for rows, label in zip(runs_rows, labels):
            ax.plot([int(r["epoch"]) for r in rows], _series(rows, key), "-o", ms=3, label=label)
        ax.set_title(key.replace("_", " ").replace("acc", "accuracy"))
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="lower center", ncol=min(4, max(1, len(labels))),
               fontsize=8)
    fig.tight_layout()
    fig.subplots_adjust(bottom=0.15)
    save(fig, out)


def bars_png(labels: list[str], values: list, title: str, out: Path) -> None:
    """One bar per run; a run without the number (failed) gets an empty bar marked n/a."""
    fig, ax = plt.subplots(figsize=(max(5.0, 1.0 * len(labels) + 2), 4))
    heights = [v if v is not None else 0 for v in values]
    ax.bar(range(len(labels)), heights, color="tab:blue")
    for i, (height, value) in enumerate(zip(heights, values)):
        ax.text(i, height, "n/a" if value is None else f"{value:.3g}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    save(fig, out)
