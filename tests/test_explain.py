"""Grad-CAM: real heat maps from the tiny trained model and from each kind of architecture."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from pneumoscope.cli import main
from pneumoscope.explain import cam_heatmap, explain, overlay_png
from pneumoscope.models import create_model
from pneumoscope.predict import Classifier


@pytest.fixture(scope="module")
def classifier(tiny_run):
    return Classifier.load(tiny_run / "model.pt")


@pytest.fixture(scope="module")
def xrays(fixture_data):
    return sorted((fixture_data / "val" / "NORMAL").iterdir()) + sorted((fixture_data / "val" / "PNEUMONIA").iterdir())


def untrained(arch: str) -> Classifier:
    torch.manual_seed(0)
    meta = {"arch": arch, "classes": ["NORMAL", "BACTERIA", "VIRUS"], "img_size": 64}
    return Classifier(create_model(arch, 3, pretrained=False), meta)


def test_heatmap_is_informative_and_follows_the_image(classifier, xrays):
    first = cam_heatmap(classifier, classifier.preprocess(xrays[0]))
    other = cam_heatmap(classifier, classifier.preprocess(xrays[-1]))
    for heat in (first, other):
        assert heat.shape == (64, 64) and heat.dtype == np.float32
        assert 0 <= heat.min() and heat.max() <= 1 and heat.std() > 0.01
    assert np.abs(first - other).mean() > 0.01


@pytest.mark.parametrize("arch", ["simple_cnn", "resnet18", "efficientnet_lite0"])
def test_every_kind_of_architecture(arch, xrays):
    model = untrained(arch)
    pixels = model.preprocess(xrays[0])
    heats = [cam_heatmap(model, pixels, target=c) for c in range(3)]
    for heat in heats:
        assert heat.shape == (64, 64) and heat.dtype == np.float32 and 0 <= heat.min() and heat.max() <= 1
    assert max(heat.std() for heat in heats) > 0  # random weights: some class has positive evidence
    assert not any(m._forward_hooks for m in model.model.modules())  # Grad-CAM's hooks are gone
    assert all(p.grad is None for p in model.model.parameters())


def test_explain_returns_the_record_and_a_png(classifier, xrays, tmp_path):
    record, png = explain(classifier, xrays[0].read_bytes(), name="upload.jpeg")
    assert record.status == "ok" and record == classifier.predict(xrays[0].read_bytes(), name="upload.jpeg")
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.mode == "RGB" and image.size == (224, 224)
    assert classifier._model is not None or classifier.backend == "torch"  # loaded for Grad-CAM
    bad, none = explain(classifier, b"not an image")
    assert bad.status == "error" and none is None


def test_overlay_png_keeps_the_xray_size_and_colours_it():
    gray = np.tile(np.arange(200, dtype=np.uint8), (100, 1))
    heat = np.zeros((8, 8), np.float32)
    heat[:, 4:] = 1
    image = np.asarray(Image.open(io.BytesIO(overlay_png(gray, heat, "VIRUS 0.91"))))
    assert image.shape == (100, 200, 3)
    right, left = image[80:, 150:].astype(int), image[80:, 10:40].astype(int)
    assert right[..., 0].mean() > right[..., 2].mean() and left[..., 2].mean() > left[..., 0].mean()  # jet: hot red, cold blue


def test_predict_cam_writes_one_png_per_input_with_unique_names(tiny_run, xrays, tmp_path, capsys):
    for folder in ("a", "b"):  # the same file name in two folders
        (tmp_path / folder).mkdir()
        (tmp_path / folder / xrays[0].name).write_bytes(xrays[0].read_bytes())
    cams = tmp_path / "cams"
    code = main(["predict", str(tmp_path / "a"), str(tmp_path / "b"), str(xrays[1]), "--checkpoint",
                 str(tiny_run / "model.pt"), "--cam", str(cams), "--format", "json"])
    assert code == 0
    names = sorted(p.name for p in cams.iterdir())
    assert names == sorted([f"{xrays[0].stem}_cam.png", f"{xrays[0].stem}_cam_2.png", f"{xrays[1].stem}_cam.png"])
    for path in cams.iterdir():
        with Image.open(path) as image:
            image.verify()
