"""The one image decoder: any file or array -> 8-bit grayscale pixels, or a one-line reason why not.

Every caller (training cache, evaluation, prediction, server) goes through `read_xray`, so a file
is decoded, windowed and converted to grayscale in exactly one way.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Refuse before decoding: 100 megapixels is far above any radiograph (a 43x43 cm detector at
# 0.1 mm is ~18.5 MP) yet well below what would exhaust memory.
MAX_PIXELS = 100_000_000
MAX_BYTES = 512 * 1024 * 1024
DICOM_SUFFIXES = {".dcm", ".dicom"}


class ImageReadError(ValueError):
    """A file that cannot be read as an image; the message names the file and says why."""

    def __init__(self, source: str, reason: str):
        self.source, self.reason = source, reason
        super().__init__(f"{source}: {reason}")


def read_xray(source: str | os.PathLike | bytes | np.ndarray, name: str | None = None) -> np.ndarray:
    """Reads a path, raw bytes or an array as an HxW uint8 grayscale image.

    `name` labels the source in error messages (defaults to the path, or '<bytes>').
    """
    return read_xray_with_info(source, name)[0]


def read_xray_with_info(source: str | os.PathLike | bytes | np.ndarray, name: str | None = None
                        ) -> tuple[np.ndarray, dict]:
    """`read_xray`, plus what the conversion to gray throws away: info["colour"] is the mean spread
    between the colour channels of the source (0 for gray sources; see `colour_spread`)."""
    info = {"colour": 0.0}
    if isinstance(source, np.ndarray):
        return to_uint8_gray(source, name or "<array>", info), info
    if isinstance(source, (bytes, bytearray, memoryview)):
        data, label = bytes(source), name or "<bytes>"
    else:
        label = name or str(source)
        data = _read_file(Path(source), label)
    if not data:
        raise ImageReadError(label, "empty file")
    if _looks_like_dicom(data, label):
        return _read_dicom(data, label, info), info
    return _read_pillow(data, label, info), info


def _read_file(path: Path, label: str) -> bytes:
    if path.is_dir():
        raise ImageReadError(label, "is a directory, not an image file")
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise ImageReadError(label, f"file is {size / 2**20:.0f} MiB, over the {MAX_BYTES // 2**20} MiB limit")
        return path.read_bytes()
    except FileNotFoundError:
        raise ImageReadError(label, "no such file") from None
    except PermissionError:
        raise ImageReadError(label, "permission denied") from None
    except OSError as err:
        raise ImageReadError(label, f"cannot read file ({err.strerror or err})") from None


def _looks_like_dicom(data: bytes, label: str) -> bool:
    return data[128:132] == b"DICM" or Path(label).suffix.lower() in DICOM_SUFFIXES


def _read_pillow(data: bytes, label: str, info: dict) -> np.ndarray:
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageReadError(label, "not a recognised image format") from None
    except Exception as err:  # Pillow raises many types on garbage headers
        raise ImageReadError(label, f"cannot open image ({err})") from None
    width, height = image.size
    if width * height > MAX_PIXELS:  # checked from the header, before any pixel is decoded
        raise ImageReadError(label, f"image is {width}x{height}, over the {MAX_PIXELS:,}-pixel limit")
    if width == 0 or height == 0:
        raise ImageReadError(label, "image has no pixels")
    try:
        image.seek(0)
        image = ImageOps.exif_transpose(image)
        image.load()
    except Exception as err:
        raise ImageReadError(label, f"truncated or corrupt image data ({err})") from None
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return to_uint8_gray(np.asarray(image), label)
    return to_uint8_gray(np.asarray(_to_luminance(image, info)), label)


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


def _read_dicom(data: bytes, label: str, info: dict) -> np.ndarray:
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as err:
        raise ImageReadError(label, f"not a readable DICOM file ({err})") from None
    if "PixelData" not in ds:
        raise ImageReadError(label, "DICOM file has no pixel data")
    rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    if rows * cols > MAX_PIXELS:
        raise ImageReadError(label, f"image is {cols}x{rows}, over the {MAX_PIXELS:,}-pixel limit")
    try:
        pixels = ds.pixel_array
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            pixels = pixels[0]  # a multi-frame radiograph: the first frame
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
        if photometric.startswith("MONOCHROME"):
            pixels = apply_modality_lut(pixels, ds)
            pixels = apply_voi_lut(pixels, ds)
        elif pixels.ndim == 3:
            pixels = np.asarray(_to_luminance(Image.fromarray(_stretch(pixels.astype(np.float64))), info))
    except Exception as err:
        raise ImageReadError(label, f"cannot decode DICOM pixel data ({err})") from None
    gray = to_uint8_gray(np.asarray(pixels), label)
    if photometric == "MONOCHROME1":  # white means low attenuation: invert to look like MONOCHROME2
        gray = 255 - gray
    return gray


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


def resize_square(gray: np.ndarray, size: int) -> np.ndarray:
    """Squashes to size x size, as the training data was (its aspect ratio was not kept)."""
    if gray.shape == (size, size):
        return gray
    return np.asarray(Image.fromarray(gray).resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0))
