"""How well the input guard tells chest X-rays from other pictures: the image checks
(predict.image_warnings) and the learned feature-space check (pneumoscope.guard), side by side.

The learned check is fitted, per graph kind of the bundle (fp32 and int8: their features differ),
on the TRAINING X-rays of the model's run manifest; its threshold flags at most --max-flagged
(1%) of that manifest's VALIDATION X-rays. The number of principal components and the method
(Mahalanobis distance vs energy score) are chosen on the `tune` half of the out-of-distribution
set (benchmarks/ood_set.py): the candidate that flags most of it, then the higher AUROC, then the
fewest components. Rates and AUROC are reported on its `report` half, on the manifest's internal
TEST split and on the external group (used for selection: it set the share of validation X-rays
allowed, docs/inputs.md). Prints markdown; --out also writes it, --stats-out writes the
chosen statistics, {"fp32": ..., "int8": ...} (the JSON for ModelMeta.guard).

    python benchmarks/ood_set.py --out /work/ood
    python benchmarks/guard_rates.py --ood /work/ood [--model models/three]
        [--manifest ../exp_runs/manifest.csv] [--external ../shared/data/chest_xray_external]
        [--out guard.md] [--stats-out guard.json]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from pneumoscope.bundle.store import load_bundle, resolve_model, write_meta
from pneumoscope.runtime.backends import OnnxBackend, to_batch
from pneumoscope.data.datasets import atomic_write, class_indices, default_cache_dir, read_dataset, read_manifest
from pneumoscope.runtime.guard import GuardConfig, all_scores, fit_guard, guard_scores, guard_warnings, load_guard
from pneumoscope.runtime.classifier import NOT_XRAY, Classifier, Decoded

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ood_set import read_ood_manifest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DIMS = (32, 64, 128, 192, 256, 384, 512)  # principal components tried on the tune half
log = logging.getLogger("guard_rates")


# ------------------------------------------------------------------ network outputs
def cached_outputs(clf: Classifier, runtime, name: str, decoded: list[Decoded]) -> tuple[np.ndarray, np.ndarray]:
    """(logits, features) of decoded images on `runtime`, cached by bundle fingerprint, backend
    and the list of names."""
    key = hashlib.sha256(f"{clf.bundle.fingerprint}/{runtime.name}\n".encode())
    key.update("\n".join(d.name for d in decoded).encode())
    cache = default_cache_dir() / "guard" / f"{name}-{key.hexdigest()[:16]}.npz"
    if cache.exists():
        with np.load(cache) as stored:
            return stored["logits"], stored["features"]
    started = time.perf_counter()
    scores = [clf.score_decoded(decoded[i:i + 64], runtime) for i in range(0, len(decoded), 64)]
    logits, features = np.concatenate([s.logits for s in scores]), np.concatenate([s.features for s in scores])
    log.info("%s on %s: %d images in %.0f s", name, runtime.name, len(decoded), time.perf_counter() - started)
    with atomic_write(cache) as handle:
        np.savez(handle, logits=logits, features=features)
    return logits, features


def decode_cached(clf: Classifier, name: str, paths: list[str]) -> list[Decoded]:
    """clf.decode of every path, cached on disk by the files (path, size, mtime), the input size
    and the source of the decoder and the image checks (a change to either decodes again)."""
    import pneumoscope.data.images
    import pneumoscope.runtime.classifier

    key = hashlib.sha256(f"{clf.img_size}\n".encode())
    for module in (pneumoscope.data.images, pneumoscope.runtime.classifier):
        key.update(Path(module.__file__).read_bytes())
    for path in paths:
        stat = Path(path).stat()
        key.update(f"{path},{stat.st_size},{stat.st_mtime_ns}\n".encode())
    cache = default_cache_dir() / "guard" / f"decoded-{name}-{key.hexdigest()[:16]}.npz"
    if cache.exists():
        with np.load(cache) as stored:
            pixels, ok = iter(stored["pixels"]), stored["ok"]
            return [Decoded(p, next(pixels) if good else None, warnings, error or None)
                    for p, good, warnings, error in zip(paths, ok, json.loads(str(stored["warnings"])),
                                                        stored["errors"])]
    decoded = [clf.decode(path) for path in paths]
    ok = np.array([d.pixels is not None for d in decoded])
    pixels = np.stack([d.pixels for d in decoded if d.pixels is not None])
    with atomic_write(cache) as handle:
        np.savez(handle, pixels=pixels, ok=ok, warnings=json.dumps([d.warnings for d in decoded]),
                 errors=np.array([d.error or "" for d in decoded]))
    return decoded


def image_flags(decoded: list[Decoded]) -> np.ndarray:
    """Whether the image checks alone mark each input unreliable."""
    return np.array([any(w.startswith(NOT_XRAY) for w in d.warnings) for d in decoded])


# ------------------------------------------------------------------ measures
def auroc(ood: np.ndarray, xray: np.ndarray) -> float:
    return float(roc_auc_score(np.r_[np.ones(len(ood)), np.zeros(len(xray))], np.r_[ood, xray]))


def rate(flags) -> str:
    flags = np.asarray(flags, bool)
    return f"{flags.sum()}/{len(flags)} ({flags.mean():.1%})"


def choose(tune: dict, val: dict, train: dict, config: GuardConfig) -> tuple[dict, list[str]]:
    """Fits every candidate on train, thresholds on val; picks the one that flags the most of the
    OOD tune half, then the higher tune AUROC (against validation X-rays), then the fewest components."""
    rows, best, best_key = [], None, None
    for dims in DIMS:
        stats = fit_guard(train["features"], train["labels"], val["features"], val["logits"], replace(config, dims=dims))
        tune_scores = all_scores(tune["features"], tune["logits"], stats)
        val_scores = all_scores(val["features"], val["logits"], stats)
        for method in ("mahalanobis", "energy") if dims == DIMS[0] else ("mahalanobis",):
            caught = float(np.mean(tune_scores[method] > stats["thresholds"][method]))
            area = auroc(tune_scores[method], val_scores[method])
            label = method + (f", {dims} components" if method == "mahalanobis" else "")
            rows.append(f"| {label} | {area:.4f} | {caught:.1%} |")
            key = (caught, round(area, 4), -dims)
            if best_key is None or key > best_key:
                best_key, best = key, {**stats, "method": method, "threshold": stats["thresholds"][method]}
    return best, rows


def median_ms(call, repeats: int) -> float:
    times = []
    for i in range(repeats):
        started = time.perf_counter()
        call(i)
        times.append(time.perf_counter() - started)
    return 1000 * float(np.median(times))


def timing(clf: Classifier, guard, features: np.ndarray, logits: np.ndarray) -> list[str]:
    """Median single-image latency of the network on each backend vs the guard's NumPy scoring."""
    one = to_batch(np.full((1, clf.img_size, clf.img_size), 128, np.uint8))
    parts = []
    for kind in ("fp32", "int8"):
        runtime = OnnxBackend(clf.bundle.onnx_path(kind), name=kind)
        runtime.run(one)
        parts.append(f"ONNX {kind} {median_ms(lambda i: runtime.run(one), 50):.1f} ms")
    n = len(features)
    maha = median_ms(lambda i: guard_scores(features[i % n:i % n + 1], replace(guard, method="mahalanobis")), 3000)
    energy = median_ms(lambda i: guard_scores(features[i % n:i % n + 1], replace(guard, method="energy"),
                                              logits[i % n:i % n + 1]), 3000)
    return parts + [f"Mahalanobis scoring {maha * 1000:.0f} us", f"energy {energy * 1000:.0f} us"]


# ------------------------------------------------------------------ main
def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="a model bundle (default: the shipped 3-class one)")
    parser.add_argument("--manifest", type=Path, default=ROOT.parent / "exp_runs/manifest.csv",
                        help="the run manifest the model was trained on (train/val/test splits)")
    parser.add_argument("--external", type=Path, default=ROOT.parent / "shared/data/chest_xray_external")
    parser.add_argument("--ood", type=Path, default=default_cache_dir() / "ood",
                        help="folder made by benchmarks/ood_set.py")
    parser.add_argument("--max-flagged", type=float, default=GuardConfig.max_flagged,
                        help="share of validation X-rays allowed")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    parser.add_argument("--stats-out", type=Path, default=None,
                        help="write the chosen statistics, {graph kind: stats} (the JSON for ModelMeta.guard)")
    parser.add_argument("--install", action="store_true",
                        help="write the chosen statistics into the bundle's meta.json (what `ship` fitted is replaced)")
    args = parser.parse_args()

    bundle = load_bundle(args.model or resolve_model("three"))
    if bundle.meta.merge_outputs:
        raise SystemExit(f"{bundle.path}: a merged (binary) read of a network; give the 3-class bundle it comes from")
    clf = Classifier.load(bundle, backend="torch")  # decoding and scoring arrays; the graphs run below
    decoded = decode_sets(args, clf)
    config = GuardConfig(max_flagged=args.max_flagged)
    lines, chosen = [f"Model `{clf.meta.name}` ({bundle.path}, {clf.img_size} px). Each graph kind gets its own "
                     f"statistics, fitted on its own features of {len(decoded['train']['decoded'])} training X-rays, "
                     f"thresholds at <= {args.max_flagged:.1%} of {len(decoded['val']['decoded'])} validation "
                     "X-rays flagged."], {}
    for kind in ("fp32", "int8"):
        runtime = OnnxBackend(bundle.onnx_path(kind), name=kind)
        groups = with_outputs(clf, runtime, decoded)
        stats, candidate_rows = choose(groups["tune"], groups["val"], groups["train"], config)
        chosen[kind] = stats
        lines += report(kind, stats, groups, candidate_rows)
    torch_groups = with_outputs(clf, clf.runtime, decoded)
    torch_flags = {n: guard_scores(torch_groups[n]["features"], chosen["fp32"], torch_groups[n]["logits"])
                   > chosen["fp32"]["threshold"] for n in ("report", "test", "external")}
    lines += ["", "PyTorch features with the fp32 statistics (the torch backend uses them): OOD report half "
              f"{rate(torch_flags['report'])}, test X-rays {rate(torch_flags['test'])}, external X-rays "
              f"{rate(torch_flags['external'])}."]
    costs = timing(clf, load_guard(chosen["fp32"]), torch_groups["test"]["features"], torch_groups["test"]["logits"])
    lines += ["", "Cost per image (median of single-image calls, this 2-core CPU shared with other jobs): network "
              + ", ".join(costs[:2]) + "; the guard beside it in NumPy: " + ", ".join(costs[2:])
              + f". Statistics: {len(json.dumps(chosen)) / 1024:.0f} KiB of JSON for both graphs."]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with atomic_write(args.out, "w") as handle:
            handle.write(text + "\n")
    if args.stats_out:
        with atomic_write(args.stats_out, "w") as handle:
            json.dump(chosen, handle)
    if args.install:
        write_meta(bundle.path, bundle.meta.replace(guard=chosen))


def decode_sets(args, clf: Classifier) -> dict[str, dict]:
    """Every set decoded once, with the image checks' verdicts: train/val/test X-rays (from the
    manifest), external X-rays, the OOD set and its tune and report halves."""
    sets: dict[str, dict] = {}
    samples = read_manifest(args.manifest)
    for split in ("train", "val", "test"):
        chosen = [s for s in samples if s.split == split]
        sets[split] = {"decoded": decode_cached(clf, split, [s.path for s in chosen]),
                       "labels": class_indices(chosen, clf.classes, clf.meta.task)}
    external = sorted(s.path for s in read_dataset(args.external).samples)
    sets["external"] = {"decoded": decode_cached(clf, "external", external)}
    ood = read_ood_manifest(args.ood / "manifest.csv")
    sets["ood"] = {"decoded": decode_cached(clf, "ood", [r["path"] for r in ood]), "rows": ood}
    for group in sets.values():
        group["image"] = image_flags(group["decoded"])
    return sets


def with_outputs(clf: Classifier, runtime, decoded: dict[str, dict]) -> dict[str, dict]:
    """The sets with logits and features from `runtime` (the OOD halves cut from the whole set)."""
    groups = {}
    for name, group in decoded.items():
        logits, features = cached_outputs(clf, runtime, name, group["decoded"])
        groups[name] = {**group, "logits": logits, "features": features}
    for half in ("tune", "report"):
        keep = np.array([r["split"] == half for r in groups["ood"]["rows"]])
        groups[half] = {k: (v[keep] if isinstance(v, np.ndarray) else [x for x, m in zip(v, keep) if m])
                        for k, v in groups["ood"].items()}
    return groups


def report(kind: str, stats: dict, groups: dict, candidate_rows: list[str]) -> list[str]:
    method = stats["method"]
    guard = load_guard(stats)
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
                                                  for m in ("mahalanobis", "energy")) + " |")
    lines += ["", "Flag rates at the chosen threshold:", "",
              "| set | images | learned check | image checks | either (`reliable: false`) |", "|---|---:|---:|---:|---:|"]
    for name, what in (("report", "OOD report half (not X-rays)"), ("tune", "OOD tune half (not X-rays)"),
                       ("test", "internal test X-rays"), ("external", "external X-rays (used for selection)"),
                       ("val", "validation X-rays (threshold set here)"), ("train", "training X-rays (fitted on)")):
        image = groups[name]["image"]
        lines.append(f"| {what} | {len(image)} | {rate(flagged[name])} | {rate(image)} | {rate(flagged[name] | image)} |")
    lines += misses(groups, flagged)
    xray_flags = [(Path(d.name).name, s) for name in ("test", "external")
                  for d, f, s in zip(groups[name]["decoded"], flagged[name], scores[name][method]) if f]
    example = guard_warnings(groups["report"]["features"][0], groups["report"]["logits"][0], guard)
    lines += ["", f"Real X-rays flagged (test + external): {len(xray_flags)}: "
              + ", ".join(f"{name} ({s:.1f})" for name, s in xray_flags),
              "", f"Example warning: `{example[0] if example else '(none)'}`"]
    return lines


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
