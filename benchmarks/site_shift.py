"""Does unlabelled site adaptation (`pneumoscope adapt`) help? Measured, not promised.

For each evaluation group (internal test split; external = half of the official test group, used
for selection) and each simulated acquisition shift (systematic gamma, contrast, blur, noise, low
resolution, a narrow window), the images are cut into two halves BY PATIENT (`patient_folds`).
`pneumoscope.adapt_bundle`, what `pneumoscope adapt` runs, adapts the model to one half's shifted
pictures (no labels: AdaBN, then AdaBN + class priors by EM) and the adapted bundle is scored on the
other half, then the other way round; the two scored halves together give the accuracy after
adaptation, on images the adaptation never saw.

    python benchmarks/site_shift.py --model models/three --manifest runs/x/manifest.csv \
        [--max-images 150] [--shifts none "gamma 2.0"] --out docs/site-shift.md

Prints the CPU and writes a markdown table plus a JSON file of every figure.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

import pneumoscope
from common import EXTERNAL, add_model, machine, parser, write_text


def _resize(gray: np.ndarray, side: int) -> np.ndarray:
    """Squashed to side x side with the filter prediction squashes with."""
    return np.asarray(Image.fromarray(gray).resize((side, side), Image.Resampling.BILINEAR, reducing_gap=3.0))


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
        return np.stack([_resize(_resize(x, side), x.shape[0]) for x in p])
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


def load_group(samples, meta):
    """Pixels at the model's size, class indices and the two patient halves of a group."""
    pixels, kept, _ = pneumoscope.load_pixels(samples, meta.img_size)
    y = pneumoscope.class_indices(kept, meta.classes, meta.task)
    return pixels, y, pneumoscope.patient_folds(kept, 2, seed=0)


def evaluate_variants(model: str, pixels: np.ndarray, y: np.ndarray, halves, classes) -> dict:
    """Accuracy (and per-class recall) of: the model as is; AdaBN; AdaBN + prior EM; each adapted
    on one patient half and scored on the other. Every model runs on ONNX Runtime."""
    probs_base = pneumoscope.Classifier.load(model, backend="onnx").scores(list(pixels)).probabilities
    results = {"as is": probs_base, "adabn": np.zeros_like(probs_base), "adabn + priors": np.zeros_like(probs_base)}
    with tempfile.TemporaryDirectory() as tmp:
        for k, (fit_half, score_half) in enumerate(((halves[0], halves[1]), (halves[1], halves[0]))):
            site = write_pictures(pixels[fit_half], Path(tmp) / f"site-{k}")
            for variant, priors in (("adabn", False), ("adabn + priors", True)):
                adapted = Path(tmp) / f"adapted-{k}-{priors}"
                pneumoscope.adapt_bundle(model, site, adapted, priors=priors)
                classifier = pneumoscope.Classifier.load(adapted, backend="onnx")
                results[variant][score_half] = classifier.scores(list(pixels[score_half])).probabilities
    return {name: pneumoscope.compute_metrics(y, p, classes) for name, p in results.items()}


def write_pictures(pixels: np.ndarray, folder: Path) -> Path:
    """The site's shifted pictures as the PNG files `adapt` reads (lossless: the same pixels)."""
    folder.mkdir(parents=True)
    for i, picture in enumerate(pixels):
        Image.fromarray(picture).save(folder / f"{i:05d}.png")
    return folder


def main(argv=None) -> int:
    options = parser(__doc__)
    add_model(options, required=True)
    options.add_argument("--manifest", required=True, help="the model's training manifest (its test split is used)")
    options.add_argument("--external", type=Path, default=EXTERNAL)
    options.add_argument("--shifts", nargs="+", default=list(SHIFTS), choices=list(SHIFTS))
    options.add_argument("--max-images", type=int, default=None, help="per group, for a quick look")
    options.add_argument("--out", default="docs/site-shift.md")
    args = options.parse_args(argv)

    meta = pneumoscope.load_bundle(args.model).meta
    classes = tuple(meta.classes)
    groups = {"internal test": pneumoscope.read_dataset(args.manifest, task=meta.task).select("test"),
              "external (used for selection)": pneumoscope.read_dataset(args.external, task=meta.task).samples}
    rng = np.random.default_rng(0)
    report = {"cpu": machine(), "checkpoint": str(args.model), "rows": []}
    for group, samples in groups.items():
        if args.max_images:
            samples = samples[:: max(1, len(samples) // args.max_images)]
        pixels, y, halves = load_group(samples, meta)
        for shift in args.shifts:
            metrics = evaluate_variants(args.model, SHIFTS[shift](pixels, rng), y, halves, classes)
            for variant, m in metrics.items():
                row = {"group": group, "shift": shift, "variant": variant, "n": m["n"], "accuracy": m["accuracy"],
                       "ece": m["ece"], **{f"recall {c}": v["recall"] for c, v in m["per_class"].items()}}
                report["rows"].append(row)
                print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    out = Path(args.out)
    write_text(out.with_suffix(".json"), json.dumps(report, indent=2))
    write_text(out, markdown(report, classes))
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
