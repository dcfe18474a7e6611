"""The shipped model bundles, one directory per task (three/, binary/): weights.pt, meta.json,
model.onnx, model.int8.onnx, metrics.json (see pneumoscope.artifact). Installed, this folder is the
package `pneumoscope_models`; it holds no code."""
