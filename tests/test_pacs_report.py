"""The DICOM node's rules and its SR, in process (no PACS needed: these run where Orthanc is not
installed; tests/test_pacs.py runs the same paths end to end against Orthanc)."""
from __future__ import annotations

import io

import pytest

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("highdicom")

from dicom_files import CT, DX, example, make_dx, sr_facts  # noqa: E402

from pneumoscope import INTENDED_USE  # noqa: E402
from pneumoscope.pacs.accept import (  # noqa: E402
    CANNOT_UNDERSTAND,
    DOES_NOT_MATCH,
    OUT_OF_RESOURCES,
    SOP_CLASS_NOT_SUPPORTED,
    Refusal,
    check_instance,
)


@pytest.fixture(scope="module")
def study():
    from pydicom.uid import generate_uid

    return generate_uid(), generate_uid()


def dx_bytes(tmp_path, study, name="x.dcm", **tags) -> bytes:
    return make_dx(tmp_path / name, example("IM-0203-0001.jpeg"), *study, **tags).read_bytes()


@pytest.mark.parametrize("tags", [{}, {"BodyPartExamined": "THORAX"}, {"BodyPartExamined": ""},
                                  {"ViewPosition": "PA"}, {"ViewPosition": ""}, {"Modality": "DX"},
                                  {"photometric": "MONOCHROME1"}],
                         ids=["chest-ap", "thorax", "no-body-part", "pa", "no-view", "dx", "monochrome1"])
def test_frontal_chest_radiographs_are_accepted(tmp_path, study, tags):
    photometric = tags.pop("photometric", "MONOCHROME2")
    ds = check_instance(dx_bytes(tmp_path, study, photometric=photometric, **tags), "x.dcm", DX)
    assert ds.Modality == "DX"


@pytest.mark.parametrize("tags, status, reason", [
    ({"sop_class": CT, "Modality": "CT"}, SOP_CLASS_NOT_SUPPORTED, "CT Image Storage: only CR and DX"),
    ({"sop_class": "1.2.840.10008.5.1.4.1.1.1.1.1"}, SOP_CLASS_NOT_SUPPORTED, "DX For Processing"),
    ({"BodyPartExamined": "SKULL"}, DOES_NOT_MATCH, "not a chest radiograph (BodyPartExamined SKULL)"),
    ({"ViewPosition": "RL"}, DOES_NOT_MATCH, "not a frontal view (ViewPosition RL"),
    ({"Modality": "CT"}, DOES_NOT_MATCH, "Modality CT in a DX instance"),
    ({"Rows": 10000, "Columns": 10000}, OUT_OF_RESOURCES, "over the 50,000,000-pixel limit"),
    ({"Rows": 300}, CANNOT_UNDERSTAND, "cannot decode DICOM pixel data"),
], ids=["ct", "for-processing", "skull", "lateral", "modality", "too-large", "pixels-short"])
def test_other_instances_are_refused_with_their_status(tmp_path, study, tags, status, reason):
    sop_class = tags.get("sop_class", DX)
    with pytest.raises(Refusal) as refused:
        check_instance(dx_bytes(tmp_path, study, **tags), "x.dcm", sop_class)
    assert refused.value.status == status and reason in refused.value.reason


# pydicom's, on the junk: expected (the node silences it)
@pytest.mark.filterwarnings("ignore:End of file reached before delimiter:UserWarning:pydicom")
def test_garbage_and_a_mismatched_sop_class_are_refused(tmp_path, study):
    with pytest.raises(Refusal) as refused:
        check_instance(b"\0" * 128 + b"DICM" + b"\xff" * 300, "junk.dcm", DX)
    assert refused.value.status in (CANNOT_UNDERSTAND, DOES_NOT_MATCH)
    with pytest.raises(Refusal) as refused:  # a DX dataset sent as CR
        check_instance(dx_bytes(tmp_path, study), "x.dcm", "1.2.840.10008.5.1.4.1.1.1")
    assert refused.value.status == DOES_NOT_MATCH and "not the one it was sent as" in refused.value.reason


@pytest.fixture(scope="module")
def shipped():
    from pneumoscope import Classifier

    return Classifier.load()


def test_the_report_carries_the_prediction_and_is_the_same_instance_when_made_again(tmp_path, study, shipped):
    from pneumoscope.pacs.report import read_instance

    path = make_dx(tmp_path / "m1.dcm", example("person267_bacteria_1250.jpeg"), *study, "MONOCHROME1")
    record = shipped.predict(str(path))
    first, again = (read_instance(shipped, path.read_bytes(), "m1.dcm") for _ in range(2))
    sr = pydicom.dcmread(io.BytesIO(_encoded(first.datasets[0])))
    facts = sr_facts(sr)
    assert facts["probabilities"] == record.probabilities and facts["finding"] == "Bacterial pneumonia"
    assert facts["references"] == [pydicom.dcmread(path).SOPInstanceUID]
    assert ("Comment", INTENDED_USE) in facts["text"]  # the notice the model card and the web page give too
    assert first.datasets[0].SOPInstanceUID == again.datasets[0].SOPInstanceUID  # a repeat is the same result
    assert first.datasets[0].SeriesInstanceUID == again.datasets[0].SeriesInstanceUID


def _encoded(ds) -> bytes:
    from pneumoscope.pacs.accept import dataset_bytes

    return dataset_bytes(ds)
