"""Inference runtimes side by side on this CPU, in one process, interleaved (not a unit test).

Runtimes on the same bundle graphs, each the `Classifier.load(model, backend=...)` a user gets: ONNX
Runtime fp32 (`onnx`, the reference) and int8 (QDQ, `int8`), OpenVINO on the fp32 graph (`openvino`, at
the CPU's precision: bf16 where it has AMX / AVX512-BF16, else f32; what `auto` runs) and on the int8
graph (`openvino-int8`), PyTorch eager (--torch). Per runtime:
- model only: single-image latency p50/p95 (one 1 x 1 x S x S batch), folder images/s at batch 32
  (batches side by side on the runtime's one-stream siblings, one per worker, as `predict_many` runs them);
- end to end: file -> calibrated probabilities latency p50/p95 (`Classifier.predict`) and folder
  images/s through `predict_many` (decode, resize, guard warnings included);
- accuracy on the internal test split (--manifest, split test) and on chest_xray_external (used
  for selection), with bootstrap 95% CI, and label agreement with ONNX Runtime fp32.
Timing rounds alternate between runtimes so a change of machine load hits all alike; the CPU model,
its AVX512-VNNI / AMX / AVX512-BF16 flags and the load average are printed with the figures.

    python benchmarks/bench_inference.py [--model BUNDLE] [--images DIR] [--rounds 5] [--n 40] [--folder-n 256]
                                         [--torch] [--manifest M.csv] [--no-accuracy] [--out FILE]
"""
from __future__ import annotations

import itertools
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

import pneumoscope
from common import ROOT, add_external, add_model, image_files, latencies_ms, machine, parser, rate, write_text

BACKENDS = ("onnx", "int8", "openvino", "openvino-int8")  # `auto` is one of them: which one is marked


def runtimes(model: str | None, with_torch: bool) -> dict:
    """{label: Classifier} for every runtime this machine and bundle can run; the others are
    said and left out (a bundle without an int8 graph, a merged read OpenVINO cannot compute)."""
    import onnxruntime  # lazy: --help without loading the runtimes
    import openvino

    versions = {"onnx": f"ONNX Runtime {onnxruntime.__version__}", "openvino": f"OpenVINO {openvino.__version__}"}
    auto = pneumoscope.Classifier.load(model).backend  # what the default backend runs here
    out = {}
    for backend in BACKENDS + (("torch",) if with_torch else ()):
        try:
            classifier = pneumoscope.Classifier.load(model, backend=backend)
        except (FileNotFoundError, ValueError) as err:  # no int8 graph, OpenVINO cannot run this bundle
            print(f"# {backend}: not measured ({err})")
            continue
        out[label(classifier, versions, auto)] = classifier
    return out


def label(classifier, versions: dict, auto: str) -> str:
    backend, runtime = classifier.backend, classifier.runtime
    if backend == "torch":
        import torch  # lazy: PyTorch only with --torch

        return f"PyTorch {torch.__version__} eager (`torch`)"
    marks = f"`{backend}`" + (", `auto`" if backend == auto else "") + (", the reference" if backend == "onnx" else "")
    graph = runtime.graph_kind
    if backend.startswith("openvino"):
        precision = f", {runtime.precision}" if graph == "fp32" else ""
        return f"{versions['openvino']} {graph} graph{precision} ({marks})"
    return f"{versions['onnx']} {graph}{' QDQ' if graph == 'int8' else ''} ({marks})"


def network_batch(classifier, files: list[str]) -> np.ndarray:
    """32 decoded images as the runtime takes them: N x 1 x S x S float32 in [0, 1]."""
    pixels = [classifier.decode(f).pixels for f in itertools.islice(itertools.cycle(files), 32)]
    return np.stack(pixels)[:, None].astype(np.float32) / 255


def model_only(runtime, batch: np.ndarray, n: int, batches: int, workers: int) -> tuple[list[float], float]:
    """Single-image latencies (ms) on the runtime itself, then folder images/s on its one-stream
    siblings, `workers` batches at a time."""
    one = batch[:1]
    times = latencies_ms(lambda i: runtime.run(one), n)
    sibling = runtime.single_thread() if hasattr(runtime, "single_thread") else runtime
    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(sibling.run, itertools.repeat(batch, batches)))
    return times, rate(batches * len(batch), time.perf_counter() - start)


def end_to_end(classifier, files: list[str], folder: list[str], n: int) -> tuple[list[float], float]:
    paths = list(itertools.islice(itertools.cycle(files), n))
    records = []
    times = latencies_ms(lambda i: records.append(classifier.predict(paths[i])), n)
    failed = [r for r in records if r.status != "ok"]
    assert not failed, failed[0].error
    start = time.perf_counter()
    count = sum(1 for _ in classifier.predict_many(folder, batch_size=32))
    return times, rate(count, time.perf_counter() - start)


def labelled_sets(manifest: Path, external: Path, task: str) -> dict[str, list]:
    """{name: samples}: the manifest's internal test split and the external group, where present."""
    sets = {}
    if manifest.is_file():
        sets["internal test"] = pneumoscope.read_dataset(manifest, task=task).select("test")
    if external.is_dir():
        sets["external (used for selection)"] = pneumoscope.read_dataset(external, task=task).samples
    return sets


def accuracy_table(classifiers: dict, sets: dict) -> list[str]:
    lines = ["| runtime | set | n | accuracy [95% CI] | label agreement with fp32 ONNX |", "|---|---|---:|---|---:|"]
    for set_name, samples in sets.items():
        reference = None
        for name, classifier in classifiers.items():
            scores = classifier.scores([s.path for s in samples])
            truth = pneumoscope.class_indices(samples, classifier.classes, classifier.meta.task)[scores.ok]
            probabilities = scores.probabilities[scores.ok]
            metrics = pneumoscope.compute_metrics(truth, probabilities, classifier.classes)
            predicted = probabilities.argmax(1)
            reference = predicted if reference is None else reference
            low, high = metrics["accuracy_ci95"]
            lines.append(f"| {name} | {set_name} | {metrics['n']} | {metrics['accuracy']:.3f} [{low:.3f}, {high:.3f}] | "
                         f"{(predicted == reference).mean() * 100:.1f}% |")
    return lines


def main() -> None:
    options = parser(__doc__)
    add_model(options)
    options.add_argument("--images", default=str(ROOT / "tests" / "fixtures" / "chest_xray"))
    options.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    options.add_argument("--n", type=int, default=40, help="single-image runs per runtime per round")
    options.add_argument("--folder-n", type=int, default=256, help="images per folder run (batches of 32)")
    options.add_argument("--manifest", type=Path, default=ROOT.parent / "exp_runs" / "manifest.csv",
                         help="the model's run manifest (its internal test split)")
    add_external(options)
    options.add_argument("--torch", action="store_true", help="also PyTorch eager")
    options.add_argument("--no-accuracy", action="store_true")
    options.add_argument("--out", default=None, help="also write the markdown here")
    args = options.parse_args()

    files = [str(p) for p in image_files(args.images)]
    folder = list(itertools.islice(itertools.cycle(files), args.folder_n))
    classifiers = runtimes(args.model, args.torch)
    first = next(iter(classifiers.values()))
    size, workers = first.img_size, first.workers
    batch = network_batch(first, files)
    assert batch.shape == (32, 1, size, size)
    out = [f"# {machine('start')}", ""]
    for classifier in classifiers.values():  # warm-up: first calls compile kernels and open siblings
        model_only(classifier.runtime, batch, 3, 2, workers)
        end_to_end(classifier, files, folder[:64], 3)
    results = {name: ([], [], [], []) for name in classifiers}
    for _ in range(args.rounds):
        for name, classifier in classifiers.items():
            lat, folder_rate = model_only(classifier.runtime, batch, args.n, args.folder_n // 32, workers)
            e2e_lat, e2e_rate = end_to_end(classifier, files, folder, args.n)
            results[name][0].extend(lat), results[name][1].append(folder_rate)
            results[name][2].extend(e2e_lat), results[name][3].append(e2e_rate)
    out += [f"# {machine('end of timing')}; {args.rounds} interleaved rounds; {workers} workers; model "
            f"`{first.name}`, {size} px; latency over {args.rounds * args.n} runs; images/s = median over rounds "
            f"of {args.folder_n} images in batches of 32", "",
            "| runtime | model p50 (ms) | model p95 (ms) | model folder (images/s) | end-to-end p50 (ms) "
            "| end-to-end p95 (ms) | end-to-end folder (images/s) | folder end-to-end / model |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, (lat, folder_rate, e2e_lat, e2e_rate) in results.items():
        out.append(f"| {name} | {np.percentile(lat, 50):.1f} | {np.percentile(lat, 95):.1f} | {np.median(folder_rate):.0f} "
                   f"| {np.percentile(e2e_lat, 50):.1f} | {np.percentile(e2e_lat, 95):.1f} | {np.median(e2e_rate):.0f} "
                   f"| {np.median(e2e_rate) / np.median(folder_rate):.2f} |")
    print("\n".join(out), flush=True)
    if not args.no_accuracy:
        acc = accuracy_table(classifiers, labelled_sets(args.manifest, args.external, first.meta.task))
        out += ["", *acc]
        print("\n".join(["", *acc]))
    if args.out:
        write_text(args.out, "\n".join(out) + "\n")


if __name__ == "__main__":
    main()
