"""ONNX export and the ONNX Runtime session that `Classifier` uses as its fast path.

The ONNX graph is the whole `XrayNet` (normalisation included) taking `pixels`, N x 1 x S x S in
[0, 1], to `logits`; the checkpoint's meta travels inside it (metadata_props "pneumoscope_meta"),
so a session needs nothing else to make records.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import warnings
from pathlib import Path

import torch

from .data import atomic_write, default_cache_dir
from .models import load_checkpoint

log = logging.getLogger(__name__)
OPSET = 17
META_KEY = "pneumoscope_meta"


def export_onnx(model: torch.nn.Module, meta: dict, out: str | os.PathLike, opset: int = OPSET) -> Path:
    """Writes `model` as ONNX with a dynamic batch axis and `meta` embedded, atomically."""
    import onnx

    size = int(meta["img_size"])
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter (dynamo=False) is deprecated but needs no onnxscript and handles
        # every registered CNN; the dynamo exporter would add a dependency for no gain here.
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.rand(1, 1, size, size),), buffer, dynamo=False,
                          opset_version=opset, input_names=["pixels"], output_names=["logits"],
                          dynamic_axes={"pixels": {0: "batch"}, "logits": {0: "batch"}})
    proto = onnx.load_from_string(buffer.getvalue())
    proto.metadata_props.add(key=META_KEY, value=json.dumps(meta))
    with atomic_write(out) as handle:
        handle.write(proto.SerializeToString())
    return Path(out)


def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike | None = None,
                      opset: int = OPSET) -> Path:
    """Exports a checkpoint; by default beside it (`model.pt` -> `model.onnx`), where `Classifier`
    with backend="auto" looks first."""
    model, meta = load_checkpoint(checkpoint)
    return export_onnx(model, meta, out or Path(checkpoint).with_suffix(".onnx"), opset)


def onnx_for_checkpoint(checkpoint: Path) -> Path:
    """An ONNX file that matches `checkpoint`: the one beside it if not older than the checkpoint,
    else one exported into the cache (keyed by path, size and mtime, so a retrained checkpoint is
    exported anew)."""
    beside = checkpoint.with_suffix(".onnx")
    stat = checkpoint.stat()
    if beside.is_file() and beside.stat().st_mtime_ns >= stat.st_mtime_ns:
        return beside
    key = hashlib.sha256(f"{checkpoint.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{torch.__version__}"
                         .encode()).hexdigest()[:16]
    cached = default_cache_dir() / "onnx" / f"{checkpoint.stem}-{key}.onnx"
    if not cached.is_file():
        log.info("exporting %s to %s", checkpoint, cached)
        export_checkpoint(checkpoint, cached)
    return cached


def open_session(path: Path):
    """An ONNX Runtime CPU session and the meta embedded in the file."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    # The same thread budget as PyTorch (all cores, or OMP_NUM_THREADS); no spinning, because
    # idle threads busy-waiting would steal the cores the decoder and other processes need.
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map.get(META_KEY)
    if meta is None:
        raise ValueError(f"{path}: not exported by pneumoscope (no {META_KEY} metadata)")
    return session, json.loads(meta)
