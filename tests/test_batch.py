"""Streaming batch prediction to a file, and resuming it after an interruption."""
import csv
import json
import os
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
                 "--batch-size", "4", *map(str, extra)])


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
    source = next((folder / "NORMAL").glob("*.jpeg"))
    os.rename(source, os.path.join(os.fsencode(folder / "NORMAL"), b"caf\xe9.jpeg"))
    out = tmp_path / "records.csv"
    assert run(small_bundle, folder, out, "--format", "csv") == 1
    lines = out.read_bytes().splitlines()
    assert len(lines) == 14 and any(b"caf\\xe9.jpeg,ok," in line for line in lines)  # escaped (docs/inputs.md)
    assert run(small_bundle, folder, out, "--format", "csv", "--resume") == 1  # reads its own file back
    assert len(out.read_bytes().splitlines()) == 14
    out.write_bytes(out.read_bytes().replace(b"caf\\xe9", b"caf\xe9"))  # the raw byte, as earlier versions wrote it
    assert run(small_bundle, folder, out, "--format", "csv", "--resume") == 1
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


# ------------------------------------------------------------------ files a user's day brings (issue 26)
def cli(*args, **kwargs):
    """`python -m pneumoscope.cli ARGS` in a subprocess (what a shell runs): stdout and stderr bound
    as the test needs them."""
    import subprocess
    import sys

    kwargs.setdefault("stdout", subprocess.PIPE)
    return subprocess.run([sys.executable, "-m", "pneumoscope.cli", *map(str, args)], stderr=subprocess.PIPE,
                          text=True, timeout=120, **kwargs)


def one_line_error(err: str, *names) -> str:
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("predict -> ")]  # not the bar
    assert len(lines) == 1 and lines[0].startswith("pneumoscope: error: "), err
    assert "Traceback" not in err and "Exception ignored" not in err
    for name in names:
        assert str(name) in lines[0]
    return lines[0]


def records_of(out):
    return [json.loads(line) for line in out.read_text().splitlines()]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_output_or_stdout_is_one_line_naming_it(small_bundle, folder, capsys):
    assert run(small_bundle, folder, "/dev/full") == 1
    assert "No space left on device" in one_line_error(capsys.readouterr().err, "/dev/full")
    image = next((folder / "NORMAL").glob("*.jpeg"))
    with open("/dev/full", "w") as full:
        done = cli("predict", image, "--checkpoint", small_bundle, stdout=full)
    assert done.returncode == 1 and "No space left" in one_line_error(done.stderr, "<stdout>")


def test_a_disk_filling_mid_run_is_one_line_and_resumes(small_bundle, folder, tmp_path):
    """The file size limit (RLIMIT_FSIZE) stands in for a disk that fills: a write past it fails
    (EFBIG) as a full disk's does (ENOSPC), in the middle of a record."""
    import resource
    import signal

    out = tmp_path / "records.jsonl"

    def small_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel's signal ends the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (1500, 1500))

    done = cli("predict", folder, "--checkpoint", small_bundle, "--output", out, "--batch-size", "4",
               preexec_fn=small_disk)
    assert done.returncode == 1 and "--resume" in one_line_error(done.stderr, out)
    assert 0 < out.stat().st_size <= 1500
    assert run(small_bundle, folder, out, "--resume") == 1  # the broken file
    records = records_of(out)
    assert len(records) == 13 and len({r["path"] for r in records}) == 13


def test_outputs_in_places_that_cannot_be_written_are_one_line(small_bundle, folder, tmp_path, capsys):
    """A folder that is a file, as a read-only file system does for root too: the first write fails."""
    image = next((folder / "NORMAL").glob("*.jpeg"))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert run(small_bundle, image, blocker / "records.jsonl") in (1, 2)
    one_line_error(capsys.readouterr().err, blocker / "records.jsonl")
    out = tmp_path / "records.jsonl"
    assert run(small_bundle, image, out, "--cam", blocker / "cams") == 1
    one_line_error(capsys.readouterr().err, blocker / "cams")
    assert [r["status"] for r in records_of(out)] == ["ok"]  # the record before the failed overlay is kept
    assert not list(tmp_path.glob(".*.tmp"))


def test_resume_keys_on_the_path_given_not_where_a_symlink_leads(small_bundle, fixture_data, tmp_path):
    files = sorted((fixture_data / "train" / "NORMAL").iterdir())[:6]
    links = tmp_path / "links"
    links.mkdir()
    for i in range(60):
        (links / f"{i:02d}_{files[i % 6].name}").symlink_to(files[i % 6])
    out = tmp_path / "records.jsonl"
    assert run(small_bundle, links, out) == 0
    out.write_text("".join(out.read_text().splitlines(keepends=True)[:10]))  # killed after 10 records
    assert run(small_bundle, links, out, "--resume") == 0
    records = records_of(out)
    assert len(records) == 60 and {r["path"] for r in records} == {str(p) for p in links.iterdir()}


def test_a_second_writer_to_one_output_is_refused(small_bundle, folder, tmp_path, capsys):
    import fcntl

    out = tmp_path / "records.jsonl"
    assert run(small_bundle, folder, out) == 1
    capsys.readouterr()  # the first run's closing summary
    before = out.read_bytes()
    with open(out, "a") as first:  # a `predict` still writing to the file holds this lock
        fcntl.flock(first.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        for extra in ((), ("--resume",)):
            assert run(small_bundle, folder, out, *extra) == 1
            assert "another process" in one_line_error(capsys.readouterr().err, out)
            assert out.read_bytes() == before  # neither emptied nor appended to
    assert run(small_bundle, folder, out) == 1 and len(records_of(out)) == 13  # the lock went with its holder


def test_cam_overlays_keep_their_names_on_resume(small_bundle, fixture_data, tmp_path):
    first, second = sorted((fixture_data / "val" / "NORMAL").iterdir())[:2]
    root, cams, out = tmp_path / "in", tmp_path / "cams", tmp_path / "records.jsonl"
    (root / "a").mkdir(parents=True)
    shutil.copy(first, root / "a" / "x.jpeg")
    assert run(small_bundle, root, out, "--cam", cams) == 0
    [overlay] = list(cams.iterdir())
    drawn = overlay.read_bytes()
    (root / "b").mkdir()
    shutil.copy(second, root / "b" / "x.jpeg")  # another X-ray of the same name: the run resumed on it
    assert run(small_bundle, root, out, "--cam", cams, "--resume") == 0
    assert len(records_of(out)) == 2 and len(list(cams.iterdir())) == 2
    assert overlay.read_bytes() == drawn  # a/x.jpeg's overlay is still its own


def test_csv_repair_cuts_records_not_lines(small_bundle, folder, tmp_path):
    """A CSV whose file names hold a raw newline (as written before names were escaped) cut right
    after that newline: the partial record is dropped, not split into two rows."""
    source = next((folder / "NORMAL").glob("*.jpeg"))
    source.rename(source.with_name("two\nlines.jpeg"))
    out = tmp_path / "records.csv"
    assert run(small_bundle, folder, out, "--format", "csv") == 1
    rows = list(csv.reader(out.read_bytes().decode().splitlines(keepends=True)))
    with open(out, "w", newline="") as handle:  # the names raw, as a CSV of an earlier version holds them
        csv.writer(handle).writerows([[row[0].replace("\\n", "\n"), *row[1:]] for row in rows])
    data = out.read_bytes()
    out.write_bytes(data[: data.index(b"two\nlines") + 4])  # killed right after the newline in the name
    assert run(small_bundle, folder, out, "--format", "csv", "--resume") == 1
    resumed = list(csv.DictReader(out.read_bytes().decode().splitlines(keepends=True)))
    names = sorted(os.path.basename(r["path"]) for r in resumed)
    assert len(resumed) == 13 and names == sorted(p.name.replace("\n", "\\n") for p in folder.rglob("*.*"))


def test_resume_refuses_the_other_format_and_deep_nesting(small_bundle, folder, tmp_path, capsys):
    image = next((folder / "NORMAL").glob("*.jpeg"))
    out = tmp_path / "records.txt"  # an extension that implies no format: --format decides
    assert run(small_bundle, image, out, "--format", "json") == 0
    capsys.readouterr()
    before = out.read_bytes()
    assert run(small_bundle, image, out, "--format", "csv", "--resume") == 1  # was: a CSV row appended, input redone
    assert "--format json" in one_line_error(capsys.readouterr().err, out)
    assert out.read_bytes() == before
    out.write_bytes(before + b"[" * 100_000 + b"]" * 100_000 + b"\n")
    assert run(small_bundle, image, out, "--format", "json", "--resume") == 1  # was: RecursionError
    assert "cannot resume" in one_line_error(capsys.readouterr().err, out)


def test_file_names_are_escaped_the_same_in_every_format(small_bundle, folder, tmp_path, capsys):
    """Not UTF-8, a newline, a backslash, a right-to-left override: valid UTF-8 in every format, one
    line per record, each name told apart and read back by --resume (docs/inputs.md)."""
    from pneumoscope.workflows.batch import unescape_name

    sources = sorted((folder / "NORMAL").glob("*.jpeg"))[:4]
    names = [b"caf\xe9.jpeg", b"two\nlines.jpeg", b"back\\xe9.jpeg", "rtl\u202egpj.jpeg".encode()]
    for source, name in zip(sources, names):
        os.rename(source, os.path.join(os.fsencode(folder / "NORMAL"), name))
    expected = {"caf\\xe9.jpeg", "two\\nlines.jpeg", "back\\\\xe9.jpeg", "rtl\\u202egpj.jpeg"}
    for fmt in ("json", "csv"):
        out = tmp_path / f"records.{fmt}"
        assert run(small_bundle, folder, out, "--format", fmt) == 1
        text = out.read_bytes().decode("utf-8")  # strict: no raw bytes, no lone surrogates
        rows = [json.loads(line) for line in text.splitlines()] if fmt == "json" else \
            list(csv.DictReader(text.splitlines()))  # no newline inside a record
        assert len(rows) == 13 and expected <= {os.path.basename(r["path"]) for r in rows}
        assert {os.fsencode(unescape_name(r["path"])) for r in rows} >= {os.path.join(os.fsencode(folder / "NORMAL"), n)
                                                                        for n in names}
        assert run(small_bundle, folder, out, "--format", fmt, "--resume") == 1
        assert out.read_bytes().decode("utf-8") == text  # every name was recognised: nothing redone
    capsys.readouterr()
    assert main(["predict", str(folder), "--checkpoint", str(small_bundle)]) == 1
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 14 and sum(any(e in line for e in expected) for line in table) == 4
