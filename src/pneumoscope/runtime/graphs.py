"""Where a bundle's current ONNX graphs are: the bundle's own graph when its fingerprint matches,
else the cache's (keyed by fingerprint). Light to import (no torch, no onnx): prediction looks a
graph up here, and only a missing one sends it to `export.graph_path`, which makes it."""
from __future__ import annotations

from pathlib import Path

from ..bundle import Bundle, BundleError, graph_fingerprint


def current_graph(bundle: Bundle, kind: str = "fp32") -> Path | None:
    """The graph of `kind` made from exactly `bundle`'s weights and meta: the bundle's own, else the
    cache's (`Bundle.cached_graph`). None when an fp32 graph must be made (`export.export_missing`);
    a missing or stale int8 graph is a one-line BundleError."""
    for path in (bundle.graph_location(kind), bundle.cached_graph(kind)):
        if path.is_file() and graph_fingerprint(path) == bundle.fingerprint:
            return path
    if kind == "int8":
        raise _missing_int8(bundle)
    return None


def _missing_int8(bundle: Bundle) -> BundleError:
    """An int8 graph is never made behind the user's back (it needs calibration images): the error."""
    path = bundle.graph_location("int8")
    why = "was made from other weights or meta" if path.is_file() else "does not exist"
    return BundleError(f"{path}: {why}; make it with `pneumoscope export --int8 --model {bundle.path} "
                       "--calibration DATA`")
