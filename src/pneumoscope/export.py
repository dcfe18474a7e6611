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


def open_session(path: Path, threads: int | None = None):
    """An ONNX Runtime CPU session and the meta embedded in the file. `threads` defaults to
    PyTorch's budget (all cores, or OMP_NUM_THREADS); with 1, `run` works in the calling thread
    only, so several callers can run batches side by side."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    # No spinning: idle threads busy-waiting would steal the cores the decoder and other processes need.
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map.get(META_KEY)
    if meta is None:
        raise ValueError(f"{path}: not exported by pneumoscope (no {META_KEY} metadata)")
    return session, json.loads(meta)


def read_onnx_meta(path: str | os.PathLike) -> dict:
    """The pneumoscope meta embedded in an ONNX file ({} when there is none)."""
    import onnx

    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return json.loads(props.get(META_KEY, "{}"))


# ---------------------------------------------------------------- int8 (static, QDQ)
def int8_path(checkpoint: Path) -> Path:
    """Where `Classifier` looks for a checkpoint's int8 graph: `model.pt` -> `model.int8.onnx`."""
    return checkpoint.with_suffix(".int8.onnx")


class _PixelBatches:
    """onnxruntime.quantization's CalibrationDataReader over N x S x S uint8 pixels."""

    def __init__(self, pixels, batch_size: int = 16):
        from .predict import to_batch

        self.feeds = iter([{"pixels": to_batch(pixels[i:i + batch_size])} for i in range(0, len(pixels), batch_size)])

    def get_next(self):
        return next(self.feeds, None)


def calibration_pixels(samples, size: int, n: int = 256, seed: int = 0):
    """`n` images drawn (seeded) from the samples' train split, or from all of them when there is
    none, decoded at the model's input size: N x size x size uint8."""
    import numpy as np

    from .images import read_xray, resize_square

    pool = [s for s in samples if s.split == "train"] or list(samples)
    chosen = np.random.default_rng(seed).choice(len(pool), size=min(n, len(pool)), replace=False)
    return np.stack([resize_square(read_xray(pool[i].path), size) for i in sorted(chosen)])


def quantize_int8(fp32_onnx: str | os.PathLike, out: str | os.PathLike, pixels,
                  source_sha256: str | None = None) -> Path:
    """Static int8 quantisation (ONNX Runtime, QDQ, per-channel weights, uint8 activations) of a
    pneumoscope ONNX file, calibrated on real X-rays (N x S x S uint8, e.g. a few hundred training
    images). On CPUs with VNNI (AVX512-VNNI / AVX-VNNI) ONNX Runtime runs it with integer kernels.
    The meta travels along, with "quantization" added so records name the int8 model."""
    import tempfile

    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    meta = read_onnx_meta(fp32_onnx)
    with tempfile.TemporaryDirectory() as tmp:
        prepared, quantized = Path(tmp) / "prepared.onnx", Path(tmp) / "int8.onnx"
        quant_pre_process(str(fp32_onnx), str(prepared))  # folds BN, infers shapes: what quantize expects
        quantize_static(str(prepared), str(quantized), _PixelBatches(pixels),
                        quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
        proto = onnx.load(str(quantized))
    meta["quantization"] = {"type": "int8 static QDQ, per-channel weights, MinMax calibration",
                            "calibration_images": int(len(pixels)), "source_sha256": source_sha256}
    meta["name"] = f"{meta.get('name', meta['arch'])}-int8"
    del proto.metadata_props[:]
    proto.metadata_props.add(key=META_KEY, value=json.dumps(meta))
    with atomic_write(out) as handle:
        handle.write(proto.SerializeToString())
    return Path(out)


def export_int8(checkpoint: str | os.PathLike, calibration_samples, n_calibration: int = 256,
                out: str | os.PathLike | None = None, opset: int = OPSET) -> Path:
    """Checkpoint -> int8 ONNX, calibrated on `n_calibration` of the samples (see calibration_pixels);
    by default beside the checkpoint, where `Classifier` with backend "int8" looks for it."""
    import tempfile

    checkpoint = Path(checkpoint)
    model, meta = load_checkpoint(checkpoint)
    pixels = calibration_pixels(calibration_samples, int(meta["img_size"]), n_calibration)
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_onnx(model, meta, Path(tmp) / "fp32.onnx", opset)
        return quantize_int8(fp32, out or int8_path(checkpoint), pixels, model_fingerprint(checkpoint))


def model_fingerprint(checkpoint: Path) -> str:
    """SHA-256 of what the int8 graph depends on: the weights and the meta that shapes predictions
    (not the metrics or notes, which `ship` adds after quantising)."""
    payload = torch.load(checkpoint, map_location="cpu", weights_only=True)
    digest = hashlib.sha256()
    for name, tensor in sorted(payload["state_dict"].items()):
        digest.update(name.encode())
        digest.update(tensor.numpy().tobytes())
    shaping = {k: payload["meta"].get(k) for k in ("arch", "classes", "img_size", "temperature", "merge_outputs")}
    digest.update(json.dumps(shaping, sort_keys=True).encode())
    return digest.hexdigest()


def int8_for_checkpoint(checkpoint: Path) -> Path:
    """The int8 graph made from exactly this checkpoint (matched by content hash, not by file times,
    which a git checkout does not keep), or FileNotFoundError saying how to make one."""
    path = int8_path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no int8 model; make one with `pneumoscope export --int8 "
                                f"--checkpoint {checkpoint} --calibration DATA`")
    made_from = read_onnx_meta(path).get("quantization", {}).get("source_sha256")
    if made_from != model_fingerprint(checkpoint):
        raise ValueError(f"{path} was made from another version of {checkpoint.name}; export it again")
    return path
