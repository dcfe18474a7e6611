"""`pneumoscope pacs --dicomweb URL`: reads the chest radiographs of a DICOMweb archive.

Each pass finds the CR and DX series with QIDO-RS (Modality matching), lists their instances,
fetches each instance not yet in the state file with WADO-RS, checks it like the DICOM node does
(`accept.check_instance`), reads it and stores the SR (and SC with --overlay) with STOW-RS. The
state file records every instance handled (read, or refused and why), rewritten atomically after
each one, so a killed run goes on where it stopped and an instance is never read twice. An
unavailable archive ends the pass (the next pass, or the next run, tries again); a result the
archive refuses is recorded as failed and not tried again.
"""
from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from ..core.files import atomic_write
from .accept import CANNOT_UNDERSTAND, READ_SOP_CLASSES, Refusal, check_instance, dataset_bytes, valid_uid
from .destinations import Rejected, StowDestination, Unavailable, dicomweb_client
from .report import read_instance

log = logging.getLogger(__name__)

STATE_VERSION = 1
MODALITIES = tuple(dict.fromkeys(READ_SOP_CLASSES.values()))  # CR, DX


class State:
    """{SOP Instance UID: what happened to it}, in a JSON file rewritten atomically."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.instances: dict[str, dict] = {}
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
                self.instances = dict(data["instances"])
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise ValueError(f"{self.path}: not a state file of `pneumoscope pacs` ({err})") from None

    def __contains__(self, uid: str) -> bool:
        return uid in self.instances

    def add(self, uid: str, entry: dict) -> None:
        self.instances[uid] = {**entry, "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        with atomic_write(self.path, "w", encoding="utf-8") as handle:
            json.dump({"version": STATE_VERSION, "instances": self.instances}, handle, indent=1)


@dataclass
class PassCounts:
    read: int = 0
    refused: int = 0
    failed: int = 0
    known: int = 0  # already in the state file
    unavailable: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        text = f"{self.read} read, {self.refused} refused, {self.failed} failed, {self.known} already done"
        return text + (f"; stopped early: {self.unavailable[0]}" if self.unavailable else "")


def _value(item: dict, tag: str) -> str:
    """A DICOM JSON attribute's first value ('' when absent)."""
    values = (item.get(tag) or {}).get("Value") or [""]
    return str(values[0])


class ArchiveReader:
    def __init__(self, url: str, classifier, state: State, stow_url: str | None = None, overlay: bool = False,
                 stop: threading.Event | None = None):
        self.client, self.stop = dicomweb_client(url), stop or threading.Event()
        self.url, self.classifier, self.state, self.overlay = url, classifier, state, overlay
        self.destination = StowDestination(stow_url or url)

    def series(self) -> list[tuple[str, str]]:
        """(study, series) UIDs of the archive's CR and DX series (QIDO-RS)."""
        found = []
        for modality in MODALITIES:
            for item in self.client.search_for_series(search_filters={"Modality": modality}, get_remaining=True):
                study, series = _value(item, "0020000D"), _value(item, "0020000E")
                if valid_uid(study) and valid_uid(series):
                    found.append((study, series))
        return list(dict.fromkeys(found))

    def one_pass(self) -> PassCounts:
        import requests

        counts = PassCounts()
        try:
            for study, series in self.series():
                for item in self.client.search_for_instances(study, series, get_remaining=True):
                    uid = _value(item, "00080018")
                    if not valid_uid(uid):
                        continue
                    if uid in self.state:
                        counts.known += 1
                        continue
                    if self.stop.is_set():  # SIGTERM: the instance being read was finished
                        return counts
                    self.read(study, series, uid, counts)
        except (requests.RequestException, Unavailable) as err:
            counts.unavailable.append(f"{self.url}: {err}")
            log.warning("pneumoscope pacs: %s unavailable (%s); the next pass goes on from here", self.url, err)
        return counts

    def read(self, study: str, series: str, uid: str, counts: PassCounts) -> None:
        retrieved = self.client.retrieve_instance(study, series, uid)  # WADO-RS
        label = f"{uid} ({self.url})"
        try:
            try:
                data = dataset_bytes(retrieved)
            except Exception as err:  # pydicom cannot write what it read back out
                raise Refusal(CANNOT_UNDERSTAND, f"cannot encode the retrieved instance ({type(err).__name__})") from None
            check_instance(data, label)
            reading = read_instance(self.classifier, data, label, overlay=self.overlay)
        except Refusal as refusal:
            log.warning("refused %s: %s", uid, refusal)
            self.state.add(uid, {"study": study, "status": "refused", "reason": str(refusal)})
            counts.refused += 1
            return
        try:
            self.destination.store(reading.datasets)  # Unavailable ends the pass, unrecorded
        except Rejected as err:
            log.error("failed %s: %s", uid, err)
            self.state.add(uid, {"study": study, "status": "failed", "reason": str(err)})
            counts.failed += 1
            return
        record = reading.record
        self.state.add(uid, {"study": study, "status": "read", "label": record.label,
                             "probabilities": record.probabilities, "reliable": record.reliable,
                             "results": [str(ds.SOPInstanceUID) for ds in reading.datasets]})
        counts.read += 1
        log.info("stored %s: %s %.4f%s -> %s", uid, record.label, record.probabilities[record.label],
                 "" if record.reliable else " (input check flagged it)", self.destination)


def run(url: str, classifier, state_path: str | os.PathLike, stow_url: str | None = None, overlay: bool = False,
        once: bool = False, interval: float = 60.0, stop: threading.Event | None = None) -> PassCounts:
    """Passes over the archive every `interval` seconds (one pass with `once`) until `stop`, SIGTERM
    or Ctrl-C; returns the last pass's counts."""
    import signal

    stop = stop or threading.Event()
    reader = ArchiveReader(url, classifier, State(state_path), stow_url, overlay, stop)
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while True:
            counts = reader.one_pass()
            log.info("pneumoscope pacs: pass over %s: %s", url, counts)
            if once or stop.wait(interval):
                return counts
    finally:
        signal.signal(signal.SIGTERM, previous)
