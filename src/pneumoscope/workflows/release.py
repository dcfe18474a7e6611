"""Shipping a trained run as the repo's default model, and generating its model card.

`ship_run` writes a run's model as the bundle models/<task>/ (its training facts added to the
provenance), measures it on the run's own validation and internal test splits into
docs/model-card/<task>/ and the bundle's metrics.json, and `write_model_card` renders those into
docs/model-card.md through the template templates/model_card.md: the prose is the template's, every
figure about a model comes from those files.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from jinja2 import Environment, PackageLoader, StrictUndefined

from .. import INTENDED_USE
from ..bundle import METRICS, ONNX_INT8, load_bundle, write_meta, write_metrics
from ..core.files import atomic_write
from ..core.labels import THREE
from ..data.datasets import class_indices, load_pixels, read_dataset
from ..data.images import CLAHE_CLIP_LIMIT, CLAHE_TILES, read_xray
from ..evaluation.metrics import ECE_BINS, headline
from ..evaluation.plots import mistakes_png
from ..evaluation.report import evaluate_samples
from ..nets.build import build_model, load_network
from ..runs.rundir import RunDir, data_facts, describe_data, recorded_data, summarize
from ..runtime.backends import openvino_can_run, openvino_precision
from ..runtime.classifier import Classifier
from ..runtime.export import export_int8, save_with_graph
from ..runtime.guard import GuardConfig, fit_guard
from ..training.fit import calibration_temperature, validation_pixels

BINARY_GROUPS = ((0,), (1, 2))  # NORMAL | BACTERIA + VIRUS, indices into labels.THREE


def training_facts(run_dir: str | Path) -> dict:
    """What the card says about training, from the run's summary: epochs, time, memory, the
    time-to-accuracy curve."""
    summary = summarize(run_dir)
    return {"run": Path(run_dir).name, "epochs_run": summary["epochs"], "wall_seconds": summary["wall_seconds"],
            "train_seconds": summary["train_seconds"], "peak_memory_mb": summary["peak_memory_mb"],
            "cpu_count": summary["cpu_count"], "curve": summary["curve"]}


def shipped_name(meta) -> str:
    """The shipped models' names, `pneumoscope-<arch>-<task>` (`pneumoscope-ensemble<N>-<task>`): a
    user's own models are named after their runs (rundir.model_name)."""
    arch = f"ensemble{len(meta.members)}" if meta.members else meta.arch
    return f"pneumoscope-{arch}-{meta.task}"


EXTERNAL = "external"  # metrics.json key of the external group; the card labels it "used for selection"


def ship_run(run_dir: str | Path, models_dir: str | Path = "models", docs_dir: str | Path = "docs",
             binary_from_three: bool = False, int8_calibration: int = 0,
             external: str | Path | None = None) -> list[Path]:
    """Writes the run's model as the bundle models/<task>/ and evaluates it for the card. With
    binary_from_three, also ships the 3-class model read as NORMAL vs PNEUMONIA (models/binary/).
    With int8_calibration > 0, also writes each bundle's int8 ONNX graph (`--backend int8`),
    calibrated on that many images of the run's train split, and measures it on val and internal
    test too. Returns the bundle directories."""
    run, models_dir, docs_dir = RunDir(run_dir), Path(models_dir), Path(docs_dir)
    model_path = run.model_path()
    if model_path is None:
        raise FileNotFoundError(f"{run.path}: no model yet; is the run finished?")
    bundle = load_bundle(model_path)
    model = load_network(bundle)
    samples = run.samples()
    provenance = bundle.meta.provenance
    data = provenance.get("data") or data_facts(samples, provenance.get("train_config", {}).get("data"))
    meta = bundle.meta.replace(name=shipped_name(bundle.meta),
                               provenance={**provenance, "training": training_facts(run.path), "data": data})
    shipped = [_ship(model, meta, samples, models_dir, docs_dir, int8_calibration)]
    if binary_from_three:
        if meta.task != "three":
            raise ValueError(f"binary_from_three needs a run of task three, not {meta.task}")
        shipped.append(_ship_binary(model, meta, samples, models_dir, docs_dir, int8_calibration))
    if external:
        measure_external(external, models_dir, docs_dir)
    return shipped


def measure_external(external: str | Path, models_dir: str | Path = "models", docs_dir: str | Path = "docs"
                     ) -> list[Path]:
    """Evaluates every shipped bundle on an external group (a labelled dataset folder from another
    acquisition batch, never trained on and never used to fit a parameter) into
    docs/model-card/<task>/external/ and adds its headline to the bundle's metrics.json. These
    figures guide choices, so the card labels them "used for selection"."""

    models_dir, docs_dir = Path(models_dir), Path(docs_dir)
    measured = []
    for task in ("three", "binary"):
        target = models_dir / task
        if not (target / "meta.json").is_file():
            continue
        classifier = Classifier.load(target, backend="onnx")
        samples = read_dataset(external, task).samples
        report = evaluate_samples(classifier, samples, docs_dir / "model-card" / task / EXTERNAL, plots=True)
        bundle = load_bundle(target)
        metrics = {**bundle.metrics(), EXTERNAL: headline(report)}
        for runtime in extra_runtimes(target, bundle.meta):  # the card shows them beside fp32 on every group
            if isinstance(metrics.get(runtime), dict):
                report = evaluate_samples(Classifier.load(target, backend=runtime), samples,
                                          docs_dir / "model-card" / task / runtime / EXTERNAL, plots=False)
                metrics[runtime] = {**metrics[runtime], EXTERNAL: headline(report)}
        write_metrics(target, metrics)
        measured.append(target)
    if not measured:
        raise FileNotFoundError(f"{models_dir}: no shipped bundle to measure")
    return measured


def _ship(model, meta, samples, models_dir: Path, docs_dir: Path, int8_calibration: int = 0) -> Path:
    """One bundle, written once, then measured: metrics.json beside it, reports in the docs."""

    target = models_dir / meta.task
    for stale in (ONNX_INT8, METRICS):  # made from, or measured on, the model this replaces
        (target / stale).unlink(missing_ok=True)
    save_with_graph(model, meta.replace(guard=None), target)
    reports = docs_dir / "model-card" / meta.task
    if int8_calibration:
        export_int8(target, samples, int8_calibration, out=target / ONNX_INT8)  # ship writes models/, no one else
    fit_bundle_guard(target, samples)
    classifier = Classifier.load(target, backend="onnx")  # the fp32 reference every other runtime is read against
    metrics = {**_measure(classifier, samples, reports, plots=True), "backend": classifier.backend}
    write_metrics(target, {**metrics, **measure_runtimes(target, samples, reports)})
    return target


def measure_runtimes(target: Path, samples, reports: Path) -> dict:
    """Val and internal test figures of the other runtimes (extra_runtimes) on the bundle, for the
    card's rows beside fp32."""

    measured = {runtime: _measure(Classifier.load(target, backend=runtime), samples, reports / runtime, plots=False)
                for runtime in extra_runtimes(target, load_bundle(target).meta)}
    if "openvino" in measured:
        measured["openvino_precision"] = openvino_precision()
    return measured


# Principal components per graph, as benchmarks/guard_rates.py chose them on the tune half of the
# out-of-distribution set for the shipped Lite0 (docs/inputs.md). It re-chooses them for a new model
# and measures the flag rates (`--stats-out` writes its choice); ship's own fit is the starting point.
GUARD_DIMS = {"fp32": 192, "int8": 384}


def fit_bundle_guard(target: Path, samples) -> dict:
    """Fits the input guard of each graph the bundle has (fp32, and int8 when written) on the
    features of the run's TRAINING X-rays, thresholded on its VALIDATION X-rays (guard.fit_guard),
    and writes it into meta.json. The guard is not part of the fingerprint, so the graphs stay
    current. A merged read (binary from a 3-class network) has that network's features: its class
    means are those of the network's own classes."""

    meta = load_bundle(target).meta
    classes, task = (THREE, "three") if meta.merge_outputs else (meta.classes, meta.task)
    splits = {}  # decoded once, scored on each graph
    for split in ("train", "val"):
        pixels, kept, _ = load_pixels([s for s in samples if s.split == split], meta.img_size)
        splits[split] = pixels, class_indices(kept, classes, task)
    guard = {}
    for graph, backend in (("fp32", "onnx"), ("int8", "int8")):
        if graph == "int8" and not (target / ONNX_INT8).is_file():
            continue
        classifier = Classifier.load(target, backend=backend)
        train, val = (classifier.score_pixels(splits[split][0]) for split in ("train", "val"))
        guard[graph] = fit_guard(train.features, splits["train"][1], val.features, val.logits,
                                 GuardConfig(dims=GUARD_DIMS[graph]))
    write_meta(target, meta.replace(guard=guard))
    return guard


def extra_runtimes(target: Path, meta) -> list[str]:
    """The runtimes measured beside fp32 ONNX Runtime for the card's rows (its template says what each is): the
    int8 graph when the bundle has one, and OpenVINO (the default backend where it is installed and
    can run the graph; bf16 on CPUs with native bf16)."""
    import importlib.util


    runtimes = ["int8"] if (target / ONNX_INT8).is_file() else []
    return runtimes + (["openvino"] if importlib.util.find_spec("openvino") and openvino_can_run(meta) else [])


def _measure(classifier, samples, out_dir: Path, plots: bool) -> dict:
    """Headline metrics on the val and internal test splits; reports in out_dir/{val,test}."""
    metrics = {}
    for split, name in (("val", "val"), ("test", "internal_test")):
        chosen = [s for s in samples if s.split == split]
        if chosen:  # the card shows test's figures
            report = evaluate_samples(classifier, chosen, out_dir / split, plots=plots and split == "test")
            metrics[name] = headline(report)
            if plots and split == "test":
                draw_mistakes(out_dir / split)
    return metrics


def _ship_binary(model, meta, samples, models_dir: Path, docs_dir: Path, int8_calibration: int = 0) -> Path:
    """The 3-class network read through a merge of its outputs (NORMAL | BACTERIA + VIRUS), with
    its own temperature fitted on the validation images of that merged output, the way the 3-class
    run fitted its own (`provenance.calibration`; runs from before it was recorded fitted on `val`)."""

    calibration = meta.provenance.get("calibration", "val")
    binary = meta.replace(task="binary", classes=("NORMAL", "PNEUMONIA"), merge_outputs=BINARY_GROUPS,
                          temperature=1.0, name=meta.name.replace("-three", "-binary"),
                          provenance={**meta.provenance, "derived_from": meta.name, "source_classes": list(THREE),
                                      "calibration": calibration})
    model = build_model(binary, model.state_dict())  # the same weights behind a merge of the outputs
    temperature = calibration_temperature(Classifier.from_model(model, binary, backend="torch"),
                                          *validation_pixels(samples, binary), calibration)
    return _ship(model, binary.replace(temperature=temperature), samples, models_dir, docs_dir, int8_calibration)


# ---------------------------------------------------------------- the card
CARD_TEMPLATE = "model_card.md"  # in pneumoscope/templates/ (package data)
MISTAKES_SHOWN = 8  # the card's table of most confident mistakes and ship's mistakes.png show as many


def write_model_card(models_dir: str | Path = "models", docs_dir: str | Path = "docs",
                     out: str | Path | None = None) -> Path:
    """docs/model-card.md (or `out`) from the shipped bundles (meta.json, metrics.json) and their
    reports under docs_dir/model-card/, rendered through templates/model_card.md. Writes `out` only:
    the reports are read, never written."""
    docs_dir = Path(docs_dir)
    out = Path(out) if out else docs_dir / "model-card.md"
    text = card_template().render(card_context(models_dir, docs_dir, out.parent))
    with atomic_write(out, "w") as handle:
        handle.write(text)
    return out


def card_template():
    """The card's Jinja2 template: Jinja rather than string.Template because the card's sentences
    and tables depend on what a bundle holds (an ensemble, a merged read, a guard, an external
    group, extra runtimes), and those choices belong beside their prose (huggingface_hub renders
    its model cards the same way). Jinja2 comes with torch. StrictUndefined: a field the context
    lacks is an error, never a blank. Markdown, so nothing is HTML-escaped."""
    env = Environment(loader=PackageLoader("pneumoscope", "templates"), undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True, autoescape=False)
    env.filters.update(f3="{:.3f}".format, signed="{:+.3f}".format, thousands="{:,}".format,
                       percent="{:.0%}".format, ci=lambda pair: "{:.3f}-{:.3f}".format(*pair))
    return env.get_template(CARD_TEMPLATE)


def card_context(models_dir: str | Path, docs_dir: str | Path, card_dir: str | Path) -> dict:
    """Everything the card prints, read from the shipped bundles and their reports; links are
    relative to card_dir, the folder the card is written to. The page-wide figures (external group
    size, validation share, patients holding two labels, input sizes) list each value the bundles
    hold once."""
    models_dir, docs_dir = Path(models_dir), Path(docs_dir)
    models = [_model_context(load_bundle(models_dir / task), docs_dir / "model-card" / task, Path(card_dir))
              for task in ("three", "binary") if (models_dir / task).is_dir()]
    return {"intended_use": INTENDED_USE, "models": models, "ece_bins": ECE_BINS,
            "clahe": {"clip_limit": CLAHE_CLIP_LIMIT, "tiles": CLAHE_TILES},
            "external_images": _each(m["metrics"][EXTERNAL]["n"] for m in models if EXTERNAL in m["metrics"]),
            "val_shares": _each(m["val_share"] for m in models if m["val_share"] is not None),
            "patients_across_labels": _patients_across_labels(models),
            "input_sizes": _each(m["meta"].img_size for m in models)}


def _each(values) -> list:
    """Each value once, in order of appearance."""
    return list(dict.fromkeys(values))


def _patients_across_labels(models: list[dict]) -> list | None:
    """The bundles' recorded patients whose images hold more than one label (rundir.data_facts), each
    count once; None when no bundle recorded them (bundles shipped before ship counted them)."""
    recorded = [m["facts"]["patients_across_labels"] for m in models
                if "patients_across_labels" in (m["facts"] or {})]
    return _each(c for counts in recorded for c in counts) if recorded else None


def _model_context(bundle, reports: Path, card_dir: Path) -> dict:
    """One model's section: its meta, metrics and provenance, the table rows (each group, then each
    group on the extra runtimes), and its internal test report when ship wrote one."""
    meta, metrics = bundle.meta, bundle.metrics()
    training = meta.provenance.get("training", {})
    facts = recorded_data(meta, metrics)
    rows = [(name, None, m) for name, m in metrics.items() if isinstance(m, dict) and "accuracy" in m]
    rows += [(name, runtime, m) for runtime in ("int8", "openvino") if runtime in metrics
             for name, m in metrics[runtime].items()]
    splits = (facts or {}).get("splits", {})
    return {"meta": meta, "metrics": metrics, "training": training, "config": meta.provenance.get("train_config", {}),
            "members": meta.provenance.get("members", []),
            # "env": the models shipped before bundles keep the whole env.json there
            "cpu_count": training.get("cpu_count") or training.get("env", {}).get("cpu_count", "?"),
            "facts": facts, "data": describe_data(facts), "rows": rows,
            "val_share": splits["val"]["images"] / facts["images"] if "val" in splits else None,
            **_test_report(reports / "test", card_dir)}


def _test_report(test: Path, card_dir: Path) -> dict:
    """The internal test report ship wrote (metrics.json, predictions.csv, figures): its confusion
    matrix, most confident mistakes and the figures' links from the card."""
    if not (test / "metrics.json").is_file():
        return {"test": None}
    report = json.loads((test / "metrics.json").read_text())
    figures = {name: _link(test / f"{name}.png", card_dir) for name in ("confusion_matrix", "roc", "reliability")}
    figures["mistakes"] = _link(test / "mistakes.png", card_dir) if (test / "mistakes.png").is_file() else None
    mistakes = [{"file": Path(path).name, "true": true, "predicted": predicted, "probability": p}
                for path, true, predicted, p in confident_mistakes(test)]
    return {"test": {"classes": report["classes"], "rows": list(zip(report["classes"], report["confusion_matrix"]))},
            "figures": figures, "mistakes": mistakes}


def _link(path: Path, card_dir: Path) -> str:
    """A Markdown link to `path` from a card in card_dir."""
    return Path(os.path.relpath(path, card_dir)).as_posix()


def confident_mistakes(report_dir: Path, n: int = MISTAKES_SHOWN) -> list[tuple[str, str, str, float]]:
    """A report's wrong answers, most confident first: (path, true, predicted, its probability)."""
    with open(report_dir / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    wrong = [(r["path"], r["true"], r["predicted"], float(r[f"p_{r['predicted']}"]))
             for r in rows if r["true"] != r["predicted"]]
    wrong.sort(key=lambda w: -w[3])
    return wrong[:n]


def draw_mistakes(report_dir: Path) -> None:
    """mistakes.png beside a report: the X-rays of its most confident mistakes (ship draws it, so
    that the card only reads the reports)."""
    wrong = confident_mistakes(report_dir)
    if wrong:
        mistakes_png([read_xray(p) for p, *_ in wrong], [f"{pr} {prob:.2f}\n[{t}]" for _, t, pr, prob in wrong],
                     report_dir / "mistakes.png")
