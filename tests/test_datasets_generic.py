"""Datasets other than Kermany's file names: any ImageFolder tree (class = folder name), Monk's
Infected/Normal layout, PNEUMONIA/ files without bacteria/virus in their names, groups from a CSV.
Every tree is built in tmp_path from the real fixture X-rays."""
from __future__ import annotations

import csv
import logging
from collections import Counter, defaultdict

import pytest
import torch

from pneumoscope.core.labels import BINARY, THREE
from pneumoscope.data.datasets import (
    class_indices,
    load_pixels,
    read_dataset,
    read_groups,
    split_by_patient,
    split_dataset,
    write_manifest,
)
from pneumoscope.data.transforms import XrayDataset, eval_transform


def _xrays(fixture_data, n):
    return sorted((fixture_data / "train").rglob("*.jpeg"))[:n]


def _tree(root, layout: dict[str, list[tuple[str, bytes]]]):
    for folder, files in layout.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for name, data in files:
            (root / folder / name).write_bytes(data)
    return root


def _generic(root, fixture_data, classes=("daisy", "roses", "tulips"), per_class=10):
    images = [p.read_bytes() for p in _xrays(fixture_data, per_class * len(classes))]
    return _tree(root, {f"train/{c}": [(f"img{j}.jpg", images[i * per_class + j]) for j in range(per_class)]
                        for i, c in enumerate(classes)})


def test_generic_folder_gets_its_own_classes_and_warns_about_per_image_splits(tmp_path, fixture_data, caplog):
    root = _generic(tmp_path / "flowers", fixture_data)
    (root / "train" / "img_without_class.jpg").write_bytes(_xrays(fixture_data, 1)[0].read_bytes())
    description = read_dataset(root, task="three")  # 3 folders: --task three does not contradict them
    assert description.classes == ("daisy", "roses", "tulips") and description.layout == "folders"
    assert description.task == "folders" and {s.split for s in description.samples} == {"train"}
    assert Counter(s.label for s in description.samples) == {"daisy": 10, "roses": 10, "tulips": 10}
    assert description.grouping == {"per image": 30}
    assert len({s.patient_id for s in description.samples}) == 30  # img0.jpg of daisy/ and roses/ stay apart
    assert [line.split(": ", 1)[1] for line in description.skipped] == ["not in a class folder; left out"]
    with caplog.at_level(logging.WARNING, logger="pneumoscope.data"):  # warned where a split is cut, not on reading
        split_dataset(description, 0.2, 0.2)
    warnings = [r.getMessage() for r in caplog.records]
    assert any("30 of 30 images have no patient or group id" in w and "leakage" in w and "--groups" in w
               for w in warnings)
    # a generic tree keeps its own classes; a --task that contradicts them is one line
    with pytest.raises(ValueError) as err:
        read_dataset(root, "binary")
    assert str(err.value) == (f"{root}: --task binary means 2 classes (NORMAL / PNEUMONIA), but its class folders "
                              "are 3 classes (daisy, roses, tulips); leave --task out to learn them")


def test_generic_folder_splits_and_feeds_a_training_step(tmp_path, fixture_data):
    dataset = read_dataset(_generic(tmp_path / "flowers", fixture_data))
    samples, classes = dataset.samples, dataset.classes
    split = split_by_patient(samples, 0.2, 0.2, seed=0)
    for side in ("train", "val", "test"):  # stratified: every class on every side
        assert {s.label for s in split if s.split == side} == set(classes)
    train = [s for s in split if s.split == "train"]
    pixels, kept, errors = load_pixels(train, 32, tmp_path / "cache")
    assert len(kept) == len(train) and not errors
    dataset = XrayDataset(pixels, kept, classes, "three", eval_transform())
    assert sorted(set(dataset.targets.tolist())) == [0, 1, 2]
    from pneumoscope.nets.registry import create_model

    model = create_model("simple_cnn", len(classes), pretrained=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = next(iter(torch.utils.data.DataLoader(dataset, batch_size=8, shuffle=True)))
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    assert x.shape == (8, 1, 32, 32) and torch.isfinite(loss)


def test_monk_layout_is_kept_with_patients_from_file_names(tmp_path, fixture_data):
    infected = sorted((fixture_data / "train" / "PNEUMONIA").iterdir())[:8]
    normal = sorted((fixture_data / "train" / "NORMAL").iterdir())[:8]
    root = _tree(tmp_path / "monk", {"Infected": [(p.name, p.read_bytes()) for p in infected],
                                     "Normal": [(p.name, p.read_bytes()) for p in normal]})
    description = read_dataset(root, "binary")  # 2 folders: --task binary agrees
    assert description.classes == ("Infected", "Normal") and len(description.samples) == 16
    assert description.grouping == {"file names": 16}  # Kermany file names still give the patient
    assert {s.patient_id for s in description.samples if s.label == "Infected"} == {p.name.split("_")[0] for p in infected}


def test_pneumonia_files_without_bacteria_or_virus_are_kept_for_binary(tmp_path, fixture_data):
    images = [p.read_bytes() for p in _xrays(fixture_data, 20)]
    root = _tree(tmp_path / "kaggle_like", {"NORMAL": [(f"img{i}.jpg", images[i]) for i in range(10)],
                                            "PNEUMONIA": [(f"img{i}.jpg", images[10 + i]) for i in range(9)]
                                            + [("person7_bacteria_1.jpeg", images[19])]})
    binary = read_dataset(root, "binary")
    samples, classes = binary.samples, binary.classes
    assert classes == BINARY and len(samples) == 20
    # one file name telling bacteria does not split PNEUMONIA into strata: the folder is the class
    assert Counter(s.label for s in samples) == {"NORMAL": 10, "PNEUMONIA": 10}
    split = split_by_patient(samples, 0.2, 0.2, seed=0)  # no scikit-learn n_splits failure
    assert {s.split for s in split} == {"train", "val", "test"}
    three = read_dataset(root)  # the 3-class reading is the default; 9 files have no 3-class label: left out, saying so
    assert Counter(s.label for s in three.samples) == {"NORMAL": 10, "BACTERIA": 1}
    assert len(three.skipped) == 9 and all("--task binary keeps it" in line for line in three.skipped)
    with pytest.raises(ValueError) as err:  # one BACTERIA patient cannot be in train, val and test
        split_by_patient(three.samples, 0.2, 0.2, seed=0)
    assert str(err.value) == ("cannot make a test split of 0.2 (1 of 5 folds) by patient/group: it needs at least 5 "
                              "groups in every class, and the data has BACTERIA 1, NORMAL 10; add images or lower "
                              "the fraction")
    (root / "PNEUMONIA" / "person7_bacteria_1.jpeg").unlink()
    with pytest.raises(ValueError, match="no PNEUMONIA file name says 'bacteria' or 'virus'.*use --task binary"):
        read_dataset(root, "three")


def test_three_class_reading_stays_the_default_on_kermany_trees(fixture_data):
    description = read_dataset(fixture_data)
    assert description.classes == THREE and description.layout == "kermany" and description.task == "three"
    assert description.grouping == {"file names": 80} and not description.skipped
    binary = read_dataset(fixture_data, "binary")  # every file tells its 3-class label: kept, mapped by the task
    assert binary.classes == BINARY and {s.label for s in binary.samples} == set(THREE)
    assert [s.patient_id for s in binary.samples] == [s.patient_id for s in description.samples]


def test_a_folder_of_images_is_one_class(tmp_path, fixture_data):
    dataset = read_dataset(fixture_data / "train" / "NORMAL")
    samples, classes = dataset.samples, dataset.classes
    assert classes == THREE and {s.label for s in samples} == {"NORMAL"} and len(samples) > 10


def test_groups_csv_by_path_or_filename(tmp_path, fixture_data, caplog):
    root = _generic(tmp_path / "flowers", fixture_data, classes=("cats", "dogs"), per_class=12)
    files = sorted(root.rglob("*.jpg"))
    by_path = tmp_path / "groups.csv"  # outside the data: paths relative to the data root
    with open(by_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "group"])
        writer.writerows([(p.relative_to(root).as_posix(), f"owner{i // 2}") for i, p in enumerate(files)])
    with caplog.at_level(logging.WARNING, logger="pneumoscope.data"):
        description = read_dataset(root, groups=by_path)
        split_dataset(description, 0.25, 0.25)
    assert description.grouping == {"groups CSV": 24} and not any("no patient" in r.getMessage() for r in caplog.records)
    assert len({s.patient_id for s in description.samples}) == 12
    sides = defaultdict(set)
    for s in split_by_patient(description.samples, 0.25, 0.25, seed=1):
        sides[s.patient_id].add(s.split)
    assert all(len(v) == 1 for v in sides.values())

    by_name = root / "groups.csv"
    by_name.write_text("filename,group\n" + "".join(f"img{i}.jpg,g{i}\n" for i in range(6)))
    grouping = read_dataset(root, groups=by_name).grouping
    assert grouping == {"groups CSV": 12, "per image": 12}  # img0-5 in cats/ and dogs/; the rest fall back
    bad = tmp_path / "bad.csv"
    bad.write_text("image,patient\na.jpg,1\n")
    with pytest.raises(ValueError, match="'group' column and a 'path' or 'filename' column"):
        read_groups(bad)


def test_manifest_with_any_labels_round_trips(tmp_path, fixture_data):
    dataset = read_dataset(_generic(tmp_path / "flowers", fixture_data, ("cats", "dogs")))
    samples, classes = dataset.samples, dataset.classes
    manifest = write_manifest(split_by_patient(samples, 0.2, 0.2, seed=0), tmp_path / "m.csv")
    again = read_dataset(manifest)
    again, again_classes = again.samples, again.classes
    assert again_classes == classes == ("cats", "dogs")
    assert [(s.label, s.patient_id) for s in again] == [(s.label, s.patient_id) for s in samples]
    with pytest.raises(ValueError, match=r"img0\.jpg: label 'cats' is not one of the classes NORMAL, BACTERIA, VIRUS"):
        class_indices(again, THREE, "three")
