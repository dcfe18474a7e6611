"""The one image decoder: any file or array -> 8-bit grayscale pixels, or a one-line reason why not.

Every caller (training cache, evaluation, prediction, server) goes through `read_xray`, so a file
is decoded, windowed and converted to grayscale in exactly one way.

Decoding is bounded before anything is allocated: the file is read only if it is a regular file
and at most MAX_FILE_BYTES long; the image's size is read from its header (Pillow opens lazily,
pydicom parses the header without decoding pixels) and refused over MAX_PIXELS or
MAX_DECODED_BYTES; only the first frame is decoded; a deflated DICOM is inflated with a bound.
Images over DECODE_PIXELS are reduced while decoding (JPEG in the DCT with `draft`) or right
after, so memory follows what the model and the input guard need, not what the file claims.
Any exception a decoder raises on a crafted or broken file becomes an ImageReadError naming it.
"""
from __future__ import annotations

import io
import math
import os
import stat
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# The limits. A chest radiograph is at most ~18.5 megapixels (a 43 x 43 cm detector at 0.1 mm),
# 12-16 bits a sample, one frame, a few to ~40 MiB on disk. Each limit keeps the worst file it
# lets through under ~350 MiB of peak memory (measured: tests/test_images.py, docs/inputs.md).
MAX_FILE_BYTES = 128 * 2**20  # bytes read from a file (also the most a deflated DICOM may inflate to)
MAX_PIXELS = 50_000_000  # pixels of a frame, read from the header: 2.7x the largest radiograph
MAX_DECODED_BYTES = 100 * 2**20  # one frame as decoded: a 50 MP 16-bit frame; Pillow keeps colour at 4 bytes a pixel
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
    """An image refused by one of the size limits above (a server answers 413, not 422)."""


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
    label = name or _describe(source)
    try:
        if isinstance(source, np.ndarray):
            return to_uint8_gray(source, label, info), info
        data = bytes(source) if isinstance(source, (bytes, bytearray, memoryview)) else _read_file(Path(source), label)
        if len(data) > MAX_FILE_BYTES:
            raise ImageTooLargeError(label, _over("file is", len(data), MAX_FILE_BYTES))
        if not data:
            raise ImageReadError(label, "empty file")
        gray = _read_dicom(data, label, info) if _looks_like_dicom(data, label) else _read_pillow(data, label, info)
        return gray, info
    except ImageReadError:
        raise
    except MemoryError:  # the allocation that failed was this image's: it is freed, the caller goes on
        raise ImageTooLargeError(label, "not enough memory to decode this image") from None
    except Exception as err:  # pydicom and Pillow raise anything (NotImplementedError, KeyError, struct.error...) on crafted files
        raise ImageReadError(label, f"cannot decode image ({_one_line(err)})") from None


def _describe(source) -> str:
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


def _check_pixels(label: str, width: int, height: int) -> None:
    """Refuses, from the header alone, a frame with no pixels or too many."""
    if width <= 0 or height <= 0:
        raise ImageReadError(label, "image has no pixels")
    if width * height > MAX_PIXELS:
        raise ImageTooLargeError(label, f"image is {width}x{height}, over the {MAX_PIXELS:,}-pixel limit")


def _check_decoded_bytes(label: str, width: int, height: int, bytes_per_pixel: int) -> None:
    """Refuses, before decoding, a frame whose decoded pixels would pass MAX_DECODED_BYTES."""
    if width * height * bytes_per_pixel > MAX_DECODED_BYTES:
        raise ImageTooLargeError(label, _over(f"image is {width}x{height} at {bytes_per_pixel} bytes a pixel: decoded",
                                              width * height * bytes_per_pixel, MAX_DECODED_BYTES))


def _note_frames(info: dict, frames: int) -> None:
    info["frames"] = frames
    if frames > 1:
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


def _read_pillow(data: bytes, label: str, info: dict) -> np.ndarray:
    try:
        image = Image.open(io.BytesIO(data), formats=PILLOW_FORMATS)  # lazy: reads the header only
    except UnidentifiedImageError:
        raise ImageReadError(label, "not a recognised image format") from None
    except Image.DecompressionBombError as err:  # Pillow's own pixel limit, if set below ours
        raise ImageTooLargeError(label, _one_line(err)) from None
    except Exception as err:  # Pillow raises many types on garbage headers
        raise ImageReadError(label, f"cannot open image ({_one_line(err)})") from None
    info["size"] = image.size
    _check_pixels(label, *image.size)
    _note_frames(info, getattr(image, "n_frames", 1))
    try:
        image.seek(0)
        image.draft(None, _reduced_size(*image.size))  # JPEG: decoded at 1/2, 1/4 or 1/8 scale; others: no-op
    except Exception as err:
        raise ImageReadError(label, f"cannot open image ({_one_line(err)})") from None
    _check_decoded_bytes(label, *image.size, _pillow_bytes_per_pixel(image.mode))  # the size draft decodes to
    try:
        image.load()
        image = _shrink(image)
        ImageOps.exif_transpose(image, in_place=True)  # after shrinking: the transpose copy is small
    except Exception as err:
        raise ImageReadError(label, f"truncated or corrupt image data ({_one_line(err)})") from None
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return to_uint8_gray(np.asarray(image), label)
    return to_uint8_gray(np.asarray(_to_luminance(image, info)), label)


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
def _read_dicom(data: bytes, label: str, info: dict) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut, apply_voi_lut, pixel_array

    ds = _dicom_dataset(data, label)
    if not any(key in ds for key in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise ImageReadError(label, "DICOM file has no pixel data")
    rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    samples, bits = int(ds.get("SamplesPerPixel") or 1), int(ds.get("BitsAllocated") or 16)
    info["size"] = (cols, rows)
    _check_pixels(label, cols, rows)
    _check_decoded_bytes(label, cols, rows, samples * math.ceil(bits / 8))
    _note_frames(info, int(ds.get("NumberOfFrames") or 1))
    _check_compressed_frame(ds, rows, cols, info["frames"], label)
    try:
        pixels = _shrink_array(pixel_array(ds, index=0))  # the first frame only
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
        if photometric.startswith("MONOCHROME"):
            pixels = apply_modality_lut(pixels, ds)
            pixels = apply_voi_lut(pixels, ds)
        elif pixels.ndim == 3:
            pixels = np.asarray(_to_luminance(Image.fromarray(_stretch(pixels.astype(np.float64))), info))
    except ImageReadError:
        raise
    except Exception as err:
        raise ImageReadError(label, f"cannot decode DICOM pixel data ({_one_line(err)})") from None
    gray = to_uint8_gray(np.asarray(pixels), label)
    if photometric == "MONOCHROME1":  # white means low attenuation: invert to look like MONOCHROME2
        gray = 255 - gray
    return gray


def open_dicom(data: bytes, label: str):
    """The pydicom dataset of a DICOM file's bytes (pixels not decoded; a deflated dataset inflated
    with a bound), or an ImageReadError naming `label`. For callers that check attributes first
    (the DICOM node); the pixels still go through `read_xray`."""
    return _dicom_dataset(data, label)


def _dicom_dataset(data: bytes, label: str):
    """pydicom's dcmread, except that a deflated dataset is inflated here, with a bound: pydicom
    inflates it in one unbounded zlib call (a 1 MiB upload inflated to 1 GiB: +2 GiB of memory)."""
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.filereader import read_dataset, read_preamble
    from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

    try:
        stream = io.BytesIO(data)
        preamble = read_preamble(stream, force=True)
        meta = FileMetaDataset(read_dataset(stream, is_implicit_VR=False, is_little_endian=True,
                                            stop_when=lambda tag, vr, length: tag >> 16 != 2))
        if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
            return pydicom.dcmread(io.BytesIO(data), force=True)
        inflated = _inflate(data[stream.tell():], label)
        meta.TransferSyntaxUID = ExplicitVRLittleEndian  # what the inflated bytes are
        dataset = read_dataset(io.BytesIO(inflated), is_implicit_VR=False, is_little_endian=True)
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


def _check_compressed_frame(ds, rows: int, cols: int, frames: int, label: str) -> None:
    """A JPEG or JPEG 2000 frame is decoded at the size its own header states, which need not be
    the DICOM header's Rows x Columns: read it (Pillow opens lazily) and refuse a larger one."""
    from pydicom.encaps import get_frame

    if "PixelData" not in ds or not ds.file_meta.get("TransferSyntaxUID", None) \
            or not ds.file_meta.TransferSyntaxUID.is_compressed:
        return
    frame = get_frame(ds.PixelData, 0, number_of_frames=frames)
    try:
        width, height = Image.open(io.BytesIO(frame)).size
    except Exception:  # RLE, JPEG-LS...: decoded by pydicom to Rows x Columns, already checked
        return
    if width * height > rows * cols:
        raise ImageTooLargeError(label, f"compressed frame is {width}x{height}, larger than the "
                                        f"{cols}x{rows} of the DICOM header")


def _shrink_array(pixels: np.ndarray) -> np.ndarray:
    """Area-averages a decoded frame (H x W or H x W x C) by a whole factor to at most
    DECODE_PIXELS, keeping its dtype, before any LUT makes a float copy of it."""
    height, width = pixels.shape[:2]
    factor = min(math.ceil(math.sqrt(height * width / DECODE_PIXELS)), height, width)
    if factor <= 1:
        return pixels
    height, width = height // factor * factor, width // factor * factor  # drops < factor edge pixels
    blocks = pixels[:height, :width].reshape(height // factor, factor, width // factor, factor, *pixels.shape[2:])
    mean = blocks.mean(axis=(1, 3))
    return (np.rint(mean) if pixels.dtype.kind in "iub" else mean).astype(pixels.dtype)


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
    if not np.isfinite(values).all():
        values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, np.uint8)
    return np.round((values - low) * (255.0 / (high - low))).astype(np.uint8)


INPUT_STEPS = ("none", "clahe")  # ModelMeta.preprocess / train --preprocess


def input_step(pixels: np.ndarray, method: str | None) -> np.ndarray:
    """The model's fixed input step after resizing, on S x S or N x S x S uint8 pixels. "clahe":
    contrast-limited adaptive histogram equalisation (OpenCV; clip limit 2, 8 x 8 tiles), which
    evens out the exposure and contrast that differ between sites' machines and post-processing.
    None or "none": the pixels as they are."""
    if method in (None, "none"):
        return pixels
    if method != "clahe":
        raise ValueError(f"unknown input step {method!r}; choose from {', '.join(INPUT_STEPS)}")
    import cv2  # opencv comes with grad-cam

    clahe = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8))
    if pixels.ndim == 2:
        return clahe.apply(np.ascontiguousarray(pixels, np.uint8))
    return np.stack([clahe.apply(np.ascontiguousarray(p, np.uint8)) for p in pixels]) if len(pixels) else pixels


def resize_square(gray: np.ndarray, size: int) -> np.ndarray:
    """Squashes to size x size, as the training data was (its aspect ratio was not kept)."""
    if gray.shape == (size, size):
        return gray
    return np.asarray(Image.fromarray(gray).resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0))
