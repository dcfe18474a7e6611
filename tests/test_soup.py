"""Model soups (`pneumoscope soup`): finished runs averaged in weight space into one network."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from pneumoscope.bundle import load_bundle
from pneumoscope.cli import main
from pneumoscope.workflows.soup import average_states

pytestmark = pytest.mark.slow


def test_the_average_of_states_is_their_mean_and_keeps_counters():
    a = {"w": torch.tensor([1.0, 3.0]), "n": torch.tensor(5)}
    b = {"w": torch.tensor([3.0, 5.0]), "n": torch.tensor(9)}
    mean = average_states([a, b])
    assert torch.equal(mean["w"], torch.tensor([2.0, 4.0])) and int(mean["n"]) == 5
    with pytest.raises(ValueError, match="different layers"):
        average_states([a, {"w": torch.zeros(3), "n": torch.tensor(1)}])


def test_a_soup_of_a_run_and_its_copy_is_that_run(tiny_run, tmp_path, capsys):
    copy = shutil.copytree(tiny_run, tmp_path / "copy")
    out = tmp_path / "soup"
    assert main(["soup", "--runs", str(tiny_run), str(copy), "--out", str(out), "--bn-images", "0"]) == 0
    assert "model bundle:" in capsys.readouterr().out
    run, soup = load_bundle(tiny_run / "model"), load_bundle(out / "model")
    for key, tensor in run.state_dict().items():
        assert torch.equal(soup.state_dict()[key], tensor), key
    members = soup.meta.provenance["members"]
    assert [m["run"] for m in members] == [tiny_run.name, "copy"] and all(m["in_soup"] for m in members)
    assert soup.meta.provenance["soup"] == "uniform" and soup.meta.classes == run.meta.classes
    assert (out / "val" / "metrics.json").is_file() and (out / "manifest.csv").is_file()
    assert json.loads((out / "status.json").read_text())["status"] == "finished"


def test_re_estimated_batchnorm_keeps_the_layers_training_froze(tiny_run, tmp_path):
    copy = shutil.copytree(tiny_run, tmp_path / "copy")
    out = tmp_path / "soup"
    assert main(["soup", "--runs", str(tiny_run), str(copy), "--out", str(out),
                 "--bn-images", "16"]) == 0
    run, soup = load_bundle(tiny_run / "model").state_dict(), load_bundle(out / "model").state_dict()
    changed = {k for k in run if k.endswith("running_mean") and not torch.equal(run[k], soup[k])}
    stem_and_first_stages = {k for k in run if k.endswith("running_mean") and
                             k.startswith(("backbone.bn1.", "backbone.blocks.0.", "backbone.blocks.1."))}
    assert changed and not changed & stem_and_first_stages  # trained layers re-estimated, frozen ones kept


def _tiny_train(tmp_path, name, data, *extra):
    out = tmp_path / name
    assert main(["train", "--data", str(data), "--arch", "simple_cnn", "--img-size", "64", "--epochs", "1",
                 "--batch-size", "16", "--no-test", "--out", str(out), *extra]) == 0
    return out


def test_a_soup_refuses_other_architectures_classes_and_manifests_in_one_line(tiny_run, tmp_path, capsys):
    from conftest import FIXTURE_DATA

    manifest = tiny_run / "manifest.csv"
    other_arch = _tiny_train(tmp_path, "cnn", manifest)
    other_task = _tiny_train(tmp_path, "binary", manifest, "--task", "binary")
    other_split = _tiny_train(tmp_path, "split", FIXTURE_DATA, "--seed", "1", "--val-fraction", "0.2",
                              "--test-fraction", "0.2")
    capsys.readouterr()
    cases = [([tiny_run, other_arch], "architecture"), ([other_arch, other_task], "task"),
             ([other_arch, other_split], "manifest")]
    for runs, word in cases:
        assert main(["soup", "--runs", *map(str, runs), "--out", str(tmp_path / f"no-{word}")]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and word in err[0], err
        assert not (tmp_path / f"no-{word}" / "model").exists()
