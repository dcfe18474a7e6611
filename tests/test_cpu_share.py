"""Training's thread count follows the cores other processes leave free (cpu_share, train.ThreadsForLoad)."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch
from conftest import tiny_config

from pneumoscope.core.cpu_share import CpuShare, machine_busy_seconds, threads_for
from pneumoscope.training.fit import ThreadsForLoad, thread_callbacks


@pytest.mark.parametrize(("others", "threads"), [(0.0, 2), (0.3, 2), (0.6, 1), (1.0, 1), (1.9, 1), (5.0, 1)])
def test_one_thread_fewer_per_core_others_keep_busy(others, threads):
    assert threads_for(2, others) == threads


def test_four_cores_give_up_as_many_threads_as_cores_held():
    assert [threads_for(4, x) for x in (0.2, 0.7, 1.6, 2.5, 3.9)] == [4, 3, 2, 1, 1]


@pytest.mark.skipif(machine_busy_seconds() is None, reason="needs Linux /proc/stat")
def test_a_busy_process_beside_this_one_is_seen():
    share = CpuShare(cores=2)
    assert share.others_busy_cores() is None  # the first call only starts the window
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(1.5)  # this process sleeps: whatever ran was someone else
        seen = share.others_busy_cores()
    finally:
        busy.kill()
        busy.wait()
    assert seen is not None and seen >= 0.5


class _Share:
    def __init__(self, answers):
        self.cores, self.answers = 2, list(answers)

    def threads(self):
        return self.answers.pop(0)


def test_the_callback_sets_the_thread_count_on_the_steps_it_checks(monkeypatch):
    callback = ThreadsForLoad(cores=2, every=8)
    callback.share = _Share([None, 1, 2])
    before = torch.get_num_threads()
    set_to = []
    monkeypatch.setattr(torch, "set_num_threads", set_to.append)
    monkeypatch.setattr(torch, "get_num_threads", lambda: (set_to or [before])[-1])
    for step in range(24):
        callback.on_train_batch_start(None, None, None, step)
    assert set_to == [1, 2] or (before == 1 and set_to == [2])  # steps 0 (first window), 8 and 16 checked


def test_a_fixed_thread_count_turns_the_check_off(tmp_path, monkeypatch):
    set_to = []
    monkeypatch.setattr(torch, "set_num_threads", set_to.append)
    assert thread_callbacks(tiny_config(tmp_path, tmp_path / "run", threads=1)) == []
    assert set_to == [1]
    callbacks = thread_callbacks(tiny_config(tmp_path, tmp_path / "run"))
    assert [type(c) for c in callbacks] == [ThreadsForLoad]


def test_train_precision_is_recorded_and_16_mixed_on_a_cpu_is_one_line(tmp_path, capsys):
    from conftest import FIXTURE_DATA

    from pneumoscope.cli import main

    common = ["train", "--data", str(FIXTURE_DATA), "--arch", "simple_cnn", "--img-size", "32", "--epochs", "1",
              "--max-images", "24", "--no-test", "--val-fraction", "0.2", "--test-fraction", "0.2"]
    if not torch.cuda.is_available():
        assert main([*common, "--precision", "16-mixed", "--out", str(tmp_path / "half")]) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "16-mixed needs a CUDA GPU" in err[0]
    assert main([*common, "--precision", "bf16-mixed", "--threads", "1", "--out", str(tmp_path / "bf16")]) == 0
    import json

    import yaml

    assert yaml.safe_load((tmp_path / "bf16" / "config.yaml").read_text())["precision"] == "bf16-mixed"
    assert json.loads((tmp_path / "bf16" / "env.json").read_text())["precision"] == "bf16-mixed"
    assert (tmp_path / "bf16" / "model" / "model.onnx").is_file()
