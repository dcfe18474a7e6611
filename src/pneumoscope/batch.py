"""Batch prediction for the CLI: records written as they are produced, resumable after a crash.

Memory stays bounded for any number of inputs: paths are streamed from the folder walk, records
go out one at a time, and only the paths already in the output file (for --resume) are kept.
"""
from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path
from typing import Callable, TextIO

from tqdm import tqdm

from .predict import Classifier, Record, Skipped, expand_inputs

FORMATS = ("table", "csv", "json")
EXTENSION_FORMATS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".ndjson": "json"}  # others: table


def output_format(given: str | None, output: str | None) -> str:
    """--format, else what --output's extension says (.csv; .json, .jsonl, .ndjson; table for any
    other file and on stdout). A --format that contradicts the extension is a ValueError."""
    implied = EXTENSION_FORMATS.get(Path(output).suffix.lower(), "table") if output else "table"
    if given and output and Path(output).suffix.lower() in EXTENSION_FORMATS and given != implied:
        raise ValueError(f"--format {given} conflicts with --output {output} (a {Path(output).suffix} file holds "
                         f"{implied}); drop --format or rename the file")
    return given or implied


def predict_paths(classifier: Classifier, paths: list[str], fmt: str = "json", output: str | None = None,
                  resume: bool = False, cam_dir: str | None = None, batch_size: int = 32) -> bool:
    """Classifies the files and folders in `paths`, writing one record per image to `output`
    (flushed as produced, progress bar on stderr) or to stdout. `resume` skips the paths already
    in `output`. With `cam_dir`, a Grad-CAM overlay per image goes there. Returns True if any input
    failed (in this run or, when resuming, in the earlier one)."""
    done, any_failed = read_done(output, fmt) if resume else (set(), False)
    empty = [p for p in paths if os.path.isdir(p) and next(expand_inputs([p]), None) is None]

    def todo(skipped: Skipped | None = None):  # a fresh generator each time: the inputs are never listed in memory
        if not done:  # realpath costs ~0.1 ms a file: ~8% of a folder's time at 500 images/s
            return expand_inputs(paths, skipped)
        return (p for p in expand_inputs(paths, skipped) if os.path.realpath(p) not in done)

    skipped = Skipped()
    total = sum(1 for _ in todo(skipped))  # the one counting pass: the progress bar's total and the summary's
    already = len(done)
    if resume and output:
        print(f"pneumoscope: resuming {output}: {already} input(s) already recorded there are skipped, "
              f"{total} to do", file=sys.stderr)

    # surrogateescape: a file name that is not valid UTF-8 is written back as its own bytes
    stream = open(output, "a" if resume else "w", newline="", encoding="utf-8", errors="surrogateescape") \
        if output else sys.stdout
    cams = None
    if cam_dir:
        from .explain import CamWriter

        cams = CamWriter(classifier, cam_dir)
    progress = tqdm(total=total, unit="img", file=sys.stderr, disable=not output,
                    desc=f"predict -> {output}", dynamic_ncols=True)
    counts = {"ok": 0, "error": 0}
    try:
        write = record_writer(fmt, classifier.classes, stream, header=stream.tell() == 0 if output else True)
        for folder in empty:  # an explicitly given folder with nothing to classify is a failed input
            if os.path.realpath(folder) not in done:
                write(Record(folder, "error", error=f"{folder}: no image files in this folder"))
            print(f"pneumoscope: {folder}: no image files in this folder", file=sys.stderr)
            any_failed = True
        # with --cam the gray X-rays stay with their batch, so each image is decoded only once
        for decoded, scores in classifier.score_batches(todo(), batch_size=batch_size, keep_gray=cams is not None):
            for record, item in zip(classifier.records(scores), decoded):
                any_failed |= record.status != "ok"
                counts[record.status] += 1
                write(record)
                stream.flush()  # a record on disk is a record --resume will not redo
                if cams:
                    cams(record, item)
                progress.update()
    finally:
        progress.close()
        if output:
            stream.close()
    if output or skipped.count:
        print(summary(counts, already if resume else 0, skipped, output), file=sys.stderr)
    return any_failed


def summary(counts: dict[str, int], already: int, skipped: Skipped, output: str | None) -> str:
    """One line: what was classified, what failed, what was skipped and why."""
    parts = [f"{counts['ok']} classified", f"{counts['error']} failed"]
    if already:
        parts.append(f"{already} skipped as already in {output} (--resume)")
    if skipped.count:
        more = ", ..." if skipped.count > len(skipped.examples) else ""
        parts.append(f"{skipped.count} file(s) in the folders skipped as not images "
                     f"({', '.join(skipped.examples)}{more})")
    return "pneumoscope: predict: " + "; ".join(parts) + (f"; records in {output}" if output else "")


def read_done(output: str | None, fmt: str) -> tuple[set[str], bool]:
    """The resolved paths already recorded in `output` and whether any of them failed. A trailing partial
    line (the run was killed mid-write) is cut off first, so its input is classified again."""
    if not output or not Path(output).is_file():
        return set(), False
    _drop_partial_line(Path(output))
    done, any_failed = set(), False
    with open(output, newline="", encoding="utf-8", errors="surrogateescape") as handle:
        rows = (json.loads(line) for line in handle if line.strip()) if fmt == "json" else csv.DictReader(handle)
        try:
            for row in rows:
                done.add(os.path.realpath(row["path"]))  # ./x, x and /abs/x are one input
                any_failed |= row["status"] != "ok"
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{output}: cannot resume, not a {fmt} file written by `pneumoscope predict` "
                             f"({type(err).__name__}: {err})") from None
    return done, any_failed


def _drop_partial_line(path: Path) -> None:
    complete = 0
    with open(path, "rb") as handle:
        for line in handle:
            if not line.endswith(b"\n"):
                break
            complete += len(line)
    if complete < path.stat().st_size:
        os.truncate(path, complete)


def record_writer(fmt: str, classes, stream: TextIO = sys.stdout, header: bool = True
                  ) -> Callable[[Record], None]:
    """A function writing one record in `fmt` (JSON lines, CSV or an aligned table) to `stream`."""
    if fmt == "json":
        return lambda record: stream.write(json.dumps(record.to_dict()) + "\n")
    if fmt == "csv":
        writer = csv.writer(stream)
        if header:
            writer.writerow(["path", "status", "label", *[f"p_{c}" for c in classes], "error", "reliable", "warnings"])
        return lambda r: writer.writerow([
            r.path, r.status, r.label or "", *[f"{r.probabilities[c]:.4f}" if r.probabilities else "" for c in classes],
            r.error or "", "" if r.reliable is None else str(r.reliable).lower(), "; ".join(r.warnings)])
    print(f"{'label':<10}" + "".join(f"{c:>11}" for c in classes) + "  path", file=stream)

    def table(r):
        if r.status != "ok":
            print(f"{'ERROR':<10}{'':>{11 * len(classes)}}  {r.error}", file=stream)
        else:
            flag = "" if r.reliable else "  [not a chest X-ray?]"
            print(f"{r.label:<10}" + "".join(f"{r.probabilities[c]:>11.4f}" for c in classes) + f"  {r.path}{flag}",
                  file=stream)
    return table
