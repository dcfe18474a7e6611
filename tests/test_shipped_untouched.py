"""Nothing a user runs writes into the shipped or installed models: `export` without --out, int8
exports and stale-graph re-exports of a shipped bundle go to the cache; an --out inside the shipped
models is refused. `ship` stays the only writer of models/."""
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import ROOT

from pneumoscope.bundle import graph_fingerprint, is_shipped, load_bundle
from pneumoscope.cli import main
from pneumoscope.runtime.export import graph_path


@pytest.fixture()
def shipped(small_bundle, tmp_path, monkeypatch):
    """A copy of a small bundle where shipped models live ($PNEUMOSCOPE_MODELS/three)."""
    models = tmp_path / "models"
    shutil.copytree(small_bundle, models / "three")
    monkeypatch.setenv("PNEUMOSCOPE_MODELS", str(models))
    return models / "three"


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_the_shipped_locations_are_known():
    assert is_shipped(ROOT / "models" / "three" / "model.onnx") and not is_shipped(ROOT / "tests")


@pytest.mark.parametrize("args", [[], ["--checkpoint", "{shipped}"], ["--checkpoint", "{shipped}/model.onnx"]])
def test_export_without_out_writes_into_the_cache(shipped, args, capsys):
    before = digests(shipped)
    assert main(["export", *[a.format(shipped=shipped) for a in args]]) == 0
    out = capsys.readouterr().out
    assert digests(shipped) == before
    written = Path(out.split()[1])
    assert written.is_relative_to(os.environ["PNEUMOSCOPE_CACHE"]) and "left as it is" in out
    assert graph_fingerprint(written) == load_bundle(shipped).fingerprint


def test_int8_export_of_a_shipped_bundle_goes_to_the_cache_and_is_used(shipped, fixture_data, capsys):
    before = digests(shipped)
    assert main(["export", "--int8", "--calibration", str(fixture_data), "--calibration-n", "16"]) == 0
    assert digests(shipped) == before and not (shipped / "model.int8.onnx").exists()
    image = str(next((fixture_data / "val" / "NORMAL").iterdir()))
    capsys.readouterr()
    assert main(["predict", image, "--backend", "int8", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"].endswith("-int8@test")
    assert digests(shipped) == before


def test_a_stale_shipped_graph_is_exported_again_into_the_cache(shipped, fixture_data, capsys):
    meta = json.loads((shipped / "meta.json").read_text())
    meta["temperature"] = 2.0  # shapes predictions: the shipped graph is stale now
    (shipped / "meta.json").write_text(json.dumps(meta))
    before = digests(shipped)
    image = str(next((fixture_data / "val" / "NORMAL").iterdir()))
    for backend in ("onnx", "auto"):
        assert main(["predict", image, "--backend", backend, "--format", "json"]) == 0
    assert digests(shipped) == before
    assert graph_path(load_bundle(shipped)).is_relative_to(os.environ["PNEUMOSCOPE_CACHE"])


def test_an_out_inside_the_shipped_models_is_refused(shipped, fixture_data, tmp_path, capsys):
    before = digests(shipped)
    for command in (["export", "--out", str(shipped / "model.onnx")], ["export", "--out", str(shipped / "x.onnx")],
                    ["adapt", "--images", str(fixture_data / "val"), "--out", str(shipped)],
                    ["adapt", "--images", str(fixture_data / "val"), "--out", str(shipped.parent / "new")],
                    ["card", "--models-dir", str(shipped.parent), "--out", str(shipped / "card.md")]):
        assert main(command) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "inside the shipped models" in err, err
    assert digests(shipped) == before and sorted(p.name for p in shipped.parent.iterdir()) == ["three"]
