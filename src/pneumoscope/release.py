"""Shipping a trained run as the repo's default model, and generating its model card.

`ship_run` copies a run's calibrated checkpoint into models/ (with training facts added to its
sidecar), re-evaluates it on the run's own validation and internal test splits into
docs/model-card/<task>/, and `write_model_card` turns those outputs into docs/model-card.md.
Nothing in the card is typed by hand: every figure comes from the files this writes.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch

from .data import atomic_write, read_manifest
from .evaluate import evaluate_samples, fit_temperature
from .export import export_int8, int8_path
from .labels import THREE, task_label
from .models import load_checkpoint, save_checkpoint
from .predict import Classifier

BINARY_GROUPS = [[0], [1, 2]]  # NORMAL | BACTERIA + VIRUS, indices into labels.THREE
INT8_NOTE = ("; rows marked int8: the quantized graph (`--backend int8`, about 1.8x the folder throughput, "
             "see benchmarks.md).")


def training_summary(run_dir: Path) -> dict:
    """Wall time and the time-to-accuracy curve of a run, from its own files."""
    with open(run_dir / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    elapsed, curve = 0.0, []
    for row in rows:
        elapsed += float(row["seconds"])
        curve.append({"epoch": int(row["epoch"]), "train_seconds": round(elapsed, 1),
                      "val_acc": round(float(row["val_acc"]), 4), "val_bacc": round(float(row["val_bacc"]), 4)})
    env_file = run_dir / "env.json"  # absent when the run died after its last epoch
    env = json.loads(env_file.read_text()) if env_file.exists() else {}
    return {"run": run_dir.name, "epochs_run": len(rows), "wall_seconds": env.get("wall_seconds"),
            "train_seconds": round(elapsed, 1), "peak_memory_mb": env.get("peak_memory_mb"), "curve": curve,
            "env": env}


def ship_run(run_dir: str | Path, models_dir: str | Path = "models", docs_dir: str | Path = "docs",
             binary_from_three: bool = False, int8_calibration: int = 0) -> list[Path]:
    """Copies the run's model.pt into models/pneumoscope-<task>.pt and evaluates it for the card.
    With binary_from_three, also ships the 3-class model read as NORMAL vs PNEUMONIA. With
    int8_calibration > 0, also writes each model's int8 ONNX graph (`--backend int8`), calibrated on
    that many images of the run's train split, and measures it on val and internal test too."""
    run_dir, models_dir, docs_dir = Path(run_dir), Path(models_dir), Path(docs_dir)
    model, meta = load_checkpoint(run_dir / "model.pt")
    samples = read_manifest(run_dir / "manifest.csv")
    meta["training"] = training_summary(run_dir)
    shipped = [_ship(model, meta, samples, models_dir, docs_dir, int8_calibration)]
    if binary_from_three:
        if meta["task"] != "three":
            raise ValueError("binary_from_three needs a 3-class run")
        shipped.append(_ship_binary(model, meta, samples, models_dir, docs_dir, int8_calibration))
    return shipped


def _ship(model, meta: dict, samples, models_dir: Path, docs_dir: Path, int8_calibration: int = 0) -> Path:
    target = models_dir / f"pneumoscope-{meta['task']}.pt"
    save_checkpoint(model, meta, target)
    int8_path(target).unlink(missing_ok=True)  # made from the model this replaces
    classifier = Classifier.load(target)
    meta["metrics_backend"] = classifier.backend
    meta["metrics"] = _measure(classifier, samples, docs_dir / "model-card" / meta["task"], plots=True)
    meta.pop("metrics_int8", None)
    if int8_calibration:
        export_int8(target, samples, int8_calibration)
        int8 = Classifier.load(target, backend="int8")
        meta["metrics_int8"] = _measure(int8, samples, docs_dir / "model-card" / meta["task"] / "int8", plots=False)
    return save_checkpoint(model, meta, target)


def _measure(classifier, samples, out_dir: Path, plots: bool) -> dict:
    """Headline metrics on the val and internal test splits; reports in out_dir/{val,test}."""
    metrics = {}
    for split, name in (("val", "val"), ("test", "internal_test")):
        chosen = [s for s in samples if s.split == split]
        if chosen:
            report = evaluate_samples(None, chosen, out_dir / split, classifier=classifier,
                                      plots=plots and split == "test")  # the card shows test
            metrics[name] = {k: report[k] for k in ("n", "accuracy", "accuracy_ci95", "balanced_accuracy",
                                                    "macro_f1", "macro_auc", "ece", "ece_uncalibrated")}
            metrics[name]["recall"] = {c: v["recall"] for c, v in report["per_class"].items()}
    return metrics


def _ship_binary(model, meta: dict, samples, models_dir: Path, docs_dir: Path, int8_calibration: int = 0) -> Path:
    """The 3-class network with a MergeOutputs head; its temperature refitted on validation."""
    binary_meta = {**meta, "task": "binary", "classes": ["NORMAL", "PNEUMONIA"], "temperature": 1.0,
                   "merge_outputs": BINARY_GROUPS, "output_classes": list(THREE),
                   "name": meta["name"].replace("-three", "-binary"), "derived_from": "pneumoscope-three.pt"}
    models_dir.mkdir(parents=True, exist_ok=True)
    probe_path = models_dir / ".binary-probe.pt"
    save_checkpoint(model, binary_meta, probe_path)  # same weights; the merge head is rebuilt on load
    try:
        classifier = Classifier.load(probe_path)
        val = [s for s in samples if s.split == "val"]
        probs = np.array([[r.probabilities[c] for c in classifier.classes]
                          for r in classifier.predict_many([s.path for s in val])])
        targets = torch.tensor([classifier.classes.index(task_label(s.label, "binary")) for s in val])
        binary_meta["temperature"] = fit_temperature(torch.log(torch.tensor(probs).clamp(min=1e-12)), targets)
    finally:
        probe_path.unlink(missing_ok=True)
        probe_path.with_suffix(".json").unlink(missing_ok=True)
    return _ship(model, binary_meta, samples, models_dir, docs_dir, int8_calibration)


# ---------------------------------------------------------------- the card
def write_model_card(models_dir: str | Path = "models", docs_dir: str | Path = "docs") -> Path:
    models_dir, docs_dir = Path(models_dir), Path(docs_dir)
    sections = [_CARD_HEAD]
    for task in ("three", "binary"):
        checkpoint = models_dir / f"pneumoscope-{task}.pt"
        if checkpoint.exists():
            meta = json.loads(checkpoint.with_suffix(".json").read_text())
            sections.append(_task_section(meta, docs_dir / "model-card" / task, docs_dir))
    sections.append(_CARD_TAIL)
    out = docs_dir / "model-card.md"
    with atomic_write(out, "w") as handle:
        handle.write("\n".join(sections))
    return out


def _task_section(meta: dict, reports: Path, docs_dir: Path) -> str:
    rel = lambda p: p.relative_to(docs_dir).as_posix()  # noqa: E731
    config = meta.get("train_config", {})
    training = meta.get("training", {})
    lines = [f"## `{meta['name']}` ({meta['task']}: {' / '.join(meta['classes'])})", ""]
    lines += [
        f"- Architecture: `{meta['arch']}`, {meta['params']:,} parameters, input {meta['img_size']}x{meta['img_size']} "
        f"gray, normalisation mean {meta['normalization']['mean']} std {meta['normalization']['std']}.",
        f"- Training: {training.get('epochs_run', '?')} epochs, {training.get('train_seconds', '?')} s in training "
        f"epochs ({training.get('wall_seconds') or '?'} s wall in all) on "
        f"{training.get('env', {}).get('cpu_count', '?')} CPU cores (peak memory "
        f"{training.get('peak_memory_mb', '?')} MB); lr {config.get('lr')}, batch {config.get('batch_size')}, "
        f"label smoothing {config.get('label_smoothing')}, augmentation strength {config.get('aug')}, EMA decay "
        f"{config.get('ema_decay')} from epoch {config.get('ema_start_epoch', 0)}, first {config.get('freeze_blocks')} "
        f"blocks frozen, at most {config.get('epochs')} epochs (early stopping patience {config.get('patience')}), "
        f"seed {meta.get('seed')}.",
        f"- Data: manifest hash `{meta['manifest_hash']}`, git commit `{meta.get('git_commit')}`; "
        f"temperature {meta['temperature']:.3f}."
        + (" Derived from the 3-class model by summing BACTERIA and VIRUS probabilities." if meta.get("merge_outputs") else ""),
        f"- Figures below measured with the `{meta.get('metrics_backend', 'onnx')}` backend, the one `predict` "
        "uses by default" + (INT8_NOTE if meta.get("metrics_int8") else "."),
        "",
        "| split | n | accuracy (95% CI) | balanced acc. | macro F1 | macro AUC | ECE before -> after | "
        + " | ".join(f"recall {c}" for c in meta["classes"]) + " |",
        "|---|---|---|---|---|---|---|" + "---|" * len(meta["classes"]),
    ]
    rows = list(meta.get("metrics", {}).items()) + [(f"{k} (int8)", m) for k, m in meta.get("metrics_int8", {}).items()]
    for name, m in rows:
        lo, hi = m["accuracy_ci95"]
        lines.append(f"| {name} | {m['n']} | {m['accuracy']:.3f} ({lo:.3f}-{hi:.3f}) | {m['balanced_accuracy']:.3f} | "
                     f"{m['macro_f1']:.3f} | {m['macro_auc']:.3f} | {m['ece_uncalibrated']:.3f} -> {m['ece']:.3f} | "
                     + " | ".join(f"{m['recall'][c]:.3f}" for c in meta["classes"]) + " |")
    test = reports / "test"
    if (test / "metrics.json").exists():
        report = json.loads((test / "metrics.json").read_text())
        lines += ["", "Internal test confusion matrix (rows true, columns predicted):", "",
                  "| | " + " | ".join(report["classes"]) + " |", "|---|" + "---|" * len(report["classes"])]
        for c, row in zip(report["classes"], report["confusion_matrix"]):
            lines.append(f"| **{c}** | " + " | ".join(str(v) for v in row) + " |")
        mistakes = _confident_mistakes(test)
        lines += ["", f"![confusion matrix]({rel(test / 'confusion_matrix.png')}) "
                      f"![ROC]({rel(test / 'roc.png')}) ![reliability]({rel(test / 'reliability.png')})", ""]
        if mistakes:
            lines += ["Most confident mistakes on the internal test split:", "",
                      "| file | true | predicted | probability |", "|---|---|---|---|"]
            lines += [f"| {Path(p).name} | {t} | {pr} | {prob:.3f} |" for p, t, pr, prob in mistakes]
            if (test / "mistakes.png").exists():
                lines += ["", f"![most confident mistakes]({rel(test / 'mistakes.png')})"]
    if training.get("curve"):
        lines += ["", "Time to accuracy (validation, after each epoch):", "",
                  "| epoch | training seconds | val accuracy | val balanced accuracy |", "|---|---|---|---|"]
        lines += [f"| {c['epoch']} | {c['train_seconds']} | {c['val_acc']:.3f} | {c['val_bacc']:.3f} |"
                  for c in training["curve"]]
    return "\n".join(lines) + "\n"


def _confident_mistakes(report_dir: Path, n: int = 8) -> list[tuple[str, str, str, float]]:
    with open(report_dir / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    wrong = [(r["path"], r["true"], r["predicted"], float(r[f"p_{r['predicted']}"]))
             for r in rows if r["true"] != r["predicted"]]
    wrong.sort(key=lambda w: -w[3])
    if wrong:
        _mistakes_png(wrong[:n], report_dir / "mistakes.png")
    return wrong[:n]


def _mistakes_png(mistakes, out: Path) -> None:
    from .images import read_xray
    from .plots import plt, save

    fig, axes = plt.subplots(1, len(mistakes), figsize=(2.4 * len(mistakes), 2.8), squeeze=False)
    for ax, (path, true, predicted, prob) in zip(axes[0], mistakes):
        ax.imshow(read_xray(path), cmap="gray")
        ax.set_title(f"{predicted} {prob:.2f}\n[{true}]", fontsize=9, color="red")
        ax.axis("off")
    fig.tight_layout()
    save(fig, out)


_CARD_HEAD = """# Model card: pneumoscope shipped models

*Generated by `pneumoscope card` from `models/*.json` and the evaluation reports under
`docs/model-card/`; do not edit by hand.* Written in the spirit of Model Cards for Model Reporting
(Mitchell et al. 2019) and the CLAIM checklist.

## Intended use
- Research and teaching: comparing CNNs on pediatric chest radiographs; a fast second reader in
  tooling that shows a clinician its probabilities and heat map.
- **Not a diagnosis** and not a medical device. Every output must be read by a qualified person.
- Out of scope: adults; views other than frontal (AP/PA) chest films; CT, photographs or scans of
  films; triage without a human; deciding antibiotic treatment from the BACTERIA/VIRUS call.

## Data
- Kermany DS, Zhang K, Goldbaum M, *Labeled Optical Coherence Tomography (OCT) and Chest X-Ray
  Images for Classification*, Mendeley Data v2, doi:10.17632/rscbjbr9sj.2 (CC BY 4.0); Kermany et al.,
  Cell 2018. Pediatric (1-5 years) anterior-posterior films from one hospital (Guangzhou Women and
  Children's Medical Center).
- This copy: 224x224 8-bit gray, squashed to a square from landscape originals (aspect ratio lost).
- Labels: NORMAL from the folder; BACTERIA vs VIRUS from the file name only. The viral/bacterial
  distinction is noisy in the source data; 808 `personN` ids hold both a bacterial and a viral file.
- Split: the public train + val groups (5,232 images) cut **by patient** (scikit-learn
  StratifiedGroupKFold, stratified by class, seed 0) into train / val / internal test (70/15/15).
  The official test group (624 images) was withheld from the developers and is used to check the
  shipped models independently; it is not reported here.
- Everything (epochs, learning rate, image size, augmentation, temperature) was chosen on the
  validation split; the internal test split is reported once per shipped model.

## Calibration
Temperature scaling fitted on the validation split (NLL, LBFGS). ECE uses 15 equal-width bins;
the reliability diagrams show before (T = 1) and after, on the internal test split. Printed
probabilities are the calibrated ones.
"""

_CARD_TAIL = """
## Limitations
- One hospital, one age group, one image pipeline: accuracy on other sites will be lower, and is
  expected to drop most for NORMAL vs VIRUS, which differ subtly.
- 224x224 squashed inputs: fine detail and true proportions are gone.
- Viral vs bacterial labels come from file names and are noisy; the 3-class accuracy is bounded by
  that noise.
- The heat map (Grad-CAM) shows where the network's evidence lies, not where disease is.
"""
