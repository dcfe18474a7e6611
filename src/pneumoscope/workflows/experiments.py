"""Experiments that train: patient-grouped cross-validation and Optuna hyperparameter search
(listing and comparing runs: `comparison`).

Nothing here keeps its own records or reads run files itself: a run is what `rundir.summarize`
says about it.
"""
from __future__ import annotations

import csv
import json
import warnings
from dataclasses import replace
from pathlib import Path

from ..core.files import atomic_write
from ..data.datasets import own_sides, patient_folds, read_dataset, warn_per_image_groups, write_manifest
from ..runs.rundir import RunDir, resolve, summarize
from ..training.environment import is_main_process, world_size
from ..training.fit import subsample_by_patient, train, with_dataset_task


# ---------------------------------------------------------------- cross-validation
def cross_validate(config, n_folds: int) -> dict:
    """K-fold cross-validation grouped by patient and stratified by class. The pool (the data, or a
    manifest's train and val rows: its test rows stay out; capped by max_images) is cut into
    folds written as manifests (<out>/folds/fold-<i>.csv); fold i is then an ordinary training on
    its manifest, in <out>/fold-<i>/, validated on the held-out fold (no internal test). Writes
    cv_summary.json/.csv. With resume, folds that already finished are kept."""

    if n_folds < 2:
        raise ValueError("--folds needs at least 2 folds")
    dataset = read_dataset(config.data, config.task, config.groups)
    config = with_dataset_task(config, dataset)  # the dataset's task names the folder
    root = resolve(config, world_size())
    manifests = write_fold_manifests(config, root, n_folds, dataset)
    for fold, manifest in enumerate(manifests):
        fold_dir = root / f"fold-{fold}"
        if config.resume and RunDir(fold_dir).live_status() == "finished":
            continue
        train(replace(config, data=str(manifest), out=str(fold_dir), max_images=None, evaluate_test=False))
    return write_cv_summary(root, n_folds) if is_main_process() else {}


def write_fold_manifests(config, root: Path, n_folds: int, dataset=None) -> list[Path]:
    """One manifest per fold: that fold's patients as val, the other folds as train. The pool is
    the data but its test side (a manifest's test rows, a tree's own test/ folder when it holds
    enough images: data.own_sides). Seeded, so every rank of a multi-process run writes the same
    files (atomically); a resumed run keeps its own."""

    paths = [root / "folds" / f"fold-{fold}.csv" for fold in range(n_folds)]
    if all(p.is_file() for p in paths):
        return paths
    dataset = dataset or read_dataset(config.data, config.task, config.groups)
    if dataset.is_manifest:
        pool = [s for s in dataset.samples if s.split != "test"]
    else:
        held = {path for path, side in own_sides(dataset, config.val_fraction, config.test_fraction)[0].items()
                if side == "test"}
        pool = [s for s in dataset.samples if s.path not in held]
    warn_per_image_groups(dataset)
    if config.max_images:
        pool = subsample_by_patient(pool, config.max_images, config.seed)
    for fold, held in enumerate(patient_folds(pool, n_folds, config.seed)):
        held = set(held.tolist())
        write_manifest([replace(s, split="val" if i in held else "train") for i, s in enumerate(pool)], paths[fold])
    return paths


def write_cv_summary(root: Path, n_folds: int) -> dict:
    """Per-fold and mean ± std (sample std, ddof=1) of the held-out fold's accuracy, balanced
    accuracy and per-class recall, from each fold's validation report (its best checkpoint)."""
    import numpy as np

    rows = []
    for fold in range(n_folds):
        run = RunDir(root / f"fold-{fold}")
        val = summarize(run.path)["reports"]["val"]
        patients = {s.patient_id for s in run.samples() if s.split == "val"}
        rows.append({"fold": fold, "n_val": val["n"], "val_patients": len(patients), "accuracy": val["accuracy"],
                     "balanced_accuracy": val["balanced_accuracy"],
                     **{f"recall_{c}": r for c, r in val["recall"].items()}})
    keys = [k for k in rows[0] if k not in ("fold", "n_val", "val_patients")]
    mean = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    std = {k: float(np.std([r[k] for r in rows], ddof=1)) for k in keys}
    summary = {"n_folds": n_folds, "dir": str(root), "folds": rows, "mean": mean, "std": std}
    with atomic_write(root / "cv_summary.json", "w") as handle:
        json.dump(summary, handle, indent=2)
    with atomic_write(root / "cv_summary.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows + [{"fold": "mean", **mean}, {"fold": "std", **std}])
    return summary


# ---------------------------------------------------------------- hyperparameter search


def tune(base, n_trials: int, study_name: str, img_sizes=(128, 160, 192)):
    """Optuna search maximizing the saved model's validation balanced accuracy. The study lives in
    <root>/<project>/optuna.db (base.root, base.project), so running the same command again adds
    trials to it; each trial is a normal run in <root>/<project>/<study>-trial-<n>/. Trials never
    evaluate the internal test split: choosing among them must not look at it."""
    import optuna


    project_dir = Path(base.root) / base.project
    project_dir.mkdir(parents=True, exist_ok=True)
    # the heartbeat lets a later session mark trials of a killed search as failed, not running forever
    with warnings.catch_warnings():
        # optuna notes that the heartbeat's interface may change: a note for this code (the tune test
        # runs it on the installed optuna), nothing a user of `tune` can act on
        warnings.filterwarnings("ignore", message="Argument ``heartbeat_interval`` is an experimental feature",
                                category=optuna.exceptions.ExperimentalWarning)
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
        return summarize(out)["val_bacc"]

    study.optimize(objective, n_trials=n_trials, catch=(ValueError, RuntimeError))
    return study
