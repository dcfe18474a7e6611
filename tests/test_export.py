"""ONNX graphs: exported with their meta and fingerprint, re-made when stale (fp32), refused when
stale (int8); the shipped bundles' graphs are current."""
import json
import os
import shutil

import pytest
from conftest import ROOT, small_model

from pneumoscope.bundle import FINGERPRINT_KEY, META_KEY, graph_metadata, load_bundle, save_bundle
from pneumoscope.cli import main
from pneumoscope.runtime.classifier import Classifier
from pneumoscope.runtime.export import graph_path, save_with_graph


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
    assert graph_path(bundle, "fp32") == bundle_dir / "model.onnx"


def test_a_stale_graph_is_exported_again_into_the_cache(bundle_dir):
    meta = json.loads((bundle_dir / "meta.json").read_text())
    meta["temperature"] = 2.0  # shapes predictions: the graph's fingerprint no longer matches
    (bundle_dir / "meta.json").write_text(json.dumps(meta))
    bundle = load_bundle(bundle_dir)
    path = graph_path(bundle, "fp32")
    assert path != bundle_dir / "model.onnx" and path.is_relative_to(os.environ["PNEUMOSCOPE_CACHE"])
    assert graph_metadata(path)[FINGERPRINT_KEY] == bundle.fingerprint
    assert graph_path(load_bundle(bundle_dir), "fp32") == path  # same content: exported once
    meta["provenance"]["note"] = "does not shape predictions"
    (bundle_dir / "meta.json").write_text(json.dumps(meta))
    assert graph_path(load_bundle(bundle_dir), "fp32") == path


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
    assert graph_path(load_bundle(bundle_dir), "int8") == bundle_dir / "model.int8.onnx"
    save_bundle(small_model(seed=1), load_bundle(bundle_dir).meta, bundle_dir)  # retrained in place
    path = str(next((fixture_data / "val" / "NORMAL").iterdir()))
    assert main(["predict", path, "--checkpoint", str(bundle_dir), "--backend", "int8"]) == 1
    err = capsys.readouterr().err.strip()
    assert "model.int8.onnx: was made from other weights or meta" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("task", ["three", "binary"])
def test_shipped_graphs_are_current_and_small(task):
    bundle = load_bundle(ROOT / "models" / task)
    for kind in ("fp32", "int8"):
        assert graph_path(bundle, kind) == bundle.graph_location(kind)  # no re-export needed, none refused
    for path in bundle.path.iterdir():
        assert path.stat().st_size <= 20 * 2**20, path


def test_int8_calibration_images_pass_the_models_input_step(fixture_data, monkeypatch, tmp_path):
    """A model trained with CLAHE is calibrated on what it will see: stepped pixels."""

    from conftest import small_meta

    from pneumoscope.data.datasets import read_dataset
    from pneumoscope.data.images import input_step
    from pneumoscope.runtime import export

    samples = read_dataset(fixture_data).samples
    plain = export.calibration_pixels(samples, 64, n=4)
    assert (export.calibration_pixels(samples, 64, n=4, preprocess="clahe") == input_step(plain, "clahe")).all()
    seen = []
    monkeypatch.setattr(export, "quantize_int8", lambda fp32, out, pixels: seen.append(pixels) or out)
    bundle = save_with_graph(small_model(), small_meta(preprocess="clahe"), tmp_path / "clahe")
    export.export_int8(bundle, samples, n_calibration=4)
    assert (seen[0] == input_step(plain, "clahe")).all()


def test_a_pool_smaller_than_its_output_exports_and_answers_as_pytorch():
    """Issue 22: vgg16_bn (7 x 7 pool) and alexnet (6 x 6) at an --img-size other than 224 trained,
    then failed the ONNX export with ~200 lines of Torch IR. The pools now export at every size."""
    import numpy as np
    import torch
    from conftest import small_meta
    from timm.models.vgg import ConvMlp

    from pneumoscope.nets.registry import XrayNet, _head, exportable_pools
    from pneumoscope.runtime.backends import OnnxBackend
    from pneumoscope.runtime.export import onnx_bytes

    class Tiny(torch.nn.Module):  # a VGG head and an AlexNet pool on a 4 x 4 feature map
        def __init__(self):
            super().__init__()
            self.features = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, stride=8, padding=1),
                                                torch.nn.AdaptiveAvgPool2d((6, 6)))
            self.pre_logits = ConvMlp(4, 8, kernel_size=7)
            self.head = _head(8, 3)

        def forward(self, x):
            return self.head(self.pre_logits(torch.nn.functional.max_pool2d(self.features(x), 3)))

        def get_classifier(self):  # as every registered backbone answers it (timm's API)
            return self.head[-1]

    model = XrayNet(exportable_pools(Tiny()), 0.5, 0.25).eval()
    graph = onnx_bytes(model, small_meta("simple_cnn", img_size=32))  # the smallest size a bundle takes
    pixels = np.random.default_rng(0).integers(0, 255, (2, 32, 32), dtype=np.uint8)
    logits, _ = OnnxBackend(graph).run(pixels.astype(np.float32)[:, None] / 255)
    with torch.no_grad():
        expected = model(torch.from_numpy(pixels.astype(np.float32)[:, None] / 255))
    assert np.allclose(logits, expected.numpy(), atol=1e-5)


def test_an_export_failure_is_one_line():
    """A network the exporter refuses (alexnet below the 63 px its pools need) gives one line naming
    it, not the exporter's graph dump."""
    from conftest import small_meta, small_model

    from pneumoscope.runtime.export import ExportError, onnx_bytes

    with pytest.raises(ExportError) as err:
        onnx_bytes(small_model("alexnet"), small_meta("alexnet", img_size=32))
    message = str(err.value)
    assert "\n" not in message and len(message) < 400
    assert message.startswith("test-alexnet-three: alexnet at 32 px does not export to ONNX (RuntimeError: ")


def test_an_image_size_an_architecture_cannot_take_is_refused_before_training(tmp_path, fixture_data, capsys):
    assert main(["train", "--data", str(fixture_data), "--arch", "alexnet", "--img-size", "32",
                 "--out", str(tmp_path / "run")]) == 1
    assert capsys.readouterr().err == "pneumoscope: error: --img-size 32: alexnet needs at least 63 px\n"
    assert not (tmp_path / "run").exists()
