"""What every benchmark shares: where the data is, the machine line printed with each figure,
running the `pneumoscope` command, timing, argument parsing and writing results.

Benchmarks use pneumoscope's public API only (the names `import pneumoscope` exposes, see its
docstring) and the command line for the rest; tests/test_benchmarks.py checks it. They read
`pneumoscope.X` at call time, so `--help` imports nothing heavy.
"""
from __future__ import annotations

import argparse
import csv
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pneumoscope

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"  # beside the repository, never inside it
DATA = SHARED_DATA / "chest_xray"  # the public Kermany train/ + val/ trees
EXTERNAL = SHARED_DATA / "chest_xray_external"  # half of the official test group, used for selection
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


# ------------------------------------------------------------------ arguments
def parser(doc: str) -> argparse.ArgumentParser:
    """A parser whose --help shows the benchmark's whole docstring, line breaks kept."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_model(parser: argparse.ArgumentParser, required: bool = False,
              default: str = "the shipped 3-class model") -> None:
    """--model BUNDLE (--checkpoint, the CLI's name for it, is the same option)."""
    parser.add_argument("--model", "--checkpoint", dest="model", required=required, default=None,
                        help="a model bundle or run directory" + ("" if required else f" (default: {default})"))


def add_external(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--external", type=Path, default=EXTERNAL,
                        help="the external group (used for selection; default: %(default)s)")


# ------------------------------------------------------------------ the machine and the command line
def machine(when: str = "") -> str:
    """CPU model, speed flags, cores and load average (and when they were read): this machine is
    shared, so every figure says what it ran beside."""
    return pneumoscope.describe_machine() + (f" ({when})" if when else "")


def cli_command() -> list[str]:
    """`pneumoscope` as a user types it: the console script beside this Python, else `-m`."""
    script = Path(sys.executable).with_name("pneumoscope")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "pneumoscope.cli"]


def run_cli(*args: str, quiet: bool = True) -> subprocess.CompletedProcess:
    """Runs `pneumoscope ARGS...` to completion; a failure raises with its exit code."""
    output = subprocess.DEVNULL if quiet else None
    return subprocess.run([*cli_command(), *args], check=True, stdout=output, stderr=output)


# ------------------------------------------------------------------ timing
def wall_seconds(command: list[str]) -> float:
    """Whole-process wall time of a command (its output discarded)."""
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def latencies_ms(call: Callable[[int], object], repeats: int) -> list[float]:
    """Milliseconds of each of `repeats` calls, call(i) for i in 0..repeats-1."""
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        call(i)
        times.append((time.perf_counter() - start) * 1000)
    return times


def median_ms(call: Callable[[int], object], repeats: int) -> float:
    return statistics.median(latencies_ms(call, repeats))


def rate(count: int, seconds: float) -> float:
    """Items per second (never a division by zero)."""
    return count / max(seconds, 1e-9)


# ------------------------------------------------------------------ inputs and outputs
def image_files(folder: str | Path) -> list[Path]:
    """The JPEG and PNG files under `folder`, sorted, as absolute paths (links to them stay valid anywhere)."""
    files = Path(folder).absolute().rglob("*")
    return sorted(p for p in files if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def read_ood_manifest(path: str | Path) -> list[dict]:
    """The rows of ood_set.py's manifest.csv, `path` made absolute."""
    path = Path(path)
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        row["path"] = str(path.parent / row["path"])
    return rows


def write_text(path: str | Path, text: str) -> None:
    """Writes a result atomically: an interrupted benchmark never leaves half a file."""
    with pneumoscope.atomic_write(path, "w") as handle:
        handle.write(text)


def replace_section(path: str | Path, begin: str, end: str, section: str, heading: str) -> None:
    """Replaces the text between the `begin` and `end` markers (included) of a markdown file with
    `section`, or appends it under `heading` when the file has no such markers."""
    path = Path(path)
    text = path.read_text() if path.exists() else ""
    if begin in text:
        text = text[:text.index(begin)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + f"\n\n{heading}\n\n{section}\n"
    write_text(path, text)
