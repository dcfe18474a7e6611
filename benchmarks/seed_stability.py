"""Stability of the default recipe across epochs and seeds, and what averaging buys, on one split.

    .venv/bin/python benchmarks/seed_stability.py RUN_DIR... [--from-epoch 2] [--out docs/benchmarks.md]

The runs are `pneumoscope train ... --keep-epochs` runs on the same manifest (same patients in
train / val / internal test), differing only in --seed. For every kept epoch from --from-epoch on,
and for each run's best checkpoint (model.pt, chosen by validation), it reports accuracy and
per-class recall on validation and on the internal test split. Then two ways to average that
need no extra training: a weight average of the runs' best checkpoints (a "model soup": same
ImageNet start, same split, so their weights average well) and test-time augmentation (mean
probabilities over small zooms and gamma changes). Decide on the validation columns only.
Every model runs through ONNX Runtime (fp32). Not a unit test: minutes per run on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pneumoscope.data import load_pixels, read_manifest
from pneumoscope.export import export_onnx, open_session
from pneumoscope.labels import classes_for, task_label
from pneumoscope.models import create_model
from pneumoscope.predict import to_batch
from pneumoscope.train import network_weights

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- stability:begin -->", "<!-- stability:end -->"


def split_data(run_dir: Path, split: str, size: int, task: str):
    samples = [s for s in read_manifest(run_dir / "manifest.csv") if s.split == split]
    pixels, kept, _ = load_pixels(samples, size)
    classes = classes_for(task)
    return pixels, np.array([classes.index(task_label(s.label, task)) for s in kept])


def model_state(path: Path) -> dict:
    """The model's weights from a pneumoscope checkpoint or a Lightning one (its EMA average)."""
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return network_weights(state) if any(k.startswith("model.") for k in state) else state


def probabilities(state: dict, meta: dict, pixels: np.ndarray, tta: bool = False) -> np.ndarray:
    model = create_model(meta["arch"], len(meta["classes"]), pretrained=False)
    model.load_state_dict(state)
    with tempfile.TemporaryDirectory() as tmp:
        session, _ = open_session(export_onnx(model, meta, Path(tmp) / "m.onnx"))
        views = tta_views(pixels) if tta else [to_batch(pixels)]
        out = []
        for view in views:
            logits = np.concatenate([session.run(["logits"], {"pixels": view[i:i + 64]})[0]
                                     for i in range(0, len(view), 64)])
            out.append(torch.softmax(torch.from_numpy(logits), 1).numpy())
    return np.mean(out, axis=0)


def tta_views(pixels: np.ndarray) -> list[np.ndarray]:
    """The image, a 92% centre zoom, and gamma 0.8 and 1.25: changes a new site's films bring."""
    x = torch.from_numpy(to_batch(pixels))
    size, crop = x.shape[-1], int(round(x.shape[-1] * 0.92))
    start = (size - crop) // 2
    zoom = F.interpolate(x[..., start:start + crop, start:start + crop], size=(size, size), mode="bilinear",
                         antialias=True, align_corners=False).clamp(0, 1)
    return [v.contiguous().numpy() for v in (x, zoom, x ** 0.8, x ** 1.25)]


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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--from-epoch", type=int, default=2)
    parser.add_argument("--out", default=None, help="replace the stability section of this markdown file")
    args = parser.parse_args()

    meta = json.loads((args.runs[0] / "model.json").read_text())
    classes, size = meta["classes"], meta["img_size"]
    data = {split: split_data(args.runs[0], split, size, meta["task"]) for split in ("val", "test")}
    manifests = {(r / "manifest.csv").read_bytes() for r in args.runs}
    if len(manifests) != 1:
        raise SystemExit("the runs must share one manifest (train them with --data <run>/manifest.csv)")

    def evaluate(name, state, tta=False):
        result = [scores(probabilities(state, meta, data[s][0], tta), data[s][1], classes) for s in ("val", "test")]
        print(row(name, *result, classes), flush=True)
        return row(name, *result, classes)

    recall = " / ".join(classes)
    lines = [BEGIN, "", f"`.venv/bin/python benchmarks/seed_stability.py {' '.join(r.name for r in args.runs)}` "
             f"(runs of the default recipe on one manifest, seeds {', '.join(str(json.loads((r / 'model.json').read_text())['seed']) for r in args.runs)}; "
             f"val n={len(data['val'][1])}, internal test n={len(data['test'][1])}; EMA weights of each epoch).", "",
             f"| model | val acc | val recall {recall} | test acc | test recall {recall} |", "|---|---:|---|---:|---|"]
    best_states = []
    for run in args.runs:
        seed = json.loads((run / "model.json").read_text())["seed"]
        epochs = sorted((run / "checkpoints").glob("epoch-*.ckpt"), key=lambda p: int(p.stem.split("-")[1]))
        for path in epochs:
            if int(path.stem.split("-")[1]) >= args.from_epoch:
                lines.append(evaluate(f"seed {seed}, epoch {path.stem.split('-')[1]}", model_state(path)))
        best_states.append(model_state(run / "model.pt"))
        best_epoch = json.loads((run / "model.json").read_text()).get("best_epoch")
        lines.append(evaluate(f"**seed {seed}, best (epoch {best_epoch})**", best_states[-1]))
        lines.append(evaluate(f"seed {seed}, best + TTA", best_states[-1], tta=True))
    if len(best_states) > 1:
        averaged = soup(best_states)
        lines.append(evaluate(f"**weight average of the {len(best_states)} best**", averaged))
        lines.append(evaluate(f"weight average + TTA", averaged, tta=True))
    lines += ["", END]
    if args.out:
        path = Path(args.out)
        text = path.read_text() if path.exists() else ""
        section = "\n".join(lines)
        if BEGIN in text:
            text = text[:text.index(BEGIN)] + section + text[text.index(END) + len(END):]
        else:
            text = text.rstrip() + "\n\n## Stability across epochs and seeds\n\n" + section + "\n"
        path.write_text(text)


if __name__ == "__main__":
    main()
