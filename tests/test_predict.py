import json

import numpy as np
import pytest

from pneumoscope.cli import main
from pneumoscope.predict import Classifier


@pytest.fixture(scope="module")
def classifier(tiny_run):
    return Classifier.load(tiny_run / "model.pt")


def test_python_api_on_path_and_array(classifier, fixture_data):
    path = next((fixture_data / "val" / "NORMAL").iterdir())
    record = classifier.predict(path)
    assert record.status == "ok" and record.label in classifier.classes
    assert sum(record.probabilities.values()) == pytest.approx(1.0, abs=1e-4)
    from pneumoscope.images import read_xray

    again = classifier.predict(read_xray(path))
    assert again.probabilities == pytest.approx(record.probabilities, abs=1e-6)


def test_predict_json_one_record_per_input_and_bad_files(tiny_run, fixture_data, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty.png").write_bytes(b"")
    good = next((fixture_data / "val" / "NORMAL").iterdir()).read_bytes()
    (bad / "truncated.jpeg").write_bytes(good[: len(good) // 3])
    (bad / "notes.jpg").write_text("this is text, not an image")
    folder = fixture_data / "val"
    code = main(["predict", str(folder), str(bad), str(tmp_path / "missing.png"), "--checkpoint",
                 str(tiny_run / "model.pt"), "--format", "json"])
    lines = capsys.readouterr().out.strip().splitlines()
    records = [json.loads(line) for line in lines]
    assert code == 1
    assert len(records) == 8 + 3 + 1
    ok = [r for r in records if r["status"] == "ok"]
    errors = {r["path"].rsplit("/", 1)[-1]: r["error"] for r in records if r["status"] == "error"}
    assert len(ok) == 8
    for r in ok:
        assert set(r) >= {"path", "status", "label", "probabilities", "error"}
        assert r["label"] == max(r["probabilities"], key=r["probabilities"].get)
    assert set(errors) == {"empty.png", "truncated.jpeg", "notes.jpg", "missing.png"}
    assert "empty" in errors["empty.png"] and "no such file" in errors["missing.png"]
    assert all("\n" not in e and "Traceback" not in e for e in errors.values())


def test_predict_exit_codes(tiny_run, fixture_data, capsys):
    path = str(next((fixture_data / "val" / "NORMAL").iterdir()))
    assert main(["predict", path, "--checkpoint", str(tiny_run / "model.pt"), "--format", "csv"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("path,status,label,p_NORMAL") and len(out) == 2
    with pytest.raises(SystemExit) as usage:
        main(["predict"])
    assert usage.value.code == 2
    assert main(["predict", path, "--checkpoint", "/nonexistent/model.pt"]) == 2


def test_batch_order_is_kept_with_errors_in_between(classifier, fixture_data):
    paths = sorted((fixture_data / "val" / "PNEUMONIA").iterdir())
    mixed = [paths[0], b"garbage", paths[1], np.zeros((0, 0), np.uint8), paths[2]]
    records = list(classifier.predict_many(mixed, batch_size=2))
    assert [r.status for r in records] == ["ok", "error", "ok", "error", "ok"]
    assert records[0].path == str(paths[0]) and records[4].path == str(paths[2])


def test_batches_side_by_side_give_the_one_at_a_time_answers(classifier, fixture_data):
    """predict_many runs ONNX batches on parallel one-thread sessions: same records, same order,
    a bad file in the middle included, as classifying each input alone."""
    assert classifier.backend == "onnx"
    classifier.workers = 2  # as on this 2-core machine, whatever the CI machine has
    paths = sorted(fixture_data.rglob("*.jpeg"))[:30]
    inputs = paths[:13] + [b"not an image"] + paths[13:]
    together = list(classifier.predict_many(inputs, batch_size=4))  # 8 batches, several in flight
    alone = [classifier.predict(source) for source in inputs]
    assert classifier._batch_session is not None  # the parallel path really ran
    assert [r.path for r in together] == [r.path for r in alone]
    assert [r.status for r in together] == [r.status for r in alone] and together[13].status == "error"
    for a, b in zip(together, alone):
        assert a.label == b.label
        for c in a.probabilities:
            assert abs(a.probabilities[c] - b.probabilities[c]) < 1e-5
