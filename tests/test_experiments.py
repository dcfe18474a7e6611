"""Experiments: project/name run directories, `runs`, `compare`, cross-validation, two-process
DDP training and the resumable Optuna search. Every model here is simple_cnn at 32 px for 1-2
epochs on the fixture images: seconds each. (Where a run goes, its status and old runs without a
bundle: test_rundir.py; a killed run: test_train.py.)"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import FIXTURE_DATA, python_warnings, read_csv

from pneumoscope.nets.build import load_network

pytestmark = pytest.mark.slow

COMMON = ["--arch", "simple_cnn", "--batch-size", "16", "--ema-decay", "0", "--val-fraction", "0.2",
          "--test-fraction", "0.2"]
TINY = ["--data", str(FIXTURE_DATA), *COMMON, "--img-size", "32", "--lr", "3e-3"]


def cli(*args: str) -> int:
    from pneumoscope.cli import main

    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """runs/demo/ with a finished 1-epoch run (a), a finished 2-epoch run (b) and a failed run."""
    root = tmp_path_factory.mktemp("runs")
    assert cli("train", *TINY, "--root", root, "--project", "demo", "--name", "a", "--epochs", "1") == 0
    assert cli("train", *TINY, "--root", root, "--project", "demo", "--name", "b", "--epochs", "2", "--no-test") == 0
    # no validation side: fails inside the run, after status.json is written
    assert cli("train", *TINY, "--root", root, "--project", "demo", "--name", "broken", "--val-fraction", "0") == 1
    return root


# ---------------------------------------------------------------- run directories and `runs`
def test_project_and_name_make_the_run_directory(root):
    assert (root / "demo" / "a" / "model" / "meta.json").is_file()
    assert (root / "demo" / "b" / "val" / "metrics.json").is_file() and not (root / "demo" / "b" / "test").exists()


def test_status_records_pid_and_host_while_running(root):
    import socket

    status = json.loads((root / "demo" / "a" / "status.json").read_text())
    assert status["status"] == "finished" and status["hostname"] == socket.gethostname()
    assert isinstance(status["pid"], int) and status["world_size"] == 1


def test_runs_lists_every_run_with_its_status(root, capsys):
    from pneumoscope.workflows.comparison import list_runs

    rows = {r["experiment"]: r for r in list_runs(root)}
    assert set(rows) == {"a", "b", "broken"}
    assert {r["project"] for r in rows.values()} == {"demo"}
    assert rows["a"]["status"] == "finished" and rows["a"]["epochs"] == 1 and rows["a"]["test_acc"] is not None
    assert rows["b"]["epochs"] == 2 and rows["b"]["test_acc"] is None and rows["b"]["img_size"] == 32
    assert rows["broken"]["status"] == "failed" and rows["broken"]["epochs"] == 0
    assert cli("runs", root) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["project", "experiment", "status"] and len(table) == 4
    assert any("broken" in line and "failed" in line for line in table)


# ---------------------------------------------------------------- `compare`
def test_compare_runs_of_different_lengths_and_a_failed_one(root, tmp_path):
    runs = [root / "demo" / name for name in ("a", "b", "broken")]
    assert cli("compare", *runs, "--out", tmp_path / "cmp") == 0
    rows = {r["run"]: r for r in read_csv(tmp_path / "cmp" / "comparison.csv")}
    assert list(rows) == ["a", "b", "broken"]
    a, b, broken = rows["a"], rows["b"], rows["broken"]
    assert (a["epochs"], b["epochs"], broken["epochs"]) == ("1", "2", "0")
    assert broken["status"] == "failed" and broken["val_acc"] == "" and broken["arch"] == "simple_cnn"
    test_a = json.loads((root / "demo" / "a" / "test" / "metrics.json").read_text())
    assert float(a["test_acc"]) == test_a["accuracy"] and b["test_acc"] == ""
    assert float(a["recall_VIRUS"]) == test_a["per_class"]["VIRUS"]["recall"]
    for name, row in (("a", a), ("b", b)):
        epochs = read_csv(root / "demo" / name / "metrics.csv")
        val = json.loads((root / "demo" / name / "val" / "metrics.json").read_text())  # the saved model's
        assert (float(row["val_acc"]), float(row["val_bacc"])) == (val["accuracy"], val["balanced_accuracy"])
        assert float(row["train_seconds"]) == pytest.approx(sum(float(r["seconds"]) for r in epochs), abs=0.051)
        assert float(row["train_seconds"]) <= float(row["wall_seconds"])
        assert int(row["params"]) == json.loads((root / "demo" / name / "model" / "meta.json").read_text())["params"]
        assert float(row["images_per_s"]) > 0 and float(row["peak_memory_mb"]) > 0
    assert (a["recall_split"], b["recall_split"]) == ("test", "val")
    report = (tmp_path / "cmp" / "report.md").read_text()
    for figure in ("curves.png", "train_time.png", "peak_memory.png", "val_acc.png"):
        assert (tmp_path / "cmp" / figure).stat().st_size > 5000, figure
        assert f"]({figure})" in report
    assert "| broken | failed |" in report


def test_compare_shows_gpu_memory_only_for_runs_that_used_cuda(root, tmp_path):
    """On CPU, env.json records no GPU memory (None), the CSV column stays empty and there is no
    GPU figure; a run that trained on CUDA (its env.json says so) gets both."""
    import shutil

    cpu_run = root / "demo" / "a"
    assert json.loads((cpu_run / "env.json").read_text())["cuda_peak_memory_mb"] is None
    assert cli("compare", cpu_run, "--out", tmp_path / "cpu") == 0
    (row,) = read_csv(tmp_path / "cpu" / "comparison.csv")
    assert row["cuda_peak_memory_mb"] == "" and float(row["peak_memory_mb"]) > 0
    assert row["trainable_params"] == row["params"]  # simple_cnn freezes nothing by default
    assert not (tmp_path / "cpu" / "gpu_memory.png").exists()
    assert "peak GPU MB" not in (tmp_path / "cpu" / "report.md").read_text()

    gpu_run = tmp_path / "gpu"
    shutil.copytree(cpu_run, gpu_run)
    env = json.loads((gpu_run / "env.json").read_text())
    (gpu_run / "env.json").write_text(json.dumps({**env, "cuda_peak_memory_mb": 812.5}))
    assert cli("compare", cpu_run, gpu_run, "--out", tmp_path / "both") == 0
    rows = read_csv(tmp_path / "both" / "comparison.csv")
    assert [r["cuda_peak_memory_mb"] for r in rows] == ["", "812.5"]
    assert (tmp_path / "both" / "gpu_memory.png").stat().st_size > 5000
    report = (tmp_path / "both" / "report.md").read_text()
    assert "](gpu_memory.png)" in report and "peak GPU MB" in report and "| 812 |" in report


# ---------------------------------------------------------------- cross-validation
def test_cross_validation_trains_on_fold_manifests_and_summarizes(tmp_path, capsys):
    from pneumoscope.data.datasets import read_manifest

    out = tmp_path / "cv"
    assert cli("train", *TINY, "--out", out, "--epochs", "1", "--folds", "3") == 0
    val_patients = []
    for fold in range(3):
        run = out / f"fold-{fold}"
        samples = read_manifest(run / "manifest.csv")
        assert {s.split for s in samples} == {"train", "val"}  # the held-out fold is val; no test
        # an ordinary training on its fold's manifest
        assert yaml.safe_load((run / "config.yaml").read_text())["data"] == str(out / "folds" / f"fold-{fold}.csv")
        assert samples == read_manifest(out / "folds" / f"fold-{fold}.csv")
        train = {s.patient_id for s in samples if s.split == "train"}
        val = {s.patient_id for s in samples if s.split == "val"}
        assert not train & val
        val_patients.append(val)
        assert json.loads((run / "status.json").read_text())["status"] == "finished"
    assert all(not val_patients[i] & val_patients[j] for i in range(3) for j in range(i + 1, 3))
    assert set().union(*val_patients) == {s.patient_id for s in samples}  # every patient held out once

    summary = json.loads((out / "cv_summary.json").read_text())
    assert len(summary["folds"]) == 3
    per_fold = [json.loads((out / f"fold-{i}" / "val" / "metrics.json").read_text()) for i in range(3)]
    for key in ("accuracy", "balanced_accuracy", "recall_NORMAL", "recall_BACTERIA", "recall_VIRUS"):
        values = [m["per_class"][key.removeprefix("recall_")]["recall"] if key.startswith("recall_") else m[key]
                  for m in per_fold]
        assert summary["mean"][key] == pytest.approx(np.mean(values))
        assert summary["std"][key] == pytest.approx(np.std(values, ddof=1))
    rows = read_csv(out / "cv_summary.csv")
    assert [r["fold"] for r in rows] == ["0", "1", "2", "mean", "std"]
    assert float(rows[3]["accuracy"]) == pytest.approx(summary["mean"]["accuracy"])
    assert f"{out}/cv_summary.csv" in capsys.readouterr().out


# ---------------------------------------------------------------- two processes (DDP, gloo)
def test_two_process_training_matches_the_single_process_run(root, tmp_path):
    """torchrun with 2 CPU processes: same files and metrics.csv columns as run a (same arguments,
    one process), and validation counted over the whole val split, not rank 0's half."""
    torch.distributed.is_available() or pytest.skip("torch built without torch.distributed")
    from pneumoscope.bundle import load_bundle
    from pneumoscope.data.datasets import load_pixels, read_manifest
    from pneumoscope.runs.rundir import checkpoint_weights
    from pneumoscope.runtime.classifier import Classifier

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "pneumoscope.cli", "train", *TINY, "--root", str(tmp_path), "--project", "ddp", "--name", "a",
               "--epochs", "1"]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert python_warnings(result.stderr) == []
    single, ddp = root / "demo" / "a", tmp_path / "ddp" / "a"
    files = lambda run: sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())  # noqa: E731
    assert files(ddp) == files(single)
    assert json.loads((ddp / "status.json").read_text())["world_size"] == 2
    assert json.loads((ddp / "env.json").read_text())["world_size"] == 2
    (row,) = read_csv(ddp / "metrics.csv")
    assert list(row) == list(read_csv(single / "metrics.csv")[0])

    val = [s for s in read_manifest(ddp / "manifest.csv") if s.split == "val"]
    single_split = [(s.path, s.split) for s in read_manifest(single / "manifest.csv")]
    assert single_split == [(s.path, s.split) for s in read_manifest(ddp / "manifest.csv")]
    assert int(row["val_n"]) == len(val)  # summed over both ranks, no sample padded in twice
    # the last (only) epoch's checkpoint, EMA off: its accuracy over the whole val split is what was logged
    pixels, kept, _ = load_pixels(val, 32)
    meta = load_bundle(ddp / "model").meta
    model = load_network(load_bundle(ddp / "model"))
    model.load_state_dict(checkpoint_weights(ddp / "checkpoints" / "last.ckpt")[0])
    logits = Classifier.from_model(model, meta, backend="torch").score_pixels(pixels).logits
    accuracy = np.mean(logits.argmax(1) == [meta.classes.index(s.label) for s in kept])
    assert float(row["val_acc"]) == pytest.approx(accuracy, abs=1e-6)


# ---------------------------------------------------------------- Optuna
def test_tune_runs_trials_as_runs_and_resumes_the_study(tmp_path):
    import optuna

    args = ["tune", "--data", FIXTURE_DATA, *COMMON, "--study", "s", "--root", tmp_path, "--project", "p",
            "--img-sizes", "32", "--epochs", "1", "--max-images", "40"]
    assert cli(*args, "--trials", "2") == 0
    assert (tmp_path / "p" / "optuna.db").is_file()
    assert cli(*args, "--trials", "1") == 0  # same command again: adds a trial, does not restart
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'p' / 'optuna.db'}")
    assert [t.number for t in study.trials] == [0, 1, 2]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    assert len({t.params["lr"] for t in study.trials}) == 3  # the resumed sampler did not replay trial 0
    for trial in study.trials:
        run = tmp_path / "p" / f"s-trial-{trial.number}"
        assert trial.user_attrs["run_dir"] == str(run)
        saved = json.loads((run / "val" / "metrics.json").read_text())["balanced_accuracy"]
        assert trial.value == pytest.approx(saved)  # the saved model's, from its val report
        assert not (run / "test").exists()  # trials never look at the internal test split
    runs = [tmp_path / "p" / f"s-trial-{n}" for n in range(3)]
    assert cli("compare", *runs, "--out", tmp_path / "cmp") == 0
    assert len(read_csv(tmp_path / "cmp" / "comparison.csv")) == 3


# ---------------------------------------------------------------- optional loggers
def test_mlflow_logger_writes_the_runs_file_store(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from lightning.pytorch.loggers import MLFlowLogger

    from pneumoscope.training.fit import loggers

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (logger,) = [lg for lg in loggers(tmp_path / "proj" / "exp") if isinstance(lg, MLFlowLogger)]
    logger.log_metrics({"val_acc": 0.5}, step=0)
    assert logger.experiment.get_experiment_by_name("proj") is not None
    assert (tmp_path / "proj" / "exp" / "mlruns").is_dir()
