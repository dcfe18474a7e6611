from pathlib import Path

import pytest

from pneumoscope.core.labels import (
    BINARY,
    THREE,
    classes_for,
    is_image_file,
    is_kermany_tree,
    kermany_patient,
    label_from_path,
    patient_id,
    task_label,
)


@pytest.mark.parametrize("name, expected", [
    ("person1000_virus_1681.jpeg", "person1000"),
    ("person1000_bacteria_2931.jpeg", "person1000"),
    ("person447_virus_921_1.jpeg", "person447"),
    ("IM-0115-0001.jpeg", "IM-0115"),
    ("NORMAL2-IM-1427-0001.jpeg", "NORMAL2-IM-1427"),
    ("NORMAL2-IM-0535-0001-0002.jpeg", "NORMAL2-IM-0535"),
    ("scan.png", "scan"),
])
def test_patient_id(name, expected):
    assert patient_id(name) == expected
    assert kermany_patient(name) == (None if name == "scan.png" else expected)


@pytest.mark.parametrize("path, expected", [
    ("train/PNEUMONIA/person1000_virus_1681.jpeg", "VIRUS"),
    ("train/PNEUMONIA/person1000_bacteria_2931.jpeg", "BACTERIA"),
    ("train/NORMAL/IM-0115-0001.jpeg", "NORMAL"),
    ("x/BACTERIA/anything.png", "BACTERIA"),
    ("x/VIRUS/anything.png", "VIRUS"),
    ("train/PNEUMONIA/person1_unknown_1.jpeg", None),
    ("train/PNEUMONIA/person1_bacteria_virus.jpeg", None),
    ("elsewhere/person1_virus_1.jpeg", None),
])
def test_label_from_path(path, expected):
    assert label_from_path(path) == expected


def test_labels_of_every_real_fixture_file(fixture_data):
    files = sorted(p for p in fixture_data.rglob("*") if p.is_file())
    labels = [label_from_path(p) for p in files]
    assert None not in labels
    assert set(labels) == set(THREE)
    for path, label in zip(files, labels):
        if label != "NORMAL":
            assert label.lower() in path.name


def test_task_mapping():
    assert classes_for("three") == THREE and classes_for("binary") == BINARY
    assert [task_label(x, "binary") for x in THREE] == ["NORMAL", "PNEUMONIA", "PNEUMONIA"]
    assert task_label("VIRUS", "three") == "VIRUS"
    # a PNEUMONIA file with no 3-class label, and a generic folder's class, are their own labels
    assert task_label("PNEUMONIA", "binary") == "PNEUMONIA" and task_label("daisy", "three") == "daisy"
    with pytest.raises(ValueError):
        classes_for("four")


def test_kermany_tree_is_told_by_its_class_folders():
    assert is_kermany_tree({"NORMAL", "PNEUMONIA"}) and is_kermany_tree({"Normal", "bacteria", "VIRUS"})
    assert not is_kermany_tree({"Infected", "Normal"})  # Monk's layout: classes are the folder names
    assert not is_kermany_tree({"NORMAL", "PNEUMONIA", "COVID"}) and not is_kermany_tree(set())


def test_image_suffixes_case_insensitive():
    assert is_image_file("a.JPEG") and is_image_file(Path("b.Png")) and is_image_file("c.dcm")
    assert not is_image_file("notes.txt") and not is_image_file("MANIFEST.csv")
