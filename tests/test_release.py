"""Shipping a run: bundles, int8 graphs, evaluation reports and the generated model card."""
import csv
import importlib.util
import json

import pytest
from conftest import FIXTURE_DATA

from pneumoscope import INTENDED_USE
from pneumoscope.bundle import load_bundle
from pneumoscope.cli import main
from pneumoscope.data.datasets import class_indices
from pneumoscope.evaluation.metrics import fit_temperature
from pneumoscope.runs.rundir import RunDir
from pneumoscope.runtime.classifier import Classifier, softmax

pytestmark = pytest.mark.slow


def test_ship_with_binary_and_int8_then_card_then_reship_without_int8(tiny_run, tmp_path):
    models, docs = tmp_path / "models", tmp_path / "docs"
    assert main(["ship", "--run", str(tiny_run), "--models-dir", str(models), "--docs-dir", str(docs),
                 "--binary-from-three", "--int8", "16", "--external", str(FIXTURE_DATA)]) == 0
    for task, classes in (("three", ("NORMAL", "BACTERIA", "VIRUS")), ("binary", ("NORMAL", "PNEUMONIA"))):
        bundle = load_bundle(models / task)
        metrics = bundle.metrics()
        assert bundle.meta.classes == classes and metrics["backend"] == "onnx"
        # int8 (and OpenVINO, the default backend, where its graph converts) beside fp32 on every group
        runtimes = {"int8"} | ({"openvino"} if "openvino" in metrics else set())
        assert set(metrics) - {"openvino_precision"} == {"val", "internal_test", "external", "backend"} | runtimes
        for runtime in runtimes:
            assert set(metrics[runtime]) == {"val", "internal_test", "external"}
        training = bundle.meta.provenance["training"]
        assert training["epochs_run"] == 2 and [c["epoch"] for c in training["curve"]] == [0, 1]
        assert Classifier.load(models / task, backend="int8").classes == classes
        # the input guard is fitted for each graph on the run's training X-rays: the network's own classes
        assert set(bundle.meta.guard) == {"fp32", "int8"}
        assert all(g["class_means"]["shape"][0] == 3 and g["fitted_on"]["train"] > 0 for g in bundle.meta.guard.values())
        assert Classifier.load(models / task).guard is not None
        test_report = json.loads((docs / "model-card" / task / "test" / "metrics.json").read_text())
        assert test_report["accuracy"] == metrics["internal_test"]["accuracy"]
        assert (docs / "model-card" / task / "test" / "confusion_matrix.png").stat().st_size > 0

    # the binary model is the same network read through a merge: at T = 1 its NORMAL probability
    # is the 3-class one; it has a temperature of its own
    three, binary = (Classifier.load(models / task, backend="torch") for task in ("three", "binary"))
    image = str(next(FIXTURE_DATA.rglob("*.jpeg")))
    p3 = softmax(three.scores([image]).logits)[0]
    p2 = softmax(binary.scores([image]).logits)[0]
    assert p2 == pytest.approx([p3[0], p3[1] + p3[2]], abs=1e-5)
    assert binary.meta.merge_outputs == ((0,), (1, 2)) and binary.meta.temperature != three.meta.temperature
    # its temperature is fitted the way the 3-class run fitted its own (augmented validation views),
    # not on the plain validation logits
    assert binary.meta.provenance["calibration"] == three.meta.provenance["calibration"] == "augmented"
    val = [s for s in RunDir(tiny_run).samples() if s.split == "val"]
    on_plain_val = fit_temperature(binary.scores([s.path for s in val]).logits,
                                   class_indices(val, binary.classes, "binary"))
    assert binary.meta.temperature != pytest.approx(on_plain_val, rel=1e-3)

    card = (docs / "model-card.md").read_text()
    assert f"{load_bundle(models / 'three').metrics()['internal_test']['accuracy']:.3f}" in card
    # the shipped names, and the run's own data (not the shipped models' 5,232 images)
    assert [load_bundle(models / t).meta.name for t in ("three", "binary")] == \
        ["pneumoscope-efficientnet_lite0-three", "pneumoscope-efficientnet_lite0-binary"]
    samples = RunDir(tiny_run).samples()
    counts = {split: sum(s.split == split for s in samples) for split in ("train", "val", "test")}
    assert (f"trained and measured on {len(samples)} images (train {counts['train']}, val {counts['val']}, "
            f"internal test {counts['test']}; 3 labels) from {FIXTURE_DATA}") in card and "5,232" not in card
    assert INTENDED_USE in card and "binary" in card and "internal_test (int8)" in card
    # ship records the patients whose images hold two labels, and the card quotes them
    labels = {}
    for s in samples:
        labels.setdefault(s.patient_id, set()).add(s.label)
    spans = sorted({tuple(sorted(held)) for held in labels.values() if len(held) > 1})
    recorded = load_bundle(models / "three").meta.provenance["data"]["patients_across_labels"]
    assert [tuple(c["labels"]) for c in recorded] == spans
    assert ("no patient id holds files of two classes" if not spans else "patient ids hold files of both") in card
    # ship draws the internal test's most confident mistakes; the card links them
    for task in ("three", "binary"):
        test = docs / "model-card" / task / "test"
        with open(test / "predictions.csv", newline="") as handle:
            wrong = any(r["true"] != r["predicted"] for r in csv.DictReader(handle))
        assert (test / "mistakes.png").is_file() == wrong == (f"model-card/{task}/test/mistakes.png" in card)
    assert "external (used for selection) (int8)" in card
    if importlib.util.find_spec("openvino"):  # the 3-class graph converts; the merged binary read does not
        assert "openvino" in load_bundle(models / "three").metrics() and "internal_test (openvino)" in card

    assert main(["ship", "--run", str(tiny_run), "--models-dir", str(models), "--docs-dir", str(docs)]) == 0
    assert not (models / "three" / "model.int8.onnx").exists()  # made from the model it replaced
    assert "int8" not in load_bundle(models / "three").metrics()
    assert set(load_bundle(models / "three").meta.guard) == {"fp32"}

