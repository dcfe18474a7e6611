"""`pneumoscope listen`: a DICOM node (pynetdicom) that reads the chest radiographs sent to it.

A C-STORE is answered only after the instance was checked (`accept.check_instance`: the right
kind of image, and its pixels decode) and written atomically to the spool; a refused one gets its
status and a logged reason, and never stops the node. A worker (the main thread) reads the spool
in arrival order: prediction, SR (and SC with --overlay), stored at the destination; only then is
the instance recorded as done and removed from the spool. So a kill at any point loses nothing
(what was acknowledged is on disk, and is read on restart) and repeats nothing (an instance already
done is answered Success and not read again; results carry UIDs derived from the source, so even a
result sent just before a kill and sent again after it is one instance at the destination).

The spool (one node at a time: it is locked):
    incoming/<SOP Instance UID>.dcm   acknowledged, not yet stored
    done/<SOP Instance UID>.json      read and stored: the record and the result UIDs
    failed/<SOP Instance UID>.dcm     refused by the destination, or unreadable after all (+ .txt: why)
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import queue
import threading
import weakref
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from ..core.files import atomic_write, remove_stale_temporaries
from .accept import (
    CANNOT_UNDERSTAND,
    DOES_NOT_MATCH,
    OUT_OF_RESOURCES,
    SUCCESS,
    Refusal,
    check_instance,
    readable_transfer_syntaxes,
    valid_uid,
)
from .destinations import Rejected, Unavailable
from .report import prepare_overlay, read_instance

log = logging.getLogger(__name__)

MAX_ASSOCIATIONS = 4  # at once; a further one is rejected (A-ASSOCIATE-RJ, local limit exceeded)
MAX_INSTANCE_MB = 64.0  # a chest radiograph is 5-40 MiB uncompressed
COMMAND_OVERHEAD = 64 * 1024  # bytes of a C-STORE besides the dataset (command set, PDU headers)
NETWORK_TIMEOUT = 60.0  # seconds an association may stay silent before it is aborted
RETRY_FIRST, RETRY_MAX = 5.0, 300.0  # seconds between tries to store at an unavailable destination


@dataclass
class NodeConfig:
    ae_title: str
    port: int
    calling_aets: tuple[str, ...]
    destination: object  # destinations.CStoreDestination or StowDestination
    spool: Path
    host: str = "127.0.0.1"
    overlay: bool = False
    max_associations: int = MAX_ASSOCIATIONS
    max_instance_mb: float = MAX_INSTANCE_MB


class Spool:
    """The node's folder: instances waiting, done and failed, keyed by SOP Instance UID (validated
    by the caller: digits and dots only, so a UID is a safe file name)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.incoming, self.done, self.failed = (self.root / name for name in ("incoming", "done", "failed"))
        for folder in (self.incoming, self.done, self.failed):
            folder.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.root / "lock", "a")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            raise ValueError(f"{self.root}: another pneumoscope listen uses this spool") from None
        for folder in (self.incoming, self.done, self.failed):  # a killed node's half-written files
            remove_stale_temporaries(folder)

    def close(self) -> None:
        self._lock.close()

    def pending(self) -> list[str]:
        """UIDs waiting, oldest first."""
        files = [p for p in self.incoming.glob("*.dcm") if valid_uid(p.stem)]
        return [p.stem for p in sorted(files, key=lambda p: (p.stat().st_mtime_ns, p.name))]

    def is_done(self, uid: str) -> bool:
        return (self.done / f"{uid}.json").exists()

    def put(self, uid: str, data: bytes) -> None:
        with atomic_write(self.incoming / f"{uid}.dcm") as handle:
            handle.write(data)

    def read(self, uid: str) -> bytes | None:
        try:
            return (self.incoming / f"{uid}.dcm").read_bytes()
        except FileNotFoundError:
            return None

    def finish(self, uid: str, summary: dict) -> None:
        """Records `uid` as done (atomically), then removes it from incoming."""
        with atomic_write(self.done / f"{uid}.json", "w", encoding="utf-8") as handle:
            json.dump(summary, handle, indent=1)
        self.drop(uid)

    def fail(self, uid: str, reason: str) -> None:
        with atomic_write(self.failed / f"{uid}.txt", "w", encoding="utf-8") as handle:
            handle.write(reason + "\n")
        try:
            os.replace(self.incoming / f"{uid}.dcm", self.failed / f"{uid}.dcm")
        except FileNotFoundError:
            pass

    def drop(self, uid: str) -> None:
        (self.incoming / f"{uid}.dcm").unlink(missing_ok=True)


def status_dataset(status: int, reason: str = ""):
    """A C-STORE status with its Error Comment (LO: 64 characters at most)."""
    from pydicom.dataset import Dataset

    answer = Dataset()
    answer.Status = status
    if reason:
        answer.ErrorComment = reason.encode("ascii", "replace").decode()[:64]
    return answer


class Node:
    """The SCP (pynetdicom threads) and the worker that reads the spool (`run`, the caller's thread)."""

    def __init__(self, config: NodeConfig, classifier):
        self.config, self.classifier = config, classifier
        try:
            self.spool = Spool(config.spool)
        except OSError as err:
            raise ValueError(f"{config.spool}: cannot use it as the spool ({err.strerror or err})") from None
        self.queue: queue.Queue[str] = queue.Queue()
        self.stop = threading.Event()
        self.max_bytes = int(config.max_instance_mb * 2**20) + COMMAND_OVERHEAD
        self._received: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # association -> bytes of this message
        self._received_lock = threading.Lock()  # associations run in threads of their own
        self.server = None

    # ------------------------------------------------------------------ receiving
    def application_entity(self):
        from pynetdicom import AE, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification

        ae = AE(ae_title=self.config.ae_title)
        ae.maximum_associations = self.config.max_associations
        ae.network_timeout, ae.acse_timeout, ae.dimse_timeout = NETWORK_TIMEOUT, 30, 30
        ae.require_calling_aet = list(self.config.calling_aets)
        ae.require_called_aet = True
        syntaxes = readable_transfer_syntaxes()
        # every storage SOP class is negotiated, so an instance of one that is not read (a CT, say)
        # gets its own C-STORE status and log line instead of failing the sender's whole association
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, syntaxes)
        ae.add_supported_context(Verification)
        handlers = [(evt.EVT_C_STORE, self.handle_store), (evt.EVT_DATA_RECV, self.count_received),
                    (evt.EVT_REJECTED, self.log_rejected)]
        return ae, handlers

    def start(self) -> None:
        if self.config.overlay:
            prepare_overlay(self.classifier)
        ae, handlers = self.application_entity()
        try:
            self.server = ae.start_server((self.config.host, self.config.port), block=False, evt_handlers=handlers)
        except OSError as err:  # the port is taken, or the address is not this machine's
            raise ValueError(f"cannot listen on {self.config.host}:{self.config.port} ({err.strerror or err})") from None

    def count_received(self, event) -> None:
        """Aborts an association whose current C-STORE passes the size limit while it arrives:
        DICOM has no status for a request not yet received whole, and reading on would hold it in memory."""
        data = event.data
        if not data or data[0] != 0x04:  # P-DATA-TF PDUs carry the messages
            return
        with self._received_lock:
            total = self._received.get(event.assoc, 0) + len(data)
            self._received[event.assoc] = total
        if total > self.max_bytes and total - len(data) <= self.max_bytes:
            log.warning("aborted the association from %s: an instance over the %g MiB limit (--max-instance-mb)",
                        _calling(event), self.config.max_instance_mb)
            event.assoc.abort()

    def log_rejected(self, event) -> None:
        calling, limit = _calling(event), self.config.max_associations
        open_now = sum(1 for assoc in event.assoc.ae.active_associations if assoc.is_acceptor)
        if calling not in self.config.calling_aets:
            why = f"calling AE title {calling} is not accepted (--calling-ae)"
        elif open_now > limit:
            why = f"{limit} associations are already open (--max-associations)"
        else:
            why = f"it did not call this node's AE title {self.config.ae_title}"
        log.warning("rejected an association from %s (%s:%s): %s", calling, *_peer(event), why)

    def handle_store(self, event):
        """C-STORE: check, spool, acknowledge. Never raises (an exception would answer 0xC211)."""
        with self._received_lock:
            self._received[event.assoc] = 0  # the next message starts from nothing
        uid, calling = str(event.request.AffectedSOPInstanceUID or ""), _calling(event)
        try:
            if valid_uid(uid) and self.spool.is_done(uid):
                log.info("already read %s (from %s): answered Success, not read again", uid, calling)
                return SUCCESS
            data = event.encoded_dataset()
            ds = check_instance(data, f"{uid[:64] or 'instance'} from {calling}", event.request.AffectedSOPClassUID)
            if str(ds.SOPInstanceUID) != uid:
                raise Refusal(DOES_NOT_MATCH, "the dataset's SOP Instance UID is not the one it was sent as")
        except Refusal as refusal:
            log.warning("refused %s from %s: %s", uid[:64] or "an instance", calling, refusal)
            return status_dataset(refusal.status, refusal.reason)
        except Exception as err:  # a broken request must not stop the node
            log.warning("refused %s from %s: 0x%04X cannot read it (%s)", uid[:64], calling, CANNOT_UNDERSTAND, err)
            return status_dataset(CANNOT_UNDERSTAND, "cannot read the instance")
        try:
            self.spool.put(uid, data)
        except OSError as err:
            log.error("refused %s from %s: 0x%04X cannot write the spool (%s)", uid, calling, OUT_OF_RESOURCES, err)
            return status_dataset(OUT_OF_RESOURCES, "cannot write the spool")
        self.queue.put(uid)
        log.info("received %s from %s (study %s, %s)", uid, calling, ds.get("StudyInstanceUID", "?"),
                 _syntax_name(event))
        return SUCCESS

    # ------------------------------------------------------------------ reading
    def run(self) -> None:
        """Reads the spool until `stop` is set: first what a previous run left, then what arrives."""
        waiting = self.spool.pending()
        for uid in waiting:
            self.queue.put(uid)
        log.info("pneumoscope listen: %s on %s:%d, accepting %s; results to %s; spool %s (%d waiting)",
                 self.config.ae_title, self.config.host, self.config.port, ", ".join(self.config.calling_aets),
                 self.config.destination, self.spool.root, len(waiting))
        while not self.stop.is_set():
            try:
                uid = self.queue.get(timeout=0.5)
            except queue.Empty:
                continue
            self.process(uid)

    def process(self, uid: str) -> None:
        if self.spool.is_done(uid):  # received again while it was waiting
            self.spool.drop(uid)
            return
        data = self.spool.read(uid)
        if data is None:
            return
        try:
            reading = read_instance(self.classifier, data, f"{uid}.dcm", overlay=self.config.overlay)
        except Refusal as refusal:
            self._fail(uid, str(refusal))
            return
        except Exception as err:  # one instance's failure never stops the node
            self._fail(uid, f"cannot read it ({type(err).__name__}: {err})")
            return
        if not self._store(uid, reading.datasets):
            return
        record = reading.record
        self.spool.finish(uid, {
            "sop_instance_uid": uid, "label": record.label, "probabilities": record.probabilities,
            "reliable": record.reliable, "warnings": record.warnings, "model": record.model,
            "results": [str(ds.SOPInstanceUID) for ds in reading.datasets], "stored_to": str(self.config.destination),
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        log.info("stored %s: %s %.4f%s -> %s", uid, record.label, record.probabilities[record.label],
                 "" if record.reliable else " (input check flagged it)", self.config.destination)

    def _store(self, uid: str, datasets: list) -> bool:
        """Stores at the destination, waiting and trying again while it is unavailable. False when
        the destination refused (the instance goes to failed/) or the node is stopping."""
        delay = RETRY_FIRST
        while not self.stop.is_set():
            try:
                self.config.destination.store(datasets)
                return True
            except Rejected as err:
                self._fail(uid, str(err))
                return False
            except Unavailable as err:
                log.warning("cannot store the read of %s yet: %s; trying again in %g s", uid, err, delay)
                self.stop.wait(delay)
                delay = min(2 * delay, RETRY_MAX)
        return False

    def _fail(self, uid: str, reason: str) -> None:
        log.error("failed %s: %s (kept in %s)", uid, reason, self.spool.failed)
        self.spool.fail(uid, reason)

    def shutdown(self) -> None:
        self.stop.set()
        if self.server is not None:
            self.server.shutdown()
        self.spool.close()


def _calling(event) -> str:
    try:
        return str(event.assoc.requestor.ae_title).strip() or "?"
    except Exception:
        return "?"


def _syntax_name(event) -> str:
    from pydicom.uid import UID

    try:
        return UID(event.context.transfer_syntax).name
    except Exception:
        return "?"


def _peer(event) -> tuple[str, str]:
    try:
        return str(event.assoc.requestor.address), str(event.assoc.requestor.port)
    except Exception:
        return "?", "?"


def listen(config: NodeConfig, classifier) -> None:
    """Runs the node until SIGTERM or Ctrl-C (the instance being read is finished or stays spooled)."""
    import signal

    node = Node(config, classifier)
    previous = signal.signal(signal.SIGTERM, lambda *_: node.stop.set())
    try:
        node.start()
        node.run()
    finally:
        started = node.server is not None
        node.shutdown()
        signal.signal(signal.SIGTERM, previous)
        if started:
            log.info("pneumoscope listen: stopped")
