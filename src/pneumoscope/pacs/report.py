"""The read of one radiograph as DICOM objects a PACS stores and a viewer shows.

- A Comprehensive 3D SR (highdicom) holding a TID 1500 Measurement Report: one measurement group
  that references the source image and carries the label (as the group's Finding, a SNOMED CT
  code), each class probability (a NUM item, unit "1"), whether the input check flagged the image
  (Yes/No), the checks' warnings and the model (Algorithm Identification: name and version; the
  Device observer: model name), with the notice that it is not for diagnostic use (a TEXT item,
  the series description, Content Qualification RESEARCH, Verification Flag UNVERIFIED).
- On request a Secondary Capture (highdicom) of the X-ray with the Grad-CAM heat map of the label,
  the label, its probability and the notice burned in.

Both go into the source's study, in new series (numbers 9901 and 9902). Their UIDs are derived
from the source's SOP Instance UID and the model name, so reading the same image again with the
same model yields the same instances: a PACS stores them once, even when a node was killed after
sending a result and before recording it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from .. import INTENDED_USE, __version__
from ..data.images import open_dicom
from ..runtime.classifier import Classifier, Decoded, Record
from ..runtime.explain import cam_heatmap, caption, overlay_image, target_layers
from .accept import CANNOT_UNDERSTAND, Refusal

MANUFACTURER = "pneumoscope"
SR_SERIES_NUMBER, SC_SERIES_NUMBER = 9901, 9902
SCHEME = "99PNEUMOSCOPE"  # a private coding scheme (PS3.3 8.2: designators starting "99")
LABEL_CODES = {"NORMAL": Code("17621005", "SCT", "Normal"),
               "PNEUMONIA": Code("233604007", "SCT", "Pneumonia"),
               "BACTERIA": Code("53084003", "SCT", "Bacterial pneumonia"),
               "VIRUS": Code("75570004", "SCT", "Viral pneumonia")}
CHEST_RADIOGRAPH = Code("399208008", "SCT", "Plain X-ray of chest")  # the procedure reported
INPUT_FLAGGED = Code("input-flagged", SCHEME, "Input check flagged the image")
PROBABILITY_UNIT = codes.UCUM.NoUnits  # "1"
TYPE2_INHERITED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                   "StudyDate", "StudyTime", "ReferringPhysicianName")


def probability_code(label: str) -> Code:
    return Code(f"p-{label.lower()}", SCHEME, f"Probability of {label}")


def label_code(label: str) -> Code:
    return LABEL_CODES.get(label) or Code(f"label-{label.lower()}", SCHEME, label)


@dataclass
class Reading:
    """One radiograph read: the prediction record and the DICOM objects to store (SR first)."""

    record: Record
    datasets: list


def read_instance(classifier: Classifier, data: bytes, label: str, overlay: bool = False) -> Reading:
    """Classifies one DICOM file's bytes exactly as `pneumoscope predict` does (the same decoder and
    model) and builds its SR, and with `overlay` its Secondary Capture. A file that does not
    decode raises Refusal."""

    source = evidence(open_dicom(data, label))
    decoded = classifier.decode(data, label, keep_gray=overlay)
    record = classifier.records(classifier.score_decoded([decoded]))[0]
    if record.status != "ok":
        raise Refusal(CANNOT_UNDERSTAND, record.error or "cannot be read")
    datasets = [structured_report(source, record, classifier)]
    if overlay:
        datasets.append(overlay_capture(source, record, classifier, decoded))
    return Reading(record, datasets)


def evidence(dataset):
    """The source's attributes without its pixels, with the Type 2 patient and study attributes
    (present, possibly empty) that the SR and SC inherit added empty where the sender left them out."""
    from pydicom.dataset import Dataset

    out = Dataset()
    for element in dataset:
        if element.keyword not in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
            out.add(element)
    for keyword in TYPE2_INHERITED:
        if keyword not in out:
            setattr(out, keyword, "")
    return out


def result_uid(classifier: Classifier, kind: str, uid: str):
    """A UID fixed by the model, the kind of object and the source (or study) UID."""
    return generate_uid(entropy_srcs=[MANUFACTURER, classifier.name, kind, str(uid)])


def structured_report(source, record: Record, classifier: Classifier):
    import highdicom as hd
    from highdicom.coding_schemes import CodingSchemeIdentificationItem

    uid = str(source.SOPInstanceUID)
    algorithm = hd.sr.AlgorithmIdentification(name=classifier.meta.name, version=classifier.meta.version,
                                              manufacturer=MANUFACTURER)
    flagged = record.reliable is False
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=result_uid(classifier, "tracking", uid),
                                                     identifier="pneumoscope chest X-ray read"),
        finding_type=label_code(record.label),
        algorithm_id=algorithm,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
        measurements=[hd.sr.Measurement(name=probability_code(c), value=p, unit=PROBABILITY_UNIT)
                      for c, p in record.probabilities.items()],
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(INPUT_FLAGGED, codes.SCT.Yes if flagged else codes.SCT.No)])
    comments = [INTENDED_USE, *record.warnings]  # TID 1501: text qualitative evaluations of the group
    group[0].ContentSequence.extend(hd.sr.TextContentItem(name=codes.DCM.Comment, value=text[:1024],
                                                          relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
                                    for text in comments)
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=result_uid(classifier, "device", "observer"), name=MANUFACTURER, manufacturer_name=MANUFACTURER,
        model_name=classifier.name[:64])
    context = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=codes.DCM.Device, observer_identifying_attributes=device))
    report = hd.sr.MeasurementReport(observation_context=context, procedure_reported=CHEST_RADIOGRAPH,
                                     imaging_measurements=[group])
    return hd.sr.Comprehensive3DSR(
        evidence=[source], content=report[0],
        series_instance_uid=result_uid(classifier, "sr-series", source.StudyInstanceUID),
        series_number=SR_SERIES_NUMBER, sop_instance_uid=result_uid(classifier, "sr", uid),
        instance_number=_instance_number(source), manufacturer=MANUFACTURER, is_complete=True,
        is_final=False, is_verified=False, series_description="pneumoscope read (not for diagnostic use)",
        content_qualification="RESEARCH", manufacturer_model_name=classifier.name[:64],
        software_versions=f"pneumoscope {__version__}",
        coding_schemes=[CodingSchemeIdentificationItem(designator=SCHEME, name="pneumoscope codes",
                                                          responsible_organization=MANUFACTURER)])


def prepare_overlay(classifier: Classifier) -> None:
    """Loads PyTorch, grad-cam and the network and finds Grad-CAM's layer (one traced forward), so
    that a node started with --overlay fails at start-up when it cannot, and its first image does
    not wait for them."""

    target_layers(classifier.model, classifier.img_size)


def overlay_capture(source, record: Record, classifier: Classifier, decoded: Decoded):
    """A Secondary Capture: the X-ray with the label's Grad-CAM heat map, label and notice burned in."""
    import highdicom as hd
    from pydicom.dataset import Dataset


    heat = cam_heatmap(classifier, decoded.pixels, classifier.classes.index(record.label))
    text = f"{caption(record)}\n{classifier.name}\nnot for diagnostic use"
    rgb = np.asarray(overlay_image(decoded.gray, heat, text).convert("RGB"))
    uid = str(source.SOPInstanceUID)
    capture = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source, pixel_array=rgb, photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT", series_instance_uid=result_uid(classifier, "sc-series", source.StudyInstanceUID),
        series_number=SC_SERIES_NUMBER, sop_instance_uid=result_uid(classifier, "sc", uid),
        instance_number=_instance_number(source), manufacturer=MANUFACTURER,
        patient_orientation=_orientation(source), transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description="pneumoscope Grad-CAM (not for diagnostic use)", content_qualification="RESEARCH",
        software_versions=f"pneumoscope {__version__}")
    capture.BurnedInAnnotation = "YES"
    capture.DerivationDescription = f"Grad-CAM of {record.label} by {classifier.name}"[:1024]
    reference = Dataset()
    reference.ReferencedSOPClassUID, reference.ReferencedSOPInstanceUID = source.SOPClassUID, uid
    capture.SourceImageSequence = [reference]
    return capture


def _instance_number(source) -> int:
    try:
        return max(1, int(source.get("InstanceNumber") or 1))
    except (TypeError, ValueError):
        return 1


def _orientation(source) -> tuple[str, str]:
    """The source's PatientOrientation when it is two single letters, else L\\F (the conventional
    display of a frontal chest radiograph)."""
    value = [str(v).upper() for v in (source.get("PatientOrientation") or [])]
    if len(value) == 2 and all(v in ("L", "R", "A", "P", "H", "F") for v in value):
        return value[0], value[1]
    return "L", "F"
