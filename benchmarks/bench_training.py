"""Where the training loop's time goes, and how a real training epoch compares, side by side in one
run, with a bare timm loop and with itself under load.

    .venv/bin/python benchmarks/bench_training.py [--data ../shared/data/chest_xray] [--model BUNDLE]
                                                  [--img-size 224] [--images 640] [--steps 12]
                                                  [--epochs-side-by-side] [--precision bf16-mixed]

Not a unit test. Prints markdown tables: decoding + resizing (once per run, then cached), the
augmented DataLoader alone, and forward + backward + step of the network of --model (default: the
shipped model, the default recipe) with its training's augmentation and frozen stages. With
--epochs-side-by-side also, each in its own process, one after the other:
- a bare timm `tf_efficientnet_lite0` loop over as many images as the run trains on (every layer
  trained, fp32 eager, AdamW, batch 32, channels-last, pixels in memory, no augmentation);
- one marginal epoch (its second: training + validation, from metrics.csv) of the default
  `pneumoscope train` recipe on --max-images images (augmentation, EMA, freezing as shipped), idle;
- the same epoch with one CPU-bound process beside it (a fair share of two cores would be 2x idle);
- the same epoch at each --precision given.
Every figure comes with the CPU, its flags and the load.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

import pneumoscope
from common import DATA, add_model, machine, parser, rate, run_cli


def main() -> None:
    options = parser(__doc__)
    options.add_argument("--data", default=str(DATA))
    add_model(options)
    options.add_argument("--img-size", type=int, default=pneumoscope.TrainConfig.img_size)
    options.add_argument("--batch-size", type=int, default=pneumoscope.TrainConfig.batch_size)
    options.add_argument("--images", type=int, default=640)
    options.add_argument("--steps", type=int, default=12)
    options.add_argument("--epochs-side-by-side", action="store_true",
                         help="also time a bare timm loop and real training epochs, idle and under load")
    options.add_argument("--max-images", type=int, default=800, help="the training runs' pool (80%% trains)")
    options.add_argument("--precision", action="append", default=[], help="also time an epoch at this precision")
    options.add_argument("--skip-phases", action="store_true", help="only the side-by-side epochs")
    args = options.parse_args()
    if not args.skip_phases:
        phase_tables(args)
    if args.epochs_side_by_side:
        epochs_side_by_side(args)


def phase_tables(args) -> None:
    classifier = pneumoscope.Classifier.load(args.model, backend="torch")
    meta, recipe = classifier.meta, classifier.meta.provenance.get("train_config", {})
    defaults = pneumoscope.TrainConfig
    policy, strength = recipe.get("aug_policy", defaults.aug_policy), recipe.get("aug", defaults.aug)
    samples = pneumoscope.read_dataset(args.data, task=meta.task).samples[: args.images]
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        pixels, kept, _ = pneumoscope.load_pixels(samples, args.img_size, Path(cache))
        decode = rate(len(kept), time.perf_counter() - start)
    augment = pneumoscope.train_transform(args.img_size, strength, policy, meta.preprocess)
    dataset = pneumoscope.XrayDataset(pixels, kept, meta.classes, meta.task, augment)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=0)
    start, seen = time.perf_counter(), 0
    for x, _ in loader:
        seen += len(x)
    load = rate(seen, time.perf_counter() - start)

    model = classifier.model.to(memory_format=torch.channels_last).train()  # its weights do not change the time
    freeze = recipe.get("freeze") or "none"
    for module in pneumoscope.freeze_model(model, freeze):  # what its training froze
        module.eval()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    phases = time_steps(model, optimizer, loader, args.steps)
    step_seconds = sum(phases.values())
    train = rate(args.steps * args.batch_size, step_seconds)

    print(f"CPU: {machine()}")
    print(f"{meta.arch} ({classifier.name}) at {args.img_size} px, batch {args.batch_size}, {policy} augmentation "
          f"{strength:g}, frozen: {freeze}, {torch.get_num_threads()} threads, "
          f"{args.steps} steps after one warm-up\n")
    print("| stage | images/s |\n|---|---:|")
    print(f"| decode + resize (once, then cached) | {decode:.0f} |")
    print(f"| augmented loader (cached pixels) | {load:.0f} |")
    print(f"| training loop (next batch + forward + backward + AdamW) | {train:.1f} |\n")
    print("| phase of a training step | ms per step | share |\n|---|---:|---:|")
    for phase, seconds in phases.items():
        print(f"| {phase} | {1000 * seconds / args.steps:.0f} | {seconds / step_seconds:.0%} |")


def time_steps(model, optimizer, loader, steps: int) -> dict[str, float]:
    """Seconds spent in each phase of `steps` training steps (after one warm-up step, which pays
    for allocation): taking the next augmented batch, forward + loss, backward, optimizer."""
    phases = dict.fromkeys(("data (next augmented batch)", "forward + loss", "backward", "optimizer step"), 0.0)
    batches = _endless(loader)
    for step in range(steps + 1):
        marks = [time.perf_counter()]
        x, y = next(batches)
        x = x.contiguous(memory_format=torch.channels_last)
        marks.append(time.perf_counter())
        loss = torch.nn.functional.cross_entropy(model(x), y, label_smoothing=0.1)
        marks.append(time.perf_counter())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        marks.append(time.perf_counter())
        optimizer.step()
        marks.append(time.perf_counter())
        if step:  # the warm-up step is not counted
            for phase, begin, end in zip(phases, marks, marks[1:]):
                phases[phase] += end - begin
    return phases


BARE_LOOP = r'''
import sys, time, numpy as np, timm, torch
pixels = np.load(sys.argv[1])
model = timm.create_model("tf_efficientnet_lite0", num_classes=3, in_chans=1).to(memory_format=torch.channels_last)
model.train()
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
x_all = torch.from_numpy(pixels)[:, None].float().div(255)
y_all = torch.randint(0, 3, (len(x_all),))
start = time.perf_counter()
for i in range(0, len(x_all) - 31, 32):
    x = x_all[i:i + 32].contiguous(memory_format=torch.channels_last)
    loss = torch.nn.functional.cross_entropy(model(x), y_all[i:i + 32])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
print(time.perf_counter() - start)
'''


def epochs_side_by_side(args) -> None:
    """The bare timm loop, then real `pneumoscope train` epochs idle, under load and at other
    precisions, each in a fresh process; prints seconds and ratios."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        idle = _train_epoch(args, tmp / "idle", [])
        n_train = idle["n_train"]
        pixels, _, _ = pneumoscope.load_pixels(pneumoscope.read_dataset(args.data).samples[:n_train], args.img_size,
                                               tmp / "cache")
        np_path = tmp / "pixels.npy"
        np.save(np_path, pixels)
        bare_at = machine()
        bare = float(subprocess.run([sys.executable, "-c", BARE_LOOP, str(np_path)], check=True,
                                    capture_output=True, text=True).stdout.split()[-1])
        rows.append(("bare timm loop (every layer, fp32 eager, no augmentation)", bare, bare_at))
        rows.append(("pneumoscope train, marginal epoch, idle", idle["seconds"], idle["machine"]))
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            time.sleep(1)
            loaded = _train_epoch(args, tmp / "loaded", [])
            # a fixed team of one thread per core: what every run did before ThreadsForLoad
            fixed = _train_epoch(args, tmp / "fixed", ["--threads", str(len(os.sched_getaffinity(0)))])
        finally:
            busy.kill()
        rows.append(("pneumoscope train, marginal epoch, one busy process alongside", loaded["seconds"],
                     loaded["machine"]))
        rows.append(("the same with --threads fixed at one per core (as before), one busy process alongside",
                     fixed["seconds"], fixed["machine"]))
        for precision in args.precision:
            other = _train_epoch(args, tmp / precision, ["--precision", precision])
            rows.append((f"pneumoscope train --precision {precision}, marginal epoch, idle", other["seconds"],
                         other["machine"]))
    print(f"\n{n_train} training images, {args.img_size} px, batch 32\n")
    print("| what | seconds | / bare loop | / idle epoch | CPU and load at the end |\n|---|---:|---:|---:|---|")
    for name, seconds, at in rows:
        print(f"| {name} | {seconds:.1f} | {seconds / bare:.2f} | {seconds / idle['seconds']:.2f} | {at} |")


def _train_epoch(args, out: Path, extra: list[str]) -> dict:
    """Runs a 2-epoch default training (no internal test) and returns its second epoch's seconds."""
    run_cli("train", "--data", args.data, "--epochs", "2", "--max-images", str(args.max_images),
            "--img-size", str(args.img_size), "--no-test", "--patience", "5", "--out", str(out),
            "--cache-dir", str(out.parent / "cache"), *extra)
    run = pneumoscope.RunDir(out)
    n_train = sum(1 for s in run.samples() if s.split == "train")
    return {"seconds": float(run.epochs()[-1]["seconds"]), "n_train": n_train, "machine": machine()}


def _endless(loader):
    while True:
        yield from loader


if __name__ == "__main__":
    main()
