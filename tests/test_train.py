import csv
import json

import torch
import yaml

from conftest import FIXTURE_DATA, tiny_config


def test_tiny_run_writes_a_complete_run_directory(tiny_run):
    for name in ("config.yaml", "manifest.csv", "metrics.csv", "curves.png", "env.json", "status.json",
                 "model.pt", "model.json", "checkpoints/last.ckpt", "checkpoints/best.ckpt",
                 "test/metrics.json", "val/metrics.json"):
        assert (tiny_run / name).is_file(), name
    rows = list(csv.DictReader(open(tiny_run / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    for row in rows:
        for key in ("train_loss", "val_loss", "train_acc", "val_acc", "lr", "seconds"):
            assert float(row[key]) >= 0, key
    assert json.loads((tiny_run / "status.json").read_text())["status"] == "finished"
    config = yaml.safe_load((tiny_run / "config.yaml").read_text())
    assert config["arch"] == "efficientnet_lite0" and config["img_size"] == 64
    env = json.loads((tiny_run / "env.json").read_text())
    assert env["torch"] == torch.__version__ and env["peak_memory_mb"] > 0 and env["seed"] == 0
    meta = json.loads((tiny_run / "model.json").read_text())
    assert meta["classes"] == ["NORMAL", "BACTERIA", "VIRUS"] and meta["temperature"] > 0
    assert len(meta["manifest_hash"]) == 16
    assert 0 <= meta["metrics"]["internal_test"]["accuracy"] <= 1


def test_training_really_learns(tmp_path):
    """Binary NORMAL vs PNEUMONIA on 72 real images at 64 px: 4 epochs fit the training set well
    above chance (a broken loss, label mapping or optimizer would leave it near 0.5-0.6)."""
    from pneumoscope.train import train

    run = tmp_path / "learn"
    train(tiny_config(FIXTURE_DATA, run, task="binary", epochs=4, aug=0.0, evaluate_test=False,
                      val_fraction=0.2, test_fraction=0.0))
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert float(rows[-1]["train_acc"]) >= 0.8
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])


def test_killed_run_resumes_and_finishes(tmp_path):
    """SIGKILL after the first epoch's checkpoint; `--resume` (same run dir) finishes the run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "killed"
    command = [sys.executable, "-m", "pneumoscope.cli", "train", "--data", str(FIXTURE_DATA), "--out", str(run),
               "--epochs", "3", "--img-size", "96", "--batch-size", "8", "--ema-decay", "0", "--no-test"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    last = run / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while not last.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert torch.load(last, weights_only=True)["epoch"] <= 1  # a complete checkpoint, not a torn one
    assert not (run / "model.pt").exists()
    assert json.loads((run / "status.json").read_text())["status"] == "running"  # whole, just stale
    assert list(csv.DictReader(open(run / "metrics.csv")))  # whole CSV: written by rename, never torn
    result = subprocess.run(command + ["--resume"], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    assert torch.load(last, weights_only=True)["epoch"] == 2
    assert json.loads((run / "status.json").read_text())["status"] == "finished"
    assert (run / "model.pt").is_file()


def test_train_from_manifest_uses_its_split(tmp_path):
    from pneumoscope.data import read_manifest
    from pneumoscope.cli import main

    manifest = tmp_path / "m.csv"
    assert main(["split", "--data", str(FIXTURE_DATA), "--out", str(manifest), "--seed", "5"]) == 0
    run = tmp_path / "from_manifest"
    assert main(["train", "--data", str(manifest), "--out", str(run), "--arch", "simple_cnn", "--epochs", "1",
                 "--img-size", "48", "--ema-decay", "0", "--no-test"]) == 0
    used = {(s.path, s.split) for s in read_manifest(run / "manifest.csv")}
    given = {(s.path, s.split) for s in read_manifest(manifest)}
    assert used == given


def test_kept_epochs_hold_the_ema_average_from_its_start_epoch(tmp_path):
    """--keep-epochs keeps one checkpoint per epoch, and what it keeps is the EMA average: frozen
    at the initial weights until ema_start_epoch, then following training."""
    import torch

    from pneumoscope.train import train

    run = tmp_path / "run"
    train(tiny_config(FIXTURE_DATA, run, epochs=3, ema_decay=0.9, ema_start_epoch=2, keep_epochs=True,
                      evaluate_test=False))
    kept = [torch.load(run / "checkpoints" / f"epoch-{e}.ckpt", weights_only=True) for e in range(3)]
    head = [k["state_dict"]["model.backbone.classifier.weight"] for k in kept]
    assert torch.equal(head[0], head[1])  # no average before epoch 2: still the initial weights
    assert not torch.allclose(head[1], head[2])
    assert all("current_model_state" in k for k in kept)  # the live weights are kept beside the average
