"""How often the input guard flags pictures on each runtime of a shipped bundle, end to end
through `Classifier.scores` (decoding, image checks, the network, the learned check). The guard's
statistics are fitted on one graph's features (guard_rates.py: ONNX Runtime fp32 and int8); the
OpenVINO runtimes reuse them on features computed in bf16 or f32, so their rates are measured here.

    python benchmarks/ood_set.py --out /work/ood
    python benchmarks/guard_backends.py --ood /work/ood --manifest M.csv [--model models/three]
        [--external ../shared/data/chest_xray_external] [--backends onnx openvino int8 openvino-int8]

Columns: the share of pictures with the learned check's warning, and the share with any "not a
chest X-ray" warning (image checks included), on the OOD `report` half, the manifest's internal
test split and the external group (used for selection).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pneumoscope.runtime.backends import describe_machine
from pneumoscope.data.datasets import read_dataset, read_manifest
from pneumoscope.runtime.guard import MESSAGE
from pneumoscope.runtime.classifier import NOT_XRAY, Classifier

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ood_set import read_ood_manifest  # noqa: E402

def flagged_shares(clf: Classifier, paths: list[str]) -> tuple[float, float]:
    """(share flagged by the learned check, share with any not-an-X-ray warning)."""
    warnings = clf.scores(paths).warnings
    learned = sum(any(w.startswith(NOT_XRAY + MESSAGE) for w in ws) for ws in warnings)  # guard.guard_warnings
    any_check = sum(any(w.startswith(NOT_XRAY) for w in ws) for ws in warnings)
    return learned / len(paths), any_check / len(paths)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ood", required=True, help="folder written by benchmarks/ood_set.py")
    parser.add_argument("--manifest", required=True, help="the model's run manifest (its internal test split)")
    parser.add_argument("--model", default="models/three")
    parser.add_argument("--external", default="../shared/data/chest_xray_external")
    parser.add_argument("--backends", nargs="+", default=["onnx", "openvino", "int8", "openvino-int8"])
    args = parser.parse_args(argv)

    groups = {
        "OOD report half": [r["path"] for r in read_ood_manifest(Path(args.ood) / "manifest.csv")
                            if r["split"] == "report"],
        "internal test": [s.path for s in read_manifest(args.manifest) if s.split == "test"],
        "external (used for selection)": [s.path for s in read_dataset(args.external).samples],
    }
    head = ["runtime"] + [f"{g} (n={len(p)}): learned / any" for g, p in groups.items()]
    lines = [f"Machine: {describe_machine()}; model {args.model}.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for backend in args.backends:
        try:
            clf = Classifier.load(args.model, backend=backend)
        except (FileNotFoundError, ValueError, RuntimeError) as err:  # no int8 graph, OpenVINO missing
            lines.append(f"| {backend} | not measured: {err} |")
            continue
        cells = [" / ".join(f"{share:.1%}" for share in flagged_shares(clf, paths)) for paths in groups.values()]
        lines.append(f"| {backend} ({clf.backend}) | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
