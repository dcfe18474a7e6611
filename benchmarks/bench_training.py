"""Is the input pipeline a bottleneck? Decode, augmented loader and training-step images/s on this CPU.

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

from pneumoscope.data import XrayDataset, discover, load_pixels, train_transform
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
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()

    samples = discover(args.data)[0][: args.images]
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        pixels, kept, _ = load_pixels(samples, args.img_size, Path(cache))
        decode = rate(len(kept), time.perf_counter() - start)
    dataset = XrayDataset(pixels, kept, THREE, "three", train_transform(args.img_size))
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
    batches = iter(loader)
    x, y = next(batches)
    x = x.contiguous(memory_format=torch.channels_last)
    for step in range(args.steps + 1):
        if step == 1:  # the first step pays for allocation
            start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    train = rate(args.steps * len(x), time.perf_counter() - start)

    print(f"{DEFAULT_ARCH} at {args.img_size} px, batch {args.batch_size}, {torch.get_num_threads()} threads\n")
    print("| stage | images/s |\n|---|---:|")
    print(f"| decode + resize (once, then cached) | {decode:.0f} |")
    print(f"| augmented loader (cached pixels) | {load:.0f} |")
    print(f"| training step (forward + backward + AdamW) | {train:.1f} |")


if __name__ == "__main__":
    main()
