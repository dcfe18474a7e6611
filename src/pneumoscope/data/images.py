"""The one image decoder: any file or array -> 8-bit grayscale pixels, or a one-line reason why not.

Every caller (training cache, evaluation, prediction, server) goes through `read_xray`, so a file
is decoded, windowed and converted to grayscale in exactly one way.

Decoding is bounded before anything is allocated: the file is read only if it is a regular file
and at most MAX_FILE_BYTES long; the image's shape is read from its header (Pillow opens lazily,
pydicom parses the header without decoding pixels) and refused over MAX_PIXELS or
MAX_ASPECT_RATIO, and what decoding it allocates (the pixels plus a pointer a row, libjpeg's
coefficient buffers, the resampling tables) is estimated from the header and refused over
MAX_DECODED_BYTES; only the first frame is decoded; a deflated DICOM is inflated with a bound.
Images over DECODE_PIXELS are reduced while decoding (JPEG in the DCT with `draft`) or right
after, so memory follows what the model and the input guard need, not what the file claims.

The work is bounded too, since a small file can ask for much of it: JPEG scans are counted before
decoding (MAX_JPEG_SCANS, MAX_SCAN_PIXELS), pages are counted only up to MAX_COUNTED_FRAMES,
Pillow's decoders written in Python get at most SLOW_DECODER_PIXELS, and parsing in Python (Pillow's
and pydicom's) may read the file only so many times (`_Budget`). At most DECODE_SLOTS decodes
run at once in a process, so the bound on one file's memory does not multiply with threads.
Any exception a decoder raises on a crafted or broken file becomes an ImageReadError naming it.
"""
from __future__ import annotations

import ctypes
import functools
import io
import math
import os
import re
import stat
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, JpegImagePlugin, UnidentifiedImageError

from ..core.config import INPUT_STEPS

# The limits. A chest radiograph is at most ~18.5 megapixels (a 43 x 43 cm detector at 0.1 mm),
# 12-16 bits a sample, one frame, a few to ~40 MiB on disk. Each limit keeps the worst file it
# lets through under 400 MiB of peak memory (measured: tests/test_images.py, docs/inputs.md).
MAX_FILE_BYTES = 128 * 2**20  # bytes read from a file (also the most a deflated DICOM may inflate to)
MAX_PIXELS = 50_000_000  # pixels of a frame, read from the header: 2.7x the largest radiograph
MAX_ASPECT_RATIO = 10  # longer side / shorter side (a stitched long-leg film is ~3.6): Pillow keeps a pointer a
#   row and its resampling tables grow with the sides, so a 1 x 50,000,000 px PNG took +1.2 GiB
MAX_DECODED_BYTES = 128 * 2**20  # what decoding one frame allocates, estimated from its header: a 50 MP 16-bit
#   frame fits, as does a 50 MP progressive gray JPEG (Pillow keeps colour at 4 bytes a pixel; progressive JPEG
#   adds 2 bytes a sample of coefficients at full size, whatever the `draft` scale)
MAX_JPEG_SCANS = 100  # libjpeg writes 6-10 scans, other encoders ~20; each scan is a pass over the coefficients
MAX_SCAN_PIXELS = 16 * MAX_PIXELS  # scans x pixels: 100 refinement scans over 50 MP took 3.1 s in libjpeg
MAX_COUNTED_FRAMES = 100  # pages counted for the "first frame used" warning; past it "over 100"
SLOW_DECODER_PIXELS = 2048 * 2048  # Pillow's decoders written in Python (BMP RLE, plain PPM): ~100 ns a pixel
BASE_READS = 10_000  # parsing may read a file this many times, plus once per READ_BYTES of it (`_Budget`):
READ_BYTES = {"pillow": 64, "dicom": 512}  # pydicom's reads cost ~8 us, Pillow's 0.3-1 us; real files use < 300
DECODE_SLOTS = 2  # decodes at once in one process; more threads wait, so memory is bounded by 2 files' worth
TRIM_BYTES = 32 * 2**20  # after a decode estimated over this, freed memory goes back to the system (malloc_trim)
MAX_INFLATE_RATIO = 50  # deflated DICOM: a 12-bit X-ray deflates ~2.4x, zeros ~1000x
DECODE_PIXELS = 2048 * 2048  # larger images are reduced to this while decoding: the model needs 224 px,
#   the guard's statistics keep >= 1024 px on the short side up to a 4:1 aspect ratio
DICOM_SUFFIXES = {".dcm", ".dicom"}
# Formats handed to Pillow (JPEG includes multi-picture MPO). Others it knows (EPS runs Ghostscript,
# PSD, FITS, ...) are refused.
PILLOW_FORMATS = ("JPEG", "PNG", "BMP", "TIFF", "WEBP", "GIF", "PPM", "JPEG2000")


class ImageReadError(ValueError):
    """A file that cannot be read as an image; the message names the file and says why."""

    def __init__(self, source: str, reason: str):
        self.source, self.reason = source, reason
        super().__init__(f"{source}: {reason}")


class ImageTooLargeError(ImageReadError):
    """An image refused by one of the size or work limits above (a server answers 413, not 422)."""


class _Budget:
    """What one decode may spend. Reads of the file: Pillow's JPEG, PNG, GIF and TIFF parsers and
    pydicom's element reader loop in Python over the pieces of a file (a byte of JPEG junk, a GIF
    sub-block, a PNG chunk, a TIFF tag, a DICOM element), so a file crafted of tiny pieces costs
    microseconds a byte (20 MiB of empty JPEG comments: 5.3 s), while a real file takes a few hundred
    reads (decoders pull 64 KiB at a time). Past the budget a read raises, and the decode is refused
    whatever the parser made of that. Also the bytes the decode was estimated to allocate."""

    def __init__(self, size: int, parser: str = "pillow"):
        self.bytes_per_read = READ_BYTES[parser]
        self.allowed = BASE_READS + size // self.bytes_per_read
        self.left = self.allowed
        self.decoded_bytes = 0  # set by _check_decoded_bytes

    @property
    def exceeded(self) -> bool:
        return self.left < 0

    def grant(self, size: int = 0, reads: int = 0) -> None:
        """More reads: for data the file expands into (a deflated DICOM's inflated bytes), or for a
        decoder in Python, whose reads are bounded by its pixels (SLOW_DECODER_PIXELS)."""
        self.allowed += size // self.bytes_per_read + reads
        self.left += size // self.bytes_per_read + reads

    def stream(self, data: bytes) -> io.BytesIO:
        """The data as a file for a parser, each read spending one of the budget's."""
        return _BudgetedStream(data, self)

    def error(self, label: str) -> ImageTooLargeError:
        return ImageTooLargeError(label, f"parsing takes over {self.allowed:,} reads of the file ({BASE_READS:,} + "
                                         f"one per {self.bytes_per_read} bytes): too costly to decode")


class _TooManyReads(Exception):
    """Raised inside Pillow or pydicom by a `_BudgetedStream`: none of the exceptions they catch."""


class _BudgetedStream(io.BytesIO):
    def __init__(self, data: bytes, budget: _Budget):
        super().__init__(data)
        self.budget = budget

    def read(self, size: int | None = -1) -> bytes:
        self.budget.left -= 1
        if self.budget.left < 0:
            raise _TooManyReads
        return super().read(size)


_decode_slots = threading.BoundedSemaphore(DECODE_SLOTS)


def read_xray(source: str | os.PathLike | bytes | np.ndarray, name: str | None = None) -> np.ndarray:
    """Reads a path, raw bytes or an array as an HxW uint8 grayscale image.

    `name` labels the source in error messages (defaults to the path, or '<bytes>').
    """
    return read_xray_with_info(source, name)[0]


def read_xray_with_info(source: str | os.PathLike | bytes | np.ndarray, name: str | None = None
                        ) -> tuple[np.ndarray, dict]:
    """`read_xray`, plus what the decoding did that the pixels do not show:

    info["colour"]: the mean spread between the colour channels of the source (0 for gray
        sources; see `colour_spread`);
    info["size"]: (width, height) as stored, before any reduction (None for arrays);
    info["frames"]: the number of frames or pages in the file (only the first is decoded);
    info["warnings"]: sentences for the prediction record, e.g. "first frame used (12 frames)".
    """
    info = {"colour": 0.0, "size": None, "frames": 1, "warnings": []}
    label = name or describe_source(source)
    budget = _Budget(0)
    try:
        with _decode_slots:  # the file's bytes and every buffer decoding them are held inside a slot
            try:
                if isinstance(source, np.ndarray):
                    return to_uint8_gray(source, label, info), info
                data = bytes(source) if isinstance(source, (bytes, bytearray, memoryview)) else _read_file(Path(source), label)
                if len(data) > MAX_FILE_BYTES:
                    raise ImageTooLargeError(label, _over("file is", len(data), MAX_FILE_BYTES))
                if not data:
                    raise ImageReadError(label, "empty file")
                if _looks_like_dicom(data, label):
                    budget = _Budget(len(data), "dicom")
                    return _read_dicom(data, label, info, budget), info
                budget = _Budget(len(data), "pillow")
                return _read_pillow(data, label, info, budget), info
            finally:
                if budget.decoded_bytes > TRIM_BYTES:
                    _return_freed_memory()
    except Exception as err:  # pydicom and Pillow raise anything (NotImplementedError, KeyError, struct.error...) on crafted files
        raise _image_error(err, label, budget) from None


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc
    except (OSError, AttributeError):  # another C library: nothing to call
        return None


def _return_freed_memory() -> None:
    """Gives the memory a large decode freed back to the system. glibc keeps freed blocks below 32
    MiB (Pillow's image blocks are 16 MiB) in the heap of the thread's arena, one arena per thread
    up to 8 per core, so without this the peak of N threads' decodes, one slot at a time, grew with
    N: 16 threads, 2 slots, 16 MP 16-bit PNGs: 3.2 decodes' worth, 2.0 with it (~0.5 ms a call)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _image_error(err: Exception, label: str, budget: _Budget) -> ImageReadError:
    if budget.exceeded:  # whatever a parser made of the refused read
        return budget.error(label)
    if isinstance(err, ImageReadError):
        return err
    if isinstance(err, MemoryError):  # the allocation that failed was this image's: it is freed, the caller goes on
        return ImageTooLargeError(label, "not enough memory to decode this image")
    return ImageReadError(label, f"cannot decode image ({_one_line(err)})")


def describe_source(source) -> str:
    """How a source is named in records and errors when no name is given: the path, or <array> / <bytes>."""
    if isinstance(source, np.ndarray):
        return "<array>"
    return "<bytes>" if isinstance(source, (bytes, bytearray, memoryview)) else str(source)


def _one_line(err: BaseException, limit: int = 200) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def _over(what: str, size: int, limit: int) -> str:
    return f"{what} {size / 2**20:.1f} MiB, over the {limit / 2**20:g} MiB limit"


def _read_file(path: Path, label: str) -> bytes:
    """The bytes of a regular file, never more than MAX_FILE_BYTES + 1 of them.

    Opened non-blocking (opening a FIFO must not wait for a writer) and checked with fstat on the
    open descriptor (after symlinks are resolved, with no window for a swap): a FIFO, socket or
    device (a symlink to /dev/zero reports size 0 and never ends) is refused unread.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise ImageReadError(label, "no such file") from None
    except PermissionError:
        raise ImageReadError(label, "permission denied") from None
    except IsADirectoryError:
        raise ImageReadError(label, "is a directory, not an image file") from None
    except OSError as err:
        raise ImageReadError(label, f"cannot read file ({err.strerror or err})") from None
    try:
        _check_regular(os.fstat(fd), label)
        with os.fdopen(fd, "rb", buffering=0, closefd=False) as stream:
            return _read_at_most(stream, MAX_FILE_BYTES + 1, os.fstat(fd).st_size)
    except OSError as err:
        raise ImageReadError(label, f"cannot read file ({err.strerror or err})") from None
    finally:
        os.close(fd)


def _check_regular(status: os.stat_result, label: str) -> None:
    if stat.S_ISDIR(status.st_mode):
        raise ImageReadError(label, "is a directory, not an image file")
    if not stat.S_ISREG(status.st_mode):
        raise ImageReadError(label, "not a regular file (a FIFO, device or socket)")
    if status.st_size > MAX_FILE_BYTES:
        raise ImageTooLargeError(label, _over("file is", status.st_size, MAX_FILE_BYTES))


def _read_at_most(stream, limit: int, expected: int) -> bytes:
    """Reads to the end or to `limit` bytes, whatever the file's size said (it may grow, or be /proc)."""
    chunks, total, step = [], 0, max(expected + 1, 2**20)  # a regular file in one read
    while total < limit:
        chunk = stream.read(min(limit - total, step))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)  # one chunk for a regular file: no copy


def _looks_like_dicom(data: bytes, label: str) -> bool:
    return data[128:132] == b"DICM" or Path(label).suffix.lower() in DICOM_SUFFIXES


def _check_shape(label: str, width: int, height: int) -> None:
    """Refuses, from the header alone, a frame with no pixels, too many, or a shape no radiograph has."""
    if width <= 0 or height <= 0:
        raise ImageReadError(label, "image has no pixels")
    if width * height > MAX_PIXELS:
        raise ImageTooLargeError(label, f"image is {width}x{height}, over the {MAX_PIXELS:,}-pixel limit")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ImageTooLargeError(label, f"image is {width}x{height}, over the {MAX_ASPECT_RATIO}:1 aspect ratio limit")


def _check_decoded_bytes(label: str, width: int, height: int, decoded: int, what: str, budget: _Budget) -> None:
    """Refuses, before decoding, a frame whose decoding would allocate over MAX_DECODED_BYTES."""
    budget.decoded_bytes = max(budget.decoded_bytes, decoded)
    if decoded > MAX_DECODED_BYTES:
        raise ImageTooLargeError(label, _over(f"image is {width}x{height} ({what}): decoding it takes", decoded,
                                              MAX_DECODED_BYTES))


def _image_bytes(width: int, height: int, bytes_per_pixel: int) -> int:
    """An image as Pillow stores it: its pixels and a pointer a row (numpy arrays need less)."""
    return height * (width * bytes_per_pixel + 8)


def _resize_bytes(source: tuple[int, int], target: tuple[int, int], bytes_per_pixel: int) -> int:
    """A reduction with Pillow: the target image and, per axis, the resampling tables (a weight per
    source pixel in double and fixed point, bounds per target pixel), which grow with the sides."""
    if source == target:
        return 0
    tables = sum(16 * (s + 4 * t) for s, t in zip(source, target))
    return tables + _image_bytes(*target, bytes_per_pixel)


def _note_frames(info: dict, frames: int) -> None:
    info["frames"] = frames
    if frames > MAX_COUNTED_FRAMES:
        info["warnings"].append(f"first frame used (over {MAX_COUNTED_FRAMES} frames)")
    elif frames > 1:
        info["warnings"].append(f"first frame used ({frames} frames)")


def _reduced_size(width: int, height: int) -> tuple[int, int]:
    """The size an image over DECODE_PIXELS is brought down to (aspect ratio kept)."""
    scale = min(1.0, math.sqrt(DECODE_PIXELS / (width * height)))
    return max(1, int(width * scale)), max(1, int(height * scale))


# ------------------------------------------------------------------ Pillow formats
def _pillow_bytes_per_pixel(mode: str) -> int:
    """What Pillow allocates per pixel: 1 byte for 1/L/P, 2 for I;16*, 4 for every other mode
    (multi-band images are stored 4 bytes a pixel)."""
    if mode in ("1", "L", "P"):
        return 1
    return 2 if mode.startswith("I;16") else 4


def _read_pillow(data: bytes, label: str, info: dict, budget: _Budget) -> np.ndarray:
    try:
        image = Image.open(budget.stream(data), formats=PILLOW_FORMATS)  # lazy: reads the header only
    except UnidentifiedImageError:
        raise ImageReadError(label, "not a recognised image format") from None
    except Image.DecompressionBombError as err:  # Pillow's own pixel limit, if set below ours
        raise ImageTooLargeError(label, _one_line(err)) from None
    except Exception as err:  # Pillow raises many types on garbage headers
        raise ImageReadError(label, f"cannot open image ({_one_line(err)})") from None
    info["size"] = stored = image.size
    _check_shape(label, *stored)
    try:
        _note_frames(info, _count_frames(image, data))
        image.seek(0)
        image.draft(None, _reduced_size(*stored))  # JPEG: decoded at 1/2, 1/4 or 1/8 scale; others: no-op
    except Exception as err:
        raise ImageReadError(label, f"cannot open image ({_one_line(err)})") from None
    _check_decoding_work(label, image, data, stored, budget)
    decoded = _pillow_decoding_bytes(image, data, stored) + _resize_bytes(
        image.size, _reduced_size(*image.size), _pillow_bytes_per_pixel(image.mode))
    _check_decoded_bytes(label, *stored, decoded, f"{image.mode} decoded at {image.size[0]}x{image.size[1]}", budget)
    try:
        image.load()
        image = _shrink(image)
        ImageOps.exif_transpose(image, in_place=True)  # after shrinking: the transpose copy is small
    except Exception as err:
        raise ImageReadError(label, f"truncated or corrupt image data ({_one_line(err)})") from None
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return to_uint8_gray(np.asarray(image), label)
    return to_uint8_gray(np.asarray(_to_luminance(image, info)), label)


def _count_frames(image: Image.Image, data: bytes) -> int:
    """Frames or pages of the file, from what its format makes cheap: a TIFF's chain of IFDs is
    walked here up to MAX_COUNTED_FRAMES + 1 (Pillow's `n_frames` parses every IFD and looks each
    one up in a list of the ones before: 100,000 chained IFDs took 55 s); PNG, MPO and WebP state
    the count in their header; GIF walks its blocks within the read budget."""
    if image.format == "TIFF":
        return _tiff_pages(data, MAX_COUNTED_FRAMES + 1)
    return getattr(image, "n_frames", 1)


def _tiff_pages(data: bytes, limit: int) -> int:
    """The IFDs chained from a TIFF header (classic or BigTIFF), read as offsets only, up to `limit`."""
    order = "<" if data[:2] == b"II" else ">"
    big = struct.unpack_from(order + "H", data, 2)[0] == 43
    count, entry, pointer = ("Q", 20, "Q") if big else ("H", 12, "I")
    offset, seen = struct.unpack_from(order + pointer, data, 8 if big else 4)[0], set()
    while offset and offset not in seen and len(seen) < limit:
        seen.add(offset)
        try:
            entries = struct.unpack_from(order + count, data, offset)[0]
            offset = struct.unpack_from(order + pointer, data, offset + struct.calcsize(count) + entries * entry)[0]
        except struct.error:  # the chain runs out of the file: Pillow stops there too
            break
    return max(1, len(seen))


def _check_decoding_work(label: str, image: Image.Image, data: bytes, stored: tuple[int, int],
                         budget: _Budget) -> None:
    """Refuses, before decoding, an image whose decoding costs far more CPU than its pixels: a
    JPEG of many scans (each one a pass over the whole image), or a large one for a decoder in
    Python, which may then read twice a pixel (RLE reads a byte pair at a time)."""
    if isinstance(image, JpegImagePlugin.JpegImageFile):
        _check_jpeg_scans(label, data, *stored)
    slow = [tile[0] for tile in image.tile if tile[0] in Image.DECODERS]  # registered by plugins in Python
    if slow:
        pixels = image.size[0] * image.size[1]
        if pixels > SLOW_DECODER_PIXELS:
            raise ImageTooLargeError(label, f"image is {image.size[0]}x{image.size[1]} for Pillow's '{slow[0]}' "
                                            f"decoder, written in Python: over its {SLOW_DECODER_PIXELS:,}-pixel limit")
        budget.grant(reads=2 * pixels)


def _check_jpeg_scans(label: str, data: bytes, width: int, height: int) -> None:
    """Scans are counted as start-of-scan markers in the whole file (a marker cannot hide in coded
    data, where 0xFF is stuffed; an EXIF thumbnail's own scans count too: an upper bound)."""
    scans = data.count(b"\xff\xda")
    if scans > MAX_JPEG_SCANS or scans * width * height > MAX_SCAN_PIXELS:
        raise ImageTooLargeError(label, f"JPEG of {width}x{height} with {scans} scans: over the limit of "
                                        f"{MAX_JPEG_SCANS} scans and {MAX_SCAN_PIXELS:,} scan-pixels")


def _pillow_decoding_bytes(image: Image.Image, data: bytes, stored: tuple[int, int]) -> int:
    """What decoding `image` allocates: the image at the size it decodes to (after `draft`) and,
    for a JPEG that libjpeg must hold whole before its inverse DCT (progressive, or a first scan
    without every component), the coefficients of the full frame, whatever the `draft` scale."""
    total = _image_bytes(*image.size, _pillow_bytes_per_pixel(image.mode))
    if isinstance(image, JpegImagePlugin.JpegImageFile) and (
            image.info.get("progressive") or _jpeg_first_scan_components(data) < len(image.layer)):
        total += _jpeg_coefficient_bytes(image.layer, *stored)
    return total


def _jpeg_coefficient_bytes(layer: list[tuple[int, int, int, int]], width: int, height: int) -> int:
    """libjpeg's whole-image coefficient buffers: 64 two-byte coefficients per 8 x 8 block of each
    component at its sampling (Pillow's `layer`: id, horizontal, vertical factor, table)."""
    h_max, v_max = max(max(h, 1) for _, h, _, _ in layer), max(max(v, 1) for _, _, v, _ in layer)
    total = 0
    for _, h, v, _ in layer:
        h, v = max(h, 1), max(v, 1)
        columns = -(-math.ceil(math.ceil(width * h / h_max) / 8) // h) * h  # blocks, rounded up to the sampling
        rows = -(-math.ceil(math.ceil(height * v / v_max) / 8) // v) * v
        total += columns * rows * 128
    return total


_JPEG_MARKER = re.compile(rb"\xff+([^\x00\xff\xd0-\xd7])")  # after fill bytes; not a stuffed 0xFF, not a restart


def _jpeg_first_scan_components(data: bytes) -> int:
    """The number of components in the first scan (0 if none is found), walking the segments
    before it by their lengths, as libjpeg does."""
    position = 2
    for _ in range(BASE_READS):  # Pillow's parser went through as many markers, within the read budget
        found = _JPEG_MARKER.search(data, position)
        if found is None or found[1][0] in (0xD8, 0xD9):
            return 0
        marker, position = found[1][0], found.end()
        if marker == 0xDA:
            return data[position + 2] if position + 2 < len(data) else 0
        if marker != 0x01:  # TEM has no length
            position += int.from_bytes(data[position:position + 2], "big")
    return 0


def _shrink(image: Image.Image) -> Image.Image:
    """Area-averages an image over DECODE_PIXELS down to it; palette and 1-bit images are sampled
    (averaging palette indices means nothing, and a drawing must stay one)."""
    size = _reduced_size(*image.size)
    if size == image.size:
        return image
    nearest = image.mode in ("1", "P", "PA")
    return image.resize(size, Image.Resampling.NEAREST if nearest else Image.Resampling.BOX)


def _to_luminance(image: Image.Image, info: dict | None = None) -> Image.Image:
    """Colour, alpha and palette images become 8-bit luminance (alpha composited on black)."""
    if image.mode == "L":
        return image
    if info is not None and (len(image.getbands()) >= 3 or image.mode in ("P", "PA")):
        info["colour"] = colour_spread(image)
    if image.mode in ("LA", "RGBA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("L")
    return image.convert("L")


# ------------------------------------------------------------------ DICOM
def _read_dicom(data: bytes, label: str, info: dict, budget: _Budget) -> np.ndarray:
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, pixel_array

    ds = _dicom_dataset(data, label, budget)
    if not any(key in ds for key in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise ImageReadError(label, "DICOM file has no pixel data")
    rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    samples, bits = int(ds.get("SamplesPerPixel") or 1), int(ds.get("BitsAllocated") or 16)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    info["size"] = (cols, rows)
    _check_shape(label, cols, rows)
    _check_decoded_bytes(label, cols, rows, _dicom_decoding_bytes(cols, rows, samples, bits),
                         f"{samples} x {bits}-bit sample{'s' if samples > 1 else ''} a pixel", budget)
    _note_frames(info, int(ds.get("NumberOfFrames") or 1))
    _check_compressed_frame(ds, rows, cols, samples, info["frames"], label, budget)
    if photometric == "PALETTE COLOR":
        _check_palette(ds, label)
    try:
        # The first frame only; uncompressed, where pydicom can, as a read-only view of the pixel data.
        pixels = pixel_array(ds, index=0, view_only=_viewable(ds, bits, photometric))
        if photometric == "PALETTE COLOR":  # indices into the palette: sampled, never averaged, then looked up
            pixels = apply_color_lut(_shrink_array(pixels, sample=True), ds)
        else:
            pixels = _shrink_array(pixels)
        if photometric.startswith("MONOCHROME"):
            pixels = apply_modality_lut(pixels, ds)
            pixels = apply_voi_lut(pixels, ds)
    except ImageReadError:
        raise
    except Exception as err:
        raise ImageReadError(label, f"cannot decode DICOM pixel data ({_one_line(err)})") from None
    gray = to_uint8_gray(np.array(pixels, copy=not pixels.flags.writeable), label, info)  # colour: as any picture
    if photometric == "MONOCHROME1":  # white means low attenuation: invert to look like MONOCHROME2
        gray = 255 - gray
    return gray


def _viewable(ds, bits: int, photometric: str) -> bool:
    """Whether pydicom can give the frame as a view of its pixel data, without a copy (and without
    logging a warning that it cannot): all bits stored, no colour conversion (YBR to RGB)."""
    return int(ds.get("BitsStored") or bits) == bits and not photometric.startswith("YBR")


def _dicom_decoding_bytes(width: int, height: int, samples: int, bits: int) -> int:
    """What decoding a DICOM frame allocates: the frame as an array and, when it is reduced, the
    float32 sums of the reduction (pydicom's copy of the pixel data is part of the file's cost)."""
    frame = width * height * samples * math.ceil(bits / 8)
    factor = math.ceil(math.sqrt(width * height / DECODE_PIXELS))
    return frame + (0 if factor <= 1 else (width // factor) * (height // factor) * samples * 4)


def _check_palette(ds, label: str) -> None:
    """A PALETTE COLOR frame holds indices into the colour palette of its header: without a palette
    (or with a segmented one, whose expansion pydicom does not bound) it cannot be shown."""
    channels = ("Red", "Green", "Blue")
    if all(f"Segmented{c}PaletteColorLookupTableData" in ds for c in channels):
        raise ImageReadError(label, "PALETTE COLOR DICOM with a segmented palette: not supported")
    if not all(f"{c}PaletteColorLookupTable{part}" in ds for c in channels for part in ("Descriptor", "Data")):
        raise ImageReadError(label, "PALETTE COLOR DICOM without its palette (the Red, Green and Blue Palette Color "
                                    "Lookup Table Descriptor and Data)")


def open_dicom(data: bytes, label: str):
    """The pydicom dataset of a DICOM file's bytes (pixels not decoded; a deflated dataset inflated
    with a bound; parsed within a read budget), or an ImageReadError naming `label`. For callers
    that check attributes first (the DICOM node); the pixels still go through `read_xray`."""
    budget = _Budget(len(data), "dicom")
    try:
        return _dicom_dataset(data, label, budget)
    except ImageReadError as err:
        raise _image_error(err, label, budget) from None


def _dicom_dataset(data: bytes, label: str, budget: _Budget):
    """pydicom's dcmread, except that a deflated dataset is inflated here, with a bound: pydicom
    inflates it in one unbounded zlib call (a 1 MiB upload inflated to 1 GiB: +2 GiB of memory)."""
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.filereader import read_dataset, read_preamble
    from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

    try:
        stream = budget.stream(data)
        preamble = read_preamble(stream, force=True)
        meta = FileMetaDataset(read_dataset(stream, is_implicit_VR=False, is_little_endian=True,
                                            stop_when=lambda tag, vr, length: tag >> 16 != 2))
        if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
            return pydicom.dcmread(budget.stream(data), force=True)
        inflated = _inflate(data[stream.tell():], label)
        meta.TransferSyntaxUID = ExplicitVRLittleEndian  # what the inflated bytes are
        budget.grant(len(inflated))
        dataset = read_dataset(budget.stream(inflated), is_implicit_VR=False, is_little_endian=True)
        return FileDataset(label, dataset, preamble=preamble, file_meta=meta,
                           is_implicit_VR=False, is_little_endian=True)
    except ImageReadError:
        raise
    except Exception as err:
        raise ImageReadError(label, f"not a readable DICOM file ({_one_line(err)})") from None


def _inflate(deflated: bytes, label: str) -> bytes:
    limit = min(MAX_FILE_BYTES, max(MAX_INFLATE_RATIO * len(deflated), 2**20))
    inflated = zlib.decompressobj(-zlib.MAX_WBITS).decompress(deflated, limit + 1)  # stops at limit + 1
    if len(inflated) > limit:
        raise ImageTooLargeError(label, f"deflated DICOM expands over {limit / 2**20:.1f} MiB (the limit is "
                                        f"{MAX_INFLATE_RATIO}x the {len(deflated) / 2**20:.2f} MiB deflated, "
                                        f"at most {MAX_FILE_BYTES / 2**20:g} MiB)")
    return inflated


def _check_compressed_frame(ds, rows: int, cols: int, samples: int, frames: int, label: str,
                            budget: _Budget) -> None:
    """A JPEG or JPEG 2000 frame is decoded (by pydicom, with Pillow) at the size and with the
    components its own header states, which need not be the DICOM header's: read that header
    (Pillow opens lazily) and refuse a frame larger than Rows x Columns, with other components
    than SamplesPerPixel, or whose decoding at full size (pydicom does not `draft`), with its
    coefficient buffers and the copy pydicom takes of it, passes the limits of a Pillow image."""
    from pydicom.encaps import get_frame

    if "PixelData" not in ds or not ds.file_meta.get("TransferSyntaxUID", None) \
            or not ds.file_meta.TransferSyntaxUID.is_compressed:
        return
    frame = get_frame(ds.PixelData, 0, number_of_frames=frames)
    try:
        image = Image.open(budget.stream(frame), formats=("JPEG", "JPEG2000"))  # the formats pydicom gives Pillow
    except Exception:  # RLE, JPEG-LS...: decoded by pydicom to Rows x Columns, already checked
        if budget.exceeded:
            raise
        return
    width, height = image.size
    if width * height > rows * cols:
        raise ImageTooLargeError(label, f"compressed frame is {width}x{height}, larger than the "
                                        f"{cols}x{rows} of the DICOM header")
    if len(image.getbands()) != samples:
        raise ImageReadError(label, f"compressed frame has {len(image.getbands())} components ({image.mode}), the "
                                    f"DICOM header says {samples} sample{'s' if samples > 1 else ''} a pixel")
    _check_decoding_work(label, image, frame, image.size, budget)
    copy = width * height * _pillow_bytes_per_pixel(image.mode)  # pydicom's tobytes()
    _check_decoded_bytes(label, width, height, _pillow_decoding_bytes(image, frame, image.size) + copy,
                         f"{image.mode} frame decoded at full size", budget)


def _shrink_array(pixels: np.ndarray, sample: bool = False) -> np.ndarray:
    """Area-averages a decoded frame (H x W or H x W x C) by a whole factor to at most
    DECODE_PIXELS, keeping its dtype, before any LUT makes a float copy of it. `sample` takes
    every factor-th pixel instead (palette indices: their average means nothing)."""
    height, width = pixels.shape[:2]
    factor = min(math.ceil(math.sqrt(height * width / DECODE_PIXELS)), height, width)
    if factor <= 1:
        return pixels
    if sample:
        return np.ascontiguousarray(pixels[::factor, ::factor])
    height, width = height // factor * factor, width // factor * factor  # drops < factor edge pixels
    mean = np.zeros((height // factor, width // factor, *pixels.shape[2:]), np.float32)
    for dy in range(factor):  # strided views: no copy of the frame (a reshape of a cropped view makes one)
        for dx in range(factor):
            mean += pixels[dy:height:factor, dx:width:factor]  # float32 is exact: <= 16 integers below 2**24
    mean /= factor * factor
    return (np.rint(mean, out=mean) if pixels.dtype.kind in "iub" else mean).astype(pixels.dtype)


def to_uint8_gray(pixels: np.ndarray, label: str, info: dict | None = None) -> np.ndarray:
    """Any 2-D or HxWxC array -> HxW uint8. 8-bit data is kept as is; deeper data is stretched
    from its own minimum to its maximum (a 12-bit detector rarely fills 16 bits)."""
    pixels = np.asarray(pixels)
    if pixels.ndim == 3 and pixels.shape[2] in (1, 3, 4):
        if pixels.dtype != np.uint8:
            pixels = _stretch(pixels.astype(np.float64))
        mode = {1: "L", 3: "RGB", 4: "RGBA"}[pixels.shape[2]]
        image = Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode)
        return np.asarray(_to_luminance(image, info))
    if pixels.ndim != 2:
        raise ImageReadError(label, f"expected a 2-D image, got an array of shape {pixels.shape}")
    if pixels.size == 0:
        raise ImageReadError(label, "image has no pixels")
    if pixels.dtype == np.uint8:
        return pixels
    if pixels.dtype == bool:
        return pixels.astype(np.uint8) * 255
    return _stretch(pixels.astype(np.float64))


def colour_spread(image: Image.Image) -> float:
    """Mean over pixels of (largest - smallest RGB channel) / 255: 0 for a gray picture stored as
    RGB (also after JPEG compression), 0.15-0.45 for ordinary colour photos."""
    rgb = image.convert("RGB")
    rgb.thumbnail((256, 256))  # the statistic needs no more pixels than this
    channels = np.asarray(rgb, dtype=np.int16)
    return float((channels.max(2) - channels.min(2)).mean() / 255)


def _stretch(values: np.ndarray) -> np.ndarray:
    """Float values (a copy, overwritten here: no temporaries the size of the image) -> uint8, from
    their minimum to their maximum."""
    if not np.isfinite(values).all():
        values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0, copy=False)
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, np.uint8)
    values -= low
    values *= 255.0 / (high - low)
    return np.round(values, out=values).astype(np.uint8)


CLAHE_CLIP_LIMIT, CLAHE_TILES = 2.0, 8  # the "clahe" step's contrast limit and tile grid (the card quotes them)


def input_step(pixels: np.ndarray, method: str | None) -> np.ndarray:
    """The model's fixed input step after resizing, on S x S or N x S x S uint8 pixels. "clahe":
    contrast-limited adaptive histogram equalisation (OpenCV; CLAHE_CLIP_LIMIT, CLAHE_TILES squared), which
    evens out the exposure and contrast that differ between sites' machines and post-processing.
    None or "none": the pixels as they are."""
    if method in (None, "none"):
        return pixels
    if method != "clahe":
        raise ValueError(f"unknown input step {method!r}; choose from {', '.join(INPUT_STEPS)}")
    import cv2  # opencv comes with grad-cam

    clahe = cv2.createCLAHE(clipLimit=CLAHE_CLIP_LIMIT, tileGridSize=(CLAHE_TILES, CLAHE_TILES))
    if pixels.ndim == 2:
        return clahe.apply(np.ascontiguousarray(pixels, np.uint8))
    return np.stack([clahe.apply(np.ascontiguousarray(p, np.uint8)) for p in pixels]) if len(pixels) else pixels


def resize_square(gray: np.ndarray, size: int) -> np.ndarray:
    """Squashes to size x size, as the training data was (its aspect ratio was not kept)."""
    if gray.shape == (size, size):
        return gray
    return np.asarray(Image.fromarray(gray).resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0))


def to_batch(pixels: np.ndarray) -> np.ndarray:
    """N x S x S uint8 -> N x 1 x S x S float32 in [0, 1]: the input of every network and graph."""
    return np.ascontiguousarray(pixels, dtype=np.float32)[:, None] / 255
