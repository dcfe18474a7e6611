"""Scoring on arrays with known answers: no model, no files."""
import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from pneumoscope.evaluation.metrics import (
    bootstrap_ci,
    compute_metrics,
    expected_calibration_error,
    fit_temperature,
    headline,
    macro_auc,
)

CLASSES = ("NORMAL", "BACTERIA", "VIRUS")


def test_compute_metrics_known_values():
    y = np.array([0, 0, 1, 1, 2, 2])
    probs = np.array([[.8, .1, .1], [.2, .7, .1], [.1, .8, .1], [.1, .6, .3], [.1, .1, .8], [.6, .2, .2]])
    m = compute_metrics(y, probs, CLASSES)
    assert m["n"] == 6 and m["accuracy"] == pytest.approx(4 / 6)
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 1.0 + 0.5) / 3)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert m["per_class"]["BACTERIA"]["recall"] == 1.0 and m["per_class"]["VIRUS"]["recall"] == 0.5
    assert m["per_class"]["BACTERIA"]["precision"] == pytest.approx(2 / 3)
    assert [m["per_class"][c]["support"] for c in CLASSES] == [2, 2, 2]
    lo, hi = m["accuracy_ci95"]
    assert lo < m["accuracy"] < hi


def test_balanced_accuracy_of_a_set_lacking_a_predicted_class_is_its_classes_mean_recall_without_a_warning():
    """A small test set often lacks a class the model still predicts: the mean recall over the two
    classes it holds, and no sklearn "y_pred contains classes not in y_true" (an error under the
    suite's filterwarnings)."""
    y = np.array([0, 0, 1, 1])
    m = compute_metrics(y, np.eye(3)[[0, 2, 1, 1]], CLASSES)  # one NORMAL read as VIRUS, which the set lacks
    assert m["balanced_accuracy"] == (0.5 + 1.0) / 2
    assert m["per_class"]["VIRUS"]["support"] == 0 and m["per_class"]["VIRUS"]["precision"] == 0.0


def test_headline_is_the_same_pick_for_every_caller():
    y = np.array([0, 1, 2, 2])
    m = compute_metrics(y, np.eye(3)[[0, 1, 2, 1]], CLASSES)
    m["ece_uncalibrated"] = 0.25
    h = headline(m)
    assert set(h) == {"n", "accuracy", "accuracy_ci95", "balanced_accuracy", "macro_f1", "macro_auc", "ece",
                      "ece_uncalibrated", "recall", "recall_ci95"}
    assert h["recall"] == {"NORMAL": 1.0, "BACTERIA": 1.0, "VIRUS": 0.5} and h["accuracy"] == 0.75
    assert h["recall_ci95"]["NORMAL"] == [1.0, 1.0]  # one NORMAL image, always right
    lo, hi = h["recall_ci95"]["VIRUS"]
    assert lo < 0.5 < hi


def test_bootstrap_interval_is_seeded_and_brackets_the_mean():
    correct = np.array([1] * 70 + [0] * 30)
    assert bootstrap_ci(correct, seed=3) == bootstrap_ci(correct, seed=3)
    lo, hi = bootstrap_ci(correct)
    assert 0.55 < lo < 0.7 < hi < 0.85
    assert bootstrap_ci(np.ones(20)) == [1.0, 1.0]


def test_macro_auc_binary_multiclass_and_single_class():
    assert macro_auc(np.array([0, 0, 1, 1]), np.array([[.9, .1], [.6, .4], [.3, .7], [.2, .8]])) == 1.0
    assert macro_auc(np.array([0, 0]), np.array([[.9, .1, 0], [.6, .4, 0]])) is None
    y = np.array([0, 1, 2, 0])
    probs = np.array([[.7, .2, .1], [.2, .7, .1], [.5, .1, .4], [.2, .5, .3]])
    # NORMAL vs rest: 2.5 of 4 pairs ordered (0.2 ties one negative, loses to the other); the others 1.0
    assert macro_auc(y, probs) == pytest.approx((0.625 + 1.0 + 1.0) / 3)
    assert macro_auc(y, probs) == roc_auc_score(y, probs, multi_class="ovr", average="macro")
    # a class absent (no VIRUS): the mean over the two present, not NaN and no warning
    y, probs = np.array([0, 1, 0, 1]), np.array([[.7, .2, .1], [.2, .7, .1], [.5, .1, .4], [.4, .5, .1]])
    assert macro_auc(y, probs) == pytest.approx((1.0 + 1.0) / 2)


def test_ece_known_values():
    assert expected_calibration_error(np.eye(3)[[0, 1, 2, 0]], np.array([0, 1, 2, 0])) == pytest.approx(0.0)
    # every prediction 0.8 confident, half of them right: ECE = |0.8 - 0.5|
    probs = np.tile([0.8, 0.1, 0.1], (10, 1))
    assert expected_calibration_error(probs, np.array([0] * 5 + [1] * 5)) == pytest.approx(0.3, abs=1e-6)


def test_temperature_scaling_recovers_a_known_temperature():
    torch.manual_seed(0)
    true_logits = torch.randn(4000, 3) * 2
    targets = torch.distributions.Categorical(logits=true_logits).sample()
    assert fit_temperature((true_logits * 3).numpy(), targets.numpy()) == pytest.approx(3.0, rel=0.1)
    assert fit_temperature(true_logits * 0.5, targets) == pytest.approx(0.5, rel=0.1)  # tensors too


def test_temperature_of_a_barely_trained_model_is_found_not_nan():
    """Issue 22: a 1-epoch densenet121's near-zero validation logits sent the fixed-step LBFGS to NaN,
    which failed the run; the NLL is smallest near T = 0.26 here (0.61, against 0.65 at T = 1)."""
    logits = np.array([[0.0238, -0.0676], [0.0339, -0.1392], [0.0191, -0.2445], [0.0244, -0.3219],
                       [0.0221, -0.2472], [0.0400, -0.1519], [0.0836, -0.2524], [-0.0616, -0.2135]])
    temperature = fit_temperature(logits, np.array([0, 0, 0, 1, 0, 0, 0, 1]))
    assert temperature == pytest.approx(0.26, abs=0.02)
