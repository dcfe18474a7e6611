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
from pathlib import Path

import numpy as np
import pytest
from conftest import EXAMPLES
from PIL import Image

from pneumoscope.data import images
from pneumoscope.data.images import (
    DECODE_PIXELS,
    MAX_PIXELS,
    ImageReadError,
    ImageTooLargeError,
    read_xray,
    read_xray_with_info,
)


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
    with Image.open(out) as saved:
        assert saved.mode.startswith("I")
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
             "dicom_deflate_bomb": root / "bomb.dcm", "symlink_dev_zero": root / "zero.png",
             "thin_png": root / "thin.png", "cmyk_progressive_jpeg": root / "cmyk.jpeg",
             "rgb_dicom_largest": root / "rgb.dcm"}
    # 0.2 MiB on disk, 200 MB as 16-bit pixels (+1240 MiB of peak memory before issue 12)
    Image.new("I;16", (10_000, 10_000)).save(files["png16_100mp"], compress_level=1)
    Image.fromarray(np.tile(xray[1], (18, 18))[:4000, :4000].astype(np.uint16) * 257).save(
        files["png16_16mp"], compress_level=1)
    Image.fromarray(xray[1]).resize((6000, 4500)).save(files["jpeg_27mp"], quality=95)
    _deflated_dicom_bomb(files["dicom_deflate_bomb"], xray[1], 4000)  # 32 MB of zeros in 32 kB
    files["symlink_dev_zero"].symlink_to("/dev/zero")
    # issue 26: 94 KiB decoded with +1,216 MiB; 0.4 MiB with +430 MiB; the largest 8-bit RGB DICOM accepted
    # (before: +476 MiB for 5900 x 5900, then accepted: three copies of the frame and float64 reductions)
    files["thin_png"].write_bytes(blank_png(1, 50_000_000))
    files["cmyk_progressive_jpeg"].write_bytes(progressive_jpeg(7071, 7071, components=4))
    rgb_dicom(files["rgb_dicom_largest"], 5565, xray[1])
    return files


def rgb_dicom(path, side: int, xray: np.ndarray):
    """An uncompressed 8-bit RGB DICOM of side x side, every row the same colour ramp."""
    from pydicom import dcmread

    buffer = io.BytesIO()
    make_dicom(xray, buffer, with_pixels=False)
    ds = dcmread(io.BytesIO(buffer.getvalue()))
    ds.Rows = ds.Columns = side
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = (np.arange(side * 3) * 7 % 256).astype(np.uint8).tobytes() * side
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_sixteen_bit_png_bomb_is_refused_from_its_header(amplifiers):
    # Pillow warns first, in Image.open (100 MP is over its own limit): the library leaves Pillow's
    # warnings to its caller; the command line silences this one (the test below)
    with pytest.warns(Image.DecompressionBombWarning), \
            pytest.raises(ImageTooLargeError, match="bomb16.png: image is 10000x10000, over the 50,000,000-pixel"):
        read_xray(amplifiers["png16_100mp"])


def test_predict_says_only_its_own_error_for_an_image_pillow_calls_a_bomb(amplifiers, capsys):
    """Every image Pillow warns about (over its MAX_IMAGE_PIXELS) is over MAX_PIXELS too, so its
    warning could only come before the error that names the file: `predict` prints that error alone
    (with the warning, under the suite's filterwarnings, the error was "cannot open image (Image size
    (100000000 pixels) exceeds limit ...)"; in a shell, Pillow's two lines came before it)."""
    from pneumoscope.cli import main

    assert MAX_PIXELS < Image.MAX_IMAGE_PIXELS
    assert main(["predict", str(amplifiers["png16_100mp"])]) == 1
    out, err = capsys.readouterr()
    assert "bomb16.png: image is 10000x10000, over the 50,000,000-pixel limit" in out and err == ""


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
from pneumoscope.data.images import ImageReadError, read_xray

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
    /dev/zero grew without end (a 1 MiB deflated DICOM: +2050 MiB). Before issue 26: +1216 MiB for
    the 1 x 50,000,000 PNG, +430 MiB for the CMYK progressive JPEG, +476 MiB for an RGB DICOM."""
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
    assert "aspect ratio" in results["thin_png"]["outcome"]
    assert "decoding it takes" in results["cmyk_progressive_jpeg"]["outcome"]
    assert results["rgb_dicom_largest"]["outcome"] == "pixels 1855x1855"


_MEASURE_CONCURRENT = r"""
import json, sys, threading
from pneumoscope.data.images import read_xray

def mib(key):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key)) / 1024

def peak_growth(threads):
    with open("/proc/self/clear_refs", "w") as reset:
        reset.write("5")
    before, start = mib("VmRSS:"), threading.Barrier(threads)
    def decode():
        start.wait()
        read_xray(sys.argv[2])
    workers = [threading.Thread(target=decode) for _ in range(threads)]
    [w.start() for w in workers]
    [w.join() for w in workers]
    return mib("VmHWM:") - before

read_xray(sys.argv[1])
read_xray(sys.argv[2])
print(json.dumps({"one": peak_growth(1), "six": peak_growth(6)}))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="measures with Linux /proc")
def test_concurrent_decodes_are_bounded_by_the_decode_slots(xray, tmp_path):
    """Six threads decoding a 16 MP 16-bit PNG at once: nothing bounded how many decodes ran, so
    the bound on one file multiplied (5 decodes' worth here; a server took +2,419 MiB for three
    thin PNGs at once). At most DECODE_SLOTS (2) decode at once now, and what a decode freed goes
    back to the system, so the peak stays at two decodes' worth."""
    path = tmp_path / "big16.png"
    path.write_bytes(blank_png(4000, 4000, 16))
    run = subprocess.run([sys.executable, "-c", _MEASURE_CONCURRENT, str(xray[0]), str(path)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    growth = json.loads(run.stdout)
    assert growth["six"] < (images.DECODE_SLOTS + 0.5) * growth["one"], growth


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


# ------------------------------------------------------------------ hostile shapes, buffers and work (issue 26)
def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def blank_png(width: int, height: int, bit_depth: int = 8) -> bytes:
    """A gray PNG of zero pixels, made in milliseconds whatever its size: its scanlines are all zero
    bytes, so the zlib stream is one deflated MiB of zeros (flushed to stand alone) repeated, and
    the Adler-32 of n zero bytes is (n mod 65521) << 16 | 1."""
    size = (1 + width * bit_depth // 8) * height  # a filter byte and the pixels, per row
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    mebibyte = deflate.compress(bytes(2**20)) + deflate.flush(zlib.Z_FULL_FLUSH)  # no reference past itself
    tail = deflate.compress(bytes(size % 2**20)) + deflate.flush()
    stream = b"\x78\xda" + mebibyte * (size // 2**20) + tail + struct.pack(">I", (size % 65521) << 16 | 1)
    header = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", stream) + _png_chunk(b"IEND", b"")


def rle_bmp(width: int, height: int, body: bytes) -> bytes:
    """An 8-bit gray BMP with RLE8-coded `body` (Pillow decodes RLE in Python)."""
    palette = b"".join(bytes((i, i, i, 0)) for i in range(256))
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(body), 2835, 2835, 256, 0)
    offset = 14 + len(info) + len(palette)
    return b"BM" + struct.pack("<IHHI", offset + len(body), 0, 0, offset) + info + palette + body


def _jpeg_segment(marker: int, payload: bytes) -> bytes:
    return bytes((0xFF, marker)) + struct.pack(">H", len(payload) + 2) + payload


def progressive_jpeg(width: int, height: int, components: int = 1, ac_scans: int = 0, refine: bool = False) -> bytes:
    """A valid progressive JPEG of zero coefficients, a few bytes a scan whatever its size: one DC
    scan (a 1-bit code a block), then `ac_scans` AC scans (first or refinement passes) that code
    only end-of-band runs of 32,767 blocks, so libjpeg passes over the whole image in each."""
    out = [b"\xff\xd8", _jpeg_segment(0xDB, b"\x00" + bytes([1] * 64)),
           _jpeg_segment(0xC2, struct.pack(">BHHB", 8, height, width, components)
                         + b"".join(bytes((i + 1, 0x11, 0)) for i in range(components))),
           _jpeg_segment(0xC4, b"\x00" + bytes([1] + [0] * 15) + b"\x00"),  # DC: '0' = category 0
           _jpeg_segment(0xC4, b"\x10" + bytes([1] + [0] * 15) + b"\xe0"),  # AC: '0' = EOB run of 2**14 + 14 bits
           _jpeg_segment(0xDA, bytes([components]) + b"".join(bytes((i + 1, 0)) for i in range(components)) + bytes(3))]
    blocks = -(-width // 8) * -(-height // 8)
    out.append(bytes(-(-blocks * components // 8)))
    bits = ("0" + "1" * 14) * -(-blocks // (2**15 - 1))
    bits += "1" * (-len(bits) % 8)
    runs = int(bits, 2).to_bytes(len(bits) // 8, "big").replace(b"\xff", b"\xff\x00")
    for i in range(ac_scans):
        out += [_jpeg_segment(0xDA, bytes((1, 1 + i % components, 0, 1, 63, 0x10 if refine else 0))), runs]
    return b"".join(out + [b"\xff\xd9"])


def chained_tiff(pages: int) -> bytes:
    """A little-endian TIFF of `pages` 1 x 1 gray pages, each IFD pointing at the next."""
    entries = [(256, 3, 1), (257, 3, 1), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, 8), (277, 3, 1),
               (278, 3, 1), (279, 4, 1)]
    ifd_size, out = 2 + 12 * len(entries) + 4, bytearray(b"II*\x00" + struct.pack("<I", 10) + b"\x80\x00")
    for page in range(pages):
        out += struct.pack("<H", len(entries))
        for tag, kind, value in entries:
            out += struct.pack("<HHII" if kind == 4 else "<HHIHxx", tag, kind, 1, value)
        out += struct.pack("<I", len(out) + 4 if page < pages - 1 else 0)
        assert len(out) == 10 + (page + 1) * ifd_size
    return bytes(out)


@pytest.mark.parametrize("name, data", [
    ("tall.png", lambda: blank_png(1, 50_000_000)),  # 94 KiB: +1,216 MiB, 1 x 14,481,546 px classified before
    ("wide.png", lambda: blank_png(50_000_000, 1)),
    ("tall16.png", lambda: blank_png(1, 25_000_000, 16)),
    ("wide.bmp", lambda: rle_bmp(50_000_000, 1, b"\x01\x00\x00\x00\x00\x01")),  # 1 KiB: one pixel, end of line
])
def test_thin_images_are_refused_from_their_header(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data())
    with pytest.raises(ImageTooLargeError, match=rf"{name}: image is \d+x\d+, over the 10:1 aspect ratio limit"):
        read_xray(path)


def test_row_pointers_and_resampling_tables_are_counted(tmp_path, monkeypatch):
    """Whatever the aspect limit, a thin image's cost is in the estimate: Pillow's pointer a row
    (50,000,000 rows: 400 MB) and the reduction's tables, which grow with the sides."""
    monkeypatch.setattr(images, "MAX_ASPECT_RATIO", 10**9)
    for name, data in (("tall.png", blank_png(1, 50_000_000)), ("wide.png", blank_png(50_000_000, 1))):
        with pytest.raises(ImageTooLargeError, match=rf"{name}: image is .*: decoding it takes .* MiB, over the 128"):
            read_xray(data, name)


def test_progressive_jpeg_coefficients_and_components_are_counted(tmp_path):
    """libjpeg holds a progressive JPEG's coefficients for the whole frame, 2 bytes a sample of each
    component, whatever scale `draft` decodes at: a 0.4 MiB CMYK one of 7071 x 7071 was decoded
    with +430 MiB. A gray one of that size fits (95 MiB of coefficients), as it did before."""
    path = tmp_path / "cmyk.jpeg"
    path.write_bytes(progressive_jpeg(7071, 7071, components=4))
    with pytest.raises(ImageTooLargeError, match=r"cmyk.jpeg: image is 7071x7071 \(CMYK decoded at 3536x3536\): "
                                                 r"decoding it takes 445.\d MiB, over the 128 MiB limit"):
        read_xray(path)
    assert read_xray(progressive_jpeg(7071, 7071), "gray.jpeg").shape == (2048, 2048)


def _dicom_of_frame(xray, frame: bytes, side: int, path):
    """A DICOM whose header says `side` x `side`, one 8-bit sample, around an encapsulated JPEG frame."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGExtended12Bit

    ds = _header_only(xray, JPEGExtended12Bit)  # the syntax of progressive (and baseline 8-bit) JPEG frames
    ds.Rows = ds.Columns = side
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_dicom_jpeg_frame_is_counted_with_its_components_and_coefficients(xray, tmp_path):
    """pydicom decodes a JPEG frame at full size as the frame says: a header of one sample around a
    CMYK progressive frame was refused only after +574 MiB; a gray progressive frame of 50 MP is
    held whole (its image, its coefficients, pydicom's copy: 190 MiB) and was decoded."""
    cmyk = _dicom_of_frame(xray[1], progressive_jpeg(7071, 7071, components=4), 7071, tmp_path / "cmyk.dcm")
    with pytest.raises(ImageReadError, match="cmyk.dcm: compressed frame has 4 components .CMYK., the DICOM header "
                                             "says 1 sample a pixel"):
        read_xray(cmyk)
    gray = _dicom_of_frame(xray[1], progressive_jpeg(7071, 7071), 7071, tmp_path / "gray.dcm")
    with pytest.raises(ImageTooLargeError, match=r"gray.dcm: image is 7071x7071 \(L frame decoded at full size\): "
                                                 r"decoding it takes 1\d\d.\d MiB, over the 128 MiB limit"):
        read_xray(gray)


@pytest.mark.parametrize("name, data, reason", [
    # 95 KiB: 2,000 empty AC scans over 4000 x 4000 took 2.3 s of libjpeg (a 9 KiB one 7-8 s in the issue)
    ("scans.jpeg", lambda: progressive_jpeg(4000, 4000, ac_scans=2000), "JPEG of 4000x4000 with 2001 scans: over"),
    ("refine.jpeg", lambda: progressive_jpeg(7071, 7071, ac_scans=99, refine=True),  # 100 scans x 50 MP: 3.1 s
     "JPEG of 7071x7071 with 100 scans: over the limit of 100 scans and 800,000,000 scan-pixels"),
    # 29 KiB: Pillow's RLE decoder in Python pads each row byte by byte (5.1 s)
    ("rle.bmp", lambda: rle_bmp(7000, 7000, b"\x01\x00\x00\x00" * 7000 + b"\x00\x01"),
     "image is 7000x7000 for Pillow's 'bmp_rle' decoder, written in Python: over its 4,194,304-pixel limit"),
    # 1 MiB of junk bytes after SOI: Pillow's JPEG parser loops over them one read at a time in Python
    ("junk.jpeg", lambda: b"\xff\xd8\xff" + bytes(2**20) + progressive_jpeg(8, 8)[2:],
     r"parsing takes over 26,3\d\d reads of the file \(10,000 \+ one per 64 bytes\): too costly to decode"),
    ("comment.jpeg", lambda: b"\xff\xd8" + b"\xff\xfe\x00\x02" * 2**18 + progressive_jpeg(8, 8)[2:],
     "parsing takes over 26,3[0-9][0-9] reads"),
])
def test_files_that_cost_far_more_work_than_their_pixels_are_refused(tmp_path, name, data, reason):
    path = tmp_path / name
    path.write_bytes(data())
    with pytest.raises(ImageTooLargeError, match=f"{name}: {reason}"):
        read_xray(path)


def test_what_costs_no_more_than_its_pixels_still_decodes(xray, tmp_path):
    """The other side of the work limits: a progressive JPEG of a few scans, a small RLE bitmap, a
    JPEG with a comment."""
    for name, options in (("prog.jpeg", {"progressive": True}), ("note.jpeg", {"comment": b"x" * 60_000})):
        Image.fromarray(xray[1]).save(tmp_path / name, quality=95, **options)
        assert np.abs(read_xray(tmp_path / name).astype(int) - xray[1]).mean() < 2
    rle = rle_bmp(1024, 1024, (b"\xff\x80\xff\x80\xff\x80\xff\x80\x04\x80" + b"\x00\x00") * 1024 + b"\x00\x01")
    assert (read_xray(rle, "small_rle.bmp") == 128).all()


def test_pages_are_counted_up_to_a_small_number(tmp_path, fixture_data):
    """Pillow's n_frames parses every IFD of a TIFF and looks each one up in a list of the ones
    before: 100,000 chained IFDs took 55 s, 20,000 about 2 s. The pages are now counted from the IFD
    chain alone, up to MAX_COUNTED_FRAMES; three pages are still counted exactly."""
    path = tmp_path / "chain.tif"
    path.write_bytes(chained_tiff(20_000))
    gray, info = read_xray_with_info(path)
    assert gray.shape == (1, 1) and info["warnings"] == ["first frame used (over 100 frames)"]
    assert info["frames"] == images.MAX_COUNTED_FRAMES + 1
    assert read_xray_with_info(chained_tiff(3), "three.tif")[1]["warnings"] == ["first frame used (3 frames)"]


def palette_dicom(indices: np.ndarray, path, palette: np.ndarray | None):
    """A PALETTE COLOR DICOM of 8-bit `indices` and a 256-entry 8-bit palette (256 x 3), or none."""
    from pydicom import dcmread

    buffer = io.BytesIO()
    make_dicom(indices, buffer, with_pixels=False)
    ds = dcmread(io.BytesIO(buffer.getvalue()))
    ds.PhotometricInterpretation = "PALETTE COLOR"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = indices.astype(np.uint8).tobytes()
    ds["PixelData"].VR = "OB"
    if palette is not None:
        for channel, values in zip(("Red", "Green", "Blue"), palette.T):
            setattr(ds, f"{channel}PaletteColorLookupTableDescriptor", [256, 0, 8])
            ds[f"{channel}PaletteColorLookupTableDescriptor"].VR = "US"
            setattr(ds, f"{channel}PaletteColorLookupTableData", values.astype(np.uint8).tobytes())
    ds.save_as(path, enforce_file_format=True)
    return path


def test_palette_color_dicom_is_read_through_its_palette(xray, tmp_path):
    """Before, the indices were read as gray: with a palette mapping i -> 255 - i the pixels were
    the film inverted (correlation +1.0 with the indices, -1.0 with pydicom's apply_color_lut)."""
    from pydicom import dcmread
    from pydicom.pixels import apply_color_lut

    inverting = np.repeat(255 - np.arange(256), 3).reshape(256, 3)
    path = palette_dicom(xray[1], tmp_path / "palette.dcm", inverting)
    gray = read_xray(path)
    assert np.array_equal(gray, 255 - xray[1])
    looked_up = apply_color_lut(xray[1], dcmread(path))[..., 0]
    assert np.corrcoef(gray.ravel(), looked_up.ravel())[0, 1] > 0.999
    hot = np.stack([np.arange(256), np.arange(256) // 2, np.zeros(256)], axis=1)  # a colour map: flagged as colour
    _, info = read_xray_with_info(palette_dicom(xray[1], tmp_path / "hot.dcm", hot))
    assert info["colour"] > 0.04


def test_palette_color_dicom_without_a_palette_is_refused(xray, tmp_path):
    with pytest.raises(ImageReadError, match="bare.dcm: PALETTE COLOR DICOM without its palette"):
        read_xray(palette_dicom(xray[1], tmp_path / "bare.dcm", None))


def test_predict_refuses_hostile_files_in_one_line_and_classifies_the_rest(small_bundle, xray, tmp_path, capsys):
    """What a user types: `pneumoscope predict` over a folder of the issue 26 files next to a real
    X-ray and a PALETTE COLOR DICOM: one line naming each refused file, the others classified."""
    from pneumoscope.cli import main

    folder = tmp_path / "inbox"
    folder.mkdir()
    files = {"thin.png": blank_png(1, 50_000_000), "cmyk.jpeg": progressive_jpeg(7071, 7071, components=4),
             "scans.jpeg": progressive_jpeg(4000, 4000, ac_scans=2000), "chain.tif": chained_tiff(20_000),
             "rle.bmp": rle_bmp(7000, 7000, b"\x01\x00\x00\x00" * 7000 + b"\x00\x01"), "xray.jpeg": xray[0].read_bytes()}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    palette_dicom(xray[1], folder / "palette.dcm", np.repeat(np.arange(256), 3).reshape(256, 3))
    palette_dicom(xray[1], folder / "bare.dcm", None)
    code = main(["predict", str(folder), "--checkpoint", str(small_bundle), "--format", "json"])
    records = {Path(r["path"]).name: r for r in map(json.loads, capsys.readouterr().out.strip().splitlines())}
    assert code == 1 and len(records) == 8
    assert {name for name, r in records.items() if r["status"] == "ok"} == {"xray.jpeg", "palette.dcm", "chain.tif"}
    assert records["chain.tif"]["warnings"][0] == "first frame used (over 100 frames)"
    reasons = {"thin.png": "aspect ratio", "cmyk.jpeg": "decoding it takes", "scans.jpeg": "2001 scans",
               "rle.bmp": "written in Python", "bare.dcm": "without its palette"}
    for name, reason in reasons.items():
        error = records[name]["error"]
        assert name in error and reason in error and "\n" not in error, (name, error)
