"""Calibration under shift: the temperature fitted on the validation logits as they are, or on the
validation images passed through the strong augmentation (an acquisition shift simulated without
any external label); then ECE on the external group (used for selection, never for fitting).
Third, a temperature from the new site's unlabelled images: ATC (Garg et al. 2022) estimates the
accuracy on one patient half of the external group from the share of its confidences above the
validation threshold, the temperature that makes the mean confidence equal that estimate is found
on that half, and ECE is measured on the other half (both ways round; no external label is used
before the ECE).

    python benchmarks/calibration_shift.py RUN_DIR... [--manifest M.csv] [--external ../shared/data/chest_xray_external]
"""
from __future__ import annotations

import sys

import numpy as np
from scipy.special import softmax as scipy_softmax

import pneumoscope
from common import add_external, parser


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    return scipy_softmax(np.asarray(logits, np.float64) / temperature, axis=1)


def patient_halves(samples, seed: int = 0) -> list[np.ndarray]:
    """Two halves of the images, split by patient (no labels: the method may not see any)."""
    patients = sorted({s.patient_id for s in samples})
    first = set(np.random.default_rng(seed).permutation(patients)[: len(patients) // 2])
    in_first = np.array([s.patient_id in first for s in samples])
    return [np.flatnonzero(in_first), np.flatnonzero(~in_first)]


def temperature_for_confidence(logits: np.ndarray, target: float) -> float:
    """The T whose softmax(logits / T) has mean top probability `target` (bisection on log T)."""
    low, high = 0.05, 20.0
    for _ in range(60):
        middle = (low * high) ** 0.5
        low, high = (middle, high) if softmax(logits, middle).max(1).mean() > target else (low, middle)
    return (low * high) ** 0.5


def atc_ece(zv, yv, t_val: float, ze, ye, halves, classes) -> tuple[float, float, float]:
    """(mean external ECE with the ATC temperature, with t_val on the same halves, mean ATC accuracy estimate)."""
    confidence_v = softmax(zv, t_val).max(1)
    threshold = np.quantile(confidence_v, 1 - (softmax(zv, t_val).argmax(1) == yv).mean())
    eces, baseline, estimates = [], [], []
    for fit_on, score_on in (halves, halves[::-1]):
        estimate = float((softmax(ze[fit_on], t_val).max(1) >= threshold).mean())
        t_site = temperature_for_confidence(ze[fit_on], estimate)
        eces.append(pneumoscope.compute_metrics(ye[score_on], softmax(ze[score_on], t_site), classes)["ece"])
        baseline.append(pneumoscope.compute_metrics(ye[score_on], softmax(ze[score_on], t_val), classes)["ece"])
        estimates.append(estimate)
    return float(np.mean(eces)), float(np.mean(baseline)), float(np.mean(estimates))


def main(argv=None) -> int:
    options = parser(__doc__)
    options.add_argument("runs", nargs="+")
    options.add_argument("--manifest", help="validation split from here (default: each run's own manifest)")
    add_external(options)
    args = options.parse_args(argv)
    external = pneumoscope.read_dataset(args.external).samples
    for run in args.runs:
        bundle = pneumoscope.load_bundle(pneumoscope.RunDir(run).finished_model())
        meta = bundle.meta
        classifier = pneumoscope.Classifier.from_model(pneumoscope.load_network(bundle), meta.replace(temperature=1.0),
                                                       backend="onnx")
        classes, size = tuple(meta.classes), meta.img_size
        samples = pneumoscope.read_dataset(args.manifest, meta.task).samples if args.manifest else \
            pneumoscope.RunDir(run).samples()
        pv, kept_v, _ = pneumoscope.load_pixels([s for s in samples if s.split == "val"], size)
        pe, kept_e, _ = pneumoscope.load_pixels(external, size)
        yv, ye = (pneumoscope.class_indices(kept, classes, meta.task) for kept in (kept_v, kept_e))
        zv, ze = classifier.score_pixels(pv).logits, classifier.score_pixels(pe).logits
        za = classifier.score_pixels(pneumoscope.augmented_views(pv, size)).logits
        for name, t in (("T on val", pneumoscope.fit_temperature(zv, yv)),
                        ("T on strong-augmented val", pneumoscope.fit_temperature(za, np.concatenate([yv, yv])))):
            ece_val = pneumoscope.compute_metrics(yv, softmax(zv, t), classes)["ece"]
            ece_ext = pneumoscope.compute_metrics(ye, softmax(ze, t), classes)["ece"]
            print(f"{run}: {name}: T={t:.3f} val ECE {ece_val:.3f} | external (used for selection) ECE {ece_ext:.3f}")
        t_val = pneumoscope.fit_temperature(zv, yv)
        ece_atc, ece_same, estimate = atc_ece(zv, yv, t_val, ze, ye, patient_halves(kept_e), classes)
        print(f"{run}: T from the other external half's unlabelled images (ATC): estimated accuracy {estimate:.3f} "
              f"(true {(ze.argmax(1) == ye).mean():.3f}); external ECE {ece_atc:.3f} (T on val, same halves: "
              f"{ece_same:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
