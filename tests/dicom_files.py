"""DICOM files for the tests of the DICOM node (tests/test_pacs.py, tests/test_pacs_report.py):
DX radiographs made from the real X-rays in examples/, and a reader of the SRs it writes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from conftest import EXAMPLES
from PIL import Image

DX, CT = "1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.5.1.4.1.1.2"


def example(name: str) -> Path:
    return next(EXAMPLES.glob(f"*/{name}"))


def make_dx(path: Path, xray: Path, study: str, series: str, photometric: str = "MONOCHROME2", **tags) -> Path:
    """A 12-bit DX radiograph of a real X-ray (MONOCHROME1 stores the inverted values)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    pixels = np.asarray(Image.open(xray).convert("L")).astype(np.uint16) * 16
    if photometric == "MONOCHROME1":
        pixels = 4095 - pixels
    sop_class, compress = tags.pop("sop_class", DX), tags.pop("compress", None)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = "PNEUMO-1", "Test^Child", "20200101", "O"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20261204", "101500", "ACC1", "1"
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "DX", "CHEST", "AP"
    ds.SeriesNumber, ds.InstanceNumber = 1, int(tags.pop("number", 1))
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.tobytes()
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    if compress:
        ds.compress(compress)
    ds.save_as(path, enforce_file_format=True)
    return path


def content_items(ds):
    """Every content item of an SR, depth first: (concept meaning, value type, item)."""
    for item in ds.get("ContentSequence", []):
        yield item.ConceptNameCodeSequence[0].CodeMeaning, item.ValueType, item
        yield from content_items(item)


def sr_facts(ds) -> dict:
    facts = {"probabilities": {}, "text": [], "references": []}
    for meaning, kind, item in content_items(ds):
        if kind == "NUM" and meaning.startswith("Probability of "):
            facts["probabilities"][meaning.removeprefix("Probability of ")] = float(
                item.MeasuredValueSequence[0].NumericValue)
        elif kind == "CODE" and meaning == "Finding":
            facts["finding"] = item.ConceptCodeSequence[0].CodeMeaning
        elif kind == "CODE" and meaning == "Input check flagged the image":
            facts["flagged"] = item.ConceptCodeSequence[0].CodeMeaning
        elif kind == "TEXT":
            facts["text"].append((meaning, item.TextValue))
        elif kind == "IMAGE":
            facts["references"].append(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
    return facts
