"""--checkpoint takes what a user points at: a run, a bundle, a file in a bundle, a run's best/last
checkpoint; anything else is one line naming the nearest bundle. The same resolver serves every
command and Classifier.load."""
import json
import shutil

import pytest

from pneumoscope.cli import main
from pneumoscope.runtime.classifier import Classifier


@pytest.fixture()
def image(fixture_data):
    return str(sorted((fixture_data / "val" / "NORMAL").iterdir())[0])


def predicted_model(capsys) -> str:
    return json.loads(capsys.readouterr().out.splitlines()[0])["model"]


@pytest.mark.parametrize("pointer", ["", "model", "model/weights.pt", "model/meta.json", "model/model.onnx",
                                     "model/metrics.json", "checkpoints/best.ckpt", "checkpoints/last.ckpt"])
def test_predict_takes_a_run_its_bundle_and_their_files(tiny_run, image, pointer, capsys):
    bundle = Classifier.load(tiny_run / "model", backend="onnx")
    assert main(["predict", image, "--checkpoint", str(tiny_run / pointer), "--format", "json",
                 "--backend", "onnx"]) == 0
    assert predicted_model(capsys) == bundle.name
    assert Classifier.load(tiny_run / pointer).bundle.path == tiny_run / "model"


def test_every_command_resolves_the_same_way(tiny_run, fixture_data, tmp_path, capsys):
    best = str(tiny_run / "checkpoints" / "best.ckpt")
    assert main(["export", "--checkpoint", best, "--out", str(tmp_path / "m.onnx")]) == 0
    assert (tmp_path / "m.onnx").is_file()
    assert main(["evaluate", "--data", str(fixture_data), "--checkpoint", str(tiny_run), "--out",
                 str(tmp_path / "report"), "--backend", "onnx"]) == 0
    assert json.loads((tmp_path / "report" / "metrics.json").read_text())["checkpoint"] == str(tiny_run / "model")
    assert main(["adapt", "--images", str(fixture_data / "val"), "--checkpoint", str(tiny_run / "model" / "model.onnx"),
                 "--out", str(tmp_path / "adapted")]) == 0
    assert (tmp_path / "adapted" / "weights.pt").is_file()


@pytest.fixture()
def run_layout(small_bundle, tmp_path):
    """A finished run (model/ holds a bundle) and an unfinished one, side by side under runs/."""
    finished = tmp_path / "runs" / "finished"
    shutil.copytree(small_bundle, finished / "model")
    (finished / "config.yaml").write_text("arch: efficientnet_lite0\n")
    (finished / "checkpoints").mkdir()
    (finished / "checkpoints" / "epoch-1.ckpt").write_bytes(b"lightning state")
    unfinished = tmp_path / "runs" / "unfinished"
    (unfinished / "checkpoints").mkdir(parents=True)
    (unfinished / "config.yaml").write_text("arch: efficientnet_lite0\n")
    (unfinished / "checkpoints" / "last.ckpt").write_bytes(b"lightning state")
    return tmp_path / "runs"


@pytest.mark.parametrize("pointer, code, says", [
    ("finished/config.yaml", 1, "nearest model bundle is {runs}/finished/model"),
    ("finished/checkpoints/epoch-1.ckpt", 1, "nearest model bundle is {runs}/finished/model"),
    ("", 1, "nearest model bundle is {runs}/finished/model"),  # a folder of runs
    ("finished/modle", 2, "nearest model bundle is {runs}/finished/model"),  # a typo
    ("unfinished", 2, "no model yet; is the run finished?"),
    ("unfinished/checkpoints/last.ckpt", 2, "no model yet; is the run finished?"),
])
def test_anything_else_is_one_line_naming_the_nearest_bundle(run_layout, image, pointer, code, says, capsys):
    for command in (["predict", image], ["export"], ["serve"]):
        assert main([*command, "--checkpoint", str(run_layout / pointer)]) == code
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and says.format(runs=run_layout) in err, err
        assert str(run_layout / pointer).rstrip("/") in err and "Traceback" not in err
