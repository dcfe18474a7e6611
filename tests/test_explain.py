"""Grad-CAM: heat maps from the shipped model and from each kind of architecture; each image decoded once."""
import io

import numpy as np
import pytest
from conftest import small_meta, small_model
from PIL import Image

import pneumoscope.runtime.classifier
from pneumoscope.cli import main
from pneumoscope.runtime.classifier import Classifier
from pneumoscope.runtime.explain import cam_heatmap, cam_name, explain, overlay_png


@pytest.fixture(scope="module")
def shipped():
    """The shipped 3-class model: trained weights that are the same on every machine."""
    return Classifier.load(task="three")


@pytest.fixture(scope="module")
def xrays(fixture_data):
    return sorted((fixture_data / "val" / "NORMAL").iterdir()) + sorted((fixture_data / "val" / "PNEUMONIA").iterdir())


@pytest.fixture()
def decodes(monkeypatch):
    """Counts the decodes of image files and bytes (the one decoder, as predict calls it)."""
    calls = []
    real = pneumoscope.runtime.classifier.read_xray_with_info
    monkeypatch.setattr(pneumoscope.runtime.classifier, "read_xray_with_info", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    return calls


def test_heatmap_is_informative_and_follows_the_image(shipped, xrays):
    """The shipped model's evidence for its answer on a normal and on a pneumonia X-ray."""
    normal, pneumonia = (shipped.decode(x).pixels for x in (xrays[0], xrays[-1]))
    first, other = cam_heatmap(shipped, normal), cam_heatmap(shipped, pneumonia)
    for heat in (first, other):
        assert heat.shape == (shipped.img_size,) * 2 and heat.dtype == np.float32
        assert 0 <= heat.min() and heat.max() <= 1 and heat.std() > 0.05
    assert np.abs(first - other).mean() > 0.05


@pytest.mark.parametrize("arch", ["simple_cnn", "resnet18", "efficientnet_lite0"])
def test_every_kind_of_architecture(arch, xrays):
    classifier = Classifier.from_model(small_model(arch), small_meta(arch), backend="torch")
    pixels = classifier.decode(xrays[0]).pixels
    heats = [cam_heatmap(classifier, pixels, target=c) for c in range(3)]
    for heat in heats:
        assert heat.shape == (64, 64) and heat.dtype == np.float32 and 0 <= heat.min() and heat.max() <= 1
    assert max(heat.std() for heat in heats) > 0  # random head: some class has positive evidence
    assert not any(m._forward_hooks for m in classifier.model.modules())  # Grad-CAM's hooks are gone
    assert all(p.grad is None for p in classifier.model.parameters())


def test_explain_decodes_once_and_returns_the_record_and_a_png(classifier, xrays, decodes):
    data = xrays[0].read_bytes()
    record, png = explain(classifier, data, name="upload.jpeg")
    assert len(decodes) == 1
    assert record.status == "ok" and record == classifier.predict(data, name="upload.jpeg")
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.mode == "RGB" and image.size == (224, 224)
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


def test_predict_cam_writes_one_png_per_input_with_unique_names(small_bundle, xrays, tmp_path, decodes):
    for folder in ("a", "b"):  # the same file name in two folders
        (tmp_path / folder).mkdir()
        (tmp_path / folder / xrays[0].name).write_bytes(xrays[0].read_bytes())
    cams = tmp_path / "cams"
    code = main(["predict", str(tmp_path / "a"), str(tmp_path / "b"), str(xrays[1]), "--checkpoint",
                 str(small_bundle), "--cam", str(cams), "--format", "json"])
    assert code == 0 and len(decodes) == 3  # one decode per image for the record and its heat map
    names = sorted(p.name for p in cams.iterdir())
    assert names == sorted(cam_name(str(p)) for p in (tmp_path / "a" / xrays[0].name, tmp_path / "b" / xrays[0].name,
                                                      xrays[1]))
    assert len(set(names)) == 3 and cam_name(str(xrays[1])).startswith(f"{xrays[1].stem}_")  # <stem>_<hash>_cam.png
    for path in cams.iterdir():
        with Image.open(path) as image:
            image.verify()
