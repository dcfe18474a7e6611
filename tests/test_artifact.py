"""The model bundle: typed meta, the fingerprint rule, save/load, shipped models."""
import base64
import json
import math
import shutil

import pytest
import torch
from conftest import ROOT, small_meta, small_model

from pneumoscope.bundle import (
    SCHEMA_VERSION,
    BundleError,
    ModelMeta,
    fingerprint,
    load_bundle,
    model_fingerprint,
    resolve_model,
    save_bundle,
)
from pneumoscope.cli import main
from pneumoscope.nets.build import load_network
from pneumoscope.runtime.export import save_with_graph


def test_meta_round_trips_through_json_and_refuses_what_it_cannot_read():
    meta = small_meta(task="binary", merge_outputs=[[0], [1, 2]], guard={"fp32": GOOD_GUARD})
    data = json.loads(json.dumps(meta.to_json()))
    assert ModelMeta.from_json(data) == meta and meta.merge_outputs == ((0,), (1, 2)) and meta.n_outputs == 3
    with pytest.raises(BundleError, match="schema version 2 is newer"):
        ModelMeta.from_json({**data, "schema_version": SCHEMA_VERSION + 1})
    with pytest.raises(BundleError, match="unknown field.*metrics"):
        ModelMeta.from_json({**data, "metrics": {}})
    with pytest.raises(BundleError, match="merge_outputs has 3 groups for 2 classes"):
        small_meta(task="binary", merge_outputs=[[0], [1], [2]])


def test_fingerprint_follows_what_shapes_predictions_only():
    meta = small_meta()
    base = fingerprint("0" * 64, meta)
    assert fingerprint("1" * 64, meta) != base  # other weights
    assert fingerprint("0" * 64, meta.replace(temperature=2.0)) != base
    assert fingerprint("0" * 64, meta.replace(adaptation={"method": "adabn"})) != base
    assert fingerprint("0" * 64, meta.replace(provenance={"seed": 3}, params=7, guard={"x": 1})) == base


def test_save_and_load_a_bundle(tmp_path):
    model, meta = small_model("simple_cnn"), small_meta("simple_cnn")
    out = save_with_graph(model, meta, tmp_path / "b")
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "model.onnx", "weights.pt"]
    assert "temperature" in json.loads((out / "meta.json").read_text())
    state = torch.load(out / "weights.pt", weights_only=True)  # tensors only
    assert state.keys() == model.state_dict().keys()
    bundle = load_bundle(out)
    assert bundle.meta == meta and bundle.fingerprint == model_fingerprint(model, meta)
    assert bundle.name == "test-simple_cnn-three@test" and bundle.metrics() == {}
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(load_network(bundle)(x), model(x))


def test_normalisation_comes_from_the_meta(tmp_path):
    model, meta = small_model("simple_cnn"), small_meta("simple_cnn", mean=0.3, std=0.2)
    loaded = load_network(load_bundle(save_bundle(model, meta, tmp_path / "b")))
    assert (float(loaded.normalize.mean), float(loaded.normalize.std)) == pytest.approx((0.3, 0.2))


def test_bad_bundles_give_one_line_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model bundle"):
        load_bundle(tmp_path / "missing")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "meta.json").write_text(json.dumps(small_meta().to_json()))
    with pytest.raises(FileNotFoundError, match="weights.pt: missing"):
        load_bundle(tmp_path / "half")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(BundleError, match="junk.pt: this file is not a model bundle"):
        load_bundle(tmp_path / "junk.pt")


def test_resolve_model(monkeypatch, tmp_path):
    monkeypatch.delenv("PNEUMOSCOPE_MODELS", raising=False)
    assert resolve_model("three") == ROOT / "models" / "three" and resolve_model("binary").name == "binary"
    with pytest.raises(ValueError, match="unknown task"):
        resolve_model("four")
    shutil.copytree(ROOT / "models" / "binary", tmp_path / "binary", ignore=shutil.ignore_patterns("*.onnx"))
    monkeypatch.setenv("PNEUMOSCOPE_MODELS", str(tmp_path))
    assert resolve_model("binary") == tmp_path / "binary"
    with pytest.raises(FileNotFoundError, match="no shipped model for task 'three'"):
        resolve_model("three")


def test_the_shipped_bundles_are_the_default_recipe_on_one_split():
    """models/three and models/binary: each its own network, trained by the default `train` recipe
    (its image size, augmentation and EMA) on the same patient split, measured on val, internal
    test and the external group."""
    from pneumoscope.core.config import TrainConfig

    three, binary = load_bundle(ROOT / "models" / "three"), load_bundle(ROOT / "models" / "binary")
    assert three.meta.classes == ("NORMAL", "BACTERIA", "VIRUS") and binary.meta.classes == ("NORMAL", "PNEUMONIA")
    assert three.meta.provenance["manifest_hash"] == binary.meta.provenance["manifest_hash"]
    default = TrainConfig(data="")
    for bundle, task in ((three, "three"), (binary, "binary")):
        config = bundle.meta.provenance["train_config"]
        assert config["task"] == task and bundle.meta.img_size == default.img_size == config["img_size"]
        assert (config["arch"], config["aug_policy"], config["ema_decay"]) == \
            (default.arch, default.aug_policy, default.ema_decay)
        assert bundle.meta.provenance["calibration"] == default.calibration
        assert {"val", "internal_test", "external"} <= set(bundle.metrics())
        assert set(bundle.meta.guard) == {"fp32", "int8"}
    x = torch.rand(3, 1, default.img_size, default.img_size)
    with torch.no_grad():
        logits = load_network(binary)(x)
    assert logits.shape == (3, 2) and torch.isfinite(logits).all()


# ------------------------------------------------------------------ hostile meta.json (issue 26)
GOOD_GUARD = {"method": "mahalanobis", "threshold": 1.0,  # for the 1280 features of the small bundle's graph
              **{k: {"dtype": "float32", "shape": shape, "base64": base64.b64encode(bytes(4 * math.prod(shape))).decode()}
                 for k, shape in (("center", [1280]), ("whiten", [1280, 1]), ("class_means", [3, 1]))}}
HOSTILE_META = {  # change to meta.json -> what the one-line error says
    "temperature -1": ({"temperature": -1}, "temperature must be a finite number above 0"),
    "temperature 0": ({"temperature": 0}, "temperature must be a finite number above 0"),
    "temperature NaN": ({"temperature": float("nan")}, "temperature must be a finite number above 0"),
    "temperature string": ({"temperature": "1.5"}, "temperature: Input should be a valid number"),
    "duplicate classes": ({"classes": ["NORMAL", "NORMAL", "VIRUS"]}, "distinct"),
    "no classes": ({"classes": []}, "0 classes"),
    "one class": ({"classes": ["NORMAL"]}, "1 classes"),
    "classes of another task": ({"classes": ["NORMAL", "PNEUMONIA", "VIRUS"]}, "not those of task 'three'"),
    "class not a string": ({"classes": ["NORMAL", 1, "VIRUS"]}, "classes.1: Input should be a valid string"),
    "img_size 0": ({"img_size": 0}, "img_size must be a whole number of pixels from 32 to 1024"),
    "img_size 10000": ({"img_size": 10000}, "from 32 to 1024"),
    "img_size string": ({"img_size": "224"}, "img_size: Input should be a valid integer"),
    "img_size fraction": ({"img_size": 224.5}, "img_size: Input should be a valid integer"),
    "std 0": ({"std": 0}, "std must be a finite number above 0"),
    "mean NaN": ({"mean": float("nan")}, "mean must be a finite number"),
    "guard string": ({"guard": "x"}, "guard: Input should be an object"),
    "guard method": ({"guard": {"fp32": {**GOOD_GUARD, "method": "x"}}}, "guard.fp32.method"),
    "guard without arrays": ({"guard": {"fp32": {"method": "energy", "threshold": 1.0}}}, "guard.fp32.center"),
    "guard bad base64": ({"guard": {"fp32": {**GOOD_GUARD, "center": {**GOOD_GUARD["center"], "base64": "!"}}}},
                         "guard statistics cannot be decoded"),
    "merge_outputs repeated": ({"merge_outputs": [[0], [0], [1]]}, "merge_outputs must share the outputs"),
    "nested provenance": ({"provenance": json.loads("[" * 50 + "]" * 50)}, "nested deeper than 32"),
    "provenance a list": ({"provenance": []}, "provenance: Input should be an object"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_META))
def test_hostile_meta_is_a_one_line_error_naming_the_file(small_bundle, tmp_path, capsys, case):
    change, reason = HOSTILE_META[case]
    bundle = tmp_path / "bundle"
    shutil.copytree(small_bundle, bundle)
    meta = json.loads((bundle / "meta.json").read_text())
    (bundle / "meta.json").write_text(json.dumps({**meta, **change}))
    image = str(ROOT / "examples" / "NORMAL" / "IM-0203-0001.jpeg")
    assert main(["predict", image, "--checkpoint", str(bundle), "--backend", "onnx"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert str(bundle) in err and reason in err, err


@pytest.mark.parametrize("text", ["[1, 2]", "[" * 100_000 + "]" * 100_000,
                                  '{"schema_version": 1, "x": ' + "[" * 100_000])
def test_a_meta_that_is_no_object_or_nested_without_end(small_bundle, tmp_path, text):
    bundle = tmp_path / "bundle"
    shutil.copytree(small_bundle, bundle)
    (bundle / "meta.json").write_text(text)
    with pytest.raises(BundleError, match="meta.json: (expected a JSON object|nested deeper|not valid JSON)"):
        load_bundle(bundle)


def test_weights_of_another_shape_and_a_graph_for_other_classes(small_bundle, tmp_path, capsys):
    """Five classes in meta.json over a 3-output network: a one-line error naming the weights (a graph
    with the bundle's fingerprint that gives other logits: test_backends.test_hostile_graphs...)."""
    bundle = tmp_path / "bundle"
    shutil.copytree(small_bundle, bundle)
    meta = json.loads((bundle / "meta.json").read_text())
    (bundle / "meta.json").write_text(json.dumps({**meta, "classes": ["a", "b", "c", "d", "e"]}))
    image = str(ROOT / "examples" / "NORMAL" / "IM-0203-0001.jpeg")
    for backend in ("onnx", "torch"):  # the graph is stale (classes shape predictions): exported from the weights
        file, reason = "weights.pt", "the weights do not fit efficientnet_lite0 with 5 outputs"
        assert main(["predict", image, "--checkpoint", str(bundle), "--backend", backend]) == 1
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and str(bundle / file) in err and reason in err, err
