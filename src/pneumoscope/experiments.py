"""Experiments: runs/<project>/<experiment>/ run directories, listing and comparing them,
patient-grouped cross-validation and Optuna hyperparameter search.

Nothing here keeps its own records: a run is described by the files training writes
(config.yaml, status.json, metrics.csv, env.json, model.json, test/metrics.json).
"""
from __future__ import annotations

import csv
import json
import math
import os
import socket
import statistics
import time
from dataclasses import replace
from pathlib import Path

import yaml

RUNS_ROOT = "runs"
DEFAULT_PROJECT = "default"


# ---------------------------------------------------------------- where a run goes
def run_dir_for(root: str, project: str, name: str | None, task: str, arch: str, resume: bool = False) -> Path:
    """runs/<project>/<name>; without a name, `<task>-<arch>-<timestamp>`, or with --resume the
    newest run of that task and architecture in the project."""
    project_dir = Path(root) / project
    if name:
        return project_dir / name
    if resume:
        previous = sorted(project_dir.glob(f"{task}-{arch}-*/config.yaml"), key=lambda p: p.stat().st_mtime)
        if previous:
            return previous[-1].parent
    return project_dir / default_name(task, arch)


def default_name(task: str, arch: str) -> str:
    """Ranks started by torchrun/srun would not agree on a timestamp, so with several processes
    the name comes from the launcher's job id, or must be given."""
    from .train import world_size

    if world_size() <= 1:
        return f"{task}-{arch}-{time.strftime('%Y%m%d-%H%M%S')}"
    job = os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID", "none")
    if job == "none":
        raise ValueError("with several processes, give --name or --out so that every rank writes the same run")
    return f"{task}-{arch}-{job.split('-')[0]}"  # torchrun --standalone: a uuid; its first part will do


# ---------------------------------------------------------------- reading a run
def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def read_run(run_dir: str | os.PathLike) -> dict:
    """Everything a run directory says about itself; missing files read as empty."""
    from .train import read_metrics

    run_dir = Path(run_dir)
    config = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    status = _json(run_dir / "status.json")
    return {"dir": run_dir, "config": config or {}, "status": live_status(status), "status_json": status,
            "env": _json(run_dir / "env.json"), "meta": _json(run_dir / "model.json"),
            "test": _json(run_dir / "test" / "metrics.json"), "epochs": read_metrics(run_dir / "metrics.csv")}


def live_status(status: dict) -> str:
    """The recorded status, except that a "running" run whose process is gone (killed, machine
    crash) is "interrupted". Only checkable on the host that runs it; elsewhere it stays "running"."""
    state = status.get("status", "unknown")
    pid = status.get("pid")
    if state == "running" and pid and status.get("hostname") == socket.gethostname() and not _alive(pid):
        return "interrupted"
    return state


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, belongs to someone else
        return True
    try:  # a killed process that its parent has not reaped yet is a zombie, not a live run
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _column(rows: list[dict], key: str) -> list[float]:
    values = [float(r[key]) for r in rows if r.get(key) not in (None, "")]
    return [v for v in values if math.isfinite(v)]


def summarize(run: dict) -> dict:
    """One flat row per run, for tables and comparison.csv. Per-class recall comes from the
    internal test split when it was evaluated, else from validation (recall_split says which)."""
    config, meta, test, rows = run["config"], run["meta"], run["test"], run["epochs"]
    if test.get("per_class"):
        recall, recall_split = {c: v["recall"] for c, v in test["per_class"].items()}, "test"
    else:
        recall = meta.get("metrics", {}).get("val", {}).get("recall", {})
        recall_split = "val" if recall else ""
    seconds, speed = _column(rows, "seconds"), _column(rows, "images_per_s")
    return {
        "status": run["status"], "arch": config.get("arch"), "task": config.get("task"),
        "img_size": config.get("img_size"), "epochs": len(rows), "params": meta.get("params"),
        "best_val_acc": max(_column(rows, "val_acc"), default=None),
        "best_val_bacc": max(_column(rows, "val_bacc"), default=None),
        "test_acc": test.get("accuracy"),
        **{f"recall_{c}": v for c, v in recall.items()}, "recall_split": recall_split,
        "train_seconds": round(sum(seconds), 1) if seconds else None,  # the epochs (train + val) only
        # the whole run, with setup and final evaluation; a run that did not finish has only its epochs
        "wall_seconds": run["status_json"].get("wall_seconds") or (round(sum(seconds), 1) if seconds else None),
        "images_per_s": statistics.median(speed) if speed else None,  # median: epoch 0 includes warm-up
        "peak_memory_mb": run["env"].get("peak_memory_mb"),
    }


# ---------------------------------------------------------------- `pneumoscope runs`
def find_runs(root: str | os.PathLike) -> list[Path]:
    """Every run directory (one with a status.json) under `root`, cross-validation folds included."""
    return sorted(p.parent for p in Path(root).rglob("status.json"))


def list_runs(root: str | os.PathLike = RUNS_ROOT) -> list[dict]:
    rows = []
    for run_dir in find_runs(root):
        parts = run_dir.relative_to(root).parts
        project, experiment = (parts[0], "/".join(parts[1:])) if len(parts) > 1 else ("", parts[0])
        rows.append({"project": project, "experiment": experiment, **summarize(read_run(run_dir))})
    return rows


RUNS_COLUMNS = (("project", "project"), ("experiment", "experiment"), ("status", "status"), ("arch", "arch"),
                ("task", "task"), ("img_size", "img"), ("epochs", "epochs"), ("best_val_acc", "best val acc"),
                ("test_acc", "test acc"), ("wall_seconds", "wall"))


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
    """comparison.csv, curves.png, train_time.png, peak_memory.png, best_val_acc.png and report.md
    for the given runs. Unfinished and failed runs are kept, labelled with their status."""
    from .data import atomic_write

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [read_run(d) for d in run_dirs]
    labels = _labels([Path(d) for d in run_dirs])
    rows = [{"run": label, "path": str(run["dir"]), **summarize(run)} for label, run in zip(labels, runs)]
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with atomic_write(out / "comparison.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        writer.writerows(rows)
    tagged = [label if row["status"] == "finished" else f"{label} ({row['status']})" for label, row in zip(labels, rows)]
    _plot_curves(runs, tagged, out / "curves.png")
    figures = {"train_time.png": ("train_seconds", "training time (s, sum of epochs)"),
               "peak_memory.png": ("peak_memory_mb", "peak memory (MB)"),
               "best_val_acc.png": ("best_val_acc", "best validation accuracy")}
    for name, (key, title) in figures.items():
        _plot_bars(tagged, [row.get(key) for row in rows], title, out / name)
    with atomic_write(out / "report.md", "w") as handle:
        handle.write(_report(rows, figures))
    return out


def _labels(run_dirs: list[Path]) -> list[str]:
    """Run names, with their parent folder where two runs share a name (fold-0 of two CVs)."""
    names = [d.name for d in run_dirs]
    return [f"{d.parent.name}/{d.name}" if names.count(d.name) > 1 else d.name for d in run_dirs]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    from .data import atomic_write

    fig.tight_layout()
    with atomic_write(path) as handle:
        fig.savefig(handle, format="png", dpi=100)
    _pyplot().close(fig)


def _plot_curves(runs: list[dict], labels: list[str], path: Path) -> None:
    """Train and val accuracy and loss of all runs overlaid; runs of any length, or none."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex=True)
    for key, ax in zip(("train_acc", "val_acc", "train_loss", "val_loss"), axes.flat):
        for run, label in zip(runs, labels):
            rows = run["epochs"]
            values = [float(r[key]) if r.get(key) not in (None, "") else math.nan for r in rows]
            ax.plot([int(r["epoch"]) for r in rows], values, "-o", ms=3, label=label)
        ax.set_title(key.replace("_", " ").replace("acc", "accuracy"))
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="lower center", ncol=min(4, len(labels)), fontsize=8)
    fig.subplots_adjust(bottom=0.15)
    _save(fig, path)


def _plot_bars(labels: list[str], values: list, title: str, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.0 * len(labels) + 2), 4))
    heights = [v if v is not None else 0 for v in values]
    ax.bar(range(len(labels)), heights, color="tab:blue")
    for i, (height, value) in enumerate(zip(heights, values)):  # n/a: a failed run has no number
        ax.text(i, height, "n/a" if value is None else f"{value:.3g}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)


def _report(rows: list[dict], figures: dict) -> str:
    columns = (("run", "run"), ("status", "status"), ("arch", "arch"), ("task", "task"), ("img_size", "img"),
               ("epochs", "epochs"), ("params", "params"), ("best_val_acc", "best val acc"),
               ("best_val_bacc", "best val bal. acc"), ("test_acc", "internal test acc"),
               ("train_seconds", "train time"), ("wall_seconds", "wall time"), ("images_per_s", "images/s"), ("peak_memory_mb", "peak MB"))
    lines = ["# Run comparison", "", f"{len(rows)} runs; numbers in `comparison.csv` (per-class recall too).",
             "A run that did not finish is listed with its status and its numbers so far.", "",
             "| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(k, row.get(k)) for k, _ in columns) + " |" for row in rows]
    lines += ["", "## Training curves", "", "![train and val accuracy and loss](curves.png)", ""]
    for name, (_, title) in figures.items():
        lines += [f"## {title[0].upper()}{title[1:]}", "", f"![{title}]({name})", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- cross-validation
def cross_validate(config, n_folds: int) -> dict:
    """K-fold cross-validation grouped by patient and stratified by class: fold i is a normal run
    in <out>/fold-i/ validated on held-out fold i (no internal test). Writes cv_summary.json/.csv.
    With --resume, folds that already finished are kept."""
    from .train import is_main_process, train

    if n_folds < 2:
        raise ValueError("--folds needs at least 2 folds")
    root = Path(config.out)
    for fold in range(n_folds):
        fold_dir = root / f"fold-{fold}"
        if config.resume and read_run(fold_dir)["status"] == "finished":
            continue
        train(replace(config, out=str(fold_dir), evaluate_test=False,
                      extra={**config.extra, "cv_fold": fold, "cv_folds": n_folds}))
    return write_cv_summary(root, n_folds) if is_main_process() else {}


def write_cv_summary(root: Path, n_folds: int) -> dict:
    """Per-fold and mean ± std (sample std, ddof=1) of the held-out fold's accuracy, balanced
    accuracy and per-class recall, from each fold's model.json (its best checkpoint)."""
    import numpy as np

    from .data import atomic_write, read_manifest

    rows = []
    for fold in range(n_folds):
        fold_dir = root / f"fold-{fold}"
        val = _json(fold_dir / "model.json")["metrics"]["val"]
        patients = {s.patient_id for s in read_manifest(fold_dir / "manifest.csv") if s.split == "val"}
        rows.append({"fold": fold, "n_val": val["n"], "val_patients": len(patients), "accuracy": val["accuracy"],
                     "balanced_accuracy": val["balanced_accuracy"],
                     **{f"recall_{c}": r for c, r in val["recall"].items()}})
    keys = [k for k in rows[0] if k not in ("fold", "n_val", "val_patients")]
    mean = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    std = {k: float(np.std([r[k] for r in rows], ddof=1)) for k in keys}
    summary = {"n_folds": n_folds, "folds": rows, "mean": mean, "std": std}
    with atomic_write(root / "cv_summary.json", "w") as handle:
        json.dump(summary, handle, indent=2)
    with atomic_write(root / "cv_summary.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows + [{"fold": "mean", **mean}, {"fold": "std", **std}])
    return summary


# ---------------------------------------------------------------- hyperparameter search
def tune(base, n_trials: int, study_name: str, project: str = DEFAULT_PROJECT, root: str = RUNS_ROOT,
         img_sizes=(128, 160, 192)):
    """Optuna search maximizing the best validation balanced accuracy. The study lives in
    <root>/<project>/optuna.db, so running the same command again adds trials to it; each trial
    is a normal run in <root>/<project>/<study>-trial-<n>/. Trials never evaluate the internal
    test split: choosing among them must not look at it."""
    import optuna

    from .train import train

    project_dir = Path(root) / project
    project_dir.mkdir(parents=True, exist_ok=True)
    # the heartbeat lets a later session mark trials of a killed search as failed, not running forever
    storage = optuna.storages.RDBStorage(f"sqlite:///{(project_dir / 'optuna.db').resolve()}",
                                         heartbeat_interval=60, grace_period=180)
    study = optuna.create_study(study_name=study_name, storage=storage, direction="maximize", load_if_exists=True)
    # seeded for reproducibility, offset so a resumed study does not replay its first suggestions
    study.sampler = optuna.samplers.TPESampler(seed=base.seed + len(study.trials))

    def objective(trial) -> float:
        out = project_dir / f"{study_name}-trial-{trial.number}"
        trial.set_user_attr("run_dir", str(out))
        config = replace(
            base, out=str(out), resume=False, evaluate_test=False,
            lr=trial.suggest_float("lr", 1e-4, 1e-2, log=True),
            aug=trial.suggest_float("aug", 0.0, 1.5),
            img_size=trial.suggest_categorical("img_size", list(img_sizes)),
            label_smoothing=trial.suggest_float("label_smoothing", 0.0, 0.2),
            class_weight_power=trial.suggest_float("class_weight_power", 0.0, 1.0))
        train(config)
        return summarize(read_run(out))["best_val_bacc"]

    study.optimize(objective, n_trials=n_trials, catch=(ValueError, RuntimeError))
    return study
