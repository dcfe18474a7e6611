"""Prediction: the Python API (`Classifier.load().predict(path)`) and the records the CLI prints.

One image goes file -> `images.read_xray` (gray uint8) -> `images.resize_square` -> [0, 1] array ->
model (which normalises itself; PyTorch or ONNX Runtime) -> logits / temperature -> softmax -> record.
Each record also carries warnings from measurable checks that the input is a chest X-ray at all
(docs/inputs.md): the model answers for any picture, so the record says when not to trust it.
"""
from __future__ import annotations

import itertools
import logging
import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from .images import ImageReadError, read_xray, read_xray_with_info, resize_square
from .labels import classes_for, is_image_file
from .models import load_checkpoint

log = logging.getLogger(__name__)
MODELS_DIR = Path(__file__).resolve().parents[2] / "models"
BACKENDS = ("auto", "int8", "onnx", "torch")

# The input guard (docs/inputs.md). Over all 5,232 images of the training data the smallest gray-level
# standard deviation is 19.8 and the fewest distinct gray levels 113, so these limits leave real
# radiographs alone.
NOT_XRAY = "not a chest X-ray: "
MAX_COLOUR = 0.04  # mean channel spread (images.colour_spread): 0 for gray, 0.15-0.45 for photos
MIN_STD = 8.0  # gray levels: below this the image is blank or nearly so
MIN_LEVELS = 32  # fewer distinct gray levels: a drawing, mask, phantom or binary image
MIN_SIDE = 64  # px
MAX_ASPECT = 2.5  # longer side / shorter side
MAX_ENTROPY = 0.9  # normalized entropy of the calibrated probabilities above which the model is unsure


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
    reliable: bool | None = None  # ok records: False when a warning says the input is not a chest X-ray

    def to_dict(self) -> dict:
        return {"path": self.path, "status": self.status, "label": self.label,
                "probabilities": self.probabilities, "error": self.error, "warnings": self.warnings,
                "reliable": self.reliable, "model": self.model}


def to_batch(pixels: np.ndarray) -> np.ndarray:
    """N x S x S uint8 -> N x 1 x S x S float32 in [0, 1], the input of every backend."""
    return np.ascontiguousarray(pixels, dtype=np.float32)[:, None] / 255


class Classifier:
    """A loaded model plus its preprocessing and calibration, ready to classify X-rays.

    Predictions run on ONNX Runtime when `session` is given, else on the PyTorch model. The PyTorch
    model (`.model`) is loaded on first use in the ONNX case: Grad-CAM needs it.
    """

    def __init__(self, model: torch.nn.Module | None, meta: dict, checkpoint: Path | None = None, session=None,
                 onnx_path: Path | None = None):
        if model is None and (session is None or checkpoint is None):
            raise ValueError("a Classifier needs a PyTorch model, or an ONNX session and its checkpoint")
        self._model = model.eval() if model is not None else None
        self.meta, self.checkpoint, self.session = meta, checkpoint, session
        self.onnx_path = onnx_path  # where the session came from: predict_many opens 1-thread sessions on it
        self.workers = torch.get_num_threads()
        self._batch_session = None
        self.backend = "torch" if session is None else "int8" if "quantization" in meta else "onnx"
        # One PyTorch forward at a time: Grad-CAM hangs hooks on the model that must not see other calls.
        self.torch_lock = threading.RLock()
        self.classes: tuple[str, ...] = tuple(meta["classes"])
        self.img_size: int = int(meta["img_size"])
        self.temperature: float = float(meta.get("temperature", 1.0))
        self.name = f"{meta.get('name', meta['arch'])}@{meta.get('version', '?')}"

    @classmethod
    def load(cls, checkpoint: str | os.PathLike | None = None, task: str = "three",
             backend: str = "auto") -> "Classifier":
        """Loads `checkpoint`, or the shipped model for `task` when none is given.

        backend "torch": PyTorch eager. "onnx": ONNX Runtime, using `<checkpoint>.onnx` if it is not
        older than the checkpoint, else exporting into the cache first. "auto": like "onnx", but
        falls back to PyTorch (with a logged warning) when onnxruntime or the export fails.
        "int8": ONNX Runtime on `<checkpoint>.int8.onnx`, made by `pneumoscope export --int8` from
        this very checkpoint: about 1.8x faster on a folder, slightly less accurate (docs/benchmarks.md), so
        only on request.
        """
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        path = Path(checkpoint) if checkpoint else shipped_checkpoint(task)
        if not path.is_file():
            hint = "" if checkpoint else " (no shipped model for this task yet: train one with `pneumoscope train`)"
            raise FileNotFoundError(f"{path}: no such checkpoint{hint}")
        if backend != "torch":
            try:
                from .export import int8_for_checkpoint, onnx_for_checkpoint, open_session

                onnx_path = int8_for_checkpoint(path) if backend == "int8" else onnx_for_checkpoint(path)
                session, meta = open_session(onnx_path)
                return cls(None, meta, path, session, onnx_path)
            except Exception as err:
                if backend != "auto":
                    raise
                log.warning("ONNX Runtime backend unavailable (%s: %s); using PyTorch", type(err).__name__, err)
        model, meta = load_checkpoint(path)
        return cls(model, meta, path)

    @property
    def model(self) -> torch.nn.Module:
        """The PyTorch model (loaded from the checkpoint on first use with the ONNX backend)."""
        with self.torch_lock:
            if self._model is None:
                self._model = load_checkpoint(self.checkpoint)[0]
            return self._model

    # -------------------------------------------------------------- single inputs
    def preprocess(self, source, name: str | None = None) -> np.ndarray:
        """Any accepted input -> img_size x img_size uint8 gray (raises ImageReadError)."""
        return resize_square(read_xray(source, name), self.img_size)

    def logits(self, pixels: np.ndarray, session=None) -> np.ndarray:
        """N x S x S uint8 -> N x C logits, on whichever backend is loaded."""
        batch = to_batch(pixels)
        session = session or self.session
        if session is not None:
            return session.run(["logits"], {"pixels": batch})[0]
        with self.torch_lock, torch.inference_mode():
            return self.model(torch.from_numpy(batch).contiguous(memory_format=torch.channels_last)).numpy()

    def probabilities(self, pixels: np.ndarray, session=None) -> np.ndarray:
        """N x S x S uint8 -> N x C calibrated probabilities (softmax in NumPy: a PyTorch op here
        would wake PyTorch's thread pool, whose spinning threads slow ONNX Runtime's)."""
        z = self.logits(pixels, session).astype(np.float64) / self.temperature
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)

    def predict(self, source, name: str | None = None) -> Record:
        """Classifies one path, bytes or array. A bad input gives status='error', never an exception."""
        return next(self.predict_many([source], names=[name] if name else None))

    def predict_many(self, sources: Iterable, batch_size: int = 32, names: list[str] | None = None
                     ) -> Iterator[Record]:
        """Streams records in input order, a batch at a time. On ONNX Runtime, batches run side by
        side on one-thread sessions (one per core) while this thread decodes the next ones: on
        depthwise-heavy nets that beats one run spread over all cores. At most workers + 1
        batches are in flight, so memory stays bounded whatever the number of inputs."""
        batches = self._decoded(sources, batch_size, names)
        first = list(itertools.islice(batches, 2))  # one batch (a single image, say): all cores on it
        if len(first) < 2 or self.onnx_path is None or self.workers < 2:
            for pending in itertools.chain(first, batches):
                yield from self._records(pending, self._scores(pending))
            return
        with ThreadPoolExecutor(self.workers, thread_name_prefix="pneumoscope-onnx") as pool:
            in_flight: deque = deque()
            for pending in itertools.chain(first, batches):
                in_flight.append((pending, pool.submit(self._scores, pending, self.batch_session)))
                if len(in_flight) > self.workers:
                    pending, scores = in_flight.popleft()
                    yield from self._records(pending, scores.result())
            while in_flight:
                pending, scores = in_flight.popleft()
                yield from self._records(pending, scores.result())

    @property
    def batch_session(self):
        """A one-thread session on the same ONNX file, shared by predict_many's workers."""
        if self._batch_session is None:
            from .export import open_session

            self._batch_session = open_session(self.onnx_path, threads=1)[0]
        return self._batch_session

    def _decoded(self, sources: Iterable, batch_size: int, names: list[str] | None):
        """Lists of (label, pixels or None, image warnings, error), batch_size at a time."""
        pending: list[tuple[str, np.ndarray | None, list[str], str | None]] = []
        for index, source in enumerate(sources):
            label = names[index] if names else _describe(source)
            try:
                gray, info = read_xray_with_info(source, label)
                pending.append((label, resize_square(gray, self.img_size), image_warnings(gray, info), None))
            except ImageReadError as err:
                pending.append((label, None, [], str(err)))
            if len(pending) >= batch_size:
                yield pending
                pending = []
        if pending:
            yield pending

    def _scores(self, pending, session=None) -> np.ndarray:
        good = [pixels for _, pixels, _, _ in pending if pixels is not None]
        return self.probabilities(np.stack(good), session) if good else np.zeros((0, len(self.classes)))

    def _records(self, pending, probabilities: np.ndarray) -> Iterator[Record]:
        probabilities = iter(probabilities)
        for label, pixels, warnings, error in pending:
            if pixels is None:
                yield Record(label, "error", error=error, model=self.name)
                continue
            p = next(probabilities)
            warnings = warnings + model_warnings(p)
            yield Record(label, "ok", label=self.classes[int(p.argmax())],
                         probabilities={c: round(float(v), 6) for c, v in zip(self.classes, p)},
                         warnings=warnings, model=self.name,
                         reliable=not any(w.startswith(NOT_XRAY) for w in warnings))


# ------------------------------------------------------------------ the input guard
def image_warnings(gray: np.ndarray, info: dict) -> list[str]:
    """Measurable signs, on the decoded image before it is squashed, that it is no chest radiograph."""
    height, width = gray.shape
    short, long = min(height, width), max(height, width)
    histogram = np.bincount(gray.ravel(), minlength=256)  # one pass; std and levels follow from it
    levels = np.arange(256)
    mean = (histogram * levels).sum() / gray.size
    std = float(np.sqrt((histogram * (levels - mean) ** 2).sum() / gray.size))
    distinct = int((histogram > 0).sum())
    checks = [
        (info.get("colour", 0.0) > MAX_COLOUR,
         f"colour image (mean channel spread {info.get('colour', 0.0):.3f} > {MAX_COLOUR})"),
        (std < MIN_STD, f"blank or nearly constant image (gray-level std {std:.1f} < {MIN_STD:g})"),
        (distinct < MIN_LEVELS, f"only {distinct} distinct gray levels (< {MIN_LEVELS}): a drawing or mask"),
        (short < MIN_SIDE, f"tiny image ({width}x{height}, a side under {MIN_SIDE} px)"),
        (long > MAX_ASPECT * short, f"extreme aspect ratio ({width}x{height}, over {MAX_ASPECT:g}:1)"),
    ]
    return [NOT_XRAY + text for failed, text in checks if failed]


def model_warnings(probabilities: np.ndarray) -> list[str]:
    """The model's own doubt: normalized entropy (0 = certain, 1 = all classes equally likely)."""
    p = np.clip(probabilities.astype(np.float64), 1e-12, 1.0)
    entropy = float(-(p * np.log(p)).sum() / np.log(len(p)))
    if entropy > MAX_ENTROPY:
        return [f"low confidence: normalized entropy {entropy:.2f} > {MAX_ENTROPY} "
                f"(highest probability {float(probabilities.max()):.2f})"]
    return []


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
