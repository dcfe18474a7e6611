"""Backends: PyTorch and ONNX Runtime give the same logits and features; the policy that picks one."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from pneumoscope.bundle import load_bundle
from pneumoscope.cli import main
from pneumoscope.data.images import to_batch
from pneumoscope.nets.build import load_network
from pneumoscope.runtime.backends import OnnxBackend, TorchBackend, open_backend
from pneumoscope.runtime.classifier import Classifier
from pneumoscope.runtime.export import graph_path, save_with_graph


@pytest.fixture(scope="module")
def batch(fixture_data):
    from pneumoscope.data.images import read_xray, resize_square

    paths = sorted((fixture_data / "val").rglob("*.jpeg"))
    return to_batch(np.stack([resize_square(read_xray(p), 64) for p in paths]))


def test_torch_and_onnx_give_the_same_logits_and_features(small_bundle, batch):
    bundle = load_bundle(small_bundle)
    eager, graph = TorchBackend(load_network(bundle)), OnnxBackend(graph_path(bundle, "fp32"))
    for rows in (batch, batch[:3], batch[:1]):  # any batch size
        (logits_t, features_t), (logits_o, features_o) = eager.run(rows), graph.run(rows)
        assert logits_t.shape == (len(rows), 3) and features_t.shape == (len(rows), 1280)
        np.testing.assert_allclose(logits_o, logits_t, atol=1e-4)
        np.testing.assert_allclose(features_o, features_t, atol=1e-4)
    assert graph.single_thread().threads == 1 and graph.single_thread() is graph.single_thread()


def test_the_features_feed_the_classifier_layer(small_bundle, batch):
    """`features` are what the last linear layer reads: applying it to them gives the logits."""
    import torch

    model = load_network(load_bundle(small_bundle))
    logits, features = TorchBackend(model).run(batch)
    head = model.backbone.get_classifier()
    with torch.no_grad():
        np.testing.assert_allclose(head(torch.from_numpy(features)).numpy(), logits, atol=1e-5)


def test_policy(small_bundle, monkeypatch):
    bundle = load_bundle(small_bundle)
    # auto: OpenVINO where installed (a core dependency), else ONNX Runtime, else PyTorch
    expected = "openvino" if importlib.util.find_spec("openvino") else "onnx"
    assert open_backend(bundle, "auto").name == expected and open_backend(bundle, "torch").name == "torch"
    assert open_backend(bundle, "onnx").name == "onnx"
    with pytest.raises(ValueError, match="backend"):
        open_backend(bundle, "tensorrt")
    with pytest.raises(ValueError, match="model.int8.onnx: does not exist"):
        open_backend(bundle, "int8")  # never silently full precision

    def broken(*args, **kwargs):
        raise RuntimeError("exporter exploded")

    import pneumoscope.runtime.backends

    monkeypatch.setattr(pneumoscope.runtime.backends, "OpenVinoBackend", broken)  # not installed, say
    assert open_backend(bundle, "auto").name == "onnx"  # falls back, with a logged warning
    monkeypatch.setattr(pneumoscope.runtime.backends, "_graph", broken)
    assert open_backend(bundle, "auto").name == "torch"  # falls back, with a logged warning
    with pytest.raises(RuntimeError, match="exploded"):
        open_backend(bundle, "onnx")


def test_predict_backend_flag(small_bundle, fixture_data, capsys):
    path = str(next((fixture_data / "val" / "NORMAL").iterdir()))
    outputs = []
    for backend in ("torch", "onnx"):
        assert main(["predict", path, "--checkpoint", str(small_bundle), "--backend", backend, "--format", "csv"]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]  # 4-decimal probabilities agree


@pytest.mark.parametrize("task", ["three", "binary"])
def test_shipped_int8_agrees_with_full_precision_on_real_images(fixture_data, task):
    fast, exact = Classifier.load(task=task, backend="int8"), Classifier.load(task=task, backend="onnx")
    assert fast.name.endswith("-int8@" + exact.meta.version) and exact.name == load_bundle(exact.bundle.path).name
    paths = sorted(fixture_data.rglob("*.jpeg"))
    p_fast, p_exact = fast.scores(paths).probabilities, exact.scores(paths).probabilities
    assert (p_fast.argmax(1) == p_exact.argmax(1)).mean() >= 0.9
    assert np.abs(p_fast - p_exact).mean() < 0.05


def test_openvino_gives_the_logits_and_features_of_onnx_runtime(small_bundle, batch):
    """OpenVINO on the same fp32 graph, both hints, any batch size; full precision forced so the
    comparison is exact whatever the CPU (bf16 is a per-CPU choice, measured in benchmarks)."""
    pytest.importorskip("openvino")
    from pneumoscope.runtime.backends import OpenVinoBackend

    bundle = load_bundle(small_bundle)
    reference = OnnxBackend(graph_path(bundle, "fp32"))
    latency = OpenVinoBackend(graph_path(bundle, "fp32"), precision="f32")
    folder = latency.single_thread()
    assert folder.hint == "THROUGHPUT" and folder is latency.single_thread() and latency.hint == "LATENCY"
    for rows in (batch, batch[:3], batch[:1]):
        (logits_r, features_r) = reference.run(rows)
        for runtime in (latency, folder):
            logits, features = runtime.run(rows)
            np.testing.assert_allclose(logits, logits_r, atol=1e-4)
            np.testing.assert_allclose(features, features_r, atol=1e-4)
    assert open_backend(bundle, "openvino").name == "openvino"
    with pytest.raises(ValueError, match="model.int8.onnx: does not exist"):
        open_backend(bundle, "openvino-int8")  # never silently full precision


def test_openvino_folder_runs_side_by_side_in_input_order(small_bundle, fixture_data):
    """A folder on OpenVINO goes through the THROUGHPUT sibling from several threads; records come
    back in input order with the probabilities of ONNX Runtime."""
    pytest.importorskip("openvino")
    from pneumoscope.runtime.backends import OpenVinoBackend

    bundle = load_bundle(small_bundle)
    paths = sorted(fixture_data.rglob("*.jpeg"))
    exact = Classifier(OnnxBackend(graph_path(bundle, "fp32")), bundle.meta, bundle).scores(paths, batch_size=4)
    runtime = OpenVinoBackend(graph_path(bundle, "fp32"), precision="f32")
    fast = Classifier(runtime, bundle.meta, bundle)
    fast.workers = 2
    got = fast.scores(paths, batch_size=4)
    assert got.names == exact.names and runtime._single is not None  # the folder path used the sibling
    np.testing.assert_allclose(got.probabilities, exact.probabilities, atol=1e-4)


def test_openvino_writes_nothing_to_the_home_folder(small_bundle, tmp_path):
    """Importing openvino starts its converter's telemetry (a usage counter in ~/intel): off, like
    ONNX Runtime's. A fresh process, whose home is an empty folder, runs one image on OpenVINO."""
    pytest.importorskip("openvino")
    import os
    import subprocess
    import sys

    image = str(next(Path(__file__).parent.joinpath("fixtures").rglob("*.jpeg")))
    home = tmp_path / "home"
    home.mkdir()
    code = ("import sys; from pneumoscope.cli import main; "
            f"sys.exit(main(['predict', {image!r}, '--checkpoint', {str(small_bundle)!r}, '--backend', 'openvino']))")
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "HOME": str(home)}, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert list(home.iterdir()) == []


def test_a_merged_binary_read_never_runs_on_openvino(tmp_path):
    """OpenVINO 2026.4 gets the merged (binary-from-three) graph wrong (or fails to convert it):
    auto runs it on ONNX Runtime, an explicit request is a one-line error."""
    from conftest import small_meta, small_model

    from pneumoscope.nets.build import build_model

    meta = small_meta()
    binary = meta.replace(task="binary", classes=("NORMAL", "PNEUMONIA"), merge_outputs=((0,), (1, 2)))
    bundle = load_bundle(save_with_graph(build_model(binary, small_model().state_dict()), binary, tmp_path / "binary"))
    assert open_backend(bundle, "auto").name == "onnx"
    with pytest.raises(ValueError, match="merged"):
        open_backend(bundle, "openvino")


# ------------------------------------------------------------------ hostile graphs (issue 26)
def hostile_graphs(small_bundle, root):
    """Copies of the small bundle whose model.onnx keeps the bundle's fingerprint (so it is not
    stale) but is truncated, names its outputs otherwise, gives 5 logits for 3 classes, or keeps a
    weight in a file outside the bundle."""
    import shutil

    import onnx
    from conftest import small_model
    from onnx import external_data_helper

    from pneumoscope.bundle import FINGERPRINT_KEY, ONNX_FP32
    from pneumoscope.runtime.export import onnx_bytes, set_metadata

    def copy(name):
        shutil.copytree(small_bundle, root / name)
        return root / name, root / name / ONNX_FP32

    good = onnx.load(str(small_bundle / ONNX_FP32))
    fingerprint = {p.key: p.value for p in good.metadata_props}[FINGERPRINT_KEY]
    out = {}
    bundle, graph = copy("truncated")
    graph.write_bytes(graph.read_bytes()[: graph.stat().st_size // 2])
    out["truncated"] = bundle
    bundle, graph = copy("renamed")
    renamed = onnx.load(str(graph))
    for node in renamed.graph.node:
        node.output[:] = ["scores" if o == "logits" else o for o in node.output]
    renamed.graph.output[0].name = "scores"
    onnx.save(renamed, str(graph))
    out["renamed"] = bundle
    bundle, graph = copy("five-logits")
    five = onnx.load_from_string(onnx_bytes(small_model("simple_cnn", n_classes=5), load_bundle(small_bundle).meta))
    set_metadata(five, {FINGERPRINT_KEY: fingerprint})
    onnx.save(five, str(graph))
    out["five-logits"] = bundle
    bundle, graph = copy("external")
    outside = onnx.load(str(graph))
    tensor = max(outside.graph.initializer, key=lambda t: len(t.raw_data))
    (root / "outside.bin").write_bytes(tensor.raw_data)
    external_data_helper.set_external_data(tensor, location="../outside.bin")
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    onnx.save(outside, str(graph))
    out["external"] = bundle
    return out


@pytest.mark.parametrize("backend", ["onnx", "openvino"])
def test_hostile_graphs_are_one_line_errors_and_auto_falls_back(small_bundle, tmp_path, capsys, backend):
    if backend == "openvino":
        pytest.importorskip("openvino")
    image = str(next(Path(__file__).parent.joinpath("fixtures").rglob("*.jpeg")))
    reasons = {"truncated": "not a readable ONNX graph",
               "renamed": "scores; pneumoscope runs graphs from pixels to logits",
               "five-logits": "5 logits for the 3 classes", "external": "outside"}
    for case, bundle in hostile_graphs(small_bundle, tmp_path).items():
        assert main(["predict", image, "--checkpoint", str(bundle), "--backend", backend]) == 1, case
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert str(bundle / "model.onnx") in err and reasons[case] in err and err.startswith("pneumoscope: error:"), err
        if backend == "onnx":  # once is enough: auto ends on PyTorch, with the weights
            assert main(["predict", image, "--checkpoint", str(bundle)]) == 0, case
            capsys.readouterr()
