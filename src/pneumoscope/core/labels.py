"""Classes, labels read from folders and file names, and patient ids.

Two readings of an image-classification tree, chosen by its class folders:
- Kermany chest X-rays (class folders NORMAL, PNEUMONIA, BACTERIA, VIRUS in any case): the 3-class
  label comes from the folder and, in PNEUMONIA/, from 'bacteria' or 'virus' in the file name;
  the patient from the file name (personN_..., IM-NNNN-..., NORMAL2-IM-NNNN-...).
- Any other tree (ImageFolder): the class is the name of the folder that holds the image; such a
  dataset's task is FOLDERS, and a model trained on it carries those classes in its bundle.
"""
from __future__ import annotations

import re
from pathlib import Path

THREE = ("NORMAL", "BACTERIA", "VIRUS")
BINARY = ("NORMAL", "PNEUMONIA")
TASKS = {"three": THREE, "binary": BINARY}
FOLDERS = "folders"  # the task of any other dataset: its classes are its folder names (or manifest labels)
MODEL_TASKS = (*TASKS, FOLDERS)  # what a model's task may be: a Kermany reading (TASKS) or a dataset's own classes
KERMANY_FOLDERS = frozenset(THREE) | {"PNEUMONIA"}

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".dcm", ".dicom"}

_PERSON = re.compile(r"^(person\d+)_", re.IGNORECASE)
_NORMAL_SERIES = re.compile(r"^((?:NORMAL2-)?IM-\d+)-", re.IGNORECASE)


def classes_for(task: str) -> tuple[str, ...]:
    try:
        return TASKS[task]
    except KeyError:
        raise ValueError(f"unknown task {task!r}; choose one of {sorted(TASKS)}") from None


def is_image_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def is_kermany_tree(class_folders) -> bool:
    """True when every class folder is one of Kermany's (NORMAL, PNEUMONIA, BACTERIA, VIRUS)."""
    names = {name.upper() for name in class_folders}
    return bool(names) and names <= KERMANY_FOLDERS


def label_from_path(path: str | Path) -> str | None:
    """The 3-class label of a file from its class folder and name, or None when it cannot be told.

    NORMAL/, BACTERIA/ and VIRUS/ folders name the class; in PNEUMONIA/ the file name must say
    'bacteria' or 'virus' (never guessed).
    """
    path = Path(path)
    folder = path.parent.name.upper()
    if folder in THREE:
        return folder
    if folder == "PNEUMONIA":
        name = path.name.lower()
        has_bacteria, has_virus = "bacteria" in name, "virus" in name
        if has_bacteria != has_virus:
            return "BACTERIA" if has_bacteria else "VIRUS"
    return None


def kermany_patient(path: str | Path) -> str | None:
    """`person1000_virus_1681.jpeg` -> `person1000`; `IM-0115-0001.jpeg` -> `IM-0115`;
    `NORMAL2-IM-1427-0001.jpeg` -> `NORMAL2-IM-1427`; any other name -> None (no patient known).

    A personN with both bacteria and virus files is one patient, so it can never straddle a split.
    """
    name = Path(path).name
    for pattern in (_PERSON, _NORMAL_SERIES):
        match = pattern.match(name)
        if match:
            return match.group(1)
    return None


def patient_id(path: str | Path) -> str:
    """The Kermany patient of a file name, or its stem (one image, one patient) for any other name."""
    return kermany_patient(path) or Path(path).stem


def task_label(label: str, task: str) -> str:
    """A sample's label read as one of the task's classes: BACTERIA and VIRUS are PNEUMONIA in the
    binary task; every other label (NORMAL, PNEUMONIA, a generic folder's class) is itself."""
    if task == "binary" and label in ("BACTERIA", "VIRUS"):
        return "PNEUMONIA"
    return label
