"""The run directory on its own: writing and reading its files, where runs go, the one summary,
and finished runs. No training here: the files are written
through RunDir or laid out as training writes them."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pneumoscope.bundle import ModelMeta
from pneumoscope.core.config import TrainConfig
from pneumoscope.runs.rundir import RunDir, find_runs, resolve, summarize

CLASSES = ("NORMAL", "BACTERIA", "VIRUS")


def report(n: int, accuracy: float, recall: tuple[float, float, float]) -> dict:
    """A metrics.json as evaluate writes it (the fields summaries read)."""
    return {"n": n, "accuracy": accuracy, "accuracy_ci95": [accuracy - 0.1, accuracy + 0.1],
            "balanced_accuracy": sum(recall) / 3, "macro_f1": 0.5, "macro_auc": 0.8, "ece": 0.05,
            "ece_uncalibrated": 0.09, "per_class": {c: {"precision": 0.5, "recall": r, "f1": 0.5, "support": 3}
                                                   for c, r in zip(CLASSES, recall)}}


def epoch(i: int, val_acc: float, seconds: float = 10.0) -> dict:
    return {"epoch": i, "train_loss": 1.0 / (i + 1), "train_acc": 0.5, "val_loss": 0.9, "val_acc": val_acc,
            "val_bacc": val_acc - 0.05, "val_n": 16, "lr": 1e-3, "seconds": seconds, "images_per_s": 8.0 + i}


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def test_config_round_trip_and_a_resumed_run_rewriting_later_epochs(tmp_path):
    run = RunDir(tmp_path / "r")
    assert run.config() is None and run.epochs() == [] and run.status() == {}
    config = TrainConfig(data="d", out=str(run.path), lr=3e-3, max_images=40)
    run.write_config(config)
    assert run.config() == config
    for i, acc in enumerate((0.4, 0.5, 0.6)):
        run.write_epoch(epoch(i, acc))
    run.write_epoch(epoch(1, 0.55))  # a resumed run repeats epoch 1: it and what followed are replaced
    assert [(int(r["epoch"]), float(r["val_acc"])) for r in run.epochs()] == [(0, 0.4), (1, 0.55)]
    assert (run.path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_status_updates_merge_and_fresh_starts_anew(tmp_path):
    run = RunDir(tmp_path)
    run.write_status("running", fresh=True, pid=1, error=None)
    run.write_status("failed", error="ValueError: x")
    assert {k: run.status()[k] for k in ("status", "pid", "error")} == {"status": "failed", "pid": 1,
                                                                          "error": "ValueError: x"}
    run.write_status("running", fresh=True, pid=2)
    assert "error" not in run.status() and run.status()["pid"] == 2


def test_a_running_status_records_its_start_and_process(tmp_path):
    """Every job that writes "running" (train, ensemble, soup) gets the start, pid and host from
    write_status, which live_status reads."""
    run = RunDir(tmp_path)
    run.write_status("running", fresh=True)
    status = run.status()
    assert status["pid"] == os.getpid() and status["hostname"] == socket.gethostname() and status["started"]
    assert run.live_status() == "running"
    run.write_status("finished")
    assert run.status()["pid"] == os.getpid() and run.status()["status"] == "finished"


def test_a_saved_configuration_is_read_strictly_naming_the_file(tmp_path):
    run = RunDir(tmp_path)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"data": "d", "lr": "1e-3", "epochs": 2, "bogus": 1}))
    with pytest.raises(ValueError, match=r"config\.yaml: unknown option\(s\) bogus"):
        run.config()
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"data": "d", "lr": "1e-3", "epochs": "two"}))
    with pytest.raises(ValueError, match="epochs must be int, not 'two'"):
        run.config()
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"data": "d", "lr": "1e-3"}))
    assert run.config().lr == 0.001  # YAML reads 1e-3 as a string


def test_where_a_run_goes(tmp_path, monkeypatch):
    base = dict(data="d", root=str(tmp_path), project="p", arch="simple_cnn")
    assert resolve(TrainConfig(**base, out="elsewhere", name="n")) == Path("elsewhere")
    assert resolve(TrainConfig(**base, name="mine", resume=True)) == tmp_path / "p" / "mine"
    fresh = resolve(TrainConfig(**base, task="three"))  # train gives a Kermany dataset's task
    assert fresh.parent == tmp_path / "p" and fresh.name.startswith("three-simple_cnn-20")
    assert resolve(TrainConfig(**base)).name.startswith("folders-simple_cnn-20")  # any other dataset
    older, newer = tmp_path / "p" / "three-simple_cnn-1", tmp_path / "p" / "three-simple_cnn-2"
    for i, run in enumerate((older, newer)):
        run.mkdir(parents=True)
        (run / "config.yaml").write_text("{}")
        os.utime(run / "config.yaml", (1_000_000 + i, 1_000_000 + i))
    assert resolve(TrainConfig(**base, resume=True)) == newer
    monkeypatch.setenv("WORLD_SIZE", "2")  # ranks would not agree on a timestamp
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with pytest.raises(ValueError, match="give --name or --out"):
        resolve(TrainConfig(**base))
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "abc123-x")
    assert resolve(TrainConfig(**base, task="three")).name == "three-simple_cnn-abc123"


def test_a_running_status_whose_process_is_gone_reads_interrupted(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    for name, pid, host in (("dead", gone.pid, socket.gethostname()), ("alive", os.getpid(), socket.gethostname()),
                            ("elsewhere", gone.pid, "another-host")):
        RunDir(tmp_path / name).write_status("running", pid=pid, hostname=host)
    assert {p.name: RunDir(p).live_status() for p in find_runs(tmp_path)} == {
        "dead": "interrupted", "alive": "running", "elsewhere": "running"}


def finished_run(path: Path) -> Path:
    """A finished run's files as training writes them (the bundle's meta, no weights: summaries
    never load or hash them), with reports."""
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump({"data": "d", "out": str(path), "arch": "efficientnet_lite0",
                                                      "task": "three", "img_size": 192, "seed": 1}))
    with open(path / "metrics.csv", "w") as handle:
        handle.write("epoch,train_loss,train_acc,val_loss,val_acc,val_bacc,val_n,lr,seconds,images_per_s\n"
                     "0,1.0,0.5,0.9,0.70,0.65,16,0.001,100.0,30.0\n1,0.8,0.6,0.8,0.75,0.72,16,0.001,90.0,34.0\n")
    write_json(path / "status.json", {"status": "finished", "wall_seconds": 250.0})
    write_json(path / "env.json", {"peak_memory_mb": 2000.5, "cpu_count": 2})
    meta = ModelMeta(name="pneumoscope-efficientnet_lite0-three", task="three", classes=CLASSES,
                     arch="efficientnet_lite0", img_size=192, mean=0.5, std=0.5, temperature=1.3, params=3_371_000,
                     provenance={"pneumoscope": "0.1.0", "best_epoch": 1, "seed": 1})
    write_json(path / "model" / "meta.json", meta.to_json())
    write_json(path / "val" / "metrics.json", report(16, 0.75, (1.0, 0.5, 0.75)))
    write_json(path / "test" / "metrics.json", report(20, 0.8, (0.9, 0.8, 0.7)))
    write_json(path / "external" / "metrics.json", report(30, 0.6, (0.9, 0.5, 0.4)))
    return path


def test_summary_of_a_finished_run(tmp_path):
    run = finished_run(tmp_path / "old")
    assert RunDir(run).model_path() == run / "model"
    s = summarize(run)
    assert (s["status"], s["arch"], s["task"], s["img_size"], s["seed"], s["epochs"]) == (
        "finished", "efficientnet_lite0", "three", 192, 1, 2)
    assert (s["params"], s["best_epoch"]) == (3_371_000, 1)
    # the saved model's validation figures (its val report), not the best row of metrics.csv
    assert (s["val_acc"], s["val_bacc"], s["test_acc"], s["external_acc"]) == (0.75, 0.75, 0.8, 0.6)
    assert (s["recall_NORMAL"], s["recall_VIRUS"], s["recall_split"]) == (0.9, 0.7, "test")
    assert (s["train_seconds"], s["wall_seconds"], s["images_per_s"]) == (190.0, 250.0, 32.0)
    assert (s["peak_memory_mb"], s["cpu_count"]) == (2000.5, 2)
    assert s["reports"]["val"]["recall"] == {"NORMAL": 1.0, "BACTERIA": 0.5, "VIRUS": 0.75}
    assert s["curve"] == [{"epoch": 0, "train_seconds": 100.0, "val_acc": 0.7, "val_bacc": 0.65},
                          {"epoch": 1, "train_seconds": 190.0, "val_acc": 0.75, "val_bacc": 0.72}]


def test_summary_of_a_run_that_failed_before_its_first_epoch(tmp_path):
    run = RunDir(tmp_path / "broken")
    run.path.mkdir()
    run.write_config(TrainConfig(data="d", arch="simple_cnn"))
    run.write_status("failed", fresh=True, error="ValueError: no images")
    s = summarize(run.path)
    assert (s["status"], s["arch"], s["epochs"], s["params"], s["val_acc"], s["test_acc"]) == (
        "failed", "simple_cnn", 0, None, None, None)
    assert s["recall_split"] == "" and s["wall_seconds"] is None and s["curve"] == []


def test_runs_and_compare_read_finished_runs(tmp_path, capsys):
    from pneumoscope.cli import main

    finished_run(tmp_path / "p" / "old")
    assert main(["runs", str(tmp_path)]) == 0
    line = capsys.readouterr().out.splitlines()[1].split()
    assert line[:4] == ["p", "old", "finished", "efficientnet_lite0"] and "0.800" in line
    assert main(["compare", str(tmp_path / "p" / "old"), "--out", str(tmp_path / "cmp")]) == 0
    assert "| old | finished |" in (tmp_path / "cmp" / "report.md").read_text()
