"""Prediction: the Python API (`Classifier.load().predict(path)`), scores as arrays, records for people.

One image goes file -> `images.read_xray` (gray uint8) -> `images.resize_square` -> the model's input
step (`images.input_step`, none unless it was trained with one) -> [0, 1] batch ->
a `backends.Backend` (the network normalises itself; ONNX Runtime or PyTorch) -> logits, features ->
logits / temperature -> softmax. `Classifier.scores` returns those as arrays (`Scores`); a `Record`
(rounded, for the CLI and the web) is made from a row of them at the edge and never read back.
Each record also carries warnings from measurable checks that the input is a chest X-ray at all
(docs/inputs.md): the model answers for any picture, so the record says when not to trust it.
"""
from __future__ import annotations

import itertools
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from ..bundle import Bundle, BundleError, ModelMeta, load_bundle, resolve_model
from ..core.config import BACKENDS
from ..core.labels import is_image_file
from ..data.images import (
    ImageReadError,
    ImageTooLargeError,
    describe_source,
    input_step,
    read_xray_with_info,
    resize_square,
    to_batch,
)
from .backends import (
    Backend,
    TorchBackend,
    backend_for_model,
    cpu_threads,
    open_backend,
    side_by_side,
)
from .guard import NOT_XRAY, guard_warnings, image_warnings, load_guard, model_warnings, stats_for

__all__ = ["Classifier", "Decoded", "Record", "Scores", "Skipped", "expand_inputs"]

@dataclass
class Record:
    """One input's answer as a person or a file sees it (rounded). Presentation only."""

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


@dataclass
class Decoded:
    """One input after decoding: the network's pixels (img_size square), or the reason it failed.
    `gray` (the X-ray at its own size) is kept only on request: Grad-CAM overlays draw on it."""

    name: str
    pixels: np.ndarray | None
    warnings: list[str] = field(default_factory=list)
    error: str | None = None
    gray: np.ndarray | None = None
    too_large: bool = False  # refused by a size limit (ImageTooLargeError): a server answers 413


@dataclass
class Scores:
    """Answers for N inputs as arrays, row i for input i. Rows whose input failed to decode hold
    NaN and errors[i] says why."""

    names: list[str]
    logits: np.ndarray  # N x C, before the temperature
    probabilities: np.ndarray  # N x C, calibrated
    features: np.ndarray  # N x F, pooled penultimate features
    errors: list[str | None]
    warnings: list[list[str]]  # per input: the input checks, then the model's own doubt

    def __len__(self) -> int:
        return len(self.names)

    @property
    def ok(self) -> np.ndarray:
        return np.array([e is None for e in self.errors], dtype=bool)

    @classmethod
    def concat(cls, parts: list["Scores"]) -> "Scores":
        return cls([n for p in parts for n in p.names], np.concatenate([p.logits for p in parts]),
                   np.concatenate([p.probabilities for p in parts]), np.concatenate([p.features for p in parts]),
                   [e for p in parts for e in p.errors], [w for p in parts for w in p.warnings])


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of logits / temperature, in float64: the one softmax of predictions and
    reports. In NumPy, as scipy.special.softmax has it (max shift, exp, divide: the same values bit
    for bit), not a call to it: importing scipy.special adds 0.13-0.18 s to a one-image predict, and a
    PyTorch op here would wake PyTorch's thread pool, whose spinning threads slow ONNX Runtime's."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


class Classifier:
    """A model on a backend plus its preprocessing and calibration, ready to classify X-rays.

    Build one with `load` (a bundle, or the shipped model for a task) or
    `from_model` (an in-memory network). `model` is the PyTorch network (loaded on first use when
    predictions run on ONNX Runtime: Grad-CAM needs it); `torch_lock` serialises its forwards.
    """

    def __init__(self, runtime: Backend, meta: ModelMeta, bundle: Bundle | None = None, model=None):
        if model is None and bundle is None:
            raise ValueError("a Classifier needs a bundle or the in-memory model its backend runs")
        self.runtime, self.meta, self.bundle = runtime, meta, bundle
        self.torch_lock = runtime.lock if isinstance(runtime, TorchBackend) else threading.RLock()
        self._model = runtime.model if isinstance(runtime, TorchBackend) else model
        self.workers = cpu_threads()
        self.classes: tuple[str, ...] = meta.classes
        self.img_size: int = meta.img_size
        self.preprocess: str | None = meta.preprocess
        self.temperature: float = meta.temperature
        stats = stats_for(meta.guard, runtime.graph_kind)  # statistics of this graph's own features, or none
        try:
            self.guard = load_guard(stats) if stats else None
        except ValueError as err:
            raise BundleError(f"{bundle.path if bundle else meta.name}: {err}") from None
        int8 = "-int8" if runtime.graph_kind == "int8" else ""
        self.name = f"{meta.name}{int8}@{meta.version}"

    @classmethod
    def load(cls, bundle_or_checkpoint: str | os.PathLike | Bundle | None = None, task: str = "three",
             backend: str = "auto") -> "Classifier":
        """Loads a bundle directory, or the shipped model for `task` when none is
        given, on `backend` (see `backends.open_backend`: auto, onnx, int8 or torch)."""
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        bundle = bundle_or_checkpoint if isinstance(bundle_or_checkpoint, Bundle) else \
            load_bundle(bundle_or_checkpoint or resolve_model(task))
        return cls(open_backend(bundle, backend), bundle.meta, bundle)

    @classmethod
    def from_model(cls, model, meta: ModelMeta, backend: str = "onnx") -> "Classifier":
        """Wraps an in-memory network: "torch" runs it as is, "onnx" on a graph exported in memory."""
        return cls(backend_for_model(model, meta, backend), meta, model=model)

    @property
    def backend(self) -> str:
        """"onnx", "int8" or "torch": what is running."""
        return self.runtime.name

    @property
    def model(self):
        """The PyTorch model (loaded from the bundle on first use when predictions run on ONNX)."""
        from ..nets.build import load_network  # lazy: PyTorch loads for Grad-CAM or the torch backend only

        with self.torch_lock:
            if self._model is None:
                self._model = load_network(self.bundle)
            return self._model

    # -------------------------------------------------------------- arrays
    def calibrate(self, logits: np.ndarray) -> np.ndarray:
        """Logits -> calibrated probabilities, softmax(logits / T) (float32)."""
        return softmax(logits, self.temperature).astype(np.float32)

    def decode(self, source, name: str | None = None, keep_gray: bool = False) -> Decoded:
        """Any accepted input -> Decoded (never raises for a bad image: the error is recorded)."""
        label = name or describe_source(source)
        try:
            gray, info = read_xray_with_info(source, label)
        except ImageReadError as err:
            return Decoded(label, None, error=str(err), too_large=isinstance(err, ImageTooLargeError))
        warnings = [*info.get("warnings", []), *image_warnings(gray, info)]  # the decoder's (first frame used)
        pixels = input_step(resize_square(gray, self.img_size), self.preprocess)
        return Decoded(label, pixels, warnings, gray=gray if keep_gray else None)

    def score_decoded(self, decoded: list[Decoded], runtime: Backend | None = None) -> Scores:
        """Runs the decoded inputs through the network in one batch."""
        good = [d.pixels for d in decoded if d.pixels is not None]
        n_classes = len(self.classes)
        logits = np.full((len(decoded), n_classes), np.nan, np.float32)
        features = None
        if good:
            out_logits, out_features = (runtime or self.runtime).run(to_batch(np.stack(good)))
            rows = np.array([d.pixels is not None for d in decoded])
            logits[rows] = out_logits
            features = np.full((len(decoded), out_features.shape[1]), np.nan, np.float32)
            features[rows] = out_features
        probabilities = self.calibrate(logits) if good else logits.copy()
        warnings = [d.warnings + (model_warnings(p) if d.error is None else [])
                    for d, p in zip(decoded, probabilities)]
        if self.guard is not None and good:  # the learned check: the same pass's features, no second forward
            for i, d in enumerate(decoded):
                if d.error is None:
                    warnings[i] = warnings[i] + guard_warnings(features[i], logits[i], self.guard)
        return Scores([d.name for d in decoded], logits, probabilities,
                      features if features is not None else np.zeros((len(decoded), 0), np.float32),
                      [d.error for d in decoded], warnings)

    def score_pixels(self, pixels: np.ndarray, names: list[str] | None = None, batch_size: int = 64) -> Scores:
        """Scores N x S x S uint8 pixels already at img_size, before the input step (as
        `data.load_pixels` gives them), a batch at a time: one batch of thousands of images would
        hold gigabytes of activations."""
        names = names or [f"<array {i}>" for i in range(len(pixels))]
        decoded = [Decoded(n, input_step(p, self.preprocess)) for n, p in zip(names, pixels)]
        parts = [self.score_decoded(decoded[i:i + batch_size]) for i in range(0, len(decoded), batch_size)]
        return Scores.concat(parts) if parts else self.score_decoded([])

    def scores(self, sources: Iterable, names: list[str] | None = None, batch_size: int = 32) -> Scores:
        """Paths, bytes or arrays -> Scores for all of them (arrays: hold the whole set in memory)."""
        parts = [scores for _, scores in self.score_batches(sources, names, batch_size)]
        return Scores.concat(parts) if parts else self.score_decoded([])

    def score_batches(self, sources: Iterable, names: list[str] | None = None, batch_size: int = 32,
                      keep_gray: bool = False) -> Iterator[tuple[list[Decoded], Scores]]:
        """Streams (decoded inputs, their Scores) a batch at a time, in input order. On ONNX Runtime,
        batches run side by side on one-thread sessions (one per core) while this thread decodes
        the next ones. At most workers + 1 batches are in flight, so memory stays bounded."""
        batches = self._decoded(sources, names, batch_size, keep_gray)
        first = list(itertools.islice(batches, 2))  # one batch (a single image, say): all cores on it
        batches = itertools.chain(first, batches)
        if len(first) < 2 or not hasattr(self.runtime, "single_thread") or self.workers < 2:
            yield from ((pending, self.score_decoded(pending)) for pending in batches)
            return
        single = self.runtime.single_thread()
        yield from side_by_side(lambda pending: self.score_decoded(pending, single), batches, self.workers)

    def _decoded(self, sources: Iterable, names: list[str] | None, batch_size: int, keep_gray: bool
                 ) -> Iterator[list[Decoded]]:
        pending: list[Decoded] = []
        for index, source in enumerate(sources):
            pending.append(self.decode(source, names[index] if names else None, keep_gray))
            if len(pending) >= batch_size:
                yield pending
                pending = []
        if pending:
            yield pending

    # -------------------------------------------------------------- records
    def records(self, scores: Scores) -> list[Record]:
        """Scores -> one Record per input (rounded probabilities, the label, the warnings)."""
        out = []
        for name, p, error, warnings in zip(scores.names, scores.probabilities, scores.errors, scores.warnings):
            if error is not None:
                out.append(Record(name, "error", error=error, model=self.name))
                continue
            out.append(Record(name, "ok", label=self.classes[int(p.argmax())],
                              probabilities={c: round(float(v), 6) for c, v in zip(self.classes, p)},
                              warnings=list(warnings), model=self.name,
                              reliable=not any(w.startswith(NOT_XRAY) for w in warnings)))
        return out

    def predict(self, source, name: str | None = None) -> Record:
        """Classifies one path, bytes or array. A bad input gives status='error', never an exception."""
        return self.records(self.score_decoded([self.decode(source, name)]))[0]

    def predict_many(self, sources: Iterable, batch_size: int = 32, names: list[str] | None = None
                     ) -> Iterator[Record]:
        """Streams records in input order (see score_batches)."""
        for _, scores in self.score_batches(sources, names, batch_size):
            yield from self.records(scores)


@dataclass
class Skipped:
    """Files a folder walk left out (not images), counted, with the first few named."""

    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, path: str) -> None:
        self.count += 1
        if len(self.examples) < 3:
            self.examples.append(path)


def expand_inputs(paths: Iterable[str | os.PathLike], skipped: Skipped | None = None) -> Iterator[str]:
    """Files as given; folders walked recursively for image files (by extension, or DICOM by its
    preamble: scanners write extensionless files such as IMG0001), in sorted order (streamed).
    The other files of the folders are counted into `skipped`."""
    for path in paths:
        path = Path(path)
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs.sort()
                for name in sorted(files):
                    full = os.path.join(root, name)
                    if is_image_file(name) or is_dicom_file(full):
                        yield full
                    elif skipped is not None:
                        skipped.add(full)
        else:
            yield str(path)


DICOM_MAGIC_OFFSET = 128  # DICOM Part 10: a 128-byte preamble, then "DICM"


def is_dicom_file(path: str | os.PathLike) -> bool:
    """A DICOM Part 10 file whatever its name: 'DICM' after the 128-byte preamble."""
    try:
        with open(path, "rb") as handle:
            handle.seek(DICOM_MAGIC_OFFSET)
            return handle.read(4) == b"DICM"
    except OSError:
        return False
