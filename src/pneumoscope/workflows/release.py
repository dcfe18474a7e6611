"""Shipping a trained run as the repo's default model, and generating its model card.

`ship_run` writes a run's model as the bundle models/<task>/ (its training facts added to the
provenance), measures it on the run's own validation and internal test splits into
docs/model-card/<task>/ and the bundle's metrics.json, and `write_model_card` turns those into
docs/model-card.md. Nothing in the card is typed by hand: every figure comes from those files.
"""
from __future__ import annotations

import csv
from pathlib import Path

from ..bundle import METRICS, ONNX_INT8, load_bundle, write_meta, write_metrics
from ..core.files import atomic_write
from ..core.labels import THREE
from ..data.datasets import class_indices, load_pixels, read_dataset
from ..data.images import read_xray
from ..evaluation.metrics import headline
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
RUNTIME_NOTES = {
    "openvino": "rows marked openvino: OpenVINO on the same fp32 graph, the default backend (`auto`) where "
                "OpenVINO is installed, float layers in {precision} on the CPU measured (bf16 where the CPU has "
                "AMX or AVX512-BF16)",
    "int8": "rows marked int8: the quantized graph (`--backend int8`, on request)",
}


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


EXTERNAL = "external"  # metrics.json key of the external group; every figure on it is "used for selection"
EXTERNAL_LABEL = "external (used for selection)"


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
            raise ValueError("binary_from_three needs a 3-class run")
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
# out-of-distribution set for the shipped Lite0 (docs/inputs.md). Its `--install` re-chooses them
# for a new model and measures the flag rates; ship's own fit is the starting point.
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
    """The runtimes measured beside fp32 ONNX Runtime for the card (the keys of RUNTIME_NOTES): the
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
def write_model_card(models_dir: str | Path = "models", docs_dir: str | Path = "docs") -> Path:
    """docs/model-card.md from the shipped bundles (meta.json, metrics.json) and their reports."""
    models_dir, docs_dir = Path(models_dir), Path(docs_dir)
    sections = [_CARD_HEAD]
    for task in ("three", "binary"):
        if (models_dir / task).is_dir():
            bundle = load_bundle(models_dir / task)
            sections.append(_task_section(bundle.meta, bundle.metrics(), docs_dir / "model-card" / task, docs_dir))
    sections.append(_CARD_TAIL)
    out = docs_dir / "model-card.md"
    with atomic_write(out, "w") as handle:
        handle.write("\n".join(sections))
    return out


def _runtime_line(metrics: dict) -> str:
    notes = [note.format(precision=metrics.get("openvino_precision", "?"))
             for runtime, note in RUNTIME_NOTES.items() if runtime in metrics]
    return (f"- Figures below measured with ONNX Runtime fp32 (`--backend {metrics.get('backend', 'onnx')}`), the "
            "reference" + ("; " + "; ".join(notes) if notes else "") + ". Speeds: benchmarks.md, \"Runtimes\".")


def _architecture(meta) -> str:
    return f"ensemble of {' + '.join(f'`{a}`' for a in meta.members)}" if meta.members else f"`{meta.arch}`"


def _training_line(meta, training: dict, config: dict, cpu_count) -> str:
    if meta.members:
        return _ensemble_line(meta, training, cpu_count)
    return (f"- Training: {training.get('epochs_run', '?')} epochs, {training.get('train_seconds', '?')} s in training "
            f"epochs ({training.get('wall_seconds') or '?'} s wall in all) on "
            f"{cpu_count} CPU cores (peak memory "
            f"{training.get('peak_memory_mb', '?')} MB); {_recipe(config)}, batch {config.get('batch_size')}, "
            f"augmentation {config.get('aug_policy', 'standard')} at strength {config.get('aug')}, EMA decay "
            f"{config.get('ema_decay')} from epoch {config.get('ema_start_epoch', 0)}, {_frozen(config)}, "
            f"at most {config.get('epochs')} epochs (early stopping patience {config.get('patience')}), "
            f"seed {meta.provenance.get('seed')}.")


def _ensemble_line(meta, training: dict, cpu_count) -> str:
    """An ensemble's members, each with its recipe, and what the whole cost to build."""
    members = meta.provenance.get("members", [])
    described = "; ".join(
        f"`{m['arch']}` seed {m.get('seed')} ({m['training'].get('epochs_run', '?')} epochs, "
        f"{m['training'].get('wall_seconds') or '?'} s wall, {_recipe(m.get('train_config', {}))}, augmentation "
        f"{m.get('train_config', {}).get('aug_policy', 'standard')}, {_frozen(m.get('train_config', {}))})"
        for m in members)
    return (f"- Training: an ensemble of {len(members)} networks averaged in logit space, one graph, one "
            f"temperature {_calibration(meta)}: {described}. "
            f"{training.get('wall_seconds') or '?'} s wall in all on {cpu_count} CPU cores, members' training included.")


def _commit(provenance: dict) -> str:
    """The code that trained it: a run from an exported source tree (no .git) has no commit to name."""
    commit = provenance.get("git_commit")
    return f"git commit `{commit}`" if commit else "git commit unknown (trained from a source tree without .git)"


def _calibration(meta) -> str:
    """Where the temperature came from (train.calibration_temperature; bundles before it: plain validation)."""
    if meta.provenance.get("calibration") == "augmented":
        return "fitted on the validation images seen twice through the strong augmentation"
    return "fitted on the validation images"


def _input_step(meta) -> str:
    return {"clahe": " through CLAHE (clip 2, 8x8 tiles)"}.get(meta.preprocess, "")


def _recipe(config: dict) -> str:
    """Optimiser, schedule and loss in the card's words (runs before these options: AdamW, one-cycle, CE)."""
    loss = (f"focal loss (gamma {config.get('focal_gamma')})" if config.get("loss") == "focal"
            else f"cross-entropy with label smoothing {config.get('label_smoothing')}")
    mixup = f", mixup alpha {config['mixup']}" if config.get("mixup") else ""
    return (f"{config.get('optimizer', 'adamw')} lr {config.get('lr')} with a {config.get('schedule', 'onecycle')} "
            f"schedule, {loss}{mixup}")


def _frozen(config: dict) -> str:
    """What the training kept frozen, in the card's words."""
    freeze = config.get("freeze")
    if freeze in ("none", "0"):
        return "nothing frozen"
    return "all but the classifier frozen" if freeze == "base" else f"stem and first {freeze} stages frozen"


def _task_section(meta, metrics: dict, reports: Path, docs_dir: Path) -> str:
    import json

    rel = lambda p: p.relative_to(docs_dir).as_posix()  # noqa: E731
    provenance = meta.provenance
    config = provenance.get("train_config", {})
    training = provenance.get("training", {})
    # "env": the models shipped before bundles keep the whole env.json there
    cpu_count = training.get("cpu_count") or training.get("env", {}).get("cpu_count", "?")
    runtimes = {k: metrics[k] for k in ("int8", "openvino") if k in metrics}  # the card's row order
    groups = {k: v for k, v in metrics.items() if isinstance(v, dict) and "accuracy" in v}
    lines = [f"## `{meta.name}` ({meta.task}: {' / '.join(meta.classes)})", ""]
    lines += [
        f"- Architecture: {_architecture(meta)}, {meta.params:,} parameters, input {meta.img_size}x{meta.img_size} "
        f"gray{_input_step(meta)}, normalisation mean {meta.mean} std {meta.std}.",
        _training_line(meta, training, config, cpu_count),
        f"- Data: {_data_line(meta, metrics)}; manifest hash `{provenance.get('manifest_hash')}`, "
        f"{_commit(provenance)}; "
        f"temperature {meta.temperature:.3f}, {_calibration(meta)}."
        + (" Derived from the 3-class model by summing BACTERIA and VIRUS probabilities." if meta.merge_outputs
           else ""),
        _guard_line(meta.guard),
        _runtime_line(metrics),
        "",
        "| split | n | accuracy (95% CI) | balanced acc. | macro F1 | macro AUC | ECE before -> after | "
        + " | ".join(f"recall {c}" for c in meta.classes) + " |",
        "|---|---|---|---|---|---|---|" + "---|" * len(meta.classes),
    ]
    rows = [(EXTERNAL_LABEL if k == EXTERNAL else k, m) for k, m in groups.items()]
    rows += [(f"{EXTERNAL_LABEL if k == EXTERNAL else k} ({runtime})", m)
             for runtime, measured in runtimes.items() for k, m in measured.items()]
    for name, m in rows:
        lo, hi = m["accuracy_ci95"]
        lines.append(f"| {name} | {m['n']} | {m['accuracy']:.3f} ({lo:.3f}-{hi:.3f}) | {m['balanced_accuracy']:.3f} | "
                     f"{m['macro_f1']:.3f} | {m['macro_auc']:.3f} | {m['ece_uncalibrated']:.3f} -> {m['ece']:.3f} | "
                     + " | ".join(f"{m['recall'][c]:.3f}" for c in meta.classes) + " |")
    if EXTERNAL in groups and "internal_test" in groups:
        lines += ["", _gap_table(groups["internal_test"], groups[EXTERNAL], meta.classes)]
    test = reports / "test"
    if (test / "metrics.json").exists():
        report = json.loads((test / "metrics.json").read_text())
        lines += ["", "Internal test confusion matrix (rows true, columns predicted):", "",
                  "| | " + " | ".join(report["classes"]) + " |", "|---|" + "---|" * len(report["classes"])]
        for c, row in zip(report["classes"], report["confusion_matrix"]):
            lines.append(f"| **{c}** | " + " | ".join(str(v) for v in row) + " |")
        mistakes = _confident_mistakes(test)
        lines += ["", f"![confusion matrix]({rel(test / 'confusion_matrix.png')}) "
                      f"![ROC]({rel(test / 'roc.png')}) ![reliability]({rel(test / 'reliability.png')})", ""]
        if mistakes:
            lines += ["Most confident mistakes on the internal test split:", "",
                      "| file | true | predicted | probability |", "|---|---|---|---|"]
            lines += [f"| {Path(p).name} | {t} | {pr} | {prob:.3f} |" for p, t, pr, prob in mistakes]
            if (test / "mistakes.png").exists():
                lines += ["", f"![most confident mistakes]({rel(test / 'mistakes.png')})"]
    if training.get("curve"):
        lines += ["", "Time to accuracy (validation, after each epoch):", "",
                  "| epoch | training seconds | val accuracy | val balanced accuracy |", "|---|---|---|---|"]
        lines += [f"| {c['epoch']} | {c['train_seconds']} | {c['val_acc']:.3f} | {c['val_bacc']:.3f} |"
                  for c in training["curve"]]
    return "\n".join(lines) + "\n"


def _data_line(meta, metrics: dict) -> str:
    """The model's own data (rundir.recorded_data: its provenance, or for a bundle shipped before
    provenance held them, what its guard was fitted on and its metrics measured)."""
    described = describe_data(recorded_data(meta, metrics))
    return f"trained and measured on {described}, cut by patient" if described else "split sizes not recorded"


def _guard_line(guard: dict | None) -> str:
    """What the input guard is, from the statistics the bundle carries (rates: docs/inputs.md)."""
    if not guard:
        return "- Input guard: image checks only (no feature statistics in this bundle)."
    parts = [f"{graph}: {g['method']} on {g['dims']} PCA dims of the {g['features']} pooled features, threshold "
             f"{g['threshold']:.2f} (<= {g['max_flagged']:.1%} of validation X-rays above it)" for graph, g in guard.items()]
    return ("- Input guard: image checks plus a learned check in the network's feature space, fitted on the training "
            "X-rays (" + "; ".join(parts) + "). Measured flag rates on pictures that are not chest X-rays and on "
            "real X-rays, and its blind spots: [inputs.md](inputs.md).")


def _gap_table(internal: dict, external: dict, classes) -> str:
    """Internal test vs external, per class, with bootstrap 95% intervals: the gap a new site opens."""
    def cell(m, c):
        ci = (m.get("recall_ci95") or {}).get(c)
        return f"{m['recall'][c]:.3f}" + (f" ({ci[0]:.3f}-{ci[1]:.3f})" if ci else "")

    lines = [f"Internal test vs {EXTERNAL_LABEL}: the gap a second acquisition batch opens (recall per class, "
             "bootstrap 95% interval). Expect figures near the external column, or below it, at a new site.", "",
             "| | internal test | external (used for selection) | gap |", "|---|---|---|---|"]
    for c in classes:
        lines.append(f"| recall {c} | {cell(internal, c)} | {cell(external, c)} | "
                     f"{external['recall'][c] - internal['recall'][c]:+.3f} |")
    lo, hi = internal["accuracy_ci95"]
    elo, ehi = external["accuracy_ci95"]
    lines.append(f"| accuracy | {internal['accuracy']:.3f} ({lo:.3f}-{hi:.3f}) | {external['accuracy']:.3f} "
                 f"({elo:.3f}-{ehi:.3f}) | {external['accuracy'] - internal['accuracy']:+.3f} |")
    lines.append(f"| ECE (15 bins) | {internal['ece']:.3f} | {external['ece']:.3f} | "
                 f"{external['ece'] - internal['ece']:+.3f} |")
    return "\n".join(lines)


def _confident_mistakes(report_dir: Path, n: int = 8) -> list[tuple[str, str, str, float]]:
    with open(report_dir / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    wrong = [(r["path"], r["true"], r["predicted"], float(r[f"p_{r['predicted']}"]))
             for r in rows if r["true"] != r["predicted"]]
    wrong.sort(key=lambda w: -w[3])
    if wrong:
        mistakes_png([read_xray(p) for p, *_ in wrong[:n]], [f"{pr} {prob:.2f}\n[{t}]" for _, t, pr, prob in wrong[:n]],
                     report_dir / "mistakes.png")
    return wrong[:n]


_CARD_HEAD = """# Model card: pneumoscope shipped models

*Generated by `pneumoscope card` from `models/*.json` and the evaluation reports under
`docs/model-card/`; do not edit by hand.* Written in the spirit of Model Cards for Model Reporting
(Mitchell et al. 2019) and the CLAIM checklist.

## Intended use
- Research and teaching: comparing CNNs on pediatric chest radiographs; a fast second reader in
  tooling that shows a clinician its probabilities and heat map.
- **Not a diagnosis** and not a medical device. Every output must be read by a qualified person.
- Out of scope: adults; views other than frontal (AP/PA) chest films; CT, photographs or scans of
  films; triage without a human; deciding antibiotic treatment from the BACTERIA/VIRUS call.

## Data
- Kermany DS, Zhang K, Goldbaum M, *Labeled Optical Coherence Tomography (OCT) and Chest X-Ray
  Images for Classification*, Mendeley Data v2, doi:10.17632/rscbjbr9sj.2 (CC BY 4.0); Kermany et al.,
  Cell 2018. Pediatric (1-5 years) anterior-posterior films from one hospital (Guangzhou Women and
  Children's Medical Center).
- This copy: 224x224 8-bit gray, squashed to a square from landscape originals (aspect ratio lost).
- Labels: NORMAL from the folder; BACTERIA vs VIRUS from the file name only. The viral/bacterial
  distinction is noisy in the source data; 808 `personN` ids hold both a bacterial and a viral file.
- Split: the public train + val groups cut **by patient** (scikit-learn StratifiedGroupKFold,
  stratified by class, seeded) into train / val / internal test; each model's "Data" line below
  gives its own images per split, from its provenance.
  The official test group (624 images) is cut in two by patient: one half (312) is the **external
  group**, a second acquisition batch used for choices (recipe, which model ships) and reported as
  "used for selection" (optimistic by construction: never trained on, no parameter fitted on it);
  the other half is withheld from the developers and checks the shipped models independently.
- The recipe (image size, augmentation, EMA, the 5% validation share, how the temperature is
  fitted) was chosen on the external group; the checkpoint (best validation balanced accuracy) and
  the temperature are fitted on the validation split; the internal test split is reported once per
  shipped model and chose nothing.
- Each model below is one training seed. Other seeds of the same recipe move both groups' figures by
  several points, and the seed best on the external group was the worst on its internal test split
  ([benchmarks.md, seeds](benchmarks.md#seeds-of-the-shipped-recipe-and-resuming-session-8-2026-11-30)):
  read one seed's figures as one draw of the recipe.

## Calibration
Temperature scaling (NLL, LBFGS) fitted on the validation split: by default on its images seen twice
through the strong training augmentation, a simulated change of acquisition that lowered the ECE on
the external group for every model measured (each model's line says which). ECE uses 15 equal-width bins;
the reliability diagrams show before (T = 1) and after, on the internal test split. Printed
probabilities are the calibrated ones.
"""

_CARD_TAIL = """
## Limitations
- One hospital, one age group, one image pipeline: accuracy on other sites will be lower, and is
  expected to drop most for NORMAL vs VIRUS, which differ subtly.
- 224x224 squashed inputs: fine detail and true proportions are gone.
- Viral vs bacterial labels come from file names and are noisy; the 3-class accuracy is bounded by
  that noise.
- The heat map (Grad-CAM) shows where the network's evidence lies, not where disease is.
"""
