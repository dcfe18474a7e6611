"""Classes, labels read from file names, and patient ids (Kermany chest X-ray naming)."""
from __future__ import annotations

import re
from pathlib import Path

THREE = ("NORMAL", "BACTERIA", "VIRUS")
BINARY = ("NORMAL", "PNEUMONIA")
TASKS = {"three": THREE, "binary": BINARY}

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


def patient_id(path: str | Path) -> str:
    """`person1000_virus_1681.jpeg` -> `person1000`; `IM-0115-0001.jpeg` -> `IM-0115`;
    `NORMAL2-IM-1427-0001.jpeg` -> `NORMAL2-IM-1427`; any other name -> its stem (one image, one patient).

    A personN with both bacteria and virus files is one patient, so it can never straddle a split.
    """
    name = Path(path).name
    for pattern in (_PERSON, _NORMAL_SERIES):
        match = pattern.match(name)
        if match:
            return match.group(1)
    return Path(name).stem


def task_label(label3: str, task: str) -> str:
    """Maps a 3-class label onto the task's classes (BACTERIA and VIRUS are PNEUMONIA in binary)."""
    if task == "binary":
        return "NORMAL" if label3 == "NORMAL" else "PNEUMONIA"
    classes_for(task)
    return label3
