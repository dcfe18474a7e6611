"""The one decoder: real fixture X-rays converted to every format a hospital or dataset holds."""
import io
import os

import numpy as np
import pytest
from PIL import Image

from pneumoscope.images import MAX_PIXELS, ImageReadError, read_xray


@pytest.fixture(scope="module")
def xray(fixture_data):
    path = sorted((fixture_data / "val" / "NORMAL").iterdir())[0]
    return path, np.asarray(Image.open(path).convert("L"))


def make_dicom(pixels: np.ndarray, path, photometric="MONOCHROME2", bits=12, with_pixels=True, window=None):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # digital X-ray
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientName = "DX", "Test^Phantom"
    ds.Rows, ds.Columns = pixels.shape
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
