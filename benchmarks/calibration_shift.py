"""Calibration under shift: the temperature fitted on the validation logits as they are, or on the
validation images passed through the strong augmentation (an acquisition shift simulated without
any external label); then ECE on the external group (used for selection, never for fitting).

    python benchmarks/calibration_shift.py RUN_DIR... --manifest M.csv --external ../shared/data/chest_xray_external
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from pneumoscope.artifact import load_bundle
from pneumoscope.data import class_indices, discover, load_pixels, read_manifest, train_transform
from pneumoscope.metrics import compute_metrics, fit_temperature, softmax
from pneumoscope.predict import Classifier
from pneumoscope.rundir import RunDir


def augmented(pixels: np.ndarray, size: int, passes: int = 2) -> np.ndarray:
    torch.manual_seed(0)
    np.random.seed(0)
    aug = train_transform(size, 1.0, "strong")
    views = [aug(torch.from_numpy(x)[None]).mul(255).round().clamp(0, 255).byte()[0].numpy()
             for _ in range(passes) for x in pixels]
    return np.stack(views)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--external", required=True)
    args = parser.parse_args(argv)
    val = [s for s in read_manifest(args.manifest) if s.split == "val"]
    external = discover(args.external)[0]
    for run in args.runs:
        bundle = load_bundle(RunDir(run).model_path())
        meta = bundle.meta
        classifier = Classifier.from_model(bundle.load_model(), meta.replace(temperature=1.0), backend="onnx")
        classes, size = tuple(meta.classes), meta.img_size
        pv, kept_v, _ = load_pixels(val, size)
        pe, kept_e, _ = load_pixels(external, size)
        yv, ye = class_indices(kept_v, classes, meta.task), class_indices(kept_e, classes, meta.task)
        zv, ze = classifier.score_pixels(pv).logits, classifier.score_pixels(pe).logits
        za = classifier.score_pixels(augmented(pv, size)).logits
        for name, t in (("T on val", fit_temperature(zv, yv)),
                        ("T on strong-augmented val", fit_temperature(za, np.concatenate([yv, yv])))):
            ece_val = compute_metrics(yv, softmax(zv, t), classes)["ece"]
            ece_ext = compute_metrics(ye, softmax(ze, t), classes)["ece"]
            print(f"{run}: {name}: T={t:.3f} val ECE {ece_val:.3f} | external (used for selection) ECE {ece_ext:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
