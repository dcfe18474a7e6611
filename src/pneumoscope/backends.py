"""Running a network over pixels: one protocol, two runtimes, and the policy that picks one.

    Backend.run(batch) -> (logits, features)
        batch     N x 1 x S x S float32 in [0, 1] (`to_batch`); the network normalises itself
        logits    N x C float32, before the temperature
        features  N x F float32, the pooled penultimate features (for the input guard)

`TorchBackend` runs PyTorch eager; `OnnxBackend` runs ONNX Runtime on a graph file or on graph
bytes (an in-memory model exported on the spot). `open_backend` is the one place that chooses.
Importing this module imports neither torch nor onnxruntime (nor NumPy): each backend imports its
runtime when it is made.
"""
from __future__ import annotations

import logging
import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Protocol, TypeVar

if TYPE_CHECKING:
    import numpy as np

    from .artifact import Bundle, ModelMeta

log = logging.getLogger(__name__)
T, R = TypeVar("T"), TypeVar("R")
BACKENDS = ("auto", "int8", "onnx", "torch")


def to_batch(pixels: np.ndarray) -> np.ndarray:
    """N x S x S uint8 -> N x 1 x S x S float32 in [0, 1], the input of every backend."""
    import numpy as np  # here, not at the top: the CLI reads BACKENDS for --help without NumPy

    return np.ascontiguousarray(pixels, dtype=np.float32)[:, None] / 255


def cpu_threads() -> int:
    """The cores this process may use (OMP_NUM_THREADS when set), as PyTorch would count them."""
    configured = os.environ.get("OMP_NUM_THREADS", "")
    return int(configured) if configured.isdigit() and int(configured) > 0 else len(os.sched_getaffinity(0))


class Backend(Protocol):
    name: str  # "torch", "onnx" or "int8": what records and reports name

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


class TorchBackend:
    """PyTorch eager, inference mode, channels-last input (faster for depthwise convolutions on
    CPU). `lock` serialises forwards: Grad-CAM hangs hooks on the same model."""

    name = "torch"

    def __init__(self, model, lock: threading.RLock | None = None):
        from .models import LogitsAndFeatures

        self.model = model.eval()
        self.lock = lock or threading.RLock()
        self._net = LogitsAndFeatures(self.model)

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import torch

        with self.lock, torch.inference_mode():
            logits, features = self._net(torch.from_numpy(batch).contiguous(memory_format=torch.channels_last))
        return logits.numpy(), features.numpy()


class OnnxBackend:
    """ONNX Runtime on the CPU, on a graph file or graph bytes with outputs "logits" and "features".

    `threads` defaults to all cores. `single_thread()` gives a sibling session on the same graph
    whose `run` works in the calling thread only, so several threads can run batches side by side
    (on depthwise-heavy nets that beats one run spread over all cores)."""

    def __init__(self, graph: str | os.PathLike | bytes, name: str = "onnx", threads: int | None = None):
        self.graph, self.name, self.threads = graph, name, threads or cpu_threads()
        self.session = open_session(graph, self.threads)
        self._single: OnnxBackend | None = None
        self._single_lock = threading.Lock()

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, features = self.session.run(["logits", "features"], {"pixels": batch})
        return logits, features

    def single_thread(self) -> "OnnxBackend":
        with self._single_lock:
            if self._single is None:
                self._single = self if self.threads == 1 else OnnxBackend(self.graph, self.name, threads=1)
            return self._single


def side_by_side(run: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[tuple[T, R]]:
    """(item, run(item)) in input order, with up to `workers` runs at a time on a thread pool while
    the caller's thread produces the next items (decoding, say). At most workers + 1 items are in
    flight, so memory stays bounded whatever their number."""
    with ThreadPoolExecutor(workers, thread_name_prefix="pneumoscope-run") as pool:
        in_flight: deque = deque()
        for item in items:
            in_flight.append((item, pool.submit(run, item)))
            if len(in_flight) > workers:
                done, result = in_flight.popleft()
                yield done, result.result()
        while in_flight:
            done, result = in_flight.popleft()
            yield done, result.result()


def open_session(graph: str | os.PathLike | bytes, threads: int):
    """An ONNX Runtime CPU session: no spinning (idle threads busy-waiting would steal the cores the
    decoder and other processes need), no telemetry."""
    import onnxruntime as ort

    ort.disable_telemetry_events()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = graph if isinstance(graph, bytes) else str(graph)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def open_backend(bundle: "Bundle", backend: str = "auto") -> Backend:
    """The policy, in one place. "onnx": the bundle's fp32 graph (exported into the cache first if
    missing or stale). "int8": its int8 graph, only on request (faster on a folder, slightly less
    accurate: docs/benchmarks.md); a missing or stale one is an error. "torch": PyTorch eager.
    "auto": like "onnx", falling back to PyTorch with a logged warning when ONNX Runtime or the
    export fails."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "torch":
        return TorchBackend(bundle.load_model())
    if backend == "int8":
        return OnnxBackend(bundle.onnx_path("int8"), name="int8")
    try:
        return OnnxBackend(bundle.onnx_path("fp32"))
    except Exception as err:  # noqa: BLE001  any failure of the fast path: fall back, say so
        if backend != "auto":
            raise
        log.warning("ONNX Runtime backend unavailable (%s: %s); using PyTorch", type(err).__name__, err)
        return TorchBackend(bundle.load_model())


def backend_for_model(model, meta: "ModelMeta", backend: str = "onnx", lock: threading.RLock | None = None
                      ) -> Backend:
    """A backend on an in-memory model: "torch" runs it as is, "onnx" exports it to graph bytes
    first (nothing is written to disk)."""
    if backend == "torch":
        return TorchBackend(model, lock)
    if backend == "onnx":
        from .export import onnx_bytes

        return OnnxBackend(onnx_bytes(model, meta))
    raise ValueError(f"an in-memory model runs on 'torch' or 'onnx', not {backend!r}")
