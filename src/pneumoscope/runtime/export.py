"""ONNX graphs of a model: the fp32 export and the int8 (static QDQ) quantisation of it.

Both graphs are the whole `XrayNet` (normalisation included): input "pixels" (N x 1 x S x S in
[0, 1]), outputs "logits" (N x C) and "features" (N x F, the pooled penultimate features). Each
carries its ModelMeta (metadata_props "pneumoscope_meta") and the fingerprint of the weights and
meta it was made from ("pneumoscope_fingerprint"), which `artifact.Bundle.onnx_path` checks.
"""
from __future__ import annotations

import io
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path

import torch

from ..bundle import (
    FINGERPRINT_KEY,
    META_KEY,
    ONNX_FP32,
    WEIGHTS,
    Bundle,
    ModelMeta,
    file_sha256,
    fingerprint,
    graph_metadata,
    load_bundle,
    model_fingerprint,
    save_bundle,
)
from ..core.files import atomic_write
from ..data.images import input_step, read_xray, resize_square, to_batch
from ..nets.build import load_network
from ..nets.registry import LogitsAndFeatures
from .graphs import current_graph

log = logging.getLogger(__name__)
OPSET = 17
QUANTIZATION_KEY = "pneumoscope_quantization"


def onnx_bytes(model: torch.nn.Module, meta: ModelMeta, opset: int = OPSET, fingerprint: str | None = None) -> bytes:
    """The serialized graph of `model` with a dynamic batch axis, its meta and fingerprint embedded
    (`fingerprint`: the model's, when the caller has it: computing it serializes every weight)."""
    import onnx

    size = meta.img_size
    buffer = io.BytesIO()
    # in eval mode: after tracing, the exporter restores the wrapper's mode onto every submodule
    net = LogitsAndFeatures(model).eval()
    was_training = model.training
    with warnings.catch_warnings():
        # The TorchScript exporter (dynamo=False) is deprecated but needs no onnxscript and handles
        # every registered CNN; the dynamo exporter would add a dependency for no gain here.
        warnings.filterwarnings("ignore", message="You are using the legacy TorchScript-based ONNX export",
                                category=DeprecationWarning)
        warnings.filterwarnings("ignore", message="The feature will be removed", category=DeprecationWarning,
                                module=r"torch\.onnx\.")
        # the graph has the bundle's one image size (only the batch axis is dynamic): the feature map
        # sizes the exportable pools read (nets.registry.exportable_pools) are constants of it by design
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module=r"pneumoscope\.")
        try:
            torch.onnx.export(net, (torch.rand(1, 1, size, size),), buffer, dynamo=False,
                              opset_version=opset, input_names=["pixels"], output_names=["logits", "features"],
                              dynamic_axes={"pixels": {0: "batch"}, "logits": {0: "batch"}, "features": {0: "batch"}})
        except Exception as err:  # noqa: BLE001  the exporter's message carries the whole Torch IR graph
            raise ExportError(f"{meta.name}: {meta.arch} at {size} px does not export to ONNX "
                              f"({type(err).__name__}: {_first_line(err)})") from None
        finally:
            model.train(was_training)
    proto = onnx.load_from_string(buffer.getvalue())
    set_metadata(proto, {META_KEY: json.dumps(meta.to_json()),
                         FINGERPRINT_KEY: fingerprint or model_fingerprint(model, meta)})
    return proto.SerializeToString()


class ExportError(ValueError):
    """A network the ONNX exporter refuses; one line (the exporter's own message holds its graph)."""


def _first_line(err: Exception, limit: int = 200) -> str:
    line = (str(err).strip().splitlines() or [""])[0]
    return line if len(line) <= limit else line[:limit] + "..."


def export_onnx(model: torch.nn.Module, meta: ModelMeta, out: str | os.PathLike, opset: int = OPSET,
                fingerprint: str | None = None) -> Path:
    """Writes `model`'s graph to `out`, atomically."""
    with atomic_write(out) as handle:
        handle.write(onnx_bytes(model, meta, opset, fingerprint))
    return Path(out)


def graph_path(bundle: Bundle, kind: str = "fp32") -> Path:
    """A graph of `kind` made from exactly `bundle`'s weights and meta (`graphs.current_graph`). A
    missing or stale fp32 graph is exported into the cache (so the same content is exported once,
    and a shipped bundle is never written); a missing or stale int8 graph is a one-line error."""
    return current_graph(bundle, kind) or export_missing(bundle)


def export_missing(bundle: Bundle) -> Path:
    """The fp32 graph of a bundle that has no current one, exported into the cache."""
    cached = bundle.cached_graph("fp32")
    log.info("%s is missing or stale; exporting %s", bundle.graph_location("fp32"), cached)
    return export_onnx(load_network(bundle), bundle.meta, cached)


def save_with_graph(model: torch.nn.Module, meta: ModelMeta, out: str | os.PathLike) -> Path:
    """A bundle directory with its fp32 graph: weights.pt and meta.json (`bundle.save_bundle`), then
    model.onnx made from them, each written atomically."""
    out = save_bundle(model, meta, out)
    # the fingerprint of the file just written: serializing a large network again costs seconds
    export_onnx(model, meta, out / ONNX_FP32, fingerprint=fingerprint(file_sha256(out / WEIGHTS), meta))
    return out


def export_bundle(checkpoint: str | os.PathLike, out: str | os.PathLike | None = None,
                      opset: int = OPSET) -> Path:
    """Exports a bundle; by default to its own graph file (`model.onnx` in the bundle) when the
    bundle is the user's own, else into the
    cache (`Bundle.export_location`); prediction finds it in either place."""
    bundle = load_bundle(checkpoint)
    return export_onnx(load_network(bundle), bundle.meta, out or bundle.export_location("fp32"), opset)


def set_metadata(proto, props: dict[str, str]) -> None:
    """Sets metadata_props keys on an ONNX ModelProto, replacing earlier values of those keys."""
    kept = [(p.key, p.value) for p in proto.metadata_props if p.key not in props]
    del proto.metadata_props[:]
    for key, value in [*kept, *props.items()]:
        proto.metadata_props.add(key=key, value=value)


# ---------------------------------------------------------------- int8 (static, QDQ)
class _PixelBatches:
    """onnxruntime.quantization's CalibrationDataReader over N x S x S uint8 pixels."""

    def __init__(self, pixels, batch_size: int = 16):
        self.feeds = iter([{"pixels": to_batch(pixels[i:i + batch_size])} for i in range(0, len(pixels), batch_size)])

    def get_next(self):
        return next(self.feeds, None)


def calibration_pixels(samples, size: int, n: int = 256, seed: int = 0, preprocess: str | None = None):
    """`n` images drawn (seeded) from the samples' train split, or from all of them when there is
    none, decoded at the model's input size and through its input step: N x size x size uint8."""
    import numpy as np


    pool = [s for s in samples if s.split == "train"] or list(samples)
    chosen = np.random.default_rng(seed).choice(len(pool), size=min(n, len(pool)), replace=False)
    return input_step(np.stack([resize_square(read_xray(pool[i].path), size) for i in sorted(chosen)]), preprocess)


def quantize_int8(fp32_onnx: str | os.PathLike, out: str | os.PathLike, pixels) -> Path:
    """Static int8 quantisation (ONNX Runtime, QDQ, per-channel weights, uint8 activations) of a
    pneumoscope fp32 graph, calibrated on real X-rays (N x S x S uint8, e.g. a few hundred training
    images). On CPUs with VNNI (AVX512-VNNI / AVX-VNNI) ONNX Runtime runs it with integer kernels.
    The fp32 graph's meta and fingerprint travel along: the int8 graph belongs to the same weights."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    props = graph_metadata(fp32_onnx)
    with tempfile.TemporaryDirectory() as tmp:
        prepared, quantized = Path(tmp) / "prepared.onnx", Path(tmp) / "int8.onnx"
        quant_pre_process(str(fp32_onnx), str(prepared))  # folds BN, infers shapes: what quantize expects
        quantize_static(str(prepared), str(quantized), _PixelBatches(pixels),
                        quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
        proto = onnx.load(str(quantized))
    quantization = {"type": "int8 static QDQ, per-channel weights, MinMax calibration",
                    "calibration_images": int(len(pixels))}
    del proto.metadata_props[:]
    set_metadata(proto, {**props, QUANTIZATION_KEY: json.dumps(quantization)})
    with atomic_write(out) as handle:
        handle.write(proto.SerializeToString())
    return Path(out)


def export_int8(checkpoint: str | os.PathLike, calibration_samples, n_calibration: int = 256,
                out: str | os.PathLike | None = None, opset: int = OPSET) -> Path:
    """Bundle -> int8 graph, calibrated on `n_calibration` of the samples (see
    calibration_pixels); by default the bundle's own `model.int8.onnx` (the cache's for a bundle that
    is not the user's own: `Bundle.export_location`), where backend "int8" looks."""
    bundle = load_bundle(checkpoint)
    pixels = calibration_pixels(calibration_samples, bundle.meta.img_size, n_calibration,
                                preprocess=bundle.meta.preprocess)
    out = out or bundle.export_location("int8")
    if opset == OPSET:  # the bundle's own fp32 graph (fingerprint-checked; exported only if missing or stale)
        return quantize_int8(graph_path(bundle, "fp32"), out, pixels)
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_onnx(load_network(bundle), bundle.meta, Path(tmp) / "fp32.onnx", opset)
        return quantize_int8(fp32, out, pixels)
