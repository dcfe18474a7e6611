"""What `predict` reads and writes: the output format follows --output's extension, extensionless
DICOM files in a folder are classified, skipped and resumed inputs are counted; the pictures say
how to read them (grid legend, a Grad-CAM caption that separates label and probability, whole
epochs on the curves)."""
import csv
import json
import shutil

import numpy as np
import pytest
from PIL import Image, ImageFont

from pneumoscope.cli import main
from pneumoscope.evaluation import plots


@pytest.fixture()
def folder(fixture_data, tmp_path):
    """4 real X-rays, an extensionless DICOM as scanners write them (IMG0001) and a text file."""
    from test_images import make_dicom

    root = tmp_path / "in"
    root.mkdir()
    images = sorted((fixture_data / "val" / "NORMAL").iterdir())[:4]
    for path in images:
        shutil.copy(path, root / path.name)
    xray = np.asarray(Image.open(images[0]).convert("L")).astype(np.uint16) * 16
    make_dicom(xray, root / "IMG0001")
    (root / "notes.txt").write_text("not an image")
    return root


def predict(bundle, *args):
    return main(["predict", *map(str, args), "--checkpoint", str(bundle), "--batch-size", "2", "--backend", "onnx"])


def read_records(path, fmt):
    text = path.read_text()
    if fmt == "json":
        return [json.loads(line) for line in text.splitlines()]
    if fmt == "csv":
        return list(csv.DictReader(text.splitlines()))
    return text.splitlines()[1:]  # the table: a header, then one line per input


@pytest.mark.parametrize("name, fmt", [("big.csv", "csv"), ("r.json", "json"), ("r.jsonl", "json"),
                                       ("r.NDJSON", "json"), ("r.txt", "table")])
def test_output_format_follows_the_extension(small_bundle, folder, tmp_path, name, fmt, capsys):
    out = tmp_path / name
    assert predict(small_bundle, folder, "--output", out) == 0
    records = read_records(out, fmt)
    assert len(records) == 5
    if fmt == "table":
        assert out.read_text().startswith("label") and all(str(folder) in line for line in records)
    else:
        assert {r["status"] for r in records} == {"ok"}


def test_a_format_that_contradicts_the_extension_is_a_usage_error(small_bundle, folder, tmp_path, capsys):
    for name, fmt in (("big.csv", "json"), ("r.jsonl", "csv"), ("r.json", "table")):
        assert predict(small_bundle, folder, "--output", tmp_path / name, "--format", fmt) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"--format {fmt} conflicts with --output" in err
        assert not (tmp_path / name).exists()
    assert predict(small_bundle, folder, "--output", tmp_path / "r.txt", "--resume") == 2  # a table cannot resume


def test_a_folder_classifies_extensionless_dicom_and_counts_what_it_skips(small_bundle, folder, tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    assert predict(small_bundle, folder, "--output", out) == 0
    records = {r["path"].rsplit("/", 1)[-1]: r for r in read_records(out, "json")}
    assert records["IMG0001"]["status"] == "ok" and "notes.txt" not in records
    err = capsys.readouterr().err
    assert "5 classified; 0 failed" in err and f"1 file(s) in the folders skipped as not images ({folder}/notes.txt)" in err


def test_resume_says_how_many_inputs_it_skips(small_bundle, folder, tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    predict(small_bundle, folder, "--output", out)
    out.write_text("".join(out.read_text().splitlines(keepends=True)[:3]))  # killed after 3 records
    capsys.readouterr()
    assert predict(small_bundle, folder, "--output", out, "--resume") == 0
    err = capsys.readouterr().err
    assert f"resuming {out}: 3 input(s) already recorded there are skipped, 2 to do" in err
    assert f"2 classified; 0 failed; 3 skipped as already in {out} (--resume)" in err
    assert len(read_records(out, "json")) == 5


class Figures:
    """Records the text and ticks of every figure plots.save writes (then writes it as usual)."""

    def __init__(self, monkeypatch):
        self.saved = {}
        original = plots.save

        def save(fig, out, **kwargs):
            self.saved[out.name] = {"title": fig._suptitle.get_text() if fig._suptitle else "",
                                    "xticks": [list(ax.get_xticks()) for ax in fig.axes]}
            original(fig, out, **kwargs)
        monkeypatch.setattr(plots, "save", save)


def test_the_grids_say_how_to_read_them(small_bundle, fixture_data, tmp_path, monkeypatch):
    figures = Figures(monkeypatch)
    assert main(["evaluate", "--data", str(fixture_data), "--checkpoint", str(small_bundle),  # all 3 classes
                 "--out", str(tmp_path / "report"), "--backend", "onnx"]) == 0
    for grid in ("prediction_grid.png", "cam_grid.png"):
        assert "[true class] in brackets; red: wrong" in figures.saved[grid]["title"]


def test_the_grad_cam_caption_separates_label_and_probability(small_bundle, fixture_data, tmp_path, capsys):
    from pneumoscope.runtime.explain import caption

    image = sorted((fixture_data / "val" / "NORMAL").iterdir())[0]
    assert predict(small_bundle, image, "--cam", tmp_path / "cams", "--format", "json") == 0
    record = json.loads(capsys.readouterr().out)
    [overlay] = (tmp_path / "cams").glob(f"{image.stem}_*_cam.png")  # named with a hash of the input's path
    assert overlay.stat().st_size > 0
    from pneumoscope.runtime.classifier import Record

    text = caption(Record(**{k: record[k] for k in ("path", "status", "label", "probabilities", "reliable")}))
    label, probability = record["label"], f"{record['probabilities'][record['label']]:.2f}"
    font = ImageFont.load_default(size=20)  # the overlay's font
    separator = font.getlength(text) - font.getlength(label) - font.getlength(probability)
    assert text.startswith(label) and probability in text and separator >= font.size / 2


def test_training_curves_have_whole_epochs(tmp_path, monkeypatch):
    from pneumoscope.runs.rundir import RunDir

    figures = Figures(monkeypatch)
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    for epoch in (0, 1):  # what a 2-epoch run records
        run.write_epoch({"epoch": epoch, "train_loss": 1.0 - epoch / 4, "train_acc": 0.5, "val_loss": 1.1,
                         "val_acc": 0.4, "val_bacc": 0.4, "val_n": 4, "lr": 1e-3, "seconds": 1.0, "images_per_s": 9})
    ticks = [t for axis in figures.saved["curves.png"]["xticks"] for t in axis]
    assert ticks and all(float(t).is_integer() for t in ticks)
