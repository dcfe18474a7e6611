"""The seed architectures side by side, on one patient split and one equal budget.

    .venv/bin/python benchmarks/compare_architectures.py                # trains, then writes the table
    .venv/bin/python benchmarks/compare_architectures.py --table-only   # rebuild the table from the runs

Trains each architecture with `pneumoscope train` and the same configuration (image size, epochs,
pool of patients, seed; EfficientNet-Lite0 from its ImageNet weights, the others from scratch) into
runs/architectures/<arch>/, compares them with `pneumoscope compare` (runs/architectures/comparison/)
and replaces the section between the markers in docs/benchmarks.md with a table read from its
comparison.csv. A finished run is not trained again (delete it to redo); an interrupted one resumes.
Not a unit test: at the default budget this takes most of an hour on 2 cores.
"""
from __future__ import annotations

import csv
from pathlib import Path

import pneumoscope
from common import DATA, ROOT, parser, replace_section, run_cli

ARCHS = ["simple_cnn", "residual_vgg", "resnet18", "densenet121", "efficientnet_lite0"]
BEGIN, END = "<!-- architectures:begin -->", "<!-- architectures:end -->"


def run_all(args) -> list[Path]:
    runs = []
    for arch in args.archs:
        out = Path(args.root) / arch
        run = pneumoscope.RunDir(out)
        if run.live_status() != "finished":
            resume = ["--resume"] if run.last_checkpoint.exists() else []
            run_cli("train", "--data", args.data, "--out", str(out), "--arch", arch, "--img-size", str(args.img_size),
                    "--epochs", str(args.epochs), "--max-images", str(args.max_images), "--patience", str(args.epochs),
                    "--seed", "0", "--ema-decay", str(args.ema_decay), *resume, quiet=False)
        runs.append(out)
    return runs


def number(row: dict, key: str) -> float:
    """A comparison.csv cell as a number (0 where the run has none)."""
    return float(row.get(key) or 0)


def table(comparison: Path, args) -> str:
    with open(comparison, newline="") as handle:
        rows = list(csv.DictReader(handle))
    lines = [BEGIN, "",
             f"`.venv/bin/python benchmarks/compare_architectures.py` — every model: {args.img_size} px, "
             f"{args.epochs} epochs, the same patient-grouped split of a {args.max_images}-image pool of the shared "
             "train+val data (seed 0), batch 32, AdamW one-cycle lr 1e-3, label smoothing 0.1, augmentation 1.0, "
             f"EMA decay {args.ema_decay}. Scores of the checkpoint with the best validation balanced accuracy; test = the internal "
             "patient-disjoint test split of that pool. Idle 2-core CPU.", "",
             "| arch | weights | params (M) | train images/s | wall (s) | val acc | test acc | recall NORMAL / BACTERIA / VIRUS (test) |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        recall = " / ".join(f"{float(row.get(f'recall_{c}') or 'nan'):.3f}" for c in ("NORMAL", "BACTERIA", "VIRUS"))
        weights = "ImageNet" if row["arch"] == "efficientnet_lite0" else "scratch"
        lines.append(f"| `{row['arch']}` | {weights} | {number(row, 'params') / 1e6:.2f} | "
                     f"{number(row, 'images_per_s'):.1f} | {number(row, 'wall_seconds'):.0f} | {number(row, 'val_acc'):.3f} "
                     f"| {number(row, 'test_acc'):.3f} | {recall} |")
    lines += ["", "Curves, time and memory plots: `runs/architectures/comparison/report.md` (not in git).", "", END]
    return "\n".join(lines)


def main() -> None:
    options = parser(__doc__)
    options.add_argument("--data", default=str(DATA))
    options.add_argument("--root", default=str(ROOT / "runs" / "architectures"))
    options.add_argument("--archs", nargs="+", default=ARCHS)
    options.add_argument("--img-size", type=int, default=128)
    options.add_argument("--epochs", type=int, default=4)
    options.add_argument("--max-images", type=int, default=2400)
    # No weight averaging by default here: over a few hundred steps an EMA still remembers the
    # random initialisation of the scratch models and would understate them.
    options.add_argument("--ema-decay", type=float, default=0.0)
    options.add_argument("--table-only", action="store_true")
    options.add_argument("--doc", default=str(ROOT / "docs" / "benchmarks.md"))
    args = options.parse_args()
    runs = [Path(args.root) / a for a in args.archs] if args.table_only else run_all(args)
    comparison = Path(args.root) / "comparison"
    run_cli("compare", *map(str, runs), "--out", str(comparison))
    section = table(comparison / "comparison.csv", args)
    replace_section(args.doc, BEGIN, END, section, "## Architectures side by side")
    print(section)


if __name__ == "__main__":
    main()
