"""Finding images, patient-grouped splits, manifests, the pixel cache and the training datasets."""
from __future__ import annotations

import csv
import hashlib
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..core.config import TEST_FRACTION, VAL_FRACTION
from ..core.files import atomic_write, default_cache_dir
from ..core.labels import (
    FOLDERS,
    classes_for,
    is_image_file,
    is_kermany_tree,
    kermany_patient,
    label_from_path,
    task_label,
)
from .folds import StratifiedGroupKFold  # scikit-learn's, with its per-group step made fast
from .images import ImageReadError, read_xray, resize_square

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
MANIFEST_COLUMNS = ("path", "label", "patient_id", "split")
_SPLIT_FOLDERS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


@dataclass(frozen=True)
class Sample:
    path: str
    label: str  # the class as the data names it: Kermany's 3-class label (PNEUMONIA where the file name
    #             does not tell, binary task only) or the class folder's name; labels.task_label maps it
    patient_id: str  # the group no split may cut: a patient from the file name or a --groups CSV, else the image
    split: str = ""


@dataclass(frozen=True)
class DatasetDescription:
    """What a folder or manifest holds: the task it is read for, its classes and every usable sample."""
    source: Path
    task: str  # "three" or "binary" (a Kermany reading), or FOLDERS (the classes are the folder or manifest labels)
    classes: tuple[str, ...]
    samples: list[Sample]  # split: the manifest's, the train/ val/ test/ folder's, or "" (a plain tree)
    layout: str  # "kermany" (3-class labels from folders and file names) or "folders" (class = folder or manifest label)
    grouping: dict[str, int]  # images per source of their group: "file names", "groups CSV", "per image", "manifest"
    skipped: list[str]  # files left out, each with its reason

    @property
    def is_manifest(self) -> bool:
        return self.source.suffix.lower() == ".csv"

    def select(self, split: str | None) -> list[Sample]:
        """The samples of one split (a manifest's rows, or a train/ val/ test/ folder), or all of them."""
        if not split:
            return self.samples
        chosen = [s for s in self.samples if s.split == split]
        if not chosen:
            raise ValueError(f"{self.source}: no samples in split {split!r} (a manifest's split column or a "
                             f"train/ val/ test/ folder assigns them; it has {_sides(self.samples) or 'none'})")
        return chosen


# ---------------------------------------------------------------- reading a dataset
def read_dataset(source: str | os.PathLike, task: str | None = None, groups: str | os.PathLike | None = None
                 ) -> DatasetDescription:
    """Reads a dataset, the one way every command does: a manifest CSV (path,label,patient_id,split),
    or any tree of class folders (class folders alone, or `train/ val/ test/` each holding them).

    A Kermany tree (NORMAL/, PNEUMONIA/, BACTERIA/, VIRUS/) is read for `task` (default three):
    3-class labels from the file names, or in the binary task NORMAL/PNEUMONIA when some pneumonia
    file names do not tell bacteria from virus. Any other tree (or manifest) has one class per folder
    name (label), sorted as torchvision's ImageFolder does, and the task FOLDERS; a `task` given for
    it must agree with the number of classes (binary: 2, three: 3), else a one-line error. Groups
    (patients) come from the `groups` CSV, else Kermany file names, else one per image.
    """
    source = Path(source)
    if task is not None:
        classes_for(task)  # a one-line error for an unknown task
    if source.is_file() and source.suffix.lower() == ".csv":
        return _read_manifest_dataset(source, task, groups)
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: no such data folder or manifest")
    files, skipped = _image_files(source)
    folders = {p.parent.name for p in files}
    if is_kermany_tree(folders):
        task = task or "three"
        classes, (labelled, unlabelled) = classes_for(task), _kermany_labels(files, task, source)
        skipped += unlabelled
        layout = "kermany"
    else:
        classes, labelled, layout = tuple(sorted(folders)), [(p, p.parent.name) for p in files], "folders"
        _check_task(source, classes, task, "class folders")
        task = FOLDERS
    if not labelled:
        raise ValueError(f"{source}: no labelled images found (expected class folders, e.g. NORMAL/ PNEUMONIA/, "
                         "holding the images)")
    _warn_skipped(source, skipped)
    samples, grouping = _grouped(labelled, source, groups)
    return DatasetDescription(source, task, classes, samples, layout, grouping, skipped)


def _check_task(source: Path, classes: tuple[str, ...], task: str | None, what: str) -> None:
    """A --task given for a dataset that is not Kermany's must not contradict its classes."""
    if task is not None and len(classes) != len(classes_for(task)):
        raise ValueError(f"{source}: --task {task} means {len(classes_for(task))} classes "
                         f"({' / '.join(classes_for(task))}), but its {what} are {len(classes)} classes "
                         f"({', '.join(classes)}); leave --task out to learn them")


def _image_files(root: Path) -> tuple[list[Path], list[str]]:
    """Image files in class folders under `root`, sorted. A root holding only images is itself the
    class folder (e.g. `examples/NORMAL`); otherwise images outside a class folder (in the root, or
    directly in a train/val/test folder) are left out with a reason. Hidden files are ignored."""
    files, skipped = [], []
    found = sorted(p for p in root.rglob("*") if p.is_file() and is_image_file(p)
                   and not any(part.startswith(".") or part == "__MACOSX" for part in p.relative_to(root).parts))
    if found and all(p.parent == root for p in found):
        return found, skipped
    for path in found:
        if path.parent == root or path.parent.name.lower() in _SPLIT_FOLDERS:
            skipped.append(f"{path}: not in a class folder; left out")
        else:
            files.append(path)
    return files, skipped


def _folder_split(path: Path, root: Path) -> str:
    """train, val or test when the image sits in <root>/<split folder>/<class>/, else ""."""
    parts = path.relative_to(root).parts
    return _SPLIT_FOLDERS.get(parts[0].lower(), "") if len(parts) >= 3 else ""


def _kermany_labels(files: list[Path], task: str, root: Path) -> tuple[list[tuple[Path, str]], list[str]]:
    labels = [label_from_path(p) for p in files]
    if task == "binary" and None in labels:  # pneumonia files without bacteria/virus: the folder is the class
        return [(p, "NORMAL" if p.parent.name.upper() == "NORMAL" else "PNEUMONIA") for p in files], []
    labelled = [(p, label) for p, label in zip(files, labels) if label is not None]
    unlabelled = [f"{p}: no 3-class label (the file name says neither 'bacteria' nor 'virus', or both; "
                  "--task binary keeps it); left out" for p, label in zip(files, labels) if label is None]
    if unlabelled and not any(label in ("BACTERIA", "VIRUS") for _, label in labelled):
        raise ValueError(f"{root}: no PNEUMONIA file name says 'bacteria' or 'virus', so the 3-class "
                         "task has no BACTERIA or VIRUS images; use --task binary")
    return labelled, unlabelled


def _warn_skipped(root: Path, skipped: list[str]) -> None:
    """One warning per reason (a Kaggle folder can skip thousands of files), with one example."""
    by_reason: dict[str, list[str]] = {}
    for line in skipped:
        path, reason = line.split(": ", 1)
        by_reason.setdefault(reason, []).append(path)
    for reason, paths in by_reason.items():
        log.warning("%s: %d image(s) left out: %s (e.g. %s)", root, len(paths), reason.removesuffix("; left out"),
                    paths[0])


def _grouped(labelled: list[tuple[Path, str]], root: Path, groups: str | os.PathLike | None
             ) -> tuple[list[Sample], dict[str, int]]:
    """Samples with their groups and folder splits, and how many images got their group from where."""
    group_of = read_groups(groups, root) if groups else {}
    samples, grouping = [], Counter()
    for path, label in labelled:
        group, how = _group(path, root, group_of)
        grouping[how] += 1
        samples.append(Sample(str(path), label, group, _folder_split(path, root)))
    return samples, dict(grouping)


def _group(path: Path, root: Path, group_of: dict[str, str]) -> tuple[str, str]:
    """(group, where it came from) of one image."""
    group = group_of.get(os.path.normpath(path.resolve())) or group_of.get(path.name)
    if group:
        return group, "groups CSV"
    patient = kermany_patient(path)
    if patient:
        return patient, "file names"
    return path.relative_to(root).as_posix(), "per image"  # unique, unlike a stem shared by two folders


def read_groups(path: str | os.PathLike, root: str | os.PathLike | None = None) -> dict[str, str]:
    """A --groups CSV as {key: group}: keys are resolved paths (a relative `path` is read against the
    CSV's folder and against `root`) or bare file names (a `filename` column)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such groups CSV")
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        columns = set(reader.fieldnames or [])
        if "group" not in columns or not columns & {"path", "filename"}:
            raise ValueError(f"{path}: a groups CSV needs a 'group' column and a 'path' or 'filename' column; "
                             f"it has {sorted(columns)}")
        mapping = {}
        for row in reader:
            group = (row.get("group") or "").strip()
            if not group:
                continue
            if row.get("path"):
                for base in (path.parent, Path(root) if root else path.parent):
                    mapping[os.path.normpath((base / row["path"]).resolve())] = group
            if row.get("filename"):
                mapping[Path(row["filename"]).name] = group
    return mapping


def _read_manifest_dataset(path: Path, task: str | None, groups: str | os.PathLike | None) -> DatasetDescription:
    samples, skipped = _existing(read_manifest(path), path)
    grouping = {"manifest": len(samples)}
    if groups:  # the CSV's groups replace the manifest's where it names the file
        group_of = read_groups(groups, path.parent)
        regrouped = [(s, group_of.get(os.path.normpath(Path(s.path).resolve())) or group_of.get(Path(s.path).name))
                     for s in samples]
        samples = [replace(s, patient_id=group) if group else s for s, group in regrouped]
        n = sum(group is not None for _, group in regrouped)
        grouping = {k: v for k, v in {"groups CSV": n, "manifest": len(samples) - n}.items() if v}
    labels = {s.label for s in samples}
    if is_kermany_tree(labels):
        unlabelled = sum(s.label == "PNEUMONIA" for s in samples)
        task = task or ("binary" if unlabelled else "three")  # PNEUMONIA rows have no 3-class label
        if unlabelled and task != "binary":
            raise ValueError(f"{path}: {unlabelled} rows are labelled PNEUMONIA, which has no 3-class label; "
                             "use --task binary")
        return DatasetDescription(path, task, classes_for(task), samples, "kermany", grouping, skipped)
    classes = tuple(sorted(labels))
    _check_task(path, classes, task, "labels")
    return DatasetDescription(path, FOLDERS, classes, samples, "folders", grouping, skipped)


def _existing(samples: list[Sample], manifest: Path) -> tuple[list[Sample], list[str]]:
    """The rows whose file exists, and a reason for each other one (one summary warning for all);
    none existing is a one-line error."""
    missing = {s.path for s in samples if not os.path.isfile(s.path)}
    if len(missing) == len(samples):
        raise FileNotFoundError(f"{manifest}: none of its {len(samples)} files exists (e.g. {samples[0].path}); "
                                "relative paths are read from the manifest's folder")
    skipped = [f"{p}: listed in the manifest but no such file; left out" for p in sorted(missing)]
    _warn_skipped(manifest, skipped)
    return [s for s in samples if s.path not in missing], skipped


def class_indices(samples: list[Sample], classes: tuple[str, ...], task: str) -> np.ndarray:
    """Each sample's class index in `classes` (labels read for `task`); a label outside them is a
    one-line error naming the file."""
    index = {c: i for i, c in enumerate(classes)}
    out = np.empty(len(samples), dtype=np.int64)
    for i, sample in enumerate(samples):
        label = task_label(sample.label, task)
        if label not in index:
            raise ValueError(f"{sample.path}: label {label!r} is not one of the classes {', '.join(classes)}")
        out[i] = index[label]
    return out


# ---------------------------------------------------------------- splitting
# A tree's own val/ or test/ is used when every class has at least this many images there, and at
# least half of what the fraction would give it (Kermany's official val/, 8 + 8 of 5,232 images, is
# not enough for validation: it joins the pool, as it always did).
MIN_SPLIT_IMAGES = 2


def split_dataset(dataset: DatasetDescription, val_fraction: float = VAL_FRACTION,
                  test_fraction: float = TEST_FRACTION, seed: int = 0, keep_manifest: bool = True
                  ) -> tuple[list[Sample], list[str]]:
    """The samples with train/val/test assigned, and one line per side saying how it was formed.

    A manifest whose every row has a split keeps them (`keep_manifest`; `split` cuts it anew). A
    tree's own val/ and test/ folders are used when they hold enough images of every class
    (`own_sides`); the sides still missing are cut from the rest (train/, the plain tree or
    manifest, and any val/ or test/ too small to use) by group, stratified by class
    (`split_by_patient`: test is test_fraction of the pool's groups, val val_fraction)."""
    if dataset.is_manifest:
        if keep_manifest and all(s.split in SPLITS for s in dataset.samples):
            return dataset.samples, [f"train, val and test as {dataset.source.name} assigns them"]
        dataset = replace(dataset, samples=[replace(s, split="") for s in dataset.samples])
    kept, notes = own_sides(dataset, val_fraction, test_fraction)
    pool = [s for s in dataset.samples if s.path not in kept]
    missing = {side: fraction for side, fraction in (("val", val_fraction), ("test", test_fraction))
               if fraction > 0 and side not in kept.values()}
    if missing:
        warn_per_image_groups(dataset)
        joined = any(s.split in ("val", "test") for s in pool)
        where = "the pool" if joined else "train/" if any(s.split for s in pool) else \
            "the manifest" if dataset.is_manifest else "the tree"
        how = _grouping_words(dataset.grouping)
        notes += [f"{side}: cut from {where} by {how}, {fraction:g} of its groups" for side, fraction in missing.items()]
        cut = split_by_patient(pool, missing.get("val", 0.0), missing.get("test", 0.0), seed)
        assigned = {s.path: s.split for s in cut}
    else:
        assigned = {s.path: "train" for s in pool}
    assigned.update(kept)
    samples = [replace(s, split=assigned[s.path]) for s in dataset.samples]
    if kept:
        _warn_straddling(dataset.source, samples)
    return samples, notes


def _warn_straddling(source: Path, samples: list[Sample]) -> None:
    """The tree's own folders are used as they are: say so when they put one patient on two sides."""
    sides: dict[str, set[str]] = {}
    for s in samples:
        sides.setdefault(s.patient_id, set()).add(s.split)
    straddling = sorted(group for group, where in sides.items() if len(where) > 1)
    if straddling:
        log.warning("%s: %d patient(s) or group(s) have images in more than one of its train/ val/ test/ folders "
                    "(e.g. %s): its own split is used as it is, so they straddle it", source, len(straddling),
                    straddling[0])


def own_sides(dataset: DatasetDescription, val_fraction: float = VAL_FRACTION, test_fraction: float = TEST_FRACTION
              ) -> tuple[dict[str, str], list[str]]:
    """{path: "val" | "test"} of the tree's own val/ and test/ folders that hold enough images of
    every class (MIN_SPLIT_IMAGES, and half what the fraction would give it), and why each was or was
    not used."""
    totals = Counter(task_label(s.label, dataset.task) for s in dataset.samples)
    kept, notes = {}, []
    for side, fraction in (("val", val_fraction), ("test", test_fraction)):
        held = [s for s in dataset.samples if s.split == side]
        if not held:
            continue
        counts = Counter(task_label(s.label, dataset.task) for s in held)
        needed = {c: max(MIN_SPLIT_IMAGES, math.ceil(fraction / 2 * totals[c])) for c in dataset.classes if totals[c]}
        short = {c: n for c, n in needed.items() if counts[c] < n}
        if short:
            lacking = ", ".join(f"{c} {counts[c]}, needs {n}" for c, n in short.items())
            notes.append(f"{side}/: {len(held)} images, too few ({lacking}); they join the pool")
        else:
            kept.update({s.path: side for s in held})
            notes.append(f"{side}: the tree's own {side}/ folder, {len(held)} images")
    return kept, notes


def warn_per_image_groups(dataset: DatasetDescription) -> None:
    """Splits by group where images have no group id are per image: one patient can land on two sides."""
    alone = dataset.grouping.get("per image", 0)
    if alone:
        log.warning("%s: %d of %d images have no patient or group id (not Kermany file names%s): each is its own "
                    "group, so splits are per image and one patient's images can land in both train and test "
                    "(leakage); give --groups CSV with columns path (or filename) and group", dataset.source,
                    alone, len(dataset.samples), ", not in the groups CSV" if "groups CSV" in dataset.grouping
                    else ", no --groups CSV")


def _grouping_words(grouping: dict[str, int]) -> str:
    words = {"file names": "patient (from file names)", "groups CSV": "group (--groups CSV)",
             "per image": "image (no group ids)", "manifest": "the manifest's patient ids"}
    return " and ".join(words[how] for how in grouping)


def split_summary(samples: list[Sample], classes: tuple[str, ...], task: str, grouping: dict[str, int]) -> list[str]:
    """Lines for the console: images and groups per side, per class, and where the groups came from."""
    counts = Counter((s.split, task_label(s.label, task)) for s in samples)
    groups = Counter(split for split, _ in {(s.split, s.patient_id) for s in samples})
    sources = ", ".join(f"{how} {n}" for how, n in grouping.items())
    lines = [f"{len(samples)} images, {len(classes)} classes ({', '.join(classes)}); groups from: {sources}"]
    for side in SPLITS:
        n = sum(v for (split, _), v in counts.items() if split == side)
        if n:
            per_class = ", ".join(f"{c} {counts[(side, c)]}" for c in classes)
            lines.append(f"  {side:<6}{n:>6} images {groups[side]:>6} groups   {per_class}")
    return lines


def _sides(samples: list[Sample]) -> str:
    return ", ".join(side for side in SPLITS if any(s.split == side for s in samples))


def split_by_patient(samples: list[Sample], val_fraction: float = VAL_FRACTION, test_fraction: float = TEST_FRACTION,
                     seed: int = 0) -> list[Sample]:
    """Assigns train/val/test so that no patient (group) is on two sides, stratified by label.

    Uses scikit-learn's StratifiedGroupKFold: test is one of round(1/test_fraction) folds, val
    one fold of what is left, so the fractions hold to within one fold's rounding. A patient
    whose files carry two labels (personN bacteria + virus) is stratified by its first label.
    Every label needs at least as many groups as folds, else a one-line error says which has too few.
    """
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ValueError("need 0 <= val_fraction, 0 <= test_fraction and val + test < 1")
    splits = np.array(["train"] * len(samples), dtype=object)
    remaining = np.arange(len(samples))
    for name, fraction, asked in (("test", test_fraction, test_fraction),
                                  ("val", val_fraction / (1 - test_fraction), val_fraction)):
        if fraction <= 0:
            continue
        n_folds = max(2, round(1 / fraction))
        _check_groups_per_label([samples[i] for i in remaining], n_folds,
                                f"a {name} split of {asked:g} (1 of {n_folds} folds)")
        folds = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        _, held = next(folds.split(np.zeros(len(remaining)), *_labels_and_groups(samples, remaining)))
        splits[remaining[held]] = name
        remaining = np.setdiff1d(remaining, remaining[held])
    return [Sample(s.path, s.label, s.patient_id, str(split)) for s, split in zip(samples, splits)]


def patient_folds(samples: list[Sample], n_folds: int, seed: int = 0) -> list[np.ndarray]:
    """Indices of each held-out fold of a patient-grouped, class-stratified K-fold."""
    _check_groups_per_label(samples, n_folds, f"{n_folds}-fold cross-validation")
    folds = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    labels, groups = _labels_and_groups(samples, np.arange(len(samples)))
    return [held for _, held in folds.split(np.zeros(len(samples)), labels, groups)]


def _labels_and_groups(samples: list[Sample], indices: np.ndarray) -> tuple[list[str], list[str]]:
    return [samples[i].label for i in indices], [samples[i].patient_id for i in indices]


def _check_groups_per_label(samples: list[Sample], n_folds: int, what: str) -> None:
    """A fold can hold every label only if each label has at least n_folds groups; scikit-learn
    would otherwise fail on n_splits or quietly leave a label out of val or test."""
    groups: dict[str, set[str]] = {}
    for s in samples:
        groups.setdefault(s.label, set()).add(s.patient_id)
    counts = {label: len(g) for label, g in sorted(groups.items())}
    if min(counts.values(), default=0) < n_folds:
        listed = ", ".join(f"{label} {n}" for label, n in counts.items())
        raise ValueError(f"cannot make {what} by patient/group: it needs at least {n_folds} groups in every class, "
                         f"and the data has {listed}; add images or lower the fraction")


# ---------------------------------------------------------------- manifests
def write_manifest(samples: list[Sample], out: str | os.PathLike) -> Path:
    """Writes `path,label,patient_id,split` atomically; paths are relative to the manifest's folder."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = [(os.path.relpath(Path(s.path).resolve(), out.parent.resolve()), s.label, s.patient_id, s.split)
            for s in samples]
    with atomic_write(out, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(MANIFEST_COLUMNS)
        writer.writerows(rows)
    return out


def read_manifest(path: str | os.PathLike) -> list[Sample]:
    """The rows of a manifest; labels may be any class name, paths are relative to its folder."""
    path = Path(path)
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = set(MANIFEST_COLUMNS) - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: manifest lacks column(s) {sorted(missing)}")
        samples = []
        for line, row in enumerate(reader, start=2):
            if not row["path"] or not row["label"]:
                raise ValueError(f"{path}: line {line} has no path or no label")
            file = Path(row["path"])
            file = file if file.is_absolute() else path.parent / file
            group = row["patient_id"] or Path(row["path"]).as_posix()  # no group given: the image is its own
            samples.append(Sample(os.path.normpath(file), row["label"], group, row["split"]))
    if not samples:
        raise ValueError(f"{path}: manifest has no rows")
    return samples


def manifest_hash(samples: list[Sample]) -> str:
    """A content hash of the data a model saw: file names, labels, patients and splits (not paths,
    so the same split on another machine hashes the same)."""
    digest = hashlib.sha256()
    for s in sorted(samples, key=lambda s: (Path(s.path).name, s.split)):
        digest.update(f"{Path(s.path).parent.name}/{Path(s.path).name},{s.label},{s.patient_id},{s.split}\n".encode())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------- pixels
def load_pixels(samples: list[Sample], size: int, cache_dir: Path | None = None
                ) -> tuple[np.ndarray, list[Sample], list[str]]:
    """Decodes and resizes every image once into an N x size x size uint8 array.

    The array is cached on disk (keyed by the files, their sizes and mtimes, and `size`) so later
    runs skip decoding. Unreadable files are dropped and reported, never fatal.
    """
    cache_dir = default_cache_dir() if cache_dir is None else cache_dir
    key = _pixel_cache_key(samples, size)
    cached = cache_dir / f"pixels-{size}-{key}.npz"
    if cached.exists():
        with np.load(cached) as stored:
            keep = stored["keep"]
            return stored["pixels"], [s for s, k in zip(samples, keep) if k], list(stored["errors"])
    pixels, keep, errors = [], [], []
    for sample in samples:
        try:
            pixels.append(resize_square(read_xray(sample.path), size))
            keep.append(True)
        except ImageReadError as err:
            errors.append(str(err))
            keep.append(False)
            log.warning("%s; left out", err)
    array = np.stack(pixels) if pixels else np.zeros((0, size, size), np.uint8)
    try:
        with atomic_write(cached) as handle:
            np.savez(handle, pixels=array, keep=np.array(keep), errors=np.array(errors, dtype=str))
    except OSError as err:  # a read-only home is no reason to fail training
        log.warning("pixel cache not written (%s)", err)
    return array, [s for s, k in zip(samples, keep) if k], errors


def _pixel_cache_key(samples: list[Sample], size: int) -> str:
    digest = hashlib.sha256(f"v1,{size}".encode())
    for sample in samples:
        try:
            stat = os.stat(sample.path)
            digest.update(f"{sample.path},{stat.st_size},{stat.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{sample.path},missing\n".encode())
    return digest.hexdigest()[:20]
