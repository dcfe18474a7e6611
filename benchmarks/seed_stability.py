"""Stability of the default recipe across epochs and seeds, and what averaging buys, on one split.

    .venv/bin/python benchmarks/seed_stability.py RUN_DIR... [--from-epoch 2] [--out docs/benchmarks.md]

The runs are `pneumoscope train ... --keep-epochs` runs on the same manifest (same patients in
train / val / internal test), differing only in --seed. For every kept epoch from --from-epoch on,
and for each run's best weights (its model bundle, chosen by validation), it reports accuracy and
per-class recall on validation and on the internal test split. Then two ways to average that
need no extra training: a weight average of the runs' best checkpoints (a "model soup": same
ImageNet start, same split, so their weights average well) and test-time augmentation (mean
probabilities over small zooms and gamma changes). Decide on the validation columns only.
Every model runs through the product's own `Classifier` on ONNX Runtime (fp32, exported in memory).
Not a unit test: minutes per run on 2 cores.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import pneumoscope
from common import parser, replace_section

BEGIN, END = "<!-- stability:begin -->", "<!-- stability:end -->"


def split_data(run_dir: Path, split: str, meta):
    samples = [s for s in pneumoscope.RunDir(run_dir).samples() if s.split == split]
    pixels, kept, _ = pneumoscope.load_pixels(samples, meta.img_size)
    return pixels, pneumoscope.class_indices(kept, meta.classes, meta.task)


def probabilities(bundle, state: dict, pixels: np.ndarray, tta: bool = False) -> np.ndarray:
    """Uncalibrated softmax of the bundle's network with other weights (temperature 1: epochs and
    soups have none of their own), averaged over the TTA views when asked."""
    network = pneumoscope.load_network(bundle)
    network.load_state_dict(state)
    classifier = pneumoscope.Classifier.from_model(network, bundle.meta.replace(temperature=1.0))
    views = tta_views(pixels) if tta else [pixels]
    return np.mean([classifier.score_pixels(view).probabilities for view in views], axis=0)


def tta_views(pixels: np.ndarray) -> list[np.ndarray]:
    """The image, a 92% centre zoom, and gamma 0.8 and 1.25 (changes a new site's films bring),
    as 8-bit images like any input."""
    x = torch.from_numpy(pixels[:, None].astype(np.float32) / 255)
    size, crop = x.shape[-1], int(round(x.shape[-1] * 0.92))
    start = (size - crop) // 2
    zoom = F.interpolate(x[..., start:start + crop, start:start + crop], size=(size, size), mode="bilinear",
                         antialias=True, align_corners=False).clamp(0, 1)
    return [(v[:, 0] * 255).round().to(torch.uint8).numpy() for v in (x, zoom, x ** 0.8, x ** 1.25)]


def scores(probs: np.ndarray, targets: np.ndarray, classes) -> dict:
    predicted = probs.argmax(1)
    out = {"acc": float((predicted == targets).mean())}
    for i, c in enumerate(classes):
        out[c] = float((predicted[targets == i] == i).mean())
    return out


def soup(states: list[dict]) -> dict:
    """Uniform average of weights and BN statistics (integer counters taken from the first)."""
    return {k: (torch.stack([s[k].float() for s in states]).mean(0) if states[0][k].is_floating_point()
                else states[0][k]) for k in states[0]}


def row(name: str, val: dict, test: dict, classes) -> str:
    cells = [f"{val['acc']:.3f}", " / ".join(f"{val[c]:.3f}" for c in classes),
             f"{test['acc']:.3f}", " / ".join(f"{test[c]:.3f}" for c in classes)]
    return f"| {name} | " + " | ".join(cells) + " |"


def main() -> None:
    options = parser(__doc__)
    options.add_argument("runs", nargs="+", type=Path)
    options.add_argument("--from-epoch", type=int, default=2)
    options.add_argument("--out", default=None, help="replace the stability section of this markdown file")
    args = options.parse_args()

    bundles = [pneumoscope.load_bundle(pneumoscope.RunDir(r).finished_model()) for r in args.runs]
    meta = bundles[0].meta
    classes = meta.classes
    data = {split: split_data(args.runs[0], split, meta) for split in ("val", "test")}
    manifests = {tuple((s.path, s.split) for s in pneumoscope.RunDir(r).samples()) for r in args.runs}
    if len(manifests) != 1:
        raise SystemExit("the runs must share one manifest (train them with --data <run>/manifest.csv)")

    def evaluate(name, state, tta=False):
        result = [scores(probabilities(bundles[0], state, data[s][0], tta), data[s][1], classes)
                  for s in ("val", "test")]
        print(row(name, *result, classes), flush=True)
        return row(name, *result, classes)

    recall = " / ".join(classes)
    lines = [BEGIN, "", f"`.venv/bin/python benchmarks/seed_stability.py {' '.join(r.name for r in args.runs)}` "
             f"(runs of the default recipe on one manifest, seeds {', '.join(str(b.meta.provenance['seed']) for b in bundles)}; "
             f"val n={len(data['val'][1])}, internal test n={len(data['test'][1])}; EMA weights of each epoch).", "",
             f"| model | val acc | val recall {recall} | test acc | test recall {recall} |", "|---|---:|---|---:|---|"]
    best_states = []
    for run, bundle in zip(args.runs, bundles):
        seed = bundle.meta.provenance["seed"]
        for epoch, path in pneumoscope.RunDir(run).epoch_checkpoints():
            if epoch >= args.from_epoch:
                lines.append(evaluate(f"seed {seed}, epoch {epoch}", pneumoscope.checkpoint_weights(path)[0]))
        best_states.append(bundle.state_dict())
        best_epoch = bundle.meta.provenance.get("best_epoch")
        lines.append(evaluate(f"**seed {seed}, best (epoch {best_epoch})**", best_states[-1]))
        lines.append(evaluate(f"seed {seed}, best + TTA", best_states[-1], tta=True))
    if len(best_states) > 1:
        averaged = soup(best_states)
        lines.append(evaluate(f"**weight average of the {len(best_states)} best**", averaged))
        lines.append(evaluate("weight average + TTA", averaged, tta=True))
    lines += ["", END]
    if args.out:
        replace_section(args.out, BEGIN, END, "\n".join(lines), "## Stability across epochs and seeds")


if __name__ == "__main__":
    main()
