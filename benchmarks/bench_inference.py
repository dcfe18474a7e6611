"""Inference speed on this CPU, ONNX Runtime vs PyTorch eager, in one run (not a unit test).

Per backend: single-image latency file -> probabilities (decode, squash, model, softmax) p50/p95,
folder throughput (images/s through `predict_many`), and the achieved GFLOP/s given the model's
GFLOPs per image (counted with torch.utils.flop_counter; for int8, the same operations per second).
The int8 row appears when the bundle has its int8 graph. Prints a markdown table; --out writes it.

    python benchmarks/bench_inference.py [--checkpoint PATH] [--images DIR] [--n 200] [--folder-n 512]
"""
from __future__ import annotations

import argparse
import itertools
import os
import platform
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from torch.utils.flop_counter import FlopCounterMode

from pneumoscope.artifact import load_bundle, resolve_model
from pneumoscope.predict import Classifier, expand_inputs

ROOT = Path(__file__).resolve().parents[1]


def gflops_per_image(classifier: Classifier) -> float:
    """Forward FLOPs of one image (a multiply-add counts 2), from PyTorch's own flop counter."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        classifier.model(torch.zeros(1, 1, classifier.img_size, classifier.img_size))
    return counter.get_total_flops() / 1e9


def latency_ms(classifier: Classifier, paths: list[str], n: int) -> np.ndarray:
    times = []
    for path in itertools.islice(itertools.cycle(paths), n):
        start = time.perf_counter()
        record = classifier.predict(path)
        times.append((time.perf_counter() - start) * 1000)
        assert record.status == "ok", record.error
    return np.array(times)


def throughput(classifier: Classifier, paths: list[str], batch_size: int) -> float:
    start = time.perf_counter()
    count = sum(1 for _ in classifier.predict_many(paths, batch_size=batch_size))
    return count / (time.perf_counter() - start)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="a model bundle (default: the shipped 3-class model)")
    parser.add_argument("--images", default=str(ROOT / "tests" / "fixtures" / "chest_xray"),
                        help="folder of X-rays (repeated as needed)")
    parser.add_argument("--n", type=int, default=200, help="single-image predictions per backend")
    parser.add_argument("--folder-n", type=int, default=512, help="images in the throughput run")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", default=None, help="also write the markdown table here")
    args = parser.parse_args()

    files = list(expand_inputs([args.images]))
    folder = list(itertools.islice(itertools.cycle(files), args.folder_n))
    rows, gflops = [], None
    names = {"int8": f"ONNX Runtime {onnxruntime.__version__} int8", "onnx": f"ONNX Runtime {onnxruntime.__version__}",
             "torch": f"PyTorch {torch.__version__} eager"}
    bundle = load_bundle(args.checkpoint or resolve_model("three"))
    backends = (["int8"] if bundle.graph_location("int8").is_file() else []) + ["onnx", "torch"]
    for backend in backends:
        classifier = Classifier.load(bundle, backend=backend)
        gflops = gflops or gflops_per_image(classifier)
        latency_ms(classifier, files, 5)  # warm-up: first calls allocate and pick kernels
        times = latency_ms(classifier, files, args.n)
        started = time.perf_counter()  # the first folder call also opens predict_many's one-thread session
        throughput(classifier, folder[:3 * args.batch_size], args.batch_size)
        warm_up = time.perf_counter() - started
        rate = throughput(classifier, folder, args.batch_size)
        rows.append(f"| {names[backend]} | {np.percentile(times, 50):.1f} | {np.percentile(times, 95):.1f} | {rate:.1f} "
                    f"| {gflops * rate:.1f} | {warm_up:.2f} |")
    lines = [f"model `{classifier.name}` ({classifier.meta.arch}, {classifier.img_size} px, "
             f"{gflops:.2f} GFLOPs/image); {cpu_name()}, {len(os.sched_getaffinity(0))} cores, "
             f"{torch.get_num_threads()} threads; latency over {args.n} single files, throughput over "
             f"{len(folder)} files in batches of {args.batch_size}", "",
             "| backend | latency p50 (ms) | latency p95 (ms) | throughput (images/s) | achieved GFLOP/s "
             f"| first folder call, {3 * args.batch_size} files (s) |",
             "|---|---:|---:|---:|---:|---:|", *rows]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
