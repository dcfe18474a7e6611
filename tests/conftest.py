"""Shared fixtures: the small real-image subset that ships in tests/fixtures, the full shared data
when present, and one tiny model trained for real on the fixture images (session-scoped)."""
from __future__ import annotations

import csv
import os
import re
from pathlib import Path

import pytest

from pneumoscope.runtime.export import save_with_graph

ROOT = Path(__file__).resolve().parents[1]
FIXTURE_DATA = ROOT / "tests" / "fixtures" / "chest_xray"
EXAMPLES = ROOT / "examples"


def shared_data() -> Path | None:
    candidates = [os.environ.get("PNEUMOSCOPE_DATA"), ROOT.parent / "shared" / "data" / "chest_xray"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "train").is_dir():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def fixture_data() -> Path:
    return FIXTURE_DATA


@pytest.fixture(scope="session")
def full_data() -> Path:
    data = shared_data()
    if data is None:
        pytest.skip("full dataset not found at $PNEUMOSCOPE_DATA or ../shared/data/chest_xray")
    return data


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Keep the pixel cache of test runs out of the user's home."""
    os.environ["PNEUMOSCOPE_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    os.environ["HF_HUB_OFFLINE"] = "1"


def read_csv(path) -> list[dict]:
    """The rows of a CSV file, the file closed again (an open one left to the garbage collector is a
    ResourceWarning, an error in this suite)."""
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def python_warnings(stderr: str) -> list[str]:
    """The warnings a child process printed, "file.py:line: Category: message" (Lightning leaves out
    the category): a subprocess's are out of reach of the suite's filterwarnings, and a user who ran
    the command saw them."""
    lines = stderr.replace("\r", "\n")  # a progress bar's redrawn line may lead up to one
    return re.findall(r"^\S*\.py:\d+: .*$", lines, flags=re.MULTILINE)


def tiny_config(data, out, **overrides):
    from pneumoscope import TrainConfig

    values = dict(data=str(data), out=str(out), img_size=64, epochs=2, batch_size=16, lr=3e-3,
                  ema_decay=0.0, patience=5, val_fraction=0.2, test_fraction=0.2, seed=0)
    values.update(overrides)
    return TrainConfig(**values)


TRAINED_FIXTURES = {"tiny_result", "tiny_run", "tiny_bundle"}


def pytest_collection_modifyitems(items):
    """A test that uses the trained run trains (once per session): it is `slow` like the others."""
    for item in items:
        if TRAINED_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tiny_result(tmp_path_factory):
    """A real 2-epoch EfficientNet-Lite0 run on the 80 fixture images at 64 px (train.TrainResult)."""
    from pneumoscope.training.fit import train

    return train(tiny_config(FIXTURE_DATA, tmp_path_factory.mktemp("runs") / "tiny"))


@pytest.fixture(scope="session")
def tiny_run(tiny_result) -> Path:
    """The run directory of `tiny_result`."""
    return tiny_result.run_dir


@pytest.fixture(scope="session")
def tiny_bundle(tiny_result) -> Path:
    """The model bundle of `tiny_result` (weights.pt, meta.json, model.onnx)."""
    return tiny_result.bundle


# ---------------------------------------------------------------- models made in memory (no training)
SMALL_SIZE = 64


def small_model(arch: str = "efficientnet_lite0", n_classes: int = 3, seed: int = 0):
    """A registered network with a seeded random head (ImageNet backbone where one ships): real
    features, no training. For tests where what the weights learned does not matter."""
    import torch

    from pneumoscope.nets.registry import create_model

    torch.manual_seed(seed)
    return create_model(arch, n_classes).eval()


def small_meta(arch: str = "efficientnet_lite0", task: str = "three", **overrides):
    from pneumoscope.bundle import ModelMeta
    from pneumoscope.core.labels import classes_for
    from pneumoscope.nets.registry import model_spec

    spec = model_spec(arch)
    values = dict(name=f"test-{arch}-{task}", task=task, classes=classes_for(task), arch=arch, img_size=SMALL_SIZE,
                  mean=spec.mean, std=spec.std, temperature=1.5, provenance={"pneumoscope": "test"})
    return ModelMeta(**{**values, **overrides})


@pytest.fixture(scope="session")
def small_bundle(tmp_path_factory) -> Path:
    """A 3-class EfficientNet-Lite0 bundle at 64 px (weights.pt, meta.json, model.onnx) made from
    `small_model`: written once per session; copy it before changing it."""

    return save_with_graph(small_model(), small_meta(), tmp_path_factory.mktemp("bundles") / "small")


@pytest.fixture(scope="session")
def classifier(small_bundle):
    """`small_bundle` on the default backend (OpenVINO where installed, else ONNX Runtime). Shared:
    do not change its attributes (use monkeypatch)."""
    from pneumoscope.runtime.classifier import Classifier

    return Classifier.load(small_bundle)
