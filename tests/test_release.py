"""Shipping a run: checkpoints, int8 graphs, evaluation reports and the generated model card."""
import json

from pneumoscope.cli import main
from pneumoscope.predict import Classifier


def test_ship_with_binary_and_int8_then_card(tiny_run, tmp_path, capsys):
    models, docs = tmp_path / "models", tmp_path / "docs"
    assert main(["ship", "--run", str(tiny_run), "--models-dir", str(models), "--docs-dir", str(docs),
                 "--binary-from-three", "--int8", "24"]) == 0
    for task, classes in (("three", ["NORMAL", "BACTERIA", "VIRUS"]), ("binary", ["NORMAL", "PNEUMONIA"])):
        checkpoint = models / f"pneumoscope-{task}.pt"
        meta = json.loads(checkpoint.with_suffix(".json").read_text())
        assert meta["classes"] == classes and meta["metrics_backend"] == "onnx"
        assert set(meta["metrics"]) == set(meta["metrics_int8"]) == {"val", "internal_test"}
        assert meta["training"]["epochs_run"] == 2 and len(meta["training"]["curve"]) == 2
        classifier = Classifier.load(checkpoint, backend="int8")
        assert classifier.classes == tuple(classes)
        test_report = json.loads((docs / "model-card" / task / "test" / "metrics.json").read_text())
        assert test_report["accuracy"] == meta["metrics"]["internal_test"]["accuracy"]
        assert (docs / "model-card" / task / "test" / "confusion_matrix.png").stat().st_size > 0
    card = (docs / "model-card.md").read_text()
    three = json.loads((models / "pneumoscope-three.json").read_text())
    assert f"{three['metrics']['internal_test']['accuracy']:.3f}" in card
    assert "Not a diagnosis" in card and "binary" in card and "internal_test (int8)" in card


def test_reshipping_without_int8_removes_the_stale_graph(tiny_run, tmp_path):
    models, docs = tmp_path / "models", tmp_path / "docs"
    assert main(["ship", "--run", str(tiny_run), "--models-dir", str(models), "--docs-dir", str(docs),
                 "--int8", "16"]) == 0
    assert (models / "pneumoscope-three.int8.onnx").is_file()
    assert main(["ship", "--run", str(tiny_run), "--models-dir", str(models), "--docs-dir", str(docs)]) == 0
    assert not (models / "pneumoscope-three.int8.onnx").exists()
    assert "metrics_int8" not in json.loads((models / "pneumoscope-three.json").read_text())
