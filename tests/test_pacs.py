"""pneumoscope in a hospital's DICOM workflow, end to end against a real PACS: Orthanc (Debian's
`orthanc` and `orthanc-dicomweb`, which scripts/install.sh installs), started per test on free
loopback ports with a configuration in tmp_path. Every pneumoscope step runs as the command a user
types (`pneumoscope listen`, `pneumoscope pacs`, `pneumoscope predict`), in a child process.

The DICOM files are DX radiographs made from real X-rays in examples/ (12-bit, MONOCHROME2 and
MONOCHROME1). Waiting is polling with a deadline, never a fixed sleep.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from dicom_files import CT, example, make_dx, sr_facts
from pneumoscope import INTENDED_USE

ORTHANC = shutil.which("Orthanc") or next((p for p in ("/usr/sbin/Orthanc", "/usr/bin/Orthanc") if os.path.exists(p)), None)
DICOMWEB_PLUGIN = next(iter(sorted(glob.glob("/usr/share/orthanc/plugins/libOrthancDicomWeb.so*"))
                            + sorted(glob.glob("/usr/lib/orthanc/libOrthancDicomWeb.so*"))), None)
pytestmark = pytest.mark.skipif(
    ORTHANC is None or DICOMWEB_PLUGIN is None,
    reason="Orthanc with its DICOMweb plugin is not installed (Debian: apt-get install orthanc orthanc-dicomweb; "
           "scripts/install.sh does it)")

requests = pytest.importorskip("requests")
pydicom = pytest.importorskip("pydicom")

DEADLINE = 300.0  # seconds any one wait may take (a loaded 2-core machine); each returns as soon as it is met


# ---------------------------------------------------------------- helpers
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(condition, what: str, deadline: float = DEADLINE, log: Path | None = None):
    """Polls `condition` until it returns something truthy; fails naming `what` after `deadline` s."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    tail = f"\n--- {log}:\n{log.read_text()[-3000:]}" if log and log.exists() else ""
    raise AssertionError(f"timed out waiting for {what}{tail}")


def hold_associations(port: int, n: int) -> list:
    """n open associations to the node, from an SCU calling itself ORTHANC (as another client would)."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title="ORTHANC")
    ae.add_requested_context(Verification)
    held = [ae.associate("127.0.0.1", port, ae_title="PNEUMOSCOPE") for _ in range(n)]
    assert all(assoc.is_established for assoc in held)
    return held


# ---------------------------------------------------------------- Orthanc
class Orthanc:
    """One Orthanc process: storage in `root`, the pneumoscope node as modality "pneumoscope" (and
    "stranger": the same node called with an AE title it does not accept)."""

    def __init__(self, root: Path):
        root.mkdir(parents=True, exist_ok=True)
        self.root, self.http, self.dicom, self.node_port = root, free_port(), free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http}"
        self.dicomweb = f"{self.url}/dicom-web"
        self.config = {
            "Name": "pneumoscope-test", "StorageDirectory": str(root / "db"), "IndexDirectory": str(root / "db"),
            "HttpPort": self.http, "DicomPort": self.dicom, "DicomAet": "ORTHANC",
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "DicomAlwaysAllowEcho": False, "DicomAlwaysAllowStore": False, "DicomCheckModalityHost": True,
            "DicomModalities": {
                "pneumoscope": {"AET": "PNEUMOSCOPE", "Host": "127.0.0.1", "Port": self.node_port},
                "stranger": {"AET": "PNEUMOSCOPE", "Host": "127.0.0.1", "Port": self.node_port,
                             "LocalAet": "STRANGER"}},
            "Plugins": [DICOMWEB_PLUGIN],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
            "DicomScuTimeout": 30, "HttpTimeout": 30, "SaveJobs": False, "StorageCompression": False,
        }
        (root / "orthanc.json").write_text(json.dumps(self.config, indent=2))
        self.log = root / "orthanc.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen([ORTHANC, str(root / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for(self._up, "Orthanc to answer on its REST port", 60, self.log)
        except BaseException:
            self.stop()
            raise

    def _up(self) -> bool:
        assert self.process.poll() is None, f"Orthanc exited:\n{self.log.read_text()[-3000:]}"
        try:
            return requests.get(f"{self.url}/system", timeout=5).ok
        except requests.ConnectionError:
            return False

    def stop(self) -> None:
        self.process.kill()  # its storage is thrown away with tmp_path: no need for its 3-second clean stop
        self.process.wait()

    def upload(self, path: Path) -> str:
        answer = requests.post(f"{self.url}/instances", data=path.read_bytes(), timeout=30)
        answer.raise_for_status()
        return answer.json()["ID"]

    def send(self, ids: list[str], modality: str = "pneumoscope") -> requests.Response:
        """Orthanc C-STOREs the instances to the node and answers when the node has answered."""
        return requests.post(f"{self.url}/modalities/{modality}/store",
                             json={"Resources": ids, "Synchronous": True}, timeout=120)

    def echo(self, modality: str) -> requests.Response:
        return requests.post(f"{self.url}/modalities/{modality}/echo", json={}, timeout=60)

    def series_of(self, instance_id: str, modality: str) -> list[dict]:
        """The series of `modality` in the study of an instance, with their instance ids."""
        study = requests.get(f"{self.url}/instances/{instance_id}/study", timeout=30).json()["ID"]
        series = requests.get(f"{self.url}/studies/{study}/series", timeout=30).json()
        return [s for s in series if s["MainDicomTags"].get("Modality") == modality]

    def instances_of(self, instance_id: str, modality: str) -> list[str]:
        return [i for s in self.series_of(instance_id, modality) for i in s["Instances"]]

    def dataset(self, instance_id: str):
        answer = requests.get(f"{self.url}/instances/{instance_id}/file", timeout=30)
        answer.raise_for_status()
        return pydicom.dcmread(__import__("io").BytesIO(answer.content))


@pytest.fixture
def orthanc(tmp_path):
    server = Orthanc(tmp_path / "orthanc")
    yield server
    server.stop()


# ---------------------------------------------------------------- pneumoscope commands
def pneumoscope(*args) -> list[str]:
    return [sys.executable, "-m", "pneumoscope.cli", *map(str, args)]


class Node:
    """`pneumoscope listen` for an Orthanc, as a child process logging to a file."""

    def __init__(self, orthanc: Orthanc, spool: Path, log: Path, *options):
        self.log, self.start = log, log.stat().st_size if log.exists() else 0  # a restart appends to the log
        command = pneumoscope("listen", "--ae-title", "PNEUMOSCOPE", "--port", orthanc.node_port,
                              "--calling-ae", "ORTHANC", "--spool", spool, *options)
        with open(log, "ab") as handle:
            self.process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)
        try:
            wait_for(self._ready, "the node to listen", log=log)
        except BaseException:  # no test owns it yet: never leave it running
            self.process.kill()
            self.process.wait()
            raise

    def _ready(self) -> bool:
        assert self.process.poll() is None, f"the node exited:\n{self.log.read_text()[-3000:]}"
        return "pneumoscope listen: PNEUMOSCOPE on 127.0.0.1" in self.log.read_text()[self.start:]

    def lines(self, text: str) -> list[str]:
        return [line for line in self.log.read_text().splitlines() if text in line]

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
        try:
            return self.process.wait(timeout=DEADLINE)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


@pytest.fixture(scope="module")
def xrays(tmp_path_factory) -> dict[str, Path]:
    """The DX files the tests send, made once (UIDs fixed for the module)."""
    from pydicom.uid import JPEGLSLossless, generate_uid

    root = tmp_path_factory.mktemp("dx")
    studies = {name: (generate_uid(), generate_uid()) for name in ("pair", "kill", "good", "web1", "web2", "refuse")}
    files = {
        "m2": make_dx(root / "m2.dcm", example("IM-0203-0001.jpeg"), *studies["pair"], number=1),
        "m1": make_dx(root / "m1.dcm", example("person267_bacteria_1250.jpeg"), *studies["pair"], "MONOCHROME1",
                      number=2, compress=JPEGLSLossless),
        "good": make_dx(root / "good.dcm", example("person1009_virus_1694.jpeg"), *studies["good"]),
        "web1": make_dx(root / "web1.dcm", example("IM-0305-0001.jpeg"), *studies["web1"]),
        "web2": make_dx(root / "web2.dcm", example("person1338_bacteria_3395.jpeg"), *studies["web2"], "MONOCHROME1"),
    }
    for i, name in enumerate(("IM-0416-0001.jpeg", "person1099_virus_1819.jpeg", "person1449_bacteria_3743.jpeg")):
        files[f"kill{i + 1}"] = make_dx(root / f"kill{i + 1}.dcm", example(name), *studies["kill"], number=i + 1)
    return files


@pytest.fixture(scope="module")
def predicted(xrays) -> dict[str, dict]:
    """`pneumoscope predict --format json` on every DX file: the answers the SRs must carry."""
    done = subprocess.run(pneumoscope("predict", "--format", "json", *xrays.values()), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines()]
    return {name: next(r for r in records if r["path"] == str(path)) for name, path in xrays.items()}


# ---------------------------------------------------------------- reading the SR back
FINDINGS = {"NORMAL": "Normal", "BACTERIA": "Bacterial pneumonia", "VIRUS": "Viral pneumonia"}


def check_sr(sr, source, record: dict) -> None:
    """The SR is the read of `source`: same study, a new series, the source referenced, the label,
    each probability and the input check equal to `pneumoscope predict`'s record, the model named,
    and the notice."""
    facts = sr_facts(sr)
    assert sr.Modality == "SR" and sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.StudyInstanceUID == source.StudyInstanceUID and sr.PatientID == source.PatientID
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID
    assert facts["references"] == [source.SOPInstanceUID]
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert evidence.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert facts["finding"] == FINDINGS[record["label"]]
    assert facts["probabilities"] == record["probabilities"]
    assert facts["flagged"] == ("No" if record["reliable"] else "Yes")
    name, version = record["model"].split("@")
    assert ("Algorithm Name", name) in facts["text"] and ("Algorithm Version", version) in facts["text"]
    assert ("Comment", INTENDED_USE) in facts["text"]  # the notice the model card and the web page give too
    assert sr.ContentQualification == "RESEARCH" and sr.VerificationFlag == "UNVERIFIED"


# ---------------------------------------------------------------- the tests
def test_listen_reads_what_orthanc_sends_and_stores_the_report_back(orthanc, xrays, predicted, tmp_path):
    """A MONOCHROME2 DX and a JPEG-LS compressed MONOCHROME1 DX sent by Orthanc: one SR each, back
    in Orthanc; C-ECHO answered; an AE title not accepted is rejected."""
    node = Node(orthanc, tmp_path / "spool", tmp_path / "node.log",
                "--send-to", f"ORTHANC@127.0.0.1:{orthanc.dicom}")
    try:
        assert orthanc.echo("pneumoscope").ok
        assert not orthanc.echo("stranger").ok
        wait_for(lambda: node.lines("rejected an association from STRANGER"), "the node to log the rejection", log=node.log)
        ids = {name: orthanc.upload(xrays[name]) for name in ("m2", "m1")}
        answer = orthanc.send(list(ids.values()))
        assert answer.ok, answer.text
        wait_for(lambda: len(orthanc.instances_of(ids["m2"], "SR")) == 2, "two SRs in Orthanc", log=node.log)
    finally:
        assert node.stop() == 0  # SIGTERM: a clean stop
    reports = [orthanc.dataset(i) for i in orthanc.instances_of(ids["m2"], "SR")]
    assert len({sr.SeriesInstanceUID for sr in reports}) == 1  # one new series for the study's reads
    for name in ids:
        source = pydicom.dcmread(xrays[name])
        sr = next(sr for sr in reports if sr_facts(sr)["references"] == [source.SOPInstanceUID])
        check_sr(sr, source, predicted[name])
    assert {predicted["m2"]["label"], predicted["m1"]["label"]} == {"NORMAL", "BACTERIA"}  # both read as predict does
    assert node.lines("JPEG-LS Lossless Image Compression")  # Orthanc sent it compressed, as stored


def test_refusals_answer_their_status_and_the_next_image_is_still_read(orthanc, xrays, predicted, tmp_path):
    """Associations past --max-associations are rejected; a CT, a truncated DX, a lateral and a
    hand radiograph, and a DX whose header claims 10000 x 10000 pixels are refused with their C-STORE
    status (Orthanc reports it) and a logged reason; an instance over --max-instance-mb aborts its
    association; the good one sent after them is read."""
    from pydicom.uid import generate_uid

    study, series = generate_uid(), generate_uid()
    xray = example("IM-0416-0001.jpeg")
    ct = make_dx(tmp_path / "ct.dcm", xray, study, series, sop_class=CT, Modality="CT", BodyPartExamined="HEAD")
    lateral = make_dx(tmp_path / "lateral.dcm", xray, study, series, ViewPosition="LL", number=2)
    hand = make_dx(tmp_path / "hand.dcm", xray, study, series, BodyPartExamined="HAND", number=3)
    corrupt = make_dx(tmp_path / "corrupt.dcm", xray, study, series, number=4)
    truncated = pydicom.dcmread(corrupt)
    truncated.PixelData = truncated.PixelData[: len(truncated.PixelData) // 2]  # half the pixels are missing
    truncated.save_as(corrupt)
    bomb = make_dx(tmp_path / "bomb.dcm", xray, study, series, number=6)
    header_says = pydicom.dcmread(bomb)
    header_says.Rows = header_says.Columns = 10000  # 10000 x 10000 claimed, 224 x 224 sent
    header_says.save_as(bomb)
    big = tmp_path / "big.dcm"
    make_dx(big, xray, study, series, number=5)
    large = pydicom.dcmread(big)
    tiles = np.tile(large.pixel_array, (5, 5))[:1024, :1024]
    large.Rows = large.Columns = 1024
    large.PixelData = tiles.astype(np.uint16).tobytes()  # 2 MiB
    large.save_as(big)
    node = Node(orthanc, tmp_path / "spool", tmp_path / "node.log",
                "--send-to", f"ORTHANC@127.0.0.1:{orthanc.dicom}", "--max-instance-mb", "1", "--max-associations", "2")
    try:
        held = hold_associations(orthanc.node_port, 2)  # a third is one too many
        assert not orthanc.echo("pneumoscope").ok
        wait_for(lambda: node.lines("2 associations are already open (--max-associations)"),
                 "the node to log why it rejected the third", log=node.log)  # logged after the rejection is sent
        for assoc in held:
            assoc.release()
        wait_for(lambda: orthanc.echo("pneumoscope").ok, "the node to accept associations again", log=node.log)
        expected = {ct: ("0x0122", "CT Image Storage: only CR and DX radiographs are read"),
                    corrupt: ("0xC000", "cannot decode DICOM pixel data"),
                    lateral: ("0xA900", "not a frontal view (ViewPosition LL"),
                    hand: ("0xA900", "not a chest radiograph (BodyPartExamined HAND)"),
                    bomb: ("0xA700", "image is 10000x10000, over the 50,000,000-pixel limit")}
        for path, (status, reason) in expected.items():
            answer = orthanc.send([orthanc.upload(path)])
            assert answer.status_code == 500 and f"DIMSE status {status}" in answer.json()["Details"], answer.text
            uid = pydicom.dcmread(path).SOPInstanceUID
            assert any(uid in line and status in line and reason in line
                       for line in node.lines("refused")), node.log.read_text()
        assert not orthanc.send([orthanc.upload(big)]).ok
        wait_for(lambda: node.lines("over the 1 MiB limit"), "the node to log the oversized instance", log=node.log)
        good = orthanc.upload(xrays["good"])
        assert orthanc.send([good]).ok
        wait_for(lambda: orthanc.instances_of(good, "SR"), "the SR of the good image", log=node.log)
        assert node.process.poll() is None
    finally:
        node.stop()
    check_sr(orthanc.dataset(orthanc.instances_of(good, "SR")[0]), pydicom.dcmread(xrays["good"]), predicted["good"])
    assert not list((tmp_path / "spool" / "incoming").iterdir())


def test_a_node_killed_mid_study_loses_nothing_and_repeats_nothing(orthanc, xrays, predicted, tmp_path):
    """Two of a study's three images reach a node whose destination is down (acknowledged, so in
    the spool); the node is killed (SIGKILL). Restarted (storing by STOW-RS now), it reads the two
    from its spool; then Orthanc sends the whole study: three SRs, each image read and stored once."""
    spool, log = tmp_path / "spool", tmp_path / "node.log"
    ids = [orthanc.upload(xrays[f"kill{i}"]) for i in (1, 2, 3)]
    uids = [pydicom.dcmread(xrays[f"kill{i}"]).SOPInstanceUID for i in (1, 2, 3)]
    node = Node(orthanc, spool, log, "--send-to", f"ORTHANC@127.0.0.1:{free_port()}")  # nobody listens there
    try:
        assert orthanc.send(ids[:2]).ok  # acknowledged: both are in the spool
        assert sorted(p.stem for p in (spool / "incoming").glob("*.dcm")) == sorted(uids[:2])
        wait_for(lambda: node.lines("cannot store the read of"), "the node to find its destination down", log=log)
    finally:
        node.process.kill()
        node.process.wait()
    assert not orthanc.instances_of(ids[0], "SR")
    done = spool / "done"
    node = Node(orthanc, spool, log, "--stow", orthanc.dicomweb)
    try:
        assert node.lines("(2 waiting)")
        wait_for(lambda: len(list(done.glob("*.json"))) == 2, "the two spooled images read after the restart", log=log)
        assert orthanc.send(ids).ok  # the whole study: two of its images again
        wait_for(lambda: len(list(done.glob("*.json"))) == 3 and not list((spool / "incoming").iterdir()),
                 "the third read stored and the spool empty", log=log)
    finally:
        assert node.stop() == 0
    assert all(node.lines(f"already read {uid}") for uid in uids[:2])  # answered Success, not read again
    stored = node.lines("stored ")
    assert len(stored) == 3 and all(any(uid in line for line in stored) for uid in uids), stored  # once each
    reports = [orthanc.dataset(i) for i in orthanc.instances_of(ids[0], "SR")]
    assert len(reports) == 3
    for i, uid in enumerate(uids, 1):
        source = pydicom.dcmread(xrays[f"kill{i}"])
        check_sr(next(sr for sr in reports if sr_facts(sr)["references"] == [uid]), source, predicted[f"kill{i}"])


def test_pacs_reads_new_chest_studies_over_dicomweb_and_resumes(orthanc, xrays, predicted, tmp_path):
    """`pneumoscope pacs --dicomweb URL --once`: QIDO-RS finds the DX series (a CT is never
    fetched), WADO-RS fetches, a lateral view is refused and recorded, the SR is stored by
    STOW-RS; a second run (with --overlay) reads only the study that arrived since, and stores its
    Secondary Capture with the Grad-CAM heat map burned in."""
    from pydicom.uid import generate_uid

    state = tmp_path / "state.json"
    web1 = orthanc.upload(xrays["web1"])
    study, series = generate_uid(), generate_uid()
    lateral = make_dx(tmp_path / "lateral.dcm", example("IM-0416-0001.jpeg"), study, series, ViewPosition="LL")
    orthanc.upload(lateral)
    orthanc.upload(make_dx(tmp_path / "ct.dcm", example("IM-0416-0001.jpeg"), generate_uid(), generate_uid(),
                           sop_class=CT, Modality="CT", BodyPartExamined="HEAD"))

    def run_pacs(*options) -> str:
        done = subprocess.run(pneumoscope("pacs", "--dicomweb", orthanc.dicomweb, "--state", state, "--once", *options),
                              capture_output=True, text=True, timeout=DEADLINE)
        assert done.returncode == 0, done.stderr
        return done.stdout + done.stderr

    out = run_pacs()
    assert "pneumoscope pacs: 1 read, 1 refused, 0 failed, 0 already done" in out, out
    assert "not a frontal view (ViewPosition LL" in out
    check_sr(orthanc.dataset(orthanc.instances_of(web1, "SR")[0]), pydicom.dcmread(xrays["web1"]), predicted["web1"])
    web2 = orthanc.upload(xrays["web2"])
    out = run_pacs("--overlay")
    assert "pneumoscope pacs: 1 read, 0 refused, 0 failed, 2 already done" in out, out
    source = pydicom.dcmread(xrays["web2"])
    check_sr(orthanc.dataset(orthanc.instances_of(web2, "SR")[0]), source, predicted["web2"])
    assert len(orthanc.instances_of(web1, "SR")) == 1 and not orthanc.instances_of(web1, "OT")
    [capture] = map(orthanc.dataset, orthanc.instances_of(web2, "OT"))  # --overlay: the Grad-CAM picture
    assert capture.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and capture.BurnedInAnnotation == "YES"
    assert capture.PhotometricInterpretation == "RGB" and capture.pixel_array.shape == (224, 224, 3)
    assert capture.StudyInstanceUID == source.StudyInstanceUID and capture.SeriesNumber == 9902
    assert capture.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    rgb = capture.pixel_array.astype(int)
    assert (np.abs(rgb[..., 0] - rgb[..., 2]) > 40).mean() > 0.05  # coloured by the heat map, not gray
    entries = json.loads(state.read_text())["instances"]
    assert sorted(e["status"] for e in entries.values()) == ["read", "read", "refused"]
