"""Where the training loop's time goes: decode, augmented loader, and each phase of a training step
(next batch, forward, backward, optimizer) of the default model on this CPU.

    .venv/bin/python benchmarks/bench_training.py [--data ../shared/data/chest_xray] [--img-size 192]

Not a unit test. Prints a markdown table: decoding + resizing (once per run, then cached), the
augmented DataLoader alone, and forward + backward + step of the default model, so the three rates
can be compared directly.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from pneumoscope.backends import describe_machine
from pneumoscope.data import XrayDataset, load_pixels, read_dataset, train_transform
from pneumoscope.labels import THREE
from pneumoscope.models import DEFAULT_ARCH, create_model, freeze_model, model_spec
from pneumoscope.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def rate(n: int, seconds: float) -> float:
    return n / max(seconds, 1e-9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "chest_xray"))
    parser.add_argument("--img-size", type=int, default=TrainConfig.img_size)
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--images", type=int, default=640)
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()

    samples = read_dataset(args.data).samples[: args.images]
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        pixels, kept, _ = load_pixels(samples, args.img_size, Path(cache))
        decode = rate(len(kept), time.perf_counter() - start)
    dataset = XrayDataset(pixels, kept, THREE, "three", train_transform(args.img_size, policy=TrainConfig.aug_policy))
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=0)
    start, seen = time.perf_counter(), 0
    for x, _ in loader:
        seen += len(x)
    load = rate(seen, time.perf_counter() - start)

    model = create_model(DEFAULT_ARCH, 3).to(memory_format=torch.channels_last).train()
    frozen = freeze_model(model, model_spec(DEFAULT_ARCH).freeze)  # what training freezes by default
    for module in frozen:
        module.eval()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    phases = time_steps(model, optimizer, loader, args.steps)
    step_seconds = sum(phases.values())
    train = rate(args.steps * args.batch_size, step_seconds)

    print(f"CPU: {describe_machine()}")
    print(f"{DEFAULT_ARCH} at {args.img_size} px, batch {args.batch_size}, {TrainConfig.aug_policy} augmentation, "
          f"{torch.get_num_threads()} threads, "
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


def _endless(loader):
    while True:
        yield from loader


if __name__ == "__main__":
    main()
