"""The run directory: the one module that writes and reads a training run's files.

    RUN/config.yaml     the resolved TrainConfig (also usable as `train --config`)
    RUN/manifest.csv    the patient-grouped split actually used
    RUN/status.json     running / finished / failed / interrupted, with timings, pid and hostname
    RUN/metrics.csv     one row per epoch: losses, accuracies, learning rate, seconds, images/s
    RUN/curves.png      loss and accuracy vs epoch, train vs val
    RUN/env.json        versions, seed, git commit, wall time, peak RAM (and GPU memory on CUDA), world size
    RUN/checkpoints/    Lightning's last.ckpt (for --resume), best.ckpt, epoch-N.ckpt (--keep-epochs)
    RUN/model/          the model bundle (artifact.py), calibrated, written once at the end
    RUN/val/, RUN/test/ evaluation reports (evaluate.write_report); RUN/external/ when evaluated there
    RUN/logs/, RUN/mlruns/   Lightning's loggers (CSV; TensorBoard and MLflow when installed)

Every file is written by atomic_write (a temporary renamed into place); the temporaries a killed
process leaves behind are deleted when the run starts or resumes (`remove_stale_temporaries`).

`summarize` is the one summary of a run that `runs`, `compare`,
cross-validation, tuning, `ship` and the benchmarks read.
"""
from __future__ import annotations

import csv
import json
import math
import os
import socket
import statistics
import time
from collections import Counter, defaultdict
from pathlib import Path

from ..core.config import TrainConfig, options_loader
from ..core.files import atomic_write, remove_stale_temporaries

EPOCH_COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_bacc", "val_n", "lr", "seconds",
                 "images_per_s")
REPORTS = {"val": "val", "internal_test": "test", "test": "test", "external": "external"}


class RunDir:
    """A run directory by path; nothing is read until asked for."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # -------------------------------------------------------------- where things are
    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / "last.ckpt"

    @property
    def bundle(self) -> Path:
        """Where this run's model bundle is (or will be) written."""
        return self.path / "model"

    def model_path(self) -> Path | None:
        """The run's model bundle, for `bundle.load_bundle`; None when the run has not finished."""
        return self.bundle if self.bundle.exists() else None

    def finished_model(self) -> Path:
        """`model_path`, or a one-line FileNotFoundError naming the run when it has none."""
        path = self.model_path()
        if path is None:
            raise FileNotFoundError(f"{self.path}: no model yet; is the run finished?")
        return path

    def report_dir(self, split: str) -> Path:
        """The evaluation report of a split: val/, test/ (the internal test split) or external/."""
        return self.path / REPORTS[split]

    def epoch_checkpoints(self) -> list[tuple[int, Path]]:
        """(epoch, path) of the checkpoints --keep-epochs kept, in epoch order."""
        kept = [(int(p.stem.split("-")[1]), p) for p in self.checkpoints.glob("epoch-*.ckpt")]
        return sorted(kept)

    # -------------------------------------------------------------- writing
    def remove_stale_temporaries(self) -> list[Path]:
        """Deletes what a killed run left half-written (atomic_write's temporaries) in the folders a
        training run writes; reports of other commands (external/) are left alone."""
        folders = (self.path, self.bundle, self.report_dir("val"), self.report_dir("test"), self.path / "logs")
        return [path for folder in folders for path in remove_stale_temporaries(folder)]

    def write_config(self, config: TrainConfig) -> None:
        import yaml

        with atomic_write(self.path / "config.yaml", "w") as handle:
            yaml.safe_dump(config.to_dict(), handle, sort_keys=False)

    def write_manifest(self, samples) -> None:
        from ..data.datasets import write_manifest

        write_manifest(samples, self.path / "manifest.csv")

    def write_status(self, status: str, fresh: bool = False, **extra) -> None:
        """Updates status.json (`fresh`: starts it anew, dropping what an earlier attempt left).
        "running" also records when it started and the process (pid, hostname): `live_status` tells a
        run whose process died from one still going."""
        current = {} if fresh else self.status()
        if status == "running":
            extra = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "pid": os.getpid(),
                     "hostname": socket.gethostname(), **extra}
        current.update(status=status, updated=time.strftime("%Y-%m-%dT%H:%M:%S"), **extra)
        with atomic_write(self.path / "status.json", "w") as handle:
            json.dump(current, handle, indent=2)

    def write_epoch(self, row: dict) -> None:
        """Records one epoch in metrics.csv (replacing that epoch and any later one, as a resumed run
        repeats them) and redraws curves.png."""
        from ..evaluation.plots import training_curves_png

        rows = [r for r in self.epochs() if int(r["epoch"]) < int(row["epoch"])] + [row]
        with atomic_write(self.path / "metrics.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, EPOCH_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        training_curves_png(rows, self.path / "curves.png")

    def write_env(self, env: dict) -> None:
        with atomic_write(self.path / "env.json", "w") as handle:
            json.dump(env, handle, indent=2)

    # -------------------------------------------------------------- reading
    def config(self) -> TrainConfig | None:
        """The saved configuration, or None when there is none yet."""
        raw = self.raw_config()
        return TrainConfig.from_dict(raw, str(self.path / "config.yaml")) if raw else None

    def raw_config(self) -> dict:
        """config.yaml as written (also by older versions); {} when missing."""
        import yaml

        path = self.path / "config.yaml"
        # the loader of `train --config` files: plain data, no alias that repeats a list or mapping
        return (yaml.load(path.read_bytes(), Loader=options_loader()) or {}) if path.is_file() else {}

    def samples(self):
        """The run's split (manifest.csv), read as the run read its data (data.read_dataset)."""
        from ..data.datasets import read_dataset

        return read_dataset(self.path / "manifest.csv", self.raw_config().get("task")).samples

    def status(self) -> dict:
        """status.json as recorded ({} when missing)."""
        return _json(self.path / "status.json")

    def live_status(self) -> str:
        """The recorded status, except that a "running" run whose process is gone (killed, machine
        crash) is "interrupted". Only checkable on the host that runs it; elsewhere it stays "running"."""
        status = self.status()
        state = status.get("status", "unknown")
        pid = status.get("pid")
        if state == "running" and pid and status.get("hostname") == socket.gethostname() and not _alive(pid):
            return "interrupted"
        return state

    def epochs(self) -> list[dict]:
        """metrics.csv rows ([] before the first epoch)."""
        path = self.path / "metrics.csv"
        if not path.is_file():
            return []
        with open(path, newline="") as handle:
            return list(csv.DictReader(handle))

    def env(self) -> dict:
        return _json(self.path / "env.json")

    def report(self, split: str) -> dict:
        """metrics.json of a split's evaluation report ({} when it was not evaluated)."""
        return _json(self.report_dir(split) / "metrics.json")

    def model_meta(self):
        """The model's ModelMeta (read without hashing the weights), or None before the run has one."""
        from ..bundle import META, ModelMeta

        meta = self.bundle / META
        if meta.is_file():  # read as such: listing runs needs no weights hashed
            return ModelMeta.from_json(json.loads(meta.read_text()), str(meta))
        return None


def checkpoint_weights(path: str | os.PathLike) -> tuple[dict, int | None]:
    """The network's state dict and epoch in a Lightning checkpoint of a run (best, last, epoch-N:
    the EMA average when EMA was on)."""
    import torch

    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    return state, checkpoint.get("epoch")


def checkpoint_epoch(path: str | os.PathLike) -> int:
    """The epoch a Lightning checkpoint was saved at (memory-mapped: the weights are not read)."""
    import torch

    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)["epoch"]


# ---------------------------------------------------------------- what a run's model is called and trained on
def model_name(run_path: str | os.PathLike, project: str | None = None) -> str:
    """A run's model's name: the run's own (--name, or its directory's), under its --project when
    that is not the default one. `pneumoscope-...` names are the shipped models' (release.shipped_name)."""
    name = Path(run_path).resolve().name
    return name if project in (None, "", "default") else f"{project}/{name}"


def data_facts(samples, source: str | None = None) -> dict:
    """What a model was trained and measured on, for its provenance (the model card, the web page):
    images, patients and classes per split of the run's manifest, where the data came from, and the
    patients whose images carry more than one label (Kermany's personN ids with both a bacterial and
    a viral file), by label pair."""
    splits = sorted({s.split for s in samples}, key=lambda s: ("train", "val", "test").index(s)
                    if s in ("train", "val", "test") else 3)
    per = {split: [s for s in samples if s.split == split] for split in splits}
    return {"source": source, "images": len(samples),
            "splits": {split: {"images": len(chosen), "patients": len({s.patient_id for s in chosen}),
                               "classes": {label: sum(s.label == label for s in chosen)
                                           for label in sorted({s.label for s in chosen})}}
                       for split, chosen in per.items()},
            "patients_across_labels": patients_across_labels(samples)}


def patients_across_labels(samples) -> list[dict]:
    """[{"labels": [...], "patients": n}] for each set of labels that some patients' images span."""
    labels = defaultdict(set)
    for s in samples:
        labels[s.patient_id].add(s.label)
    spans = Counter(tuple(sorted(held)) for held in labels.values() if len(held) > 1)
    return [{"labels": list(held), "patients": n} for held, n in sorted(spans.items())]


def recorded_data(meta, metrics: dict) -> dict | None:
    """A bundle's `data_facts`: from its provenance, else (a bundle shipped before provenance held
    them) counted from what it recorded otherwise: the training images its input guard was fitted on
    and the val / internal test images its metrics.json measured. None when neither is there."""
    facts = meta.provenance.get("data")
    if facts:
        return facts
    fitted = next((g.get("fitted_on", {}) for g in (meta.guard or {}).values()), {})
    splits = {"train": fitted.get("train")}
    splits.update({split: (metrics.get(name) or {}).get("n") for split, name in (("val", "val"), ("test", "internal_test"))})
    splits = {split: {"images": n} for split, n in splits.items() if isinstance(n, int) and n > 0}
    return {"source": None, "images": sum(f["images"] for f in splits.values()), "splits": splits} if splits else None


def describe_data(facts: dict | None) -> str | None:
    """`data_facts` in words: "200 images (train 140, val 20, internal test 40; 2 labels) from DATA"."""
    if not facts or not facts.get("images"):
        return None
    words = {"test": "internal test"}
    parts = ", ".join(f"{words.get(split, split)} {f['images']:,}" for split, f in facts.get("splits", {}).items())
    classes = {c for f in facts.get("splits", {}).values() for c in f.get("classes", {})}
    labels = f"; {len(classes)} labels" if classes else ""
    source = f" from {facts['source']}" if facts.get("source") else ""
    return f"{facts['images']:,} images ({parts}{labels}){source}"


# ---------------------------------------------------------------- where a run goes
def resolve(config: TrainConfig) -> Path:
    """config.out; else <root>/<project>/<name>; without a name `<task>-<arch>-<timestamp>` (task
    `folders` for a dataset that is not Kermany's), or with resume the newest run of that task (any
    task when none is given) and architecture in the project."""
    from ..core.labels import FOLDERS

    if config.out:
        return Path(config.out)
    project_dir = Path(config.root) / config.project
    if config.name:
        return project_dir / config.name
    if config.resume:
        previous = sorted(project_dir.glob(f"{config.task or '*'}-{config.arch}-*/config.yaml"),
                          key=lambda p: p.stat().st_mtime)
        if previous:
            return previous[-1].parent
    return project_dir / default_name(config.task or FOLDERS, config.arch)


def default_name(task: str, arch: str) -> str:
    """Ranks started by torchrun/srun would not agree on a timestamp, so with several processes
    the name comes from the launcher's job id, or must be given."""
    from ..training.fit import world_size

    if world_size() <= 1:
        return f"{task}-{arch}-{time.strftime('%Y%m%d-%H%M%S')}"
    job = os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID", "none")
    if job == "none":
        raise ValueError("with several processes, give --name or --out so that every rank writes the same run")
    return f"{task}-{arch}-{job.split('-')[0]}"  # torchrun --standalone: a uuid; its first part will do


def find_runs(root: str | os.PathLike) -> list[Path]:
    """Every run directory (one with a status.json) under `root`, cross-validation folds included."""
    return sorted(p.parent for p in Path(root).rglob("status.json"))


# ---------------------------------------------------------------- the summary
def summarize(path: str | os.PathLike) -> dict:
    """One run in one dict: flat numbers for tables and comparison.csv, plus the headline metrics of
    each evaluated split ("val", "test", "external": metrics.headline) and the time-to-accuracy
    `curve`. Per-class recall (recall_<class>) comes from the internal test split when it was
    evaluated, else from validation (recall_split says which). Missing files read as empty."""
    from ..evaluation.metrics import headline

    run = RunDir(path)
    config, rows, env, status = run.raw_config(), run.epochs(), run.env(), run.status()
    reports = {split: headline(m) for split in ("val", "test", "external") if (m := run.report(split))}
    meta = run.model_meta()
    recall_split = "test" if "test" in reports else "val" if "val" in reports else ""
    recall = reports[recall_split]["recall"] if recall_split else {}
    seconds, speed = _column(rows, "seconds"), _column(rows, "images_per_s")
    return {
        # an ensemble run has no config.yaml: its model says what it is
        "dir": str(run.path), "status": run.live_status(), "arch": config.get("arch") or (meta and meta.arch),
        "task": config.get("task") or (meta and meta.task), "img_size": config.get("img_size") or (meta and meta.img_size),
        "seed": config.get("seed"), "epochs": len(rows),
        "params": meta.params if meta else None,
        "trainable_params": meta.provenance.get("trainable_params") if meta else None,  # the ones not frozen
        "best_epoch": meta.provenance.get("best_epoch") if meta else None,
        # the saved model's (its val report), not the best of metrics.csv's epochs: the model kept is
        # the epoch of best balanced accuracy, whose plain accuracy may be far from the best epoch's
        "val_acc": reports.get("val", {}).get("accuracy"),
        "val_bacc": reports.get("val", {}).get("balanced_accuracy"),
        "test_acc": reports.get("test", {}).get("accuracy"),
        "external_acc": reports.get("external", {}).get("accuracy"),
        **{f"recall_{c}": v for c, v in recall.items()}, "recall_split": recall_split,
        "train_seconds": round(sum(seconds), 1) if seconds else None,  # the epochs (train + val) only
        # the whole run, with setup and final evaluation; a run that did not finish has only its epochs
        "wall_seconds": status.get("wall_seconds") or (round(sum(seconds), 1) if seconds else None),
        "images_per_s": statistics.median(speed) if speed else None,  # median: epoch 0 includes warm-up
        "peak_memory_mb": env.get("peak_memory_mb"),  # the process's RAM (peak RSS)
        "cuda_peak_memory_mb": env.get("cuda_peak_memory_mb"),  # on a GPU: what PyTorch allocated there at most
        "cpu_count": env.get("cpu_count"),
        "reports": reports, "curve": _curve(rows),
    }


def _curve(rows: list[dict]) -> list[dict]:
    """Validation accuracy after each epoch against the training seconds spent so far."""
    elapsed, curve = 0.0, []
    for row in rows:
        elapsed += float(row["seconds"])
        curve.append({"epoch": int(row["epoch"]), "train_seconds": round(elapsed, 1),
                      "val_acc": round(float(row["val_acc"]), 4), "val_bacc": round(float(row["val_bacc"]), 4)})
    return curve


def _column(rows: list[dict], key: str) -> list[float]:
    values = [float(r[key]) for r in rows if r.get(key) not in (None, "")]
    return [v for v in values if math.isfinite(v)]


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


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
