"""The external group (half of the official test split) is for choices and reporting only: no
file of it may ever reach a training pool or split made from the training data folder."""
from __future__ import annotations

from pathlib import Path

import pytest
from conftest import ROOT

from pneumoscope.data.datasets import read_dataset, split_by_patient


def _external() -> Path:
    path = ROOT.parent / "shared" / "data" / "chest_xray_external"
    if not (path / "NORMAL").is_dir():
        pytest.skip("external group not found at ../shared/data/chest_xray_external")
    return path


def test_external_group_never_reaches_a_training_split(full_data):
    external = _external().resolve()
    external_names = {p.name for p in external.rglob("*.jpeg")}
    assert len(external_names) == 312
    samples = split_by_patient(read_dataset(full_data).samples, 0.15, 0.15, seed=0)
    paths = [Path(s.path).resolve() for s in samples]
    assert not [p for p in paths if external in p.parents]
    # the same files under another name would be the same leak: none of the training data's file
    # names is one of the external group's (the official test files have their own names)
    assert not external_names & {p.name for p in paths}
    # and the external children are not training children either: NORMAL ids (IM-xxxx) are global;
    # the official release numbers personN afresh in each split, so those cannot be compared
    external_patients = {s.patient_id for s in read_dataset(external).samples}
    assert not external_patients & {s.patient_id for s in samples if s.label == "NORMAL"}
