"""How often the not-a-chest-X-ray guard fires: on scikit-image's sample pictures (it should) and on
real radiographs from the training data (it should not). Prints markdown; --out also writes it.

    python benchmarks/guard_rates.py [--checkpoint models/pneumoscope-three.pt] [--n 300]
"""
from __future__ import annotations

import argparse
import os
import random
import warnings
from pathlib import Path

import skimage.data

from pneumoscope.data import read_manifest
from pneumoscope.predict import NOT_XRAY, Classifier, shipped_checkpoint

ROOT = Path(__file__).resolve().parents[1]
# Every sample image that ships inside scikit-image (the others need a download).
SAMPLES = ["astronaut", "binary_blobs", "brick", "camera", "cat", "checkerboard", "chelsea", "clock", "coffee",
           "coins", "colorwheel", "grass", "gravel", "horse", "hubble_deep_field", "immunohistochemistry", "logo",
           "microaneurysms", "moon", "page", "retina", "rocket", "shepp_logan_phantom", "text"]


def rates(records) -> tuple[int, int, int]:
    """(images, flagged not-a-chest-X-ray, with any warning including low confidence)."""
    return len(records), sum(r.reliable is False for r in records), sum(bool(r.warnings) for r in records)


def short(warning: str) -> str:
    return warning.removeprefix(NOT_XRAY).split(" (")[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = shipped_checkpoint("three")
    parser.add_argument("--checkpoint", default=str(default) if default.is_file() else None,
                        required=not default.is_file())
    parser.add_argument("--data", default=os.environ.get("PNEUMOSCOPE_DATA", ROOT.parent / "shared/data/chest_xray"))
    parser.add_argument("--manifest", default=None,
                        help="sample from this run manifest's test split instead (images the model never saw)")
    parser.add_argument("--n", type=int, default=300, help="random X-rays")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="also write the markdown here")
    args = parser.parse_args()

    classifier = Classifier.load(args.checkpoint)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # skimage's float-to-uint8 notes
        pictures = [getattr(skimage.data, name)() for name in SAMPLES]
    sample_records = list(classifier.predict_many(pictures, names=SAMPLES))
    if args.manifest:
        xrays, source = sorted(s.path for s in read_manifest(args.manifest) if s.split == "test"), "the run's test split"
    else:
        xrays, source = sorted(str(p) for p in Path(args.data, "train").rglob("*.jpeg")), "train/"
    xray_records = list(classifier.predict_many(random.Random(args.seed).sample(xrays, min(args.n, len(xrays)))))

    lines = [f"model `{classifier.name}` ({args.checkpoint}, {classifier.img_size} px, backend {classifier.backend})", "",
             "| input | images | flagged not a chest X-ray (`reliable: false`) | any warning (incl. low confidence) |",
             "|---|---:|---:|---:|"]
    for what, records in (("scikit-image sample pictures", sample_records),
                          (f"chest X-rays, {len(xray_records)} random from {source}", xray_records)):
        n, flagged, warned = rates(records)
        lines.append(f"| {what} | {n} | {flagged} ({flagged / n:.0%}) | {warned} ({warned / n:.0%}) |")
    lines += ["", "| picture | reliable | warnings |", "|---|---|---|"]
    for name, record in zip(SAMPLES, sample_records):
        lines.append(f"| {name} | {record.reliable} | {'; '.join(map(short, record.warnings)) or '-'} |")
    flagged_xrays = [r for r in xray_records if r.warnings]
    lines += ["", f"X-rays with a warning: {len(flagged_xrays)}"]
    lines += [f"- {Path(r.path).name}: {'; '.join(r.warnings)}" for r in flagged_xrays[:10]]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
