"""Ensembles: finished runs averaged in logit space into one model bundle (`pneumoscope ensemble`).

The members must have been trained on the same manifest (same patients in train/val/test), for the
same task and input size. The result is a run directory like a training run's, so `ship`, `runs`,
`compare` and `evaluate` take it as they take any other: its model is one `models.Ensemble` (one
weights file, one ONNX graph), its temperature fitted on the members' shared validation split (the
members' own temperatures are not used: averaging logits changes the scale), val and internal test
reports beside it.
"""
from __future__ import annotations

import os
import time

from .. import __version__
from ..bundle import ENSEMBLE, ModelMeta, load_bundle
from ..nets.build import load_network
from ..nets.registry import Ensemble, count_parameters
from ..runs.rundir import RunDir, model_name
from ..training.fit import TrainResult, git_commit, save_calibrated, validation_pixels
from .release import training_facts


def build_ensemble(run_dirs: list[str | os.PathLike], out: str | os.PathLike):
    """Averages the finished runs `run_dirs` into the run directory `out`; returns a train.TrainResult
    (its bundle and the val / internal test headlines)."""

    started = time.perf_counter()
    runs = [RunDir(path) for path in run_dirs]
    bundles = [load_bundle(run.finished_model()) for run in runs]
    first = bundles[0].meta
    check_compatible(runs, [b.meta for b in bundles])
    model = Ensemble([load_network(bundle) for bundle in bundles]).eval()
    samples = runs[0].samples()
    members = [member_facts(run, bundle.meta) for run, bundle in zip(runs, bundles)]
    meta = ModelMeta(
        name=model_name(out), task=first.task, classes=first.classes, arch=ENSEMBLE,
        members=tuple(b.meta.arch for b in bundles), img_size=first.img_size, mean=first.mean, std=first.std,
        preprocess=first.preprocess,
        params=count_parameters(model),
        provenance={"pneumoscope": __version__, "git_commit": git_commit(), "manifest_hash":
                    first.provenance.get("manifest_hash"), "members": members,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
    run = RunDir(out)
    run.path.mkdir(parents=True, exist_ok=True)
    run.write_status("running", fresh=True)
    run.write_manifest(samples)
    metrics = save_calibrated(model, meta, run, samples, *validation_pixels(samples, meta))
    wall = round(time.perf_counter() - started, 1)
    members_wall = sum(m["training"].get("wall_seconds") or 0 for m in members)
    run.write_env({"pneumoscope": __version__, "cpu_count": os.cpu_count(), "ensemble_seconds": wall})
    # wall_seconds: what the ensemble cost from scratch, the members' training included
    run.write_status("finished", wall_seconds=round(members_wall + wall, 1), ensemble_seconds=wall)
    return TrainResult(run.path, run.bundle, metrics)


def check_compatible(runs: list[RunDir], metas: list) -> None:
    """One-line errors for members that cannot be averaged or compared on one validation split
    (ensembles and soups)."""
    if len(metas) < 2:
        raise ValueError(f"averaging needs at least two runs, not {len(metas)}")
    first = metas[0]
    for run, meta in zip(runs, metas):
        if meta.members or meta.merge_outputs or meta.adaptation:
            raise ValueError(f"{run.path}: members must be plain trained models (not an ensemble, a merged "
                             "or an adapted one)")
        for field in ("task", "classes", "img_size", "mean", "std", "preprocess"):  # one input for all
            if getattr(meta, field) != getattr(first, field):
                raise ValueError(f"{run.path}: {field} {getattr(meta, field)} differs from {runs[0].path}'s "
                                 f"{getattr(first, field)}")
        if meta.provenance.get("manifest_hash") != first.provenance.get("manifest_hash"):
            raise ValueError(f"{run.path}: trained on another manifest than {runs[0].path}; members must share "
                             "their train/val/test patients")


def member_facts(run: RunDir, meta) -> dict:
    """What the card and provenance say of one member. A shipped bundle placed in a run directory
    brings its training facts in its provenance (`ship` put them there)."""

    facts = meta.provenance.get("training") or training_facts(run.path)
    return {"run": run.path.name, "arch": meta.arch, "seed": meta.provenance.get("seed"),
            "best_epoch": meta.provenance.get("best_epoch"), "temperature": meta.temperature,
            "train_config": meta.provenance.get("train_config", {}), "training": facts}
