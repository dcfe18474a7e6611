"""Refills examples/ with X-rays from the shipped models' internal test split (never trained on,
never used to choose a checkpoint), 10 per class, chosen by a fixed hash of the file name so the
choice does not depend on what the model answers.

    .venv/bin/pneumoscope split --data ../shared/data/chest_xray --out /tmp/manifest.csv   # seed 0
    .venv/bin/python scripts/pick_examples.py --manifest /tmp/manifest.csv

The manifest must be the one the shipped models were trained on (its hash is in
models/three/meta.json, provenance.manifest_hash); the script refuses another.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PER_CLASS = 10
FOLDER = {"NORMAL": "NORMAL", "BACTERIA": "PNEUMONIA", "VIRUS": "PNEUMONIA"}  # the Kermany layout


def pick(samples: list, per_class: int = PER_CLASS) -> list:
    """`per_class` test-split samples of each label, one per patient, in a fixed hash order."""
    chosen = []
    for label in FOLDER:
        patients, of_label = set(), []
        for sample in sorted((s for s in samples if s.split == "test" and s.label == label),
                             key=lambda s: hashlib.sha256(Path(s.path).name.encode()).hexdigest()):
            if sample.patient_id not in patients:
                patients.add(sample.patient_id)
                of_label.append(sample)
        chosen += of_label[:per_class]
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--out", default=str(ROOT / "examples"))
    args = parser.parse_args()
    from pneumoscope.data.datasets import manifest_hash, read_dataset  # here: keeps --help fast

    expected = json.loads((ROOT / "models" / "three" / "meta.json").read_text())["provenance"]["manifest_hash"]
    samples = read_dataset(args.manifest).samples
    if manifest_hash(samples) != expected:
        raise SystemExit(f"{args.manifest}: not the shipped models' split (hash {expected} expected)")
    out = Path(args.out)
    for folder in set(FOLDER.values()):
        shutil.rmtree(out / folder, ignore_errors=True)
        (out / folder).mkdir(parents=True)
    for sample in pick(samples):
        shutil.copyfile(sample.path, out / FOLDER[sample.label] / Path(sample.path).name)
    print(f"wrote {PER_CLASS} images per class from the internal test split to {out}")


if __name__ == "__main__":
    main()
