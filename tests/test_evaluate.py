"""Evaluation reports: from the arrays of one scoring pass (an in-memory untrained model: the
report must be right whatever the weights), then the `evaluate` command on a trained bundle."""
import json

import numpy as np
import pytest
import torch
from conftest import read_csv

from pneumoscope.core.labels import THREE
from pneumoscope.data.datasets import read_dataset
from pneumoscope.evaluation.metrics import expected_calibration_error
from pneumoscope.evaluation.report import evaluate_samples
from pneumoscope.runtime.classifier import softmax


@pytest.fixture(scope="module")
def untrained():
    """A Classifier on a random simple_cnn at 32 px with temperature 2 (PyTorch, in memory)."""
    from pneumoscope.bundle import ModelMeta
    from pneumoscope.nets.registry import create_model
    from pneumoscope.runtime.classifier import Classifier

    torch.manual_seed(0)
    meta = ModelMeta(name="untrained", task="three", classes=THREE, arch="simple_cnn", img_size=32, mean=0.5,
                     std=0.25, temperature=2.0)
    return Classifier.from_model(create_model("simple_cnn", 3, pretrained=False), meta, backend="torch")


REPORT_FILES = ("metrics.json", "predictions.csv", "confusion_matrix.png", "roc.png", "reliability.png",
                "prediction_grid.png", "cam_grid.png")  # what `evaluate --out DIR` writes (docs/tutorials.md)


def test_report_from_one_pass_of_arrays(untrained, fixture_data, tmp_path):
    from pneumoscope.data.datasets import Sample

    broken = tmp_path / "broken.jpeg"
    broken.write_bytes(b"not an image")
    samples = read_dataset(fixture_data / "val").samples + [Sample(str(broken), "NORMAL", "x")]
    out = tmp_path / "report"
    metrics = evaluate_samples(untrained, samples, out)
    for name in REPORT_FILES:
        assert (out / name).stat().st_size > 0, name
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert metrics["n"] == 8 and metrics["failed"] == 1 and metrics["checkpoint"] is None
    assert sum(map(sum, metrics["confusion_matrix"])) == 8 and metrics["temperature"] == 2.0

    good = samples[:8]
    scores = untrained.scores([s.path for s in good])
    targets = np.array([THREE.index(s.label) for s in good])
    # calibrated and before-calibration ECE from the same logits, no probabilities turned back into logits
    assert metrics["ece"] == pytest.approx(expected_calibration_error(softmax(scores.logits, 2.0), targets))
    assert metrics["ece_uncalibrated"] == pytest.approx(expected_calibration_error(softmax(scores.logits), targets))
    assert metrics["accuracy"] == pytest.approx(np.mean(scores.probabilities.argmax(1) == targets))
    rows = read_csv(out / "predictions.csv")
    assert [r["path"] for r in rows] == [s.path for s in good]
    assert [r["true"] for r in rows] == [s.label for s in good]
    written = np.array([[float(r[f"p_{c}"]) for c in THREE] for r in rows])
    assert written == pytest.approx(scores.probabilities, abs=1e-6)


def test_nothing_readable_is_an_error(untrained, tmp_path):
    from pneumoscope.data.datasets import Sample

    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(ValueError, match="no image could be classified"):
        evaluate_samples(untrained, [Sample(str(tmp_path / "a.png"), "NORMAL", "a")], tmp_path / "out", plots=False)


@pytest.mark.slow
def test_evaluate_cli_on_a_trained_bundle(tiny_bundle, tiny_run, fixture_data, tmp_path, capsys):
    from pneumoscope.cli import main

    out = tmp_path / "report"
    assert main(["evaluate", "--data", str(fixture_data / "val"), "--checkpoint", str(tiny_bundle),
                 "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["n"] == 8 and m["classes"] == list(THREE) and m["checkpoint"] == str(tiny_bundle)
    assert f"accuracy {m['accuracy']:.4f}" in capsys.readouterr().out
    # from a manifest, the default is its test split: the report training wrote for the same bundle
    assert main(["evaluate", "--data", str(tiny_run / "manifest.csv"), "--checkpoint", str(tiny_bundle),
                 "--out", str(tmp_path / "test"), ]) == 0
    again, trained = (json.loads((d / "metrics.json").read_text()) for d in (tmp_path / "test", tiny_run / "test"))
    assert {k: again[k] for k in ("n", "accuracy", "confusion_matrix")} == {
        k: trained[k] for k in ("n", "accuracy", "confusion_matrix")}
