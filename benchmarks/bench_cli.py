"""What a user waits for: whole-process wall time of the CLI, median of --repeat runs (not a unit test).

Commands, each run --repeat times in turn (interleaved, so a change of machine load hits all alike):
`pneumoscope --help`; one-image `predict`; `predict --format csv` on a small and a large folder
(default --large 1,000 images) per backend; and a seed user's DenseNet121 in eager PyTorch on the
large folder (torchvision, random weights: speed only; batch 32, PIL decode). Marginal throughput
= (large - small images) / (large - small seconds): the folder rate without start-up.
Every figure is printed with the CPU model, its AVX512-VNNI / AMX / AVX512-BF16 flags and the load
average, because this machine is shared.

    python benchmarks/bench_cli.py [--images DIR] [--large 1000] [--small 32] [--repeat 3]
                                   [--backends onnx,int8,openvino] [--no-peer]
"""
from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

from common import DATA, cli_command, image_files, machine, parser, wall_seconds

PEER = r'''
import sys
from pathlib import Path
import numpy as np, torch, torchvision
from PIL import Image
model = torchvision.models.densenet121(weights=None, num_classes=3).eval()
files = sorted(p for p in Path(sys.argv[1]).iterdir() if p.suffix.lower() in (".jpeg", ".jpg", ".png"))
def load(p):
    img = Image.open(p).convert("RGB").resize((224, 224))
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)
with torch.inference_mode():
    for i in range(0, len(files), 32):
        probs = model(torch.stack([load(p) for p in files[i:i + 32]])).softmax(1)
        for p, row in zip(files[i:i + 32], probs.tolist()):
            print(p.name, *(f"{x:.4f}" for x in row), sep=",")
'''


def folder_of(files: list[Path], n: int, parent: Path) -> Path:
    """A folder of n symlinks to real X-rays (nothing copied)."""
    out = parent / f"n{n}"
    out.mkdir()
    for i in range(n):
        (out / f"{i:05d}{files[i % len(files)].suffix}").symlink_to(files[i % len(files)])
    return out


def main() -> None:
    options = parser(__doc__)
    options.add_argument("--images", default=str(DATA / "train" / "NORMAL"))
    options.add_argument("--large", type=int, default=1000)
    options.add_argument("--small", type=int, default=32)
    options.add_argument("--repeat", type=int, default=3)
    options.add_argument("--backends", default="onnx,int8,openvino")
    options.add_argument("--no-peer", action="store_true", help="skip the DenseNet121 eager peer")
    args = options.parse_args()

    files, cli = image_files(args.images), cli_command()
    with tempfile.TemporaryDirectory() as tmp:
        small, large = folder_of(files, args.small, Path(tmp)), folder_of(files, args.large, Path(tmp))
        one = str(next(small.iterdir()))
        commands = {"pneumoscope --help": cli + ["--help"], "predict one.jpeg": cli + ["predict", one]}
        for backend in args.backends.split(","):
            for size, folder in (("small", small), ("large", large)):
                commands[f"predict {size} --format csv --backend {backend}"] = \
                    cli + ["predict", str(folder), "--format", "csv", "--backend", backend]
        if not args.no_peer:
            commands["DenseNet121 eager peer, large"] = [sys.executable, "-c", PEER, str(large)]
        print(f"# {machine('before')}")
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.repeat):  # interleaved rounds
            for name, command in commands.items():
                times[name].append(wall_seconds(command))
        median = {name: statistics.median(t) for name, t in times.items()}
        print(f"# {machine('after')}; median of {args.repeat}; small = {args.small}, large = {args.large} images")
        print("| command | median wall (s) | runs (s) |\n|---|---:|---|")
        for name, t in times.items():
            print(f"| {name} | {median[name]:.2f} | {', '.join(f'{x:.2f}' for x in t)} |")
        for backend in args.backends.split(","):
            big = median[f"predict large --format csv --backend {backend}"]
            little = median[f"predict small --format csv --backend {backend}"]
            line = f"marginal throughput, {backend}: {(args.large - args.small) / max(big - little, 1e-9):.0f} images/s"
            if not args.no_peer:
                line += f"; whole-process vs DenseNet121 peer: {median['DenseNet121 eager peer, large'] / big:.1f}x"
            print(line)


if __name__ == "__main__":
    main()
