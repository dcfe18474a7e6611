"""Batch prediction for the CLI: records written as they are produced, resumable after a crash.

Memory stays bounded for any number of inputs: paths are streamed from the folder walk, records
go out one at a time, and only the paths already in the output file (for --resume) are kept.

The output file is held under an exclusive lock (`fcntl.flock`) while records go to it, so a second
`predict` writing to the same file is refused instead of interleaving with the first. File names go
into records through `escape_name`, the one encoding of every format (docs/inputs.md).
"""
from __future__ import annotations

import csv
import json
import os
import re
import stat
import sys
from pathlib import Path
from typing import Callable, Iterator, TextIO

from tqdm import tqdm

from ..runtime.classifier import Classifier, Record, Skipped, expand_inputs

try:
    import fcntl
except ImportError:  # not on Windows: no lock there
    fcntl = None

EXTENSION_FORMATS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".ndjson": "json"}  # others: table


def output_format(given: str | None, output: str | None) -> str:
    """--format, else what --output's extension says (.csv; .json, .jsonl, .ndjson; table for any
    other file and on stdout). A --format that contradicts the extension is a ValueError."""
    implied = EXTENSION_FORMATS.get(Path(output).suffix.lower(), "table") if output else "table"
    if given and output and Path(output).suffix.lower() in EXTENSION_FORMATS and given != implied:
        raise ValueError(f"--format {given} conflicts with --output {output} (a {Path(output).suffix} file holds "
                         f"{implied}); drop --format or rename the file")
    return given or implied


CSV_FIRST_COLUMNS = "path,status,"  # how a CSV written by record_writer begins


def predict_paths(classifier: Classifier, paths: list[str], fmt: str = "json", output: str | None = None,
                  resume: bool = False, cam_dir: str | None = None, batch_size: int = 32) -> bool:
    """Classifies the files and folders in `paths`, writing one record per image to `output`
    (flushed as produced, progress bar on stderr) or to stdout. `resume` skips the paths already
    in `output`. With `cam_dir`, a Grad-CAM overlay per image goes there. Returns True if any input
    failed (in this run or, when resuming, in the earlier one). A file that cannot be written
    raises OSError naming it; the records already written stay, and --resume continues after them."""
    stream = open_output(output) if output else sys.stdout
    progress = None
    counts, skipped, already = {"ok": 0, "error": 0}, Skipped(), 0
    try:
        done, any_failed = read_done(output, fmt, stream) if resume else (set(), False)
        if output and not resume:
            _truncate(stream, 0)  # only now, under the lock: another writer's file is never emptied
        empty = [p for p in paths if os.path.isdir(p) and next(expand_inputs([p]), None) is None]

        def todo(skipped: Skipped | None = None):  # a fresh generator each time: the inputs are never listed in memory
            inputs = expand_inputs(paths, skipped)
            return (p for p in inputs if input_key(p) not in done) if done else inputs

        total = sum(1 for _ in todo(skipped))  # the one counting pass: the progress bar's total and the summary's
        already = len(done)
        if resume and output:
            print(f"pneumoscope: resuming {escape_name(output)}: {already} input(s) already recorded there are "
                  f"skipped, {total} to do", file=sys.stderr)
        cams = None
        if cam_dir:
            from ..runtime.explain import CamWriter  # lazy: Grad-CAM loads PyTorch, only for --cam

            cams = CamWriter(classifier, cam_dir)
        progress = tqdm(total=total, unit="img", file=sys.stderr, disable=not output,
                        desc=f"predict -> {output}", dynamic_ncols=True)
        write = record_writer(fmt, classifier.classes, stream, header=not output or _size(stream) == 0)
        for folder in empty:  # an explicitly given folder with nothing to classify is a failed input
            if input_key(folder) not in done:
                write(Record(folder, "error", error=f"{folder}: no image files in this folder"))
            print(f"pneumoscope: {escape_name(folder)}: no image files in this folder", file=sys.stderr)
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
        stream.flush()
    except OSError as err:
        if err.filename is None:  # a write to the stream itself: name it
            kept = "; the records written so far are kept (--resume continues after them)" if output else ""
            raise OSError(err.errno, f"cannot write ({err.strerror}){kept}", output or "<stdout>") from None
        raise
    finally:
        if progress is not None:
            progress.close()
        if output:
            _close_quietly(stream)
    if output or skipped.count:
        print(summary(counts, already if resume else 0, skipped, output), file=sys.stderr)
    return any_failed


def summary(counts: dict[str, int], already: int, skipped: Skipped, output: str | None) -> str:
    """One line: what was classified, what failed, what was skipped and why."""
    parts = [f"{counts['ok']} classified", f"{counts['error']} failed"]
    if already:
        parts.append(f"{already} skipped as already in {escape_name(output)} (--resume)")
    if skipped.count:
        more = ", ..." if skipped.count > len(skipped.examples) else ""
        parts.append(f"{skipped.count} file(s) in the folders skipped as not images "
                     f"({', '.join(escape_name(e) for e in skipped.examples)}{more})")
    return "pneumoscope: predict: " + "; ".join(parts) + (f"; records in {escape_name(output)}" if output else "")


def open_output(output: str) -> TextIO:
    """`output` opened for appending (created if missing, never truncated here) and locked for this
    process alone; a file another process holds is a one-line ValueError."""
    # backslashreplace: escape_name leaves nothing unencodable, but a stray surrogate must not end the run
    stream = open(output, "a", newline="", encoding="utf-8", errors="backslashreplace")
    if fcntl is not None:
        try:
            fcntl.flock(stream.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            stream.close()
            raise ValueError(f"{output}: another process (a `pneumoscope predict`?) is writing to this file; "
                             "wait for it to finish, or name another --output") from None
        except OSError:  # a file system without locks (some network mounts): write unlocked, as before
            pass
    return stream


def _size(stream: TextIO) -> int:
    return os.fstat(stream.fileno()).st_size


def _truncate(stream: TextIO, size: int) -> None:
    """Cuts the locked file to `size` bytes (a device such as /dev/null is left as it is)."""
    if stat.S_ISREG(os.fstat(stream.fileno()).st_mode):
        stream.flush()
        os.ftruncate(stream.fileno(), size)
        stream.seek(0, os.SEEK_END)


def _close_quietly(stream: TextIO) -> None:
    """Closes after a write error too: what could not be flushed is lost, and --resume redoes it."""
    try:
        stream.close()
    except OSError:
        pass


def input_key(path: str) -> str:
    """What makes two inputs one for --resume: the path as given, made absolute without following
    symlinks (./x, x and /abs/x are one input; 60 symlinks to 6 files are 60 inputs)."""
    return os.path.abspath(path)


def read_done(output: str | None, fmt: str, stream: TextIO | None = None) -> tuple[set[str], bool]:
    """The inputs (`input_key`) already recorded in `output` and whether any of them failed. A
    trailing partial record (the run was killed mid-write) is cut off first, so its input is
    classified again. A file in the other format, or not written by `pneumoscope predict`, is a
    one-line ValueError. `stream`: the caller's locked handle on `output`, if any."""
    if not output or not Path(output).is_file():
        return set(), False
    found = file_format(Path(output))
    if found not in (None, fmt):
        raise ValueError(f"{output}: cannot resume with --format {fmt}: the file holds "
                         f"{'JSON lines' if found == 'json' else 'CSV'} (resume with --format {found})")
    complete = _complete_json_bytes(Path(output)) if fmt == "json" else _complete_csv_bytes(Path(output))
    if complete < Path(output).stat().st_size:
        if stream is not None:
            _truncate(stream, complete)
        else:
            os.truncate(output, complete)
    done, any_failed = set(), False
    with open(output, newline="", encoding="utf-8", errors="surrogateescape") as handle:
        rows = (json.loads(line) for line in handle if line.strip()) if fmt == "json" else csv.DictReader(handle)
        try:
            for row in rows:
                done.add(input_key(unescape_name(row["path"])))
                any_failed |= row["status"] != "ok"
        except (ValueError, KeyError, TypeError, RecursionError) as err:
            raise ValueError(f"{output}: cannot resume, not a {fmt} file written by `pneumoscope predict` "
                             f"({type(err).__name__}: {str(err)[:200]})") from None
    return done, any_failed


def file_format(path: Path) -> str | None:
    """"json" or "csv" (what `record_writer` wrote into `path`, from its first bytes), None for an
    empty file; a file of neither is a one-line ValueError."""
    with open(path, "rb") as handle:
        start = handle.read(len(CSV_FIRST_COLUMNS)).lstrip()
    if not start:
        return None
    if start.startswith(b"{"):
        return "json"
    if start == CSV_FIRST_COLUMNS.encode():
        return "csv"
    raise ValueError(f"{path}: cannot resume, not a csv or json file written by `pneumoscope predict`")


def _complete_json_bytes(path: Path) -> int:
    """Bytes of `path` up to the end of its last complete JSON line (JSON escapes newlines in strings)."""
    complete = 0
    with open(path, "rb") as handle:
        for line in handle:
            if not line.endswith(b"\n"):
                break
            complete += len(line)
    return complete


def _complete_csv_bytes(path: Path) -> int:
    """Bytes of `path` up to the end of its last complete CSV record, read as CSV records, not
    lines: a quoted field (a file name) may hold a newline. A record cut off in a quoted field or
    before its line ends is partial; a malformed record before the end is a one-line ValueError."""
    consumed, ended, exhausted = 0, True, False

    def lines() -> Iterator[str]:
        nonlocal consumed, ended, exhausted
        with open(path, "rb") as handle:
            for raw in handle:
                consumed += len(raw)
                ended = raw.endswith(b"\n")
                yield raw.decode("utf-8", "surrogateescape")
        exhausted = True

    complete = 0
    reader = csv.reader(lines(), strict=True)  # strict: the end of the file inside quotes is an error
    try:
        for _ in reader:
            if not ended:  # the last line, without its newline: the writer was killed in it
                break
            complete = consumed
    except csv.Error as err:
        if not exhausted:
            raise ValueError(f"{path}: cannot resume, line {reader.line_num} is not a CSV record written by "
                             f"`pneumoscope predict` ({err})") from None
    return complete


# ------------------------------------------------------------------ file names in records
_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_ESCAPED = re.compile(r"\\(x[0-9a-f]{2}|u[0-9a-f]{4}|U[0-9a-f]{8}|[\\nrt])")
_UNESCAPES = {"\\": "\\", "n": "\n", "r": "\r", "t": "\t"}


def escape_name(text: str) -> str:
    """A file name (or a message holding one) as valid, printable UTF-8 on one line, the same in
    every format: a backslash is written `\\\\`; a byte that is not UTF-8 (which os.fsdecode keeps
    as a lone surrogate) `\\xNN`; a newline, carriage return, tab `\\n`, `\\r`, `\\t`; any other
    character that is not printable (controls, format characters such as a right-to-left
    override) `\\uNNNN` or `\\UNNNNNNNN`. Names without any of these are unchanged, and
    `unescape_name` gives back the exact name."""
    if text.isprintable() and "\\" not in text:
        return text  # isprintable is False for surrogates and controls: the common case is one scan
    return "".join(_escape_char(c) for c in text)


def _escape_char(char: str) -> str:
    if char in _ESCAPES:
        return _ESCAPES[char]
    if "\udc80" <= char <= "\udcff":  # os.fsdecode's stand-in for the byte 0x80-0xff
        return f"\\x{ord(char) - 0xdc00:02x}"
    if char.isprintable():
        return char
    return f"\\u{ord(char):04x}" if ord(char) <= 0xffff else f"\\U{ord(char):08x}"


def unescape_name(text: str) -> str:
    """The inverse of `escape_name`: the name as os.fsdecode gives it."""
    if "\\" not in text:
        return text

    def one(match: re.Match) -> str:
        code = match.group(1)
        if code[0] == "x":
            return chr(0xdc00 + int(code[1:], 16))
        if code[0] in "uU":
            return chr(int(code[1:], 16))
        return _UNESCAPES[code]

    return _ESCAPED.sub(one, text)


# ------------------------------------------------------------------ writing
def record_writer(fmt: str, classes, stream: TextIO = sys.stdout, header: bool = True
                  ) -> Callable[[Record], None]:
    """A function writing one record in `fmt` (JSON lines, CSV or an aligned table) to `stream`,
    its path and error through `escape_name`."""
    if fmt == "json":
        return lambda r: stream.write(json.dumps(_escaped(r).to_dict()) + "\n")
    if fmt == "csv":
        writer = csv.writer(stream)
        if header:
            writer.writerow(["path", "status", "label", *[f"p_{c}" for c in classes], "error", "reliable", "warnings"])

        def row(r: Record) -> None:
            r = _escaped(r)
            probabilities = [f"{r.probabilities[c]:.4f}" if r.probabilities else "" for c in classes]
            writer.writerow([r.path, r.status, r.label or "", *probabilities, r.error or "",
                             "" if r.reliable is None else str(r.reliable).lower(), "; ".join(r.warnings)])
        return row
    print(f"{'label':<10}" + "".join(f"{c:>11}" for c in classes) + "  path", file=stream)

    def table(r):
        r = _escaped(r)
        if r.status != "ok":
            print(f"{'ERROR':<10}{'':>{11 * len(classes)}}  {r.error}", file=stream)
        else:
            flag = "" if r.reliable else "  [not a chest X-ray?]"
            print(f"{r.label:<10}" + "".join(f"{r.probabilities[c]:>11.4f}" for c in classes) + f"  {r.path}{flag}",
                  file=stream)
    return table


def _escaped(record: Record) -> Record:
    from dataclasses import replace

    return replace(record, path=escape_name(record.path),
                   error=None if record.error is None else escape_name(record.error))
