"""Ensembles: members averaged in logit space, one bundle and one graph, built from finished runs."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import EXAMPLES, SMALL_SIZE, small_meta, small_model

from pneumoscope.bundle import ENSEMBLE, REPO_MODELS, BundleError, graph_fingerprint, load_bundle
from pneumoscope.nets.registry import Ensemble, LogitsAndFeatures
from pneumoscope.runs.rundir import RunDir, summarize
from pneumoscope.runtime.export import graph_path, save_with_graph


def small_ensemble() -> tuple[Ensemble, object]:
    # members share their normalisation (build_ensemble checks it): two Lite0 with different random heads
    model = Ensemble([small_model("efficientnet_lite0", seed=0), small_model("efficientnet_lite0", seed=1)]).eval()
    return model, ensemble_meta()


def ensemble_meta(**changes):
    from pneumoscope.bundle import ModelMeta
    from pneumoscope.nets.registry import model_spec

    spec = model_spec("efficientnet_lite0")
    values = dict(name="test-ensemble", task="three", classes=("NORMAL", "BACTERIA", "VIRUS"), arch=ENSEMBLE,
                  members=("efficientnet_lite0", "efficientnet_lite0"), img_size=SMALL_SIZE, mean=spec.mean, std=spec.std,
                  temperature=1.5)
    return ModelMeta(**{**values, **changes})


def test_an_ensemble_is_the_mean_of_its_members_logits_with_their_features_side_by_side():
    model, _ = small_ensemble()
    x = torch.rand(3, 1, SMALL_SIZE, SMALL_SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        members = [m(x) for m in model.members]
        logits, features = LogitsAndFeatures(model)(x)
        own = [LogitsAndFeatures(m)(x)[1] for m in model.members]
    assert torch.allclose(logits, (members[0] + members[1]) / 2, atol=1e-6)
    assert not torch.allclose(members[0], members[1])  # two different networks, so the mean is not either
    assert torch.equal(features, torch.cat(own, dim=1))


def test_an_ensemble_bundle_is_one_graph_that_every_backend_reads_alike(tmp_path):
    from pneumoscope.data.images import read_xray, resize_square
    from pneumoscope.runtime.classifier import Classifier

    model, meta = small_ensemble()
    path = save_with_graph(model, meta, tmp_path / "ens")
    bundle = load_bundle(path)
    assert bundle.meta.members == ("efficientnet_lite0", "efficientnet_lite0")
    assert graph_fingerprint(path / "model.onnx") == bundle.fingerprint  # the bundle's own graph, not stale
    pixels = np.stack([resize_square(read_xray(p), SMALL_SIZE) for p in sorted(EXAMPLES.rglob("*.jpeg"))[:4]])
    reference = Classifier.load(path, backend="torch").score_pixels(pixels)
    for backend, tolerance in (("onnx", 1e-3), ("auto", 0.15)):  # auto: OpenVINO, in bf16 where the CPU has it
        scores = Classifier.load(path, backend=backend).score_pixels(pixels)
        np.testing.assert_allclose(scores.logits, reference.logits, atol=tolerance)
        assert scores.features.shape == reference.features.shape == (4, 1280 + 1280)


def test_a_meta_says_ensemble_exactly_when_it_lists_members():
    with pytest.raises(BundleError, match="ensemble"):
        ensemble_meta(members=None)
    with pytest.raises(BundleError, match="ensemble"):
        small_meta(members=("efficientnet_lite0", "simple_cnn"))


def test_members_keep_the_fingerprints_of_bundles_made_before_ensembles():
    """A field added to the meta must not make every shipped graph stale."""
    for task in ("three", "binary"):
        bundle = load_bundle(REPO_MODELS / task)
        assert graph_path(bundle) == REPO_MODELS / task / "model.onnx"


@pytest.mark.slow
def test_ensemble_of_two_runs_is_a_run_that_ship_and_cam_take(tiny_run, tmp_path):
    from pneumoscope.cli import main
    from pneumoscope.runtime.classifier import Classifier
    from pneumoscope.runtime.explain import cam_heatmap

    second = shutil.copytree(tiny_run, tmp_path / "second")  # a member twice is a valid ensemble (and no training)
    out = tmp_path / "ens"
    assert main(["ensemble", "--runs", str(tiny_run), str(second), "--out", str(out)]) == 0
    run = RunDir(out)
    meta = run.model_meta()
    assert (meta.arch, meta.members) == (ENSEMBLE, ("efficientnet_lite0", "efficientnet_lite0"))
    assert [m["run"] for m in meta.provenance["members"]] == [tiny_run.name, "second"]
    assert 0.05 < meta.temperature < 20 and run.report("test")["accuracy"] == RunDir(tiny_run).report("test")["accuracy"]
    assert run.status()["status"] == "finished" and run.report("val")["n"] > 0 and run.report("test")["n"] > 0
    assert run.samples() == RunDir(tiny_run).samples()
    assert (summarize(out)["arch"], summarize(out)["test_acc"]) == (ENSEMBLE, run.report("test")["accuracy"])
    classifier = Classifier.load(run.bundle)
    decoded = classifier.decode(sorted(EXAMPLES.rglob("*.jpeg"))[0])
    heat = cam_heatmap(classifier, decoded.pixels)
    assert heat.shape == (classifier.img_size,) * 2 and heat.max() > heat.min()
    models, docs = tmp_path / "models", tmp_path / "docs"
    assert main(["ship", "--run", str(out), "--models-dir", str(models), "--docs-dir", str(docs)]) == 0
    card = (docs / "model-card.md").read_text()
    assert "ensemble of `efficientnet_lite0` + `efficientnet_lite0`" in card and "averaged in logit space" in card
    assert json.loads((models / "three" / "meta.json").read_text())["guard"]  # ship fitted its input guard


@pytest.mark.slow
def test_ensemble_refuses_runs_of_other_patients_in_one_line(tiny_run, tmp_path, capsys):
    from pneumoscope.bundle import write_meta
    from pneumoscope.cli import main

    other = shutil.copytree(tiny_run, tmp_path / "other")
    meta = RunDir(other).model_meta()
    write_meta(other / "model", meta.replace(provenance={**meta.provenance, "manifest_hash": "0123456789abcdef"}))
    assert main(["ensemble", "--runs", str(tiny_run), str(other), "--out", str(tmp_path / "e")]) == 1
    assert "trained on another manifest" in capsys.readouterr().err
    assert main(["ensemble", "--runs", str(tiny_run), "--out", str(tmp_path / "e")]) == 1
    assert not (tmp_path / "e").exists()
