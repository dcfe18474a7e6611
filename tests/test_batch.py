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
    assert run(small_bundle, folder, tmp_path / "x", "--format", "table") == 2
    assert main(["predict", str(folder), "--checkpoint", str(small_bundle), "--resume"]) == 2
