"""Finding images, patient-grouped splits, manifests, the pixel cache and the training datasets."""
from __future__ import annotations

import csv
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import StratifiedGroupKFold
from torch.utils.data import Dataset
from torchvision.transforms import v2

from .config import AUG_POLICIES
from .files import atomic_write, default_cache_dir  # noqa: F401  (re-exported: older imports use data.atomic_write)
from .images import ImageReadError, read_xray, resize_square
from .labels import THREE, is_image_file, label_from_path, patient_id, task_label

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
MANIFEST_COLUMNS = ("path", "label", "patient_id", "split")


@dataclass(frozen=True)
class Sample:
    path: str
    label: str  # always the 3-class label; binary tasks map it with labels.task_label
    patient_id: str
    split: str = ""


# ---------------------------------------------------------------- discovery
def discover(root: str | os.PathLike) -> tuple[list[Sample], list[str]]:
    """All labelled images under a dataset root (`train/ val/ test/` each holding class folders),
    a single split folder (class folders directly inside), or any tree of class folders.

    Returns the samples (sorted by path, split left empty) and the files skipped with a reason.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such data folder")
    samples, skipped = [], []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and is_image_file(p)):
        label = label_from_path(path)
        if label is None:
            skipped.append(f"{path}: cannot tell the class from the folder and file name; left out")
            continue
        samples.append(Sample(str(path), label, patient_id(path)))
    if not samples:
        raise ValueError(f"{root}: no labelled images found (expected NORMAL/ and PNEUMONIA/ or "
                         "BACTERIA/ VIRUS/ class folders)")
    for line in skipped:
        log.warning(line)
    return samples, skipped


def load_samples(data: str | os.PathLike, split: str | None = None) -> list[Sample]:
    """Samples from a folder (every labelled image) or a manifest CSV (optionally one split)."""
    data = Path(data)
    if data.is_file() and data.suffix.lower() == ".csv":
        samples = read_manifest(data)
        if split:
            samples = [s for s in samples if s.split == split]
            if not samples:
                raise ValueError(f"{data}: manifest has no rows in split {split!r}")
        return samples
    return discover(data)[0]


# ---------------------------------------------------------------- splitting
def split_by_patient(samples: list[Sample], val_fraction: float = 0.15, test_fraction: float = 0.15,
                     seed: int = 0) -> list[Sample]:
    """Assigns train/val/test so that no patient is on two sides, stratified by class.

    Uses scikit-learn's StratifiedGroupKFold: test is one of round(1/test_fraction) folds, val
    one fold of what is left, so the fractions hold to within one fold's rounding. A patient
    whose files carry two labels (personN bacteria + virus) is stratified by its first label.
    """
    if not 0 < val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ValueError("need 0 < val_fraction, 0 <= test_fraction and val + test < 1")
    splits = np.array(["train"] * len(samples), dtype=object)
    remaining = np.arange(len(samples))
    for name, fraction in (("test", test_fraction), ("val", val_fraction / (1 - test_fraction))):
        if fraction <= 0:
            continue
        held = _one_group_fold(samples, remaining, fraction, seed)
        splits[held] = name
        remaining = np.setdiff1d(remaining, held)
    return [Sample(s.path, s.label, s.patient_id, str(split)) for s, split in zip(samples, splits)]


def _one_group_fold(samples: list[Sample], indices: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    n_folds = max(2, round(1 / fraction))
    labels = [samples[i].label for i in indices]
    groups = [samples[i].patient_id for i in indices]
    folds = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    _, held = next(folds.split(np.zeros(len(indices)), labels, groups))
    return indices[held]


def patient_folds(samples: list[Sample], n_folds: int, seed: int = 0) -> list[np.ndarray]:
    """Indices of each held-out fold of a patient-grouped, class-stratified K-fold."""
    folds = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    labels = [s.label for s in samples]
    groups = [s.patient_id for s in samples]
    return [held for _, held in folds.split(np.zeros(len(samples)), labels, groups)]


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
    path = Path(path)
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = set(MANIFEST_COLUMNS) - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: manifest lacks column(s) {sorted(missing)}")
        samples = []
        for row in reader:
            if row["label"] not in THREE:
                raise ValueError(f"{path}: unknown label {row['label']!r} for {row['path']}")
            file = Path(row["path"])
            file = file if file.is_absolute() else path.parent / file
            samples.append(Sample(os.path.normpath(file), row["label"], row["patient_id"], row["split"]))
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


# ---------------------------------------------------------------- datasets
class RandomGamma(torch.nn.Module):
    """Gamma in [1/g, g]: exposure differs between X-ray machines."""

    def __init__(self, max_gamma: float):
        super().__init__()
        self.log_gamma = float(np.log(max_gamma))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        gamma = float(np.exp(np.random.uniform(-self.log_gamma, self.log_gamma)))
        return v2.functional.adjust_gamma(image, gamma)


def train_transform(size: int, strength: float = 1.0, policy: str = "standard") -> v2.Compose:
    """Augmentation for radiographs. `standard`: crop, small rotations and shifts, exposure,
    contrast, gamma, blur and noise. `strong` adds what changes between hospitals' machines and
    post-processing: wider crops, shear, histogram equalisation, JPEG re-compression, sharpening
    and stronger exposure changes. No horizontal flip: the heart is on the left in every chest film."""
    if strength <= 0:
        return eval_transform()
    if policy not in AUG_POLICIES:
        raise ValueError(f"unknown augmentation policy {policy!r}; choose from {', '.join(AUG_POLICIES)}")
    s = strength
    if policy == "strong":
        return v2.Compose([
            v2.RandomResizedCrop(size, scale=(1 - 0.4 * s, 1.0), ratio=(1 - 0.15 * s, 1 + 0.15 * s), antialias=True),
            v2.RandomAffine(degrees=15 * s, translate=(0.06 * s, 0.06 * s), shear=(-8 * s, 8 * s, -8 * s, 8 * s)),
            v2.RandomApply([v2.ColorJitter(brightness=0.4 * s, contrast=0.4 * s)], p=0.8),
            v2.RandomApply([RandomGamma(1 + 0.6 * s)], p=0.5),
            v2.RandomAutocontrast(p=0.3 * s),
            v2.RandomEqualize(p=0.3 * s),
            v2.RandomApply([v2.JPEG((40, 95))], p=0.3 * s),
            v2.RandomApply([v2.GaussianBlur(5, sigma=(0.1, 2.0))], p=0.3 * s),
            v2.RandomAdjustSharpness(2.0, p=0.2 * s),
            v2.ToDtype(torch.float32, scale=True),
            v2.RandomApply([v2.GaussianNoise(sigma=0.03 * s, clip=True)], p=0.3 * s),
        ])
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=(1 - 0.25 * s, 1.0), ratio=(1 - 0.1 * s, 1 + 0.1 * s), antialias=True),
        v2.RandomAffine(degrees=10 * s, translate=(0.05 * s, 0.05 * s)),
        v2.RandomApply([v2.ColorJitter(brightness=0.3 * s, contrast=0.3 * s)], p=0.8),
        v2.RandomApply([RandomGamma(1 + 0.5 * s)], p=0.5),
        v2.RandomAutocontrast(p=0.2 * s),
        v2.RandomApply([v2.GaussianBlur(5, sigma=(0.1, 1.5))], p=0.3 * s),
        v2.ToDtype(torch.float32, scale=True),
        v2.RandomApply([v2.GaussianNoise(sigma=0.02 * s, clip=True)], p=0.3 * s),
    ])


def eval_transform() -> v2.Compose:
    return v2.Compose([v2.ToDtype(torch.float32, scale=True)])


class XrayDataset(Dataset):
    """Cached uint8 pixels -> (1 x S x S float tensor in [0, 1], class index)."""

    def __init__(self, pixels: np.ndarray, samples: list[Sample], classes: tuple[str, ...], task: str,
                 transform: v2.Compose):
        self.pixels = torch.from_numpy(pixels)
        self.targets = torch.tensor([classes.index(task_label(s.label, task)) for s in samples])
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        return self.transform(self.pixels[index][None]), self.targets[index]


def class_weights(targets: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Inverse-frequency weights, mean 1, so each class counts equally in the loss."""
    counts = torch.bincount(targets, minlength=n_classes).float().clamp(min=1)
    weights = counts.sum() / (n_classes * counts)
    return weights / weights.mean()
