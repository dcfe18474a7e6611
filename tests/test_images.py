"""The one decoder: real fixture X-rays converted to every format a hospital or dataset holds, and
the files an attacker or a careless user sends (issue 12): each gives pixels or one ImageReadError
naming the file, within a bounded amount of memory."""
import io
import json
import os
import struct
import subprocess
import sys
import threading
import zlib

import numpy as np
import pytest
from PIL import Image

from conftest import EXAMPLES
from pneumoscope import images
from pneumoscope.images import (DECODE_PIXELS, MAX_PIXELS, ImageReadError, ImageTooLargeError, read_xray,
                                read_xray_with_info)


@pytest.fixture(scope="module")
def xray(fixture_data):
    path = sorted((fixture_data / "val" / "NORMAL").iterdir())[0]
    return path, np.asarray(Image.open(path).convert("L"))


def make_dicom(pixels: np.ndarray, path, photometric="MONOCHROME2", bits=12, with_pixels=True, window=None,
               transfer_syntax=None):
    """A DX DICOM of `pixels` (H x W, or frames x H x W for a multi-frame file)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # digital X-ray
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax or ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientName = "DX", "Test^Phantom"
    ds.Rows, ds.Columns = pixels.shape[-2:]
    if pixels.ndim == 3:
        ds.NumberOfFrames = len(pixels)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, 0
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    if with_pixels:
        ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_jpeg_reads_as_8bit_gray(xray):
    path, expected = xray
    gray = read_xray(path)
    assert gray.dtype == np.uint8 and gray.shape == (224, 224)
    assert np.array_equal(gray, expected)


@pytest.mark.parametrize("fmt, suffix", [("PNG", ".png"), ("BMP", ".bmp"), ("TIFF", ".tif"),
                                         ("WEBP", ".webp")])
def test_lossless_formats_give_identical_pixels(xray, tmp_path, fmt, suffix):
    _, expected = xray
    out = tmp_path / f"x{suffix}"
    Image.fromarray(expected).save(out, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    assert np.array_equal(read_xray(out), expected)


def test_16bit_png_is_stretched_to_8bit(xray, tmp_path):
    _, expected = xray
    out = tmp_path / "x16.png"
    Image.fromarray(expected.astype(np.uint16) * 257).save(out)
    assert Image.open(out).mode.startswith("I")
    gray = read_xray(out)
    # min-max stretch of the same data: at most one grey level apart
    stretched = np.round((expected - expected.min()) * 255.0 / (expected.max() - expected.min()))
    assert np.abs(gray.astype(int) - stretched).max() <= 1


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "CMYK", "LA"])
def test_colour_modes_convert_to_gray_in_one_place(xray, tmp_path, mode):
    _, expected = xray
    image = Image.fromarray(expected).convert(mode)
    out = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    image.save(out)
    gray = read_xray(out)
    assert gray.shape == expected.shape
    assert np.abs(gray.astype(int) - expected.astype(int)).mean() < 3


def test_exif_orientation_is_honoured(xray, tmp_path):
    _, expected = xray
    out = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: viewer must turn it 90 degrees clockwise
    Image.fromarray(np.rot90(expected, 1).copy()).save(out, exif=exif.tobytes(), quality=95)
    gray = read_xray(out)
    assert gray.shape == expected.shape
    assert np.abs(gray.astype(int) - expected.astype(int)).mean() < 4


def test_dicom_monochrome2_and_monochrome1_match_the_jpeg(xray, tmp_path):
    _, expected = xray
    twelve_bit = expected.astype(np.uint16) * 16
    mono2 = read_xray(make_dicom(twelve_bit, tmp_path / "m2.dcm"))
    mono1 = read_xray(make_dicom(4095 - twelve_bit, tmp_path / "m1.dcm", photometric="MONOCHROME1"))
    stretched = np.round((expected - expected.min()) * 255.0 / (expected.max() - expected.min()))
    assert np.abs(mono2.astype(int) - stretched).max() <= 1
    assert np.abs(mono1.astype(int) - mono2.astype(int)).max() <= 1


def test_dicom_window_is_applied(xray, tmp_path):
    _, expected = xray
    windowed = read_xray(make_dicom(expected.astype(np.uint16) * 16, tmp_path / "w.dcm", window=(2048, 2048)))
    assert windowed.dtype == np.uint8
    assert (windowed == 0).mean() > (read_xray(make_dicom(expected.astype(np.uint16) * 16, tmp_path / "n.dcm")) == 0).mean()


def test_dicom_without_pixels_is_refused(tmp_path, xray):
    path = make_dicom(xray[1], tmp_path / "empty.dcm", with_pixels=False)
    with pytest.raises(ImageReadError, match="empty.dcm: DICOM file has no pixel data"):
        read_xray(path)


@pytest.mark.parametrize("name, content, reason", [
    ("empty.png", b"", "empty file"),
    ("text.jpg", b"hello, this is not an image", "not a recognised image format"),
])
def test_garbage_is_refused_with_the_file_name(tmp_path, name, content, reason):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ImageReadError) as err:
        read_xray(path)
    assert str(err.value) == f"{path}: {reason}"


def test_truncated_jpeg_is_refused(xray, tmp_path):
    data = xray[0].read_bytes()
    path = tmp_path / "cut.jpeg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="cut.jpeg: truncated"):
        read_xray(path)


def test_directory_and_missing_paths(tmp_path):
    with pytest.raises(ImageReadError, match="is a directory"):
        read_xray(tmp_path)
    with pytest.raises(ImageReadError, match="no such file"):
        read_xray(tmp_path / "nope.png")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(xray, tmp_path):
    path = tmp_path / "locked.jpeg"
    path.write_bytes(xray[0].read_bytes())
    path.chmod(0)
    with pytest.raises(ImageReadError, match="permission denied"):
        read_xray(path)


def test_decompression_bomb_refused_before_decoding(tmp_path):
    side = int(MAX_PIXELS ** 0.5) + 100
    buffer = io.BytesIO()
    Image.new("1", (side, side)).save(buffer, "PNG")  # a few kB on disk, > 100 MP decoded
    path = tmp_path / "bomb.png"
    path.write_bytes(buffer.getvalue())
    Image.MAX_IMAGE_PIXELS, saved = None, Image.MAX_IMAGE_PIXELS  # whatever Pillow's own limit is
    try:
        with pytest.raises(ImageReadError, match="bomb.png: image is .* over the"):
            read_xray(path)
    finally:
        Image.MAX_IMAGE_PIXELS = saved


# ------------------------------------------------------------------ hardening (issue 12)
def test_dicom_with_an_unknown_value_representation_is_refused(xray, tmp_path):
    """The fuzz finding of issue 12: Rows stored with VR 'UZ' made pydicom raise NotImplementedError."""
    data = make_dicom(xray[1].astype(np.uint16) * 16, tmp_path / "ok.dcm").read_bytes()
    rows = data.index(b"\x28\x00\x10\x00US")  # (0028,0010) Rows, explicit VR
    path = tmp_path / "uz.dcm"
    path.write_bytes(data[:rows + 4] + b"UZ" + data[rows + 6:])
    with pytest.raises(ImageReadError, match=r"uz.dcm: .*'UZ'") as err:
        read_xray(path)
    assert "\n" not in str(err.value)


def test_memory_error_while_decoding_becomes_an_image_error(xray, monkeypatch):
    def exhausted(*args):
        raise MemoryError

    monkeypatch.setattr(images, "_read_pillow", exhausted)
    with pytest.raises(ImageTooLargeError, match="x.jpeg: not enough memory"):
        read_xray(xray[0].read_bytes(), "x.jpeg")


def test_formats_that_run_programs_are_not_opened(xray, tmp_path):
    """Pillow's EPS reader runs Ghostscript on the file: only the documented formats are opened."""
    path = tmp_path / "x.eps"
    Image.fromarray(xray[1]).save(path, "EPS")
    with pytest.raises(ImageReadError, match="x.eps: not a recognised image format"):
        read_xray(path)


def test_files_over_the_byte_limit_are_refused_unread(xray, tmp_path, monkeypatch):
    monkeypatch.setattr(images, "MAX_FILE_BYTES", 1000)
    with pytest.raises(ImageTooLargeError, match="over the .* MiB limit"):
        read_xray(xray[0])
    with pytest.raises(ImageTooLargeError, match="<bytes>: file is"):
        read_xray(xray[0].read_bytes())


def test_a_fifo_is_refused_not_waited_on(xray, tmp_path):
    fifo = tmp_path / "x.jpeg"
    os.mkfifo(fifo)
    done = threading.Event()

    def feed():  # a writer, so that a decoder that opens and reads the pipe ends (with pixels), never hangs
        while not done.is_set():
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:  # no reader has the pipe open yet
                done.wait(0.01)
                continue
            try:
                os.write(fd, xray[0].read_bytes())  # < 64 KiB: fits the pipe's buffer
            except OSError:
                pass
            finally:
                os.close(fd)
            return

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    try:
        with pytest.raises(ImageReadError, match="x.jpeg: not a regular file"):
            read_xray(fifo)
    finally:
        done.set()
        writer.join()


def test_devices_behind_symlinks_are_refused(tmp_path):
    (tmp_path / "null.png").symlink_to("/dev/null")
    with pytest.raises(ImageReadError, match="null.png: not a regular file"):
        read_xray(tmp_path / "null.png")


# Multi-frame files: the first frame is decoded, and the record says so (issue 11).
def test_single_frame_files_carry_no_warning(xray):
    gray, info = read_xray_with_info(xray[0])
    assert info["warnings"] == [] and info["frames"] == 1 and info["size"] == (224, 224)


def _three_xrays(fixture_data):
    paths = sorted((fixture_data / "val" / "NORMAL").iterdir())[:3]
    return [np.asarray(Image.open(p).convert("L").resize((224, 224))) for p in paths]


@pytest.mark.parametrize("fmt", ["GIF", "TIFF"])
def test_animated_gif_and_multipage_tiff_give_the_first_frame(fixture_data, tmp_path, fmt):
    frames = [Image.fromarray(a) for a in _three_xrays(fixture_data)]
    path = tmp_path / f"x.{fmt.lower()}"
    frames[0].save(path, fmt, save_all=True, append_images=frames[1:])
    gray, info = read_xray_with_info(path)
    assert np.array_equal(gray, np.asarray(frames[0]))
    assert info["frames"] == 3 and info["warnings"] == ["first frame used (3 frames)"]


def test_multiframe_dicom_gives_the_first_frame(fixture_data, tmp_path):
    stack = np.stack(_three_xrays(fixture_data)).astype(np.uint16) * 16
    gray, info = read_xray_with_info(make_dicom(stack, tmp_path / "cine.dcm"))
    assert np.array_equal(gray, read_xray(make_dicom(stack[0], tmp_path / "first.dcm")))
    assert info["frames"] == 3 and info["warnings"] == ["first frame used (3 frames)"]


# Decoding bounded by the size the header states, before anything is allocated.
def _header_only(xray, transfer_syntax):
    from pydicom import dcmread

    buffer = io.BytesIO()
    make_dicom(xray, buffer, with_pixels=False, transfer_syntax=transfer_syntax)
    return dcmread(io.BytesIO(buffer.getvalue()))


def _deflated_dicom_bomb(path, xray, side: int):
    """A deflated DICOM whose header says side x side 16-bit and whose pixel data is that many
    zero bytes: ~0.1 MiB on disk per 100 MB inflated (made in a stream, never held inflated)."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    header = _header_only(xray, DeflatedExplicitVRLittleEndian)
    header.Rows = header.Columns = side
    buffer = io.BytesIO()
    header.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    start = 144 + struct.unpack("<I", data[140:144])[0]  # after the file meta group
    body = zlib.decompress(data[start:], -zlib.MAX_WBITS)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    length = side * side * 2
    parts = [deflate.compress(body + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, length))]
    zeros = bytes(side * 2)
    parts += [deflate.compress(zeros) for _ in range(side)] + [deflate.flush()]
    path.write_bytes(data[:start] + b"".join(parts))
    return path


@pytest.fixture(scope="module")
def amplifiers(tmp_path_factory, xray):
    """The memory amplification files of issue 12, made from a real X-ray where size allows."""
    root = tmp_path_factory.mktemp("amplifiers")
    files = {"png16_100mp": root / "bomb16.png", "png16_16mp": root / "big16.png", "jpeg_27mp": root / "big.jpeg",
             "dicom_deflate_bomb": root / "bomb.dcm", "symlink_dev_zero": root / "zero.png"}
    # 0.2 MiB on disk, 200 MB as 16-bit pixels (+1240 MiB of peak memory before issue 12)
    Image.new("I;16", (10_000, 10_000)).save(files["png16_100mp"], compress_level=1)
    Image.fromarray(np.tile(xray[1], (18, 18))[:4000, :4000].astype(np.uint16) * 257).save(
        files["png16_16mp"], compress_level=1)
    Image.fromarray(xray[1]).resize((6000, 4500)).save(files["jpeg_27mp"], quality=95)
    _deflated_dicom_bomb(files["dicom_deflate_bomb"], xray[1], 4000)  # 32 MB of zeros in 32 kB
    files["symlink_dev_zero"].symlink_to("/dev/zero")
    return files


def test_sixteen_bit_png_bomb_is_refused_from_its_header(amplifiers):
    with pytest.raises(ImageTooLargeError, match="bomb16.png: image is 10000x10000, over the 50,000,000-pixel"):
        read_xray(amplifiers["png16_100mp"])


def test_deflated_dicom_is_inflated_with_a_bound(amplifiers):
    assert amplifiers["dicom_deflate_bomb"].stat().st_size < 2**20
    with pytest.raises(ImageTooLargeError, match="bomb.dcm: deflated DICOM expands over"):
        read_xray(amplifiers["dicom_deflate_bomb"])


def test_deflated_dicom_reads_like_the_plain_one(xray, tmp_path):
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    twelve_bit = xray[1].astype(np.uint16) * 16
    deflated = make_dicom(twelve_bit, tmp_path / "d.dcm", transfer_syntax=DeflatedExplicitVRLittleEndian)
    assert np.array_equal(read_xray(deflated), read_xray(make_dicom(twelve_bit, tmp_path / "p.dcm")))


def test_large_jpeg_is_reduced_while_decoding(amplifiers, xray):
    gray, info = read_xray_with_info(amplifiers["jpeg_27mp"])
    assert gray.size <= DECODE_PIXELS and gray.shape == (1773, 2364)  # aspect ratio kept
    assert info["size"] == (6000, 4500)
    expected = np.asarray(Image.fromarray(xray[1]).resize((2364, 1773)))
    assert np.abs(gray.astype(int) - expected).mean() < 3


def test_large_dicom_is_reduced_before_its_luts(xray, tmp_path):
    big = np.asarray(Image.fromarray(xray[1]).resize((3000, 2800))).astype(np.uint16) * 16
    gray, info = read_xray_with_info(make_dicom(big, tmp_path / "big.dcm", window=(2048, 4096)))
    assert gray.shape == (1400, 1500) and info["size"] == (3000, 2800)
    small = read_xray(make_dicom(np.asarray(Image.fromarray(big).resize((1500, 1400), Image.Resampling.BOX)),
                                 tmp_path / "small.dcm", window=(2048, 4096)))
    assert np.abs(gray.astype(int) - small.astype(int)).max() <= 1


def test_compressed_dicom_frame_larger_than_its_header_is_refused(xray, tmp_path):
    """pydicom hands a JPEG frame to Pillow, which decodes it at the size the JPEG states."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    def jpeg_dicom(path, jpeg: Image.Image):
        ds = _header_only(xray[1], JPEGBaseline8Bit)
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        buffer = io.BytesIO()
        jpeg.save(buffer, "JPEG", quality=95)
        ds.PixelData = encapsulate([buffer.getvalue()])
        ds["PixelData"].VR = "OB"
        ds.save_as(path, enforce_file_format=True)
        return path

    honest = jpeg_dicom(tmp_path / "honest.dcm", Image.fromarray(xray[1]))
    jpeg = tmp_path / "same.jpeg"
    Image.fromarray(xray[1]).save(jpeg, quality=95)
    assert np.array_equal(read_xray(honest), read_xray(jpeg))
    with pytest.raises(ImageTooLargeError, match="liar.dcm: compressed frame is 9000x9000, larger than the 224x224"):
        read_xray(jpeg_dicom(tmp_path / "liar.dcm", Image.new("L", (9000, 9000))))


MEMORY_BOUND_MIB = 400  # peak RSS growth allowed for decoding any one file
# Files decoded one after another in a fresh process, with the peak reset before each (Linux
# clear_refs). Read from /proc/self/status, not getrusage: a child's ru_maxrss starts at its
# parent's peak (Linux keeps it across exec), which would hide up to pytest's own footprint.
_MEASURE = r"""
import json, os, resource, sys
from pneumoscope.images import ImageReadError, read_xray

def mib(key):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key)) / 1024

split = sys.argv.index("--")
for warm in sys.argv[1:split]:  # imports and first-use set-up are not the files' cost
    read_xray(warm)
try:  # a runaway read dies here instead of taking the machine's memory
    size = int(open("/proc/self/statm").read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (size + 2 * 2**30, resource.getrlimit(resource.RLIMIT_AS)[1]))
except (OSError, ValueError):
    pass
results = {}
for path in sys.argv[split + 1:]:
    with open("/proc/self/clear_refs", "w") as reset:
        reset.write("5")  # peak RSS := current RSS
    before = mib("VmRSS:")
    try:
        outcome = "pixels %dx%d" % read_xray(path).shape[::-1]
    except ImageReadError as err:
        outcome = "ImageReadError: " + str(err)
    except BaseException as err:
        outcome = type(err).__name__
    results[path] = {"outcome": outcome, "growth_mib": round(mib("VmHWM:") - before, 1)}
print(json.dumps(results))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="measures with Linux /proc")
def test_peak_memory_is_bounded_for_the_amplification_files(amplifiers, xray, tmp_path):
    """Before issue 12: +1240 MiB for the 16-bit PNG bomb, +457 MiB for the 16 MP 16-bit PNG,
    /dev/zero grew without end (a 1 MiB deflated DICOM: +2050 MiB)."""
    warm = [str(xray[0]), str(make_dicom(xray[1].astype(np.uint16), tmp_path / "warm.dcm"))]
    paths = {str(path): name for name, path in amplifiers.items()}
    run = subprocess.run([sys.executable, "-c", _MEASURE, *warm, "--", *paths], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    results = {paths[path]: result for path, result in json.loads(run.stdout).items()}
    for name, result in results.items():
        assert result["outcome"].startswith(("pixels", "ImageReadError")), (name, result)
        assert result["growth_mib"] < MEMORY_BOUND_MIB, (name, result)
    assert "not a regular file" in results["symlink_dev_zero"]["outcome"]
    assert results["png16_16mp"]["outcome"] == "pixels 2048x2048"
    assert results["jpeg_27mp"]["outcome"] == "pixels 2364x1773"


def test_clahe_input_step_evens_out_contrast_and_exposure_changes():
    """CLAHE as the model's input step at the models' 224 px: the same films with their contrast
    flattened or their exposure curve changed (what another site's machine does) land closer to
    the originals after the step than before it; one image or a stack alike; "none" leaves pixels
    as they are. (Per image it is not always so: gamma 1.8 on some pneumonia films stays as far.)"""
    paths = sorted(EXAMPLES.rglob("*.jpeg"))[:4]
    originals = np.stack([images.resize_square(read_xray(p), 224) for p in paths])
    stepped = images.input_step(originals, "clahe")
    assert stepped.shape == originals.shape and stepped.dtype == np.uint8
    assert (stepped[1] == images.input_step(originals[1], "clahe")).all()  # stack = one at a time
    for shifted in ((originals * 0.5 + 64).astype(np.uint8), (255 * (originals / 255) ** 1.8).astype(np.uint8)):
        before = np.abs(shifted.astype(int) - originals).mean()
        after = np.abs(images.input_step(shifted, "clahe").astype(int) - stepped).mean()
        assert after < 0.8 * before  # measured: 17.4 vs 23.8 (contrast), 26.8 vs 43.6 (gamma)
    assert images.input_step(originals, "none") is originals and images.input_step(originals, None) is originals
    with pytest.raises(ValueError, match="unknown input step 'hist'"):
        images.input_step(originals, "hist")
