import json

import numpy as np
import pytest
import torch

from pneumoscope.evaluate import compute_metrics, expected_calibration_error, fit_temperature


def test_compute_metrics_known_values():
    y = np.array([0, 0, 1, 1, 2, 2])
    probs = np.array([[.8, .1, .1], [.2, .7, .1], [.1, .8, .1], [.1, .6, .3], [.1, .1, .8], [.6, .2, .2]])
    m = compute_metrics(y, probs, ("NORMAL", "BACTERIA", "VIRUS"))
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert m["per_class"]["BACTERIA"]["recall"] == 1.0 and m["per_class"]["VIRUS"]["recall"] == 0.5
    assert m["per_class"]["BACTERIA"]["precision"] == pytest.approx(2 / 3)
    lo, hi = m["accuracy_ci95"]
    assert 0 <= lo <= m["accuracy"] <= hi <= 1


def test_temperature_scaling_recovers_a_known_temperature():
    torch.manual_seed(0)
    true_logits = torch.randn(4000, 3) * 2
    targets = torch.distributions.Categorical(logits=true_logits).sample()
    assert fit_temperature(true_logits * 3, targets) == pytest.approx(3.0, rel=0.1)


def test_ece_is_zero_for_perfect_confident_predictions():
    probs = np.eye(3)[[0, 1, 2, 0]]
    assert expected_calibration_error(probs, np.array([0, 1, 2, 0])) == pytest.approx(0.0)


def test_evaluate_cli_writes_the_report(tiny_run, fixture_data, tmp_path, capsys):
    from pneumoscope.cli import main

    out = tmp_path / "report"
    code = main(["evaluate", "--data", str(fixture_data / "val"), "--checkpoint", str(tiny_run / "model.pt"),
                 "--out", str(out)])
    assert code == 0
    for name in ("metrics.json", "predictions.csv", "confusion_matrix.png", "roc.png", "prediction_grid.png",
                 "reliability.png", "cam_grid.png"):
        assert (out / name).stat().st_size > 0, name
    m = json.loads((out / "metrics.json").read_text())
    assert m["n"] == 8 and 0 <= m["accuracy"] <= 1 and m["classes"] == ["NORMAL", "BACTERIA", "VIRUS"]
    assert sum(map(sum, m["confusion_matrix"])) == m["n"]
    assert set(m) >= {"task", "accuracy_ci95", "balanced_accuracy", "macro_f1", "macro_auc", "per_class",
                      "checkpoint"}
    assert len((out / "predictions.csv").read_text().splitlines()) == 9
    assert "accuracy" in capsys.readouterr().out


def test_evaluate_from_manifest_defaults_to_its_test_split(tiny_run, tmp_path):
    from pneumoscope.cli import main

    out = tmp_path / "report"
    assert main(["evaluate", "--data", str(tiny_run / "manifest.csv"), "--checkpoint",
                 str(tiny_run / "model.pt"), "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["n"] == json.loads((tiny_run / "test" / "metrics.json").read_text())["n"]
