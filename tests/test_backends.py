"""ONNX export and the ONNX Runtime backend: same probabilities as PyTorch, found or made as needed."""
import os
import shutil

import numpy as np
import pytest

from pneumoscope.cli import main
from pneumoscope.predict import Classifier


@pytest.fixture()
def checkpoint(tiny_run, tmp_path):
    """A private copy, so exporting beside it does not change what other tests load."""
    for suffix in (".pt", ".json"):
        shutil.copy(tiny_run / f"model{suffix}", tmp_path / f"model{suffix}")
    return tmp_path / "model.pt"


def test_onnx_matches_pytorch_on_real_images(checkpoint, fixture_data):
    from pneumoscope.images import resize_square, read_xray

    paths = sorted((fixture_data / "val").rglob("*.jpeg"))
    onnx, eager = Classifier.load(checkpoint, backend="onnx"), Classifier.load(checkpoint, backend="torch")
    assert (onnx.backend, eager.backend) == ("onnx", "torch") and onnx.meta == eager.meta
    pixels = np.stack([resize_square(read_xray(p), eager.img_size) for p in paths])
    np.testing.assert_allclose(onnx.probabilities(pixels), eager.probabilities(pixels), atol=1e-4)
    np.testing.assert_allclose(onnx.probabilities(pixels[:3]), eager.probabilities(pixels[:3]), atol=1e-4)  # any batch


def test_export_cli_writes_the_file_auto_then_uses(checkpoint, fixture_data, capsys):
    from pneumoscope.export import onnx_for_checkpoint

    assert main(["export", "--checkpoint", str(checkpoint)]) == 0
    beside = checkpoint.with_suffix(".onnx")
    assert beside.stat().st_size > 0 and onnx_for_checkpoint(checkpoint) == beside
    assert Classifier.load(checkpoint).backend == "onnx"
    later = beside.stat().st_mtime_ns + 10**9  # a retrained checkpoint: the file beside it is stale
    os.utime(checkpoint, ns=(later, later))
    cached = onnx_for_checkpoint(checkpoint)
    assert cached != beside and cached.is_file() and cached.is_relative_to(os.environ["PNEUMOSCOPE_CACHE"])


def test_auto_falls_back_to_pytorch_and_onnx_does_not(checkpoint, monkeypatch):
    import pneumoscope.export

    def broken(_):
        raise RuntimeError("exporter exploded")

    monkeypatch.setattr(pneumoscope.export, "onnx_for_checkpoint", broken)
    assert Classifier.load(checkpoint, backend="auto").backend == "torch"
    with pytest.raises(RuntimeError, match="exploded"):
        Classifier.load(checkpoint, backend="onnx")
    with pytest.raises(ValueError, match="backend"):
        Classifier.load(checkpoint, backend="tensorrt")


def test_predict_backend_flag(checkpoint, fixture_data, capsys):
    path = str(next((fixture_data / "val" / "NORMAL").iterdir()))
    outputs = []
    for backend in ("torch", "onnx"):
        assert main(["predict", path, "--checkpoint", str(checkpoint), "--backend", backend, "--format", "csv"]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]  # 4-decimal probabilities agree


def test_int8_export_is_an_integer_graph_used_only_on_request(checkpoint, fixture_data, capsys):
    import onnx

    assert main(["export", "--checkpoint", str(checkpoint), "--int8"]) == 1  # no calibration data: refused
    assert "--calibration" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(checkpoint), "--int8", "--calibration", str(fixture_data),
                 "--calibration-n", "32"]) == 0
    int8 = checkpoint.with_suffix(".int8.onnx")
    assert int8.is_file() and int8.stat().st_size < checkpoint.stat().st_size / 2
    graph = onnx.load(str(int8)).graph
    assert sum(n.op_type == "QuantizeLinear" for n in graph.node) > 10
    assert any(t.data_type == onnx.TensorProto.INT8 for t in graph.initializer)  # int8 weights
    assert Classifier.load(checkpoint).backend == "onnx"  # auto keeps full precision
    fast = Classifier.load(checkpoint, backend="int8")
    assert fast.backend == "int8" and fast.name.endswith("-int8@" + fast.meta["version"])
    assert fast.meta["quantization"]["calibration_images"] == 32
    record = fast.predict(next((fixture_data / "val" / "NORMAL").iterdir()))
    assert record.status == "ok" and abs(sum(record.probabilities.values()) - 1) < 1e-4 and record.model == fast.name


@pytest.mark.parametrize("task", ["three", "binary"])
def test_shipped_int8_agrees_with_full_precision_on_real_images(fixture_data, task):
    from pneumoscope.images import resize_square, read_xray

    fast, exact = Classifier.load(task=task, backend="int8"), Classifier.load(task=task, backend="onnx")
    paths = sorted(fixture_data.rglob("*.jpeg"))
    pixels = np.stack([resize_square(read_xray(p), exact.img_size) for p in paths])
    p_fast, p_exact = fast.probabilities(pixels), exact.probabilities(pixels)
    assert (p_fast.argmax(1) == p_exact.argmax(1)).mean() >= 0.9
    assert np.abs(p_fast - p_exact).mean() < 0.05


def test_int8_of_another_checkpoint_is_refused(checkpoint, fixture_data):
    assert main(["export", "--checkpoint", str(checkpoint), "--int8", "--calibration", str(fixture_data),
                 "--calibration-n", "16"]) == 0
    import torch

    changed = torch.load(checkpoint, weights_only=True)  # a retrained model in place of the old one
    next(iter(changed["state_dict"].values())).add_(0.01)
    torch.save(changed, checkpoint)
    with pytest.raises(ValueError, match="another version"):
        Classifier.load(checkpoint, backend="int8")
