from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT

from pneumoscope.core.files import atomic_write
from pneumoscope.data.datasets import (
    load_pixels,
    manifest_hash,
    patient_folds,
    read_dataset,
    read_manifest,
    split_by_patient,
    split_dataset,
    write_manifest,
)
from pneumoscope.data.transforms import XrayDataset, class_weights, eval_transform, train_transform


def test_read_dataset_fixture_layout(fixture_data):
    dataset = read_dataset(fixture_data)
    samples, skipped = dataset.samples, dataset.skipped
    assert len(samples) == 80 and not skipped
    assert Counter(s.label for s in samples) == Counter({"NORMAL": 28, "BACTERIA": 28, "VIRUS": 24})


def test_read_dataset_single_split_and_three_class_folders(tmp_path, fixture_data):
    for label in ("BACTERIA", "VIRUS"):
        (tmp_path / label).mkdir()
    src = sorted((fixture_data / "train" / "PNEUMONIA").iterdir())
    (tmp_path / "BACTERIA" / "a.jpeg").write_bytes(src[0].read_bytes())
    (tmp_path / "VIRUS" / "b.jpeg").write_bytes(src[1].read_bytes())
    (tmp_path / "VIRUS" / "notes.txt").write_text("not an image")
    samples = read_dataset(tmp_path).samples
    # names that are not Kermany's: each image is its own group, named by its path under the root
    assert [(s.label, s.patient_id) for s in samples] == [("BACTERIA", "BACTERIA/a.jpeg"), ("VIRUS", "VIRUS/b.jpeg")]
    single = read_dataset(fixture_data / "train").samples
    assert len(single) == 72


def test_unlabelled_pneumonia_file_is_reported_not_guessed(tmp_path, fixture_data):
    (tmp_path / "PNEUMONIA").mkdir()
    image = next((fixture_data / "train" / "NORMAL").iterdir()).read_bytes()
    (tmp_path / "PNEUMONIA" / "person1_bacteria_1.jpeg").write_bytes(image)
    (tmp_path / "PNEUMONIA" / "person2_mystery_1.jpeg").write_bytes(image)
    dataset = read_dataset(tmp_path)
    samples, skipped = dataset.samples, dataset.skipped
    assert [s.label for s in samples] == ["BACTERIA"]
    assert len(skipped) == 1 and "person2_mystery_1.jpeg" in skipped[0] and "--task binary" in skipped[0]


def _assert_no_leak(samples):
    sides = defaultdict(set)
    for s in samples:
        sides[s.patient_id].add(s.split)
    assert all(len(v) == 1 for v in sides.values())


def test_split_on_real_data_has_no_patient_leak_and_keeps_balance(full_data):
    samples = split_by_patient(read_dataset(full_data).samples, 0.15, 0.15, seed=0)
    assert len(samples) == 5232
    _assert_no_leak(samples)
    # personN with both bacteria and virus files: one patient, one side
    mixed = {s.patient_id for s in samples if s.label == "BACTERIA"} & {s.patient_id for s in samples if s.label == "VIRUS"}
    assert len(mixed) > 100
    overall = Counter(s.label for s in samples)
    for split, fraction in (("train", 0.70), ("val", 0.15), ("test", 0.15)):
        part = [s for s in samples if s.split == split]
        assert abs(len(part) / len(samples) - fraction) < 0.03
        counts = Counter(s.label for s in part)
        for label, total in overall.items():  # class shares within 3 points of the pool's
            assert abs(counts[label] / len(part) - total / len(samples)) < 0.03
    # same seed, same split; another seed, another split
    again = split_by_patient(read_dataset(full_data).samples, 0.15, 0.15, seed=0)
    assert manifest_hash(again) == manifest_hash(samples)
    assert manifest_hash(split_by_patient(read_dataset(full_data).samples, 0.15, 0.15, seed=1)) != manifest_hash(samples)


def test_default_split_keeps_the_internal_test_of_the_15_percent_split(full_data):
    """The default split (5% validation) cuts the same internal test split as the 15% one the
    earlier models were measured on (the test fold is cut first), so their figures stay comparable
    and examples/ stays inside it; the rest is cut again, with a third of the validation images."""
    pool = read_dataset(full_data).samples
    default, old = split_by_patient(pool), split_by_patient(pool, 0.15, 0.15, seed=0)
    _assert_no_leak(default)
    side = lambda samples, split: {s.path for s in samples if s.split == split}  # noqa: E731
    assert side(default, "test") == side(old, "test") and len(side(default, "test")) == 748
    assert 0.04 < len(side(default, "val")) / len(pool) < 0.06 and len(side(default, "train")) > len(side(old, "train"))
    examples = {p.name for p in (ROOT / "examples").rglob("*.jpeg")}
    assert len(examples) == 30 and examples <= {Path(p).name for p in side(default, "test")}


def test_the_official_16_image_val_folder_joins_the_pool_so_the_default_split_is_unchanged(full_data):
    """read_dataset + split_dataset (what split and train do) on the Kermany train/ + val/ tree cut
    exactly the split the shipped models were trained on: val/ has no viral image (and 8 + 8 of
    5,232), so it joins the pool, and the pool is cut by patient as before."""
    dataset = read_dataset(full_data)
    samples, notes = split_dataset(dataset)
    before = split_by_patient([s.__class__(s.path, s.label, s.patient_id) for s in dataset.samples])
    assert [(s.path, s.split) for s in samples] == [(s.path, s.split) for s in before]
    assert manifest_hash(samples) == manifest_hash(before)
    assert notes[0].startswith("val/: 16 images, too few (") and "VIRUS 0, needs " in notes[0]
    assert notes[1:] == ["val: cut from the pool by patient (from file names), 0.05 of its groups",
                         "test: cut from the pool by patient (from file names), 0.15 of its groups"]


def test_a_trees_own_val_and_test_are_used_when_they_hold_enough_of_each_class(tmp_path, fixture_data):
    import shutil

    for side, start, n in (("train", 0, 14), ("val", 14, 3), ("test", 17, 3)):
        for label in ("NORMAL", "PNEUMONIA"):
            files = sorted((fixture_data / "train" / label).iterdir())[start:start + n]
            (tmp_path / side / label).mkdir(parents=True)
            for path in files:
                shutil.copy(path, tmp_path / side / label / path.name)
    dataset = read_dataset(tmp_path, "binary")
    samples, notes = split_dataset(dataset, 0.2, 0.2)
    assert notes == ["val: the tree's own val/ folder, 6 images", "test: the tree's own test/ folder, 6 images"]
    assert all(s.split == Path(s.path).parts[-3] for s in samples)  # each image on its folder's side
    samples, notes = split_dataset(dataset, 0.2, 0.5)  # 3 of 20 NORMAL is under half of what 0.5 gives
    assert notes == ["val: the tree's own val/ folder, 6 images",
                     "test/: 6 images, too few (NORMAL 3, needs 5, PNEUMONIA 3, needs 5); they join the pool",
                     "test: cut from the pool by patient (from file names), 0.5 of its groups"]


def test_patient_folds_do_not_share_patients(fixture_data):
    samples = read_dataset(fixture_data).samples
    folds = patient_folds(samples, 4, seed=0)
    assert sorted(np.concatenate(folds).tolist()) == list(range(len(samples)))
    owners = [{samples[i].patient_id for i in fold} for fold in folds]
    for a in range(4):
        for b in range(a + 1, 4):
            assert not owners[a] & owners[b]


def test_manifest_round_trip_and_cli(tmp_path, fixture_data):
    from pneumoscope.cli import main

    out = tmp_path / "sub" / "manifest.csv"
    assert main(["split", "--data", str(fixture_data), "--out", str(out), "--seed", "3"]) == 0
    header = out.read_text().splitlines()[0]
    assert header.startswith("path,label,patient_id,split")
    samples = read_manifest(out)
    assert len(samples) == 80 and {s.split for s in samples} == {"train", "val", "test"}
    _assert_no_leak(samples)
    assert all((tmp_path / "sub" / s.path).exists() or __import__("os").path.exists(s.path) for s in samples)
    assert len(read_dataset(out).select("test")) == sum(s.split == "test" for s in samples)


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(target, "w") as handle:
            handle.write("half")
            raise RuntimeError("crash")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_atomic_write_gives_the_mode_open_would(tmp_path):
    import os
    import stat

    previous = os.umask(0o022)
    try:
        with atomic_write(tmp_path / "report.json", "w") as handle:
            handle.write("{}")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "report.json").stat().st_mode) == 0o644  # not mkstemp's 0600


def test_pixels_cached_once_and_bad_files_dropped(tmp_path, fixture_data):
    samples = [s for s in read_dataset(fixture_data).samples][:6]
    bad = tmp_path / "NORMAL" / "IM-9999-0001.jpeg"
    bad.parent.mkdir()
    bad.write_bytes(b"\xff\xd8\xff garbage")
    from pneumoscope.data.datasets import Sample
    samples.append(Sample(str(bad), "NORMAL", "IM-9999"))
    cache = tmp_path / "cache"
    pixels, kept, errors = load_pixels(samples, 48, cache)
    assert pixels.shape == (6, 48, 48) and pixels.dtype == np.uint8 and len(kept) == 6
    assert len(errors) == 1 and "IM-9999-0001.jpeg" in errors[0]
    assert len(list(cache.glob("pixels-48-*.npz"))) == 1
    again, kept2, _ = load_pixels(samples, 48, cache)
    assert np.array_equal(again, pixels) and kept2 == kept


def test_dataset_and_augmentation(fixture_data):
    import torch

    samples = read_dataset(fixture_data).samples[:8]
    pixels, kept, _ = load_pixels(samples, 64)
    plain = XrayDataset(pixels, kept, ("NORMAL", "PNEUMONIA"), "binary", eval_transform())
    x, y = plain[0]
    assert x.shape == (1, 64, 64) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert torch.allclose(x[0], torch.from_numpy(pixels[0]).float() / 255)
    augmented = XrayDataset(pixels, kept, ("NORMAL", "PNEUMONIA"), "binary", train_transform(64))
    a, b = augmented[0][0], augmented[0][0]
    assert a.shape == (1, 64, 64) and not torch.equal(a, b)
    weights = class_weights(torch.tensor([0, 0, 0, 1]), 2)
    assert weights[1] > weights[0] and torch.isclose(weights.mean(), torch.tensor(1.0))


def test_too_few_groups_per_class_is_one_clear_line(fixture_data):
    samples = read_dataset(fixture_data).samples
    with pytest.raises(ValueError) as err:
        patient_folds(samples, 25)
    assert str(err.value) == ("cannot make 25-fold cross-validation by patient/group: it needs at least 25 groups in "
                              "every class, and the data has BACTERIA 27, NORMAL 28, VIRUS 24; add images or lower "
                              "the fraction")


def test_manifest_rows_need_a_path_and_a_label(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label,patient_id,split\na.jpg,daisy,,train\nb.jpg,,p2,val\n")
    with pytest.raises(ValueError, match=r"m\.csv: line 3 has no path or no label"):
        read_manifest(manifest)
    manifest.write_text("path,label,patient_id,split\na.jpg,daisy,,train\n")
    assert [(s.label, s.patient_id) for s in read_manifest(manifest)] == [("daisy", "a.jpg")]  # no group: the image


# ---------------------------------------------------------------- split on big or broken manifests (issue 26)
def test_split_of_a_manifest_with_missing_files_says_so_once(tmp_path, fixture_data, caplog, capsys):
    from pneumoscope.cli import main

    manifest = write_manifest(read_dataset(fixture_data).samples, tmp_path / "m.csv")
    real = manifest.read_text()
    missing = "".join(f"gone/person{9000 + i}_bacteria_{i}.jpeg,BACTERIA,person{9000 + i},\n" for i in range(500))
    manifest.write_text(real + missing)
    out = tmp_path / "out.csv"
    assert main(["split", "--data", str(manifest), "--out", str(out)]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "500 image(s) left out" in warnings[0] and "no such file" in warnings[0], warnings
    assert len(read_manifest(out)) == 80 and "gone/" not in out.read_text()
    manifest.write_text(real.splitlines(keepends=True)[0] + missing)  # nothing there at all
    assert main(["split", "--data", str(manifest), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{manifest}: none of its 500 files exists" in err and len(err.strip().splitlines()) == 1, err


def test_folds_are_sklearns_bit_for_bit():
    """pneumoscope.folds.StratifiedGroupKFold replaces only sklearn's per-group step: the same folds
    on random data of every shape (groups of one or several images, 2 to 19 folds, 2 to 4 classes)."""
    import warnings

    from sklearn.model_selection import StratifiedGroupKFold as Sklearn

    from pneumoscope.data import folds

    assert hasattr(Sklearn, folds.HOOK)  # else the class is sklearn's own again: right, but slow
    rng = np.random.default_rng(0)
    compared = 0
    while compared < 100:
        n_folds, n_classes = int(rng.integers(2, 20)), int(rng.integers(2, 5))
        n = int(rng.integers(n_folds * n_classes + 5, 400))
        groups = rng.integers(0, max(n_folds, n // int(rng.integers(1, 4))), n)
        labels = rng.integers(0, n_classes, n)
        labels[: n_folds * n_classes] = np.repeat(np.arange(n_classes), n_folds)
        seed = int(rng.integers(0, 1000))
        with warnings.catch_warnings():
            # the random labels often have a class with fewer members than folds: sklearn says so
            warnings.filterwarnings("ignore", message="The least populated class in y has only", category=UserWarning)
            try:
                expected = [t.tolist() for _, t in Sklearn(n_folds, shuffle=True, random_state=seed).split(
                    labels, labels, groups)]
            except ValueError:  # fewer groups than folds
                continue
            got = [t.tolist() for _, t in folds.StratifiedGroupKFold(n_folds, shuffle=True, random_state=seed).split(
                labels, labels, groups)]
        assert got == expected
        compared += 1


def test_split_evaluates_each_patient_once_not_once_per_fold(fixture_data, monkeypatch):
    """The cost of a split, counted instead of timed: sklearn scored each patient against each fold
    with one np.std call (17 folds for the 5% validation cut: 50,000 rows took 2.5 minutes); here
    one call scores all the folds."""
    fixture = read_dataset(fixture_data).samples  # 40 copies of the 80 rows, each copy its own patients: 3,200 rows
    samples = [s.__class__(f"{s.path}#{i}", s.label, f"{s.patient_id}-{i // len(fixture)}")
               for i, s in enumerate(fixture * 40)]
    calls = []
    real = np.std
    monkeypatch.setattr(np, "std", lambda *a, **k: calls.append(1) or real(*a, **k))
    split_by_patient(samples, 0.05, 0.15, seed=0)
    patients = len({s.patient_id for s in samples})
    assert len(calls) <= 2 * patients + 4  # test cut, then val cut of what is left: one call per patient each
