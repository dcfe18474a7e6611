"""Looking back at runs: the table of `pneumoscope runs` and the report of `pneumoscope compare`,
from each run's summary (`runs.rundir.summarize`). Reads run directories only: no training."""
from __future__ import annotations

import csv
import os
from pathlib import Path

from ..core.files import atomic_write
from ..evaluation import plots
from ..runs.rundir import RunDir, find_runs, summarize


# ---------------------------------------------------------------- `pneumoscope runs`
def list_runs(root: str | os.PathLike = "runs") -> list[dict]:
    """One summary per run under `root`, with its project and experiment (folder) names."""
    rows = []
    for run_dir in find_runs(root):
        parts = run_dir.relative_to(root).parts
        project, experiment = (parts[0], "/".join(parts[1:])) if len(parts) > 1 else ("", parts[0])
        rows.append({"project": project, "experiment": experiment, **summarize(run_dir)})
    return rows


RUNS_COLUMNS = (("project", "project"), ("experiment", "experiment"), ("status", "status"), ("arch", "arch"),
                ("task", "task"), ("img_size", "img"), ("epochs", "epochs"), ("val_acc", "val acc"),
                ("val_bacc", "val bal. acc"), ("test_acc", "test acc"), ("wall_seconds", "wall"))


def format_table(rows: list[dict], columns=RUNS_COLUMNS) -> str:
    cells = [[header for _, header in columns]]
    cells += [[_cell(key, row.get(key)) for key, _ in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in cells)


def _cell(key: str, value) -> str:
    if value is None or value == "":
        return "-"
    if key.endswith("seconds"):
        minutes, seconds = divmod(int(round(value)), 60)
        return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{seconds:02d}s"
    if isinstance(value, float):
        return f"{value:.3f}" if value < 10 else f"{value:.0f}"
    return str(value)


# ---------------------------------------------------------------- `pneumoscope compare`
def compare(run_dirs: list[str | os.PathLike], out: str | os.PathLike) -> Path:
    """comparison.csv, curves.png, train_time.png, peak_memory.png (process RAM), val_acc.png (the
    saved models' validation accuracy), gpu_memory.png (when a run trained on CUDA) and report.md for the given runs. Unfinished and
    failed runs are kept, labelled with their status."""

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    labels = _labels([Path(d) for d in run_dirs])
    summaries = [summarize(d) for d in run_dirs]
    # the flat numbers only: headline dicts and curves stay in the runs' own reports
    rows = [{"run": label, "path": s["dir"],
             **{k: v for k, v in s.items() if k != "dir" and not isinstance(v, (dict, list))}}
            for label, s in zip(labels, summaries)]
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with atomic_write(out / "comparison.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        writer.writerows(rows)
    tagged = [label if row["status"] == "finished" else f"{label} ({row['status']})"
              for label, row in zip(labels, rows)]
    plots.runs_curves_png([RunDir(d).epochs() for d in run_dirs], tagged, out / "curves.png")
    figures = {"train_time.png": ("train_seconds", "training time (s, sum of epochs)"),
               "peak_memory.png": ("peak_memory_mb", "peak process RAM (MB)"),
               "val_acc.png": ("val_acc", "validation accuracy of the saved model")}
    if any(row.get("cuda_peak_memory_mb") is not None for row in rows):
        figures["gpu_memory.png"] = ("cuda_peak_memory_mb", "peak GPU memory allocated (MB)")
    for name, (key, title) in figures.items():
        plots.bars_png(tagged, [row.get(key) for row in rows], title, out / name)
    with atomic_write(out / "report.md", "w") as handle:
        handle.write(_report(rows, figures))
    return out


def _labels(run_dirs: list[Path]) -> list[str]:
    """Run names, with their parent folder where two runs share a name (fold-0 of two CVs)."""
    names = [d.name for d in run_dirs]
    return [f"{d.parent.name}/{d.name}" if names.count(d.name) > 1 else d.name for d in run_dirs]


def _report(rows: list[dict], figures: dict) -> str:
    columns = (("run", "run"), ("status", "status"), ("arch", "arch"), ("task", "task"), ("img_size", "img"),
               ("epochs", "epochs"), ("params", "params"), ("trainable_params", "trainable"),
               ("val_acc", "val acc"), ("val_bacc", "val bal. acc"), ("test_acc", "internal test acc"),
               ("train_seconds", "train time"), ("wall_seconds", "wall time"), ("images_per_s", "images/s"),
               ("peak_memory_mb", "peak RAM MB"))
    if "gpu_memory.png" in figures:
        columns += (("cuda_peak_memory_mb", "peak GPU MB"),)
    lines = ["# Run comparison", "", f"{len(rows)} runs; numbers in `comparison.csv` (per-class recall too).",
             "A run that did not finish is listed with its status and its numbers so far.",
             "Validation figures are the saved model's (its val/ report), not the best epoch's of metrics.csv.", "",
             "| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(k, row.get(k)) for k, _ in columns) + " |" for row in rows]
    lines += ["", "## Training curves", "", "![train and val accuracy and loss](curves.png)", ""]
    for name, (_, title) in figures.items():
        lines += [f"## {title[0].upper()}{title[1:]}", "", f"![{title}]({name})", ""]
    return "\n".join(lines)
