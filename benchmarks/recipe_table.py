"""One row per training variant: internal validation, internal test and the external group
(half of the official test split, used for selection), side by side.

    python benchmarks/recipe_table.py RUN_DIR... [--ensemble NAME=RUN,RUN,...] [--out docs/recipes.md]

Every run must have been evaluated on the external group (`pneumoscope evaluate --data
../shared/data/chest_xray_external --checkpoint RUN/model --out RUN/external`). An ensemble row
averages its members' calibrated log-probabilities per image (the members' own prediction files).
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

from pneumoscope.backends import describe_machine
from pneumoscope.metrics import compute_metrics, headline
from pneumoscope.rundir import RunDir, summarize

SPLITS = ("val", "test", "external")


def run_row(path: str) -> dict:
    s = summarize(path)
    config = RunDir(path).raw_config()
    return {"variant": Path(path).name, "arch": s["arch"], "img": s["img_size"],
            "recipe": f"aug {config.get('aug_policy', 'standard')}, EMA {config.get('ema_decay')}",
            "wall_min": (s["wall_seconds"] or 0) / 60, "reports": s["reports"]}


def _predictions(run: str, split: str):
    with open(RunDir(run).report_dir(split) / "predictions.csv", newline="") as handle:
        rows = sorted(csv.DictReader(handle), key=lambda r: r["path"])
    classes = [k.removeprefix("p_") for k in rows[0] if k.startswith("p_")]
    y = np.array([classes.index(r["true"]) for r in rows])
    p = np.array([[float(r[f"p_{c}"]) for c in classes] for r in rows])
    return [r["path"] for r in rows], y, p, tuple(classes)


def ensemble_row(name: str, runs: list[str]) -> dict:
    reports = {}
    for split in SPLITS:
        members = [_predictions(run, split) for run in runs]
        if any(m[0] != members[0][0] for m in members):
            raise ValueError(f"{name}: the members were not evaluated on the same {split} images")
        z = np.mean([np.log(np.clip(m[2], 1e-9, 1)) for m in members], axis=0)
        p = np.exp(z - z.max(1, keepdims=True))
        reports[split] = headline(compute_metrics(members[0][1], p / p.sum(1, keepdims=True), members[0][3]))
    return {"variant": name, "arch": "ensemble", "img": "", "recipe": " + ".join(Path(r).name for r in runs),
            "wall_min": sum(run_row(r)["wall_min"] for r in runs), "reports": reports}


def markdown(rows: list[dict]) -> str:
    head = ("variant", "arch", "px", "recipe", "train min", "val acc", "internal test acc (95% CI)",
            "external acc (95% CI)", "external recall N / B / V", "ECE val / test / external")
    lines = [f"Machine: {describe_machine()}. External = half of the official test group, "
             "**used for selection** (optimistic by construction).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        rep = r["reports"]
        ci = lambda m: f"{m['accuracy']:.3f} ({m['accuracy_ci95'][0]:.3f}-{m['accuracy_ci95'][1]:.3f})"  # noqa: E731
        recall = " / ".join(f"{v:.3f}" for v in rep["external"]["recall"].values())
        eces = " / ".join(f"{rep[s]['ece']:.3f}" for s in SPLITS)
        lines.append(f"| {r['variant']} | {r['arch']} | {r['img']} | {r['recipe']} | {r['wall_min']:.1f} | "
                     f"{rep['val']['accuracy']:.3f} | {ci(rep['test'])} | {ci(rep['external'])} | {recall} | {eces} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--ensemble", action="append", default=[], metavar="NAME=RUN,RUN")
    parser.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    rows = [run_row(r) for r in args.runs]
    for spec in args.ensemble:
        name, members = spec.split("=", 1)
        rows.append(ensemble_row(name, members.split(",")))
    table = markdown(rows)
    print(table)
    if args.out:
        Path(args.out).write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
