"""One row per training variant: internal validation, internal test and the external group
(half of the official test split, used for selection), side by side.

    python benchmarks/recipe_table.py RUN_DIR... [--out docs/recipes.md]

Every run must have been evaluated on the external group (`pneumoscope evaluate --data
../shared/data/chest_xray_external --checkpoint RUN/model --out RUN/external --backend onnx`). An
ensemble is a run like the others (`pneumoscope ensemble --runs RUN... --out DIR`).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pneumoscope
from common import machine, parser, write_text

SPLITS = ("val", "test", "external")


def headline(metrics: dict) -> dict:
    """What the table quotes of a split's metrics.json: accuracy with its interval, ECE, recall per class."""
    return {"accuracy": metrics["accuracy"], "accuracy_ci95": metrics["accuracy_ci95"], "ece": metrics["ece"],
            "recall": {c: v["recall"] for c, v in metrics["per_class"].items()}}


def run_row(path: str) -> dict:
    """A training run's row; an ensemble run's (`pneumoscope ensemble`) names its members; a shipped
    bundle placed in a run directory (no config.yaml) is described by its provenance."""
    run = pneumoscope.RunDir(path)
    meta, config = run.model_meta(), run.raw_config()
    # a run that did not finish has only its epochs' time
    wall = run.status().get("wall_seconds") or sum(float(row["seconds"]) for row in run.epochs())
    reports = {split: headline(m) for split in SPLITS if (m := run.report(split))}
    if meta is not None and meta.members:
        described = " + ".join(m["run"] for m in meta.provenance["members"])
    elif meta is not None and meta.provenance.get("soup"):
        members = [m["run"] for m in meta.provenance["members"] if m.get("in_soup")]
        described = f"{meta.provenance['soup']} soup of " + " + ".join(members)
    else:
        if not config and meta is not None:
            config, wall = meta.provenance.get("train_config", {}), meta.provenance.get("training", {}).get("wall_seconds")
        described = recipe(config)
    return {"variant": Path(path).name, "arch": config.get("arch") or (meta and meta.arch),
            "img": config.get("img_size") or (meta and meta.img_size), "recipe": described,
            "wall_min": (wall or 0) / 60, "reports": reports}


def recipe(config: dict) -> str:
    """The options that differ between the variants, in a few words."""
    words = [f"aug {config.get('aug_policy', 'standard')}", f"EMA {config.get('ema_decay')}"]
    if config.get("mixup"):
        words.append(f"mixup {config['mixup']}")
    if config.get("freeze") not in (None, "2"):
        words.append(f"freeze {config['freeze']}")
    if config.get("head_init", "random") != "random":
        words.append(f"head init {config['head_init']}")
    if config.get("preprocess", "none") != "none":
        words.append(f"input step {config['preprocess']}")
    return ", ".join(words)


def markdown(rows: list[dict]) -> str:
    head = ("variant", "arch", "px", "recipe", "train min", "val acc", "internal test acc (95% CI)",
            "external acc (95% CI)", "external recall N / B / V", "ECE val / test / external")
    lines = [f"Machine: {machine()}. External = half of the official test group, "
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
    options = parser(__doc__)
    options.add_argument("runs", nargs="+")
    options.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = options.parse_args(argv)
    rows = [run_row(r) for r in args.runs]
    table = markdown(rows)
    print(table)
    if args.out:
        write_text(args.out, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
