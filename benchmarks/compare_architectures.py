"""The seed architectures side by side, on one patient split and one equal budget.

    .venv/bin/python benchmarks/compare_architectures.py                # trains, then writes the table
    .venv/bin/python benchmarks/compare_architectures.py --table-only   # rebuild the table from the runs

Trains each architecture with the same configuration (image size, epochs, pool of patients, seed;
EfficientNet-Lite0 from its ImageNet weights, the others from scratch) into runs/architectures/<arch>/,
compares them with `pneumoscope compare` (runs/architectures/comparison/) and replaces the section
between the markers in docs/benchmarks.md. A finished run is not trained again (delete it to redo).
Not a unit test: at the default budget this takes most of an hour on 2 cores.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from pneumoscope.core.config import TrainConfig
from pneumoscope.workflows.experiments import compare
from pneumoscope.runs.rundir import RunDir, summarize

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ["simple_cnn", "residual_vgg", "resnet18", "densenet121", "efficientnet_lite0"]
BEGIN, END = "<!-- architectures:begin -->", "<!-- architectures:end -->"


def run_all(args) -> list[Path]:
    from pneumoscope.training.fit import train

    runs = []
    for arch in args.archs:
        out = Path(args.root) / arch
        run = RunDir(out)
        if run.live_status() != "finished":
            train(TrainConfig(data=args.data, out=str(out), arch=arch, img_size=args.img_size, epochs=args.epochs,
                              max_images=args.max_images, patience=args.epochs, seed=0, ema_decay=args.ema_decay,
                              resume=run.last_checkpoint.exists()))
        runs.append(out)
    return runs


def table(runs: list[Path], args) -> str:
    lines = [BEGIN, "",
             f"`.venv/bin/python benchmarks/compare_architectures.py` — every model: {args.img_size} px, "
             f"{args.epochs} epochs, the same patient-grouped split of a {args.max_images}-image pool of the shared "
             "train+val data (seed 0), batch 32, AdamW one-cycle lr 1e-3, label smoothing 0.1, augmentation 1.0, "
             
             f"EMA decay {args.ema_decay}. Scores of the checkpoint with the best validation balanced accuracy; test = the internal "
             "patient-disjoint test split of that pool. Idle 2-core CPU.", "",
             "| arch | weights | params (M) | train images/s | wall (s) | val acc | test acc | recall NORMAL / BACTERIA / VIRUS (test) |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for run_dir in runs:
        row = summarize(run_dir)
        val = row["val_acc"]
        recall = " / ".join(f"{row.get(f'recall_{c}', float('nan')):.3f}" for c in ("NORMAL", "BACTERIA", "VIRUS"))
        weights = "ImageNet" if row["arch"] == "efficientnet_lite0" else "scratch"
        lines.append(f"| `{row['arch']}` | {weights} | {(row['params'] or 0) / 1e6:.2f} | {row['images_per_s'] or 0:.1f} "
                     f"| {row['wall_seconds'] or 0:.0f} | {val or 0:.3f} | {row['test_acc'] or 0:.3f} | {recall} |")
    lines += ["", "Curves, time and memory plots: `runs/architectures/comparison/report.md` (not in git).", "", END]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "chest_xray"))
    parser.add_argument("--root", default=str(ROOT / "runs" / "architectures"))
    parser.add_argument("--archs", nargs="+", default=ARCHS)
    parser.add_argument("--img-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--max-images", type=int, default=2400)
    # No weight averaging by default here: over a few hundred steps an EMA still remembers the
    # random initialisation of the scratch models and would understate them.
    parser.add_argument("--ema-decay", type=float, default=0.0)
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--doc", default=str(ROOT / "docs" / "benchmarks.md"))
    args = parser.parse_args()
    runs = [Path(args.root) / a for a in args.archs] if args.table_only else run_all(args)
    compare(runs, Path(args.root) / "comparison")
    doc = Path(args.doc)
    text = doc.read_text()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    doc.write_text(text[:start] + table(runs, args) + text[end:])
    print(table(runs, args))


if __name__ == "__main__":
    main()
