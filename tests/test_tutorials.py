"""The four tutorial workflows of docs/tutorials.md, run as a user types them (`pneumoscope ...`
through cli.main) on their own small folder: train (1 epoch), then `evaluate`, `predict` and the
REST answer of `serve`'s app for the bundle the run wrote. Each asserts that the run finished,
that the bundle carries the dataset's classes and that every answer downstream uses them.

The folders are built in tmp_path from real images at 32 px: the fixture X-rays (Kermany file
names, so patients come from them) and, for the flower-photos ImageFolder, three real photos that
ship with scikit-learn and scikit-image, each cut into different crops (one class per photo). The
big architectures stay seconds (except vgg16_bn, whose 134 M parameters cost what they cost to
save, export and load) because the images are few and tiny. Nothing here depends on how well a
1-epoch model happens to classify."""
from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest
from conftest import FIXTURE_DATA
from PIL import Image, ImageOps

pytestmark = pytest.mark.slow

SIZE = 32
ONE_EPOCH = ["--epochs", "1", "--img-size", str(SIZE), "--batch-size", "6", "--ema-decay", "0"]
SMALL_SPLIT = ["--val-fraction", "0.25", "--test-fraction", "0.25"]  # 4 groups per class suffice


def cli(*args) -> int:
    from pneumoscope.cli import main

    return main([str(a) for a in args])


# ---------------------------------------------------------------- the users' folders
def fixture_xrays() -> dict[str, list[Path]]:
    files = sorted(FIXTURE_DATA.rglob("*.jpeg"))
    return {"NORMAL": [p for p in files if p.parent.name == "NORMAL"],
            "BACTERIA": [p for p in files if "bacteria" in p.name],
            "VIRUS": [p for p in files if "virus" in p.name]}


def save_small(image: Image.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.resize((SIZE, SIZE)).save(path, quality=90)
    return path


def xray_tree(root: Path, per_side: dict[str, int], folder_of=None) -> Path:
    """<root>/[side/]<folder>/<Kermany file name>: `per_side` images of each 3-class label per
    side ("" for a plain tree); `folder_of` names the class folder of a label (Kermany's by default)."""
    folder_of = folder_of or (lambda label: "NORMAL" if label == "NORMAL" else "PNEUMONIA")
    for label, paths in fixture_xrays().items():
        start = 0
        for side, n in per_side.items():
            for path in paths[start:start + n]:
                save_small(Image.open(path).convert("L"), root / side / folder_of(label) / path.name)
            start += n
    return root


def real_photos() -> dict[str, Path]:
    """Three real colour photos installed with scikit-learn and scikit-image (dev extra)."""
    import sklearn
    skimage = pytest.importorskip("skimage")
    return {"daisy": Path(sklearn.__file__).parent / "datasets" / "images" / "flower.jpg",
            "roses": Path(skimage.__file__).parent / "data" / "coffee.png",
            "tulips": Path(skimage.__file__).parent / "data" / "chelsea.png"}


def photo_views(path: Path, n: int) -> list[Image.Image]:
    """`n` different real views of one photo: crops at other places and scales, some mirrored."""
    photo = Image.open(path).convert("RGB")
    width, height = photo.size
    views = []
    for i in range(n):
        scale = 0.5 + 0.08 * (i % 4)
        w, h = int(width * scale), int(height * scale)
        left, top = (width - w) * (i % 3) // 2, (height - h) * (i // 3 % 3) // 2
        view = photo.crop((left, top, left + w, top + h))
        views.append(ImageOps.mirror(view) if i % 2 else view)
    return views


def flower_tree(root: Path, per_side: dict[str, int]) -> Path:
    """A flower-photos ImageFolder: <root>/[side/]<class>/<n>.jpg."""
    for label, photo in real_photos().items():
        views = iter(photo_views(photo, sum(per_side.values())))
        for side, n in per_side.items():
            for i in range(n):
                save_small(next(views), root / side / label / f"{label}_{side or 'all'}_{i}.jpg")
    return root


# ---------------------------------------------------------------- what every workflow checks
def train_run(tmp_path: Path, name: str, data: Path, *options, caplog) -> tuple[Path, str]:
    """`pneumoscope train` into tmp_path/<name>; returns the run directory and the lines it logged
    (on a console the same lines, one each: pytest's log capture takes them here)."""
    run = tmp_path / name
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pneumoscope"):
        assert cli("train", "--data", data, "--out", run, *ONE_EPOCH, *options) == 0
    console = "\n".join(caplog.messages)
    assert json.loads((run / "status.json").read_text())["status"] == "finished"
    return run, console


def load_meta(run: Path):
    from pneumoscope.bundle import load_bundle

    return load_bundle(run / "model").meta


def check_bundle_answers(run: Path, data: Path, classes: tuple[str, ...], image: Path, tmp_path: Path, capsys,
                         task: str = "folders") -> dict:
    """The bundle's classes are the dataset's, and evaluate, predict and the REST answer use them."""
    from fastapi.testclient import TestClient

    from pneumoscope.bundle import load_bundle
    from pneumoscope.runtime.classifier import Classifier
    from pneumoscope.serve import create_app

    bundle = run / "model"
    meta = load_bundle(bundle).meta
    assert meta.classes == classes and meta.task == task
    report = tmp_path / f"{run.name}-evaluate"
    assert cli("evaluate", "--data", data, "--checkpoint", bundle, "--out", report) == 0
    metrics = json.loads((report / "metrics.json").read_text())
    assert tuple(metrics["classes"]) == classes and tuple(metrics["per_class"]) == classes
    with open(report / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {r["true"] for r in rows} == set(classes) and {f"p_{c}" for c in classes} <= set(rows[0])
    capsys.readouterr()
    assert cli("predict", image, "--checkpoint", bundle, "--format", "json") == 0
    record = json.loads(capsys.readouterr().out)
    assert record["status"] == "ok" and record["label"] in classes and tuple(record["probabilities"]) == classes
    with TestClient(create_app(Classifier.load(bundle)), base_url="http://127.0.0.1:8000") as client:
        answer = client.post("/v1/predict", files={"file": (image.name, image.read_bytes())}).json()
        assert answer["label"] in classes and tuple(answer["probabilities"]) == classes
        assert client.get("/v1/model").json()["classes"] == list(classes)
        schema = client.get("/openapi.json").json()["components"]["schemas"]["Prediction"]
        assert schema["properties"]["label"]["enum"] == list(classes)
    return metrics


# ---------------------------------------------------------------- (a) 3 classes from Kermany file names
# Per workflow, evaluate / predict / REST run on the first architecture's bundle; the others are
# checked for their classes (each costs seconds of loading and reporting, vgg16_bn tens).
@pytest.mark.parametrize("arch, options, answers", [
    ("residual_vgg_seed", [], True),
    # 134 M parameters: training the head only keeps one copy of them (no optimiser state), and
    # without the internal test report (Grad-CAM through them) the run is its export and validation
    ("vgg16_bn", ["--freeze", "base", "--no-test"], False)])
def test_three_classes_from_a_kermany_tree(arch, options, answers, tmp_path, capsys, caplog):
    """NORMAL / BACTERIA / VIRUS from chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}: the labels
    from the file names, the tree's own val/ and test/ used (they hold enough of each class), and
    vgg16_bn at 32 px exports (its 7 x 7 pool at another size than 224 failed the ONNX export)."""
    data = xray_tree(tmp_path / "chest_xray", {"train": 6, "val": 2, "test": 2})
    run, console = train_run(tmp_path, arch, data, "--arch", arch, *options, caplog=caplog)
    assert "val: the tree's own val/ folder, 6 images" in console
    assert "test: the tree's own test/ folder, 6 images" in console
    assert "  train     18 images     18 groups   NORMAL 6, BACTERIA 6, VIRUS 6" in console
    classes = ("NORMAL", "BACTERIA", "VIRUS")
    val = json.loads((run / "val" / "metrics.json").read_text())  # scored by ONNX Runtime on model.onnx
    assert tuple(val["classes"]) == classes and val["n"] == 6
    if answers:
        image = next((data / "test" / "PNEUMONIA").iterdir())
        check_bundle_answers(run, data, classes, image, tmp_path, capsys, task="three")
    else:
        assert load_meta(run).classes == classes


# ---------------------------------------------------------------- (b) binary, pictures
@pytest.mark.parametrize("arch, answers", [("simple_cnn_seed", True), ("resnet34", False)])
def test_binary_with_curves_confusion_matrix_and_prediction_grid(arch, answers, tmp_path, capsys, caplog):
    """--task binary on NORMAL/ PNEUMONIA/ (a plain tree, cut by patient from the file names)."""
    data = xray_tree(tmp_path / "xrays", {"": 6})
    run, console = train_run(tmp_path, arch, data, "--arch", arch, "--task", "binary", *SMALL_SPLIT, caplog=caplog)
    assert "val: cut from the tree by patient (from file names), 0.25 of its groups" in console
    assert "kept epoch 0 (val balanced accuracy" in console and "parameters trainable" in console
    for picture in ("curves.png", "test/confusion_matrix.png", "test/prediction_grid.png", "test/roc.png"):
        assert (run / picture).stat().st_size > 1000, picture
    if answers:
        image = next((data / "NORMAL").iterdir())
        check_bundle_answers(run, data, ("NORMAL", "PNEUMONIA"), image, tmp_path, capsys, task="binary")
        report = tmp_path / f"{run.name}-evaluate"
        assert all((report / p).is_file() for p in ("confusion_matrix.png", "prediction_grid.png", "roc.png"))
    else:
        assert load_meta(run).classes == ("NORMAL", "PNEUMONIA")


# ---------------------------------------------------------------- (c) Monk's Infected/ Normal/, compare
def test_monk_infected_normal_with_two_architectures_then_compare(tmp_path, capsys, caplog):
    data = xray_tree(tmp_path / "monk", {"": 5}, folder_of=lambda label: "Normal" if label == "NORMAL" else "Infected")
    runs = [train_run(tmp_path, arch, data, "--arch", arch, *SMALL_SPLIT, caplog=caplog)[0]
            for arch in ("resnet50", "densenet121")]
    check_bundle_answers(runs[0], data, ("Infected", "Normal"), next((data / "Infected").iterdir()), tmp_path, capsys)
    assert load_meta(runs[1]).classes == ("Infected", "Normal")
    assert cli("compare", *runs, "--out", tmp_path / "compare") == 0
    with open(tmp_path / "compare" / "comparison.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["arch"] for r in rows] == ["resnet50", "densenet121"]
    for row, run in zip(rows, runs):  # the saved model's validation figures, from its val report
        val = json.loads((run / "val" / "metrics.json").read_text())
        assert float(row["val_acc"]) == pytest.approx(val["accuracy"])
        assert float(row["val_bacc"]) == pytest.approx(val["balanced_accuracy"])
    assert "| run | status | arch | task |" in (tmp_path / "compare" / "report.md").read_text()
    capsys.readouterr()
    assert cli("runs", tmp_path) == 0
    table = capsys.readouterr().out.splitlines()
    assert "val acc" in table[0] and "best val acc" not in table[0] and len(table) == 3


# ---------------------------------------------------------------- (d) flower photos, frozen backbone
@pytest.mark.parametrize("layout", [{"": 8}, {"train": 6, "val": 2}], ids=["plain", "train-val"])
def test_flower_photos_imagefolder_with_a_frozen_resnext(layout, tmp_path, capsys, caplog):
    """Any ImageFolder: the folder names are the classes (3 here, whatever --task says by
    default), a plain root is cut per image (no patients: the run warns), a train/ val/ tree keeps
    its val/; --freeze base trains the head only; predict prints the class and its probability."""
    data = flower_tree(tmp_path / "flower_photos", layout)
    classes = ("daisy", "roses", "tulips")
    run, console = train_run(tmp_path, "resnext", data, "--arch", "resnext50_32x4d", "--freeze", "base",
                             *SMALL_SPLIT, caplog=caplog)
    assert f"3 classes ({', '.join(classes)})" in console
    assert "freeze base: 6,147 of " in console  # the 2048 x 3 head and its bias
    if "val" in layout:
        assert "val: the tree's own val/ folder, 6 images" in console
        assert "test: cut from train/ by image (no group ids), 0.25 of its groups" in console
    else:
        assert "have no patient or group id" in console and "--groups" in console
    image = next((data / ("train" if "train" in layout else "") / "roses").iterdir())
    if "val" in layout:
        assert load_meta(run).classes == classes
    else:
        check_bundle_answers(run, data, classes, image, tmp_path, capsys)
    capsys.readouterr()
    assert cli("predict", image, "--checkpoint", run / "model") == 0
    header, line = capsys.readouterr().out.splitlines()[:2]
    assert header.split()[:4] == ["label", *classes]
    label, *probabilities, path = line.split()[:5]
    assert label in classes and path == str(image) and abs(sum(map(float, probabilities)) - 1) < 1e-3
