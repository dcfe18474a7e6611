"""Shared fixtures: the small real-image subset that ships in tests/fixtures, the full shared data
when present, and one tiny model trained for real on the fixture images (session-scoped)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

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


def tiny_config(data, out, **overrides):
    from pneumoscope.train import TrainConfig

    values = dict(data=str(data), out=str(out), img_size=64, epochs=2, batch_size=16, lr=3e-3,
                  ema_decay=0.0, patience=5, val_fraction=0.2, test_fraction=0.2, seed=0)
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A real 2-epoch EfficientNet-Lite0 run on the 80 fixture images at 64 px."""
    from pneumoscope.train import train

    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    train(tiny_config(FIXTURE_DATA, run_dir))
    return run_dir
