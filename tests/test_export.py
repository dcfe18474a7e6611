"""ONNX graphs: exported with their meta and fingerprint, re-made when stale (fp32), refused when
stale (int8); the shipped bundles' graphs are current."""
import json
import os
import shutil

import pytest

from conftest import ROOT, small_model
from pneumoscope.artifact import FINGERPRINT_KEY, META_KEY, graph_metadata, load_bundle, save_bundle
from pneumoscope.cli import main
from pneumoscope.predict import Classifier


@pytest.fixture()
def bundle_dir(small_bundle, tmp_path):
    """A private copy, so exporting into it does not change what other tests load."""
    return shutil.copytree(small_bundle, tmp_path / "bundle")


def test_export_cli_writes_the_bundles_graph(bundle_dir, capsys):
    (bundle_dir / "model.onnx").unlink()
    assert main(["export", "--checkpoint", str(bundle_dir)]) == 0
    assert f"wrote {bundle_dir / 'model.onnx'}" in capsys.readouterr().out
    bundle = load_bundle(bundle_dir)
    props = graph_metadata(bundle_dir / "model.onnx")
    assert props[FINGERPRINT_KEY] == bundle.fingerprint and json.loads(props[META_KEY]) == bundle.meta.to_json()
    assert bundle.onnx_path("fp32") == bundle_dir / "model.onnx"


def test_a_stale_graph_is_exported_again_into_the_cache(bundle_dir):
    meta = json.loads((bundle_dir / "meta.json").read_text())
    meta["temperature"] = 2.0  # shapes predictions: the graph's fingerprint no longer matches
    (bundle_dir / "meta.json").write_text(json.dumps(meta))
    bundle = load_bundle(bundle_dir)
    path = bundle.onnx_path("fp32")
    assert path != bundle_dir / "model.onnx" and path.is_relative_to(os.environ["PNEUMOSCOPE_CACHE"])
    assert graph_metadata(path)[FINGERPRINT_KEY] == bundle.fingerprint
    assert load_bundle(bundle_dir).onnx_path("fp32") == path  # same content: exported once
    meta["provenance"]["note"] = "does not shape predictions"
    (bundle_dir / "meta.json").write_text(json.dumps(meta))
    assert load_bundle(bundle_dir).onnx_path("fp32") == path


def test_int8_export_is_an_integer_graph_used_only_on_request(bundle_dir, fixture_data, capsys):
    import onnx

    assert main(["export", "--checkpoint", str(bundle_dir), "--int8"]) == 1  # no calibration data: refused
    assert "--calibration" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(bundle_dir), "--int8", "--calibration", str(fixture_data),
                 "--calibration-n", "32"]) == 0
    int8 = bundle_dir / "model.int8.onnx"
    assert int8.stat().st_size < (bundle_dir / "model.onnx").stat().st_size / 2
    graph = onnx.load(str(int8)).graph
    assert sum(n.op_type == "QuantizeLinear" for n in graph.node) > 10
    assert any(t.data_type == onnx.TensorProto.INT8 for t in graph.initializer)  # int8 weights
    assert [o.name for o in graph.output] == ["logits", "features"]
    props = graph_metadata(int8)
    assert json.loads(props["pneumoscope_quantization"])["calibration_images"] == 32
    assert Classifier.load(bundle_dir).backend in ("openvino", "onnx")  # auto keeps the fp32 graph, never int8
    fast = Classifier.load(bundle_dir, backend="int8")
    assert fast.backend == "int8" and fast.name.endswith("-int8@test")
    record = fast.predict(next((fixture_data / "val" / "NORMAL").iterdir()))
    assert record.status == "ok" and abs(sum(record.probabilities.values()) - 1) < 1e-4 and record.model == fast.name


def test_int8_of_other_weights_is_refused(bundle_dir, fixture_data, capsys):
    """The rule, not the quantiser: a graph made from the old weights, under the int8 name."""
    shutil.copy(bundle_dir / "model.onnx", bundle_dir / "model.int8.onnx")
    assert load_bundle(bundle_dir).onnx_path("int8") == bundle_dir / "model.int8.onnx"
    save_bundle(small_model(seed=1), load_bundle(bundle_dir).meta, bundle_dir, export=False)  # retrained in place
    path = str(next((fixture_data / "val" / "NORMAL").iterdir()))
    assert main(["predict", path, "--checkpoint", str(bundle_dir), "--backend", "int8"]) == 1
    err = capsys.readouterr().err.strip()
    assert "model.int8.onnx: was made from other weights or meta" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("task", ["three", "binary"])
def test_shipped_graphs_are_current_and_small(task):
    bundle = load_bundle(ROOT / "models" / task)
    for kind in ("fp32", "int8"):
        assert bundle.onnx_path(kind) == bundle.graph_location(kind)  # no re-export needed, none refused
    for path in bundle.path.iterdir():
        assert path.stat().st_size <= 20 * 2**20, path


def test_int8_calibration_images_pass_the_models_input_step(fixture_data, monkeypatch, tmp_path):
    """A model trained with CLAHE is calibrated on what it will see: stepped pixels."""
    import numpy as np

    from conftest import small_meta
    from pneumoscope import export
    from pneumoscope.data import read_dataset
    from pneumoscope.images import input_step

    samples = read_dataset(fixture_data).samples
    plain = export.calibration_pixels(samples, 64, n=4)
    assert (export.calibration_pixels(samples, 64, n=4, preprocess="clahe") == input_step(plain, "clahe")).all()
    seen = []
    monkeypatch.setattr(export, "quantize_int8", lambda fp32, out, pixels: seen.append(pixels) or out)
    bundle = save_bundle(small_model(), small_meta(preprocess="clahe"), tmp_path / "clahe")
    export.export_int8(bundle, samples, n_calibration=4)
    assert (seen[0] == input_step(plain, "clahe")).all()
