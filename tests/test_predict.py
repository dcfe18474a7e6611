"""Prediction: scores as arrays, records, the CLI, batches side by side, and what one prediction imports."""
import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import EXAMPLES, ROOT, small_meta, small_model

from pneumoscope.cli import main
from pneumoscope.data.images import read_xray
from pneumoscope.runtime.classifier import Classifier, softmax
from pneumoscope.runtime.export import save_with_graph


def test_softmax_with_temperature_is_scipys():
    from scipy.special import softmax as scipy_softmax

    logits = np.array([[2.0, 0.0], [0.0, 0.0]])
    assert softmax(logits) == pytest.approx(np.array([[1 / (1 + np.exp(-2)), 1 / (1 + np.exp(2))], [0.5, 0.5]]))
    assert softmax(logits, 2.0)[0, 0] == pytest.approx(1 / (1 + np.exp(-1)))
    many = np.random.default_rng(0).normal(0, 8, (1000, 3)).astype(np.float32)
    assert np.array_equal(softmax(many, 0.74), scipy_softmax(many.astype(np.float64) / 0.74, axis=1))


def test_python_api_on_path_and_array(classifier, fixture_data):
    path = next((fixture_data / "val" / "NORMAL").iterdir())
    record = classifier.predict(path)
    assert record.status == "ok" and record.label in classifier.classes and record.path == str(path)
    assert sum(record.probabilities.values()) == pytest.approx(1.0, abs=1e-4)
    again = classifier.predict(read_xray(path))
    assert again.path == "<array>" and again.probabilities == pytest.approx(record.probabilities, abs=1e-6)


def test_scores_are_calibrated_arrays_with_nan_rows_for_failures(classifier, fixture_data):
    paths = sorted((fixture_data / "val").rglob("*.jpeg"))[:5]
    scores = classifier.scores([paths[0], b"garbage", *paths[1:]], batch_size=2)
    assert len(scores) == 6 and scores.names[1] == "<bytes>"
    assert scores.ok.tolist() == [True, False, True, True, True, True]
    assert "not a recognised image format" in scores.errors[1] and scores.warnings[1] == []
    assert np.isnan(scores.logits[1]).all() and np.isnan(scores.probabilities[1]).all()
    good = scores.ok
    z = scores.logits[good].astype(np.float64) / classifier.temperature
    expected = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    np.testing.assert_allclose(scores.probabilities[good], expected, atol=1e-6)
    assert scores.features.shape == (6, 1280) and np.isfinite(scores.features[good]).all()
    # the same answers from already decoded pixels, as training passes them
    pixels = np.stack([classifier.decode(p).pixels for p in paths])
    direct = classifier.score_pixels(pixels)
    np.testing.assert_allclose(direct.logits, scores.logits[good], atol=1e-5)


def test_records_present_scores(classifier, fixture_data):
    path = next((fixture_data / "val" / "PNEUMONIA").iterdir())
    scores = classifier.scores([path])
    record = classifier.records(scores)[0]
    best = int(scores.probabilities[0].argmax())
    assert record.label == classifier.classes[best] and record.model == classifier.name
    assert record.probabilities[record.label] == round(float(scores.probabilities[0, best]), 6)


def test_in_memory_model_on_torch_and_onnx_agree(fixture_data):
    model, meta = small_model(), small_meta()
    paths = sorted((fixture_data / "val").rglob("*.jpeg"))
    eager = Classifier.from_model(model, meta, backend="torch")
    graph = Classifier.from_model(model, meta, backend="onnx")
    assert (eager.backend, graph.backend) == ("torch", "onnx") and eager.model is model
    assert not model.training  # exporting it left it as it was
    a, b = eager.scores(paths), graph.scores(paths)
    np.testing.assert_allclose(a.logits, b.logits, atol=1e-4)
    np.testing.assert_allclose(a.features, b.features, atol=1e-4)
    with pytest.raises(ValueError, match="int8"):
        Classifier.from_model(model, meta, backend="int8")


def test_predict_json_one_record_per_input_and_bad_files(small_bundle, fixture_data, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty.png").write_bytes(b"")
    good = next((fixture_data / "val" / "NORMAL").iterdir()).read_bytes()
    (bad / "truncated.jpeg").write_bytes(good[: len(good) // 3])
    (bad / "notes.jpg").write_text("this is text, not an image")
    folder = fixture_data / "val"
    code = main(["predict", str(folder), str(bad), str(tmp_path / "missing.png"), "--checkpoint",
                 str(small_bundle), "--format", "json"])
    records = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert code == 1
    assert len(records) == 8 + 3 + 1
    ok = [r for r in records if r["status"] == "ok"]
    errors = {r["path"].rsplit("/", 1)[-1]: r["error"] for r in records if r["status"] == "error"}
    assert len(ok) == 8
    for r in ok:
        assert set(r) == {"path", "status", "label", "probabilities", "error", "warnings", "reliable", "model"}
        assert r["label"] == max(r["probabilities"], key=r["probabilities"].get)
    assert set(errors) == {"empty.png", "truncated.jpeg", "notes.jpg", "missing.png"}
    assert "empty" in errors["empty.png"] and "no such file" in errors["missing.png"]
    assert all("\n" not in e and "Traceback" not in e for e in errors.values())


def test_predict_exit_codes(small_bundle, fixture_data, tmp_path, capsys):
    path = str(next((fixture_data / "val" / "NORMAL").iterdir()))
    assert main(["predict", path, "--checkpoint", str(small_bundle), "--format", "csv"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("path,status,label,p_NORMAL") and len(out) == 2
    with pytest.raises(SystemExit) as usage:
        main(["predict"])
    assert usage.value.code == 2
    assert main(["predict", path, "--checkpoint", "/nonexistent/model"]) == 2
    assert "/nonexistent/model: no such model bundle" in capsys.readouterr().err
    (tmp_path / "meta.json").write_text("{not json")
    (tmp_path / "weights.pt").write_bytes(b"")
    assert main(["predict", path, "--checkpoint", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "meta.json: not valid JSON" in err and len(err.strip().splitlines()) == 1


def test_batch_order_is_kept_with_errors_in_between(classifier, fixture_data):
    paths = sorted((fixture_data / "val" / "PNEUMONIA").iterdir())
    mixed = [paths[0], b"garbage", paths[1], np.zeros((0, 0), np.uint8), paths[2]]
    records = list(classifier.predict_many(mixed, batch_size=2))
    assert [r.status for r in records] == ["ok", "error", "ok", "error", "ok"]
    assert records[0].path == str(paths[0]) and records[4].path == str(paths[2])


def test_batches_side_by_side_give_the_one_at_a_time_answers(small_bundle, fixture_data, monkeypatch):
    """ONNX batches run on parallel one-thread sessions: same records, same order, a bad file in
    the middle included, as classifying each input alone."""
    classifier = Classifier.load(small_bundle, backend="onnx")
    monkeypatch.setattr(classifier, "workers", 2)  # as on this 2-core machine, whatever the CI machine has
    used = []
    single = classifier.runtime.single_thread()
    monkeypatch.setattr(classifier.runtime, "single_thread", lambda: used.append(1) or single)
    paths = sorted(fixture_data.rglob("*.jpeg"))[:30]
    inputs = paths[:13] + [b"not an image"] + paths[13:]
    together = list(classifier.predict_many(inputs, batch_size=4))  # 8 batches, several in flight
    alone = [classifier.predict(source) for source in inputs]
    assert used and single.threads == 1  # the parallel path really ran, on one-thread sessions
    assert [r.path for r in together] == [r.path for r in alone]
    assert [r.status for r in together] == [r.status for r in alone] and together[13].status == "error"
    for a, b in zip(together, alone):
        assert a.label == b.label
        for c in a.probabilities:
            assert abs(a.probabilities[c] - b.probabilities[c]) < 1e-5


IMPORTS = """
import sys
heavy = ("torch", "timm", "sklearn", "scipy", "torchvision", "lightning")
import pneumoscope, pneumoscope.cli
assert not [m for m in heavy if m in sys.modules], [m for m in heavy if m in sys.modules]
from pneumoscope.cli import main
code = main(["predict", sys.argv[1], "--format", "json"])
assert code == 0, code
print(sorted(m for m in heavy if m in sys.modules))
"""


def test_one_image_on_the_default_path_never_imports_torch():
    """The shipped bundle's graph is current, so predicting on the default backend (OpenVINO, or ONNX
    Runtime without it) needs no PyTorch."""
    image = next(EXAMPLES.rglob("*.jpeg"))
    done = subprocess.run([sys.executable, "-c", IMPORTS, str(image)], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    record_line, imported = done.stdout.strip().splitlines()
    assert json.loads(record_line)["status"] == "ok"
    assert imported == "[]"


def test_a_model_with_an_input_step_gets_it_on_every_path(tmp_path):
    """meta.preprocess "clahe": decoding applies it after resizing, score_pixels applies it to the
    resized arrays training caches, the saved bundle's ONNX graph gives what the network gives on
    stepped pixels, and the step counts in the fingerprint (a bundle without it keeps its own)."""
    from pneumoscope.bundle import BundleError, fingerprint, load_bundle
    from pneumoscope.data.images import input_step, resize_square

    model, plain = small_model(), small_meta()
    meta = small_meta(preprocess="clahe")
    paths = sorted(EXAMPLES.rglob("*.jpeg"))[:3]
    raw = np.stack([resize_square(read_xray(p), meta.img_size) for p in paths])
    stepped = input_step(raw, "clahe")
    with_step = Classifier.from_model(model, meta, backend="torch")
    assert all((with_step.decode(p).pixels == s).all() for p, s in zip(paths, stepped))
    expected = Classifier.from_model(model, plain, backend="torch").score_pixels(stepped).logits
    np.testing.assert_allclose(with_step.scores(paths).logits, expected, atol=1e-5)
    np.testing.assert_allclose(with_step.score_pixels(raw).logits, expected, atol=1e-5)
    assert not np.allclose(Classifier.from_model(model, plain, backend="torch").score_pixels(raw).logits, expected,
                           atol=1e-3)  # the step changes what the network sees

    bundle = load_bundle(save_with_graph(model, meta, tmp_path / "clahe"))
    assert bundle.meta.preprocess == "clahe" and fingerprint("w", meta) != fingerprint("w", plain)
    assert fingerprint("w", small_meta(preprocess="none")) == fingerprint("w", plain)  # "none" is no step
    np.testing.assert_allclose(Classifier.load(bundle, backend="onnx").scores(paths).logits, expected, atol=1e-4)
    with pytest.raises(BundleError, match="unknown input step 'hist'"):
        small_meta(preprocess="hist")
