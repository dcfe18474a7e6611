"""Streaming batch prediction to a file, and resuming it after an interruption."""
import csv
import json
import shutil

import pytest

from pneumoscope.cli import main


@pytest.fixture()
def folder(fixture_data, tmp_path):
    """12 real X-rays and one broken file."""
    root = tmp_path / "in"
    shutil.copytree(fixture_data / "val", root)
    for path in sorted((fixture_data / "train" / "NORMAL").iterdir())[:4]:
        shutil.copy(path, root / "NORMAL" / path.name)
    (root / "NORMAL" / "broken.png").write_bytes(b"\x89PNG garbage")
    return root


def run(bundle, folder, out, *extra):
    return main(["predict", str(folder), "--checkpoint", str(bundle), "--output", str(out),
                 "--batch-size", "4", *extra])


def test_output_streams_json_lines_with_a_progress_bar(small_bundle, folder, tmp_path, capsys):
    out = tmp_path / "records.jsonl"
    assert run(small_bundle, folder, out) == 1  # the broken file
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 13 and capsys.readouterr().out == ""
    assert {r["status"] for r in records} == {"ok", "error"}
    for r in records:
        assert set(r) == {"path", "status", "label", "probabilities", "error", "warnings", "reliable", "model"}


@pytest.mark.parametrize("fmt", ["json", "csv"])
def test_resume_after_an_interruption_mid_line(small_bundle, folder, tmp_path, fmt):
    out = tmp_path / f"records.{fmt}"
    run(small_bundle, folder, out, "--format", fmt)
    full = out.read_bytes()
    lines = full.splitlines(keepends=True)
    kept = b"".join(lines[:6])
    out.write_bytes(kept + lines[6][: len(lines[6]) // 2])  # killed while writing line 7
    assert run(small_bundle, folder, out, "--format", fmt, "--resume") == 1
    resumed = out.read_bytes()
    assert resumed.startswith(kept)  # finished records are not redone
    if fmt == "json":
        rows = [json.loads(line) for line in resumed.splitlines()]
        before = [json.loads(line) for line in full.splitlines()]
    else:
        rows, before = list(csv.DictReader(resumed.decode().splitlines())), list(csv.DictReader(full.decode().splitlines()))
    assert len(rows) == len(before) == 13
    assert sorted(rows, key=lambda r: r["path"]) == sorted(before, key=lambda r: r["path"])


def test_output_usage_errors(small_bundle, folder, tmp_path):
    assert run(small_bundle, folder, tmp_path / "x.csv", "--format", "table") == 2  # the extension says csv
    assert run(small_bundle, folder, tmp_path / "x", "--format", "table", "--resume") == 2  # a table cannot resume
    assert main(["predict", str(folder), "--checkpoint", str(small_bundle), "--resume"]) == 2


# ------------------------------------------------------------------ hardening (issue 12)
def test_mutated_dicom_and_multiframe_in_a_folder(small_bundle, folder, tmp_path):
    """The fuzz finding of issue 12 (Rows with VR 'UZ') crashed the whole batch: now one error record,
    the others classified; a multi-frame DICOM's record says the first frame was used."""
    import numpy as np
    from PIL import Image
    from test_images import make_dicom

    xray = np.asarray(Image.open(next((folder / "NORMAL").glob("*.jpeg"))).convert("L")).astype(np.uint16) * 16
    data = make_dicom(xray, tmp_path / "ok.dcm").read_bytes()
    rows = data.index(b"\x28\x00\x10\x00US")
    (folder / "uz.dcm").write_bytes(data[:rows + 4] + b"UZ" + data[rows + 6:])
    make_dicom(np.stack([xray, xray[::-1]]), folder / "frames.dcm")
    out = tmp_path / "records.jsonl"
    assert run(small_bundle, folder, out) == 1
    records = {r["path"].rsplit("/", 1)[-1]: r for r in map(json.loads, out.read_text().splitlines())}
    assert len(records) == 15 and records["uz.dcm"]["status"] == "error" and "UZ" in records["uz.dcm"]["error"]
    assert records["frames.dcm"]["status"] == "ok"
    assert any("first frame used (2 frames)" in w for w in records["frames.dcm"]["warnings"])


def test_resume_keys_on_the_resolved_path(small_bundle, folder, tmp_path, monkeypatch):
    out = tmp_path / "records.jsonl"
    assert run(small_bundle, folder, out) == 1
    monkeypatch.chdir(folder.parent)
    for spelling in ("in", "./in", f"{folder}/../in"):
        assert run(small_bundle, spelling, out, "--resume") == 1
    assert len(out.read_text().splitlines()) == 13


def test_csv_with_a_file_name_that_is_not_utf8(small_bundle, folder, tmp_path):
    import os

    source = next((folder / "NORMAL").glob("*.jpeg"))
    os.rename(source, os.path.join(os.fsencode(folder / "NORMAL"), b"caf\xe9.jpeg"))
    out = tmp_path / "records.csv"
    assert run(small_bundle, folder, out, "--format", "csv") == 1
    lines = out.read_bytes().splitlines()
    assert len(lines) == 14 and any(b"caf\xe9.jpeg,ok," in line for line in lines)
    assert run(small_bundle, folder, out, "--format", "csv", "--resume") == 1  # reads its own file back
    assert len(out.read_bytes().splitlines()) == 14


def test_empty_folder_is_an_error_record(small_bundle, folder, tmp_path, capsys):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("no images here")
    out = tmp_path / "records.jsonl"
    assert main(["predict", str(empty), "--checkpoint", str(small_bundle), "--output", str(out)]) == 1
    [record] = [json.loads(line) for line in out.read_text().splitlines()]
    assert record["status"] == "error" and record["error"] == f"{empty}: no image files in this folder"
    assert "no image files" in capsys.readouterr().err


def test_outputs_that_cannot_be_written_are_usage_errors(small_bundle, folder, tmp_path, capsys):
    image = next((folder / "NORMAL").glob("*.jpeg"))
    before = image.read_bytes()
    assert run(small_bundle, image, image) == 2
    assert image.read_bytes() == before and "is one of the inputs" in capsys.readouterr().err
    assert run(small_bundle, image, tmp_path) == 2
    assert "is a folder" in capsys.readouterr().err
    assert main(["predict", str(image), "--checkpoint", str(small_bundle), "--cam", str(image)]) == 2
    assert "is a file" in capsys.readouterr().err


def test_bad_port_and_checkpoints_are_one_line_errors(folder, tmp_path, capsys):
    import pickle

    with pytest.raises(SystemExit) as usage:
        main(["serve", "--port", "70000"])
    assert usage.value.code == 2 and "not a port number" in capsys.readouterr().err
    for option in ("--body-timeout", "--max-upload-mb"):  # 0 would refuse every upload
        with pytest.raises(SystemExit) as usage:
            main(["serve", option, "0"])
        assert usage.value.code == 2 and "must be greater than 0" in capsys.readouterr().err
    image = str(next((folder / "NORMAL").glob("*.jpeg")))
    junk, pickled = tmp_path / "junk.pt", tmp_path / "pickled.pt"
    junk.write_bytes(b"\x00junk" * 100)
    pickled.write_bytes(pickle.dumps({"meta": shutil.copy, "state_dict": {}}))  # a callable: code, not data
    for checkpoint in (junk, pickled):
        assert main(["predict", image, "--checkpoint", str(checkpoint)]) in (1, 2)
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and str(checkpoint) in err
        assert "Traceback" not in err and "weights_only" not in err
