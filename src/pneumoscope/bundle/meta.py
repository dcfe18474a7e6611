"""What a model is, as plain data: the typed, versioned `ModelMeta` of a bundle's meta.json, its
checks, and the fingerprint that ties a graph to the weights and meta it was made from.

Staleness has one rule, the fingerprint: sha256 of the weights file plus the meta fields that shape
predictions (`SHAPING`). Each ONNX graph records the fingerprint it was made from (metadata_props
"pneumoscope_fingerprint", `graph_fingerprint`). Importing this module imports neither torch nor onnx.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Literal

from typing_extensions import Required, TypedDict  # pydantic reads typing.TypedDict only from Python 3.12

from ..core.config import INPUT_STEPS
from ..core.labels import BINARY, MODEL_TASKS, THREE
from ..core.labels import TASKS as CLASSES_OF_TASK

SCHEMA_VERSION = 1
FINGERPRINT_KEY = "pneumoscope_fingerprint"  # ONNX metadata_props: the fingerprint a graph was made from
META_KEY = "pneumoscope_meta"  # ONNX metadata_props: the ModelMeta, so a graph explains itself
SHAPING = ("arch", "classes", "img_size", "mean", "std", "temperature", "merge_outputs", "adaptation")
LATER_SHAPING = ("members", "preprocess")  # shape predictions too, but count only when set: older bundles keep their fingerprint
ENSEMBLE = "ensemble"  # ModelMeta.arch of an ensemble; its `members` name the architectures
# What a meta.json may hold (checked at load, ModelMeta.from_json): beyond these a hostile or broken
# file allocated gigabytes (img_size 10000), flipped labels (temperature -1) or printed NaN.
IMG_SIZES = (32, 1024)  # px: the smallest the five stride-2 stages take; 1024 px is 4x the largest trained
MAX_CLASSES = 1000
MAX_META_DEPTH = 32  # nesting of lists and objects (the shipped meta.json has 6)


class BundleError(ValueError):
    """A bundle that cannot be used; the message names the file and says why, in one line."""

class GuardBlob(TypedDict):
    """An array in JSON (runtime.guard.encode_array)."""

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


def _meta_problem(meta: ModelMeta) -> str | None:
    """What is wrong with the values of `meta` (types are pydantic's job at load), or None."""
    classes = meta.classes
    if meta.task not in MODEL_TASKS:
        return f"task {meta.task!r} is not one of {', '.join(MODEL_TASKS)}"
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
