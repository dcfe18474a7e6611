"""The model bundle: what a trained or shipped model is, as one directory, and where shipped ones live.

    <bundle>/weights.pt        the state dict only (torch.save of {name: tensor}; loaded weights_only=True)
    <bundle>/meta.json         a typed, versioned ModelMeta: the network and how to read its outputs
    <bundle>/model.onnx        fp32 graph: "pixels" (N x 1 x S x S in [0, 1]) -> "logits" (N x C) and
                               "features" (N x F, the pooled penultimate features)
    <bundle>/model.int8.onnx   optional int8 graph with the same inputs and outputs
    <bundle>/metrics.json      optional report (`ship`, evaluation); never read to make predictions

Staleness has one rule, the fingerprint: sha256 of the weights file plus the meta fields that shape
predictions (`SHAPING`). Each ONNX graph records the fingerprint it was made from (metadata_props
"pneumoscope_fingerprint"); a graph with another one is stale: the fp32 graph is then exported
again (into the cache, keyed by fingerprint), an int8 graph is refused with a one-line error.

A legacy `model.pt` (one file holding {"state_dict", "meta"}, what training wrote before bundles)
still loads, read-only; `convert_legacy` turns one into a bundle. Importing this module imports
neither torch nor onnx: only `Bundle.load_model`, saving and exporting do.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import logging
import math
import os
import typing
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Literal

from typing_extensions import Required, TypedDict  # pydantic reads typing.TypedDict only from Python 3.12

from ..core.files import atomic_write, default_cache_dir
from ..core.labels import BINARY, FOLDERS, THREE
from ..core.labels import TASKS as CLASSES_OF_TASK
from ..data.images import INPUT_STEPS

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
TASKS = ("three", "binary", FOLDERS)  # FOLDERS: any other dataset, its classes its folder names
WEIGHTS, META, ONNX_FP32, ONNX_INT8, METRICS = "weights.pt", "meta.json", "model.onnx", "model.int8.onnx", "metrics.json"
GRAPH_KINDS = {"fp32": ONNX_FP32, "int8": ONNX_INT8}
FINGERPRINT_KEY = "pneumoscope_fingerprint"  # ONNX metadata_props: the fingerprint a graph was made from
META_KEY = "pneumoscope_meta"  # ONNX metadata_props: the ModelMeta, so a graph explains itself
SHAPING = ("arch", "classes", "img_size", "mean", "std", "temperature", "merge_outputs", "adaptation")
LATER_SHAPING = ("members", "preprocess")  # shape predictions too, but count only when set: older bundles keep their fingerprint
ENSEMBLE = "ensemble"  # ModelMeta.arch of an ensemble; its `members` name the architectures
REPO_MODELS = Path(__file__).resolve().parents[3] / "models"  # a source checkout's models/


# What a meta.json may hold (checked at load, ModelMeta.from_json): beyond these a hostile or broken
# file allocated gigabytes (img_size 10000), flipped labels (temperature -1) or printed NaN.
IMG_SIZES = (32, 1024)  # px: the smallest the five stride-2 stages take; 1024 px is 4x the largest trained
MAX_CLASSES = 1000
MAX_META_DEPTH = 32  # nesting of lists and objects (the shipped meta.json has 6)


class BundleError(ValueError):
    """A bundle that cannot be used; the message names the file and says why, in one line."""


class GuardBlob(TypedDict):
    """An array in JSON (guard.encode)."""

    dtype: Literal["float16", "float32", "float64"]
    shape: list[int]
    base64: str


class GuardStats(TypedDict, total=False):
    """One graph kind's input-guard statistics (guard.fit_guard); the keys scoring reads are required,
    others are let through (a newer guard may add some)."""

    __pydantic_config__ = {"extra": "allow"}  # pydantic.ConfigDict, without importing pydantic here
    version: int
    method: Required[Literal["mahalanobis", "energy"]]  # guard.METHODS (guard.py needs NumPy, this module does not)
    features: int
    dims: int
    center: Required[GuardBlob]
    whiten: Required[GuardBlob]
    class_means: Required[GuardBlob]
    temperature: float
    max_flagged: float
    fitted_on: dict[str, int]
    thresholds: dict[str, float]
    threshold: Required[float]


@dataclass(frozen=True)
class ModelMeta:
    """What a network is and how to read its outputs. Everything that shapes a prediction is here
    (see SHAPING); measured numbers are not (they go to metrics.json)."""

    name: str
    task: str
    classes: tuple[str, ...]
    arch: str
    img_size: int
    mean: float  # the normalisation inside the network (models.Normalize)
    std: float
    temperature: float = 1.0
    merge_outputs: tuple[tuple[int, ...], ...] | None = None  # a 3-class net read as binary (models.MergeOutputs)
    params: int = 0
    # git_commit, seed, manifest_hash, best_epoch, train_config, pneumoscope (version), created, ...
    provenance: dict = field(default_factory=dict)
    adaptation: dict | None = None  # e.g. {"method": "adabn", "images": 312, "source": "...", "priors": [...]}
    guard: dict[str, GuardStats] | None = None  # feature-space statistics for the input guard, per graph kind
    members: tuple[str, ...] | None = None  # arch "ensemble": the members' architectures (models.Ensemble)
    preprocess: str | None = None  # the input step after resizing (images.input_step); None: none
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self):
        # JSON gives lists; the dataclass is frozen and hashable-minded, so keep tuples
        object.__setattr__(self, "classes", tuple(self.classes))
        if self.members is not None:
            object.__setattr__(self, "members", tuple(self.members))
        if (self.arch == ENSEMBLE) != bool(self.members):
            raise BundleError(f"{self.name}: arch {ENSEMBLE!r} goes with a list of members, and only it")
        if self.preprocess in ("none", ""):  # one spelling of "no step", so fingerprints agree
            object.__setattr__(self, "preprocess", None)
        if self.preprocess is not None and self.preprocess not in INPUT_STEPS:
            raise BundleError(f"{self.name}: unknown input step {self.preprocess!r}; this pneumoscope knows "
                              f"{', '.join(INPUT_STEPS)}")
        if self.merge_outputs is not None:
            object.__setattr__(self, "merge_outputs", tuple(tuple(int(i) for i in g) for g in self.merge_outputs))
            if len(self.merge_outputs) != len(self.classes):
                raise BundleError(f"{self.name}: merge_outputs has {len(self.merge_outputs)} groups for "
                                  f"{len(self.classes)} classes")
        problem = _meta_problem(self)
        if problem:
            raise BundleError(f"{self.name}: {problem}")

    @property
    def n_outputs(self) -> int:
        """Outputs of the network before any merge (what its last layer has)."""
        return sum(len(g) for g in self.merge_outputs) if self.merge_outputs else len(self.classes)

    @property
    def version(self) -> str:
        """The pneumoscope version that made the model."""
        return str(self.provenance.get("pneumoscope", "?"))

    def replace(self, **changes) -> "ModelMeta":
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["classes"] = list(self.classes)
        out["merge_outputs"] = [list(g) for g in self.merge_outputs] if self.merge_outputs else None
        out["members"] = list(self.members) if self.members else None
        return json.loads(json.dumps(out))  # plain JSON types all the way down

    @classmethod
    def from_json(cls, data: dict, source: str = "meta.json", text: bytes | None = None) -> "ModelMeta":
        """The meta in `data` (meta.json as parsed; `text`: the file's bytes, when at hand), its types
        checked strictly against the fields' (pydantic) and its values by __post_init__: a
        BundleError naming `source` otherwise."""
        if not isinstance(data, dict):
            raise BundleError(f"{source}: expected a JSON object of meta fields, not a {type(data).__name__}")
        version = data.get("schema_version")
        if not isinstance(version, int):
            raise BundleError(f"{source}: no schema_version; not a pneumoscope bundle meta")
        if version > SCHEMA_VERSION:
            raise BundleError(f"{source}: schema version {version} is newer than this pneumoscope reads "
                              f"({SCHEMA_VERSION}); upgrade pneumoscope")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise BundleError(f"{source}: unknown field(s) {', '.join(map(str, unknown))[:200]}")
        if _depth(data) > MAX_META_DEPTH:
            raise BundleError(f"{source}: nested deeper than {MAX_META_DEPTH} levels; not a pneumoscope bundle meta")
        from pydantic import ValidationError

        try:
            # through JSON: strict JSON mode reads arrays as the tuples the fields are, and nothing is coerced
            checked = _meta_schema().model_validate_json(text if text is not None else json.dumps(data))
        except ValidationError as err:
            raise BundleError(f"{source}: {_first_error(err)}") from None
        except ValueError as err:  # json.dumps: a value JSON cannot hold
            raise BundleError(f"{source}: {err}") from None
        try:
            return cls(**{name: getattr(checked, name) for name in known})
        except BundleError as err:  # a value out of range (__post_init__)
            raise BundleError(f"{source}: {err}") from None

    @classmethod
    def from_legacy(cls, meta: dict) -> "ModelMeta":
        """The typed meta of a legacy checkpoint's dict (its metrics are left out: not a property of
        the model; `convert_legacy` writes them to metrics.json)."""
        skip = {"name", "version", "arch", "task", "classes", "img_size", "input", "normalization", "temperature",
                "params", "merge_outputs", "output_classes", "metrics", "metrics_int8", "metrics_backend"}
        provenance = {"pneumoscope": meta.get("version", "?"),
                      **{k: v for k, v in meta.items() if k not in skip}}
        if meta.get("output_classes"):
            provenance["source_classes"] = list(meta["output_classes"])
        normalization = meta.get("normalization") or _registry_normalization(meta["arch"])
        return cls(name=meta.get("name", meta["arch"]), task=meta.get("task", "three"), classes=tuple(meta["classes"]),
                   arch=meta["arch"], img_size=int(meta["img_size"]), mean=float(normalization["mean"]),
                   std=float(normalization["std"]), temperature=float(meta.get("temperature", 1.0)),
                   merge_outputs=meta.get("merge_outputs"), params=int(meta.get("params", 0)), provenance=provenance)


def _meta_problem(meta: ModelMeta) -> str | None:
    """What is wrong with the values of `meta` (types are pydantic's job at load), or None."""
    classes = meta.classes
    if meta.task not in TASKS:
        return f"task {meta.task!r} is not one of {', '.join(TASKS)}"
    if not 2 <= len(classes) <= MAX_CLASSES:
        return f"{len(classes)} classes; a model has 2 to {MAX_CLASSES}"
    if not all(isinstance(c, str) and c.strip() for c in classes) or len(set(classes)) != len(classes):
        return f"classes must be distinct non-empty names, not {list(classes)[:10]}"
    if meta.task in CLASSES_OF_TASK and set(classes) <= set(THREE) | set(BINARY) \
            and classes != CLASSES_OF_TASK[meta.task]:
        expected = ", ".join(CLASSES_OF_TASK[meta.task])
        return f"classes {', '.join(classes)} are not those of task {meta.task!r} ({expected})"
    if isinstance(meta.img_size, bool) or not isinstance(meta.img_size, int) \
            or not IMG_SIZES[0] <= meta.img_size <= IMG_SIZES[1]:
        return f"img_size must be a whole number of pixels from {IMG_SIZES[0]} to {IMG_SIZES[1]}, not {meta.img_size!r}"
    for name, value, positive in (("temperature", meta.temperature, True), ("mean", meta.mean, False),
                                  ("std", meta.std, True)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or (positive and value <= 0):
            return f"{name} must be a finite number{' above 0' if positive else ''}, not {value!r}"
    if meta.merge_outputs is not None:
        used = sorted(i for group in meta.merge_outputs for i in group)
        if not all(meta.merge_outputs) or used != list(range(len(used))):
            return f"merge_outputs must share the outputs 0..N-1 out into non-empty groups, not {meta.merge_outputs}"
    return None


def _depth(value) -> int:
    """How deeply lists and dicts nest in `value` (iterative: a crafted file cannot exhaust the stack)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (dict, list, tuple)):
            deepest = max(deepest, level)
            if level <= MAX_META_DEPTH:
                stack.extend((v, level + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


@functools.cache
def _meta_schema():
    """A pydantic model made from ModelMeta's own fields and type hints (one description of the
    format), strict: "224" is no int and 224.5 no img_size."""
    from pydantic import ConfigDict, create_model

    hints = typing.get_type_hints(ModelMeta)
    fields = {f.name: (hints[f.name], f.default if f.default is not dataclasses.MISSING else
                       f.default_factory() if f.default_factory is not dataclasses.MISSING else ...)
              for f in dataclasses.fields(ModelMeta)}
    return create_model("MetaJson", __config__=ConfigDict(strict=True, extra="forbid"), **fields)


def _first_error(err) -> str:
    """A pydantic ValidationError as one line: where (guard.fp32.center) and what."""
    first = err.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{where or 'meta'}: {first['msg']}{more}"


def _registry_normalization(arch: str) -> dict:
    from ..nets.registry import model_spec  # only very old checkpoints lack "normalization": torch is loaded anyway

    spec = model_spec(arch)
    return {"mean": spec.mean, "std": spec.std}


# ---------------------------------------------------------------- the fingerprint
def fingerprint(weights_sha256: str, meta: ModelMeta) -> str:
    """The content fingerprint: the weights (sha256 of weights.pt) and the meta that shapes predictions."""
    as_json = meta.to_json()
    shaping = {k: as_json[k] for k in SHAPING}
    shaping.update({k: as_json[k] for k in LATER_SHAPING if as_json[k] is not None})
    shaping = json.dumps(shaping, sort_keys=True)
    return hashlib.sha256(f"{weights_sha256}\n{shaping}".encode()).hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weights_bytes(model) -> bytes:
    """The bytes weights.pt holds for `model` (torch.save of its CPU state dict; byte-for-byte the
    same for the same tensors), so an in-memory model has the fingerprint its saved bundle would."""
    import torch

    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, buffer)
    return buffer.getvalue()


def model_fingerprint(model, meta: ModelMeta) -> str:
    """The fingerprint of an in-memory model (what `save_bundle` would give it)."""
    return fingerprint(hashlib.sha256(weights_bytes(model)).hexdigest(), meta)


def graph_metadata(path: str | os.PathLike) -> dict[str, str]:
    """An ONNX file's metadata_props as a dict, read with protobuf through a two-field view of
    ONNX's ModelProto (`_metadata_message`): `import onnx` alone takes 0.7 s, half of a one-image
    `predict`, to check a fingerprint. A file that is not such a protobuf (truncated, corrupt) is a
    BundleError naming it."""
    from google.protobuf.message import DecodeError

    with open(path, "rb") as handle:
        data = handle.read()
    try:
        model = _metadata_message().FromString(data)
    except DecodeError as err:
        raise BundleError(f"{path}: not a readable ONNX graph ({str(err).splitlines()[0][:200]}); write it again "
                          "with `pneumoscope export`") from None
    return {p.key: p.value for p in model.metadata_props}


@functools.cache
def _metadata_message():
    """ModelProto's field 14 (`repeated StringStringEntryProto metadata_props`, onnx.proto) as a
    message class of its own; protobuf skips every other field (the graph) unparsed."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    package = "pneumoscope_onnx_metadata"
    proto = descriptor_pb2.FileDescriptorProto(name=f"{package}.proto", package=package, syntax="proto2")
    entry = proto.message_type.add(name="StringStringEntryProto")
    field_type = descriptor_pb2.FieldDescriptorProto
    entry.field.add(name="key", number=1, type=field_type.TYPE_STRING, label=field_type.LABEL_OPTIONAL)
    entry.field.add(name="value", number=2, type=field_type.TYPE_STRING, label=field_type.LABEL_OPTIONAL)
    model = proto.message_type.add(name="ModelProto")
    model.field.add(name="metadata_props", number=14, type=field_type.TYPE_MESSAGE, label=field_type.LABEL_REPEATED,
                    type_name=f".{package}.StringStringEntryProto")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{package}.ModelProto"))


def graph_fingerprint(path: str | os.PathLike) -> str | None:
    """The fingerprint an ONNX graph records, or None (a graph from before bundles)."""
    return graph_metadata(path).get(FINGERPRINT_KEY)


# ---------------------------------------------------------------- the bundle
@dataclass(frozen=True)
class Bundle:
    """A model on disk: a bundle directory, or (legacy, read-only) a single `model.pt`."""

    path: Path
    meta: ModelMeta
    weights_sha256: str
    legacy: bool = False

    @cached_property
    def fingerprint(self) -> str:
        return fingerprint(self.weights_sha256, self.meta)

    @property
    def name(self) -> str:
        return f"{self.meta.name}@{self.meta.version}"

    def state_dict(self) -> dict:
        if self.legacy:
            return _torch_load(self.path)["state_dict"]
        return _torch_load(self.path / WEIGHTS)

    def load_model(self):
        """The XrayNet (PyTorch, eval mode) with these weights."""
        try:
            return build_model(self.meta, self.state_dict())
        except BundleError as err:
            raise BundleError(f"{self.path if self.legacy else self.path / WEIGHTS}: {err}") from None

    def metrics(self) -> dict:
        """metrics.json ({} when there is none; a legacy model.pt: its model.json sidecar's metrics),
        for reports and the web's model card only."""
        if self.legacy:
            sidecar = self.path.with_suffix(".json")
            return json.loads(sidecar.read_text()).get("metrics", {}) if sidecar.is_file() else {}
        path = self.path / METRICS
        return json.loads(path.read_text()) if path.is_file() else self._run_reports()

    def _run_reports(self) -> dict:
        """The headlines of the val/test reports its run wrote, for RUN/model bundles made before
        training wrote metrics.json ({} for any other bundle)."""
        if self.legacy or self.path.name != "model":
            return {}
        from ..evaluation.metrics import headline

        reports = {"val": self.path.parent / "val" / METRICS, "internal_test": self.path.parent / "test" / METRICS}
        return {name: headline(json.loads(p.read_text())) for name, p in reports.items() if p.is_file()}

    def graph_location(self, kind: str = "fp32") -> Path:
        """Where this bundle's graph of `kind` lives (it may be missing or stale)."""
        if kind not in GRAPH_KINDS:
            raise ValueError(f"unknown graph kind {kind!r}; choose fp32 or int8")
        if self.legacy:  # model.pt -> model.onnx / model.int8.onnx beside it
            return self.path.with_suffix(".int8.onnx" if kind == "int8" else ".onnx")
        return self.path / GRAPH_KINDS[kind]

    @property
    def users_own(self) -> bool:
        """A bundle the user made: not shipped or installed (`is_shipped`) and in a folder they can
        write. Only then does a command write beside it (export's default); else into the cache."""
        return not is_shipped(self.path) and os.access(self.path.parent if self.legacy else self.path, os.W_OK)

    def cached_graph(self, kind: str = "fp32") -> Path:
        """The cache's graph of `kind` for exactly these weights and meta (keyed by fingerprint):
        where graphs of bundles that are not the user's own go (`export_location`, `onnx_path`)."""
        if kind not in GRAPH_KINDS:
            raise ValueError(f"unknown graph kind {kind!r}; choose fp32 or int8")
        return default_cache_dir() / "onnx" / f"{self.fingerprint[:24]}{'.int8' if kind == 'int8' else ''}.onnx"

    def export_location(self, kind: str = "fp32") -> Path:
        """Where `export` writes the graph of `kind` when not told: the bundle's own graph file for a
        bundle of the user's own, else the cache, where prediction finds it too. A shipped or
        installed bundle is never rewritten (`pneumoscope ship` is the only writer of models/)."""
        return self.graph_location(kind) if self.users_own else self.cached_graph(kind)

    def onnx_path(self, kind: str = "fp32") -> Path:
        """A graph of `kind` made from exactly these weights and meta: the bundle's own, else the
        cache's (`cached_graph`). A missing or stale fp32 graph is exported into the cache (so the
        same content is exported once, and a shipped bundle is never written); a missing or stale
        int8 graph is a one-line error."""
        path = self.graph_location(kind)
        if path.is_file() and graph_fingerprint(path) == self.fingerprint:
            return path
        cached = self.cached_graph(kind)
        if kind == "int8":
            if cached.is_file() and graph_fingerprint(cached) == self.fingerprint:
                return cached
            why = "was made from other weights or meta" if path.is_file() else "does not exist"
            raise BundleError(f"{path}: {why}; make it with `pneumoscope export --int8 "
                              f"--checkpoint {self.path} --calibration DATA`")
        if not cached.is_file() or graph_fingerprint(cached) != self.fingerprint:
            from ..runtime.export import export_onnx

            log.info("%s is missing or stale; exporting %s", path, cached)
            export_onnx(self.load_model(), self.meta, cached)
        return cached


def build_model(meta: ModelMeta, state_dict: dict):
    """Rebuilds the architecture `meta` names and loads `state_dict` into it (strict)."""
    from ..nets.registry import MergeOutputs, Normalize, create_ensemble, create_model

    if meta.members:
        if meta.merge_outputs:
            raise BundleError(f"{meta.name}: an ensemble cannot merge outputs; ship each task's own ensemble")
        model = create_ensemble(meta.members, num_classes=meta.n_outputs)
        _load_weights(model, state_dict, meta)
        for member in model.members:  # one normalisation for all (ensemble.py checks the members share it)
            member.normalize = Normalize(meta.mean, meta.std)
        return model.eval()
    model = create_model(meta.arch, num_classes=meta.n_outputs, pretrained=False)
    _load_weights(model, state_dict, meta)
    model.normalize = Normalize(meta.mean, meta.std)  # the meta's normalisation, not today's registry default
    if meta.merge_outputs:
        model.add_module("merge", MergeOutputs([list(g) for g in meta.merge_outputs]))
    return model.eval()


def _load_weights(model, state_dict: dict, meta: ModelMeta) -> None:
    """load_state_dict (strict), its wall of missing and mismatched keys made one line."""
    try:
        model.load_state_dict(state_dict, strict=True)
    except (RuntimeError, TypeError, AttributeError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        detail = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), "")
        raise BundleError(f"{meta.name}: the weights do not fit {meta.arch} with {meta.n_outputs} outputs "
                          f"({reason} {detail[:200]})") from None


def load_bundle(path: "str | os.PathLike | Bundle") -> Bundle:
    """The model at what a user points to (`resolve_checkpoint`: a bundle directory or a file in
    one, a run directory or its best/last checkpoint, a legacy `model.pt`, read-only); a Bundle is
    returned as it is. FileNotFoundError / BundleError with a one-line reason otherwise."""
    if isinstance(path, Bundle):
        return path
    path = resolve_checkpoint(path)
    if path.is_dir():
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
    if path.is_file():
        return _load_legacy(path)
    raise FileNotFoundError(f"{path}: no such model bundle or checkpoint")


# ---------------------------------------------------------------- what --checkpoint points at
BUNDLE_FILES = (WEIGHTS, META, ONNX_FP32, ONNX_INT8, METRICS)
RUN_CHECKPOINTS = ("best.ckpt", "last.ckpt")  # Lightning's training state; the run's model is RUN/model
LEGACY_SUFFIXES = (".pt", ".pth")
RUN_MARKERS = ("config.yaml", "status.json", "checkpoints")  # rundir.py's files: a training run's directory


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The bundle directory (or legacy model.pt) meant by what a user points --checkpoint at:

    - a bundle directory, or any file in one (weights.pt, meta.json, model.onnx, ...): the bundle;
    - a run directory, or its checkpoints/best.ckpt or last.ckpt: the run's model (RUN/model; a
      run from before bundles: RUN/model.pt);
    - a `.pt` file: itself (a legacy model.pt; load_bundle reads or refuses it).

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
        for model in (run / "model", run / "model.pt"):
            if (model.is_dir() and _looks_like_bundle(model)) or model.is_file():
                return model
        raise FileNotFoundError(f"{path}: the run {run} has no model yet; is the run finished? "
                                f"(its model will be {run / 'model'})")
    if path.is_file() and path.suffix.lower() in LEGACY_SUFFIXES:
        return path
    nearest = nearest_bundle(path)
    hint = f"; the nearest model bundle is {nearest} (--checkpoint {nearest})" if nearest else \
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


def _load_legacy(path: Path) -> Bundle:
    import torch

    payload = _torch_load(path)
    try:
        meta = ModelMeta.from_legacy(payload["meta"])
        state = payload["state_dict"]
    except (KeyError, TypeError) as err:
        raise BundleError(f"{path}: not a pneumoscope model bundle or checkpoint (no {err})") from None
    buffer = io.BytesIO()
    torch.save({k: v.contiguous() for k, v in state.items()}, buffer)  # what its bundle's weights.pt would hold
    return Bundle(path, meta, hashlib.sha256(buffer.getvalue()).hexdigest(), legacy=True)


def save_bundle(model, meta: ModelMeta, out: str | os.PathLike, export: bool = True) -> Path:
    """Writes a bundle directory: weights.pt, meta.json and (with `export`) model.onnx, each
    atomically. An int8 graph already there is left alone: if the weights changed it is now
    stale and will be refused, never silently used."""
    out = Path(out)
    data = weights_bytes(model)
    with atomic_write(out / WEIGHTS) as handle:
        handle.write(data)
    write_meta(out, meta)
    if export:
        from ..runtime.export import export_onnx

        # the fingerprint from the bytes just written: serializing a large network twice costs seconds
        export_onnx(model, meta, out / ONNX_FP32, fingerprint=fingerprint(hashlib.sha256(data).hexdigest(), meta))
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


def convert_legacy(checkpoint: str | os.PathLike, out: str | os.PathLike, export: bool = True) -> Path:
    """A legacy `model.pt` (+ its metrics) as a bundle directory; the weights are copied tensor for tensor."""
    bundle = _load_legacy(Path(checkpoint))
    model = bundle.load_model()
    save_bundle(model, bundle.meta, out, export=export)
    legacy_meta = _torch_load(Path(checkpoint))["meta"]
    metrics = dict(legacy_meta.get("metrics") or {})
    if legacy_meta.get("metrics_backend"):
        metrics["backend"] = legacy_meta["metrics_backend"]
    if legacy_meta.get("metrics_int8"):
        metrics["int8"] = legacy_meta["metrics_int8"]
    if metrics:
        write_metrics(out, metrics)
    return Path(out)


# ---------------------------------------------------------------- shipped models
def resolve_model(task: str = "three") -> Path:
    """The shipped bundle for `task`: under $PNEUMOSCOPE_MODELS when it is set (then only there),
    else the installed package data (`pneumoscope_models`), else a source checkout's models/."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
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
