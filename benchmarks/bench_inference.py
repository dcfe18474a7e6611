"""Inference runtimes side by side on this CPU, in one process, interleaved (not a unit test).

Runtimes on the same bundle graphs: ONNX Runtime fp32 (the reference) and int8 (QDQ), OpenVINO fp32
graph (at the CPU's precision: bf16 where it has AMX / AVX512-BF16, else f32; what `auto` runs; and forced f32) and
int8 graph, PyTorch eager (--torch). Per runtime:
- model only: single-image latency p50/p95 (one 1 x 1 x S x S batch), folder images/s at batch 32
  (batches side by side on the runtime's one-stream siblings, as `predict_many` runs them);
- end to end: file -> calibrated probabilities latency p50/p95 (`Classifier.predict`) and folder
  images/s through `predict_many` (decode, resize, guard warnings included);
- accuracy on the internal test split (--manifest, split test) and on chest_xray_external (used
  for selection), with bootstrap 95% CI, and label agreement with ONNX Runtime fp32.
Timing rounds alternate between runtimes so a change of machine load hits all alike; the CPU model,
its AVX512-VNNI / AMX / AVX512-BF16 flags and the load average are printed with the figures.

    python benchmarks/bench_inference.py [--images DIR] [--rounds 5] [--n 40] [--folder-n 256] [--torch]
                                         [--no-accuracy] [--out FILE]
"""
from __future__ import annotations

import argparse
import csv
import itertools
import time
from pathlib import Path

import numpy as np

from pneumoscope.bundle.store import load_bundle, resolve_model
from pneumoscope.runtime.backends import (OnnxBackend, OpenVinoBackend, TorchBackend, describe_machine, openvino_can_run,
                                  openvino_precision, side_by_side, to_batch)
from pneumoscope.evaluation.metrics import bootstrap_ci
from pneumoscope.runtime.classifier import Classifier, expand_inputs

ROOT = Path(__file__).resolve().parents[1]
EXTERNAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "chest_xray_external"  # beside the repo


def runtimes(bundle, with_torch: bool) -> dict:
    import onnxruntime
    import openvino

    ort, ov = f"ONNX Runtime {onnxruntime.__version__}", f"OpenVINO {openvino.__version__}"
    out = {f"{ort} fp32 (`onnx`, the reference)": OnnxBackend(bundle.onnx_path("fp32"))}
    has_int8 = bundle.graph_location("int8").is_file()
    if has_int8:
        out[f"{ort} int8 QDQ (`int8`)"] = OnnxBackend(bundle.onnx_path("int8"), name="int8")
    auto = ", `auto`" if openvino_can_run(bundle.meta) else ""  # what the default backend runs
    out[f"{ov} fp32 graph, {openvino_precision()} (`openvino`{auto})"] = OpenVinoBackend(bundle.onnx_path("fp32"))
    if openvino_precision() != "f32":
        out[f"{ov} fp32 graph, f32"] = OpenVinoBackend(bundle.onnx_path("fp32"), precision="f32")
    if has_int8:
        out[f"{ov} int8 graph (`openvino-int8`)"] = OpenVinoBackend(bundle.onnx_path("int8"), name="openvino-int8")
    if with_torch:
        import torch

        out[f"PyTorch {torch.__version__} eager (`torch`)"] = TorchBackend(bundle.load_model())
    return out


def model_only(runtime, batch: np.ndarray, n: int, batches: int, workers: int) -> tuple[list[float], float]:
    """Single-image latencies (ms) on the runtime itself, then folder images/s on its siblings."""
    one = batch[:1]
    times = []
    for _ in range(n):
        start = time.perf_counter()
        runtime.run(one)
        times.append((time.perf_counter() - start) * 1000)
    sibling = runtime.single_thread() if hasattr(runtime, "single_thread") else runtime
    start = time.perf_counter()
    for _ in side_by_side(sibling.run, itertools.repeat(batch, batches), workers):
        pass
    return times, batches * len(batch) / (time.perf_counter() - start)


def end_to_end(classifier: Classifier, files: list[str], folder: list[str], n: int) -> tuple[list[float], float]:
    times = []
    for path in itertools.islice(itertools.cycle(files), n):
        start = time.perf_counter()
        record = classifier.predict(path)
        times.append((time.perf_counter() - start) * 1000)
        assert record.status == "ok", record.error
    start = time.perf_counter()
    count = sum(1 for _ in classifier.predict_many(folder, batch_size=32))
    return times, count / (time.perf_counter() - start)


def labelled_sets(manifest: Path) -> dict[str, tuple[list[str], list[str]]]:
    sets = {}
    if manifest.is_file():
        with manifest.open() as f:
            rows = [r for r in csv.DictReader(f) if r["split"] == "test"]
        sets["internal test"] = ([str((ROOT / r["path"]).resolve()) for r in rows], [r["label"] for r in rows])
    if (EXTERNAL / "MANIFEST.csv").is_file():
        with (EXTERNAL / "MANIFEST.csv").open() as f:
            rows = list(csv.DictReader(f))
        sets["external (used for selection)"] = ([str(EXTERNAL / r["folder"] / r["filename"]) for r in rows],
                                                 [r["label3"] for r in rows])
    return sets


def accuracy_table(classifiers: dict[str, Classifier], sets: dict) -> list[str]:
    lines = ["| runtime | set | n | accuracy [95% CI] | label agreement with fp32 ONNX |", "|---|---|---:|---|---:|"]
    for set_name, (paths, labels) in sets.items():
        reference = None
        for name, classifier in classifiers.items():
            scores = classifier.scores(paths)
            predicted = scores.probabilities.argmax(1)
            truth = np.array([classifier.classes.index(label) for label in labels])
            correct = (predicted == truth)[scores.ok] if hasattr(scores, "ok") else predicted == truth
            reference = predicted if reference is None else reference
            low, high = bootstrap_ci(correct)
            lines.append(f"| {name} | {set_name} | {len(correct)} | {correct.mean():.3f} [{low:.3f}, {high:.3f}] | "
                         f"{(predicted == reference).mean() * 100:.1f}% |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="a model bundle (default: the shipped 3-class model)")
    parser.add_argument("--images", default=str(ROOT / "tests" / "fixtures" / "chest_xray"))
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--n", type=int, default=40, help="single-image runs per runtime per round")
    parser.add_argument("--folder-n", type=int, default=256, help="images per folder run (batches of 32)")
    parser.add_argument("--manifest", default="/work/exp_runs/manifest.csv")
    parser.add_argument("--torch", action="store_true", help="also PyTorch eager")
    parser.add_argument("--no-accuracy", action="store_true")
    parser.add_argument("--out", default=None, help="also write the markdown here")
    args = parser.parse_args()

    bundle = load_bundle(args.checkpoint or resolve_model("three"))
    files = [str(p) for p in expand_inputs([args.images])]
    folder = list(itertools.islice(itertools.cycle(files), args.folder_n))
    classifiers = {name: Classifier(rt, bundle.meta, bundle) for name, rt in runtimes(bundle, args.torch).items()}
    size = bundle.meta.img_size
    first = next(iter(classifiers.values()))
    batch = to_batch(np.stack([first.decode(f).pixels for f in itertools.islice(itertools.cycle(files), 32)]))
    assert batch.shape == (32, 1, size, size)
    workers = first.workers
    out = [f"# {describe_machine()} (start)", ""]
    for classifier in classifiers.values():  # warm-up: first calls compile kernels and open siblings
        model_only(classifier.runtime, batch, 3, 2, workers)
        end_to_end(classifier, files, folder[:64], 3)
    results = {name: ([], [], [], []) for name in classifiers}
    for _ in range(args.rounds):
        for name, classifier in classifiers.items():
            lat, rate = model_only(classifier.runtime, batch, args.n, args.folder_n // 32, workers)
            e2e_lat, e2e_rate = end_to_end(classifier, files, folder, args.n)
            results[name][0].extend(lat), results[name][1].append(rate)
            results[name][2].extend(e2e_lat), results[name][3].append(e2e_rate)
    out += [f"# {describe_machine()} (end of timing); {args.rounds} interleaved rounds; {workers} workers; model "
            f"`{first.name}`, {size} px; latency over {args.rounds * args.n} runs; images/s = median over rounds "
            f"of {args.folder_n} images in batches of 32", "",
            "| runtime | model p50 (ms) | model p95 (ms) | model folder (images/s) | end-to-end p50 (ms) "
            "| end-to-end p95 (ms) | end-to-end folder (images/s) | folder end-to-end / model |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, (lat, rate, e2e_lat, e2e_rate) in results.items():
        out.append(f"| {name} | {np.percentile(lat, 50):.1f} | {np.percentile(lat, 95):.1f} | {np.median(rate):.0f} "
                   f"| {np.percentile(e2e_lat, 50):.1f} | {np.percentile(e2e_lat, 95):.1f} | {np.median(e2e_rate):.0f} "
                   f"| {np.median(e2e_rate) / np.median(rate):.2f} |")
    print("\n".join(out), flush=True)
    if not args.no_accuracy:
        acc = accuracy_table(classifiers, labelled_sets(Path(args.manifest)))
        out += ["", *acc]
        print("\n".join(["", *acc]))
    if args.out:
        Path(args.out).write_text("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
