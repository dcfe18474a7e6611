"""What the DICOM node and the DICOMweb reader accept, and what each refusal answers.

Read: Computed Radiography and Digital X-Ray (for presentation) instances of the chest in a
frontal view. BodyPartExamined and ViewPosition are checked when the instance has them (many
archives leave them empty; the input check of the prediction still flags a picture that is no
chest X-ray). Every other instance is refused with a C-STORE status (PS3.4 B.2.3, PS3.7 C) and
a one-line reason that goes to the log and to the response's Error Comment.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

from pydicom.uid import (
    UID,
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    UncompressedTransferSyntaxes,
)

from ..data.images import ImageReadError, ImageTooLargeError, open_dicom, read_xray

READ_SOP_CLASSES = {ComputedRadiographyImageStorage: "CR", DigitalXRayImageStorageForPresentation: "DX"}
CHEST_WORDS = ("CHEST", "THORAX", "LUNG")  # BodyPartExamined values read as a chest ("CHEST" is DICOM's term)
FRONTAL_VIEWS = ("AP", "PA")  # ViewPosition; lateral (LL, RL), oblique and decubitus views are refused

# C-STORE statuses
SUCCESS = 0x0000
SOP_CLASS_NOT_SUPPORTED = 0x0122  # Refused: SOP Class not supported (PS3.7 C.5.20)
OUT_OF_RESOURCES = 0xA700  # Refused: Out of Resources (PS3.4 B.2.3)
DOES_NOT_MATCH = 0xA900  # Error: Data Set does not match SOP Class (here: not a frontal chest radiograph)
CANNOT_UNDERSTAND = 0xC000  # Error: Cannot understand (the file or its pixels do not decode)
STATUS_NAMES = {SUCCESS: "Success", SOP_CLASS_NOT_SUPPORTED: "SOP Class not supported",
                OUT_OF_RESOURCES: "Out of Resources", DOES_NOT_MATCH: "Data Set does not match SOP Class",
                CANNOT_UNDERSTAND: "Cannot understand"}


@dataclass
class Refusal(Exception):
    """An instance that is not read: the status to answer and why."""

    status: int
    reason: str

    def __str__(self) -> str:
        return f"0x{self.status:04X} {STATUS_NAMES.get(self.status, '')}: {self.reason}"


def readable_transfer_syntaxes() -> list[UID]:
    """The transfer syntaxes whose pixel data pydicom can decode with what is installed here
    (uncompressed ones always; JPEG, JPEG-LS, JPEG 2000, RLE where a decoder plugin is present).
    A syntax left out is not negotiated, so a sender transcodes (Orthanc does) instead of sending
    what would be refused."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import AllTransferSyntaxes, JPEGExtended12Bit

    def decodes(uid: UID) -> bool:
        try:
            plugins = get_decoder(uid).available_plugins
        except NotImplementedError:  # MPEG, HTJ2K, ...: no decoder in pydicom at all
            return False
        # Pillow decodes 8-bit JPEG only, and JPEG Extended is there for 12-bit radiographs
        return bool(plugins) and not (uid == JPEGExtended12Bit and set(plugins) == {"pillow"})

    uncompressed = list(UncompressedTransferSyntaxes)
    return uncompressed + [uid for uid in AllTransferSyntaxes if uid not in uncompressed and decodes(uid)]


def check_instance(data: bytes, label: str, sop_class: str | None = None) -> object:
    """Checks one received instance (the DICOM file's bytes) and returns its pydicom dataset, or
    raises Refusal. The pixels are decoded once (by `images.read_xray`, the decoder prediction uses),
    so a file that would fail later is refused while the sender still waits for its status."""
    try:
        ds = open_dicom(data, label)
    except ImageTooLargeError as err:
        raise Refusal(OUT_OF_RESOURCES, err.reason) from None
    except ImageReadError as err:
        raise Refusal(CANNOT_UNDERSTAND, err.reason) from None
    check_header(ds, sop_class)
    try:
        read_xray(data, label)
    except ImageTooLargeError as err:
        raise Refusal(OUT_OF_RESOURCES, err.reason) from None
    except ImageReadError as err:
        raise Refusal(CANNOT_UNDERSTAND, err.reason) from None
    return ds


def check_header(ds, sop_class: str | None = None) -> None:
    """Refuses, from the attributes alone, what is not a frontal chest radiograph."""
    try:
        own_class = str(ds.get("SOPClassUID", "") or "")
        sop_class = UID(str(sop_class or own_class))
        uid = str(ds.get("SOPInstanceUID", ""))
        study, series = str(ds.get("StudyInstanceUID", "")), str(ds.get("SeriesInstanceUID", ""))
        modality = str(ds.get("Modality", "") or "").upper()
        body_part = str(ds.get("BodyPartExamined", "") or "").strip().upper()
        view = str(ds.get("ViewPosition", "") or "").strip().upper()
        has_pixels = "PixelData" in ds
    except Exception as err:  # pydicom parses lazily: a broken element raises on first access
        raise Refusal(CANNOT_UNDERSTAND, f"unreadable DICOM attributes ({_one_line(err)})") from None
    if sop_class not in READ_SOP_CLASSES:
        why = ("raw detector data (DX For Processing): send the For Presentation image"
               if sop_class == DigitalXRayImageStorageForProcessing else "only CR and DX radiographs are read")
        raise Refusal(SOP_CLASS_NOT_SUPPORTED, f"{_sop_name(sop_class)}: {why}")
    if own_class and own_class != sop_class:
        raise Refusal(DOES_NOT_MATCH, f"the dataset's SOP Class UID {own_class[:64]} is not the one it was sent as")
    if not valid_uid(uid):
        raise Refusal(DOES_NOT_MATCH, f"SOP Instance UID {uid[:70]!r} is not a valid UID")
    if not (valid_uid(study) and valid_uid(series)):
        raise Refusal(DOES_NOT_MATCH, "no valid Study or Series Instance UID")
    if modality and modality != READ_SOP_CLASSES[sop_class]:
        raise Refusal(DOES_NOT_MATCH, f"Modality {modality} in a {READ_SOP_CLASSES[sop_class]} instance")
    if body_part and not any(word in body_part for word in CHEST_WORDS):
        raise Refusal(DOES_NOT_MATCH, f"not a chest radiograph (BodyPartExamined {body_part})")
    if view and view not in FRONTAL_VIEWS:
        raise Refusal(DOES_NOT_MATCH, f"not a frontal view (ViewPosition {view}; AP or PA are read)")
    if not has_pixels:
        raise Refusal(DOES_NOT_MATCH, "no pixel data")


def valid_uid(uid: str) -> bool:
    """A UID that is safe as a file name too: digits and dots, at most 64 characters."""
    return bool(uid) and UID(uid).is_valid


def dataset_bytes(ds) -> bytes:
    """A pydicom dataset (with its file meta) as the bytes of a DICOM file."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _sop_name(uid: UID) -> str:
    return uid.name if uid.is_valid and uid.name != str(uid) else f"SOP Class {str(uid)[:64] or '(none)'}"


def _one_line(err: BaseException, limit: int = 160) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[:limit] + "..."
