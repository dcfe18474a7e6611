"""Running a network over pixels: one protocol, two runtimes, and the policy that picks one.

    Backend.run(batch) -> (logits, features)
        batch     N x 1 x S x S float32 in [0, 1] (`to_batch`); the network normalises itself
        logits    N x C float32, before the temperature
        features  N x F float32, the pooled penultimate features (for the input guard)

`TorchBackend` runs PyTorch eager; `OnnxBackend` runs ONNX Runtime on a graph file or on graph
bytes (an in-memory model exported on the spot); `OpenVinoBackend` runs OpenVINO on the same graph
files. `open_backend` is the one place that chooses (OpenVINO by default: the fastest at fp32
accuracy on the CPUs measured).
Importing this module imports neither torch nor onnxruntime nor openvino (nor NumPy): each backend
imports its runtime when it is made.
"""
from __future__ import annotations

import logging
import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Protocol, TypeVar

from ..bundle import Bundle, BundleError, ModelMeta
from ..core.config import BACKENDS
from ..core.files import default_cache_dir
from .graphs import current_graph
from .guard import stats_for

if TYPE_CHECKING:
    import numpy as np


log = logging.getLogger(__name__)
T, R = TypeVar("T"), TypeVar("R")


def cpu_threads() -> int:
    """The cores this process may use (OMP_NUM_THREADS when set), as PyTorch would count them."""
    configured = os.environ.get("OMP_NUM_THREADS", "")
    return int(configured) if configured.isdigit() and int(configured) > 0 else len(os.sched_getaffinity(0))


class Backend(Protocol):
    name: str  # "torch", "onnx", "int8", "openvino" or "openvino-int8": what records and reports name
    graph_kind: str  # "fp32" or "int8": the graph it computes, whose features the input guard's statistics fit

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


class TorchBackend:
    """PyTorch eager, inference mode, channels-last input (faster for depthwise convolutions on
    CPU). `lock` serialises forwards: Grad-CAM hangs hooks on the same model."""

    name = "torch"
    graph_kind = "fp32"  # PyTorch and the fp32 graph agree to 1e-5

    def __init__(self, model, lock: threading.RLock | None = None):
        from ..nets.registry import LogitsAndFeatures  # lazy: PyTorch loads for the torch backend only

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

    def __init__(self, graph: str | os.PathLike | bytes, name: str = "onnx", threads: int | None = None,
                 meta: ModelMeta | None = None, graph_kind: str = "fp32"):
        self.graph, self.name, self.threads, self.meta = graph, name, threads or cpu_threads(), meta
        self.graph_kind = graph_kind
        self.session = loading(graph, "ONNX Runtime", lambda: open_session(graph, self.threads))
        check_interface(graph, {i.name: i.shape for i in self.session.get_inputs()},
                        {o.name: o.shape for o in self.session.get_outputs()}, meta, graph_kind)
        self._single: OnnxBackend | None = None
        self._single_lock = threading.Lock()

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, features = self.session.run(["logits", "features"], {"pixels": batch})
        return logits, features

    def single_thread(self) -> "OnnxBackend":
        with self._single_lock:
            if self._single is None:
                self._single = self if self.threads == 1 else OnnxBackend(self.graph, self.name, 1, self.meta,
                                                                                    self.graph_kind)
            return self._single


def cpu_flags() -> set[str]:
    """The instruction-set flags of this CPU (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


SPEED_FLAGS = ("avx512_vnni", "amx_tile", "avx512_bf16")  # the ones that decide int8 / bf16 speed


def describe_machine() -> str:
    """CPU model, the speed flags, cores and the load right now: printed with every benchmark figure."""
    import os

    try:
        with open("/proc/cpuinfo") as info:
            model = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), "unknown CPU")
    except OSError:
        model = "unknown CPU"
    flags = cpu_flags()
    marks = ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in SPEED_FLAGS)
    return (f"{model}; {marks}; {len(os.sched_getaffinity(0))} cores; "
            f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def openvino_precision() -> str:
    """bf16 where the CPU computes it natively (AMX on Intel, AVX512-BF16 on Intel and AMD Zen 4+),
    fp32 elsewhere: emulated bf16 would be slower than fp32."""
    return "bf16" if cpu_flags() & {"amx_bf16", "avx512_bf16"} else "f32"


class OpenVinoBackend:
    """OpenVINO on the CPU plugin, on the same ONNX graph files (fp32 or the QDQ int8 graph, which
    OpenVINO runs as int8 kernels). `hint` is OpenVINO's performance hint: "LATENCY" (one request
    on all cores: a single image) or "THROUGHPUT" (one stream per core: several requests side by
    side). `precision` is the inference precision of float layers (`openvino_precision()`: bf16
    where the CPU has it natively). `single_thread()` gives the THROUGHPUT sibling whose `run`
    can be called from several threads at once, as `side_by_side` does for a folder."""

    def __init__(self, graph: str | os.PathLike, name: str = "openvino", hint: str = "LATENCY",
                 precision: str | None = None, threads: int | None = None, meta: ModelMeta | None = None,
                 graph_kind: str = "fp32"):
        ov = import_openvino()

        self.graph, self.name, self.hint, self.meta, self.graph_kind = graph, name, hint, meta, graph_kind
        self.threads, self.precision = threads or cpu_threads(), precision or openvino_precision()
        config = {"PERFORMANCE_HINT": hint, "INFERENCE_PRECISION_HINT": self.precision,
                  "INFERENCE_NUM_THREADS": self.threads, **openvino_cache()}
        self.compiled = loading(graph, "OpenVINO", lambda: ov.Core().compile_model(str(graph), "CPU", config))
        check_interface(graph, _openvino_ports(self.compiled.inputs), _openvino_ports(self.compiled.outputs), meta,
                        graph_kind)
        self._local = threading.local()  # an infer request is not thread-safe: one per thread
        self._single: OpenVinoBackend | None = None
        self._single_lock = threading.Lock()
        self._warm_up()

    def _warm_up(self) -> None:
        """One inference here, in the thread that made the backend. The first NumPy transfer in
        OpenVINO's bindings initialises pybind11's NumPy API under a call-once lock; two threads
        reaching it first together (a folder on `side_by_side`) deadlocked with the GIL."""
        import numpy as np

        shape = [1 if dim.is_dynamic else dim.get_length() for dim in self.compiled.input("pixels").get_partial_shape()]
        self.run(np.zeros(shape, np.float32))

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        outputs = request.infer({"pixels": batch})
        # copies: the request reuses its output buffers on the next call
        return outputs["logits"].copy(), outputs["features"].copy()

    def single_thread(self) -> "OpenVinoBackend":
        with self._single_lock:
            if self._single is None:
                self._single = (self if self.hint == "THROUGHPUT" else
                                OpenVinoBackend(self.graph, self.name, "THROUGHPUT", self.precision, self.threads,
                                                self.meta, self.graph_kind))
            return self._single


def openvino_cache() -> dict:
    """OpenVINO's compiled-graph cache (CACHE_DIR) in the pneumoscope cache: compiling the graph is
    most of a one-image `predict` (1.2 s of 1.4 s measured); loading the cached blob is not. Keyed
    by OpenVINO on the graph file's content and the compile settings, so a new graph compiles anew.
    No cache where that folder cannot be made (the graph then compiles every time, as before)."""

    folder = default_cache_dir() / "openvino"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return {}
    return {"CACHE_DIR": str(folder)} if os.access(folder, os.W_OK) else {}


def loading(graph: str | os.PathLike | bytes, runtime: str, load: Callable[[], R]) -> R:
    """`load()`, a runtime reading `graph`; what it refuses (a truncated file, external data outside
    the bundle, an operator it lacks) is one BundleError line naming the file."""

    try:
        return load()
    except ImportError:
        raise
    except Exception as err:  # noqa: BLE001  each runtime has its own exception types
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        reason = lines[-1][:300] if lines else type(err).__name__  # OpenVINO's last line says why
        raise BundleError(f"{_describe_graph(graph)}: {runtime} cannot load this graph ({reason})") from None


def check_interface(graph: str | os.PathLike | bytes, inputs: dict[str, list], outputs: dict[str, list],
                    meta: ModelMeta | None, graph_kind: str) -> None:
    """A one-line BundleError unless the graph takes "pixels" (N x 1 x S x S) and gives "logits"
    (N x classes) and "features" (N x F, what the input guard's statistics were fitted on). Shapes
    are lists of ints, None or names for dynamic sizes."""

    where = _describe_graph(graph)
    if "pixels" not in inputs or not {"logits", "features"} <= outputs.keys():
        raise BundleError(f"{where}: the graph takes {', '.join(sorted(inputs)) or 'nothing'} and gives "
                          f"{', '.join(sorted(outputs)) or 'nothing'}; pneumoscope runs graphs from pixels to logits "
                          "and features (`pneumoscope export` writes one)")
    pixels, logits, features = inputs["pixels"], outputs["logits"], outputs["features"]
    if len(pixels) != 4 or len(logits) != 2 or len(features) != 2:
        raise BundleError(f"{where}: pixels {pixels} -> logits {logits}, features {features}; pneumoscope runs "
                          "N x 1 x S x S -> N x classes, N x F")
    if meta is None:
        return
    if isinstance(logits[1], int) and logits[1] != len(meta.classes):
        raise BundleError(f"{where}: the graph gives {logits[1]} logits for the {len(meta.classes)} classes of its "
                          f"meta ({', '.join(meta.classes)})")
    if all(isinstance(d, int) for d in pixels[1:]) and list(pixels[1:]) != [1, meta.img_size, meta.img_size]:
        raise BundleError(f"{where}: the graph takes pixels {pixels[1:]}, its meta says 1 x {meta.img_size} x "
                          f"{meta.img_size}")
    stats = stats_for(meta.guard, graph_kind)
    width = (stats or {}).get("center", {}).get("shape", [None])[0]
    if stats and isinstance(features[1], int) and width is not None and width != features[1]:
        raise BundleError(f"{where}: the graph gives {features[1]} features, its meta's input-guard statistics "
                          f"are for {width}")


def _describe_graph(graph: str | os.PathLike | bytes) -> str:
    return "<graph in memory>" if isinstance(graph, bytes) else str(graph)


def _openvino_ports(ports) -> dict[str, list]:
    """OpenVINO's inputs or outputs as {name: shape} (a port may have several names), a dynamic size as None."""
    return {name: [d.get_length() if d.is_static else None for d in port.get_partial_shape()]
            for port in ports for name in sorted(port.get_names())}


def import_openvino():
    """`openvino`, without telemetry. Importing it starts its model converter's telemetry (a usage
    counter written to ~/intel, analytics events unless the user opted out); like ONNX Runtime's, it
    stays off: with `openvino_telemetry` unimportable, OpenVINO uses its own no-op stub. A process
    that imported openvino_telemetry itself keeps it."""
    import sys

    sys.modules.setdefault("openvino_telemetry", None)  # None in sys.modules: the import fails
    import openvino

    return openvino


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
    """The policy, in one place. "auto" (the default): the fastest runtime that keeps fp32
    accuracy on this CPU (docs/benchmarks.md, "Runtimes"): OpenVINO on the bundle's fp32 graph,
    its float layers in bf16 where the CPU computes bf16 natively (AMX, AVX512-BF16) and in f32
    elsewhere; then ONNX Runtime fp32; then PyTorch, each fallback with a logged warning.
    "onnx": ONNX Runtime on the fp32 graph (exported into the cache first if missing or stale).
    "int8", "openvino-int8": the int8 graph (faster, less accurate), only on request; a missing or
    stale one is an error. "openvino": the fp32 graph on OpenVINO. "torch": PyTorch eager."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "torch":
        return _torch_backend(bundle)
    meta = bundle.meta
    if backend == "int8":
        return OnnxBackend(_graph(bundle, "int8"), name="int8", meta=meta, graph_kind="int8")
    if backend in ("openvino", "openvino-int8"):
        if not openvino_can_run(meta):
            raise ValueError(f"{bundle.path}: OpenVINO does not compute a merged (binary-from-three) graph right; "
                             "use --backend onnx")
        kind = "int8" if backend == "openvino-int8" else "fp32"
        return OpenVinoBackend(_graph(bundle, kind), name=backend, meta=meta, graph_kind=kind)
    if backend == "auto" and openvino_can_run(meta):
        try:
            return OpenVinoBackend(_graph(bundle, "fp32"), name="openvino", meta=meta)
        except Exception as err:  # noqa: BLE001  not installed or unsupported here: the next runtime
            log.warning("OpenVINO unavailable (%s: %s); using ONNX Runtime", type(err).__name__, err)
    try:
        return OnnxBackend(_graph(bundle, "fp32"), meta=meta)
    except Exception as err:  # noqa: BLE001  any failure of the fast path: fall back, say so
        if backend != "auto":
            raise
        log.warning("ONNX Runtime backend unavailable (%s: %s); using PyTorch", type(err).__name__, err)
        return _torch_backend(bundle)


def _graph(bundle: "Bundle", kind: str) -> "str | os.PathLike":
    """The bundle's current graph of `kind`, made first when it is a missing fp32 one."""
    found = current_graph(bundle, kind)
    if found is not None:
        return found
    from .export import export_missing  # lazy: torch and the exporter load only when a graph must be made

    return export_missing(bundle)


def _torch_backend(bundle: "Bundle") -> "TorchBackend":
    from ..nets.build import load_network  # lazy: PyTorch loads for the torch backend only

    return TorchBackend(load_network(bundle))


def openvino_can_run(meta: "ModelMeta") -> bool:
    """OpenVINO 2026.4 fails to convert the merged read of a 3-class network (log_softmax ->
    logsumexp per group); exported with keepdim it converts but returns wrong log-probabilities
    (positive ones, at f32 too). Such bundles run on ONNX Runtime."""
    return not meta.merge_outputs


def backend_for_model(model, meta: "ModelMeta", backend: str = "onnx", lock: threading.RLock | None = None
                      ) -> Backend:
    """A backend on an in-memory model: "torch" runs it as is, "onnx" exports it to graph bytes
    first (nothing is written to disk)."""
    if backend == "torch":
        return TorchBackend(model, lock)
    if backend == "onnx":
        from .export import onnx_bytes  # lazy: see _graph


        return OnnxBackend(onnx_bytes(model, meta), meta=meta)
    raise ValueError(f"an in-memory model runs on 'torch' or 'onnx', not {backend!r}")
