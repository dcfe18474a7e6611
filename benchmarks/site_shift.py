"""Does unlabelled site adaptation (`pneumoscope adapt`) help? Measured, not promised.

For each evaluation group (internal test split; external = half of the official test group, used
for selection) and each simulated acquisition shift (systematic gamma, contrast, blur, noise, low
resolution, a narrow window), the images are cut into two halves BY PATIENT. The model is adapted
on one half's pixels (no labels) and scored on the other half, then the other way round; the two
scored halves together give the accuracy after adaptation, on images the adaptation never saw.

    python benchmarks/site_shift.py --checkpoint models/three --manifest runs/x/manifest.csv \
        --out docs/site-shift.md

Prints the CPU and writes a markdown table plus a JSON file of every figure.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter
from sklearn.model_selection import StratifiedGroupKFold

from pneumoscope.workflows.adapt import adapt_batchnorm, add_logit_bias, estimate_priors, prior_shift_bias
from pneumoscope.data.datasets import read_dataset, read_manifest
from pneumoscope.data.images import input_step, read_xray, resize_square
from pneumoscope.core.labels import task_label
from pneumoscope.evaluation.metrics import compute_metrics


def _stretch(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _gamma(g):
    return lambda p, rng: _stretch(255 * (p / 255.0) ** g)


def _contrast(f):
    return lambda p, rng: _stretch((p.astype(np.float32) - p.mean()) * f + p.mean())


def _blur(sigma):
    return lambda p, rng: _stretch(np.stack([gaussian_filter(x.astype(np.float32), sigma) for x in p]))


def _noise(sigma):
    return lambda p, rng: _stretch(p + rng.normal(0, 255 * sigma, p.shape))


def _lowres(side):
    def shift(p, rng):
        return np.stack([resize_square(resize_square(x, side), x.shape[0]) for x in p])
    return shift


def _window(lo, hi):
    """A narrow display window: the film's lo..hi percentiles stretched to 0..255 (burnt-out lungs)."""
    def shift(p, rng):
        out = []
        for x in p:
            a, b = np.percentile(x, [lo, hi])
            out.append(_stretch((x.astype(np.float32) - a) * 255 / max(b - a, 1)))
        return np.stack(out)
    return shift


SHIFTS = {
    "none": lambda p, rng: p,
    "gamma 0.5": _gamma(0.5), "gamma 2.0": _gamma(2.0),
    "contrast x0.5": _contrast(0.5), "blur sigma 2": _blur(2.0),
    "noise sigma 0.05": _noise(0.05), "resolution 64 px": _lowres(64), "window 20-80%": _window(20, 80),
    "inverted": lambda p, rng: 255 - p,  # a MONOCHROME1 film read as MONOCHROME2
}


def load_group(samples, size: int, classes, task: str):
    pixels = np.stack([resize_square(read_xray(s.path), size) for s in samples])
    y = np.array([classes.index(task_label(s.label, task)) for s in samples])
    groups = np.array([s.patient_id for s in samples])
    return pixels, y, groups


def two_halves(y, groups, seed: int = 0):
    folds = StratifiedGroupKFold(n_splits=2, shuffle=True, random_state=seed)
    return [held for _, held in folds.split(np.zeros(len(y)), y, groups)]


def evaluate_variants(bundle_loader, pixels, y, groups, classes, source_priors):
    """Accuracy (and per-class recall) of: the model as is; AdaBN; AdaBN + prior EM; each adapted
    on one patient half and scored on the other."""
    base = bundle_loader()
    probs_base = base.probabilities(pixels)
    results = {"as is": probs_base}
    cross = {"adabn": np.zeros_like(probs_base), "adabn + priors": np.zeros_like(probs_base)}
    halves = two_halves(y, groups)
    for fit_half, score_half in ((halves[0], halves[1]), (halves[1], halves[0])):
        adapted = bundle_loader()
        adapt_batchnorm(adapted.torch_model, input_step(pixels[fit_half], adapted.meta.preprocess))
        adapted.refresh()
        cross["adabn"][score_half] = adapted.probabilities(pixels[score_half])
        priors = estimate_priors(adapted.probabilities(pixels[fit_half]), source_priors)
        add_logit_bias(adapted.torch_model, prior_shift_bias(source_priors, priors, adapted.temperature))
        adapted.refresh()
        cross["adabn + priors"][score_half] = adapted.probabilities(pixels[score_half])
    results.update(cross)
    return {name: compute_metrics(y, p, classes) for name, p in results.items()}


class _Model:
    """The network under study, scored through the product's own Classifier (one inference path)."""

    def __init__(self, model, meta):
        from pneumoscope.runtime.classifier import Classifier

        self._Classifier = Classifier
        self.torch_model, self.meta = model, meta
        self.temperature = float(meta.temperature)
        self.refresh()

    def refresh(self):
        self.classifier = self._Classifier.from_model(self.torch_model, self.meta, backend="onnx")

    def probabilities(self, pixels):
        return self.classifier.scores(list(pixels)).probabilities


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a model bundle directory (or a legacy model.pt)")
    parser.add_argument("--manifest", required=True, help="the model's training manifest (its test split is used)")
    parser.add_argument("--external", default="../shared/data/chest_xray_external")
    parser.add_argument("--shifts", nargs="+", default=list(SHIFTS), choices=list(SHIFTS))
    parser.add_argument("--max-images", type=int, default=None, help="per group, for a quick look")
    parser.add_argument("--out", default="docs/site-shift.md")
    args = parser.parse_args(argv)

    from pneumoscope.bundle.store import load_bundle

    bundle = load_bundle(args.checkpoint)
    meta = bundle.meta
    classes = tuple(meta.classes)
    train = [s for s in read_manifest(args.manifest) if s.split in ("train", "val")]
    labels = np.array([classes.index(task_label(s.label, meta.task)) for s in train if s.split == "val"])
    source_priors = np.bincount(labels, minlength=len(classes)) / len(labels)  # what T was fitted under
    groups = {"internal test": [s for s in read_manifest(args.manifest) if s.split == "test"],
              "external (used for selection)": read_dataset(args.external).samples}
    rng = np.random.default_rng(0)
    report = {"cpu": platform.processor() or platform.machine(), "checkpoint": str(args.checkpoint), "rows": []}
    for group, samples in groups.items():
        if args.max_images:
            samples = samples[:: max(1, len(samples) // args.max_images)]
        pixels, y, patient = load_group(samples, meta.img_size, classes, meta.task)
        for shift in args.shifts:
            shifted = SHIFTS[shift](pixels, rng)
            metrics = evaluate_variants(lambda: _Model(bundle.load_model(), meta), shifted, y, patient, classes,
                                        source_priors)
            for variant, m in metrics.items():
                row = {"group": group, "shift": shift, "variant": variant, "n": m["n"], "accuracy": m["accuracy"],
                       "ece": m["ece"], **{f"recall {c}": v["recall"] for c, v in m["per_class"].items()}}
                report["rows"].append(row)
                print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    out.write_text(markdown(report, classes))
    print(f"wrote {out}", file=sys.stderr)
    return 0


def markdown(report: dict, classes) -> str:
    head = ["group", "shift", "variant", "n", "accuracy", "ECE"] + [f"recall {c}" for c in classes]
    lines = [f"Model: `{report['checkpoint']}`; CPU: {report['cpu']}. Adaptation is fitted on one half of the "
             "patients' pixels and scored on the other half (both ways), so no image is scored by a model "
             "adapted on it.", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["rows"]:
        lines.append("| " + " | ".join([r["group"], r["shift"], r["variant"], str(r["n"]), f"{r['accuracy']:.3f}",
                                        f"{r['ece']:.3f}"] + [f"{r[f'recall {c}']:.3f}" for c in classes]) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
