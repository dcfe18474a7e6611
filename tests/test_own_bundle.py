"""A user's own run: its bundle carries the run's name, its metrics (in /v1/model) and a
description of its own data (web page footer, model card), not the shipped model's."""
import shutil

from fastapi.testclient import TestClient

from pneumoscope.runs.rundir import RunDir, model_name
from pneumoscope.runtime.classifier import Classifier
from pneumoscope.serve import SHIPPED_DATA, create_app


def model_card(classifier) -> dict:
    with TestClient(create_app(classifier, allowed_hosts=("testserver",))) as client:
        return client.get("/v1/model").json()


def test_a_run_names_its_bundle_after_itself():
    assert model_name("runs/default/three-resnet18-20261204") == "three-resnet18-20261204"
    assert model_name("runs/flowers/first", "flowers") == "flowers/first"


def test_a_runs_bundle_serves_its_own_name_metrics_and_data(tiny_run):
    run = RunDir(tiny_run)
    classifier = Classifier.load(tiny_run, backend="onnx")
    assert classifier.meta.name == "tiny" and not classifier.name.startswith("pneumoscope-")
    card = model_card(classifier)
    assert card["name"] == "tiny" and set(card["metrics"]) == {"val", "internal_test"}
    for name, split in (("val", "val"), ("internal_test", "test")):
        assert card["metrics"][name]["accuracy"] == run.report(split)["accuracy"]
        assert card["metrics"][name]["n"] == run.report(split)["n"]
    samples = run.samples()
    counts = {split: sum(s.split == split for s in samples) for split in ("train", "val", "test")}
    expected = (f"{len(samples)} images (train {counts['train']}, val {counts['val']}, "
                f"internal test {counts['test']}; 3 labels)")
    assert expected in card["training_data"] and "pediatric" not in card["training_data"]
    assert card["intended_use"].endswith(card["training_data"])  # the page footer shows intended_use


def test_a_shipped_bundle_describes_the_shipped_data(small_bundle, tmp_path, monkeypatch):
    shutil.copytree(small_bundle, tmp_path / "models" / "three")
    monkeypatch.setenv("PNEUMOSCOPE_MODELS", str(tmp_path / "models"))
    assert model_card(Classifier.load(backend="onnx"))["training_data"].startswith(SHIPPED_DATA)
    assert "not recorded" in model_card(Classifier.load(small_bundle, backend="onnx"))["training_data"]
