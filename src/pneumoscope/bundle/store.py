"""The model bundle: a trained or shipped model as one directory, and where shipped ones live.

    <bundle>/weights.pt        the state dict only (torch.save of {name: tensor}; loaded weights_only=True)
    <bundle>/meta.json         a typed, versioned ModelMeta (meta.py): the network and how to read its outputs
    <bundle>/model.onnx        fp32 graph: "pixels" (N x 1 x S x S in [0, 1]) -> "logits" (N x C) and
                               "features" (N x F, the pooled penultimate features)
    <bundle>/model.int8.onnx   optional int8 graph with the same inputs and outputs
    <bundle>/metrics.json      optional report (`ship`, evaluation); never read to make predictions

This module reads and writes those files as plain data: the network is built by `nets`
(`nets.load_network`), graphs are made and found by `runtime.graphs`. Importing it imports neither
torch nor onnx.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from ..core.files import atomic_write, default_cache_dir
from ..core.labels import MODEL_TASKS
from .meta import MAX_META_DEPTH, BundleError, ModelMeta, file_sha256, fingerprint, weights_bytes

WEIGHTS, META, ONNX_FP32, ONNX_INT8, METRICS = "weights.pt", "meta.json", "model.onnx", "model.int8.onnx", "metrics.json"
GRAPH_KINDS = {"fp32": ONNX_FP32, "int8": ONNX_INT8}
REPO_MODELS = Path(__file__).resolve().parents[3] / "models"  # a source checkout's models/


# ---------------------------------------------------------------- the bundle
@dataclass(frozen=True)
class Bundle:
    """A model on disk: a bundle directory, its meta read and checked, its weights hashed (not loaded)."""

    path: Path
    meta: ModelMeta
    weights_sha256: str

    @cached_property
    def fingerprint(self) -> str:
        return fingerprint(self.weights_sha256, self.meta)

    @property
    def name(self) -> str:
        return f"{self.meta.name}@{self.meta.version}"

    def state_dict(self) -> dict:
        """The weights (torch.load, weights_only=True)."""
        return _torch_load(self.path / WEIGHTS)

    def metrics(self) -> dict:
        """metrics.json ({} when there is none), for reports and the web's model card only."""
        path = self.path / METRICS
        return json.loads(path.read_text()) if path.is_file() else {}

    def graph_location(self, kind: str = "fp32") -> Path:
        """Where this bundle's graph of `kind` lives (it may be missing or stale)."""
        if kind not in GRAPH_KINDS:
            raise ValueError(f"unknown graph kind {kind!r}; choose fp32 or int8")
        return self.path / GRAPH_KINDS[kind]

    @property
    def users_own(self) -> bool:
        """A bundle the user made: not shipped or installed (`is_shipped`) and in a folder they can
        write. Only then does a command write beside it (export's default); else into the cache."""
        return not is_shipped(self.path) and os.access(self.path, os.W_OK)

    def cached_graph(self, kind: str = "fp32") -> Path:
        """The cache's graph of `kind` for exactly these weights and meta (keyed by fingerprint):
        where graphs of bundles that are not the user's own go (`export_location`, `runtime.graphs`)."""
        if kind not in GRAPH_KINDS:
            raise ValueError(f"unknown graph kind {kind!r}; choose fp32 or int8")
        return default_cache_dir() / "onnx" / f"{self.fingerprint[:24]}{'.int8' if kind == 'int8' else ''}.onnx"

    def export_location(self, kind: str = "fp32") -> Path:
        """Where `export` writes the graph of `kind` when not told: the bundle's own graph file for a
        bundle of the user's own, else the cache, where prediction finds it too. A shipped or
        installed bundle is never rewritten (`pneumoscope ship` is the only writer of models/)."""
        return self.graph_location(kind) if self.users_own else self.cached_graph(kind)

def load_bundle(path: "str | os.PathLike | Bundle") -> Bundle:
    """The model at what a user points to (`resolve_checkpoint`: a bundle directory or a file in
    one, a run directory or its best/last checkpoint); a Bundle is returned as it is. FileNotFoundError / BundleError with a one-line reason otherwise."""
    if isinstance(path, Bundle):
        return path
    path = resolve_checkpoint(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such model bundle")
    meta_file, weights = path / META, path / WEIGHTS
    for needed in (meta_file, weights):
        if not needed.is_file():
            raise FileNotFoundError(f"{needed}: missing; {path} is not a complete model bundle")
    try:
        text = meta_file.read_bytes()
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BundleError(f"{meta_file}: not valid JSON ({err})") from None
    except RecursionError:
        raise BundleError(f"{meta_file}: nested deeper than {MAX_META_DEPTH} levels; not a pneumoscope "
                          "bundle meta") from None
    return Bundle(path, ModelMeta.from_json(data, str(meta_file), text), file_sha256(weights))


# ---------------------------------------------------------------- what --model points at
BUNDLE_FILES = (WEIGHTS, META, ONNX_FP32, ONNX_INT8, METRICS)
RUN_CHECKPOINTS = ("best.ckpt", "last.ckpt")  # Lightning's training state; the run's model is RUN/model
RUN_MARKERS = ("config.yaml", "status.json", "checkpoints")  # rundir.py's files: a training run's directory


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The bundle directory meant by what a user points --model at:

    - a bundle directory, or any file in one (weights.pt, meta.json, model.onnx, ...): the bundle;
    - a run directory, or its checkpoints/best.ckpt or last.ckpt: the run's model (RUN/model; a
      run directory's model is RUN/model).

    Anything else is a one-line FileNotFoundError (nothing there) or BundleError (not a model)
    that names the nearest bundle found around it."""
    path = Path(path)
    if path.is_dir() and _looks_like_bundle(path):
        return path
    if path.is_file() and path.name in BUNDLE_FILES and _looks_like_bundle(path.parent):
        return path.parent
    run = path if path.is_dir() else path.parent.parent if path.name in RUN_CHECKPOINTS and \
        path.parent.name == "checkpoints" else None
    if run is not None and (any((run / m).exists() for m in RUN_MARKERS) or (run / "model").is_dir()):
        if _looks_like_bundle(run / "model"):
            return run / "model"
        raise FileNotFoundError(f"{path}: the run {run} has no model yet; is the run finished? "
                                f"(its model will be {run / 'model'})")
    nearest = nearest_bundle(path)
    hint = f"; the nearest model bundle is {nearest} (--model {nearest})" if nearest else \
        "; no model bundle (a folder with meta.json and weights.pt) found near it"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such model bundle, run or file{hint}")
    what = "folder" if path.is_dir() else "file"
    raise BundleError(f"{path}: this {what} is not a model bundle, a file of one, a run or its best/last "
                      f"checkpoint{hint}")

def _looks_like_bundle(folder: Path) -> bool:
    """A bundle, or an incomplete one (load_bundle says what is missing)."""
    return (folder / META).is_file() or (folder / WEIGHTS).is_file()

def nearest_bundle(path: str | os.PathLike, max_folders: int = 2000) -> Path | None:
    """The closest complete bundle around `path`: inside it (3 levels down), else inside each of its
    first 3 parents (2 levels down); the fewest levels first. Bounded (`max_folders` looked at), so a
    mistyped path under a large tree answers at once."""
    start = Path(path)
    while not start.is_dir() and start != start.parent:
        start = start.parent
    budget = [max_folders]
    for level, base in enumerate([start, *list(start.parents)[:3]]):
        found = _bundles_below(base, 3 if level == 0 else 2, budget)
        if found:
            return min(found, key=lambda p: (len(p.parts), str(p)))
    return None

def _bundles_below(base: Path, depth: int, budget: list[int]) -> list[Path]:
    found, level = [], [base]
    for _ in range(depth + 1):
        below = []
        for folder in level:
            budget[0] -= 1
            if budget[0] < 0:
                return found
            if (folder / META).is_file() and (folder / WEIGHTS).is_file():
                found.append(folder)
                continue
            try:
                below += sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
            except OSError:  # unreadable: not ours to search
                continue
        if found:
            return found
        level = below
    return found

def _torch_load(path: Path):
    """torch.load(weights_only=True: tensors and plain data, no pickled code); a file it cannot
    read is a one-line BundleError."""
    import pickle
    import warnings

    import torch

    try:
        with warnings.catch_warnings():
            # a file pickled with another protocol (not torch.save's) makes the safe unpickler warn
            # before it refuses or reads it: the one-line error, or the data, says all there is
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        raise BundleError(f"{path}: not a pneumoscope model bundle or checkpoint ({type(err).__name__})") from None

def save_bundle(model, meta: ModelMeta, out: str | os.PathLike) -> Path:
    """Writes a bundle directory's weights.pt and meta.json, each atomically (its graph:
    `runtime.graphs.save_with_graph`). An int8 graph already there is left alone: if the weights
    changed it is now stale and will be refused, never silently used."""
    out = Path(out)
    with atomic_write(out / WEIGHTS) as handle:
        handle.write(weights_bytes(model))
    write_meta(out, meta)
    return out


def write_meta(bundle_dir: str | os.PathLike, meta: ModelMeta) -> Path:
    """meta.json of a bundle, atomically (also to change what is not in the fingerprint, e.g. the guard)."""
    path = Path(bundle_dir) / META
    with atomic_write(path, "w") as handle:
        json.dump(meta.to_json(), handle, indent=2)
        handle.write("\n")
    return path

def write_metrics(bundle_dir: str | os.PathLike, metrics: dict) -> Path:
    """metrics.json of a bundle, atomically (reports only; predictions never read it)."""
    path = Path(bundle_dir) / METRICS
    with atomic_write(path, "w") as handle:
        json.dump(metrics, handle, indent=2)
        handle.write("\n")
    return path

# ---------------------------------------------------------------- shipped models
def resolve_model(task: str = "three") -> Path:
    """The shipped bundle for `task`: under $PNEUMOSCOPE_MODELS when it is set (then only there),
    else the installed package data (`pneumoscope_models`), else a source checkout's models/."""
    if task not in MODEL_TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(MODEL_TASKS)}")
    override = os.environ.get("PNEUMOSCOPE_MODELS")
    if override:
        candidates = [Path(override) / task]
    else:
        candidates = [p / task for p in (_package_models(), REPO_MODELS) if p is not None]
    for candidate in candidates:
        if (candidate / META).is_file():
            return candidate
    raise FileNotFoundError(f"{candidates[0]}: no shipped model for task {task!r} "
                            "(train one with `pneumoscope train`, or set PNEUMOSCOPE_MODELS)")

def shipped_roots() -> list[Path]:
    """Every place shipped or installed models live (resolve_model's locations, all of them):
    $PNEUMOSCOPE_MODELS when set, the installed package data, this checkout's models/."""
    override = os.environ.get("PNEUMOSCOPE_MODELS")
    return [Path(p) for p in ([override] if override else [])] + [p for p in (_package_models(), REPO_MODELS)
                                                                  if p is not None]

def is_shipped(path: str | os.PathLike) -> bool:
    """True for a path in or under a shipped-model location (links resolved)."""
    real = Path(path).resolve()
    return any(real.is_relative_to(root.resolve()) for root in shipped_roots())

def refuse_shipped(path: str | os.PathLike, option: str = "--out") -> None:
    """A user command never writes into the shipped or installed models: a one-line ValueError."""
    if path is not None and is_shipped(path):
        raise ValueError(f"{option} {path} is inside the shipped models; `pneumoscope ship` is the only writer "
                         "there: choose another path")

def _package_models() -> Path | None:
    """models/ as installed package data (a wheel maps it to the `pneumoscope_models` package)."""
    from importlib import resources
    from importlib.util import find_spec

    if find_spec("pneumoscope_models") is None:
        return None
    return Path(str(resources.files("pneumoscope_models")))
