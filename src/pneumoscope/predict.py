"""Prediction: the Python API (`Classifier.load().predict(path)`) and the records the CLI prints.

One image goes file -> `images.read_xray` (gray uint8) -> `images.resize_square` -> [0, 1] tensor ->
model (which normalises itself) -> logits / temperature -> softmax -> record.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from .images import ImageReadError, read_xray, resize_square
from .labels import classes_for, is_image_file
from .models import load_checkpoint

MODELS_DIR = Path(__file__).resolve().parents[2] / "models"


def shipped_checkpoint(task: str = "three") -> Path:
    """The checkpoint that ships in the repo's models/ for a task ($PNEUMOSCOPE_MODELS overrides)."""
    classes_for(task)
    folder = Path(os.environ.get("PNEUMOSCOPE_MODELS", MODELS_DIR))
    return folder / f"pneumoscope-{task}.pt"


@dataclass
class Record:
    path: str
    status: str  # "ok" or "error"
    label: str | None = None
    probabilities: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    warnings: list[str] = field(default_factory=list)
    model: str | None = None

    def to_dict(self) -> dict:
        return {"path": self.path, "status": self.status, "label": self.label,
                "probabilities": self.probabilities, "error": self.error, "warnings": self.warnings,
                "model": self.model}


class Classifier:
    """A loaded model plus its preprocessing and calibration, ready to classify X-rays."""

    def __init__(self, model: torch.nn.Module, meta: dict, checkpoint: Path | None = None):
        self.model, self.meta, self.checkpoint = model.eval(), meta, checkpoint
        self.classes: tuple[str, ...] = tuple(meta["classes"])
        self.img_size: int = int(meta["img_size"])
        self.temperature: float = float(meta.get("temperature", 1.0))
        self.name = f"{meta.get('name', meta['arch'])}@{meta.get('version', '?')}"

    @classmethod
    def load(cls, checkpoint: str | os.PathLike | None = None, task: str = "three") -> "Classifier":
        """Loads `checkpoint`, or the shipped model for `task` when none is given."""
        path = Path(checkpoint) if checkpoint else shipped_checkpoint(task)
        if not path.is_file():
            hint = "" if checkpoint else " (no shipped model for this task yet: train one with `pneumoscope train`)"
            raise FileNotFoundError(f"{path}: no such checkpoint{hint}")
        model, meta = load_checkpoint(path)
        return cls(model, meta, path)

    # -------------------------------------------------------------- single inputs
    def preprocess(self, source, name: str | None = None) -> np.ndarray:
        """Any accepted input -> img_size x img_size uint8 gray (raises ImageReadError)."""
        return resize_square(read_xray(source, name), self.img_size)

    @torch.inference_mode()
    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        """N x S x S uint8 -> N x C calibrated probabilities."""
        batch = torch.from_numpy(np.ascontiguousarray(pixels)).float().div_(255).unsqueeze(1)
        logits = self.model(batch.contiguous(memory_format=torch.channels_last))
        return torch.softmax(logits / self.temperature, dim=1).numpy()

    def predict(self, source, name: str | None = None) -> Record:
        """Classifies one path, bytes or array. A bad input gives status='error', never an exception."""
        return next(self.predict_many([source], names=[name] if name else None))

    def predict_many(self, sources: Iterable, batch_size: int = 32, names: list[str] | None = None
                     ) -> Iterator[Record]:
        """Streams records in input order; decodes and runs the model a batch at a time."""
        pending: list[tuple[str, np.ndarray | None, str | None]] = []
        for index, source in enumerate(sources):
            label = names[index] if names else _describe(source)
            try:
                pending.append((label, self.preprocess(source, label), None))
            except ImageReadError as err:
                pending.append((label, None, str(err)))
            if len(pending) >= batch_size:
                yield from self._run(pending)
                pending = []
        if pending:
            yield from self._run(pending)

    def _run(self, pending) -> Iterator[Record]:
        good = [pixels for _, pixels, _ in pending if pixels is not None]
        probabilities = iter(self.probabilities(np.stack(good)) if good else [])
        for label, pixels, error in pending:
            if pixels is None:
                yield Record(label, "error", error=error, model=self.name)
                continue
            p = next(probabilities)
            yield Record(label, "ok", label=self.classes[int(p.argmax())],
                         probabilities={c: round(float(v), 6) for c, v in zip(self.classes, p)},
                         model=self.name)


def _describe(source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return "<array>" if isinstance(source, np.ndarray) else "<bytes>"


def expand_inputs(paths: Iterable[str | os.PathLike]) -> Iterator[str]:
    """Files as given; folders walked recursively for image files, in sorted order (streamed)."""
    for path in paths:
        path = Path(path)
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs.sort()
                for name in sorted(files):
                    if is_image_file(name):
                        yield os.path.join(root, name)
        else:
            yield str(path)
