"""Training: the options made from TrainConfig (fast, no training), then real tiny runs (slow)."""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FIXTURE_DATA, ROOT, python_warnings, read_csv, tiny_config

from pneumoscope.core.config import TrainConfig, add_train_arguments, config_from_args
from pneumoscope.nets.build import load_network
from pneumoscope.runtime.export import graph_path


# ---------------------------------------------------------------- options (no training)
def parse(*argv: str) -> TrainConfig:
    parser = argparse.ArgumentParser(prog="pneumoscope train")
    add_train_arguments(parser)
    return config_from_args(parser.parse_args(list(argv)))


def test_every_field_is_an_option_with_its_default():
    config = parse("--data", "d")
    assert config == TrainConfig(data="d")
    assert parse("--data", "d", "--no-test", "--no-pretrained", "--keep-epochs", "--aug-policy", "strong",
                 "--max-images", "40", "--lr", "3e-3", "--name", "n") == TrainConfig(
        data="d", evaluate_test=False, pretrained=False, keep_epochs=True, aug_policy="strong", max_images=40,
        lr=0.003, name="n")


def test_choices_come_from_the_library(capsys):
    for argv, message in ((["--task", "four"], "invalid choice: 'four'"), (["--aug-policy", "wild"], "strong"),
                          (["--epochs", "two"], "invalid int value: 'two'")):
        with pytest.raises(SystemExit) as exit_info:
            parse("--data", "d", *argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_config_file_sets_defaults_that_the_command_line_overrides(tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text("data: some/data\nlr: 1e-4\nepochs: 3\nout: runs/p/old\nevaluate_test: false\n")
    config = parse("--config", str(path), "--epochs", "5")
    assert (config.data, config.lr, config.epochs, config.out, config.evaluate_test) == (
        "some/data", 1e-4, 5, "runs/p/old", False)
    assert parse("--config", str(path), "--name", "new").out is None  # a new name: not the file's run directory
    path.write_text("data: d\nlearning_rate: 0.1\n")
    with pytest.raises(SystemExit):
        parse("--config", str(path))
    assert f"{path}: unknown option(s) learning_rate" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse("--epochs", "2")
    assert "--data" in capsys.readouterr().err


def test_a_runs_config_yaml_is_a_config_file(tmp_path):
    from pneumoscope.runs.rundir import RunDir

    original = TrainConfig(data="d", out=str(tmp_path / "a"), img_size=64, seed=3)
    RunDir(tmp_path / "a").write_config(original)
    again = parse("--config", str(tmp_path / "a" / "config.yaml"), "--out", str(tmp_path / "b"))
    assert again == TrainConfig(data="d", out=str(tmp_path / "b"), img_size=64, seed=3)


def test_freeze_option_is_checked_and_spelled_one_way(capsys):
    assert parse("--data", "d", "--freeze", "base").freeze == "base"
    assert TrainConfig(data="d", freeze=3).freeze == "3"
    with pytest.raises(SystemExit):
        parse("--data", "d", "--freeze", "all")
    assert "choose none, base, or a number of stages" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse("--data", "d", "--optimizer", "lbfgs")
    assert "invalid choice: 'lbfgs'" in capsys.readouterr().err


def test_default_freeze_is_the_stem_and_first_two_blocks_of_an_efficientnet():
    """The default recipe: on efficientnet_lite0 the default freeze is "2", the stem, bn1 and
    blocks 0-1 (what the shipped models trained with); other architectures freeze nothing."""
    from pneumoscope.nets.registry import create_model, model_spec
    from pneumoscope.training.fit import with_defaults
    from pneumoscope.training.module import LitClassifier

    config = with_defaults(TrainConfig(data="d"))
    assert config.freeze == "2"
    model = create_model(config.arch, 3)
    LitClassifier(model, ("NORMAL", "BACTERIA", "VIRUS"), config, torch.ones(3))
    frozen = {name for name, p in model.backbone.named_parameters() if not p.requires_grad}
    backbone = model.backbone
    old_modules = {"conv_stem": backbone.conv_stem, "bn1": backbone.bn1, "blocks.0": backbone.blocks[0],
                   "blocks.1": backbone.blocks[1]}
    old = {f"{prefix}.{name}" for prefix, module in old_modules.items() for name, _ in module.named_parameters()}
    assert frozen == old and len(frozen) > 10
    assert with_defaults(TrainConfig(data="d", arch="resnet18")).freeze == "none"
    assert [model_spec(f"efficientnet_lite{n}").freeze for n in range(3)] == ["2", "2", "2"]


def test_focal_loss_is_weighted_cross_entropy_at_gamma_0_and_forgives_confident_right_answers():
    from pneumoscope.training.module import FocalLoss

    generator = torch.Generator().manual_seed(0)
    logits, target = torch.randn(64, 3, generator=generator) * 3, torch.randint(0, 3, (64,), generator=generator)
    weights = torch.tensor([0.5, 1.2, 1.3])
    ce = torch.nn.functional.cross_entropy(logits, target, weight=weights)
    assert FocalLoss(weights, gamma=0)(logits, target) == pytest.approx(ce.item(), rel=1e-6)
    confident = torch.nn.functional.one_hot(target, 3).float() * 6  # p(true class) about 0.995
    focal = FocalLoss(weights, gamma=2)(confident, target)
    assert 0 < focal < torch.nn.functional.cross_entropy(confident, target, weight=weights) / 100


def test_mixup_blends_image_pairs_and_their_losses_by_the_same_weight(monkeypatch):
    from pneumoscope.nets.registry import create_model
    from pneumoscope.training.fit import with_defaults
    from pneumoscope.training.module import LitClassifier

    torch.manual_seed(0)
    model = create_model("simple_cnn", 3).eval()  # eval: BN uses running statistics, so outputs are comparable
    weights = torch.tensor([0.5, 1.2, 1.3])
    lit = LitClassifier(model, ("NORMAL", "BACTERIA", "VIRUS"), with_defaults(tiny_config("d", "o", arch="simple_cnn", mixup=0.4)),
                        weights)
    x, y = torch.rand(6, 1, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 0, 1, 2])
    partner = torch.tensor([3, 4, 5, 0, 1, 2])
    monkeypatch.setattr(torch, "randperm", lambda n, device=None: partner)
    monkeypatch.setattr(np.random, "beta", lambda a, b: 0.3)
    loss, logits = lit._mixup_step(x, y)
    blended = lit(0.3 * x + 0.7 * x[partner])
    assert torch.allclose(logits, blended)
    expected = 0.3 * lit.loss(blended, y) + 0.7 * lit.loss(blended, y[partner])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    monkeypatch.setattr(np.random, "beta", lambda a, b: 1.0)  # lambda 1: the plain batch and loss
    loss, logits = lit._mixup_step(x, y)
    assert torch.allclose(logits, lit(x)) and loss.item() == pytest.approx(lit.loss(lit(x), y).item(), rel=1e-6)


def test_several_processes_need_a_run_name_before_anything_is_written(tmp_path, monkeypatch, capsys):
    """Ranks that torchrun or srun started (WORLD_SIZE) would not agree on a timestamped run name:
    training tells the run directory how many processes there are, and without --name, --out or a
    launcher's job id the command stops with one line, before it writes a file. (The data holds one
    class: were the count not passed, the run would stop at its split, not wait for a second rank.)"""
    from pneumoscope.cli import main

    data = tmp_path / "data" / "NORMAL"
    data.mkdir(parents=True)
    for path in sorted((FIXTURE_DATA / "train" / "NORMAL").iterdir())[:2]:
        shutil.copy(path, data)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert main(["train", "--data", str(data.parent), "--root", str(tmp_path / "runs"), "--arch", "simple_cnn",
                 "--no-pretrained"]) == 1
    assert capsys.readouterr().err.strip().endswith("give --name or --out so that every rank writes the same run")
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- real runs
TINY_STEP = dict(arch="simple_cnn", img_size=32, epochs=1, max_images=24, evaluate_test=False)  # one step: 14 train images


@pytest.mark.slow
@pytest.mark.parametrize("optimizer, schedule, loss", [("adam", "cosine", "focal"), ("sgd", "step", "ce"),
                                                       ("adamw", "plateau", "ce"), ("sgd", "onecycle", "ce")])
def test_each_optimiser_schedule_and_loss_trains_a_step(tmp_path, optimizer, schedule, loss):
    from pneumoscope.runs.rundir import RunDir
    from pneumoscope.training.fit import train

    run = RunDir(tmp_path / "run")
    train(tiny_config(FIXTURE_DATA, run.path, optimizer=optimizer, schedule=schedule, loss=loss, **TINY_STEP))
    saved = run.config()
    assert (saved.optimizer, saved.schedule, saved.loss) == (optimizer, schedule, loss)
    checkpoint = torch.load(run.last_checkpoint, weights_only=True)
    assert checkpoint["global_step"] == 1
    group = checkpoint["optimizer_states"][0]["param_groups"][0]
    if optimizer == "sgd":
        momentum = 0.9 if schedule != "onecycle" else pytest.approx(0.9, abs=0.05)  # one-cycle moves it in 0.85-0.95
        assert group["nesterov"] and group["momentum"] == momentum
    else:  # Adam with decoupled weight decay is AdamW
        assert group["betas"] and group["decoupled_weight_decay"] == (optimizer == "adamw")
    (state,) = checkpoint["lr_schedulers"]
    identifying = {"onecycle": "total_steps", "cosine": "T_max", "step": "milestones", "plateau": "num_bad_epochs"}
    assert identifying[schedule] in state
    if schedule == "plateau":
        assert state["mode"] == "max"  # it follows val balanced accuracy, as early stopping does
    (row,) = run.epochs()
    assert float(row["train_loss"]) > 0 and RunDir(run.path).live_status() == "finished"


@pytest.mark.slow
def test_freeze_base_on_resnet18_trains_the_head_only_and_reports_it(tmp_path, caplog):
    import logging

    from pneumoscope.runs.rundir import RunDir, summarize
    from pneumoscope.training.fit import train

    caplog.set_level(logging.INFO, logger="pneumoscope.training")
    run = tmp_path / "resnet"
    train(tiny_config(FIXTURE_DATA, run, **{**TINY_STEP, "arch": "resnet18"}, pretrained=False, freeze="base"))
    summary = summarize(run)
    assert summary["trainable_params"] == 512 * 3 + 3 == 1539  # the fc layer
    assert summary["params"] > 11_000_000
    assert "freeze base: 1,539 of" in caplog.text
    assert RunDir(run).config().freeze == "base"
@pytest.mark.slow
def test_tiny_run_flows_one_way_into_a_complete_run_directory(tiny_result, tiny_run):
    from pneumoscope.bundle import load_bundle
    from pneumoscope.evaluation.metrics import headline

    for name in ("config.yaml", "manifest.csv", "metrics.csv", "curves.png", "env.json", "status.json",
                 "checkpoints/last.ckpt", "checkpoints/best.ckpt", "model/weights.pt", "model/meta.json",
                 "model/model.onnx", "test/metrics.json", "val/metrics.json", "test/cam_grid.png"):
        assert (tiny_run / name).is_file(), name
    assert not (tiny_run / "model.pt").exists()
    rows = read_csv(tiny_run / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    # what the module logs reaches the table, also with no Lightning logger (neither TensorBoard nor MLflow installed)
    assert all(r[k] for r in rows for k in ("train_loss", "train_acc", "val_loss", "val_bacc", "val_n"))
    assert not (tiny_run / "logs" / "metrics.csv").exists()  # one epoch table, the run's own
    assert json.loads((tiny_run / "status.json").read_text())["status"] == "finished"
    env = json.loads((tiny_run / "env.json").read_text())
    assert env["torch"] == torch.__version__ and env["peak_memory_mb"] > 0 and env["seed"] == 0

    bundle = load_bundle(tiny_result.bundle)
    assert tiny_result.bundle == tiny_run / "model"
    meta = bundle.meta
    assert meta.classes == ("NORMAL", "BACTERIA", "VIRUS") and meta.img_size == 64 and meta.temperature > 0
    assert meta.provenance["train_config"]["img_size"] == 64 and len(meta.provenance["manifest_hash"]) == 16
    assert meta.provenance["best_epoch"] == tiny_result.best_epoch in (0, 1)
    assert "metrics" not in json.loads((tiny_run / "model" / "meta.json").read_text())  # reports hold them
    # the graph saved with the bundle is the one evaluation ran: not stale, nothing exported elsewhere
    assert graph_path(bundle, "fp32") == tiny_run / "model" / "model.onnx"
    for split, name in (("val", "val"), ("internal_test", "test")):
        report = json.loads((tiny_run / name / "metrics.json").read_text())
        assert tiny_result.metrics[split] == headline(report)
        assert report["checkpoint"] == str(tiny_run / "model") and report["temperature"] == meta.temperature
    assert tiny_result.config.out == str(tiny_run) and not tiny_result.resumed


@pytest.mark.slow
def test_training_really_learns(tmp_path):
    """Binary NORMAL vs PNEUMONIA on 72 real images at 64 px: 4 epochs fit the training set well
    above chance (a broken loss, label mapping or optimizer would leave it near 0.5-0.6)."""
    from pneumoscope.training.fit import train

    run = tmp_path / "learn"
    train(tiny_config(FIXTURE_DATA, run, task="binary", epochs=4, aug=0.0, evaluate_test=False,
                      val_fraction=0.2, test_fraction=0.0))
    rows = read_csv(run / "metrics.csv")
    assert float(rows[-1]["train_acc"]) >= 0.8
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])


@pytest.mark.slow
def test_an_input_step_is_trained_with_and_recorded_for_every_prediction(tmp_path, monkeypatch):
    """--preprocess clahe: every training and validation image passes the step, the temperature is
    fitted on the logits of stepped validation pixels, and the bundle records the step (so every
    prediction applies it: tests/test_predict.py)."""
    from pneumoscope.data import transforms
    from pneumoscope.data.datasets import load_pixels
    from pneumoscope.data.images import input_step
    from pneumoscope.runs import finish
    from pneumoscope.runs.rundir import RunDir
    from pneumoscope.runtime.classifier import Classifier
    from pneumoscope.training.fit import train

    stepped, fitted_on = [], []
    step, fit = transforms.InputStep.forward, finish.fit_temperature
    monkeypatch.setattr(transforms.InputStep, "forward", lambda self, image: stepped.append(self.method) or step(self, image))
    monkeypatch.setattr(finish, "fit_temperature", lambda logits, targets: fitted_on.append(logits) or fit(logits, targets))
    result = train(tiny_config(FIXTURE_DATA, tmp_path / "clahe", arch="simple_cnn", epochs=1, img_size=48,
                               preprocess="clahe", evaluate_test=False, calibration="val"))
    classifier = Classifier.load(result.bundle, backend="torch")
    assert classifier.meta.preprocess == "clahe"
    samples = RunDir(result.run_dir).samples()
    n_train, n_val = (sum(s.split == split for s in samples) for split in ("train", "val"))
    assert set(stepped) == {"clahe"} and len(stepped) >= n_train + n_val
    val_pixels, _, _ = load_pixels([s for s in samples if s.split == "val"], 48)
    plain = Classifier.from_model(classifier.model, classifier.meta.replace(preprocess=None), backend="torch")
    np.testing.assert_allclose(fitted_on[0], plain.score_pixels(input_step(val_pixels, "clahe")).logits, atol=1e-4)
    assert not np.allclose(fitted_on[0], plain.score_pixels(val_pixels).logits, atol=1e-3)


@pytest.mark.slow
def test_killed_run_is_interrupted_then_resumes_from_python_with_its_saved_configuration(tmp_path):
    """SIGKILL after the first epoch's checkpoint: the files are whole, `runs` sees the run as
    interrupted, and train(TrainConfig(resume=True)) from Python continues it exactly as --resume
    would: with the configuration the run started with, from its last checkpoint, and continuing
    the run's metrics.csv (the epochs before the kill kept, each later epoch recorded once)."""
    from pneumoscope.runs.rundir import RunDir
    from pneumoscope.training.fit import train

    run = tmp_path / "killed"
    command = [sys.executable, "-m", "pneumoscope.cli", "train", "--data", str(FIXTURE_DATA), "--out", str(run),
               "--arch", "simple_cnn", "--epochs", "3", "--img-size", "48", "--batch-size", "16", "--ema-decay", "0",
               "--no-test"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "PYTHONWARNINGS": "ignore"})
    last, table = run / "checkpoints" / "last.ckpt", run / "metrics.csv"
    deadline = time.time() + 240
    while not (last.exists() and table.exists()) and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert torch.load(last, weights_only=True)["epoch"] <= 1  # a complete checkpoint, not a torn one
    assert not (run / "model").exists()
    assert json.loads((run / "status.json").read_text())["status"] == "running"  # whole, just stale
    assert RunDir(run).live_status() == "interrupted"
    checkpoint_epoch = torch.load(last, weights_only=True)["epoch"]
    recorded = [r for r in read_csv(table) if int(r["epoch"]) <= checkpoint_epoch]
    assert recorded  # whole CSV: written by rename, never torn

    result = train(TrainConfig(data="ignored: the saved configuration wins", out=str(run), resume=True))
    assert result.resumed and result.config.arch == "simple_cnn" and result.config.epochs == 3
    continued = read_csv(table)
    assert continued[:len(recorded)] == recorded  # the epochs up to the checkpoint, as they were
    assert [int(r["epoch"]) for r in continued] == [0, 1, 2]  # each epoch once
    assert torch.load(last, weights_only=True)["epoch"] == 2
    assert RunDir(run).live_status() == "finished" and (run / "model" / "meta.json").is_file()
    assert set(result.metrics) == {"val"}  # --no-test was saved with the run


@pytest.mark.slow
def test_resuming_a_copied_run_continues_the_copy_alone(tmp_path):
    """`--resume --out COPY`: the folder given is the run. Its config.yaml and its checkpoints name
    the original folder; neither is followed (the original is gone here, so touching it fails), and
    the best score so far comes back with the copy's own best.ckpt."""
    import shutil

    from pneumoscope.runs.rundir import RunDir
    from pneumoscope.training.callbacks import RunCheckpoint
    from pneumoscope.training.fit import train
    from pneumoscope.training.module import MONITOR

    original, copy = tmp_path / "original", tmp_path / "copy"
    train(tiny_config(FIXTURE_DATA, original, **TINY_STEP))
    best_score = max(float(row["val_bacc"]) for row in RunDir(original).epochs())
    shutil.copytree(original, copy)
    shutil.rmtree(original)
    result = train(TrainConfig(data="ignored: the saved configuration wins", out=str(copy), resume=True))
    assert result.resumed and result.run_dir == copy and result.best_epoch == 0
    assert RunDir(copy).config().out == str(copy) and RunDir(copy).live_status() == "finished"
    assert not original.exists()

    callback = RunCheckpoint(copy / "checkpoints", filename="best", monitor=MONITOR, mode="max")
    (state,) = [v for k, v in torch.load(copy / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"].items()
                if k.startswith("ModelCheckpoint") and MONITOR in k]
    assert state["dirpath"] == str(original / "checkpoints")  # what the copied checkpoint says
    callback.load_state_dict(state)
    assert callback.best_model_path == str(copy / "checkpoints" / "best.ckpt")
    assert float(callback.best_model_score) == pytest.approx(best_score)  # Lightning alone forgets it


@pytest.mark.slow
def test_a_resumed_run_removes_what_a_killed_write_left_and_nothing_else(tmp_path):
    """A process killed inside atomic_write leaves its temporary (.<name>.<random>.tmp) beside the
    file. The next start or resume of the run deletes those in the run's own folders only."""
    from pneumoscope.core.files import atomic_write
    from pneumoscope.training.fit import train

    run = tmp_path / "run"
    train(tiny_config(FIXTURE_DATA, run, **TINY_STEP))
    stale = []
    for path in (run / "status.json", run / "metrics.csv", run / "model" / "meta.json", run / "val" / "metrics.json"):
        write = atomic_write(path, "w")
        handle = write.__enter__()  # and never __exit__: as if killed mid-write
        handle.write("half")
        handle.close()
        stale.append(Path(write.tmp))
    others = [run / "notes.tmp", run / ".hidden.tmp", run / "config.yaml.abcd1234.tmp",
              run / "external" / ".metrics.json.abcd1234.tmp"]  # not ours, or another command's report
    for path in others:
        path.parent.mkdir(exist_ok=True)
        path.write_text("keep")
    assert all(p.exists() for p in stale)

    train(TrainConfig(data="ignored", out=str(run), resume=True))
    assert not any(p.exists() for p in stale)
    assert all(p.read_text() == "keep" for p in others)


@pytest.mark.slow
def test_cli_train_from_manifest_uses_its_split_and_prints_the_result(tmp_path, capsys):
    from pneumoscope.cli import main
    from pneumoscope.data.datasets import read_manifest

    manifest = tmp_path / "m.csv"
    assert main(["split", "--data", str(FIXTURE_DATA), "--out", str(manifest), "--seed", "5"]) == 0
    run = tmp_path / "from_manifest"
    assert main(["train", "--data", str(manifest), "--out", str(run), "--arch", "simple_cnn", "--epochs", "1",
                 "--img-size", "32", "--ema-decay", "0", "--no-test"]) == 0
    used = {(s.path, s.split) for s in read_manifest(run / "manifest.csv")}
    given = {(s.path, s.split) for s in read_manifest(manifest)}
    assert used == given
    out = capsys.readouterr().out
    val = json.loads((run / "val" / "metrics.json").read_text())
    assert f"model bundle: {run / 'model'}" in out
    assert f"val: accuracy {val['accuracy']:.4f} (n={val['n']})" in out and "internal_test" not in out


@pytest.mark.slow
def test_training_console_says_each_thing_once_then_resume_needs_no_data(tmp_path, capsys):
    """Issue 22: Lightning's lines came twice (its own console handler and the CLI's), with a
    litlogger advert; the split, the trainable parameters (only with -v) and early stopping were not
    said. `train --out RUN --resume` then failed for want of --data. At lr 0 nothing improves, so
    early stopping (patience 1) stops at epoch 1 and keeps epoch 0, whatever the data."""
    from collections import Counter

    from pneumoscope.cli import main

    run = tmp_path / "run"
    command = [sys.executable, "-m", "pneumoscope.cli", "train", "--data", str(FIXTURE_DATA), "--out", str(run),
               "--arch", "simple_cnn", "--img-size", "32", "--epochs", "3", "--patience", "1", "--lr", "0",
               "--ema-decay", "0", "--val-fraction", "0.2", "--test-fraction", "0.2", "--no-test"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line.strip() for line in done.stderr.replace("\r", "\n").splitlines()]
    messages = [line for line in lines if line and "it/s" not in line and "|" not in line and line != "[A"]
    assert all(n == 1 for n in Counter(messages).values()), Counter(messages).most_common(3)
    assert not any("Tip" in line or "litlogger" in line or "litmodels" in line for line in lines)
    assert python_warnings(done.stderr) == []
    val = json.loads((run / "val" / "metrics.json").read_text())
    assert messages[:4] == ["80 images, 3 classes (NORMAL, BACTERIA, VIRUS); groups from: file names 80",
                            "train     48 images     48 groups   NORMAL 16, BACTERIA 18, VIRUS 14",
                            "val       16 images     16 groups   NORMAL 6, BACTERIA 5, VIRUS 5",
                            "test      16 images     15 groups   NORMAL 6, BACTERIA 5, VIRUS 5"]
    assert "val/: 8 images, too few (VIRUS 0, needs 3); they join the pool" in messages
    assert "freeze none: 1,551,363 of 1,551,363 parameters trainable" in messages
    assert f"stopped early at epoch 1, kept epoch 0 (val balanced accuracy {val['balanced_accuracy']:.3f})" \
        in messages
    assert "model bundle: " + str(run / "model") in done.stdout

    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume"]) == 0  # the run's config.yaml names the data
    assert f"resumed {run} with its saved configuration" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "never-started"), "--resume"]) == 2
    assert capsys.readouterr().err == (f"pneumoscope: error: {tmp_path / 'never-started'}: no run to resume there "
                                       "(no config.yaml); give --data to start one\n")


@pytest.mark.slow
def test_kept_epochs_hold_the_ema_average_from_its_start_epoch(tmp_path):
    """--keep-epochs keeps one checkpoint per epoch, and what it keeps is the EMA average: frozen
    at the initial weights until ema_start_epoch, then following training."""
    from pneumoscope.runs.rundir import RunDir, checkpoint_weights
    from pneumoscope.training.fit import train

    run = tmp_path / "run"
    train(tiny_config(FIXTURE_DATA, run, arch="simple_cnn", img_size=32, epochs=3, ema_decay=0.9,
                      ema_start_epoch=2, keep_epochs=True, evaluate_test=False))
    kept = RunDir(run).epoch_checkpoints()
    assert [epoch for epoch, _ in kept] == [0, 1, 2]
    head = [checkpoint_weights(path)[0]["backbone.head.3.weight"] for _, path in kept]
    assert torch.equal(head[0], head[1])  # no average before epoch 2: still the initial weights
    assert not torch.allclose(head[1], head[2])
    assert all("current_model_state" in torch.load(path, weights_only=True) for _, path in kept)  # live weights too


def test_augmented_views_are_seeded_strong_augmentations_that_leave_the_global_random_state_alone(fixture_data):
    from pneumoscope.data.datasets import load_pixels, read_dataset
    from pneumoscope.data.transforms import augmented_views

    pixels, _, _ = load_pixels(read_dataset(fixture_data).samples[:6], 64)
    numpy_state, torch_state = np.random.get_state()[1].copy(), torch.random.get_rng_state().clone()
    views = augmented_views(pixels, 64)
    assert views.shape == (12, 64, 64) and views.dtype == np.uint8
    assert np.array_equal(views, augmented_views(pixels, 64))  # the same views on every call
    assert not np.array_equal(views[:6], views[6:])  # the second pass draws other changes
    assert np.abs(views[:6].astype(int) - pixels).mean() > 5
    assert np.array_equal(np.random.get_state()[1], numpy_state)
    assert torch.equal(torch.random.get_rng_state(), torch_state)


def test_calibrate_fits_the_temperature_again_and_leaves_the_weights(tiny_run, tmp_path, capsys):
    """A run is calibrated on augmented validation views by default; `pneumoscope calibrate RUN --on
    val` refits on the validation images as they are, rewrites the bundle and the val report, and
    keeps the weights."""
    from pneumoscope.bundle import load_bundle
    from pneumoscope.cli import main
    from pneumoscope.data.datasets import class_indices, load_pixels
    from pneumoscope.data.transforms import augmented_views
    from pneumoscope.evaluation.metrics import fit_temperature
    from pneumoscope.runs.rundir import RunDir
    from pneumoscope.runtime.classifier import Classifier

    run = RunDir(shutil.copytree(tiny_run, tmp_path / "run"))
    before = load_bundle(run.model_path())
    weights = load_network(before).state_dict()
    val_report = (run.report_dir("val") / "metrics.json").read_text()
    assert before.meta.provenance["calibration"] == "augmented"

    assert main(["calibrate", str(run.path), "--on", "val"]) == 0
    after = load_bundle(run.model_path())
    assert after.meta.provenance["calibration"] == "val" and after.meta.replace(temperature=1, provenance={}) == \
        before.meta.replace(temperature=1, provenance={})
    assert all(torch.equal(value, weights[name]) for name, value in load_network(after).state_dict().items())
    assert (run.report_dir("val") / "metrics.json").read_text() != val_report

    size = before.meta.img_size
    pixels, val, _ = load_pixels([s for s in run.samples() if s.split == "val"], size)
    targets = class_indices(val, before.meta.classes, before.meta.task)
    scorer = Classifier.from_model(load_network(after), after.meta.replace(temperature=1.0), backend="torch")
    assert after.meta.temperature == pytest.approx(fit_temperature(scorer.score_pixels(pixels).logits, targets),
                                                   rel=1e-3)
    # scored as training scores it, channels-last: the last digits differ from the contiguous layout,
    # which moves this barely trained model's flat temperature optimum by ~0.2% on some CPUs
    trained = Classifier.from_model(load_network(after).to(memory_format=torch.channels_last),
                                    after.meta.replace(temperature=1.0), backend="torch")
    augmented = trained.score_pixels(augmented_views(pixels, size)).logits
    assert before.meta.temperature == pytest.approx(fit_temperature(augmented, np.tile(targets, 2)), rel=1e-3)

    assert main(["calibrate", str(tmp_path / "missing")]) != 0
    assert "missing" in capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.slow
def test_a_resumed_run_continues_from_the_live_weights_and_the_ema_average_it_was_stopped_with(tmp_path, monkeypatch):
    """A run stopped after epoch 0 and resumed must start epoch 1 from the weights training had
    reached (the checkpoint's current_model_state), with the EMA average carried over (its
    state_dict), the averaging count and the learning-rate schedule where they were. Were the
    average loaded as the live weights, or the average restarted, the resumed run would train on
    from other weights than the uninterrupted run, and nothing else would show it. And epoch 1
    draws the same shuffle, augmentations and dropout (from the seed and the epoch alone), so the
    resumed run ends epoch 1 with the uninterrupted run's weights."""
    import pneumoscope.training.callbacks as callbacks
    from pneumoscope.training.fit import train

    seen = {}

    class Recording(callbacks.EMAWeightAveraging):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                seen["live"] = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}
                seen["average"] = {k[len("module.model."):]: v.detach().clone()
                                   for k, v in self._average_model.state_dict().items()
                                   if k.startswith("module.model.")}
                seen["n_averaged"] = int(self._average_model.n_averaged)
                seen["lr"] = trainer.optimizers[0].param_groups[0]["lr"]

    monkeypatch.setattr(callbacks, "EMAWeightAveraging", Recording)
    options = dict(arch="simple_cnn", img_size=32, epochs=2, ema_decay=0.9, ema_start_epoch=0, keep_epochs=True,
                   evaluate_test=False)
    whole = tmp_path / "whole"
    train(tiny_config(FIXTURE_DATA, whole, **options))
    uninterrupted = dict(seen)

    stopped = tmp_path / "stopped"  # the same run as it stood when killed after epoch 0's checkpoint
    shutil.copytree(whole, stopped)
    shutil.rmtree(stopped / "model")
    epoch0 = stopped / "checkpoints" / "epoch-0.ckpt"
    for later in (stopped / "checkpoints").glob("*.ckpt"):
        if later != epoch0:
            later.unlink()
    for name in ("last.ckpt", "best.ckpt"):  # after one epoch, both were epoch 0's
        shutil.copy(epoch0, stopped / "checkpoints" / name)
    seen.clear()
    # a copy: every callback's state restores into it (the --keep-epochs one's state key named the
    # original's folder, so Lightning warned "Be aware that when using `ckpt_path`" and dropped it)
    train(TrainConfig(data="ignored", out=str(stopped), resume=True))

    saved = torch.load(epoch0, weights_only=True)
    for name, value in uninterrupted["live"].items():
        assert torch.equal(seen["live"][name], value), name  # what training had reached, not the average
        assert torch.equal(seen["live"][name], saved["current_model_state"]["model." + name]), name
        assert torch.equal(seen["average"][name], uninterrupted["average"][name]), name
    assert any(not torch.equal(seen["live"][n], seen["average"][n]) for n in seen["live"])  # two distinct states
    assert seen["n_averaged"] == uninterrupted["n_averaged"] > 0
    assert seen["lr"] == pytest.approx(uninterrupted["lr"])
    after = [torch.load(run / "checkpoints" / "epoch-1.ckpt", weights_only=True) for run in (whole, stopped)]
    for key in ("state_dict", "current_model_state"):
        for name, value in after[0][key].items():
            assert torch.allclose(after[1][key][name], value, atol=1e-6), (key, name)


def billion_laughs(levels: int = 9) -> str:
    """A YAML value of nested aliases: 300 bytes that expand to 9**levels strings when walked."""
    names = "abcdefghijklmnop"[:levels]
    parts = ["&a [x,x,x,x,x,x,x,x,x]"] + [f"&{cur} [" + ",".join([f"*{prev}"] * 9) + "]"
                                          for prev, cur in zip(names, names[1:])]
    return "[" + ", ".join(parts) + "]"


@pytest.mark.parametrize("text, message", [
    # 6 levels (531,441 strings): refused as 9 would be (4 GB), yet cheap for the code before the fix to accept
    (f"data: d\nname: {billion_laughs(6)}\n", "alias *a repeats a list or mapping"),
    ("data: d\nlr: [0.1, 0.2]\n", "lr must be float, not a list"),
    ("data: d\nname: {a: 1}\n", "name must be str, not a dict"),
    ("data: d\nepochs: " + "[" * 20_000 + "]" * 20_000 + "\n", "nested too deeply"),
    ("data: d\n1: x\n", "unknown option(s) 1"),
    (b"data: d\nname: caf\xe9\n", "not valid YAML"),
])
def test_config_values_that_are_no_options_are_usage_errors(tmp_path, capsys, text, message):
    """`train --config` (issue 26): a list or mapping for a single-valued option, an alias that
    repeats one (331 bytes used 4.1 GB), deep nesting, a number as a key, bytes that are not text."""
    from pneumoscope.cli import main

    path = tmp_path / "recipe.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--config", str(path)])
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # after argparse's usage
    assert exit_info.value.code == 2 and last.startswith("pneumoscope train: error: ") and "Traceback" not in err
    assert message in last and str(path) in last, err


def test_an_alias_of_a_single_value_is_still_read(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("data: &where some/data\nname: *where\n")
    config = parse("--config", str(path))
    assert (config.data, config.name) == ("some/data", "some/data")



def test_commands_that_finish_runs_without_training_never_load_lightning(tmp_path):
    """`calibrate`, `ensemble`, `soup` and `ship` make bundles of finished runs (runs.finish) without
    the trainer, so Lightning stays unloaded (they used to import it through train.py). Each is
    given a run that is not there: it imports what it needs, then stops with its one-line error.
    (import-linter checks the imports inside the functions they then call.)"""
    missing = str(tmp_path / "missing")
    commands = [["calibrate", missing], ["ensemble", "--runs", missing, missing, "--out", missing],
                ["soup", "--runs", missing, missing, "--out", missing], ["ship", "--run", missing]]
    script = ("import sys\nfrom pneumoscope.cli import main\n"
              f"for argv in {commands!r}:\n"
              "    assert main(argv) != 0, argv\n"
              "print('loaded:', sorted(m for m in sys.modules if m.split('.')[0] == 'lightning'))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "loaded: []"
    assert done.stderr.count(missing) >= 4 and "Traceback" not in done.stderr
