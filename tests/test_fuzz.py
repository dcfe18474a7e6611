"""Fuzz the one decoder (issue 12): valid JPEG, PNG and DICOM files made from a real fixture X-ray,
mutated (bit flips, truncation, inserted bytes, header fields set to odd values), must each give
a 2-D uint8 image or an ImageReadError naming the file, nothing else.

Seeded, so a failure names a mutation that can be replayed; bounded to MAX_MUTATIONS and, whatever
the count, MAX_SECONDS (a loop bound, not an assertion on speed).
"""
import io
import random
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image
from test_images import make_dicom

from pneumoscope.data.images import ImageReadError, read_xray

SEED = 12
MAX_MUTATIONS = 300
MAX_SECONDS = 20
ODD_VALUES = (0, 1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 32, 33, 255, 256, 0x7FFF, 0x8000, 0xFFFF, 0x10000,
              0x7FFFFFFF, 0xFFFFFFFF)


def _encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _dicom(pixels: np.ndarray, **options) -> bytes:
    buffer = io.BytesIO()
    make_dicom(pixels, buffer, **options)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def seeds(fixture_data) -> list[tuple[str, bytes]]:
    """(name, bytes) of valid files; the name's suffix is how the decoder picks DICOM when the
    'DICM' magic is mutated away."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import DeflatedExplicitVRLittleEndian, JPEGBaseline8Bit

    path = sorted((fixture_data / "val" / "PNEUMONIA").iterdir())[0]
    gray = Image.open(path).convert("L").resize((96, 96))  # small: more mutations in the time bound
    pixels = np.asarray(gray)
    jpeg = _encoded(gray, "JPEG", quality=90)
    encapsulated = _dicom_with_pixel_data(pixels, encapsulate([jpeg]), JPEGBaseline8Bit)
    return [("x.jpeg", jpeg),
            ("x.jpeg", _encoded(gray.convert("RGB"), "JPEG", quality=90, progressive=True)),
            ("x.png", _encoded(gray, "PNG")),
            ("x16.png", _encoded(Image.fromarray(pixels.astype(np.uint16) * 257), "PNG")),
            ("x.dcm", _dicom(pixels.astype(np.uint16) * 16)),
            ("x.dcm", _dicom(pixels.astype(np.uint16) * 16, photometric="MONOCHROME1", window=(2048, 4096))),
            ("deflated.dcm", _dicom(pixels.astype(np.uint16) * 16, transfer_syntax=DeflatedExplicitVRLittleEndian)),
            ("jpeg.dcm", encapsulated)]


def _dicom_with_pixel_data(pixels: np.ndarray, pixel_data: bytes, transfer_syntax) -> bytes:
    from pydicom import dcmread

    ds = dcmread(io.BytesIO(_dicom(pixels, with_pixels=False, transfer_syntax=transfer_syntax)))
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = pixel_data
    ds["PixelData"].VR = "OB"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


# ------------------------------------------------------------------ mutations
def flip_bits(rng: random.Random, data: bytes) -> tuple[str, bytes]:
    out = bytearray(data)
    positions = [rng.randrange(len(out) * 8) for _ in range(rng.randint(1, 16))]
    for bit in positions:
        out[bit // 8] ^= 1 << (bit % 8)
    return f"flip bits {positions}", bytes(out)


def truncate(rng: random.Random, data: bytes) -> tuple[str, bytes]:
    cut = rng.randrange(1, len(data))
    return f"truncate to {cut}", data[:cut]


def insert_bytes(rng: random.Random, data: bytes) -> tuple[str, bytes]:
    at = rng.randrange(len(data))
    if rng.random() < 0.5:
        inserted = rng.randbytes(rng.randint(1, 64))
    else:  # a repeated slice of the file itself: plausible markers and chunks
        start = rng.randrange(len(data))
        inserted = data[start:start + rng.randint(1, 256)]
    return f"insert {len(inserted)} bytes at {at}", data[:at] + inserted + data[at:]


def change_header_field(rng: random.Random, data: bytes) -> tuple[str, bytes]:
    """A size, depth, sample count or value representation set to an odd value, the file otherwise
    intact (PNG chunk CRCs recomputed, a deflated DICOM re-deflated) so the decoder believes it."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return _png_header(rng, data)
    if data[:2] == b"\xff\xd8":
        return _jpeg_header(rng, data)
    return _dicom_header(rng, data)


def _png_header(rng, data):
    ihdr = bytearray(data[16:29])  # width, height, bit depth, colour type, compression, filter, interlace
    field = rng.choice([(0, ">I"), (4, ">I"), (8, ">B"), (9, ">B"), (12, ">B")])
    value = rng.choice(ODD_VALUES) & (0xFF if field[1] == ">B" else 0xFFFFFFFF)
    struct.pack_into(field[1], ihdr, field[0], value)
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)))
    return f"PNG IHDR byte {field[0]} = {value}", data[:16] + bytes(ihdr) + crc + data[33:]


def _jpeg_header(rng, data):
    sof = next(i for i in range(2, len(data) - 1) if data[i] == 0xFF and data[i + 1] in (0xC0, 0xC2))
    offset, fmt = rng.choice([(5, ">H"), (7, ">H"), (4, ">B"), (9, ">B")])  # height, width, precision, components
    value = rng.choice(ODD_VALUES) & (0xFF if fmt == ">B" else 0xFFFF)
    out = bytearray(data)
    struct.pack_into(fmt, out, sof + offset, value)
    return f"JPEG SOF byte {offset} = {value}", bytes(out)


DICOM_TAGS = {"Rows": (0x0028, 0x0010), "Columns": (0x0028, 0x0011), "SamplesPerPixel": (0x0028, 0x0002),
              "BitsAllocated": (0x0028, 0x0100), "BitsStored": (0x0028, 0x0101), "HighBit": (0x0028, 0x0102),
              "PixelRepresentation": (0x0028, 0x0103), "PixelData": (0x7FE0, 0x0010)}


def _dicom_header(rng, data):
    meta_end = 144 + struct.unpack("<I", data[140:144])[0]
    deflated = b"1.2.840.10008.1.2.1.99" in data[:meta_end]
    body = zlib.decompress(data[meta_end:], -zlib.MAX_WBITS) if deflated else data[meta_end:]
    name, (group, element) = rng.choice(list(DICOM_TAGS.items()))
    at = body.find(struct.pack("<HH", group, element))
    out = bytearray(body)
    if at < 0:
        return "no change (tag absent)", data
    if rng.random() < 0.5:  # an unknown or wrong value representation, as the 'UZ' of issue 12
        vr = rng.choice([b"UZ", b"ZZ", bytes(rng.choices(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", k=2)), b"\x00\x00",
                         b"US", b"OB", b"SQ", b"UN"])
        out[at + 4:at + 6] = vr
        change = f"DICOM {name} VR = {vr!r}"
    elif bytes(out[at + 4:at + 6]) in (b"OB", b"OW", b"UN", b"SQ"):  # long form: 2 reserved, 4-byte length
        value = rng.choice(ODD_VALUES)
        struct.pack_into("<I", out, at + 8, value)
        change = f"DICOM {name} length = {value}"
    else:
        value = rng.choice(ODD_VALUES) & 0xFFFF
        struct.pack_into("<H", out, at + 8, value)
        change = f"DICOM {name} = {value}"
    if deflated:
        squeeze = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
        out = squeeze.compress(bytes(out)) + squeeze.flush()
    return change, data[:meta_end] + bytes(out)


MUTATIONS = (flip_bits, truncate, insert_bytes, change_header_field)


# pydicom warns on the odd headers it still reads (a UI with a stray character, implicit VR in an
# explicit file, no sequence delimiter), as the mutations make them: what is tested is read_xray's outcome
@pytest.mark.filterwarnings("ignore::UserWarning:pydicom")
def test_mutated_files_give_pixels_or_an_image_read_error(seeds):
    rng = random.Random(SEED)
    deadline = time.monotonic() + MAX_SECONDS
    outcomes = {"pixels": 0, "refused": 0}
    for index in range(MAX_MUTATIONS):
        if time.monotonic() > deadline:
            break
        name, data = rng.choice(seeds)
        change, mutated = rng.choice(MUTATIONS)(rng, data)
        where = f"mutation {index} (seed {SEED}) of {name}: {change}"
        try:
            gray = read_xray(mutated, name)
        except ImageReadError as err:
            assert str(err).startswith(f"{name}: ") and "\n" not in str(err), where
            outcomes["refused"] += 1
        except Exception as err:  # what issue 12 found: a decoder's own exception escaping
            pytest.fail(f"{where}: {type(err).__name__}: {err}")
        else:
            assert isinstance(gray, np.ndarray) and gray.dtype == np.uint8 and gray.ndim == 2, where
            assert gray.size > 0, where
            outcomes["pixels"] += 1
    print(f"fuzz: {outcomes} in {index + 1} mutations")
