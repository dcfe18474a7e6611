"""The learned input guard (pneumoscope.guard) on a tiny in-memory setup: the 80 fixture X-rays
against synthetic pictures, with features from a fixed random projection of the downsampled
pixels (no network: what is tested is the fitting, scoring and storing, not a model)."""
import json

import numpy as np
import pytest
from PIL import Image
from scipy.special import logsumexp

from pneumoscope.data.images import read_xray, resize_square
from pneumoscope.runtime.guard import (
    GUARD_VERSION,
    NOT_XRAY,
    GuardConfig,
    decode_array,
    encode_array,
    energy,
    fit_guard,
    guard_scores,
    guard_warnings,
    load_guard,
    mahalanobis,
    stats_for,
)

SIDE, F, C = 16, 48, 2
PROJECTION = np.random.default_rng(0).normal(size=(SIDE * SIDE, F)) / SIDE
HEAD = np.random.default_rng(1).normal(size=(F, C))


def features_of(gray: np.ndarray) -> np.ndarray:
    small = np.asarray(Image.fromarray(resize_square(gray, 64)).resize((SIDE, SIDE), Image.Resampling.BOX))
    return (small.astype(np.float64).ravel() / 255) @ PROJECTION


def synthetic_pictures() -> list[np.ndarray]:
    rng = np.random.default_rng(2)
    y, x = np.mgrid[0:128, 0:128] / 127
    return [rng.integers(0, 256, (128, 128), dtype=np.uint8), (x * 255).astype(np.uint8),
            (((x * 8).astype(int) + (y * 8).astype(int)) % 2 * 255).astype(np.uint8),
            (np.hypot(x - 0.5, y - 0.5) * 360).astype(np.uint8), np.full((128, 128), 250, np.uint8)]


@pytest.fixture(scope="module")
def setup(fixture_data):
    paths = sorted(fixture_data.rglob("*.jpeg"))
    features = np.stack([features_of(read_xray(p)) for p in paths])
    labels = np.array([p.parent.name != "NORMAL" for p in paths], int)
    val = np.arange(len(paths)) % 4 == 0  # 20 of the 80 for the threshold, 60 to fit on
    fit = dict(features=features[~val], labels=labels[~val], val_features=features[val],
               val_logits=features[val] @ HEAD)
    others = np.stack([features_of(p) for p in synthetic_pictures()])
    return fit, features[val], others


def test_xrays_stay_below_the_threshold_other_pictures_go_above(setup):
    fit, val, others = setup
    stats = fit_guard(**fit, config=GuardConfig(dims=16))
    for row in val:  # at most 1% of 20 may be flagged: none
        assert guard_warnings(row, row @ HEAD, stats) == []
    for row in others:
        warnings = guard_warnings(row, row @ HEAD, stats)
        assert len(warnings) == 1 and warnings[0].startswith(NOT_XRAY)
        assert "does not look like a chest X-ray the model was trained on (feature distance" in warnings[0]
    far = val[0] + 50 * np.abs(val).max() * np.eye(F)[0]  # far from every training X-ray
    assert guard_scores(far[None], stats)[0] > 10 * stats["threshold"]


def test_the_threshold_flags_at_most_max_flagged_of_the_validation_xrays(setup):
    fit, val, _ = setup
    stats = fit_guard(**fit, config=GuardConfig(dims=16, max_flagged=0.1))
    flagged = guard_scores(val, stats) > stats["threshold"]
    assert flagged.sum() == 2  # floor(0.1 * 20), with distinct scores
    assert stats["fitted_on"] == {"train": 60, "val": 20}


def test_mahalanobis_matches_an_independent_computation(setup):
    """Lee et al.'s score, recomputed with scikit-learn's PCA and Ledoit-Wolf and SciPy's distance."""
    from scipy.spatial.distance import mahalanobis as scipy_mahalanobis
    from sklearn.covariance import LedoitWolf
    from sklearn.decomposition import PCA

    fit, val, _ = setup
    stats = fit_guard(**fit, config=GuardConfig(dims=12))
    pca = PCA(n_components=12, svd_solver="full").fit(fit["features"])
    reduced, labels = pca.transform(fit["features"]), fit["labels"]
    means = [reduced[labels == c].mean(0) for c in (0, 1)]
    precision = LedoitWolf(assume_centered=True).fit(reduced - np.array(means)[labels]).precision_
    expected = [min(scipy_mahalanobis(z, m, precision) for m in means) for z in pca.transform(val)]
    np.testing.assert_allclose(mahalanobis(val, stats), expected, rtol=2e-3)  # the whitening is stored as float16
    assert decode_array(stats["whiten"]).shape == (F, 12) and decode_array(stats["class_means"]).shape == (C, 12)


def test_energy_is_minus_t_logsumexp():
    logits = np.random.default_rng(3).normal(size=(7, 3)) * 5
    np.testing.assert_allclose(energy(logits, 2.0), -2.0 * logsumexp(logits / 2.0, axis=1), rtol=1e-12)


def test_energy_method_needs_logits_and_uses_its_own_threshold(setup):
    fit, val, others = setup
    stats = fit_guard(**fit, config=GuardConfig(method="energy", dims=16))
    assert stats["threshold"] == stats["thresholds"]["energy"] != stats["thresholds"]["mahalanobis"]
    with pytest.raises(ValueError, match="logits"):
        guard_scores(val, stats)
    warning = guard_warnings(others[0], np.array([-20.0, -20.0]), stats)  # logits far below the X-rays'
    assert warning and "energy score" in warning[0]


def test_stats_round_trip_through_json_and_are_deterministic(setup):
    fit, val, others = setup
    stats = fit_guard(**fit, config=GuardConfig(dims=16))
    text = json.dumps(stats)
    assert text == json.dumps(fit_guard(**fit, config=GuardConfig(dims=16)))  # same inputs, same bytes
    again = json.loads(text)
    both = np.concatenate([val, others])
    np.testing.assert_array_equal(guard_scores(both, again), guard_scores(both, stats))
    np.testing.assert_array_equal(guard_scores(both, load_guard(again)), guard_scores(both, stats))
    array = np.random.default_rng(4).normal(size=(3, 5)).astype(np.float32)
    np.testing.assert_array_equal(decode_array(json.loads(json.dumps(encode_array(array)))), array)
    np.testing.assert_array_equal(decode_array(encode_array(array, "float16")), array.astype(np.float16))


def test_no_stats_no_warning_and_a_newer_version_is_refused(setup):
    fit, val, _ = setup
    assert guard_warnings(val[0], None, None) == []
    stats = fit_guard(**fit, config=GuardConfig(dims=16))
    assert guard_warnings(np.full(F, np.nan), None, stats) == []  # an undecodable image: no score
    with pytest.raises(ValueError, match="newer"):
        load_guard({**stats, "version": GUARD_VERSION + 1})
    with pytest.raises(ValueError, match="unknown guard method"):
        fit_guard(**fit, config=GuardConfig(method="knn"))


def test_each_backend_gets_the_statistics_of_its_own_graph():
    guard = {"fp32": {"method": "mahalanobis"}}
    assert stats_for(guard, "fp32") is guard["fp32"]
    assert stats_for(guard, "int8") is None  # never fp32 statistics on int8 features
    assert stats_for(None, "fp32") is None
