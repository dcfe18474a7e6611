"""Where results are stored: a DICOM AE by C-STORE (pynetdicom), or a DICOMweb service by STOW-RS
(dicomweb-client).

`store(datasets)` returns when every dataset was stored, or raises `Unavailable` (nobody answered,
the association was refused, a timeout, an HTTP 5xx/408/429: try again later) or `Rejected` (the
destination answered that it will not store them: trying again does not help).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

TIMEOUT = 30.0  # seconds for a connection, an answer or an HTTP request
RESULT_TRANSFER_SYNTAXES = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")  # explicit, implicit VR little endian


class Unavailable(Exception):
    """The destination could not be reached or was busy: the result stays queued."""


class Rejected(Exception):
    """The destination refused the result."""


AE_ADDRESS = re.compile(r"(?P<aet>[^@]{1,16})@(?P<host>[^:]+):(?P<port>\d{1,5})")


def parse_ae_address(text: str) -> tuple[str, str, int]:
    """'AET@HOST:PORT' -> (aet, host, port), or ValueError."""
    match = AE_ADDRESS.fullmatch(text.strip())
    if not match or not 0 < int(match["port"]) < 65536:
        raise ValueError(f"{text!r} is not AET@HOST:PORT (e.g. ORTHANC@127.0.0.1:4242)")
    return match["aet"].strip(), match["host"], int(match["port"])


@dataclass
class CStoreDestination:
    """A Storage SCP: `aet`@`host`:`port`, called as `calling_aet`."""

    aet: str
    host: str
    port: int
    calling_aet: str

    def __str__(self) -> str:
        return f"{self.aet}@{self.host}:{self.port}"

    def store(self, datasets: list) -> None:
        from pynetdicom import AE

        ae = AE(ae_title=self.calling_aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT
        for sop_class in dict.fromkeys(str(ds.SOPClassUID) for ds in datasets):
            ae.add_requested_context(sop_class, list(RESULT_TRANSFER_SYNTAXES))
        assoc = ae.associate(self.host, self.port, ae_title=self.aet)
        if not assoc.is_established:
            raise Unavailable(f"{self}: no association (refused, aborted or nobody listening)")
        try:
            for ds in datasets:
                status = assoc.send_c_store(ds)
                code = getattr(status, "Status", None)
                if code is None:
                    raise Unavailable(f"{self}: no answer to C-STORE (timeout or connection lost)")
                if code == 0xA700 or 0xA700 < code <= 0xA7FF:
                    raise Unavailable(f"{self}: out of resources (status 0x{code:04X})")
                if code not in (0x0000, 0xB000, 0xB006, 0xB007):  # success and the storage warnings
                    comment = str(status.get("ErrorComment", "") or "")
                    raise Rejected(f"{self}: C-STORE failed with status 0x{code:04X} {comment}".rstrip())
        finally:
            if assoc.is_established:
                assoc.release()


@dataclass
class StowDestination:
    """A DICOMweb service root (e.g. http://pacs:8042/dicom-web)."""

    url: str

    def __str__(self) -> str:
        return self.url

    def store(self, datasets: list) -> None:
        import requests

        try:
            answer = dicomweb_client(self.url).store_instances(datasets)
        except requests.HTTPError as err:
            code = err.response.status_code if err.response is not None else 0
            if code >= 500 or code in (408, 429):
                raise Unavailable(f"{self.url}: STOW-RS answered HTTP {code}") from None
            raise Rejected(f"{self.url}: STOW-RS answered HTTP {code}") from None
        except requests.RequestException as err:
            raise Unavailable(f"{self.url}: {type(err).__name__}") from None
        failed = answer.get("FailedSOPSequence") or []
        if failed:
            reasons = ", ".join(f"{item.get('ReferencedSOPInstanceUID', '?')} (reason {item.get('FailureReason', '?')})"
                                for item in failed)
            raise Rejected(f"{self.url}: STOW-RS did not store {reasons}")


def dicomweb_client(url: str):
    """A DICOMwebClient with a timeout and without its own retry loop (the caller retries)."""
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(url=url.rstrip("/"), timeout=TIMEOUT)
    client.set_http_retry_params(retry=False)
    return client
