"""Experiments: project/name run directories, `runs`, `compare`, cross-validation, two-process
DDP training and the resumable Optuna search. Every model here is simple_cnn at 48 px for 1-2
epochs on the fixture images: seconds each."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import FIXTURE_DATA

pytestmark = pytest.mark.slow

COMMON = ["--arch", "simple_cnn", "--batch-size", "16", "--ema-decay", "0", "--val-fraction", "0.2",
          "--test-fraction", "0.2"]
TINY = ["--data", str(FIXTURE_DATA), *COMMON, "--img-size", "48", "--lr", "3e-3"]
QUIET = {**os.environ, "PYTHONWARNINGS": "ignore"}


def cli(*args: str) -> int:
    from pneumoscope.cli import main

    return main([str(a) for a in args])


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """runs/demo/ with a finished 1-epoch run (a), a finished 2-epoch run (b) and a failed run."""
    root = tmp_path_factory.mktemp("runs")
    assert cli("train", *TINY, "--root", root, "--project", "demo", "--name", "a", "--epochs", "1") == 0
    assert cli("train", *TINY, "--root", root, "--project", "demo", "--name", "b", "--epochs", "2", "--no-test") == 0
    empty = tmp_path_factory.mktemp("no_images")  # fails inside the run, after status.json is written
    assert cli("train", "--data", empty, *COMMON, "--root", root, "--project", "demo", "--name", "broken") == 1
    return root


# ---------------------------------------------------------------- run directories and `runs`
def test_project_and_name_make_the_run_directory(root, tmp_path):
    from pneumoscope.experiments import run_dir_for

    assert (root / "demo" / "a" / "model.pt").is_file()
    fresh = run_dir_for(tmp_path, "p", None, "three", "simple_cnn")
    assert fresh.parent == tmp_path / "p" and fresh.name.startswith("three-simple_cnn-20")
    older, newer = tmp_path / "p" / "three-simple_cnn-1", tmp_path / "p" / "three-simple_cnn-2"
    for run in (older, newer):
        run.mkdir(parents=True)
        (run / "config.yaml").write_text("{}")
        time.sleep(0.01)
    assert run_dir_for(tmp_path, "p", None, "three", "simple_cnn", resume=True) == newer
    assert run_dir_for(tmp_path, "p", "mine", "three", "simple_cnn", resume=True) == tmp_path / "p" / "mine"


def test_status_records_pid_and_host_while_running(root):
    import socket

    status = json.loads((root / "demo" / "a" / "status.json").read_text())
    assert status["status"] == "finished" and status["hostname"] == socket.gethostname()
    assert isinstance(status["pid"], int) and status["world_size"] == 1


def test_runs_lists_every_run_with_its_status(root, capsys):
    from pneumoscope.experiments import list_runs

    rows = {r["experiment"]: r for r in list_runs(root)}
    assert set(rows) == {"a", "b", "broken"}
    assert {r["project"] for r in rows.values()} == {"demo"}
    assert rows["a"]["status"] == "finished" and rows["a"]["epochs"] == 1 and rows["a"]["test_acc"] is not None
    assert rows["b"]["epochs"] == 2 and rows["b"]["test_acc"] is None and rows["b"]["img_size"] == 48
    assert rows["broken"]["status"] == "failed" and rows["broken"]["epochs"] == 0
    assert cli("runs", root) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["project", "experiment", "status"] and len(table) == 4
    assert any("broken" in line and "failed" in line for line in table)


def test_a_running_status_whose_process_is_gone_reads_interrupted(tmp_path):
    import socket

    from pneumoscope.experiments import list_runs

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    for name, pid in (("dead", gone.pid), ("alive", os.getpid())):
        (tmp_path / "p" / name).mkdir(parents=True)
        (tmp_path / "p" / name / "status.json").write_text(json.dumps(
            {"status": "running", "pid": pid, "hostname": socket.gethostname()}))
    rows = {r["experiment"]: r["status"] for r in list_runs(tmp_path)}
    assert rows == {"dead": "interrupted", "alive": "running"}


def test_killed_run_is_listed_as_interrupted(tmp_path, capsys):
    """SIGKILL leaves status.json at "running" (nothing can write on SIGKILL); `runs` sees that
    its process is gone."""
    from pneumoscope.experiments import list_runs

    command = [sys.executable, "-m", "pneumoscope.cli", "train", *TINY, "--root", str(tmp_path), "--project", "p",
               "--name", "killed", "--epochs", "50", "--patience", "50", "--no-test"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=QUIET)
    last = tmp_path / "p" / "killed" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 120
    while not last.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert json.loads((last.parents[1] / "status.json").read_text())["status"] == "running"
    assert [r["status"] for r in list_runs(tmp_path)] == ["interrupted"]
    assert cli("runs", tmp_path) == 0
    assert "interrupted" in capsys.readouterr().out


# ---------------------------------------------------------------- `compare`
def test_compare_runs_of_different_lengths_and_a_failed_one(root, tmp_path):
    runs = [root / "demo" / name for name in ("a", "b", "broken")]
    assert cli("compare", *runs, "--out", tmp_path / "cmp") == 0
    rows = {r["run"]: r for r in read_csv(tmp_path / "cmp" / "comparison.csv")}
    assert list(rows) == ["a", "b", "broken"]
    a, b, broken = rows["a"], rows["b"], rows["broken"]
    assert (a["epochs"], b["epochs"], broken["epochs"]) == ("1", "2", "0")
    assert broken["status"] == "failed" and broken["best_val_acc"] == "" and broken["arch"] == "simple_cnn"
    assert 0 <= float(a["test_acc"]) <= 1 and b["test_acc"] == ""
    for row in (a, b):
        assert int(row["params"]) > 0 and float(row["images_per_s"]) > 0 and float(row["peak_memory_mb"]) > 0
        assert 0 < float(row["train_seconds"]) <= float(row["wall_seconds"]) and 0 <= float(row["best_val_acc"]) <= 1
        assert {"recall_NORMAL", "recall_BACTERIA", "recall_VIRUS"} <= set(row)
    assert (a["recall_split"], b["recall_split"]) == ("test", "val")
    report = (tmp_path / "cmp" / "report.md").read_text()
    for figure in ("curves.png", "train_time.png", "peak_memory.png", "best_val_acc.png"):
        assert (tmp_path / "cmp" / figure).stat().st_size > 5000, figure
        assert f"]({figure})" in report
    assert "| broken | failed |" in report


# ---------------------------------------------------------------- cross-validation
def test_cross_validation_folds_are_patient_disjoint_and_summarized(tmp_path):
    from pneumoscope.data import read_manifest

    out = tmp_path / "cv"
    assert cli("train", *TINY, "--out", out, "--epochs", "1", "--folds", "3") == 0
    val_patients = []
    for fold in range(3):
        samples = read_manifest(out / f"fold-{fold}" / "manifest.csv")
        assert {s.split for s in samples} == {"train", "val"}  # the held-out fold is val; no test
        train = {s.patient_id for s in samples if s.split == "train"}
        val = {s.patient_id for s in samples if s.split == "val"}
        assert not train & val
        val_patients.append(val)
        assert json.loads((out / f"fold-{fold}" / "status.json").read_text())["status"] == "finished"
    assert all(not val_patients[i] & val_patients[j] for i in range(3) for j in range(i + 1, 3))
    assert set().union(*val_patients) == {s.patient_id for s in samples}  # every patient held out once

    summary = json.loads((out / "cv_summary.json").read_text())
    assert len(summary["folds"]) == 3
    for key in ("accuracy", "balanced_accuracy", "recall_NORMAL", "recall_BACTERIA", "recall_VIRUS"):
        per_fold = [json.loads((out / f"fold-{i}" / "model.json").read_text())["metrics"]["val"] for i in range(3)]
        values = [m["recall"][key.removeprefix("recall_")] if key.startswith("recall_") else m[key] for m in per_fold]
        assert summary["mean"][key] == pytest.approx(np.mean(values))
        assert summary["std"][key] == pytest.approx(np.std(values, ddof=1))
    rows = read_csv(out / "cv_summary.csv")
    assert [r["fold"] for r in rows] == ["0", "1", "2", "mean", "std"]
    assert float(rows[3]["accuracy"]) == pytest.approx(summary["mean"]["accuracy"])


# ---------------------------------------------------------------- two processes (DDP, gloo)
def test_two_process_training_matches_the_single_process_run(root, tmp_path):
    """torchrun with 2 CPU processes: same files and metrics.csv columns as run a (same arguments,
    one process), and validation counted over the whole val split, not rank 0's half."""
    torch.distributed.is_available() or pytest.skip("torch built without torch.distributed")
    from pneumoscope.data import XrayDataset, eval_transform, load_pixels, read_manifest
    from pneumoscope.models import create_model
    from pneumoscope.train import predict_logits

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "pneumoscope.cli", "train", *TINY, "--root", str(tmp_path), "--project", "ddp", "--name", "a",
               "--epochs", "1"]
    result = subprocess.run(command, capture_output=True, text=True, env={**QUIET, "OMP_NUM_THREADS": "1"},
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    single, ddp = root / "demo" / "a", tmp_path / "ddp" / "a"
    files = lambda run: sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())  # noqa: E731
    assert files(ddp) == files(single)
    assert json.loads((ddp / "status.json").read_text())["world_size"] == 2
    assert json.loads((ddp / "env.json").read_text())["world_size"] == 2
    (row,) = read_csv(ddp / "metrics.csv")
    assert list(row) == list(read_csv(single / "metrics.csv")[0])

    val = [s for s in read_manifest(ddp / "manifest.csv") if s.split == "val"]
    assert [s.path for s in read_manifest(single / "manifest.csv")] == [s.path for s in read_manifest(ddp / "manifest.csv")]
    assert int(row["val_n"]) == len(val)  # summed over both ranks, no sample padded in twice
    # the last (only) epoch's checkpoint, EMA off: its accuracy over the whole val split is what was logged
    pixels, kept, _ = load_pixels(val, 48)
    dataset = XrayDataset(pixels, kept, ("NORMAL", "BACTERIA", "VIRUS"), "three", eval_transform())
    state = torch.load(ddp / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    model = create_model("simple_cnn", 3, pretrained=False)
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
    accuracy = (predict_logits(model, dataset).argmax(1) == dataset.targets).float().mean().item()
    assert float(row["val_acc"]) == pytest.approx(accuracy, abs=1e-6)


# ---------------------------------------------------------------- Optuna
def test_tune_runs_trials_as_runs_and_resumes_the_study(tmp_path):
    import optuna

    args = ["tune", "--data", FIXTURE_DATA, *COMMON, "--study", "s", "--root", tmp_path, "--project", "p",
            "--img-sizes", "48", "--epochs", "1", "--max-images", "40"]
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
        best = max(float(r["val_bacc"]) for r in read_csv(run / "metrics.csv"))
        assert trial.value == pytest.approx(best)
        assert not (run / "test").exists()  # trials never look at the internal test split
    runs = [tmp_path / "p" / f"s-trial-{n}" for n in range(3)]
    assert cli("compare", *runs, "--out", tmp_path / "cmp") == 0
    assert len(read_csv(tmp_path / "cmp" / "comparison.csv")) == 3


# ---------------------------------------------------------------- optional loggers
def test_mlflow_logger_writes_the_runs_file_store(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from lightning.pytorch.loggers import MLFlowLogger

    from pneumoscope.train import _loggers

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (logger,) = [lg for lg in _loggers(tmp_path / "proj" / "exp") if isinstance(lg, MLFlowLogger)]
    logger.log_metrics({"val_acc": 0.5}, step=0)
    assert logger.experiment.get_experiment_by_name("proj") is not None
    assert (tmp_path / "proj" / "exp" / "mlruns").is_dir()
