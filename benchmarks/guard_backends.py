"""How often the input guard flags pictures on each runtime of a shipped bundle, end to end
through `Classifier.scores` (decoding, image checks, the network, the learned check). The guard's
statistics are fitted on one graph's features (guard_rates.py: ONNX Runtime fp32 and int8); the
OpenVINO runtimes reuse them on features computed in bf16 or f32, so their rates are measured here.

    python benchmarks/ood_set.py --out /work/ood
    python benchmarks/guard_backends.py --ood /work/ood --manifest M.csv [--model BUNDLE]
        [--external ../shared/data/chest_xray_external] [--backends onnx openvino int8 openvino-int8]

Columns: the share of pictures with the learned check's warning, and the share with any "not a
chest X-ray" warning (image checks included), on the OOD `report` half, the manifest's internal
test split and the external group (used for selection).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pneumoscope
from common import add_external, add_model, machine, parser, read_ood_manifest


def flagged_shares(clf, paths: list[str]) -> tuple[float, float]:
    """(share flagged by the learned check, share with any not-an-X-ray warning: `reliable: false`)."""
    scores = clf.scores(paths)
    unreliable = sum(not r.reliable for r in clf.records(scores) if r.status == "ok")
    learned = 0
    if clf.guard is not None:  # the check a record's guard warning comes from: its score above the threshold
        learned = int((pneumoscope.guard_scores(scores.features, clf.guard, scores.logits) > clf.guard.threshold).sum())
    return learned / len(paths), unreliable / len(paths)


def main(argv=None) -> int:
    options = parser(__doc__)
    options.add_argument("--ood", required=True, type=Path, help="folder written by benchmarks/ood_set.py")
    options.add_argument("--manifest", required=True, help="the model's run manifest (its internal test split)")
    add_model(options)
    add_external(options)
    options.add_argument("--backends", nargs="+", default=["onnx", "openvino", "int8", "openvino-int8"])
    args = options.parse_args(argv)

    groups = {
        "OOD report half": [r["path"] for r in read_ood_manifest(args.ood / "manifest.csv") if r["split"] == "report"],
        "internal test": [s.path for s in pneumoscope.read_dataset(args.manifest).select("test")],
        "external (used for selection)": [s.path for s in pneumoscope.read_dataset(args.external).samples],
    }
    head = ["runtime"] + [f"{g} (n={len(p)}): learned / any" for g, p in groups.items()]
    lines = [f"Machine: {machine()}; model {args.model or 'shipped 3-class'}.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for backend in args.backends:
        try:
            clf = pneumoscope.Classifier.load(args.model, backend=backend)
        except (FileNotFoundError, ValueError, RuntimeError) as err:  # no int8 graph, OpenVINO missing
            lines.append(f"| {backend} | not measured: {err} |")
            continue
        cells = [" / ".join(f"{share:.1%}" for share in flagged_shares(clf, paths)) for paths in groups.values()]
        lines.append(f"| {backend} ({clf.backend}) | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
