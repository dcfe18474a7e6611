"""How well the input guard tells chest X-rays from other pictures: the image checks
(colour, blank, tiny, odd shapes) and the learned feature-space check (`pneumoscope.fit_guard`), side by side.

The learned check is fitted, per graph kind of the bundle (fp32 and int8: their features differ),
on the TRAINING X-rays of the model's run manifest; its threshold flags at most --max-flagged
(1%) of that manifest's VALIDATION X-rays. The number of principal components and the method
(Mahalanobis distance vs energy score) are chosen on the `tune` half of the out-of-distribution
set (benchmarks/ood_set.py): the candidate that flags most of it, then the higher AUROC, then the
fewest components. Rates and AUROC are reported on its `report` half, on the manifest's internal
TEST split and on the external group (used for selection: it set the share of validation X-rays
allowed, docs/inputs.md). Prints markdown; --out also writes it, --stats-out writes the
chosen statistics, {"fp32": ..., "int8": ...} (the JSON for ModelMeta.guard). The bundle itself is
never written: `pneumoscope ship` fits the statistics of the model it ships.

    python benchmarks/ood_set.py --out /work/ood
    python benchmarks/guard_rates.py --ood /work/ood [--model BUNDLE]
        [--manifest ../exp_runs/manifest.csv] [--external ../shared/data/chest_xray_external]
        [--out guard.md] [--stats-out guard.json]
"""
from __future__ import annotations

import hashlib
import inspect
import json
import logging
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

import pneumoscope
from common import ROOT, add_external, add_model, median_ms, parser, read_ood_manifest, write_text

DIMS = (32, 64, 128, 192, 256, 384, 512)  # principal components tried on the tune half
METHODS = ("mahalanobis", "energy")  # the learned check's two scores (GuardConfig.method)
GRAPHS = {"fp32": "onnx", "int8": "int8"}  # graph kind -> the backend that runs it on ONNX Runtime
log = logging.getLogger("guard_rates")


# ------------------------------------------------------------------ network outputs
def with_guard(clf, guard: dict | None):
    """The same runtime and model with other guard statistics (None: the image checks alone)."""
    return pneumoscope.Classifier(clf.runtime, clf.meta.replace(guard=guard), clf.bundle)


def cache_key(classifiers: dict, paths: list[str]) -> str:
    """The model, the runtimes, the files (path, size, mtime) and the code that decodes, checks
    and scores them: a change to any of them computes the outputs again."""
    first = next(iter(classifiers.values()))
    key = hashlib.sha256(f"{first.bundle.fingerprint}/{','.join(c.backend for c in classifiers.values())}\n".encode())
    for code in (pneumoscope.read_xray, pneumoscope.Classifier, pneumoscope.guard_scores):
        key.update(Path(inspect.getsourcefile(code)).read_bytes())
    for path in paths:
        stat = Path(path).stat()
        key.update(f"{path},{stat.st_size},{stat.st_mtime_ns}\n".encode())
    return key.hexdigest()[:16]


def outputs(classifiers: dict, name: str, paths: list[str]) -> dict:
    """{"image": image-check flags, kind: {"logits", "features"}} of `paths`, each image decoded
    once and run on every runtime; cached on disk (`cache_key`)."""
    cache = pneumoscope.default_cache_dir() / "guard" / f"{name}-{cache_key(classifiers, paths)}.npz"
    if cache.exists():
        with np.load(cache) as stored:
            return {"image": stored["image"], **{kind: {"logits": stored[f"{kind}_logits"],
                                                        "features": stored[f"{kind}_features"]}
                                                 for kind in classifiers}}
    started = time.perf_counter()
    (first_kind, first), *others = classifiers.items()
    parts, image = {kind: [] for kind in classifiers}, []
    for decoded, scores in first.score_batches(paths, batch_size=64):
        parts[first_kind].append(scores)
        image += [r.reliable is False for r in first.records(scores)]  # no guard here: the image checks
        for kind, clf in others:
            parts[kind].append(clf.score_decoded(decoded))
    result = {"image": np.array(image, bool)}
    for kind, scores in parts.items():
        result[kind] = {"logits": np.concatenate([s.logits for s in scores]),
                        "features": np.concatenate([s.features for s in scores])}
    log.info("%s: %d images on %s in %.0f s", name, len(paths), ", ".join(classifiers), time.perf_counter() - started)
    with pneumoscope.atomic_write(cache) as handle:
        np.savez(handle, image=result["image"], **{f"{kind}_{what}": result[kind][what]
                                                   for kind in classifiers for what in ("logits", "features")})
    return result


# ------------------------------------------------------------------ measures
def auroc(ood: np.ndarray, xray: np.ndarray) -> float:
    return float(roc_auc_score(np.r_[np.ones(len(ood)), np.zeros(len(xray))], np.r_[ood, xray]))


def rate(flags) -> str:
    flags = np.asarray(flags, bool)
    return f"{flags.sum()}/{len(flags)} ({flags.mean():.1%})"


def all_scores(features: np.ndarray, logits: np.ndarray, stats: dict) -> dict[str, np.ndarray]:
    """Both methods' scores of the same statistics."""
    return {method: pneumoscope.guard_scores(features, {**stats, "method": method}, logits) for method in METHODS}


def choose(tune: dict, val: dict, train: dict, config) -> tuple[dict, list[str]]:
    """Fits every candidate on train, thresholds on val; picks the one that flags the most of the
    OOD tune half, then the higher tune AUROC (against validation X-rays), then the fewest components."""
    rows, best, best_key = [], None, None
    for dims in DIMS:
        stats = pneumoscope.fit_guard(train["features"], train["labels"], val["features"], val["logits"],
                                      replace(config, dims=dims))
        tune_scores = all_scores(tune["features"], tune["logits"], stats)
        val_scores = all_scores(val["features"], val["logits"], stats)
        for method in METHODS if dims == DIMS[0] else ("mahalanobis",):
            caught = float(np.mean(tune_scores[method] > stats["thresholds"][method]))
            area = auroc(tune_scores[method], val_scores[method])
            label = method + (f", {dims} components" if method == "mahalanobis" else "")
            rows.append(f"| {label} | {area:.4f} | {caught:.1%} |")
            key = (caught, round(area, 4), -dims)
            if best_key is None or key > best_key:
                best_key, best = key, {**stats, "method": method, "threshold": stats["thresholds"][method]}
    return best, rows


def timing(classifiers: dict, chosen: dict, features: np.ndarray, logits: np.ndarray) -> list[str]:
    """Median single-image latency of the network on each graph vs the guard's NumPy scoring."""
    size = classifiers["fp32"].img_size
    one = np.full((1, 1, size, size), 128 / 255, np.float32)  # a mid-gray image, as the runtimes take it
    parts = []
    for kind in GRAPHS:
        if kind in classifiers:
            run = classifiers[kind].runtime.run
            run(one)
            parts.append(f"ONNX {kind} {median_ms(lambda i, run=run: run(one), 50):.1f} ms")
    guard = with_guard(classifiers["fp32"], chosen).guard  # decoded once, as prediction holds it
    n = len(features)
    maha = median_ms(lambda i: pneumoscope.guard_scores(features[i % n:i % n + 1], replace(guard, method="mahalanobis")),
                     3000)
    energy = median_ms(lambda i: pneumoscope.guard_scores(features[i % n:i % n + 1], replace(guard, method="energy"),
                                                          logits[i % n:i % n + 1]), 3000)
    return parts + [f"Mahalanobis scoring {maha * 1000:.0f} us", f"energy {energy * 1000:.0f} us"]


# ------------------------------------------------------------------ main
def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    options = parser(__doc__)
    add_model(options)
    options.add_argument("--manifest", type=Path, default=ROOT.parent / "exp_runs/manifest.csv",
                         help="the run manifest the model was trained on (train/val/test splits)")
    add_external(options)
    options.add_argument("--ood", type=Path, default=pneumoscope.default_cache_dir() / "ood",
                         help="folder made by benchmarks/ood_set.py (default: %(default)s)")
    options.add_argument("--max-flagged", type=float, default=pneumoscope.GuardConfig.max_flagged,
                         help="share of validation X-rays allowed")
    options.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    options.add_argument("--stats-out", type=Path, default=None,
                         help="write the chosen statistics, {graph kind: stats} (the JSON for ModelMeta.guard)")
    args = options.parse_args()

    classifiers = runtimes(args.model)
    bundle, meta = classifiers["fp32"].bundle, classifiers["fp32"].meta
    sets = labelled_sets(args, meta)
    config = pneumoscope.GuardConfig(max_flagged=args.max_flagged)
    computed = {name: outputs(classifiers, name, group["paths"]) for name, group in sets.items()}
    lines, chosen = [f"Model `{meta.name}` ({bundle.path}, {meta.img_size} px). Each graph kind gets its own "
                     f"statistics, fitted on its own features of {len(sets['train']['paths'])} training X-rays, "
                     f"thresholds at <= {args.max_flagged:.1%} of {len(sets['val']['paths'])} validation "
                     "X-rays flagged."], {}
    for kind in GRAPHS:
        if kind not in classifiers:
            continue
        groups = with_outputs(sets, computed, kind)
        stats, candidate_rows = choose(groups["tune"], groups["val"], groups["train"], config)
        chosen[kind] = stats
        lines += report(kind, stats, groups, candidate_rows, classifiers[kind])
    torch_groups = with_outputs(sets, computed, "torch")
    torch_flags = {n: pneumoscope.guard_scores(torch_groups[n]["features"], chosen["fp32"], torch_groups[n]["logits"])
                   > chosen["fp32"]["threshold"] for n in ("report", "test", "external")}
    lines += ["", "PyTorch features with the fp32 statistics (the torch backend uses them): OOD report half "
              f"{rate(torch_flags['report'])}, test X-rays {rate(torch_flags['test'])}, external X-rays "
              f"{rate(torch_flags['external'])}."]
    costs = timing(classifiers, chosen, torch_groups["test"]["features"], torch_groups["test"]["logits"])
    lines += ["", "Cost per image (median of single-image calls, this 2-core CPU shared with other jobs): network "
              + ", ".join(costs[:-2]) + "; the guard beside it in NumPy: " + ", ".join(costs[-2:])
              + f". Statistics: {len(json.dumps(chosen)) / 1024:.0f} KiB of JSON for both graphs."]
    text = "\n".join(lines)
    print(text)
    if args.out:
        write_text(args.out, text + "\n")
    if args.stats_out:
        write_text(args.stats_out, json.dumps(chosen))


def runtimes(model: str | None) -> dict:
    """{graph kind or "torch": the Classifier running it, without its learned check}."""
    classifiers = {}
    for kind, backend in (*GRAPHS.items(), ("torch", "torch")):
        try:
            classifiers[kind] = with_guard(pneumoscope.Classifier.load(model, backend=backend), None)
        except (FileNotFoundError, ValueError) as err:
            if kind != "int8":
                raise
            log.info("no int8 graph measured (%s)", err)
    if classifiers["fp32"].meta.merge_outputs:
        raise SystemExit(f"{classifiers['fp32'].bundle.path}: a merged (binary) read of a network; give the 3-class "
                         "bundle it comes from")
    return classifiers


def labelled_sets(args, meta) -> dict[str, dict]:
    """The sets to score: train/val/test X-rays from the manifest (with labels), the external
    X-rays and the OOD set (with its rows)."""
    sets: dict[str, dict] = {}
    dataset = pneumoscope.read_dataset(args.manifest, task=meta.task)
    for split in ("train", "val", "test"):
        chosen = dataset.select(split)
        sets[split] = {"paths": [s.path for s in chosen],
                       "labels": pneumoscope.class_indices(chosen, meta.classes, meta.task)}
    sets["external"] = {"paths": sorted(s.path for s in pneumoscope.read_dataset(args.external).samples)}
    ood = read_ood_manifest(args.ood / "manifest.csv")
    sets["ood"] = {"paths": [r["path"] for r in ood], "rows": ood}
    return sets


def with_outputs(sets: dict, computed: dict, kind: str) -> dict[str, dict]:
    """The sets with image flags and `kind`'s logits and features (the OOD halves cut from the whole set)."""
    groups = {name: {**group, "image": computed[name]["image"], **computed[name][kind]} for name, group in sets.items()}
    for half in ("tune", "report"):
        keep = np.array([r["split"] == half for r in groups["ood"]["rows"]])
        groups[half] = {k: (v[keep] if isinstance(v, np.ndarray) else [x for x, m in zip(v, keep) if m])
                        for k, v in groups["ood"].items()}
    return groups


def report(kind: str, stats: dict, groups: dict, candidate_rows: list[str], clf) -> list[str]:
    method = stats["method"]
    scores = {name: all_scores(g["features"], g["logits"], stats) for name, g in groups.items()}
    flagged = {name: s[method] > stats["threshold"] for name, s in scores.items()}
    lines = ["", f"### {kind} graph", "",
             "Candidates (chosen on the OOD tune half; AUROC: tune half against validation X-rays):", "",
             "| candidate | AUROC | tune half flagged at the threshold |", "|---|---:|---:|", *candidate_rows, "",
             f"Chosen: **{method}**" + (f", {stats['dims']} components" if method == "mahalanobis" else "")
             + f", threshold {stats['threshold']:.2f}.", "",
             "AUROC, OOD report half against real X-rays (1 = perfect separation):", "",
             "| X-rays | Mahalanobis | energy |", "|---|---:|---:|"]
    for name in ("val", "test", "external"):
        lines.append(f"| {name} | " + " | ".join(f"{auroc(scores['report'][m], scores[name][m]):.4f}"
                                                  for m in METHODS) + " |")
    lines += ["", "Flag rates at the chosen threshold:", "",
              "| set | images | learned check | image checks | either (`reliable: false`) |", "|---|---:|---:|---:|---:|"]
    for name, what in (("report", "OOD report half (not X-rays)"), ("tune", "OOD tune half (not X-rays)"),
                       ("test", "internal test X-rays"), ("external", "external X-rays (used for selection)"),
                       ("val", "validation X-rays (threshold set here)"), ("train", "training X-rays (fitted on)")):
        image = groups[name]["image"]
        lines.append(f"| {what} | {len(image)} | {rate(flagged[name])} | {rate(image)} | {rate(flagged[name] | image)} |")
    lines += misses(groups, flagged)
    xray_flags = [(Path(path).name, s) for name in ("test", "external")
                  for path, f, s in zip(groups[name]["paths"], flagged[name], scores[name][method]) if f]
    lines += ["", f"Real X-rays flagged (test + external): {len(xray_flags)}: "
              + ", ".join(f"{name} ({s:.1f})" for name, s in xray_flags),
              "", f"Example warning: `{example_warning(clf, {kind: stats}, groups['report']['paths'][0])}`"]
    return lines


def example_warning(clf, guard: dict, path: str) -> str:
    """The warning the learned check adds to the record of `path` with these statistics."""
    plain = clf.scores([path]).warnings[0]
    added = [w for w in with_guard(clf, guard).scores([path]).warnings[0] if w not in plain]
    return added[0] if added else "(none)"


def misses(groups, flagged) -> list[str]:
    """OOD pictures that pass both checks, per family and per variant."""
    lines = ["", "OOD pictures that pass BOTH checks (`reliable: true`), per family:", "",
             "| family | tune missed | report missed | report pictures missed |", "|---|---:|---:|---|"]
    missed = {h: [r for r, f, i in zip(groups[h]["rows"], flagged[h], groups[h]["image"]) if not (f or i)]
              for h in ("tune", "report")}
    learned_only = {h: [r for r, f in zip(groups[h]["rows"], flagged[h]) if not f] for h in ("tune", "report")}
    for family in sorted({r["family"] for r in groups["ood"]["rows"]}):
        total = {h: sum(r["family"] == family for r in groups[h]["rows"]) for h in ("tune", "report")}
        lost = {h: [r for r in missed[h] if r["family"] == family] for h in ("tune", "report")}
        names = ", ".join(f"{r['source']} ({r['colour']}, {r['size']})" for r in lost["report"]) or "-"
        lines.append(f"| {family} | {len(lost['tune'])}/{total['tune']} | {len(lost['report'])}/{total['report']} "
                     f"| {names} |")
    by_variant = Counter((r["colour"], r["size"]) for r in missed["report"])
    lines += ["", "Report-half misses by variant: " + (", ".join(f"{c} {s}: {n}" for (c, s), n in
                                                            sorted(by_variant.items())) or "none") + ".",
              "Report-half pictures the learned check alone misses (the image checks catch them): "
              + (", ".join(f"{r['source']} ({r['colour']}, {r['size']})" for r in learned_only["report"]
                           if r not in missed["report"]) or "none") + "."]
    return lines


if __name__ == "__main__":
    main()
